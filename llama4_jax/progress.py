"""Progress bars (tqdm, on stderr) for work a user waits for: loading a model, converting a checkpoint,
training a tokenizer, compiling the server's programs.

`enabled=None` (the default everywhere) shows a bar only when stderr is a terminal, so logs and tests stay
clean; only process 0 of a multi-process run shows one.
"""

from __future__ import annotations

import jax
from tqdm import tqdm


def bar(total: int | None, desc: str, unit: str = "it", enabled: bool | None = None, **kwargs) -> tqdm:
  """A tqdm bar of `total` units (None: unknown) labelled `desc`; `enabled` None: when stderr is a tty.
  Bytes: unit="B" (scaled to kB, MB, GB)."""
  if jax.process_index() != 0:
    enabled = False
  scaled = {"unit_scale": True, "unit_divisor": 1000} if unit == "B" else {}
  kwargs = {"dynamic_ncols": True, "leave": False, **scaled, **kwargs}
  return tqdm(total=total, desc=desc, unit=unit, disable=None if enabled is None else not enabled, **kwargs)
