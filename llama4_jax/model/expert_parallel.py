"""Expert parallelism: each device routes its own tokens and sends them to the devices holding their experts.

Under GSPMD, sorting a batch's (token, expert) pairs sorts the *global* batch: the compiler gathers every
token onto every device (the Scout step compiled for a v5p-256 held [131072, 8192] activations per
chip per MoE matmul and needed 334 GB). Here the MoE runs inside `shard_map` over the whole mesh:

1. each device takes its tokens (batch over data/fsdp/expert, sequence over context), routes and sorts
   them by expert, as on one device;
2. with an expert axis of size P (E / P experts per device), the sorted rows go to the devices that own
   their experts by one ragged all-to-all (`jax.lax.ragged_all_to_all` on TPU and GPU; on CPU, which
   lacks that op, a dense all-to-all of padded blocks gives the same result);
3. each device runs its experts' rows through the grouped matmul (on TPU the megablox `gmm` Pallas
   kernel), then the results travel back by the reverse exchange.

By default the receive buffer holds P * (tokens x k) rows, the most a device can receive when every token
picks its experts, so no token is dropped and the result equals the one-device computation. Those buffers
(and the expert FFN's activations over them) are the largest of a training step: `moe_capacity_factor`
c > 0 bounds them at c x the balanced share (tokens x k rows), dropping what does not fit (GShard's
capacity factor, applied per receiving device). Expert weights
enter with only their expert axis split: the compiler gathers the rest (the FSDP shards) per layer, as
for every other weight. The exchange has a custom VJP (its transpose is the reverse exchange).
"""

from __future__ import annotations

import dataclasses
import functools
import math
from typing import NamedTuple

import jax
import jax.numpy as jnp
from jax.sharding import PartitionSpec as P

from llama4_jax.model.linear import Weight, packed_axis, quant_of
from llama4_jax.model.platform import target_platform
from llama4_jax.sharding import logical_to_spec

AXIS = "expert"
TENSOR = "tensor"


class Exchange(NamedTuple):
  """Static sizes and traced offsets of one ragged exchange over the expert axis (per device):
  `send[p]` rows starting at `send_off[p]` of the input go to device p, where they land at
  `remote_off[p]` of its output; `recv[p]` rows arrive from device p at `recv_off[p]` of this output."""
  send_off: jax.Array
  send: jax.Array
  remote_off: jax.Array
  recv: jax.Array
  recv_off: jax.Array
  back_off: jax.Array  # where this device's rows sat in device p's input (the reverse's remote_off)

  def reverse(self) -> "Exchange":
    return Exchange(self.recv_off, self.recv, self.back_off, self.send, self.send_off, self.remote_off)


def _starts(sizes):
  return jnp.cumsum(sizes) - sizes


def _swap(x_P):
  """x [P, ...]: entry p goes to device p; entry p of the result came from device p."""
  return jax.lax.all_to_all(x_P, AXIS, 0, 0, tiled=True)


def make_exchange(blocks_P, capacity: int | None = None) -> Exchange:
  """The exchange in which this device sends the first rows of its blocks of blocks_P[p] consecutive rows
  (in device order) to device p: all of them, or as many as fit in the receiving device's `capacity`
  rows (filled in source-device order)."""
  blocks_P = blocks_P.astype(jnp.int32)
  recv_P = _swap(blocks_P)
  if capacity is not None:
    recv_P = jnp.clip(capacity - _starts(recv_P), 0, recv_P)
  send_P = _swap(recv_P) if capacity is not None else blocks_P
  send_off, recv_off = _starts(blocks_P), _starts(recv_P)
  return Exchange(send_off, send_P, _swap(recv_off), recv_P, recv_off, _swap(send_off))


def _dense_exchange(x_RD, ex: Exchange, out_rows: int):
  """The ragged exchange as one dense all-to-all of [P, rows, D] padded blocks (XLA CPU has no ragged
  all-to-all). Moves P times the data; used where only correctness matters."""
  p, rows = ex.send.shape[0], x_RD.shape[0]
  j = jnp.arange(rows)
  src = jnp.clip(ex.send_off[:, None] + j[None, :], 0, rows - 1)  # [P, rows]
  blocks = jnp.where((j[None, :] < ex.send[:, None])[..., None], x_RD[src], 0)
  got = jax.lax.all_to_all(blocks, AXIS, 0, 0, tiled=True)  # [P, rows, D], block q from device q
  r = jnp.arange(out_rows)  # row r comes from the device q whose rows start last at or before it
  q = jnp.clip(jnp.searchsorted(ex.recv_off, r, side="right") - 1, 0, p - 1)
  k = r - ex.recv_off[q]
  return jnp.where((k < ex.recv[q])[:, None], got[q, jnp.clip(k, 0, rows - 1)], 0)


def _exchange_impl(x_RD, ex: Exchange, out_rows: int, ragged: bool):
  if not ragged:
    return _dense_exchange(x_RD, ex, out_rows)
  out = jnp.zeros((out_rows, x_RD.shape[1]), x_RD.dtype)
  return jax.lax.ragged_all_to_all(x_RD, out, ex.send_off, ex.send, ex.remote_off, ex.recv,
                                   axis_name=AXIS)


@functools.partial(jax.custom_vjp, nondiff_argnums=(2, 3))
def _exchange(x_RD, ex: Exchange, out_rows: int, ragged: bool):
  return _exchange_impl(x_RD, ex, out_rows, ragged)


def _exchange_fwd(x_RD, ex, out_rows, ragged):
  return _exchange_impl(x_RD, ex, out_rows, ragged), (ex, x_RD.shape[0])


def _exchange_bwd(out_rows, ragged, res, dy):
  ex, rows = res
  return _exchange_impl(dy, ex.reverse(), rows, ragged), jax.tree.map(lambda _: None, ex)


_exchange.defvjp(_exchange_fwd, _exchange_bwd)


def exchange(x_RD, ex: Exchange, out_rows: int):
  """Rows of x sent per `ex`; returns [out_rows, D] with the received rows first (zeros after). The
  implementation is fixed when the forward pass is traced (the backward may be traced later, outside
  the model's platform context)."""
  return _exchange(x_RD, ex, out_rows, target_platform() != "cpu")


def expert_parallel(routed, mesh, x_BTD, idx_BTk, score_BTk, weights, weight_axes, num_experts: int,
                    key=None, capacity_factor: float = 0.0):
  """The routed experts of tokens x [B, T, D] over `mesh`. `routed(x_ND, idx_Nk, score_Nk, weights, key,
  exchange)` is the one-device computation (`MoE._routed`); `exchange` (None without an expert axis)
  runs its expert FFN on the rows the local experts receive. `weight_axes`: the weights' logical axes
  (same tree, a tuple per array). Returns [B, T, D], sharded like x.

  Tokens are split as activations are (batch over data/fsdp/expert, sequence over context) and stay
  whole over `tensor`. The weights enter as stored: experts over `expert`, the FFN width over `tensor`
  (Megatron style: each tensor device computes its slice of the width, and the down projection's
  partial sums are summed over `tensor` at the end), the model dim over fsdp / context, which is
  all-gathered here (in the compute dtype: the caller casts first). The transpose of that gather is a
  reduce-scatter, so each device receives only its shard of the weight gradients; gathered outside by
  the compiler, they came back as all-reduces of whole gradients."""
  ep = mesh.shape.get(AXIS, 1)
  tokens = logical_to_spec(("batch", "seq", None), mesh, x_BTD.shape, strict=False)
  pairs = [_blocks_whole(w, axes, mesh, x_BTD.dtype) for w, axes in zip(weights, weight_axes)]
  weights, weight_axes = tuple(w for w, _ in pairs), tuple(a for _, a in pairs)
  w_specs = jax.tree.map(lambda w, axes: logical_to_spec(axes, mesh, w.shape, strict=False), weights,
                         weight_axes)
  width_split = any(TENSOR in _axes(part) for spec in jax.tree.leaves(w_specs, is_leaf=_is_spec)
                    for part in spec)
  batch_axes = [a for a in mesh.axis_names if a != TENSOR]

  def local(x, i, s, w, k):
    b, t, d = x.shape
    if k is not None:  # each device's tokens draw their own dropout masks
      k = jax.random.fold_in(k, _linear_index(mesh, batch_axes))
    w = jax.tree.map(_gather, w, w_specs)
    ex = None if ep == 1 else ExpertExchange(ep, num_experts, capacity_factor)
    y = routed(x.reshape(b * t, d), i.reshape(b * t, -1), s.reshape(b * t, -1), w, k, ex)
    if width_split:
      y = jax.lax.psum(y, TENSOR)
    return y.reshape(b, t, d)

  return jax.shard_map(local, mesh=mesh, in_specs=(tokens,) * 3 + (w_specs, P()), out_specs=tokens,
                       check_vma=False)(x_BTD, idx_BTk, score_BTk, weights, key)


def _blocks_whole(w: Weight, axes: Weight, mesh, dtype) -> tuple[Weight, Weight]:
  """(weight, axes) to enter the shard_map with: an NF4 weight as stored when every device holds whole
  blocks (the mesh divides its scales' blocked dim as it divides the codes'), else dequantized to `dtype`
  first (a byte holds weights half a block apart, so a split inside a block cannot be dequantized locally;
  a transient of one layer, and never needed for Llama 4's dims, whose 64-blocks divide every mesh axis
  that splits them)."""
  if quant_of(w.kernel, w.scale) != "nf4":
    return w, axes
  a = packed_axis(w.kernel, w.scale)
  spec = lambda x, ax: tuple(logical_to_spec(ax, mesh, x.shape, strict=False)) + (None,) * x.ndim  # noqa
  if spec(w.kernel, axes.kernel)[a] == spec(w.scale, axes.scale)[a]:
    return w, axes
  return dataclasses.replace(w, kernel=w.value(dtype), scale=None), dataclasses.replace(axes, scale=None)


def _axes(part) -> tuple[str, ...]:
  return () if part is None else (part,) if isinstance(part, str) else tuple(part)


def _is_spec(x) -> bool:
  return isinstance(x, P)


def _gather(w, spec):
  """The local shard of a weight split per `spec`, all-gathered along every dim but the first (the
  expert dim) and those split over `tensor` alone (the FFN width, computed in slices)."""
  for dim, part in enumerate(spec):
    if dim and part and _axes(part) != (TENSOR,):
      w = jax.lax.all_gather(w, part, axis=dim, tiled=True)
  return w


def _linear_index(mesh, axes):
  index = 0
  for a in axes:
    index = index * mesh.shape[a] + jax.lax.axis_index(a)
  return index


@dataclasses.dataclass(frozen=True)
class ExpertExchange:
  """Runs a device's expert FFN on the rows its experts receive from every device of the expert axis."""
  ep: int  # devices on the expert axis
  num_experts: int  # E, all devices together
  capacity_factor: float = 0.0  # see ModelConfig.moe_capacity_factor (0: dropless)

  def __call__(self, x_AD, sizes_E, ffn):
    """x [A, D]: this device's rows sorted by (global) expert, sizes_E rows each. `ffn(rows_RD, sizes)`:
    the FFN of the local experts over rows sorted by local expert. Returns its output for x, [A, D]."""
    ep, a = self.ep, x_AD.shape[0]
    e_loc = self.num_experts // ep
    rows = ep * a  # the most this device can receive
    capacity = None
    if self.capacity_factor:
      capacity = min(rows, -(-math.ceil(self.capacity_factor * a) // 8) * 8)
      rows = capacity
    ex = make_exchange(sizes_E.reshape(ep, e_loc).sum(axis=1), capacity)
    counts_PE = _swap(sizes_E.reshape(ep, e_loc))  # [source device, local expert]
    if capacity is not None:  # each source's block keeps its first ex.recv[p] rows
      ends = jnp.cumsum(counts_PE, axis=1)
      counts_PE = jnp.clip(ex.recv[:, None] - (ends - counts_PE), 0, counts_PE)
    got = exchange(x_AD, ex, rows)  # by source device, each source's rows by local expert
    if e_loc > 1:  # regroup by local expert: (expert, source) order
      order, local_sizes = _by_expert(counts_PE, rows)
      y = ffn(got[order], local_sizes)
      y = jnp.zeros_like(y).at[order].set(y, unique_indices=True)
    else:
      y = ffn(got, counts_PE.sum(axis=0))
    return exchange(y, ex.reverse(), a)


def _by_expert(counts_PE, rows: int):
  """For a buffer holding, per source p, counts[p, e] rows of each local expert e (then padding): the
  permutation that sorts it by (expert, source) with the padding last, and the rows per expert."""
  p, e = counts_PE.shape
  flat = counts_PE.reshape(-1)  # source-major runs
  run_of_row = jnp.searchsorted(jnp.cumsum(flat), jnp.arange(rows), side="right")  # p * e = padding
  expert_of_row = jnp.where(run_of_row < p * e, run_of_row % e, e)
  return jnp.argsort(expert_of_row, stable=True), counts_PE.sum(axis=0)


__all__ = ["ExpertExchange", "exchange", "expert_parallel", "make_exchange"]
