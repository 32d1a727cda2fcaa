"""Checkpoint conversion: Hugging Face -> Orbax -> Hugging Face is bit-identical, transformers loads the
result, our loaders read the Orbax side, and every bad input fails cleanly without leaving output."""

import json
import os
import shutil
import subprocess
import sys

import numpy as np
import pytest

import llama4_jax as l4
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


@pytest.mark.parametrize("which", ["causal_single_file", "conditional_sharded"])
def test_round_trip_is_bit_identical_and_loads(which, scout_ckpt, conditional_ckpt, tmp_path):
  import transformers as tf
  src, ref = scout_ckpt if which == "causal_single_file" else conditional_ckpt
  cfg = SCOUT_LIKE if which == "causal_single_file" else MAVERICK_LIKE
  summary = hf_to_orbax(src, tmp_path / "orbax", progress=False)
  assert summary["tensors"] > 0 and summary["bytes"] > 0
  orbax_to_hf(tmp_path / "orbax", tmp_path / "hf", max_shard_size="40KB", progress=False)
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
  proc = subprocess.run(cmd + ["hf-to-orbax", str(src), str(tmp_path / "o"), "--dtype=bfloat16"],
                        cwd=REPO, capture_output=True, text=True, timeout=300)
  assert proc.returncode == 0, proc.stderr[-2000:]
  summary = json.loads(proc.stdout.strip().splitlines()[-1])
  assert summary["dtype"] == "bfloat16" and summary["bytes_per_sec"] > 0
  assert "MB/s" in proc.stderr  # the progress line
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
