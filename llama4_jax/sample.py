"""llama4-sample --checkpoint=DIR --prompt="..." [--chat] [--prompt-file=F] [...]
(or python -m llama4_jax.sample).

    llama4-sample --checkpoint=workdir/tiny --prompt="def " --max-new-tokens=80

Streams the continuation to the terminal and prints tokens/s at the end. DIR is a Hugging Face checkpoint
or a training workdir of this project; the tokenizer is found next to it (tokenizer.model or
tokenizer.json) unless --tokenizer names one. --chat runs an interactive chat with Llama 4's template
(needs the Llama 4 tokenizer); an empty line or end of input ends it.
"""

from __future__ import annotations

import sys
import time

from absl import app, flags, logging

from llama4_jax.cli import run_absl

from llama4_jax.sharding import MESH_FLAG_HELP

_CHECKPOINT = flags.DEFINE_string("checkpoint", None, "HF checkpoint or training workdir.", required=True)
_PROMPT = flags.DEFINE_string("prompt", None, "Text to continue.")
_PROMPT_FILE = flags.DEFINE_string("prompt_file", None, "File whose text to continue.")
_CHAT = flags.DEFINE_bool("chat", False, "Interactive chat with the Llama 4 chat template.")
_SYSTEM = flags.DEFINE_string("system", None, "System message for --chat.")
_TOKENIZER = flags.DEFINE_string("tokenizer", None, "tokenizer.model / tokenizer.json (default: found "
                                 "next to the checkpoint).")
_MAX_NEW = flags.DEFINE_integer("max_new_tokens", 128, "Tokens to generate.")
_TEMPERATURE = flags.DEFINE_float("temperature", 0.0, "0 = greedy.")
_TOP_K = flags.DEFINE_integer("top_k", None, "Sample among the k most likely tokens.")
_TOP_P = flags.DEFINE_float("top_p", None, "Nucleus sampling mass.")
_SEED = flags.DEFINE_integer("seed", 0, "Sampling seed.")
_DTYPE = flags.DEFINE_string("dtype", None, "Parameter/compute dtype (default: the checkpoint's).")
_MESH = flags.DEFINE_string("mesh", None, MESH_FLAG_HELP)


def stream(model, tokenizer, prompt_ids, stop, out=sys.stdout) -> tuple[list[int], float, float]:
  """Prints the continuation as it is generated; returns (tokens, seconds to the first token,
  seconds for the rest)."""
  from llama4_jax.inference import generate_stream
  t0 = time.perf_counter()
  first = None
  tokens: list[int] = []
  shown = ""
  for tok in generate_stream(model, prompt_ids, _MAX_NEW.value, _TEMPERATURE.value, _TOP_K.value,
                             _TOP_P.value, _SEED.value, stop):
    first = first or time.perf_counter()
    if tok in stop:
      break
    tokens.append(tok)
    text = tokenizer.decode(tokens)
    if not text.endswith("\ufffd"):  # wait for the rest of a multi-byte character
      out.write(text[len(shown):])
      out.flush()
      shown = text
  end = time.perf_counter()
  return tokens, (first or end) - t0, end - (first or end)


def _rate(tokens, rest) -> str:
  return f"{(len(tokens) - 1) / rest:.1f} tokens/s after the first" if len(tokens) > 1 and rest > 0 else ""


def main(argv):
  del argv
  logging.set_verbosity(logging.WARNING)
  import llama4_jax as l4
  from llama4_jax.sharding import mesh_from_flag
  from llama4_jax.tokenizer import encode_chat, stop_ids, tokenizer_for
  try:
    mesh = mesh_from_flag(_MESH.value)
  except ValueError as e:
    sys.exit(f"sample: {e}")
  tokenizer = tokenizer_for(_CHECKPOINT.value, _TOKENIZER.value)
  model = l4.load_model(_CHECKPOINT.value, dtype=_DTYPE.value, mesh=mesh)
  stop = stop_ids(tokenizer)
  if _CHAT.value:
    messages = [{"role": "system", "content": _SYSTEM.value}] if _SYSTEM.value else []
    while True:
      try:
        line = input("user> ")
      except EOFError:
        break
      if not line.strip():
        break
      messages.append({"role": "user", "content": line})
      sys.stdout.write("assistant> ")
      tokens, first, rest = stream(model, tokenizer, encode_chat(tokenizer, messages), stop)
      print(f"\n[{len(tokens)} tokens; first after {first:.2f}s; {_rate(tokens, rest)}]")
      messages.append({"role": "assistant", "content": tokenizer.decode(tokens)})
    return
  if (_PROMPT.value is None) == (_PROMPT_FILE.value is None):
    raise app.UsageError("give exactly one of --prompt, --prompt_file or --chat")
  text = _PROMPT.value if _PROMPT.value is not None else open(_PROMPT_FILE.value).read()
  ids = ([tokenizer.bos_id] if tokenizer.bos_id is not None else []) + tokenizer.encode(text)
  sys.stdout.write(text)
  tokens, first, rest = stream(model, tokenizer, ids, stop)
  print(f"\n[{len(ids)} prompt tokens, {len(tokens)} new tokens; first after {first:.2f}s (includes "
        f"compiling); {_rate(tokens, rest)}]")


def run():
  run_absl(main, __doc__)


if __name__ == "__main__":
  run()
