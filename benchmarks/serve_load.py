"""Load on the OpenAI-compatible server: throughput and time to first token at 1, 8 and 32 concurrent
clients, continuous batching against serving one request at a time.

    python benchmarks/serve_load.py [--checkpoint workdir/tiny] [--clients 1 8 32] [--requests 16]
    python benchmarks/serve_load.py --clients 1 8 --baseline_repo /tmp/old --only_continuous  # A/B
    python benchmarks/serve_load.py --shared_prefix 2000 --max_context 4096 --clients 1 8

The server runs in its own process (`python -m llama4_jax.serve`) on loopback; this process is the load:
each client thread sends `--requests` streaming completions one after another (greedy, prompts of
different lengths, `--max_tokens` each) and the run stops early after `--time_limit` seconds. The same
load goes to a server with `--slots` decode slots (continuous batching) and to one with a single slot
(requests served one at a time, the rest queued); then the same load at 8 clients straight on the
engine in this process (no HTTP), which separates what batching gives from what the HTTP layer costs.
Tokens are the completion tokens the server reports;
time to first token is from sending the request to the first streamed text. Without --checkpoint, the
trained tiny model in workdir/tiny is used if present, else a randomly initialised tiny model;
`--model moe_100m` serves a random ~100M-parameter MoE instead. `--logprobs K` asks for each token's
log-probability and K alternatives. `--baseline_repo DIR` also runs the continuous-batching load against
the server of another checkout (e.g. `git worktree add /tmp/old <commit>`), alternating with this one's,
for an A/B in one run; `--only_continuous` skips the one-slot server and the engine-alone runs.
`--shared_prefix N`: every prompt is the same N-token "system prompt" followed by its own 50-token user
turn (token ids from the built-in corpus), served with the prefix cache off and on
(`--prefix_cache_tokens`); the time to first token is what it changes. Prints JSON.
"""

from __future__ import annotations

import argparse
import concurrent.futures as cf
import http.client
import json
import os
import re
import statistics
import subprocess
import sys
import tempfile
import threading
import time

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
PROMPTS = ["def ", "import os\n", "class Parser:\n    def __init__(self", "# Copyright\n\"\"\"Utilities for",
           "for i in range(", "    return self._", "if __name__ == '__main__':\n", "from typing import "]


def random_model(name: str, directory: str) -> str:
  """A randomly initialised model ("tiny", or "moe_100m": the ~100M-parameter MoE of benchmarks/common.py)
  saved as a Hugging Face checkpoint, with a BPE of the model's vocabulary trained on the built-in corpus
  (every sampled id is a real token, so time to first text is time to first token)."""
  import llama4_jax as l4
  from common import MOE_100M
  from llama4_jax.data.sources import builtin_corpus
  from llama4_jax.tokenizer import train_bpe
  cfg = l4.get_config("tiny") if name == "tiny" else MOE_100M
  docs = builtin_corpus()
  tok = train_bpe((docs[i] for i in range(len(docs))), cfg.vocab_size, os.path.join(directory, "tokenizer.json"))
  cfg = cfg.replace(vocab_size=tok.vocab_size, bos_token_id=tok.bos_id, eos_token_id=(tok.eos_id,))
  checkpoint = os.path.join(directory, name)  # the tokenizer is found in the checkpoint's parent
  l4.save_pretrained(l4.create_model(cfg), checkpoint)
  return checkpoint


def start_server(checkpoint: str, slots: int, max_context: int, repo: str = REPO, extra=()
                 ) -> tuple[subprocess.Popen, str, str]:
  """`python -m llama4_jax.serve` of the checkout `repo` (its package comes first on the path)."""
  env = dict(os.environ, PYTHONPATH=repo + os.pathsep + os.environ.get("PYTHONPATH", ""))
  proc = subprocess.Popen([sys.executable, "-m", "llama4_jax.serve", f"--checkpoint={checkpoint}", "--port=0",
                           f"--slots={slots}", f"--max_context={max_context}", "--max_queue=256", *extra],
                          cwd=repo, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, env=env)
  for line in proc.stdout:
    m = re.search(r"serve: (\S+) on http://([\d.]+:\d+) .*ready", line)
    if m:
      threading.Thread(target=proc.stdout.read, daemon=True).start()  # keep draining its output
      return proc, m.group(2), m.group(1)
  raise RuntimeError(f"the server did not start (exit {proc.wait()})")


def one_request(address: str, model: str, prompt: str, max_tokens: int, logprobs: int | None = None
                ) -> tuple[float, int]:
  """(seconds to the first streamed text, completion tokens) of one streaming completion."""
  host, port = address.split(":")
  conn = http.client.HTTPConnection(host, int(port), timeout=600)
  body = dict(model=model, prompt=prompt, max_tokens=max_tokens, temperature=0, stream=True,
              stream_options={"include_usage": True})
  if logprobs is not None:
    body["logprobs"] = logprobs
  t0 = time.perf_counter()
  conn.request("POST", "/v1/completions", json.dumps(body), {"Content-Type": "application/json"})
  r = conn.getresponse()
  if r.status != 200:
    raise RuntimeError(f"HTTP {r.status}: {r.read()[:300]!r}")
  first, tokens = None, 0
  for line in r:
    if not line.startswith(b"data: ") or line.startswith(b"data: [DONE]"):
      continue
    event = json.loads(line[6:])
    if event.get("choices") and event["choices"][0]["text"] and first is None:
      first = time.perf_counter() - t0
    if event.get("usage"):
      tokens = event["usage"]["completion_tokens"]
  conn.close()
  return (first if first is not None else time.perf_counter() - t0), tokens


def load(address: str, model: str, clients: int, requests: int, max_tokens: int, time_limit: float,
         logprobs: int | None = None, prompts=PROMPTS) -> dict:
  deadline = time.perf_counter() + time_limit
  ttfts, tokens, errors = [], [0], []
  lock = threading.Lock()

  def client(c: int):
    for i in range(requests):
      if time.perf_counter() > deadline:
        return
      try:
        ttft, n = one_request(address, model, prompts[(c * requests + i) % len(prompts)], max_tokens,
                              logprobs)
      except Exception as e:  # counted, not fatal: the figures say how many failed
        with lock:
          errors.append(f"{type(e).__name__}: {e}")
        continue
      with lock:
        ttfts.append(ttft)
        tokens[0] += n

  t0 = time.perf_counter()
  with cf.ThreadPoolExecutor(clients) as pool:
    list(pool.map(client, range(clients)))
  seconds = time.perf_counter() - t0
  ttfts.sort()
  pick = lambda q: round(1000 * ttfts[min(len(ttfts) - 1, int(q * len(ttfts)))], 1) if ttfts else None  # noqa: E731
  return {"clients": clients, "requests": len(ttfts), "errors": len(errors), "first_error": errors[:1],
          "completion_tokens": tokens[0], "seconds": round(seconds, 2),
          "tokens_per_s": round(tokens[0] / seconds, 1), "ttft_p50_ms": pick(0.5), "ttft_p99_ms": pick(0.99),
          "ttft_mean_ms": round(1000 * statistics.mean(ttfts), 1) if ttfts else None}


def engine_only(model, prompts: list[list[int]], slots: int, clients: int, requests: int, max_tokens: int,
                max_context: int) -> dict:
  """The same load on the `Engine` in this process, without HTTP or text: what the batching itself gives."""
  from llama4_jax.serving import Engine, Request, SamplingParams
  engine = Engine(model, slots, max_context, max_queue=1024)
  engine.warmup()
  engine.start()
  tokens = [0]

  def client(c: int):
    for i in range(requests):
      r = engine.submit(Request(prompts[(c + i) % len(prompts)], SamplingParams(max_tokens=max_tokens)))
      while r.events.get()[1] == "token":
        tokens[0] += 1

  t0 = time.perf_counter()
  with cf.ThreadPoolExecutor(clients) as pool:
    list(pool.map(client, range(clients)))
  seconds = time.perf_counter() - t0
  engine.shutdown()
  return {"slots": slots, "clients": clients, "tokens": tokens[0], "seconds": round(seconds, 2),
          "tokens_per_s": round(tokens[0] / seconds, 1)}


def shared_prefix(args, checkpoint: str) -> None:
  """TTFT of prompts sharing an N-token prefix (+ 50 tokens of their own), prefix cache off vs on."""
  from common import emit, machine
  from llama4_jax.data.sources import builtin_corpus
  from llama4_jax.tokenizer import tokenizer_for
  tokenizer = tokenizer_for(checkpoint)
  docs = builtin_corpus()
  ids = [t for i in range(len(docs)) for t in tokenizer.encode(docs[i])][: args.shared_prefix + 50 * 64]
  shared = ids[: args.shared_prefix]
  turns = [ids[args.shared_prefix + 50 * k: args.shared_prefix + 50 * (k + 1)] for k in range(64)]
  prompts = [shared + turn for turn in turns]  # each request its own user turn
  runs = []
  for cache_tokens in (0, 16 * args.max_context):
    proc, address, model = start_server(checkpoint, args.slots, args.max_context,
                                        extra=[f"--prefix_cache_tokens={cache_tokens}"])
    try:
      one_request(address, model, prompts[-1], 4)  # outside the timing (with the cache: fills it)
      for clients in args.clients:
        run = load(address, model, clients, args.requests, args.max_tokens, args.time_limit,
                   prompts=prompts[:-1])
        runs.append({"prefix_cache_tokens": cache_tokens, **run})
        print(json.dumps(runs[-1]), file=sys.stderr, flush=True)
    finally:
      proc.terminate()
      proc.wait(30)
  ttft = {(r["prefix_cache_tokens"] > 0, r["clients"]): r["ttft_p50_ms"] for r in runs}
  emit({"benchmark": "serve_load_shared_prefix", "checkpoint": checkpoint, "shared_prefix": len(shared),
        "user_turn": 50, "max_tokens": args.max_tokens, "runs": runs,
        "ttft_p50_off_over_on": {f"{c}_clients": round(ttft[(False, c)] / ttft[(True, c)], 2)
                                 for c in args.clients if ttft.get((True, c))},
        "machine": machine()})


def main():
  p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
  p.add_argument("--checkpoint", default=None, help="a checkpoint to serve (default: see --model)")
  p.add_argument("--model", choices=["tiny", "moe_100m"], default="tiny",
                 help="without --checkpoint: the trained tiny model in workdir/tiny if present (else a random "
                 "one), or a random ~100M-parameter MoE")
  p.add_argument("--slots", type=int, default=8, help="decode slots of the continuous-batching server")
  p.add_argument("--clients", type=int, nargs="+", default=[1, 8, 32])
  p.add_argument("--requests", type=int, default=16,
                 help="requests per client (at 4, a run lasted about a second: too short to be steady)")
  p.add_argument("--max_tokens", type=int, default=64)
  p.add_argument("--max_context", type=int, default=256)
  p.add_argument("--time_limit", type=float, default=120.0, help="seconds per run")
  p.add_argument("--logprobs", type=int, default=None, help="ask for log-probabilities (K alternatives)")
  p.add_argument("--baseline_repo", default=None, help="also load the server of this checkout (A/B)")
  p.add_argument("--only_continuous", action="store_true",
                 help="only the continuous-batching server(s): no one-slot server, no engine-alone runs")
  p.add_argument("--shared_prefix", type=int, default=0,
                 help="N: prompts share an N-token prefix; compare the prefix cache off and on")
  args = p.parse_args()
  checkpoint = args.checkpoint
  trained = os.path.join(REPO, "workdir", "tiny")
  if checkpoint is None and args.model == "tiny" and os.path.isdir(os.path.join(trained, "checkpoints")):
    checkpoint = trained
  elif checkpoint is None:
    checkpoint = random_model(args.model, tempfile.mkdtemp(prefix=f"serve_load_{args.model}_"))
  from common import emit, machine

  if args.shared_prefix:
    return shared_prefix(args, checkpoint)
  runs = []
  servers = [("this", REPO, args.slots, args.clients)]
  if args.baseline_repo:  # alternately: this, baseline, this, baseline (each server started once)
    servers.append(("baseline", os.path.abspath(args.baseline_repo), args.slots, args.clients))
  if not args.only_continuous:
    servers.append(("this", REPO, 1, [c for c in args.clients if c <= 8]))
  for server, repo, slots, clients_list in servers:
    proc, address, model = start_server(checkpoint, slots, args.max_context, repo)
    try:
      one_request(address, model, PROMPTS[0], 4)  # a first request outside the timing
      for clients in clients_list:
        run = load(address, model, clients, args.requests, args.max_tokens, args.time_limit, args.logprobs)
        runs.append({"server": server, "slots": slots, "logprobs": args.logprobs, **run})
        print(json.dumps(runs[-1]), file=sys.stderr, flush=True)
    finally:
      proc.terminate()
      proc.wait(30)
  if args.only_continuous:
    emit({"benchmark": "serve_load", "checkpoint": checkpoint, "max_tokens": args.max_tokens,
          "requests_per_client": args.requests, "runs": runs, "machine": machine()})
    return
  runs = [r for r in runs if r["server"] == "this"]
  rate = {(r["slots"], r["clients"]): r["tokens_per_s"] for r in runs}
  speedup = {f"{c}_clients": round(rate[(args.slots, c)] / rate[(1, c)], 2)
             for c in args.clients if (1, c) in rate and rate[(1, c)]}
  # the engine alone (no HTTP, no text), at 8 clients or the largest count below it
  import llama4_jax as l4
  from llama4_jax.tokenizer import tokenizer_for
  tokenizer = tokenizer_for(checkpoint)
  prompts = [[tokenizer.bos_id] + tokenizer.encode(p) for p in PROMPTS]
  model = l4.load_model(checkpoint)
  c = max([n for n in args.clients if n <= 8] or [1])
  alone = [engine_only(model, prompts, s, c, args.requests, args.max_tokens, args.max_context)
           for s in (args.slots, 1)]
  emit({"benchmark": "serve_load", "checkpoint": checkpoint, "max_tokens": args.max_tokens,
        "requests_per_client": args.requests, "runs": runs,
        "continuous_over_one_at_a_time": speedup, "engine_only": alone,
        "engine_only_continuous_over_one_at_a_time": round(alone[0]["tokens_per_s"] / alone[1]["tokens_per_s"], 2),
        "machine": machine()})


if __name__ == "__main__":
  sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
  main()
