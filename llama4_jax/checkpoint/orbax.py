"""Reading this project's Orbax training checkpoints: steps, the stored ModelConfig, params alone.

Complete steps are plain numbered directories (Orbax writes into a temporary name and renames), so a save
cut off mid-write is never listed. `load_orbax_model` builds a `Llama4` from the latest step on any mesh.
"""

from __future__ import annotations

import dataclasses
import json
import os
from typing import Any

import jax
import orbax.checkpoint as ocp
from flax import nnx, traverse_util

from llama4_jax import storage
from llama4_jax.checkpoint.safetensors_io import CheckpointError
from llama4_jax.config import ModelConfig
from llama4_jax.model.adapters import ADAPTER_FIELDS, build_quantized
from llama4_jax.model.linear import is_adapter
from llama4_jax.model.paths import sharding_table, state_path
from llama4_jax.model.transformer import model_shardings
from llama4_jax.progress import bar

# Converted checkpoints (checkpoint/convert.py) keep params in <step>/tensors/ as parameter slices (one
# layer of a stacked weight, named by `slice_item`) gathered into Orbax items of about 64 MB, with a
# manifest of names, shapes, dtypes and where each slice lives.
TENSORS = "tensors"
MANIFEST = "manifest.json"
FORMAT = 2  # 1 (before 2026-11-29) had one item per slice


def param_name(path: tuple) -> str:
  """A parameter's name in the manifest: its state path joined by dots, e.g. 'blocks.0.attn.q'."""
  return ".".join(str(k) for k in path)


def slice_item(name: str, index: int | None) -> str:
  """Item of one slice: 'blocks.0.attn.q.3' (stack index 3), or the name of an unstacked parameter."""
  return name if index is None else f"{name}.{index}"


def read_manifest(tensor_dir: str) -> dict:
  """The manifest of a converted checkpoint's `tensors/` directory, checked for its format."""
  path = storage.join(tensor_dir, MANIFEST)
  try:
    manifest = json.loads(storage.read_text(path))
  except (OSError, json.JSONDecodeError) as e:
    raise CheckpointError(f"{path} cannot be read ({e}): the converted checkpoint is incomplete") from None
  if manifest.get("format") != FORMAT:
    raise CheckpointError(f"{path}: converted checkpoint format {manifest.get('format')}, this version "
                          f"reads format {FORMAT}; convert the source checkpoint again")
  return manifest


def slice_path(tensor_dir: str, manifest: dict, name: str) -> tuple[str, str]:
  """(directory of the Orbax item, key in it) of the slice `name`; an error if either is missing."""
  if name not in manifest["slices"]:
    raise CheckpointError(f"{tensor_dir}/{MANIFEST} does not list slice {name}")
  item, key = manifest["slices"][name]
  path = storage.join(tensor_dir, item)
  if not storage.isdir(path):
    raise CheckpointError(f"{path} (holding {name}) is missing: the converted checkpoint is incomplete")
  return path, key


def restore_slice(tensor_dir: str, manifest: dict, name: str, restore_arg) -> Any:
  """The slice `name` of a converted checkpoint, as `restore_arg` says (numpy, or a sharded jax.Array).
  Only that slice is read from its item."""
  path, key = slice_path(tensor_dir, manifest, name)
  return ocp.PyTreeCheckpointer().restore(path, args=ocp.args.PyTreeRestore(
      item={key: 0}, restore_args={key: restore_arg}, partial_restore=True))[key]


def _ts_error(e: Exception) -> str:
  """TensorStore's message without the spec it appends."""
  return str(e).split(" [tensorstore_spec=")[0]


class StateLeaves:
  """Leaves of a training checkpoint's `state` item, read straight from its TensorStore arrays: `read(path,
  index)` gives leaf[index] (or the whole leaf for index None) as numpy, reading only the chunks that hold
  it. Checkpoints written by `checkpoint.training` keep stacked leaves in chunks of one superblock, so one
  layer of a weight costs one layer's bytes; older ones (a chunk per device shard) are read whole.
  """

  def __init__(self, state_dir: str):
    self.dir = storage.check(state_dir, "checkpoint")
    try:
      meta = json.loads(storage.read_text(storage.join(self.dir, "_METADATA")))
    except (OSError, json.JSONDecodeError) as e:
      raise CheckpointError(f"{self.dir}/_METADATA cannot be read ({e}): the checkpoint is "
                            "incomplete") from None
    keys = [tuple(k["key"] for k in leaf["key_metadata"]) for leaf in meta["tree_metadata"].values()]
    self.names = {k: ".".join(k) for k in keys}  # Orbax names a leaf by its keys joined with dots
    self.ocdbt, self.zarr3 = meta.get("use_ocdbt", True), meta.get("use_zarr3", False)
    self._open: dict[tuple, Any] = {}  # path -> its TensorStore (a handle: no data is cached)

  def store(self, path: tuple):
    """The TensorStore of the leaf at `path` (keys below `state`, e.g. ('params', 'blocks', 0, ...))."""
    import tensorstore as ts

    path = tuple(str(k) for k in path)
    if path not in self._open:
      if path not in self.names:
        raise CheckpointError(f"{self.dir} has no leaf {'.'.join(path)}: the checkpoint was written for "
                              "another model (or is incomplete)")
      name = self.names[path]
      kvstore = ({"driver": "ocdbt", "base": storage.kvstore_url(self.dir), "path": name} if self.ocdbt
                 else storage.kvstore_url(storage.join(self.dir, name)))
      spec = {"driver": "zarr3" if self.zarr3 else "zarr", "kvstore": kvstore}
      try:
        self._open[path] = ts.open(spec, open=True, read=True).result()
      except ValueError as e:
        raise CheckpointError(f"{self.dir}: leaf {name} cannot be opened ({_ts_error(e)}): the checkpoint "
                              "is incomplete or damaged") from None
    return self._open[path]

  def __contains__(self, path: tuple) -> bool:
    return tuple(str(k) for k in path) in self.names

  def layer_chunked(self, path: tuple) -> bool:
    """Whether the leaf's chunks hold one index of axis 0 (one superblock) each."""
    store = self.store(path)
    return store.rank > 0 and store.chunk_layout.read_chunk.shape[0] == 1

  def read(self, path: tuple, index: int | None = None):
    store = self.store(path)
    try:
      return (store if index is None else store[index]).read().result()
    except ValueError as e:  # TensorStore's error for missing or corrupt chunks
      where = "" if index is None else f"[{index}]"
      raise CheckpointError(f"{self.dir}: leaf {'.'.join(map(str, path))}{where} cannot be read "
                            f"({_ts_error(e)}): the checkpoint is incomplete or damaged") from None


# Orbax's mark of a finished save on Cloud Storage, which has no atomic rename of a prefix: a step
# prefix without it is a save cut off mid-write.
COMMIT_MARKER = "commit_success.txt"


def checkpoint_steps(directory: str) -> list[int]:
  """Completed checkpoint steps in an Orbax directory: locally in-progress saves carry a temporary
  suffix until renamed; on gs:// a step counts once its commit marker is written."""
  if not storage.isdir(directory):
    return []
  names = [n.rstrip("/") for n in storage.listdir(directory)]
  if storage.is_remote(directory):
    return sorted(int(n) for n in names
                  if n.isdigit() and storage.exists(storage.join(directory, n, COMMIT_MARKER)))
  return sorted(int(n) for n in names if n.isdigit() and os.path.isdir(os.path.join(directory, n)))


def find_checkpoints(directory: str) -> str:
  """The Orbax directory under a workdir (`checkpoints/`) or the directory itself."""
  directory = storage.check(directory, "checkpoint")
  for candidate in (storage.join(directory, "checkpoints"), directory):
    if checkpoint_steps(candidate):
      return candidate
  raise FileNotFoundError(f"no checkpoint of this project under {directory} (expected step "
                          "directories in it or in its checkpoints/ folder)")


def read_metadata(directory: str) -> tuple[dict, int]:
  """The config metadata ({"run", "model", maybe "frozen_base"}) and step of the latest checkpoint."""
  ckpt_dir = find_checkpoints(directory)
  step = checkpoint_steps(ckpt_dir)[-1]
  return json.loads(storage.read_text(storage.join(ckpt_dir, str(step), "config", "metadata"))), step


def read_model_config(directory: str) -> tuple[ModelConfig, int]:
  """The ModelConfig and step of the latest checkpoint under `directory` (a workdir or checkpoints dir)."""
  meta, step = read_metadata(directory)
  fields = {k: tuple(v) if isinstance(v, list) else v for k, v in meta["model"].items()}
  known = {f.name for f in dataclasses.fields(ModelConfig)}
  unknown = sorted(set(fields) - known)
  if unknown:
    raise CheckpointError(f"{directory}: the step-{step} checkpoint's model config has fields this version "
                          f"of llama4_jax does not know: {unknown}. It was written by a newer version: "
                          "upgrade llama4_jax to read it (or export it to Hugging Face with that version)")
  return ModelConfig(**fields), step


def restore_params(directory: str, abstract_params: Any) -> Any:
  """Params alone from the latest checkpoint under `directory` (for init_from), onto their shardings.

  Reads training checkpoints (the `state` item) and converted ones (`tensors/`, parameter slices)."""
  ckpt_dir = find_checkpoints(directory)
  step = checkpoint_steps(ckpt_dir)[-1]
  tensor_dir = storage.join(ckpt_dir, str(step), TENSORS)
  if storage.isdir(tensor_dir):
    return _restore_converted(tensor_dir, abstract_params)
  with ocp.CheckpointManager(ckpt_dir) as manager:
    restored = manager.restore(step, args=ocp.args.Composite(
        state=ocp.args.PyTreeRestore(item={"params": abstract_params},
                                     restore_args=jax.tree.map(_restore_arg, {"params": abstract_params}),
                                     partial_restore=True)))
  return restored["state"]["params"]


def _restore_converted(tensor_dir: str, abstract_params: Any) -> Any:
  """Each parameter from its slices (one per layer of a stacked weight), restored straight onto the
  devices that hold it and stacked there."""
  import jax.numpy as jnp
  from jax.sharding import NamedSharding, PartitionSpec

  manifest = read_manifest(tensor_dir)
  leaves = jax.tree.leaves(abstract_params)
  loading = bar(sum(x.size * x.dtype.itemsize for x in leaves), f"loading {tensor_dir}", unit="B")

  def one(path, x):
    name = param_name(state_path(path))
    entry = manifest["params"].get(name)
    if entry is None or tuple(entry["shape"]) != tuple(x.shape):
      raise CheckpointError(f"{tensor_dir}: parameter {name} is missing or has shape "
                            f"{entry and tuple(entry['shape'])}, the model needs {tuple(x.shape)}")
    if not entry["stacked"]:
      return restore_slice(tensor_dir, manifest, name, _restore_arg(x))
    unit = x.sharding
    if isinstance(unit, NamedSharding):
      unit = NamedSharding(unit.mesh, PartitionSpec(*tuple(unit.spec)[1:]))
    unit_arg = _restore_arg(jax.ShapeDtypeStruct(x.shape[1:], x.dtype, sharding=unit))
    parts = [restore_slice(tensor_dir, manifest, slice_item(name, i), unit_arg) for i in range(x.shape[0])]
    return jax.jit(lambda *p: jnp.stack(p), out_shardings=x.sharding)(*parts)

  def counted(path, x):
    out = one(path, x)
    loading.update(x.size * x.dtype.itemsize)
    return out

  with loading:
    return jax.tree_util.tree_map_with_path(counted, abstract_params)


def _restore_arg(x):
  return ocp.ArrayRestoreArgs(sharding=x.sharding, global_shape=x.shape, dtype=x.dtype)


def frozen_base(path: str) -> tuple[str, dict] | None:
  """(the frozen base's directory, the adapter fields to load it with) when the latest checkpoint under
  `path` holds LoRA adapters only, else None."""
  base = read_metadata(path)[0].get("frozen_base")
  if not base:
    return None
  if not storage.exists(base):
    raise CheckpointError(f"{path} holds LoRA adapters only; their frozen base {base!r} (the run's "
                          "init_from) is missing. Restore that directory, or export a merged model "
                          "while it exists (llama4-convert orbax-to-hf --merge-lora)")
  cfg, _ = read_model_config(path)
  return base, {k: getattr(cfg, k) for k in ADAPTER_FIELDS + ("param_dtype", "dtype")}


def restore_adapters(path: str, model):
  """`model` (the frozen base, loaded with the adapter structure) with its adapters restored from the latest
  checkpoint under `path`."""
  graphdef, state = nnx.split(model)
  pure = traverse_util.flatten_dict(nnx.to_pure_dict(state))
  target = {k: jax.ShapeDtypeStruct(v.shape, v.dtype, sharding=v.sharding)
            for k, v in pure.items() if is_adapter(k)}
  pure.update(traverse_util.flatten_dict(restore_params(path, traverse_util.unflatten_dict(target))))
  nnx.replace_by_pure_dict(state, traverse_util.unflatten_dict(pure))
  return nnx.merge(graphdef, state)


def load_orbax_model(path: str, mesh=None, **overrides):
  """A `Llama4` with the params of the latest checkpoint under `path` (a workdir or its checkpoints/),
  restored straight into their shards on `mesh` (one device without a mesh); `overrides` are
  ModelConfig fields (dtypes, kernels) to change. (A checkpoint of adapters only: `frozen_base`.)
  `base_quant` ("int8" / "nf4") over an unquantized checkpoint restores and quantizes one tensor at a
  time (`build_quantized`)."""
  stored, _ = read_model_config(path)
  cfg = stored.replace(**overrides)
  if cfg.base_quant != "none" and stored.base_quant == "none":
    def read(p, abstract):
      return jax.tree.leaves(restore_params(path, traverse_util.unflatten_dict({p: abstract})))[0]
    return build_quantized(cfg, mesh, read, f"loading {path} into {cfg.base_quant}")
  graphdef, abstract_state, shardings = model_shardings(cfg, mesh)
  table = sharding_table(shardings)
  target = jax.tree_util.tree_map_with_path(
      lambda p, x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=table[state_path(p)]),
      nnx.to_pure_dict(abstract_state))
  nnx.replace_by_pure_dict(abstract_state, restore_params(path, target))
  return nnx.merge(graphdef, abstract_state)
