"""A resume notices changed settings: training runs (settings.json), eval.jsonl, the DPO reference cache."""

import json
import logging

import numpy as np
import pytest

from sage_jax import cli
from sage_jax.data.sample import sample_path
from sage_jax.train import settings as S
from sage_jax.train.dpo import _save_atomic, reference_key


def _cfg(**kw):
    base = {"output_dir": "runs/x", "max_steps": 10, "optim": {"learning_rate": 5e-5, "warmup_steps": 0},
            "train_files": ["a.jsonl"], "seed": 0}
    base.update(kw)
    return base


def test_settings_leave_out_what_does_not_change_the_result(tmp_path):
    a = S.result_settings(_cfg())
    b = S.result_settings(_cfg(output_dir="elsewhere", max_steps=99, eval_every=5, mesh={"data": 4}))
    assert a == b and "output_dir" not in a and "max_steps" not in a
    f = tmp_path / "d.jsonl"
    f.write_text("one\n")
    before = S.run_settings(_cfg(), [f])["data"][str(f)]
    f.write_text("one\n")  # rewritten identically: the same data
    assert S.run_settings(_cfg(), [f])["data"][str(f)] == before
    f.write_text("two\n")
    assert S.run_settings(_cfg(), [f])["data"][str(f)] != before
    built = tmp_path / "built"  # a `sage-jax data build` directory: known by its dataset.json
    built.mkdir()
    assert S.run_settings(_cfg(), [built])["data"][str(built)] is None  # not a dataset (yet)
    (built / "dataset.json").write_text('{"counts": {"records": 3}}')
    first = S.run_settings(_cfg(), [built])["data"][str(built)]
    (built / "dataset.json").write_text('{"counts": {"records": 4}}')  # rebuilt with other contents
    assert first and S.run_settings(_cfg(), [built])["data"][str(built)] not in (None, first)


def test_check_settings_records_refuses_allows_and_notes_old_runs(tmp_path, caplog):
    caplog.set_level(logging.INFO, logger="sage_jax")
    old = S.result_settings(_cfg())
    assert S.check_settings(tmp_path, old, resuming=False) == []
    assert json.loads((tmp_path / S.SETTINGS_FILE).read_text())["hash"] == S.settings_hash(old)
    assert S.check_settings(tmp_path, old, resuming=True) == []  # same settings: resumes
    new = S.result_settings(_cfg(optim={"learning_rate": 1e-4, "warmup_steps": 0}, seed=3))
    with pytest.raises(S.SettingsChanged) as e:
        S.check_settings(tmp_path, new, resuming=True, what="sft")
    assert e.value.fields == ["optim", "seed"]
    msg = str(e.value)
    assert "optim (optim.learning_rate: 5e-05 -> 0.0001" in msg and "seed" in msg
    assert "allow_changed_config=true" in msg
    # the refusal changed nothing on disk
    assert json.loads((tmp_path / S.SETTINGS_FILE).read_text())["hash"] == S.settings_hash(old)
    assert S.check_settings(tmp_path, new, resuming=True, allow_changed=True) == ["optim", "seed"]
    assert "continuing" in caplog.text and "optim" in caplog.text
    assert json.loads((tmp_path / S.SETTINGS_FILE).read_text())["hash"] == S.settings_hash(new)
    # a run from before settings were recorded: a logged note, then they are recorded
    legacy = tmp_path / "legacy"
    legacy.mkdir()
    assert S.check_settings(legacy, new, resuming=True) == []
    assert "records no settings" in caplog.text and (legacy / S.SETTINGS_FILE).exists()


def test_dpo_reference_cache_is_keyed_by_model_and_written_atomically(tmp_path):
    row = {"inputs": np.arange(4, dtype=np.int32), "loss_mask": np.ones(4, bool)}
    pairs = [{"chosen": row, "rejected": row}]
    a = reference_key(pairs, {"path": "/m1", "files": {"model.safetensors": [10, 1]}})
    assert a == reference_key(pairs, {"path": "/m1", "files": {"model.safetensors": [10, 1]}})
    assert a != reference_key(pairs, {"path": "/m2", "files": {"model.safetensors": [10, 1]}})
    assert a != reference_key(pairs, {"path": "/m1", "files": {"model.safetensors": [10, 2]}})
    other = [{"chosen": {**row, "inputs": row["inputs"] + 1}, "rejected": row}]
    assert a != reference_key(other, {"path": "/m1", "files": {"model.safetensors": [10, 1]}})
    path = tmp_path / "reference_logps_x.npy"
    _save_atomic(path, np.ones((3, 2), np.float32))
    assert np.load(path).shape == (3, 2) and [p.name for p in tmp_path.iterdir()] == [path.name]


def _sft_args(tiny_dir, out, steps, *extra):
    return ["sft", f"model.path={tiny_dir}", f"train_files=[{sample_path('ed_train_200.jsonl')}]",
            f"output_dir={out}", "seq_len=128", "batch_size=4", f"max_steps={steps}", "eval_every=2",
            "save_every=2", "eval_fraction=0.05", "tensorboard=false", "mesh.num_devices=1", *extra]


def test_sft_restart_with_a_changed_learning_rate_stops_naming_optim(tiny_dir, tmp_path, capsys, caplog):
    out = tmp_path / "run"
    assert cli.main(_sft_args(tiny_dir, out, 2)) == 0
    recorded = json.loads((out / S.SETTINGS_FILE).read_text())["settings"]
    assert recorded["optim"]["learning_rate"] == 5e-5 and "max_steps" not in recorded
    capsys.readouterr()
    # the acceptance check: a changed learning rate stops with a message naming optim
    assert cli.main(_sft_args(tiny_dir, out, 4, "optim.learning_rate=1e-3")) == 1
    err = capsys.readouterr().err
    assert "sage-jax sft: error:" in err and "changed: optim (optim.learning_rate" in err
    assert len(err.strip().splitlines()) == 1
    # an evaluation logged after the last checkpoint (a kill) is dropped on resume, not duplicated
    with open(out / "eval.jsonl", "a") as f:
        f.write(json.dumps({"step": 3, "loss": 9.9}) + "\n")
    # more steps with the same settings resume, and the log says from where
    caplog.set_level(logging.INFO, logger="sage_jax")
    assert cli.main(_sft_args(tiny_dir, out, 4)) == 0
    assert "resuming from step 2 of 4" in caplog.text
    steps = [json.loads(line)["step"] for line in (out / "eval.jsonl").read_text().splitlines()]
    assert steps == [0, 2, 4]
    # the override continues under the new settings, with a warning naming the field
    assert cli.main(_sft_args(tiny_dir, out, 6, "optim.learning_rate=1e-3", "allow_changed_config=true")) == 0
    assert "continuing" in caplog.text and "optim.learning_rate" in caplog.text
    assert json.loads((out / S.SETTINGS_FILE).read_text())["settings"]["optim"]["learning_rate"] == 1e-3
