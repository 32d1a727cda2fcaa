"""Checkpoint conversion: Hugging Face -> Orbax -> Hugging Face is bit-identical, transformers loads the
result, our loaders read the Orbax side, and every bad input fails cleanly without leaving output."""

import json
import os
import shutil
import subprocess
import sys
import threading
import warnings

import jax
import numpy as np
import pytest

import llama4_jax as l4
from llama4_jax.checkpoint import convert
from llama4_jax.checkpoint.convert import hf_to_orbax, orbax_to_hf
from llama4_jax.checkpoint.hf import HFTensors
from llama4_jax.checkpoint.safetensors_io import CheckpointError

from conftest import MAVERICK_LIKE, SCOUT_LIKE, hf_logits, make_hf_checkpoint, random_ids

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


@pytest.fixture(scope="module")
def conditional_ckpt(tmp_path_factory):
  """A sharded Llama4ForConditionalGeneration checkpoint (vision tower included)."""
  d = tmp_path_factory.mktemp("conditional")
  model = make_hf_checkpoint(MAVERICK_LIKE, d, seed=4, conditional=True, max_shard_size="40KB")
  return d, model


def assert_same_tensors(a_dir, b_dir):
  a, b = HFTensors(str(a_dir)), HFTensors(str(b_dir))
  assert set(a.keys()) == set(b.keys())
  for key in a.keys():
    assert a[key].dtype == b[key].dtype and np.array_equal(a[key], b[key]), key


def orbax_items(directory):
  return [n for n in os.listdir(directory / "checkpoints" / "0" / "tensors") if n.startswith("group.")]


@pytest.mark.parametrize("which", ["causal_single_file", "conditional_sharded"])
def test_round_trip_is_bit_identical_and_loads(which, scout_ckpt, conditional_ckpt, tmp_path, monkeypatch):
  import transformers as tf
  src, ref = scout_ckpt if which == "causal_single_file" else conditional_ckpt
  cfg = SCOUT_LIKE if which == "causal_single_file" else MAVERICK_LIKE
  monkeypatch.setattr(convert, "GROUP_BYTES", 64 << 10)  # many Orbax items, as for a real model
  summary = hf_to_orbax(src, tmp_path / "orbax", progress=False)
  assert summary["tensors"] > 0 and summary["bytes"] > 0
  assert len(orbax_items(tmp_path / "orbax")) >= 4
  import orbax.checkpoint as ocp
  restored, real = [], ocp.PyTreeCheckpointer.restore
  def restore(self, path, *args, **kwargs):
    restored.append((os.path.basename(path), threading.current_thread().name))
    return real(self, path, *args, **kwargs)
  monkeypatch.setattr(ocp.PyTreeCheckpointer, "restore", restore)
  orbax_to_hf(tmp_path / "orbax", tmp_path / "hf", max_shard_size="40KB", progress=False)
  # each item restored once, all but the first read ahead on a thread, which is gone at the end
  items = sorted(orbax_items(tmp_path / "orbax"))
  assert sorted(item for item, _ in restored) == items
  assert sorted(item for item, thread in restored if thread.startswith("orbax-read-ahead")) == items[1:]
  assert not [t for t in threading.enumerate() if t.name.startswith("orbax-read-ahead")]
  monkeypatch.undo()
  assert_same_tensors(src, tmp_path / "hf")
  assert (l4.from_hf_config(str(tmp_path / "hf")) == l4.from_hf_config(str(src)))
  ids = random_ids(cfg)
  # (transformers 5.24's ConditionalGeneration forward fails on text-only input: compare its text model)
  text = (lambda m: m) if which == "causal_single_file" else (lambda m: m.language_model.eval())  # noqa
  want = hf_logits(text(ref), ids)
  cls = tf.Llama4ForCausalLM if which == "causal_single_file" else tf.Llama4ForConditionalGeneration
  reloaded = cls.from_pretrained(tmp_path / "hf").eval()
  assert isinstance(reloaded, cls)
  np.testing.assert_array_equal(hf_logits(text(reloaded), ids), want)
  # our loaders read the Orbax side: one device, and sharded on a mesh
  np.testing.assert_allclose(np.asarray(l4.load_model(tmp_path / "orbax")(ids)), want, atol=2e-5)
  mesh = l4.make_mesh(fsdp=4, tensor=2)
  sharded = l4.load_model(tmp_path / "orbax", mesh=mesh)
  np.testing.assert_allclose(np.asarray(sharded(ids)), want, atol=2e-5)


def test_dtype_conversion_and_cli(scout_ckpt, tmp_path):
  src, _ = scout_ckpt
  cmd = [sys.executable, "-m", "llama4_jax.convert"]
  proc = subprocess.run(cmd + ["hf-to-orbax", str(src), str(tmp_path / "o"), "--dtype=bfloat16",
                               "--compress"],
                        cwd=REPO, capture_output=True, text=True, timeout=300)
  assert proc.returncode == 0, proc.stderr[-2000:]
  summary = json.loads(proc.stdout.strip().splitlines()[-1])
  assert summary["dtype"] == "bfloat16" and summary["bytes_per_sec"] > 0
  assert "B/s]" in proc.stderr  # the progress bar's last state
  proc = subprocess.run(cmd + ["orbax-to-hf", str(tmp_path / "o"), str(tmp_path / "h")], cwd=REPO,
                        capture_output=True, text=True, timeout=300)
  assert proc.returncode == 0, proc.stderr[-2000:]
  out = HFTensors(str(tmp_path / "h"))
  key = "model.layers.0.self_attn.q_proj.weight"
  assert out[key].dtype.name == "bfloat16"
  np.testing.assert_array_equal(out[key], HFTensors(str(src))[key].astype(out[key].dtype))
  # DST exists: exit code 2, a clear message, DST untouched
  proc = subprocess.run(cmd + ["orbax-to-hf", str(tmp_path / "o"), str(tmp_path / "h")], cwd=REPO,
                        capture_output=True, text=True, timeout=300)
  assert proc.returncode == 2 and "--overwrite" in proc.stderr
  assert sorted(os.listdir(tmp_path / "h")) == ["config.json", "generation_config.json",
                                                 "model.safetensors"]


def corrupt(src, dst, how):
  shutil.copytree(src, dst)
  index = json.load(open(dst / "model.safetensors.index.json"))
  files = sorted(set(index["weight_map"].values()))
  if how == "truncated":
    path = dst / files[3]
    data = path.read_bytes()
    path.write_bytes(data[: len(data) - 100])
  elif how == "missing_shard":
    os.remove(dst / files[5])
  elif how in ("unknown_key", "missing_key", "shape_mismatch"):
    from llama4_jax.checkpoint.safetensors_io import SafetensorsFile, write_safetensors
    name = index["weight_map"]["language_model.model.layers.1.self_attn.k_proj.weight"]
    f = SafetensorsFile(str(dst / name))
    arrays = {k: np.array(f[k]) for k in f.keys()}
    if how == "unknown_key":
      arrays["language_model.model.layers.1.self_attn.extra.weight"] = np.zeros(3, np.float32)
      index["weight_map"]["language_model.model.layers.1.self_attn.extra.weight"] = name
    elif how == "missing_key":
      arrays.pop("language_model.model.layers.1.self_attn.k_proj.weight")
      index["weight_map"].pop("language_model.model.layers.1.self_attn.k_proj.weight")
    else:
      k = "language_model.model.layers.1.self_attn.k_proj.weight"
      arrays[k] = arrays[k][:-1]
    write_safetensors(str(dst / name), {k: (v.shape, v.dtype) for k, v in arrays.items()},
                      lambda k: arrays[k])
    json.dump(index, open(dst / "model.safetensors.index.json", "w"))


@pytest.mark.parametrize("how,message", [
    ("truncated", r"model-00004-of-.*is truncated"),
    ("missing_shard", r"shard model-00006-of-.* is named in .* but missing"),
    ("unknown_key", r"unexpected tensor 'language_model.model.layers.1.self_attn.extra.weight'"),
    ("missing_key", r"tensor 'language_model.model.layers.1.self_attn.k_proj.weight' is missing"),
    ("shape_mismatch", r"k_proj.weight' in .* has shape \(31, 64\), but the config implies \(32, 64\)"),
])
def test_bad_input_fails_cleanly(how, message, conditional_ckpt, tmp_path):
  src = tmp_path / "src"
  corrupt(conditional_ckpt[0], src, how)
  with pytest.raises(CheckpointError, match=message):
    hf_to_orbax(src, tmp_path / "out", progress=False)
  assert sorted(os.listdir(tmp_path)) == ["src"]  # no DST and no temporary sibling left behind


def test_existing_destination_is_kept(scout_ckpt, tmp_path):
  (tmp_path / "out").mkdir()
  (tmp_path / "out" / "keep.txt").write_text("mine")
  with pytest.raises(FileExistsError, match="overwrite"):
    hf_to_orbax(scout_ckpt[0], tmp_path / "out", progress=False)
  assert os.listdir(tmp_path / "out") == ["keep.txt"]
  hf_to_orbax(scout_ckpt[0], tmp_path / "out", overwrite=True, progress=False)
  assert "checkpoints" in os.listdir(tmp_path / "out") and "keep.txt" not in os.listdir(tmp_path / "out")
  assert sorted(os.listdir(tmp_path)) == ["out"]


# ------------------------------------------------------------------------------------------------
# Meta's original format, written here from a transformers model (heads divisible by 4 shards)

META_LIKE = MAVERICK_LIKE.replace(num_attention_heads=8, num_key_value_heads=4, head_dim=8)


def write_meta_checkpoint(hf_model, cfg, directory, shards):
  """params.json + consolidated.NN.pth in Meta's model-parallel layout (LLAMA4.md), from HF weights."""
  import torch
  sd = {k: v.detach() for k, v in hf_model.state_dict().items()}
  split = lambda t, dim: torch.chunk(t, shards, dim=dim)  # noqa: E731
  parts = [{} for _ in range(shards)]

  def put(name, pieces):
    for part, piece in zip(parts, pieces):
      part[name] = piece.clone().contiguous()

  put("tok_embeddings.weight", split(sd["model.embed_tokens.weight"], 0))
  put("output.weight", split(sd["lm_head.weight"], 0))
  put("norm.weight", [sd["model.norm.weight"]] * shards)
  put("rope.freqs", [torch.zeros(cfg.head_dim // 2)] * shards)  # not a weight: skipped
  f = cfg.intermediate_size
  for i in range(cfg.num_hidden_layers):
    hf, meta = f"model.layers.{i}.", f"layers.{i}."
    q, k, v = (split(sd[hf + f"self_attn.{n}_proj.weight"], 0) for n in "qkv")
    put(meta + "attention.wqkv.weight", [torch.cat(t) for t in zip(q, k, v)])
    put(meta + "attention.wo.weight", split(sd[hf + "self_attn.o_proj.weight"], 1))
    put(meta + "attention_norm.weight", [sd[hf + "input_layernorm.weight"]] * shards)
    put(meta + "ffn_norm.weight", [sd[hf + "post_attention_layernorm.weight"]] * shards)
    ff, mf = hf + "feed_forward.", meta + "feed_forward."
    if cfg.is_moe_layer(i):
      e, d = cfg.num_local_experts, cfg.hidden_size
      gate_up, down = sd[ff + "experts.gate_up_proj"], sd[ff + "experts.down_proj"]
      put(mf + "router_DE", [sd[ff + "router.weight"].T] * shards)
      put(mf + "experts.moe_w_in_eD_F", [t.reshape(e * d, -1) for t in split(gate_up[..., :f], 2)])
      put(mf + "experts.moe_w_swiglu_eD_F", [t.reshape(e * d, -1) for t in split(gate_up[..., f:], 2)])
      put(mf + "experts.moe_w_out_eF_D", [t.reshape(-1, d) for t in split(down, 1)])
      put(mf + "w_in_shared_FD.weight", split(sd[ff + "shared_expert.gate_proj.weight"], 0))
      put(mf + "w_swiglu_FD.weight", split(sd[ff + "shared_expert.up_proj.weight"], 0))
      put(mf + "w_out_shared_DF.weight", split(sd[ff + "shared_expert.down_proj.weight"], 1))
    else:
      put(mf + "w1.weight", split(sd[ff + "gate_proj.weight"], 0))
      put(mf + "w3.weight", split(sd[ff + "up_proj.weight"], 0))
      put(mf + "w2.weight", split(sd[ff + "down_proj.weight"], 1))
  os.makedirs(directory, exist_ok=True)
  for s, part in enumerate(parts):
    torch.save(part, os.path.join(directory, f"consolidated.{s:02d}.pth"))
  params = {"dim": cfg.hidden_size, "n_layers": cfg.num_hidden_layers, "n_heads": cfg.num_attention_heads,
            "n_kv_heads": cfg.num_key_value_heads, "norm_eps": cfg.rms_norm_eps, "rope_theta": cfg.rope_theta,
            "use_scaled_rope": False, "nope_layer_interval": cfg.no_rope_layer_interval,
            "attention_chunk_size": cfg.attention_chunk_size, "use_qk_norm": cfg.use_qk_norm,
            "floor_scale": cfg.floor_scale, "attn_scale": cfg.attn_scale,
            "moe_args": {"num_experts": cfg.num_local_experts, "top_k": cfg.num_experts_per_tok,
                         "interleave_moe_layer_step": cfg.interleave_moe_layer_step}}
  with open(os.path.join(directory, "params.json"), "w") as fh:
    json.dump(params, fh)


@pytest.fixture(scope="module")
def meta_reference(tmp_path_factory):
  d = tmp_path_factory.mktemp("meta_hf")
  return make_hf_checkpoint(META_LIKE, d, seed=6)


@pytest.mark.parametrize("shards", [2, 4])
def test_meta_to_orbax_gives_transformers_logits(shards, meta_reference, tmp_path):
  write_meta_checkpoint(meta_reference, META_LIKE, tmp_path / "meta", shards)
  from llama4_jax.checkpoint.convert import meta_to_orbax
  summary = meta_to_orbax(tmp_path / "meta", tmp_path / "orbax", progress=False)
  assert summary["what"] == "meta-to-orbax"
  model = l4.load_model(tmp_path / "orbax")
  assert model.config.intermediate_size == META_LIKE.intermediate_size
  assert model.config.intermediate_size_mlp == META_LIKE.intermediate_size_mlp
  ids = random_ids(META_LIKE)
  np.testing.assert_allclose(np.asarray(model(ids)), hf_logits(meta_reference, ids), atol=2e-5)


def test_meta_bad_input(meta_reference, tmp_path):
  from llama4_jax.checkpoint.convert import meta_to_orbax
  write_meta_checkpoint(meta_reference, META_LIKE, tmp_path / "meta", 2)
  (tmp_path / "meta" / "consolidated.01.pth").write_bytes(b"not a checkpoint")
  with pytest.raises(CheckpointError, match="consolidated.01.pth cannot be read"):
    meta_to_orbax(tmp_path / "meta", tmp_path / "out", progress=False)
  os.remove(tmp_path / "meta" / "params.json")
  with pytest.raises(CheckpointError, match="no params.json"):
    meta_to_orbax(tmp_path / "meta", tmp_path / "out", progress=False)
  assert sorted(os.listdir(tmp_path)) == ["meta"]


def test_incomplete_or_outdated_orbax_fails_cleanly(scout_ckpt, tmp_path, monkeypatch):
  monkeypatch.setattr(convert, "GROUP_BYTES", 64 << 10)
  hf_to_orbax(scout_ckpt[0], tmp_path / "orbax", progress=False)
  tensors = tmp_path / "orbax" / "checkpoints" / "0" / "tensors"
  shutil.rmtree(tensors / sorted(orbax_items(tmp_path / "orbax"))[1])
  for read in (lambda: l4.load_model(tmp_path / "orbax"),
               lambda: orbax_to_hf(tmp_path / "orbax", tmp_path / "hf", progress=False)):
    with pytest.raises(CheckpointError, match=r"group\.00001 \(holding .*\) is missing: the converted "
                                              "checkpoint is incomplete"):
      read()
  assert not os.path.exists(tmp_path / "hf") and sorted(os.listdir(tmp_path)) == ["orbax"]
  manifest = json.loads((tensors / "manifest.json").read_text())
  (tensors / "manifest.json").write_text(json.dumps(dict(manifest, format=1)))
  with pytest.raises(CheckpointError, match="format 1, this version reads format 2; convert the source"):
    l4.load_model(tmp_path / "orbax")


@pytest.mark.parametrize("layout", ["layer_chunks", "before_layer_chunks"])
def test_training_checkpoint_exports_a_layer_at_a_time(layout, tmp_path, monkeypatch):
  """A training checkpoint of two superblocks: its stacked leaves are stored a superblock per chunk, and
  orbax-to-hf reads them one superblock at a time (from checkpoints written before that layout too, with a
  warning: there each read decodes the whole leaf); either way the export equals `save_pretrained`."""
  import dataclasses

  import orbax.checkpoint as ocp
  from flax import nnx

  from llama4_jax.checkpoint.keys import plan
  from llama4_jax.checkpoint.orbax import StateLeaves
  from llama4_jax.checkpoint import training as checkpointing
  cfg = dataclasses.replace(MAVERICK_LIKE, num_hidden_layers=8)
  model = l4.create_model(cfg, seed=3)
  stacked = {("params", *map(str, p.path)) for p in plan(model) if p.stacked}
  assert {p.shape[0] for p in plan(model) if p.stacked} == {2}
  if layout == "before_layer_chunks":
    monkeypatch.setattr(checkpointing, "layer_chunks", lambda state: jax.tree.map(lambda _: ocp.SaveArgs(),
                                                                                  state))
  ckpt = checkpointing.Checkpointer(str(tmp_path / "work" / "checkpoints"), keep=1, async_save=False)
  ckpt.save(0, {"params": nnx.to_pure_dict(nnx.state(model))}, {}, cfg, force=True)
  ckpt.close()
  leaves = StateLeaves(str(tmp_path / "work" / "checkpoints" / "0" / "state"))
  assert all(leaves.layer_chunked(path) == (layout == "layer_chunks") for path in stacked)
  reads, real_read = [], StateLeaves.read
  monkeypatch.setattr(StateLeaves, "read", lambda self, path, index=None: (
      reads.append((tuple(map(str, path)), index)), real_read(self, path, index))[1])
  with warnings.catch_warnings(record=True) as caught:
    warnings.simplefilter("always")
    orbax_to_hf(tmp_path / "work", tmp_path / "exported", progress=False)
  l4.save_pretrained(model, tmp_path / "reference")
  assert_same_tensors(tmp_path / "reference", tmp_path / "exported")
  stacked_reads = [index for path, index in reads if path in stacked]
  assert sorted(stacked_reads) == sorted([0, 1] * len(stacked)), "a stack was read whole or twice"
  old_layout = [w for w in caught if "before training checkpoints stored a layer per chunk" in str(w.message)]
  assert len(old_layout) == (layout == "before_layer_chunks")
  if layout == "layer_chunks":  # damaged: chunk data gone, then the metadata
    state = tmp_path / "work" / "checkpoints" / "0" / "state"
    damage = [lambda: [p.unlink() for p in state.rglob("d/*")], lambda: (state / "_METADATA").unlink()]
    for harm, match in zip(damage, ("cannot be (opened|read) .*: the checkpoint is incomplete or damaged",
                                    "_METADATA cannot be read .*: the checkpoint is incomplete")):
      harm()
      with pytest.raises(CheckpointError, match=match):
        orbax_to_hf(tmp_path / "work", tmp_path / "damaged", progress=False)
      assert not os.path.exists(tmp_path / "damaged")


def test_round_trip_through_a_bucket(conditional_ckpt, gcs, tmp_path):
  """hf-to-orbax into Cloud Storage (the emulator) and orbax-to-hf back out, to local disk and into the
  bucket, are bit-exact, vision tensors and side files included; a Hugging Face checkpoint in the bucket
  converts and loads (sharded: each device's slice a ranged read); the bucket holds no temporary prefix
  afterwards; load_model reads every one of them alike; an existing output is not overwritten unasked."""
  from flax import nnx

  from llama4_jax import storage
  src, _ = conditional_ckpt
  bucket, _ = gcs
  dst, hf_there = f"{bucket}/converted", f"{bucket}/exported"
  hf_to_orbax(src, dst, progress=False)
  assert storage.exists(f"{dst}/checkpoints/0/commit_success.txt")
  orbax_to_hf(dst, tmp_path / "hf", max_shard_size="40KB", progress=False)
  assert_same_tensors(src, tmp_path / "hf")
  orbax_to_hf(dst, hf_there, max_shard_size="40KB", progress=False)
  hf_to_orbax(hf_there, tmp_path / "orbax", progress=False)
  assert not [n for n in storage.listdir(bucket) if ".tmp-" in n]
  orbax_to_hf(tmp_path / "orbax", tmp_path / "hf2", max_shard_size="40KB", progress=False)
  assert_same_tensors(src, tmp_path / "hf2")
  here = nnx.to_pure_dict(nnx.state(l4.load_model(str(src))))
  for there in (l4.load_model(dst), l4.load_model(hf_there, mesh=l4.make_mesh(fsdp=4, tensor=2))):
    jax.tree.map(np.testing.assert_array_equal, here, nnx.to_pure_dict(nnx.state(there)))
  with pytest.raises(FileExistsError, match="--overwrite"):
    hf_to_orbax(src, dst, progress=False)
