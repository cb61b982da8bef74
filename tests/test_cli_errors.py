"""Command-line failures: non-zero exit when nothing valid was written, one-line OS errors naming the
path, `--debug` tracebacks, logging configured; and the loop's check of finished stages."""

import json
import logging

import pytest

from sage_jax import cli
from sage_jax.data.sample import sample_path


def _err_lines(capsys):
    err = capsys.readouterr().err
    return [line for line in err.splitlines() if "error:" in line], err


def test_convert_with_every_record_skipped_exits_non_zero_and_writes_nothing(tmp_path, capsys):
    src = tmp_path / "ed_train.jsonl"
    src.write_text("nope\nnot json either\n")
    out = tmp_path / "out.jsonl"
    out.write_text("previous output\n")
    assert cli.main(["data", "convert", "--format", "ed", str(src), "-o", str(out), "--no-progress"]) == 1
    errors, err = _err_lines(capsys)
    assert errors == [f"sage-jax data convert: error: no valid dialogue in {src} (2 records, 2 skipped); "
                      f"{out} not written"]
    assert out.read_text() == "previous output\n" and not (tmp_path / "out.jsonl.tmp").exists()


def test_output_naming_a_directory_is_one_line(tmp_path, capsys):
    src = tmp_path / "ed_train.jsonl"
    src.write_text("nope\n")
    assert cli.main(["data", "convert", "--format", "ed", str(src), "-o", str(tmp_path), "--no-progress"]) == 1
    errors, err = _err_lines(capsys)
    assert errors == [f"sage-jax data convert: error: output is a directory, expected a file: {tmp_path}"]
    assert "Traceback" not in err


def test_missing_input_is_file_not_found_not_an_unknown_format(tmp_path, capsys):
    missing = tmp_path / "nowhere.jsonl"
    assert cli.main(["annotate", str(missing), "-o", str(tmp_path / "o.jsonl"), "--no-progress"]) == 1
    errors, _ = _err_lines(capsys)
    assert errors == [f"sage-jax annotate: error: file not found: {missing}"]
    assert cli.main(["data", "convert", "-f", "ed", str(missing), "-o", str(tmp_path / "o.jsonl")]) == 1
    errors, _ = _err_lines(capsys)
    assert errors == [f"sage-jax data convert: error: file not found: {missing}"]


def test_debug_shows_the_traceback(tmp_path, capsys):
    missing = tmp_path / "nowhere.jsonl"
    assert cli.main(["annotate", str(missing), "-o", str(tmp_path / "o.jsonl"), "--debug"]) == 1
    err = capsys.readouterr().err
    assert "Traceback" in err and "FileNotFoundError" in err and "file not found" in err
    assert logging.getLogger("sage_jax").level == logging.DEBUG
    cli.main(["data", "convert", "-f", "ed", str(missing), "-o", str(tmp_path / "o.jsonl")])
    assert logging.getLogger("sage_jax").level == logging.INFO
    assert logging.getLogger("openai").level == logging.INFO  # the client's retries are visible


def test_annotate_with_every_record_malformed_exits_non_zero(tmp_path, capsys):
    src = tmp_path / "raw.jsonl"
    src.write_text(json.dumps({"id": "x", "conversations": [{"from": "gpt", "value": "starts with gpt"}]}) + "\n")
    assert cli.main(["annotate", str(src), "-o", str(tmp_path / "o.jsonl"), "--no-progress"]) == 1
    errors, err = _err_lines(capsys)
    assert errors == [f"sage-jax annotate: error: no valid dialogue in {src} (1 malformed records skipped); "
                      "no dialogue written"]
    assert "wrote" not in err


def test_loop_refuses_a_finished_stage_with_changed_settings(tiny_dir, tmp_path, capsys):
    args = ["loop", f"base_model={tiny_dir}", f"sac_files=[{sample_path('ed_train_200.jsonl')}]", "rounds=0",
            "dpo=false", "blend_m1=false", f"output_dir={tmp_path / 'loop'}", "sft.max_steps=1", "sft.seq_len=128",
            "sft.batch_size=4", "sft.eval_every=0", "sft.tensorboard=false", "sft.mesh.num_devices=1"]
    assert cli.main(args) == 0
    rec = json.loads((tmp_path / "loop" / "lineage.json").read_text())["stages"]["m1"]
    assert rec["settings"]["optim"]["learning_rate"] == 5e-5
    capsys.readouterr()
    assert cli.main([*args, "sft.max_steps=3"]) == 0  # how long is not what: the finished stage is kept
    assert "m1 already done" in capsys.readouterr().err
    assert cli.main([*args, "sft.optim.learning_rate=1e-3"]) == 1
    errors, _ = _err_lines(capsys)
    assert len(errors) == 1 and "stage 'm1' finished with other settings; changed: optim (optim.learning_rate" in \
        errors[0]
    assert cli.main([*args, "sft.optim.learning_rate=1e-3", "allow_changed_config=true"]) == 0
    assert "m1 already done" in capsys.readouterr().err
