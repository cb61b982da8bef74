"""The functional API over the NNX decoder: `forward(cfg, params, tokens, positions, segment_ids,
cache) -> (logits, cache)`.

`params` is the decoder's module state as a plain pytree (`nnx.State.to_pure_dict()`: nested dicts
of arrays, the HF layout; see sage_jax.model.params); each call rebuilds the module with
`nnx.merge(graphdef, params)`, which costs nothing at run time inside `jax.jit`. Packing:
`segment_ids` (0 = padding) keep segments from attending to each other, and per-segment positions
are derived when not given. Caching: a chunk of T tokens is written at each row's `end` slot, so
prefill, chunked prefill and token-by-token decode are the same call (padding must sit at the
right end of a chunk).
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
from flax import nnx

from sage_jax import parallel
from sage_jax.model.config import ModelConfig
from sage_jax.model.lora import LoraConfig, with_adapters
from sage_jax.model.modules import Cache, Decoder, segment_positions, split_cache, stack_cache

Params = dict

__all__ = ["CACHE_AXES", "Cache", "abstract_module", "decode_layout", "decoder", "forward", "graphdef",
           "hidden_states", "init_cache", "lm_head", "per_layer", "segment_positions", "split_cache", "stack_cache",
           "stacked_layout"]


@functools.lru_cache(maxsize=64)
def abstract_module(cfg: ModelConfig, lora: LoraConfig | None = None) -> tuple[nnx.GraphDef, nnx.State]:
    """(graphdef, abstract state) of `Decoder(cfg, lora)`: shapes, dtypes and axis metadata, no
    arrays allocated (the state's leaves are ShapeDtypeStructs)."""
    # No mesh in context (it is cached, and eval_shape would resolve the logical names on a mesh).
    with jax.sharding.use_abstract_mesh(jax.sharding.AbstractMesh((), ())), nnx.use_eager_sharding(False):
        module = nnx.eval_shape(lambda: Decoder(cfg, lora, rngs=nnx.Rngs(0)))
    return nnx.split(module)


def graphdef(cfg: ModelConfig, lora: LoraConfig | None = None) -> nnx.GraphDef:
    return abstract_module(cfg, lora)[0]


def decoder(cfg: ModelConfig, params: Params, *, lora: LoraConfig | None = None,
            adapters: Params | None = None) -> Decoder:
    """The `Decoder` module over a state pytree (plus LoRA adapters when given). Params in the
    decode layout give a module whose `layers` are placeholders: pass `per_layer(params)` to it."""
    if (lora is None) != (adapters is None):
        raise ValueError("decoder: pass both `lora` and `adapters`, or neither")
    if per_layer(params) is not None:
        if adapters is not None:
            raise ValueError("decoder: LoRA adapters need the stacked layout (merge them first: merge_lora)")
        abstract = nnx.to_pure_dict(abstract_module(cfg, lora)[1])["layers"]
        params = {**params, "layers": abstract}
    state = params if adapters is None else with_adapters(params, adapters)
    return nnx.merge(graphdef(cfg, lora), state)


def decode_layout(params: Params) -> Params:
    """Params with the decoder layers as a tuple of per-layer trees (each weight its own buffer),
    for generation: `forward` then runs an unrolled loop over them instead of a scan over
    stacked weights, whose per-layer dynamic slices XLA on CPU copies (measured: a decode step at
    batch 1 moves about twice the bytes). Each layer's q/k/v kernels are fused into one
    `qkv_proj` [K, G + 2, H, D] and a dense MLP's gate/up into one `gate_up_proj` [2, F, D], and
    o_proj [D, N, H] and down_proj [D, F] are stored transposed: every kernel output-major
    (`DecoderLayer(fused=True)`: fewer, larger products per step, in the form XLA CPU runs
    fastest). Made outside
    jit, once (it copies the weights; a sharded weight's fused kernel keeps its mesh axes); the
    stacked layout stays the one for training, checkpoints and HF export."""
    if per_layer(params) is not None:
        return params
    layers = params["layers"]
    n = jax.tree.leaves(layers)[0].shape[0]
    return {**params, "layers": tuple(_fuse(jax.tree.map(lambda x, i=i: x[i], layers)) for i in range(n))}


def stacked_layout(params: Params) -> Params:
    """The inverse of `decode_layout` (exact: the fused kernels are split back)."""
    layers = per_layer(params)
    if layers is None:
        return params
    return {**params, "layers": jax.tree.map(lambda *xs: jnp.stack(xs), *(_unfuse(x) for x in layers))}


def _placed_like(x: jax.Array, like: jax.Array, spec_of) -> jax.Array:
    """x on like's mesh, with the partition spec spec_of(like's spec) (as is off a mesh)."""
    sharding = getattr(like, "sharding", None)
    if not isinstance(sharding, jax.sharding.NamedSharding):
        return x
    spec = tuple(sharding.spec) + (None,) * (like.ndim - len(sharding.spec))
    return jax.device_put(x, jax.sharding.NamedSharding(sharding.mesh, jax.sharding.PartitionSpec(*spec_of(spec))))


def _fuse(layer: Params) -> Params:
    """One layer's state with q/k/v (and a dense MLP's gate/up) fused, as `DecoderLayer(fused=True)`."""
    layer = dict(layer)
    q, k, v = layer.pop("q_proj"), layer.pop("k_proj"), layer.pop("v_proj")
    d, kv, h = k.shape
    qkv = jnp.concatenate([q.reshape(d, kv, -1, h), k[:, :, None], v[:, :, None]], axis=2)
    layer["qkv_proj"] = _placed_like(qkv.transpose(1, 2, 3, 0), k, lambda s: (s[1], None, s[2], s[0]))
    o = layer["o_proj"]
    layer["o_proj"] = _placed_like(o.transpose(2, 0, 1), o, lambda s: (s[2], s[0], s[1]))
    if "router" not in layer:  # MoE experts stay as they are
        gate, up, down = layer.pop("gate_proj"), layer.pop("up_proj"), layer.pop("down_proj")
        layer["gate_up_proj"] = _placed_like(jnp.stack([gate.T, up.T]), gate, lambda s: (None, s[1], s[0]))
        layer["down_proj"] = _placed_like(down.T, down, lambda s: (s[1], s[0]))
    return layer


def _unfuse(layer: Params) -> Params:
    """The inverse of `_fuse`."""
    layer = dict(layer)
    layer["o_proj"] = layer["o_proj"].transpose(1, 2, 0)
    qkv = layer.pop("qkv_proj").transpose(3, 0, 1, 2)
    d, kv, g2, h = qkv.shape
    layer.update(q_proj=qkv[:, :, : g2 - 2].reshape(d, kv * (g2 - 2), h), k_proj=qkv[:, :, g2 - 2],
                 v_proj=qkv[:, :, g2 - 1])
    if "gate_up_proj" in layer:
        gate_up = layer.pop("gate_up_proj")
        layer.update(gate_proj=gate_up[0].T, up_proj=gate_up[1].T, down_proj=layer["down_proj"].T)
    return layer


def per_layer(params: Params) -> tuple | None:
    """The per-layer states of params in the decode layout, else None."""
    layers = params.get("layers") if isinstance(params, dict) else None
    return layers if isinstance(layers, tuple) else None


def init_cache(cfg: ModelConfig, batch: int, max_len: int, dtype: str | None = None) -> Cache:
    """An empty KV cache: k/v [L, B, K, S, H] (kv heads before slots: a decode step's attention
    reads each (row, kv head)'s slots as they lie), per-slot segment ids [B, S], fill level `end` [B]."""
    dt = jnp.dtype(dtype or cfg.dtype)
    shape = (cfg.num_layers, batch, cfg.num_kv_heads, max_len, cfg.head_dim)
    cache = {
        "k": jnp.zeros(shape, dt),
        "v": jnp.zeros(shape, dt),
        "segment_ids": jnp.zeros((batch, max_len), jnp.int32),
        "end": jnp.zeros((batch,), jnp.int32),
    }
    return parallel.constrain_tree(cache, CACHE_AXES)  # by its logical axes under a mesh; else as is


CACHE_AXES = {
    "k": ("layers", "batch", "kv_heads", "length", "head_dim"),
    "v": ("layers", "batch", "kv_heads", "length", "head_dim"),
    "segment_ids": ("batch", "length"),
    "end": ("batch",),
}


def hidden_states(
    cfg: ModelConfig,
    params: Params,
    tokens: jax.Array,
    positions: jax.Array | None = None,
    segment_ids: jax.Array | None = None,
    cache: Cache | None = None,
    *,
    lora: LoraConfig | None = None,
    adapters: Params | None = None,
    dropout_rng: jax.Array | None = None,
    prefix: Cache | None = None,
) -> tuple[jax.Array, Cache | None]:
    """The final-normed hidden states [B, T, D] (what the LM head and the losses consume).

    `adapters` (from sage_jax.model.init_lora) with their `lora` config add LoRA paths;
    `dropout_rng` enables LoRA dropout (training only); `prefix`: a shared read-only prefix the
    cache's rows continue (see `Decoder.hidden_states`)."""
    module = decoder(cfg, params, lora=lora, adapters=adapters)
    return module.hidden_states(tokens, positions, segment_ids, cache, dropout_rng, prefix, per_layer(params))


def lm_head(cfg: ModelConfig, params: Params, x: jax.Array) -> jax.Array:
    """Logits [..., vocab_size] from hidden states; vocabulary padding rows are dropped."""
    return decoder(cfg, params).logits(x, decode=per_layer(params) is not None)


def forward(
    cfg: ModelConfig,
    params: Params,
    tokens: jax.Array,
    positions: jax.Array | None = None,
    segment_ids: jax.Array | None = None,
    cache: Cache | None = None,
    *,
    lora: LoraConfig | None = None,
    adapters: Params | None = None,
    dropout_rng: jax.Array | None = None,
    prefix: Cache | None = None,
) -> tuple[jax.Array, Cache | None]:
    """Logits [B, T, vocab] and the updated cache (None when called without one).

    tokens int32 [B, T]; positions [B, T] (default: per-segment, or continuing the cache);
    segment_ids [B, T] (default all 1; 0 marks padding, which with a cache must be at the right).
    prefix: k/v [L, P, K, Sp, H] and base [B]: the cache's rows (P groups of B // P) continue the
    first base[b] slots of prefix row b // (B // P), read in place, not copied per row.
    """
    module = decoder(cfg, params, lora=lora, adapters=adapters)
    return module(tokens, positions, segment_ids, cache, dropout_rng, prefix, per_layer(params))
