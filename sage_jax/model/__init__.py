"""The decoder model: config, params, forward with KV cache, HF import/export."""

from sage_jax.model.config import FAMILIES, ModelConfig, RopeConfig
from sage_jax.model.hf_io import load_hf, save_hf
from sage_jax.model.lora import LoraConfig, init_lora, lora_axes
from sage_jax.model.lora import merge as merge_lora
from sage_jax.model.params import grow_vocab, init_params, num_params, param_axes, unpadded
from sage_jax.model.transformer import CACHE_AXES, forward, hidden_states, init_cache, lm_head

__all__ = [
    "CACHE_AXES", "FAMILIES", "LoraConfig", "ModelConfig", "init_lora", "lora_axes", "merge_lora", "RopeConfig", "forward", "grow_vocab", "hidden_states",
    "init_cache", "init_params", "lm_head", "load_hf", "num_params", "param_axes", "save_hf", "unpadded",
]
