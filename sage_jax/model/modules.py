"""The decoder as Flax NNX modules: `DecoderLayer` (attention + SwiGLU or top-k MoE) and `Decoder`.

Every weight is an `nnx.Param` in the HF layout (kernels [in, out], heads split out) carrying its
logical axis names as sharding metadata; the mesh rule table (sage_jax.parallel) maps those names
to mesh axes. The layers are created stacked by `nnx.vmap` (leading `layers` axis, also in the
metadata) and run by `lax.scan` over the stacked state, so compile time does not grow with depth.
LoRA adapters are `nnx.LoRAParam`s under `layers/lora/<target>`.

These modules are used through the functional API (sage_jax.model.transformer): callers hold the
module state as a plain pytree and `nnx.merge` rebuilds the module inside `jax.jit`.
Shapes: B batch, T chunk, S cache slots, D hidden, N/K query/kv heads, H head_dim, F mlp, E experts.
"""

from __future__ import annotations

import functools
from typing import Callable

import jax
import jax.numpy as jnp
from flax import nnx

from sage_jax.model import attention as A
from sage_jax.model import layers as L
from sage_jax.parallel import constrain
from sage_jax.model.config import ModelConfig
from sage_jax.model.lora import TARGETS, LoRAAdapter, LoraConfig
from sage_jax.model.lora import apply as lora_apply

Cache = dict[str, jax.Array]


def _normal(rngs: nnx.Rngs, shape, dtype, std: float) -> jax.Array:
    return (std * jax.random.normal(rngs.params(), shape, jnp.float32)).astype(dtype)


def _check_lora(cfg: ModelConfig, lora: LoraConfig | None) -> None:
    if lora is not None and cfg.is_moe and any(t in ("gate_proj", "up_proj", "down_proj") for t in lora.targets):
        raise ValueError("LoRA on MoE expert kernels is not supported; target attention projections")


class DecoderLayer(nnx.Module):
    """One pre-norm decoder layer; its weights are attributes named as in the params layout."""

    def __init__(self, cfg: ModelConfig, lora: LoraConfig | None, *, std: float, rngs: nnx.Rngs,
                 fused: bool = False):
        """fused: the decode layout's projections (`model.decode_layout`), one kernel for q/k/v
        [K, G + 2, H, D] (per kv head: its G query heads, then k and v, so a split over kv heads
        keeps each group whole) and one for gate/up [2, F, D] (dense MLP only). At batch 1 a
        decode step is a chain of matrix-vector products, each paying a fixed launch cost: this
        makes 7 of them per layer 4. Every kernel is output-major (each output's weights
        contiguous; o_proj [D, N, H], down_proj [D, F]) and multiplies as the GEMM's M side
        (`layers.dense_output_major`): at 16-64 rows XLA CPU runs that form 1.1-1.4x faster
        than rows-as-M, and at batch 1 it streams q/k/v and down faster (85 vs 101 us, 118 vs
        160 us per product)."""
        if fused and lora is not None:
            raise ValueError("DecoderLayer: fused projections take no LoRA adapters (merge them first)")
        self.cfg, self.lora_cfg, self.fused = cfg, lora, fused
        dt = cfg.param_dtype
        D, N, K, H, F, E = (cfg.hidden_size, cfg.num_heads, cfg.num_kv_heads, cfg.head_dim,
                            cfg.intermediate_size, cfg.num_experts)

        kernel_axes = {}

        def kernel(shape, axes):
            param = nnx.Param(_normal(rngs, shape, dt, std), out_sharding=axes)
            kernel_axes[id(param)] = axes
            return param

        def const(shape, axes, value):
            return nnx.Param(jnp.full(shape, value, dt), out_sharding=axes)

        self.attn_norm = const((D,), ("norm",), 1.0)
        if fused:
            self.qkv_proj = kernel((K, N // K + 2, H, D), ("kv_heads", None, "head_dim", "embed"))
        else:
            self.q_proj = kernel((D, N, H), ("embed", "heads", "head_dim"))
            self.k_proj = kernel((D, K, H), ("embed", "kv_heads", "head_dim"))
            self.v_proj = kernel((D, K, H), ("embed", "kv_heads", "head_dim"))
        if fused:
            self.o_proj = kernel((D, N, H), ("embed", "heads", "head_dim"))
        else:
            self.o_proj = kernel((N, H, D), ("heads", "head_dim", "embed"))
        self.mlp_norm = const((D,), ("norm",), 1.0)
        if cfg.qkv_bias:
            self.q_bias = const((N, H), ("heads", "head_dim"), 0.0)
            self.k_bias = const((K, H), ("kv_heads", "head_dim"), 0.0)
            self.v_bias = const((K, H), ("kv_heads", "head_dim"), 0.0)
        if cfg.o_bias:
            self.o_bias = const((D,), ("norm",), 0.0)
        if cfg.qk_norm:
            self.q_norm = const((H,), ("head_dim",), 1.0)
            self.k_norm = const((H,), ("head_dim",), 1.0)
        if cfg.is_moe:
            self.router = kernel((D, E), ("embed", None))
            self.gate_proj = kernel((E, D, F), ("expert", "embed", "mlp"))
            self.up_proj = kernel((E, D, F), ("expert", "embed", "mlp"))
            self.down_proj = kernel((E, F, D), ("expert", "mlp", "embed"))
        else:
            if fused:
                self.gate_up_proj = kernel((2, F, D), (None, "mlp", "embed"))
            else:
                self.gate_proj = kernel((D, F), ("embed", "mlp"))
                self.up_proj = kernel((D, F), ("embed", "mlp"))
            self.down_proj = kernel((D, F), ("embed", "mlp")) if fused else kernel((F, D), ("mlp", "embed"))
        if lora is not None:
            _check_lora(cfg, lora)
            self.lora = nnx.Dict({
                t: LoRAAdapter(t, getattr(self, t).shape, kernel_axes[id(getattr(self, t))], lora.rank, dt, rngs)
                for t in lora.targets
            })

    def proj(self, name: str, x: jax.Array, rng: jax.Array | None) -> jax.Array:
        adapter = self.lora.get(name) if self.lora_cfg is not None else None
        r = None if rng is None else jax.random.fold_in(rng, TARGETS.index(name))
        return lora_apply(x, getattr(self, name)[...], name, adapter, self.lora_cfg, r)

    def __call__(self, x, window, cos, sin, mask: Callable, keys_values: Callable, attend: Callable, rng=None,
                 prefix: tuple[jax.Array, jax.Array, Callable, str] | None = None):
        """`keys_values(k, v)` returns the keys/values to attend to (the chunk's own [B, T, K, H],
        or the KV cache's layer [B, K, S, H], its keys [B, K, H, S] if stored transposed, after
        writing the chunk into it) and the updated cache; `attend(q, k, v, window)` attends to
        them (sage_jax.model.attention). `prefix`: this layer's shared prefix keys/values
        [P, K, Sp, H], its mask function and the layout of the layer's own keys
        (`Decoder.hidden_states`)."""
        cfg, dt = self.cfg, x.dtype
        h = L.rms_norm(x, self.attn_norm[...], cfg.rms_norm_eps)
        if self.fused:
            qkv = L.dense_output_major(h, self.qkv_proj[...])  # [B, T, K, G + 2, H]
            g = qkv.shape[3] - 2
            q, k, v = qkv[:, :, :, :g].reshape(*qkv.shape[:2], -1, qkv.shape[-1]), qkv[:, :, :, g], qkv[:, :, :, g + 1]
        else:
            q, k, v = self.proj("q_proj", h, rng), self.proj("k_proj", h, rng), self.proj("v_proj", h, rng)
        q = constrain(q, ("batch", "length", "heads", "head_dim"))  # no-ops without a mesh in context
        k = constrain(k, ("batch", "length", "kv_heads", "head_dim"))
        v = constrain(v, ("batch", "length", "kv_heads", "head_dim"))
        if cfg.qkv_bias:
            q, k, v = (q + self.q_bias[...].astype(dt), k + self.k_bias[...].astype(dt),
                       v + self.v_bias[...].astype(dt))
        if cfg.qk_norm:
            q = L.rms_norm(q, self.q_norm[...], cfg.rms_norm_eps)
            k = L.rms_norm(k, self.k_norm[...], cfg.rms_norm_eps)
        q, k = L.apply_rope(q, cos, sin), L.apply_rope(k, cos, sin)
        k_all, v_all, new_kv = keys_values(k, v)
        if prefix is None:
            attn = attend(q, k_all, v_all, window)
        else:
            pk, pv, pmask, kv_layout = prefix
            attn = L.prefix_attention(q, k_all, v_all, mask(window), pk, pv, pmask(window), kv_layout)
        if self.fused:
            out = L.dense_output_major(attn, self.o_proj[...], n_in=2)
        else:
            out = self.proj("o_proj", attn, rng)
        if cfg.o_bias:
            out = out + self.o_bias[...].astype(dt)
        x = x + out
        h = L.rms_norm(x, self.mlp_norm[...], cfg.rms_norm_eps)
        if cfg.is_moe:
            mlp = L.moe(cfg, h, self.router[...].astype(dt), self.gate_proj[...].astype(dt),
                        self.up_proj[...].astype(dt), self.down_proj[...].astype(dt))
        elif self.fused:
            mlp = L.swiglu_output_major(h, self.gate_up_proj[...], self.down_proj[...])
        elif self.lora_cfg is None or not any(t in self.lora_cfg.targets for t in ("gate_proj", "up_proj", "down_proj")):
            mlp = L.swiglu(h, self.gate_proj[...], self.up_proj[...], self.down_proj[...])
        else:
            mlp = self.proj("down_proj", jax.nn.silu(self.proj("gate_proj", h, rng)) * self.proj("up_proj", h, rng),
                            rng)
        return x + mlp, new_kv


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


def _write_layer(buf: jax.Array, chunk: jax.Array, layer: int | jax.Array | None, start: jax.Array,
                 transposed: bool = False) -> jax.Array:
    """buf [L, B, K, S, H] <- chunk [B, T, K, H] at (layer, b, :, start[b] + t); with layer None,
    buf is one layer's own buffer [B, K, S, H] (a per-layer cache, `split_cache`), or with
    `transposed` its keys [B, K, H, S].

    The whole cache is a loop carry updated in place by one scatter; writing only the new
    chunk (instead of re-stacking every layer's cache as scan outputs) keeps a decode step
    from copying the cache.
    """
    rows, slots = _slots(start, chunk.shape[1])
    if layer is None:
        # One index per (row, kv head, token). With one index per (row, token) a batch-1 step's
        # write becomes a dynamic-update-slice, which XLA CPU fuses twice (into the new cache
        # and into the attention's view of it), copying the layer's cache 4 times per step.
        heads = jnp.arange(chunk.shape[2], dtype=jnp.int32)[None, :, None]
        index = (rows[:, None], heads) + ((slice(None), slots[:, None]) if transposed else (slots[:, None],))
        return buf.at[index].set(chunk.swapaxes(1, 2).astype(buf.dtype), mode="drop")
    return buf.at[layer, rows, :, slots].set(chunk.astype(buf.dtype), mode="drop")


def split_cache(cache: Cache, transpose_keys: bool = False) -> Cache:
    """The cache with k/v as tuples of per-layer buffers [B, K, S, H] (for the decode layout's
    unrolled loop: a layer's attention then reads its own buffer, where a slice of the stacked
    [L, ...] array is copied out by XLA on CPU first, every layer of every step). A copy: make it
    once per decode loop, not per step. The inverse is `stack_cache`.

    transpose_keys: store the keys as [B, K, H, S] under "kt" (instead of "k"), whose scores
    are a multiply-reduce that XLA CPU runs faster at large batch (see `layers._cache_scores`)."""
    if is_per_layer(cache):
        return cache
    n = cache["k"].shape[0]
    keys = tuple(cache["k"][i].swapaxes(2, 3) if transpose_keys else cache["k"][i] for i in range(n))
    rest = {name: x for name, x in cache.items() if name != "k"}
    return {**rest, "kt" if transpose_keys else "k": keys, "v": tuple(cache["v"][i] for i in range(n))}


def stack_cache(cache: Cache, into: Cache | None = None) -> Cache:
    """The inverse of `split_cache` (as is for a stacked cache). into: the stacked cache it was
    split from, whose k/v buffers are overwritten layer by layer (in place when donated to the
    jit: a decode loop's end then allocates no new [L, ...] arrays, whose first touch of fresh
    pages made restacking a batch-64 SmolLM2 cache cost ~0.4 s)."""
    if not is_per_layer(cache):
        return cache
    keys = [x.swapaxes(2, 3) for x in cache["kt"]] if "kt" in cache else cache["k"]
    rest = {name: x for name, x in cache.items() if name not in ("k", "kt")}
    if into is None:
        return {**rest, "k": jnp.stack(keys), "v": jnp.stack(cache["v"])}
    k, v = into["k"], into["v"]
    for i, (ki, vi) in enumerate(zip(keys, cache["v"])):
        k, v = k.at[i].set(ki), v.at[i].set(vi)
    return {**rest, "k": k, "v": v}


def is_per_layer(cache: Cache) -> bool:
    """Whether a cache holds per-layer buffers (`split_cache`)."""
    return isinstance(cache["v"], tuple)


@functools.lru_cache(maxsize=16)
def fused_layer_def(cfg: ModelConfig) -> nnx.GraphDef:
    """The graph of one `DecoderLayer` with fused projections (the decode layout's layers)."""
    with jax.sharding.use_abstract_mesh(jax.sharding.AbstractMesh((), ())), nnx.use_eager_sharding(False):
        layer = nnx.eval_shape(lambda: DecoderLayer(cfg, None, std=0.0, rngs=nnx.Rngs(0), fused=True))
    return nnx.graphdef(layer)


class Decoder(nnx.Module):
    """Embedding, stacked decoder layers, final norm and LM head (tied or untied)."""

    def __init__(self, cfg: ModelConfig, lora: LoraConfig | None = None, *, std: float = 0.02,
                 rngs: nnx.Rngs):
        self.cfg = cfg
        dt = cfg.param_dtype
        self.embed = nnx.Param(_normal(rngs, (cfg.embed_rows, cfg.hidden_size), dt, std),
                               out_sharding=("vocab", "embed"))

        @nnx.split_rngs(splits=cfg.num_layers)
        @nnx.vmap(in_axes=(0,), out_axes=0, transform_metadata={nnx.PARTITION_NAME: "layers"})
        def stacked(rngs):
            return DecoderLayer(cfg, lora, std=std, rngs=rngs)

        self.layers = stacked(rngs)
        self.final_norm = nnx.Param(jnp.ones((cfg.hidden_size,), dt), out_sharding=("norm",))
        if not cfg.tie_word_embeddings:
            self.lm_head = nnx.Param(_normal(rngs, (cfg.hidden_size, cfg.embed_rows), dt, std),
                                     out_sharding=("embed", "vocab"))

    def hidden_states(self, tokens, positions=None, segment_ids=None, cache: Cache | None = None,
                      dropout_rng=None, prefix: Cache | None = None,
                      layers: tuple | None = None) -> tuple[jax.Array, Cache | None]:
        """The final-normed hidden states [B, T, D] and the updated cache (None without one).

        layers: the decode layout (`model.decode_layout`): one state per layer, each weight its own
        buffer, run by an unrolled loop; `self.layers` then only gives the layer's graph. A scan
        over stacked weights reads each layer's weights through a dynamic slice, which XLA on CPU
        copies: at batch 1 that doubles the bytes a decode step moves.

        prefix (only with a cache): a read-only shared prefix, k/v [L, P, K, Sp, H] (parent rows'
        cache arrays, or tuples of per-layer [P, K, Sp, H] from `split_cache`) and base [B] int32:
        row b (rows grouped parent-major, b's prefix row is b // (B // P)) attends to the first
        base[b] prefix slots and to its own cache, whose slot s holds position base[b] + s (the
        default RoPE positions). The prefix is not updated."""
        cfg = self.cfg
        dt = jnp.dtype(cfg.dtype)
        b, t = tokens.shape
        if segment_ids is None:
            segment_ids = jnp.ones((b, t), jnp.int32)
        segment_ids = segment_ids.astype(jnp.int32)
        if prefix is not None and cache is None:
            raise ValueError("forward: a shared prefix needs a cache (the rows' own slots after it)")
        base = None if prefix is None else prefix["base"].astype(jnp.int32)
        if cache is None:
            q_slots = jnp.broadcast_to(jnp.arange(t, dtype=jnp.int32), (b, t))
            k_slots, k_seg, start = q_slots, segment_ids, None
            if positions is None:
                positions = segment_positions(segment_ids)
        else:
            s = cache["segment_ids"].shape[1]
            if t > s:
                raise ValueError(f"forward: chunk of {t} tokens does not fit a KV cache of {s} slots")
            start = cache["end"]
            q_slots = start[:, None] + jnp.arange(t, dtype=jnp.int32)[None, :]
            k_seg = _write(cache["segment_ids"], segment_ids, start)
            k_slots = jnp.broadcast_to(jnp.arange(s, dtype=jnp.int32), (b, s))
            if positions is None:
                positions = q_slots if base is None else base[:, None] + q_slots
        cos, sin = L.rope_cos_sin(positions, L.rope_inv_freq(cfg.rope, cfg.head_dim))

        keys_t = cache is not None and "kt" in cache  # per-layer keys stored [B, K, H, S] (split_cache)
        kv_layout = "bkhs" if keys_t else "bksh"

        def mask(window):
            return L.attention_mask(q_slots, segment_ids, k_slots, k_seg, window)

        def attend(q, k, v, window):  # cfg.attention_impl; the kernels need the cache-free slots
            slots = {} if cache is None else dict(q_slots=q_slots, k_slots=k_slots, kv_layout=kv_layout)
            return A.dot_product_attention(q, k, v, q_seg=segment_ids, k_seg=k_seg, window=window,
                                           windows=cfg.layer_windows(), impl=cfg.attention_impl, **slots)

        def prefix_mask(window):
            slots = prefix["v"][0].shape[2] if is_per_layer(prefix) else prefix["v"].shape[3]
            return L.prefix_mask(q_slots, segment_ids, base, slots, window)

        x = constrain(jnp.take(self.embed[...], tokens, axis=0).astype(dt), ("batch", "length", None))
        windows = jnp.asarray(cfg.layer_windows(), jnp.int32)
        uniform_window = cfg.layer_windows()[0] if len(set(cfg.layer_windows())) == 1 else None
        kv = None if cache is None else (cache["kt" if keys_t else "k"], cache["v"])
        own_buffers = kv is not None and is_per_layer(cache)  # a per-layer cache (split_cache)
        if own_buffers and layers is None:
            raise ValueError("forward: a per-layer KV cache (split_cache) needs params in the decode layout")
        layer_def, layer_state = nnx.split(self.layers)
        if layers is not None:
            layer_def = fused_layer_def(cfg)

        def body(carry, xs):
            x, kv = carry
            state, window, i = xs
            if uniform_window is not None:  # a constant: masks are loop-invariant, not per-layer residuals
                window = jnp.int32(uniform_window)
            layer = nnx.merge(layer_def, state)
            rng = None if dropout_rng is None else jax.random.fold_in(dropout_rng, i)

            def keys_values(k, v):
                if kv is None:
                    return k, v, None
                if own_buffers:  # i is a Python int (the unrolled loop)
                    ck, cv = _write_layer(kv[0][i], k, None, start, keys_t), _write_layer(kv[1][i], v, None, start)
                    return ck.astype(dt), cv.astype(dt), tuple(b[:i] + (new,) + b[i + 1:] for b, new in zip(kv, (ck, cv)))
                ck, cv = _write_layer(kv[0], k, i, start), _write_layer(kv[1], v, i, start)
                return ck[i].astype(dt), cv[i].astype(dt), (ck, cv)

            shared = None if prefix is None else (prefix["k"][i].astype(dt), prefix["v"][i].astype(dt), prefix_mask,
                                                  kv_layout)
            return layer(x, window, cos, sin, mask, keys_values, attend, rng, shared), None

        if cfg.remat != "none":
            policy = {"full": None, "dots": jax.checkpoint_policies.dots_with_no_batch_dims_saveable}[cfg.remat]
            body = jax.checkpoint(body, policy=policy)
        if layers is None:
            layer_ids = jnp.arange(cfg.num_layers, dtype=jnp.int32)
            (x, new_kv), _ = jax.lax.scan(body, (x, kv), (layer_state, windows, layer_ids))
        else:
            if len(layers) != cfg.num_layers:
                raise ValueError(f"hidden_states: {len(layers)} per-layer states for {cfg.num_layers} layers")
            carry = (x, kv)
            for i, state in enumerate(layers):
                carry, _ = body(carry, (state, windows[i], i))
            x, new_kv = carry
        x = L.rms_norm(x, self.final_norm[...], cfg.rms_norm_eps)
        new_cache = None
        if cache is not None:
            new_cache = {
                "kt" if keys_t else "k": new_kv[0],
                "v": new_kv[1],
                "segment_ids": k_seg,
                "end": start + jnp.sum(segment_ids != 0, axis=1, dtype=jnp.int32),
            }
        return x, new_cache

    def logits(self, x: jax.Array, decode: bool = False) -> jax.Array:
        """Logits [..., vocab_size] from hidden states; vocabulary padding rows are dropped.
        decode: inference in the decode layout, where a tied embedding [V, D] is used as the
        output-major kernel it is (`layers.dense_output_major`)."""
        if decode and self.cfg.tie_word_embeddings:
            out = L.dense_output_major(x, self.embed[...])
        else:
            w = self.embed[...].T if self.cfg.tie_word_embeddings else self.lm_head[...]
            out = x @ w.astype(x.dtype)
        if self.cfg.embed_rows != self.cfg.vocab_size:
            out = out[..., : self.cfg.vocab_size]
        return constrain(out, ("batch", "length", "vocab")[:-1][: out.ndim - 1] + ("vocab",))

    def __call__(self, tokens, positions=None, segment_ids=None, cache: Cache | None = None,
                 dropout_rng=None, prefix: Cache | None = None, layers: tuple | None = None
                 ) -> tuple[jax.Array, Cache | None]:
        x, cache = self.hidden_states(tokens, positions, segment_ids, cache, dropout_rng, prefix, layers)
        return self.logits(x, decode=layers is not None), cache
