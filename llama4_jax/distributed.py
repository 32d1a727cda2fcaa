"""Multi-host start-up: `jax.distributed.initialize`, with gloo collectives when the devices are CPUs."""

from __future__ import annotations

import os


def initialize(coordinator_address: str | None = None, num_processes: int | None = None,
               process_id: int | None = None) -> None:
  """Joins the multi-process job when one is configured; a no-op for a single process.

  On Cloud TPU (several hosts) all three values are detected by JAX, so calling with none of them set
  still initializes: on GKE (TPU_WORKER_HOSTNAMES is set) and wherever LLAMA4_JAX_DISTRIBUTED=auto
  (launch/tpu_vm.sh sets it on TPU VM slices). On CPU they must be given (launch/local_multihost.sh
  does), and gloo is used.
  """
  import jax
  explicit = coordinator_address is not None or (num_processes or 1) > 1
  on_tpu_pod = ("TPU_WORKER_HOSTNAMES" in os.environ or "MEGASCALE_COORDINATOR_ADDRESS" in os.environ
                or os.environ.get("LLAMA4_JAX_DISTRIBUTED") == "auto")
  if not explicit and not on_tpu_pod:
    return
  if explicit and (coordinator_address is None or num_processes is None or process_id is None):
    raise ValueError("multi-host needs --coordinator_address, --num_processes and --process_id together "
                     f"(got {coordinator_address!r}, {num_processes!r}, {process_id!r})")
  if jax.config.jax_platforms in (None, "", "cpu") or os.environ.get("JAX_PLATFORMS", "") == "cpu":
    jax.config.update("jax_cpu_collectives_implementation", "gloo")
  jax.distributed.initialize(coordinator_address=coordinator_address, num_processes=num_processes,
                             process_id=process_id)
