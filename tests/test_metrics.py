"""Metrics: the TensorBoard event files (framing, and read back by TensorBoard itself) and the FLOPs model."""

import struct

import pytest

import llama4_jax as l4
from llama4_jax.train import metrics


def test_crc32c_known_vector():
  assert metrics._crc32c(b"123456789") == 0xE3069283  # the standard CRC-32C check value


def test_event_file_records_are_well_framed(tmp_path):
  w = metrics.TensorBoardWriter(str(tmp_path))
  w.scalars(7, {"loss": 1.5, "mfu": 0.25})
  w.close()
  (f,) = list(tmp_path.iterdir())
  data = f.read_bytes()
  records = []
  while data:
    (n,) = struct.unpack("<Q", data[:8])
    assert struct.unpack("<I", data[8:12])[0] == metrics._masked_crc(data[:8])
    body = data[12:12 + n]
    assert struct.unpack("<I", data[12 + n:16 + n])[0] == metrics._masked_crc(body)
    records.append(body)
    data = data[16 + n:]
  assert len(records) == 3 and b"brain.Event:2" in records[0]
  assert b"loss" in records[1] and struct.pack("<f", 1.5) in records[1]


def test_tensorboard_reads_the_event_files(tmp_path):
  """TensorBoard's own event reader (the test extras install tensorboard) sees every scalar."""
  from tensorboard.backend.event_processing.event_accumulator import EventAccumulator
  w = metrics.TensorBoardWriter(str(tmp_path))
  for step in (1, 2, 3):
    w.scalars(step, {"loss": 4.0 / step, "eval_bits_per_byte": 2.5 - step / 10})
  w.close()
  acc = EventAccumulator(str(tmp_path))
  acc.Reload()
  assert set(acc.Tags()["scalars"]) == {"loss", "eval_bits_per_byte"}
  assert [(e.step, e.value) for e in acc.Scalars("loss")] == [(s, pytest.approx(4.0 / s)) for s in (1, 2, 3)]
  assert [e.step for e in acc.Scalars("eval_bits_per_byte")] == [1, 2, 3]


def test_flops_per_token_counts_active_experts_only():
  cfg = l4.get_config("tiny")
  one = metrics.train_flops_per_token(cfg, 256)
  more_experts = metrics.train_flops_per_token(cfg.replace(num_local_experts=64), 256)
  top2 = metrics.train_flops_per_token(cfg.replace(num_experts_per_tok=2), 256)
  assert more_experts - one < 0.01 * one  # only the router grows
  assert top2 > one * 1.1
