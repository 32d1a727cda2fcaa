"""Serving: an OpenAI-compatible HTTP server (`Server`, `python -m llama4_jax.serve`) over a continuous
batching engine (`Engine`)."""

from llama4_jax.serving.engine import Engine, QueueFull, Request, SamplingParams
from llama4_jax.serving.http import Server

__all__ = ["Engine", "QueueFull", "Request", "SamplingParams", "Server"]
