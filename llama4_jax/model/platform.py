"""Which platform's kernels a trace takes: the platform of the devices being compiled for.

Kernel choices (splash attention, the grouped matmul, the CPU-only bf16 workarounds of `ops`) must follow
the devices a program is compiled for, not the host it is traced on: the TPU compiler runs on a CPU host
(`jax.experimental.topologies`), where `jax.default_backend()` is "cpu" while the mesh holds TPU
devices. `Llama4` enters `compiling_for(self.mesh)` around every traced entry point, so a model on a TPU
topology mesh traces the TPU program; without a mesh the default backend decides, as before.
"""

from __future__ import annotations

import contextlib
import contextvars
import functools

import jax

_TARGET: contextvars.ContextVar[str | None] = contextvars.ContextVar("llama4_jax_target", default=None)


def mesh_platform(mesh) -> str | None:
  """The platform ("cpu", "tpu", "gpu") of a mesh's devices, or None without a mesh."""
  if mesh is None:
    return None
  return mesh.devices.flat[0].platform


def target_platform() -> str:
  """The platform the code being traced is compiled for (see the module docstring)."""
  return _TARGET.get() or jax.default_backend()


def on_tpu() -> bool:
  return target_platform() == "tpu"


@contextlib.contextmanager
def compiling_for(mesh_or_platform):
  """Traces inside take kernels for `mesh_or_platform` (a Mesh, a platform name, or None: unchanged)."""
  name = (mesh_or_platform if isinstance(mesh_or_platform, str) or mesh_or_platform is None
          else mesh_platform(mesh_or_platform))
  if name is None:
    yield
    return
  token = _TARGET.set(name)
  try:
    yield
  finally:
    _TARGET.reset(token)


def on_model_mesh(method):
  """Decorator for a model method: trace it for the platform of `self.mesh`."""
  @functools.wraps(method)
  def wrapped(self, *args, **kwargs):
    with compiling_for(self.mesh):
      return method(self, *args, **kwargs)
  return wrapped
