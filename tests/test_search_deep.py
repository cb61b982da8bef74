"""Deeper tree search (search.tree: beam width B, lookahead depth d) and rejected steps on a tiny
model with scripted judges: B live branches per level, the judge ranks all B x K children and is
shown the d-turn futures; the outputs record what was compared; "No good one" resamples the step
and, when the tries run out, abandons the dialogue."""

import functools
import json
import re

import pytest

from sage_jax.judge import Completion, best_of_k_prompt, parse_prompt
from sage_jax.judge.rules import RulesJudge
from sage_jax.rollout.policy import load_policy
from sage_jax.search.tree import SearchConfig, search_batch

SEEDS = [("s0", "I failed my driving test today."), ("s1", "My cat knocked over my coffee.")]


@functools.lru_cache(maxsize=None)
def _policy(path):
    return load_policy(str(path))


class LastOneJudge:
    """Always prefers the last candidate it is shown; keeps every prompt it received."""

    name = "scripted:last"

    def __init__(self):
        self.prompts: list[str] = []

    def complete(self, prompts, *, temperature=0.8, max_tokens=64, seed=None):
        self.prompts += prompts
        out = []
        for p in prompts:
            k = len(parse_prompt(p).candidates)
            out.append(Completion(f"Response {k} is better"))
        return out


def _cfg(**kw):
    base = dict(turns=3, k=2, branching="sample", max_new_tokens=6, user_max_new_tokens=5, batch_seeds=2,
                temperature=1.0, top_p=1.0, top_k=0, repetition_penalty=1.0)
    return SearchConfig(**{**base, **kw})


def test_beam2_lookahead2_keeps_two_branches_and_judges_two_turn_futures(tiny_dir):
    policy, judge = _policy(tiny_dir), LastOneJudge()
    cfg = _cfg(beam=2, lookahead=2)
    results = search_batch(policy, policy, judge, SEEDS, cfg, seed=3)
    assert len(results) == 2
    for r in results:
        by_turn = {}
        for node in r["nodes"]:
            by_turn.setdefault(node["turn"], []).append(node)
        assert sorted(by_turn) == [0, 1, 2]
        assert len(by_turn[0]) == 1  # the root
        for t in (1, 2):  # two live branches per level, each a distinct beam
            assert len(by_turn[t]) == 2 and len({n["beam"] for n in by_turn[t]}) == 2
        for t, level in by_turn.items():
            # B x K children were ranked together: the scripted judge picks the last remaining
            # candidate each round, so the last two of the level's flat list are kept, best last
            flat = [(i, j) for i, n in enumerate(level) for j in range(len(n["candidates"]))]
            ranks = {(i, j): level[i]["candidates"][j].get("rank") for i, j in flat}
            assert ranks[flat[-1]] == 0 and ranks[flat[-2]] == 1
            assert sum(r is not None for r in ranks.values()) == 2
            for n in level:
                assert n["compared"] == ("futures" if t < 2 else "continuations")
                assert len(n["rounds"]) == 2  # one judge round per kept beam
                for c in n["candidates"]:
                    # lookahead 2: one further user turn and assistant turn, except at the last turn
                    assert [x["role"] for x in c.get("future", [])] == (["user", "assistant"] if t < 2 else [])
        # the dialogue is the beam ranked first at the last level
        last = by_turn[2]
        best = next((n, c) for n in last for c in n["candidates"] if c.get("rank") == 0)
        assert r["dialogue"].turns[-1].text == best[1]["reply"]
        assert r["dialogue"].meta["beam"] == 2 and r["dialogue"].meta["lookahead"] == 2
        for p in r["pairs"]:
            assert p["meta"]["compared"] in ("futures", "continuations")

    # What the judge was shown: at turns 0 and 1 (lookahead 2) each candidate is a continuation of
    # assistant, user, assistant: the child and its two-turn future, as recorded in the tree.
    parsed = [parse_prompt(p) for p in judge.prompts]
    futures = [p for p in parsed if p.continuations and p.continuations[-1][-2:][0][0] == "user"]
    assert futures, "the judge never saw a future"
    recorded = {(c["reply"], tuple(x["text"] for x in c["future"]))
                for r in results for n in r["nodes"] for c in n["candidates"] if c.get("future")}
    shown = set()
    for p in parsed:
        for cont in p.continuations or ():
            roles = [role for role, _ in cont]
            assert roles[0] == "assistant" and roles == ["assistant", "user"] * (len(roles) // 2) + ["assistant"]
            if len(cont) >= 3:
                shown.add(tuple(text for _, text in cont[-3:]))
    def norm(texts):  # the prompt normalises line ends
        return tuple(" ".join(x.split()) for x in texts)

    assert recorded and {norm((reply, *fut)) for reply, fut in recorded} <= {norm(s) for s in shown}
    # the first level's prompt for each seed: 2 candidates, each exactly assistant/user/assistant
    first = [p for p in parsed if len(p.candidates) == 2 and all(len(c) == 3 for c in p.continuations or [()])]
    assert len(first) >= 2


def test_beam1_lookahead1_is_the_papers_best_of_k(tiny_dir):
    """The defaults judge single replies (no continuation sections) and keep one branch."""
    policy, judge = _policy(tiny_dir), LastOneJudge()
    results = search_batch(policy, policy, judge, SEEDS, _cfg(), seed=3)
    assert all(parse_prompt(p).continuations is None for p in judge.prompts)
    for r in results:
        assert [n["turn"] for n in r["nodes"]] == [0, 1, 2]
        for n in r["nodes"]:
            assert n["chosen"] == 1 and "beam" not in n  # the scripted judge's pick
            assert r["dialogue"].turns[2 * n["turn"] + 1].text == n["candidates"][1]["reply"]


def test_continuation_prompt_round_trips_and_rules_judge_scores_whole_futures():
    ctx = [("user", "I lost my keys again.")]
    good = [("assistant", "Oh no, losing keys is so annoying. Where did you last see them?"),
            ("user", "In the kitchen I think."), ("assistant", "Kitchens hide keys well! Did you check the drawers?")]
    bad = [("assistant", "Oh no, losing keys is so annoying. Where did you last see them?"),
           ("user", "In the kitchen I think."), ("assistant", "ok")]
    prompt = best_of_k_prompt(ctx, [bad, good])
    assert re.search(r"^### Response 2$", prompt, re.M)
    p = parse_prompt(prompt)
    assert p.continuations == (tuple(bad), tuple(good)) and p.candidates == (bad[0][1], good[0][1])
    # same first reply: only the futures differ, and the rules judge prefers the better future
    assert RulesJudge().answer(prompt) == "Response 2 is better"
    with pytest.raises(ValueError, match="starts with the assistant"):
        best_of_k_prompt(ctx, [[("user", "hi")]])


def test_beam_and_lookahead_need_the_cached_path(tiny_dir):
    with pytest.raises(ValueError, match="cache=true"):
        search_batch(_policy(tiny_dir), _policy(tiny_dir), LastOneJudge(), SEEDS, _cfg(beam=2, cache=False), seed=0)


class ScriptedJudge:
    """Answers from a script per seed (keyed by the seed text in the prompt), then the last answer."""

    name = "scripted:per-seed"

    def __init__(self, script: dict[str, list[str]]):
        self.script = {k: list(v) for k, v in script.items()}
        self.asked: dict[str, int] = {}

    def complete(self, prompts, *, temperature=0.8, max_tokens=64, seed=None):
        out = []
        for p in prompts:
            key = next(k for k in self.script if k in p)
            n = self.asked.get(key, 0)
            self.asked[key] = n + 1
            answers = self.script[key]
            out.append(Completion(answers[min(n, len(answers) - 1)]))
        return out


def test_no_good_one_resamples_the_step_then_abandons(tiny_dir):
    """SAGE.md §4: "No good one" (or no usable verdict) samples the K children again; when every
    try is rejected the dialogue is abandoned: no chosen example and no pair from it."""
    policy = _policy(tiny_dir)
    judge = ScriptedJudge({SEEDS[0][1]: ["No good one", "Response 2 is better"],
                           SEEDS[1][1]: ["No good one", "I cannot decide", "No good one"]})
    results = search_batch(policy, policy, judge, SEEDS, _cfg(turns=2, step_tries=3), seed=5)
    ok, bad = results
    # seed 0: turn 0 rejected once then accepted (fresh children), turn 1 accepted
    assert [(n["turn"], n.get("attempt"), n["chosen"]) for n in ok["nodes"]] == [(0, 1, None), (0, 2, 1), (1, None, 1)]
    assert ok["nodes"][0]["candidates"] != ok["nodes"][1]["candidates"]  # the step was sampled again
    assert ok["dialogue"].turns[1].text == ok["nodes"][1]["candidates"][1]["reply"]
    assert not ok["abandoned"] and len(ok["pairs"]) == 2
    # seed 1: three rejected tries at turn 0, then abandoned
    assert [(n["turn"], n["attempt"], n["chosen"]) for n in bad["nodes"]] == [(0, 1, None), (0, 2, None), (0, 3, None)]
    assert bad["abandoned"] and bad["pairs"] == [] and len(bad["dialogue"].turns) == 1
    assert "abandoned at assistant turn 1" in bad["dialogue"].meta["note"]


def test_abandoned_dialogues_write_no_training_data(tiny_dir, tmp_path, monkeypatch):
    from sage_jax.search import tree

    monkeypatch.setattr(tree, "make_judge", lambda *a, **k: ScriptedJudge({s: ["No good one"] for _, s in SEEDS}))
    seeds = tmp_path / "seeds.txt"
    seeds.write_text("\n".join(s for _, s in SEEDS) + "\n")
    out = tmp_path / "out"
    summary = tree.run_search(_cfg(model=str(tiny_dir), seeds=str(seeds), output_dir=str(out), turns=2, step_tries=2))
    assert summary["abandoned"] == 2 and summary["rejected_tries"] == 4 and summary["pairs"] == 0
    assert (out / "sft.jsonl").read_text() == "" and (out / "pairs.jsonl").read_text() == ""
    trees = [json.loads(x) for x in (out / "trees.jsonl").read_text().splitlines()]
    assert len(trees) == 2 and all("abandoned" in t for t in trees)
    # abandon=false keeps what came before the rejected step (here: nothing but the seed)
    out2 = tmp_path / "out2"
    summary = tree.run_search(_cfg(model=str(tiny_dir), seeds=str(seeds), output_dir=str(out2), turns=2, step_tries=1,
                                   abandon=False))
    assert summary["abandoned"] == 2 and len((out2 / "sft.jsonl").read_text().splitlines()) == 2


def test_selector_sees_latents_and_the_rules_judge_scores_only_replies():
    """SAGE.md §4: the reference selector is shown the assistant's latents, in the history and in
    the candidates; the rules judge scores the replies behind a well-formed prefix."""
    from sage_jax.sac import Latent, Turn

    state, action = Latent("venting", "sad", ("exam",)), Latent("sympathizing", "caring", ())
    ctx = [Turn("user", "I failed my exam.", state=state),
           Turn("assistant", "That's rough. What happened?", action=action), Turn("user", "I froze.")]
    cand = ("{u_motivation: venting, u_emotion: anxious, u_topic: [exam]} {a_motivation: encouraging, "
            "a_emotion: caring, a_topic: [exam]} Freezing happens to everyone. Want to talk it through?")
    shown = best_of_k_prompt(ctx, [cand, "ok"], latents=True)
    assert "{a_motivation: sympathizing" in shown and "{a_motivation: encouraging" in shown
    hidden = best_of_k_prompt(ctx, [cand, "ok"])
    assert "a_motivation" not in hidden
    # same verdict with and without the latents shown: the prefix is not scored as leakage
    assert RulesJudge().answer(shown) == RulesJudge().answer(hidden) == "Response 1 is better"
