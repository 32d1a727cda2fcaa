"""How long a decoding request stalls while a long prompt is prefilled: in pieces (the engine's default,
`PREFILL_PIECE` tokens between decode steps) against one call (the piece as large as the context).

    python benchmarks/serve_long_prompt.py [--prompt 3000] [--context 4096] [--repeats 3]

In-process on the `Engine` with the tiny model (random weights): a request decodes 400 tokens; after its
50th token a prompt of `--prompt` tokens arrives. Reports the running request's largest and median gap
between tokens, and the long prompt's time to first token. Prints JSON.
"""

from __future__ import annotations

import argparse
import os
import sys
import time

import numpy as np


def run(piece: int, prompt: int, context: int, repeats: int) -> dict:
  import llama4_jax as l4
  from llama4_jax.serving import Engine, Request, SamplingParams
  from llama4_jax.serving import engine as engine_module
  engine_module.PREFILL_PIECE = piece
  engine = Engine(l4.create_model(l4.get_config("tiny")), 8, context)
  engine.warmup()
  engine.start()
  runs = []
  for rep in range(repeats):
    running = engine.submit(Request([1, 2, 3], SamplingParams(max_tokens=400)))
    times, long = [], None
    while running.events.get()[1] == "token":
      times.append(time.perf_counter())
      if len(times) == 50:
        ids = np.random.RandomState(rep).randint(3, 8000, prompt).tolist()
        long = engine.submit(Request(ids, SamplingParams(max_tokens=1)))
    while long.events.get()[1] == "token":
      pass
    gaps = np.diff(times) * 1e3
    runs.append({"max_gap_ms": round(float(gaps.max()), 1), "median_gap_ms": round(float(np.median(gaps)), 2),
                 "long_prompt_ttft_ms": round((long.first_token_at - long.created) * 1e3, 1)})
  engine.shutdown()
  return {"piece": piece, "runs": runs}


def main():
  p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
  p.add_argument("--prompt", type=int, default=3000, help="tokens of the long prompt")
  p.add_argument("--context", type=int, default=4096, help="the engine's max length")
  p.add_argument("--repeats", type=int, default=3)
  args = p.parse_args()
  from common import emit, machine
  from llama4_jax.serving import engine as engine_module
  default = engine_module.PREFILL_PIECE
  results = [run(piece, args.prompt, args.context, args.repeats) for piece in (default, args.context)]
  emit({"benchmark": "serve_long_prompt", "prompt_tokens": args.prompt, "context": args.context,
        "in_pieces": results[0], "one_call": results[1], "machine": machine()})


if __name__ == "__main__":
  sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
  main()
