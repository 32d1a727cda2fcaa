"""Streaming conversion between Hugging Face safetensors checkpoints and this project's Orbax format.

The Orbax output is a checkpoint directory that `load_model`, the sampler and `--config.init_from` read:

    DST/checkpoints/0/config/metadata    {"model": ModelConfig fields} (as in training checkpoints)
    DST/checkpoints/0/tensors/           one Orbax item per parameter slice (one layer of a stacked
                                         weight), plus manifest.json (names, shapes, dtypes, HF prefix)
    DST/extra/model-extra.safetensors    tensors carried through unchanged (vision tower, projector)
    DST/hf_config.json                   the source config.json (rebuilds the same architecture on export)
    DST/generation_config.json, tokenizer files (copied)

Every tensor is read lazily (memory-mapped safetensors), converted through the key table of
`checkpoint/keys.py` (the same table `load_model` and `save_pretrained` use, in both directions) and
written before the next is read, so host memory holds about one tensor whatever the model size. Output is
written into a temporary sibling and renamed at the end: a failure leaves no partial DST.
"""

from __future__ import annotations

import dataclasses
import json
import os
import shutil
import sys
import time
from typing import Any

import jax.numpy as jnp
import numpy as np

from llama4_jax.checkpoint.hf import (HFTensors, _check_architecture, _check_tensors, atomic_directory,
                                      generation_config, hf_tensor_producer, text_prefix, write_json,
                                      write_sharded)
from llama4_jax.checkpoint.keys import ParamPlan, plan
from llama4_jax.checkpoint.orbax import MANIFEST, TENSORS, param_name, restore_slice, slice_item
from llama4_jax.checkpoint.safetensors_io import CheckpointError, write_safetensors
from llama4_jax.config import from_hf_config, read_hf_config, to_hf_config
from llama4_jax.model.transformer import abstract_model

EXTRA_FILE = os.path.join("extra", "model-extra.safetensors")
HF_CONFIG = "hf_config.json"
COPIED_FILES = ("generation_config.json", "tokenizer.json", "tokenizer_config.json",
                "special_tokens_map.json", "tokenizer.model", "chat_template.json", "chat_template.jinja",
                "LICENSE")
_CARRIED_PREFIXES = ("vision_model.", "multi_modal_projector.")


class Progress:
  """A one-line progress report on stderr: tensors, bytes and bytes/s; `summary()` at the end."""

  def __init__(self, what: str, total_bytes: int, total_tensors: int, enabled: bool = True):
    self.what, self.total, self.count = what, total_bytes, total_tensors
    self.done_bytes, self.done, self.start, self.enabled = 0, 0, time.perf_counter(), enabled
    self._last = 0.0

  def update(self, nbytes: int) -> None:
    self.done_bytes += int(nbytes)
    self.done += 1
    now = time.perf_counter()
    if self.enabled and (now - self._last > 0.5 or self.done == self.count):
      self._last = now
      rate = self.done_bytes / max(now - self.start, 1e-9)
      sys.stderr.write(f"\r[{self.what}] {self.done}/{self.count} tensors  {_gb(self.done_bytes)}/"
                       f"{_gb(self.total)} GB  {rate / 1e6:,.0f} MB/s ")
      sys.stderr.flush()

  def summary(self, **extra) -> dict[str, Any]:
    seconds = time.perf_counter() - self.start
    if self.enabled:
      sys.stderr.write("\n")
    return {"what": self.what, "tensors": self.done, "bytes": self.done_bytes,
            "seconds": round(seconds, 2), "bytes_per_sec": round(self.done_bytes / max(seconds, 1e-9)),
            **extra}


def _gb(n: int) -> str:
  return f"{n / 1e9:.2f}"


def _slice_name(p: ParamPlan, i: int) -> str:
  return slice_item(param_name(p.path), i if p.stacked else None)


def _dtype(name) -> np.dtype:
  return np.dtype(jnp.dtype(name))


def _copy_side_files(src: str, dst: str) -> list[str]:
  copied = []
  for name in COPIED_FILES:
    if os.path.isfile(os.path.join(src, name)):
      shutil.copy2(os.path.join(src, name), os.path.join(dst, name))
      copied.append(name)
  return copied


# ------------------------------------------------------------------------------------------------
# Hugging Face -> Orbax

def hf_to_orbax(src: str, dst: str, dtype=None, overwrite: bool = False, progress: bool = True) -> dict:
  """Converts the Hugging Face checkpoint directory `src` into this project's Orbax format at `dst`.

  dtype: store parameters in this dtype (default: keep each tensor's source dtype). The vision tower and
  projector of a `Llama4ForConditionalGeneration` checkpoint are carried through unchanged. Returns a
  summary dict (tensors, bytes, seconds, bytes/s).
  """
  src = os.fspath(src)
  hf = read_hf_config(src)
  _check_architecture(hf, src)
  tensors = HFTensors(src)
  prefix = text_prefix(tensors.keys())
  source_dtype = tensors[prefix + "model.embed_tokens.weight"].dtype  # a memory map: nothing is read
  out_dtype = _dtype(dtype) if dtype is not None else source_dtype
  cfg = from_hf_config(hf, param_dtype=out_dtype.name, dtype=out_dtype.name)
  return _write_orbax("hf-to-orbax", tensors, prefix, cfg, hf, src, dst, source_dtype, dtype is not None,
                      overwrite, progress)


def meta_to_orbax(src: str, dst: str, dtype=None, overwrite: bool = False, progress: bool = True) -> dict:
  """Converts Meta's original checkpoint (params.json + consolidated.NN.pth model-parallel shards, read
  with `torch.load(weights_only=True, mmap=True)`) into this project's Orbax format at `dst`."""
  from llama4_jax.checkpoint.meta import MetaTensors
  src = os.fspath(src)
  tensors = MetaTensors(src)
  out_dtype = _dtype(dtype) if dtype is not None else tensors.dtype
  cfg = tensors.config(param_dtype=out_dtype.name, dtype=out_dtype.name)
  return _write_orbax("meta-to-orbax", tensors, "", cfg, to_hf_config(cfg), src, dst, tensors.dtype,
                      dtype is not None, overwrite, progress)


def _write_orbax(what, tensors, prefix, cfg, hf, src, dst, source_dtype, cast, overwrite, progress) -> dict:
  """The Orbax side of both importers: `tensors` answers HF keys (keys, shape, [key], file_of); every
  parameter is stored in `cfg.param_dtype`, and tensors of another dtype than `source_dtype` are an error
  unless the user asked to `cast`."""
  out_dtype = _dtype(cfg.param_dtype)
  plans = plan(abstract_model(cfg))
  _check_tensors(tensors, prefix, plans)  # missing, unexpected and mis-shaped tensors, before writing
  carried = [k for k in tensors.keys() if k.startswith(_CARRIED_PREFIXES)]
  units = sum(len(p.hf_keys) for p in plans)
  total = sum(int(np.prod(p.unit_shape)) * len(p.hf_keys) * out_dtype.itemsize for p in plans)
  total += sum(int(np.prod(tensors.shape(k))) * tensors[k].dtype.itemsize for k in carried)
  report = Progress(what, total, units + len(carried), progress)
  writers = _WriterPool()
  with atomic_directory(dst, overwrite) as tmp:
    step_dir = os.path.join(tmp, "checkpoints", "0")
    tensor_dir = os.path.join(step_dir, TENSORS)
    os.makedirs(tensor_dir)
    manifest: dict[str, Any] = {"format": 1, "text_prefix": prefix, "params": {}}
    for p in plans:
      full = tuple(slice(0, n) for n in p.unit_shape)
      for i, key in enumerate(p.hf_keys):
        source = tensors[prefix + key]
        if source.dtype != source_dtype and not cast:
          raise CheckpointError(f"tensor {prefix + key!r} in {tensors.file_of(prefix + key)} is "
                                f"{source.dtype}, the rest {source_dtype}; pass --dtype to convert all")
        x = np.asarray(p.layout.read(lambda idx: source[idx], p.unit_shape, full)).astype(out_dtype)
        writers.save(os.path.join(tensor_dir, _slice_name(p, i)), x)
        report.update(x.nbytes)

      manifest["params"][param_name(p.path)] = {
          "shape": list(p.shape), "dtype": out_dtype.name, "stacked": p.stacked}
    writers.close()
    write_json(os.path.join(tensor_dir, MANIFEST), manifest)
    os.makedirs(os.path.join(step_dir, "config"))
    write_json(os.path.join(step_dir, "config", "metadata"), {"model": dataclasses.asdict(cfg)})
    if carried:
      os.makedirs(os.path.join(tmp, "extra"))
      specs = {k: (tensors.shape(k), tensors[k].dtype) for k in carried}

      def carry(k):
        x = tensors[k]
        report.update(x.nbytes)
        return x

      write_safetensors(os.path.join(tmp, EXTRA_FILE), specs, carry, {"format": "pt"})
    write_json(os.path.join(tmp, HF_CONFIG), hf)
    copied = _copy_side_files(src, tmp)
  return report.summary(src=src, dst=os.path.abspath(dst), dtype=out_dtype.name,
                        carried_tensors=len(carried), copied_files=copied)


class _Prefetch:
  """`produce(key)` for keys asked in `order`, computed `depth` keys ahead on a thread (restoring overlaps
  writing); at most depth + 1 tensors are in memory."""

  def __init__(self, produce, order: list[str], depth: int = 2):
    from concurrent.futures import ThreadPoolExecutor
    self._produce, self._order, self._depth = produce, order, depth
    self._pool = ThreadPoolExecutor(max_workers=1)
    self._futures: dict = {}
    self._next = 0

  def __call__(self, key: str):
    while self._next < len(self._order) and len(self._futures) <= self._depth:
      k = self._order[self._next]
      self._futures[k] = self._pool.submit(self._produce, k)
      self._next += 1
    future = self._futures.pop(key, None)
    return future.result() if future is not None else self._produce(key)

  def __enter__(self):
    return self

  def __exit__(self, *exc):
    self._pool.shutdown(wait=True, cancel_futures=True)


class _WriterPool:
  """Orbax saves of single arrays, `width` in flight at once (each save is mostly waiting on I/O), so
  at most `width` tensors are held in memory."""

  def __init__(self, width: int = 4):
    import orbax.checkpoint as ocp
    self._ocp = ocp
    self._writers = [ocp.AsyncCheckpointer(ocp.PyTreeCheckpointHandler()) for _ in range(width)]
    self._next = 0

  def save(self, path: str, array: np.ndarray) -> None:
    writer = self._writers[self._next]
    self._next = (self._next + 1) % len(self._writers)
    writer.wait_until_finished()  # frees the array that writer held
    writer.save(path, args=self._ocp.args.PyTreeSave({"value": array}))

  def close(self) -> None:
    for writer in self._writers:
      writer.wait_until_finished()
      writer.close()


# ------------------------------------------------------------------------------------------------
# Reading the Orbax format (converted or training checkpoints), one slice at a time

class OrbaxSlices:
  """Parameter slices of a checkpoint of this project: `get(plan, i)` -> numpy array of one slice.

  Converted checkpoints store one Orbax item per slice; training checkpoints store stacked leaves in
  the `state` item, restored here one leaf at a time (so a stacked weight is in memory at once).
  """

  def __init__(self, directory: str):
    from llama4_jax.checkpoint import orbax as orbax_io
    self.ckpt_dir = orbax_io.find_checkpoints(directory)
    self.step = orbax_io.checkpoint_steps(self.ckpt_dir)[-1]
    self.config, _ = orbax_io.read_model_config(directory)
    self.step_dir = os.path.join(self.ckpt_dir, str(self.step))
    self.tensor_dir = os.path.join(self.step_dir, TENSORS)
    self.converted = os.path.isdir(self.tensor_dir)
    self.manifest = {"text_prefix": ""}
    if self.converted:
      with open(os.path.join(self.tensor_dir, MANIFEST)) as f:
        self.manifest = json.load(f)
    self._leaf: tuple[tuple, np.ndarray] | None = None

  def get(self, p: ParamPlan, i: int) -> np.ndarray:
    import orbax.checkpoint as ocp
    if self.converted:
      return restore_slice(self.tensor_dir, _slice_name(p, i), ocp.RestoreArgs(restore_type=np.ndarray))
    if self._leaf is None or self._leaf[0] != p.path:
      self._leaf = (p.path, self._restore_leaf(p))
    leaf = self._leaf[1]
    return leaf[i] if p.stacked else leaf

  def _restore_leaf(self, p: ParamPlan) -> np.ndarray:
    import orbax.checkpoint as ocp
    tree: dict = {}
    node = tree
    for k in p.path[:-1]:
      node = node.setdefault(k if isinstance(k, str) else int(k), {})
    node[p.path[-1]] = 0
    target = {"params": tree}
    args = __import__("jax").tree.map(lambda _: ocp.RestoreArgs(restore_type=np.ndarray), target)
    with ocp.CheckpointManager(os.path.abspath(self.ckpt_dir)) as manager:
      restored = manager.restore(self.step, args=ocp.args.Composite(state=ocp.args.PyTreeRestore(
          item=target, restore_args=args, partial_restore=True)))
    node = restored["state"]["params"]
    for k in p.path:
      node = node[k if isinstance(k, str) else int(k)]
    return np.asarray(node)


# ------------------------------------------------------------------------------------------------
# Orbax -> Hugging Face

def orbax_to_hf(src: str, dst: str, max_shard_size: int | str = "5GB", dtype=None,
                overwrite: bool = False, progress: bool = True) -> dict:
  """Writes the Orbax checkpoint `src` (converted, or a training workdir) as a Hugging Face checkpoint.

  The architecture of the original (CausalLM or ConditionalGeneration, with its vision weights) is
  rebuilt when `src` was converted from Hugging Face; otherwise `Llama4ForCausalLM`. Sharded safetensors
  of at most `max_shard_size` with an index, config.json, generation_config.json and tokenizer files.
  """
  src = os.fspath(src)
  slices = OrbaxSlices(src)
  cfg = slices.config
  if cfg.lora_rank or cfg.base_quant != "none":
    raise ValueError(f"{src} is a LoRA fine-tune (adapters on a frozen base): pass --merge-lora to "
                     "write the base with the adapters folded in, or use export-lora for the adapters")
  plans = plan(abstract_model(cfg))
  prefix = slices.manifest.get("text_prefix", "")
  hf_cfg_path = os.path.join(src, HF_CONFIG)
  hf_cfg = read_hf_config(hf_cfg_path) if os.path.isfile(hf_cfg_path) else to_hf_config(cfg)
  out_dtype = _dtype(dtype if dtype is not None else cfg.param_dtype)

  def get_slice(p: ParamPlan, i: int) -> np.ndarray:
    x = slices.get(p, i)
    if tuple(x.shape) != tuple(p.unit_shape):
      raise CheckpointError(f"{src}: parameter {_slice_name(p, i)} has shape {tuple(x.shape)}, the "
                            f"config implies {tuple(p.unit_shape)}")
    return x

  specs, produce_text = hf_tensor_producer(plans, get_slice, out_dtype, prefix)
  extra = None
  if os.path.isfile(os.path.join(src, EXTRA_FILE)):
    from llama4_jax.checkpoint.safetensors_io import SafetensorsFile
    extra = SafetensorsFile(os.path.join(src, EXTRA_FILE))
    for k in extra.keys():
      specs[k] = (extra.shape(k), extra.dtype(k))

  def produce(key: str) -> np.ndarray:
    if extra is not None and key in extra:
      return np.asarray(extra[key])
    return produce_text(key)

  total = sum(int(np.prod(s)) * np.dtype(d).itemsize for s, d in specs.values())
  report = Progress("orbax-to-hf", total, len(specs), progress)
  with atomic_directory(dst, overwrite) as tmp, _Prefetch(produce, list(specs)) as ahead:
    write_sharded(tmp, specs, ahead, max_shard_size, on_tensor=lambda k, n: report.update(n))
    hf_cfg = dict(hf_cfg)
    if "text_config" in hf_cfg:
      hf_cfg["text_config"] = dict(hf_cfg["text_config"], dtype=out_dtype.name)
    hf_cfg["dtype"] = out_dtype.name
    hf_cfg.pop("torch_dtype", None)
    write_json(os.path.join(tmp, "config.json"), hf_cfg)
    copied = _copy_side_files(src, tmp)
    if "generation_config.json" not in copied:
      write_json(os.path.join(tmp, "generation_config.json"), generation_config(cfg))
  return report.summary(src=src, dst=os.path.abspath(dst), dtype=out_dtype.name, copied_files=copied)
