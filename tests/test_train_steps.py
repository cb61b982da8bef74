"""SFT/DPO steps: exact losses, accumulation, and sharded == single-device (8 simulated CPUs)."""

import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from sage_jax import model, parallel
from sage_jax.model import LoraConfig
from sage_jax.train import losses, steps


def tiny(family="llama", **kw):
    cfg = model.ModelConfig(family=family, vocab_size=97, hidden_size=64, intermediate_size=96, num_layers=2,
                            num_heads=4, num_kv_heads=2, head_dim=16, **kw)
    return cfg, model.init_params(cfg, jax.random.key(0), std=0.2)


def sft_batch(a, b, t, seed=0, vocab=97):
    rng = np.random.default_rng(seed)
    tokens = rng.integers(0, vocab, (a, b, t + 1), dtype=np.int32)
    mask = rng.random((a, b, t)) < 0.6
    seg = np.ones((a, b, t), np.int32)
    seg[..., t - 3:] = 0  # right padding
    mask &= seg > 0
    pos = np.broadcast_to(np.arange(t, dtype=np.int32), (a, b, t)).copy()
    return {"inputs": tokens[..., :-1], "targets": tokens[..., 1:], "loss_mask": mask, "segment_ids": seg,
            "positions": pos}


@pytest.mark.parametrize("chunk", [32, 0])  # 4 chunks, the last one padded; auto = the whole vocabulary
def test_chunked_token_logprobs_equal_log_softmax(chunk):
    cfg, params = tiny()
    x = jax.random.normal(jax.random.key(1), (2, 7, 64))
    targets = jax.random.randint(jax.random.key(2), (2, 7), 0, 97)
    targets = targets.at[0, :3].set(jnp.argmax(model.lm_head(cfg, params, x[0, :3]), -1))  # some hits
    st = losses.token_logprobs(cfg, params, x, targets, vocab_chunk=chunk)
    logits = model.lm_head(cfg, params, x)
    ref = jnp.take_along_axis(jax.nn.log_softmax(logits), targets[..., None], -1)[..., 0]
    np.testing.assert_allclose(st.logp, ref, atol=1e-5)
    np.testing.assert_array_equal(st.correct, jnp.argmax(logits, -1) == targets)
    assert 3 <= int(st.correct.sum()) < st.correct.size
    g_chunk = jax.grad(lambda x: losses.token_logprobs(cfg, params, x, targets, chunk).logp.sum())(x)
    g_ref = jax.grad(lambda x: jnp.take_along_axis(jax.nn.log_softmax(model.lm_head(cfg, params, x)),
                                                   targets[..., None], -1).sum())(x)
    np.testing.assert_allclose(g_chunk, g_ref, atol=1e-5)


@pytest.mark.parametrize("chunk", [32, 0])
def test_padded_vocab_rows_never_compete(chunk):
    cfg, params = tiny()
    cfg2, params2 = model.grow_vocab(cfg, params, 97, pad_to_multiple_of=128)
    params2["embed"] = params2["embed"].at[100].set(50.0)  # a huge padding row must not matter
    x = jax.random.normal(jax.random.key(1), (1, 5, 64))
    t = jnp.zeros((1, 5), jnp.int32)
    np.testing.assert_allclose(losses.token_logprobs(cfg2, params2, x, t, chunk).logp,
                               losses.token_logprobs(cfg, params, x, t, chunk).logp, atol=1e-6)


def test_auto_vocab_chunk_takes_the_whole_vocabulary_while_the_logits_are_small():
    assert losses.effective_vocab_chunk(49152, 1024) == 49152
    assert losses.effective_vocab_chunk(49152, 4096) == losses.AUTO_CHUNK
    assert losses.effective_vocab_chunk(49152, 1024, 4096) == 4096
    with pytest.raises(ValueError, match="vocab_chunk"):
        losses.effective_vocab_chunk(97, 8, -1)


@pytest.mark.parametrize("n_in", [1, 2])
def test_dense_equals_tensordot_in_values_and_gradients(n_in):
    from sage_jax.model.layers import dense

    x = jax.random.normal(jax.random.key(0), (2, 5, 4, 6))
    w = jax.random.normal(jax.random.key(1), (4, 6, 3) if n_in == 2 else (6, 3, 2))
    loss = lambda f: lambda x, w: jnp.sum(jnp.sin(f(x, w)))  # noqa: E731
    ours = jax.jit(jax.value_and_grad(loss(lambda x, w: dense(x, w, n_in)), argnums=(0, 1)))(x, w)
    ref = jax.value_and_grad(loss(lambda x, w: jnp.tensordot(x, w, axes=n_in)), argnums=(0, 1))(x, w)
    for a, b in zip(jax.tree.leaves(ours), jax.tree.leaves(ref)):
        np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-5)
    with pytest.raises(ValueError, match="kernel"):
        dense(x, w.reshape(-1, 1), n_in)


# Adam's first step is ~lr * sign(g), which amplifies float noise in tiny gradients; a large eps keeps
# the update smooth in g, so comparing updated params compares gradients.
SMOOTH_ADAM = steps.OptimConfig(learning_rate=1e-2, eps=1e-3)


def _run(spec, trainable, frozen, batch, mesh=None, opt=SMOOTH_ADAM):
    tx = steps.make_optimizer(opt, total_steps=10)
    trainable = jax.tree.map(jnp.copy, trainable)  # the step donates its state buffers
    state = steps.init_state(trainable, tx, jax.random.key(0))
    if mesh is None:
        fn = steps.compile_step(steps.sft_train_step, spec, tx)
        return fn(state, frozen, batch)
    s_shard = steps.state_shardings(spec, tx, trainable, mesh)
    state = jax.device_put(state, s_shard)
    frozen, f_shard = steps.shard_frozen(spec, frozen, mesh)
    b_shard = steps.batch_shardings(batch, mesh)
    fn = steps.compile_step(steps.sft_train_step, spec, tx, state_sharding=s_shard, frozen_sharding=f_shard,
                            batch_sharding=b_shard)
    return fn(state, frozen, jax.device_put(batch, b_shard))


def test_accumulating_four_micro_batches_equals_one_batch():
    cfg, params = tiny()
    spec = steps.StepSpec(cfg)
    batch4 = sft_batch(4, 2, 12)
    batch1 = jax.tree.map(lambda x: x.reshape((1, 8) + x.shape[2:]), batch4)
    s4, m4 = _run(spec, params, None, batch4)
    s1, m1 = _run(spec, params, None, batch1)
    np.testing.assert_allclose(m4["loss"], m1["loss"], rtol=1e-5)
    np.testing.assert_allclose(m4["grad_norm"], m1["grad_norm"], rtol=1e-4)
    assert float(m4["tokens"]) == float(np.sum(batch4["loss_mask"]))
    jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, atol=2e-6), s4["params"], s1["params"])


MESHES = {"2x2x2": parallel.MeshConfig(data=2, fsdp=2, tensor=2),
          "fsdp4_tensor2": parallel.MeshConfig(data=1, fsdp=4, tensor=2)}


@pytest.mark.parametrize("use_lora", [False, True], ids=["full", "lora"])
@pytest.mark.parametrize("mesh_name", sorted(MESHES))
def test_sharded_step_equals_single_device(mesh_name, use_lora):
    """Tolerance: 1e-5 on the loss, 2e-6 abs on updated params (float32 reduction order)."""
    cfg, params = tiny()
    if use_lora:
        lora = LoraConfig(rank=4, targets=("q_proj", "v_proj", "down_proj"))
        spec = steps.StepSpec(cfg, lora=lora)
        trainable = model.init_lora(cfg, lora, jax.random.key(5))
        trainable = jax.tree.map(lambda x: x + 0.05, trainable)  # non-zero b so every path matters
        frozen = params
    else:
        spec, trainable, frozen = steps.StepSpec(cfg), params, None
    batch = sft_batch(2, 4, 16, seed=3)
    ref_state, ref_m = _run(spec, trainable, frozen, batch)
    mesh = parallel.make_mesh(MESHES[mesh_name])
    state, m = _run(spec, trainable, frozen, batch, mesh)
    np.testing.assert_allclose(m["loss"], ref_m["loss"], rtol=1e-5)
    jax.tree.map(lambda a, b: np.testing.assert_allclose(np.asarray(a), np.asarray(b), atol=2e-6),
                 state["params"], ref_state["params"])
    # The state really is distributed.
    leaf = state["params"]["layers"]["lora"]["q_proj"]["b"] if use_lora else state["params"]["layers"]["q_proj"]
    assert not leaf.sharding.is_fully_replicated


def test_mixtral_step_on_an_expert_mesh_equals_single_device():
    """On a mesh with an expert axis the step traces with the mesh in context, so the MoE layers
    run the expert-parallel dispatch (all_to_all over `expert`); loss and updated params equal one
    device's dense combine."""
    cfg, params = tiny("mixtral", num_experts=4)
    spec = steps.StepSpec(cfg)
    batch = sft_batch(2, 4, 16, seed=4)
    ref_state, ref_m = _run(spec, params, None, batch)
    mesh = parallel.make_mesh(parallel.MeshConfig(data=2, fsdp=1, expert=4))
    tx = steps.make_optimizer(SMOOTH_ADAM, total_steps=10)
    s_shard = steps.state_shardings(spec, tx, params, mesh)
    b_shard = steps.batch_shardings(batch, mesh)
    fn = steps.compile_step(steps.sft_train_step, spec, tx, state_sharding=s_shard, frozen_sharding=None,
                            batch_sharding=b_shard)
    state = jax.device_put(steps.init_state(jax.tree.map(jnp.copy, params), tx, jax.random.key(0)), s_shard)
    batch = jax.device_put(batch, b_shard)
    assert "all_to_all" in fn.lower(state, None, batch).as_text()
    state, m = fn(state, None, batch)
    np.testing.assert_allclose(m["loss"], ref_m["loss"], rtol=1e-5)
    jax.tree.map(lambda a, b: np.testing.assert_allclose(np.asarray(a), np.asarray(b), atol=2e-6),
                 state["params"], ref_state["params"])


def test_dpo_policy_equals_reference_gives_log2():
    dpo = losses.DPOConfig(beta=0.1, ftx=0.0)
    lp = jnp.array([-12.0, -3.5, -40.0])
    loss, _ = losses.dpo_loss(dpo, lp, lp - 2.0, lp, lp - 2.0, jnp.array([4.0, 2.0, 9.0]))
    np.testing.assert_allclose(loss, math.log(2), rtol=1e-6)


def test_dpo_golden_value_and_ftx_term():
    # Hand computation: margin = (-10 - -11) - (-14 - -12) = 1 - (-2) = 3;
    # dpo = -log(sigmoid(0.1 * 3)) = log(1 + e^-0.3) = 0.554355...; sft = 10 / 5 = 2.
    c, r, rc, rr, n = (jnp.array([v]) for v in (-10.0, -14.0, -11.0, -12.0, 5.0))
    loss0, m = losses.dpo_loss(losses.DPOConfig(beta=0.1, ftx=0.0), c, r, rc, rr, n)
    np.testing.assert_allclose(loss0, math.log1p(math.exp(-0.3)), rtol=1e-6)
    np.testing.assert_allclose(m["reward_chosen"], 0.1, rtol=1e-6)
    np.testing.assert_allclose(m["reward_rejected"], -0.2, rtol=1e-6)
    loss1, m1 = losses.dpo_loss(losses.DPOConfig(beta=0.1, ftx=1.0), c, r, rc, rr, n)
    np.testing.assert_allclose(m1["sft_loss"], 2.0, rtol=1e-6)
    np.testing.assert_allclose(loss1 - loss0, 2.0, rtol=1e-6)


def test_dpo_step_zero_loss_is_log2_with_cached_reference():
    cfg, params = tiny()
    spec = steps.StepSpec(cfg, lora=LoraConfig(rank=4))
    adapters = model.init_lora(cfg, spec.lora, jax.random.key(1))  # b = 0: policy == reference at step 0
    pair = sft_batch(2, 2, 10, seed=4)
    rej = sft_batch(2, 2, 10, seed=5)
    ref = jax.jit(lambda b: steps.sequence_logprobs(spec, adapters, params, b))
    ref_c = jnp.stack([ref(jax.tree.map(lambda x: x[i], pair))[0] for i in range(2)])
    ref_r = jnp.stack([ref(jax.tree.map(lambda x: x[i], rej))[0] for i in range(2)])
    batch = {"chosen": pair, "rejected": rej, "ref_chosen": ref_c, "ref_rejected": ref_r}
    tx = steps.make_optimizer(steps.OptimConfig(learning_rate=1e-3), 10)
    state = steps.init_state(adapters, tx, jax.random.key(0))
    step = steps.compile_step(steps.dpo_train_step, spec, losses.DPOConfig(ftx=0.0), tx)
    state, m = step(state, params, batch)
    np.testing.assert_allclose(m["dpo_loss"], math.log(2), rtol=1e-5)
    state, m = step(state, params, batch)
    assert float(m["dpo_loss"]) < math.log(2)  # the first update moved the policy the right way
