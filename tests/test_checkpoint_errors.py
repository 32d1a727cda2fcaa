"""Bad checkpoints and bad input give errors that name the problem."""

import json
import os
import shutil

import jax.numpy as jnp
import numpy as np
import pytest

import llama4_jax as l4
from llama4_jax.checkpoint.safetensors_io import SafetensorsFile, write_safetensors


@pytest.fixture()
def ckpt_copy(maverick_ckpt, tmp_path):
  d = tmp_path / "ckpt"
  shutil.copytree(maverick_ckpt[0], d)
  return d


def shard_files(d):
  return sorted(f for f in os.listdir(d) if f.endswith(".safetensors"))


def test_missing_directory_and_config(tmp_path):
  with pytest.raises(FileNotFoundError, match="does not exist"):
    l4.load_model(tmp_path / "nope")
  with pytest.raises(FileNotFoundError, match="neither a Hugging Face checkpoint"):
    l4.load_model(tmp_path)


def test_an_empty_tensor_where_the_next_one_starts_is_accepted(tmp_path):
  """A zero-length tensor shares its offset with the tensor after it, whatever their names' order."""
  from safetensors import safe_open
  path = _crafted(tmp_path / "ok.safetensors", {"a": ([2], [0, 8]), "z": ([0], [8, 8]), "c": ([2], [8, 16])},
                  16)
  with safe_open(path, "numpy") as f:
    assert sorted(f.keys()) == ["a", "c", "z"]
  assert sorted(SafetensorsFile(path).keys()) == ["a", "c", "z"]


def test_checkpoint_from_a_newer_version(maverick_ckpt, tmp_path):
  """A converted checkpoint whose model config has a field this version does not know."""
  from llama4_jax.checkpoint.convert import hf_to_orbax
  hf_to_orbax(maverick_ckpt[0], tmp_path / "orbax", progress=False)
  meta_path = tmp_path / "orbax" / "checkpoints" / "0" / "config" / "metadata"
  meta = json.loads(meta_path.read_text())
  meta["model"]["flux_capacitor"] = 1
  meta_path.write_text(json.dumps(meta))
  with pytest.raises(l4.CheckpointError, match=r"does not know: \['flux_capacitor'\].*upgrade llama4_jax"):
    l4.load_model(tmp_path / "orbax")


def _crafted(path, entries, data_bytes):
  header = json.dumps({k: {"dtype": "F32", "shape": shape, "data_offsets": offs}
                       for k, (shape, offs) in entries.items()}).encode()
  path.write_bytes(len(header).to_bytes(8, "little") + header + bytes(data_bytes))
  return str(path)


@pytest.mark.parametrize("entries,size,message", [
    ({"a": ([2], [-8, 0])}, 8, "negative or reversed data_offsets"),  # would read header bytes as data
    ({"a": ([2], [0, 8]), "b": ([2], [4, 12])}, 12, "starts at data byte 4, not 8: overlapping"),
    ({"a": ([2], [0, 8]), "b": ([2], [12, 20])}, 20, "starts at data byte 12, not 8: .*gapped"),
    ({"a": ([2], [0, 8])}, 12, "4 bytes after the last tensor"),
])
def test_crafted_safetensors_headers_are_refused(tmp_path, entries, size, message):
  """What the safetensors library rejects, the streaming reader (which also reads gs://) rejects too."""
  from safetensors import SafetensorError, safe_open
  path = _crafted(tmp_path / "bad.safetensors", entries, size)
  with pytest.raises(SafetensorError):
    safe_open(path, "numpy")
  with pytest.raises(l4.CheckpointError, match=message):
    SafetensorsFile(path)


def test_what_only_the_library_checks_is_refused_too(tmp_path):
  """A header our own checks pass but the safetensors library refuses (a metadata value that is not a
  string): local files are opened by the library too, so it is refused before anything is read."""
  header = json.dumps({"__metadata__": {"format": 1},
                       "a": {"dtype": "F32", "shape": [2], "data_offsets": [0, 8]}}).encode()
  path = tmp_path / "meta.safetensors"
  path.write_bytes(len(header).to_bytes(8, "little") + header + bytes(8))
  with pytest.raises(l4.CheckpointError, match=r"meta.safetensors: the safetensors library refuses this "
                                               r"file \(.*expected a string"):
    SafetensorsFile(str(path))


def test_missing_shard(ckpt_copy):
  victim = shard_files(ckpt_copy)[1]
  os.remove(ckpt_copy / victim)
  with pytest.raises(l4.CheckpointError, match=f"shard {victim} is named in .* but missing"):
    l4.load_model(ckpt_copy)


def test_truncated_shard(ckpt_copy):
  victim = ckpt_copy / shard_files(ckpt_copy)[0]
  size = os.path.getsize(victim)
  with open(victim, "r+b") as f:
    f.truncate(size - 100)
  with pytest.raises(l4.CheckpointError, match=f"{victim.name} is truncated: tensor .* ends at byte"):
    l4.load_model(ckpt_copy)
  with open(victim, "r+b") as f:
    f.truncate(5)
  with pytest.raises(l4.CheckpointError, match="truncated"):
    l4.load_model(ckpt_copy)


def test_shape_mismatch(ckpt_copy):
  cfg = json.loads((ckpt_copy / "config.json").read_text())
  cfg["intermediate_size"] = 48
  (ckpt_copy / "config.json").write_text(json.dumps(cfg))
  with pytest.raises(l4.CheckpointError, match=r"gate_up_proj' in .*safetensors has shape \(4, 64, 64\), "
                                                r"but the config implies \(4, 64, 96\)"):
    l4.load_model(ckpt_copy)


def test_missing_and_unexpected_tensors(ckpt_copy):
  cfg = json.loads((ckpt_copy / "config.json").read_text())
  cfg["num_hidden_layers"] = 3
  cfg.pop("no_rope_layers"), cfg.pop("moe_layers")
  (ckpt_copy / "config.json").write_text(json.dumps(cfg))
  with pytest.raises(l4.CheckpointError, match=r"unexpected tensor 'model.layers.3"):
    l4.load_model(ckpt_copy)
  cfg["num_hidden_layers"] = 6
  (ckpt_copy / "config.json").write_text(json.dumps(cfg))
  with pytest.raises(l4.CheckpointError, match=r"tensor 'model.layers.4.* is missing"):
    l4.load_model(ckpt_copy)


def test_unknown_architecture(ckpt_copy):
  cfg = json.loads((ckpt_copy / "config.json").read_text())
  cfg["architectures"] = ["LlamaForCausalLM"]
  (ckpt_copy / "config.json").write_text(json.dumps(cfg))
  with pytest.raises(ValueError, match=r"architecture \['LlamaForCausalLM'\] is not supported"):
    l4.load_model(ckpt_copy)


def test_mesh_that_does_not_fit(maverick_ckpt):
  with pytest.raises(ValueError, match="num_local_experts=4 is not divisible by the mesh's expert=8"):
    l4.load_model(maverick_ckpt[0], mesh=l4.make_mesh(fsdp=1, expert=8))


def test_bad_input_ids(maverick_ckpt):
  model = l4.load_model(maverick_ckpt[0])
  with pytest.raises(ValueError, match="input_ids must be int32"):
    model(jnp.zeros((4,), jnp.int32))


def test_safetensors_writer_round_trip_bf16(tmp_path):
  import ml_dtypes
  a = np.arange(12, dtype=np.float32).reshape(3, 4).astype(ml_dtypes.bfloat16)
  b = np.ones((2,), np.int64)
  specs = {"a": (a.shape, a.dtype), "b": (b.shape, b.dtype)}
  write_safetensors(str(tmp_path / "x.safetensors"), specs, {"a": a, "b": b}.__getitem__)
  f = SafetensorsFile(str(tmp_path / "x.safetensors"))
  np.testing.assert_array_equal(np.asarray(f["a"]), a)
  np.testing.assert_array_equal(np.asarray(f["b"][1:]), b[1:])
  from safetensors.numpy import load_file  # the reference reader agrees on the format
  np.testing.assert_array_equal(load_file(str(tmp_path / "x.safetensors"))["b"], b)


def test_safetensors_read_slices_and_contiguous_copies(tmp_path, monkeypatch):
  """`read` (positioned reads, in blocks for inner slices) equals the memory map's slice; `contiguous`
  (transposed views copied as 16-byte words, other views in tiles, as unsigned bits) equals
  np.ascontiguousarray, bit for bit, for 1-8 byte dtypes, collapsing head reshapes, widths that are not a
  whole number of words, and views spanning several blocks."""
  import ml_dtypes

  from llama4_jax.checkpoint import safetensors_io
  from llama4_jax.checkpoint.safetensors_io import contiguous
  rng = np.random.default_rng(0)
  a = rng.standard_normal((6, 40, 300)).astype(ml_dtypes.bfloat16)
  write_safetensors(str(tmp_path / "x.safetensors"), {"a": (a.shape, a.dtype)}, {"a": a}.__getitem__)
  f = SafetensorsFile(str(tmp_path / "x.safetensors"))
  monkeypatch.setattr(safetensors_io, "_READ_BLOCK", 3 * 40 * 300 * 2)  # 3 rows per block: 2 blocks
  for index in [(), (slice(1, 5),), (slice(0, 6), slice(0, 40), slice(150, 300)),
                (slice(2, 3), slice(7, 21), slice(0, 300)), (slice(0, 6), slice(5, 6), slice(1, 2))]:
    got = f.read("a", index)
    assert got.flags.c_contiguous and got.dtype == a.dtype
    np.testing.assert_array_equal(got.view(np.uint16), np.asarray(f["a"][index]).view(np.uint16))
  def b():  # a fresh base for each view (a freed copy of one view must not hold the next one's answer)
    return rng.standard_normal((704, 520)).astype(ml_dtypes.bfloat16)

  heads_in = b().reshape(4, 176, 520).transpose(2, 0, 1)  # [N*H, D] -> [D, N, H]: trailing axes collapse
  heads_out = b().T.reshape(4, 130, 704)  # [D, N*H] -> [N, H, D]: leading axes collapse
  big = rng.standard_normal((1312, 2056)).astype(ml_dtypes.bfloat16)  # several blocks of words
  for view in (heads_in, heads_out, b().T, b().reshape(704, 4, 130).transpose(1, 2, 0), b()[::2],
               b().astype(np.float32).T, b()[:702].T, big.T, big.T[3:1100],
               big.view(np.int8)[:, :4100].T, big.astype(np.float64).T):
    got = contiguous(view)
    assert got.flags.c_contiguous and got.dtype == view.dtype and got.shape == view.shape
    want = np.ascontiguousarray(view)
    np.testing.assert_array_equal(got.view(np.uint8), want.view(np.uint8))
