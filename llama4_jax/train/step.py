"""Optimizer, loss and the jitted train / eval steps.

Parameters travel as a pure dict (path -> array) so that optimizer state, shardings and Orbax checkpoints
are plain pytrees; `TrainModel` turns them back into the NNX module inside the step. They are split into
`trainable` (differentiated, optimized, checkpointed) and `frozen` (read only): with LoRA (`lora_rank` > 0)
only the adapters are trainable and the base is frozen; otherwise everything is trainable.

Loss = mean next-token cross-entropy over unmasked targets + `moe_aux_loss_coef` * the load-balancing loss.
Gradient accumulation splits the batch into `microbatches` and divides every microbatch's summed loss by
the *whole* batch's token count, so accumulated gradients equal the full batch's (the load-balancing term
is a per-microbatch statistic, averaged over microbatches).
"""

from __future__ import annotations

import dataclasses
from typing import Any

import jax
import jax.numpy as jnp
import optax
from flax import nnx, traverse_util

from llama4_jax.model.linear import is_adapter
from llama4_jax.model.platform import compiling_for
from llama4_jax.sharding import named_sharding


@dataclasses.dataclass(frozen=True)
class TrainModel:
  """The static half of the model (graphdef + abstract state), to rebuild it from pure-dict params."""
  graphdef: Any
  abstract_state: Any

  @classmethod
  def of(cls, model) -> "TrainModel":
    graphdef, state = nnx.split(model)
    return cls(graphdef, jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype), state))

  def merge(self, params):
    state = jax.tree.map(lambda x: x, self.abstract_state)
    nnx.replace_by_pure_dict(state, params)
    return nnx.merge(self.graphdef, state)


def learning_rate_schedule(c) -> optax.Schedule:
  return optax.warmup_cosine_decay_schedule(
      init_value=0.0, peak_value=c.learning_rate, warmup_steps=max(c.warmup_steps, 1),
      decay_steps=max(c.steps, c.warmup_steps + 1), end_value=c.learning_rate * c.min_lr_ratio)


def decay_mask(params):
  """Weight decay on weight matrices; not on norm weights."""
  def keep(path, _):
    return not any("norm" in str(getattr(k, "key", "")) for k in path)
  return jax.tree_util.tree_map_with_path(keep, params)


def make_optimizer(c) -> optax.GradientTransformation:
  """AdamW without its learning rate: the step scales the updates by -lr, lr being an argument of the
  compiled step (the schedule runs on the host), so runs differing only in schedule share one program."""
  parts = []
  if c.grad_clip > 0:
    parts.append(optax.clip_by_global_norm(c.grad_clip))
  parts.append(optax.scale_by_adam(b1=c.b1, b2=c.b2))
  if c.weight_decay:
    parts.append(optax.add_decayed_weights(c.weight_decay, mask=decay_mask))
  return optax.chain(*parts)


def split_trainable(params: dict, lora: bool) -> tuple[dict, dict]:
  """(trainable, frozen) nested dicts: the adapters and the rest with `lora`, else (params, {})."""
  if not lora:
    return params, {}
  flat = traverse_util.flatten_dict(params)
  trainable = {k: v for k, v in flat.items() if is_adapter(k)}
  frozen = {k: v for k, v in flat.items() if not is_adapter(k)}
  if not trainable:
    raise ValueError("lora_rank > 0 but the model has no adapter weights (check lora_targets)")
  return traverse_util.unflatten_dict(trainable), traverse_util.unflatten_dict(frozen)


def join_params(trainable: dict, frozen: dict) -> dict:
  """The inverse of `split_trainable`."""
  if not frozen:
    return trainable
  return traverse_util.unflatten_dict({**traverse_util.flatten_dict(frozen),
                                       **traverse_util.flatten_dict(trainable)})


def token_losses(model, batch, dropout_key=None, chunks: int = 1):
  """Per-token cross-entropy [B, T] (float32), and the MoE load-balancing loss.

  chunks > 1 builds the float32 logits of T / chunks tokens at a time (step j takes tokens j, j + chunks,
  j + 2 chunks, ...: an equal share of every device's part of the sequence) and recomputes them in the
  backward pass, so [B, T / chunks, V] logits exist at once instead of [B, T, V]: at Llama 4's 202K
  vocabulary that is what bounds long rows (13 GB per chip at 16K tokens). T must divide by chunks (and
  by chunks x mesh.context); `train.config.validate` checks.
  """
  h, aux = model.forward(batch["inputs"], batch["positions"], batch["segment_ids"],
                         return_aux=True, dropout_key=dropout_key, return_hidden=True)

  def losses(h_BTD, targets_BT):
    logits = model.lm_logits(h_BTD)
    target_logit = jnp.take_along_axis(logits, targets_BT[..., None], axis=-1)[..., 0]
    return jax.nn.logsumexp(logits, axis=-1) - target_logit

  if chunks == 1:
    return losses(h, batch["targets"]), aux["moe_aux_loss"]
  b, t, d = h.shape
  h_CBmD = jnp.moveaxis(h.reshape(b, t // chunks, chunks, d), 2, 0)  # token i * chunks + j -> [j, :, i]
  targets_CBm = jnp.moveaxis(batch["targets"].reshape(b, t // chunks, chunks), 2, 0)
  out = jax.lax.map(lambda xs: jax.checkpoint(losses)(*xs), (h_CBmD, targets_CBm))  # [chunks, B, T/chunks]
  return jnp.moveaxis(out, 0, 2).reshape(b, t), aux["moe_aux_loss"]


def step_hparams(c, learning_rate: float) -> dict[str, jax.Array]:
  """The run's scalar hyperparameters as arguments of the compiled step (not constants baked into it),
  so runs that differ only in them share one compiled program (and the persistent compilation cache)."""
  return {"learning_rate": jnp.float32(learning_rate),
          "moe_aux_loss_coef": jnp.float32(c.moe_aux_loss_coef)}


def make_train_step(tm: TrainModel, tx: optax.GradientTransformation, c, batch_sharding):
  """train_step(params, opt_state, frozen, batch, rng, step, hparams) -> (params, opt_state, metrics),
  where params are the trainable ones (see `split_trainable`); jit it donating params and opt_state.
  `rng` (raw key data) and `step` seed LoRA dropout; `hparams` is `step_hparams(c, this step's learning
  rate)` (the schedule, `learning_rate_schedule`, runs on the host)."""
  n_micro = c.microbatches

  def micro_loss(params, frozen, mb, total_tokens, key, aux_coef):
    losses, aux = token_losses(tm.merge(join_params(params, frozen)), mb, key, c.loss_chunks)
    summed = jnp.sum(losses * mb["loss_mask"])
    return summed / total_tokens + aux_coef * aux / n_micro, (summed, aux)

  grad_fn = jax.grad(micro_loss, has_aux=True)

  def train_step(params, opt_state, frozen, batch, rng, step, hparams):
    with compiling_for(batch_sharding.mesh):  # the backward pass is traced here, outside the model
      return _train_step(params, opt_state, frozen, batch, rng, step, hparams)

  def _train_step(params, opt_state, frozen, batch, rng, step, hparams):
    lr, aux_coef = hparams["learning_rate"], hparams["moe_aux_loss_coef"]
    total_tokens = jnp.maximum(jnp.sum(batch["loss_mask"]), 1).astype(jnp.float32)
    key = jax.random.fold_in(rng, step)
    if n_micro == 1:
      grads, (summed, aux) = grad_fn(params, frozen, batch, total_tokens, key, aux_coef)
    else:
      micro = jax.tree.map(lambda x: x.reshape(n_micro, x.shape[0] // n_micro, *x.shape[1:]), batch)

      def body(carry, xs):
        g_acc, s_acc, a_acc = carry
        mb, i = xs
        mb = jax.tree.map(lambda x: jax.lax.with_sharding_constraint(x, batch_sharding), mb)
        g, (s, a) = grad_fn(params, frozen, mb, total_tokens, jax.random.fold_in(key, i), aux_coef)
        return (jax.tree.map(jnp.add, g_acc, g), s_acc + s, a_acc + a / n_micro), None

      zeros = jax.tree.map(jnp.zeros_like, params)
      (grads, summed, aux), _ = jax.lax.scan(
          body, (zeros, jnp.zeros((), jnp.float32), jnp.zeros((), jnp.float32)),
          (micro, jnp.arange(n_micro)))
    updates, opt_state = tx.update(grads, opt_state, params)
    params = optax.apply_updates(params, jax.tree.map(lambda u: -lr * u, updates))
    metrics = {"loss": summed / total_tokens, "moe_aux_loss": aux,
               "grad_norm": optax.tree.norm(grads), "tokens": total_tokens}
    return params, opt_state, metrics

  return train_step


def make_eval_step(tm: TrainModel, chunks: int = 1):
  """eval_step(params, frozen, batch, byte_lengths) -> summed loss (nats), target tokens, target bytes."""

  def eval_step(params, frozen, batch, byte_lengths):
    losses, _ = token_losses(tm.merge(join_params(params, frozen)), batch, chunks=chunks)
    mask = batch["loss_mask"]
    return {"loss_sum": jnp.sum(losses * mask), "tokens": jnp.sum(mask),
            "bytes": jnp.sum(byte_lengths[batch["targets"]] * mask)}

  return eval_step


def batch_sharding(mesh):
  return named_sharding(mesh, ("batch", None))


def host_rows(sharding, global_batch: int, seq_len: int) -> range:
  """The rows of a [global_batch, seq_len] batch that this process's devices hold under `sharding`: each
  process loads and hands over exactly these (processes split by a context axis hold the same rows)."""
  rows = set()
  for index in sharding.addressable_devices_indices_map((global_batch, seq_len)).values():
    rows.update(range(*index[0].indices(global_batch)))
  lo, hi = min(rows), max(rows) + 1
  if len(rows) != hi - lo:
    raise ValueError(f"this process's devices hold batch rows {sorted(rows)}, not one contiguous run: "
                     "order the mesh so that each process holds a block of the batch (make_mesh does)")
  return range(lo, hi)


def opt_state_shardings(tx, params_abstract, param_shardings, mesh):
  """Optimizer-state shardings: moments like their parameters, everything else replicated."""
  state = jax.eval_shape(tx.init, params_abstract)
  replicated = named_sharding(mesh, ())
  return optax.tree_map_params(tx, lambda _, s: s, state, param_shardings,
                               transform_non_params=lambda _: replicated)
