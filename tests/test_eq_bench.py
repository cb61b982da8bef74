"""EQ-Bench v2: scoring (hand-computed), validity, prompts, rescoring published results, a run."""

import argparse
import json
from pathlib import Path

import pytest

from sage_jax.eval import eq_bench as eq

DATA = Path(__file__).resolve().parents[1].parent / "shared" / "data"
EQ_DIR = DATA / "eq_bench"
V02 = EQ_DIR / "TheBloke__Mistral-7B-Instruct-v0.2-GGUF_eqbench_v2_results.json"
V01 = EQ_DIR / "mistralai__mistral-7b-instruct-v0.1_eqbench_v2_results.json"


@pytest.fixture(scope="module")
def questions():
    if not (EQ_DIR / eq.QUESTIONS_FILE).exists():
        pytest.skip(f"EQ-Bench data not found at {EQ_DIR} (the project's shared/data folder is absent)")
    return eq.load_questions(EQ_DIR / eq.QUESTIONS_FILE)


def _results(path):
    if not path.exists():
        pytest.skip(f"published EQ-Bench results file not found: {path}")
    return path


REF = (("Remorseful", 0.0), ("Indifferent", 6.0), ("Affectionate", 0.0), ("Annoyed", 7.0))


# ---------------------------------------------------------------- per-question scoring
def test_scaled_difference_values():
    assert eq.scaled_difference(0) == 0.0
    # 6.5 / (1 + e^3.6) = 6.5 / 37.598 = 0.17288
    assert eq.scaled_difference(1) == pytest.approx(0.172881, abs=1e-5)
    assert eq.scaled_difference(4) == pytest.approx(3.25)  # sigmoid midpoint: 6.5 / 2
    assert eq.scaled_difference(6) == 6.0 and eq.scaled_difference(10) == 10.0
    # the boundary: linear by default (what published scores use), sigmoid with d5_sigmoid
    assert eq.scaled_difference(5) == 5.0
    assert eq.scaled_difference(5, d5_sigmoid=True) == pytest.approx(4.995411, abs=1e-5)


def test_question_score_hand_computed():
    perfect = {"Remorseful": "0", "Indifferent": "6", "Affectionate": "0", "Annoyed": "7"}
    assert eq.question_score(REF, perfect) == pytest.approx(10.0)  # every d = 0
    # d = 2 on one emotion: 6.5 / (1 + e^2.4) = 0.540623 -> 10 - 0.7477 * 0.540623 = 9.595777
    a = dict(perfect, Affectionate="2")
    assert eq.question_score(REF, a) == pytest.approx(9.595777, abs=1e-5)
    # d = 1 and d = 3: 0.172880 + 6.5 / (1 + e^1.2) = 0.172880 + 1.504589 -> 10 - 0.7477 * 1.677469 = 8.745756
    a = dict(perfect, Indifferent="5", Annoyed="10")
    assert eq.question_score(REF, a) == pytest.approx(8.745756, abs=1e-5)
    # d = 6 (> 5, linear): 10 - 0.7477 * 6 = 5.5138
    assert eq.question_score(REF, dict(perfect, Indifferent="0")) == pytest.approx(5.5138)
    # d = 5: 10 - 0.7477 * 5 = 6.2615 (published convention); README literal: 10 - 0.7477 * 4.995411
    assert eq.question_score(REF, dict(perfect, Annoyed="2")) == pytest.approx(6.2615)
    assert eq.question_score(REF, dict(perfect, Annoyed="2"), d5_sigmoid=True) == pytest.approx(6.264931, abs=1e-5)
    # all far off: d = 10, 4, 10, 3 -> 10 - 0.7477 * (10 + 3.25 + 10 + 1.504589) = -8.509006
    far = {"Remorseful": "10", "Indifferent": "10", "Affectionate": "10", "Annoyed": "10"}
    assert eq.question_score(REF, far) == pytest.approx(-8.509006, abs=1e-5)


def test_question_score_needs_the_four_reference_emotions():
    perfect = {"Remorseful": "0", "Indifferent": "6", "Affectionate": "0", "Annoyed": "7"}
    three = {k: v for k, v in perfect.items() if k != "Annoyed"}
    assert eq.question_score(REF, three) is None
    assert "expected 4" in eq.answer_problem(REF, three)
    wrong = dict(three, Angry="7")  # 4 pairs, one name not a reference emotion
    assert eq.question_score(REF, wrong) is None
    assert "do not match" in eq.answer_problem(REF, wrong)
    five = dict(perfect, Happy="3")
    assert eq.question_score(REF, five) is None
    # names match case-insensitively
    lower = {k.lower(): v for k, v in perfect.items()}
    assert eq.question_score(REF, lower) == pytest.approx(10.0)


def test_parse_answer_regex():
    text = "Remorseful: 0\nIndifferent: 6\nAffectionate:  0\nAnnoyed: 7\n\nThat is all."
    assert eq.parse_answer(text) == {"Remorseful": "0", "Indifferent": "6", "Affectionate": "0", "Annoyed": "7"}
    assert eq.parse_answer("Remorseful:0") == {}  # the regex needs whitespace after the colon
    assert eq.parse_answer("Annoyed: <score>") == {}
    assert eq.parse_answer("Annoyed: 3 then Annoyed: 5") == {"Annoyed": "5"}  # dict(findall): the last wins
    assert eq.parse_answer(None) == {}


def test_benchmark_score_and_parse_rate_validity():
    b = eq.benchmark_score([10.0, 5.0, None, 7.5])
    assert b.score == pytest.approx(75.0) and b.parseable == 3 and b.total == 4 and not b.valid  # 75% < 83.33%
    # 143 of 171 parse: 83.6% -> valid; 142 of 171: 83.04% -> invalid
    assert eq.benchmark_score([5.0] * 143 + [None] * 28).valid
    assert not eq.benchmark_score([5.0] * 142 + [None] * 29).valid
    assert eq.benchmark_score([5.0] * 142, total=171).parse_rate == pytest.approx(142 / 171)
    none = eq.benchmark_score([None, None])
    assert none.score is None and not none.valid
    assert eq.benchmark_score([6.81860451]).score == 68.19  # rounded to 2 decimals


# ---------------------------------------------------------------- prompts
def test_prompt_construction_on_real_questions(questions):
    assert len(questions) == 171
    for qid, q in questions.items():
        p = eq.build_prompt(q.prompt, qid=qid)
        assert p.endswith("\nYour answer:\n")
        instructions = p[p.index("[End dialogue]"):].lower()  # dialogues themselves may say "critique"
        assert "critique" not in instructions and "revised" not in instructions
        assert "First pass scores:" not in p and "<your critique here>" not in p
        assert "[End of answer]" in p and "Remember: zero is a valid score" in p
        for emotion in q.emotions:
            assert f"{emotion}: <score>" in p
        assert "Give each of these possible emotions a score from 0-10" in p
    p1 = eq.build_prompt(questions["1"].prompt)
    assert ("likely to be feeling each.\n\nYou must output" in p1
            and "Annoyed: <score>\n\n\n[End of answer]\n\nRemember" in p1)


def test_build_prompt_rejects_other_prompts():
    with pytest.raises(ValueError, match="question 7"):
        eq.build_prompt("Rate these emotions.", qid="7")


def test_load_questions_coerces_string_scores(questions, tmp_path):
    assert questions["1"].reference == (("Remorseful", 0.0), ("Indifferent", 6.0), ("Affectionate", 0.0),
                                        ("Annoyed", 7.0))  # "6" and "7" are strings in the file
    assert all(isinstance(s, float) for q in questions.values() for _, s in q.reference)
    bad = tmp_path / "q.json"
    bad.write_text(json.dumps({"1": {"prompt": "x", "reference_answer_fullscale": {
        "emotion1": "A", "emotion2": "B", "emotion3": "C", "emotion4": "D",
        "emotion1_score": 1, "emotion2_score": "high", "emotion3_score": 0, "emotion4_score": 0}}}))
    with pytest.raises(ValueError, match=r"q\.json: question 1: reference_answer_fullscale\.emotion2_score"):
        eq.load_questions(bad)
    with pytest.raises(FileNotFoundError, match="missing.json"):
        eq.load_questions(tmp_path / "missing.json")


# ---------------------------------------------------------------- published results
@pytest.mark.parametrize("path,published", [(V02, 68.18), (V01, 52.15)])
def test_rescoring_reproduces_published_scores(questions, path, published):
    r = eq.score_results_file(_results(path), questions)
    assert r.published == published
    assert r.score == pytest.approx(published, abs=1e-9)
    assert r.matches_published and r.chosen == "first_pass"
    assert r.first_pass.parseable == 171 and r.first_pass.valid
    assert r.answer_mismatches == 0  # re-parsed raw text == the stored respondent_answers
    # the README's literal d <= 5 sigmoid is 0.01 off: the published scores score d = 5 linearly
    lit = eq.score_results_file(path, questions, d5_sigmoid=True)
    assert lit.score == pytest.approx(published + 0.01, abs=1e-9)


def _cli(argv):
    from sage_jax.eval.cli import register

    p = argparse.ArgumentParser(prog="sage-jax")
    register(p.add_subparsers(dest="command", required=True))
    args = p.parse_args(argv)
    return args.func(args)


def test_cli_score_results(questions, capsys):
    rc = _cli(["eval", "eq-bench", "--questions", str(EQ_DIR / eq.QUESTIONS_FILE),
               "--score-results", str(_results(V02)), str(_results(V01))])
    out = capsys.readouterr().out.splitlines()
    assert rc == 0
    assert out == [f"{V02}: 68.18", f"{V01}: 52.15"]


def test_results_file_errors(questions, tmp_path):
    f = tmp_path / "r.json"
    f.write_text(json.dumps({"benchmark_score": 1.0}))
    with pytest.raises(ValueError, match=r"r\.json: field 'raw_results' missing"):
        eq.score_results_file(f, questions)
    f.write_text(json.dumps({"raw_results": {"1": {"raw_inference": {"999": "x"}}}}))
    with pytest.raises(ValueError, match="not in the questions file"):
        eq.score_results_file(f, questions)


# ---------------------------------------------------------------- runs
class PerfectBackend:
    """Answers every EQ-Bench prompt with its reference scores (a deterministic oracle)."""

    name = "oracle"

    def __init__(self, questions):
        self.by_prompt = {eq.build_prompt(q.prompt): q for q in questions.values()}
        self.calls = 0

    def chat(self, conversations, *, temperature=0.0, max_tokens=60, seed=0, row_seeds=None):
        from sage_jax.judge import Completion

        self.calls += len(conversations)
        out = []
        for conv in conversations:
            q = self.by_prompt[conv[-1]["content"]]
            out.append(Completion("\n".join(f"{e}: {int(s)}" for e, s in q.reference)))
        return out


def test_run_with_oracle_backend_is_valid_and_resumes(questions, tmp_path):
    out = tmp_path / "eq.jsonl"
    sub = {k: questions[k] for k in list(questions)[:6]}
    be = PerfectBackend(questions)
    res = eq.run_eq_bench(be, out, eq.EQBenchConfig(limit=4, progress=False), questions=sub)
    assert res.benchmark.score == 100.0 and res.benchmark.valid and res.benchmark.total == 4
    assert be.calls == 4 and not res.complete
    recs = [json.loads(line) for line in out.read_text().splitlines()]
    assert [r["id"] for r in recs] == ["1", "2", "3", "4"]
    assert recs[0]["attempts"][0]["temperature"] == 0.01 and recs[0]["score"] == pytest.approx(10.0)
    res = eq.run_eq_bench(be, out, eq.EQBenchConfig(limit=6, progress=False), questions=sub)
    assert be.calls == 6 and res.n_done_before == 4 and res.n_new == 2  # only the 2 new ones asked
    assert len(out.read_text().splitlines()) == 6
    assert eq.score_run_file(out, sub).score == 100.0
    assert "score 100.00" in eq.format_summary(res)


def test_run_with_rules_judge_is_flagged_invalid(questions, tmp_path):
    out = tmp_path / "eq.jsonl"
    res = eq.run_eq_bench("rules:", out, eq.EQBenchConfig(limit=2, max_attempts=3, progress=False),
                          questions=questions)
    assert res.benchmark.score is None and not res.benchmark.valid and res.benchmark.parseable == 0
    recs = [json.loads(line) for line in out.read_text().splitlines()]
    assert len(recs) == 2 and recs[0]["model"] == "rules:v1"
    assert [a["temperature"] for a in recs[0]["attempts"]] == [0.01, 0.16, 0.31]  # +0.15 per retry, bounded
    assert recs[0]["problem"].startswith("backend error") and recs[0]["score"] is None
    assert "INVALID" in eq.format_summary(res)


def test_run_with_tiny_model_through_sampler_and_cli(questions, tiny_dir, tmp_path, capsys):
    out = tmp_path / "eq.jsonl"
    rc = _cli(["eval", "eq-bench", "--model", str(tiny_dir), "--questions", str(EQ_DIR / eq.QUESTIONS_FILE),
               "--limit", "3", "--attempts", "2", "-o", str(out), "--no-progress"])
    printed = capsys.readouterr().out
    assert "EQ-Bench v2: score" in printed and "parseable" in printed
    recs = [json.loads(line) for line in out.read_text().splitlines()]
    assert [r["id"] for r in recs] == ["1", "2", "3"]
    for r in recs:
        assert r["model"] == "model:" + Path(tiny_dir).name
        assert 1 <= len(r["attempts"]) <= 2 and all(a["text"] is not None for a in r["attempts"])
        assert (r["score"] is None) == (r["problem"] is not None)
    summary = json.loads(Path(str(out) + ".summary.json").read_text())
    assert summary["benchmark"]["total"] == 3
    assert rc == (0 if summary["benchmark"]["valid"] else 2)
    # resume: nothing left to ask for the same 3 questions (the model is not even loaded)
    res = eq.run_eq_bench(str(tiny_dir), out, eq.EQBenchConfig(limit=3, progress=False), questions=questions)
    assert res.n_new == 0 and res.n_done_before == 3
