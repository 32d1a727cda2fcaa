"""Reading a safetensors tensor: this stack's reader against the `safetensors` library's `get_slice`.

    python benchmarks/safetensors_read.py [--rows 8192] [--cols 16384] [--repeats 5]

One bf16 tensor (8192 x 16384: 256 MB, a Scout-sized projection) in a fresh file, read from the page
cache (the file is read once first, so the figures are the readers' own costs, not the disk's): whole,
and a column slice (the inner-axis slice a tensor-parallel shard asks for), each as a median of
`--repeats`. Both results are checked equal bit for bit. Why the loaders keep their own reader
(`llama4_jax/checkpoint/safetensors_io.py`); it also reads `gs://` objects, which the library cannot.
Prints JSON.
"""

from __future__ import annotations

import argparse
import os
import sys
import tempfile

import ml_dtypes
import numpy as np
from safetensors import safe_open
from safetensors.numpy import save_file

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from common import emit, machine, timeit  # noqa: E402

from llama4_jax.checkpoint.safetensors_io import SafetensorsFile  # noqa: E402


def main():
  p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
  p.add_argument("--rows", type=int, default=8192)
  p.add_argument("--cols", type=int, default=16384)
  p.add_argument("--repeats", type=int, default=5)
  args = p.parse_args()
  rng = np.random.default_rng(0)
  w = rng.standard_normal((args.rows, args.cols), np.float32).astype(ml_dtypes.bfloat16)
  cols = slice(args.cols // 4, args.cols // 2)
  with tempfile.TemporaryDirectory() as d:
    path = os.path.join(d, "w.safetensors")
    save_file({"w": w}, path)
    with open(path, "rb") as f:  # into the page cache
      while f.read(64 << 20):
        pass

    def ours(index=()):
      return SafetensorsFile(path).read("w", index)

    def library(index=()):
      with safe_open(path, "numpy") as f:
        return f.get_slice("w")[index or slice(None)]

    for index in ((), (slice(None), cols)):
      assert np.array_equal(ours(index).view(np.uint16), library(index).view(np.uint16))
    rows = []
    for what, index in (("whole tensor", ()), ("columns [n/4, n/2)", (slice(None), cols))):
      a = timeit(lambda: ours(index), args.repeats)
      b = timeit(lambda: library(index), args.repeats)
      mb = w[index or slice(None)].nbytes / 2**20
      rows.append({"read": what, "megabytes": round(mb), "ours_s": round(a, 3), "library_s": round(b, 3),
                   "ours_gb_per_s": round(mb / 1024 / a, 2), "library_gb_per_s": round(mb / 1024 / b, 2),
                   "library_over_ours": round(b / a, 2)})
  emit({"benchmark": "safetensors_read", "shape": [args.rows, args.cols], "dtype": "bfloat16",
        "from": "page cache", "rows": rows, "machine": machine()})


if __name__ == "__main__":
  main()
