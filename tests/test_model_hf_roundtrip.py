"""Our params -> save_hf -> transformers loads them as is -> same logits (also after vocab growth)."""

import json

import jax
import numpy as np
import pytest
import torch
import transformers

from hf_oracle import CASES, hf_logits, make_hf_model
from sage_jax import model

TOL = 1e-5


def _ours_vs_transformers(cfg, params, out_dir, seq=10):
    model.save_hf(out_dir, cfg, params, max_shard_bytes=64 * 1024)  # small cap: forces several shards
    hf = transformers.AutoModelForCausalLM.from_pretrained(out_dir, dtype=torch.float32).eval()
    tokens = np.random.default_rng(0).integers(0, cfg.vocab_size, size=(2, seq), dtype=np.int32)
    ours, _ = model.forward(cfg, params, tokens)
    theirs = hf_logits(hf, tokens)
    assert ours.shape == theirs.shape
    return float(np.max(np.abs(np.asarray(ours) - theirs)))


@pytest.mark.parametrize("case", sorted(CASES))
def test_roundtrip_each_family(case, tmp_path):
    make_hf_model(case).save_pretrained(tmp_path / "src")
    cfg, params = model.load_hf(tmp_path / "src")
    assert _ours_vs_transformers(cfg, params, tmp_path / "out") <= TOL
    index = json.loads((tmp_path / "out" / "model.safetensors.index.json").read_text())
    assert len(set(index["weight_map"].values())) > 1, "expected a sharded export"
    cfg2, params2 = model.load_hf(tmp_path / "out")
    assert cfg2 == cfg
    jax.tree.map(np.testing.assert_array_equal, params2, params)


@pytest.mark.parametrize("tied", [True, False])
def test_roundtrip_after_vocab_growth_with_padding(tied, tmp_path):
    case = "llama3_tied" if tied else "llama_untied"
    make_hf_model(case).save_pretrained(tmp_path / "src")
    cfg, params = model.load_hf(tmp_path / "src")
    cfg2, params2 = model.grow_vocab(cfg, params, cfg.vocab_size + 5, pad_to_multiple_of=64)
    assert cfg2.vocab_size == 133 and cfg2.embed_rows == 192 and params2["embed"].shape[0] == 192
    # Old tokens keep their logits; new rows start at the mean embedding.
    tokens = np.arange(12, dtype=np.int32)[None]
    before, _ = model.forward(cfg, params, tokens)
    after, _ = model.forward(cfg2, params2, tokens)
    assert after.shape[-1] == 133
    np.testing.assert_allclose(after[..., :128], before, atol=TOL)
    np.testing.assert_allclose(params2["embed"][130], np.mean(params["embed"], axis=0), atol=1e-6)
    assert _ours_vs_transformers(cfg2, params2, tmp_path / "out") <= TOL
    hf_cfg = json.loads((tmp_path / "out" / "config.json").read_text())
    assert hf_cfg["vocab_size"] == 133  # the padding is stripped on export


def test_bfloat16_params_export_in_bfloat16(tmp_path):
    make_hf_model("qwen2").save_pretrained(tmp_path / "src")
    cfg, params = model.load_hf(tmp_path / "src", param_dtype="bfloat16")
    assert params["layers"]["q_proj"].dtype == np.dtype("bfloat16")
    model.save_hf(tmp_path / "out", cfg, params)
    hf = transformers.AutoModelForCausalLM.from_pretrained(tmp_path / "out")
    assert hf.dtype == torch.bfloat16


def test_missing_tensor_error_names_file_and_tensor(tmp_path):
    from safetensors.numpy import load_file, save_file

    make_hf_model("llama_untied").save_pretrained(tmp_path)
    tensors = load_file(tmp_path / "model.safetensors")
    del tensors["model.layers.1.mlp.up_proj.weight"]
    save_file(tensors, tmp_path / "model.safetensors")
    with pytest.raises(KeyError, match=r"model\.layers\.1\.mlp\.up_proj\.weight"):
        model.load_hf(tmp_path)
