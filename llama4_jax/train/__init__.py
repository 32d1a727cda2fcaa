"""Training: run config, optimizer and steps, Orbax checkpoints, metrics, and the loop (`train`)."""

from llama4_jax.train.config import default_run_config, model_config, validate
from llama4_jax.train.loop import TrainingDiverged, train

__all__ = ["TrainingDiverged", "default_run_config", "model_config", "train", "validate"]
