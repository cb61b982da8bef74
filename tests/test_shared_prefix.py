"""Prefix-shared children (cascade attention): rows that attend to their parent row's cache as a
read-only prefix plus their own small cache give the logits of rows holding a full copy of the
prefix (model level), and a DialoguePool forking prefix-shared children gives the tokens and the
search trees of the copying fork (pool, search and mesh level)."""

import json

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from sage_jax import model
from test_model_cache_packing import tiny  # the same tiny Llama/Mistral and params

TOL = 2e-5




def _parents(cfg, params, lengths, sp, rng):
    """P parent rows prefilled (right-padded) on a cache of sp slots: (tokens, cache)."""
    toks = np.zeros((len(lengths), max(lengths)), np.int32)
    seg = np.zeros_like(toks)
    for i, n in enumerate(lengths):
        toks[i, :n] = rng.integers(0, cfg.vocab_size, n)
        seg[i, :n] = 1
    cache = model.init_cache(cfg, len(lengths), sp)
    _, cache = model.forward(cfg, params, toks, segment_ids=seg, cache=cache)
    return toks, cache


def _copied(cache, group, base, own_len):
    """Each parent row copied to its `group` children, filled to base[b], own_len more slots."""
    pad = ((0, 0), (0, 0), (0, 0), (0, own_len), (0, 0))
    return {"k": jnp.pad(jnp.repeat(cache["k"], group, axis=1), pad),
            "v": jnp.pad(jnp.repeat(cache["v"], group, axis=1), pad),
            "segment_ids": jnp.repeat(jnp.pad(cache["segment_ids"], ((0, 0), (0, own_len))), group, axis=0),
            "end": jnp.asarray(base, jnp.int32)}


def _chunk(rng, vocab, lengths, width):
    toks = np.zeros((len(lengths), width), np.int32)
    seg = np.zeros_like(toks)
    for i, n in enumerate(lengths):
        toks[i, :n] = rng.integers(0, vocab, n)
        seg[i, :n] = 1
    return toks, seg


@pytest.mark.parametrize("family", ["llama", "mistral"])
@pytest.mark.parametrize("bases", ["full", "mixed"])
@pytest.mark.parametrize("own_cache", ["stacked", "per_layer_transposed_keys", "per_layer_split_prefix"])
def test_prefix_shared_rows_equal_rows_on_a_copied_cache(family, bases, own_cache):
    """P=2 parents, G=3 children each: a T>1 chunk prefilled onto the own caches, then token by token
    decode; logits equal the children on full copies of their parents' caches (the mistral config
    has a sliding window of 5, which cuts into the prefix). The own caches are stacked, or (the
    decode layout at large batch) per-layer buffers with the keys stored [B, K, H, S]; with
    split_prefix the prefix is per-layer buffers too (what the decode loop hands the layers)."""
    cfg, params = tiny(family)
    rng = np.random.default_rng(0)
    lengths, sp, g, own = [9, 12], 16, 3, 16
    ptoks, pcache = _parents(cfg, params, lengths, sp, rng)
    base = [lengths[b // g] for b in range(2 * g)] if bases == "full" else [9, 4, 0, 12, 7, 1]
    prefix = {"k": pcache["k"], "v": pcache["v"], "base": jnp.asarray(base, jnp.int32)}
    shared = model.init_cache(cfg, 2 * g, own)
    shared_params = params
    if own_cache != "stacked":
        shared, shared_params = model.split_cache(shared, transpose_keys=True), model.decode_layout(params)
    if own_cache == "per_layer_split_prefix":
        prefix = model.split_cache(prefix)
        assert isinstance(prefix["k"], tuple) and len(prefix["v"]) == cfg.num_layers
    copied = _copied(pcache, g, base, own)
    step = jax.jit(model.forward, static_argnums=0)
    toks, seg = _chunk(rng, cfg.vocab_size, [5, 3, 6, 1, 4, 2], 6)
    a, shared = step(cfg, shared_params, toks, segment_ids=seg, cache=shared, prefix=prefix)
    b, copied = step(cfg, params, toks, segment_ids=seg, cache=copied)
    real = seg.astype(bool)
    np.testing.assert_allclose(np.asarray(a)[real], np.asarray(b)[real], atol=TOL, rtol=TOL)
    np.testing.assert_array_equal(shared["end"], seg.sum(1))
    np.testing.assert_array_equal(copied["end"], np.asarray(base) + seg.sum(1))
    for _ in range(4):
        nxt = rng.integers(0, cfg.vocab_size, (2 * g, 1)).astype(np.int32)
        a, shared = step(cfg, shared_params, nxt, cache=shared, prefix=prefix)
        b, copied = step(cfg, params, nxt, cache=copied)
        np.testing.assert_allclose(a, b, atol=TOL, rtol=TOL)
    # explicit positions (base + own slot) are the default
    pos = np.asarray(base)[:, None] + np.asarray(shared["end"])[:, None]
    c, _ = step(cfg, shared_params, nxt, positions=pos, cache=shared, prefix=prefix)
    d, _ = step(cfg, shared_params, nxt, cache=shared, prefix=prefix)
    np.testing.assert_array_equal(c, d)


def test_prefix_rows_equal_a_full_forward_of_their_history():
    """The same check against the cache-free forward of each child's whole token list."""
    cfg, params = tiny()
    rng = np.random.default_rng(1)
    ptoks, pcache = _parents(cfg, params, [7, 10], 16, rng)
    base = [7, 3, 10, 10]
    prefix = {"k": pcache["k"], "v": pcache["v"], "base": jnp.asarray(base, jnp.int32)}
    toks, seg = _chunk(rng, cfg.vocab_size, [4, 4, 4, 4], 4)
    logits, _ = model.forward(cfg, params, toks, segment_ids=seg, cache=model.init_cache(cfg, 4, 8), prefix=prefix)
    for r in range(4):
        full = np.concatenate([ptoks[r // 2, : base[r]], toks[r]])[None]
        ref, _ = model.forward(cfg, params, full)
        np.testing.assert_allclose(logits[r], ref[0, base[r]:], atol=TOL, rtol=TOL)


def test_a_prefix_needs_a_cache():
    cfg, params = tiny()
    with pytest.raises(ValueError, match="needs a cache"):
        model.forward(cfg, params, np.zeros((2, 1), np.int32),
                      prefix={"k": jnp.zeros((2, 1, 4, 2, 16)), "v": jnp.zeros((2, 1, 4, 2, 16)),
                              "base": jnp.zeros((2,), jnp.int32)})


# --- the dialogue pool ------------------------------------------------------------------------

def _policy(path):
    from sage_jax.rollout.policy import load_policy

    return _POLICIES.setdefault(str(path), load_policy(str(path)))


_POLICIES: dict = {}


def _pool_turns(policy, shared: bool, sp, turns: int = 3, k: int = 3, rows_check=None):
    """Latent-first turns of two dialogues through one pool: fork, a child synced to a target that
    diverges inside the shared prefix (then decoded), children decoded, commit (once a dialogue
    continues from the other's child), the next turn. Returns (log of tokens, pool)."""
    from sage_jax.rollout import dialogue_cache as DC

    pool = DC.DialoguePool(policy, 2, shared_prefix=shared)
    convs = {"a": [{"role": "user", "content": "I lost my job today."}], "b": [{"role": "user", "content": "Hi!"}]}
    greedy = DC.SamplingParams.greedy_params(5, stop_token_ids=())
    log = []
    for t in range(turns):
        cands = DC.branch(policy, pool, convs, sp, DC.BranchConfig(mode="latent", k=k, latent_max_new_tokens=6),
                          seed=t)
        kids = pool.children
        r = pool.child("a", k - 1)
        target = list(kids.ids[r])
        target[len(target) // 2] = (target[len(target) // 2] + 1) % policy.cfg.vocab_size
        kids.sync({r: target + [100, 101]})
        log.append(("diverged", t, kids.generate({r: greedy}, seed=t)[r]))
        if rows_check:
            rows_check(pool)
        chosen = {"a": t % k, "b": ("a", (t + 1) % k) if t == 1 else (t + 2) % k}
        pool.commit(chosen)
        for key in convs:
            src, j = (key, chosen[key]) if isinstance(chosen[key], int) else chosen[key]
            c = cands[src][j]
            log.append((t, key, c["tokens"], c["finish_reason"]))
            convs[key] = convs[src] + [{"role": "assistant", "content": c["content"]},
                                       {"role": "user", "content": f"Tell me more ({t})."}]
    return log, pool


@pytest.mark.parametrize("sampled", [False, True])
def test_prefix_shared_children_equal_copied_children(tiny_dir, sampled):
    from sage_jax.rollout.sampling import SamplingParams

    policy = _policy(tiny_dir)
    sp = SamplingParams.paper(max_new_tokens=8) if sampled else SamplingParams.greedy_params(8)
    ref, ref_pool = _pool_turns(policy, False, sp)
    got, pool = _pool_turns(policy, True, sp)
    assert got == ref
    assert any(x[2] for x in got if x[0] != "diverged")
    # the diverging targets were prefilled on the children's own caches, never copied per child
    assert pool.stats.unshared_tokens > 0 and ref_pool.stats.unshared_tokens == 0
    assert pool.children is None and pool.cache.prefix is None
    assert [pool.cache.ids[r] for r in range(2)] == [ref_pool.cache.ids[r] for r in range(2)]


def test_prefix_shared_rows_compacted_take_and_put_back(tiny_dir):
    """A few of many prefix-shared rows decode on a copy of just them (their parents gathered into a
    prefix of one row each) and equal decoding them in place; `merge` of any rows equals `take`."""
    from sage_jax.rollout import dialogue_cache as DC
    from sage_jax.rollout.sampling import SamplingParams

    policy = _policy(tiny_dir)
    sp = SamplingParams(temperature=1.0, max_new_tokens=6)
    prompts = [policy.encode_chat([{"role": "user", "content": f"hello {i}"}]) for i in range(2)]

    def kids(shared):
        parent = DC.RowCache(policy.cfg, policy.params, 2, limit=512, capacity=256)
        parent.sync(dict(enumerate(prompts)))
        rows = parent.children(4, 32) if shared else parent.take([r for r in range(2) for _ in range(4)])
        rows.sync({r: rows.ids[r] + [60 + r] for r in range(8)})
        return rows

    shared, copied = kids(True), kids(False)
    calls = []
    orig = shared._generate_compact
    shared._generate_compact = lambda *a, **k: calls.append(1) or orig(*a, **k)
    got = shared.generate({1: sp, 6: sp}, seed=5, row_seeds={1: 10, 6: 60})
    assert calls and shared.prefix is not None
    assert got == copied.generate({1: sp, 6: sp}, seed=5, row_seeds={1: 10, 6: 60})
    g = SamplingParams.greedy_params(3, stop_token_ids=())
    for rows in (shared, copied):
        rows.sync({1: rows.ids[1] + got[1][0][-1:]})
    assert shared.generate({1: g}, seed=0) == copied.generate({1: g}, seed=0)
    whole = shared.merge([1, 6, 0, 7])
    assert whole.prefix is None and whole.ids == copied.take([1, 6, 0, 7]).ids
    assert whole.generate({2: g, 3: g}, seed=0) == copied.merge([1, 6, 0, 7]).generate({2: g, 3: g}, seed=0)


def test_a_child_never_holds_more_than_the_limit(tiny_dir):
    """cache_full counts the shared prefix: a child stops where a copy of it would."""
    from sage_jax.rollout import dialogue_cache as DC

    policy = _policy(tiny_dir)
    out = []
    for shared in (True, False):
        pool = DC.DialoguePool(policy, 1, max_cache_len=64, shared_prefix=shared)
        pool.sync({"x": list(range(100, 140))})
        kids = pool.fork(2)
        got = kids.generate({0: DC.SamplingParams.greedy_params(40, stop_token_ids=())}, seed=0)
        out.append(got)
        assert got[0][1] == "cache_full" and len(got[0][0]) == 64 - 40 + 1
    assert out[0] == out[1]


def _search(tiny_dir, out, **kw):
    from sage_jax.search.tree import SearchConfig, run_search

    base = dict(model=str(tiny_dir), judge="rules:", num_seeds=2, turns=3, k=3, max_new_tokens=8,
                user_max_new_tokens=6, latent_max_new_tokens=8, batch_seeds=2, output_dir=str(out))
    summary = run_search(SearchConfig(**{**base, **kw}))
    return summary, {n: (out / f"{n}.jsonl").read_text() for n in ("trees", "sft", "pairs")}


@pytest.mark.parametrize("deep", [False, True])
def test_sampled_search_trees_equal_with_and_without_shared_prefix(tiny_dir, tmp_path, deep):
    """A sampled latent-first search (fixed seeds) gives the same trees, dialogues and pairs with
    prefix-shared children as with copied ones; deep: beam 2 and lookahead 2 (children committed
    to other beams' rows, futures forked on their own pools). Both run the default decode layout
    (per_layer: its decode loop splits the shared prefix into per-layer buffers); not deep, the
    stacked layout's search is the same too."""
    kw = dict(beam=2, lookahead=2, turns=2) if deep else {}
    one, ref = _search(tiny_dir, tmp_path / "copied", shared_prefix=False, **kw)
    two, got = _search(tiny_dir, tmp_path / "shared", **kw)
    assert got == ref
    if not deep:
        assert _search(tiny_dir, tmp_path / "stacked", layout="stacked")[1] == ref
    assert [len(n["candidates"]) for t in map(json.loads, got["trees"].splitlines()) for n in t["nodes"]]
    assert one["cache"]["child_grows"] == 0 and two["cache"]["forks"] == one["cache"]["forks"]


MESHES = {"data4_tensor2": dict(data=4, fsdp=1, tensor=2), "data2_fsdp2_tensor2": dict(data=2, fsdp=2, tensor=2)}


def _spec(x) -> tuple:
    spec = tuple(x.sharding.spec)
    while spec and spec[-1] is None:
        spec = spec[:-1]
    return spec


@pytest.mark.parametrize("name", sorted(MESHES))
def test_prefix_shared_children_on_a_mesh_equal_one_device(tiny_dir, name):
    """8 simulated devices (conftest): the children's own caches and their shared prefix are laid
    out like the cache (rows over the batch axes, kv heads over tensor); tokens equal one device."""
    from sage_jax import parallel
    from sage_jax.rollout.policy import load_policy
    from sage_jax.rollout.sampling import SamplingParams

    mesh = parallel.MeshConfig(**MESHES[name])
    batch_axes = ("data", "fsdp") if mesh.fsdp > 1 else "data"
    sharded = load_policy(str(tiny_dir), mesh=mesh)
    seen = []

    def check(pool):
        kids = pool.children
        for c in (kids.cache["k"], kids.cache["v"], kids.prefix.k, kids.prefix.v):
            assert _spec(c) == (None, batch_axes, "tensor"), c.sharding
        assert _spec(kids.logits) == (batch_axes,)
        seen.append(kids.rows)

    sp = SamplingParams.greedy_params(6)
    ref, _ = _pool_turns(_policy(tiny_dir), False, sp, turns=2, k=2)
    got, pool = _pool_turns(sharded, True, sp, turns=2, k=2, rows_check=check)
    assert got == ref and seen == [8, 8]  # 2 dialogues padded to the 4-way row split, 2 children each
    assert _spec(pool.cache.cache["k"]) == (None, batch_axes, "tensor")
