"""`grouped_matmul`: rows of x [M, K] in consecutive groups, each multiplied by its group's weight
[K, N] (the routed experts' matmul): "blocked" (XLA, any backend, with its own VJP), "ragged_dot"
(`jax.lax.ragged_dot`) or "gmm" (the megablox Pallas kernel on TPU).
"""

from __future__ import annotations

from typing import NamedTuple

import jax
import jax.numpy as jnp


def _block_size(rows: int, groups: int) -> int:
  """Rows per block: about rows/groups (so padding, at most one block per group, stays below the
  work), as a power of two in [8, 256]."""
  per_group = max(rows // max(groups, 1), 1)
  return int(min(256, max(8, 1 << (per_group.bit_length() - 1))))


def grouped_matmul(x_MK, w_GKN, group_sizes_G, impl: str = "blocked"):
  """y[m] = x[m] @ w[g(m)] where rows are sorted by group and group g has group_sizes[g] rows.

  Rows past the last group (sum(group_sizes) < M) belong to no group and give zeros.

  impl "ragged_dot": `jax.lax.ragged_dot` (a native grouped matmul on GPU; on CPU XLA lowers it densely,
  G times the work). impl "gmm": the megablox Pallas kernel (TPU). impl "blocked": rows are padded per
  group to whole blocks and a scan runs one [b, K] @ [K, N] matmul per non-empty block, so the work is
  about M*K*N (plus padding) on any backend.
  """
  if impl == "ragged_dot":
    out = jax.lax.ragged_dot(x_MK, w_GKN, group_sizes_G, preferred_element_type=jnp.float32)
    return out.astype(x_MK.dtype)
  if impl == "gmm":
    return _megablox(x_MK, w_GKN, group_sizes_G.astype(jnp.int32))
  return _blocked_matmul(x_MK, w_GKN, group_sizes_G.astype(jnp.int32))


def _megablox(x_MK, w_GKN, sizes_G):
  """The megablox grouped matmul (a Pallas TPU kernel with its own VJP and cost estimate). Rows are padded
  to whole row tiles. Its backward reuses the tiling with K and N swapped, so one tile width serves both:
  the largest of 512, 256, 128 that divides K and N. Widths that are not multiples of 128 (toy models)
  cannot be tiled for Mosaic and take `ragged_dot` (LoRA's rank-r matmuls too), with the output in x's dtype
  like the kernel's (the MXU accumulates in float32 either way): a float32 output of LoRA B's [rows, F]
  product was the largest buffer of a QLoRA Scout step (0.5 GiB per layer on a v5e-8)."""
  from jax.experimental.pallas.ops.tpu import megablox
  m, k = x_MK.shape
  n = w_GKN.shape[2]
  if k % 128 or n % 128:
    return jax.lax.ragged_dot(x_MK, w_GKN.astype(x_MK.dtype), sizes_G, preferred_element_type=x_MK.dtype)
  tile = max(t for t in (512, 256, 128) if k % t == 0 and n % t == 0)
  tm = 512 if m >= 512 else -(-m // 128) * 128
  pad = -m % tm
  x = jnp.pad(x_MK, ((0, pad), (0, 0))) if pad else x_MK
  dt = x.dtype
  y = megablox.gmm(x, w_GKN.astype(dt), sizes_G, preferred_element_type=dt, tiling=(tm, tile, tile))
  return y[:m] if pad else y


class _Blocks(NamedTuple):
  """Rows sorted by group, padded per group to whole blocks of b rows."""
  b: int
  dest: jax.Array  # [M]: each row's place in the padded buffer
  group: jax.Array  # [num_blocks]: each block's group
  used: jax.Array  # [num_blocks]: block holds rows (the rest are padding past the last group)

  @classmethod
  def of(cls, m: int, sizes_G, b: int) -> "_Blocks":
    g = sizes_G.shape[0]
    num_blocks = -(-m // b) + g  # static bound: sum_g ceil(size_g / b) <= ceil(M / b) + G
    padded = (sizes_G + b - 1) // b * b
    group_start = jnp.cumsum(sizes_G) - sizes_G
    padded_start = jnp.cumsum(padded) - padded
    rows = jnp.arange(m)
    row_group = jnp.minimum(jnp.searchsorted(jnp.cumsum(sizes_G), rows, side="right"), g - 1)
    dest = rows - group_start[row_group] + padded_start[row_group]
    dest = jnp.where(rows < jnp.sum(sizes_G), dest, num_blocks * b + rows)  # no group: outside the buffer
    block_group = jnp.searchsorted(jnp.cumsum(padded), jnp.arange(num_blocks) * b, side="right")
    return cls(b, dest, jnp.minimum(block_group, g - 1), block_group < g)

  def pad(self, x_MC):
    """[num_blocks, b, C]: the rows in their blocks, zeros elsewhere."""
    nb = self.group.shape[0]
    buf = jnp.zeros((nb * self.b, x_MC.shape[1]), x_MC.dtype).at[self.dest].set(
        x_MC, unique_indices=True, mode="drop")
    return buf.reshape(nb, self.b, -1)


def _block_products(blocks: _Blocks, x_nbK, w_GKN, transpose: bool, dtype):
  """Per block x_b @ w[g] (or x_b @ w[g]^T), skipping padding-only blocks -> [M, N] in row order."""
  n = w_GKN.shape[1 if transpose else 2]
  dims = (((1,), (1,) if transpose else (0,)), ((), ()))

  def one_block(_, inp):
    xb, gid, used = inp
    yb = jax.lax.cond(
        used, lambda: jax.lax.dot_general(xb, w_GKN[gid], dims,
                                          preferred_element_type=jnp.float32).astype(dtype),
        lambda: jnp.zeros((blocks.b, n), dtype))
    return None, yb

  _, out = jax.lax.scan(one_block, None, (x_nbK, blocks.group, blocks.used))
  return out.reshape(-1, n).at[blocks.dest].get(mode="fill", fill_value=0)


@jax.custom_vjp
def _blocked_matmul(x_MK, w_GKN, sizes_G):
  blocks = _Blocks.of(x_MK.shape[0], sizes_G, _block_size(x_MK.shape[0], w_GKN.shape[0]))
  return _block_products(blocks, blocks.pad(x_MK), w_GKN, False, x_MK.dtype)


def _blocked_fwd(x_MK, w_GKN, sizes_G):
  return _blocked_matmul(x_MK, w_GKN, sizes_G), (x_MK, w_GKN, sizes_G)


def _blocked_bwd(res, dy_MN):
  """dx = dy @ w[g]^T per block; dw[g] = sum over g's blocks of x_b^T dy_b. Only x and w are kept from
  the forward pass (autodiff of the scan would keep each block's gathered w[g], ~M/b + G expert
  matrices); when w is frozen its cotangent is unused and XLA drops that computation."""
  x_MK, w_GKN, sizes_G = res
  blocks = _Blocks.of(x_MK.shape[0], sizes_G, _block_size(x_MK.shape[0], w_GKN.shape[0]))
  dy_nbN = blocks.pad(dy_MN.astype(x_MK.dtype))
  dx = _block_products(blocks, dy_nbN, w_GKN, True, x_MK.dtype)

  def accumulate(dw, inp):
    xb, dyb, gid, used = inp
    outer = jax.lax.cond(used, lambda: jnp.dot(xb.T, dyb, preferred_element_type=jnp.float32),
                         lambda: jnp.zeros(w_GKN.shape[1:], jnp.float32))
    return dw.at[gid].add(outer), None

  dw, _ = jax.lax.scan(accumulate, jnp.zeros(w_GKN.shape, jnp.float32),
                       (blocks.pad(x_MK), dy_nbN, blocks.group, blocks.used))
  return dx, dw.astype(w_GKN.dtype), None


_blocked_matmul.defvjp(_blocked_fwd, _blocked_bwd)
