"""Latent-prediction accuracy: field comparison, teacher-forced and generated measures, the CLI."""

import argparse
import json
from pathlib import Path

import pytest

from sage_jax.data.jsonl import read_sac
from sage_jax.eval import latent as lat
from sage_jax.sac import Latent

SAMPLE = Path(__file__).resolve().parents[1] / "sage_jax" / "data" / "sample" / "ed_train_200.jsonl"


@pytest.fixture(scope="module")
def dialogues():
    ds, _ = read_sac(SAMPLE, progress=False)
    return ds[:3]


def test_compare_fields_normalisation_and_jaccard():
    ref_s = Latent("Venting", "sad", ("job", "Boss"))
    ref_a = Latent("sympathizing", None, ())
    pred_s = Latent("  venting ", "SAD", ("boss", "money"))
    pred_a = Latent("Sympathizing", "null", ())
    sc = lat.compare_fields(ref_s, ref_a, pred_s, pred_a)
    assert sc["u_motivation"] == 1.0 and sc["u_emotion"] == 1.0
    assert sc["u_topic"] == pytest.approx(1 / 3) and sc["u_topic_exact"] == 0.0  # {job, boss} vs {boss, money}
    assert sc["a_motivation"] == 1.0 and sc["a_emotion"] == 1.0  # "null" is a null
    assert sc["a_topic"] == 1.0 and sc["a_topic_exact"] == 1.0  # both empty
    sc = lat.compare_fields(ref_s, ref_a, Latent("asking", "sad", ("job", "boss")), None)
    assert sc["u_motivation"] == 0.0 and sc["u_topic"] == 1.0
    assert all(sc[k] == 0.0 for k in ("a_motivation", "a_emotion", "a_topic", "a_topic_exact"))  # block missing
    assert lat.normalise_label("  Very   Sad ") == "very sad" and lat.normalise_label("None") is None


class ReferenceChat:
    """Answers each history with the reference latent prefix of the next assistant turn (an oracle)."""

    name = "oracle"
    batch_size = 4

    def __init__(self, dialogues, corrupt_emotion=False):
        from sage_jax.sac import render_assistant

        self.by_user = {}
        for d in dialogues:
            for i, t in enumerate(d.turns):
                if t.role == "assistant" and t.action is not None:
                    s = d.turns[i - 1].state
                    if corrupt_emotion:
                        s = Latent(s.motivation, "wrong-emotion", s.topic)
                    self.by_user[d.turns[i - 1].text] = render_assistant(s, t.action, t.text)

    def chat(self, conversations, *, temperature=0.0, max_tokens=64, seed=0, row_seeds=None):
        from sage_jax.eval.generation import ChatCompletion

        return [ChatCompletion(self.by_user[c[-1]["content"]], raw=self.by_user[c[-1]["content"]])
                for c in conversations]


def test_generated_measure_with_an_oracle(dialogues, tmp_path):
    res = lat.generated_field_accuracy(ReferenceChat(dialogues), dialogues, max_turns=2, output=tmp_path / "g.jsonl")
    assert res["turns"] == 6 and res["parse_ok_rate"] == 1.0
    assert all(v["accuracy"] == 1.0 for k, v in res["fields"].items() if k in lat.SCALAR_FIELDS)
    assert all(v["jaccard"] == 1.0 and v["exact"] == 1.0 for k, v in res["fields"].items() if k in lat.TOPIC_FIELDS)
    assert len((tmp_path / "g.jsonl").read_text().splitlines()) == 6
    res = lat.generated_field_accuracy(ReferenceChat(dialogues, corrupt_emotion=True), dialogues, max_turns=2)
    assert res["fields"]["u_emotion"]["accuracy"] == 0.0 and res["fields"]["u_motivation"]["accuracy"] == 1.0


def test_latent_eval_with_tiny_model(tiny_dir, dialogues, tmp_path):
    cfg = lat.LatentEvalConfig(max_dialogues=3, max_turns=2, seq_len=512, batch_rows=4, max_new_tokens=16,
                               progress=False)
    res = lat.evaluate_latents(str(tiny_dir), SAMPLE, cfg, output=tmp_path / "turns.jsonl")
    assert res["dialogues"] == 3 and res["annotated_turns"] > 0 and res["latent_tokens"] is False
    tf = res["teacher_forced"]
    assert tf["latent_tokens"] > 0 and tf["tokens"] > tf["latent_tokens"]
    assert 0.0 <= tf["latent_accuracy"] <= 1.0 and 0.0 <= tf["accuracy"] <= 1.0 and tf["loss"] > 0
    g = res["generated"]
    assert g["turns"] == 6
    for k in lat.SCALAR_FIELDS:
        assert 0.0 <= g["fields"][k]["accuracy"] <= 1.0
    for k in lat.TOPIC_FIELDS:
        assert 0.0 <= g["fields"][k]["jaccard"] <= 1.0 and 0.0 <= g["fields"][k]["exact"] <= 1.0
    recs = [json.loads(line) for line in (tmp_path / "turns.jsonl").read_text().splitlines()]
    assert len(recs) == 6 and all(r["generated"] is not None for r in recs)
    text = lat.format_latent_summary(res)
    assert "latent-token acc" in text and "u_emotion" in text


def test_latent_cli(tiny_dir, tmp_path, capsys):
    from sage_jax.eval.cli import register

    p = argparse.ArgumentParser(prog="sage-jax")
    register(p.add_subparsers(dest="command", required=True))
    args = p.parse_args(["eval", "latent", "--model", str(tiny_dir), "--data", str(SAMPLE), "--max-dialogues", "2",
                         "--max-turns", "1", "--seq-len", "512", "--max-new-tokens", "8", "--no-teacher-forced",
                         "--summary", str(tmp_path / "s.json"), "--no-progress"])
    assert args.func(args) == 0
    assert "generated (2 turns" in capsys.readouterr().out
    s = json.loads((tmp_path / "s.json").read_text())
    assert "teacher_forced" not in s and s["generated"]["turns"] == 2
    with pytest.raises(FileNotFoundError, match="nope.jsonl"):
        lat.evaluate_latents(str(tiny_dir), tmp_path / "nope.jsonl")
