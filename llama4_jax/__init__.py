"""llama4_jax: pretrain, fine-tune, convert and sample Meta's Llama 4 models with JAX and Flax NNX.

The public API (README, notebooks and tests use exactly these names):

    import llama4_jax as l4
    mesh = l4.make_mesh(data=1, fsdp=-1, tensor=1, expert=1, context=1)
    model = l4.load_model(path, dtype=None, mesh=None, **model_overrides)
    logits = model(input_ids)            # int32 [B, T] -> float32 [B, T, V]
    l4.save_pretrained(model, out_dir)
    out = l4.generate(model, prompts, max_new_tokens=64, temperature=0.0, top_k=None, top_p=None,
                      seed=0, stop_tokens=None)   # prompts: token-id lists -> new-token lists

LoRA (see llama4_jax/model/linear.py and model/adapters.py):

    model = l4.load_model(path, lora_rank=16, base_quant="nf4")    # adapters on a frozen 4-bit base (QLoRA)
    merged = l4.merge_lora(model)                                  # adapters folded into the weights
    l4.save_adapters(model, dir, base=path); l4.save_peft(model, dir)
"""

from llama4_jax.checkpoint import CheckpointError, load_model, save_adapters, save_peft, save_pretrained
from llama4_jax.config import ModelConfig, from_hf_config, get_config, to_hf_config
from llama4_jax.inference import generate, generate_stream
from llama4_jax.model import Llama4, abstract_model, create_model
from llama4_jax.model.adapters import adapt_model, merge_lora
from llama4_jax.sharding import make_mesh

__version__ = "0.1.0"

__all__ = [
    "CheckpointError", "Llama4", "ModelConfig", "abstract_model", "adapt_model", "create_model",
    "from_hf_config", "generate", "generate_stream", "get_config", "load_model", "make_mesh", "merge_lora",
    "save_adapters", "save_peft", "save_pretrained", "to_hf_config",
]
