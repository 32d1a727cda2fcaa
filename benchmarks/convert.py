"""Conversion throughput and peak memory for 0.5, 1 and 2 GB Hugging Face checkpoints, both ways.

    python benchmarks/convert.py [--sizes=0.5,1,2] [--dir=/tmp/l4_convert_bench]

Each checkpoint has random weights in the real key layout (a Llama 4 MoE of 8 experts, hidden 1024, bf16,
sharded at 1 GB), written streaming. Each conversion runs in a fresh process (`python -m
llama4_jax.convert`), whose peak RSS is read from the kernel (ru_maxrss of the child) and compared with
the same interpreter importing the library and exiting (the baseline). Throughput is reported for the
whole process (imports included) and for the conversion alone (the converter's own summary). References,
page cache warm as for the conversions: reading the files with `cat > /dev/null`, writing as many bytes
into the same file system with `dd` (what writing the output costs there, whatever the conversion does),
and copying them with `cp` (read + write of the same bytes: what any conversion that writes its output
must at least spend). `--dir` on a tmpfs (`/dev/shm/...`) takes the disk out of the figures: on a disk
that cannot absorb the writes, every conversion runs at its write speed once the kernel's dirty-page
allowance is full. Prints JSON.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys

import numpy as np

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def make_checkpoint(directory: str, gigabytes: float) -> int:
  """A random-weight HF checkpoint of about `gigabytes` GB; returns its tensor bytes."""
  import ml_dtypes

  import llama4_jax as l4
  from llama4_jax.checkpoint.hf import write_json, write_sharded
  from llama4_jax.checkpoint.keys import hf_tensor_specs, plan

  base = dict(vocab_size=32000, hidden_size=1024, intermediate_size=1024, intermediate_size_mlp=2048,
              num_attention_heads=8, num_key_value_heads=2, head_dim=128, num_local_experts=8,
              bos_token_id=1, eos_token_id=(2,), pad_token_id=0, param_dtype="bfloat16", dtype="bfloat16")
  per_layer = (l4.get_config("scout", num_hidden_layers=2, **base).num_params()
               - l4.get_config("scout", num_hidden_layers=1, **base).num_params())
  fixed = l4.get_config("scout", num_hidden_layers=1, **base).num_params() - per_layer
  layers = max(1, round((gigabytes * 1e9 / 2 - fixed) / per_layer))
  cfg = l4.get_config("scout", num_hidden_layers=layers, **base)
  specs = {k: (s, np.dtype(ml_dtypes.bfloat16)) for k, s in
           hf_tensor_specs(plan(l4.abstract_model(cfg))).items()}
  rng = np.random.default_rng(0)

  def produce(key):
    shape = specs[key][0]
    return (rng.standard_normal(shape, np.float32) * 0.02).astype(ml_dtypes.bfloat16)

  os.makedirs(directory, exist_ok=True)
  total = write_sharded(directory, specs, produce, "1GB")
  write_json(os.path.join(directory, "config.json"), l4.to_hf_config(cfg))
  return total


def make_training_checkpoint(hf_dir: str, workdir: str) -> None:
  """The HF checkpoint's weights saved as a training run saves them (`checkpoint.training`: the `state`
  item, stacked leaves in chunks of one superblock), in `workdir`/checkpoints/0."""
  from flax import nnx

  import llama4_jax as l4
  from llama4_jax.checkpoint.training import Checkpointer
  model = l4.load_model(hf_dir)
  ckpt = Checkpointer(os.path.join(workdir, "checkpoints"), keep=1, async_save=False)
  ckpt.save(0, {"params": nnx.to_pure_dict(nnx.state(model))}, {}, model.config, force=True)
  ckpt.close()


def make_lora_checkpoint(hf_dir: str, out: str, rank: int = 16) -> None:
  """Rank-`rank` adapters on every linear weight of the HF checkpoint's model (B random, so the merge
  changes every adapted weight), saved with `save_adapters` naming `hf_dir` as their frozen base."""
  import jax
  from flax import nnx

  import llama4_jax as l4
  model = l4.adapt_model(l4.load_model(hf_dir), lora_rank=rank, lora_targets="q,k,v,o,mlp,shared,experts")
  nnx.update(model, jax.tree_util.tree_map_with_path(
      lambda p, v: v + 1e-3 if "lora_b" in jax.tree_util.keystr(p) else v, nnx.state(model)))
  l4.save_adapters(model, out, base=hf_dir)


def child_peak(cmd: list[str]) -> tuple[float, int, list[str]]:
  """Seconds, peak RSS and stdout lines of one child alone: run it under a fresh Python that reports its
  child's ru_maxrss."""
  wrapper = ("import resource,subprocess,sys,time;t=time.perf_counter();"
             "p=subprocess.run(sys.argv[1:]);"
             "print(time.perf_counter()-t, resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss);"
             "sys.exit(p.returncode)")
  proc = subprocess.run([sys.executable, "-c", wrapper] + cmd, cwd=REPO, capture_output=True, text=True)
  if proc.returncode != 0:
    raise RuntimeError(proc.stderr[-3000:])
  lines = proc.stdout.strip().splitlines()
  seconds, kb = lines[-1].split()
  return float(seconds), int(kb) * 1024, lines[:-1]


def _converted(nbytes: int, run: tuple[float, int, list[str]], baseline: int) -> dict:
  seconds, rss, lines = run
  inside = json.loads(lines[-1])["seconds"]
  return {"seconds": round(seconds, 2), "gb_per_s": round(nbytes / 1e9 / seconds, 3),
          "conversion_seconds": inside, "conversion_gb_per_s": round(nbytes / 1e9 / inside, 3),
          "peak_rss_above_baseline_mb": round((rss - baseline) / 1e6)}


def filesystem(path: str) -> str:
  """The type of the file system holding `path` (the longest mount point above it in /proc/mounts)."""
  path, best = os.path.realpath(path), ("", "unknown")
  try:
    with open("/proc/mounts") as f:
      for line in f:
        _, mount, kind = line.split()[:3]
        if (path == mount or path.startswith(mount.rstrip("/") + "/")) and len(mount) > len(best[0]):
          best = (mount, kind)
  except OSError:
    pass
  return best[1]


def main():
  ap = argparse.ArgumentParser()
  ap.add_argument("--sizes", default="0.5,1,2")
  ap.add_argument("--dir", default="/tmp/l4_convert_bench")
  args = ap.parse_args()
  baseline = child_peak([sys.executable, "-c", "import llama4_jax.checkpoint.convert, orbax.checkpoint"])[1]
  results = []
  for gb in (float(x) for x in args.sizes.split(",")):
    root = os.path.join(args.dir, f"{gb}gb")
    shutil.rmtree(root, ignore_errors=True)
    nbytes = make_checkpoint(os.path.join(root, "hf"), gb)
    files = [os.path.join(root, "hf", f) for f in sorted(os.listdir(os.path.join(root, "hf")))]
    cat_s = child_peak(["sh", "-c", "cat " + " ".join(files) + " > /dev/null"])[0]
    cp_s = child_peak(["cp", "-r", os.path.join(root, "hf"), os.path.join(root, "copy")])[0]
    shutil.rmtree(os.path.join(root, "copy"))
    blocks = -(-nbytes // (16 << 20))
    dd_s = child_peak(["dd", "if=/dev/zero", f"of={os.path.join(root, 'dd')}", "bs=16M", f"count={blocks}",
                       "status=none"])[0]
    os.remove(os.path.join(root, "dd"))
    conv = [sys.executable, "-m", "llama4_jax.convert"]
    to_orbax = child_peak(conv + ["hf-to-orbax", os.path.join(root, "hf"), os.path.join(root, "orbax"),
                                  "--quiet"])
    to_hf = child_peak(conv + ["orbax-to-hf", os.path.join(root, "orbax"), os.path.join(root, "hf2"),
                               "--quiet", "--max-shard-size=1GB"])
    for done in ("orbax", "hf2"):  # (room on a tmpfs)
      shutil.rmtree(os.path.join(root, done))
    make_training_checkpoint(os.path.join(root, "hf"), os.path.join(root, "train"))
    from_training = child_peak(conv + ["orbax-to-hf", os.path.join(root, "train"), os.path.join(root, "hf3"),
                                       "--quiet", "--max-shard-size=1GB"])
    shutil.rmtree(os.path.join(root, "hf3"))
    make_lora_checkpoint(os.path.join(root, "hf"), os.path.join(root, "lora"))
    merged = child_peak(conv + ["orbax-to-hf", os.path.join(root, "lora"), os.path.join(root, "hf3"),
                                "--merge-lora", "--quiet", "--max-shard-size=1GB"])
    results.append({
        "checkpoint_gb": round(nbytes / 1e9, 3),
        "read_gb_per_s_cat": round(nbytes / 1e9 / cat_s, 2),
        "write_gb_per_s_dd": round(blocks * (16 << 20) / 1e9 / dd_s, 2),
        "copy_gb_per_s_cp": round(nbytes / 1e9 / cp_s, 2),
        "hf_to_orbax": _converted(nbytes, to_orbax, baseline),
        "orbax_to_hf": _converted(nbytes, to_hf, baseline),
        "training_workdir_to_hf": _converted(nbytes, from_training, baseline),
        "merge_lora_to_hf": _converted(nbytes, merged, baseline),
    })
    shutil.rmtree(root, ignore_errors=True)
  from common import emit, machine
  emit({"benchmark": "convert", "dir": args.dir, "filesystem": filesystem(args.dir),
        "baseline_rss_mb": round(baseline / 1e6), "results": results,
        "machine": machine()})


if __name__ == "__main__":
  main()
