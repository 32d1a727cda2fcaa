"""XLA:CPU's process memory grows while a long loop program runs, far beyond the program's own buffers: a
reproduction with no model code, behind the context-parallel prefill's superlinear RSS on simulated
devices (issue 26).

    python benchmarks/xla_cpu_loop_memory.py [--lengths 16384,32768,65536] [--blocks 128,256,512]

A blockwise attention shape on N simulated devices (`shard_map`, 8 by default): each device loops over
query blocks inside a loop over key blocks inside a loop of N steps (the ring's shape, without its
communication), all `lax.fori_loop`s, so the compiled program's own buffers are under 2 MB
(`memory_analysis().temp_size_in_bytes`). Each case runs in a fresh process and reports the peak RSS
growth during its first call over the RSS after compiling, and what a second call adds. Measured: the
growth is tens to hundreds of MB, grows faster than the length for some block sizes, depends on the block
size non-monotonically, is about the same under jemalloc (LD_PRELOAD), with one XLA thread
(`--xla_cpu_multi_thread_eigen=false`) and without XNNPACK fusions, and is kept for reuse (a second call adds
little). Which part of the XLA:CPU runtime holds it is not identified. Prints JSON.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import threading
import time


def child(length: int, block: int, devices: int) -> dict:
  import jax
  import jax.numpy as jnp
  import numpy as np
  from jax.sharding import Mesh, PartitionSpec as P

  def rss_mb() -> float:
    with open("/proc/self/status") as f:
      return next(int(x.split()[1]) for x in f if x.startswith("VmRSS")) / 1024

  peak = [0.0]

  def sample():
    while True:
      peak[0] = max(peak[0], rss_mb())
      time.sleep(0.02)

  per_device = length // devices
  n = per_device // block

  def attend(q, k, v):  # q, k, v: [per_device, 64]
    def step(_, acc):
      def key_block(j, acc):
        kb = jax.lax.dynamic_slice_in_dim(k, j * block, block)
        vb = jax.lax.dynamic_slice_in_dim(v, j * block, block)

        def query_block(i, acc):
          qb = jax.lax.dynamic_slice_in_dim(q, i * block, block)
          out = jax.nn.softmax(qb @ kb.T) @ vb
          return jax.lax.dynamic_update_slice_in_dim(
              acc, jax.lax.dynamic_slice_in_dim(acc, i * block, block) + out, i * block, 0)
        return jax.lax.fori_loop(0, n, query_block, acc)
      return jax.lax.fori_loop(0, n, key_block, acc)
    return jax.lax.fori_loop(0, devices, step, jnp.zeros_like(q))

  mesh = Mesh(np.array(jax.devices()[:devices]), ("context",))
  f = jax.jit(jax.shard_map(attend, mesh=mesh, in_specs=(P("context"),) * 3, out_specs=P("context")))
  x = jnp.ones((length, 64), jnp.float32)
  compiled = f.lower(x, x, x).compile()
  before = rss_mb()
  threading.Thread(target=sample, daemon=True).start()
  t0 = time.perf_counter()
  compiled(x, x, x).block_until_ready()
  seconds = time.perf_counter() - t0
  time.sleep(0.05)
  first = peak[0]
  compiled(x, x, x).block_until_ready()
  time.sleep(0.05)
  return {"length": length, "block": block, "devices": devices,
          "iterations_per_device": devices * n * n, "seconds": round(seconds, 1),
          "program_temp_mb": round(compiled.memory_analysis().temp_size_in_bytes / 2**20, 1),
          "rss_before_mb": round(before), "peak_growth_mb": round(first - before),
          "second_call_further_mb": round(peak[0] - first)}


def main():
  p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
  p.add_argument("--lengths", default="16384,32768,65536")
  p.add_argument("--blocks", default="128,256,512")
  p.add_argument("--devices", type=int, default=8)
  p.add_argument("--child", nargs=3, type=int, help=argparse.SUPPRESS)
  args = p.parse_args()
  if args.child:
    print(json.dumps(child(*args.child)))
    return
  flag = f"--xla_force_host_platform_device_count={args.devices}"
  env = dict(os.environ, JAX_PLATFORMS="cpu", XLA_FLAGS=(os.environ.get("XLA_FLAGS", "") + " " + flag).strip())
  rows = []
  for block in (int(b) for b in args.blocks.split(",")):
    for length in (int(n) for n in args.lengths.split(",")):
      out = subprocess.run([sys.executable, os.path.abspath(__file__), "--child", str(length), str(block),
                            str(args.devices)], env=env, capture_output=True, text=True, check=False)
      rows.append(json.loads(out.stdout.strip().splitlines()[-1]) if out.returncode == 0 else
                  {"length": length, "block": block, "error": out.stderr.strip().splitlines()[-1:]})
  sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
  from common import emit, machine
  emit({"benchmark": "xla_cpu_loop_memory", "rows": rows, "machine": machine()})


if __name__ == "__main__":
  main()
