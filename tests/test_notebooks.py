"""The colab/ notebooks run top to bottom (nbclient, a fresh kernel each) with their parameters cell
shrunk to test sizes: one device for all but long_context, which simulates 8 as on a CPU runtime.
They start in the background when collection ends (conftest.py), so they overlap the other tests."""

import os
import pathlib
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


# The notebooks execute in background kernels (separate processes) from the end of collection on, while
# the rest of the suite runs (see conftest.py): their compiling overlaps the other tests' instead of
# adding to it. The tests below wait for them.
ORDER = ["finetune_lora", "long_context", "pretrain", "quickstart"]  # the longest first
_pool = None
_futures = {}


def start_in_background(base_dir):
  """Starts executing every notebook, each in its own kernel; `executed()` collects them."""
  global _pool
  if _pool is None:
    _pool = ThreadPoolExecutor(max_workers=len(ORDER), thread_name_prefix="notebook")
    for name in ORDER:
      path = os.path.join(base_dir, name)
      os.makedirs(path, exist_ok=True)
      _futures[name] = _pool.submit(run_notebook, name, pathlib.Path(path),
                                    8 if name == "long_context" else 1)


def shutdown():
  if _pool is not None:
    _pool.shutdown(wait=True, cancel_futures=True)


@pytest.fixture(scope="module")
def executed(tmp_path_factory):
  start_in_background(str(tmp_path_factory.mktemp("notebooks")))  # no-op when conftest started them
  return {name: future.result() for name, future in _futures.items()}


@pytest.mark.slow
@pytest.mark.parametrize("name", sorted(SMALL))
def test_notebook_runs(name, executed):
  nb = executed[name]
  out = text(nb)
  if name == "quickstart":
    assert "Orbax and Hugging Face logits are identical" in out
  if name == "pretrain":
    assert "resumed from the step-4 checkpoint" in out and "after training:" in out and images(nb)
  if name == "finetune_lora":
    assert "LoRA rank 8" in out and "merged checkpoint = base + adapters" in out
  if name == "long_context":
    assert "over 8 device(s)" in out and images(nb)
