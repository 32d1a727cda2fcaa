"""Paths a user gives: a local path or a Cloud Storage URL (`gs://BUCKET/PREFIX`), nothing else.

Every file the stack reads or writes outside Orbax/tensorstore goes through here (fsspec, which reads
`gs://` with gcsfs). Orbax and tensorstore take the same `gs://` strings natively. `check` rejects
any other scheme (s3://, http://, ...) before anything is computed, so a URL is never turned into a local
directory (`./gs:/bucket/...`).

A Cloud Storage object is written whole and appears only when the upload completes, so `write_bytes`
is atomic there as `os.replace` makes it locally. Objects cannot be appended to: `AppendFile` keeps what
it has written and rewrites the object on `flush` (rate-limited by the caller).

Emulators: with `STORAGE_EMULATOR_HOST` set (fake-gcs-server, as the tests use), tensorstore is pointed at
the same address (`TENSORSTORE_GCS_HTTP_URL`) and gcsfs's bucket-type probe (a gRPC call no emulator
answers, 60 s per bucket) is switched off.
"""

from __future__ import annotations

import contextlib
import os
import posixpath
import re
import shutil
import tempfile

_SCHEME = re.compile(r"^([A-Za-z][A-Za-z0-9+.\-]*)://")
SCHEMES = ("gs",)


def _configure_emulator() -> None:
  host = os.environ.get("STORAGE_EMULATOR_HOST")
  if host:
    os.environ.setdefault("TENSORSTORE_GCS_HTTP_URL", host if "://" in host else f"http://{host}")
    os.environ.setdefault("GCSFS_EXPERIMENTAL_ZB_HNS_SUPPORT", "false")


_configure_emulator()


def scheme(path: str) -> str | None:
  m = _SCHEME.match(str(path))
  return m.group(1).lower() if m else None


def is_remote(path) -> bool:
  return scheme(str(path)) is not None


def check(path, what: str = "path") -> str:
  """`path` as a string, local ones made absolute; raises ValueError for a scheme we do not read."""
  path = str(path)
  s = scheme(path)
  if s is None:
    if path.startswith("gs:/"):  # gs:/bucket (one slash): a typo that would make a local "gs:" directory
      raise ValueError(f"{what}={path!r}: did you mean gs://{path[4:].lstrip('/')}? Cloud Storage URLs "
                       "take two slashes")
    return os.path.abspath(path)
  if s not in SCHEMES:
    raise ValueError(f"{what}={path!r}: the {s}:// scheme is not supported; give a local path or a Cloud "
                     "Storage URL (gs://BUCKET/PREFIX)")
  if not path[len(s) + 3:].strip("/"):
    raise ValueError(f"{what}={path!r}: a gs:// URL needs a bucket name (gs://BUCKET/PREFIX)")
  if s == "gs":
    try:
      import gcsfs  # noqa: F401
    except ImportError as e:
      raise ImportError(f"{what}={path!r}: reading gs:// needs gcsfs, a dependency of this package: "
                        "reinstall it (pip install -e .) or pip install gcsfs") from e
  return path.rstrip("/")


def join(base, *parts: str) -> str:
  base = str(base)
  return posixpath.join(base, *parts) if is_remote(base) else os.path.join(base, *parts)


def parent(path) -> str:
  path = str(path).rstrip("/")
  return posixpath.dirname(path) if is_remote(path) else os.path.dirname(os.path.abspath(path))


def basename(path) -> str:
  return posixpath.basename(str(path).rstrip("/"))


def kvstore_url(p) -> str:
  """`p` as a TensorStore kvstore URL ending in "/" (file:// for local paths)."""
  p = str(p).rstrip("/")
  return (p if is_remote(p) else "file://" + os.path.abspath(p)) + "/"


def _fs(p):
  """(fsspec filesystem, path without the scheme) of a gs:// URL, its listing cache dropped: another
  process (or host) may have written since this one last looked."""
  import fsspec
  fs, root = fsspec.core.url_to_fs(str(p))
  fs.invalidate_cache()
  return fs, root


def exists(p) -> bool:
  if not is_remote(p):
    return os.path.exists(p)
  fs, root = _fs(p)
  return fs.exists(root)


def isdir(p) -> bool:
  if not is_remote(p):
    return os.path.isdir(p)
  fs, root = _fs(p)
  return fs.isdir(root)


def makedirs(p) -> None:
  """A local directory tree; nothing for gs:// (object stores have no directories)."""
  if not is_remote(p):
    os.makedirs(p, exist_ok=True)


def listdir(p) -> list[str]:
  """Names of the entries (files and sub-prefixes) directly in `p`."""
  if not is_remote(p):
    return os.listdir(p)
  fs, root = _fs(p)
  return [posixpath.basename(x.rstrip("/")) for x in fs.ls(root, detail=False)]


def files_under(p) -> list[str]:
  """Every file below directory `p` (every object under the prefix for gs://), sorted."""
  if not is_remote(p):
    return sorted(os.path.join(d, f) for d, _, fs in os.walk(p) for f in fs)
  fs, root = _fs(p)
  return sorted(f"{scheme(p)}://{f}" for f in fs.find(root))


def glob(pattern) -> list[str]:
  """The files matching `pattern` (`**` crosses directories), sorted."""
  if not is_remote(pattern):
    import glob as _glob
    return sorted(f for f in _glob.glob(pattern, recursive=True) if os.path.isfile(f))
  fs, root = _fs(pattern)
  return sorted(f"{scheme(pattern)}://{f}" for f in fs.glob(root) if fs.isfile(f))


# Bytes buffered per part of a streamed (resumable) upload: fewer, larger requests than gcsfs's default
# 5 MiB, within the conversions' memory bound (benchmarks/gcs.py: a 1 GB orbax-to-hf into the emulator
# peaks 546 MB over the baseline with 64 MiB parts; the emulator also rewrites the object per part, so
# there it runs at 14 / 23 / 28 MB/s with 5 / 32 / 64 MiB parts).
UPLOAD_PART_BYTES = 32 << 20


def open_file(p, mode: str = "r"):
  """A file object (reads of gs:// objects are ranged: seek and read fetch only what they need; writes
  are streamed in parts of UPLOAD_PART_BYTES and the object appears when the file is closed)."""
  if not is_remote(p):
    return open(p, mode)
  fs, root = _fs(p)
  if "w" in mode:
    return fs.open(root, mode, block_size=UPLOAD_PART_BYTES)
  return fs.open(root, mode)


def read_bytes(p) -> bytes:
  if not is_remote(p):
    with open(p, "rb") as f:
      return f.read()
  fs, root = _fs(p)
  return fs.cat_file(root)


def read_range(p, start: int, length: int) -> bytes:
  """Bytes [start, start + length) of a file (fewer at its end): one ranged GET on Cloud Storage."""
  if not is_remote(p):
    with open(p, "rb") as f:
      f.seek(start)
      return f.read(length)
  fs, root = _fs(p)
  return fs.cat_file(root, start=start, end=start + length)


def read_text(p) -> str:
  return read_bytes(p).decode("utf-8")


def write_bytes(p, data: bytes) -> None:
  """Atomically: a reader sees the old content or the new, never part (a temporary file renamed into
  place locally; one object upload on Cloud Storage)."""
  p = str(p)
  if is_remote(p):
    fs, root = _fs(p)
    fs.pipe_file(root, data)
    return
  os.makedirs(os.path.dirname(os.path.abspath(p)), exist_ok=True)
  fd, tmp = tempfile.mkstemp(dir=os.path.dirname(os.path.abspath(p)), prefix=".tmp-" + os.path.basename(p))
  try:
    with os.fdopen(fd, "wb") as f:
      f.write(data)
    os.replace(tmp, p)
  except BaseException:
    with contextlib.suppress(OSError):
      os.remove(tmp)
    raise


def write_text(p, text: str) -> None:
  write_bytes(p, text.encode("utf-8"))


def copy(src, dst) -> None:
  """Copies a (small: held in memory) file between any two of local / gs://, published atomically."""
  write_bytes(dst, read_bytes(src))


def size(p) -> int:
  if not is_remote(p):
    return os.path.getsize(p)
  fs, root = _fs(p)
  return int(fs.size(root))


def is_nonempty_dir(p) -> bool:
  if not is_remote(p):
    return os.path.exists(p) and (not os.path.isdir(p) or bool(os.listdir(p)))
  fs, root = _fs(p)
  return fs.exists(root) and (fs.isfile(root) or bool(fs.ls(root, detail=False)))


# Files a reader takes as the sign of a complete directory: moved into place after everything else.
COMMIT_NAMES = ("commit_success.txt", "config.json")


@contextlib.contextmanager
def atomic_directory(out_dir, overwrite: bool = False, enabled: bool = True):
  """Yields a temporary sibling of `out_dir` to fill; on success it replaces `out_dir`, on any error it
  is removed, so a failure never leaves a partial output.

  Locally the sibling is renamed into place (the old directory kept until then). Cloud Storage has no
  rename of a prefix: the objects are moved (server-side copies) once all are written, those named in
  `COMMIT_NAMES` last, so readers that wait for those (Orbax's commit marker, a Hugging Face
  config.json) never see a partial output. `enabled=False` (processes that do not write) only checks.
  """
  out_dir = check(out_dir, "output directory")
  if is_nonempty_dir(out_dir) and not overwrite:
    raise FileExistsError(f"{out_dir} exists and is not empty; pass overwrite=True (--overwrite) to "
                          "replace it")
  if not enabled:
    yield None
    return
  if is_remote(out_dir):
    yield from _remote_atomic_directory(out_dir)
    return
  parent = os.path.dirname(out_dir)
  os.makedirs(parent, exist_ok=True)
  tmp = tempfile.mkdtemp(prefix=f".{os.path.basename(out_dir)}.tmp-", dir=parent)
  try:
    yield tmp
    old = None
    if os.path.exists(out_dir):
      old = tempfile.mkdtemp(prefix=f".{os.path.basename(out_dir)}.old-", dir=parent)
      os.replace(out_dir, os.path.join(old, "previous"))
    os.replace(tmp, out_dir)
    tmp = None
    if old is not None:
      shutil.rmtree(old, ignore_errors=True)
  finally:
    if tmp is not None:
      shutil.rmtree(tmp, ignore_errors=True)


def _remote_atomic_directory(out_dir: str):
  import uuid
  tmp = f"{out_dir}.tmp-{uuid.uuid4().hex[:12]}"
  fs, tmp_root = _fs(tmp)
  _, out_root = _fs(out_dir)
  done = False
  try:
    yield tmp
    fs.invalidate_cache()
    objects = fs.find(tmp_root)
    if fs.exists(out_root):
      fs.rm(out_root, recursive=True)
    for obj in sorted(objects, key=lambda o: (posixpath.basename(o) in COMMIT_NAMES, o)):
      fs.mv(obj, out_root + obj[len(tmp_root):])
    done = True
  finally:
    fs.invalidate_cache()
    if not done and fs.exists(tmp_root):
      fs.rm(tmp_root, recursive=True)


class AppendFile:
  """A file written by appending (metrics.jsonl, TensorBoard events). Locally an append-mode file. On
  Cloud Storage, where objects cannot be appended to, everything written is kept (after what the object
  already held) and the whole object is rewritten on `flush`: call it every few seconds, not per line."""

  def __init__(self, p, binary: bool = False, keep_existing: bool = True):
    self.path, self.binary = str(p), binary
    self.remote = is_remote(self.path)
    self._dirty = False
    if self.remote:
      self._data = bytearray(read_bytes(self.path) if keep_existing and exists(self.path) else b"")
    else:
      makedirs(os.path.dirname(self.path))
      self._f = open(self.path, "ab" if binary else "a")

  def write(self, data) -> None:
    if self.remote:
      self._data += data if self.binary else data.encode("utf-8")
      self._dirty = True
    else:
      self._f.write(data)

  def flush(self) -> None:
    if self.remote:
      if self._dirty:
        write_bytes(self.path, bytes(self._data))
        self._dirty = False
    else:
      self._f.flush()

  def close(self) -> None:
    self.flush()
    if not self.remote:
      self._f.close()
