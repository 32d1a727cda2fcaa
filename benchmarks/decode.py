"""Sampling speed of a ~100M-parameter MoE: prefill and decode tokens/s (fp32 and bf16 weights) against
transformers `generate` with its default cache, on the same CPU and weights.

    python benchmarks/decode.py [--prompt 128 --new 64]

At batch 1 decoding is bound by memory: the report also gives the decode step time against the time to
read, once, the weights a token actually uses (attention, shared expert, the chosen expert, router,
lm_head) at this machine's measured read bandwidth. That bandwidth drifts on a shared VM, so it is
measured before each dtype's runs and after the last, and the bound uses the median. Prints JSON.
"""

from __future__ import annotations

import argparse
import os
import tempfile
import time

import numpy as np


def read_bandwidth() -> float:
  """Bytes/s of a jitted sum over a 1 GiB float32 array (best of 5)."""
  import jax
  import jax.numpy as jnp
  x = jnp.ones((256 * 1024 * 1024,), jnp.float32)
  f = jax.jit(jnp.sum)
  f(x).block_until_ready()
  best = min(_timed(lambda: f(x).block_until_ready()) for _ in range(5))
  return x.nbytes / best


def _timed(fn) -> float:
  t0 = time.perf_counter()
  fn()
  return time.perf_counter() - t0


def bytes_per_token(cfg, itemsize: int) -> int:
  d, f, hd = cfg.hidden_size, cfg.intermediate_size, cfg.head_dim
  per_layer = d * hd * (2 * cfg.num_attention_heads + 2 * cfg.num_key_value_heads) + 2 * d
  per_layer += d * cfg.num_local_experts + 3 * d * f * (1 + cfg.num_experts_per_tok)
  return (cfg.num_hidden_layers * per_layer + d * cfg.vocab_size + d) * itemsize


def main():
  ap = argparse.ArgumentParser()
  ap.add_argument("--prompt", type=int, default=128)
  ap.add_argument("--new", type=int, default=64)
  args = ap.parse_args()

  import jax.numpy as jnp
  import torch
  import transformers as tf

  import llama4_jax as l4
  from common import MOE_100M, emit, machine, timeit
  from llama4_jax.inference import generate
  from llama4_jax.inference.sampler import _init_cache, _pack, _prefill_pure
  from llama4_jax.inference.static import split_model

  torch.set_num_threads(os.cpu_count())
  cfg = MOE_100M.replace(eos_token_id=(-1,))
  torch.manual_seed(0)
  hf = tf.Llama4ForCausalLM(tf.Llama4TextConfig(**l4.to_hf_config(cfg.replace(eos_token_id=(2,))))).eval()
  bandwidths = []
  rng = np.random.RandomState(0)
  results = []
  with tempfile.TemporaryDirectory() as d:
    hf.save_pretrained(d)
    for dtype in ("float32", "bfloat16"):
      bandwidths.append(read_bandwidth())
      model = l4.load_model(d, dtype=dtype)
      for batch in (1, 8):
        prompts = rng.randint(3, cfg.vocab_size, (batch, args.prompt)).tolist()
        gen = lambda: generate(model, prompts, args.new, stop_tokens=[])  # noqa: E731
        t_total = timeit(gen, 3)
        tokens, lengths = _pack(prompts, args.prompt)

        def prefill():
          cache = _init_cache(model, batch, args.prompt + args.new)
          _prefill_pure(*split_model(model), tokens, lengths, cache)[0].block_until_ready()

        t_prefill = timeit(prefill, 3)
        t_step = (t_total - t_prefill) / (args.new - 1)
        row = {"dtype": dtype, "batch": batch,
               "ours_prefill_tokens_per_sec": round(batch * args.prompt / t_prefill, 1),
               "ours_decode_tokens_per_sec": round(batch / t_step, 1),
               "ours_decode_step_ms": round(1000 * t_step, 2)}
        if batch == 1:
          row["bytes_per_token"] = bytes_per_token(cfg, jnp.dtype(dtype).itemsize)
        if dtype == "float32":
          ids = torch.tensor(prompts)

          def hf_gen():
            with torch.no_grad():
              hf.generate(ids, max_new_tokens=args.new, min_new_tokens=args.new, do_sample=False,
                          pad_token_id=0)

          def hf_prefill():
            with torch.no_grad():
              hf(ids)

          th_total, th_prefill = timeit(hf_gen, 2), timeit(hf_prefill, 2)
          th_step = (th_total - th_prefill) / (args.new - 1)
          row.update(transformers_decode_tokens_per_sec=round(batch / th_step, 1),
                     transformers_prefill_tokens_per_sec=round(batch * args.prompt / th_prefill, 1),
                     decode_speedup=round(th_step / t_step, 2))
        results.append(row)
  bandwidths.append(read_bandwidth())
  bandwidth = float(np.median(bandwidths))
  for row in results:
    if "bytes_per_token" in row:
      bound = row.pop("bytes_per_token") / bandwidth
      row.update(bandwidth_bound_step_ms=round(1000 * bound, 2),
                 step_over_bound=round(row["ours_decode_step_ms"] / 1000 / bound, 2))
  emit({"benchmark": "sampling", "params": cfg.num_params(), "prompt": args.prompt, "new": args.new,
        "read_bandwidth_GBps": round(bandwidth / 1e9, 2),
        "read_bandwidths_GBps": [round(b / 1e9, 2) for b in bandwidths], "results": results,
        "machine": machine()})


if __name__ == "__main__":
  main()
