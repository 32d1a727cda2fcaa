"""Paths in Cloud Storage, against a real GCS server (the fake-gcs-server emulator): data sources and
tokenizers read from gs://, logs appended in a bucket, atomic writes, and unsupported schemes refused
before anything runs (never a local `gs:` directory)."""

import json
import os

import pytest

from llama4_jax import storage
from llama4_jax.data import open_source
from llama4_jax.tokenizer import load_tokenizer, train_bpe
from llama4_jax.train.metrics import MetricsLogger
from train_utils import micro_config


@pytest.fixture(scope="module")
def docs(tmp_path_factory):
  """The same JSON Lines and text files, locally and in the bucket."""
  local = tmp_path_factory.mktemp("docs")
  (local / "shards").mkdir()
  for i in range(2):
    rows = [json.dumps({"text": f"document {i}.{j} " + "word " * j}) for j in range(5)]
    (local / "shards" / f"part-{i}.jsonl").write_text("\n".join(rows) + "\n")
    (local / f"note-{i}.txt").write_text(f"plain text file {i}\n")
  return local


def _upload(local, remote):
  for name in storage.files_under(str(local)):
    storage.copy(name, storage.join(remote, os.path.relpath(name, local)))


def test_sources_read_the_same_from_a_bucket(docs, gcs):
  bucket, _ = gcs
  remote = f"{bucket}/docs"
  _upload(docs, remote)
  for kind, pattern in (("jsonl", "shards/*.jsonl"), ("text", "*.txt")):
    here = open_source(kind, str(docs / pattern))
    there = open_source(kind, f"{remote}/{pattern}")
    assert len(there) == len(here) > 0 and [there[i] for i in range(len(there))] == [
        here[i] for i in range(len(here))]
    assert all(there.key(i).startswith("gs://") for i in range(len(there)))
  whole = open_source("text", remote)  # a prefix: every object under it
  assert len(whole) == 4 and sorted(whole.key(i) for i in range(4))[0] == "note-0.txt"


def test_tokenizer_trained_into_and_loaded_from_a_bucket(docs, gcs, tmp_path):
  bucket, _ = gcs
  texts = [f"some text number {i} with words" for i in range(50)]
  local = train_bpe(texts, 300, str(tmp_path / "tokenizer.json"))
  remote = train_bpe(texts, 300, f"{bucket}/tok/tokenizer.json")
  assert not os.path.exists(f"{bucket}/tok") and storage.exists(f"{bucket}/tok/tokenizer.json")
  for tok in (remote, load_tokenizer(f"{bucket}/tok")):  # a file, or the directory holding it
    assert tok.encode("some text number 7") == local.encode("some text number 7")


def test_metrics_append_across_runs_in_a_bucket(gcs):
  """Objects cannot be appended to: the logger keeps what the object held and rewrites it."""
  bucket, _ = gcs
  workdir = f"{bucket}/metrics-run"
  for steps in ((1, 2), (3,)):  # a run, then its resumption
    logger = MetricsLogger(workdir, 3)
    for s in steps:
      logger.write(s, {"loss": float(s)})
    logger.close()
  lines = storage.read_text(f"{workdir}/metrics.jsonl").splitlines()
  assert [json.loads(x)["step"] for x in lines] == [1, 2, 3]
  assert len(storage.listdir(f"{workdir}/tensorboard")) >= 1


def test_unsupported_or_mistyped_urls_fail_before_anything_runs(tmp_path, monkeypatch):
  from llama4_jax.train import train
  monkeypatch.chdir(tmp_path)
  c = micro_config("unused")
  for workdir, message in (("s3://bucket/run", "s3:// scheme is not supported"),
                           ("gs:/bucket/run", "did you mean gs://bucket/run"),
                           ("gs://", "needs a bucket name")):
    with pytest.raises(ValueError, match=message):
      train(c, workdir)
  c.data.source, c.data.path = "jsonl", "http://example.com/data.jsonl"
  with pytest.raises(ValueError, match="http:// scheme is not supported"):
    train(c, str(tmp_path / "run"))
  from llama4_jax.checkpoint.convert import meta_to_orbax
  with pytest.raises(ValueError, match="reads Meta's .pth shards from local disk"):
    meta_to_orbax("gs://bucket/Llama-4-Scout-17B-16E", "out")
  assert os.listdir(tmp_path) == []  # no gs: or s3: directory, and nothing else either


def test_local_writes_are_atomic(tmp_path, monkeypatch):
  """A write cut off before its rename leaves the old content and no temporary file."""
  target = tmp_path / "a" / "file.json"
  storage.write_text(target, "first")

  def crash(*_):
    raise KeyboardInterrupt

  monkeypatch.setattr(os, "replace", crash)
  with pytest.raises(KeyboardInterrupt):
    storage.write_text(target, "second")
  assert target.read_text() == "first" and os.listdir(target.parent) == ["file.json"]
