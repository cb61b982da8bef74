"""DPO end to end on a tiny model, and the preference-pair format's errors."""

import json
import math

import pytest

from sage_jax.data.jsonl import RecordError
from sage_jax.data.pairs import read_pairs
from sage_jax.data.sample import sample_path
from sage_jax.sac import dialogue_to_json
from sage_jax.data.jsonl import read_sac


def make_pairs(path, n=24):
    """Chosen = the real reply; rejected = another dialogue's reply (an easy preference)."""
    dialogues, _ = read_sac(sample_path("ed_train_200.jsonl"))
    dialogues = [d for d in dialogues if len(d.turns) >= 2][: n + 1]
    with open(path, "w") as f:
        for i in range(n):
            d, other = dialogue_to_json(dialogues[i]), dialogue_to_json(dialogues[i + 1])
            branch = lambda t, u: {"text": t["text"], "state": u.get("state"), "action": t.get("action")}  # noqa
            f.write(json.dumps({"id": f"p{i}", "history": d["turns"][:1],
                                "chosen": branch(d["turns"][1], d["turns"][0]),
                                "rejected": branch(other["turns"][1], other["turns"][0])}) + "\n")
    return path


def test_pairs_errors_name_file_line_field(tmp_path):
    p = make_pairs(tmp_path / "pairs.jsonl", n=3)
    lines = p.read_text().splitlines()
    bad = json.loads(lines[1])
    bad["rejected"]["action"]["emotion"] = 7
    lines[1] = json.dumps(bad)
    p.write_text("\n".join(lines) + "\n")
    pairs, report = read_pairs(p)
    assert len(pairs) == 2 and report.skipped == 1 and report.balanced
    msg = str(report.errors[0])
    assert f"{p}:2" in msg and "rejected" in msg and "emotion" in msg
    with pytest.raises(RecordError, match=":2: "):
        read_pairs(p, strict=True)


def test_dpo_tiny_end_to_end(tmp_path, request):
    from sage_jax.config import apply_overrides
    from sage_jax.train.dpo import DPORunConfig, run_dpo

    tiny_dir = request.getfixturevalue("tiny_dir")
    pairs = make_pairs(tmp_path / "pairs.jsonl")
    cfg = apply_overrides(DPORunConfig(), [
        f"model.path={tiny_dir}", f"train_files=[{pairs}]", f"output_dir={tmp_path / 'run'}", "seq_len=192",
        "batch_size=4", "max_steps=6", "eval_every=3", "save_every=3", "eval_fraction=0.2", "dpo.ftx=0.0",
        "optim.learning_rate=5e-2", "optim.warmup_steps=0", "tensorboard=false", "mesh.num_devices=1",
        "lora.targets=[q_proj,k_proj,v_proj,o_proj,gate_proj,up_proj,down_proj]"])
    summary = run_dpo(cfg)
    lines = [json.loads(x) for x in open(summary["metrics"]) if '"dpo_loss"' in x]
    first_train = next(x for x in lines if "loss" in x and "eval/loss" not in x)
    assert first_train["step"] == 1
    assert math.isclose(first_train["dpo_loss"], math.log(2), rel_tol=1e-4)  # policy == reference
    train = [x for x in lines if "loss" in x]
    assert train[-1]["dpo_loss"] < 0.9 * math.log(2)  # it learns to prefer the chosen replies
    evals = summary["evals"]
    assert math.isclose(evals[0]["dpo_loss"], math.log(2), rel_tol=1e-4)
    assert all(math.isfinite(e["dpo_loss"]) and 0 <= e["reward_accuracy"] <= 1 for e in evals)
    assert (tmp_path / "run" / "checkpoints" / "6").exists()
    assert list((tmp_path / "run").glob("reference_logps_*.npy"))
