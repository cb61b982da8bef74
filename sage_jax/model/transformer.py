"""The decoder: `forward(cfg, params, tokens, positions, segment_ids, cache) -> (logits, cache)`.

One pure function for all families; the layers are stacked and run by `lax.scan`, so compile
time does not grow with depth. Packing: `segment_ids` (0 = padding) keep segments from
attending to each other, and per-segment positions are derived when not given. Caching: a
chunk of T tokens is written at each row's `end` slot, so prefill, chunked prefill and
token-by-token decode are the same call (padding must sit at the right end of a chunk).
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

from sage_jax.model import layers as L
from sage_jax.model.config import ModelConfig
from sage_jax.model.lora import TARGETS, LoraConfig
from sage_jax.model.lora import apply as lora_apply
from sage_jax.model.params import Params

Cache = dict[str, jax.Array]


def init_cache(cfg: ModelConfig, batch: int, max_len: int, dtype: str | None = None) -> Cache:
    """An empty KV cache: k/v [L, B, S, K, H], per-slot segment ids [B, S], fill level `end` [B]."""
    dt = jnp.dtype(dtype or cfg.dtype)
    shape = (cfg.num_layers, batch, max_len, cfg.num_kv_heads, cfg.head_dim)
    return {
        "k": jnp.zeros(shape, dt),
        "v": jnp.zeros(shape, dt),
        "segment_ids": jnp.zeros((batch, max_len), jnp.int32),
        "end": jnp.zeros((batch,), jnp.int32),
    }


CACHE_AXES = {
    "k": ("layers", "batch", "length", "kv_heads", "head_dim"),
    "v": ("layers", "batch", "length", "kv_heads", "head_dim"),
    "segment_ids": ("batch", "length"),
    "end": ("batch",),
}


def segment_positions(segment_ids: jax.Array) -> jax.Array:
    """Positions that restart at 0 at every segment boundary of a packed row [B, T]."""
    t = jnp.arange(segment_ids.shape[1], dtype=jnp.int32)[None, :]
    boundary = jnp.concatenate(
        [jnp.ones_like(segment_ids[:, :1], bool), segment_ids[:, 1:] != segment_ids[:, :-1]], axis=1
    )
    start = jax.lax.cummax(jnp.where(boundary, t, 0), axis=1)
    return t - start


def _slots(start: jax.Array, t: int) -> tuple[jax.Array, jax.Array]:
    """Row and slot indices [B, T] of a chunk of t tokens written at each row's `start`."""
    rows = jnp.arange(start.shape[0], dtype=jnp.int32)[:, None]
    return rows, start[:, None] + jnp.arange(t, dtype=jnp.int32)[None, :]


def _write(buf: jax.Array, chunk: jax.Array, start: jax.Array) -> jax.Array:
    """buf [B, S, ...] <- chunk [B, T, ...] at slot start[b] (slots past S are dropped)."""
    rows, slots = _slots(start, chunk.shape[1])
    return buf.at[rows, slots].set(chunk.astype(buf.dtype), mode="drop")


def _write_layer(buf: jax.Array, chunk: jax.Array, layer: jax.Array, start: jax.Array) -> jax.Array:
    """buf [L, B, S, K, H] <- chunk [B, T, K, H] at (layer, b, start[b]).

    The whole cache is a loop carry updated in place by one scatter; writing only the new
    chunk (instead of re-stacking every layer's cache as scan outputs) keeps a decode step
    from copying the cache.
    """
    rows, slots = _slots(start, chunk.shape[1])
    return buf.at[layer, rows, slots].set(chunk.astype(buf.dtype), mode="drop")


def _layer(cfg: ModelConfig, x, p, window, cos, sin, mask, keys_values, lora=None, adapters=None, rng=None):
    """One decoder layer; `keys_values(k, v)` returns the keys/values to attend to (the chunk's
    own, or the KV cache after writing the chunk into it) and the updated cache. `adapters`
    holds this layer's LoRA a/b per target (see sage_jax.model.lora)."""
    dt = x.dtype
    adapters = adapters or {}

    def proj(name, inp):
        r = None if rng is None else jax.random.fold_in(rng, TARGETS.index(name))
        return lora_apply(inp, p[name], name, adapters.get(name), lora, r)

    h = L.rms_norm(x, p["attn_norm"], cfg.rms_norm_eps)
    q, k, v = proj("q_proj", h), proj("k_proj", h), proj("v_proj", h)
    if cfg.qkv_bias:
        q, k, v = q + p["q_bias"].astype(dt), k + p["k_bias"].astype(dt), v + p["v_bias"].astype(dt)
    if cfg.qk_norm:
        q = L.rms_norm(q, p["q_norm"], cfg.rms_norm_eps)
        k = L.rms_norm(k, p["k_norm"], cfg.rms_norm_eps)
    q, k = L.apply_rope(q, cos, sin), L.apply_rope(k, cos, sin)
    k_all, v_all, new_kv = keys_values(k, v)
    attn = L.attention(q, k_all, v_all, mask(window))
    out = proj("o_proj", attn)
    if cfg.o_bias:
        out = out + p["o_bias"].astype(dt)
    x = x + out
    h = L.rms_norm(x, p["mlp_norm"], cfg.rms_norm_eps)
    if cfg.is_moe:
        mlp = L.moe(cfg, h, p["router"].astype(dt), p["gate_proj"].astype(dt), p["up_proj"].astype(dt),
                    p["down_proj"].astype(dt))
    else:
        mlp = proj("down_proj", jax.nn.silu(proj("gate_proj", h)) * proj("up_proj", h))
    return x + mlp, new_kv


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
) -> tuple[jax.Array, Cache | None]:
    """The final-normed hidden states [B, T, D] (what the LM head and the losses consume).

    `adapters` (from sage_jax.model.lora.init_lora) with their `lora` config add LoRA paths;
    `dropout_rng` enables LoRA dropout (training only)."""
    if (lora is None) != (adapters is None):
        raise ValueError("hidden_states: pass both `lora` and `adapters`, or neither")
    dt = jnp.dtype(cfg.dtype)
    b, t = tokens.shape
    if segment_ids is None:
        segment_ids = jnp.ones((b, t), jnp.int32)
    segment_ids = segment_ids.astype(jnp.int32)
    if cache is None:
        q_slots = jnp.broadcast_to(jnp.arange(t, dtype=jnp.int32), (b, t))
        k_slots, k_seg, start = q_slots, segment_ids, None
        if positions is None:
            positions = segment_positions(segment_ids)
    else:
        s = cache["k"].shape[2]
        if t > s:
            raise ValueError(f"forward: chunk of {t} tokens does not fit a KV cache of {s} slots")
        start = cache["end"]
        q_slots = start[:, None] + jnp.arange(t, dtype=jnp.int32)[None, :]
        k_seg = _write(cache["segment_ids"], segment_ids, start)
        k_slots = jnp.broadcast_to(jnp.arange(s, dtype=jnp.int32), (b, s))
        if positions is None:
            positions = q_slots
    cos, sin = L.rope_cos_sin(positions, L.rope_inv_freq(cfg.rope, cfg.head_dim))

    def mask(window):
        return L.attention_mask(q_slots, segment_ids, k_slots, k_seg, window)

    x = jnp.take(params["embed"], tokens, axis=0).astype(dt)
    windows = jnp.asarray(cfg.layer_windows(), jnp.int32)
    kv = None if cache is None else (cache["k"], cache["v"])

    def body(carry, xs):
        x, kv = carry
        p, window, i, layer_adapters = xs
        rng = None if dropout_rng is None else jax.random.fold_in(dropout_rng, i)

        def keys_values(k, v):
            if kv is None:
                return k, v, None
            ck, cv = _write_layer(kv[0], k, i, start), _write_layer(kv[1], v, i, start)
            return ck[i].astype(dt), cv[i].astype(dt), (ck, cv)

        return _layer(cfg, x, p, window, cos, sin, mask, keys_values, lora, layer_adapters, rng), None

    if cfg.remat != "none":
        policy = {"full": None, "dots": jax.checkpoint_policies.dots_with_no_batch_dims_saveable}[cfg.remat]
        body = jax.checkpoint(body, policy=policy)
    layer_ids = jnp.arange(cfg.num_layers, dtype=jnp.int32)
    layer_adapters = None if adapters is None else adapters["layers"]
    (x, new_kv), _ = jax.lax.scan(body, (x, kv), (params["layers"], windows, layer_ids, layer_adapters))
    x = L.rms_norm(x, params["final_norm"], cfg.rms_norm_eps)
    new_cache = None
    if cache is not None:
        new_cache = {
            "k": new_kv[0],
            "v": new_kv[1],
            "segment_ids": k_seg,
            "end": start + jnp.sum(segment_ids != 0, axis=1, dtype=jnp.int32),
        }
    return x, new_cache


def lm_head(cfg: ModelConfig, params: Params, x: jax.Array) -> jax.Array:
    """Logits [..., vocab_size] from hidden states; vocabulary padding rows are dropped."""
    w = params["embed"].T if cfg.tie_word_embeddings else params["lm_head"]
    logits = x @ w.astype(x.dtype)
    if cfg.embed_rows != cfg.vocab_size:
        logits = logits[..., : cfg.vocab_size]
    return logits


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
) -> tuple[jax.Array, Cache | None]:
    """Logits [B, T, vocab] and the updated cache (None when called without one).

    tokens int32 [B, T]; positions [B, T] (default: per-segment, or continuing the cache);
    segment_ids [B, T] (default all 1; 0 marks padding, which with a cache must be at the right).
    """
    x, cache = hidden_states(cfg, params, tokens, positions, segment_ids, cache, lora=lora, adapters=adapters,
                             dropout_rng=dropout_rng)
    return lm_head(cfg, params, x), cache
