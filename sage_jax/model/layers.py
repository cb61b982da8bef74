"""The building blocks of the decoder, as pure functions of arrays.

Numerics follow Hugging Face `transformers` on purpose (RMSNorm in float32, rotate-half RoPE
with cos/sin computed in float32, softmax in float32) so logits match to float32 rounding.
Shapes: B batch, T query length, S key length, D hidden, N query heads, K kv heads,
G = N // K query heads per kv head, H head_dim, F mlp, E experts.
"""

from __future__ import annotations

import functools
import math

import jax
import jax.numpy as jnp
import numpy as np

from sage_jax.model.config import ModelConfig, RopeConfig
from sage_jax.model import moe as moe_lib


def _cpu_weight_grad(x2: jax.Array, dy2: jax.Array) -> jax.Array:
    # XLA CPU's dot (YNNPACK) wants the contraction dimension minor in both operands; left to
    # itself XLA transposes the output gradient inside its elementwise producer (SiLU', the
    # gate product), which reads every input with a stride: 14% of a SmolLM2 SFT step. One plain
    # transpose of the input, kept as its own buffer, costs ~2% instead. (x2 should be a stored
    # buffer: XLA fuses an elementwise producer into the transpose, reading its inputs strided.)
    return jax.lax.optimization_barrier(x2.T) @ dy2


def weight_grad(x2: jax.Array, dy2: jax.Array) -> jax.Array:
    """x2^T @ dy2 ([rows, in], [rows, out] -> [in, out]): a kernel's gradient."""
    return jax.lax.platform_dependent(x2, dy2, cpu=_cpu_weight_grad, default=lambda a, b: a.T @ b)


def _as_matrix(w: jax.Array, n_in: int, dtype) -> jax.Array:
    return w.astype(dtype).reshape(math.prod(w.shape[:n_in]), -1)


# The kernels go into the custom VJPs below as they are (no reshape or cast outside): a residual
# that is the scan's own per-layer input is then not copied into a stacked per-layer buffer.
@functools.partial(jax.custom_vjp, nondiff_argnums=(0,))
def _dense(n_in: int, x: jax.Array, w: jax.Array) -> jax.Array:
    return _dense_fwd(n_in, x, w)[0]


def _dense_fwd(n_in, x, w):
    w2 = _as_matrix(w, n_in, x.dtype)
    y = x.reshape(-1, w2.shape[0]) @ w2
    return y.reshape(x.shape[: x.ndim - n_in] + w.shape[n_in:]), (x, w)


def _dense_bwd(n_in, res, dy):
    x, w = res
    w2 = _as_matrix(w, n_in, x.dtype)
    x2, dy2 = x.reshape(-1, w2.shape[0]), dy.reshape(-1, w2.shape[1])
    return (dy2 @ w2.T).reshape(x.shape), weight_grad(x2, dy2).astype(w.dtype).reshape(w.shape)


_dense.defvjp(_dense_fwd, _dense_bwd)


def dense(x: jax.Array, w: jax.Array, n_in: int = 1) -> jax.Array:
    """x [..., *in] @ w [*in, *out] (the last n_in axes of x contracted with the first of w).

    Values are `jnp.tensordot`'s; the backward pass differs only in how the weight gradient is laid
    out on CPU (see `_cpu_weight_grad`). Unused weight gradients (frozen weights under LoRA)
    are removed by XLA as dead code."""
    ins = w.shape[:n_in]
    if x.shape[x.ndim - n_in:] != ins:
        raise ValueError(f"dense: input axes {x.shape[x.ndim - n_in:]} do not match the kernel's {ins}")
    return _dense(n_in, x, w)


def dense_output_major(x: jax.Array, w: jax.Array, n_in: int = 1) -> jax.Array:
    """x [..., *in] @ w [*out, *in]^T (the last n_in axes of both contracted): a kernel stored
    output-major, the decode layout's (inference only: no custom gradient).

    Computed as w @ x^T ([out, rows], the kernel as the GEMM's M side), then transposed back:
    with the rows as M, XLA CPU's GEMM splits 16-64 rows poorly (measured over 30 distinct
    weights, 64 rows: 135-143 vs 152-168 GFLOP/s; 16 rows 77-90 vs 75-114)."""
    ins = w.shape[w.ndim - n_in:]
    if x.shape[x.ndim - n_in:] != ins:
        raise ValueError(f"dense_output_major: input axes {x.shape[x.ndim - n_in:]} do not match the kernel's {ins}")
    yt = _feature_major(x.reshape(-1, math.prod(ins)), w)
    return _transposed_back(yt).reshape(x.shape[: x.ndim - n_in] + w.shape[: w.ndim - n_in])


def _feature_major(x2: jax.Array, w: jax.Array) -> jax.Array:
    """w [*out, *in] (the in axes flattening to d) times x2 [rows, d] transposed: [out, rows], the
    kernel as the GEMM's M side."""
    return jax.lax.dot_general(w.reshape(-1, x2.shape[1]).astype(x2.dtype), x2, (((1,), (1,)), ((), ())))


def _transposed_back(yt: jax.Array) -> jax.Array:
    # The barrier keeps XLA from folding this transpose into the product that made yt (which
    # restores the slow form, rows as M); with one row the transpose is free.
    if yt.shape[1] == 1:
        return yt.T
    return jax.lax.optimization_barrier(jax.lax.optimization_barrier(yt).T)


def swiglu_output_major(h: jax.Array, gate_up: jax.Array, down: jax.Array) -> jax.Array:
    """`swiglu` with the decode layout's output-major kernels, gate_up [2, F, D] and down [D, F]
    (inference only): computed feature-major, [2F, rows] then [D, rows], as `dense_output_major`,
    and transposed back once."""
    h2 = h.reshape(-1, h.shape[-1])
    gu = _feature_major(h2, gate_up).reshape(2, -1, h2.shape[0])
    a = jax.nn.silu(gu[0]) * gu[1]  # [F, rows]
    return _transposed_back(down.astype(h.dtype) @ a).reshape(h.shape)


@jax.custom_vjp
def _swiglu(h, wg, wu, wd):
    return _swiglu_fwd(h, wg, wu, wd)[0]


def _swiglu_fwd(h, wg, wu, wd):
    dt = h.dtype
    h2 = h.reshape(-1, h.shape[-1])
    g, u = h2 @ wg.astype(dt), h2 @ wu.astype(dt)
    a = jax.nn.silu(g) * u
    return (a @ wd.astype(dt)).reshape(h.shape[:-1] + wd.shape[-1:]), (h, wg, wu, wd, g, u, a)


def _swiglu_bwd(res, dy):
    h, wg, wu, wd, g, u, a = res
    dt = h.dtype
    h2, dy2 = h.reshape(-1, h.shape[-1]), dy.reshape(-1, dy.shape[-1])
    sg = jax.nn.sigmoid(g)
    da = dy2 @ wd.astype(dt).T
    dg = da * u * sg * (1 + g * (1 - sg))
    du = da * g * sg
    dh = dg @ wg.astype(dt).T + du @ wu.astype(dt).T
    return (dh.reshape(h.shape), weight_grad(h2, dg).astype(wg.dtype), weight_grad(h2, du).astype(wu.dtype),
            weight_grad(a, dy2).astype(wd.dtype))


_swiglu.defvjp(_swiglu_fwd, _swiglu_bwd)


def swiglu(h: jax.Array, gate: jax.Array, up: jax.Array, down: jax.Array) -> jax.Array:
    """The gated MLP down(silu(h @ gate) * (h @ up)), h [..., D], gate/up [D, F], down [F, D].

    Its backward pass keeps h, the two projections and their gated product (autodiff of the
    composition saves every intermediate, each a [rows, F] buffer per layer of the scan) and
    recomputes the rest."""
    return _swiglu(h, gate, up, down)


def rms_norm(x: jax.Array, weight: jax.Array, eps: float) -> jax.Array:
    x32 = x.astype(jnp.float32)
    x32 = x32 * jax.lax.rsqrt(jnp.mean(x32 * x32, axis=-1, keepdims=True) + eps)
    return weight.astype(x.dtype) * x32.astype(x.dtype)


def rope_inv_freq(rope: RopeConfig, head_dim: int) -> np.ndarray:
    """Inverse frequencies [H/2] (static), with linear or llama3 scaling as in transformers."""
    exponent = np.arange(0, head_dim, 2, dtype=np.int64).astype(np.float32) / np.float32(head_dim)
    inv_freq = (1.0 / (np.float32(rope.theta) ** exponent)).astype(np.float32)
    if rope.type == "linear":
        return (inv_freq / np.float32(rope.factor)).astype(np.float32)
    if rope.type == "llama3":
        old = rope.original_max_position_embeddings
        low_wavelen = old / rope.low_freq_factor
        high_wavelen = old / rope.high_freq_factor
        wavelen = 2 * math.pi / inv_freq
        scaled = np.where(wavelen > low_wavelen, inv_freq / rope.factor, inv_freq)
        smooth = (old / wavelen - rope.low_freq_factor) / (rope.high_freq_factor - rope.low_freq_factor)
        smoothed = (1 - smooth) * scaled / rope.factor + smooth * scaled
        medium = ~(wavelen < high_wavelen) & ~(wavelen > low_wavelen)
        return np.where(medium, smoothed, scaled).astype(np.float32)
    return inv_freq


def rope_cos_sin(positions: jax.Array, inv_freq: np.ndarray) -> tuple[jax.Array, jax.Array]:
    """cos, sin [B, T, H] in float32 for integer positions [B, T]."""
    freqs = positions.astype(jnp.float32)[..., None] * jnp.asarray(inv_freq)[None, None, :]
    emb = jnp.concatenate([freqs, freqs], axis=-1)
    return jnp.cos(emb), jnp.sin(emb)


def apply_rope(x: jax.Array, cos: jax.Array, sin: jax.Array) -> jax.Array:
    """Rotate-half RoPE (the HF layout) on x [B, T, heads, H]."""
    cos = cos[:, :, None, :].astype(x.dtype)
    sin = sin[:, :, None, :].astype(x.dtype)
    half = x.shape[-1] // 2
    rotated = jnp.concatenate([-x[..., half:], x[..., :half]], axis=-1)
    return x * cos + rotated * sin


def attention_mask(
    q_slots: jax.Array, q_seg: jax.Array, k_slots: jax.Array, k_seg: jax.Array, window: jax.Array
) -> jax.Array:
    """[B, T, S] bool: causal, same segment (packing), and inside the sliding window if window > 0.

    Slots are indices in the row's buffer (the KV cache, or the packed row), so causality and the
    window never depend on the (per-segment) RoPE positions.
    """
    q = q_slots[:, :, None]
    k = k_slots[:, None, :]
    mask = (k <= q) & (q_seg[:, :, None] == k_seg[:, None, :])
    return mask & ((window <= 0) | (q - k < window))


# Keys/values come as [B, S, K, H] (a packed row's own projections) or, from a KV cache, kv heads
# first: [B, K, S, H] (`model.init_cache`), so the per-(row, kv head) score and value products
# read the cache as it lies; [B, S, K, H] would be transposed every step (at batch 64 that copy
# cost as much as the products themselves). "bkhs": a per-layer cache whose keys are stored
# transposed, k [B, K, H, S] (`model.split_cache(transpose_keys=True)`), v still [B, K, S, H].
KV_LAYOUTS = ("bskh", "bksh", "bkhs")


def _v_layout(kv: str) -> str:
    return "bksh" if kv == "bkhs" else kv


def _cache_scores(q: jax.Array, k: jax.Array, kv: str = "bksh") -> jax.Array:
    """Raw scores [B,K,G,T,S] in float32 from q [B,T,K,G,H] and a cache layer k [B,K,S,H]: per
    (row, kv head) k [S, H] @ q^T [H, G*T] (as q @ k^T, XLA CPU's dot is 2x slower).

    With keys stored transposed (kv "bkhs", k [B,K,H,S]) the sum over H is a multiply-reduce
    along the keys' outer axis, each step a contiguous row of S: at batch 64 XLA CPU runs it in
    0.7 ms per layer (S=128; 3.2 ms at S=512), where the per-(row, kv head) products of the
    [B,K,S,H] cache take 1.7 ms (9.5 ms). With few rows it has too little to split over threads
    (batch 1: 0.13 vs 0.02 ms), which is why only large batches store their keys so."""
    b, kk = k.shape[:2]
    h, s = (k.shape[2], k.shape[3]) if kv == "bkhs" else (k.shape[3], k.shape[2])
    qt = q.transpose(0, 2, 3, 1, 4).reshape(b, kk, -1, h)  # [B, K, G*T, H]
    if kv == "bkhs":
        st = jnp.sum(k[:, :, None].astype(jnp.float32) * qt[..., None].astype(jnp.float32), axis=3)
        return st.reshape(b, kk, q.shape[3], q.shape[1], s)
    st = jax.lax.dot_general(k, qt, (((3,), (3,)), ((0, 1), (0, 1))), preferred_element_type=jnp.float32)
    return st.swapaxes(2, 3).reshape(b, kk, q.shape[3], q.shape[1], s)


def _scores(q: jax.Array, k: jax.Array, mask: jax.Array, kv: str = "bskh") -> jax.Array:
    """Masked, scaled scores [B,K,G,T,S] in float32 from q [B,T,K,G,H], k in layout `kv`."""
    if kv in ("bksh", "bkhs"):
        scores = _cache_scores(q, k, kv)
    else:
        scores = jnp.einsum(f"btkgh,{kv}->bkgts", q, k, preferred_element_type=jnp.float32)
    scores = scores * (q.shape[-1] ** -0.5)
    return jnp.where(mask[:, None, None, :, :], scores, jnp.finfo(jnp.float32).min)


def _weighted_values(probs: jax.Array, v: jax.Array, kv: str) -> jax.Array:
    """sum_s probs [B,K,G,T,S] * v -> [B,T,K,G,H] in v's dtype."""
    kv = _v_layout(kv)
    if kv == "bksh":  # per (row, kv head): probs [G*T, S] @ v [S, H], the query rows as M
        b, kk, g, t, s = probs.shape
        out = jax.lax.dot_general(probs.reshape(b, kk, g * t, s), v, (((3,), (2,)), ((0, 1), (0, 1))))
        return out.reshape(b, kk, g, t, -1).transpose(0, 3, 1, 2, 4).astype(v.dtype)
    return jnp.einsum(f"bkgts,{kv}->btkgh", probs, v)


@functools.partial(jax.custom_vjp, nondiff_argnums=(0,))
def _gqa(kv: str, q: jax.Array, k: jax.Array, v: jax.Array, mask: jax.Array) -> jax.Array:
    return _gqa_fwd(kv, q, k, v, mask)[0]  # without a gradient XLA drops the unused log-sum-exp


def _gqa_fwd(kv, q, k, v, mask):
    scores = _scores(q, k, mask, kv)
    peak = jnp.max(scores, axis=-1, keepdims=True)
    e = jnp.exp(scores - peak)
    total = jnp.sum(e, axis=-1, keepdims=True)
    out = _weighted_values((e / total).astype(v.dtype), v, kv)
    return out, (q, k, v, mask, out, peak + jnp.log(total))


def _gqa_bwd(kv, res, d_out):
    # FlashAttention's backward without tiling: the probabilities are recomputed from q, k and the
    # log-sum-exp instead of being kept per layer ([B, N, T, S] for every layer of the scan).
    q, k, v, mask, out, lse = res
    probs = jnp.exp(_scores(q, k, mask, kv) - lse)
    d_v = jnp.einsum(f"bkgts,btkgh->{_v_layout(kv)}", probs.astype(v.dtype), d_out).astype(v.dtype)
    d_probs = jnp.einsum(f"btkgh,{_v_layout(kv)}->bkgts", d_out, v, preferred_element_type=jnp.float32)
    rowdot = jnp.einsum("btkgh,btkgh->bkgt", d_out.astype(jnp.float32), out.astype(jnp.float32))
    d_scores = probs * (d_probs - rowdot[..., None]) * (q.shape[-1] ** -0.5)
    # [B,K,G,T,H] then one small transpose: asked for [B,T,K,G,H] directly, XLA CPU transposes the
    # [B,K,G,T,S] d_scores instead (fused into their elementwise producer: 2% of an SFT step).
    d_q = jnp.einsum(f"bkgts,{kv}->bkgth", d_scores, k.astype(jnp.float32)).transpose(0, 3, 1, 2, 4).astype(q.dtype)
    d_k = jnp.einsum(f"bkgts,btkgh->{kv}", d_scores, q.astype(jnp.float32)).astype(k.dtype)
    return d_q, d_k, d_v, None


_gqa.defvjp(_gqa_fwd, _gqa_bwd)


def attention(q: jax.Array, k: jax.Array, v: jax.Array, mask: jax.Array, kv_layout: str = "bskh") -> jax.Array:
    """Grouped-query attention. q [B,T,N,H], k/v [B,S,K,H] ("bskh") or [B,K,S,H] ("bksh", a KV
    cache's layer; "bkhs": its keys transposed, k [B,K,H,S]), mask [B,T,S] -> [B,T,N,H].

    The backward pass keeps q, k, v, the output and the log-sum-exp, not the probabilities."""
    if kv_layout not in KV_LAYOUTS:
        raise ValueError(f"attention: kv_layout must be one of {KV_LAYOUTS}, got {kv_layout!r}")
    b, t, n, h = q.shape
    kv = k.shape[kv_layout.index("k")]
    out = _gqa(kv_layout, q.reshape(b, t, kv, n // kv, h), k, v, mask)
    return out.reshape(b, t, n, h)


def causal_self_attention(q: jax.Array, k: jax.Array, v: jax.Array, q_seg: jax.Array, k_seg: jax.Array,
                          window: jax.Array, block: int = 128) -> jax.Array:
    """`attention` over one packed row (query and key slots 0..T-1, segments [B, T]), by query
    blocks: block i attends only to key blocks 0..i, since the causal mask hides the rest; for n
    blocks that is (n + 1) / 2n of the [T, T] scores (3/4 at T = 2 blocks). Equal to the full
    computation: the skipped keys would get exactly zero weight."""
    b, t = q_seg.shape
    slots = jnp.broadcast_to(jnp.arange(t, dtype=jnp.int32), (b, t))
    n = t // block if t % block == 0 else 1
    if n <= 1:
        return attention(q, k, v, attention_mask(slots, q_seg, slots, k_seg, window))
    outs = []
    for i in range(n):
        lo, hi = i * block, (i + 1) * block
        mask = attention_mask(slots[:, lo:hi], q_seg[:, lo:hi], slots[:, :hi], k_seg[:, :hi], window)
        outs.append(attention(q[:, lo:hi], k[:, :hi], v[:, :hi], mask))
    return jnp.concatenate(outs, axis=1)


def prefix_mask(q_slots: jax.Array, q_seg: jax.Array, base: jax.Array, sp: int, window: jax.Array) -> jax.Array:
    """[B, T, Sp] bool: which slots of a shared prefix each query attends to (see `prefix_attention`).

    Row b shares the first base[b] prefix slots (slot p holds position p) and its own slot s holds
    position base[b] + s, so the window is measured in positions. The prefix is one segment (id 1,
    what a cache's real tokens carry): a padding query (segment 0) attends to none of it, as on a
    cache holding a copy of the prefix.
    """
    p = jnp.arange(sp, dtype=jnp.int32)[None, None, :]
    q_pos = (base[:, None] + q_slots)[:, :, None]
    mask = (p < base[:, None, None]) & (q_seg[:, :, None] == 1)
    return mask & ((window <= 0) | (q_pos - p < window))


def prefix_attention(q: jax.Array, k: jax.Array, v: jax.Array, mask: jax.Array, pk: jax.Array, pv: jax.Array,
                     pmask: jax.Array, kv_layout: str = "bksh") -> jax.Array:
    """Grouped-query attention over a shared prefix and each row's own keys (cascade attention).

    q [B,T,N,H]; own k/v [B,K,S,H] (k [B,K,H,S] with kv_layout "bkhs") with mask [B,T,S];
    prefix pk/pv [P,K,Sp,H] with pmask [B,T,Sp] (both KV-cache layers: kv heads first), shared
    by G = B // P consecutive rows (row b's prefix row is b // G). The prefix scores come from one
    grouped einsum per prefix row, so the prefix is read once for its G rows and never copied per
    row; one softmax over both key sets, then the two value sums are added (in f32).
    """
    b, t, n, h = q.shape
    p, kv, sp, _ = pk.shape
    g, m = b // p, n // kv
    q = q.reshape(b, t, kv, m, h)
    own = _cache_scores(q, k, kv_layout)
    shared = jnp.einsum("pctkgh,pksh->pckgts", q.reshape(p, g, t, kv, m, h), pk,
                        preferred_element_type=jnp.float32).reshape(b, kv, m, t, sp)
    scores = jnp.concatenate([shared, own], axis=-1) * (h**-0.5)
    full_mask = jnp.concatenate([pmask, mask], axis=-1)
    scores = jnp.where(full_mask[:, None, None, :, :], scores, jnp.finfo(jnp.float32).min)
    probs = jax.nn.softmax(scores, axis=-1).astype(v.dtype)
    out_shared = jnp.einsum("pckgts,pksh->pctkgh", probs[..., :sp].reshape(p, g, kv, m, t, sp), pv,
                            preferred_element_type=jnp.float32).reshape(b, t, kv, m, h)
    out_own = jnp.einsum("bkgts,bksh->btkgh", probs[..., sp:], v, preferred_element_type=jnp.float32)
    return (out_shared + out_own).astype(v.dtype).reshape(b, t, n, h)


def moe(cfg: ModelConfig, x: jax.Array, router: jax.Array, gate: jax.Array, up: jax.Array, down: jax.Array) -> jax.Array:
    """Mixtral top-k MoE [B, T, D] -> [B, T, D], computed by `cfg.moe_dispatch` (see model.moe:
    dense combine, grouped matmul, or padded expert blocks; all exact)."""
    return moe_lib.moe(x, router, gate, up, down, k=cfg.num_experts_per_tok, dispatch=cfg.moe_dispatch)
