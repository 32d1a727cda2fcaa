"""The one weight-declaration helper: every parameter of the model is declared by `param`."""

from __future__ import annotations

from typing import Sequence

import jax
import jax.numpy as jnp
from flax import nnx


def dtype_of(name: str) -> jnp.dtype:
  return jnp.dtype(name)


def param(rngs: nnx.Rngs | None, shape: Sequence[int], axes: Sequence[str | None], dtype,
          init: str = "normal", std: float = 0.02, stack: tuple[int, ...] = (),
          stream: str = "params") -> nnx.Param:
  """Declares one weight: shape, logical axes, dtype, init. Everything else derives from this.

  `stack` prepends leading dims (the scanned superblocks), named `layers`. `stream`: the `rngs` stream
  drawn from (adapters use "lora", so adding them does not change the base weights of a seed).
  """
  shape = tuple(stack) + tuple(shape)
  axes = ("layers",) * len(stack) + tuple(axes)
  assert len(axes) == len(shape), (shape, axes)
  if init in ("ones", "zeros"):
    value = (jnp.ones if init == "ones" else jnp.zeros)(shape, dtype)
  else:
    value = (std * jax.random.normal(getattr(rngs, stream)(), shape, jnp.float32)).astype(dtype)
  return nnx.Param(value, logical_axes=axes)
