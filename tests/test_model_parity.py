"""Our forward equals transformers' (PyTorch CPU, float32) for every family."""

import numpy as np
import pytest

from hf_oracle import CASES, hf_logits, make_hf_model
from sage_jax import model


@pytest.mark.parametrize("case", sorted(CASES))
def test_logits_match_transformers(case, tmp_path):
    hf = make_hf_model(case)
    hf.save_pretrained(tmp_path)
    cfg, params = model.load_hf(tmp_path)
    tokens = np.random.default_rng(0).integers(0, cfg.vocab_size, size=(2, 12), dtype=np.int32)
    ours, _ = model.forward(cfg, params, tokens)
    diff = np.max(np.abs(np.asarray(ours) - hf_logits(hf, tokens)))
    assert diff <= 1e-4, f"{case}: max abs logit diff {diff:.3g}"
