"""The KV-cache sampler against transformers' generate, the uncached sampler, and itself."""

import re

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
from flax import nnx

import llama4_jax as l4
from conftest import SCOUT_LIKE, MAVERICK_LIKE, make_hf_checkpoint
from llama4_jax.inference import generate, generate_stream, sample_uncached

NEW = 40


@pytest.fixture(scope="module", params=["scout", "maverick"])
def models(request, tmp_path_factory):
  base = SCOUT_LIKE if request.param == "scout" else MAVERICK_LIKE
  cfg = base.replace(attention_chunk_size=8 if request.param == "scout" else 16, eos_token_id=(2,))
  d = tmp_path_factory.mktemp(request.param)
  hf = make_hf_checkpoint(cfg, d, seed=3)
  return l4.load_model(d), hf


def prompts_for(cfg, lengths=(5, 13, 21)):
  rng = np.random.RandomState(0)
  return [rng.randint(3, cfg.vocab_size, n).tolist() for n in lengths]


def test_greedy_equals_transformers_generate(models):
  model, hf = models
  prompts = prompts_for(model.config)
  out = generate(model, prompts, max_new_tokens=NEW, stop_tokens=[])  # one ragged batch
  for p, o in zip(prompts, out):
    ref = hf.generate(torch.tensor([p]), max_new_tokens=NEW, min_new_tokens=NEW, do_sample=False,
                      eos_token_id=None, pad_token_id=0)[0, len(p):].tolist()
    assert o == ref  # crosses several chunk boundaries; the ring buffer wraps


def test_chunked_cache_is_a_ring_of_chunk_size(models):
  model, _ = models
  cache = model.init_cache(batch=2, max_length=256)
  cfg = model.config
  for j, layer in enumerate(model.blocks):
    size = cache["blocks"][j]["k"].shape[3]  # [L, B, K, S, H]
    assert size == (cfg.attention_chunk_size if layer.kind.rope else 256)
  # generating far past the buffer stays equal to the uncached reference
  p = prompts_for(model.config, (7,))[0]
  assert generate(model, [p], max_new_tokens=60, stop_tokens=[])[0] == sample_uncached(model, p, 60,
                                                                                      window=128)


@pytest.fixture(scope="module")
def scout(tmp_path_factory):
  cfg = SCOUT_LIKE.replace(attention_chunk_size=8, eos_token_id=(2,))
  d = tmp_path_factory.mktemp("scout_sampling")
  make_hf_checkpoint(cfg, d, seed=4)
  return l4.load_model(d)


def test_prefill_in_pieces_equals_one_prefill(scout, monkeypatch):
  """`extend` continues cached prompts: rows of 30 and 19 tokens prefilled 12 at a time (pieces longer
  than the chunked layers' ring buffer of 8, crossing chunk boundaries; NoPE layers too) give one
  prefill's logits and cache. Blockwise blocks of 16: the prefill is two query blocks, and a piece
  reads the NoPE layers' 48-slot cache as up to three blocks, only those holding earlier tokens."""
  from llama4_jax.model import blockwise
  monkeypatch.setattr(blockwise, "BLOCK", 16)
  model = scout
  extend = nnx.jit(lambda m, *args: m.extend(*args))
  prompts = prompts_for(model.config, (30, 19))
  tokens = np.zeros((2, 32), np.int32)
  for i, p in enumerate(prompts):
    tokens[i, :len(p)] = p
  lengths = np.array([30, 19], np.int32)
  prefill = nnx.jit(lambda m, *args: m.prefill(*args))
  whole, whole_cache = prefill(model, jnp.asarray(tokens), jnp.asarray(lengths), model.init_cache(2, 48))
  cache, start, last = model.init_cache(2, 48), np.zeros(2, np.int32), np.zeros(whole.shape, np.float32)
  for _ in range(3):  # the row of 19 ends in the second piece; the third has none of its tokens
    n = np.minimum(12, lengths - start)
    piece = np.stack([np.pad(tokens[i, start[i]:start[i] + n[i]], (0, 12 - n[i])) for i in range(2)])
    logits, cache = extend(model, jnp.asarray(piece), jnp.asarray(start), jnp.asarray(n), cache)
    last[n > 0] = np.asarray(logits)[n > 0]
    start = start + n
  np.testing.assert_allclose(last, whole, atol=2e-5, rtol=1e-5)
  for a, b in zip(jax.tree.leaves(cache), jax.tree.leaves(whole_cache)):
    np.testing.assert_allclose(a, b, atol=2e-5, rtol=1e-5)


def test_blockwise_prefill_equals_dense_prefill(scout, monkeypatch):
  """The prefill's blockwise attention (blocks of 16 tokens; the chunked layers' chunks of 8 and the
  right padding inside them) gives the logits and the KV cache of a prefill through the dense kernel, and
  so does a prefill in pieces of 24 tokens (one scan of `extend`s; rows end in different pieces)."""
  from llama4_jax.model import attention, blockwise
  monkeypatch.setattr(blockwise, "BLOCK", 16)
  model = scout
  prompts = prompts_for(model.config, (61, 40, 17))
  tokens = np.zeros((3, 64), np.int32)
  for i, p in enumerate(prompts):
    tokens[i, :len(p)] = p
  args = (jnp.asarray(tokens), jnp.asarray([len(p) for p in prompts], jnp.int32))
  prefill = lambda m, *a: m.prefill(*a)  # noqa: E731
  logits, cache = nnx.jit(prefill)(model, *args, model.init_cache(3, 80))

  def dense(q, k, v, positions, segment_ids, chunk_size, mesh=None):
    return attention.dense_attention(q, k, v, attention.attention_mask(positions, segment_ids, chunk_size))
  monkeypatch.setattr(attention, "prefill_attention", dense)
  want_logits, want_cache = nnx.jit(prefill)(model, *args, model.init_cache(3, 80))
  pieces_logits, pieces_cache = nnx.jit(lambda m, *a: m.prefill(*a, piece=24))(model, *args,
                                                                              model.init_cache(3, 80))
  for got, got_cache in ((logits, cache), (pieces_logits, pieces_cache)):
    np.testing.assert_allclose(got, want_logits, atol=2e-5, rtol=1e-5)
    for a, b in zip(jax.tree.leaves(got_cache), jax.tree.leaves(want_cache)):
      np.testing.assert_allclose(a, b, atol=2e-5, rtol=1e-5)


def test_prefill_memory_is_linear_in_length():
  """The compiled prefill of a 4,096-token prompt holds no buffer of T x T / 8 elements (the dense kernel's
  mask alone was T x T; the largest now is one block pair's scores, whatever T is), and its scratch memory
  at most doubles (x2.1) from 2,048 tokens to 4,096."""
  cfg = SCOUT_LIKE.replace(num_hidden_layers=4, max_position_embeddings=8192)
  model = l4.create_model(cfg, seed=0)
  temp = {}
  for t in (2048, 4096):
    cache = jax.eval_shape(lambda: model.init_cache(1, t))  # noqa: B023
    compiled = nnx.jit(lambda m, *a: m.prefill(*a)).lower(
        model, jax.ShapeDtypeStruct((1, t), jnp.int32), jax.ShapeDtypeStruct((1,), jnp.int32),
        cache).compile()
    temp[t] = compiled.memory_analysis().temp_size_in_bytes
  sizes = [int(np.prod([int(d) for d in dims.split(",")]))
           for dims in re.findall(r"\b(?:f32|bf16|s32|pred|u32)\[([\d,]+)\]", compiled.as_text())]
  assert max(sizes) < t * t // 8, max(sizes)
  assert temp[4096] <= 2.1 * temp[2048], temp


def test_context_parallel_generate_equals_one_device(scout, tmp_path):
  """With a context axis of 8 the prefill runs through the ring (zigzag runs of 4 tokens: chunked layers
  exchange K/V in pairs of devices, NoPE layers around the whole ring), the NoPE layers' cache is split
  over `context` along the sequence and decode reduces across its shards: greedy tokens (a ragged batch,
  and one prompt streamed) equal one device's."""
  prompts = prompts_for(scout.config, (30, 45, 60))
  want = generate(scout, prompts, max_new_tokens=12, stop_tokens=[])
  l4.save_pretrained(scout, tmp_path / "ckpt")
  mesh = l4.make_mesh(fsdp=1, context=8)
  model = l4.load_model(tmp_path / "ckpt", mesh=mesh)
  cache = model.init_cache(batch=3, max_length=128)
  nope = [j for j, layer in enumerate(model.blocks) if not layer.kind.rope][0]
  assert cache["blocks"][nope]["k"].sharding.spec[3] == "context"  # [L, B, K, S, H]
  assert generate(model, prompts, max_new_tokens=12, stop_tokens=[]) == want
  assert list(generate_stream(model, prompts[2], 12, stop_tokens=[])) == want[2]


def test_sampling_strategies(scout):
  model = scout
  prompts = prompts_for(model.config)
  greedy = generate(model, prompts, max_new_tokens=12, stop_tokens=[])
  assert generate(model, prompts, 12, temperature=1.0, top_k=1, stop_tokens=[]) == greedy
  a = generate(model, prompts, 12, temperature=1.0, seed=1, stop_tokens=[])
  assert a == generate(model, prompts, 12, temperature=1.0, seed=1, stop_tokens=[])
  assert a != generate(model, prompts, 12, temperature=1.0, seed=2, stop_tokens=[])
  top_p = generate(model, prompts, 12, temperature=1.0, top_p=0.9, seed=1, stop_tokens=[])
  assert all(len(t) == 12 for t in top_p)
  # a row's draws depend on its seed and positions only: the same alone, streamed a token per call
  assert list(generate_stream(model, prompts[0], 12, temperature=1.0, seed=1, stop_tokens=[])) == a[0]
  assert list(generate_stream(model, prompts[2], 12, stop_tokens=[])) == greedy[2]


def test_stop_tokens_end_each_row(scout):
  model = scout
  prompts = prompts_for(model.config)
  free = generate(model, prompts, max_new_tokens=NEW, stop_tokens=[])
  stop = free[1][5]
  out = generate(model, prompts, max_new_tokens=NEW, stop_tokens=[stop])
  for f, o in zip(free, out):
    cut = f.index(stop) + 1 if stop in f else len(f)
    assert o == f[:cut]


def test_bad_prompts(scout):
  model = scout
  with pytest.raises(ValueError, match="prompt 1 is empty"):
    generate(model, [[5], []], 4)
  with pytest.raises(ValueError, match="token id 512 outside the vocabulary"):
    generate(model, [[5, 512]], 4)
  with pytest.raises(ValueError, match="exceeds cache_length=32"):
    generate(model, [[5] * 30], 4, cache_length=32)
  with pytest.raises(ValueError, match="max_position_embeddings"):
    generate(model, [[5] * 10], 5000)


def test_sharded_generate_equals_single_device(scout, tmp_path, monkeypatch):
  """Model and KV cache sharded over 8 devices (kv heads over tensor) give the same tokens, with decode
  attention choosing among several read widths (8, 16, 32, 64 slots) on the sharded cache."""
  from llama4_jax.model import attention
  monkeypatch.setattr(attention, "MIN_READ_WIDTH", 8)
  prompts = prompts_for(scout.config, (5, 9, 13, 17))
  want = generate(scout, prompts, max_new_tokens=16, stop_tokens=[])
  l4.save_pretrained(scout, tmp_path / "ckpt")
  sharded = l4.load_model(tmp_path / "ckpt", mesh=l4.make_mesh(fsdp=4, tensor=2))
  cache = sharded.init_cache(batch=4, max_length=64)
  assert cache["blocks"][0]["k"].sharding.spec[2] == "tensor"  # [L, B, K, S, H]: kv heads split
  assert generate(sharded, prompts, max_new_tokens=16, stop_tokens=[]) == want


def test_argmax_equals_jnp_argmax():
  """The two-reduction argmax: first maximum on ties, first NaN if any, int32."""
  from llama4_jax.inference.sampling import argmax
  rng = np.random.default_rng(0)
  x = rng.normal(size=(6, 1000)).astype(np.float32)
  x[1, [7, 500]] = 9.0  # a tie: the first wins
  x[2, [3, 900]] = np.nan
  x[3, :] = -np.inf
  x[4, 999] = np.inf
  got = argmax(jnp.asarray(x))
  assert got.dtype == jnp.int32
  np.testing.assert_array_equal(got, jnp.argmax(jnp.asarray(x), axis=-1))
  assert list(np.asarray(got[1:4])) == [7, 3, 0]


def copied_cache_shapes(hlo: str, cache) -> set:
  """Shapes of the cache arrays that a compiled program copies whole (`copy` instructions in its HLO)."""
  shapes = {str(list(a.shape)).replace(" ", "") for a in jax.tree.leaves(cache)}
  return set(re.findall(r"= \w+(\[[\d,]+\])\S* copy\(", hlo)) & shapes


def compiled_step(model, cache, slots: int, rows: int):
  """The serving engine's greedy decode step of the first `rows` of `cache`'s `slots` rows, compiled."""
  from llama4_jax.inference.static import split_model
  from llama4_jax.serving.steps import decode_step
  v = lambda x: np.full(slots, x)  # noqa: E731
  static, leaves = split_model(model)
  return decode_step.lower(static, leaves, v(5), v(7), cache, v(0).astype(np.uint32), v(0.0), v(0),
                           v(1.0), rows=rows).compile()


def test_scanned_blocks_keep_their_own_cache():
  """Two scanned superblocks plus a tail layer: decode updates each block's slice of the stacked cache
  (carried through the scan) in place; the tokens equal the uncached sampler's for a ragged batch."""
  from llama4_jax.inference.static import split_for_inference
  cfg = SCOUT_LIKE.replace(num_hidden_layers=9, attention_chunk_size=8, eos_token_id=(2,))
  model = l4.create_model(cfg, seed=5)
  assert model.num_blocks == 2 and len(model.tail) == 1
  prompts = prompts_for(cfg, (3, 11))
  out = generate(model, prompts, max_new_tokens=20, stop_tokens=[])
  assert out == [sample_uncached(model, p, 20, window=64) for p in prompts]
  # on CPU generate runs the unstacked copy (made once, remade when the weights change)
  static, leaves = split_for_inference(model)
  assert static.value[0] is split_for_inference(model)[0].value[0]
  assert len(leaves) > len(jax.tree.leaves(nnx.state(model)))  # 9 layers' own arrays
  model.lm_head[...] = model.lm_head[...] * 2
  assert split_for_inference(model)[1][-1] is not leaves[-1]
  # the compiled decode step (all rows, and the serving engine's first row of 4) copies no cache array
  cache = model.init_cache(batch=4, max_length=64)
  for rows in (1, 4):
    assert not copied_cache_shapes(compiled_step(model, cache, 4, rows).as_text(), cache), rows


def test_one_row_cache_is_written_in_place():
  """One prompt (generate, generate_stream, an engine with one slot) decodes a one-row cache. XLA CPU wrote
  it through a dynamic-update-slice that it duplicated into the attention's read, copying every cache array
  four times a step (a 4,096-token cache of the ~100M MoE: 22 ms a step instead of 9). The compiled step
  of a one-superblock and of a two-superblock model copies no cache array; the tokens stay right."""
  for layers in (5, 9):
    cfg = SCOUT_LIKE.replace(num_hidden_layers=layers, attention_chunk_size=8, eos_token_id=(2,))
    model = l4.create_model(cfg, seed=3)
    cache = model.init_cache(batch=1, max_length=64)
    assert not copied_cache_shapes(compiled_step(model, cache, 1, 1).as_text(), cache), layers
  prompt = prompts_for(cfg, (6,))[0]
  assert list(generate_stream(model, prompt, 20, stop_tokens=[])) == sample_uncached(model, prompt, 20,
                                                                                     window=64)


def test_decode_reads_only_the_filled_part_of_the_cache(monkeypatch):
  """Decode attention reads the smallest of the widths MIN_READ_WIDTH, 2x, ... of the cache that holds
  every row's filled slots. With NaN in the values past them, a step whose rows are all early in the cache
  stays finite (it never reads them; with one width it reads them, and NaN comes out), and generating
  across the width boundaries (8, 16, 32, 64 slots) gives the uncached sampler's tokens."""
  from llama4_jax.model import attention
  cfg = SCOUT_LIKE.replace(attention_chunk_size=16, eos_token_id=(2,))  # rings of 16, global layer 64
  model = l4.create_model(cfg, seed=7)
  prompts = prompts_for(cfg, (3, 6))
  tokens = np.zeros((2, 8), np.int32)
  for i, p in enumerate(prompts):
    tokens[i, :len(p)] = p
  finite = {}
  for min_width in (8, 64):
    monkeypatch.setattr(attention, "MIN_READ_WIDTH", min_width)
    _, cache = jax.jit(model.prefill)(tokens, np.array([3, 6]), model.init_cache(batch=2, max_length=64))
    cache = jax.tree_util.tree_map_with_path(  # NaN values in every layer's slots 8 and beyond
        lambda path, x: x.at[..., 8:, :].set(jnp.nan) if jax.tree_util.keystr(path).endswith("['v']") else x,
        cache)
    logits, _ = jax.jit(model.decode)(np.array([5, 9]), np.array([3, 6]), cache)
    finite[min_width] = bool(np.isfinite(np.asarray(logits)).all())
  assert finite == {8: True, 64: False}
  monkeypatch.setattr(attention, "MIN_READ_WIDTH", 8)
  prompts = prompts_for(cfg, (3, 11, 30))
  got = generate(model, prompts, max_new_tokens=30, stop_tokens=[], cache_length=64)
  assert got == [sample_uncached(model, p, 30, window=64) for p in prompts]


def test_bf16_decode_multiplies_bf16_weights():
  """On CPU a bf16 model's decode step reads its bf16 weights as they are, and keeps its KV cache in f32.
  Asked for bf16 products, XLA CPU converted every weight to float32 at the start of each step (a batch-1
  step of the ~100M benchmark model took 5x the f32 model's), and it wrote into and read a bf16 cache by
  converting it whole. With `ops.dot` and `ops.kv_cache_dtype` the bf16 step copies no cache array and
  needs no more scratch memory than the f32 one; greedy decoding still equals the uncached sampler."""
  temp, models = {}, {}
  for dt in ("float32", "bfloat16"):
    # a larger vocabulary than the other tests', so that a converted weight shows in the temp memory
    cfg = SCOUT_LIKE.replace(param_dtype=dt, dtype=dt, eos_token_id=(2,), vocab_size=8192)
    models[dt] = model = l4.create_model(cfg, seed=1)
    for rows in (1, 4):
      cache = model.init_cache(batch=4, max_length=64)
      assert all(a.dtype in (jnp.float32, jnp.int32) for a in jax.tree.leaves(cache))
      compiled = compiled_step(model, cache, 4, rows)
      temp[dt, rows] = compiled.memory_analysis().temp_size_in_bytes
      assert not copied_cache_shapes(compiled.as_text(), cache), (dt, rows)
  for rows in (1, 4):
    assert temp["bfloat16", rows] <= temp["float32", rows], temp
  model = models["bfloat16"]
  prompts = prompts_for(model.config, (4, 9))
  assert generate(model, prompts, 12, stop_tokens=[]) == [sample_uncached(model, p, 12, window=64)
                                                          for p in prompts]
