"""The run config (ml_collections): defaults for every field, validation, and the ModelConfig it implies.

Config files in configs/ start from `default_run_config()` and change what they need; the command line
overrides any field (`--config.steps=100`, `--config.model.hidden_size=512`, `--config.mesh.fsdp=4`).
`validate` runs before anything is compiled and names the field that is wrong.
"""

from __future__ import annotations

import dataclasses

import ml_collections
from ml_collections import config_dict

from llama4_jax import storage
from llama4_jax.config import ModelConfig, get_config
from llama4_jax.data.pipeline import FORMATS
from llama4_jax.sharding import batch_shards, resolve_mesh_sizes


def model_fields(preset: str = "tiny", **overrides) -> ml_collections.ConfigDict:
  """`model.*`: the preset's name and every ModelConfig field, so any of them can be overridden."""
  cfg = get_config(preset, **overrides)
  d = ml_collections.ConfigDict()
  d.preset = preset
  for f in dataclasses.fields(ModelConfig):
    value = getattr(cfg, f.name)
    if value is None:
      kind = {"attention_chunk_size": int, "bos_token_id": int, "pad_token_id": int}.get(f.name, tuple)
      value = config_dict.placeholder(kind)
    d[f.name] = value
  return d


def default_run_config() -> ml_collections.ConfigDict:
  c = ml_collections.ConfigDict()
  c.steps = 1000  # optimizer steps
  c.batch_size = 16  # global, in sequences (rows of seq_len tokens)
  c.seq_len = 256
  c.microbatches = 1  # gradient accumulation: batch_size is split into this many forward/backward passes
  c.loss_chunks = 1  # the loss builds the logits of seq_len / loss_chunks tokens at a time (long rows)
  c.learning_rate = 1e-3  # peak, after linear warmup; cosine decay to learning_rate * min_lr_ratio
  c.warmup_steps = 50
  c.min_lr_ratio = 0.1
  c.weight_decay = 0.1  # AdamW, on matrices only (norm weights are not decayed)
  c.b1 = 0.9
  c.b2 = 0.95
  c.grad_clip = 1.0  # global-norm clipping; 0 disables
  c.moe_aux_loss_coef = 0.001  # load-balancing loss weight (HF's router_aux_loss_coef)
  c.log_every = 10
  # metrics.jsonl and TensorBoard in a gs:// workdir are rewritten at most this often (and at every
  # checkpoint): objects cannot be appended to. Local files are flushed every record.
  c.log_flush_seconds = 30.0
  c.eval_every = 200  # 0: only at the end
  c.eval_batches = 0  # 0: the whole held-out set
  c.checkpoint_every = 200  # 0: only at the end (and on SIGTERM)
  c.keep_checkpoints = 3
  c.async_checkpointing = True
  c.seed = 0
  c.init_from = ""  # a Hugging Face directory or an Orbax checkpoint of this project to start from
  c.peak_flops = 0.0  # per device, for MFU; 0: known chips by name, CPU 220e9 for the whole machine
  c.sample_prompt = ""  # printed after training: a sample continuing this prompt
  c.sample_tokens = 120
  c.sample_temperature = 0.8
  c.mesh = ml_collections.ConfigDict(dict(data=1, fsdp=-1, tensor=1, expert=1, context=1))
  c.model = model_fields("tiny")
  c.data = ml_collections.ConfigDict(dict(
      source="builtin",  # builtin | builtin_chat | text | jsonl | parquet | array_record
      path="",  # directory, file or glob (not for builtin, builtin_chat)
      field="text",  # the text field of jsonl / parquet records ("messages" for chat JSONL)
      format="text",  # text: pretraining (<bos> text <eos>, concat-then-split); chat: conversations with
      # the Llama 4 chat template, loss on assistant tokens only, packed whole
      tokenizer="",  # tokenizer.model / tokenizer.json (file or directory); "" trains a BPE
      vocab_size=8192,  # size of the BPE trained when no tokenizer is given
      eval_fraction=0.01,  # held-out share of the documents (deterministic by document key)
  ))
  return c


def model_config(c: ml_collections.ConfigDict, **overrides) -> ModelConfig:
  fields = {k: v for k, v in c.model.to_dict().items() if k != "preset"}
  fields = {k: (tuple(v) if isinstance(v, list) else v) for k, v in fields.items()}
  return ModelConfig(**{**fields, **overrides})


def validate(c: ml_collections.ConfigDict, num_devices: int) -> None:
  """Errors name the field: every check here runs before any compile."""

  def bad(field, msg):
    raise ValueError(f"config.{field}: {msg}")

  for field in ("steps", "batch_size", "seq_len", "microbatches", "loss_chunks", "log_every",
                "keep_checkpoints"):
    if int(c[field]) <= 0:
      bad(field, f"must be a positive integer, got {c[field]}")
  if float(c.log_flush_seconds) < 0:
    bad("log_flush_seconds", f"must be >= 0, got {c.log_flush_seconds}")
  for field in ("warmup_steps", "eval_every", "checkpoint_every", "eval_batches"):
    if int(c[field]) < 0:
      bad(field, f"must be >= 0, got {c[field]}")
  if c.learning_rate <= 0:
    bad("learning_rate", f"must be positive, got {c.learning_rate}")
  if not 0 < c.data.eval_fraction < 1:
    bad("data.eval_fraction", f"must be in (0, 1), got {c.data.eval_fraction}")
  try:
    sizes = resolve_mesh_sizes(dict(c.mesh), num_devices)
  except ValueError as e:
    bad("mesh", str(e))
  shards = batch_shards(sizes)
  if c.batch_size % c.microbatches:
    bad("microbatches", f"{c.microbatches} does not divide batch_size={c.batch_size}")
  micro = c.batch_size // c.microbatches
  if micro % shards:
    bad("batch_size", f"{c.batch_size} / microbatches={c.microbatches} = {micro} sequences per "
                      f"microbatch is not divisible by the batch mesh axes data*fsdp*expert = "
                      f"{shards}")
  cfg = model_config(c)  # raises ValueError naming the model field
  if cfg.lora_rank and not c.init_from:
    bad("init_from", "LoRA (model.lora_rank > 0) fine-tunes a pretrained model: set init_from to a "
                     "Hugging Face directory or a checkpoint of this project")
  if cfg.base_quant != "none" and not cfg.lora_rank:
    bad("model.base_quant", f"an {cfg.base_quant} base is frozen, so only adapters can train: set "
                            "model.lora_rank > 0 (or base_quant='none' for full fine-tuning)")
  if sizes["context"] > 1:
    if cfg.attention_impl == "dense":
      bad("model.attention_impl", f"'dense' cannot split the sequence over mesh.context="
                                  f"{sizes['context']}; use 'ring' or 'auto'")
    parts = sizes["context"] * (2 if cfg.ring_layout == "zigzag" else 1)
    if c.seq_len % parts:
      bad("seq_len", f"{c.seq_len} must be divisible by {parts} (mesh.context={sizes['context']}, "
                     f"ring_layout={cfg.ring_layout!r})")
  pieces = c.loss_chunks * sizes["context"]
  if c.seq_len % pieces:
    bad("loss_chunks", f"seq_len={c.seq_len} must be divisible by loss_chunks x mesh.context = {pieces} "
                       "(each chunk takes an equal share of every device's part of the sequence)")
  if c.data.format not in FORMATS:
    bad("data.format", f"{c.data.format!r}; choose one of {FORMATS}")
  wants = {"builtin": "text", "builtin_chat": "chat"}.get(c.data.source)
  if wants and c.data.format != wants:
    bad("data.format", f"data.source={c.data.source!r} holds {wants} documents: set data.format={wants!r}")
  builtin = c.data.source in ("builtin", "builtin_chat")
  if not builtin and not c.data.path:
    bad("data.path", f"data.source={c.data.source!r} needs a path (directory, file or glob)")
  if not builtin:
    path = storage.check(c.data.path, "config.data.path")
    if not (storage.exists(path) or storage.glob(path)):
      raise FileNotFoundError(f"config.data.path: {c.data.path!r} matches no files")
  for field, value in (("data.tokenizer", c.data.tokenizer), ("init_from", c.init_from)):
    if value and not storage.exists(storage.check(value, f"config.{field}")):
      raise FileNotFoundError(f"config.{field}: {value!r} does not exist")

