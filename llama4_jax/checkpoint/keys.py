"""The one key table between this project's parameters and Hugging Face Llama 4 tensors, both directions.

Each rule pairs a parameter path (inside a decoder layer, or at the top level) with an HF key and a
layout transform. A transform knows three things: the HF shape for our shape, how to read any slice of
our array from the HF tensor (lazily: only the rows/columns asked for), and how to turn our full array
into the HF one. `plan(model)` expands the table over the model's layers and superblock stacks.

HF layouts (LLAMA4.md): Linear weights are [out, in] (y = x @ W^T); expert tensors are x @ W already;
gate_up_proj fuses gate and up on its last axis, gate first.
"""

from __future__ import annotations

import dataclasses
from typing import Any

import numpy as np

from llama4_jax.model.paths import state_leaves

# --- layout transforms -------------------------------------------------------------------------
# Our index `idx` is a tuple of slices with explicit start/stop (step 1), one per dim of our array.


def _same_shape(s):
  return tuple(s)


def _same_read(get, s, idx):
  return get(idx)


def _same_to_hf(x):
  return x


def _t_shape(s):  # ours [a, b] = hf[b, a].T
  return (s[1], s[0])


def _t_read(get, s, idx):
  return get((idx[1], idx[0])).T


def _t_to_hf(x):
  return x.T


def _heads_in_shape(s):  # ours [D, N, H] <- hf [N*H, D] (q/k/v projections)
  return (s[1] * s[2], s[0])


def _heads_in_read(get, s, idx):
  d, n, h = idx
  hd = s[2]
  a = get((slice(n.start * hd, n.stop * hd), d))  # [n*H, d]
  a = a.reshape(n.stop - n.start, hd, d.stop - d.start).transpose(2, 0, 1)
  return a[:, :, h]


def _heads_in_to_hf(x):
  return x.transpose(1, 2, 0).reshape(x.shape[1] * x.shape[2], x.shape[0])


def _heads_out_shape(s):  # ours [N, H, D] <- hf [D, N*H] (o projection)
  return (s[2], s[0] * s[1])


def _heads_out_read(get, s, idx):
  n, h, d = idx
  hd = s[1]
  a = get((d, slice(n.start * hd, n.stop * hd)))  # [d, n*H]
  a = a.reshape(d.stop - d.start, n.stop - n.start, hd).transpose(1, 2, 0)
  return a[:, h, :]


def _heads_out_to_hf(x):
  return x.transpose(2, 0, 1).reshape(x.shape[2], x.shape[0] * x.shape[1])


def _half_shape(s):  # ours [E, D, F] is one half of hf [E, D, 2F]
  return (s[0], s[1], 2 * s[2])


def _half_read(part):
  def read(get, s, idx):
    e, d, f = idx
    off = part * s[2]
    return get((e, d, slice(f.start + off, f.stop + off)))
  return read


@dataclasses.dataclass(frozen=True)
class Layout:
  hf_shape: Any
  read: Any
  to_hf: Any
  fused_part: int | None = None  # index of this part on the fused HF tensor's last axis


SAME = Layout(_same_shape, _same_read, _same_to_hf)
TRANSPOSE = Layout(_t_shape, _t_read, _t_to_hf)
HEADS_IN = Layout(_heads_in_shape, _heads_in_read, _heads_in_to_hf)
HEADS_OUT = Layout(_heads_out_shape, _heads_out_read, _heads_out_to_hf)
GATE_HALF = Layout(_half_shape, _half_read(0), _same_to_hf, fused_part=0)
UP_HALF = Layout(_half_shape, _half_read(1), _same_to_hf, fused_part=1)

# --- the table ---------------------------------------------------------------------------------
LAYER_COMMON = (
    ("attn_norm.weight", "input_layernorm.weight", SAME),
    ("ffn_norm.weight", "post_attention_layernorm.weight", SAME),
    ("attn.q", "self_attn.q_proj.weight", HEADS_IN),
    ("attn.k", "self_attn.k_proj.weight", HEADS_IN),
    ("attn.v", "self_attn.v_proj.weight", HEADS_IN),
    ("attn.o", "self_attn.o_proj.weight", HEADS_OUT),
)
LAYER_MOE = (
    ("ffn.router", "feed_forward.router.weight", TRANSPOSE),
    ("ffn.gate", "feed_forward.experts.gate_up_proj", GATE_HALF),
    ("ffn.up", "feed_forward.experts.gate_up_proj", UP_HALF),
    ("ffn.down", "feed_forward.experts.down_proj", SAME),
    ("ffn.shared.gate", "feed_forward.shared_expert.gate_proj.weight", TRANSPOSE),
    ("ffn.shared.up", "feed_forward.shared_expert.up_proj.weight", TRANSPOSE),
    ("ffn.shared.down", "feed_forward.shared_expert.down_proj.weight", TRANSPOSE),
)
LAYER_DENSE = (
    ("ffn.gate", "feed_forward.gate_proj.weight", TRANSPOSE),
    ("ffn.up", "feed_forward.up_proj.weight", TRANSPOSE),
    ("ffn.down", "feed_forward.down_proj.weight", TRANSPOSE),
)


@dataclasses.dataclass(frozen=True)
class ParamPlan:
  """One parameter of ours: its state path, shape, and the HF key of each stacked slice."""
  path: tuple  # path in the model's nnx state, e.g. ("blocks", 0, "attn", "q")
  shape: tuple[int, ...]  # full shape, stack axis first if stacked
  stacked: bool
  hf_keys: tuple[str, ...]  # one per stack index (one if not stacked)
  layout: Layout

  @property
  def unit_shape(self) -> tuple[int, ...]:
    return self.shape[1:] if self.stacked else self.shape

  @property
  def hf_shape(self) -> tuple[int, ...]:
    return tuple(self.layout.hf_shape(self.unit_shape))


def plan(model) -> list[ParamPlan]:
  """Every parameter of `model` (concrete or abstract) with its HF keys, in HF checkpoint order."""
  cfg = model.config
  shapes = {path: tuple(np.shape(leaf)) for path, leaf in state_leaves(model).items()}
  kinds = cfg.layer_kinds()
  out: list[ParamPlan] = []

  def add(path, keys, layout, stacked):
    if path not in shapes:
      raise KeyError(f"key table names {path}, which the model does not have")
    out.append(ParamPlan(path, shapes[path], stacked, tuple(keys), layout))

  add(("embed",), ["model.embed_tokens.weight"], SAME, False)
  period = model.period
  for j in range(len(model.blocks)):
    rules = LAYER_COMMON + (LAYER_MOE if kinds[j].moe else LAYER_DENSE)
    layers = [j + b * period for b in range(model.num_blocks)]
    for ours, theirs, layout in rules:
      add(("blocks", j) + tuple(ours.split(".")),
          [f"model.layers.{i}.{theirs}" for i in layers], layout, True)
  for j in range(len(model.tail)):
    i = model.num_blocks * period + j
    rules = LAYER_COMMON + (LAYER_MOE if kinds[i].moe else LAYER_DENSE)
    for ours, theirs, layout in rules:
      add(("tail", j) + tuple(ours.split(".")), [f"model.layers.{i}.{theirs}"], layout, False)
  add(("final_norm", "weight"), ["model.norm.weight"], SAME, False)
  add(("lm_head",), ["lm_head.weight"], TRANSPOSE, False)
  covered = {p.path for p in out}
  missing = set(shapes) - covered
  if missing:
    raise KeyError(f"parameters without a key-table rule: {sorted(missing)}")
  return out


def hf_tensor_specs(plans: list[ParamPlan]) -> dict[str, tuple[int, ...]]:
  """HF key -> HF shape for every tensor the plans touch (fused halves give one key)."""
  specs: dict[str, tuple[int, ...]] = {}
  for p in plans:
    for key in p.hf_keys:
      specs[key] = p.hf_shape
  return specs
