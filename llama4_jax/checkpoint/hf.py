"""Hugging Face checkpoints in and out: `load_model` and `save_pretrained`.

Loading reads config.json and the safetensors files (single or sharded with an index; the
`Llama4ForCausalLM` layout or the released `Llama4ForConditionalGeneration` one, whose vision weights are
ignored here). Each parameter is built with `jax.make_array_from_callback`: a device's callback reads only
that device's slice from the memory-mapped file, so no host materialises more than its own shards (plus
one slice in flight). Saving streams one tensor at a time into sharded safetensors with an index and a
config.json that `transformers.Llama4ForCausalLM.from_pretrained` loads; the directory appears atomically.
"""

from __future__ import annotations

import json
import os
import re
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx
from jax.sharding import Mesh

from llama4_jax import storage
from llama4_jax.checkpoint.keys import ParamPlan, hf_tensor_specs, plan
from llama4_jax.checkpoint.safetensors_io import (CheckpointError, SafetensorsFile, contiguous,
                                                 write_safetensors)
from llama4_jax.config import ModelConfig, from_hf_config, read_hf_config, to_hf_config
from llama4_jax.model.adapters import build_quantized
from llama4_jax.model.paths import sharding_table, state_leaves, state_path
from llama4_jax.model.transformer import Llama4, model_shardings
from llama4_jax.progress import bar

ARCHITECTURES = ("Llama4ForCausalLM", "Llama4ForConditionalGeneration")
INDEX_FILE = "model.safetensors.index.json"
SINGLE_FILE = "model.safetensors"
_NON_TEXT_PREFIXES = ("vision_model.", "multi_modal_projector.")


class HFTensors:
  """All tensors of a Hugging Face safetensors checkpoint directory, opened lazily and validated."""

  def __init__(self, directory: str):
    self.directory = directory
    index = storage.join(directory, INDEX_FILE)
    self.files: dict[str, SafetensorsFile] = {}
    self.where: dict[str, str] = {}
    if storage.exists(index):
      try:
        weight_map = json.loads(storage.read_text(index))["weight_map"]
      except (json.JSONDecodeError, KeyError, TypeError) as e:
        raise CheckpointError(f"{index} is not a valid safetensors index ({e!r})") from None
      for name in sorted(set(weight_map.values())):
        file = storage.join(directory, name)
        if not storage.exists(file):
          raise CheckpointError(f"shard {name} is named in {index} but missing from {directory}")
        self.files[name] = SafetensorsFile(file)
      for key, name in weight_map.items():
        if key not in self.files[name]:
          raise CheckpointError(f"{index} places tensor {key!r} in {name}, which does not contain it")
        self.where[key] = name
    elif storage.exists(storage.join(directory, SINGLE_FILE)):
      self.files[SINGLE_FILE] = SafetensorsFile(storage.join(directory, SINGLE_FILE))
      self.where = {k: SINGLE_FILE for k in self.files[SINGLE_FILE].keys()}
    else:
      raise CheckpointError(f"no {SINGLE_FILE} or {INDEX_FILE} in {directory}: not a Hugging Face "
                            "safetensors checkpoint")

  def keys(self):
    return self.where.keys()

  def file_of(self, key: str) -> str:
    return storage.join(self.directory, self.where[key])

  def shape(self, key: str) -> tuple[int, ...]:
    return self.files[self.where[key]].shape(key)

  def dtype(self, key: str) -> np.dtype:
    return self.files[self.where[key]].dtype(key)

  def __getitem__(self, key: str) -> np.ndarray:
    """The tensor memory-mapped (nothing is read until indexed)."""
    return self.files[self.where[key]][key]

  def read(self, key: str, index: tuple[slice, ...] = ()) -> np.ndarray:
    """A fresh copy of `self[key][index]` (slices of step 1), read with positioned reads."""
    return self.files[self.where[key]].read(key, index)


def text_prefix(keys) -> str:
  """'' for Llama4ForCausalLM, 'language_model.' for Llama4ForConditionalGeneration checkpoints."""
  for key in keys:
    if key.endswith("model.embed_tokens.weight"):
      return key[: -len("model.embed_tokens.weight")]
  raise CheckpointError("no '*model.embed_tokens.weight' tensor: not a Llama 4 text checkpoint")


def _check_architecture(hf: dict, directory: str) -> None:
  archs = hf.get("architectures") or []
  if archs and not any(a in ARCHITECTURES for a in archs):
    raise ValueError(f"{directory}: architecture {archs} is not supported; expected one of "
                     f"{ARCHITECTURES}")
  if hf.get("model_type") not in ("llama4", "llama4_text"):
    raise ValueError(f"{directory}: model_type {hf.get('model_type')!r} is not Llama 4 "
                     "('llama4' or 'llama4_text')")


def _normalize_index(idx, shape) -> tuple[slice, ...]:
  return tuple(slice(*s.indices(n)[:2]) for s, n in zip(idx, shape))


def _read_param(tensors: HFTensors, prefix: str, p: ParamPlan, idx: tuple[slice, ...], dtype):
  """The slice `idx` of our parameter `p`, read from the HF tensors (only the rows it needs)."""
  idx = _normalize_index(idx, p.shape)
  unit_idx = idx[1:] if p.stacked else idx
  keys = p.hf_keys[idx[0]] if p.stacked else p.hf_keys

  def one(key):
    return np.asarray(p.layout.read(lambda i: tensors.read(prefix + key, i), p.unit_shape,
                                    unit_idx)).astype(dtype, copy=False)

  parts = [one(k) for k in keys]
  return np.stack(parts) if p.stacked else parts[0]


def load_hf_model(directory: str, mesh: Mesh | None, overrides: dict) -> Llama4:
  """The Hugging Face checkpoint in `directory` as a `Llama4` on `mesh`, each device reading its slices.

  With `base_quant` ("int8" / "nf4") in `overrides` the linear weights are quantized as they load, one
  tensor at a time (`build_quantized`): the unquantized model is never resident whole."""
  hf = read_hf_config(directory)
  _check_architecture(hf, directory)
  cfg = from_hf_config(hf, **overrides)
  tensors = HFTensors(directory)
  prefix = text_prefix(tensors.keys())
  plain_cfg = cfg.replace(base_quant="none")
  graphdef, abstract_state, shardings = model_shardings(plain_cfg, mesh)
  plans = plan(nnx.merge(graphdef, abstract_state))
  _check_tensors(tensors, prefix, plans)
  by_path = {p.path: p for p in plans}
  param_dtype = np.dtype(jnp.dtype(cfg.param_dtype))

  def read(path, abstract):
    p = by_path[path]
    return jax.make_array_from_callback(
        p.shape, abstract.sharding, lambda idx: _read_param(tensors, prefix, p, idx, param_dtype))

  if cfg.base_quant != "none":
    return build_quantized(cfg, mesh, read, f"loading {directory} into {cfg.base_quant}")
  sharding_of = sharding_table(shardings)
  total = sum(int(np.prod(p.shape)) for p in plans) * param_dtype.itemsize
  loading = bar(total, f"loading {directory}", unit="B")

  def build(path, var):
    path = state_path(path)
    arr = read(path, jax.ShapeDtypeStruct(var.shape, var.dtype, sharding=sharding_of[path]))
    loading.update(arr.size * param_dtype.itemsize)
    return var.replace(arr)

  with loading:
    state = jax.tree_util.tree_map_with_path(build, abstract_state,
                                             is_leaf=lambda x: isinstance(x, nnx.Variable))
  return nnx.merge(graphdef, state)


def _check_tensors(tensors: HFTensors, prefix: str, plans: list[ParamPlan]) -> None:
  expected = hf_tensor_specs(plans)
  for key, shape in expected.items():
    full = prefix + key
    if full not in tensors.where:
      raise CheckpointError(f"tensor {full!r} is missing from the checkpoint in {tensors.directory} "
                            "(does config.json match the weights?)")
    found = tensors.shape(full)
    if tuple(found) != tuple(shape):
      raise CheckpointError(f"tensor {full!r} in {tensors.file_of(full)} has shape {tuple(found)}, "
                            f"but the config implies {tuple(shape)}")
  known = {prefix + k for k in expected}
  for key in tensors.keys():
    if key in known or (prefix and not key.startswith(prefix)) or key.startswith(_NON_TEXT_PREFIXES):
      continue
    raise CheckpointError(f"unexpected tensor {key!r} in {tensors.file_of(key)}: the config does not "
                          "describe it (wrong num_hidden_layers or layer pattern?)")


# ------------------------------------------------------------------------------------------------
# Saving

def _parse_size(size: int | str) -> int:
  if isinstance(size, int):
    return size
  m = re.fullmatch(r"\s*(\d+(?:\.\d+)?)\s*([KMG]i?B|B)?\s*", size, re.IGNORECASE)
  if not m:
    raise ValueError(f"cannot parse size {size!r}; use e.g. '5GB' or '500MB'")
  unit = (m.group(2) or "B").upper()
  mult = {"B": 1, "KB": 10**3, "MB": 10**6, "GB": 10**9, "KIB": 2**10, "MIB": 2**20, "GIB": 2**30}[unit]
  return int(float(m.group(1)) * mult)


def checkpoint_order(key: str):
  """Sort key of HF tensor names in the order checkpoints are written: embeddings, then layer by layer,
  then the rest. Converted checkpoints store their slices in this order too, so export reads them in
  sequence."""
  m = re.match(r"model\.layers\.(\d+)\.(.*)", key)
  return (1, int(m.group(1)), m.group(2)) if m else (0 if "embed" in key else 2, 0, key)


def _gather(x: jax.Array) -> np.ndarray:
  if x.is_fully_addressable:
    return np.asarray(x)
  from jax.experimental import multihost_utils
  return np.asarray(multihost_utils.process_allgather(x, tiled=True))


def hf_tensor_producer(plans: list[ParamPlan], get_slice, out_dtype, prefix: str = ""):
  """(specs, produce): `prefix` + HF key -> (shape, dtype) in checkpoint order, and produce(key) -> that
  HF tensor, assembled through the key table from `get_slice(plan, i)` (our layout; stack index i, which
  is 0 for an unstacked parameter). Each call touches only the slices one HF tensor needs."""
  out_dtype = np.dtype(out_dtype)
  sources: dict[str, list] = {}
  for p in plans:
    for i, key in enumerate(p.hf_keys):
      sources.setdefault(key, []).append((p, i))
  specs = {prefix + k: (shape, out_dtype) for k, shape in sorted(
      hf_tensor_specs(plans).items(), key=lambda kv: checkpoint_order(kv[0]))}

  def produce(key: str) -> np.ndarray:
    parts = [p.layout.to_hf(np.asarray(get_slice(p, i)).astype(out_dtype, copy=False))
             for p, i in sorted(sources[key[len(prefix):]], key=lambda s: s[0].layout.fused_part or 0)]
    return contiguous(parts[0]) if len(parts) == 1 else np.concatenate(parts, axis=-1)

  return specs, produce


def save_pretrained(model: Llama4, out_dir: str | os.PathLike, max_shard_size: int | str = "5GB",
                    dtype=None, overwrite: bool = False) -> str:
  """Writes `model` as a Hugging Face `Llama4ForCausalLM` checkpoint directory; returns its path.

  Sharded safetensors (`max_shard_size`) with `model.safetensors.index.json` (or one `model.safetensors`),
  config.json and generation_config.json. Written into a temporary sibling and renamed at the end, so a
  crash never leaves a partial directory. Multi-host: every process must call it; process 0 writes.
  """
  if model.config.lora_rank or model.config.base_quant != "none":
    raise ValueError("the model has LoRA adapters or an int8 base, which Hugging Face Llama 4 weights "
                     "cannot hold: save `llama4_jax.merge_lora(model)` (adapters folded in), or the "
                     "adapters alone with `save_adapters` / `save_peft`")
  leaves = state_leaves(model)
  specs, produce = hf_tensor_producer(
      plan(model), lambda p, i: _gather(leaves[p.path][i] if p.stacked else leaves[p.path]),
      jnp.dtype(dtype or model.config.param_dtype))
  writer = jax.process_index() == 0
  with storage.atomic_directory(out_dir, overwrite, enabled=writer) as tmp:
    write_sharded(tmp, specs, produce, max_shard_size, writer=writer)
    if writer:
      cfg = model.config
      hf_cfg = to_hf_config(cfg)
      if dtype is not None:
        hf_cfg["dtype"] = jnp.dtype(dtype).name
      write_json(storage.join(tmp, "config.json"), hf_cfg)
      write_json(storage.join(tmp, "generation_config.json"), generation_config(cfg))
  return storage.check(os.fspath(out_dir))


def write_sharded(directory: str, specs: dict, produce, max_shard_size: int | str = "5GB",
                  writer: bool = True, on_tensor=None) -> int:
  """Writes tensors `specs` (key -> (shape, dtype), in order) as `model.safetensors` or as shards of at
  most `max_shard_size` with an index. `produce(key)` supplies each tensor when its turn comes (all
  processes call it; only the writer writes). `on_tensor(key, nbytes)` reports progress. Returns bytes."""
  limit = _parse_size(max_shard_size)
  shards: list[dict] = [{}]
  size = 0
  for key, (shape, dt) in specs.items():
    nbytes = int(np.prod(shape)) * np.dtype(dt).itemsize
    if shards[-1] and size + nbytes > limit:
      shards.append({})
      size = 0
    shards[-1][key] = (shape, dt)
    size += nbytes
  names = ([SINGLE_FILE] if len(shards) == 1 else
           [f"model-{i + 1:05d}-of-{len(shards):05d}.safetensors" for i in range(len(shards))])

  def arrays(shard):
    for k in shard:
      x = produce(k)
      if on_tensor is not None:
        on_tensor(k, x.nbytes)
      yield k, x

  total = 0
  for name, shard in zip(names, shards):
    if writer:
      total += write_safetensors(storage.join(directory, name), shard, arrays(shard), {"format": "pt"})
    else:
      for _ in arrays(shard):
        pass
  if writer and len(shards) > 1:
    index = {"metadata": {"total_size": total},
             "weight_map": {k: n for n, s in zip(names, shards) for k in s}}
    write_json(storage.join(directory, INDEX_FILE), index)
  return total


def generation_config(cfg: ModelConfig) -> dict[str, Any]:
  return {"bos_token_id": cfg.bos_token_id, "eos_token_id": list(cfg.eos_token_id),
          "pad_token_id": cfg.pad_token_id, "do_sample": False}


def write_json(path: str, obj) -> None:
  storage.write_text(path, json.dumps(obj, indent=2, sort_keys=True) + "\n")
