"""Whole-dialogue SAC annotation: strict parsing, the rules annotator, the resumable `sage-jax annotate` stage."""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).parent))

from sage_jax import judge as J  # noqa: E402
from sage_jax.data.jsonl import read_sac  # noqa: E402
from sage_jax.judge.annotate import AnnotationError, annotate_file, parse_annotation  # noqa: E402
from sage_jax.judge.base import Completion  # noqa: E402
from sage_jax.sac import Dialogue, Schema, Turn, check_dialogue, parse_assistant, to_messages  # noqa: E402

CONVS = [
    ("c0", ["Hi! I just got a new puppy and I'm so excited.", "Congrats! What breed is your puppy?",
            "A beagle. He keeps chewing my shoes though, so annoying.",
            "Beagles love to chew! Maybe try giving him chew toys. Have you tried crate training?"]),
    ("c1", ["Can you explain how photosynthesis works?",
            "Plants turn sunlight, water and carbon dioxide into glucose and oxygen inside their chloroplasts."]),
    ("c2", ["I failed my driving test this morning, I'm really sad.",
            "I'm so sorry, that's rough. Do you know what went wrong?", "I panicked at the roundabout."]),
    ("c3", ["Thanks for the tips yesterday, they worked!", "That's wonderful to hear! What helped the most?"]),
    ("c4", ["I'm worried about my exam next week.", "That sounds stressful. Which subject is it?",
            "Chemistry, my worst subject.", "You could make flashcards for the formulas. When is the exam?"]),
]


def sharegpt_records(convs=CONVS):
    return [{"id": cid, "conversations": [{"from": "human" if i % 2 == 0 else "gpt", "value": v}
                                          for i, v in enumerate(turns)]} for cid, turns in convs]


@pytest.fixture
def sharegpt_json(tmp_path):
    p = tmp_path / "raw.json"
    p.write_text(json.dumps(sharegpt_records(), indent=1))
    return p


def _dialogue(turns=("I lost my keys.", "Oh no! Where did you last see them?")):
    return Dialogue("d", tuple(Turn("user" if i % 2 == 0 else "assistant", t) for i, t in enumerate(turns)))


def _rows(*labels):
    roles = ["user", "assistant"]
    return {"annotations": [{"turn": i + 1, "role": roles[i % 2], **lab} for i, lab in enumerate(labels)]}


U = {"motivation": "venting", "emotion": "frustrated", "topic": ["keys"]}
A = {"motivation": "questioning", "emotion": "caring", "topic": ["keys", "search"]}


# ---------------------------------------------------------------- strict parsing
def test_parse_annotation_builds_state_and_action():
    d = parse_annotation(json.dumps(_rows(U, A)), _dialogue())
    assert d.turns[0].state.motivation == "venting" and d.turns[0].state.topic == ("keys",)
    assert d.turns[1].action.emotion == "caring" and d.turns[1].action.topic == ("keys", "search")
    assert [t.text for t in d.turns] == ["I lost my keys.", "Oh no! Where did you last see them?"]
    # the user's state is rendered into the next assistant message, before the action (SAGE.md §1)
    msgs = to_messages(d)
    st, act, reply = parse_assistant(msgs[1]["content"])
    assert st == d.turns[0].state and act == d.turns[1].action and reply == d.turns[1].text
    assert msgs[0]["content"] == "I lost my keys."  # user messages carry no latents


def test_parse_annotation_tolerates_a_fence_nulls_and_blank_labels():
    text = "```json\n" + json.dumps(_rows({**U, "emotion": None, "topic": None},
                                          {**A, "motivation": "  ", "topic": [" keys ", "keys", ""]})) + "\n```"
    d = parse_annotation(text, _dialogue())
    assert d.turns[0].state.emotion is None and d.turns[0].state.topic == ()
    assert d.turns[1].action.motivation is None and d.turns[1].action.topic == ("keys",)


@pytest.mark.parametrize("text,why", [
    (None, "no output"),
    ("", "empty"),
    ("Sure! Here are the labels: " + json.dumps(_rows(U, A)), "not a single JSON value"),
    (json.dumps(_rows(U, A)) + " Hope this helps!", "not a single JSON value"),
    (json.dumps([U, A]), "expected a JSON object"),
    (json.dumps({"labels": []}), "unexpected key"),
    (json.dumps({**_rows(U, A), "note": 1}), "unexpected key"),
    (json.dumps(_rows(U)), "expected 2 entries"),
    (json.dumps(_rows(U, A, U)), "expected 2 entries"),
    (json.dumps({"annotations": [{**_rows(U, A)["annotations"][0], "role": "assistant"},
                                 _rows(U, A)["annotations"][1]]}), "role"),
    (json.dumps({"annotations": [{**_rows(U, A)["annotations"][0], "turn": 2},
                                 _rows(U, A)["annotations"][1]]}), "turn"),
    (json.dumps({"annotations": [{**_rows(U, A)["annotations"][0], "turn": True},
                                 _rows(U, A)["annotations"][1]]}), "turn"),
    (json.dumps(_rows({**U, "emotion": 3}, A)), "emotion"),
    (json.dumps(_rows({**U, "topic": "keys"}, A)), "topic"),
    (json.dumps(_rows({**U, "topic": ["keys", 2]}, A)), "topic[1]"),
    (json.dumps(_rows({"motivation": "x", "emotion": "y"}, A)), "missing key 'topic'"),
    (json.dumps(_rows({**U, "text": "rewritten"}, A)), "unexpected key 'text'"),
    (json.dumps({"annotations": "none"}), "expected a list"),
    ("{'annotations': []}", "not a single JSON value"),
])
def test_parse_annotation_rejects(text, why):
    with pytest.raises(AnnotationError, match=None) as e:
        parse_annotation(text, _dialogue())
    assert why in str(e.value)


def test_parse_annotation_rewrite_and_closed_vocabularies():
    d = parse_annotation(json.dumps(_rows({**U, "text": "I lost my car keys."}, A)), _dialogue(), allow_rewrite=True)
    assert d.turns[0].text == "I lost my car keys."
    schema = Schema(closed={"u_emotion": "ed_emotions"})
    with pytest.raises(AnnotationError, match="closed vocabulary"):
        parse_annotation(json.dumps(_rows(U, A)), _dialogue(), schema)  # "frustrated" is no ED emotion
    ok = parse_annotation(json.dumps(_rows({**U, "emotion": "annoyed"}, A)), _dialogue(), schema)
    assert ok.turns[0].state.emotion == "annoyed"


# ---------------------------------------------------------------- the rules annotator
def test_rules_annotation_is_valid_sac_and_labelled():
    ds = [Dialogue(cid, tuple(Turn("user" if i % 2 == 0 else "assistant", t) for i, t in enumerate(ts)))
          for cid, ts in CONVS]
    j = J.make_judge("rules:")
    annotated, failures = J.annotate_dialogues(j, ds)
    assert failures == [] and [d.id for d in annotated] == [d.id for d in ds]
    for d in annotated:
        check_dialogue(d, require_latents=True)
        assert d.meta["annotator"] == "rules:v1"
    c0 = annotated[0]
    assert c0.turns[0].state.emotion == "excited" and c0.turns[0].state.topic[0] == "puppy"
    assert c0.turns[1].action.motivation == "encouraging"  # "Congrats!" comes before the question in the rules
    assert c0.turns[2].state.emotion == "annoyed" and c0.turns[3].action.motivation == "suggesting"
    assert annotated[1].turns[0].state.motivation == "requesting"
    assert annotated[2].turns[0].state.motivation == "venting" and annotated[2].turns[1].action.emotion == "caring"
    assert annotated[2].turns[2].state is not None  # a final user turn keeps its state
    assert annotated[3].turns[0].state.motivation == "thanking"
    assert J.annotate_dialogues(j, ds)[0] == annotated  # deterministic
    # closed label sets named in the prompt are respected (values outside become null)
    schema = Schema(closed={"u_emotion": "ed_emotions", "a_motivation": "ed_intents"})
    strict, fails = J.annotate_dialogues(j, ds, schema=schema)
    assert not fails and strict[0].turns[3].action.motivation == "suggesting"
    assert all(t.action.motivation in (None, *schema.vocabulary("a_motivation").values)
               for d in strict for t in d.turns if t.role == "assistant")


class GarbageFor:
    """rules: answers, except malformed output for some ids (and failed calls for others); counts prompts."""

    name = "garbage-for:test"

    def __init__(self, bad=(), down=()):
        self.rules, self.bad, self.down, self.prompts = J.RulesJudge(), set(bad), set(down), []

    def complete(self, prompts, *, temperature=0.8, max_tokens=64, seed=None):
        out = []
        for p in prompts:
            self.prompts.append(p)
            if any(f"PUPPY-{b}" in p for b in self.bad) or any(f"bad-{b}" in p for b in self.bad):
                out.append(Completion('{"annotations": [ {"turn": 1, "role": "user"'))  # truncated JSON
            elif any(f"down-{b}" in p for b in self.down):
                out.append(Completion(None, error="HTTP 503 (after 6 attempts)"))
            else:
                out.append(self.rules.complete([p])[0])
        return out


def test_malformed_output_is_a_recorded_failure_not_a_crash():
    ds = [_dialogue((f"bad-{i} I lost my keys.", "Where did you see them?")) if i % 2 else
          _dialogue((f"fine {i} I lost my keys.", "Where?")) for i in range(4)]
    ds = [d.replace(id=f"d{i}") for i, d in enumerate(ds)]
    ds.append(_dialogue(("down-x hello", "hi")).replace(id="d4"))
    j = GarbageFor(bad=["1", "3"], down=["x"])
    annotated, failures = J.annotate_dialogues(j, ds, tries=3)
    assert [d.id for d in annotated] == ["d0", "d2"]
    assert [f.id for f in failures] == ["d1", "d3", "d4"]
    assert all(f.tries == 3 for f in failures)
    assert "malformed annotation" in failures[0].reason and failures[0].raw.startswith('{"annotations"')
    assert "call failed" in failures[2].reason and failures[2].raw is None
    assert len(j.prompts) == 5 + 3 + 3  # failures resampled, successes not


# ---------------------------------------------------------------- the file stage and the CLI
def _run_cli(argv):
    from sage_jax.judge.cli import register

    parser = argparse.ArgumentParser(prog="sage-jax")
    register(parser.add_subparsers(dest="command", required=True))
    args = parser.parse_args(argv)
    return args.func(args)


def test_cli_annotates_sharegpt_to_sac_jsonl(sharegpt_json, tmp_path, capsys):
    out = tmp_path / "sac.jsonl"
    rc = _run_cli(["annotate", str(sharegpt_json), "-o", str(out), "--judge", "rules:", "--no-progress"])
    assert rc == 0
    dialogues, report = read_sac(out, strict=True)
    assert [d.id for d in dialogues] == ["c0", "c1", "c2", "c3", "c4"] and report.skipped == 0
    for d in dialogues:
        check_dialogue(d, require_latents=True)
        assert d.meta["annotator"] == "rules:v1" and d.meta["source"] == "sharegpt"
    raw = json.loads(out.read_text().splitlines()[0])
    assert set(raw["turns"][0]) == {"role", "text", "state"} and set(raw["turns"][1]) == {"role", "text", "action"}
    err = capsys.readouterr().err
    assert "5 annotated, 0 already done, 0 failed" in err
    assert (tmp_path / "sac.failures.jsonl").read_text() == ""


def test_killed_run_resumes_and_skips_finished_ids(sharegpt_json, tmp_path):
    out = tmp_path / "sac.jsonl"
    full = annotate_file(sharegpt_json, out, J.RulesJudge(), progress=False)
    assert full.annotated == 5
    reference = out.read_text().splitlines()
    # simulate a kill: two finished records and a torn third line
    out.write_text(reference[0] + "\n" + reference[1] + "\n" + reference[2][:25])
    j = GarbageFor()
    rep = annotate_file(sharegpt_json, out, j, progress=False, chunk_size=2)
    assert rep.already_done == 2 and rep.annotated == 3 and rep.failed == 0
    assert len(j.prompts) == 3  # only the unfinished dialogues were sent to the judge
    lines = out.read_text().splitlines()
    ids = [json.loads(line)["id"] for line in lines]
    assert sorted(ids) == ["c0", "c1", "c2", "c3", "c4"] and len(ids) == 5  # each exactly once, torn line gone
    # the resumed records carry their own annotator's name
    assert [json.loads(line)["meta"]["annotator"] for line in lines] == ["rules:v1"] * 2 + ["garbage-for:test"] * 3
    # a third run has nothing left to do
    j3 = GarbageFor()
    rep3 = annotate_file(sharegpt_json, out, j3, progress=False)
    assert rep3.already_done == 5 and rep3.annotated == 0 and j3.prompts == []


def test_failures_are_reported_and_retried_on_the_next_run(tmp_path, capsys):
    convs = [(f"k{i}", [f"PUPPY-{i} my puppy is sick", "Oh no, I'm sorry. What are the symptoms?"]) for i in range(4)]
    recs = sharegpt_records(convs)
    recs.append({"id": "broken", "conversations": [{"from": "gpt", "value": "starts with gpt"}]})
    src = tmp_path / "raw.jsonl"
    src.write_text("\n".join(json.dumps(r) for r in recs) + "\n")
    out = tmp_path / "sac.jsonl"
    rep = annotate_file(src, out, GarbageFor(bad=["1", "2"]), progress=False, tries=2)
    assert (rep.annotated, rep.failed, rep.read.skipped) == (2, 2, 1)
    fails = [json.loads(line) for line in (tmp_path / "sac.failures.jsonl").read_text().splitlines()]
    assert [f["id"] for f in fails] == ["k1", "k2", None]
    assert "malformed annotation" in fails[0]["reason"] and fails[0]["tries"] == 2
    assert "malformed input record" in fails[2]["reason"]
    assert "failed k1: malformed annotation" in rep.summary()
    # the next run (a judge that now answers) retries exactly the failed ids
    j = GarbageFor()
    rep2 = annotate_file(src, out, j, progress=False)
    assert (rep2.already_done, rep2.annotated, rep2.failed) == (2, 2, 0) and len(j.prompts) == 2
    assert sorted(d.id for d in read_sac(out)[0]) == ["k0", "k1", "k2", "k3"]


def test_resume_follows_content_not_position(tmp_path):
    """Records without ids get ids from their content: a reordered, extended input resumes with
    only the new dialogue annotated; a finished id whose dialogue changed stops with its name."""
    convs = [(None, [f"PUPPY-{i} my puppy is sick", "Oh no, I'm sorry. What are the symptoms?"]) for i in range(3)]
    recs = [{"conversations": r["conversations"]} for r in sharegpt_records(convs)]
    src, out = tmp_path / "raw.jsonl", tmp_path / "sac.jsonl"
    src.write_text("\n".join(json.dumps(r) for r in recs) + "\n")
    assert annotate_file(src, out, GarbageFor(), progress=False).annotated == 3
    first = {d.id: d for d in read_sac(out)[0]}
    extra = {"conversations": [{"from": "human", "value": "PUPPY-9 new"}, {"from": "gpt", "value": "Tell me more."}]}
    src.write_text("\n".join(json.dumps(r) for r in [extra, *reversed(recs)]) + "\n")
    j = GarbageFor()
    rep = annotate_file(src, out, j, progress=False)
    assert (rep.already_done, rep.annotated) == (3, 1) and len(j.prompts) == 1
    again = read_sac(out)[0]
    assert len(again) == len({d.id for d in again}) == 4
    assert all(first[d.id] == d for d in again if d.id in first)
    # explicit ids whose dialogue changed under a finished id: refused, nothing appended
    named = tmp_path / "named.jsonl"
    named.write_text("\n".join(json.dumps(r) for r in sharegpt_records(CONVS[:2])) + "\n")
    out2 = tmp_path / "named.sac.jsonl"
    annotate_file(named, out2, GarbageFor(), progress=False)
    before = out2.read_text()
    changed = sharegpt_records([CONVS[1], (CONVS[0][0], ["something else entirely", "oh?"])])
    named.write_text("\n".join(json.dumps(r) for r in changed) + "\n")
    with pytest.raises(ValueError, match=f"{CONVS[0][0]}.*another dialogue"):
        annotate_file(named, out2, GarbageFor(), progress=False)
    assert out2.read_text() == before


def test_cli_exit_code_and_summary_on_failures(tmp_path, capsys, monkeypatch):
    src = tmp_path / "raw.jsonl"
    src.write_text(json.dumps({"id": "x", "conversations": [{"from": "human", "value": "hi"}]}) + "\n")
    import sage_jax.judge.base as base

    monkeypatch.setattr(base, "make_judge", lambda spec, **kw: _AlwaysBad())
    rc = _run_cli(["annotate", str(src), "-o", str(tmp_path / "o.jsonl"), "--judge", "rules:", "--no-progress",
                   "--tries", "2", "--failures", str(tmp_path / "f.jsonl")])
    assert rc == 2
    err = capsys.readouterr().err
    assert "1 failed" in err and "failure report: " in err and "f.jsonl" in err
    assert json.loads((tmp_path / "f.jsonl").read_text())["id"] == "x"


class _AlwaysBad:
    name = "always-bad:test"

    def complete(self, prompts, **kw):
        return [Completion("not json") for _ in prompts]


def test_cli_annotates_over_http_with_faults(sharegpt_json, tmp_path, monkeypatch, capsys):
    from fault_server import FaultServer

    monkeypatch.setenv("SAGE_JUDGE_API_KEY", "sk-annotate-secret")
    out = tmp_path / "sac.jsonl"
    with FaultServer(seed=1, fault_rate=0.3, slow_delay=0.8, api_key="sk-annotate-secret") as srv:
        argv = ["annotate", str(sharegpt_json), "-o", str(out), "--judge", f"openai:annotator@{srv.url}",
                "--cache-dir", str(tmp_path / "cache"), "--timeout", "0.4",
                "--max-attempts", "8", "--max-concurrency", "4", "--tries", "4", "--no-progress"]
        assert _run_cli(argv) == 0
        assert sorted(d.id for d in read_sac(out)[0]) == ["c0", "c1", "c2", "c3", "c4"]
        assert all(d.meta["annotator"] == "openai:annotator" for d in read_sac(out)[0])
        n = srv.requests
        out.unlink()  # annotate again from scratch: every answer comes from the cache
        assert _run_cli(argv) == 0 and srv.requests == n
    assert "sk-annotate-secret" not in capsys.readouterr().err


_SLOW_RUN = """
import sys, time
from sage_jax.judge import RulesJudge
from sage_jax.judge.annotate import annotate_file

class Slow(RulesJudge):
    def complete(self, prompts, **kw):
        time.sleep(0.15)
        return super().complete(prompts, **kw)

annotate_file(sys.argv[1], sys.argv[2], Slow(), chunk_size=1, progress=False)
"""


def test_sigkilled_annotate_resumes(tmp_path):
    """SIGKILL at three random points, a rerun each time: the output equals one uninterrupted run's,
    every id once; the last run annotates only what is missing."""
    import random
    import signal
    import subprocess
    import time

    convs = [(f"s{i}", [f"I love hiking trail {i}, it's so pretty.", "Nice! Which part do you like most?"])
             for i in range(40)]
    src = tmp_path / "raw.json"
    src.write_text(json.dumps(sharegpt_records(convs)))
    ref = tmp_path / "ref.jsonl"
    annotate_file(src, ref, J.RulesJudge(), chunk_size=1, progress=False)
    out = tmp_path / "sac.jsonl"
    rng = random.Random(0)
    for _ in range(3):
        lines = lambda: out.read_text().count("\n") if out.exists() else 0  # noqa: E731
        target = lines() + rng.randint(2, 6)
        proc = subprocess.Popen([sys.executable, "-c", _SLOW_RUN, str(src), str(out)])
        try:
            deadline = time.monotonic() + 60
            while time.monotonic() < deadline and lines() < target and proc.poll() is None:
                time.sleep(0.005)
            proc.send_signal(signal.SIGKILL)
            proc.wait(10)
        finally:
            if proc.poll() is None:
                proc.kill()
    done_before = len(read_sac(out)[0])
    assert 3 <= done_before < 40
    prompts = []

    class Counting(J.RulesJudge):
        def complete(self, ps, **kw):
            prompts.extend(ps)
            return super().complete(ps, **kw)

    rep = annotate_file(src, out, Counting(), progress=False)
    assert rep.already_done == done_before and rep.annotated == 40 - done_before
    assert len(prompts) == 40 - done_before
    ids = [d.id for d in read_sac(out, strict=True)[0]]
    assert sorted(ids) == sorted(c for c, _ in convs) and len(ids) == 40
    assert sorted(out.read_text().splitlines()) == sorted(ref.read_text().splitlines())
