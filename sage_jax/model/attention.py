"""One attention entry point with fused kernels: cuDNN flash attention on GPU, Pallas splash
attention on TPU, the XLA einsum (`layers.attention`) everywhere.

`dot_product_attention(q, k, v, ...)` computes exactly `layers.attention(q, k, v,
layers.attention_mask(q_slots, q_seg, k_slots, k_seg, window))` (GQA; causal by slot, same segment,
sliding window) with the implementation `impl`:

- "xla": the einsum of `layers.attention` (the one copy of the math; the oracle of the others).
- "cudnn": `jax.nn.dot_product_attention(implementation="cudnn")`, GPU only, bf16/fp16 only (cuDNN
  rejects float32), head_dim a multiple of 8 and <= 128 (256 on Hopper). GQA is native. cuDNN
  takes a causal flag, a left window and per-row lengths, but no segment ids (its packed
  "offsets" layout is not exposed by `jax.nn`), so the segment mask is passed as `mask`, which
  jax turns into an additive bias [B, 1, T, S]: exact and fused, but the bias is read from memory
  and jax's cuDNN backward also writes its (unused) gradient. cuDNN's packed layout (per-segment
  offsets and lengths, no bias) would avoid both; it is only reachable through jax's private
  `jax._src.cudnn` API, so it is not used.
  Without a cache (slots are the row indices) causality and the window also go in as
  `is_causal` / `local_window_size`, so cuDNN skips the blocks they exclude; with a cache (query
  slots start at a per-row offset) the whole mask goes through the bias.
- "splash": `jax.experimental.pallas.ops.tpu.splash_attention`, TPU only, and only without a cache
  (its masks are static: causal / `LocalMask` by row index; segment ids go in as `SegmentIds`).
  GQA is native (the MHA kernel maps query head n to kv head n // G, as `layers.attention`).
  T is padded to a multiple of 128 (the kernel's lane width) with segment id -1, which no real
  token carries, and the padded rows are cut off; the block size is the largest of 512/256/128
  dividing the padded length. q is scaled by 1/sqrt(H) before the kernel (it does not scale).
- "splash_interpret": the same kernel in Pallas interpret mode, on any backend (slow; for tests).
- "jax_xla": `jax.nn.dot_product_attention(implementation="xla")` with exactly the arguments the
  "cudnn" path passes, so that path's plumbing runs (and is tested) on CPU.
- "auto": TPU -> "splash" without a cache (if this jax ships it); GPU -> "cudnn" without a cache
  when the dtype is bf16/fp16, head_dim a multiple of 8 and <= 128 and T even (cuDNN's rule for a
  bias in training); otherwise (CPU, any KV-cache step: prefill and decode, float32 on GPU) "xla".
  Decode (T=1 against S cache slots) stays on "xla": the kernels are built for long query blocks,
  and decode is bound by reading the cache anyway.

Under a mesh in context (`jax.set_mesh`) splash runs inside a shard_map (see `_splash`); cuDNN's
custom call carries its own partitioning rules in jax.

An explicitly requested implementation that cannot run here raises ValueError; nothing falls back.

The window: the model scans its layers, so a layer's window is a traced scalar, while the kernels
need it static. `windows` is the static set it is drawn from (`ModelConfig.layer_windows()`): one
value is used as is, several are dispatched with `lax.switch` (one kernel per distinct window).
"""

from __future__ import annotations

import functools
from typing import Sequence

import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import AxisType, PartitionSpec as P

from sage_jax.model import layers as L
from sage_jax.model.config import ATTENTION_IMPLS as IMPLS
from sage_jax.parallel.rules import logical_to_spec

try:  # an experimental module: a jax without it still runs every other implementation
    from jax.experimental.pallas.ops.tpu import splash_attention as splash
except ImportError as e:  # pragma: no cover - depends on the installed jax
    splash, _SPLASH_MISSING = None, f"{type(e).__name__}: {e}"
_LANES = 128  # splash pads T to a multiple of this (its block sizes are multiples of 128)
_PAD_SEGMENT = -1  # segment id of splash's padding rows: no real (>= 0) segment matches it


def dot_product_attention(
    q: jax.Array,
    k: jax.Array,
    v: jax.Array,
    *,
    q_seg: jax.Array,
    k_seg: jax.Array,
    window: int | jax.Array = 0,
    windows: Sequence[int] | None = None,
    q_slots: jax.Array | None = None,
    k_slots: jax.Array | None = None,
    impl: str = "auto",
    kv_layout: str = "bskh",
) -> jax.Array:
    """Masked GQA attention. q [B,T,N,H], k/v [B,S,K,H] -> [B,T,N,H] in v's dtype (k/v
    [B,K,S,H] with kv_layout="bksh": a KV cache's layer, which only the XLA einsum reads in place;
    "bkhs": its keys transposed, k [B,K,H,S]).

    q_seg [B,T] / k_seg [B,S]: segment ids (a query sees only keys of its segment; padding is
    segment 0). q_slots [B,T] / k_slots [B,S]: slot indices for causality and the window (a KV
    cache); None for both = self-attention over one packed row (slots 0..T-1, T == S), the only
    case the splash kernel covers. window: 0 = full attention, w > 0 = the last w slots; a Python
    int, or a traced scalar whose value is one of the static `windows`.
    """
    if impl not in IMPLS:
        raise ValueError(f"attention impl must be one of {IMPLS}, got {impl!r}")
    if (q_slots is None) != (k_slots is None):
        raise ValueError("dot_product_attention: pass both q_slots and k_slots, or neither")
    if kv_layout not in L.KV_LAYOUTS:
        raise ValueError(f"dot_product_attention: kv_layout must be one of {L.KV_LAYOUTS}, got {kv_layout!r}")
    b, t, n, h = q.shape
    s = k.shape[kv_layout.index("s")]
    aligned = q_slots is None
    if aligned and t != s:
        raise ValueError(f"dot_product_attention: without slots T must equal S, got T={t}, S={s}")
    impl = resolve_impl(impl, dtype=q.dtype, head_dim=h, seq_len=t, cached=not aligned)
    if impl == "xla" and not aligned:
        return L.attention(q, k, v, L.attention_mask(q_slots, q_seg, k_slots, k_seg, window), kv_layout)
    if kv_layout == "bksh":  # the kernels (and the blocked self-attention) take [B, S, K, H]
        k, v = k.swapaxes(1, 2), v.swapaxes(1, 2)
    elif kv_layout == "bkhs":
        k, v = k.transpose(0, 3, 1, 2), v.swapaxes(1, 2)
    if impl == "xla":
        return L.causal_self_attention(q, k, v, q_seg, k_seg, window)
    if impl in ("cudnn", "jax_xla"):
        fn = functools.partial(_jax_nn, q, k, v, q_seg, k_seg, q_slots, k_slots,
                               implementation="cudnn" if impl == "cudnn" else "xla")
    else:
        if not aligned:
            raise ValueError(f"attention impl {impl!r}: the splash kernel has no KV-cache path "
                             "(its masks are static by row index); use 'xla' or 'cudnn'")
        fn = functools.partial(_splash, q, k, v, q_seg, k_seg, interpret=impl == "splash_interpret")
    return _with_static_window(fn, window, windows)


def resolve_impl(impl: str, *, dtype, head_dim: int, seq_len: int, cached: bool) -> str:
    """The implementation `impl` stands for here ("auto" resolved); ValueError if it cannot run."""
    backend = jax.default_backend()
    fits_cudnn = (jnp.dtype(dtype) in (jnp.bfloat16, jnp.float16) and head_dim % 8 == 0 and head_dim <= 128
                  and seq_len % 2 == 0)
    if impl == "auto":
        if cached:
            return "xla"
        if backend == "tpu" and splash is not None:
            return "splash"
        if backend == "gpu" and fits_cudnn:
            return "cudnn"
        return "xla"
    if impl == "cudnn":
        if backend != "gpu":
            raise ValueError(f"attention impl 'cudnn' needs a GPU; the backend here is {backend!r} "
                             "(use 'auto', 'xla', or 'jax_xla' for the same arguments through XLA)")
        if jnp.dtype(dtype) not in (jnp.bfloat16, jnp.float16) or head_dim % 8:
            raise ValueError(f"attention impl 'cudnn' needs bf16/fp16 and head_dim % 8 == 0, got "
                             f"{jnp.dtype(dtype).name} and head_dim={head_dim}")
    if impl in ("splash", "splash_interpret") and splash is None:
        raise ValueError(f"attention impl {impl!r}: this jax has no Pallas splash attention ({_SPLASH_MISSING})")
    if impl == "splash" and backend != "tpu":
        raise ValueError(f"attention impl 'splash' needs a TPU; the backend here is {backend!r} "
                         "(use 'splash_interpret' to run the kernel in Pallas interpret mode)")
    return impl


def _with_static_window(fn, window, windows: Sequence[int] | None) -> jax.Array:
    """fn(w) with w the static value of `window` (see the module docstring)."""
    if isinstance(window, (int, np.integer)):
        return fn(int(window))
    choices = tuple(sorted({int(w) for w in windows})) if windows is not None else ()
    if not choices:
        raise ValueError("dot_product_attention: a traced window needs its static `windows` choices")
    if len(choices) == 1:
        return fn(choices[0])
    index = jnp.argmax(jnp.asarray(choices, jnp.int32) == window)
    return jax.lax.switch(index, [functools.partial(fn, w) for w in choices])


def _jax_nn(q, k, v, q_seg, k_seg, q_slots, k_slots, window: int, *, implementation: str) -> jax.Array:
    """`jax.nn.dot_product_attention` with the segment mask (and, with a cache, causality and the
    window by slot) as `mask`, and without a cache causality and the window as cuDNN's own flags."""
    same = q_seg[:, :, None] == k_seg[:, None, :]
    if q_slots is None:
        mask, is_causal = same, True
        local = (window - 1, 0) if window > 0 else None  # k >= q - (window - 1), as the mask's q - k < window
    else:
        mask, is_causal, local = L.attention_mask(q_slots, q_seg, k_slots, k_seg, window), False, None
    out = jax.nn.dot_product_attention(
        q, k, v, mask=mask[:, None, :, :], scale=q.shape[-1] ** -0.5, is_causal=is_causal,
        local_window_size=local, implementation=implementation)
    return out.astype(v.dtype)


def _splash(q, k, v, q_seg, k_seg, window: int, *, interpret: bool) -> jax.Array:
    """`_splash_local`, under a mesh in context (jax.set_mesh) inside a shard_map: a Pallas call
    is opaque to GSPMD, which would gather it onto every device. The batch is split as the `batch`
    rule says and the heads as `heads` / `kv_heads` (only when both split alike, so each shard keeps
    whole GQA groups); the length stays whole (the kernel sees entire rows)."""
    mesh = jax.sharding.get_abstract_mesh()
    if mesh.empty or any(t == AxisType.Manual for t in mesh.axis_types):
        return _splash_local(q, k, v, q_seg, k_seg, window, interpret=interpret)
    q_spec = logical_to_spec(("batch", None, "heads", None), q.shape, mesh)
    kv_spec = logical_to_spec(("batch", None, "kv_heads", None), k.shape, mesh)
    if q_spec[2] != kv_spec[2]:
        q_spec, kv_spec = P(q_spec[0], None, None, None), P(kv_spec[0], None, None, None)
    seg_spec = P(q_spec[0], None)
    body = functools.partial(_splash_local, window=window, interpret=interpret)
    return jax.shard_map(body, mesh=mesh, in_specs=(q_spec, kv_spec, kv_spec, seg_spec, seg_spec), out_specs=q_spec,
                         check_vma=False)(q, k, v, q_seg, k_seg)


def _splash_local(q, k, v, q_seg, k_seg, window: int, *, interpret: bool) -> jax.Array:
    """The splash kernel over [B,T,N,H] (vmapped over the batch), T padded to a multiple of 128."""
    b, t, n, h = q.shape
    tp = -(-t // _LANES) * _LANES
    block = next(bs for bs in (512, 256, 128) if tp % bs == 0)
    if tp != t:
        pad = ((0, 0), (0, tp - t), (0, 0), (0, 0))
        q, k, v = jnp.pad(q, pad), jnp.pad(k, pad), jnp.pad(v, pad)
        q_seg = jnp.pad(q_seg, ((0, 0), (0, tp - t)), constant_values=_PAD_SEGMENT)
        k_seg = jnp.pad(k_seg, ((0, 0), (0, tp - t)), constant_values=_PAD_SEGMENT)
    kernel = _splash_kernel(tp, n, window, block, interpret)
    q = (q * jnp.asarray(h**-0.5, q.dtype)).transpose(0, 2, 1, 3)  # [B, N, T, H]
    k, v = k.transpose(0, 2, 1, 3), v.transpose(0, 2, 1, 3)  # [B, K, S, H]

    def one_row(q, k, v, qs, ks):
        return kernel(q, k, v, segment_ids=splash.SegmentIds(q=qs, kv=ks))

    out = jax.vmap(one_row)(q, k, v, q_seg.astype(jnp.int32), k_seg.astype(jnp.int32))
    return out.transpose(0, 2, 1, 3)[:, :t].astype(v.dtype)


@functools.lru_cache(maxsize=64)
def _splash_kernel(t: int, heads: int, window: int, block: int, interpret: bool):
    """The splash kernel for a causal (window > 0: local) mask over T rows; built once per shape
    (building it analyses the mask block by block on the host)."""
    if window > 0:
        head_mask = splash.LocalMask((t, t), window_size=(window - 1, 0), offset=0)
    else:
        head_mask = splash.CausalMask((t, t))
    sizes = splash.BlockSizes(block_q=block, block_kv=block, block_kv_compute=block, block_q_dkv=block,
                              block_kv_dkv=block, block_kv_dkv_compute=block, block_q_dq=block,
                              block_kv_dq=block)
    with jax.ensure_compile_time_eval():  # its mask tables become concrete arrays, not tracers of
        # the trace that first asked for them (the cache outlives that trace)
        return splash.make_splash_mha(splash.MultiHeadMask([head_mask] * heads), block_sizes=sizes,
                                      head_shards=1, q_seq_shards=1, interpret=interpret)
