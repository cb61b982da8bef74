"""The decoder model: Flax NNX modules, the functional API over their state (forward with KV
cache), LoRA, HF import/export."""

from sage_jax.model.config import FAMILIES, ModelConfig, RopeConfig
from sage_jax.model.hf_io import load_hf, save_hf
from sage_jax.model.lora import LoraConfig
from sage_jax.model.lora import merge as merge_lora
from sage_jax.model.modules import Decoder, DecoderLayer
from sage_jax.model.params import (grow_vocab, init_lora, init_params, lora_axes, num_params, param_axes,
                                   param_shapes, unpadded)
from sage_jax.model.transformer import (CACHE_AXES, abstract_module, decode_layout, decoder, forward, hidden_states,
                                        init_cache, lm_head, per_layer, split_cache, stack_cache,
                                        stacked_layout)

__all__ = [
    "CACHE_AXES", "FAMILIES", "Decoder", "DecoderLayer", "LoraConfig", "ModelConfig", "RopeConfig", "abstract_module",
    "decode_layout", "decoder", "per_layer", "stacked_layout", "forward", "grow_vocab", "hidden_states", "init_cache", "init_lora", "init_params", "lm_head",
    "load_hf", "lora_axes", "merge_lora", "num_params", "param_axes", "param_shapes", "save_hf", "split_cache", "stack_cache", "unpadded",
]
