"""The command lines: installed as console scripts, runnable from any directory, `--help` that shows an
example, flags spelled with dashes or underscores alike."""

import json
import os
import subprocess
import sys

import pytest

from llama4_jax.cli import dashed, underscored

COMMANDS = ["llama4-train", "llama4-sample", "llama4-serve", "llama4-plan", "llama4-convert"]


def _script(name):
  path = os.path.join(os.path.dirname(sys.executable), name)
  if not os.path.exists(path):
    pytest.skip(f"{name} is not installed in this environment (pip install -e '.[test]' installs it)")
  return path


@pytest.mark.parametrize("name", COMMANDS)
def test_help_shows_an_example_from_any_directory(name, tmp_path):
  proc = subprocess.run([_script(name), "--help"], cwd=tmp_path, capture_output=True, text=True,
                        timeout=120, env=dict(os.environ, JAX_PLATFORMS="cpu"))
  out = proc.stdout + proc.stderr
  assert proc.returncode in (0, 1) and "Traceback" not in out, out[-2000:]  # absl's --help exits 1
  assert f"    {name} --" in out or f"    {name} hf-to-orbax" in out, out[:1500]  # an example line


def test_the_default_config_is_found_outside_the_checkout(tmp_path):
  """`llama4-plan` with no --config (the default, configs/tiny_cpu.py) run from another directory."""
  proc = subprocess.run([_script("llama4-plan"), "--devices=1", "--hbm_gib=16", "--json"], cwd=tmp_path,
                        capture_output=True, text=True, timeout=120,
                        env=dict(os.environ, JAX_PLATFORMS="cpu"))
  assert proc.returncode == 0, proc.stderr[-2000:]
  assert json.loads(proc.stdout)["fits"] is True


def test_flag_spellings():
  assert underscored(["prog", "--api-key=a-b", "--max-new-tokens", "3", "--", "--x-y"]) == [
      "prog", "--api_key=a-b", "--max_new_tokens", "3", "--", "--x-y"]
  assert dashed(["orbax-to-hf", "--max_shard_size=1GB", "src_dir", "--merge_lora"]) == [
      "orbax-to-hf", "--max-shard-size=1GB", "src_dir", "--merge-lora"]
