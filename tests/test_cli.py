"""The command lines: installed as console scripts, runnable from any directory, `--help` that shows an
example, flags spelled with dashes or underscores alike."""

import json
import os
import shutil
import subprocess
import sys

import pytest

from llama4_jax.cli import dashed, resolve_config, underscored
from train_utils import REPO

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


def test_a_shipped_config_by_its_checkout_path_from_any_directory(tmp_path):
  """`--config=configs/scout_v5p256.py` (as the README writes it) outside the checkout: the shipped one."""
  proc = subprocess.run([_script("llama4-plan"), "--config=configs/scout_v5p256.py", "--tpu=v5p-256",
                         "--json"], cwd=tmp_path, capture_output=True, text=True, timeout=120,
                        env=dict(os.environ, JAX_PLATFORMS="cpu"))
  assert proc.returncode == 0, proc.stderr[-2000:]
  assert json.loads(proc.stdout)["devices"] == 128


def test_the_wheel_ships_every_package_and_the_configs(tmp_path):
  """pyproject.toml lists its packages by hand (configs/ is mapped to llama4_jax.configs): every package
  of the checkout must be in the list, and a built wheel holds the configs."""
  import zipfile
  tomllib = pytest.importorskip("tomllib")  # Python 3.11+
  setup = tomllib.load(open(os.path.join(REPO, "pyproject.toml"), "rb"))["tool"]["setuptools"]
  found = {os.path.relpath(root, REPO).replace(os.sep, ".")
           for root, _, files in os.walk(os.path.join(REPO, "llama4_jax")) if "__init__.py" in files}
  assert set(setup["packages"]) == found | {"llama4_jax.configs"}
  pytest.importorskip("setuptools")
  src = tmp_path / "src"  # a copy: building in the checkout would leave build/ there
  ignore = shutil.ignore_patterns("__pycache__", "*.egg-info")
  for name in ("llama4_jax", "configs"):
    shutil.copytree(os.path.join(REPO, name), src / name, ignore=ignore)
  for name in ("pyproject.toml", "README.md"):
    shutil.copy(os.path.join(REPO, name), src / name)
  proc = subprocess.run([sys.executable, "-m", "pip", "wheel", "-q", "--no-deps", "--no-build-isolation",
                         "-w", str(tmp_path), str(src)], capture_output=True, text=True, timeout=300)
  assert proc.returncode == 0, proc.stderr[-2000:]
  [wheel] = tmp_path.glob("*.whl")
  names = zipfile.ZipFile(wheel).namelist()
  configs = sorted(f for f in os.listdir(os.path.join(REPO, "configs")) if f.endswith(".py"))
  assert all(f"llama4_jax/configs/{f}" in names for f in configs), names


def test_flag_spellings():
  assert underscored(["prog", "--api-key=a-b", "--max-new-tokens", "3", "--", "--x-y"]) == [
      "prog", "--api_key=a-b", "--max_new_tokens", "3", "--", "--x-y"]
  assert dashed(["orbax-to-hf", "--max_shard_size=1GB", "src_dir", "--merge_lora"]) == [
      "orbax-to-hf", "--max-shard-size=1GB", "src_dir", "--merge-lora"]


def test_resolve_config(tmp_path, monkeypatch):
  monkeypatch.chdir(tmp_path)
  shipped = resolve_config("configs/tiny_cpu.py")
  assert os.path.isabs(shipped) and shipped.endswith(os.path.join("configs", "tiny_cpu.py"))
  assert resolve_config("tiny_cpu") == shipped and resolve_config("tiny_cpu.py:arg") == shipped + ":arg"
  (tmp_path / "configs").mkdir()
  (tmp_path / "configs" / "tiny_cpu.py").write_text("")
  assert resolve_config("configs/tiny_cpu.py") == "configs/tiny_cpu.py"  # a local file wins
  assert resolve_config("other/tiny_cpu.py") == "other/tiny_cpu.py"  # another directory: as given
