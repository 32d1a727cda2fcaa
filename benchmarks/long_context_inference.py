"""Long prompts through `generate` (one device, and a `context` axis of simulated devices) and the server.

    python benchmarks/long_context_inference.py [--lengths 16384,32768,65536,131072] [--context 8]
        [--server_prompt 32768] [--skip_server]

The command-1 model (the tiny preset: 10M parameters, 4 layers, one of them NoPE; random weights, which
change neither speed nor memory) with max_position_embeddings raised to 300,000. Each run is its own
process, so its peak RSS (`ru_maxrss`, compiling included) is its own: `generate` of one prompt with 16 new
tokens, called twice (the first compiles); prefill tokens/s is the prompt over the second call's time.
With `--context N` the same on N simulated CPU devices (`mesh context=N`: ring prefill, cache split over
the devices), which share this machine's cores. The server part times one prompt of `--server_prompt`
tokens through the engine (1 slot, prefilled in the engine's 256-token pieces between decode steps) to
its first token. Prints JSON.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time

HERE = os.path.dirname(os.path.abspath(__file__))
MAX_POSITIONS = 300_000


def _model(devices: int):
  import llama4_jax as l4
  cfg = l4.get_config("tiny", max_position_embeddings=MAX_POSITIONS)
  mesh = l4.make_mesh(fsdp=1, context=devices) if devices > 1 else None
  return l4.create_model(cfg, mesh=mesh)


def child_generate(length: int, devices: int) -> dict:
  import resource

  import numpy as np

  import llama4_jax as l4
  model = _model(devices)
  ids = np.random.default_rng(0).integers(3, 8000, length).tolist()
  t0 = time.perf_counter()
  first = l4.generate(model, [ids], max_new_tokens=16, stop_tokens=[])
  compile_and_run = time.perf_counter() - t0
  t0 = time.perf_counter()
  again = l4.generate(model, [ids], max_new_tokens=16, stop_tokens=[])
  seconds = time.perf_counter() - t0
  assert again == first
  return {"prompt_tokens": length, "devices": devices, "first_call_s": round(compile_and_run, 1),
          "seconds": round(seconds, 2), "prefill_tokens_per_s": round(length / seconds),
          "peak_rss_gb": round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20, 2)}


def child_server(length: int) -> dict:
  import numpy as np

  from llama4_jax.serving import Engine, Request, SamplingParams
  context = length + 64
  engine = Engine(_model(1), 1, context)
  engine.warmup()
  engine.start()
  try:
    ids = np.random.default_rng(0).integers(3, 8000, length).tolist()
    req = engine.submit(Request(ids, SamplingParams(max_tokens=1)))
    while req.events.get()[1] == "token":
      pass
    ttft = req.first_token_at - req.created
  finally:
    engine.shutdown()
  return {"prompt_tokens": length, "context": context, "time_to_first_token_s": round(ttft, 1),
          "prefill_tokens_per_s": round(length / ttft)}


def _spawn(args: list[str], devices: int = 1) -> dict:
  env = dict(os.environ, JAX_PLATFORMS="cpu")
  if devices > 1:
    flag = f"--xla_force_host_platform_device_count={devices}"
    env["XLA_FLAGS"] = (env.get("XLA_FLAGS", "") + " " + flag).strip()
  out = subprocess.run([sys.executable, os.path.abspath(__file__), *args], env=env, capture_output=True,
                       text=True, check=False)
  if out.returncode:
    return {"args": args, "error": out.stderr.strip().splitlines()[-1:] or ["exit %d" % out.returncode]}
  return json.loads(out.stdout.strip().splitlines()[-1])


def main():
  p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
  p.add_argument("--lengths", default="16384,32768,65536,131072")
  p.add_argument("--context", type=int, default=8, help="simulated devices on the context axis (0: skip)")
  p.add_argument("--context_lengths", default="16384,32768,65536,131072")
  p.add_argument("--server_prompt", type=int, default=32768)
  p.add_argument("--skip_server", action="store_true")
  p.add_argument("--child", nargs="+", help=argparse.SUPPRESS)
  args = p.parse_args()
  if args.child:
    kind, *rest = args.child
    result = child_generate(int(rest[0]), int(rest[1])) if kind == "generate" else child_server(int(rest[0]))
    print(json.dumps(result))
    return
  sys.path.insert(0, HERE)
  from common import emit, machine
  one = [_spawn(["--child", "generate", n, "1"]) for n in args.lengths.split(",") if n]
  for a, b in zip(one, one[1:]):
    if "peak_rss_gb" in a and "peak_rss_gb" in b:
      b["rss_ratio_vs_half_length"] = round(b["peak_rss_gb"] / a["peak_rss_gb"], 2)
  result = {"benchmark": "long_context_inference", "model": "tiny (command 1), max_position_embeddings "
            f"{MAX_POSITIONS}", "generate_one_device": one}
  if args.context > 1:
    result[f"generate_context_{args.context}"] = [
        _spawn(["--child", "generate", n, str(args.context)], args.context)
        for n in args.context_lengths.split(",") if n]
  if not args.skip_server:
    result["server"] = _spawn(["--child", "server", str(args.server_prompt)])
  result["machine"] = machine()
  emit(result)


if __name__ == "__main__":
  main()
