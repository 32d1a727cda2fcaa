"""Flax NNX modules of the Llama 4 text model."""

from llama4_jax.model.transformer import Llama4, abstract_model, create_model, model_shardings

__all__ = ["Llama4", "abstract_model", "create_model", "model_shardings"]
