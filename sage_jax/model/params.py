"""The parameter pytree: shapes, logical axis names, initialisation and vocabulary growth.

Layout (kernels are [in, out], i.e. HF weights transposed; per-layer tensors are stacked on a
leading `layers` axis so the decoder is one `lax.scan`):

    embed [V, D]   final_norm [D]   lm_head [D, V] (untied only)
    layers/ attn_norm [L, D]  q_proj [L, D, N, H]  k_proj, v_proj [L, D, K, H]  o_proj [L, N, H, D]
            (q|k|v)_bias [L, heads, H]  o_bias [L, D]  q_norm, k_norm [L, H]  mlp_norm [L, D]
            dense: gate_proj, up_proj [L, D, F]  down_proj [L, F, D]
            MoE:   router [L, D, E]  gate_proj, up_proj [L, E, D, F]  down_proj [L, E, F, D]
"""

from __future__ import annotations

from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from sage_jax.model.config import ModelConfig

Params = dict[str, Any]


def param_axes(cfg: ModelConfig) -> Params:
    """Logical axis names for every parameter (same tree structure as the params)."""
    L = "layers"
    layers: dict[str, tuple] = {
        "attn_norm": (L, "norm"),
        "q_proj": (L, "embed", "heads", "head_dim"),
        "k_proj": (L, "embed", "kv_heads", "head_dim"),
        "v_proj": (L, "embed", "kv_heads", "head_dim"),
        "o_proj": (L, "heads", "head_dim", "embed"),
        "mlp_norm": (L, "norm"),
    }
    if cfg.qkv_bias:
        layers.update(
            q_bias=(L, "heads", "head_dim"), k_bias=(L, "kv_heads", "head_dim"), v_bias=(L, "kv_heads", "head_dim")
        )
    if cfg.o_bias:
        layers["o_bias"] = (L, "norm")
    if cfg.qk_norm:
        layers.update(q_norm=(L, "head_dim"), k_norm=(L, "head_dim"))
    if cfg.is_moe:
        layers.update(
            router=(L, "embed", None),
            gate_proj=(L, "expert", "embed", "mlp"),
            up_proj=(L, "expert", "embed", "mlp"),
            down_proj=(L, "expert", "mlp", "embed"),
        )
    else:
        layers.update(gate_proj=(L, "embed", "mlp"), up_proj=(L, "embed", "mlp"), down_proj=(L, "mlp", "embed"))
    axes: Params = {"embed": ("vocab", "embed"), "layers": layers, "final_norm": ("norm",)}
    if not cfg.tie_word_embeddings:
        axes["lm_head"] = ("embed", "vocab")
    return axes


def param_shapes(cfg: ModelConfig) -> Params:
    dims = {
        "layers": cfg.num_layers,
        "vocab": cfg.embed_rows,
        "embed": cfg.hidden_size,
        "norm": cfg.hidden_size,
        "heads": cfg.num_heads,
        "kv_heads": cfg.num_kv_heads,
        "head_dim": cfg.head_dim,
        "mlp": cfg.intermediate_size,
        "expert": cfg.num_experts,
        None: cfg.num_experts,  # the router's output axis (never sharded)
    }
    return jax.tree.map(lambda ax: tuple(dims[a] for a in ax), param_axes(cfg), is_leaf=_is_axes)


def _is_axes(x) -> bool:
    return isinstance(x, tuple)


def init_params(cfg: ModelConfig, key: jax.Array, std: float = 0.02) -> Params:
    """Random init (normal(std) kernels, unit norms, zero biases), in cfg.param_dtype."""
    shapes = param_shapes(cfg)
    leaves, treedef = jax.tree.flatten(shapes, is_leaf=_is_axes)
    paths = [jax.tree_util.keystr(p) for p, _ in jax.tree_util.tree_flatten_with_path(shapes, is_leaf=_is_axes)[0]]
    keys = jax.random.split(key, len(leaves))
    dtype = jnp.dtype(cfg.param_dtype)
    out = []
    for path, shape, k in zip(paths, leaves, keys):
        if "norm" in path:
            out.append(jnp.ones(shape, dtype))
        elif "bias" in path:
            out.append(jnp.zeros(shape, dtype))
        else:
            out.append((std * jax.random.normal(k, shape, jnp.float32)).astype(dtype))
    return jax.tree.unflatten(treedef, out)


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
