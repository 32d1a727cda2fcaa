"""Checkpoint and conversion throughput to and from Cloud Storage (a local emulator) against local disk,
with each operation's peak RSS, for a ~1 GB checkpoint.

    python benchmarks/gcs.py [--gb=1] [--dir=/tmp/l4_gcs_bench]

The bucket is fake-gcs-server (`llama4_jax.emulator`, from the test extras) on this machine, storing its
objects on the same local disk: its figures measure this stack's request pattern plus the emulator's
own costs, not Cloud Storage's bandwidth (which is per-VM and far above this machine's disk). The
checkpoint has random bf16 weights in the real key layout (`benchmarks/convert.py`'s generator).

Every operation runs in a fresh process whose peak RSS the kernel reports (ru_maxrss of the child),
compared with the same interpreter importing the library (the baseline):
  - a training checkpoint's save (`checkpoint.training.Checkpointer`, synchronous) and its restore
    (`load_model` of the workdir): these hold the model itself, so their RSS includes its ~1 GB;
  - `hf-to-orbax` and `orbax-to-hf` with either side local or in the bucket: streaming, so RSS should
    stay within a few tensors (the target: < 512 MB over the baseline, as for local conversion).
Prints JSON.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import sys
import time

from convert import _converted, child_peak, make_checkpoint


def _child(op: str, src: str, dst: str) -> None:
  """Runs one timed operation in this (fresh) process; prints {"seconds": ...} last."""
  from flax import nnx

  import llama4_jax as l4
  from llama4_jax.checkpoint.training import Checkpointer
  if op == "save":
    model = l4.load_model(src)
    state = {"params": nnx.to_pure_dict(nnx.state(model))}
    t0 = time.perf_counter()
    ckpt = Checkpointer(f"{dst}/checkpoints", keep=1, async_save=False)
    ckpt.save(0, state, {}, model.config, force=True)
    ckpt.close()
  else:  # restore
    t0 = time.perf_counter()
    model = l4.load_model(src)
    import jax
    jax.block_until_ready(nnx.state(model))
  print(json.dumps({"seconds": round(time.perf_counter() - t0, 3)}))


def main():
  ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  ap.add_argument("--gb", type=float, default=1.0)
  ap.add_argument("--dir", default="/tmp/l4_gcs_bench")
  ap.add_argument("--child", choices=["save", "restore"], help=argparse.SUPPRESS)
  ap.add_argument("--src", help=argparse.SUPPRESS)
  ap.add_argument("--dst", help=argparse.SUPPRESS)
  args = ap.parse_args()
  if args.child:
    return _child(args.child, args.src, args.dst)

  from llama4_jax.emulator import gcs_emulator
  root = args.dir
  shutil.rmtree(root, ignore_errors=True)
  nbytes = make_checkpoint(os.path.join(root, "hf"), args.gb)
  hf = os.path.join(root, "hf")
  baseline = child_peak([sys.executable, "-c", "import llama4_jax.checkpoint.convert, orbax.checkpoint"])[1]
  conv = [sys.executable, "-m", "llama4_jax.convert"]
  me = [sys.executable, os.path.abspath(__file__)]

  def converted(*argv):
    return _converted(nbytes, child_peak(conv + list(argv) + ["--quiet"]), baseline)

  def timed(op, src, dst=""):
    return _converted(nbytes, child_peak(me + [f"--child={op}", f"--src={src}", f"--dst={dst}"]), baseline)

  local = os.path.join(root, "local")
  with gcs_emulator("bench") as (bucket, _):
    results = {
        "local_disk": {
            "checkpoint_save": timed("save", hf, f"{local}/train"),
            "checkpoint_restore": timed("restore", f"{local}/train"),
            "hf_to_orbax": converted("hf-to-orbax", hf, f"{local}/orbax"),
            "orbax_to_hf": converted("orbax-to-hf", f"{local}/orbax", f"{local}/hf", "--max-shard-size=1GB"),
        },
        "gcs_emulator": {
            "checkpoint_save_to_bucket": timed("save", hf, f"{bucket}/train"),
            "checkpoint_restore_from_bucket": timed("restore", f"{bucket}/train"),
            "hf_to_orbax_local_to_bucket": converted("hf-to-orbax", hf, f"{bucket}/orbax"),
            "orbax_to_hf_bucket_to_local": converted("orbax-to-hf", f"{bucket}/orbax", f"{local}/hf2",
                                                     "--max-shard-size=1GB"),
            "orbax_to_hf_local_to_bucket": converted("orbax-to-hf", f"{local}/orbax", f"{bucket}/hf",
                                                     "--max-shard-size=1GB"),
            "hf_to_orbax_bucket_to_local": converted("hf-to-orbax", f"{bucket}/hf", f"{local}/orbax2"),
        },
    }
  shutil.rmtree(root, ignore_errors=True)
  from common import emit, machine
  emit({"benchmark": "gcs", "checkpoint_gb": round(nbytes / 1e9, 3), "baseline_rss_mb": round(baseline / 1e6),
        "note": "gcs_emulator is fake-gcs-server on this machine's disk, not Cloud Storage",
        "results": results, "machine": machine()})


if __name__ == "__main__":
  main()
