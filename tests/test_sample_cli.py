"""The sample command line on a Hugging Face checkpoint with a built-in BPE tokenizer beside it."""

import subprocess
import sys

from conftest import MAVERICK_LIKE, make_hf_checkpoint
from llama4_jax.tokenizer import train_bpe
from train_utils import REPO


def test_sample_cli(tmp_path):
  cfg = MAVERICK_LIKE.replace(eos_token_id=(2,))
  make_hf_checkpoint(cfg, tmp_path, seed=5)
  train_bpe(["def add(a, b):\n    return a + b\n"] * 20, 300, str(tmp_path / "tokenizer.json"))
  proc = subprocess.run([sys.executable, "-m", "llama4_jax.sample", f"--checkpoint={tmp_path}",
                         "--prompt=def add", "--max_new_tokens=12"], cwd=REPO, capture_output=True,
                        text=True, timeout=180)
  assert proc.returncode == 0, proc.stderr[-2000:]
  assert proc.stdout.startswith("def add") and "tokens/s after the first]" in proc.stdout
  # on a mesh of the 8 devices (a context axis too: ring prefill, split cache): the same text; a mesh that
  # does not fit is refused before loading
  split = "fsdp=2,tensor=2,context=2"
  runs = {mesh: subprocess.run([sys.executable, "-m", "llama4_jax.sample", f"--checkpoint={tmp_path}",
                                "--prompt=def add", "--max_new_tokens=12", f"--mesh={mesh}"], cwd=REPO,
                               capture_output=True, text=True, timeout=180) for mesh in (split, "tensor=3")}
  assert runs[split].returncode == 0, runs[split].stderr[-2000:]
  assert runs[split].stdout.split("\n[")[0] == proc.stdout.split("\n[")[0]
  assert runs["tensor=3"].returncode == 1 and runs["tensor=3"].stderr.strip().endswith(
      "needs 3 devices but 8 are available; make the product of the axis sizes equal 8 "
      "(or set one axis to -1)")
  # the built-in BPE carries Llama 4's chat tokens, so --chat works with small models too
  chat = subprocess.run([sys.executable, "-m", "llama4_jax.sample", f"--checkpoint={tmp_path}",
                         "--chat", "--max_new_tokens=4"], cwd=REPO, capture_output=True, text=True,
                        timeout=180, input="hi\n")
  assert chat.returncode == 0, chat.stderr[-2000:]
  assert chat.stdout.startswith("user> assistant> ") and "tokens; first after" in chat.stdout
