"""Document sources: random-access sequences of text documents, read lazily.

Each source is a `Sequence[str]` (len + getitem) that grain's `MapDataset.source` can shuffle and slice,
so a host touches only the documents of its share. Kinds:
- `builtin`: the Python standard library's own `.py` files on this machine (nothing downloaded);
- `builtin_chat`: question-answer conversations made from those files' docstrings (for `data.format`
  "chat": "What does `json.dumps` do?" -> the first paragraph of its docstring);
- `text`: a directory (all files below it) or a glob of text files, one document per file;
- `jsonl`: JSON Lines files, one document per line, text in `field` (or, for chat, a list of
  {"role", "content"} messages in `field`, e.g. "messages");
- `parquet`: Parquet files, text in column `field` (needs pyarrow);
- `array_record`: ArrayRecord files whose records are UTF-8 text (the `array_record` package, a grain dep).

`split_train_eval` makes the deterministic held-out split: a document is held out iff a hash of its
stable key (its path and index) falls below `eval_fraction`, so the split does not move when files are added.
"""

from __future__ import annotations

import functools
import glob
import hashlib
import json
import os
import posixpath
import sysconfig
from typing import Sequence

from llama4_jax import storage


class DocumentSource(Sequence[str]):
  """A lazy list of documents with a stable key per document (for the held-out split)."""

  def key(self, i: int) -> str:
    raise NotImplementedError


def _expand(path: str) -> list[str]:
  """The files of a directory (or gs:// prefix), a file, or a glob."""
  path = storage.check(path, "data.path")
  files = storage.files_under(path) if storage.isdir(path) else storage.glob(path)
  if not files:
    raise FileNotFoundError(f"data path {path!r} matches no files (data.path must be a directory, a "
                            "file or a glob such as 'corpus/**/*.txt')")
  return files


class TextFiles(DocumentSource):
  def __init__(self, files: Sequence[str], root: str | None = None):
    self.files = list(files)
    self.root = root

  def __len__(self):
    return len(self.files)

  def __getitem__(self, i):
    text = storage.read_bytes(self.files[i]).decode("utf-8", errors="replace")
    return text.replace("\r\n", "\n").replace("\r", "\n")  # as text-mode open() reads it

  def key(self, i):
    if not self.root:
      return self.files[i]
    return (posixpath if storage.is_remote(self.root) else os.path).relpath(self.files[i], self.root)


def builtin_corpus() -> TextFiles:
  """The `.py` files of this Python's standard library (site-packages excluded), sorted by path."""
  root = sysconfig.get_paths()["stdlib"]
  files = [f for f in glob.glob(os.path.join(root, "**", "*.py"), recursive=True)
           if "site-packages" not in f and "dist-packages" not in f]
  if not files:
    raise FileNotFoundError(f"no .py files under the standard library at {root}")
  return TextFiles(sorted(files), root=root)


_QUESTIONS = ("What does `{q}` do?", "Explain `{q}` briefly.", "In Python, what is `{q}` for?")


@functools.lru_cache(maxsize=1)
def _builtin_chat_items() -> list[tuple[str, str, str]]:
  """(key, question, answer) of every conversation of `BuiltinChat`."""
  import ast
  files = builtin_corpus()
  items: list[tuple[str, str, str]] = []  # (key, question, answer)
  for i in range(len(files)):
    rel = files.key(i)
    if "test" in rel.split(os.sep)[0] or os.sep + "test" in rel:
      continue
    try:
      tree = ast.parse(files[i])
    except (SyntaxError, ValueError):
      continue
    module = rel[:-3].replace(os.sep, ".").removesuffix(".__init__")
    for node in tree.body:
      if not isinstance(node, (ast.FunctionDef, ast.ClassDef)) or node.name.startswith("_"):
        continue
      doc = ast.get_docstring(node)
      answer = " ".join(doc.split("\n\n")[0].split()) if doc else ""
      if not 40 <= len(answer) <= 600:
        continue
      name = f"{module}.{node.name}"
      if isinstance(node, ast.FunctionDef):
        name += f"({ast.unparse(node.args)})"
      key = f"{rel}:{node.name}"
      template = _QUESTIONS[int(hashlib.sha256(key.encode()).hexdigest(), 16) % 3]
      items.append((key, template.format(q=name), answer))
  if not items:
    raise FileNotFoundError("no documented functions found in the standard library for builtin_chat")
  return items


class BuiltinChat(DocumentSource):
  """Conversations about the standard library: for each public top-level function or class whose
  docstring opens with a paragraph of 40-600 characters, the user asks what it does and the assistant
  answers with that paragraph. Built by parsing (not importing) the files; about 1,800 on CPython 3.11."""

  def __init__(self):
    self.items = _builtin_chat_items()  # parsed once per process

  def __len__(self):
    return len(self.items)

  def __getitem__(self, i):
    _, question, answer = self.items[i]
    return [{"role": "user", "content": question}, {"role": "assistant", "content": answer}]

  def key(self, i):
    return self.items[i][0]


class JsonLines(DocumentSource):
  """One document per line; an index of (file, byte offset) is built once by scanning the files."""

  def __init__(self, files: Sequence[str], field: str):
    self.files, self.field = list(files), field
    self.index: list[tuple[int, int]] = []
    for fi, path in enumerate(self.files):
      with storage.open_file(path, "rb") as f:
        offset = 0
        for line in f:
          if line.strip():
            self.index.append((fi, offset))
          offset += len(line)

  def __len__(self):
    return len(self.index)

  def __getitem__(self, i):
    fi, offset = self.index[i]
    with storage.open_file(self.files[fi], "rb") as f:
      f.seek(offset)
      line = f.readline()
    try:
      record = json.loads(line)
    except json.JSONDecodeError as e:
      raise ValueError(f"{self.files[fi]} at byte {offset}: not valid JSON ({e})") from None
    if self.field not in record:
      raise KeyError(f"{self.files[fi]} at byte {offset}: no field {self.field!r} (set data.field)")
    value = record[self.field]
    return value if isinstance(value, list) else str(value)  # a list: a chat record's messages

  def key(self, i):
    fi, offset = self.index[i]
    return f"{self.files[fi]}:{offset}"


class Parquet(DocumentSource):
  def __init__(self, files: Sequence[str], field: str):
    import pyarrow.parquet as pq
    self.files, self.field = list(files), field
    self.index: list[tuple[int, int, int]] = []  # (file, row group, row)
    for fi, path in enumerate(self.files):
      with storage.open_file(path, "rb") as f:
        meta = pq.ParquetFile(f).metadata
      for g in range(meta.num_row_groups):
        self.index.extend((fi, g, r) for r in range(meta.row_group(g).num_rows))
    self._cache: tuple | None = None

  def __len__(self):
    return len(self.index)

  def __getitem__(self, i):
    import pyarrow.parquet as pq
    fi, g, r = self.index[i]
    if self._cache is None or self._cache[0] != (fi, g):
      with storage.open_file(self.files[fi], "rb") as f:
        table = pq.ParquetFile(f).read_row_group(g, columns=[self.field])
      self._cache = ((fi, g), table.column(self.field).to_pylist())
    return str(self._cache[1][r])

  def key(self, i):
    fi, g, r = self.index[i]
    return f"{self.files[fi]}:{g}:{r}"


class ArrayRecords(DocumentSource):
  def __init__(self, files: Sequence[str]):
    from array_record.python.array_record_data_source import ArrayRecordDataSource
    self.files = list(files)
    remote = [f for f in self.files if storage.is_remote(f)]
    if remote:
      raise ValueError(f"data.source='array_record' reads local files only ({remote[0]}); copy the files "
                       "to local disk (gcloud storage cp) or use jsonl/parquet/text, which read gs://")
    self._src = ArrayRecordDataSource(self.files)

  def __len__(self):
    return len(self._src)

  def __getitem__(self, i):
    return self._src[i].decode("utf-8", errors="replace")

  def key(self, i):
    return f"array_record:{i}"


def open_source(kind: str, path: str = "", field: str = "text") -> DocumentSource:
  """A DocumentSource by kind ('builtin', 'builtin_chat', 'text', 'jsonl', 'parquet', 'array_record')."""
  if kind == "builtin":
    return builtin_corpus()
  if kind == "builtin_chat":
    return BuiltinChat()
  if not path:
    raise ValueError(f"data.source={kind!r} needs data.path (a directory, file or glob)")
  files = _expand(path)
  if kind == "text":
    return TextFiles(files, root=path if storage.isdir(path) else None)
  if kind == "jsonl":
    return JsonLines(files, field)
  if kind == "parquet":
    return Parquet(files, field)
  if kind == "array_record":
    return ArrayRecords(files)
  raise ValueError(f"unknown data.source {kind!r}; choose builtin, builtin_chat, text, jsonl, parquet or "
                   "array_record")


class Subset(Sequence[str]):
  def __init__(self, source: Sequence[str], indices: Sequence[int]):
    self.source, self.indices = source, list(indices)

  def __len__(self):
    return len(self.indices)

  def __getitem__(self, i):
    return self.source[self.indices[i]]


def split_train_eval(source: DocumentSource, eval_fraction: float) -> tuple[Subset, Subset]:
  """Deterministic held-out split by a hash of each document's key."""
  train, held_out = [], []
  for i in range(len(source)):
    h = int.from_bytes(hashlib.sha256(source.key(i).encode()).digest()[:8], "big") / 2.0 ** 64
    (held_out if h < eval_fraction else train).append(i)
  if not train:
    raise ValueError(f"data.eval_fraction={eval_fraction} leaves no training documents")
  return Subset(source, train), Subset(source, held_out)
