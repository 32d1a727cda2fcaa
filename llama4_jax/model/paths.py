"""Parameter paths of an nnx model's state as plain key tuples, e.g. ("blocks", 0, "attn", "q"), and
tables keyed by them (shardings, leaves). The checkpoint formats and the adapter surgery share them."""

from __future__ import annotations

from typing import Any

import jax
from flax import nnx


def state_path(path) -> tuple:
  """A jax tree path inside an nnx State as plain keys, e.g. ("blocks", 0, "attn", "q")."""
  out = []
  for k in path:
    if isinstance(k, jax.tree_util.DictKey):
      out.append(k.key)
    elif isinstance(k, jax.tree_util.SequenceKey):
      out.append(k.idx)
  return tuple(out)


def sharding_table(shardings) -> dict[tuple, Any]:
  """Path -> Sharding for a tree of shardings over an nnx State (as `model_shardings` returns)."""
  flat = jax.tree_util.tree_flatten_with_path(
      shardings, is_leaf=lambda x: isinstance(x, jax.sharding.Sharding))[0]
  return {state_path(path): s for path, s in flat}


def state_leaves(model) -> dict[tuple, Any]:
  """Path -> array (or ShapeDtypeStruct) for every parameter of an nnx model."""
  flat = jax.tree_util.tree_flatten_with_path(nnx.state(model))[0]
  return {state_path(path): leaf for path, leaf in flat}
