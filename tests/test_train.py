"""Training: loss falls, exact resume after SIGKILL, mesh and accumulation invariance, multi-process,
SIGTERM, divergence, bad configs. Small models on a synthetic corpus."""

import json
import os
import re
import signal
import socket
import subprocess
import time

import jax
import numpy as np
import pytest
from flax import nnx

import llama4_jax as l4
from llama4_jax import storage
from llama4_jax.train import TrainingDiverged, train
from llama4_jax.checkpoint.orbax import COMMIT_MARKER, checkpoint_steps
from train_utils import REPO, make_corpus, micro_config, read_metrics, run, train_command


@pytest.fixture(scope="module")
def corpus(tmp_path_factory):
  return make_corpus(tmp_path_factory.mktemp("corpus"))


@pytest.fixture(scope="module")
def reference_losses(corpus, tmp_path_factory):
  """An uninterrupted 8-step run on one device (a separate process with a single CPU device)."""
  workdir = tmp_path_factory.mktemp("reference")
  c = micro_config(corpus, steps=8, checkpoint_every=4)
  run(*train_command(workdir, c, devices=1))
  return read_metrics(workdir), c, str(workdir)


# Tests share meshes and shapes wherever they can: the step's hyperparameters are arguments of the compiled
# program, so runs on one mesh reuse one program through the session's persistent compilation cache.
FSDP8 = dict(data=1, fsdp=8, tensor=1, expert=1, context=1)
MIXED = dict(data=1, fsdp=2, tensor=2, expert=2, context=1)


@pytest.fixture(scope="module")
def trained(corpus, tmp_path_factory):
  """30 steps on fsdp=8 at a high learning rate: the loss must fall; later tests start from it."""
  workdir = tmp_path_factory.mktemp("trained")
  c = micro_config(corpus, steps=30, learning_rate=1e-2, warmup_steps=3, checkpoint_every=30, mesh=FSDP8)
  return workdir, train(c, str(workdir))


def test_loss_falls(trained):
  workdir, result = trained
  losses = read_metrics(workdir)
  first, last = np.mean([losses[s] for s in (1, 2, 3)]), np.mean([losses[s] for s in (28, 29, 30)])
  assert last < first - 1.0, (first, last)
  rec = [json.loads(l) for l in open(workdir / "metrics.jsonl")]
  assert {"step", "loss", "learning_rate", "tokens_per_sec", "mfu"} <= set(rec[0])
  assert "eval_bits_per_byte" in rec[-1] and result["eval_bits_per_byte"] > 0
  assert any(f.startswith("events.out.tfevents") for f in os.listdir(workdir / "tensorboard"))
  assert os.path.exists(workdir / "tokenizer.json")


# The same reference is met on other meshes by test_resume_onto_a_different_mesh (data=2 x fsdp=4, then
# fsdp=2 x tensor=2 x expert=2) and by two processes (fsdp, or the ring over context) in
# test_two_processes_equal_one; ring attention over 8 devices equals dense in tests/test_ring_attention.py.


def test_gradient_accumulation_equals_full_batch(corpus, tmp_path):
  results = {}
  for micro in (1, 2):  # (micro=1 on this mesh is test_resume_onto_a_different_mesh's program)
    c = micro_config(corpus, steps=4, microbatches=micro, moe_aux_loss_coef=0.0, checkpoint_every=4,
                     mesh=MIXED)
    train(c, str(tmp_path / f"m{micro}"))
    results[micro] = read_metrics(tmp_path / f"m{micro}")
  np.testing.assert_allclose([results[2][s] for s in range(1, 5)],
                             [results[1][s] for s in range(1, 5)], rtol=1e-5)


def kill_after_checkpoint(cmd, env, workdir, step):
  """Starts the command, SIGKILLs it as soon as the step-`step` checkpoint is complete."""
  proc = subprocess.Popen(cmd, env=env, cwd=REPO, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
  deadline = time.time() + 240
  while step not in checkpoint_steps(storage.join(str(workdir), "checkpoints")):
    assert proc.poll() is None, proc.stderr.read().decode()[-3000:]
    assert time.time() < deadline
    time.sleep(0.05)
  proc.send_signal(signal.SIGKILL)
  proc.wait()
  assert proc.returncode == -signal.SIGKILL


def test_exact_resume_after_sigkill_in_a_bucket(reference_losses, gcs):
  """The workdir in Cloud Storage (the emulator): SIGKILLed after its step-4 checkpoint. Cloud Storage
  has no atomic rename, so a save cut off mid-write is a step prefix without Orbax's commit marker: with
  the latest step's marker deleted, the same command resumes from the step before, from the bucket, with
  bit-identical losses; the checkpoint loads as the local run's does; nothing is written to a local `gs:`
  directory."""
  import fsspec
  want, c, reference = reference_losses
  bucket, gcs_env = gcs
  workdir = f"{bucket}/sigkill"
  cmd, env = train_command(workdir, c, devices=1)
  env.update(gcs_env)
  cmd += ["--config.checkpoint_every=2"]  # (not part of the compiled program: the same losses)
  kill_after_checkpoint(cmd, env, workdir, 4)
  *_, previous, cut = checkpoint_steps(f"{workdir}/checkpoints")
  fsspec.filesystem("gs").rm(f"{workdir}/checkpoints/{cut}/{COMMIT_MARKER}")
  assert checkpoint_steps(f"{workdir}/checkpoints")[-1] == previous
  out = run(cmd, env).stdout  # the same command resumes
  assert f"resumed from the step-{previous} checkpoint" in out
  got = read_metrics(workdir)
  assert [got[s] for s in range(previous + 1, 9)] == [want[s] for s in range(previous + 1, 9)]  # bitwise
  assert not os.path.exists(os.path.join(REPO, "gs:")) and storage.exists(f"{workdir}/tokenizer.json")
  assert any(n.startswith("events.out.tfevents") for n in storage.listdir(f"{workdir}/tensorboard"))
  here, there = (nnx.to_pure_dict(nnx.state(l4.load_model(w))) for w in (reference, workdir))
  jax.tree.map(np.testing.assert_array_equal, here, there)


def test_two_processes_over_the_context_axis_equal_one(reference_losses, tmp_path):
  """Two processes of one device each (gloo), each row split over the context axis: ring attention across
  the processes, which load the same rows."""
  want, c, _ = reference_losses
  cmd, env = train_command(tmp_path, c)
  mh = ["bash", "launch/local_multihost.sh", "2"] + cmd[3:] + [
      "--config.mesh.fsdp=1", "--config.mesh.context=2", "--config.async_checkpointing=True",
      "--config.checkpoint_every=0"]  # (0: only the final save)
  run(mh, dict(env, DEVICES_PER_PROCESS="1", PYTHON=cmd[0]), timeout=400)
  got = read_metrics(tmp_path)
  np.testing.assert_allclose([got[s] for s in range(1, 9)], [want[s] for s in range(1, 9)], rtol=1e-5)


def _start_processes(cmd, env, logs):
  """Starts one training process per log file as one JAX job (gloo, a fresh coordinator port)."""
  with socket.socket() as s:
    s.bind(("localhost", 0))
    port = s.getsockname()[1]
  return [subprocess.Popen(cmd + [f"--coordinator_address=localhost:{port}", f"--num_processes={len(logs)}",
                                  f"--process_id={i}"], env=env, cwd=REPO, stdout=open(log, "wb"),
                           stderr=subprocess.STDOUT) for i, log in enumerate(logs)]


def _records(workdir):
  return [json.loads(l) for l in storage.read_text(f"{workdir}/metrics.jsonl").splitlines()]


def _losses(records):
  return {r["step"]: r["loss"] for r in records if "loss" in r}


def test_two_processes_in_a_bucket_survive_sigkill_and_preemption(reference_losses, gcs, tmp_path):
  """Two processes (the batch split over fsdp, one device each) with the workdir in the bucket: process 0
  trains the tokenizer there and process 1 reads it back, both write their shards of each checkpoint.
  1. Both processes are SIGKILLed (as a scheduler restarting the job would) once a step after a
     checkpoint is logged. 2. The rerun resumes from that checkpoint; a preemption notice (SIGTERM) to
     process 1 alone, before the first step, and both save at the step JAX's preemption service agrees on
     and exit 0. The steps both runs logged have bit-identical losses; every loss equals one device's."""
  want, c, _ = reference_losses
  bucket, gcs_env = gcs
  workdir, ckpts = f"{bucket}/two-processes", f"{bucket}/two-processes/checkpoints"
  cmd, env = train_command(workdir, c)
  env.update(gcs_env)
  cmd += ["--config.mesh.fsdp=2", "--config.checkpoint_every=2", "--config.log_flush_seconds=0"]
  logs = [tmp_path / "p0.log", tmp_path / "p1.log"]

  def output():
    return "\n".join(f"--- process {i}:\n" + log.read_text()[-2500:] for i, log in enumerate(logs))

  def ready():
    steps, logged = checkpoint_steps(ckpts), _losses(_records(workdir)) if storage.exists(
        f"{workdir}/metrics.jsonl") else {}
    return bool(steps) and max(logged, default=0) > steps[-1]

  procs = _start_processes(cmd, env, logs)
  deadline = time.time() + 240
  while True:  # freeze both once a step after a checkpoint is logged, then kill them
    assert all(p.poll() is None for p in procs) and time.time() < deadline, output()
    if ready():
      for p in procs:
        p.send_signal(signal.SIGSTOP)
      if ready():
        break
      for p in procs:
        p.send_signal(signal.SIGCONT)
    time.sleep(0.02)
  for p in reversed(procs):
    p.send_signal(signal.SIGKILL)
    p.wait()
  resumed_from = checkpoint_steps(ckpts)[-1]
  first = _records(workdir)
  killed = {s: v for s, v in _losses(first).items() if s > resumed_from}

  procs = _start_processes(cmd, env, logs)
  deadline = time.time() + 240
  while f"resumed from the step-{resumed_from} checkpoint" not in logs[0].read_text():
    assert procs[0].poll() is None and time.time() < deadline, output()
    time.sleep(0.05)
  procs[1].send_signal(signal.SIGTERM)
  assert [p.wait(timeout=240) for p in procs] == [0, 0], output()
  saved = re.search(r"SIGTERM: saved the step-(\d+) checkpoint", logs[0].read_text())
  assert saved, output()
  saved = int(saved.group(1))
  assert checkpoint_steps(ckpts)[-1] == saved and resumed_from < saved < 8
  second = _losses(_records(workdir)[len(first):])
  both = sorted(set(killed) & set(second))
  assert both and all(killed[s] == second[s] for s in both), (killed, second)  # bitwise
  got = read_metrics(workdir)
  np.testing.assert_allclose([got[s] for s in range(1, saved + 1)], [want[s] for s in range(1, saved + 1)],
                             rtol=1e-5)
  # the checkpoint both processes wrote exports a layer at a time as it loads
  from llama4_jax.checkpoint.convert import orbax_to_hf
  from test_convert import assert_same_tensors
  l4.save_pretrained(l4.load_model(workdir), tmp_path / "loaded")
  orbax_to_hf(workdir, tmp_path / "exported", progress=False)
  assert_same_tensors(tmp_path / "loaded", tmp_path / "exported")


def test_sigterm_saves_in_the_bucket_and_exits_cleanly(reference_losses, gcs):
  _, c, _ = reference_losses
  bucket, gcs_env = gcs
  workdir = f"{bucket}/sigterm"
  cmd, env = train_command(workdir, c)
  env.update(gcs_env)
  cmd += ["--config.log_flush_seconds=0", "--config.steps=1000", "--config.checkpoint_every=1000"]
  proc = subprocess.Popen(cmd, env=env, cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.PIPE)
  deadline = time.time() + 240
  while not storage.exists(f"{workdir}/metrics.jsonl") or len(read_metrics(workdir)) < 3:
    assert proc.poll() is None and time.time() < deadline
    time.sleep(0.2)
  proc.send_signal(signal.SIGTERM)
  out, err = proc.communicate(timeout=120)
  assert proc.returncode == 0, err.decode()[-2000:]
  assert b"SIGTERM: saved the step-" in out
  steps = checkpoint_steps(f"{workdir}/checkpoints")
  assert len(steps) == 1 and 3 <= steps[0] < 1000
  # and it restores: a short continuation resumes from it
  run(cmd[:-2] + [f"--config.steps={steps[0] + 1}"], env)
  assert max(read_metrics(workdir)) == steps[0] + 1


def test_divergence_keeps_the_last_good_checkpoint(corpus, tmp_path):
  c = micro_config(corpus, steps=3, checkpoint_every=3)
  train(c, str(tmp_path))
  c = micro_config(corpus, steps=40, checkpoint_every=40, learning_rate=1e9, warmup_steps=0)
  with pytest.raises(TrainingDiverged, match=r"last good checkpoint \(step 3\) is intact"):
    train(c, str(tmp_path))
  assert checkpoint_steps(str(tmp_path / "checkpoints")) == [3]


def test_bad_configs_fail_before_compiling(corpus, tmp_path):
  with pytest.raises(ValueError, match=r"config.batch_size: 6 .* not divisible by the batch mesh axes"):
    train(micro_config(corpus, batch_size=6), str(tmp_path))
  with pytest.raises(ValueError, match="config.mesh"):
    train(micro_config(corpus, mesh=dict(data=3, fsdp=1, tensor=1, expert=1, context=1)), str(tmp_path))
  context = dict(data=1, fsdp=1, tensor=1, expert=1, context=8)
  with pytest.raises(ValueError, match="config.seq_len: 40 must be divisible by 16"):
    train(micro_config(corpus, seq_len=40, mesh=context), str(tmp_path))
  with pytest.raises(ValueError, match="config.model.attention_impl: 'dense' cannot split"):
    train(micro_config(corpus, mesh=context, **{"model.attention_impl": "dense"}), str(tmp_path))
  with pytest.raises(ValueError, match=r"config.loss_chunks: seq_len=32 must be divisible by loss_chunks x "
                                       r"mesh.context = 24"):
    train(micro_config(corpus, mesh=context, loss_chunks=3), str(tmp_path))
  with pytest.raises(FileNotFoundError, match="matches no files"):
    train(micro_config(corpus, **{"data.path": str(tmp_path / "missing")}), str(tmp_path))
  cmd, env = train_command(tmp_path, micro_config(corpus))
  proc = subprocess.run(cmd + ["--config.no_such_field=1"], env=env, cwd=REPO, capture_output=True,
                        text=True, timeout=120)
  assert proc.returncode != 0 and "no_such_field" in proc.stderr
  assert not os.listdir(tmp_path)  # nothing written: every check ran before any work


def test_resume_onto_a_different_mesh(reference_losses, tmp_path):
  want, c, _ = reference_losses
  cmd, env = train_command(tmp_path, c, devices=8)
  kill_after_checkpoint(cmd + ["--config.mesh.data=2", "--config.mesh.fsdp=4"], env, tmp_path, 4)
  train(micro_config(c.data.path, steps=8, checkpoint_every=4, mesh=MIXED), str(tmp_path))
  got = read_metrics(tmp_path)
  np.testing.assert_allclose([got[s] for s in range(1, 9)], [want[s] for s in range(1, 9)], rtol=1e-5)


def test_init_from_orbax_and_hugging_face(trained, corpus, tmp_path):
  workdir, result = trained
  # the trained weights (load_model reads a training workdir) as a Hugging Face checkpoint
  model = l4.load_model(str(workdir))
  assert model.config.hidden_size == 64
  l4.save_pretrained(model, tmp_path / "hf")
  # the converter's export of the same workdir (a layer at a time) gives the very same tensors
  from llama4_jax.checkpoint.convert import orbax_to_hf
  from test_convert import assert_same_tensors
  orbax_to_hf(workdir, tmp_path / "exported", progress=False)
  assert_same_tensors(tmp_path / "hf", tmp_path / "exported")
  losses = {}
  for name, src in (("orbax", workdir), ("hf", tmp_path / "hf")):
    c = micro_config(corpus, steps=1, checkpoint_every=1, init_from=str(src), mesh=FSDP8,
                     **{"data.tokenizer": str(workdir / "tokenizer.json")})
    losses[name] = train(c, str(tmp_path / name))["loss"]
  random_init = read_metrics(workdir)[1]
  assert losses["orbax"] == pytest.approx(losses["hf"], rel=1e-5)
  assert losses["orbax"] < random_init - 1.0 and losses["orbax"] < result["loss"] + 0.5


@pytest.mark.parametrize("name,tpu", [("scout_v5p256", "v5p-256"), ("maverick_v6e256", "v6e-256"),
                                      ("scout_long_context_v5p256", "v5p-256"), ("lora_scout_v5p8", "v5p-8")])
def test_tpu_configs_validate_for_their_slices(name, tpu, tmp_path):
  from llama4_jax import planning
  chips = planning.parse_tpu(tpu).chips
  from llama4_jax.cli import load_config
  from llama4_jax.train.config import model_config, validate
  c = load_config(name)
  (tmp_path / "shard.array_record").write_bytes(b"")
  (tmp_path / "chat.jsonl").write_text("")
  c.data.path = str(tmp_path / ("*.jsonl" if c.data.source == "jsonl" else "*.array_record"))
  if c.model.lora_rank:
    with pytest.raises(ValueError, match="config.init_from: LoRA"):
      validate(c, num_devices=chips)
    c.init_from = str(tmp_path)  # stands for the Hugging Face Scout directory
  validate(c, num_devices=chips)
  cfg = model_config(c)
  assert cfg.num_params() == l4.get_config("scout" if "scout" in name else "maverick").num_params()
  # the memory planner's verdict on the slice (its model fitted to the TPU compiler)
  plan = planning.plan_training(c, chips, planning.parse_tpu(tpu).hbm_bytes, platform="tpu")
  assert plan.fits, plan.parts
  if c.mesh.fsdp != -1:
    with pytest.raises(ValueError, match="config.mesh"):
      validate(c, num_devices=chips // 2)

