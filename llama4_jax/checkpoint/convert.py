"""Streaming conversion between Hugging Face safetensors checkpoints and this project's Orbax format.

The Orbax output is a checkpoint directory that `load_model`, the sampler and `--config.init_from` read:

    DST/checkpoints/0/config/metadata    {"model": ModelConfig fields} (as in training checkpoints)
    DST/checkpoints/0/tensors/           parameter slices (one layer of a stacked weight) gathered into
                                         Orbax items of ~64 MB, plus manifest.json (names, shapes,
                                         dtypes, the item and key of each slice, HF prefix)
    DST/extra/model-extra.safetensors    tensors carried through unchanged (vision tower, projector)
    DST/hf_config.json                   the source config.json (rebuilds the same architecture on export)
    DST/generation_config.json, tokenizer files (copied)

Every tensor is read when its turn comes (positioned reads of its bytes), converted through the key table
of `checkpoint/keys.py` (the same table `load_model` and `save_pretrained` use, in both directions) and
handed to an asynchronous writer that holds at most a few items, so host memory is bounded by a few
tensors whatever the model size. Items are uncompressed unless `compress=True` (zstd saves about 25% of
the disk for bf16 weights, at the cost of compressing every byte on the host's cores). Output is written
into a temporary sibling and renamed at the end: a failure leaves no partial DST. Either side may be in
Cloud Storage (gs://) except a Meta source (torch memory-maps its .pth shards): a Hugging Face source there
is read with one ranged GET per slice, as a local one is with positioned reads; in a bucket the temporary
prefix's objects are moved into place when all are written, the files readers wait for (the step's commit
marker, config.json) last, and safetensors are streamed out with resumable uploads (memory stays flat as
on disk).
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import os
import time
import warnings
from typing import Any

import jax.numpy as jnp
import numpy as np

from llama4_jax import storage
from llama4_jax.progress import bar
from llama4_jax.checkpoint.hf import (HFTensors, _check_architecture, _check_tensors,
                                      checkpoint_order, generation_config, hf_tensor_producer,
                                      text_prefix, write_json, write_sharded)
from llama4_jax.checkpoint.keys import ParamPlan, plan
from llama4_jax.checkpoint.meta import MetaTensors
from llama4_jax.checkpoint.orbax import (COMMIT_MARKER, FORMAT, MANIFEST, TENSORS, StateLeaves,
                                        checkpoint_steps, find_checkpoints, param_name, read_manifest,
                                        read_model_config, slice_item, slice_path)
from llama4_jax.checkpoint.safetensors_io import (CheckpointError, SafetensorsFile, contiguous,
                                                  write_safetensors)
from llama4_jax.config import from_hf_config, read_hf_config, to_hf_config
from llama4_jax.model.transformer import abstract_model

EXTRA_FILE = "extra/model-extra.safetensors"
HF_CONFIG = "hf_config.json"
COPIED_FILES = ("generation_config.json", "tokenizer.json", "tokenizer_config.json",
                "special_tokens_map.json", "tokenizer.model", "chat_template.json", "chat_template.jinja",
                "LICENSE")
_CARRIED_PREFIXES = ("vision_model.", "multi_modal_projector.")
GROUP_BYTES = 64 << 20  # slices are gathered into Orbax items of about this size


class Progress:
  """A progress bar on stderr (bytes, tensors, rate and time left); `summary()` at the end. `enabled`:
  True (conversions' default) shows it even when stderr is not a terminal, None only on a terminal."""

  def __init__(self, what: str, total_bytes: int, total_tensors: int, enabled: bool | None = True):
    self.what, self.total, self.count = what, total_bytes, total_tensors
    self.done_bytes, self.done, self.start = 0, 0, time.perf_counter()
    self._bar = bar(total_bytes, what, unit="B", enabled=enabled, mininterval=0.5, leave=True)

  def update(self, nbytes: int) -> None:
    self.done_bytes += int(nbytes)
    self.done += 1
    self._bar.set_postfix_str(f"{self.done}/{self.count} tensors", refresh=False)
    self._bar.update(int(nbytes))

  def summary(self, **extra) -> dict[str, Any]:
    seconds = time.perf_counter() - self.start
    self._bar.close()
    return {"what": self.what, "tensors": self.done, "bytes": self.done_bytes,
            "seconds": round(seconds, 2), "bytes_per_sec": round(self.done_bytes / max(seconds, 1e-9)),
            **extra}


def _slice_name(p: ParamPlan, i: int) -> str:
  return slice_item(param_name(p.path), i if p.stacked else None)


def _dtype(name) -> np.dtype:
  return np.dtype(jnp.dtype(name))


def _copy_side_files(src: str, dst: str) -> list[str]:
  copied = []
  for name in COPIED_FILES:
    if storage.exists(storage.join(src, name)):
      storage.copy(storage.join(src, name), storage.join(dst, name))
      copied.append(name)
  return copied


# ------------------------------------------------------------------------------------------------
# Hugging Face -> Orbax

def hf_to_orbax(src: str, dst: str, dtype=None, overwrite: bool = False, progress: bool = True,
                compress: bool = False) -> dict:
  """Converts the Hugging Face checkpoint directory `src` into this project's Orbax format at `dst`.

  dtype: store parameters in this dtype (default: keep each tensor's source dtype). The vision tower and
  projector of a `Llama4ForConditionalGeneration` checkpoint are carried through unchanged. Returns a
  summary dict (tensors, bytes, seconds, bytes/s).
  """
  src = storage.check(os.fspath(src), "source")
  hf = read_hf_config(src)
  _check_architecture(hf, src)
  tensors = HFTensors(src)
  prefix = text_prefix(tensors.keys())
  source_dtype = tensors.dtype(prefix + "model.embed_tokens.weight")
  out_dtype = _dtype(dtype) if dtype is not None else source_dtype
  cfg = from_hf_config(hf, param_dtype=out_dtype.name, dtype=out_dtype.name)
  return _write_orbax("hf-to-orbax", tensors, prefix, cfg, hf, src, dst, source_dtype, dtype is not None,
                      overwrite, progress, compress)


def meta_to_orbax(src: str, dst: str, dtype=None, overwrite: bool = False, progress: bool = True,
                  compress: bool = False) -> dict:
  """Converts Meta's original checkpoint (params.json + consolidated.NN.pth model-parallel shards, read
  with `torch.load(weights_only=True, mmap=True)`) into this project's Orbax format at `dst`."""
  src = storage.check(os.fspath(src), "source")
  if storage.is_remote(src):  # torch.load(mmap=True) needs a file, and every rank's shard at once
    raise ValueError(f"{src}: meta-to-orbax reads Meta's .pth shards from local disk (torch memory-maps "
                     "them; gcloud storage cp -r the directory there first); the output may be gs://")
  tensors = MetaTensors(src)
  out_dtype = _dtype(dtype) if dtype is not None else tensors.source_dtype
  cfg = tensors.config(param_dtype=out_dtype.name, dtype=out_dtype.name)
  return _write_orbax("meta-to-orbax", tensors, "", cfg, to_hf_config(cfg), src, dst, tensors.source_dtype,
                      dtype is not None, overwrite, progress, compress)


def _write_orbax(what, tensors, prefix, cfg, hf, src, dst, source_dtype, cast, overwrite, progress,
                 compress) -> dict:
  """The Orbax side of both importers: `tensors` answers HF keys (keys, shape, [key], read, file_of); every
  parameter is stored in `cfg.param_dtype`, and tensors of another dtype than `source_dtype` are an error
  unless the user asked to `cast`."""
  out_dtype = _dtype(cfg.param_dtype)
  plans = plan(abstract_model(cfg))
  _check_tensors(tensors, prefix, plans)  # missing, unexpected and mis-shaped tensors, before writing
  carried = [k for k in tensors.keys() if k.startswith(_CARRIED_PREFIXES)]
  units = sum(len(p.hf_keys) for p in plans)
  total = sum(int(np.prod(p.unit_shape)) * len(p.hf_keys) * out_dtype.itemsize for p in plans)
  total += sum(int(np.prod(tensors.shape(k))) * tensors.dtype(k).itemsize for k in carried)
  report = Progress(what, total, units + len(carried), progress)
  with storage.atomic_directory(dst, overwrite) as tmp:
    step_dir = storage.join(tmp, "checkpoints", "0")
    tensor_dir = storage.join(step_dir, TENSORS)
    storage.makedirs(tensor_dir)
    manifest: dict[str, Any] = {"format": FORMAT, "text_prefix": prefix}
    order = sorted(((p, i) for p in plans for i in range(len(p.hf_keys))),
                   key=lambda u: (checkpoint_order(u[0].hf_keys[u[1]]), u[0].layout.fused_part or 0))
    with _GroupWriter(tensor_dir, compress, GROUP_BYTES) as writer:
      for p, i in order:  # the source's order: sequential reads, and the order export asks for them
        key = prefix + p.hf_keys[i]
        if tensors.dtype(key) != source_dtype and not cast:
          raise CheckpointError(f"tensor {key!r} in {tensors.file_of(key)} is {tensors.dtype(key)}, "
                                f"the rest {source_dtype}; pass --dtype to convert all")
        full = tuple(slice(0, n) for n in p.unit_shape)
        x = p.layout.read(lambda idx: tensors.read(key, idx), p.unit_shape, full)
        x = contiguous(x.astype(out_dtype, copy=False))
        writer.add(_slice_name(p, i), x)
        report.update(x.nbytes)
    manifest["params"] = {param_name(p.path): {"shape": list(p.shape), "dtype": out_dtype.name,
                                               "stacked": p.stacked} for p in plans}
    manifest["slices"] = writer.slices
    write_json(storage.join(tensor_dir, MANIFEST), manifest)
    storage.makedirs(storage.join(step_dir, "config"))
    write_json(storage.join(step_dir, "config", "metadata"), {"model": dataclasses.asdict(cfg)})
    if carried:
      storage.makedirs(storage.join(tmp, "extra"))
      specs = {k: (tensors.shape(k), tensors.dtype(k)) for k in carried}

      def carry(k):
        x = tensors.read(k)
        report.update(x.nbytes)
        return x

      write_safetensors(storage.join(tmp, EXTRA_FILE), specs, carry, {"format": "pt"})
    write_json(storage.join(tmp, HF_CONFIG), hf)
    copied = _copy_side_files(src, tmp)
    storage.write_text(storage.join(step_dir, COMMIT_MARKER), "")  # the step is complete (read on gs://)
  return report.summary(src=src, dst=storage.check(dst), dtype=out_dtype.name,
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


class _GroupWriter:
  """Parameter slices gathered into Orbax items of about `group_bytes` (a slice that large is an item of
  its own), each saved asynchronously with at most `width` saves in flight: memory holds at most about
  (width + 1) x max(group_bytes, the largest slice). Gathering matters for the many small slices (norms,
  routers, k/v), where each item's own files and metadata cost more than the bytes. The arrays are
  handed over, not copied (Orbax's numpy handler would deep-copy each): callers must not change them.
  `slices` maps each slice name to its [item, key]."""

  def __init__(self, directory: str, compress: bool, group_bytes: int, width: int = 2):
    import jax
    import orbax.checkpoint as ocp
    handlers = ocp.type_handlers
    registry = handlers.create_type_handler_registry(
        (np.ndarray, handlers.NumpyHandler(deepcopy_host_arrays=False)),
        (jax.Array, handlers.ArrayHandler()))
    self._ocp, self._dir, self._group_bytes = ocp, directory, group_bytes
    self._savers = [ocp.AsyncCheckpointer(ocp.PyTreeCheckpointHandler(
        use_compression=compress, type_handler_registry=registry)) for _ in range(width)]
    self.slices: dict[str, list[str]] = {}
    self._group: dict[str, np.ndarray] = {}
    self._bytes = self._items = self._next = 0

  def add(self, name: str, array: np.ndarray) -> None:
    key = f"t{len(self._group)}"
    self._group[key] = array
    self.slices[name] = [f"group.{self._items:05d}", key]
    self._bytes += array.nbytes
    if self._bytes >= self._group_bytes:
      self._flush()

  def _flush(self) -> None:
    if not self._group:
      return
    saver = self._savers[self._next]
    self._next = (self._next + 1) % len(self._savers)
    saver.wait_until_finished()  # frees the item this saver held
    saver.save(storage.join(self._dir, f"group.{self._items:05d}"),
               args=self._ocp.args.PyTreeSave(self._group))
    self._group, self._bytes, self._items = {}, 0, self._items + 1

  def __enter__(self):
    return self

  def __exit__(self, exc_type, *exc):
    if exc_type is None:
      self._flush()
    for saver in self._savers:
      saver.wait_until_finished()
      saver.close()


# ------------------------------------------------------------------------------------------------
# Reading the Orbax format (converted or training checkpoints), one slice at a time

class OrbaxSlices:
  """Parameter slices of a checkpoint of this project: `get(plan, i)` -> numpy array of one slice.

  Converted checkpoints store slices gathered into Orbax items, read here in the order they were written:
  while one item is in use, the next one is restored on a thread (at most two items in memory). Training
  checkpoints store stacked leaves in the `state` item in chunks of one superblock: each slice is read
  alone (`StateLeaves`); in a training checkpoint written before that layout, each slice read decodes its
  whole stacked leaf.
  """

  def __init__(self, directory: str):
    self.ckpt_dir = find_checkpoints(directory)
    self.step = checkpoint_steps(self.ckpt_dir)[-1]
    self.config, _ = read_model_config(directory)
    self.step_dir = storage.join(self.ckpt_dir, str(self.step))
    self.tensor_dir = storage.join(self.step_dir, TENSORS)
    self.converted = storage.isdir(self.tensor_dir)
    self.manifest = {"text_prefix": ""}
    if self.converted:
      self.manifest = read_manifest(self.tensor_dir)
    self._leaves = None if self.converted else StateLeaves(storage.join(self.step_dir, "state"))
    self._warned = False
    self._group: tuple[str, dict] | None = None
    items = sorted({item for item, _ in self.manifest.get("slices", {}).values()})
    self._after = dict(zip(items, items[1:]))  # item -> the one written after it
    self._ahead: tuple[str, Any] | None = None  # (item directory, future of its restore)
    self._pool = None

  def get(self, p: ParamPlan, i: int) -> np.ndarray:
    if self.converted:  # slices are asked for in the order they were written: read an item at a time
      path, key = slice_path(self.tensor_dir, self.manifest, _slice_name(p, i))
      if self._group is None or self._group[0] != path:
        self._group = None  # free the last item before reading the next
        self._group = (path, self._restore_item(path))
      return self._group[1][key]
    path = ("params", *p.path)
    if p.stacked and not self._warned and not self._leaves.layer_chunked(path):
      self._warned = True
      warnings.warn(f"{self.step_dir} was written before training checkpoints stored a layer per chunk: "
                    "each layer read decodes its whole stacked weight (slow, and a whole stack in memory "
                    "while it lasts); resave it with this version to export it a layer at a time")
    return self._leaves.read(path, i if p.stacked else None)

  def _restore_item(self, path: str) -> dict:
    """The Orbax item at `path` (taken from the read-ahead if it is the one restored there), then starts
    restoring the item after it."""
    import orbax.checkpoint as ocp
    from concurrent.futures import ThreadPoolExecutor
    ahead, self._ahead = self._ahead, None
    group = ahead[1].result() if ahead is not None and ahead[0] == path else None
    if group is None:
      group = ocp.PyTreeCheckpointer().restore(path)
    following = self._after.get(storage.basename(path))
    if following is not None:
      self._pool = self._pool or ThreadPoolExecutor(max_workers=1, thread_name_prefix="orbax-read-ahead")
      nxt = storage.join(self.tensor_dir, following)
      self._ahead = (nxt, self._pool.submit(lambda: ocp.PyTreeCheckpointer().restore(nxt)))
    return group

  def close(self) -> None:
    """Waits for a read-ahead still running (so no thread outlives the conversion)."""
    self._ahead = None
    if self._pool is not None:
      self._pool.shutdown(wait=True, cancel_futures=True)


# ------------------------------------------------------------------------------------------------
# Orbax -> Hugging Face

def orbax_to_hf(src: str, dst: str, max_shard_size: int | str = "5GB", dtype=None,
                overwrite: bool = False, progress: bool = True) -> dict:
  """Writes the Orbax checkpoint `src` (converted, or a training workdir) as a Hugging Face checkpoint.

  The architecture of the original (CausalLM or ConditionalGeneration, with its vision weights) is
  rebuilt when `src` was converted from Hugging Face; otherwise `Llama4ForCausalLM`. Sharded safetensors
  of at most `max_shard_size` with an index, config.json, generation_config.json and tokenizer files.
  """
  src = storage.check(os.fspath(src), "source")
  slices = OrbaxSlices(src)
  cfg = slices.config
  if cfg.lora_rank or cfg.base_quant != "none":
    raise ValueError(f"{src} is a LoRA fine-tune (adapters on a frozen base): pass --merge-lora to "
                     "write the base with the adapters folded in, or use export-lora for the adapters")
  hf_cfg_path = storage.join(src, HF_CONFIG)
  hf_cfg = json.loads(storage.read_text(hf_cfg_path)) if storage.exists(hf_cfg_path) else None
  extra = storage.join(src, EXTRA_FILE)
  with contextlib.closing(slices):
    return write_hf("orbax-to-hf", cfg, slices.get, src, dst, hf_cfg=hf_cfg,
                    prefix=slices.manifest.get("text_prefix", ""),
                    extra_file=extra if storage.exists(extra) else None, max_shard_size=max_shard_size,
                    dtype=dtype, overwrite=overwrite, progress=progress)


def write_hf(what: str, cfg, get_slice, src: str, dst: str, hf_cfg: dict | None = None, prefix: str = "",
             extra_file: str | None = None, side_dirs: tuple[str, ...] = (),
             max_shard_size: int | str = "5GB", dtype=None, overwrite: bool = False,
             progress: bool = True) -> dict:
  """Writes a Hugging Face checkpoint at `dst` from the parameter slices `get_slice(plan, i)` (numpy, our
  layout; stack index i) of a model of config `cfg`, asked for in the HF checkpoint's order, a few ahead
  on a thread. `hf_cfg`: the config.json to write (default: `to_hf_config(cfg)`, a CausalLM); `prefix`
  and `extra_file`: the text weights' key prefix and the carried (vision) tensors of a
  ConditionalGeneration; tokenizer and generation config files are copied from `side_dirs` then `src`
  (later ones win). Written into a temporary sibling and renamed at the end."""
  plans = plan(abstract_model(cfg))
  hf_cfg = dict(hf_cfg) if hf_cfg is not None else to_hf_config(cfg)
  out_dtype = _dtype(dtype if dtype is not None else cfg.param_dtype)

  def checked(p: ParamPlan, i: int) -> np.ndarray:
    x = get_slice(p, i)
    if tuple(x.shape) != tuple(p.unit_shape):
      raise CheckpointError(f"{src}: parameter {_slice_name(p, i)} has shape {tuple(x.shape)}, the "
                            f"config implies {tuple(p.unit_shape)}")
    return x

  specs, produce_text = hf_tensor_producer(plans, checked, out_dtype, prefix)
  extra = None
  if extra_file is not None:
    extra = SafetensorsFile(extra_file)
    for k in extra.keys():
      specs[k] = (extra.shape(k), extra.dtype(k))

  def produce(key: str) -> np.ndarray:
    if extra is not None and key in extra:
      return np.asarray(extra[key])
    return produce_text(key)

  total = sum(int(np.prod(s)) * np.dtype(d).itemsize for s, d in specs.values())
  report = Progress(what, total, len(specs), progress)
  with storage.atomic_directory(dst, overwrite) as tmp, _Prefetch(produce, list(specs)) as ahead:
    write_sharded(tmp, specs, ahead, max_shard_size, on_tensor=lambda k, n: report.update(n))
    if "text_config" in hf_cfg:
      hf_cfg["text_config"] = dict(hf_cfg["text_config"], dtype=out_dtype.name)
    hf_cfg["dtype"] = out_dtype.name
    hf_cfg.pop("torch_dtype", None)
    write_json(storage.join(tmp, "config.json"), hf_cfg)
    copied = sorted({name for d in (*side_dirs, src) for name in _copy_side_files(d, tmp)})
    if "generation_config.json" not in copied:
      write_json(storage.join(tmp, "generation_config.json"), generation_config(cfg))
  return report.summary(src=src, dst=storage.check(dst), dtype=out_dtype.name, copied_files=copied)
