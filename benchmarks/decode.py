"""Sampling speed of a ~100M-parameter MoE: prefill and decode tokens/s (fp32 and bf16 weights) against
transformers `generate` with its default cache, on the same CPU and weights; and batch-1 decode of the same
MoE at 4, 8 and 16 layers (one, two and four scanned superblocks; 32-token prompt, 64 new tokens, fp32)
against transformers, with the host overhead of a repeated `generate` call of 1 new token (the call's wall
time less the compiled program's own).

    python benchmarks/decode.py [--prompt 128 --new 64] [--depths 4,8,16] [--skip_dtypes]

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


def depth_row(layers: int, prompt: int = 32, new: int = 64) -> dict:
  """Batch-1 fp32 decode of the ~100M MoE with `layers` layers: ours against transformers (same weights),
  and a 1-new-token `generate` call's wall time against its compiled program's."""
  import torch
  import transformers as tf

  import llama4_jax as l4
  from common import MOE_100M, timeit
  from llama4_jax.inference import generate
  from llama4_jax.inference.sampler import _generate_loop, _prepare
  from llama4_jax.inference.static import split_for_inference

  cfg = MOE_100M.replace(num_hidden_layers=layers, eos_token_id=(-1,))
  torch.manual_seed(0)
  hf = tf.Llama4ForCausalLM(tf.Llama4TextConfig(**l4.to_hf_config(cfg.replace(eos_token_id=(2,))))).eval()
  prompts = np.random.RandomState(0).randint(3, cfg.vocab_size, (1, prompt)).tolist()
  with tempfile.TemporaryDirectory() as d:
    hf.save_pretrained(d)
    model = l4.load_model(d)
  t_one = timeit(lambda: generate(model, prompts, 1, stop_tokens=[]), 7)
  t_all = timeit(lambda: generate(model, prompts, new, stop_tokens=[]), 3)
  settings, _, tokens, lengths, length = _prepare(model, prompts, 1, 0.0, None, None, [], None)
  args = (*split_for_inference(model), tokens, lengths, np.zeros(1, np.uint32), settings,
          np.asarray([-1], np.int32))
  t_program = timeit(lambda: _generate_loop(*args, 1, length)[0].block_until_ready(), 7)
  ids = torch.tensor(prompts)

  def hf_gen(n):
    with torch.no_grad():
      hf.generate(ids, max_new_tokens=n, min_new_tokens=n, do_sample=False, pad_token_id=0)

  th_one, th_all = timeit(lambda: hf_gen(1), 3), timeit(lambda: hf_gen(new), 2)
  ours, theirs = (new - 1) / (t_all - t_one), (new - 1) / (th_all - th_one)
  return {"layers": layers, "superblocks": model.num_blocks, "params": cfg.num_params(),
          "ours_decode_tokens_per_sec": round(ours, 1),
          "transformers_decode_tokens_per_sec": round(theirs, 1),
          "decode_speedup": round(ours / theirs, 2), "generate_1_token_ms": round(1e3 * t_one, 1),
          "compiled_program_ms": round(1e3 * t_program, 1),
          "host_overhead_ms": round(1e3 * (t_one - t_program), 1)}


def main():
  ap = argparse.ArgumentParser()
  ap.add_argument("--prompt", type=int, default=128)
  ap.add_argument("--new", type=int, default=64)
  ap.add_argument("--depths", default="4,8,16", help="layer counts of the depth sweep ('' to skip)")
  ap.add_argument("--skip_dtypes", action="store_true", help="only the depth sweep")
  args = ap.parse_args()
  from common import emit, machine
  depth = [depth_row(int(n)) for n in args.depths.split(",") if n]
  if args.skip_dtypes:
    emit({"benchmark": "sampling", "depth": depth, "machine": machine()})
    return

  import jax.numpy as jnp
  import torch
  import transformers as tf

  import llama4_jax as l4
  from common import MOE_100M, timeit
  from llama4_jax.inference import generate
  from llama4_jax.inference.sampler import _init_cache, _pack, _prefill_pure
  from llama4_jax.inference.sampling import settings_rows
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
          cache = _init_cache(*split_model(model), batch, args.prompt + args.new)
          _prefill_pure(*split_model(model), tokens, lengths, cache, np.zeros(batch, np.uint32),
                        settings_rows(batch))[0].block_until_ready()

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
        "depth": depth, "machine": machine()})


if __name__ == "__main__":
  main()
