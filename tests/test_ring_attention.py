"""Ring attention against dense attention on 1-8 simulated devices: values, gradients, plans, layouts,
communication in the compiled HLO, and the static load-balance model."""

import re

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

import llama4_jax as l4
from llama4_jax.model import ring_attention as ra
from llama4_jax.model.attention import masked_attention
from llama4_jax.model.transformer import create_model, model_shardings

from conftest import SCOUT_LIKE

T, B, HEADS, KV_HEADS, DIM = 64, 2, 4, 2, 8


def make_inputs(packed, dtype=jnp.float32, seed=0, t=T):
  """q, k, v and token metadata. Packed: documents of random length (segments cross shard edges,
  positions restart per document) and, in row 0, keys of a segment no query has, so some rows and whole
  blocks see no key at all."""
  rng = np.random.RandomState(seed)
  q, k, v = (jnp.asarray(rng.randn(B, t, h, DIM), dtype) for h in (HEADS, KV_HEADS, KV_HEADS))
  index = np.broadcast_to(np.arange(t, dtype=np.int32), (B, t))
  if not packed:
    return (q, k, v), (index, index.copy(), np.ones((B, t), np.int32), np.ones((B, t), np.int32))
  seg = (np.cumsum(rng.rand(B, t) < 0.1, axis=1) + 1).astype(np.int32)
  pos = np.zeros((B, t), np.int32)
  for i in range(1, t):
    pos[:, i] = np.where(seg[:, i] == seg[:, i - 1], pos[:, i - 1] + 1, 0)
  kv_seg = seg.copy()
  kv_seg[0, 8:24] = 10_000
  return (q, k, v), (index, pos, seg, kv_seg)


def dense(q, k, v, meta, chunk):
  index, pos, seg, kv_seg = (jnp.asarray(m) for m in meta)
  return masked_attention(q, k, v, ra.visible(index, pos, seg, index, pos, kv_seg, chunk))


def ring_vjp(qkv, meta, cotangent, n, layout, chunk, aligned, kernel="auto"):
  """Ring output and (dq, dk, dv) for `cotangent`, in the original token order."""
  t = qkv[0].shape[1]
  mesh = l4.make_mesh(fsdp=-1, context=n)
  order = ra.zigzag_order(t, n) if layout == "zigzag" else np.arange(t)
  inv = np.argsort(order)
  plan = ra.make_plan(t, n, chunk, layout, aligned, block=8, kernel=kernel)
  lay = lambda x: jnp.asarray(np.asarray(x)[:, order])  # noqa: E731
  index, pos, seg, kv_seg = (lay(m) for m in meta)

  @jax.jit
  def run(q, k, v, ct):
    out, vjp = jax.vjp(lambda q, k, v: ra.ring_attention(q, k, v, index, pos, seg, mesh, plan, kv_seg),
                       q, k, v)
    return out, vjp(ct)

  out, grads = run(*(lay(x) for x in qkv), lay(cotangent))
  return np.asarray(out)[:, inv], [np.asarray(g)[:, inv] for g in grads], plan


# (devices, layout, chunk, packed): causal; packed with fully masked rows; chunked with the shard
# (or zigzag run) length below, equal to and above C; GQA throughout; zigzag on and off.
CASES = [
    (1, "contiguous", None, True),
    (2, "zigzag", None, True),
    (4, "contiguous", 8, True),     # packed, shard 16 > C: a window of two ring steps
    (4, "zigzag", 16, False),       # runs of 8 < C: rings within groups of 2 devices
    (8, "contiguous", 8, False),    # shard == C: no communication
    (8, "contiguous", 32, False),   # shard 8 < C: groups of 4
    (8, "zigzag", None, True),
    (8, "zigzag", 12, True),        # packed, runs of 4 < C: K/V travel 3 steps each way (7 of 8 shards)
    (8, "zigzag", 4, True),         # packed, C - 1 < runs: one step each way
]


def check_against_dense(n, layout, chunk, packed, t=T, kernel="auto"):
  qkv, meta = make_inputs(packed, t=t)
  ct = jnp.asarray(np.random.RandomState(1).randn(B, t, HEADS, DIM), jnp.float32)
  want, dense_vjp = jax.vjp(lambda *a: dense(*a, meta, chunk), *qkv)
  want_grads = dense_vjp(ct)
  got, grads, plan = ring_vjp(qkv, meta, ct, n, layout, chunk, aligned=not packed, kernel=kernel)
  assert not np.isnan(got).any() and all(not np.isnan(g).any() for g in grads)
  np.testing.assert_allclose(got, want, atol=2e-6, rtol=0)
  for g, w in zip(grads, want_grads):
    assert np.abs(g - w).max() <= 1e-5 * np.abs(w).max()
  if packed:  # the rows with no visible key are exactly zero
    np.testing.assert_array_equal(got[0, 8:24][np.asarray(want)[0, 8:24] == 0], 0)
  return plan


@pytest.mark.parametrize("n,layout,chunk,packed", CASES)
def test_ring_matches_dense_reference(n, layout, chunk, packed):
  assert check_against_dense(n, layout, chunk, packed).kernel == "xla"


# The splash per-step kernel (TPU; Pallas interpret mode here): runs of 128 tokens, splash's block.
SPLASH_CASES = [
    (1, "contiguous", None, True, 128),   # one device: the causal kernel alone, fully masked rows
    (2, "zigzag", None, True, 512),       # all three run-pair cases (skip, causal, full) per step
    (4, "contiguous", 256, True, 512),    # chunked, shard 128 < C: a window of ring steps
    (2, "zigzag", 192, False, 512),       # one document over chunk edges inside runs: chunk ids matter
    (4, "zigzag", 192, True, 1024),       # C not aligned with the runs: the whole ring
    (4, "zigzag", 128, True, 1024),       # packed, C = run: K/V one step each way (3 of 4 shards)
]


@pytest.mark.parametrize("n,layout,chunk,packed,t", SPLASH_CASES)
def test_splash_kernel_matches_dense_reference(n, layout, chunk, packed, t):
  plan = check_against_dense(n, layout, chunk, packed, t, kernel="splash")
  assert plan.kernel == "splash" and plan.block == 128 and plan.interpret


def test_kernel_choice():
  assert ra.make_plan(512, 2, None).kernel == "xla"  # auto: splash only on TPU
  assert ra.make_plan(512, 2, None, kernel="splash").kernel == "splash"
  with pytest.raises(ValueError, match="runs of 32 tokens are not a multiple of 128"):
    ra.make_plan(128, 2, None, kernel="splash")
  with pytest.raises(ValueError, match="ring kernel 'cudnn' is not one of"):
    ra.make_plan(512, 2, None, kernel="cudnn")


def test_bf16_no_worse_than_dense_bf16():
  qkv, meta = make_inputs(packed=True)
  ct = jnp.ones((B, T, HEADS, DIM), jnp.bfloat16)
  exact = np.asarray(dense(*qkv, meta, None))
  low = [x.astype(jnp.bfloat16) for x in qkv]
  dense_err = np.abs(np.asarray(dense(*low, meta, None), np.float32) - exact).max()
  got, _, _ = ring_vjp(low, meta, ct, 8, "zigzag", None, aligned=False)
  ring_err = np.abs(got.astype(np.float32) - exact).max()
  assert ring_err <= 1.1 * dense_err, (ring_err, dense_err)


def test_plans():
  # NoPE layers: the whole ring. Chunked: none / within groups / a window / the whole ring.
  assert ra.make_plan(64, 8, None).steps == 8
  assert ra.make_plan(64, 8, 8, "contiguous", aligned=True).steps == 1
  assert ra.make_plan(64, 8, 4, "zigzag", aligned=True).steps == 1
  p = ra.make_plan(64, 8, 32, "contiguous", aligned=True)
  assert (p.group, p.steps) == (4, 4) and p.shift(1)[3] == (3, 0) and p.shift(1)[4] == (4, 5)
  assert ra.make_plan(64, 8, 16, "contiguous", aligned=False).steps == 3
  # packed zigzag: the runs before device d's two runs sit on the devices next to it, on either side
  assert ra.make_plan(64, 8, 16, "zigzag", aligned=False).sources() == list(range(0, -8, -1))  # 4 runs back
  assert ra.make_plan(256, 8, 16, "zigzag", aligned=False).sources() == [0, -1, 1]
  assert ra.make_plan(128, 8, 12, "zigzag", aligned=False).sources() == [0, -1, -2, 1, 2]
  with pytest.raises(ValueError, match="divisible by 16"):
    ra.make_plan(72, 8, None, "zigzag")


def test_zigzag_relayout_moves_half_shards():
  mesh = l4.make_mesh(fsdp=2, context=4)
  x = jnp.arange(2 * 32).reshape(2, 32)
  order = ra.zigzag_order(32, 4)
  assert sorted(order) == list(range(32)) and list(order[:8]) == [0, 1, 2, 3, 28, 29, 30, 31]
  z = jax.jit(lambda x: ra.to_zigzag(x, mesh))(x)
  np.testing.assert_array_equal(z, np.asarray(x)[:, order])
  np.testing.assert_array_equal(jax.jit(lambda z: ra.from_zigzag(z, mesh))(z), x)


def hlo_of_ring_grad(chunk, layout="zigzag", aligned=True, heads=HEADS):
  mesh = l4.make_mesh(fsdp=-1, context=8)
  plan = ra.make_plan(256, 8, chunk, layout, aligned, block=16)
  q = jnp.zeros((B, 256, heads, DIM))
  kv = jnp.zeros((B, 256, KV_HEADS, DIM))
  meta = jnp.zeros((B, 256), jnp.int32)
  loss = lambda q, k, v: ra.ring_attention(q, k, v, meta, meta, meta, mesh, plan).sum()  # noqa: E731
  return jax.jit(jax.grad(loss, (0, 1, 2))).lower(q, kv, kv).compile().as_text()


def collective_permute_shapes(hlo):
  return re.findall(r"= \(?([^=]*?)\)? collective-permute(?:-start)?\(", hlo)


def test_communication_in_compiled_hlo():
  hlo = hlo_of_ring_grad(None, heads=8)  # 8 query heads, 2 kv heads
  shapes = collective_permute_shapes(hlo)
  assert shapes, "the full ring must pass K/V around"
  for s in shapes:  # K/V (and dK/dV) travel as kv heads: [b, 32 tokens, 2, 8]; never 8 query heads
    assert ",8,8]" not in s, s
  assert re.search(r"f32\[2,32,2,8\]", " ".join(shapes))
  assert "all-gather" not in hlo and "all-to-all" not in hlo
  chunked = hlo_of_ring_grad(16)  # runs of 16 tokens hold whole chunks: no communication at all
  assert not collective_permute_shapes(chunked) and "all-gather" not in chunked


def test_zigzag_balances_causal_work():
  n, seq = 8, 65536
  zig = ra.block_cost(seq, n, "zigzag", ra.make_plan(seq, n, None, "zigzag"))
  contiguous = ra.block_cost(seq, n, "contiguous", ra.make_plan(seq, n, None, "contiguous"))
  assert zig["ratio"] <= 1.05
  assert contiguous["ratio"] == pytest.approx(1.875, abs=0.02)


# ------------------------------------------------------------------------------------------------
# The whole model: ring on context=8 and on context=2 x fsdp=4 against dense on one device.

MODEL_T = 128
MODEL_CFG = SCOUT_LIKE.replace(num_hidden_layers=4)  # one scanned superblock: 3 chunked + 1 NoPE layer


def model_inputs():
  rng = np.random.RandomState(0)
  ids = rng.randint(0, SCOUT_LIKE.vocab_size, (2, MODEL_T)).astype(np.int32)
  seg = np.ones((2, MODEL_T), np.int32)
  seg[0, 50:] = 2
  seg[1, 100:] = 0  # padding
  pos = np.broadcast_to(np.arange(MODEL_T, dtype=np.int32), (2, MODEL_T)).copy()
  pos[0, 50:] -= 50
  pos[1, 100:] = 0
  return ids, pos, seg


def logits_and_grads(model, packed):
  """Logits, gradients of sum(sin(logits)) and the compiled HLO text of the step."""
  ids, pos, seg = model_inputs()
  graphdef, state = nnx.split(model)

  def f(state):
    logits = nnx.merge(graphdef, state).forward(ids, pos if packed else None, seg if packed else None)
    return jnp.sum(jnp.sin(logits)), logits

  compiled = jax.jit(jax.value_and_grad(f, has_aux=True)).lower(state).compile()
  (_, logits), grads = compiled(state)
  return np.asarray(logits), grads, compiled.as_text()


@pytest.fixture(scope="module")
def dense_model():
  return create_model(MODEL_CFG.replace(attention_impl="dense"), seed=3)


@pytest.mark.parametrize("mesh_axes,layout,packed", [(dict(context=8, fsdp=1), "zigzag", True),
                                                     (dict(context=2, fsdp=4), "contiguous", False)])
def test_model_ring_equals_dense(dense_model, mesh_axes, layout, packed):
  cfg = MODEL_CFG.replace(ring_layout=layout)
  mesh = l4.make_mesh(**mesh_axes)
  model = create_model(cfg, mesh)
  nnx.update(model, jax.device_put(nnx.state(dense_model), model_shardings(cfg, mesh)[2]))
  got, got_grads, hlo = logits_and_grads(model, packed)
  want, want_grads, _ = logits_and_grads(dense_model, packed)
  np.testing.assert_allclose(got, want, atol=2e-5, rtol=0)
  for g, w in zip(jax.tree.leaves(got_grads), jax.tree.leaves(want_grads)):
    assert np.abs(np.asarray(g) - np.asarray(w)).max() <= 1e-5 * np.abs(np.asarray(w)).max()
  # K/V circulate as kv-head shards; nothing is gathered or exchanged over the whole sequence (MoE
  # routing and the embedding lookup stay within each device's tokens); only parameters are gathered
  # (FSDP over fsdp x context).
  n = mesh_axes["context"]
  shard = f"[2,{MODEL_T // n},{cfg.num_key_value_heads},{cfg.head_dim}]"
  assert shard in " ".join(collective_permute_shapes(hlo))
  gathered = re.findall(r"= \(?[a-z0-9]+\[([0-9,]*)\][^=]* all-gather(?:-start)?\(", hlo)
  exchanged = re.findall(r"= \(?[a-z0-9]+\[([0-9,]*)\][^=]* all-to-all\(", hlo)
  assert gathered
  for dims in gathered + exchanged:
    assert str(MODEL_T) not in dims.split(","), dims


def test_memory_linear_in_length_under_grad_of_a_layer_scan():
  """Per-device temp memory of forward+backward, the ring inside a scanned layer stack as in the
  model: at most 2.1x per doubling of length (blocks of the forward ring are never kept)."""
  mesh = l4.make_mesh(fsdp=1, context=8)

  def temp(seq):
    plan = ra.make_plan(seq, 8, 256, "zigzag", aligned=False)
    index = jnp.asarray(ra.zigzag_order(seq, 8), jnp.int32)[None]

    def loss(q, k, v):
      layer = lambda h, _: (ra.ring_attention(h, k, v, index, index, index, mesh, plan), None)  # noqa
      return jax.lax.scan(layer, q, None, length=2)[0].sum()

    shapes = [jax.ShapeDtypeStruct((1, seq, h, 16), jnp.float32) for h in (4, 2, 2)]
    compiled = jax.jit(jax.grad(loss, (0, 1, 2))).lower(*shapes).compile()
    return compiled.memory_analysis().temp_size_in_bytes

  small, large = temp(4096), temp(8192)
  assert large <= 2.1 * small, (small, large)


def test_model_splash_kernel_equals_dense(dense_model):
  """`ring_kernel="splash"` through the model's forward (its gradients are checked above, kernel by
  kernel): context=2, zigzag, packed documents. No padding: padding queries see padding keys of their
  chunk at any distance under splash's segment ids, further back than the XLA kernel lets them; both
  give garbage there, which the loss masks."""
  t = 512
  rng = np.random.RandomState(0)
  ids = rng.randint(0, SCOUT_LIKE.vocab_size, (2, t)).astype(np.int32)
  seg = np.ones((2, t), np.int32)
  seg[0, 200:] = 2
  seg[1, 333:] = 3
  pos = np.broadcast_to(np.arange(t, dtype=np.int32), (2, t)).copy()
  pos[0, 200:] -= 200
  pos[1, 333:] -= 333
  cfg = MODEL_CFG.replace(ring_kernel="splash")
  mesh = l4.make_mesh(context=2, fsdp=4)
  model = create_model(cfg, mesh)
  nnx.update(model, jax.device_put(nnx.state(dense_model), model_shardings(cfg, mesh)[2]))

  forward = nnx.jit(lambda m: m.forward(ids, pos, seg))
  np.testing.assert_allclose(np.asarray(forward(model)), np.asarray(forward(dense_model)), atol=2e-5, rtol=0)
