"""Changing a model's adapters and quantization weight by weight: add LoRA adapters, quantize the base to
int8, merge adapters back into plain weights (`adapt_model`, `merge_lora`)."""

from __future__ import annotations

import functools
import math
import zlib

import jax
import jax.numpy as jnp
from flax import nnx

from llama4_jax.model.linear import SCALE_SUFFIX, Weight, quantize_int8, weight
from llama4_jax.model.paths import sharding_table, state_leaves, state_path
from llama4_jax.model.transformer import model_shardings

ADAPTER_FIELDS = ("lora_rank", "lora_alpha", "lora_dropout", "lora_targets", "base_quant")


def adapt_model(model, seed: int = 0, release: bool = False, **changes):
  """`model` with its adapter/quantization fields (`ADAPTER_FIELDS`) changed, weight by weight:

  - adding adapters keeps every base weight and initialises A (normal, std fan_in^-1/2; from `seed`)
    and B = 0, so the new model computes exactly what the old one did;
  - `base_quant="int8"` quantizes each targeted base weight (per output channel);
  - removing adapters (`lora_rank=0`) merges them: W + (alpha / r) A @ B, dequantized (see
    `merge_lora`).
  Each weight is converted by its own jit call onto its shards, so the peak is the old model plus one
  weight; `release=True` also deletes each old weight once converted (when the caller drops the model).
  """
  unknown = set(changes) - set(ADAPTER_FIELDS)
  if unknown:
    raise ValueError(f"adapt_model changes only {ADAPTER_FIELDS}, not {sorted(unknown)}")
  old_cfg = model.config
  cfg = old_cfg.replace(**changes)
  graphdef, abstract_state, shardings = model_shardings(cfg, model.mesh)
  table = sharding_table(shardings)
  new_abstract = nnx.merge(graphdef, abstract_state)
  old_modules = dict(nnx.iter_graph(model))
  old_leaves = state_leaves(model)
  values: dict[tuple, jax.Array] = {}
  root = jax.random.PRNGKey(seed)
  for path, module in nnx.iter_graph(new_abstract):
    if not isinstance(module, nnx.Module) or not getattr(module, "linears", None):
      continue
    path = tuple(path)
    old = old_modules[path]
    for name, lead in module.linears:
      new_w = weight(module, name, lead)
      outs = {"": new_w.kernel, SCALE_SUFFIX: new_w.scale, "_lora_a": new_w.lora_a,
              "_lora_b": new_w.lora_b}
      outs = {k: v for k, v in outs.items() if v is not None}
      key = jax.random.fold_in(root, zlib.crc32(".".join(map(str, path + (name,))).encode()))
      convert = _converter(lead, cfg.param_dtype, tuple((k, v.shape) for k, v in outs.items()),
                           tuple((k, table[path + (name + k,)]) for k in outs))
      old_w = weight(old, name, lead)
      for k, v in convert(old_w, key).items():
        values[path + (name + k,)] = v
      if release:
        for suffix in ("", SCALE_SUFFIX, "_lora_a", "_lora_b"):
          var = getattr(old, name + suffix, None)
          if var is not None and not isinstance(var[...], jax.ShapeDtypeStruct):
            var[...].delete()

  def fill(p, var):
    p = state_path(p)
    if p in values:
      return var.replace(values[p])
    src = old_leaves[p]
    return var.replace(jax.device_put(src, table[p]) if src.sharding != table[p] else src)

  state = jax.tree_util.tree_map_with_path(fill, abstract_state,
                                           is_leaf=lambda x: isinstance(x, nnx.Variable))
  return nnx.merge(graphdef, state)


@functools.lru_cache(maxsize=None)
def _converter(lead: int, param_dtype: str, shapes: tuple, shardings: tuple):
  """The jitted `_convert_weight` for one kind of weight (weights of equal shapes share it)."""
  return jax.jit(functools.partial(_convert_weight, lead=lead, param_dtype=param_dtype,
                                   new_shapes=dict(shapes)), out_shardings=dict(shardings))


def _convert_weight(old: Weight, key, lead: int, param_dtype: str, new_shapes: dict) -> dict:
  """New kernel (+ scale, adapter) for one linear weight; see `adapt_model`."""
  adapted = "_lora_a" in new_shapes
  keep_adapter = adapted and old.lora_a is not None and old.lora_a.shape == new_shapes["_lora_a"]
  base = old.value(jnp.float32) if keep_adapter else old.merged(jnp.float32)
  out = {}
  if SCALE_SUFFIX in new_shapes:
    n_in = base.ndim - len(new_shapes[SCALE_SUFFIX])
    out[""], out[SCALE_SUFFIX] = quantize_int8(base, lead, n_in)
  else:
    out[""] = base.astype(param_dtype)
  if keep_adapter:
    out["_lora_a"], out["_lora_b"] = old.lora_a, old.lora_b
  elif adapted:
    a_shape = new_shapes["_lora_a"]
    out["_lora_a"] = jax.random.normal(key, a_shape, jnp.float32) * math.prod(a_shape[lead:-1]) ** -0.5
    out["_lora_b"] = jnp.zeros(new_shapes["_lora_b"], jnp.float32)
  return out


def merge_lora(model, release: bool = False):
  """A plain model (no adapters, no int8) computing what `model` computes, with each adapter folded in:
  W + (alpha / r) A @ B in the model's param_dtype. Sample with it, or export it (`save_pretrained`)."""
  return adapt_model(model, release=release, lora_rank=0, base_quant="none")
