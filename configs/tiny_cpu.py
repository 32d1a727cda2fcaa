"""The default run: the tiny Llama 4 on the built-in corpus (this Python's standard library), on CPU.

    python -m llama4_jax.train --config=configs/tiny_cpu.py --workdir=/tmp/tiny

Expected on a 2-core x86 machine (measured): a local 8192-token BPE is trained in ~4 s, then 10.4M
parameters train 220 steps of 16 x 256 tokens at ~2,100 tokens/s (MFU ~35%); everything takes about 8
minutes and the held-out set ends at 2.25 bits per byte (the target is <= 2.5; gzip -9 gets 1.79 on the
same files), then a sample continuing `def ` is printed. Rerunning the command resumes from the last
checkpoint. Override anything: --config.steps=100 --config.model.hidden_size=128 --config.mesh.fsdp=2.
"""

from llama4_jax.train.config import default_run_config


def get_config():
  c = default_run_config()
  c.steps = 220
  c.batch_size = 16
  c.seq_len = 256
  c.learning_rate = 3e-3
  c.warmup_steps = 20
  c.log_every = 10
  c.eval_every = 200
  c.checkpoint_every = 100
  c.sample_prompt = "def "
  c.sample_tokens = 120
  return c
