"""Programs compiled by the real TPU compiler (libtpu) on this CPU host, for TPU topologies.

The train step, a ring-attention step and the serving steps of small models compile for a v5e:2x2 slice
and take the TPU kernels (megablox grouped matmul, splash through Mosaic, ragged all-to-all), chosen from
the mesh's devices rather than from the host's backend; a Scout-width MoE layer compiled for a v5p slice
moves neither a whole expert weight nor the whole sequence through any collective.
"""

import os
import re

import jax
import jax.numpy as jnp
import pytest

from train_utils import micro_config

pytest.importorskip("libtpu", reason="the TPU compiler (pip install -e '.[tpu]')")

import llama4_jax as l4  # noqa: E402
from llama4_jax import hlo_report, planning, tpu_compile  # noqa: E402
from llama4_jax.model.platform import compiling_for, mesh_platform  # noqa: E402
from llama4_jax.sharding import named_sharding, state_shardings  # noqa: E402

V5E_4 = planning.parse_tpu("v5e-4")


@pytest.fixture(scope="module")
def v5e_devices():
  return tpu_compile.tpu_devices(V5E_4)


def _config(**changes):
  c = micro_config("unused", **changes)
  c.batch_size, c.seq_len = 4, 512
  # widths of 128 (TPU tiles: narrower arrays are padded in HBM, and the planner counts elements)
  c.model.update(dtype="bfloat16", attention_chunk_size=128, hidden_size=128, intermediate_size=128,
                 intermediate_size_mlp=256, head_dim=128, vocab_size=384)
  return c


def _pallas_ops(text):
  """Names (instruction and JAX op) of the Pallas TPU kernels (Mosaic custom calls) in compiled HLO."""
  return [f"{i.name} {i.op_name}" for i in hlo_report._parse(text)[0]
          if i.opcode == "custom-call" and "tpu_custom_call" in i.rest]


@pytest.fixture(scope="module")
def train_step(v5e_devices):
  """Tiny MoE train step with ring attention on context=2 x expert=2: compiled, with the planner's
  estimate. One compile covers the MoE, the ring and the splash kernel (runs of 128 tokens)."""
  c = _config(mesh=dict(data=1, fsdp=1, tensor=1, expert=2, context=2))
  c.model.update(attention_impl="ring", ring_kernel="auto", num_hidden_layers=2)  # 2: compiles in 3/4
  mesh = l4.make_mesh(**dict(c.mesh), devices=v5e_devices)
  assert mesh_platform(mesh) == "tpu" and jax.default_backend() == "cpu"
  compiled = tpu_compile.lower_train_step(c, mesh).compile()
  return c, compiled, planning.plan_training(c, 4, V5E_4.hbm_bytes)


def test_train_step_takes_the_tpu_kernels(train_step):
  """The kernels follow the mesh's devices: megablox for the experts, tokens to their experts by ragged
  all-to-all, splash through Mosaic inside the ring (K/V travelling by collective-permute)."""
  _, compiled, _ = train_step
  text = compiled.as_text()
  ops = _pallas_ops(text)
  assert any("gmm" in op for op in ops), "the MoE did not compile to the megablox kernel"
  assert any("splash" in op for op in ops), "the ring did not take the splash kernel"
  moved = hlo_report.collectives(text)
  assert moved["ragged-all-to-all"]["count"] > 0 and moved["collective-permute"]["count"] > 0


def test_splash_kernels_are_counted_from_their_shapes(train_step):
  """Splash carries no cost estimate; hlo_report counts its kernels from their operand shapes. Per
  device the count lies between the causal attention's matmuls (forward 2, backward 7 per query-key
  pair, half the pairs) and every pair of every run with the forward recomputed (11)."""
  c, compiled, _ = train_step
  counted = hlo_report.flops(compiled.as_text())
  assert counted["pallas_uncounted"] == 0 and counted["splash_calls"] > 0
  m = c.model
  pairs = (c.batch_size // 2) * (c.seq_len // 2) * c.seq_len  # expert=2 splits rows, context=2 queries
  unit = 2.0 * pairs * m.num_attention_heads * m.head_dim * m.num_hidden_layers
  assert 9 * unit / 2 <= counted["splash"] <= 11 * unit, (counted, unit)


def test_train_step_memory_against_the_planner(train_step):
  """The compiler's argument bytes are the trainable parameters and Adam state the planner counts
  (the same sharding rules), and its peak fits the chip."""
  _, compiled, plan = train_step
  mem = tpu_compile.memory_figures(compiled)
  stored = plan.parts["parameters"] + plan.parts["optimizer state"]
  assert abs(mem["arguments"] - stored) / stored < 0.05, (mem, plan.parts)
  assert mem["peak"] < V5E_4.hbm_bytes


def test_scout_moe_layer_moves_no_whole_expert_or_sequence():
  """One Scout-shaped MoE layer (8 experts, 2 per device; width 1024 x 2048: Scout's 5120 x 8192 made the
  compile ~9x slower, 98 s against 10 s) on a v5p-16 slice (fsdp=2 x expert=4): no collective's result
  holds half of the routed-expert weights [E, D, F] (the FSDP gather holds the device's E/4 experts) or
  an array over the whole batch's tokens (each device exchanges only its own), and the experts' weight
  gradients are reduce-scattered (each device receives its shard)."""
  from flax import nnx

  from llama4_jax.model.moe import MoE
  tpu = planning.parse_tpu("v5p-16")
  mesh = l4.make_mesh(data=1, fsdp=2, tensor=1, expert=4, context=1,
                      devices=tpu_compile.tpu_devices(tpu))
  cfg = l4.get_config("scout", dtype="bfloat16", param_dtype="bfloat16", num_local_experts=8,
                      hidden_size=1024, intermediate_size=2048, intermediate_size_mlp=4096,
                      num_attention_heads=8, num_key_value_heads=2)
  graphdef, state = nnx.split(nnx.eval_shape(lambda: MoE(cfg, nnx.Rngs(0))))
  params = jax.tree.map(lambda x, s: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=s),
                        nnx.to_pure_dict(state), nnx.to_pure_dict(state_shardings(state, mesh)))
  batch, seq, d = 8, 192, cfg.hidden_size  # 1,536 tokens: a count no weight dimension shares
  x = jax.ShapeDtypeStruct((batch, seq, d), jnp.bfloat16,
                           sharding=named_sharding(mesh, ("batch", "seq", "act_embed")))

  def loss(params, x):
    nnx.replace_by_pure_dict(state, params)
    y, aux = nnx.merge(graphdef, state)(x, mesh)
    return jnp.sum(y.astype(jnp.float32) ** 2) + aux

  with compiling_for(mesh):
    text = jax.jit(jax.grad(loss)).lower(params, x).compile().as_text()
  whole_expert = 8 * d * cfg.intermediate_size * 2
  for i in hlo_report._parse(text)[0]:
    if i.opcode in hlo_report.COLLECTIVES and i.opcode != "ragged-all-to-all":
      biggest = max(hlo_report.array_bytes(i.shape) or [0])
      assert biggest < whole_expert // 2, (i.opcode, i.shape, i.op_name)
      for dims in re.findall(r"\[([0-9,]+)\]", i.shape):  # no array of every token
        sizes = [int(x) for x in dims.split(",")]
        joined = sizes + [a * b for a, b in zip(sizes, sizes[1:])]
        assert batch * seq not in joined, (i.opcode, i.shape, i.op_name)
  assert any("gmm" in op for op in _pallas_ops(text))
  scattered = [i.shape for i in hlo_report._parse(text)[0] if i.opcode == "reduce-scatter"]
  assert len(scattered) == 3 and all(hlo_report.array_bytes(s)[0] == whole_expert // 8 for s in scattered)


def test_plan_compile_cli_json():
  """`plan --serve --compile --json` on the tiny model: the serving engine's prefill and decode steps
  (model and KV cache over fsdp=4) compiled, their figures beside the planner's."""
  import json
  import subprocess
  import sys
  out = subprocess.run([sys.executable, "-m", "llama4_jax.plan", "--config=configs/tiny_cpu.py", "--tpu=v5e-4",
                        "--serve", "--compile", "--json", "--cache_length=256", "--serve_batch=4",
                        "--config.model.num_hidden_layers=1", "--config.mesh.fsdp=-1"],
                       capture_output=True, text=True, env=dict(os.environ, JAX_PLATFORMS="cpu"))
  assert out.returncode == 0, out.stderr[-2000:]
  report = json.loads(out.stdout.strip().splitlines()[-1])
  compiled = report["compiled"]
  for key in ("peak_bytes", "arguments_bytes", "temporaries_bytes", "hbm_bytes", "flops", "optimal_seconds",
              "collectives", "largest_buffers"):
    assert key in compiled, key
  assert 0 < compiled["peak_bytes"] < compiled["hbm_bytes"] and compiled["decode"]["peak_bytes"] > 0
  assert report["estimate_bytes"] > 0


def test_plan_compile_needs_a_tpu_and_says_so():
  import subprocess
  import sys
  out = subprocess.run([sys.executable, "-m", "llama4_jax.plan", "--config=configs/tiny_cpu.py", "--compile"],
                       capture_output=True, text=True, env=dict(os.environ, JAX_PLATFORMS="cpu"))
  assert out.returncode != 0 and "--compile compiles for a TPU slice" in out.stderr + out.stdout


def test_without_libtpu_the_error_names_the_install(monkeypatch):
  import sys
  monkeypatch.setitem(sys.modules, "libtpu", None)  # `import libtpu` now raises ImportError
  with pytest.raises(RuntimeError, match=r"pip install -e '\.\[tpu\]'"):
    tpu_compile.tpu_devices(V5E_4)


@pytest.mark.parametrize("tpu_name, offloads", [("v5p-8", 1), ("v5e-4", 0)])
def test_the_compilers_estimate_says_what_it_leaves_out(tpu_name, offloads):
  """A scatter-add inside a loop: the report counts the loop (whose body the compiler's optimal_seconds
  counts once) and, on a v5p, the scatter offloaded to the SparseCore (for which that estimate adds -2 s),
  and says so beside the figure."""
  import numpy as np
  from jax.sharding import Mesh, NamedSharding, PartitionSpec as P
  tpu = planning.parse_tpu(tpu_name)
  rep = NamedSharding(Mesh(np.array(tpu_compile.tpu_devices(tpu)), ("x",)), P())
  idx = jax.ShapeDtypeStruct((4096,), jnp.int32, sharding=rep)
  val = jax.ShapeDtypeStruct((4096,), jnp.float32, sharding=rep)
  looped = jax.jit(lambda i, v: jax.lax.fori_loop(0, 5, lambda k, acc: acc.at[(i + k) % 1024].add(v),
                                                   jnp.zeros((1024,))))
  r = tpu_compile.report("scatter loop", looped.lower(idx, val), tpu)
  assert r.estimate_caveats == {"while_loops": 1, "sparsecore_offloads": offloads}
  assert (r.optimal_seconds < 0) == bool(offloads), r.optimal_seconds
  text = tpu_compile.format_report(r, tpu)
  assert "counts the body of each of its while loops (1) once" in text
  assert ("offloads to the SparseCore (1)" in text) == bool(offloads)


def test_an_async_collective_chain_counts_once(v5e_devices):
  """A weight gather independent of a chain of matmuls: the TPU compiler overlaps it as an async chain
  (start, continuation and done fusions, each holding a copy of the all-gather with one channel and
  chain id). `collectives` counts it once, at the gathered weight's size."""
  import numpy as np
  from jax.sharding import Mesh, NamedSharding, PartitionSpec as P
  mesh = Mesh(np.array(v5e_devices), ("fsdp",))

  def arg(shape, *spec):
    return jax.ShapeDtypeStruct(shape, jnp.bfloat16, sharding=NamedSharding(mesh, P(*spec)))

  def f(x, w, z):
    a = z
    for _ in range(4):
      a = jnp.tanh(jnp.einsum("bij,bjk->bik", a, z))
    return a, x @ w

  text = jax.jit(f).lower(arg((4096, 256), "fsdp", None), arg((256, 4096), "fsdp", None),
                          arg((4, 2048, 2048), "fsdp", None, None)).compile().as_text()
  copies = [i for i in hlo_report._parse(text)[0] if i.opcode == "all-gather"]
  assert len(copies) > 1 and all('chain_id="' in i.rest for i in copies)  # the chain this test is about
  gathers = hlo_report.collectives(text)["all-gather"]
  assert gathers == {"bytes": 256 * 4096 * 2, "count": 1}, gathers
