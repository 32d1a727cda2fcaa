"""LoRA supervised fine-tuning of Llama 4 Scout (109B total parameters) on one TPU v5p-8 host (4 chips of
95 GB HBM: 380 GB).

    python -m llama4_jax.train --config=configs/lora_scout_v5p8.py --workdir=gs://BUCKET/scout_lora \
        --config.init_from=/path/to/Llama-4-Scout-17B-16E-Instruct \
        --config.data.path='/data/sft/*.jsonl'

Memory per chip (expert=4: 4 of the 16 experts per chip; the other weights replicated): the int8 base is
109 GB (27 GB per chip) instead of 218 GB in bf16; rank-16 adapters on every linear weight (routed experts
included, stacked per expert) are 0.5% of the parameters, and they with their float32 Adam moments take
~6.6 GB in all: the optimizer state is 0.5% of full fine-tuning's (benchmarks/lora.py counts it).
Loading reads the bf16 checkpoint into its shards (55 GB per chip) and quantizes it weight by weight,
releasing each bf16 weight as it goes. Sequences of 8192 tokens, 2 microbatches of 4, full remat, and the
blockwise custom-VJP attention (attention_impl="ring"). `python -m llama4_jax.plan
--config=configs/lora_scout_v5p8.py --tpu=v5p-8 --config.init_from=DIR --compile`: the TPU compiler's peak
is 62.6 GiB per chip of 95 (recompiled 2026-12-07; the planner's TPU-fitted estimate 67.0).
Records are chat JSONL, {"messages": [{"role": ..., "content": ...}, ...]}; the loss is on assistant
tokens only. A v6e-8 (8 chips of 32 GB) does not fit this config: the planner (CPU-fitted, at the time)
estimated 65 GiB per chip with expert=8 against 28.8 usable. Written from the published shapes and HBM sizes;
not yet run on hardware.
"""

from llama4_jax.train.config import default_run_config, model_fields


def get_config():
  c = default_run_config()
  c.init_from = ""  # required: the Hugging Face Scout directory (or its converted Orbax checkpoint)
  c.steps = 2000
  c.batch_size = 8
  c.seq_len = 8192
  c.microbatches = 2
  c.learning_rate = 2e-4
  c.warmup_steps = 50
  c.weight_decay = 0.0
  c.log_every = 10
  c.eval_every = 250
  c.eval_batches = 10
  c.checkpoint_every = 250
  c.mesh.update(data=1, fsdp=-1, tensor=1, expert=4, context=1)
  c.model = model_fields("scout", dtype="bfloat16", param_dtype="bfloat16", remat_policy="full",
                         attention_impl="ring", lora_rank=16, lora_alpha=32.0, lora_dropout=0.05,
                         base_quant="int8")
  c.data.source = "jsonl"
  c.data.field = "messages"
  c.data.format = "chat"
  c.data.tokenizer = ""  # default: the tokenizer.model next to init_from
  return c
