"""What every command line shares: flags spelled with dashes or underscores alike, `--help` that starts
with the command's own usage and example, and a default run config found wherever the command runs.

The commands (installed as console scripts by `pip install -e .`): llama4-train, llama4-sample,
llama4-serve, llama4-plan (absl flags) and llama4-convert (argparse subcommands); each is also
`python -m llama4_jax.<name>`. `--config=configs/<name>.py` finds the configs shipped with the package
when no such file is in the working directory.
"""

from __future__ import annotations

import importlib.util
import os
import sys


def configs_dir() -> str:
  """The run configs shipped with the package: llama4_jax/configs/ in an installed wheel, the checkout's
  configs/ in an editable install."""
  here = os.path.dirname(os.path.abspath(__file__))
  for d in (os.path.join(here, "configs"), os.path.join(os.path.dirname(here), "configs")):
    if os.path.isfile(os.path.join(d, "tiny_cpu.py")):
      return d
  raise FileNotFoundError(f"the run configs are not installed next to {here}: reinstall llama4_jax")


DEFAULT_CONFIG = os.path.join(configs_dir(), "tiny_cpu.py")


def resolve_config(value: str) -> str:
  """A --config value as given if its file exists here; otherwise a shipped config of that name
  (`configs/scout_v5p256.py`, `scout_v5p256.py` or `scout_v5p256`), keeping ml_collections' `:arg`."""
  path, colon, arg = value.partition(":")
  name = os.path.basename(path)
  name = name if name.endswith(".py") else name + ".py"
  shipped = os.path.join(configs_dir(), name)
  if os.path.exists(path) or os.path.dirname(path) not in ("", "configs") or not os.path.isfile(shipped):
    return value
  return shipped + colon + arg


def load_config(value: str):
  """The run config a --config value names (its file's `get_config()`; see `resolve_config`), for code
  that wants a config without the flag: tests, benchmarks."""
  path = resolve_config(value).partition(":")[0]
  spec = importlib.util.spec_from_file_location("run_config", path)
  module = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(module)
  return module.get_config()


def _configs_resolved(argv: list[str]) -> list[str]:
  out = list(argv)
  for i, a in enumerate(out):
    if a.startswith("--config="):
      out[i] = "--config=" + resolve_config(a[len("--config="):])
    elif a == "--config" and i + 1 < len(out):
      out[i + 1] = resolve_config(out[i + 1])
  return out


def _respelled(argv: list[str], dash: str, to: str) -> list[str]:
  out = []
  for i, a in enumerate(argv):
    if i and a.startswith("--") and len(a) > 2:  # flag names only, never values
      name, eq, value = a[2:].partition("=")
      a = "--" + name.replace(dash, to) + eq + value
    if a == "--":
      return out + argv[i:]
    out.append(a)
  return out


def underscored(argv: list[str]) -> list[str]:
  """--api-key=K -> --api_key=K (absl's spelling), so both spellings work."""
  return _respelled(argv, "-", "_")


def dashed(argv: list[str]) -> list[str]:
  """--max_shard_size=1GB -> --max-shard-size=1GB (argparse's spelling), so both spellings work."""
  return _respelled(argv, "_", "-")


def run_absl(main, doc: str) -> None:
  """absl's app.run for `main`, with `doc` (the command's module docstring) as the --help text whatever
  the process's __main__ is (a console script's wrapper has none)."""
  from absl import app
  sys.modules["__main__"].__doc__ = doc
  app.run(main, argv=_configs_resolved(underscored(sys.argv)))
