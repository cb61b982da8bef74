"""Per-dialogue KV caches kept across turns (rollout.dialogue_cache): growing a dialogue through
its cache equals re-prefilling the whole history each turn; latent-first children hold distinct
actions; a full cache is reported; pooled rows are reused; compile counts stay bounded."""

import functools

import pytest

from sage_jax import rollout
from sage_jax.rollout import dialogue_cache as DC
from sage_jax.rollout.compiles import CompileCounter
from sage_jax.rollout.policy import load_policy
from sage_jax.rollout.sampling import SamplingParams
from sage_jax.rollout.selfplay import Episode

GREEDY = SamplingParams.greedy_params
SEEDS = ["I failed my driving test today.", "My cat knocked over my coffee."]


@functools.lru_cache(maxsize=None)
def _policy(path):
    return load_policy(str(path))


def _reference_dialogues(policy, turns, max_new, user_max_new):
    """Re-prefill the whole history every turn (rollout.generate on the full encoding)."""
    eps = [Episode.start(f"d{i}", s) for i, s in enumerate(SEEDS)]
    log = []
    for t in range(turns):
        live = [e for e in eps if not e.done]
        gens = rollout.generate(policy.cfg, policy.params, [policy.encode_chat(e.assistant_view) for e in live],
                                GREEDY(max_new))
        for e, g in zip(live, gens):
            log.append((t, e.id, "a", g.tokens))
            e.add_assistant(policy.decode(g.tokens))
        if t + 1 < turns:
            live = [e for e in eps if not e.done]
            gens = rollout.generate(policy.cfg, policy.params, [policy.encode_chat(e.user_view) for e in live],
                                    GREEDY(user_max_new))
            for e, g in zip(live, gens):
                log.append((t, e.id, "u", g.tokens))
                e.add_user(policy.decode(g.tokens))
    return eps, log


def _cached_dialogues(policy, turns, max_new, user_max_new, k=1, stats=None):
    """The same game grown through one cache per dialogue and side (children forked, chosen kept)."""
    eps = [Episode.start(f"d{i}", s) for i, s in enumerate(SEEDS)]
    stats = stats or DC.CacheStats()
    apool = DC.DialoguePool(policy, len(eps), stats=stats)
    upool = DC.DialoguePool(policy, len(eps), stats=stats)
    log = []
    for t in range(turns):
        live = [e for e in eps if not e.done]
        cands = DC.branch(policy, apool, {e.id: e.assistant_view for e in live}, GREEDY(max_new),
                          DC.BranchConfig(mode="sample", k=k), seed=t)
        apool.commit({e.id: k - 1 for e in live})
        for e in live:
            c = cands[e.id][k - 1]
            log.append((t, e.id, "a", c["tokens"]))
            e.add_assistant(c["content"])
        if t + 1 < turns:
            live = [e for e in eps if not e.done]
            full = upool.sync({e.id: policy.encode_chat(e.user_view) for e in live})
            assert not full
            gens = upool.generate({e.id: GREEDY(user_max_new) for e in live}, seed=t)
            for e in live:
                log.append((t, e.id, "u", gens[e.id][0]))
                e.add_user(policy.decode(gens[e.id][0]))
    return eps, log, stats


def test_cached_dialogue_equals_full_reprefill_each_turn(tiny_dir):
    """A tiny random Llama with SmolLM2's real tokenizer and chat template, 4 turns, greedy."""
    policy = _policy(tiny_dir)
    ref_eps, ref = _reference_dialogues(policy, 4, 12, 8)
    for k in (1, 3):
        eps, got, stats = _cached_dialogues(policy, 4, 12, 8, k=k)
        assert got == ref, k
        assert [e.assistant_view for e in eps] == [e.assistant_view for e in ref_eps]
        # only new tokens were prefilled after the first turn: far fewer than the histories' sum
        total_history = sum(len(policy.encode_chat(e.assistant_view)) for e in eps)
        assert stats.reused_tokens > total_history
        # random-token replies do not always re-tokenize to the sampled ids: rewound, counted
        assert stats.rewinds >= 0 and stats.prefill_tokens > 0


@pytest.mark.slow
def test_cached_dialogue_equals_full_reprefill_smollm2(smollm2_dir):
    """The real model and tokenizer: 3 turns, greedy, K=2 children forked from the cache."""
    policy = _policy(smollm2_dir)
    ref_eps, ref = _reference_dialogues(policy, 3, 16, 10)
    eps, got, stats = _cached_dialogues(policy, 3, 16, 10, k=2)
    assert got == ref
    assert [e.assistant_view for e in eps] == [e.assistant_view for e in ref_eps]
    assert stats.prefill_tokens < sum(len(policy.encode_chat(e.assistant_view)) for e in eps) * 3


def test_rewind_when_the_encoding_is_not_an_extension(tiny_dir):
    policy = _policy(tiny_dir)
    pool = DC.DialoguePool(policy, 1)
    a = policy.encode_chat([{"role": "user", "content": "hello there"}])
    b = policy.encode_chat([{"role": "system", "content": "be brief"}, {"role": "user", "content": "hello there"}])
    pool.sync({"x": a})
    pool.sync({"x": a + [50, 51]})  # an extension: appended, no rewind
    assert pool.stats.rewinds == 0 and pool.stats.prefill_tokens == len(a) + 2
    pool.sync({"x": b})  # the template re-rendered the start: rewound to the common prefix
    assert pool.stats.rewinds == 1
    got = pool.generate({"x": GREEDY(6, stop_token_ids=())}, seed=0)["x"][0]
    ref = rollout.generate(policy.cfg, policy.params, [b], GREEDY(6, stop_token_ids=()))[0].tokens
    assert got == ref


def test_cache_full_is_reported_never_truncated(tiny_dir):
    policy = _policy(tiny_dir)
    pool = DC.DialoguePool(policy, 2, max_cache_len=64)
    long = list(range(100, 170))  # 70 tokens > 64
    short = list(range(100, 140))  # 40 tokens: fits, but 40 more do not
    assert pool.sync({"long": long, "short": short}) == ["long"]
    assert pool.stats.cache_full == 1
    toks, reason = pool.generate({"short": GREEDY(40, stop_token_ids=())}, seed=0)["short"]
    assert reason == "cache_full" and len(toks) == 64 - 40 + 1
    ref = rollout.generate(policy.cfg, policy.params, [short], GREEDY(40, stop_token_ids=()))[0].tokens
    assert toks == ref[: len(toks)]


def test_pooled_rows_are_reused_across_batches(tiny_dir):
    policy = _policy(tiny_dir)
    pool = DC.DialoguePool(policy, 2)
    for batch in range(3):
        keys = [f"b{batch}_{i}" for i in range(2)]
        pool.sync({key: policy.encode_chat([{"role": "user", "content": f"hi {key}"}]) for key in keys})
        pool.generate({key: GREEDY(4) for key in keys}, seed=batch)
        pool.release(keys)
    assert pool.allocations == 1 and pool.rows == 2
    assert pool.rows_used == [0, 1] * 3  # the same two rows, every batch


def test_duplicate_actions_are_found_and_resampled():
    assert DC.duplicates({"a": ["x", "y", "x", "x"], "b": ["p", "q"]}) == [("a", 2), ("a", 3)]
    # the search loop: rounds resample only the duplicates, until K distinct or tries run out
    script = iter([{("a", 2): "z", ("a", 3): "x"}, {("a", 3): "w"}])
    keys = {("a", j): v for j, v in enumerate(["x", "y", "x", "x"])}
    for _ in range(3):
        dup = DC.duplicates({"a": [keys["a", j] for j in range(4)]})
        if not dup:
            break
        keys.update(next(script))
    assert sorted(keys.values()) == ["w", "x", "y", "z"]


def test_latent_first_children_hold_distinct_actions(tiny_dir):
    """On a tiny random model the action blocks are random text; latent-first still gives each
    child its own action and the shared state prefix, and enumerate pins K distinct values."""
    policy = _policy(tiny_dir)
    eps = [Episode.start(f"d{i}", s) for i, s in enumerate(SEEDS)]
    sp = SamplingParams.paper(max_new_tokens=8)
    pool = DC.DialoguePool(policy, 2)
    cands = DC.branch(policy, pool, {e.id: e.assistant_view for e in eps}, sp,
                      DC.BranchConfig(mode="latent", k=4, latent_max_new_tokens=12), seed=0)
    for e in eps:
        cs = cands[e.id]
        assert len(cs) == 4
        state = cs[0]["content"].split("}")[0]
        assert state.startswith("{u_motivation:") and all(c["content"].startswith(state) for c in cs)
        assert len({c["content"][len(state):][:40] for c in cs}) == 4
    pool.commit({e.id: 0 for e in eps})
    cands = DC.branch(policy, pool, {e.id: e.assistant_view for e in eps}, sp,
                      DC.BranchConfig(mode="enumerate", k=4, vocabulary=("a", "b", "c", "d", "e")), seed=1)
    for e in eps:
        assert len({c["pinned"]["a_motivation"] for c in cands[e.id]}) == 4


def test_eight_turn_search_compiles_a_bounded_number_of_programs(tiny_dir, tmp_path):
    from sage_jax.search.tree import SearchConfig, run_search

    cfg = SearchConfig(model=str(tiny_dir), num_seeds=2, turns=8, k=2, max_new_tokens=8, user_max_new_tokens=6,
                       latent_max_new_tokens=8, output_dir=str(tmp_path / "s"), batch_seeds=2)
    summary = run_search(cfg)
    assert summary["searched"] == 2
    comp = summary["compiles"]
    # one program per shape: prefill chunks (2 widths x parent/children rows), decode (state,
    # children, user), fork and select, per cache-length bucket (the cache starts at what the first
    # turn needs and doubles as the dialogues grow: a few buckets for a whole search)
    buckets = 1 + summary["cache"]["grows"]
    assert 1 <= buckets <= 3 and comp["count"] <= 11 * buckets, comp
    assert summary["cache"]["prefill_tokens"] > 0
    # another search of the same shapes (new pools, next seeds) compiles nothing new, except a
    # cache growth between buckets the first search did not cross
    with CompileCounter() as cc:
        again = run_search(cfg.__class__(**{**cfg.__dict__, "num_seeds": 4}))
    assert again["searched"] == 2 and cc.count <= 2, cc.summary()
    assert set(cc.by_function) <= {"jit(grow)", "jit(shrink)"}, cc.summary()


def test_a_few_rows_decode_compacted_and_equal_in_place(tiny_dir):
    """Resampling a few rows of many decodes just those rows (a copy, then put back): the tokens
    are those of decoding them among all rows, sampled ones too, and the other rows are untouched."""
    policy = _policy(tiny_dir)
    sp = SamplingParams(temperature=1.0, max_new_tokens=6)
    prompts = [policy.encode_chat([{"role": "user", "content": f"hello {i}"}]) for i in range(8)]
    big = DC.RowCache(policy.cfg, policy.params, 8, limit=512, capacity=256)
    big.sync(dict(enumerate(prompts)))
    small = DC.RowCache(policy.cfg, policy.params, 2, limit=512, capacity=256)
    small.sync({0: prompts[3], 1: prompts[6]})
    before = {r: list(big.ids[r]) for r in range(8)}
    calls = []
    orig = big._generate_compact
    big._generate_compact = lambda *a, **k: calls.append(1) or orig(*a, **k)
    got = big.generate({3: sp, 6: sp}, seed=5, row_seeds={3: 30, 6: 60})
    assert calls  # 2 of 8 rows: compacted
    ref = small.generate({0: sp, 1: sp}, seed=5, row_seeds={0: 30, 1: 60})
    assert got[3] == ref[0] and got[6] == ref[1]
    assert all(big.ids[r] == before[r] for r in range(8) if r not in (3, 6))
    # the rows put back continue exactly: one more greedy token on both caches
    g = GREEDY(3, stop_token_ids=())
    big.sync({3: big.ids[3] + got[3][0][-1:]})
    small.sync({0: small.ids[0] + ref[0][0][-1:]})
    assert big.generate({3: g}, seed=0)[3] == small.generate({0: g}, seed=0)[0]
