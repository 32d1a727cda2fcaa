"""Training and evaluation batches with grain: documents -> tokens -> packed rows -> per-host batches.

Row streams make the data independent of the number of hosts: row r of every global batch is its own grain
pipeline over documents r, r + B, r + 2B, ... (B = global batch), shuffled by `seed + r` and reshuffled each
epoch, tokenized as <bos> text <eos>, and packed (concat-then-split) into rows of `seq_len` with segment ids
and positions. Host p builds only its rows [p*B/P, (p+1)*B/P), so it reads only its share, and the global
batch is the same whether 1 or P processes assemble it. The iterator state (every row stream's grain state)
is JSON and goes into each checkpoint, so a restored run sees exactly the batches an uninterrupted one would.

Two formats (`data.format`): "text" documents are tokenized as <bos> text <eos> and packed concat-then-
split (pretraining); "chat" documents are conversations (lists of {"role", "content"} messages) rendered
with Llama 4's chat template (`tokenizer.chat_tokens`), truncated to seq_len and packed whole, first fit,
padding the rest of a row (supervised fine-tuning: the loss is on the assistant's tokens only).

A batch is a dict of int32 [rows, seq_len] arrays: inputs, targets, positions, segment_ids (0 = padding),
and loss_mask (1 where the target is a real next token of the same document that counts for the loss).
"""

from __future__ import annotations

import json
from typing import Any, Callable, Sequence

import grain
import numpy as np

from llama4_jax.data.sources import Subset
from llama4_jax.tokenizer import chat_tokens


FORMATS = ("text", "chat")
_PACKING_BINS = 4  # chat rows are packed first-fit into this many open rows at a time


def example_fn(tokenizer, fmt: str, seq_len: int) -> Callable[[Any], dict[str, np.ndarray]]:
  """document -> {"inputs", "targets", "loss_mask"} int32 arrays (chat: at most seq_len long)."""
  if fmt not in FORMATS:
    raise ValueError(f"data.format={fmt!r}; choose one of {FORMATS}")

  def fn(doc) -> dict[str, np.ndarray]:
    if fmt == "text":
      if not isinstance(doc, str):
        raise ValueError(f"data.format='text' got a {type(doc).__name__} document (a chat record?); set "
                         "data.format='chat' for conversations")
      ids = ([tokenizer.bos_id] if tokenizer.bos_id is not None else []) + list(tokenizer.encode(doc))
      ids += [tokenizer.eos_id] if tokenizer.eos_id is not None else []
      weights = [1] * len(ids)
    else:
      ids, weights = chat_tokens(tokenizer, doc)
      ids, weights = ids[:seq_len + 1], weights[:seq_len + 1]
    ids, weights = np.asarray(ids, np.int32), np.asarray(weights, np.int32)
    if len(ids) < 2:  # nothing to predict; keep one masked position so packing stays simple
      ids, weights = np.concatenate([ids, ids])[:2], np.zeros(2, np.int32)
    return {"inputs": ids[:-1], "targets": ids[1:], "loss_mask": weights[1:]}
  return fn


def _finish(row: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
  seg = row["inputs_segment_ids"].astype(np.int32)
  return {"inputs": row["inputs"].astype(np.int32), "targets": row["targets"].astype(np.int32),
          "positions": row["inputs_positions"].astype(np.int32), "segment_ids": seg,
          "loss_mask": (row["loss_mask"] * (seg > 0)).astype(np.int32)}


def row_stream(docs: Sequence, to_example, seq_len: int, seed: int, fmt: str = "text",
               shuffle: bool = True, repeat: bool = True) -> grain.IterDataset:
  """One packed row stream over `docs` (`to_example` from `example_fn`)."""
  ds = grain.MapDataset.source(docs)
  if shuffle:
    ds = ds.shuffle(seed=seed)
  if repeat:
    ds = ds.repeat(None)
  # No read-ahead: the default (16 threads x 500 elements per stream) would tokenize far ahead of use.
  ds = ds.map(to_example).to_iter_dataset(grain.ReadOptions(num_threads=0, prefetch_buffer_size=0))
  lengths = {"inputs": seq_len, "targets": seq_len, "loss_mask": seq_len}
  if fmt == "chat":
    ds = grain.experimental.FirstFitPackIterDataset(ds, length_struct=lengths,
                                                    num_packing_bins=_PACKING_BINS, shuffle_bins=False)
  else:
    ds = grain.experimental.ConcatThenSplitIterDataset(ds, length_struct=lengths)
  return ds.map(_finish)


def _from_json(state):
  """A row stream's state as grain made it: JSON turned the packer's (start, stop) slices into lists, and
  grain (0.2) compares them with the tuple (-1, -1) that means "no remainder", so a list read as a
  remainder and the restored stream skipped a document (a resume from the first steps read other data)."""
  if not isinstance(state, dict):
    return state
  out = {k: _from_json(v) for k, v in state.items()}
  if isinstance(state.get("remainder_slices"), dict):
    out["remainder_slices"] = {k: tuple(v) for k, v in state["remainder_slices"].items()}
  return out


class HostBatches:
  """This host's rows of each global batch (`rows`, default all; see `train.step.host_rows`), from one row
  stream per row: a row's tokens depend only on the row, so hosts that hold the same rows (a context axis
  across hosts) read the same tokens. Checkpointable (JSON state)."""

  def __init__(self, docs: Sequence, tokenizer, global_batch: int, seq_len: int, seed: int,
               rows: Sequence[int] | None = None, fmt: str = "text"):
    if len(docs) < global_batch:
      raise ValueError(f"only {len(docs)} training documents for batch_size={global_batch}: each batch "
                       "row reads its own share of the documents; lower batch_size or add data")
    self.rows = range(global_batch) if rows is None else rows
    to_example = example_fn(tokenizer, fmt, seq_len)
    self._datasets = [
        row_stream(Subset(docs, range(r, len(docs), global_batch)), to_example, seq_len,
                   seed * 1_000_003 + r, fmt) for r in self.rows]
    self._iters = [iter(ds) for ds in self._datasets]

  def __iter__(self):
    return self

  def __next__(self) -> dict[str, np.ndarray]:
    rows = [next(it) for it in self._iters]
    return {k: np.stack([r[k] for r in rows]) for k in rows[0]}

  # grain.checkpoint.CheckpointHandler protocol (bytes state for non-grain iterators)
  def get_state(self) -> bytes:
    return json.dumps([it.get_state() for it in self._iters]).encode()

  def set_state(self, state: bytes) -> None:
    states = json.loads(state)
    if len(states) != len(self._iters):
      raise ValueError(f"data iterator state has {len(states)} rows but this host reads "
                       f"{len(self._iters)}: was the checkpoint written with another batch_size or "
                       "process count?")
    for it, s in zip(self._iters, states):
      it.set_state(_from_json(s))

  def start_prefetch(self) -> None:
    pass


class FrozenState:
  """A snapshot of an iterator's state, for asynchronous checkpoint saves."""

  def __init__(self, state: bytes):
    self._state = state

  def get_state(self) -> bytes:
    return self._state


def eval_batches(docs: Sequence, tokenizer, global_batch: int, seq_len: int,
                 max_batches: int = 0, rows: Sequence[int] | None = None, fmt: str = "text"):
  """The held-out set packed once, in order, into global batches (the last padded with masked rows).

  Returns this host's `rows` (default all) of each batch. Every host packs the whole held-out set (it is
  small) and keeps its rows, so evaluation is identical for any number of processes.
  """
  if not len(docs):
    return []
  stream = iter(row_stream(docs, example_fn(tokenizer, fmt, seq_len), seq_len, 0, fmt, shuffle=False,
                           repeat=False))
  packed = list(stream)
  if max_batches:
    packed = packed[: max_batches * global_batch]
  pad = -len(packed) % global_batch
  blank = {k: np.zeros_like(v) for k, v in packed[0].items()}
  packed += [blank] * pad
  batches = []
  for b in range(0, len(packed), global_batch):
    mine = [packed[b + r] for r in (range(global_batch) if rows is None else rows)]
    batches.append({k: np.stack([r[k] for r in mine]) for k in mine[0]})
  return batches
