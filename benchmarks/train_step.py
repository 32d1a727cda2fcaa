"""Training tokens/s and MFU against a transformers + torch AdamW step on the same config and CPU.

    python benchmarks/train_step.py [--batch 4 --seq 512 --steps 3]

Two configs: the ~100M-parameter MoE of forward.py (hidden 512) and a hidden-1024 MoE. MFU counts the
FLOPs of the *active* parameters (6 per parameter per token, plus causal attention) against the measured
XLA CPU matmul peak (220 GFLOP/s for this 2-core machine). Prints JSON.
"""

from __future__ import annotations

import argparse
import os

import numpy as np


def main():
  ap = argparse.ArgumentParser()
  ap.add_argument("--batch", type=int, default=4)
  ap.add_argument("--seq", type=int, default=512)
  ap.add_argument("--steps", type=int, default=3)
  args = ap.parse_args()

  import jax
  import jax.numpy as jnp
  import torch
  import transformers as tf
  from flax import nnx

  import llama4_jax as l4
  from common import MOE_100M, emit, machine, timeit
  from llama4_jax.train.config import default_run_config
  from llama4_jax.train.metrics import CPU_PEAK_FLOPS, train_flops_per_token
  from llama4_jax.train.step import (TrainModel, batch_sharding, make_optimizer, make_train_step,
                                     step_hparams)

  torch.set_num_threads(os.cpu_count())
  wide = MOE_100M.replace(hidden_size=1024, num_hidden_layers=4, num_attention_heads=16,
                          num_key_value_heads=4, intermediate_size=2048, num_local_experts=4,
                          vocab_size=8192)
  results = []
  for name, cfg in (("moe_100m_hidden512", MOE_100M), ("moe_hidden1024", wide)):
    c = default_run_config()
    c.steps, c.batch_size, c.seq_len = 1000, args.batch, args.seq
    rng = np.random.RandomState(0)
    ids = rng.randint(0, cfg.vocab_size, (args.batch, args.seq + 1))
    batch = {"inputs": jnp.asarray(ids[:, :-1], jnp.int32), "targets": jnp.asarray(ids[:, 1:], jnp.int32),
             "positions": jnp.broadcast_to(jnp.arange(args.seq, dtype=jnp.int32), (args.batch, args.seq)),
             "segment_ids": jnp.ones((args.batch, args.seq), jnp.int32),
             "loss_mask": jnp.ones((args.batch, args.seq), jnp.int32)}
    model = l4.create_model(cfg)
    tm = TrainModel.of(model)
    params = nnx.to_pure_dict(nnx.state(model))
    tx = make_optimizer(c)
    opt_state = tx.init(params)
    one_device = l4.make_mesh(data=1, fsdp=1, tensor=1, expert=1, context=1, devices=jax.devices()[:1])
    step = jax.jit(make_train_step(tm, tx, c, batch_sharding(one_device)), donate_argnums=(0, 1))
    state = {"p": params, "o": opt_state}

    key = jax.random.PRNGKey(0)

    def ours():
      state["p"], state["o"], m = step(state["p"], state["o"], {}, batch, key, jnp.int32(0),
                                       step_hparams(c, c.learning_rate))
      m["loss"].block_until_ready()

    t_ours = timeit(ours, args.steps, warmup=1)

    torch.manual_seed(0)
    hf = tf.Llama4ForCausalLM(tf.Llama4TextConfig(**l4.to_hf_config(cfg))).train()
    opt = torch.optim.AdamW(hf.parameters(), lr=1e-4, betas=(0.9, 0.95), weight_decay=0.1)
    x = torch.tensor(ids[:, :-1]), torch.tensor(ids[:, 1:])

    def theirs():
      opt.zero_grad(set_to_none=True)
      logits = hf(x[0]).logits
      loss = torch.nn.functional.cross_entropy(logits.reshape(-1, logits.shape[-1]), x[1].reshape(-1))
      loss.backward()
      torch.nn.utils.clip_grad_norm_(hf.parameters(), 1.0)
      opt.step()

    t_theirs = timeit(theirs, args.steps, warmup=1)
    tokens = args.batch * args.seq
    flops = train_flops_per_token(cfg, args.seq) * tokens
    results.append({
        "config": name, "params": cfg.num_params(), "hidden_size": cfg.hidden_size,
        "ours_tokens_per_sec": round(tokens / t_ours, 1),
        "transformers_tokens_per_sec": round(tokens / t_theirs, 1),
        "speedup": round(t_theirs / t_ours, 2),
        "ours_mfu": round(flops / t_ours / CPU_PEAK_FLOPS, 3),
        "ours_step_seconds": round(t_ours, 3), "transformers_step_seconds": round(t_theirs, 3)})
  emit({"benchmark": "train_step_fp32", "batch": args.batch, "seq": args.seq, "results": results,
        "cpu_peak_flops": CPU_PEAK_FLOPS, "machine": machine()})


if __name__ == "__main__":
  main()
