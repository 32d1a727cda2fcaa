"""The Llama 4 text decoder (`Llama4`) and its construction on a mesh (`create_model`, `abstract_model`).

Layers are scanned as superblocks: the layer pattern (RoPE/NoPE every 4, MoE/dense every step) repeats
with period P (4 for Scout and Maverick), so `blocks` holds P layer modules whose weights carry a leading
[L // P] axis and one `lax.scan` runs them; compile time does not grow with depth. A remainder of
L % P layers, if any, runs unscanned from `tail`. Layer i lives at blocks[i % P][i // P] (scanned part).
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
from flax import nnx
from jax.sharding import Mesh, SingleDeviceSharding

from llama4_jax.config import LayerKind, ModelConfig
from llama4_jax.model.attention import Attention, StackedCache, init_kv_cache
from llama4_jax.model.layers import RMSNorm, SwiGLU, embed_lookup, rope_angles
from llama4_jax.model.linear import dropout_key
from llama4_jax.model.ops import dot, kv_cache_dtype
from llama4_jax.model.params import dtype_of, param
from llama4_jax.model.moe import MoE
from llama4_jax.model.platform import on_model_mesh
from llama4_jax.model.ring_attention import RingContext, from_zigzag, run_length, to_zigzag
from llama4_jax.sharding import constrain, state_shardings


class DecoderLayer(nnx.Module):
  """h += Attn(RMSNorm(h)); h += FFN(RMSNorm(h)), FFN being MoE or a dense SwiGLU of width M."""

  def __init__(self, cfg: ModelConfig, kind: LayerKind, rngs: nnx.Rngs, stack=()):
    pd = cfg.param_dtype
    self.attn_norm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps, pd, stack=stack)
    self.attn = Attention(cfg, kind.rope, rngs, stack=stack)
    self.ffn_norm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps, pd, stack=stack)
    if kind.moe:
      self.ffn = MoE(cfg, rngs, stack=stack)
    else:
      self.ffn = SwiGLU(cfg, cfg.intermediate_size_mlp, rngs, "mlp", stack=stack)
    self.kind = kind

  def __call__(self, h_BTD, positions, segment_ids, rope_cos_sin, mesh=None, cache=None, mode=None,
               ring=None, key=None):
    """Returns (h [B, T, D], MoE load-balancing loss, updated KV cache or None). `key`: LoRA dropout."""
    a, cache = self.attn(self.attn_norm(h_BTD), positions, segment_ids, rope_cos_sin, mesh, cache, mode,
                         ring, dropout_key(key, 0))
    h_BTD = constrain(h_BTD + a, mesh, ("batch", "seq", "act_embed"))
    if self.kind.moe:
      y, aux = self.ffn(self.ffn_norm(h_BTD), mesh, dropout_key(key, 1))
    else:
      y, aux = self.ffn(self.ffn_norm(h_BTD), mesh, dropout_key(key, 1)), jnp.zeros((), jnp.float32)
    h_BTD = constrain(h_BTD + y, mesh, ("batch", "seq", "act_embed"))
    return h_BTD, aux, cache


PREFILL_PIECE = 8192  # `prefill` runs longer prompts a piece of this many tokens at a time (one call)

_REMAT = {
    "full": lambda: None,
    "dots": lambda: jax.checkpoint_policies.checkpoint_dots,
    "dots_with_no_batch_dims": lambda: jax.checkpoint_policies.checkpoint_dots_with_no_batch_dims,
}


class Llama4(nnx.Module):
  """Llama 4 text model. `model(input_ids [B, T] int32) -> logits [B, T, V] float32`.

  Optional `positions` [B, T] (default 0..T-1) and `segment_ids` [B, T] (default all 0): tokens attend only
  within their segment, so packed documents behave as if run alone. The call is jit-compiled.
  """

  def __init__(self, cfg: ModelConfig, *, rngs: nnx.Rngs, mesh: Mesh | None = None):
    self.config = cfg
    self.mesh = mesh
    d, v, pd, std = cfg.hidden_size, cfg.vocab_size, cfg.param_dtype, cfg.initializer_range
    self.embed = param(rngs, (v, d), ("vocab", "embed"), pd, std=std)
    kinds = cfg.layer_kinds()
    period = cfg.layer_period() if cfg.scan_layers else cfg.num_hidden_layers
    self.num_blocks, rest = divmod(cfg.num_hidden_layers, period)
    self.period = period
    self.blocks = nnx.List(
        [DecoderLayer(cfg, kinds[j], rngs, stack=(self.num_blocks,)) for j in range(period)]
        if self.num_blocks else [])
    self.tail = nnx.List(
        [DecoderLayer(cfg, kinds[self.num_blocks * period + j], rngs) for j in range(rest)])
    self.final_norm = RMSNorm(d, cfg.rms_norm_eps, pd)
    self.lm_head = param(rngs, (d, v), ("embed", "vocab"), pd, std=std)

  def layer_location(self, i: int) -> tuple[str, int, int | None]:
    """Where layer i's weights live: ("blocks", j, stack index) or ("tail", j, None)."""
    scanned = self.num_blocks * self.period
    if i < scanned:
      return "blocks", i % self.period, i // self.period
    return "tail", i - scanned, None

  def __call__(self, input_ids, positions=None, segment_ids=None, *, return_aux: bool = False):
    return _forward_jit(self, input_ids, positions, segment_ids, return_aux)

  @on_model_mesh
  def forward(self, input_ids, positions=None, segment_ids=None, *, return_aux: bool = False,
              dropout_key=None, return_hidden: bool = False):
    """The traceable forward pass (what `__call__` jit-compiles). `dropout_key` (training only) turns
    on LoRA dropout when the config sets `lora_dropout`. `return_hidden`: the last layer's output
    [B, T, D] instead of the logits (`lm_logits` of it gives them), for a loss that builds the logits a
    piece at a time."""
    cfg = self.config
    input_ids = jnp.asarray(input_ids)
    if input_ids.ndim != 2:
      raise ValueError(f"input_ids must be int32 [batch, seq], got shape {input_ids.shape}")
    b, t = input_ids.shape
    positions_given = positions
    positions = (jnp.broadcast_to(jnp.arange(t, dtype=jnp.int32), (b, t)) if positions is None
                 else jnp.asarray(positions, jnp.int32))
    segment_ids = (jnp.zeros((b, t), jnp.int32) if segment_ids is None
                   else jnp.asarray(segment_ids, jnp.int32))
    ring = self._ring_context(b, t, aligned=positions_given is None)
    if ring is not None and ring.layout == "zigzag":  # reorder once; every other op is per token
      input_ids, positions, segment_ids = (to_zigzag(x, self.mesh)
                                           for x in (input_ids, positions, segment_ids))
    key = dropout_key if cfg.lora_rank and cfg.lora_dropout > 0 else None
    h, aux, _ = self._layers(self._embed(input_ids), positions, segment_ids, ring=ring, key=key)
    if ring is not None and ring.layout == "zigzag":
      h = from_zigzag(h, self.mesh, ("batch", "seq", "act_embed"))
    logits = h if return_hidden else self.lm_logits(h)
    if return_aux:
      num_moe = sum(k.moe for k in cfg.layer_kinds())
      return logits, {"moe_aux_loss": aux / max(num_moe, 1)}
    return logits

  def _ring_context(self, batch: int, seq_len: int, aligned: bool) -> RingContext | None:
    """Ring attention's per-call context, or None for dense attention (see `attention_impl`)."""
    cfg, mesh = self.config, self.mesh
    devices = 1 if mesh is None else mesh.shape.get("context", 1)
    if cfg.attention_impl == "dense" or (cfg.attention_impl == "auto" and devices == 1):
      return None
    layout = cfg.ring_layout if devices > 1 else "contiguous"
    run_length(seq_len, devices, layout)  # clear error if the sequence does not split evenly
    index = jnp.broadcast_to(jnp.arange(seq_len, dtype=jnp.int32), (batch, seq_len))
    if layout == "zigzag":
      index = to_zigzag(index, mesh)
    return RingContext(devices, layout, aligned, index, cfg.ring_kernel)

  # --- KV-cache inference -----------------------------------------------------------------------
  @on_model_mesh
  def init_cache(self, batch: int, max_length: int, dtype=None):
    """Zeroed KV cache for `batch` rows of up to `max_length` tokens: a ring buffer of
    min(C, max_length) entries for chunked layers, `max_length` for NoPE layers (split over the mesh's
    `context` axis along the sequence: `kv_seq` in the rules table). dtype: by default the compute dtype
    (float32 on CPU for bf16, see `ops.kv_cache_dtype`)."""
    cfg = self.config
    dtype = dtype or kv_cache_dtype(dtype_of(cfg.dtype))

    def one(kind, stack=()):
      c = init_kv_cache(batch, cfg.kv_cache_length(kind.rope, max_length), cfg.num_key_value_heads,
                        cfg.head_dim, dtype)
      seq = None if kind.rope else "kv_seq"  # a NoPE layer's cache is split over `context` (RULES)
      axes = {"k": ("batch", "kv_heads", seq, None), "v": ("batch", "kv_heads", seq, None),
              "pos": ("batch", seq)}
      c = {k: constrain(v, self.mesh, axes[k]) for k, v in c.items()}
      return jax.tree.map(lambda x: jnp.broadcast_to(x, stack + x.shape), c)

    return {"blocks": [one(layer.kind, (self.num_blocks,)) for layer in self.blocks],
            "tail": [one(layer.kind) for layer in self.tail]}

  @on_model_mesh
  def prefill(self, tokens, lengths, cache, piece: int | None = None):
    """Runs right-padded prompts tokens [B, T] (row b has lengths[b] real tokens) and stores them in
    `cache`. Returns (logits [B, V] at each row's last prompt token, cache).

    Attention is blockwise (memory linear in T). A prompt longer than `piece` tokens (default
    PREFILL_PIECE) runs as a `lax.scan` of `extend` calls of that many tokens, so the per-token
    activations (the MLP's and the experts' hidden layers: most of the memory) exist for one piece at a
    time; with a `context` axis the whole prompt goes through the ring instead, split over the devices."""
    b, t = tokens.shape
    ring = self._ring_context(b, t, aligned=True)  # with a context axis: the ring, as in training
    if t > (piece or PREFILL_PIECE) and ring is None:
      return self._prefill_pieces(tokens, lengths, cache, piece or PREFILL_PIECE)
    positions = jnp.broadcast_to(jnp.arange(t, dtype=jnp.int32), (b, t))
    segment_ids = (positions < lengths[:, None]).astype(jnp.int32)
    zigzag = ring is not None and ring.layout == "zigzag"
    if zigzag:
      tokens, positions, segment_ids = (to_zigzag(x, self.mesh) for x in (tokens, positions, segment_ids))
    h, _, cache = self._layers(self._embed(tokens), positions, segment_ids, cache, "prefill", ring)
    if zigzag:
      h = from_zigzag(h, self.mesh, ("batch", "seq", "act_embed"))
    last = jnp.take_along_axis(h, (lengths - 1)[:, None, None], axis=1)  # [B, 1, D]
    return self.lm_logits(last)[:, 0], cache

  def _prefill_pieces(self, tokens, lengths, cache, piece: int):
    """`prefill` as a scan over pieces of `piece` tokens (the prompt padded to a multiple of it), each an
    `extend` of every row; a row's last hidden state is kept from the piece that holds its last token."""
    b, t = tokens.shape
    n = -(-t // piece)
    tokens = jnp.pad(tokens, ((0, 0), (0, n * piece - t))).reshape(b, n, piece).transpose(1, 0, 2)

    def one(carry, xs):
      cache, last_h = carry
      i, toks = xs
      start = i * piece
      count = jnp.clip(lengths - start, 0, piece)
      h, cache = self._extend_hidden(toks, jnp.full((b,), start, jnp.int32), count, cache)
      here = (lengths - 1 >= start) & (lengths - 1 < start + piece)
      idx = jnp.clip(lengths - 1 - start, 0, piece - 1)
      h_last = jnp.take_along_axis(h, idx[:, None, None], axis=1)  # [B, 1, D]
      return (cache, jnp.where(here[:, None, None], h_last, last_h)), None

    last = jnp.zeros((b, 1, self.config.hidden_size), dtype_of(self.config.dtype))
    (cache, last), _ = jax.lax.scan(one, (cache, last), (jnp.arange(n, dtype=jnp.int32), tokens))
    return self.lm_logits(last)[:, 0], cache

  def _extend_hidden(self, tokens, starts, lengths, cache):
    """`extend`'s last-layer hidden states [B, T, D] and cache."""
    b, t = tokens.shape
    positions = (starts[:, None] + jnp.arange(t, dtype=jnp.int32)[None, :]).astype(jnp.int32)
    segment_ids = (jnp.arange(t)[None, :] < lengths[:, None]).astype(jnp.int32)
    h, _, cache = self._layers(self._embed(tokens), positions, segment_ids, cache, "extend")
    return h, cache

  @on_model_mesh
  def extend(self, tokens, starts, lengths, cache):
    """Continues prompts whose first starts[b] tokens are in `cache` with tokens [B, T] (row b has
    lengths[b] real ones, at positions starts[b], starts[b] + 1, ...), so a long prompt can be prefilled
    a piece at a time. Returns (logits [B, V] at each row's last new token, cache)."""
    h, cache = self._extend_hidden(tokens, starts, lengths, cache)
    last = jnp.take_along_axis(h, jnp.maximum(lengths - 1, 0)[:, None, None], axis=1)  # [B, 1, D]
    return self.lm_logits(last)[:, 0], cache

  @on_model_mesh
  def decode(self, tokens, positions, cache):
    """One token per row: tokens [B] at positions [B]. Returns (logits [B, V], cache). The cache may have
    more than B rows; rows B and beyond are left as they are."""
    pos = positions[:, None].astype(jnp.int32)
    h, _, cache = self._layers(self._embed(tokens[:, None]), pos, jnp.ones_like(pos), cache, "decode")
    return self.lm_logits(h)[:, 0], cache

  # --- shared pieces ------------------------------------------------------------------------------
  def _embed(self, ids):
    return embed_lookup(self.embed[...], ids, self.mesh, dtype_of(self.config.dtype))

  @on_model_mesh
  def lm_logits(self, h):
    """float32 logits [B, T, V] of the last layer's output h [B, T, D] (final norm, then the LM head)."""
    h = self.final_norm(h)
    logits = dot(h, self.lm_head[...].astype(h.dtype), (((2,), (0,)), ((), ())), jnp.float32)  # [B, T, V]
    return constrain(logits, self.mesh, ("batch", "seq", "vocab"))

  def _layers(self, h, positions, segment_ids, cache=None, mode=None, ring=None, key=None):
    """All decoder layers: the scanned superblocks, then the unscanned tail. Returns (h, aux, cache).
    `key` (or None): LoRA dropout, folded with each layer's index."""
    cfg, mesh = self.config, self.mesh
    rope_cos_sin = rope_angles(positions, cfg.rope_inv_freq())
    aux = jnp.zeros((), jnp.float32)
    new_cache = None if cache is None else {"blocks": [], "tail": []}
    if self.num_blocks:
      graphdef, stacked = nnx.split(self.blocks)
      carried = mode == "decode"  # decode updates the stacked cache in place: it rides in the carry

      def superblock(carry, xs):
        h, carried_caches = carry
        layer_state, layer_caches, block = xs
        layer_caches = carried_caches if carried else layer_caches
        total, caches = jnp.zeros((), jnp.float32), []
        for j, layer in enumerate(nnx.merge(graphdef, layer_state)):
          c = None if layer_caches is None else layer_caches[j]
          h, a, c = layer(h, positions, segment_ids, rope_cos_sin, mesh,
                          StackedCache(c, block) if carried else c, mode, ring,
                          dropout_key(key, block * self.period + j))
          total, caches = total + a, caches + [c.arrays if carried else c]
        if carried:
          return (h, caches), (total, None)
        return (h, None), (total, None if layer_caches is None else caches)

      if cfg.remat_policy != "none" and cache is None:
        superblock = jax.checkpoint(superblock, policy=_REMAT[cfg.remat_policy](), prevent_cse=False)
      blocks_in = None if cache is None else cache["blocks"]
      (h, carried_out), (block_aux, block_caches) = jax.lax.scan(
          superblock, (h, blocks_in if carried else None),
          (stacked, None if carried else blocks_in, jnp.arange(self.num_blocks)))
      aux = aux + block_aux.sum()
      if cache is not None:
        new_cache["blocks"] = carried_out if carried else block_caches
    for j, layer in enumerate(self.tail):
      h, a, c = layer(h, positions, segment_ids, rope_cos_sin, mesh,
                      None if cache is None else cache["tail"][j], mode, ring,
                      dropout_key(key, self.num_blocks * self.period + j))
      aux = aux + a
      if cache is not None:
        new_cache["tail"].append(c)
    return h, aux, new_cache


@functools.partial(nnx.jit, static_argnames=("return_aux",))
def _forward_jit(model, input_ids, positions, segment_ids, return_aux):
  return model.forward(input_ids, positions, segment_ids, return_aux=return_aux)


# ------------------------------------------------------------------------------------------------
# Construction

def abstract_model(cfg: ModelConfig, mesh: Mesh | None = None) -> Llama4:
  """The model with ShapeDtypeStructs instead of arrays: no memory is allocated."""
  return nnx.eval_shape(lambda: Llama4(cfg, rngs=nnx.Rngs(0), mesh=mesh))


def unstacked(model: Llama4) -> Llama4:
  """The same model with every layer's weights in arrays of their own (`scan_layers=False`: one superblock
  of all the layers, which XLA unrolls), sliced from the scanned model's stacks: a second copy of the layer
  weights. For decoding on CPU, where XLA copies each weight slice a scan over two or more superblocks
  reads before multiplying by it (twice the memory traffic of a step bound by it)."""
  cfg = model.config.replace(scan_layers=False)
  graphdef, state = nnx.split(abstract_model(cfg, model.mesh))
  old = nnx.to_pure_dict(nnx.state(model))
  new = {k: v for k, v in old.items() if k not in ("blocks", "tail")}
  new["blocks"], new["tail"] = {}, {}
  for i in range(cfg.num_hidden_layers):
    where, j, index = model.layer_location(i)
    take = (lambda x: x[index:index + 1]) if index is not None else (lambda x: x[None])  # noqa: E731
    new["blocks"][i] = jax.tree.map(take, old[where][j])
  nnx.replace_by_pure_dict(state, new)
  return nnx.merge(graphdef, state)


def check_mesh_fits(cfg: ModelConfig, mesh: Mesh) -> None:
  """Clear errors for the common ways a config does not fit a mesh (before any sharding is tried)."""
  tensor, expert = mesh.shape.get("tensor", 1), mesh.shape.get("expert", 1)
  for name, value, axis, size in (
      ("num_attention_heads", cfg.num_attention_heads, "tensor", tensor),
      ("num_key_value_heads", cfg.num_key_value_heads, "tensor", tensor),
      ("intermediate_size", cfg.intermediate_size, "tensor", tensor),
      ("intermediate_size_mlp", cfg.intermediate_size_mlp, "tensor", tensor),
      ("vocab_size", cfg.vocab_size, "tensor", tensor),
      ("num_local_experts", cfg.num_local_experts, "expert", expert)):
    if value % size:
      raise ValueError(f"{name}={value} is not divisible by the mesh's {axis}={size}; choose a {axis} "
                       f"size that divides {value}")


def model_shardings(cfg: ModelConfig, mesh: Mesh | None):
  """(graphdef, abstract state, shardings) for the model on `mesh`, or all on the first device."""
  if mesh is None:
    graphdef, abstract_state = nnx.split(abstract_model(cfg))
    one = SingleDeviceSharding(jax.devices()[0])
    return graphdef, abstract_state, jax.tree.map(lambda _: one, abstract_state,
                                                  is_leaf=lambda x: isinstance(x, nnx.Variable))
  check_mesh_fits(cfg, mesh)
  graphdef, abstract_state = nnx.split(abstract_model(cfg, mesh))
  return graphdef, abstract_state, state_shardings(abstract_state, mesh)


def _rngs(seed: int) -> nnx.Rngs:
  """Base weights draw from the default stream, LoRA adapters from their own, so a seed gives the same
  base weights with or without adapters."""
  return nnx.Rngs(seed, lora=seed + 1_000_003)


def create_model(cfg: ModelConfig, mesh: Mesh | None = None, seed: int = 0) -> Llama4:
  """A randomly initialised model, its weights created directly in their shards when `mesh` is given."""
  if mesh is None:
    return Llama4(cfg, rngs=_rngs(seed))
  graphdef, _, shardings = model_shardings(cfg, mesh)

  @functools.partial(jax.jit, out_shardings=shardings)
  def init():
    return nnx.split(Llama4(cfg, rngs=_rngs(seed), mesh=mesh))[1]

  return nnx.merge(graphdef, init())
