"""The paper-stage experiment modules run as `python -m experiments.NAME` and write result.json."""

import json
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
SHARED = ROOT.parent / "shared" / "data"


def _run(*args):
    return subprocess.run([sys.executable, "-m", *args], cwd=ROOT, capture_output=True, text=True,
                          env={"PATH": "/usr/bin:/bin", "JAX_PLATFORMS": "cpu", "HOME": str(Path.home())})


@pytest.mark.parametrize("name", ["search_round", "compare", "self_improve", "eq_bench", "sft_m1", "dpo"])
def test_every_module_prints_its_config(name):
    r = _run(f"experiments.{name}", "--print-config")
    assert r.returncode == 0, r.stderr[-2000:]
    assert "output_dir:" in r.stdout


def test_compare_module_writes_result(tmp_path):
    from sage_jax.data.jsonl import read_sac
    from sage_jax.data.sample import sample_path
    from sage_jax.sac import dialogue_to_json

    ds, _ = read_sac(sample_path("ed_train_200.jsonl"))
    for name, off in (("a", 0), ("b", 3)):
        with open(tmp_path / f"{name}.jsonl", "w") as f:
            for i in range(3):
                d = dialogue_to_json(ds[i + off])
                d["id"] = f"s{i}"
                f.write(json.dumps(d) + "\n")
    r = _run("experiments.compare", f"a={tmp_path / 'a.jsonl'}", f"b={tmp_path / 'b.jsonl'}",
             f"output_dir={tmp_path / 'out'}")
    assert r.returncode == 0, r.stderr[-2000:]
    res = json.loads((tmp_path / "out" / "result.json").read_text())
    m = res["metrics"]
    assert m["total"] == 3 and m["wins_a"] + m["wins_b"] + m["no_consensus"] == 3


@pytest.mark.skipif(not SHARED.exists(), reason="../shared/data (EQ-Bench questions) is not present")
def test_eq_bench_module_flags_an_unparseable_backend(tmp_path):
    # The rules judge cannot answer EQ-Bench questions: every item is a recorded failure and the
    # run is flagged invalid (never a fabricated score).
    r = _run("experiments.eq_bench", "model=rules:", "limit=3", "max_attempts=1", f"output_dir={tmp_path}")
    assert r.returncode == 0, r.stderr[-2000:]
    res = json.loads((tmp_path / "result.json").read_text())
    assert res["metrics"]["valid"] is False and res["metrics"]["parseable"] == 0
    assert len((tmp_path / "answers.jsonl").read_text().splitlines()) == 3
