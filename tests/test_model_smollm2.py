"""The real small model: our forward equals transformers on SmolLM2-135M-Instruct."""

import numpy as np
import pytest
import torch
from transformers import AutoTokenizer

from sage_jax import model

pytestmark = pytest.mark.slow


def test_smollm2_chat_prompt_matches_transformers(smollm2_dir, smollm2_hf):
    tok = AutoTokenizer.from_pretrained(smollm2_dir)
    chat = [
        {"role": "user", "content": "I failed my driving test today and I feel awful."},
        {"role": "assistant", "content": "Oh no, that's rough. What happened during the test?"},
        {"role": "user", "content": "I panicked at the roundabout and stalled twice."},
    ]
    ids = tok.apply_chat_template(chat, add_generation_prompt=True, return_dict=False)
    tokens = np.asarray(ids, np.int32)[None]
    assert tokens.shape[1] > 60  # a real multi-turn prompt, system prompt included

    cfg, params = model.load_hf(smollm2_dir)
    assert (cfg.num_layers, cfg.hidden_size, cfg.num_kv_heads, cfg.tie_word_embeddings) == (30, 576, 3, True)
    ours = np.asarray(model.forward(cfg, params, tokens)[0][0])
    with torch.no_grad():
        theirs = smollm2_hf(torch.tensor(tokens, dtype=torch.long)).logits[0].numpy()
    np.testing.assert_array_equal(ours.argmax(-1), theirs.argmax(-1))
    diff = np.max(np.abs(ours - theirs))
    assert diff <= 1e-3, f"max abs logit diff {diff:.3g}"
