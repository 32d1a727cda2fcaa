"""Logical axis names, the one rules table that maps them to mesh axes, and `make_mesh`.

Model code names only logical axes; this file alone decides where they live on the mesh. Changing the
parallelism means editing `RULES` or the mesh, never the model.

Mesh axes: data (pure replication of params), fsdp (params and optimizer state sharded, activations split
by batch), tensor (heads / mlp / vocab), expert (routed experts; activations split by batch), context
(sequence, ring attention). Weights other than the routed experts are sharded over expert and context as
over fsdp, so those axes do not replicate parameters or optimizer state.
"""

from __future__ import annotations

import math
from typing import Any, Iterable, Sequence

import jax
import numpy as np
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P

MESH_AXES = ("data", "fsdp", "tensor", "expert", "context")

# Parameter metadata flag: a dim its mesh axes do not divide is replicated instead of an error (NF4 block
# scales: Scout's 5120 / 64 = 80 blocks along `embed`, which Scout's pretraining mesh splits 128 ways).
LOOSE = "replicate_undivided"

# Logical axis -> mesh axis (or tuple of mesh axes, or None = replicated).
RULES: dict[str, str | tuple[str, ...] | None] = {
    # activations
    "batch": ("data", "fsdp", "expert"),
    "seq": "context",
    "kv_seq": "context",  # a NoPE layer's KV cache along the sequence (the ring buffers are not split)
    "act_embed": None,
    # parameters (and the activation axes that share their sharding)
    "vocab": "tensor",
    # context and expert too: their devices share the parameter and optimizer shards (on Scout's
    # fsdp=8 x expert=16 the non-expert weights and their Adam state are split 128 ways, not 8)
    "embed": ("fsdp", "expert", "context"),
    "expert_embed": ("fsdp", "context"),  # the routed experts' model dim (their expert dim takes `expert`)
    "heads": "tensor",
    "kv_heads": "tensor",
    "head_dim": None,
    "mlp": "tensor",
    "experts": "expert",
    "layers": None,
    "norm": None,
}


def mesh_axes_of(logical: str | None, rules: dict | None = None) -> tuple[str, ...]:
  """The mesh axes logical axis `logical` maps to under `rules` (default: RULES), in order."""
  rules = RULES if rules is None else rules
  if logical is None:
    return ()
  if logical not in rules:
    raise KeyError(f"logical axis {logical!r} is not in the sharding rules table; add it to "
                   f"llama4_jax.sharding.RULES (known: {sorted(rules)})")
  target = rules[logical]
  if target is None:
    return ()
  return (target,) if isinstance(target, str) else tuple(target)


def logical_to_spec(logical_axes: Sequence[str | None], mesh: Mesh | None = None,
                    shape: Sequence[int] | None = None, rules: dict | None = None,
                    strict: bool = True) -> P:
  """PartitionSpec for an array whose dims carry `logical_axes`.

  Mesh axes of size 1 (or absent from `mesh`) are dropped. Two logical axes of one array landing on the
  same mesh axis is an error. With `shape`, a dim that the mesh axes do not divide raises ValueError when
  `strict`, else that dim is replicated (used for activations such as a batch of 1).
  """
  rules = RULES if rules is None else rules
  used: dict[str, str] = {}
  spec = []
  for dim, logical in enumerate(logical_axes):
    axes = mesh_axes_of(logical, rules)
    if mesh is not None:
      axes = tuple(a for a in axes if a in mesh.shape and mesh.shape[a] > 1)
    for a in axes:
      if a in used:
        raise ValueError(f"logical axes {used[a]!r} and {logical!r} of one array both map to mesh axis "
                         f"{a!r}; fix llama4_jax.sharding.RULES")
      used[a] = logical
    if shape is not None and mesh is not None and axes:
      size = math.prod(mesh.shape[a] for a in axes)
      if shape[dim] % size:
        if strict:
          raise ValueError(f"dimension {dim} ({logical!r}, size {shape[dim]}) is not divisible by mesh "
                           f"axes {axes} of total size {size}")
        for a in axes:
          used.pop(a)
        axes = ()
    spec.append(None if not axes else axes[0] if len(axes) == 1 else axes)
  return P(*spec)


def named_sharding(mesh: Mesh, logical_axes: Sequence[str | None], shape=None, strict=True,
                   rules: dict | None = None) -> NamedSharding:
  return NamedSharding(mesh, logical_to_spec(logical_axes, mesh, shape, rules, strict))


def constrain(x: jax.Array, mesh: Mesh | None, logical_axes: Sequence[str | None]) -> jax.Array:
  """`with_sharding_constraint` by logical axes; a no-op without a mesh or on one device.

  Dims the mesh does not divide are left replicated rather than failing (a batch of 1 while sampling).
  """
  if mesh is None or mesh.size == 1:
    return x
  return jax.lax.with_sharding_constraint(
      x, named_sharding(mesh, logical_axes, x.shape, strict=False))


def state_shardings(abstract_state: Any, mesh: Mesh, rules: dict | None = None) -> Any:
  """NamedShardings for an NNX state whose Variables carry `logical_axes` metadata.

  A dim not divisible by its mesh axes raises ValueError naming the parameter, e.g.
  `layers/0/attn/q: dimension 1 ('heads', size 40) is not divisible by mesh axes ('tensor',) ...`,
  unless the parameter's metadata sets `LOOSE` (then that dim is replicated).
  """
  from flax import nnx

  def one(path, var):
    axes = var.get_metadata().get("logical_axes")
    if axes is None:
      return NamedSharding(mesh, P())
    name = "/".join(str(getattr(p, "key", p)) for p in path)
    try:
      return named_sharding(mesh, axes, var.shape, strict=not var.get_metadata().get(LOOSE), rules=rules)
    except ValueError as e:
      raise ValueError(f"cannot shard parameter {name} of shape {tuple(var.shape)} with logical axes "
                       f"{axes} on mesh {dict(mesh.shape)}: {e}") from None

  return jax.tree_util.tree_map_with_path(one, abstract_state,
                                          is_leaf=lambda x: isinstance(x, nnx.Variable))


def resolve_mesh_sizes(sizes: dict[str, int], num_devices: int) -> dict[str, int]:
  """Mesh axis sizes (all of MESH_AXES; missing ones are 1) with the one -1 axis, if any, resolved so that
  their product is `num_devices`. Errors say which sizes do not fit."""
  unknown = set(sizes) - set(MESH_AXES)
  if unknown:
    raise ValueError(f"unknown mesh axes {sorted(unknown)}; the axes are {MESH_AXES}")
  sizes = {a: sizes.get(a, 1) for a in MESH_AXES}
  for name, size in sizes.items():
    if not isinstance(size, (int, np.integer)) or size == 0 or size < -1:
      raise ValueError(f"mesh axis {name}={size} must be a positive integer or -1 (the rest)")
  free = [n for n, s in sizes.items() if s == -1]
  if len(free) > 1:
    raise ValueError(f"only one mesh axis may be -1, got {free}")
  fixed = math.prod(s for s in sizes.values() if s != -1)
  if free:
    if num_devices % fixed:
      given = ", ".join(f"{n}={s}" for n, s in sizes.items() if s != -1 and s != 1)
      raise ValueError(f"mesh axes {given} (product {fixed}) do not divide the {num_devices} devices; "
                       f"choose sizes whose product divides {num_devices}")
    sizes[free[0]] = num_devices // fixed
  total = math.prod(sizes.values())
  if total != num_devices:
    desc = ", ".join(f"{n}={s}" for n, s in sizes.items())
    raise ValueError(f"mesh {desc} needs {total} devices but {num_devices} are available; make the "
                     f"product of the axis sizes equal {num_devices} (or set one axis to -1)")
  return {a: int(v) for a, v in sizes.items()}


def batch_shards(sizes) -> int:
  """Devices a batch is split over: the product of the mesh axes the "batch" rule names (`sizes`: axis ->
  size, e.g. `mesh.shape`; missing axes count 1)."""
  return math.prod(sizes.get(a, 1) for a in RULES["batch"])


MESH_FLAG_HELP = ("Shard the model and the KV cache over this host's devices, e.g. 'fsdp=4,tensor=2' (axes "
                  "data, fsdp, tensor, expert, context; those not named are 1, one may be -1: the rest). "
                  "context=N prefills prompts through ring attention over N devices and splits the "
                  "global layers' KV cache over them. Default: one device.")


def mesh_from_flag(spec: str | None) -> Mesh | None:
  """The mesh a command line's `--mesh` names: "fsdp=4,tensor=2" (axes it does not name are 1; one may be
  -1: the devices the others leave), or None for an empty or missing flag."""
  if not spec:
    return None
  sizes = {}
  for part in spec.split(","):
    name, _, value = (x.strip() for x in part.partition("="))
    try:
      sizes[name] = int(value)
    except ValueError:
      raise ValueError(f"--mesh={spec!r}: {part!r} is not AXIS=SIZE (e.g. --mesh=fsdp=4,tensor=2; "
                       f"the axes are {', '.join(MESH_AXES)})") from None
  unknown = set(sizes) - set(MESH_AXES)
  if unknown:
    raise ValueError(f"--mesh={spec!r}: unknown axes {sorted(unknown)}; the axes are {', '.join(MESH_AXES)}")
  return make_mesh(**{a: sizes.get(a, 1) for a in MESH_AXES})


def make_mesh(data: int = 1, fsdp: int = -1, tensor: int = 1, expert: int = 1, context: int = 1,
              devices: Iterable[jax.Device] | None = None) -> Mesh:
  """A 5-axis mesh (data, fsdp, tensor, expert, context) over `devices` (default: all).

  One axis may be -1: it takes the devices the others leave. Errors say which sizes do not fit.
  """
  devices = list(jax.devices() if devices is None else devices)
  sizes = resolve_mesh_sizes(dict(data=data, fsdp=fsdp, tensor=tensor, expert=expert, context=context),
                             len(devices))
  shape = tuple(sizes[a] for a in MESH_AXES)
  try:
    from jax.experimental import mesh_utils
    grid = mesh_utils.create_device_mesh(shape, devices)
  except Exception:  # non-TPU topologies or mixed devices: plain row-major order
    grid = np.asarray(devices, dtype=object).reshape(shape)
  return Mesh(grid, MESH_AXES)
