"""Checkpoints: Hugging Face safetensors in and out (Orbax training checkpoints come with training)."""

from llama4_jax.checkpoint.hf import HFTensors, save_pretrained
from llama4_jax.checkpoint.load import load_model
from llama4_jax.checkpoint.lora import merged_to_hf, save_adapters, save_peft
from llama4_jax.checkpoint.safetensors_io import CheckpointError

__all__ = ["CheckpointError", "HFTensors", "load_model", "merged_to_hf", "save_adapters", "save_peft",
           "save_pretrained"]
