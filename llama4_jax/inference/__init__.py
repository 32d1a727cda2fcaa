"""Inference. `sample_uncached` is the simple reference sampler used after training; the KV-cache
sampler (`generate`) arrives with the sampler module."""

from llama4_jax.inference.uncached import sample_uncached

__all__ = ["sample_uncached"]
