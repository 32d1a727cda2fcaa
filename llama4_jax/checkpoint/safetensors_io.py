"""Streaming safetensors: lazy reads and tensor-by-tensor writes, in plain numpy.

The format (https://github.com/huggingface/safetensors): an 8-byte little-endian header length, a JSON
header {name: {dtype, shape, data_offsets: [begin, end]}, "__metadata__": {...}}, then the raw bytes.
`read(name, index)` copies a tensor (or a slice of one) into a fresh array with positioned reads of the
bytes it covers (no page-by-page faults of a memory map); `f[name]` is the memory map itself.
bf16 comes through `ml_dtypes`.
Why not the `safetensors` library's `safe_open(...).get_slice`: it cannot read `gs://` objects, and it reads
a whole bf16 tensor from the page cache ~5x slower (0.28 s against 0.05 s for 256 MB;
`benchmarks/safetensors_read.py`). The header rules are the library's: the same checks here for every
file (tested against the library on crafted headers), and local files are also opened by the library once,
so nothing it refuses is read. Writing plans the header from shapes first, then streams each tensor's
bytes, so memory holds one tensor at a time. Every structural problem raises `CheckpointError` naming
the file (and tensor).
"""

from __future__ import annotations

import contextlib
import json
import os
import struct
from typing import Callable, Iterable, Mapping

import ml_dtypes
import numpy as np
import safetensors

from llama4_jax import storage

_DTYPES = {
    "F64": np.dtype(np.float64), "F32": np.dtype(np.float32), "F16": np.dtype(np.float16),
    "BF16": np.dtype(ml_dtypes.bfloat16), "I64": np.dtype(np.int64), "I32": np.dtype(np.int32),
    "I16": np.dtype(np.int16), "I8": np.dtype(np.int8), "U8": np.dtype(np.uint8),
    "BOOL": np.dtype(np.bool_),
}
_NAMES = {v: k for k, v in _DTYPES.items()}
_MAX_HEADER = 100 * 1024 * 1024
_READ_BLOCK = 64 * 1024 * 1024  # bytes per read when a slice is not one contiguous run


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
    self.remote = storage.is_remote(path)
    if not storage.exists(path):
      raise CheckpointError(f"safetensors file {path} does not exist")
    size = storage.size(path)
    head = storage.read_range(path, 0, 8)
    if len(head) < 8:
      raise CheckpointError(f"{path} is truncated: {size} bytes, too short for a safetensors header")
    (n,) = struct.unpack("<Q", head)
    if n > _MAX_HEADER or 8 + n > size:
      raise CheckpointError(f"{path} is truncated or not a safetensors file: header length {n} "
                            f"does not fit in {size} bytes")
    try:
      header = json.loads(storage.read_range(path, 8, n))
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
      if begin < 0 or end < begin or min(shape, default=0) < 0:
        raise CheckpointError(f"{path}: tensor {name!r} has negative or reversed data_offsets or shape "
                              f"({info})")
      if end - begin != int(np.prod(shape, dtype=np.int64)) * dtype.itemsize:
        raise CheckpointError(f"{path}: tensor {name!r} has {end - begin} bytes for shape {shape} "
                              f"{info['dtype']}")
      if self._data_start + end > size:
        raise CheckpointError(f"{path} is truncated: tensor {name!r} ends at byte "
                              f"{self._data_start + end} but the file has {size} bytes")
      self._entries[name] = (dtype, shape, begin)
    # As the safetensors library requires: the tensors tile the data exactly, without overlaps or gaps.
    # (Sorted by both ends, so an empty tensor sits before a tensor that starts where it does.)
    expected = 0
    spans = sorted((begin, begin + int(np.prod(shape, dtype=np.int64)) * dtype.itemsize, name)
                   for name, (dtype, shape, begin) in self._entries.items())
    for begin, end, name in spans:
      if begin != expected:
        raise CheckpointError(f"{path}: tensor {name!r} starts at data byte {begin}, not {expected}: "
                              "overlapping or gapped data_offsets (a damaged or hand-made file)")
      expected = end
    if self._data_start + expected != size:
      raise CheckpointError(f"{path}: {size - self._data_start - expected} bytes after the last tensor "
                            "(a damaged file, or not a safetensors file)")
    if not self.remote:  # and whatever else the library refuses (it cannot open gs:// objects)
      try:
        with safetensors.safe_open(path, "numpy"):
          pass
      except safetensors.SafetensorError as e:
        raise CheckpointError(f"{path}: the safetensors library refuses this file ({e})") from None

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
    if self.remote:  # no memory map of an object in a bucket: a copy
      return self.read(name)
    return np.memmap(self.path, dtype=dtype, mode="r", offset=self._data_start + begin, shape=shape)

  def read(self, name: str, index: tuple[slice, ...] = ()) -> np.ndarray:
    """A fresh C-contiguous copy of `f[name][index]` (index: slices with step 1, leading dims first).

    Whole leading-axis rows are one contiguous byte run, read straight into the result; a slice of the
    inner axes reads the rows it spans in blocks of about 64 MB and keeps the part asked for.
    """
    dtype, shape, begin = self._entries[name]
    index = tuple(index) + (slice(None),) * (len(shape) - len(index))
    index = tuple(slice(*s.indices(n)[:2]) for s, n in zip(index, shape))
    out = np.empty(tuple(max(0, s.stop - s.start) for s in index), dtype)
    if out.size == 0:
      return out
    rows = index[0]
    row_bytes = int(np.prod(shape[1:], dtype=np.int64)) * dtype.itemsize
    inner = index[1:]
    offset = self._data_start + begin + rows.start * row_bytes
    with (contextlib.nullcontext() if self.remote else open(self.path, "rb", buffering=0)) as f:
      if all(s.start == 0 and s.stop == n for s, n in zip(inner, shape[1:])):
        self._pread(f, out.reshape(-1).view(np.uint8), offset, name)
        return out
      step = max(1, _READ_BLOCK // max(row_bytes, 1))
      block = np.empty((min(step, out.shape[0]),) + tuple(shape[1:]), dtype)
      for r in range(0, out.shape[0], step):
        k = min(step, out.shape[0] - r)
        self._pread(f, block[:k].reshape(-1).view(np.uint8), offset + r * row_bytes, name)
        out[r:r + k] = block[(slice(0, k),) + inner]
    return out

  def _pread(self, f, buf: np.ndarray, offset: int, name: str) -> None:
    view, done = memoryview(buf), 0
    while done < len(view):
      if self.remote:  # ranged GETs of the object, at most _READ_BLOCK bytes each
        data = storage.read_range(self.path, offset + done, min(_READ_BLOCK, len(view) - done))
        n = len(data)
        view[done:done + n] = data
      else:
        n = os.preadv(f.fileno(), [view[done:]], offset + done)
      if n == 0:
        raise CheckpointError(f"{self.path} is truncated: tensor {name!r} ends past the end of the file")
      done += n


_WORD = np.dtype(np.complex128)  # a 16-byte word: numpy copies it as raw bytes, 8 bf16 at a time
_PACK_BYTES = 2 << 20  # bytes of the source packed into words at a time (stays in cache)


def contiguous(x: np.ndarray, tile: int = 64) -> np.ndarray:
  """`np.ascontiguousarray(x)`, several times faster for transposed views (the layouts' `.T` and head
  reshapes). numpy's strided copy costs about the same per element whatever its size, so a transposed
  2-D view is copied as 16-byte words (`_transpose_words`); other views in tile x tile blocks, as
  unsigned integers of the same width (a bf16 copy elementwise through ml_dtypes is slower)."""
  x = np.asarray(x)
  if x.flags.c_contiguous or x.ndim < 2 or x.size < tile * tile:
    return np.ascontiguousarray(x)
  out = np.empty(x.shape, x.dtype)
  src, dst = x, out
  # the trailing or the leading axes that collapse into one strided axis (transposed head reshapes)
  def collapses(axes):
    return all(x.strides[i] == x.strides[i + 1] * x.shape[i + 1] for i in axes[:-1])
  for axes, shape in ((range(1, x.ndim), (x.shape[0], -1)), (range(x.ndim - 1), (-1, x.shape[-1]))):
    if x.ndim > 2 and collapses(list(axes)):  # (a failed in-place reshape costs milliseconds)
      src, dst = x.reshape(shape), out.reshape(shape)
      break
  if x.dtype.itemsize in (1, 2, 4, 8):
    bits = np.dtype(f"u{x.dtype.itemsize}")
    src, dst = src.view(bits), dst.view(bits)
    k = _WORD.itemsize // bits.itemsize
    if src.ndim == 2 and src.strides[0] == bits.itemsize and src.shape[1] % k == 0:
      _transpose_words(src.T, dst, tile)
      return out
  _tiled_copy(src, dst, tile)
  return out


def _tiled_copy(src: np.ndarray, dst: np.ndarray, tile: int) -> None:
  for i in range(0, src.shape[0], tile):
    for j in range(0, src.shape[-1], tile):
      dst[i:i + tile, ..., j:j + tile] = src[i:i + tile, ..., j:j + tile]


def _transpose_words(a_CR: np.ndarray, out_RC: np.ndarray, tile: int) -> None:
  """out = a.T for a [C, R] whose rows are contiguous (C a multiple of k = 16 / itemsize), block by block
  of about _PACK_BYTES: k consecutive rows of a are interleaved into [C/k, R] 16-byte words (a copy with
  small strides, in cache), and the words are transposed tile by tile into out viewed as [R, C/k] words."""
  c, r = a_CR.shape
  size = a_CR.itemsize
  k = _WORD.itemsize // size
  words_R = out_RC.view(_WORD)
  # square blocks: the reads (rows of a) and the transposed writes (rows of out) both run >= 1 KB
  side = max(tile, int(np.sqrt(_PACK_BYTES // size)) // tile * tile)
  c_step, r_step = min(c, side // k * k), min(r, side)
  packed = np.empty((c_step // k, r_step, k), a_CR.dtype)
  for c0 in range(0, c, c_step):
    nc = min(c_step, c - c0)
    for r0 in range(0, r, r_step):
      nr = min(r_step, r - r0)
      block = packed[:nc // k, :nr]
      for j in range(k):
        block[:, :, j] = a_CR[c0 + j:c0 + nc:k, r0:r0 + nr]
      _tiled_copy(block.view(_WORD)[..., 0].T, words_R[r0:r0 + nr, c0 // k:(c0 + nc) // k], tile)


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
  with storage.open_file(path, "wb") as f:  # to a bucket: a streamed (resumable) upload
    f.write(struct.pack("<Q", len(blob)))
    f.write(blob)
    for (name, (shape, dtype)), (got_name, array) in zip(specs.items(), items, strict=True):
      array = contiguous(array)
      if got_name != name or tuple(array.shape) != tuple(shape) or array.dtype != np.dtype(dtype):
        raise CheckpointError(f"writing {path}: expected {name} {tuple(shape)} {np.dtype(dtype)}, got "
                              f"{got_name} {array.shape} {array.dtype}")
      f.write(array.reshape(-1).view(np.uint8).data)  # no extra copy
  return offset
