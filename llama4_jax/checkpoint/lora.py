"""Exporting LoRA fine-tunes: adapters alone (Orbax, or PEFT's layout) and merged Hugging Face checkpoints.

- `save_adapters(model, dir, base)`: the adapters as a checkpoint of this project (what LoRA training
  writes too): Orbax params holding only the adapter weights, plus the ModelConfig and the path of the
  frozen base they belong to. `load_model(dir)` loads the base and puts the adapters on it.
- `save_peft(model, dir)`: `adapter_config.json` + `adapter_model.safetensors` that
  `peft.PeftModel.from_pretrained(transformers_model, dir)` loads onto the Hugging Face base model. PEFT
  adapts `nn.Linear` modules: attention q/k/v/o, the dense MLP and the shared expert. Transformers keeps the
  routed experts as fused 3-D parameters that LoRA's layout cannot name, so their adapters are left out
  (listed in the summary); use a merged export for them.
- `merged_to_hf(src, dst)`: a LoRA checkpoint with its adapters folded into the base weights
  (W + alpha/r A B, W dequantized if the base was int8), streamed a layer at a time from the frozen base (what
  `llama4-convert orbax-to-hf --merge-lora` runs).
"""

from __future__ import annotations

import os

import jax
import numpy as np
from flax import nnx, traverse_util

from llama4_jax import storage
from llama4_jax.checkpoint.convert import OrbaxSlices, write_hf
from llama4_jax.checkpoint.hf import HFTensors, _check_tensors, _gather, text_prefix, write_json
from llama4_jax.checkpoint.keys import plan
from llama4_jax.checkpoint.load import load_model
from llama4_jax.checkpoint.orbax import StateLeaves, find_checkpoints, read_metadata, read_model_config
from llama4_jax.checkpoint.safetensors_io import write_safetensors
from llama4_jax.checkpoint.training import Checkpointer
from llama4_jax.model.adapters import linear_weights
from llama4_jax.model.linear import Weight, is_adapter, quantize
from llama4_jax.model.transformer import abstract_model

# our (module path inside a layer, weight) -> the HF nn.Linear it adapts
_PEFT_MODULES = {
    ("attn", "q"): "self_attn.q_proj", ("attn", "k"): "self_attn.k_proj",
    ("attn", "v"): "self_attn.v_proj", ("attn", "o"): "self_attn.o_proj",
    ("ffn", "gate"): "feed_forward.gate_proj", ("ffn", "up"): "feed_forward.up_proj",
    ("ffn", "down"): "feed_forward.down_proj",
    ("ffn.shared", "gate"): "feed_forward.shared_expert.gate_proj",
    ("ffn.shared", "up"): "feed_forward.shared_expert.up_proj",
    ("ffn.shared", "down"): "feed_forward.shared_expert.down_proj",
}


def adapter_params(model) -> dict:
  """{path tuple: array} of the model's adapter weights."""
  flat = traverse_util.flatten_dict(nnx.to_pure_dict(nnx.state(model)))
  return {k: v for k, v in flat.items() if is_adapter(k)}


def _require_adapters(model) -> None:
  if not model.config.lora_rank:
    raise ValueError("the model has no LoRA adapters (lora_rank=0); load or create it with lora_rank > 0")


def save_adapters(model, out_dir: str, base: str | None = None, overwrite: bool = False) -> str:
  """Writes the adapters alone as an Orbax checkpoint of this project; `base` is the frozen base's
  directory (recorded so `load_model(out_dir)` can rebuild the model). Returns the directory."""
  _require_adapters(model)
  params = traverse_util.unflatten_dict(adapter_params(model))
  extra = {"frozen_base": storage.check(base, "base")} if base else {}
  with storage.atomic_directory(out_dir, overwrite, enabled=jax.process_index() == 0) as tmp:
    if tmp is not None:  # (one process writes: run it in a single-process job)
      ckpt = Checkpointer(storage.join(tmp, "checkpoints"), keep=1, async_save=False)
      ckpt.save(0, {"params": params}, {}, model.config, force=True, extra=extra)
      ckpt.close()
  return storage.check(out_dir)


def save_peft(model, out_dir: str, base: str | None = None, overwrite: bool = False) -> dict:
  """Writes the adapters PEFT can represent in its layout; returns a summary (what was written and
  what was left out)."""
  _require_adapters(model)
  cfg = model.config
  flat = adapter_params(model)
  tensors: dict[str, np.ndarray] = {}
  skipped: set[str] = set()
  written: set[str] = set()
  for path, a in flat.items():
    if not str(path[-1]).endswith("_lora_a"):
      continue
    name = str(path[-1])[: -len("_lora_a")]
    inner = ".".join(str(p) for p in path[2:-1])
    layers = _layer_indices(model, path)
    routed = inner == "ffn" and cfg.layer_kinds()[layers[0]].moe  # MoE's ffn.gate: the routed experts
    hf_module = None if routed else _PEFT_MODULES.get((inner, name))
    if hf_module is None:
      skipped.add("routed experts" if routed else f"{inner}.{name}")
      continue
    written.add(hf_module)
    b = flat[path[:-1] + (name + "_lora_b",)]
    a, b = _gather(a), _gather(b)
    for n, layer in enumerate(layers):
      a_i = a[n] if path[0] == "blocks" else a
      b_i = b[n] if path[0] == "blocks" else b
      r = a_i.shape[-1]
      key = f"base_model.model.model.layers.{layer}.{hf_module}"
      tensors[f"{key}.lora_A.weight"] = np.ascontiguousarray(a_i.reshape(-1, r).T.astype(np.float32))
      tensors[f"{key}.lora_B.weight"] = np.ascontiguousarray(b_i.reshape(r, -1).T.astype(np.float32))
  if not tensors:
    raise ValueError(f"none of the adapters ({', '.join(cfg.lora_targets)}) can be written in PEFT's "
                     "layout; export a merged checkpoint instead (orbax-to-hf --merge-lora)")
  modules = sorted(written)
  adapter_config = {
      "peft_type": "LORA", "task_type": "CAUSAL_LM", "r": cfg.lora_rank, "lora_alpha": cfg.lora_alpha,
      "lora_dropout": cfg.lora_dropout, "bias": "none", "fan_in_fan_out": False,
      "inference_mode": True, "use_rslora": False, "init_lora_weights": True,
      # a full-match regex, so the dense MLP's and the shared expert's projections are told apart
      "target_modules": r".*\.layers\.\d+\.(" + "|".join(m.replace(".", r"\.") for m in modules) + ")",
      "base_model_name_or_path": storage.check(base, "base") if base else None,
      "modules_to_save": None, "layers_to_transform": None, "rank_pattern": {}, "alpha_pattern": {},
  }
  specs = {k: (v.shape, v.dtype) for k, v in sorted(tensors.items())}
  with storage.atomic_directory(out_dir, overwrite, enabled=jax.process_index() == 0) as tmp:
    if tmp is not None:
      write_safetensors(storage.join(tmp, "adapter_model.safetensors"), specs,
                        ((k, tensors[k]) for k in specs), {"format": "pt"})
      write_json(storage.join(tmp, "adapter_config.json"), adapter_config)
  return {"dst": storage.check(out_dir), "tensors": len(tensors), "modules": modules,
          "left_out": sorted(skipped), "base_quant": cfg.base_quant}


def _layer_indices(model, path) -> list[int]:
  """Decoder layer numbers of a parameter at `path` (all stack entries of a scanned one)."""
  if path[0] == "blocks":
    return [path[1] + b * model.period for b in range(model.num_blocks)]
  return [model.num_blocks * model.period + path[1]]


def merged_to_hf(src: str, dst: str, max_shard_size: int | str = "5GB", dtype=None,
                 overwrite: bool = False, progress: bool = True) -> dict:
  """A LoRA checkpoint (training workdir or `save_adapters` output) -> a merged Hugging Face checkpoint
  (`Llama4ForCausalLM`), streaming: each base weight slice (one layer) is read from the frozen base (the
  Hugging Face or Orbax directory the checkpoint names), W + (alpha / r) A @ B is formed in float32 with
  that layer's adapter and cast to the model's param_dtype (what `merge_lora` computes), and the result is
  written out, so memory holds a few layers whatever the model size. With an int8 or NF4 training base, W
  is the dequantized weight the adapters were trained on (quantized again from the base, slice by slice,
  with the same code).
  Tokenizer files next to the base and the source are copied (the source's win)."""
  src = storage.check(os.fspath(src), "source")
  meta, step = read_metadata(src)
  cfg, _ = read_model_config(src)
  if not cfg.lora_rank:
    raise ValueError(f"{src} has no LoRA adapters (lora_rank=0): export it with orbax-to-hf alone")
  base = meta.get("frozen_base")
  if not base or not storage.isdir(base):
    raise FileNotFoundError(f"the frozen base of {src} ({base!r}, the run's init_from) is not a directory "
                            "here: the adapters cannot be merged without it")
  plain = cfg.replace(lora_rank=0, base_quant="none")
  adapters = StateLeaves(storage.join(find_checkpoints(src), str(step), "state"))
  linears = _linears(cfg)
  get_base, closer = _base_slices(base, plain)

  def merged(p, i):
    w = get_base(p, i)
    if p.path not in linears:  # norms, router, embedding, LM head: as the model holds them
      return np.asarray(w).astype(plain.param_dtype)
    lead, n_in, quant = linears[p.path]
    g = lead - (1 if p.stacked else 0)  # group dims (experts) before the input dims
    if quant != "none":  # the quantized base the adapters were trained on
      with jax.default_device(jax.devices("cpu")[0]):
        w = np.asarray(Weight(*quantize(quant, w, g, n_in), None, None, g).value(np.float32))
    a_path = ("params", *p.path[:-1], f"{p.path[-1]}_lora_a")
    if a_path not in adapters:
      return w.astype(plain.param_dtype)
    b_path = a_path[:-1] + (f"{p.path[-1]}_lora_b",)
    index = i if p.stacked else None
    a, b = adapters.read(a_path, index), adapters.read(b_path, index)
    a = a.reshape(a.shape[:g] + (-1, a.shape[-1])).astype(np.float32)
    b = b.reshape(b.shape[:g + 1] + (-1,)).astype(np.float32)
    delta = np.matmul(a, b) * np.float32(cfg.lora_alpha / cfg.lora_rank)
    return (np.asarray(w, np.float32) + delta.reshape(w.shape)).astype(plain.param_dtype)

  with closer:
    summary = write_hf("merge-lora", plain, merged, src, dst, side_dirs=(base,),
                       max_shard_size=max_shard_size, dtype=dtype, overwrite=overwrite, progress=progress)
  return dict(summary, merged=True, base=base, parameters=plain.num_params())


def _linears(cfg) -> dict[tuple, tuple[int, int, str]]:
  """State path of each linear weight -> (its dims before the input dims: stack + expert groups, its
  number of input dims, how it is held: "none", or the config's base_quant when it is quantized)."""
  return {p: (lead, n_in, cfg.base_quant if quantized else "none")
          for p, (lead, n_in, quantized) in linear_weights(abstract_model(cfg)).items()}


def _base_slices(base: str, cfg):
  """(get_slice(plan, i) -> numpy slice of the base weights, a context that closes the reader) for a
  Hugging Face directory or an Orbax checkpoint of this project, checked against `cfg`."""
  import contextlib

  if not storage.exists(storage.join(base, "config.json")):
    slices = OrbaxSlices(base)
    return slices.get, contextlib.closing(slices)
  tensors = HFTensors(base)
  prefix = text_prefix(tensors.keys())
  _check_tensors(tensors, prefix, plan(abstract_model(cfg)))

  def get(p, i):
    key = prefix + p.hf_keys[i]
    return np.asarray(p.layout.read(lambda idx: tensors.read(key, idx), p.unit_shape,
                                    tuple(slice(0, n) for n in p.unit_shape)))

  return get, contextlib.nullcontext()


def export_lora(src: str, dst: str, fmt: str = "peft", overwrite: bool = False) -> dict:
  """A LoRA fine-tune (training workdir or `save_adapters` output) -> its adapters in `fmt` ("peft" or
  "orbax")."""
  base = read_metadata(src)[0].get("frozen_base")
  model = load_model(src)
  if fmt == "orbax":
    return {"dst": save_adapters(model, dst, base, overwrite), "format": "orbax"}
  if fmt != "peft":
    raise ValueError(f"format {fmt!r}: choose 'peft' or 'orbax'")
  return save_peft(model, dst, base, overwrite)
