"""Forward tokens/s of a ~100M-parameter MoE Llama 4 against transformers on the same CPU and weights.

    python benchmarks/forward.py [--batch 4 --seq 512 --repeats 5]

fp32, batch 4 x 512 tokens by default. Both sides get the same weights (a transformers-initialised
checkpoint loaded with `load_model`) and the same threads; prints JSON (tokens/s, speedup, max logit diff).
"""

from __future__ import annotations

import argparse
import os
import tempfile

import numpy as np


def main():
  ap = argparse.ArgumentParser()
  ap.add_argument("--batch", type=int, default=4)
  ap.add_argument("--seq", type=int, default=512)
  ap.add_argument("--repeats", type=int, default=5)
  args = ap.parse_args()

  import jax.numpy as jnp
  import torch
  import transformers as tf

  import llama4_jax as l4
  from common import MOE_100M, emit, machine, timeit

  cfg = MOE_100M
  torch.manual_seed(0)
  torch.set_num_threads(os.cpu_count())
  hf = tf.Llama4ForCausalLM(tf.Llama4TextConfig(**l4.to_hf_config(cfg))).eval()
  ids = np.random.RandomState(0).randint(0, cfg.vocab_size, (args.batch, args.seq)).astype(np.int32)
  with tempfile.TemporaryDirectory() as d:
    hf.save_pretrained(d)
    model = l4.load_model(d)
  ids_jax = jnp.asarray(ids)
  ids_torch = torch.tensor(ids, dtype=torch.long)

  def ours():
    return model(ids_jax).block_until_ready()

  def theirs():
    with torch.no_grad():
      return hf(ids_torch).logits

  diff = float(np.abs(np.asarray(ours()) - theirs().numpy()).max())
  t_ours = timeit(ours, args.repeats)
  t_theirs = timeit(theirs, args.repeats)
  tokens = ids.size
  emit({
      "benchmark": "forward_fp32", "params": cfg.num_params(), "batch": args.batch, "seq": args.seq,
      "ours_tokens_per_sec": round(tokens / t_ours, 1),
      "transformers_tokens_per_sec": round(tokens / t_theirs, 1),
      "speedup": round(t_theirs / t_ours, 2), "max_abs_logit_diff": diff,
      "transformers_attn_implementation": hf.config._attn_implementation,
      "machine": machine()})


if __name__ == "__main__":
  main()
