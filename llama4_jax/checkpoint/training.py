"""Training checkpoints with Orbax: params, optimizer state, step, rng, the configs, and whatever items the
trainer adds (its data-iterator state).

`CheckpointManager` (async, keep N) writes each step into a temporary directory and renames it when
complete, so a save cut off mid-write is never listed as the latest step. Restoring takes abstract arrays
carrying the *current* run's shardings, so a checkpoint restores onto any mesh. The run and model configs
are stored as JSON for inspection and for `init_from`; the trainer passes its data iterator's item (grain's
handler: one JSON file per process) as an extra item, so this module knows nothing of the data pipeline.
`save_adapters` writes the same layout with the adapters alone.

Stacked leaves (everything under `blocks`, whose axis 0 runs over superblocks) are stored in chunks of one
superblock (`layer_chunks`), so a reader can take one layer of a weight without reading the others:
`orbax-to-hf` exports a training workdir a layer at a time, within a few tensors of memory.
"""

from __future__ import annotations

import dataclasses

import jax
import orbax.checkpoint as ocp

from llama4_jax import storage
from llama4_jax.config import ModelConfig
from llama4_jax.model.paths import state_path

STACKED = "blocks"  # the state key under which every leaf is stacked over superblocks on axis 0


def layer_chunks(state):
  """Orbax save args for `state`: leaves under `blocks` of rank >= 2 are stored in chunks of one index of
  axis 0 (one superblock), the rest as Orbax chooses (a chunk per device shard)."""
  def one(path, x):
    stacked = STACKED in state_path(path) and getattr(x, "ndim", 0) >= 2
    return ocp.SaveArgs(shard_axes=(0,)) if stacked else ocp.SaveArgs()
  return jax.tree_util.tree_map_with_path(one, state)


class Checkpointer:
  def __init__(self, directory: str, keep: int, async_save: bool = True):
    self.directory = storage.check(directory, "checkpoint directory")
    options = ocp.CheckpointManagerOptions(max_to_keep=keep, create=True,
                                           enable_async_checkpointing=async_save)
    self.manager = ocp.CheckpointManager(self.directory, options=options)

  def latest_step(self) -> int | None:
    return self.manager.latest_step()

  def save(self, step: int, state: dict, run_config: dict, model_config: ModelConfig, force: bool = False,
           extra: dict | None = None, items: dict | None = None) -> bool:
    """`extra`: more config metadata, e.g. {"frozen_base": path} when `state` holds adapters only;
    `items`: more Orbax items to save with the step (name -> save args), e.g. the data iterator's."""
    items = {
        "state": ocp.args.StandardSave(state, save_args=layer_chunks(state)),
        "config": ocp.args.JsonSave({"run": run_config, "model": dataclasses.asdict(model_config),
                                     **(extra or {})}),
        **(items or {}),
    }
    return self.manager.save(step, args=ocp.args.Composite(**items), force=force)

  def restore(self, step: int, abstract_state: dict, items: dict | None = None) -> dict:
    """The `state` item restored onto `abstract_state`'s shardings; `items`: more Orbax items to restore
    (name -> restore args, e.g. restoring the data iterator in place)."""
    items = {"state": ocp.args.StandardRestore(abstract_state), **(items or {})}
    return self.manager.restore(step, args=ocp.args.Composite(**items))["state"]

  def reached_preemption(self, step: int) -> bool:
    """Whether every process has reached the step agreed after a preemption notice (JAX's preemption
    service, multi-process jobs; False when it is off)."""
    return self.manager.reached_preemption(step)

  def wait(self) -> None:
    self.manager.wait_until_finished()

  def close(self) -> None:
    self.manager.wait_until_finished()
    self.manager.close()
