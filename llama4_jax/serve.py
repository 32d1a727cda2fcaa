"""llama4-serve --checkpoint=DIR [--host=127.0.0.1 --port=8000 --api-key=KEY ...]
(or python -m llama4_jax.serve).

An OpenAI-compatible HTTP server with continuous batching: /v1/completions, /v1/chat/completions,
/v1/models, /health, /metrics (Prometheus). DIR is a Hugging Face checkpoint, one of this project's Orbax
checkpoints, or a training workdir; the tokenizer is found next to it unless --tokenizer names one.

    llama4-serve --checkpoint=workdir/tiny
    curl localhost:8000/v1/completions -H 'Content-Type: application/json' \\
        -d '{"model": "tiny", "prompt": "def ", "max_tokens": 40, "temperature": 0}'

Flags may be written with dashes or underscores (--api-key, --api_key). The API key can also come from
the environment (LLAMA4_JAX_API_KEY); without one the server is open, so keep it on loopback.
"""

from __future__ import annotations

import os
import signal
import sys
import time

from absl import flags, logging

from llama4_jax import storage
from llama4_jax.cli import run_absl
from llama4_jax.sharding import MESH_FLAG_HELP

_CHECKPOINT = flags.DEFINE_string("checkpoint", None, "HF checkpoint, Orbax checkpoint or training workdir.",
                                  required=True)
_HOST = flags.DEFINE_string("host", "127.0.0.1", "Address to listen on (0.0.0.0: every interface).")
_PORT = flags.DEFINE_integer("port", 8000, "Port to listen on (0: any free port).")
_MODEL_NAME = flags.DEFINE_string("model_name", None, "The name clients send as 'model' (default: the "
                                  "checkpoint directory's name).")
_TOKENIZER = flags.DEFINE_string("tokenizer", None, "tokenizer.model / tokenizer.json (default: found "
                                 "next to the checkpoint).")
_SLOTS = flags.DEFINE_integer("slots", 8, "Decode slots: requests generated at the same time.")
_MAX_CONTEXT = flags.DEFINE_integer("max_context", None, "Prompt + completion tokens per request (default: "
                                    "min(max_position_embeddings, 4096)). Sets the KV cache size.")
_MAX_QUEUE = flags.DEFINE_integer("max_queue", 64, "Requests that may wait for a slot; beyond, 429.")
_PREFIX_CACHE = flags.DEFINE_integer("prefix_cache_tokens", 0, "Keep the KV cache of long prompts' "
                                     "prefixes (after each 256-token piece, and where prompts part) for "
                                     "later prompts that start the same way, up to this many tokens of cache "
                                     "rows (each snapshot is a whole row: --max_context tokens). 0: off.")
_API_KEY = flags.DEFINE_string("api_key", None, "Require 'Authorization: Bearer KEY' (default: "
                               "$LLAMA4_JAX_API_KEY; none: open).")
_DTYPE = flags.DEFINE_string("dtype", None, "Parameter/compute dtype (default: the checkpoint's).")
_MESH = flags.DEFINE_string("mesh", None, MESH_FLAG_HELP)
_QUANTIZE = flags.DEFINE_enum("quantize", "none", ["none", "int8", "nf4"], "int8: hold the linear weights "
                              "as int8 with per-channel scales (weight-only; half of bf16's memory); nf4: "
                              "4-bit NormalFloat with a bf16 scale per 64 weights (0.27 of bf16); "
                              "quantized a tensor at a time as they load.")

API_KEY_ENV = "LLAMA4_JAX_API_KEY"


def model_name(checkpoint: str) -> str:
  """The served name: the checkpoint directory's name (a workdir's, for .../checkpoints)."""
  path = storage.check(checkpoint, "--checkpoint")
  name = storage.basename(path)
  return storage.basename(storage.parent(path)) if name == "checkpoints" else name


def main(argv):
  del argv
  logging.set_verbosity(logging.WARNING)
  import llama4_jax as l4
  from llama4_jax.serving import Server
  from llama4_jax.sharding import mesh_from_flag
  from llama4_jax.tokenizer import tokenizer_for

  t0 = time.perf_counter()
  try:
    mesh = mesh_from_flag(_MESH.value)
  except ValueError as e:
    sys.exit(f"serve: {e}")
  tokenizer = tokenizer_for(_CHECKPOINT.value, _TOKENIZER.value)
  quant = {"base_quant": _QUANTIZE.value} if _QUANTIZE.value != "none" else {}
  model = l4.load_model(_CHECKPOINT.value, dtype=_DTYPE.value, mesh=mesh, **quant)
  name = _MODEL_NAME.value or model_name(_CHECKPOINT.value)
  where = f"mesh {dict(mesh.shape)}" if mesh is not None else "one device"
  print(f"serve: loaded {name} in {time.perf_counter() - t0:.1f}s on {where}; compiling the prefill and "
        "decode steps", flush=True)
  api_key = _API_KEY.value or os.environ.get(API_KEY_ENV)
  server = Server(model, tokenizer, name, _HOST.value, _PORT.value, _SLOTS.value, _MAX_CONTEXT.value,
                  _MAX_QUEUE.value, api_key, prefix_cache_tokens=_PREFIX_CACHE.value)
  e = server.engine
  print(f"serve: {name} on {server.url} ({e.slots} slots x {e.max_length} tokens, queue {e.max_queue}"
        f"{', API key required' if api_key else ''}); ready after "
        f"{time.perf_counter() - t0:.1f}s", flush=True)
  signal.signal(signal.SIGTERM, lambda *_: sys.exit(0))  # SystemExit unwinds serve_forever and closes
  try:
    server.serve_forever()
  except KeyboardInterrupt:
    pass


def run():
  run_absl(main, __doc__)


if __name__ == "__main__":
  run()
