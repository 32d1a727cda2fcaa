"""The matmul and the KV cache dtype that keep 16-bit float (bf16) models fast on XLA's CPU backend.

XLA CPU has few native bf16 kernels. Where it has none, it converts the operands to float32 and back, and
for a weight or a KV cache that means a full-size f32 copy on every call. Measured on the ~100M-parameter
benchmark MoE (`benchmarks/decode_cache.py --model moe_100m --dtype bfloat16`), a batch-1 serving decode
step of the bf16 model took 37 ms against 7 ms for the same model in f32, almost all of it converting
weights. These helpers ask XLA for the forms it runs natively; on other backends, and for float32, they
are the plain JAX calls.
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
  step (through an integer view it copies it instead): with a 4,096-token cache, a decode step of the
  ~100M bf16 MoE took 49-98 ms, against 9-27 ms with an f32 cache. Storing bf16 values in f32 is exact,
  so the results do not change."""
  return jnp.dtype(jnp.float32) if is_cpu_half(dtype) else jnp.dtype(dtype)
