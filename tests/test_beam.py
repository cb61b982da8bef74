"""Beam search equals transformers' beam search (sequences, order and scores)."""

import tempfile

import numpy as np
import pytest
import torch

from hf_oracle import make_hf_model
from sage_jax import model, rollout

# With this tiny model, prompts and stop token, some hypotheses end on the stop token and some
# run to max_new_tokens, so both finishing paths (and the length convention) are exercised.
EOS = 62


def sharpen(hf, factor=4.0):
    """Scale the random matrices so next-token distributions are peaked (clear argmax margins)."""
    with torch.no_grad():
        for _, p in hf.named_parameters():
            if p.ndim >= 2:
                p.mul_(factor)
    return hf


@pytest.fixture(scope="module")
def tiny():
    hf = sharpen(make_hf_model("llama_untied"))
    with tempfile.TemporaryDirectory() as d:
        hf.save_pretrained(d)
        cfg, params = model.load_hf(d)
    rng = np.random.default_rng(0)
    prompts = [rng.integers(3, 128, size=n).tolist() for n in (5, 9, 3)]
    return hf, cfg, params, prompts


def hf_beam(hf, prompt, *, eos, pad, **kw):
    out = hf.generate(torch.tensor([prompt]), num_beams=4, num_return_sequences=4, do_sample=False, eos_token_id=eos,
                      pad_token_id=pad, output_scores=True, return_dict_in_generate=True, **kw)
    return out.sequences[:, len(prompt):].tolist(), out.sequences_scores.tolist()


def assert_same_nbest(ours, seqs, scores, fill):
    assert len(ours) == len(seqs)
    for h, s, sc in zip(ours, seqs, scores):
        # HF pads finished hypotheses to a common length with `pad_token_id or eos_token_id`.
        assert h.tokens + [fill] * (len(s) - len(h.tokens)) == s
        assert abs(h.score - sc) <= 1e-4 * max(1.0, abs(sc)), (h.score, sc)


@pytest.mark.parametrize("length_penalty, early_stopping, max_new, expected_reasons", [
    (0.7, True, 8, {"stop", "length"}),
    (1.5, True, 8, {"stop", "length"}),
    (2.0, "never", 8, {"length"}),  # a strong penalty favours the longest hypotheses
    (-0.5, False, 3, {"stop", "length"}),
])
def test_beam_matches_transformers_tiny(tiny, length_penalty, early_stopping, max_new, expected_reasons):
    hf, cfg, params, prompts = tiny
    ours = rollout.beam_search(cfg, params, prompts, num_beams=4, max_new_tokens=max_new,
                               length_penalty=length_penalty, early_stopping=early_stopping, stop_token_ids=[EOS])
    reasons = set()
    for p, hyps in zip(prompts, ours):
        seqs, scores = hf_beam(hf, p, eos=EOS, pad=0, max_new_tokens=max_new, length_penalty=length_penalty,
                               early_stopping=early_stopping)
        assert_same_nbest(hyps, seqs, scores, fill=EOS)  # pad 0 is falsy, so HF fills with eos
        reasons |= {h.finish_reason for h in hyps}
        assert [h.score for h in hyps] == sorted((h.score for h in hyps), reverse=True)
    assert reasons == expected_reasons


def test_beam_num_return_sequences_and_errors(tiny):
    _, cfg, params, prompts = tiny
    kw = dict(max_new_tokens=8, length_penalty=0.7, early_stopping=True, stop_token_ids=[EOS])
    full = rollout.beam_search(cfg, params, prompts, **kw)
    top2 = rollout.beam_search(cfg, params, prompts, num_return_sequences=2, **kw)
    assert [[h.tokens for h in hyps] for hyps in top2] == [[h.tokens for h in hyps[:2]] for hyps in full]
    with pytest.raises(ValueError):
        rollout.beam_search(cfg, params, prompts, num_return_sequences=5)
    with pytest.raises(ValueError):
        rollout.beam_search(cfg, params, prompts, early_stopping="sometimes")


@pytest.mark.slow
def test_beam_matches_transformers_smollm2(smollm2_dir, smollm2_hf):
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(smollm2_dir)
    questions = ["What is 2+2?", "What is the capital of France?"]
    prompts = [tok.apply_chat_template([{"role": "user", "content": q}], add_generation_prompt=True, return_dict=False)
               for q in questions]
    cfg, params = model.load_hf(smollm2_dir)
    ours = rollout.beam_search(cfg, params, prompts, num_beams=4, max_new_tokens=12, length_penalty=0.8,
                               early_stopping=True)
    for p, hyps in zip(prompts, ours):
        seqs, scores = hf_beam(smollm2_hf, p, eos=2, pad=2, max_new_tokens=12, length_penalty=0.8, early_stopping=True)
        assert_same_nbest(hyps, seqs, scores, fill=2)
    # short answers: some hypotheses end on <|im_end|> within 12 tokens, others run to the limit
    assert {h.finish_reason for hyps in ours for h in hyps} == {"stop", "length"}
