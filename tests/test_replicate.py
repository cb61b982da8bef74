"""experiments.replicate end to end on the tiny random model: every stage, the report's tables,
result.json's metrics, held-out seeds disjoint from the search seeds, and a rerun that skips
every finished stage."""

import json
import subprocess
import sys
import time
from pathlib import Path

import pytest

from experiments import replicate
from sage_jax.data.readers import read_seeds
from sage_jax.data.split import normalise_seed

ROOT = Path(__file__).resolve().parents[1]


def tiny_overrides(tiny_dir, out):
    """A preset small enough for a test: 2-step training stages, 2 search seeds, 4 held-out seeds, 1 turn."""
    return [
        f"output_dir={out}", f"base_model={tiny_dir}", "seed_files=[sample:ed_test_seeds.txt]",
        "held_out_seeds=4", "search_seeds=2", "sac_held_out=4",
        "sft.seq_len=128", "sft.batch_size=2", "sft.max_steps=2", "sft.eval_every=2",
        "sft.optim.learning_rate=1e-3", "sft.optim.warmup_steps=0",
        "round_sft.seq_len=512", "round_sft.eval_fraction=0", "round_sft.batch_size=2", "round_sft.max_steps=2",
        "search.turns=2", "search.k=2", "search.max_new_tokens=12", "search.user_max_new_tokens=8",
        "search.latent_max_new_tokens=24", "search.batch_seeds=2",
        "dpo_run.seq_len=256", "dpo_run.max_steps=2", "dpo_run.eval_every=0",
        "rollout.turns=1", "rollout.max_new_tokens=12", "rollout.user_max_new_tokens=8",
        "rollout.latent_max_new_tokens=24", "rollout.batch_seeds=4",
        "latent.max_dialogues=2", "latent.max_turns=1", "latent.max_new_tokens=32",
        "perplexity.seq_len=128", "perplexity.max_dialogues=3",
    ]


def test_print_config_with_presets():
    r = subprocess.run([sys.executable, "-m", "experiments.replicate", "--preset", "gpu", "--print-config",
                        "rounds=3"], cwd=ROOT, capture_output=True, text=True,
                       env={"PATH": "/usr/bin:/bin", "JAX_PLATFORMS": "cpu", "HOME": str(Path.home())})
    assert r.returncode == 0, r.stderr[-2000:]
    assert "replicate_gpu" in r.stdout and "rounds: 3" in r.stdout  # key=value wins over the preset
    gpu = replicate.preset_config("gpu")
    assert gpu.rounds == 2 and gpu.held_out_seeds >= 50 and gpu.sft.max_steps > replicate.Config().sft.max_steps
    cpu = replicate.preset_config("cpu")
    assert cpu == replicate.Config() and cpu.held_out_seeds >= 50 and cpu.rounds == 1
    with pytest.raises(ValueError):
        replicate.preset_overrides("tpu")


def test_seed_split_is_disjoint_and_shrinks_when_seeds_run_out(tmp_path):
    cfg = replicate.Config(seed_files=("sample:ed_test_seeds.txt",), held_out_seeds=50, search_seeds=6)
    cfg = replicate.resolve_files(cfg)
    s = replicate.make_seeds(cfg, tmp_path)
    search, held = read_seeds(s["search_file"]), read_seeds(s["held_out_file"])
    assert len(search) == 6 and len(held) == 44 == s["held_out"]  # the shipped file has 50 seeds
    assert not {normalise_seed(x) for x in search} & {normalise_seed(x) for x in held}
    assert any("44 held out instead of 50" in n for n in s["notes"])


def test_replicate_end_to_end_and_rerun_skips(tiny_dir, tmp_path):
    out = tmp_path / "rep"
    t0 = time.time()
    assert replicate.main(tiny_overrides(tiny_dir, out)) == 0
    first = time.time() - t0

    res = json.loads((out / "result.json").read_text())
    assert res["status"] == "done" and res["experiment"] == "replicate"
    m = res["metrics"]
    assert m["held_out_seeds"] == 4 and m["search_seeds"] == 2
    for key in ("baseline_vs_base", "m1_vs_base", "m2_vs_base", "dpo_vs_base", "m1_vs_baseline", "m2_vs_baseline",
                "dpo_vs_baseline"):
        assert m[f"{key}_wins"] + m[f"{key}_losses"] + m[f"{key}_ties"] == 4
        assert f"{key}_win_rate_decided" in m and f"{key}_win_rate_all_low" in m
    for name in ("m1", "m2", "dpo"):
        assert f"latent_{name}_parse_rate" in m and f"latent_{name}_u_emotion" in m
        assert f"ppl_ratio_{name}" in m and m[f"ppl_ratio_{name}"] > 0
    assert m["ppl_ratio_baseline"] > 0 and "latent_majority_a_motivation" in m

    # held-out seeds: disjoint from the search seeds and from what the searches used
    search = {normalise_seed(s) for s in read_seeds(out / "seeds" / "search.txt")}
    held = {normalise_seed(s) for s in read_seeds(out / "seeds" / "held_out.txt")}
    assert len(search) == 2 and len(held) == 4 and not search & held
    searched = {normalise_seed(json.loads(x)["seed"])
                for d in ("search1", "search_dpo") for x in (out / "sage" / d / "trees.jsonl").read_text().splitlines()}
    assert searched and searched <= search
    rolled = {normalise_seed(json.loads(x)["meta"]["seed"])
              for x in (out / "rollouts" / "m1" / "sft.jsonl").read_text().splitlines()}
    assert rolled == held
    cmp = res["summary"]["comparisons"]["m2_vs_baseline"]
    assert cmp["held_out"]["checked"] and cmp["held_out"]["overlap"] == 0
    # SAC held-out dialogues never trained on; the baseline's data carries no latent
    train_ids = {json.loads(x)["id"] for x in (out / "data" / "sac_train.jsonl").read_text().splitlines()}
    held_ids = {json.loads(x)["id"] for x in (out / "data" / "sac_held_out.jsonl").read_text().splitlines()}
    assert len(held_ids) == 4 and not train_ids & held_ids
    for line in (out / "data" / "sac_train_plain.jsonl").read_text().splitlines():
        assert all("state" not in t and "action" not in t for t in json.loads(line)["turns"])

    report = (out / "report.md").read_text()
    for heading in ("## Win / tie / loss on held-out seeds", "## Latent fields generated on held-out SAC dialogues",
                    "## General ability kept: held-out plain-text perplexity", "## Training"):
        assert heading in report
    assert "| m2 | baseline |" in report and "| dpo | base |" in report  # per round and vs the baseline
    assert "| u_emotion |" in report and "| parse rate |" in report and "ratio to base" in report
    assert "not an LLM" in report
    for png in ("win_rates.png", "latent_fields.png", "perplexity.png", "loss_curves.png"):
        assert (out / png).stat().st_size > 0

    # a rerun skips every finished stage (main would return at once: call run directly)
    stages_before = json.loads((out / "stages.json").read_text())["stages"]
    from sage_jax.config import apply_overrides

    cfg = apply_overrides(replicate.Config, tiny_overrides(tiny_dir, out))
    t0 = time.time()
    again = replicate.run(cfg)
    assert again["stages_ran"] == [] and set(again["stages_skipped"]) == set(stages_before)
    assert json.loads((out / "stages.json").read_text())["stages"] == stages_before
    assert time.time() - t0 < first / 2
    assert again["metrics"] == m

    # changed settings are refused rather than silently reused
    with pytest.raises(ValueError, match="other settings"):
        replicate.run(apply_overrides(replicate.Config, tiny_overrides(tiny_dir, out) + ["held_out_seeds=3"]))
