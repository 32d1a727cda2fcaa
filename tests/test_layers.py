"""The package's layers import only downward (README "Architecture"): an `ast` scan of every import of
`llama4_jax`, function-level ones included, against the table below; no import cycle between modules;
library modules import the package at their top, not inside functions."""

import ast
import os
from collections import defaultdict

from train_utils import REPO

PACKAGE = os.path.join(REPO, "llama4_jax")

# What each part of the package may import, besides itself. Parts are top-level modules or subpackages.
BASE = {"storage", "config", "sharding", "distributed", "emulator", "progress"}
ALLOWED = {
    "storage": set(), "emulator": set(), "distributed": set(), "progress": set(),
    "config": {"storage"}, "sharding": {"storage", "config"},
    "tokenizer": BASE, "data": BASE | {"tokenizer"},
    "model": BASE,
    "checkpoint": BASE | {"model", "tokenizer"}, "inference": BASE | {"model"},
    "train": BASE | {"model", "checkpoint", "inference", "data", "tokenizer"},
    "serving": BASE | {"model", "checkpoint", "inference", "tokenizer"},
}
# Entry points and tools import anything, and may import inside functions (a fast --help).
ENTRY_POINTS = {"__init__", "__main__", "sample", "serve", "convert", "plan", "planning", "hlo_report",
                "tpu_compile", "train.__main__"}


def _modules():
  """Dotted module name (without the package prefix) -> file path."""
  out = {}
  for root, _, files in os.walk(PACKAGE):
    for f in files:
      if f.endswith(".py"):
        rel = os.path.relpath(os.path.join(root, f), PACKAGE)[:-3].replace(os.sep, ".")
        out[rel[: -len(".__init__")] if rel.endswith(".__init__") else rel] = os.path.join(root, f)
  return out


def _imports(name, path, modules):
  """(imported module, line, inside a function) for each import of the package in the file."""
  tree = ast.parse(open(path).read())
  is_package = path.endswith("__init__.py")
  found = []

  def resolve(target, names):
    target = target[len("llama4_jax."):] if target.startswith("llama4_jax.") else (
        "__init__" if target == "llama4_jax" else None)
    if target is None:
      return []
    out = []
    for n in names:  # `from pkg import submodule` imports the submodule
      sub = n if target == "__init__" else f"{target}.{n}"
      out.append(sub if sub in modules else target)
    return out

  def visit(node, in_function):
    for child in ast.iter_child_nodes(node):
      inside = in_function or isinstance(child, (ast.FunctionDef, ast.AsyncFunctionDef, ast.Lambda))
      if isinstance(child, ast.Import):
        for a in child.names:
          for m in resolve(a.name, [""]):
            found.append((m.rstrip("."), child.lineno, inside))
      elif isinstance(child, ast.ImportFrom):
        if child.level:
          parts = ("llama4_jax." + name).split(".")
          base = parts[: len(parts) - child.level + (1 if is_package else 0)]
          target = ".".join(base + ([child.module] if child.module else []))
        else:
          target = child.module or ""
        for m in resolve(target, [a.name for a in child.names]):
          found.append((m, child.lineno, inside))
      visit(child, inside)

  visit(tree, False)
  return [(m if m else "__init__", line, inside) for m, line, inside in found]


def _part(module):
  return module.split(".")[0]


def test_layers_import_only_downward():
  modules = _modules()
  problems, graph = [], defaultdict(set)
  for name, path in sorted(modules.items()):
    entry = name in ENTRY_POINTS
    for target, line, inside in _imports(name, path, modules):
      where = f"llama4_jax/{os.path.relpath(path, PACKAGE)}:{line}"
      if target == "__init__" and not entry:
        problems.append(f"{where}: imports the package's public API (llama4_jax/__init__) from inside it")
        continue
      graph[name].add(target)
      if entry:
        continue
      if inside:
        problems.append(f"{where}: imports llama4_jax.{target} inside a function (move it to the top)")
      mine, theirs = _part(name), _part(target)
      if theirs != mine and theirs not in ALLOWED.get(mine, set()):
        problems.append(f"{where}: {mine} may not import {theirs} (llama4_jax.{target})")
  assert not problems, "\n".join(problems)

  # no cycle between modules (Tarjan's strongly connected components)
  index, low, stack, on, cycles, counter = {}, {}, [], set(), [], [0]

  def strong(v):
    index[v] = low[v] = counter[0]
    counter[0] += 1
    stack.append(v)
    on.add(v)
    for w in graph.get(v, ()):
      if w not in index:
        strong(w)
        low[v] = min(low[v], low[w])
      elif w in on:
        low[v] = min(low[v], index[w])
    if low[v] == index[v]:
      component = []
      while True:
        w = stack.pop()
        on.discard(w)
        component.append(w)
        if w == v:
          break
      if len(component) > 1:
        cycles.append(sorted(component))

  for v in list(graph):
    if v not in index:
      strong(v)
  # a package's __init__ re-exporting its modules is not a cycle of code
  cycles = [c for c in cycles if not all(m in ENTRY_POINTS or "." not in m and m in ALLOWED for m in c)]
  assert not cycles, f"import cycles: {cycles}"


def test_the_scan_sees_function_level_and_relative_imports(tmp_path):
  """The scan itself: a function-level import and `from pkg import submodule` are both found."""
  src = tmp_path / "m.py"
  src.write_text("from llama4_jax import storage\n\ndef f():\n  from llama4_jax.model import linear\n")
  modules = {"storage": "", "model": "", "model.linear": "", "m": ""}
  assert _imports("m", str(src), modules) == [("storage", 1, False), ("model.linear", 4, True)]
