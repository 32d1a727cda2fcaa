"""Shared helpers for the training tests: a synthetic corpus and a micro run config."""

import os
import subprocess
import sys

import numpy as np

from llama4_jax.train.config import default_run_config, model_fields

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def make_corpus(directory, num_docs=48, seed=0):
  """Text files of pseudo-random sentences over a small vocabulary (learnable structure)."""
  rng = np.random.RandomState(seed)
  words = ["alpha", "beta", "gamma", "delta", "def", "return", "class", "self", "import", "for", "in",
           "range", "(", ")", ":", "=", "+", "print", "value", "x", "y", "if", "else", "\n", "    "]
  os.makedirs(directory, exist_ok=True)
  for i in range(num_docs):
    n = rng.randint(20, 400)
    text = " ".join(words[j] for j in rng.zipf(1.6, n) % len(words))
    with open(os.path.join(directory, f"doc{i:03d}.txt"), "w") as f:
      f.write(text)
  return str(directory)


def micro_config(corpus, **changes):
  c = default_run_config()
  c.steps = 6
  c.batch_size = 8
  c.seq_len = 32
  c.learning_rate = 3e-3
  c.warmup_steps = 2
  c.log_every = 1
  c.eval_every = 0
  c.checkpoint_every = 3
  c.async_checkpointing = False
  c.model = model_fields("tiny", vocab_size=320, hidden_size=64, intermediate_size=32,
                         intermediate_size_mlp=64, num_hidden_layers=4, num_attention_heads=4,
                         num_key_value_heads=2, head_dim=16, num_local_experts=4, attention_chunk_size=16)
  c.data.source = "text"
  c.data.path = corpus
  c.data.vocab_size = 320
  c.data.eval_fraction = 0.1
  return apply_changes(c, changes)


def apply_changes(c, changes):
  """Sets dotted fields ("model.lora_rank") of run config `c`; dict values update sub-configs."""
  for key, value in changes.items():
    target = c
    *parents, leaf = key.split(".")
    for p in parents:
      target = target[p]
    if isinstance(value, dict):
      target[leaf].update(value)
    else:
      target[leaf] = value
  return c


def config_flags(c):
  """The command-line overrides that reproduce config `c` from the default file."""
  flags = []
  for key in ("steps", "batch_size", "seq_len", "learning_rate", "warmup_steps", "log_every",
              "eval_every", "checkpoint_every", "async_checkpointing", "seed"):
    flags.append(f"--config.{key}={c[key]}")
  for key in ("vocab_size", "hidden_size", "intermediate_size", "intermediate_size_mlp",
              "num_attention_heads", "num_key_value_heads", "head_dim", "num_local_experts",
              "attention_chunk_size"):
    flags.append(f"--config.model.{key}={c.model[key]}")
  for key in ("source", "path", "vocab_size", "eval_fraction"):
    flags.append(f"--config.data.{key}={c.data[key]}")
  flags.append("--config.sample_prompt=")
  return flags


def xla_flags(devices: int) -> str:
  """This session's XLA_FLAGS (see conftest.py) with `devices` simulated CPU devices."""
  kept = [f for f in os.environ.get("XLA_FLAGS", "").split()
          if not f.startswith("--xla_force_host_platform_device_count")]
  return " ".join(kept + [f"--xla_force_host_platform_device_count={devices}"])


def train_command(workdir, c, devices=1):
  env = dict(os.environ, JAX_PLATFORMS="cpu", XLA_FLAGS=xla_flags(devices))
  cmd = [sys.executable, "-m", "llama4_jax.train", "--config=configs/tiny_cpu.py",
         f"--workdir={workdir}"] + config_flags(c)
  return cmd, env


def read_metrics(workdir):
  """step -> loss from a workdir's metrics.jsonl (local or gs://)."""
  import json

  from llama4_jax import storage
  out = {}
  for line in storage.read_text(storage.join(str(workdir), "metrics.jsonl")).splitlines():
    rec = json.loads(line)
    if "loss" in rec:
      out[rec["step"]] = rec["loss"]  # a resumed run's later records win
  return out


def run(cmd, env, timeout=300):
  proc = subprocess.run(cmd, env=env, cwd=REPO, capture_output=True, text=True, timeout=timeout)
  assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
  return proc
