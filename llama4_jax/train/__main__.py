"""llama4-train --config=configs/tiny_cpu.py --workdir=DIR [--config.x=y ...]
(or python -m llama4_jax.train). Trains, or resumes, the run the config describes.

    llama4-train --workdir=workdir/tiny                     # the default: configs/tiny_cpu.py
    llama4-train --config=configs/lora_tiny_cpu.py --workdir=workdir/lora --config.steps=50

Multi-host: --coordinator_address=HOST:PORT --num_processes=N --process_id=I (on Cloud TPU they are
detected automatically; on CPU, launch/local_multihost.sh starts N local processes with gloo collectives).
"""

from absl import flags, logging
from ml_collections import config_flags

from llama4_jax.cli import DEFAULT_CONFIG, run_absl

_CONFIG = config_flags.DEFINE_config_file("config", DEFAULT_CONFIG, "Run config file.",
                                          lock_config=True)
_WORKDIR = flags.DEFINE_string("workdir", None, "Directory for checkpoints, metrics and the tokenizer.",
                               required=True)
_COORDINATOR = flags.DEFINE_string("coordinator_address", None, "host:port of process 0 (multi-host).")
_NUM_PROCESSES = flags.DEFINE_integer("num_processes", None, "Number of processes (multi-host).")
_PROCESS_ID = flags.DEFINE_integer("process_id", None, "This process's index (multi-host).")


def main(argv):
  del argv
  logging.set_verbosity(logging.WARNING)  # Orbax logs every save step at INFO
  from llama4_jax.distributed import initialize
  initialize(_COORDINATOR.value, _NUM_PROCESSES.value, _PROCESS_ID.value)
  from llama4_jax.train import train
  train(_CONFIG.value, _WORKDIR.value)


def run():
  run_absl(main, __doc__)


if __name__ == "__main__":
  run()
