"""The trainer, top to bottom in data-flow order: mesh, data, tokenizer, model, shardings, optimizer,
restore, steps (with eval, checkpoints, preemption), final eval and a sample.

`train(config, workdir)` is what `python -m llama4_jax.train` runs; notebooks and tests call it directly.
Rerunning it on the same workdir resumes from the latest checkpoint; SIGTERM (a preemption notice) saves a
checkpoint at a step every process agrees on and returns normally; a NaN/Inf loss raises `TrainingDiverged`
without writing anything, so the last good checkpoint is what remains. The host never waits for a step
to finish before dispatching the next: each step's metrics are read one step late.
"""

from __future__ import annotations

import math
import signal
import time
from typing import Any, Callable

import grain
import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx
from jax.sharding import NamedSharding, PartitionSpec

from llama4_jax import storage
from llama4_jax.checkpoint.load import load_model
from llama4_jax.checkpoint.training import Checkpointer
from llama4_jax.config import from_hf_config, read_hf_config
from llama4_jax.data import FrozenState, HostBatches, eval_batches, open_source, split_train_eval
from llama4_jax.inference import generate
from llama4_jax.model import create_model
from llama4_jax.model.adapters import ADAPTER_FIELDS
from llama4_jax.sharding import make_mesh
from llama4_jax.tokenizer import (TOKENIZER_FILE, HFTokenizer, encode_chat, find_tokenizer, load_tokenizer,
                                  stop_ids, train_bpe)
from llama4_jax.train.config import model_config, validate
from llama4_jax.train.metrics import MetricsLogger, peak_flops_total, train_flops_per_token
from llama4_jax.train.step import (TrainModel, batch_sharding, host_rows, join_params,
                                   learning_rate_schedule, make_eval_step, make_optimizer, make_train_step,
                                   opt_state_shardings, split_trainable, step_hparams)


class TrainingDiverged(RuntimeError):
  """The loss became NaN or Inf."""


class _NonFinite(Exception):
  def __init__(self, loss: float, step: int):
    super().__init__(loss, step)
    self.loss, self.step = loss, step


_IMPL_FIELDS = ("param_dtype", "dtype", "attention_impl", "ring_layout", "ring_kernel", "moe_impl",
                "moe_capacity_factor", "remat_policy", "scan_layers") + ADAPTER_FIELDS


def _sync(name: str) -> None:
  if jax.process_count() > 1:
    from jax.experimental import multihost_utils
    multihost_utils.sync_global_devices(name)


def get_tokenizer(c, workdir: str, train_docs, log) -> Any:
  """data.tokenizer, else the one next to init_from (either is copied into the workdir, so samplers
  find it there), else a BPE trained on the data."""
  given = c.data.tokenizer or (find_tokenizer(c.init_from) if c.init_from else None)
  if given:
    tokenizer = load_tokenizer(given)
    src = tokenizer.path
    dst = storage.join(workdir, storage.basename(src))
    if jax.process_index() == 0 and not storage.exists(dst):
      storage.copy(src, dst)
    return tokenizer
  path = storage.join(workdir, TOKENIZER_FILE)
  if not storage.exists(path) and jax.process_index() == 0:
    t0 = time.time()
    train_bpe((_plain_text(train_docs[i]) for i in range(len(train_docs))), c.data.vocab_size, path)
    log(f"trained a {c.data.vocab_size}-token byte-level BPE on {len(train_docs)} documents in "
        f"{time.time() - t0:.1f}s -> {path}")
  _sync("tokenizer")
  return HFTokenizer(path)


def _plain_text(doc) -> str:
  """A document's text (a conversation's messages joined) for tokenizer training."""
  if isinstance(doc, str):
    return doc
  return "\n\n".join(str(m.get("content", "")) for m in doc if isinstance(m, dict))


def init_params(c, cfg, mesh, log):
  """(TrainModel, trainable params, frozen params, ModelConfig) from init_from or random; params are
  pure dicts of sharded arrays (see `split_trainable`).

  init_from (a Hugging Face directory or a training checkpoint) fixes the architecture; the run config
  still chooses the implementation (dtypes, kernels, remat) and the adapters (lora_*, base_quant)."""
  if c.init_from:
    model = load_model(c.init_from, mesh=mesh, lora_seed=c.seed,
                       **{k: getattr(cfg, k) for k in _IMPL_FIELDS})
    log(f"initialised from {c.init_from}")
  else:
    model = create_model(cfg, mesh=mesh, seed=c.seed)
  trainable, frozen = split_trainable(nnx.to_pure_dict(nnx.state(model)), model.config.lora_rank > 0)
  return TrainModel.of(model), trainable, frozen, model.config


def evaluate(eval_step, params, frozen, batches, sharding, global_batch, byte_lengths) -> dict[str, float]:
  total = {"loss_sum": 0.0, "tokens": 0.0, "bytes": 0.0}
  for host_batch in batches:
    out = eval_step(params, frozen, _global_batch(host_batch, sharding, global_batch), byte_lengths)
    for k in total:
      total[k] += float(out[k])
  tokens = max(total["tokens"], 1.0)
  return {"eval_loss": total["loss_sum"] / tokens,
          "eval_bits_per_byte": total["loss_sum"] / math.log(2) / max(total["bytes"], 1.0),
          "eval_tokens": total["tokens"]}


def _replicated(value: np.ndarray, sharding) -> jax.Array:
  """A global array holding the same host value on every device (every process passes the same)."""
  return jax.make_array_from_callback(value.shape, sharding, lambda idx: value[idx])


def _global_batch(host_batch: dict[str, np.ndarray], sharding, global_batch: int) -> dict[str, jax.Array]:
  """The global batch from this host's rows of it (`host_rows`)."""
  return {k: jax.make_array_from_process_local_data(sharding, v, (global_batch,) + v.shape[1:])
          for k, v in host_batch.items()}


class _Preemption:
  """A preemption notice (SIGTERM), acted on at one step that every process agrees on.

  Several processes: JAX's preemption service (started by `jax.distributed.initialize`) catches SIGTERM
  in any process and agrees a step with the others in the background; `reached(step)` asks it through
  Orbax's `CheckpointManager.reached_preemption` and costs no communication until a notice arrives. One
  process: a SIGTERM handler sets a flag (no Python handler is installed beside JAX's, which it would
  replace)."""

  def __init__(self, ckpt: Checkpointer):
    self.requested = False
    self._ckpt = ckpt
    self._previous = None

  def __enter__(self):
    if jax.process_count() == 1:
      try:
        self._previous = signal.signal(signal.SIGTERM, self._handle)
      except ValueError:  # not the main thread
        self._previous = None
    return self

  def _handle(self, *_):
    self.requested = True

  def register(self, start: int) -> None:
    """Tells JAX's preemption service the step training resumes from, as early as possible: it agrees on
    (the processes' last reported step) + 1, which for a run that never reported is step 1, a step a
    resumed run never reaches. (A notice that arrives before this call is therefore missed by a resumed
    multi-process run; the scheduler's SIGKILL then ends it, and its last checkpoint stays the latest.)"""
    if jax.process_count() > 1:
      self._ckpt.reached_preemption(start)

  def reached(self, step: int) -> bool:
    if jax.process_count() == 1:
      return self.requested
    return self._ckpt.reached_preemption(step)

  def __exit__(self, *exc):
    if self._previous is not None:
      signal.signal(signal.SIGTERM, self._previous)


class _Reporter:
  """Turns each step's device metrics into logged host numbers one step late: the host reads step N's
  metrics after it has dispatched step N+1, so it never waits on the device between steps (no per-step
  sync), and the time between two reports is one step's wall time. `flush()` reports the step in flight
  (before an evaluation or a checkpoint, which must not hold a diverged state)."""

  def __init__(self, c, logger, on_log, flops_per_token, peak):
    self.c, self.logger, self.on_log = c, logger, on_log
    self.flops_per_token, self.peak = flops_per_token, peak
    self.pending = None
    self.last_time = time.perf_counter()
    self.metrics: dict[str, float] = {}

  def submit(self, step: int, learning_rate: float, device_metrics) -> None:
    self.flush()
    self.pending = (step, learning_rate, device_metrics)

  def restart_clock(self) -> None:
    self.last_time = time.perf_counter()

  def flush(self) -> None:
    if self.pending is None:
      return
    step, lr, m = self.pending
    self.pending = None
    m = jax.device_get(m)
    loss = float(m["loss"])
    if not math.isfinite(loss):
      raise _NonFinite(loss, step)
    now = time.perf_counter()
    tokens_per_sec = self.c.batch_size * self.c.seq_len / max(now - self.last_time, 1e-9)
    self.last_time = now
    self.metrics = {"loss": loss, "learning_rate": lr, "tokens_per_sec": tokens_per_sec,
                    "mfu": self.flops_per_token * tokens_per_sec / self.peak if self.peak else 0.0,
                    "grad_norm": float(m["grad_norm"]), "moe_aux_loss": float(m["moe_aux_loss"])}
    if step % self.c.log_every == 0 or step == self.c.steps:
      self.logger.write(step, self.metrics)
      self.logger.progress(step, self.metrics, self.c.batch_size * self.c.seq_len / tokens_per_sec)
      if self.on_log is not None and jax.process_index() == 0:
        self.on_log(step, dict(self.metrics))


def train(c, workdir: str, on_log: Callable[[int, dict[str, float]], None] | None = None
          ) -> dict[str, Any]:
  """Runs (or resumes) training as configured; returns the final metrics.

  on_log(step, metrics), on process 0, receives what is written to metrics.jsonl as it is written
  (training metrics every log_every steps, eval_* metrics at each evaluation): e.g. a live loss plot.
  """
  workdir = storage.check(workdir, "workdir")
  validate(c, jax.device_count())
  storage.makedirs(workdir)
  logger = MetricsLogger(workdir, c.steps, enabled=jax.process_index() == 0,
                         flush_seconds=c.log_flush_seconds)
  log = logger.info

  mesh_axes = dict(c.mesh)
  mesh = make_mesh(**mesh_axes)
  log(f"{jax.process_count()} process(es), {jax.device_count()} {jax.devices()[0].platform} devices, "
      f"mesh {dict(mesh.shape)}")

  ckpt = Checkpointer(storage.join(workdir, "checkpoints"), c.keep_checkpoints, c.async_checkpointing)
  start = ckpt.latest_step() or 0
  preemption = _Preemption(ckpt)
  preemption.register(start)

  source = open_source(c.data.source, c.data.path, c.data.field)
  train_docs, held_out = split_train_eval(source, c.data.eval_fraction)
  log(f"data: {len(train_docs)} training and {len(held_out)} held-out documents ({c.data.source})")
  tokenizer = get_tokenizer(c, workdir, train_docs, log)

  cfg = model_config(c)
  if c.init_from and storage.exists(storage.join(c.init_from, "config.json")):
    cfg = from_hf_config(read_hf_config(c.init_from), **{k: getattr(cfg, k) for k in _IMPL_FIELDS})
  if tokenizer.vocab_size > cfg.vocab_size:
    raise ValueError(f"the tokenizer has {tokenizer.vocab_size} tokens but model.vocab_size is "
                     f"{cfg.vocab_size}; set --config.model.vocab_size={tokenizer.vocab_size}")
  tm, params, frozen, cfg = init_params(c, cfg, mesh, log)
  log(f"model: {cfg.num_params() / 1e6:.1f}M parameters, {cfg.num_hidden_layers} layers, "
      f"{cfg.num_local_experts} experts, dtype {cfg.dtype} (params {cfg.param_dtype})")
  if frozen:
    n_train = sum(x.size for x in jax.tree.leaves(params))
    log(f"LoRA rank {cfg.lora_rank} on {','.join(cfg.lora_targets)}: {n_train / 1e6:.2f}M trainable "
        f"parameters ({100 * n_train / cfg.num_params():.2f}%), base frozen"
        + (f" in {cfg.base_quant}" if cfg.base_quant != "none" else f" in {cfg.param_dtype}"))

  param_shardings = jax.tree.map(lambda x: x.sharding, params)
  tx = make_optimizer(c)
  opt_shardings = opt_state_shardings(tx, params, param_shardings, mesh)
  opt_state = jax.jit(tx.init, out_shardings=opt_shardings)(params)
  bsharding = batch_sharding(mesh)
  replicated = NamedSharding(mesh, PartitionSpec())
  rng = _replicated(np.asarray(jax.random.key_data(jax.random.PRNGKey(c.seed))), replicated)

  rows = host_rows(bsharding, c.batch_size, c.seq_len)
  train_iter = HostBatches(train_docs, tokenizer, c.batch_size, c.seq_len, c.seed, rows, c.data.format)
  if start:
    abstract = jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=x.sharding),
                            {"params": params, "opt_state": opt_state})
    abstract["step"] = jax.ShapeDtypeStruct((), jnp.int32, sharding=replicated)
    abstract["rng"] = jax.ShapeDtypeStruct(rng.shape, rng.dtype, sharding=replicated)
    state = ckpt.restore(start, abstract, {"data": grain.checkpoint.CheckpointRestore(train_iter)})
    params, opt_state, rng = state["params"], state["opt_state"], state["rng"]
    log(f"resumed from the step-{start} checkpoint in {ckpt.directory}")

  step_fn = jax.jit(make_train_step(tm, tx, c, bsharding), donate_argnums=(0, 1),
                    out_shardings=(param_shardings, opt_shardings, None))
  base = {"frozen_base": storage.check(c.init_from)} if frozen else {}  # checkpoints hold adapters only
  eval_fn = jax.jit(make_eval_step(tm, c.loss_chunks))
  schedule = learning_rate_schedule(c)
  held_out_batches = eval_batches(held_out, tokenizer, c.batch_size, c.seq_len, c.eval_batches, rows,
                                  c.data.format)
  byte_lengths = jnp.asarray(tokenizer.byte_lengths())
  flops_per_token = train_flops_per_token(cfg, c.seq_len)
  peak = peak_flops_total(c.peak_flops)
  run_config = c.to_dict()

  def save(step, force=False):
    state = {"params": params, "opt_state": opt_state, "rng": rng,
             "step": _replicated(np.asarray(step, np.int32), replicated)}
    # the iterator's state as of this step, frozen: the save may finish after the loop has moved on
    data = grain.checkpoint.CheckpointSave(FrozenState(train_iter.get_state()))
    ckpt.save(step, state, run_config, cfg, force=force, extra=base, items={"data": data})
    logger.flush()  # the log in a bucket catches up with each checkpoint

  def run_eval(step, label):
    ev = evaluate(eval_fn, params, frozen, held_out_batches, bsharding, c.batch_size, byte_lengths)
    logger.write(step, ev)
    if on_log is not None and jax.process_index() == 0:
      on_log(step, dict(ev))
    log(f"{label} at step {step}: loss {ev['eval_loss']:.4f}, {ev['eval_bits_per_byte']:.3f} bits/byte "
        f"on {int(ev['eval_tokens'])} held-out tokens")
    return ev

  # Every step's learning rate, computed once before the first step: evaluating the schedule on the device
  # each step would queue it behind the step in flight and wait for that step to finish.
  lrs = np.asarray(jax.jit(schedule)(jnp.arange(c.steps)), np.float64)
  reporter = _Reporter(c, logger, on_log, flops_per_token, peak)
  step = start
  try:
    with preemption:
      while step < c.steps:
        step += 1
        batch = _global_batch(next(train_iter), bsharding, c.batch_size)
        lr = float(lrs[step - 1])
        params, opt_state, m = step_fn(params, opt_state, frozen, batch, rng, jnp.int32(step),
                                       step_hparams(c, lr))
        reporter.submit(step, lr, m)  # reports step - 1: it has finished
        if c.eval_every and step % c.eval_every == 0 and step < c.steps and held_out_batches:
          reporter.flush()
          run_eval(step, "eval")
          reporter.restart_clock()
        if preemption.reached(step):
          reporter.flush()
          save(step, force=True)
          ckpt.close()
          log(f"SIGTERM: saved the step-{step} checkpoint in {ckpt.directory}; exiting")
          logger.close()
          return {"step": step, "preempted": True, **reporter.metrics}
        if (c.checkpoint_every and step % c.checkpoint_every == 0) or step == c.steps:
          reporter.flush()
          save(step)
      reporter.flush()
  except _NonFinite as e:
    ckpt.wait()
    logger.close()
    raise TrainingDiverged(
        f"the loss became {e.loss} at step {e.step}; stopping without saving. The last good checkpoint "
        f"(step {ckpt.latest_step()}) is intact in {ckpt.directory}; lower learning_rate or enable "
        "grad_clip and rerun to resume from it") from None
  result: dict[str, Any] = {"step": step, **reporter.metrics}

  if held_out_batches:
    result.update(run_eval(step, "final eval"))
  ckpt.close()
  if c.sample_prompt:
    if c.data.format == "chat":
      prompt = encode_chat(tokenizer, [{"role": "user", "content": c.sample_prompt}])
    else:
      prompt = ([tokenizer.bos_id] if tokenizer.bos_id is not None else []) + tokenizer.encode(
          c.sample_prompt)
    stop = stop_ids(tokenizer)
    new = generate(tm.merge(join_params(params, frozen)), [prompt], c.sample_tokens,
                   temperature=c.sample_temperature, seed=c.seed, stop_tokens=stop)[0]
    result["sample"] = c.sample_prompt + tokenizer.decode([t for t in new if t not in stop])
    log("sample:\n" + result["sample"])
  logger.close()
  return result
