"""Training checkpoints with Orbax: params, optimizer state, step, rng, data-iterator state, configs.

`CheckpointManager` (async, keep N) writes each step into a temporary directory and renames it when
complete, so a save cut off mid-write is never listed as the latest step. Restoring takes abstract arrays
carrying the *current* run's shardings, so a checkpoint restores onto any mesh. The data iterator state is
one JSON file per process (grain's handler); the run and model configs are stored as JSON for inspection
and for `init_from`.
"""

from __future__ import annotations

import dataclasses
import json
import os
from typing import Any

import grain
import jax
import orbax.checkpoint as ocp

from llama4_jax.config import ModelConfig


class Checkpointer:
  def __init__(self, directory: str, keep: int, async_save: bool = True):
    self.directory = os.path.abspath(directory)
    options = ocp.CheckpointManagerOptions(max_to_keep=keep, create=True,
                                           enable_async_checkpointing=async_save)
    self.manager = ocp.CheckpointManager(self.directory, options=options)

  def latest_step(self) -> int | None:
    return self.manager.latest_step()

  def save(self, step: int, state: dict, data_state: bytes | None, run_config: dict,
           model_config: ModelConfig, force: bool = False) -> bool:
    items = {
        "state": ocp.args.StandardSave(state),
        "config": ocp.args.JsonSave({"run": run_config, "model": dataclasses.asdict(model_config)}),
    }
    if data_state is not None:
      from llama4_jax.data import FrozenState
      items["data"] = grain.checkpoint.CheckpointSave(FrozenState(data_state))
    return self.manager.save(step, args=ocp.args.Composite(**items), force=force)

  def restore(self, step: int, abstract_state: dict, data_iterator=None) -> dict:
    items = {"state": ocp.args.StandardRestore(abstract_state)}
    if data_iterator is not None:
      items["data"] = grain.checkpoint.CheckpointRestore(data_iterator)
    return self.manager.restore(step, args=ocp.args.Composite(**items))["state"]

  def wait(self) -> None:
    self.manager.wait_until_finished()

  def close(self) -> None:
    self.manager.wait_until_finished()
    self.manager.close()


def checkpoint_steps(directory: str) -> list[int]:
  """Completed checkpoint steps in an Orbax directory (in-progress saves carry a temporary suffix)."""
  if not os.path.isdir(directory):
    return []
  return sorted(int(n) for n in os.listdir(directory)
                if n.isdigit() and os.path.isdir(os.path.join(directory, n)))


def find_checkpoints(directory: str) -> str:
  """The Orbax directory under a workdir (`checkpoints/`) or the directory itself."""
  for candidate in (os.path.join(directory, "checkpoints"), directory):
    if checkpoint_steps(candidate):
      return candidate
  raise FileNotFoundError(f"no checkpoint of this project under {directory} (expected step "
                          "directories in it or in its checkpoints/ folder)")


def read_model_config(directory: str) -> tuple[ModelConfig, int]:
  """The ModelConfig and step of the latest checkpoint under `directory` (a workdir or checkpoints dir)."""
  ckpt_dir = find_checkpoints(directory)
  step = checkpoint_steps(ckpt_dir)[-1]
  path = os.path.join(ckpt_dir, str(step), "config", "metadata")
  with open(path) as f:
    fields = json.load(f)["model"]
  fields = {k: tuple(v) if isinstance(v, list) else v for k, v in fields.items()}
  return ModelConfig(**fields), step


def restore_params(directory: str, abstract_params: Any) -> Any:
  """Params alone from the latest checkpoint under `directory` (for init_from), onto their shardings."""
  _, step = read_model_config(directory)
  ckpt_dir = find_checkpoints(directory)
  with ocp.CheckpointManager(os.path.abspath(ckpt_dir)) as manager:
    restored = manager.restore(step, args=ocp.args.Composite(
        state=ocp.args.PyTreeRestore(item={"params": abstract_params},
                                     restore_args=jax.tree.map(_restore_arg, {"params": abstract_params}),
                                     partial_restore=True)))
  return restored["state"]["params"]


def _restore_arg(x):
  return ocp.ArrayRestoreArgs(sharding=x.sharding, global_shape=x.shape, dtype=x.dtype)
