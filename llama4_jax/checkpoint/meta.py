"""Meta's original Llama 4 checkpoints, presented as Hugging Face text tensors for the converter.

A directory holds params.json and model-parallel shards consolidated.00.pth ... (8 for the released
models). Each shard is opened with `torch.load(weights_only=True, mmap=True)`: no arbitrary unpickling and
no tensor read before it is asked for. `MetaTensors[hf_key]` merges that tensor's parts across the shards
(see shared/design/LLAMA4.md, "Meta's original checkpoint layout"):

  tok_embeddings / output            split on dim 0           -> embed_tokens / lm_head
  attention.wqkv [(H+2K)/n*Dh, D]    q, k, v rows per shard   -> q/k/v_proj (heads in shard order)
  attention.wo [D, H*Dh/n]           split on dim 1           -> o_proj
  experts.moe_w_in_eD_F [E*D, F/n]   (gate; swiglu = up)      -> gate_up_proj [E, D, 2F]
  experts.moe_w_out_eF_D [E*F/n, D]                           -> down_proj [E, F, D]
  router_DE [D, E] (replicated)                               -> router.weight [E, D]
  w_in_shared_FD / w_swiglu_FD [F/n, D], w_out_shared_DF [D, F/n]  -> shared expert gate/up/down
  dense w1 / w3 [M/n, D], w2 [D, M/n]                         -> gate/up/down_proj
  norms (replicated)                                          -> the norm weights

Expert and MLP widths come from the tensor shapes, the rest of the ModelConfig from params.json.
"""

from __future__ import annotations

import glob
import json
import os

import numpy as np

from llama4_jax.checkpoint.safetensors_io import CheckpointError
from llama4_jax.config import ModelConfig

_SKIPPED = ("rope.freqs", "gate_stats", "expert_activation_DE", "_extra_state")


def _numpy(t) -> np.ndarray:
  import torch
  if t.dtype == torch.bfloat16:
    import ml_dtypes
    return t.contiguous().view(torch.int16).numpy().view(ml_dtypes.bfloat16)
  return t.contiguous().numpy()


class MetaTensors:
  """HF text keys -> merged numpy arrays over Meta's model-parallel shards (read on access)."""

  def __init__(self, directory: str):
    self.directory = directory
    params_file = os.path.join(directory, "params.json")
    if not os.path.isfile(params_file):
      raise CheckpointError(f"no params.json in {directory}: not a Meta Llama 4 checkpoint")
    with open(params_file) as f:
      self.params = json.load(f)
    files = sorted(glob.glob(os.path.join(directory, "consolidated.*.pth")))
    if not files:
      raise CheckpointError(f"no consolidated.*.pth shards in {directory}")
    try:
      import torch
    except ImportError:
      raise ImportError("reading Meta .pth checkpoints needs torch: pip install 'llama4_jax[torch]' "
                        "(or torch itself)") from None
    self.files = files
    self.parts = []
    for f in files:
      try:
        self.parts.append(torch.load(f, map_location="cpu", weights_only=True, mmap=True))
      except Exception as e:  # noqa: BLE001 - torch raises many types for damaged files
        raise CheckpointError(f"{f} cannot be read as a weights-only PyTorch checkpoint: {e}") from None
    self.n = len(files)
    names = set(self.parts[0])
    for f, part in zip(files[1:], self.parts[1:]):
      if set(part) != names:
        missing = sorted(names ^ set(part))[:3]
        raise CheckpointError(f"{f} does not hold the same tensors as {files[0]} (e.g. {missing})")
    self._build()
    self.source_dtype = self.dtype("model.embed_tokens.weight")

  # --- the HF view ----------------------------------------------------------------------------
  def _find(self, *candidates: str) -> str:
    for name in candidates:
      if name in self.parts[0]:
        return name
    raise CheckpointError(f"none of {candidates} is in {self.files[0]}")

  def _has(self, name: str) -> bool:
    return name in self.parts[0]

  def _shape(self, name: str) -> tuple[int, ...]:
    return tuple(self.parts[0][self._find(name)].shape)  # shard 0's part; known without reading it

  def _add(self, key: str, read, shape, *sources: str) -> None:
    self._readers[key] = read
    self._shapes[key] = tuple(int(n) for n in shape)
    self._sources[key] = sources[0]
    self.where[key] = os.path.basename(self.files[0]) + (f" (+{self.n - 1} shards)" if self.n > 1 else "")
    self._used.update(sources)

  def _build(self) -> None:
    self._readers, self._shapes, self._sources, self.where, self._used = {}, {}, {}, {}, set()
    p = self.params
    heads, kv_heads = p["n_heads"], p.get("n_kv_heads", p["n_heads"])
    if heads % self.n or kv_heads % self.n:
      raise CheckpointError(f"{self.n} shards do not divide n_heads={heads} and n_kv_heads={kv_heads}")
    head_dim = p["dim"] // heads
    def cat(key, name, axis):  # parts joined on `axis`
      shape = list(self._shape(name))
      shape[axis] *= self.n
      self._add(key, lambda: np.concatenate([_numpy(t[name]) for t in self.parts], axis), shape, name)

    def one(key, name):  # replicated on every shard
      self._add(key, lambda: _numpy(self.parts[0][name]), self._shape(name), name)

    cat("model.embed_tokens.weight", "tok_embeddings.weight", 0)
    cat("lm_head.weight", "output.weight", 0)
    one("model.norm.weight", "norm.weight")
    for i in range(p["n_layers"]):
      L, hf = f"layers.{i}.", f"model.layers.{i}."
      wqkv = L + "attention.wqkv.weight"
      hs, ks = heads // self.n * head_dim, kv_heads // self.n * head_dim
      for name, lo, hi in (("q", 0, hs), ("k", hs, hs + ks), ("v", hs + ks, hs + 2 * ks)):
        self._add(hf + f"self_attn.{name}_proj.weight",
                  lambda w=wqkv, lo=lo, hi=hi: np.concatenate([_numpy(t[w])[lo:hi] for t in self.parts]),
                  ((hi - lo) * self.n, self._shape(wqkv)[1]), wqkv)
      cat(hf + "self_attn.o_proj.weight", L + "attention.wo.weight", 1)
      one(hf + "input_layernorm.weight",
          self._find(L + "attention.wqkv.layer_norm_weight", L + "attention_norm.weight"))
      one(hf + "post_attention_layernorm.weight",
          self._find(L + "feed_forward.norm.weight", L + "ffn_norm.weight",
                     L + "feed_forward.mlp.layer_norm_weight"))
      ff = L + "feed_forward."
      if self._has(ff + "router_DE"):
        self._add_moe(hf + "feed_forward.", ff, cat)
      else:
        cat(hf + "feed_forward.gate_proj.weight", self._find(ff + "w1.weight", ff + "w1"), 0)
        cat(hf + "feed_forward.up_proj.weight", self._find(ff + "w3.weight", ff + "w3"), 0)
        cat(hf + "feed_forward.down_proj.weight", self._find(ff + "w2.weight", ff + "w2"), 1)
    unused = [k for k in self.parts[0] if k not in self._used and not any(s in k for s in _SKIPPED)]
    text_unused = [k for k in unused if not k.startswith(("vision_", "speech_"))]
    if text_unused:
      raise CheckpointError(f"unexpected tensor {text_unused[0]!r} in {self.files[0]}: params.json does "
                            f"not describe it ({len(text_unused)} such tensors)")

  def _add_moe(self, hf: str, ff: str, cat) -> None:
    router = ff + "router_DE"
    d, e = self._shape(router)

    def expert_in(name):
      return np.concatenate([_numpy(t[name]).reshape(e, d, -1) for t in self.parts], axis=2)

    w_in, w_up = ff + "experts.moe_w_in_eD_F", ff + "experts.moe_w_swiglu_eD_F"
    w_out = ff + "experts.moe_w_out_eF_D"
    f = self._shape(w_in)[1] * self.n
    self._add(hf + "router.weight", lambda: _numpy(self.parts[0][router]).T, (e, d), router)
    self._add(hf + "experts.gate_up_proj",
              lambda: np.concatenate([expert_in(w_in), expert_in(w_up)], axis=2), (e, d, 2 * f),
              w_in, w_up)
    self._add(hf + "experts.down_proj",
              lambda: np.concatenate([_numpy(t[w_out]).reshape(e, -1, d) for t in self.parts], axis=1),
              (e, f, d), w_out)
    for ours, names, axis in (("gate_proj", ("w_in_shared_FD.weight", "w_in_shared_FD"), 0),
                              ("up_proj", ("w_swiglu_FD.weight", "w_swiglu_FD"), 0),
                              ("down_proj", ("w_out_shared_DF.weight", "w_out_shared_DF"), 1)):
      cat(hf + f"shared_expert.{ours}.weight", self._find(*(ff + n for n in names)), axis)

  # --- the interface the converter uses (as HFTensors) -----------------------------------------
  def keys(self):
    return self._readers.keys()

  def __getitem__(self, key: str) -> np.ndarray:
    return self._readers[key]()

  def read(self, key: str, index: tuple[slice, ...] = ()) -> np.ndarray:
    return self[key][tuple(index)]

  def dtype(self, key: str) -> np.dtype:
    return _numpy(self.parts[0][self._sources[key]]).dtype  # a view: nothing is read

  def shape(self, key: str) -> tuple[int, ...]:
    return self._shapes[key]

  def file_of(self, key: str) -> str:
    return os.path.join(self.directory, self.where[key])

  def config(self, **overrides) -> ModelConfig:
    """The ModelConfig: sizes from params.json, expert / MLP widths from the tensor shapes."""
    p = self.params
    moe = p.get("moe_args") or {}
    fields = dict(
        hidden_size=p["dim"], num_hidden_layers=p["n_layers"], num_attention_heads=p["n_heads"],
        num_key_value_heads=p.get("n_kv_heads", p["n_heads"]), head_dim=p["dim"] // p["n_heads"],
        rms_norm_eps=p.get("norm_eps", 1e-5), rope_theta=float(p.get("rope_theta", 500000.0)),
        vocab_size=self._shapes["model.embed_tokens.weight"][0],
        no_rope_layer_interval=p.get("nope_layer_interval") or 10**9,
        attention_chunk_size=p.get("attention_chunk_size"), use_qk_norm=bool(p.get("use_qk_norm", False)),
        num_local_experts=moe.get("num_experts", 1), num_experts_per_tok=moe.get("top_k", 1),
        interleave_moe_layer_step=moe.get("interleave_moe_layer_step", 1),
        # not in the released params.json (Meta's code fixes them); read if a file carries them
        floor_scale=p.get("floor_scale", 8192), attn_scale=p.get("attn_scale", 0.1))
    if p.get("max_seq_len"):
      fields["max_position_embeddings"] = int(p["max_seq_len"])
    if p.get("use_scaled_rope"):
      # Scout's published values unless params.json names its own.
      fields.update(rope_type="llama3", rope_factor=float(p.get("rope_scaling_factor", 16.0)),
                    rope_low_freq_factor=float(p.get("rope_low_freq_factor", 1.0)),
                    rope_high_freq_factor=float(p.get("rope_high_freq_factor", 1.0)),
                    rope_original_max_position_embeddings=int(p.get("rope_original_max_position_embeddings",
                                                                    8192)))
    else:
      fields.update(rope_type="default")
    for key, shape in self._shapes.items():
      if key.endswith("experts.down_proj"):
        fields["intermediate_size"] = shape[1]
      elif key.endswith("feed_forward.gate_proj.weight") and "shared_expert" not in key:
        fields["intermediate_size_mlp"] = shape[0]
    fields.setdefault("intermediate_size_mlp", fields.get("intermediate_size", 1) * 2)
    fields.update(overrides)
    return ModelConfig().replace(**fields)
