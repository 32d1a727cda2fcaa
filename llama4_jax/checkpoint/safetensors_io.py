"""Streaming safetensors: lazy memory-mapped reads and tensor-by-tensor writes, in plain numpy.

The format (https://github.com/huggingface/safetensors): an 8-byte little-endian header length, a JSON
header {name: {dtype, shape, data_offsets: [begin, end]}, "__metadata__": {...}}, then the raw bytes.
Reading maps the file and slices lazily, so a tensor (or a part of one) is read only when indexed; bf16
comes through `ml_dtypes`. Writing plans the header from shapes first, then streams each tensor's
bytes, so memory holds one tensor at a time. Every structural problem raises `CheckpointError` naming
the file (and tensor).
"""

from __future__ import annotations

import json
import os
import struct
from typing import Callable, Iterable, Mapping

import ml_dtypes
import numpy as np

_DTYPES = {
    "F64": np.dtype(np.float64), "F32": np.dtype(np.float32), "F16": np.dtype(np.float16),
    "BF16": np.dtype(ml_dtypes.bfloat16), "I64": np.dtype(np.int64), "I32": np.dtype(np.int32),
    "I16": np.dtype(np.int16), "I8": np.dtype(np.int8), "U8": np.dtype(np.uint8),
    "BOOL": np.dtype(np.bool_),
}
_NAMES = {v: k for k, v in _DTYPES.items()}
_MAX_HEADER = 100 * 1024 * 1024


class CheckpointError(ValueError):
  """A checkpoint file or directory is malformed, truncated, incomplete or inconsistent."""


def dtype_name(dtype) -> str:
  dtype = np.dtype(dtype)
  if dtype not in _NAMES:
    raise CheckpointError(f"dtype {dtype} cannot be stored in safetensors")
  return _NAMES[dtype]


class SafetensorsFile:
  """One .safetensors file opened lazily: `f[name]` is a read-only memory-mapped numpy array."""

  def __init__(self, path: str):
    self.path = path
    if not os.path.exists(path):
      raise CheckpointError(f"safetensors file {path} does not exist")
    size = os.path.getsize(path)
    with open(path, "rb") as f:
      head = f.read(8)
      if len(head) < 8:
        raise CheckpointError(f"{path} is truncated: {size} bytes, too short for a safetensors header")
      (n,) = struct.unpack("<Q", head)
      if n > _MAX_HEADER or 8 + n > size:
        raise CheckpointError(f"{path} is truncated or not a safetensors file: header length {n} "
                              f"does not fit in {size} bytes")
      try:
        header = json.loads(f.read(n))
      except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise CheckpointError(f"{path}: the safetensors header is not valid JSON ({e})") from None
    self.metadata = header.pop("__metadata__", None) or {}
    self._data_start = 8 + n
    self._entries = {}
    for name, info in header.items():
      try:
        dtype = _DTYPES[info["dtype"]]
        shape = tuple(int(s) for s in info["shape"])
        begin, end = (int(o) for o in info["data_offsets"])
      except (KeyError, TypeError, ValueError):
        raise CheckpointError(f"{path}: tensor {name!r} has a malformed header entry {info}") from None
      if end - begin != int(np.prod(shape, dtype=np.int64)) * dtype.itemsize:
        raise CheckpointError(f"{path}: tensor {name!r} has {end - begin} bytes for shape {shape} "
                              f"{info['dtype']}")
      if self._data_start + end > size:
        raise CheckpointError(f"{path} is truncated: tensor {name!r} ends at byte "
                              f"{self._data_start + end} but the file has {size} bytes")
      self._entries[name] = (dtype, shape, begin)

  def keys(self):
    return self._entries.keys()

  def __contains__(self, name):
    return name in self._entries

  def shape(self, name: str) -> tuple[int, ...]:
    return self._entries[name][1]

  def dtype(self, name: str) -> np.dtype:
    return self._entries[name][0]

  def __getitem__(self, name: str) -> np.ndarray:
    dtype, shape, begin = self._entries[name]
    if 0 in shape:
      return np.zeros(shape, dtype)
    return np.memmap(self.path, dtype=dtype, mode="r", offset=self._data_start + begin, shape=shape)


def write_safetensors(path: str, specs: Mapping[str, tuple[tuple[int, ...], np.dtype]],
                      produce: Callable[[str], np.ndarray] | Iterable[tuple[str, np.ndarray]],
                      metadata: Mapping[str, str] | None = None) -> int:
  """Writes a file whose tensors are `specs` (name -> (shape, dtype)), in that order.

  `produce(name)` (or an iterable of (name, array) in spec order) supplies each tensor when its turn
  comes, so only one is in memory at a time. Returns the bytes of tensor data written.
  """
  header: dict = {}
  offset = 0
  for name, (shape, dtype) in specs.items():
    nbytes = int(np.prod(shape, dtype=np.int64)) * np.dtype(dtype).itemsize
    header[name] = {"dtype": dtype_name(dtype), "shape": list(shape),
                    "data_offsets": [offset, offset + nbytes]}
    offset += nbytes
  if metadata:
    header["__metadata__"] = dict(metadata)
  blob = json.dumps(header, separators=(",", ":")).encode()
  blob += b" " * (-len(blob) % 8)
  items = produce if not callable(produce) else ((n, produce(n)) for n in specs)
  with open(path, "wb") as f:
    f.write(struct.pack("<Q", len(blob)))
    f.write(blob)
    for (name, (shape, dtype)), (got_name, array) in zip(specs.items(), items, strict=True):
      array = np.ascontiguousarray(array)
      if got_name != name or tuple(array.shape) != tuple(shape) or array.dtype != np.dtype(dtype):
        raise CheckpointError(f"writing {path}: expected {name} {tuple(shape)} {np.dtype(dtype)}, got "
                              f"{got_name} {array.shape} {array.dtype}")
      f.write(array.reshape(-1).view(np.uint8).data)  # no extra copy
  return offset
