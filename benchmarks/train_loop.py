"""Tokens/s of the whole training loop (data, step, logging, checkpoints) on command 1's config.

    JAX_PLATFORMS=cpu python benchmarks/train_loop.py [--steps=40] [--skip=5]

Runs `train()` with configs/tiny_cpu.py (the README's command 1) in a fresh temporary workdir for
`--steps` steps, logging every step, no evaluation or sample, one checkpoint at the end. Each logged
step's wall-clock time is taken when its metrics reach the host; the figure is the steps after the first
`--skip` (which include compilation) divided by their wall time, so it includes everything the loop does
between steps, unlike the `tokens_per_sec` of one step. Prints JSON.
"""

from __future__ import annotations

import argparse
import tempfile
import time

from common import emit, machine


def main():
  p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  p.add_argument("--steps", type=int, default=40)
  p.add_argument("--skip", type=int, default=5)
  args = p.parse_args()

  from llama4_jax.train import train
  from llama4_jax.cli import load_config
  c = load_config("tiny_cpu")
  c.steps, c.log_every, c.eval_every, c.checkpoint_every, c.sample_prompt = args.steps, 1, 0, 0, ""

  times = {}
  with tempfile.TemporaryDirectory() as workdir:
    train(c, workdir, on_log=lambda step, m: times.setdefault(step, time.perf_counter())
          if "loss" in m else None)
  first, last = args.skip, args.steps
  seconds = times[last] - times[first]
  tokens = (last - first) * c.batch_size * c.seq_len
  emit({"benchmark": "train_loop", "config": "configs/tiny_cpu.py", "batch_size": c.batch_size,
        "seq_len": c.seq_len, "steps_timed": last - first, "seconds": round(seconds, 2),
        "tokens_per_sec": round(tokens / seconds, 1), "machine": machine()})


if __name__ == "__main__":
  main()
