"""The attention entry point (sage_jax.model.attention): every implementation that runs on CPU
equals the XLA einsum (`layers.attention`, the oracle) in values and gradients, with GQA, packed
segments (padding segment 0), a sliding window, float32 and bfloat16; the model with
`attention_impl` set equals the default; kernels that cannot run here raise.

On CPU: "jax_xla" is `jax.nn.dot_product_attention(implementation="xla")` fed exactly what the
"cudnn" path feeds cuDNN (so that plumbing is checked here); "splash_interpret" is the TPU splash
kernel in Pallas interpret mode (T=40 also checks its padding to 128)."""

import dataclasses
import json

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from sage_jax import model, parallel
from sage_jax.model import attention as A
from sage_jax.model.loader import model_config_from_dict
from tests.test_model_cache_packing import tiny

FUSED = ("jax_xla", "splash_interpret")
# float32: rounding of a different summation order; bfloat16: q/k/v/probs rounded to bf16 at
# different points (splash scales q in bf16, jax.nn rounds probs before the value sum).
TOL = {"float32": 2e-5, "bfloat16": 3e-2}


def _inputs(dtype, b=2, t=40, n=4, kv=2, h=16, seed=0):
    rng = np.random.default_rng(seed)
    q, k, v, cot = (jnp.asarray(rng.normal(size=shape), dtype)
                    for shape in ((b, t, n, h), (b, t, kv, h), (b, t, kv, h), (b, t, n, h)))
    # row 0: three segments then padding (segment 0); row 1: two segments, no padding
    seg = np.zeros((b, t), np.int32)
    seg[0, :12], seg[0, 12:19], seg[0, 19:33] = 1, 2, 3
    seg[1, :25], seg[1, 25:] = 1, 2
    return q, k, v, cot, jnp.asarray(seg)


def _value_and_grads(impl, q, k, v, cot, seg, window, **kw):
    def f(q, k, v):
        out = A.dot_product_attention(q, k, v, q_seg=seg, k_seg=seg, window=window, impl=impl, **kw)
        return jnp.sum(out.astype(jnp.float32) * cot.astype(jnp.float32)), out

    (_, out), grads = jax.value_and_grad(f, argnums=(0, 1, 2), has_aux=True)(q, k, v)
    return out, grads


def _close(a, b, tol):
    a, b = np.asarray(a, np.float32), np.asarray(b, np.float32)
    np.testing.assert_allclose(a, b, atol=tol * max(1.0, float(np.abs(b).max())), rtol=0)


@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
@pytest.mark.parametrize("window", [0, 7])
@pytest.mark.parametrize("impl", FUSED)
def test_fused_equals_xla_values_and_grads(impl, window, dtype):
    q, k, v, cot, seg = _inputs(dtype)
    ref, ref_grads = _value_and_grads("xla", q, k, v, cot, seg, window)
    out, grads = _value_and_grads(impl, q, k, v, cot, seg, window)
    assert out.shape == ref.shape and out.dtype == ref.dtype
    _close(out, ref, TOL[dtype])
    for g, rg in zip(grads, ref_grads):
        _close(g, rg, TOL[dtype])


def _plain_attention(q, k, v, mask):
    """Softmax attention written out, differentiated by autodiff (the oracle for the custom VJP)."""
    b, t, n, h = q.shape
    kv = k.shape[2]
    qg = q.reshape(b, t, kv, n // kv, h).astype(jnp.float32)
    scores = jnp.einsum("btkgh,bskh->bkgts", qg, k.astype(jnp.float32)) * h**-0.5
    scores = jnp.where(mask[:, None, None], scores, jnp.finfo(jnp.float32).min)
    out = jnp.einsum("bkgts,bskh->btkgh", jax.nn.softmax(scores, -1), v.astype(jnp.float32))
    return out.reshape(b, t, n, h).astype(v.dtype)


@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
@pytest.mark.parametrize("window", [0, 7])
@pytest.mark.parametrize("block", [8, 128])  # 5 query blocks of 8 (the causal skip), and one block
def test_xla_attention_equals_plain_softmax_in_values_and_grads(window, dtype, block):
    """`layers.causal_self_attention` (query blocks skip causally hidden keys) and the hand-written
    backward of `layers.attention` (probabilities recomputed from the log-sum-exp) equal autodiff
    of the written-out softmax."""
    from sage_jax.model import layers as L

    q, k, v, cot, seg = _inputs(dtype)
    slots = jnp.broadcast_to(jnp.arange(seg.shape[1]), seg.shape)
    mask = L.attention_mask(slots, seg, slots, seg, jnp.int32(window))

    def run(fn):
        f = lambda q, k, v: jnp.sum(fn(q, k, v).astype(jnp.float32) * cot.astype(jnp.float32))  # noqa: E731
        return jax.jit(jax.value_and_grad(f, argnums=(0, 1, 2)))(q, k, v)

    ref = run(lambda q, k, v: _plain_attention(q, k, v, mask))
    ours = run(lambda q, k, v: L.causal_self_attention(q, k, v, seg, seg, jnp.int32(window), block=block))
    for a, b in zip(jax.tree.leaves(ours), jax.tree.leaves(ref)):
        _close(a, b, TOL[dtype])


@pytest.mark.parametrize("t", [1, 6])  # a decode step, and a chunk prefilled into a cache
@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
def test_kv_cache_layout_equals_plain_softmax_in_values_and_grads(t, dtype):
    """Keys/values as a KV cache's layer ([B, K, S, H], `kv_layout="bksh"`: read in place) give
    the [B, S, K, H] einsum's attention, and the hand-written backward autodiff's gradients."""
    from sage_jax.model import layers as L

    q, k, v, cot, seg = _inputs(dtype)
    q, cot = q[:, -t:], cot[:, -t:]
    s = seg.shape[1]
    slots = jnp.broadcast_to(jnp.arange(s), seg.shape)
    mask = L.attention_mask(slots[:, -t:], seg[:, -t:], slots, seg, jnp.int32(9))

    def run(fn):
        f = lambda q, k, v: jnp.sum(fn(q, k, v).astype(jnp.float32) * cot.astype(jnp.float32))  # noqa: E731
        return jax.jit(jax.value_and_grad(f, argnums=(0, 1, 2)))(q, k, v)

    ref = run(lambda q, k, v: _plain_attention(q, k, v, mask))
    ours = run(lambda q, k, v: L.attention(q, k.swapaxes(1, 2), v.swapaxes(1, 2), mask, kv_layout="bksh"))
    for a, b in zip(jax.tree.leaves(ours), jax.tree.leaves(ref)):
        _close(a, b, TOL[dtype])
    entry = A.dot_product_attention(q, k.swapaxes(1, 2), v.swapaxes(1, 2), q_seg=seg[:, -t:], k_seg=seg, window=9,
                                    q_slots=slots[:, -t:], k_slots=slots, impl="jax_xla", kv_layout="bksh")
    _close(entry, _plain_attention(q, k, v, mask), TOL[dtype])


def test_the_oracle_sees_the_masks():
    """Guards the comparisons above: segments, window and GQA grouping each change the output."""
    q, k, v, _, seg = _inputs("float32")
    base = A.dot_product_attention(q, k, v, q_seg=seg, k_seg=seg, window=7, impl="xla")
    one_segment = jnp.where(seg > 0, 1, 0)
    for other in (A.dot_product_attention(q, k, v, q_seg=one_segment, k_seg=one_segment, window=7, impl="xla"),
                  A.dot_product_attention(q, k, v, q_seg=seg, k_seg=seg, window=0, impl="xla"),
                  A.dot_product_attention(q, k[:, :, ::-1], v[:, :, ::-1], q_seg=seg, k_seg=seg, window=7,
                                          impl="xla")):
        assert float(jnp.abs(other - base).max()) > 1e-2


@pytest.mark.parametrize("impl", FUSED)
def test_traced_window_dispatches_over_the_static_choices(impl):
    """In the model the window is a scanned (traced) per-layer value; the kernels get it static
    through `windows` (lax.switch over the distinct values)."""
    q, k, v, _, seg = _inputs("float32", t=24)
    f = jax.jit(lambda w: A.dot_product_attention(q, k, v, q_seg=seg, k_seg=seg, window=w, windows=(0, 5, 0),
                                                  impl=impl))
    for w in (0, 5):
        ref = A.dot_product_attention(q, k, v, q_seg=seg, k_seg=seg, window=w, impl="xla")
        _close(f(jnp.int32(w)), ref, TOL["float32"])
    with pytest.raises(ValueError, match="static `windows`"):
        jax.jit(lambda w: A.dot_product_attention(q, k, v, q_seg=seg, k_seg=seg, window=w, impl=impl))(jnp.int32(5))


def test_cache_slots_through_the_cudnn_arguments():
    """With a KV cache (T new tokens at a per-row offset into S slots) the cuDNN path passes the
    whole mask; splash has no cache path and says so."""
    rng = np.random.default_rng(4)
    b, t, s, n, kv, h = 2, 3, 12, 4, 2, 16
    q = jnp.asarray(rng.normal(size=(b, t, n, h)), jnp.float32)
    k, v = (jnp.asarray(rng.normal(size=(b, s, kv, h)), jnp.float32) for _ in range(2))
    start = jnp.asarray([4, 9])
    q_slots = start[:, None] + jnp.arange(t)[None]
    k_slots = jnp.broadcast_to(jnp.arange(s), (b, s))
    q_seg = jnp.asarray([[1, 1, 0], [2, 2, 2]])
    k_seg = jnp.asarray([[1] * 6 + [0] * 6, [1] * 9 + [2] * 3])
    kw = dict(q_seg=q_seg, k_seg=k_seg, q_slots=q_slots, k_slots=k_slots)
    for window in (0, 3):
        ref = A.dot_product_attention(q, k, v, window=window, impl="xla", **kw)
        _close(A.dot_product_attention(q, k, v, window=window, impl="jax_xla", **kw), ref, TOL["float32"])
    with pytest.raises(ValueError, match="no KV-cache path"):
        A.dot_product_attention(q, k, v, window=0, impl="splash_interpret", **kw)


@pytest.mark.skipif(jax.default_backend() != "cpu", reason="checks what cannot run on the CPU backend")
def test_kernels_that_cannot_run_here_raise():
    q, k, v, _, seg = _inputs("bfloat16", t=8)
    for impl, msg in (("cudnn", "needs a GPU"), ("splash", "needs a TPU")):
        with pytest.raises(ValueError, match=msg):
            A.dot_product_attention(q, k, v, q_seg=seg, k_seg=seg, impl=impl)
    with pytest.raises(ValueError, match="must be one of"):
        A.dot_product_attention(q, k, v, q_seg=seg, k_seg=seg, impl="flash")
    with pytest.raises(ValueError, match="attention_impl"):
        model.ModelConfig(attention_impl="flash")


def test_auto_rule(monkeypatch):
    """The documented `auto` rule, per backend (the backend query is stubbed: only the choice is
    checked here; the kernels themselves run above or on their hardware)."""
    cases = [  # backend, dtype, head_dim, T, cached -> impl
        ("cpu", jnp.bfloat16, 64, 256, False, "xla"),
        ("tpu", jnp.float32, 64, 100, False, "splash"),
        ("tpu", jnp.bfloat16, 64, 256, True, "xla"),
        ("gpu", jnp.bfloat16, 128, 256, False, "cudnn"),
        ("gpu", jnp.float32, 128, 256, False, "xla"),
        ("gpu", jnp.bfloat16, 12, 256, False, "xla"),
        ("gpu", jnp.bfloat16, 128, 255, False, "xla"),
        ("gpu", jnp.bfloat16, 128, 256, True, "xla"),
    ]
    for backend, dtype, head_dim, t, cached, want in cases:
        monkeypatch.setattr(A.jax, "default_backend", lambda b=backend: b)
        got = A.resolve_impl("auto", dtype=dtype, head_dim=head_dim, seq_len=t, cached=cached)
        assert got == want, (backend, dtype, head_dim, t, cached)
    monkeypatch.setattr(A.jax, "default_backend", lambda: "gpu")
    with pytest.raises(ValueError, match="bf16/fp16"):
        A.resolve_impl("cudnn", dtype=jnp.float32, head_dim=64, seq_len=8, cached=False)


@pytest.mark.parametrize("impl", FUSED)
def test_model_forward_and_grads_with_attention_impl_equal_default(impl):
    """A packed batch (three segments and padding) through a model whose layers mix full and
    sliding attention (so the traced window goes through lax.switch): logits and parameter
    gradients equal the default (XLA on CPU)."""
    cfg, params = tiny("qwen2", sliding_window=5, layer_types=("sliding_attention", "full_attention"))
    assert cfg.layer_windows() == (5, 0)
    rng = np.random.default_rng(5)
    tokens = rng.integers(0, cfg.vocab_size, size=(2, 20), dtype=np.int32)
    seg = np.array([[1] * 8 + [2] * 6 + [3] * 4 + [0] * 2, [1] * 11 + [2] * 9], np.int32)
    cot = jnp.asarray(rng.normal(size=(2, 20, cfg.vocab_size)), jnp.float32)

    def run(c):
        def loss(p):
            logits, _ = model.forward(c, p, tokens, segment_ids=seg)
            return jnp.sum(logits * cot), logits
        (_, logits), grads = jax.value_and_grad(loss, has_aux=True)(params)
        return logits, grads

    ref, ref_grads = run(cfg)
    out, grads = run(cfg.replace(attention_impl=impl))
    _close(out, ref, TOL["float32"])
    jax.tree.map(lambda g, rg: _close(g, rg, 5e-5), grads, ref_grads)


def test_model_with_cache_on_jax_xla_equals_default():
    """Prefill into a KV cache then decode: the cache path through the cuDNN arguments."""
    cfg, params = tiny("mistral")
    tokens = np.random.default_rng(6).integers(0, cfg.vocab_size, size=(2, 9), dtype=np.int32)
    outs = {}
    for impl in ("auto", "jax_xla"):
        c = cfg.replace(attention_impl=impl)
        cache = model.init_cache(c, batch=2, max_len=12)
        prefill, cache = model.forward(c, params, tokens[:, :6], cache=cache)
        steps = [model.forward(c, params, tokens[:, i:i + 1], cache=cache)[0] for i in range(6, 7)]
        outs[impl] = np.concatenate([prefill] + steps, axis=1)
    _close(outs["jax_xla"], outs["auto"], TOL["float32"])


@pytest.mark.parametrize("tensor,kv", [(2, 2), (2, 1)])  # kv=1 heads cannot split over tensor=2
def test_splash_under_a_mesh_runs_per_shard(tensor, kv):
    """Under a mesh (8 simulated devices: batch over data x fsdp, heads over tensor) the kernel
    runs inside a shard_map, per batch/head shard, and still equals the XLA path on one device."""
    assert jax.device_count() == 8, "conftest sets 8 simulated CPU devices"
    q, k, v, cot, seg = _inputs("float32", b=4, t=24, kv=kv)
    seg = seg.at[2:].set(seg[:2, ::-1])  # rows 2, 3: segments reversed (padding first)
    ref, ref_grads = _value_and_grads("xla", q, k, v, cot, seg, 5)
    mesh = parallel.make_mesh(parallel.MeshConfig(data=2, fsdp=8 // (2 * tensor), tensor=tensor))
    with jax.set_mesh(mesh):
        fn = jax.jit(lambda *a: _value_and_grads("splash_interpret", *a, 5))
        assert "shard_map" in str(jax.make_jaxpr(fn)(q, k, v, cot, seg))
        out, grads = fn(q, k, v, cot, seg)
    _close(out, ref, TOL["float32"])
    for g, rg in zip(grads, ref_grads):
        _close(g, rg, TOL["float32"])


def test_attention_impl_round_trips_with_checkpoints_not_hf():
    """A runtime choice: kept in a checkpoint's config JSON, absent from HF config.json (importing
    one gives "auto", or what the caller overrides)."""
    cfg, _ = tiny("mistral", attention_impl="jax_xla")
    assert model_config_from_dict(json.loads(json.dumps(dataclasses.asdict(cfg)))) == cfg
    hf = cfg.to_hf()
    assert not any("attention_impl" in key for key in hf)
    assert model.ModelConfig.from_hf(hf).attention_impl == "auto"
    assert model.ModelConfig.from_hf(hf, attention_impl="xla").attention_impl == "xla"
