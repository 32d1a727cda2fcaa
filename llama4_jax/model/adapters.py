"""Changing a model's adapters and quantization weight by weight: add LoRA adapters, quantize the base to
int8 or NF4, merge adapters back into plain weights (`adapt_model`, `merge_lora`); build a quantized model
from a plain checkpoint a tensor at a time (`build_quantized`)."""

from __future__ import annotations

import functools
import math
import zlib

import jax
import jax.numpy as jnp
from flax import nnx

from llama4_jax.model.linear import SCALE_SUFFIX, Weight, quant_of, quantize, weight
from llama4_jax.model.paths import sharding_table, state_leaves, state_path
from llama4_jax.model.transformer import model_shardings
from llama4_jax.progress import bar

ADAPTER_FIELDS = ("lora_rank", "lora_alpha", "lora_dropout", "lora_targets", "base_quant")


def adapt_model(model, seed: int = 0, release: bool = False, **changes):
  """`model` with its adapter/quantization fields (`ADAPTER_FIELDS`) changed, weight by weight:

  - adding adapters keeps every base weight and initialises A (normal, std fan_in^-1/2; from `seed`)
    and B = 0, so the new model computes exactly what the old one did;
  - `base_quant="int8"` quantizes each targeted base weight (per output channel), `"nf4"` to 4-bit codes
    with a scale per 64 weights (a base already held that way is kept as it is);
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
    for name, lead, n_in in module.linears:
      new_w = weight(module, name, lead)
      outs = {"": new_w.kernel, SCALE_SUFFIX: new_w.scale, "_lora_a": new_w.lora_a,
              "_lora_b": new_w.lora_b}
      outs = {k: v for k, v in outs.items() if v is not None}
      key = jax.random.fold_in(root, zlib.crc32(".".join(map(str, path + (name,))).encode()))
      convert = _converter(lead, n_in, cfg.base_quant, cfg.param_dtype,
                           tuple((k, v.shape) for k, v in outs.items()),
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
def _converter(lead: int, n_in: int, quant: str, param_dtype: str, shapes: tuple, shardings: tuple):
  """The jitted `_convert_weight` for one kind of weight (weights of equal shapes share it)."""
  return jax.jit(functools.partial(_convert_weight, lead=lead, n_in=n_in, quant=quant,
                                   param_dtype=param_dtype, new_shapes=dict(shapes)),
                 out_shardings=dict(shardings))


def _convert_weight(old: Weight, key, lead: int, n_in: int, quant: str, param_dtype: str,
                    new_shapes: dict) -> dict:
  """New kernel (+ scale, adapter) for one linear weight; see `adapt_model`."""
  adapted = "_lora_a" in new_shapes
  keep_adapter = adapted and old.lora_a is not None and old.lora_a.shape == new_shapes["_lora_a"]
  out = {}
  if keep_adapter or old.lora_a is None:
    if SCALE_SUFFIX in new_shapes and quant_of(old.kernel, old.scale) == quant:  # already held so
      out[""], out[SCALE_SUFFIX] = old.kernel, old.scale
  if not out:
    base = old.value(jnp.float32) if keep_adapter else old.merged(jnp.float32)
    if SCALE_SUFFIX in new_shapes:
      out[""], out[SCALE_SUFFIX] = quantize(quant, base, lead, n_in)
    else:
      out[""] = base.astype(param_dtype)
  if keep_adapter:
    out["_lora_a"], out["_lora_b"] = old.lora_a, old.lora_b
  elif adapted:
    a_shape = new_shapes["_lora_a"]
    out["_lora_a"] = jax.random.normal(key, a_shape, jnp.float32) * math.prod(a_shape[lead:-1]) ** -0.5
    out["_lora_b"] = jnp.zeros(new_shapes["_lora_b"], jnp.float32)
  return out


def linear_weights(model) -> dict[tuple, tuple[int, int, bool]]:
  """State path of each linear weight's kernel -> (its dims before the input dims: stack + expert groups,
  its number of input dims, whether it is held quantized: a `_scale` beside it)."""
  out = {}
  for path, module in nnx.iter_graph(model):
    for name, lead, n_in in getattr(module, "linears", ()) if isinstance(module, nnx.Module) else ():
      out[tuple(path) + (name,)] = (lead, n_in, getattr(module, name + SCALE_SUFFIX, None) is not None)
  return out


def build_quantized(cfg, mesh, read_plain, label: str = "loading"):
  """A `Llama4` of `cfg` (base_quant "int8" or "nf4") with no adapters, its weights read one tensor at a
  time by `read_plain(path, abstract)`: the unquantized parameter at state path `path`, as a jax.Array
  of `abstract`'s shape, dtype and sharding (the model's param_dtype). Each linear kernel is quantized onto
  its shards as soon as it is read and the unquantized copy deleted, so devices never hold more than the
  quantized model plus one unquantized tensor (and the host only what `read_plain` reads)."""
  if cfg.base_quant == "none":
    raise ValueError("build_quantized needs base_quant 'int8' or 'nf4'")
  cfg = cfg.replace(lora_rank=0)
  _, plain_state, plain_shardings = model_shardings(cfg.replace(base_quant="none"), mesh)
  graphdef, abstract_state, shardings = model_shardings(cfg, mesh)
  plain_table, table = sharding_table(plain_shardings), sharding_table(shardings)
  kernels = {p: (lead, n_in) for p, (lead, n_in, quantized)  # the kernels to quantize
             in linear_weights(nnx.merge(graphdef, abstract_state)).items() if quantized}
  plain = {state_path(p): v for p, v in jax.tree_util.tree_flatten_with_path(
      plain_state, is_leaf=lambda x: isinstance(x, nnx.Variable))[0]}
  loading = bar(sum(v.size * v.dtype.itemsize for v in plain.values()), label, unit="B")
  values: dict[tuple, jax.Array] = {}
  with loading:
    for p, var in plain.items():
      x = read_plain(p, jax.ShapeDtypeStruct(var.shape, var.dtype, sharding=plain_table[p]))
      if p in kernels:
        s = p[:-1] + (p[-1] + SCALE_SUFFIX,)
        quantizer = _quantizer(cfg.base_quant, *kernels[p], table[p], table[s])
        values[p], values[s] = quantizer(x)
        x.delete()
      else:
        values[p] = x
      loading.update(var.size * var.dtype.itemsize)
  state = jax.tree_util.tree_map_with_path(lambda p, var: var.replace(values[state_path(p)]),
                                           abstract_state, is_leaf=lambda x: isinstance(x, nnx.Variable))
  return nnx.merge(graphdef, state)


@functools.lru_cache(maxsize=None)
def _quantizer(quant: str, lead: int, n_in: int, kernel_sharding, scale_sharding):
  return jax.jit(lambda w: quantize(quant, w, lead, n_in), out_shardings=(kernel_sharding, scale_sharding))


def merge_lora(model, release: bool = False):
  """A plain model (no adapters, no quantized base) computing what `model` computes, each adapter folded in:
  W + (alpha / r) A @ B in the model's param_dtype. Sample with it, or export it (`save_pretrained`)."""
  return adapt_model(model, release=release, lora_rank=0, base_quant="none")
