"""Calling a jitted function on an NNX model many times a second, cheaply.

`jax.jit` hashes its static arguments and flattens its array arguments on every call. For an NNX model
passed as (GraphDef, State) both are slow: hashing the GraphDef and sorting the State's keys took ~2 ms
per call on the tiny model, more than its whole decode step. `split_model` does that work once: it returns
a static handle, hashed once, and the flat list of parameter arrays (which flattens fast).

    static, leaves = split_model(model)
    @functools.partial(jax.jit, static_argnames=("static",))
    def step(static, leaves, x):
      return merge_model(static, leaves)(x)
"""

from __future__ import annotations

import jax
from flax import nnx


class Static:
  """A static jit argument whose hash is computed once; equal to itself at once (by identity)."""

  __slots__ = ("value", "_hash")

  def __init__(self, value):
    self.value = value
    self._hash = hash(value)

  def __hash__(self) -> int:
    return self._hash

  def __eq__(self, other) -> bool:
    return self is other or (isinstance(other, Static) and self._hash == other._hash
                             and self.value == other.value)


def split_model(model) -> tuple[Static, list[jax.Array]]:
  """(static handle, parameter arrays) of an NNX module; `merge_model` rebuilds it inside jit."""
  graphdef, state = nnx.split(model)
  leaves, treedef = jax.tree.flatten(state)
  return Static((graphdef, treedef)), leaves


def merge_model(static: Static, leaves):
  graphdef, treedef = static.value
  return nnx.merge(graphdef, jax.tree.unflatten(treedef, leaves))
