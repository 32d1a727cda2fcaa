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

import weakref

import jax
from flax import nnx

from llama4_jax.model.platform import mesh_platform
from llama4_jax.model.transformer import unstacked


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


_UNSTACKED: "weakref.WeakKeyDictionary" = weakref.WeakKeyDictionary()


def split_for_inference(model) -> tuple[Static, list[jax.Array]]:
  """`split_model` of the model to sample with: on CPU, a model of two or more scanned superblocks is
  replaced by its `unstacked` copy (each layer's weights in arrays of their own), made once and kept
  while the model's weights are the same arrays (a training step that replaces them makes a new one).
  XLA CPU copies every weight slice a multi-step scan reads before its matmul (an 8-layer ~126M MoE
  decoded at 35 tokens/s scanned, 61 with `scan_layers=False`; README, Measured, for `generate` now).
  The copy costs a second set of layer weights in host memory; elsewhere (TPU) the scanned model is
  used as it is."""
  static, leaves = split_model(model)
  if model.num_blocks < 2 or (mesh_platform(model.mesh) or jax.default_backend()) != "cpu":
    return static, leaves
  held = _UNSTACKED.get(model)
  if held is not None and len(held[0]) == len(leaves) and all(r() is x for r, x in zip(held[0], leaves)):
    return held[1]
  view = split_model(unstacked(model))
  _UNSTACKED[model] = ([weakref.ref(x) for x in leaves], view)
  return view
