"""Shared test setup: 8 simulated CPU devices (set before JAX starts) and the HF oracle."""

import os

os.environ["XLA_FLAGS"] = (os.environ.get("XLA_FLAGS", "") + " --xla_force_host_platform_device_count=8").strip()
os.environ.setdefault("JAX_PLATFORMS", "cpu")
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
# No persistent compilation cache (sage_jax.compile_cache): each test compiles what it runs and
# none reads or fills the user's ~/.cache; the tests of the cache turn it on for their processes.
os.environ.setdefault("JAX_ENABLE_COMPILATION_CACHE", "false")

import pytest  # noqa: E402


@pytest.fixture(scope="session")
def smollm2_dir():
    """SmolLM2-135M-Instruct converted to an HF directory (default cache; converted once)."""
    from sage_jax.model.smollm2 import fetch_smollm2

    return fetch_smollm2()


@pytest.fixture(scope="session")
def smollm2_hf(smollm2_dir):
    """The converted SmolLM2 loaded by transformers (PyTorch, float32): the oracle."""
    import torch
    from transformers import AutoModelForCausalLM

    return AutoModelForCausalLM.from_pretrained(smollm2_dir, dtype=torch.float32).eval()


@pytest.fixture(scope="session")
def tiny_dir(tmp_path_factory, smollm2_dir):
    """A tiny random Llama with SmolLM2's real tokenizer and chat template."""
    import torch
    import transformers

    out = tmp_path_factory.mktemp("tiny")
    tok = transformers.AutoTokenizer.from_pretrained(smollm2_dir)
    c = transformers.LlamaConfig(vocab_size=len(tok), hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                                 num_attention_heads=4, num_key_value_heads=2, tie_word_embeddings=True,
                                 bos_token_id=1, eos_token_id=2, pad_token_id=2, initializer_range=0.5)
    torch.manual_seed(0)
    transformers.AutoModelForCausalLM.from_config(c).save_pretrained(out)
    tok.save_pretrained(out)
    return out


@pytest.fixture(autouse=True, scope="module")
def _drop_compiled_programs():
    """Free the compiled XLA programs after each test module: one pytest process otherwise keeps
    every program of the whole suite, and a full run crashed late inside XLA's compiler (a
    segfault in backend_compile that no single file reproduces)."""
    yield
    import gc

    import jax

    jax.clear_caches()
    gc.collect()


# The longest test files, longest first (seconds under `-n 2` on a 2-core CPU, from a full run's
# JUnit report). xdist's `--dist loadfile` hands whole files to the workers in collection order,
# so starting these first keeps one worker from running a long file alone at the end (longest
# processing time first); the other files keep their order after them.
LONGEST_FIRST = (
    "test_sharded_inference.py",  # 413 s
    "test_shared_prefix.py",  # 226
    "test_search.py",  # 215
    "test_reference_training.py",  # 177
    "test_train_steps.py",  # 154
    "test_attention_fused.py",  # 148
    "test_sampler.py",  # 147
    "test_dialogue_cache.py",  # 141
    "test_moe_expert_parallel.py",  # 140
    "test_decode_layout.py",  # 125
    "test_search_resume.py",  # 120
    "test_replicate.py",  # 111
)


def pytest_collection_modifyitems(session, config, items):
    rank = {name: i for i, name in enumerate(LONGEST_FIRST)}
    items.sort(key=lambda item: rank.get(item.path.name, len(rank)))  # stable: order within a file kept
