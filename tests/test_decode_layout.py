"""The decode layout (`model.decode_layout`): per-layer weights run by an unrolled loop give the
stacked scan's logits and caches, generation and serving; the round trip is exact."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from test_model_cache_packing import tiny

from sage_jax import model, rollout


@pytest.mark.parametrize("family", ["llama", "mistral", "qwen2", "mixtral"])
def test_forward_with_and_without_cache_equals_the_stacked_scan(family):
    extra = {"qwen2": {"qkv_bias": True}, "mixtral": {"num_experts": 4, "num_experts_per_tok": 2}}
    cfg, params = tiny(family, **extra.get(family, {}))
    per = model.decode_layout(params)
    assert model.per_layer(per) is not None and len(model.per_layer(per)) == cfg.num_layers
    tokens = np.random.default_rng(0).integers(0, cfg.vocab_size, size=(3, 11), dtype=np.int32)
    seg = np.ones_like(tokens)
    seg[1, 7:] = 2  # packed: a second segment
    seg[2, 9:] = 0  # padding
    a, _ = model.forward(cfg, params, tokens, segment_ids=seg)
    b, _ = model.forward(cfg, per, tokens, segment_ids=seg)
    # float32 rounding only: the decode layout's products sum in another order (the kernel as
    # the GEMM's M side, layers.dense_output_major); seen up to 1.2e-5 on these logits
    tol = dict(rtol=1e-5, atol=3e-5)
    np.testing.assert_allclose(b, a, **tol)
    step = jax.jit(model.forward, static_argnums=0)
    # the stacked cache, and per-layer ones (split_cache: each layer's k/v its own buffer; with
    # transpose_keys its keys [B, K, H, S] under "kt")
    caches = [model.init_cache(cfg, 3, 16) for _ in range(4)]
    caches[2], caches[3] = model.split_cache(caches[2]), model.split_cache(caches[3], transpose_keys=True)
    assert isinstance(caches[2]["k"], tuple) and caches[2]["k"][0].shape == caches[0]["k"].shape[1:]
    b_, k_, s_, h_ = caches[0]["k"].shape[1:]
    assert "k" not in caches[3] and caches[3]["kt"][0].shape == (b_, k_, h_, s_)
    for t in range(0, 11, 4):  # chunked prefill, then one-token steps
        chunk = tokens[:, t: t + 4] if t < 8 else tokens[:, t: t + 1]
        la, caches[0] = step(cfg, params, chunk, cache=caches[0])
        for i in (1, 2, 3):
            lb, caches[i] = step(cfg, per, chunk, cache=caches[i])
            np.testing.assert_allclose(lb, la, **tol)
    caches[2], caches[3] = model.stack_cache(caches[2]), model.stack_cache(caches[3])
    for cache in caches[1:]:
        for name in ("k", "v"):
            np.testing.assert_allclose(cache[name], caches[0][name], rtol=1e-5, atol=1e-5)
        np.testing.assert_array_equal(cache["end"], caches[0]["end"])
    with pytest.raises(ValueError, match="per-layer KV cache"):
        model.forward(cfg, params, tokens[:, :1], cache=model.split_cache(model.init_cache(cfg, 3, 16)))


def test_round_trip_is_exact_and_lora_needs_the_stacked_layout():
    cfg, params = tiny()
    back = model.stacked_layout(model.decode_layout(params))
    assert jax.tree.structure(back) == jax.tree.structure(params)
    for x, y in zip(jax.tree.leaves(back), jax.tree.leaves(params)):
        np.testing.assert_array_equal(x, y)
    per = model.decode_layout(params)
    assert model.decode_layout(per) is per  # already in the layout: unchanged
    lora = model.LoraConfig(rank=2)
    adapters = model.init_lora(cfg, lora, jax.random.key(1))
    with pytest.raises(ValueError, match="stacked layout"):
        model.forward(cfg, model.decode_layout(params), jnp.zeros((1, 3), jnp.int32), lora=lora, adapters=adapters)


def test_generation_and_policy_in_the_decode_layout(tiny_dir):
    from sage_jax.rollout.policy import load_policy

    stacked = load_policy(str(tiny_dir))
    per = load_policy(str(tiny_dir), layout="per_layer")
    assert model.per_layer(stacked.params) is None and model.per_layer(per.params) is not None
    prompts = [stacked.encode_chat([{"role": "user", "content": t}]) for t in ("hello there", "I lost my keys")]
    for sp in (rollout.SamplingParams.greedy_params(12), rollout.SamplingParams(temperature=1.0, max_new_tokens=12)):
        for rows in (prompts, prompts * 8):  # 16 rows: the decode loop stores the keys transposed
            a = rollout.generate(stacked.cfg, stacked.params, rows, sp, seed=3)
            b = rollout.generate(per.cfg, per.params, rows, sp, seed=3)
            assert [g.tokens for g in b] == [g.tokens for g in a]
    with pytest.raises(ValueError, match="layout must be one of"):
        load_policy(str(tiny_dir), layout="unrolled")


def test_fused_kernels_keep_the_mesh_axes_and_the_logits():
    """The decode layout fuses q/k/v into [K, G + 2, H, D] and gate/up into [2, F, D], and stores
    o_proj [D, N, H] and down_proj [D, F]: all output-major. On a data x tensor mesh each kernel
    is split over kv heads / heads / mlp like its parts, and the sharded per-layer forward
    equals the stacked one on one device."""
    from sage_jax import parallel

    cfg, params = tiny()
    per_one = model.per_layer(model.decode_layout(params))[0]
    assert set(per_one) >= {"qkv_proj", "gate_up_proj"} and not set(per_one) & {"q_proj", "k_proj", "gate_proj"}
    assert per_one["qkv_proj"].shape == (cfg.num_kv_heads, cfg.num_heads // cfg.num_kv_heads + 2, cfg.head_dim,
                                         cfg.hidden_size)
    assert per_one["down_proj"].shape == (cfg.hidden_size, cfg.intermediate_size)
    assert per_one["gate_up_proj"].shape == (2, cfg.intermediate_size, cfg.hidden_size)
    assert per_one["o_proj"].shape == (cfg.hidden_size, cfg.num_heads, cfg.head_dim)
    sharded = parallel.place_params(model.param_axes(cfg), params, parallel.MeshConfig(data=4, fsdp=1, tensor=2))
    per = model.decode_layout(sharded)
    layer = model.per_layer(per)[0]
    assert tuple(layer["qkv_proj"].sharding.spec)[:1] == ("tensor",)
    assert tuple(layer["gate_up_proj"].sharding.spec) == (None, "tensor", None)
    assert tuple(layer["o_proj"].sharding.spec)[:2] == (None, "tensor")
    assert tuple(layer["down_proj"].sharding.spec) == (None, "tensor")
    tokens = np.random.default_rng(0).integers(0, cfg.vocab_size, size=(4, 9), dtype=np.int32)
    a, _ = model.forward(cfg, params, tokens)
    with parallel.mesh_context(per):
        b, _ = jax.jit(model.forward, static_argnums=0)(cfg, per, tokens)
    np.testing.assert_allclose(np.asarray(b), np.asarray(a), rtol=1e-5, atol=3e-5)  # see the first test
