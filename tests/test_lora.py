"""LoRA: starts at the base model, the adapter path equals the merged kernel, export merges."""

import jax
import numpy as np
import pytest
import torch
import transformers

from sage_jax import model
from sage_jax.model import LoraConfig

TOL = 1e-5


def tiny(family="llama", **kw):
    cfg = model.ModelConfig(family=family, vocab_size=97, hidden_size=64, intermediate_size=96, num_layers=2,
                            num_heads=4, num_kv_heads=2, head_dim=16, **kw)
    return cfg, model.init_params(cfg, jax.random.key(0), std=0.2)


def randomised(adapters, seed=1):
    """Non-zero b (a fresh adapter has b = 0, which would hide bugs in the low-rank path)."""
    leaves, tree = jax.tree.flatten(adapters)
    keys = jax.random.split(jax.random.key(seed), len(leaves))
    return jax.tree.unflatten(tree, [0.3 * jax.random.normal(k, x.shape) for k, x in zip(keys, leaves)])


@pytest.mark.parametrize("targets", [("q_proj", "v_proj"), ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj",
                                                             "up_proj", "down_proj")])
def test_adapter_path_equals_merged_kernels(targets):
    cfg, params = tiny()
    lora = LoraConfig(rank=4, alpha=8.0, targets=targets)
    adapters = model.init_lora(cfg, lora, jax.random.key(2))
    tokens = np.arange(10, dtype=np.int32)[None] % 97
    base, _ = model.forward(cfg, params, tokens)
    fresh, _ = model.forward(cfg, params, tokens, lora=lora, adapters=adapters)
    np.testing.assert_allclose(fresh, base, atol=TOL)  # b = 0: exactly the base model
    adapters = randomised(adapters)
    with_lora, _ = model.forward(cfg, params, tokens, lora=lora, adapters=adapters)
    merged, _ = model.forward(cfg, model.merge_lora(params, adapters, lora), tokens)
    assert np.max(np.abs(with_lora - base)) > 1e-2
    np.testing.assert_allclose(with_lora, merged, atol=1e-4)


def test_lora_shapes_axes_and_defaults():
    cfg, _ = tiny()
    lora = LoraConfig()
    assert (lora.rank, lora.alpha, lora.dropout, lora.targets) == (8, 16.0, 0.0, ("q_proj", "v_proj"))
    ad = model.init_lora(cfg, lora, jax.random.key(0))
    assert ad["layers"]["lora"]["q_proj"]["a"].shape == (2, 64, 8)
    assert ad["layers"]["lora"]["q_proj"]["b"].shape == (2, 8, 4, 16)
    axes = model.lora_axes(cfg, lora)
    assert axes["layers"]["lora"]["q_proj"]["a"] == ("layers", "embed", None)
    assert axes["layers"]["lora"]["q_proj"]["b"] == ("layers", None, "heads", "head_dim")
    with pytest.raises(ValueError, match="targets"):
        LoraConfig(targets=("qkv",))


def test_dropout_changes_training_forward_only():
    cfg, params = tiny()
    lora = LoraConfig(rank=4, dropout=0.5)
    adapters = randomised(model.init_lora(cfg, lora, jax.random.key(2)))
    tokens = np.arange(8, dtype=np.int32)[None]
    eval_out, _ = model.forward(cfg, params, tokens, lora=lora, adapters=adapters)
    train_a, _ = model.forward(cfg, params, tokens, lora=lora, adapters=adapters, dropout_rng=jax.random.key(0))
    train_b, _ = model.forward(cfg, params, tokens, lora=lora, adapters=adapters, dropout_rng=jax.random.key(1))
    assert np.max(np.abs(train_a - eval_out)) > 1e-3 and np.max(np.abs(train_a - train_b)) > 1e-3


def test_merged_lora_exports_to_transformers(tmp_path):
    cfg, params = tiny(tie_word_embeddings=True)
    lora = LoraConfig(rank=4)
    adapters = randomised(model.init_lora(cfg, lora, jax.random.key(3)))
    tokens = np.arange(12, dtype=np.int32)[None]
    ours, _ = model.forward(cfg, params, tokens, lora=lora, adapters=adapters)
    model.save_hf(tmp_path, cfg, model.merge_lora(params, adapters, lora))
    hf = transformers.AutoModelForCausalLM.from_pretrained(tmp_path, dtype=torch.float32).eval()
    with torch.no_grad():
        theirs = hf(torch.tensor(tokens, dtype=torch.long)).logits.numpy()
    np.testing.assert_allclose(ours, theirs, atol=1e-4)
