"""`load_model`: any checkpoint this project reads (a Hugging Face directory, a converted Orbax checkpoint,
a training workdir, adapters over a frozen base) as a `Llama4`, dispatched to the format's reader."""

from __future__ import annotations

import os

import jax.numpy as jnp
from jax.sharding import Mesh

from llama4_jax import storage
from llama4_jax.checkpoint import orbax
from llama4_jax.checkpoint.hf import load_hf_model
from llama4_jax.model.adapters import ADAPTER_FIELDS, adapt_model
from llama4_jax.model.transformer import Llama4


def load_model(path: str | os.PathLike, dtype=None, mesh: Mesh | None = None, lora_seed: int = 0,
               **overrides) -> Llama4:
  """Loads a Hugging Face Llama 4 checkpoint directory, or an Orbax checkpoint of this project (a training
  workdir, its checkpoints/ folder, or a converted checkpoint), into a `Llama4` (sharded on `mesh` if
  given). A LoRA training checkpoint holds adapters only: its frozen base is loaded from the run's
  `init_from` and the adapters restored onto it.

  dtype: parameter and compute dtype (a name like "bfloat16" or a jnp dtype); default: the checkpoint's.
  overrides: ModelConfig fields, e.g. `attention_impl="dense"`, `remat_policy="full"`, or adapter fields
  applied after loading (`lora_rank=16` adds adapters initialised from `lora_seed`, `base_quant="int8"`
  or `"nf4"` quantizes the base, `lora_rank=0` merges a checkpoint's adapters; see
  `model.adapters.adapt_model`). Quantizing a plain checkpoint happens while it loads, one tensor at a
  time, so a base that only fits quantized (Scout in NF4 on a v5e-8) loads.
  """
  directory = storage.check(os.fspath(path), "checkpoint")
  if not storage.isdir(directory):
    raise FileNotFoundError(f"checkpoint directory {directory} does not exist")
  if dtype is not None:
    name = jnp.dtype(dtype).name
    overrides = {"param_dtype": name, "dtype": name, **overrides}
  adapters = {k: overrides.pop(k) for k in ADAPTER_FIELDS if k in overrides}
  if adapters.get("base_quant", "none") != "none":
    overrides["base_quant"] = adapters["base_quant"]  # quantized while loading (see above)
  if storage.exists(storage.join(directory, "config.json")):
    model = load_hf_model(directory, mesh, overrides)
  else:
    try:
      orbax.find_checkpoints(directory)
    except FileNotFoundError:
      raise FileNotFoundError(f"{directory} is neither a Hugging Face checkpoint (no config.json) nor an "
                              "Orbax checkpoint of this project (no step directories)") from None
    base = orbax.frozen_base(directory)
    if base:  # adapters only: the frozen base with the adapter structure, then the adapters onto it
      model = orbax.restore_adapters(directory, load_model(base[0], mesh=mesh, **{**base[1], **overrides}))
    else:
      model = orbax.load_orbax_model(directory, mesh, **overrides)
  if model.config.replace(**adapters) == model.config:
    return model
  return adapt_model(model, seed=lora_seed, release=True, **adapters)
