"""Meshes and sharded models on 8 simulated CPU devices."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.sharding import PartitionSpec as P

import llama4_jax as l4
from conftest import SCOUT_LIKE, random_ids
from llama4_jax.sharding import logical_to_spec


def test_eight_devices():
  assert jax.device_count() == 8


def test_make_mesh_shapes_and_errors():
  assert dict(l4.make_mesh().shape) == dict(data=1, fsdp=8, tensor=1, expert=1, context=1)
  assert dict(l4.make_mesh(fsdp=2, tensor=2, expert=2).shape)["expert"] == 2
  assert dict(l4.make_mesh(data=2, fsdp=-1, tensor=2).shape)["fsdp"] == 2
  with pytest.raises(ValueError, match=r"fsdp=3 .*do not divide the 8 devices"):
    l4.make_mesh(fsdp=3, tensor=-1)
  with pytest.raises(ValueError, match="needs 6 devices but 8 are available"):
    l4.make_mesh(fsdp=3, tensor=2)
  with pytest.raises(ValueError, match="only one mesh axis may be -1"):
    l4.make_mesh(data=-1, fsdp=-1)


def test_mesh_flag():
  """The CLIs' --mesh: AXIS=SIZE pairs, the rest 1 (one may be -1); bad flags name what is wrong."""
  from llama4_jax.sharding import mesh_from_flag
  assert mesh_from_flag(None) is None and mesh_from_flag("") is None
  assert dict(mesh_from_flag("fsdp=4, tensor=2").shape) == dict(data=1, fsdp=4, tensor=2, expert=1, context=1)
  assert dict(mesh_from_flag("tensor=2,data=-1").shape)["data"] == 4
  for spec, message in (("fsdp4", "is not AXIS=SIZE"), ("model=8", r"unknown axes \['model'\]"),
                        ("tensor=3", "needs 3 devices but 8 are available")):
    with pytest.raises(ValueError, match=message):
      mesh_from_flag(spec)
  assert dict(mesh_from_flag("context=8").shape)["context"] == 8  # training, sampling and serving


def test_rules_reject_collisions():
  mesh = l4.make_mesh(fsdp=8)
  with pytest.raises(ValueError, match="both map to mesh axis 'fsdp'"):
    logical_to_spec(("batch", "embed"), mesh)
  assert logical_to_spec(("embed", "heads", "head_dim"), mesh) == P("fsdp", None, None)


def test_heads_not_divisible_by_tensor():
  mesh = l4.make_mesh(fsdp=1, tensor=8)
  with pytest.raises(ValueError, match=r"num_attention_heads=4 is not divisible by the mesh's tensor=8"):
    l4.create_model(SCOUT_LIKE, mesh=mesh)


@pytest.fixture(scope="module")
def single_device_logits(scout_ckpt):
  ids = random_ids(SCOUT_LIKE, batch=8)
  return ids, np.asarray(l4.load_model(scout_ckpt[0])(jnp.asarray(ids)))


@pytest.mark.parametrize("axes", [dict(fsdp=8), dict(fsdp=2, tensor=2, expert=2)])
def test_sharded_logits_equal_single_device(axes, scout_ckpt, single_device_logits):
  ids, want = single_device_logits
  mesh = l4.make_mesh(**axes)
  model = l4.load_model(scout_ckpt[0], mesh=mesh)
  q = model.blocks[0].attn.q  # the model dim over fsdp and, for weights other than experts, expert too
  assert q.sharding.spec == P(None, ("fsdp", "expert") if "expert" in axes else "fsdp",
                              "tensor" if "tensor" in axes else None, None)
  gate = model.blocks[0].ffn.gate  # [L, E, D, F]: each device holds only its share
  nb, e, d, f = gate.shape
  fsdp, tensor, expert = (axes.get(a, 1) for a in ("fsdp", "tensor", "expert"))
  assert gate.addressable_shards[0].data.shape == (nb, e // expert, d // fsdp, f // tensor)
  got = model(jnp.asarray(ids))
  np.testing.assert_allclose(np.asarray(got), want, atol=2e-5, rtol=0)


def test_create_model_on_mesh():
  mesh = l4.make_mesh(fsdp=4, tensor=2)
  model = l4.create_model(SCOUT_LIKE, mesh=mesh)
  assert model.embed.sharding.spec == P("tensor", "fsdp")
  assert model(jnp.asarray(random_ids(SCOUT_LIKE, batch=4))).shape == (4, 56, SCOUT_LIKE.vocab_size)


def test_chunked_loss_equals_the_whole_logits():
  """loss_chunks: the logits built T / chunks tokens at a time (rematerialized in the backward pass) give
  the same per-token losses and gradients with the sequence split over context=2 (zigzag) x fsdp=4, and
  the compiled gradient needs less scratch memory per device."""
  from flax import nnx
  from conftest import SEQ
  from llama4_jax.train.step import token_losses
  cfg = SCOUT_LIKE.replace(num_hidden_layers=1, vocab_size=2048)  # logits large next to the rest
  rng = np.random.RandomState(0)
  batch = {"inputs": rng.randint(0, cfg.vocab_size, (2, SEQ)).astype(np.int32),
           "targets": rng.randint(0, cfg.vocab_size, (2, SEQ)).astype(np.int32),
           "positions": np.tile(np.arange(SEQ, dtype=np.int32), (2, 1)),
           "segment_ids": np.ones((2, SEQ), np.int32)}
  graphdef, state = nnx.split(l4.create_model(cfg, mesh=l4.make_mesh(fsdp=4, context=2), seed=1))

  def loss(state, chunks):
    losses, _ = token_losses(nnx.merge(graphdef, state), batch, chunks=chunks)
    return jnp.sum(losses ** 2), losses

  got = {}
  for chunks in (1, 4):
    compiled = jax.jit(jax.grad(loss, has_aux=True), static_argnums=1).lower(state, chunks).compile()
    got[chunks] = compiled(state), compiled.memory_analysis().temp_size_in_bytes
  ((g1, l1), temp1), ((g4, l4_), temp4) = got[1], got[4]
  np.testing.assert_allclose(np.asarray(l4_), np.asarray(l1), rtol=1e-6, atol=1e-6)
  for a, b in zip(jax.tree.leaves(g4), jax.tree.leaves(g1)):  # float32 sums in another order
    assert np.abs(np.asarray(a) - np.asarray(b)).max() <= 1e-5 * np.abs(np.asarray(b)).max()
  assert temp4 < temp1, (temp4, temp1)
