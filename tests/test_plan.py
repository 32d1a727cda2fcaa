"""The memory planner: estimates against XLA's memory_analysis() of compiled train steps on simulated
devices (configs not used to fit its coefficients), parameter counts against the published ones, the
KV cache against the sampler's, the TPU configs against their slices, and the CLI."""

import json
import math
import subprocess
import sys

import jax
import pytest

import llama4_jax as l4
from llama4_jax import planning
from llama4_jax.cli import load_config
from llama4_jax.train.compiled_memory import compiled_train_step_memory
from train_utils import REPO, micro_config

BASE = dict(data=1, fsdp=1, tensor=1, expert=1, context=1)
WIDE = {"model.hidden_size": 256, "model.intermediate_size": 512, "model.intermediate_size_mlp": 512,
        "model.vocab_size": 2048}


@pytest.mark.parametrize("name,config", [
    ("micro fsdp2 tensor2 expert2", lambda: micro_config("x", mesh=dict(BASE, fsdp=2, tensor=2, expert=2))),
    ("LoRA int8 base, 2 microbatches, fsdp4", lambda: micro_config(
        "x", seq_len=128, mesh=dict(BASE, fsdp=4), microbatches=2, **WIDE,
        **{"model.lora_rank": 4, "model.base_quant": "int8"})),
    ("MoE every 2nd layer, tensor2 fsdp4", lambda: micro_config(
        "x", seq_len=128, mesh=dict(BASE, fsdp=4, tensor=2), **WIDE,
        **{"model.interleave_moe_layer_step": 2})),
])
def test_estimate_within_25_percent_of_xla(name, config):
  c = config()
  n = math.prod(c.mesh.values())
  xla = compiled_train_step_memory(c, l4.make_mesh(**dict(c.mesh), devices=jax.devices()[:n]))
  plan = planning.plan_training(c, n)
  assert 0.75 <= plan.total / xla["peak"] <= 1.25, (name, plan.parts, xla)
  # parameters and optimizer state are exact: the step's arguments are they and the batch
  batch = 5 * c.batch_size * c.seq_len * 4 // (c.mesh.data * c.mesh.fsdp * c.mesh.expert)
  assert plan.parts["parameters"] + plan.parts["optimizer state"] + batch == pytest.approx(
      xla["arguments"], abs=1024)


@pytest.mark.parametrize("preset,total,active", [("scout", 107.77e9, 17.2e9), ("maverick", 400.71e9, 17.2e9)])
def test_parameter_counts_match_the_published_ones(preset, total, active):
  got_total, got_active = planning.parameter_counts(l4.get_config(preset))
  assert got_total == pytest.approx(total, rel=5e-5)  # LLAMA4.md: 107.77 B / 400.71 B text-only
  assert got_active == pytest.approx(active, rel=0.02)  # "17B active"


def test_kv_cache_matches_the_sampler():
  """Per device, as the sampler creates it; with a context axis the global layers' cache is split."""
  cfg = l4.get_config("tiny", num_hidden_layers=4, attention_chunk_size=16, max_position_embeddings=512)
  for sizes in (dict(fsdp=4, tensor=2), dict(fsdp=2, tensor=2, context=2)):
    mesh = l4.make_mesh(**sizes)
    model = l4.create_model(cfg, mesh)
    cache = model.init_cache(8, 100)
    per_device = sum(x.addressable_shards[0].data.nbytes for x in jax.tree.leaves(cache))
    assert planning.kv_cache_bytes(cfg, dict(mesh.shape), 8, 100) == per_device, sizes


def test_tpu_names_and_bad_meshes():
  t = planning.parse_tpu("v5p-256")
  assert (t.generation, t.chips, t.hbm_bytes) == ("v5p", 128, 95 * 2**30)
  assert planning.parse_tpu("v5litepod-8").chips == 8 and planning.parse_tpu("v4-32").chips == 16
  with pytest.raises(ValueError, match="expected an accelerator type"):
    planning.parse_tpu("v7x-8")
  with pytest.raises(ValueError, match="multiple of 2"):
    planning.parse_tpu("v5p-3")
  c = micro_config("x", mesh=dict(BASE, tensor=8))
  with pytest.raises(ValueError, match="num_attention_heads=4 is not divisible by the mesh's tensor=8"):
    planning.plan_training(c, 8)
  with pytest.raises(ValueError, match="needs 8 devices but 4"):
    planning.plan_training(c, 4)


def test_cli_verdict_and_changes_that_fit():
  def plan(*flags):
    proc = subprocess.run([sys.executable, "-m", "llama4_jax.plan", "--config=configs/scout_v5p256.py",
                           "--tpu=v5p-256", "--json", *flags], cwd=REPO, capture_output=True, text=True,
                          timeout=120)
    assert proc.returncode == 0, proc.stderr[-2000:]
    return json.loads(proc.stdout.strip().splitlines()[-1])

  ok = plan()
  assert ok["fits"] and ok["devices"] == 128 and ok["mesh"]["expert"] == 16
  # the TPU estimate carries the range the compiler's peak could be in, given how far off the model has
  # been (planning.TPU_ESTIMATE_RATIO), and calls a run fitting only when all of that range fits
  low, high = planning.TPU_ESTIMATE_RATIO
  assert ok["peak_range_bytes"] == [int(ok["total"] / high), int(ok["total"] / low)]
  assert ok["verdict"] == "fits" and ok["peak_range_bytes"][1] <= 0.9 * 95 * 2**30
  tpu = planning.parse_tpu("v5p-256")  # 2 sequences per chip at once: the compiler says 66.6 GiB
  two = planning.plan_training(planning.changed(load_config("scout_v5p256"), {"microbatches": 1}),
                               tpu.chips, tpu.hbm_bytes, platform="tpu")
  assert two.fits and two.verdict == "uncertain"
  assert two.peak_range[0] <= 0.9 * tpu.hbm_bytes < two.peak_range[1]
  assert "run with --compile" in planning.describe(two)
  assert ok["parameters"] == pytest.approx(107.77e9, rel=5e-5)
  # without remat every layer's activations stay for the backward pass: no longer fits, and the planner
  # names the changes that do (each verified by planning it)
  bad = plan("--config.model.remat_policy=none", "--config.microbatches=1")
  assert not bad["fits"] and bad["total"] > 2 * ok["total"] and bad["verdict"] == "does not fit"
  assert bad["fixes"] and all(f["total"] <= 0.9 * 95 * 2**30 for f in bad["fixes"])
  assert any("remat_policy=full" in f["change"] for f in bad["fixes"])
  # a mesh the slice cannot hold: one line naming the problem, no traceback
  proc = subprocess.run([sys.executable, "-m", "llama4_jax.plan", "--config=configs/scout_v5p256.py",
                         "--tpu=v5p-64"], cwd=REPO, capture_output=True, text=True, timeout=120)
  assert proc.returncode != 0 and "plan: mesh" in proc.stderr and "needs 128 devices but 32" in proc.stderr
  assert "Traceback" not in proc.stderr
