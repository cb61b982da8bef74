"""experiments/: the shared experiment main, sweep expansion and slicing, skip-finished, result
tables, and one real 2-step `python -m experiments.sft_m1` run on the tiny model."""

from __future__ import annotations

import csv
import dataclasses
import json
import math
import os
import subprocess
import sys
import types
from pathlib import Path

import pytest
import yaml

REPO = Path(__file__).resolve().parents[1]
if str(REPO) not in sys.path:  # experiments/ is a top-level folder of the repository, not installed
    sys.path.insert(0, str(REPO))

from experiments import common, sweep  # noqa: E402
from experiments.common import EXIT_PREEMPTED, RESULT_FILE, experiment_main, read_result, summary_metrics  # noqa: E402
from experiments.sweep import Cell, SweepSpec, expand, parse_slice, slice_cells, split_values  # noqa: E402


# ---------------------------------------------------------------- a fast fake experiment
@dataclasses.dataclass(frozen=True)
class FakeConfig:
    lr: float = 1e-3
    rank: int = 8
    targets: tuple[str, ...] = ("q_proj", "v_proj")
    data: str = "sample:ed_train_200.jsonl"
    output_dir: str = "runs/fake"


def install_fake(monkeypatch, calls: list, fail_ranks=(), preempt_ranks=()):
    def run(cfg: FakeConfig) -> dict:
        calls.append(cfg)
        if cfg.rank in fail_ranks:
            raise RuntimeError(f"boom at rank {cfg.rank}")
        return {"steps": 3, "preempted": cfg.rank in preempt_ranks,
                "evals": [{"step": 0, "loss": 9.0}, {"step": 3, "loss": cfg.lr * 1000 + cfg.rank,
                                                     "latent_accuracy": cfg.rank / 100}]}

    mod = types.ModuleType("experiments.fake_exp")
    mod.Config = FakeConfig
    mod.main = experiment_main("fake_exp", FakeConfig, run, "A fake experiment.")
    monkeypatch.setitem(sys.modules, "experiments.fake_exp", mod)
    return mod


# ---------------------------------------------------------------- expansion, names, slices
def test_split_values_respects_brackets_and_quotes():
    assert split_values("1e-4,5e-5") == ["1e-4", "5e-5"]
    assert split_values("[q_proj,v_proj],[q_proj,k_proj,v_proj]") == ["[q_proj,v_proj]", "[q_proj,k_proj,v_proj]"]
    assert split_values("{a: 1, b: 2},null") == ["{a: 1, b: 2}", "null"]
    assert split_values("'a,b',c") == ["'a,b'", "c"]
    with pytest.raises(ValueError):
        split_values("a,,b")


def test_expand_is_the_ordered_cartesian_product_with_stable_unique_names(tmp_path):
    spec = SweepSpec("fake_exp", {"optim.learning_rate": ["1e-4", "5e-5"], "lora.rank": [8, 16],
                                  "lora.targets": [["q_proj", "v_proj"]]}, root=str(tmp_path))
    cells = expand(spec)
    assert [c.overrides for c in cells] == [
        ("optim.learning_rate=1e-4", "lora.rank=8", "lora.targets=[q_proj, v_proj]"),
        ("optim.learning_rate=1e-4", "lora.rank=16", "lora.targets=[q_proj, v_proj]"),
        ("optim.learning_rate=5e-5", "lora.rank=8", "lora.targets=[q_proj, v_proj]"),
        ("optim.learning_rate=5e-5", "lora.rank=16", "lora.targets=[q_proj, v_proj]")]
    assert cells[0].name == "learning_rate=1e-4__rank=8__targets=q_proj-v_proj"
    assert [c.index for c in cells] == [0, 1, 2, 3]
    assert expand(spec) == cells  # deterministic: every host derives the same cells
    # Same leaf name under two sections: full keys; values that slug alike: a hash keeps them apart.
    clash = expand(SweepSpec("fake_exp", {"a.rank": [1], "b.rank": ["x y", "x-y"]}))
    assert clash[0].name.startswith("a.rank=1__b.rank=x-y-") and len({c.name for c in clash}) == 2
    long = expand(SweepSpec("fake_exp", {"tag": ["v" * 300]}))
    assert len(long[0].name) <= sweep.MAX_NAME
    with pytest.raises(ValueError, match="output_dir"):
        expand(SweepSpec("fake_exp", {"output_dir": ["a"]}))
    with pytest.raises(ValueError, match="empty"):
        expand(SweepSpec("fake_exp", {}))


@pytest.mark.parametrize("n_cells", [1, 7, 12])
def test_slices_cover_every_cell_exactly_once(n_cells):
    cells = [Cell(i, f"c{i}", {}, ()) for i in range(n_cells)]
    for n in range(1, 6):
        parts = [slice_cells(cells, i, n) for i in range(n)]
        seen = [c.index for p in parts for c in p]
        assert sorted(seen) == list(range(n_cells))  # a partition: no cell twice, none missing
        assert max(map(len, parts)) - min(map(len, parts)) <= 1  # balanced


def test_parse_slice(monkeypatch):
    assert parse_slice("2/4") == (2, 4) and parse_slice(None) is None
    for bad in ("4/4", "-1/2", "1", "a/b"):
        with pytest.raises(ValueError):
            parse_slice(bad)
    monkeypatch.delenv("SWEEP_SLICE", raising=False)
    monkeypatch.delenv("SLURM_ARRAY_TASK_ID", raising=False)
    assert parse_slice("auto") is None
    monkeypatch.setenv("SLURM_ARRAY_TASK_ID", "1")
    monkeypatch.setenv("SLURM_ARRAY_TASK_COUNT", "3")
    assert parse_slice("auto") == (1, 3)
    monkeypatch.setenv("SWEEP_SLICE", "0/2")
    assert parse_slice("auto") == (0, 2)


# ---------------------------------------------------------------- the experiment main
def test_experiment_main_writes_result_skips_when_done_and_reports_preemption(monkeypatch, tmp_path):
    calls: list = []
    mod = install_fake(monkeypatch, calls, preempt_ranks=(99,))
    out = tmp_path / "run"
    assert mod.main([f"output_dir={out}", "lr=0.002"]) == 0
    res = json.loads((out / RESULT_FILE).read_text())
    assert res["status"] == "done" and res["experiment"] == "fake_exp"
    assert res["config"]["lr"] == 0.002 and res["overrides"] == [f"output_dir={out}", "lr=0.002"]
    assert res["metrics"]["final_eval_loss"] == pytest.approx(10.0)
    assert res["metrics"]["final_eval_latent_accuracy"] == 0.08 and res["metrics"]["first_eval_loss"] == 9.0
    assert yaml.safe_load((out / "config.yaml").read_text())["lr"] == 0.002
    assert mod.main([f"output_dir={out}", "lr=0.002"]) == 0 and len(calls) == 1  # finished: not rerun
    assert mod.main([f"output_dir={out}", "lr=0.002", "--force"]) == 0 and len(calls) == 2
    assert mod.main([f"output_dir={out}", "lr=0.003"]) == 0 and len(calls) == 3  # another config: runs
    # Preempted: exit 75, no result file (a rerun resumes).
    assert mod.main([f"output_dir={tmp_path / 'p'}", "rank=99"]) == EXIT_PREEMPTED
    assert not (tmp_path / "p" / RESULT_FILE).exists()
    assert mod.main(["rnk=3"]) == 2  # a bad key is a clean error


def test_summary_metrics_and_sample_paths(tmp_path):
    log = tmp_path / "metrics.jsonl"
    log.write_text('{"step": 1, "loss": 3.0}\n{"step": 1, "eval/loss": 2.0}\n{"step": 2, "loss": 2.5, '
                   '"accuracy": 0.25, "grad_norm": NaN}\n')
    m = summary_metrics({"steps": 2, "preempted": False, "metrics": str(log),
                         "evals": [{"step": 0, "loss": 4.0}, {"step": 2, "loss": 3.5, "accuracy": 0.1}]})
    assert m == {"steps": 2, "preempted": False, "first_eval_loss": 4.0, "final_eval_loss": 3.5,
                 "final_eval_accuracy": 0.1, "final_eval_step": 2, "final_train_loss": 2.5,
                 "final_train_accuracy": 0.25}
    assert summary_metrics({"metrics": {"win_rate": 0.6}}) == {"win_rate": 0.6}
    from sage_jax.data.sample import sample_path

    cfg = common.resolve_files(FakeConfig())
    assert cfg.data == str(sample_path("ed_train_200.jsonl")) and cfg.targets == ("q_proj", "v_proj")


# ---------------------------------------------------------------- running sweeps
def _spec(tmp_path, **kw):
    return SweepSpec("fake_exp", {"lr": ["1e-3", "2e-3"], "rank": ["4", "8", "16"]}, fixed=("targets=[q_proj]",),
                     root=str(tmp_path / "sw"), metrics=("final_eval_loss", "final_eval_latent_accuracy", "steps"),
                     **kw)


def test_sweep_slices_skip_finished_and_tabulate(monkeypatch, tmp_path):
    calls: list = []
    install_fake(monkeypatch, calls, fail_ranks=(16,))
    spec = _spec(tmp_path)
    cells = expand(spec)

    rep0 = sweep.run_sweep(spec, (0, 2))
    assert sorted(c.rank for c in calls) == [4, 8, 16] and len(calls) == 3  # cells 0, 2, 4
    assert all(c.targets == ("q_proj",) for c in calls)  # fixed overrides reach every cell
    assert rep0["failed"] == ["lr=1e-3__rank=16"] and len(rep0["ran"]) == 2
    assert (Path(spec.root) / "lr=1e-3__rank=16" / "error.txt").read_text().count("boom at rank 16")

    rep1 = sweep.run_sweep(spec, (1, 2))
    assert len(calls) == 6 and rep1["failed"] == ["lr=2e-3__rank=16"]

    calls.clear()
    rep = sweep.run_sweep(spec)  # everything again: finished cells are skipped, failed ones retried
    assert sorted(rep["skipped"]) == sorted(c.name for c in cells if not c.name.endswith("rank=16"))
    assert [c.rank for c in calls] == [16, 16]

    rows = [json.loads(x) for x in (Path(spec.root) / "results.jsonl").read_text().splitlines()]
    assert [r["cell"] for r in rows] == [c.name for c in cells]
    by = {(r["lr"], r["rank"]): r for r in rows}
    assert by[("2e-3", "8")]["final_eval_loss"] == pytest.approx(10.0) and by[("2e-3", "8")]["steps"] == 3
    assert by[("1e-3", "16")]["status"] == "failed" and by[("1e-3", "16")]["final_eval_loss"] is None
    with open(Path(spec.root) / "results.csv") as f:
        table = list(csv.DictReader(f))
    assert list(table[0]) == ["cell", "lr", "rank", "status", "final_eval_loss", "final_eval_latent_accuracy", "steps"]
    assert table[1]["final_eval_loss"] == "9" and table[1]["status"] == "done"  # lr 1e-3 x 1000 + rank 8
    md = (Path(spec.root) / "results.md").read_text()
    assert "| cell | lr | rank | status | final_eval_loss |" in md and "| lr=1e-3__rank=4 | 1e-3 | 4 | done | 5 |" in md
    manifest = json.loads((Path(spec.root) / "sweep.json").read_text())
    assert [c["name"] for c in manifest["cells"]] == [c.name for c in cells]


def test_collect_from_fake_results_marks_pending(tmp_path):
    spec = _spec(tmp_path)
    cells = expand(spec)
    for c, loss in zip(cells[:2], (1.5, 0.5)):
        common.write_json(sweep.cell_dir(spec, c) / RESULT_FILE, {
            "status": "done", "metrics": {"final_eval_loss": loss, "steps": 10},
            "summary": {"evals": [{"loss": loss}]}})
    common.write_json(sweep.cell_dir(spec, cells[2]) / RESULT_FILE, {"status": "preempted"})
    rows = sweep.collect(spec)
    assert [r["status"] for r in rows] == ["done", "done", "pending", "pending", "pending", "pending"]
    assert [r["final_eval_loss"] for r in rows[:2]] == [1.5, 0.5]
    assert read_result(sweep.cell_dir(spec, cells[2])) is None
    spec2 = dataclasses.replace(spec, metrics=("summary.evals", "steps", "missing"))
    row = sweep.collect(spec2)[0]
    assert row["summary.evals"] == [{"loss": 1.5}] and row["steps"] == 10 and row["missing"] is None
    assert "| 1e-3 | 4 | done | " in sweep.render_table(spec2, [row])


def test_sweep_cli_grid_file_list_and_validation(monkeypatch, tmp_path, capsys):
    install_fake(monkeypatch, [])
    gf = tmp_path / "grid.yaml"
    gf.write_text(yaml.safe_dump({"experiment": "fake_exp", "root": str(tmp_path / "g"),
                                  "fixed": {"targets": ["q_proj", "k_proj"]},
                                  "grid": {"lr": [1.0e-4, 5.0e-5], "rank": [4, 8]}}))
    assert sweep.main(["--grid-file", str(gf), "--list", "--slice", "1/2", "--grid", "rank=2,4"]) == 0
    lines = capsys.readouterr().out.strip().splitlines()
    assert [ln.split("\t")[2] for ln in lines] == ["lr=0.0001 rank=4", "lr=5.0e-05 rank=4"]
    # A misspelled grid key fails before any cell runs.
    assert sweep.main(["fake_exp", "--grid", "rnk=1,2", "--root", str(tmp_path / "bad")]) == 2
    assert not (tmp_path / "bad").exists()
    with pytest.raises(SystemExit):
        sweep.main(["no_such_experiment_x", "--grid", "a=1", "--list", "--slice", "3/2"])


def test_sweep_stops_at_a_preempted_cell(monkeypatch, tmp_path):
    calls: list = []
    install_fake(monkeypatch, calls, preempt_ranks=(8,))
    code = sweep.main(["fake_exp", "--grid", "rank=4,8,16", "--root", str(tmp_path / "p")])
    assert code == EXIT_PREEMPTED and [c.rank for c in calls] == [4, 8]


# ---------------------------------------------------------------- a real run
def test_sft_m1_two_real_steps_through_python_m(tiny_dir, tmp_path):
    out = tmp_path / "m1"
    env = {**os.environ, "JAX_PLATFORMS": "cpu", "XLA_FLAGS": "", "PYTHONPATH": str(REPO)}
    proc = subprocess.run(
        [sys.executable, "-m", "experiments.sft_m1", f"model.path={tiny_dir}", f"output_dir={out}", "max_steps=2",
         "seq_len=128", "batch_size=4", "eval_every=0", "save_every=2", "eval_fraction=0.02", "tensorboard=false"],
        cwd=REPO, env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    res = json.loads((out / RESULT_FILE).read_text())
    assert res["status"] == "done" and res["experiment"] == "sft_m1"
    assert res["config"]["train_files"] == ["sample:ed_train_200.jsonl"]  # the paper-default data, shipped
    assert res["config"]["lora"] == {"rank": 8, "alpha": 16.0, "dropout": 0.0, "targets": ["q_proj", "v_proj"]}
    m = res["metrics"]
    assert m["steps"] == 2 and m["final_eval_step"] == 2
    assert math.isfinite(m["final_eval_loss"]) and 0 <= m["final_eval_latent_accuracy"] <= 1
    assert math.isfinite(m["final_train_loss"])
    assert json.loads(proc.stdout)["metrics"] == m
    assert (out / "checkpoints" / "2").is_dir() and (out / "config.yaml").exists()
