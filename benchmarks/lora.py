"""LoRA against full fine-tuning: trainable share, optimizer-state bytes, peak memory and step time.

    python benchmarks/lora.py [--batch 2 --seq 256 --steps 3 --rank 16] [--base nf4]

One config (the ~100M-parameter MoE of forward.py), four runs, each in its own process:
- full: every parameter trained, float32 weights and AdamW moments (the usual mixed-precision master copy);
- lora_bf16: rank-16 adapters on every linear weight (routed experts included), base frozen in bfloat16;
- lora_int8: the same adapters, base frozen in int8 (embedding and LM head stay bfloat16);
- lora_nf4: the same adapters, base frozen in NF4 (QLoRA: 4-bit codes + a bf16 scale per 64 weights).
`--base nf4` (or int8) runs only the three LoRA bases and compares that one against the others.
Compute is float32 in all (bf16 matmuls are emulated, slowly, on CPU). Peak memory is XLA's own
account of the compiled train step: arguments + outputs - donated aliases + temporaries, i.e. the device
memory one step needs; the process's peak RSS is reported too (it includes the compiler). Prints JSON.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys

VARIANTS = ("full", "lora_bf16", "lora_int8", "lora_nf4")
BASES = {"lora_bf16": "none", "lora_int8": "int8", "lora_nf4": "nf4"}


def run_variant(variant: str, batch: int, seq: int, steps: int, rank: int) -> dict:
  import jax
  import jax.numpy as jnp
  import numpy as np
  from flax import nnx

  import llama4_jax as l4
  from common import MOE_100M, timeit
  from llama4_jax.train.compiled_memory import memory_figures
  from llama4_jax.train.config import default_run_config
  from llama4_jax.train.step import (TrainModel, batch_sharding, make_optimizer, make_train_step,
                                     split_trainable, step_hparams)

  lora = variant != "full"
  base_cfg = MOE_100M.replace(param_dtype="bfloat16" if lora else "float32", dtype="float32")
  model = l4.create_model(base_cfg)
  if lora:
    model = l4.adapt_model(model, release=True, lora_rank=rank, lora_alpha=2.0 * rank,
                           base_quant=BASES[variant])
  # the linear weights' parts that a quantized base holds quantized (kernels, scales)
  from llama4_jax.model.adapters import linear_weights
  linear = {p[:-1] + (p[-1] + s,) for p in linear_weights(model) for s in ("", "_scale")}
  c = default_run_config()
  c.steps, c.batch_size, c.seq_len = 1000, batch, seq
  c.weight_decay = 0.0 if lora else 0.1
  tm = TrainModel.of(model)
  trainable, frozen = split_trainable(nnx.to_pure_dict(nnx.state(model)), lora)
  from flax import traverse_util
  frozen_linear = int(sum(x.nbytes for k, x in traverse_util.flatten_dict(frozen).items() if k in linear))
  del model
  tx = make_optimizer(c)
  opt_state = tx.init(trainable)
  rng = np.random.RandomState(0)
  ids = rng.randint(0, base_cfg.vocab_size, (batch, seq + 1))
  data = {"inputs": jnp.asarray(ids[:, :-1], jnp.int32), "targets": jnp.asarray(ids[:, 1:], jnp.int32),
          "positions": jnp.broadcast_to(jnp.arange(seq, dtype=jnp.int32), (batch, seq)),
          "segment_ids": jnp.ones((batch, seq), jnp.int32), "loss_mask": jnp.ones((batch, seq), jnp.int32)}
  key, step_no = jax.random.PRNGKey(0), jnp.int32(0)
  one_device = l4.make_mesh(data=1, fsdp=1, tensor=1, expert=1, context=1, devices=jax.devices()[:1])
  step = jax.jit(make_train_step(tm, tx, c, batch_sharding(one_device)), donate_argnums=(0, 1))
  lr = step_hparams(c, c.learning_rate)
  compiled = step.lower(trainable, opt_state, frozen, data, key, step_no, lr).compile()
  mem = memory_figures(compiled)
  nbytes = lambda tree: int(sum(x.nbytes for x in jax.tree.leaves(tree)))  # noqa: E731
  state = {"p": trainable, "o": opt_state}
  losses = []

  def one():
    state["p"], state["o"], m = compiled(state["p"], state["o"], frozen, data, key, step_no, lr)
    losses.append(float(m["loss"]))

  seconds = timeit(one, steps, warmup=1)
  n_train = sum(x.size for x in jax.tree.leaves(state["p"]))
  return {"variant": variant, "trainable_params": int(n_train),
          "trainable_fraction": n_train / base_cfg.num_params(),
          "frozen_bytes": nbytes(frozen), "frozen_linear_bytes": frozen_linear,
          "trainable_bytes": nbytes(state["p"]),
          "optimizer_state_bytes": nbytes(state["o"]), "peak_bytes_xla": mem["peak"],
          "temp_bytes_xla": mem["temporaries"],
          "peak_rss_bytes": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024,
          "step_seconds": round(seconds, 3), "tokens_per_sec": round(batch * seq / seconds, 1),
          "loss_first_last": [round(losses[0], 4), round(losses[-1], 4)]}


def l4_scout_shapes(rank: int) -> dict:
  """Scout with rank-`rank` adapters on every target, counted from the abstract model (no memory):
  trainable share, Adam's state (two float32 moments per trainable parameter) against full fine-tuning's,
  and the frozen base's bytes in int8 and NF4 (embedding, router, norms, LM head in bf16) and in bf16."""
  import jax
  from flax import nnx

  import llama4_jax as l4
  from llama4_jax.model.linear import is_adapter
  from llama4_jax.model.paths import state_path

  def base_bytes(quant):
    cfg = l4.get_config("scout", lora_rank=rank, base_quant=quant, param_dtype="bfloat16")
    flat = jax.tree_util.tree_flatten_with_path(nnx.state(l4.abstract_model(cfg)))[0]
    return (sum(x.size * x.dtype.itemsize for p, x in flat if not is_adapter(state_path(p))),
            sum(x.size for p, x in flat if is_adapter(state_path(p))))

  total = l4.get_config("scout").num_params()
  (int8, adapters), (nf4, _) = base_bytes("int8"), base_bytes("nf4")
  return {"rank": rank, "params": total, "adapter_params": int(adapters),
          "trainable_fraction": round(adapters / total, 5),
          "optimizer_state_vs_full": round(adapters / total, 5),
          "int8_base_gb": round(int8 / 1e9, 1), "nf4_base_gb": round(nf4 / 1e9, 1),
          "bf16_base_gb": round(2 * total / 1e9, 1), "nf4_base_vs_bf16": round(nf4 / (2 * total), 4)}


def main():
  ap = argparse.ArgumentParser()
  ap.add_argument("--batch", type=int, default=2)
  ap.add_argument("--seq", type=int, default=256)
  ap.add_argument("--steps", type=int, default=3)
  ap.add_argument("--rank", type=int, default=16)
  ap.add_argument("--variant", choices=VARIANTS, default=None, help="run one (used internally)")
  ap.add_argument("--base", choices=("int8", "nf4"), default=None,
                  help="compare this frozen base against bf16 and int8 (LoRA runs only)")
  args = ap.parse_args()
  if args.variant:
    print(json.dumps(run_variant(args.variant, args.batch, args.seq, args.steps, args.rank)))
    return
  here = os.path.dirname(os.path.abspath(__file__))
  results = {}
  variants = VARIANTS if args.base is None else tuple(BASES)
  for v in variants:
    out = subprocess.run([sys.executable, os.path.join(here, "lora.py"), "--variant", v,
                          "--batch", str(args.batch), "--seq", str(args.seq), "--steps", str(args.steps),
                          "--rank", str(args.rank)], capture_output=True, text=True, check=True)
    results[v] = json.loads(out.stdout.strip().splitlines()[-1])
  scout = l4_scout_shapes(args.rank)
  full, bf16, int8 = results.get("full"), results["lora_bf16"], results["lora_int8"]
  for v in BASES:
    r = results[v]
    if full:
      r["optimizer_state_vs_full"] = round(r["optimizer_state_bytes"] / full["optimizer_state_bytes"], 4)
      r["peak_xla_vs_full"] = round(r["peak_bytes_xla"] / full["peak_bytes_xla"], 4)
      r["step_time_vs_full"] = round(r["step_seconds"] / full["step_seconds"], 3)
    r["frozen_vs_bf16_base"] = round(r["frozen_bytes"] / bf16["frozen_bytes"], 4)
    r["frozen_linear_vs_bf16_base"] = round(r["frozen_linear_bytes"] / bf16["frozen_linear_bytes"], 4)
    r["peak_xla_vs_bf16_base"] = round(r["peak_bytes_xla"] / bf16["peak_bytes_xla"], 4)
    r["step_time_vs_int8_base"] = round(r["step_seconds"] / int8["step_seconds"], 3)
  from common import MOE_100M, emit, machine
  emit({"benchmark": "lora_vs_full_finetuning", "config": "moe_100m_hidden512",
        "params": MOE_100M.num_params(), "batch": args.batch, "seq": args.seq, "rank": args.rank,
        "results": list(results.values()), "scout_from_shapes": scout,
        "targets": {"optimizer_state_vs_full": "< 0.02", "int8_peak_vs_full": "< 0.40",
                    "nf4_base_vs_bf16": "<= 0.29", "nf4_step_time_vs_int8_base": "<= 1.3"},
        "machine": machine()})


if __name__ == "__main__":
  main()
