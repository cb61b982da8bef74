"""KV-cache decoding and packed segments give the same logits as plain full forwards."""

import jax
import numpy as np
import pytest

from sage_jax import model

TOL = 1e-5


def tiny(family="llama", **kw):
    base = dict(family=family, vocab_size=97, hidden_size=64, intermediate_size=96, num_layers=2, num_heads=4,
                num_kv_heads=2, head_dim=16, rms_norm_eps=1e-5)
    if family == "mistral":
        base["sliding_window"] = 5
    base.update(kw)
    cfg = model.ModelConfig(**base)
    return cfg, model.init_params(cfg, jax.random.key(0), std=0.2)


@pytest.mark.parametrize("family", ["llama", "mistral"])
def test_prefill_then_decode_equals_full_forward(family):
    cfg, params = tiny(family)
    tokens = np.random.default_rng(1).integers(0, cfg.vocab_size, size=(2, 14), dtype=np.int32)
    full, _ = model.forward(cfg, params, tokens)
    step = jax.jit(model.forward, static_argnums=0)
    cache = model.init_cache(cfg, batch=2, max_len=16)
    logits, cache = step(cfg, params, tokens[:, :6], cache=cache)  # prefill
    outs = [logits]
    for t in range(6, 14):  # token-by-token decode
        logits, cache = step(cfg, params, tokens[:, t : t + 1], cache=cache)
        outs.append(logits)
    np.testing.assert_allclose(np.concatenate(outs, axis=1), full, atol=TOL)
    np.testing.assert_array_equal(cache["end"], [14, 14])


def test_right_padded_prefill_rows_continue_independently():
    """Rows of different lengths in one prefill; padding neither advances nor leaks."""
    cfg, params = tiny()
    rng = np.random.default_rng(2)
    a, b = rng.integers(0, 97, 9, dtype=np.int32), rng.integers(0, 97, 5, dtype=np.int32)
    tokens = np.zeros((2, 9), np.int32)
    tokens[0], tokens[1, :5] = a, b
    seg = np.array([[1] * 9, [1] * 5 + [0] * 4], np.int32)
    cache = model.init_cache(cfg, batch=2, max_len=12)
    _, cache = model.forward(cfg, params, tokens, segment_ids=seg, cache=cache)
    np.testing.assert_array_equal(cache["end"], [9, 5])
    nxt = np.array([[3], [4]], np.int32)
    logits, _ = model.forward(cfg, params, nxt, cache=cache)
    ref_a, _ = model.forward(cfg, params, np.concatenate([a, [3]])[None])
    ref_b, _ = model.forward(cfg, params, np.concatenate([b, [4]])[None])
    np.testing.assert_allclose(logits[0, -1], ref_a[0, -1], atol=TOL)
    np.testing.assert_allclose(logits[1, -1], ref_b[0, -1], atol=TOL)


@pytest.mark.parametrize("family", ["llama", "mistral"])
def test_packed_row_of_three_segments_equals_separate_runs(family):
    cfg, params = tiny(family)
    rng = np.random.default_rng(3)
    lens = [7, 4, 6]
    seqs = [rng.integers(0, cfg.vocab_size, n, dtype=np.int32) for n in lens]
    packed = np.concatenate(seqs + [np.zeros(3, np.int32)])[None]  # 3 padding tokens at the end
    seg = np.concatenate([np.full(n, i + 1) for i, n in enumerate(lens)] + [np.zeros(3)]).astype(np.int32)[None]
    logits, _ = model.forward(cfg, params, packed, segment_ids=seg)
    start = 0
    for s in seqs:
        alone, _ = model.forward(cfg, params, s[None])
        np.testing.assert_allclose(logits[0, start : start + len(s)], alone[0], atol=TOL)
        start += len(s)


def test_segment_positions_restart():
    seg = np.array([[1, 1, 1, 2, 2, 3, 0, 0]], np.int32)
    np.testing.assert_array_equal(model.transformer.segment_positions(seg), [[0, 1, 2, 0, 1, 0, 0, 1]])


def test_chunk_larger_than_cache_is_an_error():
    cfg, params = tiny()
    with pytest.raises(ValueError, match="does not fit"):
        model.forward(cfg, params, np.zeros((1, 9), np.int32), cache=model.init_cache(cfg, 1, 8))
