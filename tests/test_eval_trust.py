"""Evaluation that can be trusted (issue 12, items 2-4): held-out seeds checked by compare, the seed
split, win/tie/loss with Wilson intervals and the judges named; per-field latent accuracy against
the majority-class baseline of the training data, and the parse rate; held-out plain-text
perplexity against a PyTorch oracle."""

from __future__ import annotations

import json
import random
from pathlib import Path

import numpy as np
import pytest

from sage_jax.data.jsonl import read_sac
from sage_jax.data.split import normalise_seed, split_seeds
from sage_jax.eval import compare as cmp
from sage_jax.eval import latent as lat
from sage_jax.sac import Dialogue, Latent, Turn, dialogue_to_json

SAMPLE = Path(__file__).resolve().parents[1] / "sage_jax" / "data" / "sample" / "ed_train_200.jsonl"
SEEDS = SAMPLE.with_name("ed_test_seeds.txt")


@pytest.fixture(scope="module")
def sample():
    ds, _ = read_sac(SAMPLE, progress=False)
    return ds


def _write(path: Path, records) -> Path:
    path.write_text("".join(json.dumps(r) + "\n" for r in records))
    return path


# ---------------------------------------------------------------- split_seeds
def test_split_seeds_disjoint_deterministic_and_order_independent():
    seeds = [s.strip() for s in SEEDS.read_text().splitlines() if s.strip()]
    search, held = split_seeds(seeds, held_out_count=12, salt="ed")
    assert len(held) == 12 and len(search) == len(seeds) - 12
    assert not {normalise_seed(s) for s in search} & {normalise_seed(s) for s in held}
    assert split_seeds(seeds, held_out_count=12, salt="ed") == (search, held)  # deterministic
    shuffled = seeds[:]
    random.Random(1).shuffle(shuffled)
    s2, h2 = split_seeds(shuffled, held_out_count=12, salt="ed")
    assert set(s2) == set(search) and set(h2) == set(held)  # order (and so ids) do not matter
    assert set(split_seeds(seeds, held_out_count=12, salt="other")[1]) != set(held)  # the salt does
    # a duplicate up to whitespace can never straddle the split
    dup = "  " + held[0].replace(" ", "   ") + " "
    s3, h3 = split_seeds(seeds + [dup], held_out_count=12, salt="ed")
    assert dup in h3 and dup not in s3
    # fraction: each seed decided on its own, so more seeds never move an existing one
    s4, h4 = split_seeds(seeds, held_out_fraction=0.3, salt="ed")
    s5, h5 = split_seeds(seeds + [f"an extra seed {i}" for i in range(40)], held_out_fraction=0.3, salt="ed")
    assert set(h4) <= set(h5) and set(s4) <= set(s5) and 0 < len(h4) < len(seeds)
    assert split_seeds(seeds, held_out_fraction=0.0)[1] == [] and split_seeds(seeds, held_out_fraction=1.0)[0] == []
    with pytest.raises(ValueError, match="exactly one"):
        split_seeds(seeds)
    with pytest.raises(ValueError, match="exactly one"):
        split_seeds(seeds, held_out_fraction=0.1, held_out_count=3)
    with pytest.raises(ValueError, match="held_out_fraction"):
        split_seeds(seeds, held_out_fraction=1.5)


# ---------------------------------------------------------------- compare: held-out seeds
def _pair_files(tmp_path, dialogues, meta=None):
    """A/B rollout files over the same ids (B's turns from other dialogues), optional meta on both."""
    a, b = tmp_path / "a.jsonl", tmp_path / "b.jsonl"
    ra, rb = [], []
    for i, d in enumerate(dialogues):
        ja = dialogue_to_json(d)
        jb = dialogue_to_json(dialogues[(i + 1) % len(dialogues)])
        jb["id"] = ja["id"]
        jb["turns"][0] = ja["turns"][0]  # both roll out from the same seed
        if meta:
            ja["meta"] = {**ja.get("meta", {}), **meta}
            jb["meta"] = {**jb.get("meta", {}), **meta}
        ra.append(ja)
        rb.append(jb)
    return str(_write(a, ra)), str(_write(b, rb))


def test_compare_refuses_seeds_used_by_search(sample, tmp_path):
    train, held = sample[:6], sample[6:10]
    search = tmp_path / "search"
    search.mkdir()
    # a search output directory: the searched dialogues (sft.jsonl, seeds as search writes them: renamed ids)
    _write(search / "sft.jsonl", [{**dialogue_to_json(d), "id": f"seed{i:05d}",
                                   "meta": {"seed": d.turns[0].text, "judge": "rules:v1"}}
                                  for i, d in enumerate(train[:3])])
    _write(search / "pairs.jsonl", [{"id": "p0", "history": [dialogue_to_json(train[3])["turns"][0]],
                                     "chosen": {"text": "x"}, "rejected": {"text": "y"}}])
    _write(search / "trees.jsonl", [{"id": "seed00009", "seed": train[4].turns[0].text, "nodes": []}])
    (search / "judge_cache").mkdir()
    used = cmp.used_seeds([search])
    assert {normalise_seed(d.turns[0].text) for d in train[:5]} <= set(used)

    # a compared dialogue whose seed was searched (whitespace differs, id differs): refused, file and id named
    leaky = [*held[:3], train[1].replace(id="heldout_7", turns=(
        Turn("user", "  " + train[1].turns[0].text.replace(" ", "\n ")), *train[1].turns[1:]))]
    a, b = _pair_files(tmp_path, leaky)
    with pytest.raises(ValueError) as e:
        cmp.run_compare(cmp.CompareConfig(a=a, b=b, output=str(tmp_path / "cmp"), exclude_seeds_from=(str(search),)))
    msg = str(e.value)
    assert "sft.jsonl" in msg and "heldout_7" in msg and train[1].turns[0].text[:20] in msg
    assert not (tmp_path / "cmp" / "summary.json").exists()  # refused before judging

    # seeds found through a pair's history, a trees record and a compared dialogue's meta.seed
    for d in (train[3], train[4]):
        a, b = _pair_files(tmp_path, [*held[:2], d.replace(id="x")])
        with pytest.raises(ValueError, match="pairs.jsonl|trees.jsonl"):
            cmp.run_compare(cmp.CompareConfig(a=a, b=b, output=str(tmp_path / "c2"),
                                              exclude_seeds_from=(str(search),)))
    a, b = _pair_files(tmp_path, held[:3], meta={"seed": train[0].turns[0].text})
    with pytest.raises(ValueError, match="seeds used for search"):
        cmp.run_compare(cmp.CompareConfig(a=a, b=b, output=str(tmp_path / "c3"),
                                          exclude_seeds_from=(str(search / "sft.jsonl"),)))
    # a plain seed file works as a source too
    seeds_txt = tmp_path / "search_seeds.txt"
    seeds_txt.write_text(held[0].turns[0].text + "\n")
    a, b = _pair_files(tmp_path, held[:3])
    with pytest.raises(ValueError, match="search_seeds.txt"):
        cmp.run_compare(cmp.CompareConfig(a=a, b=b, output=str(tmp_path / "c4"), exclude_seeds_from=(str(seeds_txt),)))
    with pytest.raises(FileNotFoundError):
        cmp.run_compare(cmp.CompareConfig(a=a, b=b, output=str(tmp_path / "c5"),
                                          exclude_seeds_from=(str(tmp_path / "nope"),)))
    with pytest.raises(ValueError, match="no search outputs"):
        cmp.run_compare(cmp.CompareConfig(a=a, b=b, output=str(tmp_path / "c6"),
                                          exclude_seeds_from=(str(search / "judge_cache"),)))

    # held-out dialogues pass; the summary says the check was made and names both judges
    s = cmp.run_compare(cmp.CompareConfig(a=a, b=b, output=str(tmp_path / "ok"), exclude_seeds_from=(str(search),)))
    assert s["held_out"] == {"checked": True, "exclude_seeds_from": [str(search)], "used_seeds": len(used),
                             "compared_dialogues": 6, "overlap": 0}
    assert s["wins_a"] + s["wins_b"] + s["ties"] == s["total"] == 3
    assert s["judges"]["selection"] == ["rules:v1"] and s["judges"]["selection_source"] == "meta.judge"
    on_disk = json.loads((tmp_path / "ok" / "summary.json").read_text())
    assert on_disk["win_rate_b_decided"] == s["win_rate_b_decided"] and "held-out check" in cmp.format_table(s)


# ---------------------------------------------------------------- compare: intervals and judges
def test_wilson_interval_and_win_tie_loss():
    lo, hi = cmp.wilson_interval(8, 10)
    assert lo == pytest.approx(0.490, abs=1e-3) and hi == pytest.approx(0.943, abs=1e-3)
    lo, hi = cmp.wilson_interval(0, 10)
    assert lo == 0.0 and hi == pytest.approx(0.2775, abs=1e-3)
    assert cmp.wilson_interval(5, 5)[1] == 1.0 and cmp.wilson_interval(0, 0) == (None, None)
    with pytest.raises(ValueError):
        cmp.wilson_interval(3, 2)
    w = cmp.win_tie_loss(cmp.consensus_table(["b"] * 8 + ["a"] * 2 + ["no consensus"] * 10))
    assert (w["wins_a"], w["wins_b"], w["ties"], w["total"]) == (2, 8, 10, 20)
    d, a = w["win_rate_b_decided"], w["win_rate_b_all"]
    assert (d["rate"], d["n"], a["rate"], a["n"]) == (0.8, 10, 0.4, 20)
    assert (d["low"], d["high"]) == pytest.approx((0.490, 0.943), abs=1e-3)
    assert a["low"] < 0.4 < a["high"]
    text = cmp.format_table({**cmp.consensus_table(["b"] * 8 + ["a"] * 2), **cmp.win_tie_loss(
        cmp.consensus_table(["b"] * 8 + ["a"] * 2)), "judge": "rules:v1"})
    assert "0.800 [0.490, 0.943] (n=10)" in text


def test_compare_names_judges_and_warns_when_they_are_the_same(sample, tmp_path, capsys):
    a, b = _pair_files(tmp_path, sample[10:13])
    s = cmp.run_compare(cmp.CompareConfig(a=a, b=b, output=str(tmp_path / "same"), selection_judge="rules:"))
    assert s["judge"] == "rules:v1" and s["judges"]["eval"] == "rules:v1"
    assert s["judges"]["selection"] == ["rules:"] and s["judges"]["selection_source"] == "option"
    assert s["judges"]["same"] is True and any("selected the training data" in w for w in s["warnings"])
    assert any("not checked" in w for w in s["warnings"])  # no exclude_seeds_from: said, not hidden
    err = capsys.readouterr().err
    assert "selected the training data" in err
    assert "WARNING" in cmp.format_table(s)
    # read from the dialogues' meta.judge: a different judge selected the data
    a, b = _pair_files(tmp_path, sample[10:13], meta={"judge": "openai:gpt-4o"})
    s = cmp.run_compare(cmp.CompareConfig(a=a, b=b, output=str(tmp_path / "diff")))
    assert s["judges"] == {"eval": "rules:v1", "selection": ["openai:gpt-4o"], "selection_source": "meta.judge",
                           "same": False}
    assert not any("selected the training data" in w for w in s["warnings"])
    assert cmp.judge_key("openai:m@http://h:1/v1") == cmp.judge_key("openai:m") != cmp.judge_key("openai:n")


# ---------------------------------------------------------------- latent fields vs majority baseline
def _dlg(id_, exchanges):
    turns = []
    for user, (um, ue, ut), (am, ae) in exchanges:
        turns += [Turn("user", user, state=Latent(um, ue, tuple(ut))),
                  Turn("assistant", f"reply to {user}", action=Latent(am, ae, ()))]
    return Dialogue(id_, tuple(turns))


TRAIN = [
    _dlg("t0", [("I lost my job", ("sharing", "sad", ["job"]), ("questioning", None)),
                ("and my dog", ("sharing", "Sad ", ["job"]), ("sympathizing", None))]),
    _dlg("t1", [("I won!", ("sharing", "joyful", []), ("questioning", "happy"))]),
    _dlg("t2", [("what now?", ("asking", "sad", ["job"]), ("questioning", None))]),
]
HELD = [
    _dlg("h0", [("my cat died", ("sharing", "sad", ["pet"]), ("sympathizing", None)),
                ("she was old", ("sharing", "sad", ["job", "pet"]), ("questioning", None))]),
    _dlg("h1", [("got a raise", ("sharing", "proud", ["job"]), ("questioning", "happy"))]),
    _dlg("h2", [("hmm", ("asking", "confused", []), ("advising", None))]),
]


def test_majority_baseline_on_hand_made_training_set():
    m = lat.majority_values(TRAIN)
    assert m["exchanges"] == 4
    assert m["values"] == {"u_motivation": "sharing", "u_emotion": "sad", "a_motivation": "questioning",
                           "a_emotion": None, "u_topic": ["job"], "a_topic": []}
    assert m["counts"]["u_emotion"] == 3 and m["counts"]["a_emotion"] == 3
    b = lat.majority_baseline(TRAIN, HELD)
    f = b["fields"]
    assert b["turns"] == 4
    assert f["u_motivation"]["majority_baseline"] == pytest.approx(3 / 4)
    assert f["u_emotion"]["majority_baseline"] == pytest.approx(2 / 4) and f["u_emotion"]["majority_value"] == "sad"
    assert f["a_motivation"]["majority_baseline"] == pytest.approx(2 / 4)
    assert f["a_emotion"]["majority_baseline"] == pytest.approx(3 / 4)  # null predicted, null references match
    # topics: {job} against {pet}, {job, pet}, {job}, {} -> Jaccard 0, 1/2, 1, 0
    assert f["u_topic"]["majority_baseline"] == pytest.approx(1.5 / 4)
    assert f["u_topic"]["majority_baseline_exact"] == pytest.approx(1 / 4)
    assert f["a_topic"]["majority_baseline"] == 1.0 and all(v["n"] == 4 for v in f.values())


class ScriptedChat:
    """Answers with the reference latent prefix on the listed user texts, plain text elsewhere."""

    name = "scripted"
    batch_size = 3

    def __init__(self, dialogues, parse_on):
        from sage_jax.sac import render_assistant

        self.by_user = {}
        for d in dialogues:
            for i, t in enumerate(d.turns):
                if t.role == "assistant":
                    u = d.turns[i - 1]
                    self.by_user[u.text] = (render_assistant(u.state, t.action, t.text) if u.text in parse_on
                                            else "I am so sorry to hear that.")

    def chat(self, conversations, *, temperature=0.0, max_tokens=64, seed=0, row_seeds=None):
        from sage_jax.eval.generation import ChatCompletion

        return [ChatCompletion(self.by_user[c[-1]["content"]], raw=self.by_user[c[-1]["content"]])
                for c in conversations]


def test_generated_accuracy_reports_baseline_and_parse_rate(tmp_path):
    chat = ScriptedChat(HELD, parse_on={"my cat died", "got a raise", "hmm"})
    train_file = _write(tmp_path / "train.jsonl", [dialogue_to_json(d) for d in TRAIN])
    res = lat.generated_field_accuracy(chat, HELD, train=str(train_file))
    assert res["turns"] == 4 and res["parsed_turns"] == 3 and res["parse_rate"] == pytest.approx(0.75)
    f = res["fields"]
    # the model is right on the 3 parsed turns, 0 on the unparsed one
    assert f["u_emotion"] == {"accuracy": 0.75, "majority_baseline": 0.5, "majority_value": "sad", "n": 4}
    assert f["u_topic"]["jaccard"] == 0.75 and f["u_topic"]["majority_value"] == ["job"]
    assert res["majority"]["exchanges"] == 4
    text = lat.format_latent_summary({"model": "scripted", "dialogues": 3, "annotated_turns": 4, "generated": res})
    assert "majority baseline 0.500 ('sad')" in text and "parse rate (state and action) 0.750" in text
    # without training data: the old shape (accuracy per field), plus n
    res = lat.generated_field_accuracy(chat, HELD, max_turns=1)
    assert res["turns"] == 3 and res["parse_rate"] == 1.0
    assert f.keys() == res["fields"].keys() and "majority_baseline" not in res["fields"]["u_emotion"]


# ---------------------------------------------------------------- perplexity vs a PyTorch oracle
def test_perplexity_equals_torch_oracle(tiny_dir, sample):
    import torch
    import transformers

    from sage_jax.eval import perplexity as ppl

    dialogues = sample[:5]
    cfg = ppl.PerplexityConfig(seq_len=128, batch_rows=2)
    ours = ppl.perplexity(str(tiny_dir), dialogues, cfg)

    tok = transformers.AutoTokenizer.from_pretrained(tiny_dir)
    examples, counts = ppl.encode_plain(dialogues, tok, None, cfg.seq_len)
    assert counts["encoded"] == 5 and counts["truncated"] >= 1  # one loses its last exchange at 128 tokens
    # the loss mask covers the replies and their end-of-turn, nothing of the user turns or latents
    e0 = examples[0]
    sup = tok.decode(e0.tokens[e0.loss_mask])
    assert dialogues[0].turns[1].text in sup and "<|im_end|>" in sup
    assert dialogues[0].turns[0].text[:30] not in sup and "questioning" not in tok.decode(e0.tokens)

    model = transformers.AutoModelForCausalLM.from_pretrained(tiny_dir, dtype=torch.float32).eval()
    nll, n = 0.0, 0
    with torch.no_grad():
        for e in examples:
            ids = torch.tensor(np.asarray(e.tokens, np.int64))[None]
            logp = torch.log_softmax(model(ids).logits[0, :-1].double(), -1)
            tgt = logp.gather(1, ids[0, 1:, None])[:, 0]
            m = torch.tensor(np.asarray(e.loss_mask[1:]))
            nll -= float(tgt[m].sum())
            n += int(m.sum())
    assert ours["tokens"] == n and n > 0
    assert ours["nll"] == pytest.approx(nll / n, abs=1e-4)
    assert ours["perplexity"] == pytest.approx(np.exp(nll / n), rel=1e-4)


def test_perplexity_cli_ratios(tiny_dir, sample, tmp_path):
    from sage_jax import cli

    data = _write(tmp_path / "held.jsonl", [dialogue_to_json(d) for d in sample[:3]])
    out = tmp_path / "ppl.json"
    assert cli.main(["eval", "perplexity", f"base={tiny_dir}", f"models=[same={tiny_dir}]", "seq_len=256",
                     "batch_rows=4", "-o", str(out), "--no-progress", "--data", str(data)]) == 0
    res = json.loads(out.read_text())
    r = res["models"]["same"]
    assert r["ratio"] == pytest.approx(1.0, abs=1e-6) and r["same_tokens"] and r["tokens"] == res["base"]["tokens"] > 0
    assert r["nll_delta"] == pytest.approx(0.0, abs=1e-6)
