"""MT-Bench: files, judge prompt formatting, verdict parsing, pairwise consensus, runs."""

import argparse
import json
import re
from pathlib import Path

import pytest

from sage_jax.eval import mt_bench as mt

DATA = Path(__file__).resolve().parents[1].parent / "shared" / "data"
MT_DIR = DATA / "mt_bench"


@pytest.fixture(scope="module")
def questions():
    if not (MT_DIR / "question.jsonl").exists():
        pytest.skip(f"MT-Bench data not found at {MT_DIR} (the project's shared/data folder is absent)")
    return mt.load_questions(MT_DIR)


@pytest.fixture(scope="module")
def prompts():
    if not (MT_DIR / "judge_prompts.jsonl").exists():
        pytest.skip(f"MT-Bench judge prompts not found at {MT_DIR}")
    return mt.load_judge_prompts(MT_DIR)


def test_files_load(questions, prompts):
    assert len(questions) == 80 and all(len(q.turns) == 2 for q in questions)
    cats = {q.category for q in questions}
    assert cats == set(mt.TEMPERATURE)
    no_ref = [q for q in questions if q.category in mt.NEED_REF_CATS and not q.reference]
    assert [q.question_id for q in no_ref] == [123]  # one coding question has no reference answer
    # ... so it is judged with the general prompts (FastChat uses GPT-4 reference answers we do not have)
    assert mt.single_prompt(prompts, no_ref[0], ["x", "y"], 1)[0].name == "single-v1"
    assert {"pair-v2", "pair-v2-multi-turn", "pair-math-v1", "pair-math-v1-multi-turn", "single-v1",
            "single-math-v1", "single-v1-multi-turn", "single-math-v1-multi-turn"} <= set(prompts)


def test_bad_files_name_file_line_and_field(tmp_path):
    f = tmp_path / "question.jsonl"
    f.write_text(json.dumps({"question_id": 1, "category": "writing", "turns": ["a", "b"]}) + "\n"
                 + json.dumps({"question_id": 2, "category": "writing", "turns": "oops"}) + "\n")
    with pytest.raises(ValueError, match=r"question\.jsonl:2: field 'turns'"):
        mt.load_questions(f)
    g = tmp_path / "judge_prompts.jsonl"
    g.write_text(json.dumps({"name": "x", "type": "pairwise", "system_prompt": "s", "prompt_template": 3,
                             "output_format": "[[A]]"}) + "\n")
    with pytest.raises(ValueError, match=r"judge_prompts\.jsonl:1: field 'prompt_template'"):
        mt.load_judge_prompts(g)
    with pytest.raises(FileNotFoundError, match="nowhere"):
        mt.load_questions(tmp_path / "nowhere.jsonl")


# ---------------------------------------------------------------- verdicts
def test_parse_pair_verdict():
    assert mt.parse_pair_verdict("Both are fine but A is crisper. [[A]]") == ("A", None)
    assert mt.parse_pair_verdict("[[B]]") == ("B", None)
    assert mt.parse_pair_verdict("It is a tie: [[C]]") == ("tie", None)
    v, why = mt.parse_pair_verdict("[[A]] ... on reflection [[B]]")
    assert v is None and "ambiguous" in why
    assert mt.parse_pair_verdict("Assistant A is better.")[0] is None
    assert mt.parse_pair_verdict("[A]")[0] is None  # only the double-bracket form counts
    assert mt.parse_pair_verdict(None) == (None, "no text")


def test_parse_rating():
    assert mt.parse_rating("Good answer. Rating: [[7]]") == (7.0, None)
    assert mt.parse_rating("Rating: [[8.5]]") == (8.5, None)
    assert mt.parse_rating("Rating: [6]") == (6.0, None)  # FastChat's backup pattern
    assert mt.parse_rating("[[7]] and later [[7]]") == (7.0, None)
    assert mt.parse_rating("[[3]] no, [[9]]")[0] is None
    assert mt.parse_rating("Rating: [[11]]")[0] is None
    assert mt.parse_rating("Rating: seven")[0] is None


def test_pairwise_consensus_arithmetic():
    # (game 1 verdict with the model as A, game 2 verdict with the model as B)
    games = [("A", "B"),    # both orders prefer the model -> win
             ("B", "A"),    # both prefer the baseline -> loss
             ("A", "A"),    # position bias: always A -> inconsistent -> tie
             ("B", "B"),    # always B -> tie
             ("tie", "tie"),  # both tie -> tie
             ("A", "tie"),  # one order only -> tie
             ("A", None),   # a failed verdict -> error (left out of the rates)
             ("A", "B")]    # win
    outcomes = [mt.combine_orders(g1, g2) for g1, g2 in games]
    assert outcomes == ["model", "baseline", "tie", "tie", "tie", "tie", "error", "model"]
    t = mt.pairwise_tally(outcomes)
    assert (t["win"], t["loss"], t["tie"], t["error"], t["n"]) == (2, 1, 4, 1, 7)
    assert t["win_rate"] == pytest.approx(2 / 7) and t["loss_rate"] == pytest.approx(1 / 7)
    assert t["win_rate_adjusted"] == pytest.approx((2 + 0.5 * 4) / 7)


# ---------------------------------------------------------------- prompt formatting
def test_single_prompt_formatting(questions, prompts):
    q = next(q for q in questions if q.category == "writing")
    ans = {"turns": ["First {answer} with braces.", "Second answer."]}
    jp, msgs = mt.single_prompt(prompts, q, ans, 1)
    assert jp.name == "single-v1"
    assert msgs[0] == {"role": "system", "content": "You are a helpful assistant."}
    user = msgs[1]["content"]
    assert user.startswith("[Instruction]\nPlease act as an impartial judge")
    assert f"[Question]\n{q.turns[0]}\n\n[The Start of Assistant's Answer]\nFirst {{answer}} with braces.\n" \
           "[The End of Assistant's Answer]" in user
    jp, msgs = mt.single_prompt(prompts, q, ans, 2)
    assert jp.name == "single-v1-multi-turn" and "second user question" in msgs[0]["content"]
    assert (f"### User:\n{q.turns[0]}\n\n### Assistant A:\nFirst {{answer}} with braces.\n\n### User:\n{q.turns[1]}"
            f"\n\n### Assistant A:\nSecond answer.\n\n<|The End of Assistant A's Conversation with User|>"
            == msgs[1]["content"].split("<|The Start of Assistant A's Conversation with User|>\n\n")[1])


def test_pairwise_prompt_formatting_with_references(questions, prompts):
    q = next(q for q in questions if q.category == "math")
    a, b = ["A1", "A2"], ["B1", "B2"]
    jp, msgs = mt.pairwise_prompt(prompts, q, a, b, 1)
    assert jp.name == "pair-math-v1"
    u = msgs[1]["content"]
    assert f"[The Start of Reference Answer]\n{q.reference[0]}\n[The End of Reference Answer]" in u
    assert "[The Start of Assistant A's Answer]\nA1\n[The End of Assistant A's Answer]" in u
    assert "[The Start of Assistant B's Answer]\nB1\n[The End of Assistant B's Answer]" in u
    assert '"[[A]]" if assistant A is better' in msgs[0]["content"]
    jp, msgs = mt.pairwise_prompt(prompts, q, a, b, 2)
    assert jp.name == "pair-math-v1-multi-turn"
    u = msgs[1]["content"]
    assert f"### Reference answer:\n{q.reference[1]}" in u
    assert "### Assistant A:\nA2" in u and "### Assistant B:\nB2" in u and "{" not in u.replace(q.turns[0], "")\
        .replace(q.turns[1], "").replace(q.reference[0], "").replace(q.reference[1], "")
    with pytest.raises(ValueError, match="no answer for turn 2"):
        mt.pairwise_prompt(prompts, q, ["A1"], b, 2)


# ---------------------------------------------------------------- runs
class TextJudge:
    """A Judge (one prompt string per call): prefers the answer containing GOOD, else answers [[A]]."""

    name = "text-judge"

    def __init__(self):
        self.calls = 0

    def complete(self, prompts, *, temperature=0.8, max_tokens=64, seed=None):
        from sage_jax.judge import Completion

        self.calls += len(prompts)
        out = []
        for p in prompts:
            if "[[rating]]" in p:
                out.append(Completion("Rating: [[9]]" if "GOOD" in p else "no idea"))
                continue
            a = re.search(r"Start of Assistant A's (.*?)End of Assistant A's", p, re.S).group(1)
            b = re.search(r"Start of Assistant B's (.*?)End of Assistant B's", p, re.S).group(1)
            if "GOOD" in a and "GOOD" not in b:
                out.append(Completion("[[A]]"))
            elif "GOOD" in b and "GOOD" not in a:
                out.append(Completion("[[B]]"))
            else:
                out.append(Completion("Position first: [[A]]"))
        return out


def test_judging_flow_with_a_scripted_judge(questions, prompts, tmp_path):
    qs = [q for q in questions if q.category == "writing"][:2]
    model = {qs[0].id: {"turns": ["GOOD one", "GOOD two"]}, qs[1].id: {"turns": ["meh", "meh"]}}
    base = {qs[0].id: {"turns": ["bad", "bad"]}, qs[1].id: {"turns": ["meh", "meh"]}}
    j = TextJudge()
    recs = mt.judge_pairwise(j, qs, model, base, prompts, tmp_path / "pair.jsonl", progress=False)
    assert [r["winner"] for r in recs] == ["model", "model", "tie", "tie"]  # q2: always [[A]] -> inconsistent
    assert recs[2]["g1_verdict"] == "A" and recs[2]["g2_verdict"] == "A"
    s = mt.pairwise_summary(recs)
    assert s["overall"]["win"] == 2 and s["overall"]["tie"] == 2 and s["verdict_failures"] == 0
    calls = j.calls
    assert calls == 8  # 2 questions x 2 turns x 2 orders
    mt.judge_pairwise(j, qs, model, base, prompts, tmp_path / "pair.jsonl", progress=False)
    assert j.calls == calls  # resumed: nothing asked again
    single = mt.judge_single(j, qs, model, prompts, tmp_path / "single.jsonl", tries=2, progress=False)
    assert [r["rating"] for r in single] == [9.0, 9.0, None, None]
    assert single[2]["failure"] == "no [[rating]] found" and single[2]["tries"] == 2  # re-asked, then counted
    ss = mt.single_summary(single)
    assert ss["overall"] == {"score": 9.0, "n": 2, "failures": 2, "not_judged": 0}
    assert "9.00" in mt.format_single(ss)


def test_three_question_run_with_tiny_model(questions, tiny_dir, tmp_path, capsys):
    from sage_jax.eval.cli import register

    p = argparse.ArgumentParser(prog="sage-jax")
    register(p.add_subparsers(dest="command", required=True))
    out = tmp_path / "mt"
    args = p.parse_args(["eval", "mt-bench", "--model", str(tiny_dir), "--baseline", str(tiny_dir),
                         "--judge", f"local:{tiny_dir}", "--mode", "both", "--limit", "3", "-o", str(out),
                         "--questions", str(MT_DIR), "--judge-prompts", str(MT_DIR), "--max-tokens", "8",
                         "--judge-max-tokens", "8", "--tries", "1", "--no-progress"])
    assert args.func(args) == 0
    printed = capsys.readouterr().out
    assert "MT-Bench single-answer grading" in printed and "MT-Bench pairwise" in printed
    name = Path(tiny_dir).name
    answers = [json.loads(line) for line in (out / f"answers_model_{name}.jsonl").read_text().splitlines()]
    assert [a["question_id"] for a in answers] == [q.question_id for q in questions[:3]]
    assert all(len(a["turns"]) == 2 and all(isinstance(t, str) for t in a["turns"]) for a in answers)
    summary = json.loads((out / "summary.json").read_text())
    assert summary["questions"] == 3 and summary["judge"] == f"local:{tiny_dir}"
    single = summary["single"]["overall"]
    assert single["n"] + single["failures"] + single["not_judged"] == 6  # 3 questions x 2 turns
    pair = summary["pairwise"]
    assert pair["verdicts"] == 12 and 0 <= pair["verdict_failures"] <= 12  # counted, whatever the tiny judge says
    o = pair["overall"]
    assert o["win"] + o["loss"] + o["tie"] + o["error"] == 6
    recs = [json.loads(line) for line in next(out.glob("pair_*.jsonl")).read_text().splitlines()]
    assert len(recs) == 6 and all(r["g1_judgment"] is not None for r in recs)


def test_openai_backend_gets_whole_conversations(questions, prompts, tmp_path):
    """Answers and verdicts through ``openai:`` on a loopback server: turn 2 carries the history, the judge
    prompt's system message is sent as a system message."""
    import sys

    sys.path.insert(0, str(Path(__file__).parent))
    from fault_server import FaultServer

    def answer(prompt):
        judging = "[[rating]]" in prompt or "Conversation with User" in prompt  # multi-turn: rubric in the system
        return "Rating: [[6]]" if judging else f"reply to {prompt[:12]}"

    qs = questions[:2]
    with FaultServer(fault_rate=0.0, answer=answer) as srv:
        spec = f"openai:test-model@{srv.url}"
        ans = mt.generate_answers(spec, qs, tmp_path / "a.jsonl", max_tokens=32, progress=False, cache_dir=None)
        assert ans[qs[0].id]["turns"] == [f"reply to {qs[0].turns[0][:12]}", f"reply to {qs[0].turns[1][:12]}"]
        bodies = [r.body for r in srv.records]
        turn2 = next(b for b in bodies if len(b["messages"]) == 3)
        assert [m["role"] for m in turn2["messages"]] == ["user", "assistant", "user"]
        assert turn2["temperature"] == mt.TEMPERATURE[qs[0].category]
        n = len(srv.records)
        recs = mt.judge_single(spec, qs, ans, prompts, tmp_path / "s.jsonl", progress=False)
        assert [r["rating"] for r in recs] == [6.0] * 4 and recs[0]["judge"] == "openai:test-model"
        judged = [r.body for r in srv.records[n:]]
        assert all(b["messages"][0]["role"] == "system" and b["temperature"] == 0.0 for b in judged)
