"""llama4-plan --config=FILE [--tpu=v5p-256] [--serve] [--measure] [--compile] [--json]
(or python -m llama4_jax.plan).

    llama4-plan --config=configs/scout_v5p256.py --tpu=v5p-256
    llama4-plan --config=configs/serve_scout_v5p8.py --tpu=v5p-8 --serve --compile

Per-device memory of a run config: parameters, optimizer state, gradients and activations for training
(or parameters, KV cache and activations with --serve), whether it fits the named TPU slice's HBM, and
the changes that would make it fit. Config overrides work as in training (--config.seq_len=32768).
Without --tpu it plans for --devices devices (default: the config's mesh, or the local devices) and
gives no verdict unless --hbm_gib is set. --measure compiles the train step on the local devices and
prints XLA's own figure beside the estimate (the devices must match the mesh).

--compile (with --tpu) compiles the run's real train step (with --serve: the serving engine's prefill,
extend (a long prompt's next piece) and decode steps) for that slice's topology with the TPU compiler,
on any host: per-chip bytes against HBM, the largest buffers and the ops that make them, collectives by
kind with bytes per step, flops per chip counted from the HLO, the step time those flops take at the
chip's peak (a lower bound) and the MFU and tokens/s/chip that bound implies. Needs libtpu (pip install
-e '.[tpu]'). With --tpu the activation estimate is the one fitted to the TPU compiler.
"""

from __future__ import annotations

import json
import math

from absl import flags
from ml_collections import config_flags

from llama4_jax.cli import DEFAULT_CONFIG, run_absl

_CONFIG = config_flags.DEFINE_config_file("config", DEFAULT_CONFIG, "Run config file.",
                                          lock_config=False)
_TPU = flags.DEFINE_string("tpu", None, "Accelerator type, e.g. v5p-256, v6e-64, v5e-8, v4-32.")
_DEVICES = flags.DEFINE_integer("devices", None, "Devices to plan for when --tpu is not given.")
_HBM = flags.DEFINE_float("hbm_gib", None, "Memory per device (GiB) when --tpu is not given.")
_SERVE = flags.DEFINE_bool("serve", False, "Plan sampling (KV cache) instead of training.")
_BATCH = flags.DEFINE_integer("serve_batch", 8, "--serve: sequences decoded together.")
_CACHE = flags.DEFINE_integer("cache_length", None, "--serve: KV cache length (default: seq_len).")
_MEASURE = flags.DEFINE_bool("measure", False, "Also compile the train step here and print XLA's figure.")
_COMPILE = flags.DEFINE_bool("compile", False, "Also compile the step(s) for --tpu's topology with the real "
                             "TPU compiler (libtpu; no TPU needed) and print its per-chip figures.")
_PROMPT = flags.DEFINE_integer("prompt_length", None, "--serve --compile: the prefilled prompt's length "
                               "(default: the serving engine's widest prefill, 256; longer prompts are "
                               "prefilled in pieces, the extend step).")
_JSON = flags.DEFINE_bool("json", False, "Print one JSON object instead of the table.")


def main(argv):
  del argv
  try:
    _plan()
  except (ValueError, FileNotFoundError, RuntimeError) as e:  # a config that does not fit the mesh, a bad
    raise SystemExit(f"plan: {e}") from None                    # TPU name, no libtpu


def _plan():
  from llama4_jax import planning
  from llama4_jax.train.config import model_config

  c = _CONFIG.value
  tpu = planning.parse_tpu(_TPU.value) if _TPU.value else None
  if tpu:
    devices, hbm = tpu.chips, tpu.hbm_bytes
  else:
    fixed = [v for v in c.mesh.values() if v != -1]
    devices = _DEVICES.value or (math.prod(fixed) if len(fixed) == len(c.mesh) else None)
    if devices is None:
      import jax
      devices = jax.device_count()
    hbm = int(_HBM.value * planning.GiB) if _HBM.value else None
  if _SERVE.value:
    length = _CACHE.value or c.seq_len

    def plan_fn(cfg, n, mem):
      return planning.plan_serving(cfg, n, _BATCH.value, length, mem, _PROMPT.value)
  else:
    def plan_fn(cfg, n, mem):  # the activation model fitted to the TPU compiler when a TPU is named
      return planning.plan_training(cfg, n, mem, platform="tpu" if tpu else "cpu")
  plan = plan_fn(c, devices, hbm)
  cfg = model_config(c)
  total, active = planning.parameter_counts(cfg)
  fixes = planning.suggest(c, devices, hbm, plan_fn, tpu.generation if tpu else None) \
      if plan.fits is False else []
  if _COMPILE.value and not tpu:
    raise ValueError("--compile compiles for a TPU slice: name it with --tpu (e.g. --tpu=v5p-256)")
  compiled = _compile(c, plan, tpu, length if _SERVE.value else None) if _COMPILE.value else None
  measured = None
  if _MEASURE.value:
    import jax

    import llama4_jax as l4
    from llama4_jax.train.compiled_memory import compiled_train_step_memory
    if jax.device_count() < devices:
      raise SystemExit(f"--measure: the plan is for {devices} devices but {jax.device_count()} are "
                       "here; on CPU set XLA_FLAGS=--xla_force_host_platform_device_count=N")
    mesh = l4.make_mesh(**plan.mesh, devices=jax.devices()[:devices])
    measured = compiled_train_step_memory(c, mesh)

  if _JSON.value:
    print(json.dumps({"mode": plan.mode, "tpu": tpu.name if tpu else None, "devices": devices,
                      "mesh": plan.mesh, "bytes_per_device": plan.parts, "total": plan.total,
                      "hbm_bytes": hbm, "fits": plan.fits, "verdict": plan.verdict,
                      "peak_range_bytes": list(plan.peak_range), "parameters": total,
                      "active_parameters": active, "xla": measured,
                      "estimate_bytes": plan.total,
                      "compiled": compiled and _compiled_json(compiled, c, tpu, plan),
                      "fixes": [{"change": d, "total": p.total} for d, p in fixes]}))
    return
  where = (f"{tpu.name} ({tpu.chips} chips, {planning.format_bytes(tpu.hbm_bytes)} HBM each)" if tpu
           else f"{devices} device(s)")
  mesh = " ".join(f"{k}={v}" for k, v in plan.mesh.items())
  print(f"{'serving' if plan.mode == 'serve' else 'training'} plan on {where}, mesh {mesh}")
  print(f"model: {total / 1e9:.2f}B parameters ({active / 1e9:.2f}B active per token), "
        f"{cfg.num_hidden_layers} layers, params {cfg.param_dtype}, compute {cfg.dtype}"
        + (f", LoRA rank {cfg.lora_rank}" if cfg.lora_rank else "")
        + (f", {cfg.base_quant} base" if cfg.base_quant != "none" else ""))
  if plan.mode == "train":
    print(f"batch {c.batch_size} x {c.seq_len} tokens in {c.microbatches} microbatch(es), remat "
          f"{cfg.remat_policy}; per device:")
  else:
    print(f"{_BATCH.value} sequences, cache length {length}; per device:")
  print(planning.describe(plan))
  if compiled:
    from llama4_jax import tpu_compile
    for r in compiled:
      train = plan.mode == "train"
      print(tpu_compile.format_report(r, tpu, tpu_compile.train_model_flops(c) if train else None,
                                      c.batch_size * c.seq_len if train else None))
    if plan.mode == "train":
      print(f"  planner estimate {planning.format_bytes(plan.total)} = "
            f"{plan.total / compiled[0].memory['peak']:.2f} x the compiler's peak")
  if measured:
    print(f"  XLA (compiled here): {planning.format_bytes(measured['peak'])} "
          f"(estimate / XLA = {plan.total / measured['peak']:.2f})")
  if plan.fits is False:
    if fixes:
      print("changes that fit:")
      for desc, p in fixes:
        print(f"  {desc}: {planning.format_bytes(p.total)} per device")
    else:
      print("no change tried fits (remat, the blockwise attention, microbatches, context or expert "
            "parallelism, bf16, all of these together, a slice up to 64x larger); consider LoRA with an "
            "int8 or NF4 base for fine-tuning")


def _compile(c, plan, tpu, serve_length):
  """Reports of the train step, or of the serving prefill and decode steps, compiled for `tpu`."""
  from llama4_jax import tpu_compile
  from llama4_jax.sharding import make_mesh
  devices = tpu_compile.tpu_devices(tpu)
  mesh = make_mesh(**plan.mesh, devices=devices)
  if serve_length is None:
    return [tpu_compile.report("train step", tpu_compile.lower_train_step(c, mesh), tpu)]
  lowered = tpu_compile.lower_serve_steps(c, mesh, _BATCH.value, serve_length, _PROMPT.value)
  return [tpu_compile.report(f"{name} step", low, tpu) for name, low in lowered.items()]


def _compiled_json(reports, c, tpu, plan) -> dict:
  """The JSON `compiled` member: the first program's figures (train step, or prefill), the others under
  their names, the chip's HBM and, for training, the MFU and tokens/s/chip bounds its step time implies
  (its flops at peak: the compiler's own estimate counts each loop body once)."""
  from llama4_jax import tpu_compile
  out = dict(reports[0].as_json(), hbm_bytes=tpu.hbm_bytes, estimate_bytes=plan.total)
  for r in reports[1:]:
    out[r.name.split()[0]] = r.as_json()
  if plan.mode == "train":
    flops = tpu_compile.train_model_flops(c)
    seconds = reports[0].compute_seconds
    out.update(model_flops=flops, mfu_bound=tpu_compile.mfu(flops, seconds, tpu),
               tokens_per_sec_per_chip_bound=c.batch_size * c.seq_len / seconds / tpu.chips)
  return out


def run():
  run_absl(main, __doc__)


if __name__ == "__main__":
  run()
