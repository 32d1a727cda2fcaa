"""What every command line shares: flags spelled with dashes or underscores alike, `--help` that starts
with the command's own usage and example, and a default run config found wherever the command runs.

The commands (installed as console scripts by `pip install -e .`): llama4-train, llama4-sample,
llama4-serve, llama4-plan (absl flags) and llama4-convert (argparse subcommands); each is also
`python -m llama4_jax.<name>`.
"""

from __future__ import annotations

import os
import sys

# The checkout's configs/ (an editable install runs from it); a relative "configs/..." otherwise.
_CHECKOUT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
DEFAULT_CONFIG = (os.path.join(_CHECKOUT, "configs", "tiny_cpu.py")
                  if os.path.exists(os.path.join(_CHECKOUT, "configs", "tiny_cpu.py"))
                  else "configs/tiny_cpu.py")


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
  app.run(main, argv=underscored(sys.argv))
