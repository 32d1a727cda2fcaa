"""Logits against transformers' Llama4ForCausalLM (fp32, batch 2, sequences over three chunks long)."""

import jax.numpy as jnp
import numpy as np
import pytest
import transformers as tf

import llama4_jax as l4
from conftest import CHUNK, MAVERICK_LIKE, SCOUT_LIKE, SEQ, hf_logits, make_hf_checkpoint, random_ids

TOL = 1e-4


@pytest.mark.parametrize("seq", [SEQ, 384])  # 384: several query blocks of the attention kernel
@pytest.mark.parametrize("ckpt", ["scout_ckpt", "maverick_ckpt"])
def test_logits_match_transformers(ckpt, seq, request):
  directory, hf_model = request.getfixturevalue(ckpt)
  model = l4.load_model(directory)
  assert model.config.attn_temperature_tuning and model.config.floor_scale < seq  # tuning is active
  ids = random_ids(model.config, batch=2, seq=seq)
  ours = np.asarray(model(jnp.asarray(ids)))
  ref = hf_logits(hf_model, ids)
  assert ours.shape == (2, seq, model.config.vocab_size) and ours.dtype == np.float32
  diff = np.abs(ours - ref).max()
  print(f"{ckpt} T={seq}: max |ours - transformers| = {diff:.3g} (logit scale {np.abs(ref).max():.3g})")
  assert diff < TOL


def test_config_read_back(scout_ckpt, maverick_ckpt):
  assert l4.from_hf_config(scout_ckpt[0]) == SCOUT_LIKE
  assert l4.from_hf_config(maverick_ckpt[0]) == MAVERICK_LIKE


def test_packed_documents_equal_separate_runs(scout_ckpt):
  model = l4.load_model(scout_ckpt[0])
  lengths = (CHUNK + 5, 2 * CHUNK + 3)  # the boundary falls inside a chunk
  docs = [random_ids(model.config, 1, n, seed=i)[0] for i, n in enumerate(lengths)]
  packed = np.concatenate(docs)[None]
  positions = np.concatenate([np.arange(n) for n in lengths])[None]
  segments = np.concatenate([np.full(n, i + 1) for i, n in enumerate(lengths)])[None]
  out = np.asarray(model(jnp.asarray(packed), positions=jnp.asarray(positions),
                         segment_ids=jnp.asarray(segments)))
  start = 0
  for doc in docs:
    alone = np.asarray(model(jnp.asarray(doc[None])))[0]
    np.testing.assert_allclose(out[0, start:start + len(doc)], alone, atol=2e-5, rtol=0)
    start += len(doc)


def test_unscanned_equals_scanned(maverick_ckpt):
  ids = jnp.asarray(random_ids(MAVERICK_LIKE))
  scanned = np.asarray(l4.load_model(maverick_ckpt[0])(ids))
  unrolled = np.asarray(l4.load_model(maverick_ckpt[0], scan_layers=False)(ids))
  np.testing.assert_allclose(scanned, unrolled, atol=1e-5, rtol=0)


# bf16 vs fp32 on these tiny models (logit scale ~5): weight rounding alone is ~0.4% per weight, and a
# token whose top-1 expert flips under rounding moves by more, so the bound is on the distribution.
BF16_MEAN_TOL, BF16_P99_TOL = 0.03, 0.15


def test_bf16_close_to_fp32(scout_ckpt):
  ids = jnp.asarray(random_ids(SCOUT_LIKE))
  fp32 = np.asarray(l4.load_model(scout_ckpt[0])(ids))
  model16 = l4.load_model(scout_ckpt[0], dtype="bfloat16")
  assert model16.embed.dtype == jnp.bfloat16
  bf16 = np.asarray(model16(ids))
  assert bf16.dtype == np.float32
  diff = np.abs(bf16 - fp32)
  print(f"bf16 vs fp32: |diff| max {diff.max():.3g}, p99 {np.quantile(diff, 0.99):.3g}, "
        f"mean {diff.mean():.3g}")
  assert diff.mean() < BF16_MEAN_TOL and np.quantile(diff, 0.99) < BF16_P99_TOL
  # the top-1 prediction agrees almost everywhere
  assert (bf16.argmax(-1) == fp32.argmax(-1)).mean() > 0.95


def test_save_pretrained_roundtrip_through_transformers(maverick_ckpt, tmp_path):
  model = l4.load_model(maverick_ckpt[0])
  out = l4.save_pretrained(model, tmp_path / "export", max_shard_size="30KB")
  assert (tmp_path / "export" / "model.safetensors.index.json").exists()
  reloaded_hf = tf.Llama4ForCausalLM.from_pretrained(out).eval()
  ids = random_ids(MAVERICK_LIKE, seed=3)
  np.testing.assert_allclose(hf_logits(reloaded_hf, ids), np.asarray(model(jnp.asarray(ids))),
                             atol=TOL, rtol=0)
  # and the exported tensors are the originals, bit for bit
  original = maverick_ckpt[1].state_dict()
  for name, tensor in reloaded_hf.state_dict().items():
    np.testing.assert_array_equal(tensor.numpy(), original[name].numpy(), err_msg=name)
  with pytest.raises(FileExistsError, match="not empty"):
    l4.save_pretrained(model, out)


def test_conditional_generation_layout(tmp_path):
  hf_model = make_hf_checkpoint(MAVERICK_LIKE, tmp_path, seed=4, conditional=True)
  model = l4.load_model(tmp_path)
  assert model.config == MAVERICK_LIKE
  ids = random_ids(MAVERICK_LIKE, seed=5)
  text_model = hf_model.language_model.eval()
  assert isinstance(text_model, tf.Llama4ForCausalLM)
  np.testing.assert_allclose(np.asarray(model(jnp.asarray(ids))), hf_logits(text_model, ids),
                             atol=TOL, rtol=0)


def test_remat_gives_same_gradients(maverick_ckpt):
  from flax import nnx
  ids = jnp.asarray(random_ids(MAVERICK_LIKE))

  def grads(policy):
    model = l4.load_model(maverick_ckpt[0], remat_policy=policy)
    g = nnx.grad(lambda m: jnp.mean(m(ids) ** 2))(model)
    return g.blocks[1].ffn.gate[...], g.embed[...]

  for a, b in zip(grads("none"), grads("full")):
    np.testing.assert_allclose(np.asarray(a), np.asarray(b), rtol=1e-5, atol=1e-7)


def test_save_pretrained_overwrite_replaces(maverick_ckpt, tmp_path):
  model = l4.load_model(maverick_ckpt[0])
  out = tmp_path / "export"
  out.mkdir()
  (out / "stale.txt").write_text("old")
  l4.save_pretrained(model, out, overwrite=True)
  assert not (out / "stale.txt").exists() and (out / "model.safetensors").exists()
  assert [p.name for p in tmp_path.iterdir()] == ["export"]  # no temporary siblings left behind
