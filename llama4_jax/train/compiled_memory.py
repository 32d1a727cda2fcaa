"""XLA's own account of a compiled train step's per-device memory, without allocating the model.

The step is lowered from ShapeDtypeStructs carrying the shardings the trainer would use, then compiled;
`memory_analysis()` of the compiled (SPMD-partitioned) program gives one device's bytes. Used by
`python -m llama4_jax.plan --measure` to check the planner's estimate on the local devices, by
`--compile` (`llama4_jax.tpu_compile`, for a TPU slice's devices), by the planner's tests, and by the
benchmarks.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
from flax import nnx
from jax.sharding import NamedSharding, PartitionSpec

from llama4_jax.model.transformer import model_shardings
from llama4_jax.train.config import model_config
from llama4_jax.train.step import (TrainModel, batch_sharding, make_optimizer, make_train_step,
                                   opt_state_shardings, split_trainable, step_hparams)


def _abstract(tree, shardings):
  return jax.tree.map(lambda x, s: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=s), tree, shardings)


def memory_figures(compiled) -> dict[str, int]:
  """A compiled program's per-device bytes from `memory_analysis()`: arguments, outputs, aliased (donated),
  temporaries, and peak = arguments + outputs - aliased + temporaries (what a device holds while it runs)."""
  mem = compiled.memory_analysis()
  out = {"arguments": int(mem.argument_size_in_bytes), "outputs": int(mem.output_size_in_bytes),
         "aliased": int(mem.alias_size_in_bytes), "temporaries": int(mem.temp_size_in_bytes)}
  out["peak"] = out["arguments"] + out["outputs"] - out["aliased"] + out["temporaries"]
  return out


def lower_train_step(c, mesh):
  """The trainer's jitted step for run config `c` on `mesh`, lowered from ShapeDtypeStructs carrying the
  trainer's shardings (no memory is allocated). `mesh` may hold devices this host does not have (a TPU
  topology, see `llama4_jax.tpu_compile`)."""
  cfg = model_config(c)
  graphdef, abstract_state, shardings = model_shardings(cfg, mesh)
  tm = TrainModel(graphdef, jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype),
                                         abstract_state))
  params = _abstract(nnx.to_pure_dict(abstract_state), nnx.to_pure_dict(shardings))
  trainable, frozen = split_trainable(params, cfg.lora_rank > 0)
  trainable_shardings = jax.tree.map(lambda x: x.sharding, trainable)
  tx = make_optimizer(c)
  opt_shardings = opt_state_shardings(tx, trainable, trainable_shardings, mesh)
  opt_state = _abstract(jax.eval_shape(tx.init, trainable), opt_shardings)
  bsharding = batch_sharding(mesh)
  rows = jax.ShapeDtypeStruct((c.batch_size, c.seq_len), jnp.int32, sharding=bsharding)
  batch = {k: rows for k in ("inputs", "targets", "positions", "segment_ids", "loss_mask")}
  replicated = NamedSharding(mesh, PartitionSpec())
  rng = jax.ShapeDtypeStruct((2,), jnp.uint32, sharding=replicated)
  step_no = jax.ShapeDtypeStruct((), jnp.int32, sharding=replicated)
  hparams = jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=replicated),
                         step_hparams(c, c.learning_rate))
  step = jax.jit(make_train_step(tm, tx, c, bsharding), donate_argnums=(0, 1),
                 out_shardings=(trainable_shardings, opt_shardings, None))
  return step.lower(trainable, opt_state, frozen, batch, rng, step_no, hparams)


def compiled_train_step_memory(c, mesh) -> dict[str, int]:
  """Per-device bytes of run config `c`'s train step compiled for `mesh` (from `memory_analysis()`).

  Returns `memory_figures` of the step (aliased: the donated params and optimizer state).
  """
  return memory_figures(lower_train_step(c, mesh).compile())
