"""LoRA fine-tuning: adapters at init, frozen base, int8 and NF4 bases, chat SFT masking, merged and PEFT
exports checked against transformers (and peft), sampling with adapters merged or not. A Maverick-like base
(dense and MoE layers) fine-tuned on 8 simulated devices (fsdp=2, tensor=2, expert=2) with its base held in
NF4 (one training run serves all tests: compiling dominates their time)."""

import json
import os

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx, traverse_util

import llama4_jax as l4
from conftest import SEQ, hf_logits, random_ids
from llama4_jax.model.adapters import adapt_model
from llama4_jax.model.linear import is_adapter
from llama4_jax.train import train
from train_utils import apply_changes, micro_config, read_metrics

MESH = dict(data=1, fsdp=2, tensor=2, expert=2, context=1)


def chat_records(n=64, seed=0):
  rng = np.random.RandomState(seed)
  words = ["alpha", "beta", "gamma", "delta", "omega"]
  out = []
  for _ in range(n):
    a, b = rng.randint(0, 5, 2)
    out.append({"messages": [{"role": "user", "content": f"swap {words[a]} {words[b]}"},
                             {"role": "assistant", "content": f"{words[b]} {words[a]}"}]})
  return out


@pytest.fixture(scope="module")
def sft(tmp_path_factory, maverick_ckpt):
  """(chat JSONL path, tokenizer path, base HF dir): the data and base of the LoRA runs."""
  from llama4_jax.tokenizer import train_bpe
  d = tmp_path_factory.mktemp("sft")
  records = chat_records()
  with open(d / "chat.jsonl", "w") as f:
    for r in records:
      f.write(json.dumps(r) + "\n")
  texts = [m["content"] for r in records for m in r["messages"]] * 4
  train_bpe(texts, 300, str(d / "tokenizer.json"))
  return str(d / "chat.jsonl"), str(d / "tokenizer.json"), str(maverick_ckpt[0])


def lora_config(sft, steps, **changes):
  data, tokenizer, base = sft
  c = micro_config(data, steps=steps, checkpoint_every=steps, learning_rate=2e-2, warmup_steps=2,
                   weight_decay=0.0, init_from=base, mesh=MESH)
  c.data.update(source="jsonl", field="messages", format="chat", tokenizer=tokenizer)
  c.model.update(lora_rank=4, lora_alpha=8.0, lora_dropout=0.1)
  return apply_changes(c, changes)


@pytest.fixture(scope="module")
def lora_run(sft, tmp_path_factory):
  workdir = tmp_path_factory.mktemp("lora")
  result = train(lora_config(sft, steps=16, **{"model.base_quant": "nf4"}), str(workdir))
  return str(workdir), result


def _flat(model):
  return traverse_util.flatten_dict(nnx.to_pure_dict(nnx.state(model)))


def test_adapters_start_as_the_base_model(maverick_ckpt):
  base = l4.load_model(maverick_ckpt[0])
  ids = random_ids(base.config)
  want = np.asarray(base(ids))
  adapted = adapt_model(base, lora_rank=4, lora_targets="q,v,o,experts")
  np.testing.assert_array_equal(np.asarray(adapted(ids)), want)  # B = 0: exactly the base
  # a fresh model with adapters has the same base weights as one without (adapters: own rng stream)
  plain = _flat(l4.create_model(base.config))
  with_lora = _flat(l4.create_model(base.config.replace(lora_rank=4)))
  assert set(plain) == {k for k in with_lora if not is_adapter(k)}
  for k, v in plain.items():
    np.testing.assert_array_equal(np.asarray(with_lora[k]), np.asarray(v))


def test_lora_trains_adapters_only(lora_run, maverick_ckpt):
  workdir, result = lora_run
  losses = read_metrics(workdir)
  first, last = np.mean([losses[s] for s in (1, 2, 3)]), np.mean([losses[s] for s in (14, 15, 16)])
  assert last < first - 0.5, (first, last)
  model = l4.load_model(workdir)
  assert model.config.base_quant == "nf4" and model.config.lora_rank == 4
  base = adapt_model(l4.load_model(maverick_ckpt[0]), base_quant="nf4")  # quantizing is deterministic
  got, want = _flat(model), _flat(base)
  assert set(want) == {k for k in got if not is_adapter(k)}
  for k, v in want.items():  # the frozen base, bit for bit
    np.testing.assert_array_equal(np.asarray(got[k]), np.asarray(v), err_msg=str(k))
  trained_b = [np.abs(np.asarray(v)).max() for k, v in got.items() if str(k[-1]).endswith("_lora_b")]
  assert min(trained_b) > 0  # every adapter learned something (B starts at 0)
  # the checkpoint holds the adapters (and their optimizer state) only, and names its base
  import orbax.checkpoint as ocp
  step_dir = os.path.join(workdir, "checkpoints", "16")
  saved = ocp.StandardCheckpointer().metadata(os.path.join(step_dir, "state")).item_metadata
  params = traverse_util.flatten_dict(saved["params"])
  assert params and all(is_adapter(k) for k in params)
  meta = json.load(open(os.path.join(step_dir, "config", "metadata")))
  assert meta["frozen_base"] == os.path.abspath(maverick_ckpt[0])
  assert os.path.exists(os.path.join(workdir, "tokenizer.json"))  # copied for the sampler


def test_merged_export_matches_transformers(lora_run, sft, gcs, tmp_path):
  import transformers
  from llama4_jax.checkpoint.lora import merged_to_hf
  workdir, _ = lora_run
  model = l4.load_model(workdir)
  ids = random_ids(model.config, seq=SEQ)
  summary = merged_to_hf(workdir, tmp_path / "merged", progress=False)  # streamed from the HF base
  assert summary["merged"] and summary["base"] == sft[2]
  hf = transformers.AutoModelForCausalLM.from_pretrained(tmp_path / "merged").eval()
  np.testing.assert_allclose(hf_logits(hf, ids), np.asarray(model(ids)), atol=2e-4, rtol=2e-4)
  # what merge_lora computes on the devices, to float32 rounding (the order of the rank sum may differ)
  l4.save_pretrained(l4.merge_lora(model), tmp_path / "in_memory")
  from test_convert import assert_same_tensors
  from llama4_jax.checkpoint.hf import HFTensors
  a, b = HFTensors(str(tmp_path / "merged")), HFTensors(str(tmp_path / "in_memory"))
  assert set(a.keys()) == set(b.keys())
  for key in a.keys():
    np.testing.assert_allclose(a[key], b[key], rtol=1e-6, atol=1e-7, err_msg=key)
  # the same adapters on the same base converted to Orbax, both in Cloud Storage (the emulator): the same
  # merged tensors, bit for bit
  import fsspec
  from llama4_jax.checkpoint.convert import hf_to_orbax
  bucket, _ = gcs
  base_orbax, on_orbax = f"{bucket}/lora-base-orbax", f"{bucket}/lora-on-orbax"
  hf_to_orbax(sft[2], base_orbax, progress=False)
  assert l4.save_adapters(model, on_orbax, base=base_orbax) == on_orbax
  from llama4_jax.convert import main
  assert main(["orbax-to-hf", on_orbax, str(tmp_path / "merged_from_orbax"), "--merge-lora", "--quiet"]) == 0
  assert_same_tensors(tmp_path / "merged", tmp_path / "merged_from_orbax")
  # a base that is gone: a clear error, nothing written
  fsspec.filesystem("gs").rm(base_orbax, recursive=True)
  with pytest.raises(FileNotFoundError, match="frozen base .* is not a directory here"):
    merged_to_hf(on_orbax, tmp_path / "no_base", progress=False)
  assert not os.path.exists(tmp_path / "no_base")
  with pytest.raises(ValueError, match="pass --merge-lora"):
    from llama4_jax.checkpoint.convert import orbax_to_hf
    orbax_to_hf(workdir, tmp_path / "unmerged", progress=False)
  # the adapters alone (Orbax) load back onto their base: the same model
  assert main(["export-lora", workdir, str(tmp_path / "adapters"), "--format=orbax"]) == 0
  again = l4.load_model(tmp_path / "adapters")
  np.testing.assert_array_equal(np.asarray(again(ids)), np.asarray(model(ids)))


def test_sampler_gives_the_same_tokens_merged_or_not(lora_run):
  model = l4.load_model(lora_run[0])
  merged = l4.merge_lora(model)
  assert merged.config.lora_rank == 0
  prompts = [[1, 5, 9, 14, 3], [1, 7]]
  assert l4.generate(model, prompts, 8) == l4.generate(merged, prompts, 8)


def test_peft_export_loads_in_peft(maverick_ckpt, tmp_path):
  import peft
  import transformers
  base = l4.load_model(maverick_ckpt[0])
  model = adapt_model(base, lora_rank=4, lora_alpha=8.0, lora_targets=("q", "k", "v", "o", "mlp",
                                                                        "shared"))
  flat = _flat(model)  # give the adapters values: B = 0 would hide a wrong layout
  for i, k in enumerate(sorted(k for k in flat if str(k[-1]).endswith("_lora_b"))):
    flat[k] = 0.05 * jax.random.normal(jax.random.PRNGKey(i), flat[k].shape)
  state = nnx.state(model)
  nnx.replace_by_pure_dict(state, traverse_util.unflatten_dict(flat))
  nnx.update(model, state)
  summary = l4.save_peft(model, tmp_path / "peft", base=maverick_ckpt[0])
  assert summary["left_out"] == [] and summary["tensors"] == 2 * 4 * (4 + 3)
  hf = transformers.AutoModelForCausalLM.from_pretrained(maverick_ckpt[0]).eval()
  adapted = peft.PeftModel.from_pretrained(hf, tmp_path / "peft").eval()
  ids = random_ids(model.config, seq=SEQ)
  np.testing.assert_allclose(hf_logits(adapted, ids), np.asarray(model(ids)), atol=2e-4, rtol=2e-4)


def test_int8_base_logits_close_to_bf16(maverick_ckpt):
  bf16 = l4.load_model(maverick_ckpt[0], param_dtype="bfloat16")  # bf16 weights, fp32 compute
  ids = random_ids(bf16.config, seq=SEQ)
  want = np.asarray(bf16(ids))
  quantized = adapt_model(bf16, base_quant="int8")
  q = _flat(quantized)
  assert q[("blocks", 0, "attn", "q")].dtype == jnp.int8 and q[("embed",)].dtype == jnp.bfloat16
  diff = np.abs(np.asarray(quantized(ids)) - want) / want.std()
  print(f"int8 vs bf16 logits / std: mean {diff.mean():.4f} p99 {np.percentile(diff, 99):.4f} "
        f"max {diff.max():.4f}")
  assert diff.mean() < 0.03 and np.percentile(diff, 99) < 0.15  # measured 0.015 and 0.06
  # gradients reach the adapters only (the NF4 base trains end to end in `lora_run`)
  lora = adapt_model(quantized, lora_rank=4)
  graphdef, adapters, rest = nnx.split(lora, lambda path, _: is_adapter(path), ...)
  grads = jax.grad(lambda a: jnp.mean(nnx.merge(graphdef, a, rest).forward(ids) ** 2))(adapters)
  grads = traverse_util.flatten_dict(nnx.to_pure_dict(grads))
  assert grads and all(is_adapter(k) for k in grads)
  for k, g in grads.items():
    g = np.asarray(g)
    assert np.isfinite(g).all() and (np.abs(g).max() > 0) == str(k[-1]).endswith("_lora_b"), k  # B = 0


def _nf4_reference(w, axis, block=64):
  """NF4 quantize -> dequantize of `w` from the paper's definition, in float32: per block of `block`
  weights along `axis`, divide by the block's absmax, take the nearest of the 16 values (the first on a
  tie), multiply back by the absmax (held in bfloat16, as llama4_jax keeps the scales)."""
  from llama4_jax.model.linear import NF4_VALUES
  table = np.asarray(NF4_VALUES, np.float32)
  w = np.moveaxis(np.asarray(w, np.float32), axis, -1)
  blocks = w.reshape(w.shape[:-1] + (-1, block))
  absmax = np.abs(blocks).max(-1, keepdims=True)
  normed = blocks / np.where(absmax == 0, 1, absmax)
  nearest = table[np.argmin(np.abs(normed[..., None] - table), axis=-1)]
  scale = np.asarray(jnp.asarray(absmax, jnp.float32).astype(jnp.bfloat16).astype(jnp.float32))
  return np.moveaxis((nearest * scale).reshape(w.shape), -1, axis)


def test_nf4_matches_the_papers_definition():
  from statistics import NormalDist
  from llama4_jax.model.linear import NF4_VALUES, dequantize_nf4, quantize_int8, quantize_nf4
  # the 16 values: quantiles of N(0, 1) with offset (1/30 + 1/32) / 2 from each end, 8 positive, 7 negative
  # and an exact zero, scaled to [-1, 1] (QLoRA, Dettmers et al. 2023, appendix E)
  offset = 1 - 0.5 * (1 / 30 + 1 / 32)
  inv = NormalDist().inv_cdf
  pos = [inv(p) for p in np.linspace(offset, 0.5, 9)[:-1]]
  neg = [-inv(p) for p in np.linspace(offset, 0.5, 8)[:-1]]
  values = np.sort(np.asarray(pos + neg + [0.0])) / max(pos)
  # (the table is bitsandbytes', computed in float32: within 2 float32 ulps of the float64 definition)
  np.testing.assert_allclose(np.asarray(NF4_VALUES, np.float32), values.astype(np.float32), rtol=0,
                             atol=2 * float(np.finfo(np.float32).eps))
  rng = np.random.RandomState(0)
  w = rng.randn(3, 256, 40).astype(np.float32) * rng.uniform(0.01, 1, (3, 1, 40)).astype(np.float32)
  w[1, 64:128, 7] = 0  # an all-zero block
  w[2, :64, 3] = np.asarray(NF4_VALUES * 4)  # every value exactly, absmax 1
  codes, scales = quantize_nf4(w, axis=1)
  assert codes.dtype == jnp.uint8 and codes.shape == (3, 128, 40)  # two codes a byte
  assert scales.dtype == jnp.bfloat16 and scales.shape == (3, 4, 40)  # one per 64 along the input
  got = np.asarray(dequantize_nf4(codes, scales, jnp.float32))
  np.testing.assert_array_equal(got, _nf4_reference(w, axis=1))
  np.testing.assert_array_equal(got[2, :64, 3], w[2, :64, 3])
  # round-trip error against int8 (per output channel) on Gaussian weights
  g = rng.randn(4096, 256).astype(np.float32)
  q8, s8 = quantize_int8(g, 0, 1)
  errors = {"int8": np.asarray(q8, np.float32) * np.asarray(s8) - g,
            "nf4": np.asarray(dequantize_nf4(*quantize_nf4(g, 0), jnp.float32)) - g}
  rel = {k: float(np.sqrt((e ** 2).mean() / (g ** 2).mean())) for k, e in errors.items()}
  print("relative RMS round-trip error on N(0, 1) weights:", rel)
  assert 0.05 < rel["nf4"] < 0.12 and rel["int8"] < 0.02, rel  # measured 0.092 and 0.0097


def test_nf4_base_loads_one_tensor_at_a_time(maverick_ckpt, monkeypatch, tmp_path):
  mesh = l4.make_mesh(**MESH)
  loaded = []
  make = jax.make_array_from_callback

  def counting(shape, sharding, callback, *args, **kwargs):  # device bytes alive when a tensor is read
    loaded.append(sum(x.nbytes for x in jax.live_arrays()))
    return make(shape, sharding, callback, *args, **kwargs)

  before = sum(x.nbytes for x in jax.live_arrays())
  monkeypatch.setattr(jax, "make_array_from_callback", counting)
  streamed = l4.load_model(maverick_ckpt[0], mesh=mesh, base_quant="nf4", param_dtype="bfloat16")
  monkeypatch.undo()
  flat = _flat(streamed)
  assert flat[("blocks", 0, "attn", "q")].dtype == jnp.uint8
  quantized_bytes = sum(v.nbytes for v in flat.values())
  plain = l4.load_model(maverick_ckpt[0], mesh=mesh, param_dtype="bfloat16")
  largest = max(v.nbytes for v in _flat(plain).values())
  # never more than the quantized model plus one unquantized tensor on the devices
  assert max(loaded) - before <= quantized_bytes + largest, (max(loaded) - before, quantized_bytes)
  want = _flat(adapt_model(plain, base_quant="nf4"))  # quantizing a loaded model: the same, bit for bit
  assert set(want) == set(flat)
  for k, v in want.items():
    np.testing.assert_array_equal(np.asarray(flat[k]), np.asarray(v), err_msg=str(k))
    assert flat[k].sharding.is_equivalent_to(v.sharding, v.ndim), k
  # from a converted Orbax checkpoint: restored and quantized a tensor at a time, the same model
  from llama4_jax.checkpoint.convert import hf_to_orbax
  hf_to_orbax(maverick_ckpt[0], tmp_path / "orbax", progress=False)
  from_orbax = _flat(l4.load_model(tmp_path / "orbax", mesh=mesh, base_quant="nf4", param_dtype="bfloat16"))
  for k, v in want.items():
    np.testing.assert_array_equal(np.asarray(from_orbax[k]), np.asarray(v), err_msg=str(k))
  ids = random_ids(plain.config, seq=SEQ)
  ref = np.asarray(plain(ids))
  diff = np.abs(np.asarray(streamed(ids)) - ref) / ref.std()
  print(f"nf4 vs bf16 logits / std: mean {diff.mean():.4f} p99 {np.percentile(diff, 99):.4f}")
  assert diff.mean() < 0.35, diff.mean()  # measured 0.22 (int8: 0.015; random weights, 4 layers)


def test_assistant_only_loss_mask(tmp_path):
  from llama4_jax.data.pipeline import example_fn, row_stream
  from llama4_jax.tokenizer import chat_tokens, train_bpe
  tok = train_bpe(["hello there", "general kenobi", "you are a bold one"] * 20, 300,
                  str(tmp_path / "t.json"))
  conv = [{"role": "system", "content": "be brief"}, {"role": "user", "content": "hello there"},
          {"role": "assistant", "content": "general kenobi"}, {"role": "user", "content": "bold"},
          {"role": "assistant", "content": "you are"}]
  ids, mask = chat_tokens(tok, conv)
  s = tok.special_tokens
  header = lambda role: [s["<|header_start|>"]] + tok.encode(role) + [s["<|header_end|>"]]  # noqa: E731
  want_ids, want_mask = [tok.bos_id], [0]
  for m in conv:
    body = tok.encode("\n\n" + m["content"]) + [s["<|eot|>"]]
    want_ids += header(m["role"]) + body
    want_mask += [0] * len(header(m["role"])) + [int(m["role"] == "assistant")] * len(body)
  assert ids == want_ids and mask == want_mask
  assert tok.decode([i for i, w in zip(ids, mask) if w]) == "\n\ngeneral kenobi<|eot|>\n\nyou are<|eot|>"
  # through the pipeline: targets weighted by the mask shifted by one; two conversations packed whole
  ex = example_fn(tok, "chat", 128)(conv)
  assert ex["loss_mask"].tolist() == mask[1:] and ex["targets"].tolist() == ids[1:]
  short = [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "yo"}]
  row = next(iter(row_stream([conv, short], example_fn(tok, "chat", 128), 128, 0, "chat",
                             shuffle=False)))
  n1 = len(ids) - 1
  assert row["segment_ids"][:n1].tolist() == [1] * n1 and row["segment_ids"][n1] == 2
  assert row["loss_mask"][:n1].tolist() == mask[1:] and row["positions"][n1] == 0
  assert row["loss_mask"][row["segment_ids"] == 0].sum() == 0  # padding never counts
  with pytest.raises(ValueError, match="chat role 'robot'"):
    chat_tokens(tok, [{"role": "robot", "content": "x"}])


def test_lora_config_errors(sft, tmp_path):
  with pytest.raises(ValueError, match="config.init_from: LoRA"):
    train(lora_config(sft, steps=2, init_from=""), str(tmp_path))
  c = lora_config(sft, steps=2, **{"model.base_quant": "int8"})
  c.model.lora_rank = 0
  with pytest.raises(ValueError, match="config.model.base_quant: an int8 base is frozen"):
    train(c, str(tmp_path))
  with pytest.raises(ValueError, match="lora_targets"):
    l4.get_config("tiny", lora_rank=4, lora_targets=("q", "router"))
  with pytest.raises(ValueError, match="data.format: data.source='builtin' holds text"):
    train(lora_config(sft, steps=2, **{"data.source": "builtin"}), str(tmp_path))
  with pytest.raises(ValueError, match="merge_lora"):
    l4.save_pretrained(l4.create_model(l4.get_config("tiny", lora_rank=2)), tmp_path / "x")
  assert not os.listdir(tmp_path)
