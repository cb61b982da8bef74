"""Dialogue tree search over latent state-actions (SAGE.md §4; DESIGN.md §5, §11).

At every assistant turn of every live dialogue, K children are generated that differ first in
their latent state-action, then in words, all on the dialogue's own KV cache
(`rollout.dialogue_cache`: one cache per dialogue and side, kept across turns; each turn prefills
only its new tokens; the K children are forked from it, reading it in place as their shared
prefix (`shared_prefix`), and the chosen child's cache becomes the dialogue's next cache):
  - `branching="latent"` (default, latent-first): the user-state block is decoded once (greedy),
    then K action blocks are sampled from it, duplicates resampled (`action_tries` rounds) so
    the children hold K distinct actions where the model can produce them, then each child
    decodes its reply from its own latent prefix;
  - `branching="enumerate"`: the same state block, then K distinct values of the action's
    motivation from a closed vocabulary (e.g. the 8 ESConv strategies) pinned as a prefill, and
    each child completes the rest: children have distinct latents by design;
  - `branching="sample"`: K whole messages sampled from the dialogue's cache.
Every node records `distinct_actions` (distinct parsed actions among its children) and
`distinct_latents`. `cache=False` re-prefills the whole history every turn (sample/enumerate; the
earlier path, kept for comparison). The run's summary reports the programs compiled (count and
seconds: a fixed cache length and chunk widths keep it to a handful per search) and the cache
counters (tokens prefilled, reused, rewound when a chat template re-renders history).
The judge picks the best child (best-of-K); "No good one" or no usable verdict samples the whole
step again (`step_tries`), then abandons the dialogue; the chosen child continues, the others are
kept as negatives; the simulated user answers; all dialogues of a batch advance together. Beam
width and lookahead default to 1, the paper's setting: `beam=B` keeps the B best partial dialogues
per seed (the judge ranks all B x K children), `lookahead=d` rolls each child d-1 further
simulated turns and the judge compares these futures.

Outputs (JSONL, appended per finished dialogue; a restarted run skips finished seeds):
trees.jsonl (every node: candidates with latents, verdict, choice), trajectories.jsonl and
sft.jsonl (the selected dialogues as SAC), pairs.jsonl (history with latents, chosen, rejected),
trees/<id>.html (a self-contained viewer).
"""

from __future__ import annotations

import dataclasses
import html
import json
import logging
import random
import sys
import time
from pathlib import Path
from typing import Literal, Sequence

from sage_jax import parallel, rollout
from sage_jax.data.jsonl import JsonlWriter
from sage_jax.data.readers import read_seeds
from sage_jax.data.split import normalise_seed, seed_id
from sage_jax.data.sample import sample_path
from sage_jax.judge import make_judge, rank_top
from sage_jax.rollout.compiles import CompileCounter
from sage_jax.rollout.dialogue_cache import BranchConfig, CacheStats, DialoguePool, action_key, branch
from sage_jax.rollout.policy import Layout, Policy, load_policy
from sage_jax.rollout.sampling import SamplingParams
from sage_jax.rollout.selfplay import Episode, user_turns
from sage_jax.search import shards
from sage_jax.sac import (DEFAULT_SCHEMA, Dialogue, Latent, dialogue_to_json, get_vocabulary, latent_to_json,
                          parse_assistant_lenient, render_latent, strip_latents)

log = logging.getLogger(__name__)


@dataclasses.dataclass(frozen=True)
class SearchConfig:
    model: str = "smollm2"  # assistant policy: smollm2, an HF dir or a training run dir
    user_model: str | None = None  # user simulator (None: the assistant's model)
    judge: str = "rules:"  # judge spec: rules:, openai:MODEL[@URL], local:PATH
    judge_cache: str | None = None  # default: output_dir/judge_cache
    seeds: str = "sample:ed_test_seeds.txt"  # one user opening per line; sample:NAME = shipped sample
    num_seeds: int | None = None
    output_dir: str = "runs/search"
    turns: int = 8  # assistant turns per dialogue (the paper: 8 assistant, 7 user)
    k: int = 4  # children per assistant turn
    # latent: decode the user state once, then K distinct sampled actions, then each reply;
    # enumerate: K distinct a_motivation values of `vocabulary` pinned; sample: K whole messages.
    branching: Literal["latent", "sample", "enumerate"] = "latent"
    vocabulary: str = "esconv_strategies"  # closed vocabulary of a_motivation for branching=enumerate
    latent_max_new_tokens: int = 48  # budget of one decoded latent block (state or action)
    action_tries: int = 3  # branching=latent: rounds resampling duplicate actions
    # Deeper search (the paper: beam=1, lookahead=1). beam: the B best partial dialogues per seed
    # stay alive, ranked by the judge over all B x K children; lookahead: each child is rolled
    # forward lookahead-1 further simulated turns and the judge compares these futures.
    beam: int = 1
    lookahead: int = 1
    max_cache_len: int | None = None  # per-dialogue KV cache limit (default: the model's max positions)
    cache_len: int | None = None  # initial per-dialogue cache length (default: what the first turn needs; grows)
    cache: bool = True  # one KV cache per dialogue kept across turns (False: re-prefill every turn)
    # the K children of a turn read their dialogue's cache in place as a shared prefix (False: each
    # child decodes on its own copy of it, the earlier fork: same tokens, K times the cache reads)
    shared_prefix: bool = True
    # Parameter layout of the policies (rollout.load_policy): per_layer (`model.decode_layout`)
    # decodes ~1.4x faster on CPU (SmolLM2, 4 dialogues x K=4) but compiles each program ~4x longer
    # (~75 s more per search): it pays off after a few minutes; stacked for short, compile-bound runs.
    layout: Layout = "per_layer"
    negatives_per_turn: int = 1  # preference pairs per assistant turn
    humour: bool = False
    # A rejected assistant step ("No good one", or no usable verdict) is sampled again, K new
    # children, up to step_tries times; then the dialogue is abandoned: with abandon=true nothing
    # from it becomes training data (the reference), with false it ends there, earlier turns kept.
    step_tries: int = 5
    abandon: bool = True
    judge_tries: int = 1  # judge calls per try (>1 re-asks on an unparseable verdict before resampling)
    selector_latents: bool = True  # the judge sees the assistant's latents in history and candidates (the reference)
    temperature: float = 0.95
    top_k: int = 50
    top_p: float = 0.7
    repetition_penalty: float = 1.1
    max_new_tokens: int = 512
    user_max_new_tokens: int = 64  # the simulated user's reply budget (a latent prefix it writes is extra)
    user_persona: Literal["turn", "system"] = "turn"  # turn: the reference's preamble; system: a system message
    batch_seeds: int = 8  # dialogues searched together
    template: str | None = None
    seed: int = 0
    # This process's devices (default one: unsharded). mesh.data=4 mesh.tensor=2: rows over data,
    # params by the rule table. Several processes (jax.distributed) split the seeds: see search/shards.py.
    mesh: parallel.MeshConfig = parallel.SINGLE_DEVICE

    def sampling(self, max_new: int) -> SamplingParams:
        return SamplingParams(temperature=self.temperature, top_k=self.top_k, top_p=self.top_p,
                              repetition_penalty=self.repetition_penalty, max_new_tokens=max_new)


def _latents(content: str):
    p = parse_assistant_lenient(content, DEFAULT_SCHEMA)
    return p.state, p.action, p.reply.strip()


def _pair_side(c: dict) -> dict:
    """A candidate as one side of a preference pair: a half-parsed latent prefix (a state without
    an action, or the reverse) keeps neither, as in the dialogue itself (SAC needs both)."""
    if c["state"] is None or c["action"] is None:
        return {"text": strip_latents(c["content"], DEFAULT_SCHEMA).strip(), "state": None, "action": None}
    return {"text": c["reply"], "state": c["state"], "action": c["action"]}


def _latent_json(lat):
    return None if lat is None else latent_to_json(lat)


def branch_config(cfg: SearchConfig) -> BranchConfig:
    values = tuple(get_vocabulary(cfg.vocabulary).values) if cfg.branching == "enumerate" else ()
    return BranchConfig(mode=cfg.branching, k=cfg.k, latent_max_new_tokens=cfg.latent_max_new_tokens,
                        action_tries=cfg.action_tries, vocabulary=values)


def expand(policy: Policy, episodes: Sequence[Episode], cfg: SearchConfig, seed: int,
           pool: DialoguePool | None = None) -> list[list[dict] | None]:
    """K candidate assistant messages per episode (each {"content", "finish_reason", ...}; None
    for an episode whose history does not fit the cache), decoded on each episode's KV cache in
    `pool` (a fresh pool when None; `pool.commit(chosen)` then keeps the chosen child's cache).
    cfg.cache=False: the earlier path, re-prefilling the whole history (sample/enumerate only).
    An `EndpointPolicy` (`openai:MODEL@URL`; pool is None): `rollout.endpoint.branch`, requests
    with n=K (sample) or continuing the shared latent prefix (latent, enumerate)."""
    from sage_jax.rollout import endpoint

    if isinstance(policy, endpoint.EndpointPolicy):
        got = endpoint.branch(policy, dict(enumerate(e.assistant_view for e in episodes)),
                              cfg.sampling(cfg.max_new_tokens), branch_config(cfg), seed)
        return [got[i] for i in range(len(episodes))]
    if cfg.cache or cfg.branching == "latent":
        if pool is None:
            pool = DialoguePool(policy, len(episodes), max_cache_len=cfg.max_cache_len,
                                shared_prefix=cfg.shared_prefix)
        got = branch(policy, pool, {e.key: e.assistant_view for e in episodes}, cfg.sampling(cfg.max_new_tokens),
                     branch_config(cfg), seed)
        return [got[e.key] for e in episodes]
    sp = cfg.sampling(cfg.max_new_tokens)
    if cfg.branching == "sample":
        prompts = [policy.encode_chat(e.assistant_view) for e in episodes]
        gens = rollout.generate(policy.cfg, policy.params, prompts, sp, seed=seed, num_continuations=cfg.k)
        return [[{"content": policy.decode(g.tokens), "finish_reason": g.finish_reason}
                 for g in gens[i * cfg.k:(i + 1) * cfg.k]] for i in range(len(episodes))]
    # enumerate: decode the state block once, then pin K distinct action motivations.
    values = list(get_vocabulary(cfg.vocabulary).values)
    state_sp = dataclasses.replace(sp, temperature=0.0, max_new_tokens=64, stop_strings=("}",))
    prompts = [policy.encode_chat(e.assistant_view) for e in episodes]
    states = rollout.generate(policy.cfg, policy.params, prompts, state_sp, seed=seed, tokenizer=policy.tokenizer)
    rng = random.Random(seed)
    rows, prefills, pinned = [], [], []
    for e, g in zip(episodes, states):
        state_text = (g.text or "").strip()
        state_text = state_text + "}" if g.stop_string else state_text
        parsed = parse_assistant_lenient(state_text + " x", DEFAULT_SCHEMA).state
        # Canonical rendering, so every child shares exactly this state; a state the model did not
        # produce is pinned as all-null (recorded as such in the tree).
        state_text = render_latent(parsed if parsed is not None else Latent(), "user", DEFAULT_SCHEMA)
        chosen = rng.sample(values, min(cfg.k, len(values)))
        pinned.append(chosen)
        for v in chosen:
            pre = f"{state_text} {{a_motivation: {DEFAULT_SCHEMA.format_value(v)}, a_emotion:"
            rows.append(policy.encode_chat(e.assistant_view, prefill=pre))
            prefills.append(pre)
    gens = rollout.generate(policy.cfg, policy.params, rows, sp, seed=seed + 1)
    out, i = [], 0
    for e, vals in zip(episodes, pinned):
        out.append([{"content": prefills[i + j] + policy.decode(gens[i + j].tokens),
                     "finish_reason": gens[i + j].finish_reason, "pinned": {"a_motivation": v}}
                    for j, v in enumerate(vals)])
        i += len(vals)
    return out


def make_pools(policy: Policy, sim: Policy, cfg: SearchConfig, stats: CacheStats | None = None):
    """(assistant pool, simulator pool): one KV-cache row per live beam of a batch (batch_seeds x
    beam), reused across batches; with lookahead > 1 also (assistant, simulator) pools for the
    futures, one row per child (batch_seeds x beam x k), else None. A side that is an
    `EndpointPolicy` gets None (no KV cache here: the engine behind it keeps its own)."""
    from sage_jax.rollout.endpoint import EndpointPolicy

    stats = stats if stats is not None else CacheStats()

    def pool(p: Policy | EndpointPolicy, rows: int) -> DialoguePool | None:
        if isinstance(p, EndpointPolicy):
            return None
        return DialoguePool(p, rows, max_cache_len=cfg.max_cache_len, cache_len=cache_len(cfg), stats=stats,
                            shared_prefix=cfg.shared_prefix)

    rows = cfg.batch_seeds * cfg.beam
    futures = (pool(policy, rows * cfg.k), pool(sim, rows * cfg.k)) if cfg.lookahead > 1 else None
    return pool(policy, rows), pool(sim, rows), futures


def cache_len(cfg: SearchConfig) -> int:
    """The per-dialogue cache length a pool starts at: what the first assistant turn needs at its
    token budgets (the persona and seed, the latent blocks, the reply), unless cfg.cache_len says.
    Rows grow it in powers of two as the dialogues grow (each length is a program bucket) and a
    pool shrinks back to it when a batch is done: every step reads only about the cache it needs,
    where one cache sized for the last turn would make every turn (and every forked child) pay for
    it."""
    latents = 2 * cfg.latent_max_new_tokens if cfg.branching != "sample" else 0
    return cfg.cache_len or 256 + latents + cfg.max_new_tokens + 24


def search_batch(policy: Policy, sim: Policy, judge, seeds: Sequence[tuple[str, str]], cfg: SearchConfig,
                 seed: int, pools=None, turn_log: list[dict] | None = None) -> list[dict]:
    """Search one batch of (id, seed text) dialogues; returns one result record per dialogue.

    pools: from `make_pools` (made here when None and cfg.cache); turn_log: gets one record of
    cache counters per assistant turn (prefill tokens and seconds, rewinds, ...)."""
    roots = [Episode.start(i, s, user_persona=cfg.user_persona) for i, s in seeds]
    nodes: dict[str, list[dict]] = {e.id: [] for e in roots}
    pairs: dict[str, list[dict]] = {e.id: [] for e in roots}
    cached = cfg.cache or cfg.branching == "latent"
    if not cached and (cfg.beam > 1 or cfg.lookahead > 1):
        raise ValueError("search: beam > 1 and lookahead > 1 run on the per-dialogue caches (set cache=true)")
    if cached and pools is None:
        pools = make_pools(policy, sim, cfg)
    apool, upool, fpools = pools if cached else (None, None, None)
    beams = {e.id: [e] for e in roots}
    abandoned: set[str] = set()
    try:
        _search_turns(policy, sim, judge, beams, nodes, pairs, random.Random(seed), cfg, seed, apool, upool,
                      fpools, turn_log, abandoned)
    finally:
        for p in (apool, upool):
            if p is not None:
                p.release(list(p.row_of))
    results = []
    for root in roots:
        e = beams[root.id][0]  # the best-ranked beam of the last level (with beam=1: the dialogue)
        meta = {"seed": e.seed, "model": policy.name, "judge": judge.name, **({"note": e.note} if e.note else {}),
                **({"beam": cfg.beam} if cfg.beam > 1 else {}), **({"lookahead": cfg.lookahead} if cfg.lookahead > 1 else {})}
        results.append({"id": e.id, "dialogue": Dialogue(e.id, tuple(e.turns), meta=meta), "nodes": nodes[e.id],
                        "pairs": pairs[e.id], "assistant_view": e.assistant_view, "abandoned": e.id in abandoned})
    return results


def _slot_key(seed_id: str, slot: int) -> str:
    return seed_id if slot == 0 else f"{seed_id}#b{slot}"


def _common_prefix(beams: Sequence[Episode]) -> int:
    """Turns all beams share, ending before an assistant turn (a continuation starts with one;
    two beams whose children read the same still differ in what the user said next)."""
    n = min(len(b.turns) for b in beams)
    i = 0
    while i < n and all(b.turns[i] == beams[0].turns[i] for b in beams):
        i += 1
    while 0 < i < len(beams[0].turns) and beams[0].turns[i].role != "assistant":
        i -= 1
    return i


def _lookahead(policy: Policy, sim: Policy, live: Sequence[Episode], cands: Sequence[list[dict]], cfg: SearchConfig,
               steps: int, seed: int, fpools) -> dict[tuple[str, int], Episode]:
    """Each child rolled forward `steps` further simulated turns (the user answers, the assistant
    replies with one child), all futures of the batch together on the futures' pools."""
    fapool, fupool = fpools
    futs = {}
    for e, cs in zip(live, cands):
        for j, c in enumerate(cs):
            f = e.fork(f"{e.key}/c{j}")
            f.add_assistant(c["content"])
            futs[e.key, j] = f
    one = dataclasses.replace(cfg, k=1)
    try:
        for step in range(steps):
            user_turns(sim, list(futs.values()), cfg.sampling(cfg.user_max_new_tokens),
                       seed=seed + 100 * step, pool=fupool)
            going = [f for f in futs.values() if not f.done]
            if not going:
                break
            got = expand(policy, going, one, seed=seed + 100 * step + 50, pool=fapool)
            if fapool is not None:
                fapool.commit({})
            for f, cs in zip(going, got):
                if cs is None:
                    f.done, f.note = True, "cache full"
                else:
                    f.add_assistant(cs[0]["content"])
    finally:
        for p in fpools:
            if p is not None:
                p.release([f.key for f in futs.values()])
    return futs


def _search_turns(policy, sim, judge, beams: dict[str, list[Episode]], nodes, pairs, rng, cfg: SearchConfig, seed,
                  apool, upool, fpools, turn_log, abandoned: set[str]) -> None:
    """Each level: every live beam branches into K children; the judge ranks each seed's B x K
    children (with lookahead, their futures; beams that diverged earlier, their continuations
    since the seeds' common history); the `beam` best become the next level's beams. A seed whose
    children the judge rejects ("No good one", or no usable verdict) is sampled again, the whole
    assistant step, up to `step_tries` times; then it is abandoned (SAGE.md §4)."""
    for turn in range(cfg.turns):
        pending = [e for bs in beams.values() for e in bs if not e.done]
        if not pending:
            break
        before = apool.stats.copy() if apool is not None else None
        t0 = time.perf_counter()
        new_beams: dict[str, list[Episode]] = {}
        for attempt in range(cfg.step_tries):
            failed = _attempt(policy, sim, judge, pending, nodes, pairs, rng, cfg, seed, turn, attempt, apool, upool,
                              fpools, new_beams)
            pending = [e for e in pending if e.id in failed and not e.done]
            if not pending:
                break
        for sid in {e.id for e in pending}:  # every try rejected
            abandoned.add(sid)
            for e in beams[sid]:
                e.done, e.note = True, (f"abandoned at assistant turn {turn + 1}: no acceptable candidate in "
                                        f"{cfg.step_tries} tries")
        beams.update(new_beams)
        kept = {e.key for bs in new_beams.values() for e in bs}
        for p in (apool, upool):  # beam slots no longer alive
            if p is not None:
                p.release([k for k in p.row_of if k.split("#b")[0] in new_beams and k not in kept])
        if turn + 1 < cfg.turns:
            user_turns(sim, [e for bs in new_beams.values() for e in bs], cfg.sampling(cfg.user_max_new_tokens),
                       seed=seed + 1000 * turn + 500, pool=upool)
        if turn_log is not None and before is not None:
            turn_log.append({"turn": turn + 1, "dialogues": len(new_beams), "seconds": round(time.perf_counter() - t0, 3),
                             **apool.stats.minus(before)})


def _attempt(policy, sim, judge, live: list[Episode], nodes, pairs, rng, cfg: SearchConfig, seed: int, turn: int,
             attempt: int, apool, upool, fpools, new_beams: dict[str, list[Episode]]) -> set[str]:
    """One try of one level for the beams `live`: expand, roll futures, rank, keep the best.
    Fills `new_beams` for the seeds that got a verdict; returns the seeds that did not."""
    s = seed + 1000 * turn + 97 * attempt
    cands = expand(policy, live, cfg, seed=s, pool=apool)
    for e, cs in zip(live, cands):
        if cs is None:
            e.done, e.note = True, "cache full: the assistant's history does not fit max_cache_len"
    live, cands = [e for e in live if not e.done], [cs for cs in cands if cs is not None]
    if not live:
        if apool is not None:
            apool.commit({})
        return set()
    actions = {}
    for e, cs in zip(live, cands):
        actions[e.key] = set()
        for c in cs:
            c.pop("tokens", None)
            st, act, c["reply"] = _latents(c["content"])
            c["state"], c["action"] = _latent_json(st), _latent_json(act)
            actions[e.key].add(action_key(act))
    steps = min(cfg.lookahead, cfg.turns - turn) - 1
    futs = _lookahead(policy, sim, live, cands, cfg, steps, s + 700, fpools) if steps > 0 else {}
    # what the judge compares, per seed: the B x K children as continuations of the common history
    by_seed: dict[str, list[tuple[Episode, int]]] = {}
    parents: dict[str, list[Episode]] = {}  # each seed's live beams
    for e, cs in zip(live, cands):
        by_seed.setdefault(e.id, []).extend((e, j) for j in range(len(cs)))
        parents.setdefault(e.id, []).append(e)
    cand_of = {e.key: cs for e, cs in zip(live, cands)}
    ids = list(by_seed)
    contexts, options = [], []
    for sid in ids:
        group = by_seed[sid]
        n = _common_prefix(parents[sid])
        contexts.append(parents[sid][0].turns[:n])
        opts = []
        for e, j in group:
            content = cand_of[e.key][j]["content"]
            if (e.key, j) in futs:
                future = futs[e.key, j].turns[len(e.turns) + 1:]
                opts.append(e.turns[n:] + [("assistant", content)] + future)
                cand_of[e.key][j]["future"] = [{"role": t.role, "text": t.text} for t in future]
            elif len(e.turns) > n:
                opts.append(e.turns[n:] + [("assistant", content)])
            else:
                opts.append(content)
        options.append(opts)
    if sum(len(o) for o in options) > len(options) or cfg.beam > 1:
        ranked = rank_top(judge, contexts, options, cfg.beam, tries=cfg.judge_tries, humour=cfg.humour,
                          latents=cfg.selector_latents, seed=seed + turn + 7 * attempt)
    else:  # one candidate per seed: nothing to choose
        ranked = [([0], []) for _ in ids]
    failed, a_commit, u_assign = set(), {}, {}
    for sid, (order, rounds) in zip(ids, ranked):
        group = by_seed[sid]
        compared = "futures" if futs else "continuations" if len(parents[sid]) > 1 else "replies"
        verdicts = [{"kind": v.verdict.kind, "raw": list(v.raw), "tries": v.tries, "judge": v.judge} for v in rounds]
        rank_of = {(group[i][0].key, group[i][1]): r for r, i in enumerate(order)}
        if not order:
            failed.add(sid)
        for e in parents[sid]:
            cs = cand_of[e.key]
            kept = [j for j in range(len(cs)) if (e.key, j) in rank_of]
            for j in kept:
                cs[j]["rank"] = rank_of[e.key, j]
            best = min(kept, key=lambda j: rank_of[e.key, j]) if kept else None
            node = {"turn": turn, "candidates": cs, "chosen": best, "verdict": verdicts[0] if verdicts else None,
                    "distinct_latents": len({json.dumps([c["state"], c["action"]]) for c in cs}),
                    "distinct_actions": len(actions[e.key])}
            if attempt or not order:
                node["attempt"] = attempt + 1  # a rejected try's node has chosen None
            if cfg.beam > 1 or futs:
                node.update({"beam": e.key, "kept": kept, "compared": compared,
                             **({"rounds": verdicts} if cfg.beam > 1 else {})})
            nodes[sid].append(node)
            if best is None:
                continue
            others = [j for j in range(len(cs)) if j not in kept]
            hist_json = dialogue_to_json(Dialogue(sid, tuple(e.turns)))["turns"]
            for j in rng.sample(others, min(cfg.negatives_per_turn, len(others))):
                pairs[sid].append({"id": f"{e.key}:t{turn}:r{j}", "history": hist_json,
                                   "chosen": _pair_side(cs[best]), "rejected": _pair_side(cs[j]),
                                   "meta": {"judge": judge.name if verdicts else None,
                                            "verdict": verdicts[0]["kind"] if verdicts else None,
                                            "compared": compared}})
        for slot, i in enumerate(order[:cfg.beam]):
            e, j = group[i]
            key = _slot_key(sid, slot)
            child = e.fork(key)  # two beams may continue from one parent
            child.add_assistant(cand_of[e.key][j]["content"])
            new_beams.setdefault(sid, []).append(child)
            a_commit[key], u_assign[key] = (e.key, j), e.key
    if apool is not None:
        apool.commit(a_commit)  # the kept children's caches are the next level's beams' caches
    if upool is not None:
        upool.assign(u_assign)
    return failed


def render_tree_html(result: dict) -> str:
    """A self-contained HTML page: every turn's candidates, latents, verdict; the chosen one marked."""
    esc = html.escape
    parts = [f"<!doctype html><meta charset='utf-8'><title>{esc(result['id'])}</title><style>"
             "body{font-family:sans-serif;max-width:60em;margin:auto} .user{background:#eef;padding:.5em;"
             "margin:.5em 0} .c{border:1px solid #ccc;padding:.4em;margin:.3em 0 .3em 2em} .chosen{border:2px solid"
             " #2a2;background:#efe} .lat{font-size:.8em;color:#555} .v{font-size:.8em;color:#a50}</style>",
             f"<h1>{esc(result['id'])}</h1>"]
    turns = result["dialogue"].turns
    for node in result["nodes"]:
        user = turns[2 * node["turn"]].text
        parts.append(f"<div class='user'><b>user:</b> {esc(user)}</div>")
        v = node["verdict"]
        if v:
            parts.append(f"<div class='v'>judge {esc(str(v['judge']))}: {esc(v['kind'])} — "
                         f"{esc(' | '.join(r or '' for r in v['raw']))}</div>")
        for j, c in enumerate(node["candidates"]):
            cls = "c chosen" if j == node["chosen"] else "c"
            lat = f"state={json.dumps(c['state'])} action={json.dumps(c['action'])}"
            parts.append(f"<div class='{cls}'><div class='lat'>{esc(lat)}</div>{esc(c['reply'])}</div>")
    return "\n".join(parts)


def _seed_path(spec: str) -> Path:
    if spec.startswith("sample:"):
        return sample_path(spec.split(":", 1)[1])
    return Path(spec)


def seed_items(seeds: Sequence[str]) -> tuple[list[tuple[str, str]], int]:
    """(id, seed) per distinct seed, ids from the content (`data.split.seed_id`): a reordered or
    extended seed file resumes without skipping or repeating a seed. Also the repeated lines."""
    items, seen = [], set()
    for s in seeds:
        i = seed_id(s)
        if i not in seen:
            seen.add(i)
            items.append((i, s))
    return items, len(seeds) - len(items)


def batch_seed(seed: int, batch: Sequence[tuple[str, str]]) -> int:
    """The sampling seed of a batch, from its first dialogue's id (not its position in the todo
    list, which shrinks on resume): a resumed batch samples as it would have in one run."""
    return seed + int(batch[0][0].rsplit("-", 1)[-1], 16) % (1 << 30)


def run_search(cfg: SearchConfig) -> dict:
    """Search every seed not yet finished in output_dir; returns counts and output paths."""
    import jax

    from sage_jax.progress import progress

    bad = [f for f in ("k", "turns", "beam", "lookahead", "step_tries", "judge_tries") if getattr(cfg, f) < 1]
    if bad:
        raise ValueError(f"search: {', '.join(bad)} must be >= 1")
    parallel.initialize_distributed()  # a no-op on one process
    out = Path(cfg.output_dir)
    out.mkdir(parents=True, exist_ok=True)
    items, repeated = seed_items(read_seeds(_seed_path(cfg.seeds), limit=cfg.num_seeds))
    if not items:  # nothing valid to search: an error (exit 1), not an empty success
        raise ValueError(f"search: no seeds in {_seed_path(cfg.seeds)}")
    if jax.process_index() == 0:
        dropped = shards.reconcile(out)  # lines a killed run wrote ahead of their seed's tree
        if dropped:
            log.info("search: dropped the records of unfinished or repeated seeds: %s", dropped)
    shards.barrier("sage_jax.search.reconciled")
    finished = shards.finished_ids(out)  # trees.jsonl and unmerged per-process shards
    texts = shards.finished_seed_texts(out)  # also finds trees written under positional ids
    todo = [it for it in items if it[0] not in finished and normalise_seed(it[1]) not in texts]
    print(f"search: {len(items)} seeds{f' ({repeated} repeated lines skipped)' if repeated else ''}, "
          f"{len(items) - len(todo)} already done, {len(todo)} to go; "
          f"K={cfg.k}, {cfg.turns} turns, judge {cfg.judge}", file=sys.stderr)
    summary = {"seeds": len(items), "skipped_done": len(items) - len(todo), "searched": 0, "pairs": 0,
               "abandoned": 0, "rejected_tries": 0,
               "output_dir": str(out)}
    if not todo:
        shards.finish(out, seed_order=[i for i, _ in items])  # shards a killed multi-process run left behind
        return summary
    policy = load_policy(cfg.model, template=cfg.template, mesh=cfg.mesh, layout=cfg.layout)
    sim = (policy if cfg.user_model in (None, cfg.model)
           else load_policy(cfg.user_model, template=cfg.template, mesh=cfg.mesh, layout=cfg.layout))
    judge = make_judge(cfg.judge, cache_dir=cfg.judge_cache or out / "judge_cache", mesh=cfg.mesh)
    (out / "trees").mkdir(exist_ok=True)
    writers = {n: JsonlWriter(out / shards.file_name(n)) for n in ("trajectories", "sft", "pairs", "trees")}
    mine = shards.my_batches(todo, cfg.batch_seeds)  # this process's batches (all of them on one)
    bar = progress(sum(len(bt) for _, bt in mine), "search", unit="dialogue", show=jax.process_index() == 0)
    stats = CacheStats()
    pools = make_pools(policy, sim, cfg, stats) if (cfg.cache or cfg.branching == "latent") else None
    compiles = CompileCounter().__enter__()
    actions = []
    try:
        for b, batch in mine:
            for r in search_batch(policy, sim, judge, batch, cfg, seed=batch_seed(cfg.seed, batch), pools=pools):
                actions += [n["distinct_actions"] for n in r["nodes"]]
                summary["rejected_tries"] += sum(n["chosen"] is None for n in r["nodes"])
                d = dialogue_to_json(r["dialogue"])
                if r["abandoned"]:
                    summary["abandoned"] += 1
                if not (r["abandoned"] and cfg.abandon):  # an abandoned dialogue gives no training data
                    writers["sft"].write(d)
                    writers["trajectories"].write({**d, "assistant_view": r["assistant_view"]})
                    for p in r["pairs"]:
                        writers["pairs"].write(p)
                    summary["pairs"] += len(r["pairs"])
                (out / "trees" / f"{r['id']}.html").write_text(render_tree_html(r))
                writers["trees"].write({"id": r["id"], "seed": r["dialogue"].meta["seed"], "nodes": r["nodes"],
                                        **({"abandoned": r["dialogue"].meta.get("note")} if r["abandoned"] else {})})
                summary["searched"] += 1
            bar.update(len(batch))
    finally:
        compiles.__exit__(None, None, None)
        bar.close()
        for w in writers.values():
            w.close()
    summary["compiles"] = compiles.summary()
    summary["cache"] = stats.as_dict()
    summary["distinct_actions_mean"] = round(sum(actions) / len(actions), 3) if actions else None
    print(f"search: compiled {compiles}; cache: {stats.prefill_tokens} tokens prefilled, "
          f"{stats.reused_tokens} reused, {stats.rewinds} rewinds; mean distinct actions per node "
          f"{summary['distinct_actions_mean']}; {summary['abandoned']} dialogues abandoned after "
          f"{cfg.step_tries} rejected tries ({summary['rejected_tries']} rejected tries in all)", file=sys.stderr)
    shards.finish(out, seed_order=[i for i, _ in items])  # several processes: wait for all, process 0 merges the shards
    return summary
