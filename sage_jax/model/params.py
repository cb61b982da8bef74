"""The parameter pytree (the `Decoder` module state as plain nested dicts): shapes, logical axis
names (from the modules' sharding metadata), initialisation and vocabulary growth.

Layout (kernels are [in, out], i.e. HF weights transposed; per-layer tensors are stacked on a
leading `layers` axis so the decoder is one `lax.scan`):

    embed [V, D]   final_norm [D]   lm_head [D, V] (untied only)
    layers/ attn_norm [L, D]  q_proj [L, D, N, H]  k_proj, v_proj [L, D, K, H]  o_proj [L, N, H, D]
            (q|k|v)_bias [L, heads, H]  o_bias [L, D]  q_norm, k_norm [L, H]  mlp_norm [L, D]
            dense: gate_proj, up_proj [L, D, F]  down_proj [L, F, D]
            MoE:   router [L, D, E]  gate_proj, up_proj [L, E, D, F]  down_proj [L, E, F, D]
            LoRA (adapters, a separate pytree): lora/<target>/a [L, *in, r], lora/<target>/b [L, r, *out]
"""

from __future__ import annotations

import functools
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx
from jax.sharding import PartitionSpec as P

from sage_jax.model.config import ModelConfig
from sage_jax.model.lora import LoraConfig
from sage_jax.model.modules import Decoder
from sage_jax.model.transformer import abstract_module

Params = dict[str, Any]


def _pure(tree) -> Params:
    return nnx.to_pure_dict(tree) if isinstance(tree, nnx.State) else tree


def _axis_names(state: nnx.State) -> Params:
    """The logical axis names of every variable in `state`, as tuples (from its sharding metadata)."""
    return jax.tree.map(tuple, _pure(nnx.get_partition_spec(state)), is_leaf=lambda x: isinstance(x, P))


def param_axes(cfg: ModelConfig) -> Params:
    """Logical axis names of every parameter (same tree as the params), read from the modules'
    `nnx.Param` sharding metadata (stacked layers lead with `layers`)."""
    return _axis_names(abstract_module(cfg)[1])


def param_shapes(cfg: ModelConfig) -> Params:
    """Shape of every parameter (same tree as the params)."""
    _, state = abstract_module(cfg)
    return jax.tree.map(lambda x: tuple(x.shape), _pure(state))


def lora_axes(cfg: ModelConfig, lora: LoraConfig) -> Params:
    """Logical axis names of the LoRA adapters (the `nnx.LoRAParam` part of the module state)."""
    return _axis_names(nnx.filter_state(abstract_module(cfg, lora)[1], nnx.LoRAParam))


def init_params(cfg: ModelConfig, key: jax.Array, std: float = 0.02) -> Params:
    """Random init (normal(std) kernels, unit norms, zero biases), in cfg.param_dtype: the state
    of a freshly built `Decoder`."""
    with nnx.use_eager_sharding(False):
        return nnx.to_pure_dict(nnx.state(Decoder(cfg, std=std, rngs=nnx.Rngs(params=key))))


@functools.partial(jax.jit, static_argnums=(0, 1))
def init_lora(cfg: ModelConfig, lora: LoraConfig, key: jax.Array) -> Params:
    """Fresh LoRA adapters for `cfg`'s decoder: the `nnx.LoRAParam` part of a new module's state
    (a uniform, b zero). Under `jit` the unused base weights are never materialised."""
    with nnx.use_eager_sharding(False):
        module = Decoder(cfg, lora, rngs=nnx.Rngs(params=key))
    return nnx.to_pure_dict(nnx.state(module, nnx.LoRAParam))


def grow_vocab(
    cfg: ModelConfig, params: Params, new_vocab_size: int, *, pad_to_multiple_of: int = 1
) -> tuple[ModelConfig, Params]:
    """Add rows for new tokens (e.g. latent special tokens) and optional padding rows.

    New rows of the embedding (and the untied head) start at the mean of the existing rows: a
    new token then looks like an "average" token, so the model's outputs don't jump (the
    standard recipe; transformers' resize does the same in expectation). Padding rows (so the
    vocab axis divides the mesh) are zero; they are hidden from logits and dropped on export.
    """
    if new_vocab_size < cfg.vocab_size:
        raise ValueError(f"grow_vocab: new_vocab_size={new_vocab_size} < vocab_size={cfg.vocab_size}")
    rows = -(-new_vocab_size // pad_to_multiple_of) * pad_to_multiple_of
    old = cfg.vocab_size

    def grow(table: jax.Array, axis: int) -> jax.Array:
        real = jax.lax.slice_in_dim(table, 0, old, axis=axis)
        mean = jnp.mean(real.astype(jnp.float32), axis=axis, keepdims=True).astype(table.dtype)
        new = jnp.repeat(mean, new_vocab_size - old, axis=axis)
        pad_shape = list(table.shape)
        pad_shape[axis] = rows - new_vocab_size
        return jnp.concatenate([real, new, jnp.zeros(pad_shape, table.dtype)], axis=axis)

    params = dict(params)
    params["embed"] = grow(params["embed"], 0)
    if "lm_head" in params:
        params["lm_head"] = grow(params["lm_head"], 1)
    new_cfg = cfg.replace(vocab_size=new_vocab_size, padded_vocab_size=rows if rows != new_vocab_size else None)
    return new_cfg, params


def unpadded(cfg: ModelConfig, params: Params) -> Params:
    """The params with vocabulary padding rows removed (what HF export writes)."""
    if cfg.embed_rows == cfg.vocab_size:
        return params
    params = dict(params)
    params["embed"] = params["embed"][: cfg.vocab_size]
    if "lm_head" in params:
        params["lm_head"] = params["lm_head"][:, : cfg.vocab_size]
    return params


def num_params(params: Params) -> int:
    return int(sum(np.prod(x.shape) for x in jax.tree.leaves(params)))
