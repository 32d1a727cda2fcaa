"""QLoRA supervised fine-tuning of Llama 4 Scout (109B total parameters) on one TPU v5e-8 host (8 chips of
16 GB HBM: 128 GB), the smallest common Cloud TPU host.

    python -m llama4_jax.train --config=configs/qlora_scout_v5e8.py --workdir=gs://BUCKET/scout_qlora \
        --config.init_from=/path/to/Llama-4-Scout-17B-16E-Instruct \
        --config.data.path='/data/sft/*.jsonl'

The frozen base is held in NF4 (4-bit NormalFloat codes with a bfloat16 scale per 64 weights; the
embedding, router, norms and LM head stay bfloat16): 60.3 GB instead of 215.5 GB in bf16 and 109.9 GB in
int8, which would nearly fill the host's HBM alone. Loading reads the bf16 checkpoint a tensor at a time
onto its shards and quantizes it there, so the bf16 model is never resident whole. expert=8: two of the 16
experts per chip; the other weights are split 8 ways too (the rules shard them over `expert`) and gathered
a layer at a time. Rank-16 adapters on every linear weight (routed experts included) train with float32
Adam moments; no adapter dropout (its random masks over the experts' rows cost 0.5 GiB buffers per layer).

Rows of 512 tokens, one per chip, dropless routing, full remat, the blockwise custom-VJP attention: the TPU
compiler's peak is 14.03 GiB per chip of 16 (88%; the planner over-estimates it at 16.24):

    python -m llama4_jax.plan --config=configs/qlora_scout_v5e8.py --tpu=v5e-8 --compile \
        --config.init_from=/path/to/Scout

Longer rows do not fit this host: dropless, each chip receives up to 8x its tokens for its two experts
(2,048-token rows: 16.0 GiB of temporaries alone); with a capacity factor of 1.25, 1,024-token rows peak
at 14.6 GiB (91%) and 2,048-token rows at 15.1 GiB (95%). For a larger effective batch use more microbatches of 8 rows (not compiled
here). Records are chat JSONL, {"messages": [...]};
the loss is on assistant tokens only. Written from the published shapes and HBM sizes; not yet run on
hardware.
"""

from llama4_jax.train.config import default_run_config, model_fields


def get_config():
  c = default_run_config()
  c.init_from = ""  # required: the Hugging Face Scout directory (or its converted Orbax checkpoint)
  c.steps = 2000
  c.batch_size = 8
  c.seq_len = 512
  c.microbatches = 1
  c.learning_rate = 2e-4
  c.warmup_steps = 50
  c.weight_decay = 0.0
  c.log_every = 10
  c.eval_every = 250
  c.eval_batches = 10
  c.checkpoint_every = 250
  c.mesh.update(data=1, fsdp=1, tensor=1, expert=8, context=1)
  c.model = model_fields("scout", dtype="bfloat16", param_dtype="bfloat16", remat_policy="full",
                         attention_impl="ring", lora_rank=16, lora_alpha=32.0, lora_dropout=0.0,
                         base_quant="nf4")
  c.data.source = "jsonl"
  c.data.field = "messages"
  c.data.format = "chat"
  c.data.tokenizer = ""  # default: the tokenizer.model next to init_from
  return c
