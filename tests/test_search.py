"""Self-play tree search and A/B compare: real models, the rules judge, resumable outputs."""

import json

import pytest

from sage_jax.data.jsonl import read_sac
from sage_jax.data.readers import read_seeds
from sage_jax.data.sample import sample_path
from sage_jax.data.split import seed_id
from sage_jax.data.pairs import read_pairs
from sage_jax.eval.compare import CompareConfig, consensus_table, run_compare
from sage_jax.rollout.selfplay import trim_user_reply
from sage_jax.search.tree import SearchConfig, run_search


def test_user_replies_are_trimmed_as_the_reference_does():
    """SAGE.md §4's two steps, on the examples it gives and on cases taken from the rule."""
    # (1) statements before the first question stay, the question goes
    assert trim_user_reply("I'm fine. Work was rough today. How about you? Anything fun?") == \
        "I'm fine. Work was rough today."
    assert trim_user_reply("Great! What about you?") == "Great!"
    assert trim_user_reply("Sure. I like it :) and you?") == "Sure."
    # (1) does not apply (no sentence end before the mark) and it does not end with a mark: unchanged
    assert trim_user_reply("How are you? I am good.") == "How are you? I am good."
    assert trim_user_reply("that's great :) anyway more") == "that's great :) anyway more"
    # (2) it ends with a mark: cut right after the first one
    assert trim_user_reply("Really? I thought so. And you?") == "Really?"
    assert trim_user_reply("lol :D really? <3") == "lol :D"
    assert trim_user_reply("no question here.") == "no question here."
    assert trim_user_reply(". ?") == ". ?"  # a bare "." keeps the untrimmed reply


def test_user_simulator_context_is_the_references():
    from sage_jax.rollout.selfplay import USER_OPENER, USER_PERSONA, WHO_ARE_YOU, Episode
    from sage_jax.sac import parse_assistant_lenient

    e = Episode.start("a", "I failed my exam.")
    roles = [(m["role"], m["content"]) for m in e.user_view]
    assert roles[0] == ("user", WHO_ARE_YOU) and roles[2] == ("user", USER_OPENER) == ("user", "How's it going?")
    persona = parse_assistant_lenient(roles[1][1])
    assert persona.reply.strip() == USER_PERSONA and persona.state is not None and persona.action is not None
    assert persona.state.motivation is None and persona.action.motivation is None  # all-null prefix
    assert roles[3] == ("assistant", "I failed my exam.")
    e.add_assistant("{u_motivation: venting, u_emotion: sad, u_topic: [exam]} {a_motivation: asking, a_emotion: "
                    "caring, a_topic: [exam]} Oh no. What happened?")
    assert e.user_view[3]["content"].startswith("{u_motivation: null")  # the inferred state injected
    assert "a_motivation: venting" in e.user_view[3]["content"]
    # the simulator sees its own turn as trimmed (its latent prefix kept)
    e.add_user("{u_motivation: null, u_emotion: null, u_topic: []} {a_motivation: venting, a_emotion: sad, "
               "a_topic: [exam]} I froze. Do you ever freeze? Tell me.")
    assert e.turns[-1].text == "I froze."
    assert e.user_view[-1]["content"].endswith("} I froze.") and "Do you" not in e.user_view[-1]["content"]
    assert Episode.start("a", "x", user_persona="system").user_view[0] == {"role": "system", "content": USER_PERSONA}


def _check_outputs(out, seeds, turns, k):
    trees = [json.loads(x) for x in open(out / "trees.jsonl")]
    assert sorted(t["id"] for t in trees) == sorted(seed_id(x) for x in read_seeds(sample_path("ed_test_seeds.txt"), limit=seeds))
    for t in trees:
        # a try the judge rejected stays in the tree: chosen None, its attempt numbered, then the
        # same turn again
        accepted = [n for n in t["nodes"] if n["chosen"] is not None]
        assert 1 <= len(accepted) <= turns and [n["turn"] for n in accepted] == list(range(len(accepted)))
        for node in t["nodes"]:
            assert len(node["candidates"]) == k and node["verdict"]["judge"] == "rules:v1"
            assert 0 <= node["chosen"] < k if node["chosen"] is not None else node["attempt"] >= 1
        assert (out / "trees" / f"{t['id']}.html").read_text().startswith("<!doctype html>")
    dialogues, report = read_sac(out / "sft.jsonl", strict=True)
    assert len(dialogues) == seeds and all(d.turns[0].role == "user" for d in dialogues)
    pairs, report = read_pairs(out / "pairs.jsonl", strict=True)
    # one negative per accepted assistant turn
    assert len(pairs) == sum(n["chosen"] is not None for t in trees for n in t["nodes"])
    return trees


@pytest.mark.slow
def test_smollm2_search_4_seeds_3_turns_k4(tmp_path):
    # Short latent blocks and replies: the untuned model's latents are unparsed text either way, and
    # each decoded token costs 16 rows of the real model (with the defaults this test took ~1.7x as long).
    # The default layout (per_layer) on the real model.
    cfg = SearchConfig(model="smollm2", num_seeds=4, turns=3, k=4, max_new_tokens=16, user_max_new_tokens=8,
                       latent_max_new_tokens=16, output_dir=str(tmp_path / "s"), batch_seeds=4)
    summary = run_search(cfg)
    assert summary["searched"] == 4
    _check_outputs(tmp_path / "s", 4, 3, 4)


@pytest.mark.slow
def test_closed_vocabulary_children_have_distinct_latents(tmp_path):
    cfg = SearchConfig(model="smollm2", num_seeds=2, turns=2, k=4, branching="enumerate",
                       vocabulary="esconv_strategies", max_new_tokens=16, user_max_new_tokens=8,
                       output_dir=str(tmp_path / "e"), batch_seeds=2,
                       layout="stacked")  # compile-bound: the scan compiles ~4x faster than the default per_layer
    run_search(cfg)
    trees = _check_outputs(tmp_path / "e", 2, 2, 4)
    for t in trees:
        for node in t["nodes"]:
            pinned = [c["pinned"]["a_motivation"] for c in node["candidates"]]
            assert len(set(pinned)) == 4  # distinct by construction
            for c in node["candidates"]:  # and the parsed latents agree where the model closed the block
                if c["action"] is not None:
                    assert c["action"]["motivation"] == c["pinned"]["a_motivation"]


def test_compare_consensus_arithmetic_on_hand_made_verdicts(tmp_path):
    assert consensus_table(["a", "a", "b", "no consensus", "a"]) == {
        "wins_a": 3, "wins_b": 1, "no_consensus": 1, "total": 5}
    # A hand-made verdict set through a real HTTP judge is in the judge tests; here the whole
    # command on two rollout files with the rules judge: every matched seed gets an outcome.
    from sage_jax.data.sample import sample_path

    dialogues, _ = read_sac(sample_path("ed_train_200.jsonl"))
    a, b = tmp_path / "a.jsonl", tmp_path / "b.jsonl"
    from sage_jax.sac import dialogue_to_json

    with open(a, "w") as fa, open(b, "w") as fb:
        for i in range(6):
            da, db = dialogue_to_json(dialogues[i]), dialogue_to_json(dialogues[i + 6])
            db["id"] = da["id"]
            fa.write(json.dumps(da) + "\n")
            fb.write(json.dumps(db) + "\n")
    s = run_compare(CompareConfig(a=str(a), b=str(b), output=str(tmp_path / "cmp")))
    assert s["total"] == 6 and s["wins_a"] + s["wins_b"] + s["no_consensus"] == 6
    rows = (tmp_path / "cmp" / "per_seed.tsv").read_text().splitlines()
    assert len(rows) == 7 and rows[0].startswith("id\toutcome")


def test_pair_sides_never_half_annotated():
    """A candidate whose latent prefix parsed only halfway (a state, no action) becomes a pair side
    with neither latent and the prefix stripped, so DPO can read every pair the search writes."""
    from sage_jax.data.pairs import pair_from_json
    from sage_jax.sac import SACFormatError, to_messages
    from sage_jax.search.tree import _latent_json, _latents, _pair_side

    def cand(content):
        st, act, reply = _latents(content)
        return {"content": content, "reply": reply, "state": _latent_json(st), "action": _latent_json(act)}

    full = cand("{u_motivation: venting, u_emotion: sad, u_topic: [work]} "
                "{a_motivation: empathy, a_emotion: caring, a_topic: [work]} That sounds hard.")
    half = cand("{u_motivation: venting, u_emotion: sad, u_topic: [work]} I see.")
    assert full["state"] and full["action"] and half["state"] and half["action"] is None
    side = _pair_side(half)
    assert side["state"] is None and side["action"] is None and "u_motivation" not in side["text"]
    assert _pair_side(full) == {"text": "That sounds hard.", "state": full["state"], "action": full["action"]}
    history = [{"role": "user", "text": "My boss yelled at me."}]
    pair = pair_from_json({"id": "p", "history": history, "chosen": _pair_side(full), "rejected": side})
    to_messages(pair.chosen), to_messages(pair.rejected)  # what DPO renders: fine
    bad = pair_from_json({"id": "p", "history": history, "chosen": _pair_side(full),
                          "rejected": {"text": "x", "state": half["state"], "action": None}})
    with pytest.raises(SACFormatError, match="half-annotated"):  # what the search wrote before
        to_messages(bad.rejected)


def test_search_without_valid_seeds_exits_nonzero(tmp_path):
    from sage_jax import cli

    (tmp_path / "seeds.txt").write_text("\n\n")
    assert cli.main(["search", f"seeds={tmp_path / 'seeds.txt'}", f"output_dir={tmp_path / 'o'}"]) == 1
