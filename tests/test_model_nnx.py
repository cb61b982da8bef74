"""The decoder is Flax NNX: the module state is the params pytree, axes come from the variables'
sharding metadata, LoRA adapters are the `nnx.LoRAParam` filter of the state, and the module
called directly equals the functional `forward`."""

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from sage_jax import model
from sage_jax.model import Decoder, LoraConfig


def tiny(**kw):
    return model.ModelConfig(vocab_size=61, hidden_size=32, intermediate_size=48, num_layers=3, num_heads=4,
                             num_kv_heads=2, head_dim=8, **kw)


def test_state_is_the_params_pytree_and_axes_come_from_metadata():
    cfg = tiny(qkv_bias=True, qk_norm=True)
    with nnx.use_eager_sharding(False):
        module = Decoder(cfg, rngs=nnx.Rngs(params=0))
    state = nnx.to_pure_dict(nnx.state(module, nnx.Param))
    params = model.init_params(cfg, jax.random.key(0))
    assert jax.tree.structure(state) == jax.tree.structure(params)
    assert jax.tree.map(lambda x: x.shape, state) == jax.tree.map(lambda x: x.shape, params)
    specs = nnx.to_pure_dict(nnx.get_partition_spec(nnx.state(module)))
    assert tuple(specs["layers"]["q_proj"]) == ("layers", "embed", "heads", "head_dim")
    assert model.param_axes(cfg)["layers"]["q_proj"] == ("layers", "embed", "heads", "head_dim")
    assert model.param_axes(cfg)["embed"] == ("vocab", "embed")
    # every stacked leaf leads with the layer axis, in the metadata as in the shapes
    for axes, shape in zip(jax.tree.leaves(model.param_axes(cfg)["layers"], is_leaf=lambda x: isinstance(x, tuple)),
                           jax.tree.leaves(model.param_shapes(cfg)["layers"], is_leaf=lambda x: isinstance(x, tuple))):
        assert axes[0] == "layers" and shape[0] == cfg.num_layers and len(axes) == len(shape)


def test_module_call_equals_functional_forward_and_jit():
    cfg = tiny(tie_word_embeddings=True)
    with nnx.use_eager_sharding(False):
        module = Decoder(cfg, std=0.2, rngs=nnx.Rngs(params=1))
    graph, state = nnx.split(module)
    params = nnx.to_pure_dict(state)
    tokens = jnp.asarray(np.arange(12, dtype=np.int32).reshape(2, 6) % cfg.vocab_size)
    direct, _ = module(tokens)
    functional, _ = model.forward(cfg, params, tokens)
    jitted = jax.jit(lambda s, t: nnx.merge(graph, s)(t)[0])(state, tokens)
    np.testing.assert_allclose(direct, functional, atol=1e-6)
    np.testing.assert_allclose(direct, jitted, atol=1e-6)


def test_lora_adapters_are_the_lora_param_filter():
    cfg = tiny()
    lora = LoraConfig(rank=2, targets=("q_proj", "o_proj"))
    with nnx.use_eager_sharding(False):
        module = Decoder(cfg, lora, rngs=nnx.Rngs(params=0))
    adapters = nnx.to_pure_dict(nnx.state(module, nnx.LoRAParam))
    base = nnx.to_pure_dict(nnx.state(module, nnx.All(nnx.Param, nnx.Not(nnx.LoRAParam))))
    assert set(adapters["layers"]["lora"]) == {"q_proj", "o_proj"}
    assert "lora" not in base["layers"]
    assert adapters["layers"]["lora"]["o_proj"]["a"].shape == (3, 4, 8, 2)  # [L, heads, head_dim, r]
    assert adapters["layers"]["lora"]["o_proj"]["b"].shape == (3, 2, 32)
    assert not np.any(adapters["layers"]["lora"]["q_proj"]["b"])  # b = 0: training starts at the base
    fresh = model.init_lora(cfg, lora, jax.random.key(0))
    assert jax.tree.structure(fresh) == jax.tree.structure(adapters)
    assert model.lora_axes(cfg, lora)["layers"]["lora"]["o_proj"]["a"] == ("layers", "heads", "head_dim", None)
    tokens = jnp.arange(8, dtype=jnp.int32)[None]
    np.testing.assert_allclose(module(tokens)[0], model.forward(cfg, base, tokens)[0], atol=1e-5)


def test_moe_rejects_lora_on_experts():
    cfg = tiny(family="mixtral", num_experts=4, num_experts_per_tok=2)
    try:
        model.init_lora(cfg, LoraConfig(targets=("gate_proj",)), jax.random.key(0))
    except ValueError as e:
        assert "MoE" in str(e)
    else:
        raise AssertionError("LoRA on expert kernels must be refused")
