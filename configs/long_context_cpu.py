"""The tiny Llama 4 trained on 32K-token rows with ring attention over 8 simulated CPU devices.

    XLA_FLAGS=--xla_force_host_platform_device_count=8 \
        python -m llama4_jax.train --config=configs/long_context_cpu.py --workdir=/tmp/long

Mesh: context=8 splits each 32,768-token row into 8 shards of 4,096 tokens (zigzag order: every device
holds two 2,048-token runs, so causal work is balanced). The NoPE layer runs the full ring; the three
chunked layers (C = 256) see packed rows whose chunks start at each document, so they run the ring too but
the kernel skips every block outside each query's window. Parameters are sharded over the context axis as
well (FSDP-style), and each superblock is rematerialised. Without the XLA flag the mesh check says that 8
devices are needed. Slow on 2 cores (about a minute a step): this config shows that the path works end to
end, not a speed.
"""

from llama4_jax.train.config import default_run_config, model_fields


def get_config():
  c = default_run_config()
  c.steps = 6
  c.batch_size = 1
  c.seq_len = 32768
  c.learning_rate = 1e-3
  c.warmup_steps = 2
  c.log_every = 1
  c.eval_every = 0
  c.eval_batches = 1
  c.checkpoint_every = 3
  c.mesh.update(data=1, fsdp=1, tensor=1, expert=1, context=8)
  c.model = model_fields("tiny", max_position_embeddings=65536, attention_impl="ring",
                         ring_layout="zigzag", remat_policy="full")
  return c
