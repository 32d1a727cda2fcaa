"""Ring attention on 8 simulated CPU devices: memory against length, a 64K-token step, load balance.

    python benchmarks/ring_attention.py [--skip_run]

One attention layer with Llama 4's head geometry scaled down (8 query heads, 2 kv heads, head dim 64),
batch 1, fp32, full causal (a NoPE layer: the whole ring), zigzag layout. Reports:
- per-device temp bytes of forward+backward (`compile().memory_analysis()`) from 2K to 64K tokens, the
  growth per doubling, and at 8K the same ring differentiated by autodiff instead of the custom VJP;
- wall seconds of one forward+backward at 64K tokens (8K per device; 8 devices share this machine's
  cores, so this is a completion check, not a speed figure);
- the static load-balance model at 8 devices: critical path / ideal, zigzag against contiguous;
- a chunked layer over packed rows: the window plan (K/V sent only as far as the window reaches, both
  ways) against the whole ring;
- the training loss's scratch memory per device with Llama 4's vocabulary, by `loss_chunks`.
Prints JSON.
"""

from __future__ import annotations

import dataclasses
import os
import sys
import time

os.environ["XLA_FLAGS"] = (os.environ.get("XLA_FLAGS", "") +
                           " --xla_force_host_platform_device_count=8").strip()
os.environ.setdefault("JAX_PLATFORMS", "cpu")

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402

import llama4_jax as l4  # noqa: E402
from common import emit, machine  # noqa: E402
from llama4_jax.model import ring_attention as ra  # noqa: E402

HEADS, KV_HEADS, DIM, DEVICES = 8, 2, 64, 8


def grad_fn(seq_len: int, custom_vjp: bool = True, layout: str = "zigzag"):
  mesh = l4.make_mesh(fsdp=1, context=DEVICES)
  plan = ra.make_plan(seq_len, DEVICES, None, layout)
  index = jnp.asarray(ra.zigzag_order(seq_len, DEVICES) if layout == "zigzag" else np.arange(seq_len),
                      jnp.int32)[None]
  seg = jnp.ones_like(index)

  def loss(q, k, v):
    out = ra.ring_attention(q, k, v, index, index, seg, mesh, plan, custom_vjp=custom_vjp)
    return jnp.sum(out * out)

  shapes = [jax.ShapeDtypeStruct((1, seq_len, h, DIM), jnp.float32) for h in (HEADS, KV_HEADS, KV_HEADS)]
  return jax.jit(jax.grad(loss, (0, 1, 2))), shapes


def packed_chunked(seq_len: int, chunk: int, docs: int = 8) -> dict:
  """A chunked layer over packed rows (`docs` documents, positions restarting in each), zigzag: the plan
  that sends K/V only as far as a window reaches, on either side, against the whole ring. K/V shard
  transfers per device in the forward pass, and seconds of one forward+backward (best of 3)."""
  mesh = l4.make_mesh(fsdp=1, context=DEVICES)
  order = ra.zigzag_order(seq_len, DEVICES)
  pos = np.arange(seq_len) % (seq_len // docs)
  seg = np.arange(seq_len) // (seq_len // docs) + 1
  index, pos, seg = (jnp.asarray(x[order], jnp.int32)[None] for x in (np.arange(seq_len), pos, seg))
  rng = np.random.RandomState(0)
  args = [jnp.asarray(rng.randn(1, seq_len, h, DIM), jnp.float32) / 4 for h in (HEADS, KV_HEADS, KV_HEADS)]
  windowed = ra.make_plan(seq_len, DEVICES, chunk, "zigzag", aligned=False)
  whole = dataclasses.replace(windowed, steps=DEVICES, back=0)
  out, results = {"seq_len": seq_len, "chunk": chunk, "documents": docs}, []
  for name, plan in (("window", windowed), ("whole_ring", whole)):
    def loss(q, k, v, plan=plan):
      return jnp.sum(ra.ring_attention(q, k, v, index, pos, seg, mesh, plan) ** 2)
    fn = jax.jit(jax.grad(loss, (0, 1, 2)))
    grads = jax.block_until_ready(fn(*args))
    best = float("inf")
    for _ in range(3):
      t0 = time.perf_counter()
      jax.block_until_ready(fn(*args))
      best = min(best, time.perf_counter() - t0)
    out[name] = {"kv_shard_transfers_forward": len(plan.sources()) - 1, "fwd_bwd_seconds": round(best, 3)}
    results.append(grads)
  out["same_gradients"] = bool(all(np.allclose(a, b, atol=1e-5) for a, b in zip(*results)))
  return out


def loss_chunk_memory(seq_len: int = 16384, vocab: int = 202_048, chunks=(1, 4, 16)) -> dict:
  """Per-device scratch bytes of the training loss's gradient (`train.step.token_losses`) for a one-layer
  model with Llama 4's vocabulary, seq_len tokens over context=8, by `loss_chunks` (compiled, not run)."""
  from flax import nnx

  from llama4_jax.train.step import token_losses
  cfg = l4.get_config("tiny", num_hidden_layers=1, vocab_size=vocab, attention_impl="ring")
  mesh = l4.make_mesh(fsdp=1, context=DEVICES)
  graphdef, state = nnx.split(l4.abstract_model(cfg, mesh))
  ids = jax.ShapeDtypeStruct((1, seq_len), jnp.int32)
  batch = {"inputs": ids, "targets": ids, "positions": ids, "segment_ids": ids}
  out = {"seq_len": seq_len, "vocab": vocab, "devices": DEVICES}
  for k in chunks:
    def loss(state, batch, k=k):
      return jnp.sum(token_losses(nnx.merge(graphdef, state), batch, chunks=k)[0])
    compiled = jax.jit(jax.grad(loss)).lower(state, batch).compile()
    out[f"temp_mib_loss_chunks_{k}"] = round(compiled.memory_analysis().temp_size_in_bytes / 2**20, 1)
  return out


def temp_bytes(seq_len: int, custom_vjp: bool = True) -> int:
  fn, shapes = grad_fn(seq_len, custom_vjp)
  return int(fn.lower(*shapes).compile().memory_analysis().temp_size_in_bytes)


def main():
  lengths = [2048, 4096, 8192, 16384, 32768, 65536]
  temps = {n: temp_bytes(n) for n in lengths}
  growth = [temps[b] / temps[a] for a, b in zip(lengths, lengths[1:])]
  result = {
      "benchmark": "ring_attention", "devices": DEVICES, "heads": HEADS, "kv_heads": KV_HEADS,
      "head_dim": DIM,
      "temp_mib_per_device": {n: round(t / 2**20, 2) for n, t in temps.items()},
      "max_growth_per_doubling": round(max(growth), 3),
      "temp_mib_8k_autodiff_through_ring": round(temp_bytes(8192, custom_vjp=False) / 2**20, 2),
      "load_balance_critical_over_ideal": {
          layout: round(ra.block_cost(65536, DEVICES, layout,
                                      ra.make_plan(65536, DEVICES, None, layout))["ratio"], 4)
          for layout in ("zigzag", "contiguous")},
  }
  result["packed_chunked_zigzag"] = packed_chunked(16384, 1024)
  result["loss_chunks_memory"] = loss_chunk_memory()
  if "--skip_run" not in sys.argv:
    n = 65536
    fn, shapes = grad_fn(n)
    rng = np.random.RandomState(0)
    args = [jnp.asarray(rng.randn(*s.shape), jnp.float32) / 4 for s in shapes]
    t0 = time.perf_counter()
    compiled = fn.lower(*args).compile()
    compile_s = time.perf_counter() - t0
    t0 = time.perf_counter()
    grads = jax.block_until_ready(compiled(*args))
    result["fwd_bwd_64k"] = {"seconds": round(time.perf_counter() - t0, 1),
                             "compile_seconds": round(compile_s, 1),
                             "finite": bool(all(np.isfinite(np.asarray(g)).all() for g in grads))}
  result["machine"] = machine()
  emit(result)


if __name__ == "__main__":
  main()
