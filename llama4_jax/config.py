"""Llama 4 text-model architecture config: the frozen `ModelConfig`, presets, HF config.json read/write.

The field names follow Hugging Face's `Llama4TextConfig` (transformers 5.x) so that `from_hf_config` and
`to_hf_config` are a rename-free round trip; the facts behind the presets are in shared/design/LLAMA4.md.
Implementation knobs that do not change the function computed (dtypes, attention/MoE kernels, remat) live
here too, at the end, because they travel with the model; the mesh never does.
"""

from __future__ import annotations

import dataclasses
import json
import math
import os
from typing import Any, Mapping

import numpy as np

from llama4_jax import storage

DTYPES = ("float32", "bfloat16", "float16")
ATTENTION_IMPLS = ("auto", "dense", "ring")
RING_LAYOUTS = ("zigzag", "contiguous")
RING_KERNELS = ("auto", "xla", "splash")
MOE_IMPLS = ("auto", "ragged_dot", "blocked", "dense")
REMAT_POLICIES = ("none", "full", "dots", "dots_with_no_batch_dims")
LORA_TARGETS = ("q", "k", "v", "o", "mlp", "shared", "experts")
BASE_QUANTS = ("none", "int8", "nf4")


@dataclasses.dataclass(frozen=True)
class ModelConfig:
  """Every field of the Llama 4 text model, plus a few implementation choices (see the end)."""

  vocab_size: int = 202048
  hidden_size: int = 5120
  intermediate_size: int = 8192  # width of each routed expert and of the shared expert
  intermediate_size_mlp: int = 16384  # width of dense (non-MoE) SwiGLU layers
  num_hidden_layers: int = 48
  num_attention_heads: int = 40
  num_key_value_heads: int = 8
  head_dim: int = 128
  hidden_act: str = "silu"
  rms_norm_eps: float = 1e-5
  max_position_embeddings: int = 10485760
  initializer_range: float = 0.02
  tie_word_embeddings: bool = False
  # RoPE: theta and optional llama3-style scaling ("default" = no scaling).
  rope_theta: float = 500000.0
  rope_type: str = "llama3"
  rope_factor: float = 16.0
  rope_low_freq_factor: float = 1.0
  rope_high_freq_factor: float = 1.0
  rope_original_max_position_embeddings: int = 8192
  # Layer pattern. The explicit lists, when given, override the intervals (HF semantics).
  no_rope_layer_interval: int = 4
  no_rope_layers: tuple[int, ...] | None = None  # 1 = RoPE layer, 0 = NoPE layer (sic, as in HF)
  interleave_moe_layer_step: int = 1
  moe_layers: tuple[int, ...] | None = None  # indices of MoE layers
  attention_chunk_size: int | None = 8192  # None: RoPE layers attend fully causally too
  use_qk_norm: bool = True
  attn_temperature_tuning: bool = True
  floor_scale: int = 8192
  attn_scale: float = 0.1
  # Mixture of experts.
  num_local_experts: int = 16
  num_experts_per_tok: int = 1
  router_aux_loss_coef: float = 0.001
  # Special tokens (Llama 4 tokenizer ids).
  bos_token_id: int | None = 200000
  eos_token_id: tuple[int, ...] = (200001, 200007, 200008)
  pad_token_id: int | None = 200018
  # --- implementation choices (do not change the function) ---
  param_dtype: str = "float32"
  dtype: str = "float32"  # compute dtype of activations and matmuls; logits are always float32
  # auto: ring attention when the mesh's context axis is > 1, else dense. ring: also on one device
  # (the same blockwise custom-VJP kernel: memory linear in length).
  attention_impl: str = "auto"
  ring_layout: str = "zigzag"  # token order over the context axis: zigzag (causal load balance) or contiguous
  # ring attention's per-step kernel: auto = Pallas splash on TPU when each device's runs are a multiple
  # of 128 tokens, else XLA blockwise; splash off TPU runs in Pallas interpret mode (slow, for checking)
  ring_kernel: str = "auto"
  moe_impl: str = "auto"  # auto: megablox gmm on TPU, ragged_dot on GPU, blocked grouped matmul on CPU
  # Expert parallelism (an expert axis > 1): each device's experts take at most this many times the rows
  # they would get under perfect balance; rows beyond are dropped (their routed output is 0; the shared
  # expert and the residual still carry them). 0: dropless (the receive buffer holds the worst case,
  # expert-axis-size times the balanced rows: exact, but the largest activations of a training step).
  moe_capacity_factor: float = 0.0
  remat_policy: str = "none"
  scan_layers: bool = True
  # --- fine-tuning (model/linear.py, model/adapters.py): these add weights, so they travel with the
  # model too ---
  lora_rank: int = 0  # 0: no adapters. > 0: LoRA adapters of this rank on `lora_targets`
  lora_alpha: float = 16.0  # the update is scaled by lora_alpha / lora_rank
  lora_dropout: float = 0.0  # dropout on the adapters' input while training
  lora_targets: tuple[str, ...] = LORA_TARGETS  # subset of q, k, v, o, mlp, shared, experts
  # "int8": linear weights held as int8 + per-channel scales (weight-only); "nf4": 4-bit NormalFloat codes
  # + a bf16 scale per 64 weights (QLoRA's frozen base; model/linear.py)
  base_quant: str = "none"

  def __post_init__(self):
    if isinstance(self.lora_targets, str):  # "q,v" from a command line
      object.__setattr__(self, "lora_targets", tuple(t.strip() for t in self.lora_targets.split(",")
                                                     if t.strip()))
    for name in ("no_rope_layers", "moe_layers", "eos_token_id", "lora_targets"):
      value = getattr(self, name)
      if isinstance(value, (list, np.ndarray)) or (name == "eos_token_id" and isinstance(value, int)):
        value = (value,) if isinstance(value, int) else tuple(
            str(v) if name == "lora_targets" else int(v) for v in value)
        object.__setattr__(self, name, value)
    self.validate()

  # ----------------------------------------------------------------------------------------------
  def validate(self) -> None:
    """Raises ValueError naming the field that is wrong and how to fix it."""

    def bad(msg: str):
      raise ValueError(f"ModelConfig: {msg}")

    for name in ("vocab_size", "hidden_size", "intermediate_size", "intermediate_size_mlp",
                 "num_hidden_layers", "num_attention_heads", "num_key_value_heads", "head_dim",
                 "num_local_experts", "num_experts_per_tok", "no_rope_layer_interval",
                 "interleave_moe_layer_step", "floor_scale"):
      if int(getattr(self, name)) <= 0:
        bad(f"{name}={getattr(self, name)} must be a positive integer")
    if self.num_attention_heads % self.num_key_value_heads:
      bad(f"num_attention_heads={self.num_attention_heads} is not divisible by "
          f"num_key_value_heads={self.num_key_value_heads}; grouped-query attention needs a whole "
          "number of query heads per kv head")
    if self.head_dim % 2:
      bad(f"head_dim={self.head_dim} must be even for rotary embeddings")
    if self.num_experts_per_tok > self.num_local_experts:
      bad(f"num_experts_per_tok={self.num_experts_per_tok} exceeds num_local_experts="
          f"{self.num_local_experts}")
    if self.hidden_act != "silu":
      bad(f"hidden_act={self.hidden_act!r} is not supported; Llama 4 uses 'silu'")
    if self.tie_word_embeddings:
      bad("tie_word_embeddings=True is not supported; Llama 4's lm_head is untied")
    if self.attention_chunk_size is not None and self.attention_chunk_size <= 0:
      bad(f"attention_chunk_size={self.attention_chunk_size} must be positive or None")
    if self.rope_type not in ("default", "llama3"):
      bad(f"rope_type={self.rope_type!r} is not supported; use 'default' or 'llama3'")
    if self.rope_type == "llama3" and self.rope_high_freq_factor < self.rope_low_freq_factor:
      bad(f"rope_high_freq_factor={self.rope_high_freq_factor} must be >= rope_low_freq_factor="
          f"{self.rope_low_freq_factor}")
    for name, allowed in (("param_dtype", DTYPES), ("dtype", DTYPES),
                          ("attention_impl", ATTENTION_IMPLS), ("ring_layout", RING_LAYOUTS),
                          ("ring_kernel", RING_KERNELS),
                          ("moe_impl", MOE_IMPLS), ("base_quant", BASE_QUANTS),
                          ("remat_policy", REMAT_POLICIES)):
      if getattr(self, name) not in allowed:
        bad(f"{name}={getattr(self, name)!r}; choose one of {allowed}")
    if self.moe_capacity_factor < 0:
      bad(f"moe_capacity_factor={self.moe_capacity_factor} must be >= 0 (0: dropless)")
    if self.lora_rank < 0:
      bad(f"lora_rank={self.lora_rank} must be >= 0 (0 disables the adapters)")
    if self.lora_alpha <= 0:
      bad(f"lora_alpha={self.lora_alpha} must be positive")
    if not 0 <= self.lora_dropout < 1:
      bad(f"lora_dropout={self.lora_dropout} must be in [0, 1)")
    unknown = [t for t in self.lora_targets if t not in LORA_TARGETS]
    if unknown or (self.lora_rank and not self.lora_targets):
      bad(f"lora_targets={self.lora_targets}: choose a non-empty subset of {LORA_TARGETS}")
    n = self.num_hidden_layers
    if self.no_rope_layers is not None:
      if len(self.no_rope_layers) < n or any(v not in (0, 1) for v in self.no_rope_layers):
        bad(f"no_rope_layers must hold a 0 or 1 for each of the {n} layers, got {self.no_rope_layers}")
    if self.moe_layers is not None and any(not 0 <= i < n for i in self.moe_layers):
      bad(f"moe_layers={self.moe_layers} names layers outside 0..{n - 1}")

  # ----------------------------------------------------------------------------------------------
  def replace(self, **changes) -> "ModelConfig":
    unknown = set(changes) - {f.name for f in dataclasses.fields(self)}
    if unknown:
      raise ValueError(f"ModelConfig has no field(s) {sorted(unknown)}; known fields: "
                       f"{[f.name for f in dataclasses.fields(self)]}")
    return dataclasses.replace(self, **changes)

  def is_rope_layer(self, i: int) -> bool:
    if self.no_rope_layers is not None:
      return bool(self.no_rope_layers[i])
    return (i + 1) % self.no_rope_layer_interval != 0

  def is_moe_layer(self, i: int) -> bool:
    if self.moe_layers is not None:
      return i in self.moe_layers
    return (i + 1) % self.interleave_moe_layer_step == 0

  def layer_kinds(self) -> tuple["LayerKind", ...]:
    return tuple(LayerKind(self.is_rope_layer(i), self.is_moe_layer(i))
                 for i in range(self.num_hidden_layers))

  def kv_cache_length(self, rope: bool, max_length: int) -> int:
    """KV-cache entries a layer keeps for up to `max_length` tokens: a ring of attention_chunk_size on
    chunked (RoPE) layers, every position on NoPE layers."""
    if not rope or self.attention_chunk_size is None:
      return max_length
    return min(self.attention_chunk_size, max_length)

  def layer_period(self) -> int:
    """The smallest P with kind(i) == kind(i % P) for all layers: the scanned superblock size."""
    kinds = self.layer_kinds()
    for p in range(1, len(kinds) + 1):
      if all(kinds[i] == kinds[i % p] for i in range(len(kinds))):
        return p
    return len(kinds)

  def rope_inv_freq(self) -> np.ndarray:
    """Inverse frequencies [head_dim // 2] in float32, with llama3 scaling when configured.

    Computed in float32 step by step as transformers does, so positions far out agree bit for bit.
    """
    dim = self.head_dim
    exponent = np.arange(0, dim, 2, dtype=np.int64).astype(np.float32) / np.float32(dim)
    inv_freq = (np.float32(1.0) / np.power(np.float32(self.rope_theta), exponent)).astype(np.float32)
    if self.rope_type == "default":
      return inv_freq
    factor = np.float32(self.rope_factor)
    low, high = self.rope_low_freq_factor, self.rope_high_freq_factor
    old_len = self.rope_original_max_position_embeddings
    low_wavelen, high_wavelen = old_len / low, old_len / high
    wavelen = (np.float32(2 * math.pi) / inv_freq).astype(np.float32)
    scaled = np.where(wavelen > low_wavelen, inv_freq / factor, inv_freq).astype(np.float32)
    medium = ~(wavelen < high_wavelen) & ~(wavelen > low_wavelen)
    if medium.any():  # only when high > low; low == high (Scout) leaves no smooth region
      smooth = (old_len / wavelen - low) / (high - low)
      smoothed = (1 - smooth) * scaled / factor + smooth * scaled
      scaled = np.where(medium, smoothed, scaled).astype(np.float32)
    return scaled

  # ----------------------------------------------------------------------------------------------
  def num_params(self) -> int:
    """Text-model parameter count from the shapes alone (equals the model's, which a test checks)."""
    d, v, f, m = self.hidden_size, self.vocab_size, self.intermediate_size, self.intermediate_size_mlp
    attn = d * self.head_dim * (2 * self.num_attention_heads + 2 * self.num_key_value_heads)
    moe = d * self.num_local_experts + 3 * self.num_local_experts * d * f + 3 * d * f
    total = 2 * v * d + d
    for kind in self.layer_kinds():
      total += attn + 2 * d + (moe if kind.moe else 3 * d * m)
    return total


@dataclasses.dataclass(frozen=True)
class LayerKind:
  rope: bool  # RoPE + chunked attention (+ QK norm); otherwise NoPE, full causal, temperature tuning
  moe: bool  # routed experts + shared expert; otherwise a dense SwiGLU


# ------------------------------------------------------------------------------------------------
# Presets. `scout` and `maverick` are the released text configs; `tiny` is the CPU default model.

_SCOUT = ModelConfig()
_MAVERICK = ModelConfig(
    num_local_experts=128, interleave_moe_layer_step=2, use_qk_norm=False, rope_type="default",
    max_position_embeddings=1048576)
_TINY = ModelConfig(
    vocab_size=8192, hidden_size=256, intermediate_size=512, intermediate_size_mlp=1024,
    num_hidden_layers=4, num_attention_heads=8, num_key_value_heads=2, head_dim=32,
    num_local_experts=4, interleave_moe_layer_step=2, attention_chunk_size=256,
    rope_original_max_position_embeddings=256, floor_scale=256, max_position_embeddings=4096,
    bos_token_id=1, eos_token_id=(2,), pad_token_id=0)

PRESETS: dict[str, ModelConfig] = {"tiny": _TINY, "scout": _SCOUT, "maverick": _MAVERICK}


def get_config(name: str, **overrides) -> ModelConfig:
  """A preset by name (`tiny`, `scout`, `maverick`), with field overrides."""
  if name not in PRESETS:
    raise ValueError(f"unknown preset {name!r}; choose one of {sorted(PRESETS)}")
  return PRESETS[name].replace(**overrides)


# ------------------------------------------------------------------------------------------------
# Hugging Face config.json

_HF_DTYPES = {"float32": "float32", "bfloat16": "bfloat16", "float16": "float16"}
_DIRECT_FIELDS = (
    "vocab_size", "hidden_size", "intermediate_size", "intermediate_size_mlp", "num_hidden_layers",
    "num_attention_heads", "num_key_value_heads", "head_dim", "hidden_act", "rms_norm_eps",
    "max_position_embeddings", "initializer_range", "tie_word_embeddings", "no_rope_layer_interval",
    "interleave_moe_layer_step", "attention_chunk_size", "use_qk_norm", "attn_temperature_tuning",
    "floor_scale", "attn_scale", "num_local_experts", "num_experts_per_tok", "router_aux_loss_coef",
    "bos_token_id", "eos_token_id", "pad_token_id", "no_rope_layers", "moe_layers")


def read_hf_config(path: str | os.PathLike) -> dict[str, Any]:
  """Reads config.json from a directory or file path (local or gs://), with a clear error when it is
  missing."""
  path = storage.check(os.fspath(path), "config path")
  file = path if path.endswith(".json") else storage.join(path, "config.json")
  if not storage.exists(file):
    raise FileNotFoundError(f"no config.json at {file}: a Hugging Face checkpoint directory holds "
                            "config.json next to its *.safetensors files")
  try:
    return json.loads(storage.read_text(file))
  except json.JSONDecodeError as e:
    raise ValueError(f"{file} is not valid JSON: {e}") from e


def text_config_dict(hf: Mapping[str, Any]) -> dict[str, Any]:
  """The text part of a `llama4_text` or `llama4` (ConditionalGeneration) config dict."""
  model_type = hf.get("model_type")
  if model_type == "llama4":
    if "text_config" not in hf:
      raise ValueError("a model_type 'llama4' config must have a 'text_config' section")
    return dict(hf["text_config"])
  if model_type not in ("llama4_text", None):
    raise ValueError(f"model_type {model_type!r} is not Llama 4; expected 'llama4_text' or 'llama4'")
  return dict(hf)


def from_hf_config(hf: Mapping[str, Any] | str | os.PathLike, **overrides) -> ModelConfig:
  """ModelConfig from a Hugging Face config (dict, config.json path or checkpoint directory).

  Accepts `llama4_text` and `llama4` (reads `text_config`), the old (`rope_theta` + `rope_scaling`) and
  new (`rope_parameters`) RoPE spellings, and an int or bool `attn_temperature_tuning`.
  """
  if not isinstance(hf, Mapping):
    hf = read_hf_config(hf)
  text = text_config_dict(hf)
  nullable = ("attention_chunk_size", "bos_token_id", "pad_token_id")
  fields: dict[str, Any] = {k: text[k] for k in _DIRECT_FIELDS
                            if k in text and (text[k] is not None or k in nullable)}
  if "attn_temperature_tuning" in fields:
    fields["attn_temperature_tuning"] = bool(fields["attn_temperature_tuning"])
  if fields.get("head_dim") is None and "hidden_size" in text:
    fields["head_dim"] = text["hidden_size"] // text.get("num_attention_heads", 40)
  rope = text.get("rope_parameters")
  if rope is None:
    rope = dict(text.get("rope_scaling") or {})
    if "rope_theta" in text:
      rope["rope_theta"] = text["rope_theta"]
  rope = dict(rope)
  rope_type = rope.get("rope_type") or rope.get("type") or "default"
  if rope_type not in ("default", "llama3"):
    raise ValueError(f"RoPE type {rope_type!r} in the config is not supported; Llama 4 uses 'llama3' "
                     "scaling or none ('default')")
  fields["rope_type"] = rope_type
  if "rope_theta" in rope:
    fields["rope_theta"] = float(rope["rope_theta"])
  if rope_type == "llama3":
    for ours, theirs in (("rope_factor", "factor"), ("rope_low_freq_factor", "low_freq_factor"),
                         ("rope_high_freq_factor", "high_freq_factor"),
                         ("rope_original_max_position_embeddings", "original_max_position_embeddings")):
      if theirs not in rope:
        raise ValueError(f"llama3 RoPE scaling in the config lacks {theirs!r}")
      fields[ours] = rope[theirs]
  dtype = text.get("dtype") or text.get("torch_dtype") or hf.get("dtype") or hf.get("torch_dtype")
  if dtype in _HF_DTYPES:
    fields.setdefault("param_dtype", _HF_DTYPES[dtype])
    fields.setdefault("dtype", _HF_DTYPES[dtype])
  fields.update(overrides)
  cfg = ModelConfig().replace(**fields)
  # Explicit layer lists that merely spell out the intervals are dropped, keeping configs canonical.
  plain = cfg.replace(no_rope_layers=None, moe_layers=None)
  if plain.layer_kinds() == cfg.layer_kinds():
    return plain
  return cfg


def to_hf_config(cfg: ModelConfig) -> dict[str, Any]:
  """A `llama4_text` config.json dict (transformers 5.x spelling) that `Llama4ForCausalLM` loads."""
  out: dict[str, Any] = {"architectures": ["Llama4ForCausalLM"], "model_type": "llama4_text"}
  for k in _DIRECT_FIELDS:
    v = getattr(cfg, k)
    out[k] = list(v) if isinstance(v, tuple) else v
  out["no_rope_layers"] = [int(cfg.is_rope_layer(i)) for i in range(cfg.num_hidden_layers)]
  out["moe_layers"] = [i for i in range(cfg.num_hidden_layers) if cfg.is_moe_layer(i)]
  rope: dict[str, Any] = {"rope_type": cfg.rope_type, "rope_theta": cfg.rope_theta}
  if cfg.rope_type == "llama3":
    rope.update(factor=cfg.rope_factor, low_freq_factor=cfg.rope_low_freq_factor,
                high_freq_factor=cfg.rope_high_freq_factor,
                original_max_position_embeddings=cfg.rope_original_max_position_embeddings)
  out["rope_parameters"] = rope
  out["attention_bias"] = False
  out["dtype"] = cfg.param_dtype
  return out
