"""Inference: `generate` (jit prefill + while_loop decode over a KV cache), `generate_stream`, sampling
(`sample_rows`: greedy, temperature, top-k, top-p as traced per-row settings), and `sample_uncached`, the
simple reference sampler without a cache."""

from llama4_jax.inference.sampler import generate, generate_stream
from llama4_jax.inference.sampling import check_sampling, sample_rows
from llama4_jax.inference.uncached import sample_uncached

__all__ = ["check_sampling", "generate", "generate_stream", "sample_rows", "sample_uncached"]
