"""Data: document sources, the held-out split, and grain pipelines that pack tokens into batches."""

from llama4_jax.data.pipeline import FrozenState, HostBatches, eval_batches, row_stream
from llama4_jax.data.sources import builtin_corpus, open_source, split_train_eval

__all__ = ["FrozenState", "HostBatches", "builtin_corpus", "eval_batches", "open_source", "row_stream",
           "split_train_eval"]
