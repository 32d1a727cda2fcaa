"""Checkpoints: Hugging Face safetensors in and out (Orbax training checkpoints come with training)."""

from llama4_jax.checkpoint.hf import HFTensors, load_model, save_pretrained
from llama4_jax.checkpoint.safetensors_io import CheckpointError

__all__ = ["CheckpointError", "HFTensors", "load_model", "save_pretrained"]
