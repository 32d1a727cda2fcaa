"""The colab/ notebooks run top to bottom (nbclient, a fresh kernel each) with their parameters cell
shrunk to test sizes: one device for all but long_context, which simulates 8 as on a CPU runtime."""

import os
from concurrent.futures import ThreadPoolExecutor

import nbformat
import pytest
from nbclient import NotebookClient

from train_utils import REPO, xla_flags

# Appended to each notebook's "parameters" cell (as papermill would): the same code at test sizes.
SMALL = {
    "quickstart": "MAX_NEW_TOKENS = 8",
    "pretrain": "STEPS = 4\nBATCH, SEQ = 4, 32\nVOCAB = 512",
    "finetune_lora": "BASE_STEPS = 3\nLORA_STEPS = 3\nBATCH, SEQ = 4, 64",
    "long_context": "CHECK_LEN = 256\nLENGTHS = [512]",
}


def run_notebook(name, tmp_path, devices):
  nb = nbformat.read(os.path.join(REPO, "colab", f"{name}.ipynb"), as_version=4)
  [params] = [c for c in nb.cells if "parameters" in c.metadata.get("tags", [])]
  params.source += "\n# test sizes\n" + SMALL[name] + f"\nWORKDIR = WORK = {str(tmp_path / 'work')!r}"
  env = dict(os.environ, XLA_FLAGS=xla_flags(devices),
             MPLBACKEND="module://matplotlib_inline.backend_inline")
  NotebookClient(nb, timeout=600, kernel_name="python3",
                 resources={"metadata": {"path": str(tmp_path)}}).execute(env=env)
  return nb


def outputs(nb, kind):
  return [o for c in nb.cells if c.cell_type == "code" for o in c.outputs if o.output_type == kind]


def text(nb):
  return "".join(o.get("text", "") for o in outputs(nb, "stream"))


def images(nb):
  shown = outputs(nb, "display_data") + outputs(nb, "execute_result") + outputs(nb, "update_display_data")
  return [o for o in shown if "image/png" in o.get("data", {})]


@pytest.fixture(scope="module")
def executed(tmp_path_factory):
  """All four notebooks, two at a time (each kernel is its own process; compiling is mostly serial)."""
  def one(name):
    return name, run_notebook(name, tmp_path_factory.mktemp(name),
                              devices=8 if name == "long_context" else 1)

  with ThreadPoolExecutor(max_workers=2) as pool:  # the longest first
    return dict(pool.map(one, ["finetune_lora", "long_context", "pretrain", "quickstart"]))


@pytest.mark.slow
@pytest.mark.parametrize("name", sorted(SMALL))
def test_notebook_runs(name, executed):
  nb = executed[name]
  out = text(nb)
  assert "llama4_jax is installed: using it" in out  # the install cell: no placeholder URL to fail on
  if name == "quickstart":
    assert "Orbax and Hugging Face logits are identical" in out
  if name == "pretrain":
    assert "resumed from the step-4 checkpoint" in out and "after training:" in out and images(nb)
  if name == "finetune_lora":
    assert "LoRA rank 8" in out and "merged checkpoint = base + adapters" in out
  if name == "long_context":
    assert "over 8 device(s)" in out and images(nb)
