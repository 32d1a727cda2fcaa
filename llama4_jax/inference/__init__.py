"""Inference: `generate` (jit prefill + while_loop decode over a KV cache), `generate_stream`, sampling
strategies, and `sample_uncached`, the simple reference sampler without a cache."""

from llama4_jax.inference.sampler import generate, generate_stream
from llama4_jax.inference.sampling import Greedy, Temperature, TopK, TopP, make_strategy
from llama4_jax.inference.uncached import sample_uncached

__all__ = ["Greedy", "Temperature", "TopK", "TopP", "generate", "generate_stream", "make_strategy",
           "sample_uncached"]
