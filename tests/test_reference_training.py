"""Training steps that match the reference by default (issue 12): DPO keeps and exports its best
checkpoint by validation loss, SFT counts its batch in dialogues, the loop blends m1's data, and
annotation appends bridging questions."""

from __future__ import annotations

import dataclasses
import json
import math
import re
import shutil
import sys
from pathlib import Path

import jax
import numpy as np
import pytest

sys.path.insert(0, str(Path(__file__).parent))

from sage_jax.data.jsonl import read_sac  # noqa: E402
from sage_jax.data.sample import sample_path  # noqa: E402
from sage_jax.sac import Dialogue, Turn, check_dialogue  # noqa: E402


# ---------------------------------------------------------------- 1. DPO keeps its best checkpoint
def _pairs(path: Path, n: int, swap: bool = False) -> Path:
    """Chosen = the real reply, rejected = another dialogue's (``swap``: the other way round)."""
    dialogues, _ = read_sac(sample_path("ed_train_200.jsonl"))
    dialogues = [d for d in dialogues if len(d.turns) >= 2][: n + 1]
    from sage_jax.sac import dialogue_to_json

    with open(path, "w") as f:
        for i in range(n):
            d, other = dialogue_to_json(dialogues[i]), dialogue_to_json(dialogues[i + 1])
            good = {"text": d["turns"][1]["text"], "state": d["turns"][0].get("state"),
                    "action": d["turns"][1].get("action")}
            bad = {"text": other["turns"][1]["text"], "state": d["turns"][0].get("state"),
                   "action": other["turns"][1].get("action")}
            chosen, rejected = (bad, good) if swap else (good, bad)
            f.write(json.dumps({"id": f"p{i}", "history": d["turns"][:1], "chosen": chosen,
                                "rejected": rejected}) + "\n")
    return path


def _dpo_cfg(tiny_dir, tmp_path, out):
    from sage_jax.config import apply_overrides
    from sage_jax.train.dpo import DPORunConfig

    train = _pairs(tmp_path / "train_pairs.jsonl", 12)
    # Validation on the same pairs with the preference reversed: the better the policy learns the
    # training preference, the higher the validation loss, so the best evaluation is an early one.
    held = _pairs(tmp_path / "eval_pairs.jsonl", 4, swap=True)
    return apply_overrides(DPORunConfig(), [
        f"model.path={tiny_dir}", f"train_files=[{train}]", f"eval_files=[{held}]", f"output_dir={out}",
        "seq_len=192", "batch_size=4", "max_steps=8", "eval_every=2", "save_every=2", "keep=1", "dpo.ftx=0.0",
        "optim.learning_rate=5e-2", "optim.warmup_steps=0", "tensorboard=false", "mesh.num_devices=1"])


def _leaves(tree):
    return [np.asarray(x) for x in jax.tree.leaves(tree)]


def _same(a, b) -> bool:
    return all(x.shape == y.shape and np.max(np.abs(x - y)) <= 1e-6 for x, y in zip(_leaves(a), _leaves(b)))


def test_dpo_keeps_best_checkpoint_and_loader_restores_it(tiny_dir, tmp_path, capsys):
    from sage_jax.model import loader
    from sage_jax.train.checkpoint import Checkpointer
    from sage_jax.train.dpo import DPORunConfig, run_dpo

    assert DPORunConfig().keep_best is True
    out = tmp_path / "dpo"
    cfg = _dpo_cfg(tiny_dir, tmp_path, out)
    summary = run_dpo(cfg)
    losses = {e["step"]: e["loss"] for e in summary["evals"]}
    assert sorted(losses) == [0, 2, 4, 6, 8]
    best_step = min((s for s in losses if s > 0), key=lambda s: (losses[s], s))
    assert best_step < 8 and losses[8] > losses[best_step]  # validation loss rose after the best step

    best = json.loads((out / "best.json").read_text())
    assert best == {"step": best_step, "metric": "loss", "value": pytest.approx(losses[best_step])}
    assert summary["best"]["step"] == best_step
    with Checkpointer(out / "checkpoints", save_every=2, read_only=True) as ro:
        assert ro.all_steps() == sorted({best_step, 8})  # keep=1 latest, plus the best one
        assert ro.best() == (best_step, pytest.approx(losses[best_step]))

    capsys.readouterr()
    cfg_b, best_params, _, step = loader.load_run(out)  # default: the recorded best
    assert step == best_step
    assert f"step {best_step}, the best by validation loss" in capsys.readouterr().err
    _, latest_params, _, step = loader.load_run(out, "latest")
    assert step == 8 and not _same(best_params, latest_params)
    assert loader.load_run(out, "best")[3] == best_step
    assert _same(loader.load_run(out, best_step)[1], best_params)
    # the spec syntax of every model-loading command: RUN@best | RUN@latest | RUN@STEP
    assert loader.load(f"{out}@latest").name == "dpo@8"
    assert loader.load(f"{out}@best").name == loader.load(str(out)).name == f"dpo@{best_step}"
    assert loader.split_spec(f"{out}@{best_step}") == (str(out), best_step)
    with pytest.raises(ValueError):
        loader.load_run(out, "newest")

    # export-hf takes the best by default, or step=latest
    from sage_jax.train.cli import ExportConfig, export_hf

    assert export_hf(ExportConfig(run_dir=str(out), output=str(tmp_path / "hf"))) == 0
    assert f"exported step {best_step} " in capsys.readouterr().out
    assert export_hf(ExportConfig(run_dir=str(out), output=str(tmp_path / "hf2"), step="latest")) == 0
    assert "exported step 8 " in capsys.readouterr().out

    # Resume: a kill between the best checkpoint's commit and best.json loses nothing (the best is
    # read back from the checkpoints' own metrics) ...
    (out / "best.json").unlink()
    again = run_dpo(cfg)
    assert again["steps"] == 8 and json.loads((out / "best.json").read_text())["step"] == best_step
    # ... and a kill before the last checkpoint resumes from the best one (the only other) to the
    # same final parameters, keeping the same best.
    killed = tmp_path / "killed"
    shutil.copytree(out, killed)
    shutil.rmtree(killed / "checkpoints" / "8")
    resumed = run_dpo(dataclasses.replace(cfg, output_dir=str(killed)))
    # the evaluations up to the restored step are kept (eval.jsonl cut back to it), the later ones redone
    assert resumed["steps"] == 8 and [e["step"] for e in resumed["evals"]] == [0, 2, 4, 6, 8]
    assert {e["step"]: e["loss"] for e in resumed["evals"]}[best_step] == pytest.approx(losses[best_step])
    assert json.loads((killed / "best.json").read_text())["step"] == best_step
    assert _same(loader.load_run(killed, "latest")[1], latest_params)


def test_sft_keeps_latest_by_default_and_loader_says_why(tiny_dir, tmp_path, capsys):
    from sage_jax.config import apply_overrides
    from sage_jax.model import loader
    from sage_jax.train.sft import SFTConfig, run_sft

    assert SFTConfig().keep_best is False
    out = tmp_path / "sft"
    cfg = apply_overrides(SFTConfig(), [
        f"model.path={tiny_dir}", f"train_files=[{sample_path('ed_train_200.jsonl')}]", f"output_dir={out}",
        "seq_len=128", "batch_size=4", "max_steps=2", "eval_every=1", "save_every=100", "eval_fraction=0.05",
        "tensorboard=false", "mesh.num_devices=1"])
    run_sft(cfg)
    assert not (out / "best.json").exists()
    capsys.readouterr()
    assert loader.load_run(out)[3] == 2
    assert "the latest checkpoint (the run recorded no best)" in capsys.readouterr().err
    with pytest.raises(FileNotFoundError, match="no best checkpoint"):
        loader.load_run(out, "best")


# ---------------------------------------------------------------- 2. optimizer steps per epoch
def _examples(tiny_dir, seq_len: int):
    from transformers import AutoTokenizer

    from sage_jax.data.encode import encode_dialogues, read_dialogues

    tok = AutoTokenizer.from_pretrained(tiny_dir)
    d = read_dialogues([sample_path("ed_train_200.jsonl")], False)
    return encode_dialogues(d, tok, None, seq_len, False, "test")


def test_steps_per_epoch_count_dialogues_like_the_reference(tiny_dir):
    from sage_jax.train.sft import SFTConfig, plan_steps

    assert SFTConfig().batch_unit == "dialogues" and SFTConfig().batch_size == 256
    ex = _examples(tiny_dir, 512)
    n = len(ex)
    d = plan_steps(ex, 512, 16, "dialogues")
    r = plan_steps(ex, 512, 16, "rows")
    assert d.steps_per_epoch == math.ceil(n / 16)
    assert r.steps_per_epoch == max(1, r.rows_per_epoch // 16)
    assert d.steps_per_epoch > r.steps_per_epoch  # rows hold several dialogues: fewer steps with rows
    assert d.rows_per_step * d.steps_per_epoch >= d.rows_per_epoch  # an epoch fits its steps
    assert d.rows_per_step < 16  # ~16 dialogues packed into fewer rows
    # rows per step divide evenly over hosts x micro-batches
    assert plan_steps(ex, 512, 16, "dialogues", hosts=2, accum=3).rows_per_step % 6 == 0
    with pytest.raises(ValueError, match="divisible"):
        plan_steps(ex, 512, 10, "rows", hosts=4)


def test_sft_epoch_runs_ceil_dialogues_over_batch_steps(tiny_dir, tmp_path, capsys):
    from sage_jax.config import apply_overrides
    from sage_jax.train.sft import SFTConfig, run_sft

    # 40 of the sample's dialogues: ~38 kept for training, not a multiple of the batch
    data = tmp_path / "ed_40.jsonl"
    data.write_text("".join(sample_path("ed_train_200.jsonl").read_text().splitlines(keepends=True)[:40]))
    base = [f"model.path={tiny_dir}", f"train_files=[{data}]", "seq_len=256", "batch_size=8", "epochs=1",
            "eval_every=0", "save_every=100", "eval_fraction=0.05", "tensorboard=false", "mesh.num_devices=1"]
    capsys.readouterr()
    s = run_sft(apply_overrides(SFTConfig(), [*base, f"output_dir={tmp_path / 'd'}"]))
    err = capsys.readouterr().err
    n_train = int(re.search(r"^train: (\d+)/", err, re.M).group(1))  # dialogues kept for training
    assert s["batch_unit"] == "dialogues" and s["steps_per_epoch"] == math.ceil(n_train / 8) == s["steps"]
    assert n_train % 8 and f"batch_unit=dialogues: {s['steps_per_epoch']} steps/epoch of 8 dialogues" in err
    rows = run_sft(apply_overrides(SFTConfig(), [*base, "batch_unit=rows", f"output_dir={tmp_path / 'r'}"]))
    assert rows["steps"] == rows["steps_per_epoch"] < s["steps"]
    assert "batch_unit=rows" in capsys.readouterr().err


def test_loop_and_demo_step_counts_are_kept_by_max_steps():
    from sage_jax.demo import DemoConfig, loop_config

    for quick in (True, False):
        lc = loop_config(DemoConfig(quick=quick), "smollm2", Path("/tmp/unused"))
        assert lc.sft.max_steps == (4 if quick else 30) and lc.sft.batch_unit == "dialogues"
        assert quick or lc.sft.lora is None  # m1 is fully fine-tuned: 12 LoRA steps never wrote a latent prefix


# ---------------------------------------------------------------- 3. the loop blends m1's data
def test_loop_trains_m1_on_blended_data(tiny_dir, tmp_path):
    from sage_jax.config import apply_overrides
    from sage_jax.loop import LoopConfig, run_loop

    dialogues, _ = read_sac(sample_path("ed_train_200.jsonl"))
    src = tmp_path / "sac.jsonl"
    from sage_jax.data.jsonl import write_sac

    write_sac(src, dialogues[:30])
    assert LoopConfig().blend_m1 is True
    cfg = apply_overrides(LoopConfig(), [
        f"base_model={tiny_dir}", f"sac_files=[{src}]", f"output_dir={tmp_path / 'loop'}", "rounds=0", "dpo=false",
        "sft.seq_len=256", "sft.batch_size=4", "sft.max_steps=1", "sft.eval_every=0", "sft.save_every=100",
        "sft.tensorboard=false", "sft.mesh.num_devices=1", "sft.eval_fraction=0.1"])
    run_loop(cfg)
    blended = tmp_path / "loop" / "m1" / "train_blended.jsonl"
    got, report = read_sac(blended)
    assert report.skipped == 0 and len(got) == sum(len(d.turns) >= 2 for d in dialogues[:30]) > 20
    by_id = {d.id: d for d in dialogues[:30]}
    for d in got:
        parts = d.meta["blend"]
        assert len(parts) == 3 and len(set(parts)) == 3 and d.id == "+".join(parts)
        assert len(d.turns) == sum(len(by_id[p].turns) - len(by_id[p].turns) % 2 for p in parts)
        check_dialogue(d)
    rec = json.loads((tmp_path / "loop" / "lineage.json").read_text())["stages"]["m1"]
    assert rec["data"] == [str(blended)] and rec["blend"]["sources"] == [str(src)]
    assert rec["config"]["train_files"] == [str(blended)]

    plain = run_loop(apply_overrides(cfg, ["blend_m1=false", f"output_dir={tmp_path / 'plain'}"]))
    rec = json.loads(Path(plain["lineage"]).read_text())["stages"]["m1"]
    assert rec["data"] == [str(src)] and "blend" not in rec
    assert not (tmp_path / "plain" / "m1" / "train_blended.jsonl").exists()


# ---------------------------------------------------------------- 4. annotation: bridging questions
def _hand_made() -> Dialogue:
    texts = ["I failed my driving test today, I'm really sad.",
             "That's rough, I'm sorry. Tests can be nerve-racking",
             "Yeah. I'll retake it next month.",
             "Good plan! When exactly is it?",
             "In March. I want to practise roundabouts first.",
             "Roundabouts get easier with practice!"]
    return Dialogue("hand", tuple(Turn("user" if i % 2 == 0 else "assistant", t) for i, t in enumerate(texts)))


def test_annotation_appends_bridging_questions_by_default():
    from sage_jax import judge as J
    from sage_jax.judge.prompts import annotation_prompt, parse_prompt

    d = _hand_made()
    prompt = annotation_prompt(d)
    assert "bridging question" in prompt and '"text"' in prompt
    assert parse_prompt(prompt).allow_rewrite and not parse_prompt(annotation_prompt(d, allow_rewrite=False)).allow_rewrite
    annotated, failures = J.annotate_dialogues(J.make_judge("rules:"), [d])
    assert failures == []
    a = annotated[0]
    check_dialogue(a, require_latents=True)
    texts = [t.text for t in a.turns]
    assert texts[1] == "That's rough, I'm sorry. Tests can be nerve-racking. How are you holding up?"
    assert texts[3] == d.turns[3].text  # already ends with a question: unchanged
    assert texts[5].startswith("Roundabouts get easier with practice! ") and texts[5].endswith("?")
    assert [t.text for t in a.turns if t.role == "user"] == [t.text for t in d.turns if t.role == "user"]
    assert a.meta["rewritten"] == [2, 6] and a.meta["annotator"] == "rules:v1"
    # labels describe the utterance as written (the appended question does not make it "questioning")
    plain, _ = J.annotate_dialogues(J.make_judge("rules:"), [d], allow_rewrite=False)
    assert [t.text for t in plain[0].turns] == [t.text for t in d.turns] and "rewritten" not in plain[0].meta
    assert [t.action for t in plain[0].turns if t.role == "assistant"] == \
        [t.action for t in a.turns if t.role == "assistant"]


def test_annotation_accepts_an_annotators_light_rewrite():
    from sage_jax import judge as J
    from sage_jax.judge.base import Completion

    d = _hand_made()

    class Rewriter:
        name = "fake:rewriter"

        def complete(self, prompts, **kw):
            rows = json.loads(J.make_judge("rules:").complete(prompts)[0].text)["annotations"]
            rows[2]["text"] = "Yeah. I will retake it next month."  # a light rewrite of a user turn
            return [Completion(json.dumps({"annotations": rows}))]

    a, f = J.annotate_dialogues(Rewriter(), [d])
    assert not f and a[0].turns[2].text == "Yeah. I will retake it next month." and a[0].meta["rewritten"] == [2, 3, 6]
    a, f = J.annotate_dialogues(Rewriter(), [d], allow_rewrite=False, tries=1)
    assert not a and "unexpected key 'text'" in f[0].reason
