"""The sampler: greedy equals transformers, the sampling distribution is the processed softmax,
seeded runs are reproducible, prefix sharing equals independent runs, a full cache is reported."""

import functools
import tempfile

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
from transformers.generation.logits_process import (
    RepetitionPenaltyLogitsProcessor,
    TemperatureLogitsWarper,
    TopKLogitsWarper,
    TopPLogitsWarper,
)

from hf_oracle import CASES, make_hf_model
from sage_jax import model, rollout
from sage_jax.rollout import sampler as S
from sage_jax.rollout.sampling import Processing, SamplingParams, argmax, processed_probs, update_presence

GREEDY = SamplingParams.greedy_params


def sharpen(hf, factor=4.0):
    """Scale the random matrices so greedy argmax margins dwarf float32 noise."""
    with torch.no_grad():
        for _, p in hf.named_parameters():
            if p.ndim >= 2:
                p.mul_(factor)
    return hf


@functools.lru_cache(maxsize=None)
def tiny_hf(case):
    hf = sharpen(make_hf_model(case))
    with tempfile.TemporaryDirectory() as d:
        hf.save_pretrained(d)
        cfg, params = model.load_hf(d)
    return hf, cfg, params


@functools.lru_cache(maxsize=None)
def tiny():
    """A tiny random model of our own (no HF) for the sampling tests."""
    cfg = model.ModelConfig(family="llama", vocab_size=128, hidden_size=64, intermediate_size=96, num_layers=2,
                            num_heads=4, num_kv_heads=2, head_dim=16, eos_token_id=2)
    return cfg, model.init_params(cfg, jax.random.key(0), std=0.2)


def hf_greedy(hf, prompt, max_new, eos, **kw):
    out = hf.generate(torch.tensor([prompt]), do_sample=False, max_new_tokens=max_new, eos_token_id=eos,
                      pad_token_id=eos, **kw)
    return out[0, len(prompt):].tolist()


PROMPT_LENS = (7, 3, 12)


# ---------------------------------------------------------------------------------------------
# Greedy parity with transformers


@pytest.mark.parametrize("case", list(CASES))
def test_greedy_matches_transformers_per_family(case):
    hf, cfg, params = tiny_hf(case)
    rng = np.random.default_rng(1)
    prompts = [rng.integers(3, 128, size=n).tolist() for n in PROMPT_LENS]
    max_new = 10
    # Pick a stop token that some row emits mid-way, so stopping and finished-row padding are exercised.
    free = S.generate(cfg, params, prompts, GREEDY(max_new, stop_token_ids=()))
    r, i = next((r, i) for i in range(2, max_new) for r, g in enumerate(free) if g.tokens[i] not in g.tokens[:i])
    eos = free[r].tokens[i]
    ours = S.generate(cfg, params, prompts, GREEDY(max_new, stop_token_ids=(eos,)))
    assert ours[r].tokens == free[r].tokens[: i + 1] and ours[r].finish_reason == "stop"
    for p, g in zip(prompts, ours):
        theirs = hf_greedy(hf, p, max_new, eos)  # HF run on each prompt alone (it would left-pad)
        assert g.tokens == theirs, (case, p)
        assert g.finish_reason == ("stop" if theirs[-1] == eos else "length")


def test_greedy_repetition_penalty_matches_transformers():
    hf, cfg, params = tiny_hf("llama3_tied")
    prompts = [[5, 9, 9, 17, 33, 5], [100, 7]]
    ours = S.generate(cfg, params, prompts, GREEDY(12, stop_token_ids=(), repetition_penalty=1.3))
    for p, g in zip(prompts, ours):
        assert g.tokens == hf_greedy(hf, p, 12, eos=None, repetition_penalty=1.3)


@pytest.mark.slow
def test_greedy_matches_transformers_smollm2(smollm2_dir, smollm2_hf):
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(smollm2_dir)
    chats = [
        [{"role": "user", "content": "I failed my driving test today and I feel awful."},
         {"role": "assistant", "content": "Oh no, that's rough. What happened during the test?"},
         {"role": "user", "content": "I panicked at the roundabout and stalled twice."}],
        [{"role": "user", "content": "What is the capital of France?"}],
    ]
    prompts = [tok.apply_chat_template(c, add_generation_prompt=True, return_dict=False) for c in chats]
    cfg, params = model.load_hf(smollm2_dir)
    ours = S.generate(cfg, params, prompts, GREEDY(20), tokenizer=tok)
    for p, g in zip(prompts, ours):
        assert g.tokens == hf_greedy(smollm2_hf, p, 20, eos=2)
    assert ours[1].finish_reason == "stop" and "Paris" in ours[1].text
    assert ours[0].finish_reason == "length" and len(ours[0].tokens) == 20


# ---------------------------------------------------------------------------------------------
# Logit processors against transformers' own processors


def hf_process(logits, input_ids, *, penalty=1.0, temperature=1.0, top_k=0, top_p=1.0):
    scores = torch.tensor(np.asarray(logits))
    ids = torch.tensor(np.asarray(input_ids), dtype=torch.long)
    if penalty != 1.0:
        scores = RepetitionPenaltyLogitsProcessor(penalty)(ids, scores)
    if temperature != 1.0:
        scores = TemperatureLogitsWarper(temperature)(ids, scores)
    if top_k:
        scores = TopKLogitsWarper(top_k)(ids, scores)
    if top_p < 1.0:
        scores = TopPLogitsWarper(top_p)(ids, scores)
    return torch.softmax(scores, -1).numpy()


def test_repetition_penalty_equals_hf_processor():
    rng = np.random.default_rng(0)
    logits = rng.normal(size=(4, 300)).astype(np.float32) * 3  # both signs
    ids = rng.integers(0, 300, size=(4, 17))
    presence = update_presence(jnp.zeros((4, 300), bool), jnp.asarray(ids))
    for pen in (1.1, 1.3, 0.8):
        ours = rollout.apply_repetition_penalty(jnp.asarray(logits), presence, jnp.full((4,), pen))
        theirs = RepetitionPenaltyLogitsProcessor(pen)(torch.tensor(ids), torch.tensor(logits)).numpy()
        np.testing.assert_array_equal(np.asarray(ours), theirs)


SETTINGS = {
    "temperature": dict(temperature=0.7),
    "top_k": dict(top_k=5),
    "top_p": dict(top_p=0.6),
    "paper": dict(temperature=0.95, top_k=50, top_p=0.7, penalty=1.1),
}


@pytest.mark.parametrize("name", list(SETTINGS))
def test_processed_distribution_equals_hf(name):
    kw = SETTINGS[name]
    rng = np.random.default_rng(2)
    logits = (rng.normal(size=(3, 200)) * 2.5).astype(np.float32)
    ids = rng.integers(0, 200, size=(3, 9))
    sp = SamplingParams(temperature=kw.get("temperature", 1.0), top_k=kw.get("top_k", 0),
                        top_p=kw.get("top_p", 1.0), repetition_penalty=kw.get("penalty", 1.0))
    proc = Processing.of(sp, 200)
    ours = processed_probs(proc, jnp.asarray(logits), presence=update_presence(jnp.zeros((3, 200), bool),
                           jnp.asarray(ids)), penalty=jnp.full((3,), sp.repetition_penalty),
                           temperature=jnp.full((3,), sp.temperature), top_p=jnp.full((3,), sp.top_p))
    theirs = hf_process(logits, ids, **kw)
    np.testing.assert_allclose(np.asarray(ours), theirs, atol=2e-6)
    np.testing.assert_array_equal(np.asarray(ours) > 0, theirs > 0)  # the same support


def test_nucleus_among_candidates_equals_the_full_sort():
    """Top-p without top-k looks for the nucleus among the largest logits first, in tiers
    (`nucleus`, here 16 and then 64 of 200): peaked rows are covered by the first tier, a
    wider row sends the batch to the second, a flat row to the full sort, and a row with top_p 1
    keeps everything. Each way the kept set and the processed logits are HF's
    (`TopPLogitsWarper`)."""
    from sage_jax.rollout.sampling import nucleus

    rng = np.random.default_rng(5)
    peaked = (rng.normal(size=(3, 200)) * 6).astype(np.float32)
    wider = (np.random.default_rng(7).normal(size=(1, 200)) * 3).astype(np.float32)
    flat = (rng.normal(size=(1, 200)) * 0.3).astype(np.float32)

    def mass(row, k):  # of the k largest
        p = np.exp(row - row.max()) / np.exp(row - row.max()).sum()
        return np.sort(p)[::-1][:k].sum()

    # which path runs: every peaked row's 16 largest hold its top_p; the wider row's 64 largest
    # (but not its 16) hold 0.95; the flat row's 64 largest do not hold 0.9
    assert min(mass(r, 16) for r in peaked) > 0.95 and mass(wider[0], 16) < 0.95 < mass(wider[0], 64)
    assert mass(flat[0], 64) < 0.9
    for logits, top_p in ((peaked, (0.9, 0.6, 0.95)),  # among the first tier
                          (np.concatenate([peaked, wider]), (0.9, 0.6, 0.95, 0.95)),  # the second tier
                          (np.concatenate([peaked, wider, flat]), (0.9, 0.6, 0.95, 0.95, 0.9)),  # the full sort
                          (peaked, (0.9, 1.0, 0.6))):  # a row keeping everything
        ours = np.asarray(jax.jit(nucleus, static_argnums=2)(jnp.asarray(logits), jnp.asarray(top_p), (16, 64)))
        for row, p in enumerate(top_p):
            expected = logits[row] if p >= 1.0 else TopPLogitsWarper(p)(
                None, torch.tensor(logits[row: row + 1])).numpy()[0]
            np.testing.assert_array_equal(np.isfinite(ours[row]), np.isfinite(expected))
            np.testing.assert_array_equal(ours[row][np.isfinite(ours[row])], expected[np.isfinite(expected)])
    assert np.isfinite(ours[1]).all() and np.isfinite(ours[0]).sum() < 16


def test_nucleus_sample_draws_the_nucleus_whichever_tier_runs():
    """Top-p without top-k draws by inverse CDF among the candidates (`nucleus_sample`, tiers 16
    and 64 of 200 here): 4096 draws of each row match HF's nucleus distribution and never leave
    it, and each row's draw is the same alone (its own tier) as in a batch that needs the next
    tier or the full sort; a row with top_p 1 samples the whole vocabulary."""
    from sage_jax.rollout.sampling import nucleus_sample

    rng = np.random.default_rng(5)
    peaked = (rng.normal(size=(3, 200)) * 6).astype(np.float32)  # as in the test above: tier 16
    wider = (np.random.default_rng(7).normal(size=(1, 200)) * 3).astype(np.float32)  # tier 64
    flat = (rng.normal(size=(1, 200)) * 0.3).astype(np.float32)  # the full sort
    logits = np.concatenate([peaked, wider, flat, wider])
    top_p = np.array([0.9, 0.6, 0.95, 0.95, 0.9, 1.0], np.float32)
    draw = jax.jit(nucleus_sample, static_argnums=3)
    n = 4096
    keys = jax.random.split(jax.random.key(0), n)
    for row, p in enumerate(top_p):
        tokens = np.asarray(draw(jnp.asarray(np.repeat(logits[row: row + 1], n, 0)), jnp.full((n,), p), keys,
                                 (16, 64)))
        expected = torch.softmax(TopPLogitsWarper(p)(None, torch.tensor(logits[row: row + 1]))
                                 if p < 1 else torch.tensor(logits[row: row + 1]), -1).numpy()[0]
        freq = np.bincount(tokens, minlength=200) / n
        assert np.all(freq[expected == 0] == 0), f"row {row}: drawn outside the nucleus"
        assert np.all(np.abs(freq - expected) <= 5 * np.sqrt(expected * (1 - expected) / n) + 2e-3), row
    for seed in range(8):  # the same key gives a row the same token in any batch
        k = jax.random.split(jax.random.key(100 + seed), len(top_p))
        together = np.asarray(draw(jnp.asarray(logits), jnp.asarray(top_p), k, (16, 64)))
        alone = [int(draw(jnp.asarray(logits[r: r + 1]), jnp.asarray(top_p[r: r + 1]), k[r: r + 1], (16, 64))[0])
                 for r in range(len(top_p))]
        assert together.tolist() == alone


@pytest.mark.parametrize("name", list(SETTINGS))
def test_sampled_first_token_frequencies(name):
    """4096 first tokens (K continuations of one prompt) against the exact processed softmax.

    Tolerance per token: |freq - p| <= 5 * sqrt(p (1 - p) / n) + 2e-3 (a 5-sigma binomial
    bound); tokens outside the support (top-k / nucleus) must never be drawn.
    """
    kw = SETTINGS[name]
    cfg, params = tiny()
    prompt = [5, 6, 7, 8, 9, 5]
    n = 4096
    sp = SamplingParams(temperature=kw.get("temperature", 1.0), top_k=kw.get("top_k", 0),
                        top_p=kw.get("top_p", 1.0), repetition_penalty=kw.get("penalty", 1.0),
                        max_new_tokens=1, stop_token_ids=())
    gens = S.generate(cfg, params, [prompt], sp, seed=11, num_continuations=n)
    counts = np.bincount([g.tokens[0] for g in gens], minlength=cfg.vocab_size)
    logits = np.asarray(model.forward(cfg, params, jnp.asarray([prompt]))[0][:, -1])
    expected = hf_process(logits, [prompt], **kw)[0]
    freq = counts / n
    assert np.all(counts[expected == 0] == 0), "sampled outside the support"
    tol = 5 * np.sqrt(expected * (1 - expected) / n) + 2e-3
    assert np.all(np.abs(freq - expected) <= tol), np.max(np.abs(freq - expected) - tol)
    if kw.get("top_k"):
        assert np.count_nonzero(counts) <= kw["top_k"]


# ---------------------------------------------------------------------------------------------
# Seeds, prefix sharing, limits


def test_seeded_sampling_is_reproducible_and_batch_independent():
    cfg, params = tiny()
    a, b = [5, 6, 7, 8], [40, 41, 42, 43, 44, 45, 46]
    sp = SamplingParams.paper(max_new_tokens=12, stop_token_ids=())
    ab = S.generate(cfg, params, [a, b], sp, seed=3)
    assert [g.tokens for g in ab] == [g.tokens for g in S.generate(cfg, params, [a, b], sp, seed=3)]
    assert [g.tokens for g in ab] != [g.tokens for g in S.generate(cfg, params, [a, b], sp, seed=4)]
    # a row's randomness follows its row seed, not its batch or position in the batch
    assert S.generate(cfg, params, [a], sp, seed=3)[0].tokens == ab[0].tokens
    ba = S.generate(cfg, params, [b, a], sp, seed=3, row_seeds=[1, 0])
    assert [ba[1].tokens, ba[0].tokens] == [g.tokens for g in ab]


def test_continuations_equal_independent_runs():
    cfg, params = tiny()
    p0, p1 = [5, 6, 7, 8, 9], [33, 34, 35]
    sp = SamplingParams.paper(max_new_tokens=10, stop_token_ids=(), logprobs=True)
    shared = S.generate(cfg, params, [p0, p1], sp, seed=9, num_continuations=4)
    indep = S.generate(cfg, params, [p0] * 4 + [p1] * 4, sp, seed=9)
    assert [g.tokens for g in shared] == [g.tokens for g in indep]
    np.testing.assert_allclose([g.logprobs for g in shared], [g.logprobs for g in indep], atol=1e-5)
    assert [(g.prompt_index, g.continuation_index) for g in shared] == [(i, j) for i in range(2) for j in range(4)]
    assert len({tuple(g.tokens) for g in shared[:4]}) == 4  # the continuations differ


def test_branches_of_a_shared_prefix_equal_independent_runs():
    cfg, params = tiny()
    prefix = [5, 6, 7, 8, 9, 10, 11]
    suffixes = [[], [12], [40, 41, 42], [99] * 9]
    sp = SamplingParams.paper(max_new_tokens=10, stop_token_ids=())
    shared = S.generate_branches(cfg, params, prefix, suffixes, sp, seed=2)
    indep = S.generate(cfg, params, [prefix + s for s in suffixes], sp, seed=2)
    assert [g.tokens for g in shared] == [g.tokens for g in indep]
    assert len({tuple(g.tokens) for g in shared}) == len(suffixes)


def test_cache_full_is_reported_not_truncated():
    cfg, params = tiny()
    prompt = list(range(10, 20))
    sp = GREEDY(16, stop_token_ids=())
    free = S.generate(cfg, params, [prompt], sp)[0]
    assert free.finish_reason == "length" and len(free.tokens) == 16
    full = S.generate(cfg, params, [prompt, prompt[:4]], sp, max_cache_len=len(prompt) + 5, max_new_tokens=[16, 12])
    # 5 free slots: 5 tokens are fed back, the 6th is sampled from the last logits, then no room.
    assert full[0].finish_reason == "cache_full" and full[0].tokens == free.tokens[:6]
    # the short row fits: 4 prompt + 11 fed-back tokens = 15 slots, the 12th token needs none
    assert full[1].finish_reason == "length" and len(full[1].tokens) == 12
    with pytest.raises(ValueError, match="does not fit"):
        S.generate(cfg, params, [prompt], sp, max_cache_len=8)


def test_per_row_limits_logprobs_and_min_new_tokens():
    cfg, params = tiny()
    prompts = [[5, 6, 7], [8, 9, 10, 11]]
    gens = S.generate(cfg, params, prompts, GREEDY(9, stop_token_ids=(), logprobs=True), max_new_tokens=[3, 9])
    assert [len(g.tokens) for g in gens] == [3, 9] and {g.finish_reason for g in gens} == {"length"}
    # log-probs are the raw model's, teacher-forced
    seq = prompts[1] + gens[1].tokens
    logits = model.forward(cfg, params, jnp.asarray([seq]))[0][0]
    lp = np.asarray(jax.nn.log_softmax(logits, -1))
    ref = [lp[len(prompts[1]) - 1 + t, tok] for t, tok in enumerate(gens[1].tokens)]
    np.testing.assert_allclose(gens[1].logprobs, ref, atol=1e-4)
    # min_new_tokens masks the stop tokens: greedy would stop at once on its own first token
    first = gens[0].tokens[0]
    stopped = S.generate(cfg, params, prompts[:1], GREEDY(9, stop_token_ids=(first,)))[0]
    assert stopped.tokens == [first] and stopped.finish_reason == "stop"
    forced = S.generate(cfg, params, prompts[:1], GREEDY(9, stop_token_ids=(first,), min_new_tokens=4))[0]
    assert first not in forced.tokens[:4] and len(forced.tokens) >= 5


class CharTokenizer:
    """Token i decodes to the one character chr(ord('a') + i % 26)."""

    def decode(self, ids, skip_special_tokens=True):
        return "".join(chr(ord("a") + i % 26) for i in ids)


def test_stop_strings_cut_on_host():
    cfg, params = tiny()
    tok = CharTokenizer()
    base = S.generate(cfg, params, [[5, 6, 7]], GREEDY(12, stop_token_ids=()), tokenizer=tok)[0]
    text = base.text
    stop = text[4:6]
    pos = text.find(stop)
    cut = S.generate(cfg, params, [[5, 6, 7]], GREEDY(12, stop_token_ids=(), stop_strings=(stop, "zzzz")),
                     tokenizer=tok)[0]
    assert cut.finish_reason == "stop" and cut.stop_string == stop
    assert cut.text == text[:pos]
    assert cut.tokens == base.tokens[: pos + len(stop)]  # one char per token here
    with pytest.raises(ValueError, match="tokenizer"):
        S.generate(cfg, params, [[5, 6, 7]], GREEDY(4, stop_strings=("x",)))


def test_buckets_limit_recompilation():
    cfg, params = tiny()
    sp = SamplingParams(temperature=0.8, max_new_tokens=5, stop_token_ids=())
    S.generate(cfg, params, [[5, 6, 7]], sp)
    n_prefill, n_decode = S.prefill._cache_size(), S.decode._cache_size()
    # other prompt lengths / counts / max_new_tokens / temperatures inside the same buckets
    S.generate(cfg, params, [[5, 6, 7, 8, 9, 10, 11]], sp.replace(max_new_tokens=9, temperature=0.5))
    S.generate(cfg, params, [[9] * 15], sp, max_new_tokens=[16])
    assert (S.prefill._cache_size(), S.decode._cache_size()) == (n_prefill, n_decode)


def test_sampling_params_presets_and_validation():
    p = SamplingParams.paper()
    assert (p.temperature, p.top_k, p.top_p, p.repetition_penalty, p.max_new_tokens) == (0.95, 50, 0.7, 1.1, 512)
    assert GREEDY().greedy and not p.greedy
    with pytest.raises(ValueError):
        SamplingParams(top_p=0.0)
    with pytest.raises(ValueError):
        Processing.of([GREEDY(), p], 128)
    cfg, params = tiny()
    with pytest.raises(ValueError, match="empty"):
        S.generate(cfg, params, [[]], p)


def test_greedy_argmax_equals_jnp_argmax_on_ties_infs_and_nans():
    rng = np.random.default_rng(0)
    x = rng.integers(-3, 3, size=(9, 40)).astype(np.float32)  # many ties: the first maximum wins
    x[1] = -np.inf  # a fully masked row
    x[2, 7] = np.inf
    x[3, [5, 30]] = np.nan  # the first NaN, as jnp.argmax
    x[4, :] = np.nan
    x[5, -1] = 10.0
    np.testing.assert_array_equal(np.asarray(jax.jit(argmax)(jnp.asarray(x))), np.asarray(jnp.argmax(x, axis=-1)))
