"""Tiny random Hugging Face models (built by transformers itself) used as the test oracle."""

from __future__ import annotations

import numpy as np
import torch
import transformers

TINY = dict(
    vocab_size=128, hidden_size=64, intermediate_size=96, num_hidden_layers=2, num_attention_heads=4,
    num_key_value_heads=2, max_position_embeddings=256,
)

# One entry per acceptance case: (transformers config class, extra config fields).
CASES = {
    "llama3_tied": ("LlamaConfig", dict(
        tie_word_embeddings=True,
        rope_parameters=dict(rope_type="llama3", rope_theta=500000.0, factor=8.0, low_freq_factor=1.0,
                             high_freq_factor=4.0, original_max_position_embeddings=16))),
    "llama_untied": ("LlamaConfig", dict(tie_word_embeddings=False, attention_bias=True)),
    "mistral_sliding": ("MistralConfig", dict(sliding_window=4, head_dim=16)),
    "qwen2": ("Qwen2Config", dict(tie_word_embeddings=False)),
    "qwen3": ("Qwen3Config", dict(head_dim=32, tie_word_embeddings=True)),
    "mixtral": ("MixtralConfig", dict(num_local_experts=4, num_experts_per_tok=2)),
    "llama_linear_rope": ("LlamaConfig", dict(
        tie_word_embeddings=False, rope_parameters=dict(rope_type="linear", rope_theta=10000.0, factor=2.0))),
    "qwen2_sliding_layers": ("Qwen2Config", dict(use_sliding_window=True, sliding_window=4, max_window_layers=1,
                                                 tie_word_embeddings=True)),
}


def make_hf_model(case: str, seed: int = 0) -> transformers.PreTrainedModel:
    cls_name, extra = CASES[case]
    config = getattr(transformers, cls_name)(**TINY, **extra)
    torch.manual_seed(seed)
    model = transformers.AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    # Random init leaves norms at 1 and biases at 0; perturb them so the test sees them.
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "norm" in name or name.endswith("bias"):
                p.add_(0.1 * torch.randn_like(p))
    return model.eval()


def hf_logits(model, tokens: np.ndarray) -> np.ndarray:
    with torch.no_grad():
        return model(torch.tensor(np.asarray(tokens), dtype=torch.long)).logits.float().numpy()
