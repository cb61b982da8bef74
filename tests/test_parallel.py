"""On 8 simulated CPU devices, the sharded forward equals the single-device forward."""

import jax
import numpy as np
import pytest
from jax.sharding import PartitionSpec as P

from sage_jax import model, parallel

TOL = 5e-5  # float32: sharded reductions sum in a different order (logits of magnitude ~3)


def tiny(family="llama", **kw):
    cfg = model.ModelConfig(family=family, vocab_size=128, hidden_size=64, intermediate_size=96, num_layers=2,
                            num_heads=4, num_kv_heads=2, head_dim=16, rms_norm_eps=1e-5, **kw)
    return cfg, model.init_params(cfg, jax.random.key(0), std=0.2)


MESHES = {
    "data8": (parallel.MeshConfig(data=8, fsdp=1), "llama", {}),
    "2x2x2": (parallel.MeshConfig(data=2, fsdp=2, tensor=2), "llama", {}),
    "fsdp4_tensor2_qwen2": (parallel.MeshConfig(data=1, fsdp=4, tensor=2), "qwen2", dict(qkv_bias=True)),
    "expert4_mixtral": (parallel.MeshConfig(data=1, fsdp=2, expert=4), "mixtral", dict(num_experts=4)),
}


@pytest.mark.parametrize("name", sorted(MESHES))
def test_sharded_forward_equals_single_device(name):
    assert jax.device_count() == 8, "conftest sets 8 simulated CPU devices"
    mesh_cfg, family, extra = MESHES[name]
    cfg, params = tiny(family, **extra)
    tokens = np.random.default_rng(0).integers(0, cfg.vocab_size, size=(8, 10), dtype=np.int32)
    ref, _ = model.forward(cfg, params, tokens)  # unsharded: everything on device 0

    mesh = parallel.make_mesh(mesh_cfg)
    p_shard = parallel.tree_shardings(model.param_axes(cfg), params, mesh)
    sharded = parallel.shard_params(model.param_axes(cfg), params, mesh)
    batch = parallel.shard_batch(tokens, mesh)
    step = jax.jit(lambda p, t: model.forward(cfg, p, t)[0], in_shardings=(p_shard, batch.sharding))
    out = step(sharded, batch)
    np.testing.assert_allclose(np.asarray(out), np.asarray(ref), atol=TOL)

    # The layout really is distributed the way the rule table says.
    specs = jax.tree.map(lambda s: s.spec, p_shard)
    if mesh_cfg.tensor > 1:
        assert specs["layers"]["q_proj"] == P(None, "fsdp", "tensor", None)
        assert specs["layers"]["down_proj"] == P(None, "tensor", "fsdp")
    if cfg.is_moe:
        assert specs["layers"]["gate_proj"] == P(None, "expert", "fsdp", None)
    if mesh_cfg.data == 8:
        assert batch.sharding.spec == P("data", None)


def test_kv_cache_sharded_decode_matches():
    cfg, params = tiny()
    mesh = parallel.make_mesh(parallel.MeshConfig(data=2, fsdp=2, tensor=2))
    tokens = np.random.default_rng(1).integers(0, cfg.vocab_size, size=(4, 6), dtype=np.int32)
    ref, _ = model.forward(cfg, params, tokens)
    cache = model.init_cache(cfg, 4, 8)
    c_shard = parallel.tree_shardings(model.CACHE_AXES, cache, mesh)
    cache = jax.device_put(cache, c_shard)
    step = jax.jit(lambda p, t, c: model.forward(cfg, p, t, cache=c), donate_argnums=2,
                   out_shardings=(None, c_shard))
    p = parallel.shard_params(model.param_axes(cfg), params, mesh)
    logits, cache = step(p, tokens[:, :5], cache)
    last, cache = step(p, tokens[:, 5:], cache)
    np.testing.assert_allclose(np.asarray(last[:, 0]), np.asarray(ref[:, 5]), atol=TOL)
    assert cache["k"].sharding.spec == P(None, ("data", "fsdp"), "tensor", None, None)


def test_mesh_config_errors_and_rest_axis():
    assert parallel.MeshConfig(data=2, fsdp=-1, tensor=2).shape(8) == (2, 2, 2, 1)
    with pytest.raises(ValueError, match="needs 16 devices"):
        parallel.MeshConfig(data=4, fsdp=4).shape(8)
    with pytest.raises(ValueError, match="at most one -1"):
        parallel.MeshConfig(data=-1, fsdp=-1).shape(8)


def test_rules_drop_non_dividing_axes_and_remap():
    mesh = parallel.make_mesh(parallel.MeshConfig(data=1, fsdp=4, tensor=2))
    # 3 kv heads cannot split over tensor=2: replicated on that axis.
    assert parallel.logical_to_spec(("embed", "kv_heads"), (64, 3), mesh) == P("fsdp", None)
    rules = parallel.merge_rules({"embed": None, "vocab": ["fsdp", "tensor"]})
    assert parallel.logical_to_spec(("vocab", "embed"), (128, 64), mesh, rules) == P(("fsdp", "tensor"), None)
    with pytest.raises(KeyError, match="no rule"):
        parallel.logical_to_spec(("bogus",), (4,), mesh)


def test_initialize_distributed_is_noop_for_one_process(monkeypatch):
    for var in ("JAX_COORDINATOR_ADDRESS", "JAX_NUM_PROCESSES", "TPU_WORKER_HOSTNAMES", "CLOUD_TPU_TASK_ID"):
        monkeypatch.delenv(var, raising=False)
    parallel.initialize_distributed()
    assert jax.process_count() == 1
    with pytest.raises(ValueError, match="coordinator"):
        parallel.initialize_distributed(num_processes=2)
