"""Data: sources, the held-out split, packing with segment ids, and exact iterator restore."""

import json

import numpy as np
import pytest

from llama4_jax.data import HostBatches, eval_batches, open_source, split_train_eval
from llama4_jax.tokenizer import train_bpe
from train_utils import make_corpus


@pytest.fixture(scope="module")
def corpus(tmp_path_factory):
  d = tmp_path_factory.mktemp("corpus")
  make_corpus(d)
  docs = open_source("text", str(d))
  tok = train_bpe((docs[i] for i in range(len(docs))), 256, str(d.parent / "tok.json"))
  return d, docs, tok


def test_sources_agree(corpus, tmp_path):
  d, docs, _ = corpus
  texts = [docs[i] for i in range(len(docs))]
  with open(tmp_path / "a.jsonl", "w") as f:
    for t in texts:
      f.write(json.dumps({"body": t}) + "\n")
  jsonl = open_source("jsonl", str(tmp_path / "*.jsonl"), field="body")
  assert [jsonl[i] for i in range(len(jsonl))] == texts
  from array_record.python.array_record_module import ArrayRecordWriter
  w = ArrayRecordWriter(str(tmp_path / "a.array_record"), "group_size:1")
  for t in texts:
    w.write(t.encode())
  w.close()
  ar = open_source("array_record", str(tmp_path / "a.array_record"))
  assert [ar[i] for i in range(len(ar))] == texts
  pq = pytest.importorskip("pyarrow.parquet")
  import pyarrow as pa
  pq.write_table(pa.table({"body": texts}), tmp_path / "a.parquet", row_group_size=7)
  parquet = open_source("parquet", str(tmp_path / "a.parquet"), field="body")
  assert [parquet[i] for i in range(len(parquet))] == texts


def test_missing_data_path():
  with pytest.raises(FileNotFoundError, match="matches no files"):
    open_source("text", "/nonexistent/corpus/*.txt")
  with pytest.raises(ValueError, match="needs data.path"):
    open_source("jsonl", "")


def test_builtin_corpus_split_is_deterministic():
  src = open_source("builtin")
  assert len(src) > 500 and src.key(0).endswith(".py")
  a_train, a_eval = split_train_eval(src, 0.01)
  b_train, b_eval = split_train_eval(src, 0.01)
  assert a_eval.indices == b_eval.indices and 0 < len(a_eval.indices) < 0.05 * len(src)
  assert not set(a_eval.indices) & set(a_train.indices)


def test_packing_segments_positions_and_targets(corpus):
  _, docs, tok = corpus
  batch = next(HostBatches(docs, tok, global_batch=4, seq_len=64, seed=0))
  assert set(batch) == {"inputs", "targets", "positions", "segment_ids", "loss_mask"}
  for row in range(4):
    seg, pos = batch["segment_ids"][row], batch["positions"][row]
    inp, tgt = batch["inputs"][row], batch["targets"][row]
    starts = np.flatnonzero(np.diff(seg) != 0) + 1
    for s in starts:  # a new document starts at position 0 with <bos>
      assert pos[s] == 0 and inp[s] == tok.bos_id
    same = seg[1:] == seg[:-1]
    # inside a document, each target is the next input and positions count up by one
    np.testing.assert_array_equal(tgt[:-1][same], inp[1:][same])
    np.testing.assert_array_equal(pos[1:][same], pos[:-1][same] + 1)
    np.testing.assert_array_equal(batch["loss_mask"][row], seg > 0)


@pytest.mark.parametrize("taken", [0, 1, 5])
def test_restored_iterator_yields_the_same_batches(corpus, taken):
  """From any point, the first batches included (a state whose packer holds no remainder: its empty
  slices come back from JSON as lists, which grain 0.2 took for a remainder, reading a document too
  many)."""
  _, docs, tok = corpus
  a = HostBatches(docs, tok, 4, 48, seed=3)
  for _ in range(taken):
    next(a)
  state = a.get_state()
  want = [next(a) for _ in range(4)]
  b = HostBatches(docs, tok, 4, 48, seed=3)
  b.set_state(state)
  for w in want:
    got = next(b)
    for k in w:
      np.testing.assert_array_equal(got[k], w[k])
  with pytest.raises(ValueError, match="rows but this host reads"):
    HostBatches(docs, tok, 8, 48, seed=3).set_state(state)


def test_hosts_read_their_rows_of_the_same_global_batch(corpus):
  _, docs, tok = corpus
  whole = next(HostBatches(docs, tok, 4, 32, seed=1))
  halves = [next(HostBatches(docs, tok, 4, 32, seed=1, rows=range(2 * p, 2 * p + 2))) for p in range(2)]
  np.testing.assert_array_equal(np.concatenate([h["inputs"] for h in halves]), whole["inputs"])


def test_eval_batches_cover_the_held_out_set(corpus):
  _, docs, tok = corpus
  held = [docs[i] for i in range(5)]
  batches = eval_batches(held, tok, 4, 32)
  total = sum(int(b["loss_mask"].sum()) for b in batches)
  want = sum(len(tok.encode(t)) + 1 for t in held)  # <bos> text <eos>: one target per token after bos
  assert total == want
