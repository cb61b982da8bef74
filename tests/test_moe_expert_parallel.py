"""Expert-parallel MoE (moe_dispatch="expert_parallel"): on 8 simulated CPU devices, all_to_all
over the `expert` mesh axis computes exactly what the dense combine on one device computes, values
and gradients, layer and whole Mixtral model, with nothing dropped when every token picks the
same device's experts."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.sharding import NamedSharding, PartitionSpec as P

from sage_jax import model, parallel
from sage_jax.model import moe as M

E, D, F, K = 8, 16, 24, 2

MESHES = {
    "data2_expert4": parallel.MeshConfig(data=2, fsdp=1, expert=4),
    "fsdp2_expert4": parallel.MeshConfig(data=1, fsdp=2, expert=4),
    "data2_tensor2_expert2": parallel.MeshConfig(data=2, fsdp=1, tensor=2, expert=2),
}
LAYER_AXES = (("embed", None), ("expert", "embed", "mlp"), ("expert", "embed", "mlp"), ("expert", "mlp", "embed"))


def _weights(seed=0):
    ks = jax.random.split(jax.random.key(seed), 4)
    return (jax.random.normal(ks[0], (E, D)).T * 0.5,  # router [D, E]
            jax.random.normal(ks[1], (E, D, F)) * 0.3, jax.random.normal(ks[2], (E, D, F)) * 0.3,
            jax.random.normal(ks[3], (E, F, D)) * 0.3)


def _place(mesh, x, weights):
    """x's batch over data x fsdp, the weights by the rule table (experts over `expert`)."""
    xs = jax.device_put(x, parallel.batch_sharding(mesh, x.shape))
    ws = [jax.device_put(w, NamedSharding(mesh, parallel.logical_to_spec(a, w.shape, mesh)))
          for a, w in zip(LAYER_AXES, weights)]
    return xs, ws


def _layer_loss(dispatch, local=None):
    def loss(x, router, gate, up, down):
        y = M.moe(x, router, gate, up, down, k=K, dispatch=dispatch, local_dispatch=local)
        return jnp.sum(jnp.sin(y)), y
    return jax.value_and_grad(loss, argnums=(0, 1, 2, 3, 4), has_aux=True)


def _check_layer(mesh_cfg, x, weights, local=None):
    (l0, y0), g0 = _layer_loss("dense")(x, *weights)  # one device, no mesh: the oracle
    mesh = parallel.make_mesh(mesh_cfg)
    xs, ws = _place(mesh, x, weights)
    with jax.set_mesh(mesh):
        fn = jax.jit(_layer_loss("expert_parallel", local))
        assert "all_to_all" in str(jax.make_jaxpr(fn)(xs, *ws))  # really the exchange, not GSPMD's choice
        (l1, y1), g1 = fn(xs, *ws)
    np.testing.assert_allclose(y1, y0, rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(l1, l0, rtol=1e-5)
    for a, b in zip(g1, g0):
        np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("name", sorted(MESHES))
@pytest.mark.parametrize("shape", [(8, 5), (2, 3), (4, 1)])  # [B, T]: 3 and 1 token a device, not a multiple of ep
def test_layer_values_and_gradients_equal_dense(name, shape):
    assert jax.device_count() == 8, "conftest sets 8 simulated CPU devices"
    x = jax.random.normal(jax.random.key(9), shape + (D,))
    _check_layer(MESHES[name], x, _weights())


@pytest.mark.parametrize("local", ["ragged", "dense"])
def test_other_local_dispatches(local):
    """The local experts through ragged_dot (the TPU/GPU choice; XLA's masked fallback here) or dense."""
    x = jax.random.normal(jax.random.key(4), (4, 3, D))
    _check_layer(MESHES["fsdp2_expert4"], x, _weights(2), local)


def test_every_token_on_one_device_nothing_dropped():
    """Experts 0 and 1 (both on expert shard 0) win every token's top 2: shard 0 receives every
    row, filling its all_to_all buffer to the bound exactly."""
    router, gate, up, down = _weights(1)
    x = jax.random.normal(jax.random.key(3), (8, 6, D)).at[..., 0].set(1.0)
    router = router.at[0, 0].add(30.0).at[0, 1].add(25.0)
    _, top_i = M.route(x.reshape(-1, D), router, K)
    assert set(np.unique(np.asarray(top_i))) == {0, 1}
    _check_layer(MESHES["data2_expert4"], x, (router, gate, up, down))


def test_auto_and_explicit_resolution():
    mesh = parallel.make_mesh(parallel.MeshConfig(data=2, fsdp=1, expert=4))
    assert M.resolve_dispatch("auto", "cpu", num_experts=E) == "blocks"  # no mesh in context
    with jax.set_mesh(mesh):
        assert M.resolve_dispatch("auto", "cpu", num_experts=E) == "expert_parallel"
        assert M.resolve_dispatch("auto", "gpu", num_experts=6) == "ragged"  # 6 experts do not split 4 ways
        assert M.resolve_dispatch("blocks", "cpu", num_experts=E) == "blocks"  # explicit wins
    with jax.set_mesh(parallel.make_mesh(parallel.MeshConfig(data=8, fsdp=1))):
        assert M.resolve_dispatch("auto", "cpu", num_experts=E) == "blocks"  # expert=1
    router, gate, up, down = _weights()
    x = jnp.ones((2, 3, D))
    with pytest.raises(ValueError, match="expert_parallel.*no mesh"):
        M.moe(x, router, gate, up, down, k=K, dispatch="expert_parallel")
    with jax.set_mesh(parallel.make_mesh(parallel.MeshConfig(data=1, fsdp=1, expert=8))), \
            pytest.raises(ValueError, match="6 experts do not divide"):
        M.moe(x, router[:, :6], gate[:6], up[:6], down[:6], k=K, dispatch="expert_parallel")
    with jax.set_mesh(mesh), pytest.raises(ValueError, match="local_dispatch"):
        M.moe(x, router, gate, up, down, k=K, dispatch="expert_parallel", local_dispatch="expert_parallel")
    assert model.ModelConfig(moe_dispatch="expert_parallel").moe_dispatch == "expert_parallel"


@pytest.mark.parametrize("name", ["data2_expert4", "fsdp2_expert4"])
def test_mixtral_logits_and_loss_gradient_equal_one_device(name):
    base = model.ModelConfig(family="mixtral", vocab_size=61, hidden_size=32, intermediate_size=48, num_layers=2,
                             num_heads=4, num_kv_heads=2, head_dim=8, num_experts=E, num_experts_per_tok=K,
                             moe_dispatch="dense")
    params = model.init_params(base, jax.random.key(0), std=0.2)
    tokens = np.asarray(jax.random.randint(jax.random.key(1), (4, 9), 0, 61))

    def loss(cfg, p, t):
        logits, _ = model.forward(cfg, p, t)
        nll = jax.nn.logsumexp(logits[:, :-1], -1) - jnp.take_along_axis(logits[:, :-1], t[:, 1:, None], -1)[..., 0]
        return jnp.mean(nll), logits

    (l0, ref), g0 = jax.value_and_grad(lambda p: loss(base, p, tokens), has_aux=True)(params)
    mesh = parallel.make_mesh(MESHES[name])
    sharded = parallel.shard_params(model.param_axes(base), params, mesh)
    batch = parallel.shard_batch(tokens, mesh)
    cfg = base.replace(moe_dispatch="auto")  # auto: expert_parallel under this mesh
    with jax.set_mesh(mesh):
        assert M.resolve_dispatch(cfg.moe_dispatch, num_experts=E) == "expert_parallel"
        fn = jax.jit(jax.value_and_grad(lambda p, t: loss(cfg, p, t), has_aux=True))
        assert "all_to_all" in str(jax.make_jaxpr(fn)(sharded, batch))
        (l1, lg), g1 = fn(sharded, batch)
    np.testing.assert_allclose(lg, ref, rtol=1e-5, atol=5e-5)
    np.testing.assert_allclose(l1, l0, rtol=1e-5)
    for a, b in zip(jax.tree.leaves(g1), jax.tree.leaves(g0)):
        np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-5)


def test_mixtral_cached_decode_under_params_mesh_equals_one_device():
    """The inference path: prefill then one-token decode steps with a KV cache, the parameters'
    mesh in context (`parallel.mesh_context`, as the rollout entry points set it): auto ->
    expert_parallel, one token per row per step."""
    cfg = model.ModelConfig(family="mixtral", vocab_size=61, hidden_size=32, intermediate_size=48, num_layers=2,
                            num_heads=4, num_kv_heads=2, head_dim=8, num_experts=E, num_experts_per_tok=K)
    params = model.init_params(cfg, jax.random.key(5), std=0.2)
    tokens = np.asarray(jax.random.randint(jax.random.key(6), (4, 7), 0, 61))
    ref, _ = model.forward(cfg.replace(moe_dispatch="dense"), params, tokens)
    mesh = parallel.make_mesh(MESHES["fsdp2_expert4"])
    sharded = parallel.shard_params(model.param_axes(cfg), params, mesh)
    with parallel.mesh_context(sharded):
        assert M.resolve_dispatch("auto", num_experts=E) == "expert_parallel"
        step = jax.jit(lambda p, t, c: model.forward(cfg, p, t, cache=c))
        cache = model.init_cache(cfg, 4, 8)
        logits, cache = step(sharded, tokens[:, :5], cache)
        out = [logits]
        for i in (5, 6):
            logits, cache = step(sharded, tokens[:, i:i + 1], cache)
            out.append(logits)
    np.testing.assert_allclose(np.concatenate(out, axis=1), ref, rtol=1e-5, atol=5e-5)
