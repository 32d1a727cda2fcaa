"""`python -m llama4_jax`: a smoke run of the tiny default model on this machine's devices.

Builds the `tiny` preset with random weights, runs a jit-compiled forward pass, exports it as a Hugging Face
checkpoint, loads that back and checks the logits agree: a quick check that an install works. The main
job is `python -m llama4_jax.train` (see the README).
"""

from __future__ import annotations

import sys
import tempfile
import time

import jax
import numpy as np


def main(argv: list[str]) -> int:
  import llama4_jax as l4
  cfg = l4.get_config("tiny")
  print(f"devices: {jax.device_count()} x {jax.devices()[0].platform}; tiny Llama 4: "
        f"{cfg.num_params() / 1e6:.1f}M params, {cfg.num_hidden_layers} layers, "
        f"{cfg.num_local_experts} experts (MoE every {cfg.interleave_moe_layer_step} layers)")
  model = l4.create_model(cfg, mesh=l4.make_mesh(), seed=0)
  ids = np.random.RandomState(0).randint(0, cfg.vocab_size, (4, 512)).astype(np.int32)
  t0 = time.perf_counter()
  logits = np.asarray(model(ids))
  t1 = time.perf_counter()
  logits = np.asarray(model(ids))
  t2 = time.perf_counter()
  print(f"forward [4, 512] -> {list(logits.shape)}: compile+run {t1 - t0:.2f}s, then "
        f"{ids.size / (t2 - t1):,.0f} tokens/s")
  with tempfile.TemporaryDirectory() as tmp:
    path = l4.save_pretrained(model, f"{tmp}/tiny_hf")
    reloaded = l4.load_model(path)
    diff = float(np.abs(np.asarray(reloaded(ids)) - logits).max())
  print(f"Hugging Face export -> load_model round trip: max |logit diff| = {diff:.2e}")
  return 0 if diff < 1e-5 else 1


if __name__ == "__main__":
  sys.exit(main(sys.argv))
