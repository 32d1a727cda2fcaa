"""ModelConfig: presets, HF config.json in both spellings, validation, RoPE frequencies, layer pattern."""

import jax
import numpy as np
import pytest
import torch
import transformers as tf
from flax import nnx
from transformers.modeling_rope_utils import ROPE_INIT_FUNCTIONS

import llama4_jax as l4
from llama4_jax.config import ModelConfig


def test_presets_published_values():
  scout, maverick = l4.get_config("scout"), l4.get_config("maverick")
  assert (scout.hidden_size, scout.num_hidden_layers, scout.num_attention_heads,
          scout.num_key_value_heads, scout.head_dim) == (5120, 48, 40, 8, 128)
  assert (scout.num_local_experts, scout.interleave_moe_layer_step, scout.use_qk_norm) == (16, 1, True)
  assert (scout.rope_type, scout.rope_factor, scout.rope_low_freq_factor,
          scout.rope_high_freq_factor) == ("llama3", 16.0, 1.0, 1.0)
  assert (maverick.num_local_experts, maverick.interleave_moe_layer_step, maverick.use_qk_norm,
          maverick.rope_type) == (128, 2, False, "default")
  assert scout.vocab_size == maverick.vocab_size == 202048
  assert scout.eos_token_id == (200001, 200007, 200008) and scout.pad_token_id == 200018
  assert scout.layer_period() == maverick.layer_period() == 4


@pytest.mark.parametrize("name,count", [("scout", 107_769_861_120), ("maverick", 400_711_848_960)])
def test_abstract_param_counts(name, count):
  """jax.eval_shape of the real presets: published text parameter counts, no memory allocated."""
  model = l4.abstract_model(l4.get_config(name))
  leaves = jax.tree.leaves(nnx.state(model))
  assert all(isinstance(x, jax.ShapeDtypeStruct) for x in leaves)
  assert sum(int(np.prod(x.shape)) for x in leaves) == count == l4.get_config(name).num_params()


def test_hf_config_round_trip_and_transformers_accepts_it():
  for name in ("tiny", "scout", "maverick"):
    cfg = l4.get_config(name)
    hf = l4.to_hf_config(cfg)
    assert l4.from_hf_config(hf) == cfg
    text = tf.Llama4TextConfig(**hf)
    assert text.rope_parameters["rope_type"] == cfg.rope_type
    assert l4.from_hf_config(text.to_dict()) == cfg


def test_old_spellings_and_multimodal_config():
  old = {"model_type": "llama4_text", "hidden_size": 5120, "num_attention_heads": 40, "head_dim": 128,
         "rope_theta": 500000.0, "attn_temperature_tuning": 4, "torch_dtype": "bfloat16",
         "rope_scaling": {"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0,
                          "high_freq_factor": 4.0, "original_max_position_embeddings": 8192}}
  cfg = l4.from_hf_config(old)
  assert cfg.attn_temperature_tuning is True and cfg.rope_factor == 8.0
  assert cfg.rope_high_freq_factor == 4.0 and cfg.param_dtype == "bfloat16"
  assert l4.from_hf_config({**old, "rope_scaling": None}).rope_type == "default"
  multimodal = {"model_type": "llama4", "architectures": ["Llama4ForConditionalGeneration"],
                "text_config": {**old, "num_local_experts": 128, "interleave_moe_layer_step": 2}}
  cfg = l4.from_hf_config(multimodal)
  assert cfg.num_local_experts == 128 and cfg.is_moe_layer(1) and not cfg.is_moe_layer(0)
  with pytest.raises(ValueError, match="model_type 'llama' is not Llama 4"):
    l4.from_hf_config({"model_type": "llama"})


@pytest.mark.parametrize("rope", [
    {"rope_type": "llama3", "factor": 16.0, "low_freq_factor": 1.0, "high_freq_factor": 1.0,
     "original_max_position_embeddings": 8192},
    {"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
     "original_max_position_embeddings": 8192},  # has a smooth (interpolated) region
    {"rope_type": "default"}])
def test_rope_frequencies_match_transformers(rope):
  hf = tf.Llama4TextConfig(rope_parameters={"rope_theta": 500000.0, **rope})
  want, _ = (ROPE_INIT_FUNCTIONS[rope["rope_type"]](hf, torch.device("cpu")) if rope["rope_type"] != "default"
             else (1.0 / (500000.0 ** (torch.arange(0, 128, 2).float() / 128)), 1.0))
  got = l4.from_hf_config(hf.to_dict()).rope_inv_freq()
  np.testing.assert_allclose(got, want.numpy(), rtol=1e-6)


def test_validation_messages():
  with pytest.raises(ValueError, match="num_attention_heads=6 is not divisible by num_key_value_heads=4"):
    l4.get_config("tiny", num_attention_heads=6, num_key_value_heads=4)
  with pytest.raises(ValueError, match="num_experts_per_tok=5 exceeds num_local_experts=4"):
    l4.get_config("tiny", num_experts_per_tok=5)
  with pytest.raises(ValueError, match="dtype='fp8'"):
    l4.get_config("tiny", dtype="fp8")
  with pytest.raises(ValueError, match="has no field"):
    l4.get_config("tiny", hidden=3)
  with pytest.raises(ValueError, match="unknown preset"):
    l4.get_config("llama5")


def test_layer_pattern_and_period():
  scout = l4.get_config("scout")
  assert [scout.is_rope_layer(i) for i in range(8)] == [True, True, True, False] * 2
  assert all(scout.is_moe_layer(i) for i in range(48))
  maverick = l4.get_config("maverick")
  assert [maverick.is_moe_layer(i) for i in range(4)] == [False, True, False, True]
  assert ModelConfig(interleave_moe_layer_step=3).layer_period() == 12
  assert ModelConfig(num_hidden_layers=6, no_rope_layers=(1, 0, 1, 1, 1, 0)).layer_period() == 4
  assert ModelConfig(num_hidden_layers=6, no_rope_layers=(1, 0, 0, 1, 1, 1)).layer_period() == 5
