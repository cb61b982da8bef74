"""MoE dispatch (sage_jax.model.moe): the grouped-matmul and padded-block paths compute exactly
what the dense combine computes, values and gradients, layer and whole model."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from sage_jax import model
from sage_jax.model import moe as M

E, D, F, K = 4, 16, 24, 2


def _weights(seed=0, e=E):
    ks = jax.random.split(jax.random.key(seed), 5)
    return (jax.random.normal(ks[0], (e, D)).T * 0.5,  # router [D, E]
            jax.random.normal(ks[1], (e, D, F)) * 0.3, jax.random.normal(ks[2], (e, D, F)) * 0.3,
            jax.random.normal(ks[3], (e, F, D)) * 0.3)


@pytest.mark.parametrize("dispatch", ["ragged", "blocks"])
@pytest.mark.parametrize("tokens", [1, 7, 150])  # fewer tokens than a block, and several blocks
def test_dispatch_equals_dense_values_and_gradients(dispatch, tokens):
    router, gate, up, down = _weights()
    x = jax.random.normal(jax.random.key(9), (tokens, D))

    def loss(d, x, router, gate, up, down):
        y = M.moe(x, router, gate, up, down, k=K, dispatch=d)
        return jnp.sum(jnp.sin(y)), y

    (l0, y0), g0 = jax.value_and_grad(loss, argnums=(1, 2, 3, 4, 5), has_aux=True)("dense", x, router, gate, up, down)
    (l1, y1), g1 = jax.jit(jax.value_and_grad(loss, argnums=(1, 2, 3, 4, 5), has_aux=True), static_argnums=0)(
        dispatch, x, router, gate, up, down)
    np.testing.assert_allclose(y1, y0, rtol=1e-5, atol=1e-5)
    for a, b in zip(g1, g0):
        np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-5)


def test_blocks_with_unused_experts_and_a_skewed_router():
    """Experts with no token (empty runs) and one expert taking most tokens: nothing dropped."""
    router, gate, up, down = _weights(1, e=6)
    x = jax.random.normal(jax.random.key(3), (97, D))
    # expert 0 in nearly every top-k, expert 5 in none (a bias through a constant input feature)
    x = x.at[:, 0].set(1.0)
    router = router.at[0, 0].add(20.0).at[0, 5].add(-20.0)
    _, top_i = M.route(x, router, K)
    counts = np.bincount(np.asarray(top_i).ravel(), minlength=6)
    assert counts[0] >= 90 and counts[5] == 0
    y0 = M.moe(x, router, gate, up, down, k=K, dispatch="dense")
    for d in ("blocks", "ragged"):
        np.testing.assert_allclose(M.moe(x, router, gate, up, down, k=K, dispatch=d), y0, rtol=1e-5, atol=1e-5)


def test_auto_picks_by_platform_and_bad_names_fail():
    assert M.resolve_dispatch("auto", "cpu") == "blocks"
    assert M.resolve_dispatch("auto", "tpu") == "ragged" and M.resolve_dispatch("auto", "gpu") == "ragged"
    with pytest.raises(ValueError, match="moe_dispatch"):
        model.ModelConfig(moe_dispatch="sparse")


def test_mixtral_model_logits_and_gradients_equal_across_dispatch():
    base = model.ModelConfig(family="mixtral", vocab_size=61, hidden_size=32, intermediate_size=48, num_layers=2,
                             num_heads=4, num_kv_heads=2, head_dim=8, num_experts=4, num_experts_per_tok=2)
    params = model.init_params(base, jax.random.key(0), std=0.2)
    tokens = jax.random.randint(jax.random.key(1), (2, 9), 0, 61)

    def loss(cfg, p):
        logits, _ = model.forward(cfg, p, tokens)
        return jnp.mean(jax.nn.logsumexp(logits, -1)), logits

    (_, ref), gref = jax.value_and_grad(lambda p: loss(base.replace(moe_dispatch="dense"), p), has_aux=True)(params)
    for d in ("ragged", "blocks"):
        (_, lg), g = jax.value_and_grad(lambda p: loss(base.replace(moe_dispatch=d), p), has_aux=True)(params)
        np.testing.assert_allclose(lg, ref, rtol=1e-5, atol=1e-5)
        for a, b in zip(jax.tree.leaves(g), jax.tree.leaves(gref)):
            np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-5)
