"""Training metrics: the live progress line, metrics.jsonl, TensorBoard event files, FLOPs and MFU.

The TensorBoard writer emits the event-file format directly (length-prefixed records with masked
CRC32C, `Event` protos holding scalar summaries), so no TensorFlow is needed to produce the files. Both
files may live in Cloud Storage (`storage.AppendFile`): there they are rewritten at most every
`flush_seconds` (the run config's `log_flush_seconds`) and on `flush()` / `close()`, so a killed run
loses at most that much of its log.
"""

from __future__ import annotations

import json
import socket
import struct
import time

import jax

from llama4_jax import storage
from llama4_jax.config import ModelConfig

# --- FLOPs and peak ---------------------------------------------------------------------------

PEAK_FLOPS = {  # dense bf16 per chip, from the vendors' published figures
    "TPU v4": 275e12, "TPU v5 lite": 197e12, "TPU v5e": 197e12, "TPU v5p": 459e12, "TPU v5": 459e12,
    "TPU v6 lite": 918e12, "TPU v6e": 918e12, "H100": 989e12, "H200": 989e12, "A100": 312e12,
}
CPU_PEAK_FLOPS = 220e9  # measured fp32 XLA matmul peak of the project's 2-core machine (whole machine)


def peak_flops_total(override_per_device: float = 0.0) -> float:
  devices = jax.devices()
  if override_per_device:
    return override_per_device * len(devices)
  if devices[0].platform == "cpu":
    return CPU_PEAK_FLOPS
  kind = devices[0].device_kind
  for name, flops in PEAK_FLOPS.items():
    if name.lower() in kind.lower():
      return flops * len(devices)
  return 0.0


def train_flops_per_token(cfg: ModelConfig, seq_len: int) -> float:
  """6 x active matmul params + causal attention (3 passes x 2 matmuls x 2 FLOPs), per token. With LoRA
  the frozen weights need no weight gradient: 4 x params (the adapters' own FLOPs are left out)."""
  d, f, m = cfg.hidden_size, cfg.intermediate_size, cfg.intermediate_size_mlp
  hd = cfg.head_dim
  attn_proj = d * hd * (2 * cfg.num_attention_heads + 2 * cfg.num_key_value_heads)
  moe = d * cfg.num_local_experts + 3 * d * f * (cfg.num_experts_per_tok + 1)
  params, attn = d * cfg.vocab_size, 0.0
  for kind in cfg.layer_kinds():
    params += attn_proj + (moe if kind.moe else 3 * d * m)
    window = min(seq_len, cfg.attention_chunk_size or seq_len) if kind.rope else seq_len
    attn += 2 * 2 * cfg.num_attention_heads * hd * (window / 2)  # QK^T and PV, causal half
  return (4 if cfg.lora_rank else 6) * params + 3 * attn


# --- TensorBoard event files -----------------------------------------------------------------

def _crc32c_table():
  table = []
  for i in range(256):
    c = i
    for _ in range(8):
      c = (c >> 1) ^ 0x82F63B78 if c & 1 else c >> 1
    table.append(c)
  return table


_CRC_TABLE = _crc32c_table()


def _crc32c(data: bytes) -> int:
  c = 0xFFFFFFFF
  for b in data:
    c = _CRC_TABLE[(c ^ b) & 0xFF] ^ (c >> 8)
  return c ^ 0xFFFFFFFF


def _masked_crc(data: bytes) -> int:
  c = _crc32c(data)
  return (((c >> 15) | (c << 17)) + 0xA282EAD8) & 0xFFFFFFFF


def _varint(n: int) -> bytes:
  out = bytearray()
  while True:
    b = n & 0x7F
    n >>= 7
    out.append(b | (0x80 if n else 0))
    if not n:
      return bytes(out)


def _field(num: int, wire: int, payload: bytes) -> bytes:
  return _varint((num << 3) | wire) + payload


def _event(wall_time: float, step: int, summary: bytes | None = None, file_version: str | None = None):
  msg = _field(1, 1, struct.pack("<d", wall_time)) + _field(2, 0, _varint(step))
  if file_version is not None:
    data = file_version.encode()
    msg += _field(3, 2, _varint(len(data)) + data)
  if summary is not None:
    msg += _field(5, 2, _varint(len(summary)) + summary)
  return msg


def _scalar_summary(tag: str, value: float) -> bytes:
  t = tag.encode()
  v = _field(1, 2, _varint(len(t)) + t) + _field(2, 5, struct.pack("<f", value))
  return _field(1, 2, _varint(len(v)) + v)


class TensorBoardWriter:
  def __init__(self, logdir: str):
    name = f"events.out.tfevents.{int(time.time())}.{socket.gethostname()}"
    self._f = storage.AppendFile(storage.join(logdir, name), binary=True, keep_existing=False)
    self._write(_event(time.time(), 0, file_version="brain.Event:2"))

  def _write(self, data: bytes):
    header = struct.pack("<Q", len(data))
    self._f.write(header + struct.pack("<I", _masked_crc(header)) + data +
                  struct.pack("<I", _masked_crc(data)))

  def scalars(self, step: int, values: dict[str, float]):
    now = time.time()
    for tag, value in values.items():
      self._write(_event(now, step, _scalar_summary(tag, float(value))))

  def flush(self):
    self._f.flush()

  def close(self):
    self._f.close()


# --- the logger ---------------------------------------------------------------------------------

class MetricsLogger:
  """Writes metrics.jsonl and TensorBoard files (process 0) and prints the progress line. Local files
  are flushed every record; Cloud Storage ones every `flush_seconds` and on `flush()`."""

  def __init__(self, workdir: str, total_steps: int, enabled: bool = True, flush_seconds: float = 30.0):
    self.flush_seconds = flush_seconds
    self.enabled = enabled
    self.total = total_steps
    self._created = time.time()
    self._flushed = time.time()
    self._remote = storage.is_remote(workdir)
    if enabled:
      self._jsonl = storage.AppendFile(storage.join(workdir, "metrics.jsonl"))
      self._tb = TensorBoardWriter(storage.join(workdir, "tensorboard"))

  def write(self, step: int, metrics: dict[str, float]):
    if not self.enabled:
      return
    self._jsonl.write(json.dumps({"step": step, **metrics}) + "\n")
    self._tb.scalars(step, metrics)
    if not self._remote or time.time() - self._flushed >= self.flush_seconds:
      self.flush()

  def flush(self):
    if self.enabled:
      self._jsonl.flush()
      self._tb.flush()
      self._flushed = time.time()

  def progress(self, step: int, m: dict[str, float], seconds_per_step: float):
    if not self.enabled:
      return
    eta = seconds_per_step * (self.total - step)
    print(f"step {step:>6}/{self.total}  loss {m['loss']:.4f}  lr {m['learning_rate']:.2e}  "
          f"{m['tokens_per_sec']:,.0f} tok/s  MFU {100 * m['mfu']:.1f}%  "
          f"ETA {eta / 60:.1f} min", flush=True)

  def info(self, msg: str):
    if self.enabled:
      print(f"[{time.time() - self._created:7.1f}s] {msg}", flush=True)

  def close(self):
    if self.enabled:
      self._jsonl.close()
      self._tb.close()
