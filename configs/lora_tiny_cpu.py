"""LoRA supervised fine-tuning of the tiny model (from README command 1) on the built-in chat corpus, on CPU.

    python -m llama4_jax.train --config=configs/tiny_cpu.py --workdir=workdir/tiny       # the base
    python -m llama4_jax.train --config=configs/lora_tiny_cpu.py --workdir=workdir/lora_tiny

The base's weights stay frozen (float32 here; --config.model.base_quant=int8 holds them in int8);
rank-8 adapters on every linear weight (attention, dense MLP, shared and routed experts) learn to answer
"What does `module.function(...)` do?" with the first paragraph of its docstring (conversations built
from this Python's standard library; the loss counts assistant tokens only). Checkpoints hold the
adapters and their optimizer state only, and name the base they belong to. Then:

    python -m llama4_jax.sample --checkpoint=workdir/lora_tiny --chat
    llama4-convert orbax-to-hf workdir/lora_tiny /tmp/tiny_merged --merge-lora   # transformers loads it
    llama4-convert export-lora workdir/lora_tiny /tmp/tiny_peft                  # PEFT adapter layout
"""

from llama4_jax.train.config import default_run_config


def get_config():
  c = default_run_config()
  c.init_from = "workdir/tiny"  # the base run's workdir (or any HF / converted checkpoint)
  c.steps = 150
  c.batch_size = 16
  c.seq_len = 256
  c.learning_rate = 2e-3
  c.warmup_steps = 10
  c.weight_decay = 0.0  # decay would pull the adapters back to the base model
  c.log_every = 10
  c.eval_every = 50
  c.checkpoint_every = 50
  c.model.lora_rank = 8
  c.model.lora_alpha = 16.0
  c.model.lora_dropout = 0.05
  c.data.source = "builtin_chat"
  c.data.format = "chat"
  c.data.eval_fraction = 0.05
  c.sample_prompt = "What does `json.dumps(obj)` do?"
  c.sample_tokens = 60
  c.sample_temperature = 0.0
  return c
