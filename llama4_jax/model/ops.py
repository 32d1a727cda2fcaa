"""The matmul and the KV cache dtype that keep 16-bit float (bf16) models fast on XLA's CPU backend.

XLA CPU has few native bf16 kernels. Where it has none, it converts the operands to float32 and back, and
for a weight or a KV cache that means a full-size f32 copy on every call (the README's Measured table has
the decode-step times before and after; `benchmarks/decode_cache.py --dtype bfloat16` measures them).
These helpers ask XLA for the forms it runs natively; on other backends, and for float32, they are the
plain JAX calls.
"""

from __future__ import annotations

import math

import jax
import jax.numpy as jnp

from llama4_jax.model.platform import target_platform


def is_cpu_half(dtype) -> bool:
  """Whether arrays of `dtype` are 16-bit floats in a program compiled for XLA's CPU backend."""
  dtype = jnp.dtype(dtype)
  return dtype.itemsize == 2 and jnp.issubdtype(dtype, jnp.floating) and target_platform() == "cpu"


def dot(x, w, dims, preferred_element_type=None):
  """`jax.lax.dot_general(x, w, dims)` (result in x's dtype unless `preferred_element_type`).

  For bf16 on CPU: asked for a bf16 product, XLA converts both operands to float32 first, and schedules
  the conversion of every layer's weight at the start of the step (a step held an f32 copy of the whole
  model). Asked for a float32 product, its YNNPACK kernels take the bf16 operands as they are, for two
  rows or more; one row (batch-1 decoding) goes to Eigen's matrix-vector product, which converts again.
  So 16-bit products get a float32 result, rounded back, and a single row is padded to two.
  """
  if not (x.dtype == w.dtype and is_cpu_half(x.dtype)):
    return jax.lax.dot_general(x, w, dims, preferred_element_type=preferred_element_type)
  out_dtype = preferred_element_type or x.dtype
  (x_con, _), (x_bat, _) = dims
  free = [i for i in range(x.ndim) if i not in x_con and i not in x_bat]
  if not free:  # one row per batch entry (the gathered experts of a decode step: already copies)
    return jax.lax.dot_general(x.astype(jnp.float32), w.astype(jnp.float32), dims).astype(out_dtype)
  one_row = math.prod(x.shape[i] for i in free) == 1
  if one_row:
    x = jnp.concatenate([x, jnp.zeros_like(x)], axis=free[0])
  y = jax.lax.dot_general(x, w, dims, preferred_element_type=jnp.float32)
  if one_row:
    y = jax.lax.slice_in_dim(y, 0, 1, axis=len(x_bat))
  return y.astype(out_dtype)


def kv_cache_dtype(dtype):
  """The KV cache's dtype for a model computing in `dtype`: float32 on CPU for 16-bit floats (elsewhere
  `dtype`). XLA CPU writes into and multiplies a bf16 cache by converting it whole to float32 on every
  step (through an integer view it copies it instead), which made a bf16 model's decode step several times
  slower than an f32 one's (README, Measured). Storing bf16 values in f32 is exact, so the results do not
  change."""
  return jnp.dtype(jnp.float32) if is_cpu_half(dtype) else jnp.dtype(dtype)


def finite_or_zero(m):
  """m where finite, else 0: a running maximum that is still -inf (nothing seen) subtracts as 0."""
  return jnp.where(jnp.isfinite(m), m, 0.0)
