"""LoRA supervised fine-tuning of Llama 4 Scout (109B total parameters) on one TPU host: v5p-8 (4 chips,
95 GB HBM each) or v6e-8 (8 chips, 32 GB each).

    python -m llama4_jax.train --config=configs/lora_scout_v5p8.py --workdir=gs://BUCKET/scout_lora \
        --config.init_from=/path/to/Llama-4-Scout-17B-16E-Instruct \
        --config.data.source=jsonl --config.data.path='/data/sft/*.jsonl'

The base is held in int8 (weight-only, one scale per output channel): 109 GB, i.e. 27 GB per v5p chip or
14 GB per v6e chip with fsdp over the host, instead of 218 GB in bf16. Adapters of rank 16 on every
linear weight (routed experts included, stacked per expert) are 0.5% of the parameters; they and their
Adam moments are float32 (~6.6 GB in all), so the optimizer state is ~0.4% of full fine-tuning's.
Records are {"messages": [{"role": ..., "content": ...}, ...]} chat JSONL; the loss is on assistant
tokens only. The base is loaded in bf16 and quantized weight by weight on the devices, so loading needs
218 GB of HBM in passing: on v6e-8 (256 GB) set --config.model.base_quant=int8 and expect a tight fit;
not yet measured on hardware.
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
  c.mesh.update(data=1, fsdp=-1, tensor=1, expert=1, context=1)
  c.model = model_fields("scout", dtype="bfloat16", param_dtype="bfloat16", remat_policy="full",
                         lora_rank=16, lora_alpha=32.0, lora_dropout=0.05, base_quant="int8")
  c.data.source = "jsonl"
  c.data.field = "messages"
  c.data.format = "chat"
  c.data.tokenizer = ""  # default: the tokenizer.model next to init_from
  return c
