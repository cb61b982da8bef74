"""A small-scale replication that says whether SAGE works (issue 12, item 5).

    python -m experiments.replicate --preset cpu                 # this 2-core CPU (54 min measured under load)
    python -m experiments.replicate --preset gpu                 # one GPU (larger settings; time: not measured yet)
    python -m experiments.replicate --preset cpu judge=openai:M@URL eval_judge=openai:N@URL output_dir=runs/rep2

``--preset cpu|gpu`` picks a preset (a dict of overrides, :data:`PRESETS`; ``cpu`` is the
defaults) applied after ``--config`` and before ``key=value`` overrides.

Pipeline (every stage recorded in ``<output_dir>/stages.json`` when done; a rerun skips finished
stages, and a stage whose recorded settings differ from the config is refused rather than reused):

1. **seeds**: ED situations (``seed_files``; empty: ``shared/data/empatheticdialogues/test_sent.tsv``
   when present, else the shipped 50 of ``sample:ed_test_seeds.txt``), split by a hash of their
   text (:func:`sage_jax.data.split.split_seeds`) into ``held_out_seeds`` evaluation seeds and the
   rest, of which the first ``search_seeds`` are searched; checked disjoint.
2. **data**: the SAC files split by a hash of the dialogue id into training and ``sac_held_out``
   held-out dialogues (never trained on: latent accuracy and perplexity run on them), and a copy of
   the training dialogues with every latent removed (the no-latent baseline's data).
3. **sage**: :func:`sage_jax.loop.run_loop`: m1 = SFT with latents, ``rounds`` x (search with m_r
   on the search seeds -> SFT on its selected dialogues -> m_{r+1}), then a search with the last
   model and DPO on its pairs. **baseline**: the same loop's m1 stage on the latent-free copy.
4. **rollouts**: self-play of every model (base, baseline, m1, m2.., dpo) on the held-out seeds
   with :func:`sage_jax.search.tree.run_search` at K=1 (one child per turn: no judge choice); SAGE
   models branch latent-first (they write their latents, then the reply), base and baseline sample
   plain messages; the simulated user is the base model for every system (``eval_user=base``).
5. **compare**: :func:`sage_jax.eval.compare.run_compare` of every model against the base and of
   every SAGE model against the no-latent baseline, with ``exclude_seeds_from`` = the search
   outputs, the search seed file and the training files (compare refuses overlap): win/tie/loss
   with 95% Wilson intervals; the evaluation judge (``eval_judge``) and the selection judge
   (``judge``) are both named.
6. **latent**: field-level latent accuracy from generation of every SAGE model on the held-out SAC
   dialogues against the majority-class baseline of the training dialogues
   (:func:`sage_jax.eval.latent.evaluate_latents`), with the parse rate.
7. **perplexity**: held-out plain-text perplexity of every model against the base
   (:func:`sage_jax.eval.perplexity.perplexity_ratios`).
8. ``report.md`` with the tables and PNG plots, rewritten on every run; ``result.json`` (the
   experiment idiom) with flat metrics.

The offline judge ``rules:`` is a deterministic heuristic, not an LLM; the report says so.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import sys
from pathlib import Path
from typing import Any, Callable

from experiments.common import experiment_main, resolve_files, write_json
from sage_jax.eval.latent import LatentEvalConfig
from sage_jax.eval.perplexity import PerplexityConfig
from sage_jax.model.loader import ModelSpec
from sage_jax.parallel import MeshConfig
from sage_jax.search.tree import SearchConfig
from sage_jax.train.dpo import DPORunConfig
from sage_jax.train.sft import SFTConfig
from sage_jax.train.steps import OptimConfig

ONE_DEVICE = MeshConfig(num_devices=1)
STAGES_FILE = "stages.json"
PAPER_MIN_HELD_OUT = 50  # issue 12: at least 50 held-out ED seeds


@dataclasses.dataclass(frozen=True)
class Config:
    """Defaults are the ``cpu`` preset (sized for a 2-core CPU)."""

    output_dir: str = "runs/experiments/replicate"
    base_model: str = "smollm2"
    sac_files: tuple[str, ...] = ("sample:ed_train_200.jsonl", "sample:esconv_train_100.jsonl")
    sac_held_out: int = 30  # SAC dialogues held out by id hash (latent accuracy, perplexity)
    # Seed files (one ED situation per line); empty: shared/data's test_sent.tsv, else the sample.
    seed_files: tuple[str, ...] = ()
    held_out_seeds: int = 50  # evaluation seeds (fewer only when the seed files run out)
    search_seeds: int = 6  # seeds searched per search stage (never evaluated on)
    split_salt: str = "replicate"  # hash salt of the seed and SAC splits
    judge: str = "rules:"  # the selection judge of every search
    eval_judge: str | None = None  # the evaluation judge of compare (None: the selection judge)
    rounds: int = 1  # search + SFT rounds after m1 (m2, m3, ...)
    dpo: bool = True
    # Stage templates (models, data files, seeds and output dirs are filled in).
    sft: SFTConfig = SFTConfig(
        model=ModelSpec(), seq_len=256, batch_size=4, max_steps=30, eval_fraction=0.05, eval_every=10,
        save_every=1000, lora=None, tensorboard=False, mesh=ONE_DEVICE,
        optim=OptimConfig(learning_rate=1e-4, warmup_steps=3))
    round_sft: SFTConfig = SFTConfig(
        seq_len=512, batch_size=4, max_steps=10, eval_fraction=0.1, eval_every=5, save_every=1000, lora=None,
        tensorboard=False, mesh=ONE_DEVICE, optim=OptimConfig(learning_rate=5e-5, warmup_steps=0))
    search: SearchConfig = SearchConfig(turns=2, k=3, max_new_tokens=40, user_max_new_tokens=24, batch_seeds=6,
                                        mesh=ONE_DEVICE)
    dpo_run: DPORunConfig = DPORunConfig(
        seq_len=512, batch_size=2, max_steps=6, eval_fraction=0.25, eval_every=3, save_every=1000,
        tensorboard=False, mesh=ONE_DEVICE, optim=OptimConfig(learning_rate=5e-5, warmup_steps=0))
    # Evaluation self-play (k is forced to 1; model, seeds, branching, user and output dir are set).
    rollout: SearchConfig = SearchConfig(turns=2, k=1, max_new_tokens=40, user_max_new_tokens=24, batch_seeds=25,
                                         mesh=ONE_DEVICE)
    sage_branching: str = "latent"  # how SAGE models roll out (latent: their latents first); plain ones: sample
    eval_user: str = "base"  # the simulated user of every evaluation rollout: base | self | a model spec
    latent: LatentEvalConfig = LatentEvalConfig(max_dialogues=30, max_turns=2, teacher_forced=False,
                                                max_new_tokens=64, batch_size=16, progress=False)
    perplexity: PerplexityConfig = PerplexityConfig(seq_len=512, batch_rows=8, progress=False)


# Overrides per preset (dotted keys, Python values), applied before the command line's key=value.
PRESETS: dict[str, dict[str, Any]] = {
    "cpu": {},  # the defaults
    "gpu": {
        "output_dir": "runs/experiments/replicate_gpu",
        "held_out_seeds": 200, "search_seeds": 32, "sac_held_out": 60, "rounds": 2,
        "sft.seq_len": 1024, "sft.batch_size": 16, "sft.max_steps": 100, "sft.eval_every": 20,
        "sft.optim.warmup_steps": 10,
        "sft.model.dtype": "bfloat16",
        "round_sft.seq_len": 1024, "round_sft.batch_size": 16, "round_sft.max_steps": 40,
        "round_sft.eval_every": 10, "round_sft.model.dtype": "bfloat16",
        "search.turns": 4, "search.k": 4, "search.max_new_tokens": 96, "search.user_max_new_tokens": 48,
        "search.batch_seeds": 32,
        "dpo_run.seq_len": 1024, "dpo_run.batch_size": 8, "dpo_run.max_steps": 60, "dpo_run.eval_every": 10,
        "dpo_run.model.dtype": "bfloat16",
        "rollout.turns": 4, "rollout.max_new_tokens": 96, "rollout.user_max_new_tokens": 48,
        "rollout.batch_seeds": 100,
        "latent.max_dialogues": 60, "latent.max_turns": 4, "latent.teacher_forced": True,
        "perplexity.seq_len": 1024,
    },
}


def preset_overrides(name: str) -> list[str]:
    """The preset as ``key=value`` strings (JSON values, which the config parser reads as YAML)."""
    if name not in PRESETS:
        raise ValueError(f"replicate: unknown preset {name!r} (choose from {', '.join(sorted(PRESETS))})")
    return [f"{k}={json.dumps(v)}" for k, v in PRESETS[name].items()]


def preset_config(name: str, overrides=()) -> Config:
    """``Config`` of a preset plus ``key=value`` overrides (what ``--preset NAME k=v ...`` builds)."""
    from sage_jax.config import apply_overrides

    return apply_overrides(Config, preset_overrides(name) + list(overrides))


def _log(msg: str) -> None:
    print(msg, file=sys.stderr, flush=True)


def _jsonable(obj):
    return json.loads(json.dumps(obj, default=str))


# ---------------------------------------------------------------- stages
class Stages:
    """stages.json: one record per finished stage, with the settings it ran with (``inputs``)."""

    def __init__(self, out: Path, log: Callable[[str], None] = _log):
        from sage_jax.loop import Lineage

        self.lineage = Lineage(out / STAGES_FILE)
        self.out, self.log = out, log
        self.ran: list[str] = []
        self.skipped: list[str] = []

    def __call__(self, name: str, inputs: dict, fn: Callable[[], dict]) -> dict:
        inputs = _jsonable(inputs)
        rec = self.lineage.done(name)
        if rec is not None:
            if rec.get("inputs") != inputs:
                diff = sorted(k for k in set(inputs) | set(rec.get("inputs") or {})
                              if inputs.get(k) != (rec.get("inputs") or {}).get(k))
                raise ValueError(f"replicate: stage {name!r} in {self.out} finished with other settings (differing: "
                                 f"{', '.join(diff)}); use a new output_dir, or delete that stage's record from "
                                 f"{self.out / STAGES_FILE} and its folder to redo it")
            self.log(f"replicate: {name} already done, skipping")
            self.skipped.append(name)
            return rec
        self.log(f"replicate: {name} ...")
        rec = self.lineage.record(name, inputs=inputs, **_jsonable(fn()))
        self.ran.append(name)
        return rec


# ---------------------------------------------------------------- seeds and data
def default_seed_files() -> tuple[str, ...]:
    """ED test situations from the project's shared data when present, else the shipped 50."""
    from sage_jax.data.sample import sample_path
    from sage_jax.eval.eq_bench import default_data_dir

    full = default_data_dir() / "empatheticdialogues" / "test_sent.tsv"
    return (str(full),) if full.exists() else (str(sample_path("ed_test_seeds.txt")),)


def make_seeds(cfg: Config, out: Path) -> dict:
    """Write seeds/search.txt and seeds/held_out.txt (disjoint by normalised text)."""
    from sage_jax.data.holdout import write_seed_split

    files = cfg.seed_files or default_seed_files()
    rec = write_seed_split(files, search=cfg.search_seeds, held_out=cfg.held_out_seeds, salt=cfg.split_salt,
                           out=out / "seeds")
    if rec["held_out"] < PAPER_MIN_HELD_OUT:
        rec["notes"].append(f"{rec['held_out']} held-out seeds: fewer than the {PAPER_MIN_HELD_OUT} issue 12 asks "
                            "for (the EmpatheticDialogues test situations of shared/data give more)")
    for n in rec["notes"]:
        _log(f"replicate: note: {n}")
    return rec


def make_data(cfg: Config, out: Path) -> dict:
    """data/sac_train.jsonl, data/sac_held_out.jsonl (by id hash) and data/sac_train_plain.jsonl."""
    from sage_jax.data.holdout import write_sac_split

    return write_sac_split(cfg.sac_files, held_out=cfg.sac_held_out, salt=cfg.split_salt, out=out / "data",
                           plain=True, log=_log)


# ---------------------------------------------------------------- models
def loop_configs(cfg: Config, out: Path, data: dict, seeds: dict):
    """(the SAGE loop's config, the no-latent baseline's config: the same m1 stage, latents stripped)."""
    from sage_jax.loop import LoopConfig

    search = dataclasses.replace(cfg.search, judge=cfg.judge, seeds=seeds["search_file"], num_seeds=None)
    common = dict(base_model=cfg.base_model, sft=cfg.sft, round_sft=cfg.round_sft, search=search, dpo_run=cfg.dpo_run)
    sage = LoopConfig(sac_files=(data["files"]["train"],), output_dir=str(out / "sage"), rounds=cfg.rounds,
                      dpo=cfg.dpo, **common)
    baseline = LoopConfig(sac_files=(data["files"]["train_plain"],), output_dir=str(out / "baseline"), rounds=0,
                          dpo=False, **common)
    return sage, baseline


def lineage_models(loop_dir: Path) -> dict[str, dict]:
    """Model stages of a loop's lineage.json in order: name -> record (``model``: its HF export)."""
    stages = json.loads((loop_dir / "lineage.json").read_text())["stages"]
    return {k: v for k, v in stages.items() if v.get("kind") in ("sft", "dpo")}


def _rollout_config(cfg: Config, name: str, model: str, sage: bool, seeds: dict, out: Path) -> SearchConfig:
    user = {"base": cfg.base_model, "self": None}.get(cfg.eval_user, cfg.eval_user)
    return dataclasses.replace(cfg.rollout, model=model, user_model=user, k=1, beam=1, lookahead=1,
                               branching=cfg.sage_branching if sage else "sample", judge="rules:",
                               seeds=seeds["held_out_file"], num_seeds=None,
                               output_dir=str(out / "rollouts" / name))


# ---------------------------------------------------------------- the run
def run(cfg: Config) -> dict:
    from sage_jax.config import to_dict
    from sage_jax.eval.compare import CompareConfig, run_compare
    from sage_jax.eval.latent import evaluate_latents
    from sage_jax.eval.perplexity import perplexity_ratios
    from sage_jax.loop import run_loop
    from sage_jax.search.tree import run_search

    cfg = resolve_files(cfg)
    out = Path(cfg.output_dir)
    out.mkdir(parents=True, exist_ok=True)
    stage = Stages(out)
    eval_judge = cfg.eval_judge or cfg.judge

    seeds = stage("seeds", {"seed_files": list(cfg.seed_files or default_seed_files()),
                            "held_out_seeds": cfg.held_out_seeds, "search_seeds": cfg.search_seeds,
                            "salt": cfg.split_salt}, lambda: make_seeds(cfg, out))
    data = stage("data", {"sac_files": list(cfg.sac_files), "sac_held_out": cfg.sac_held_out, "salt": cfg.split_salt},
                 lambda: make_data(cfg, out))
    sage_cfg, base_cfg = loop_configs(cfg, out, data, seeds)
    stage("sage", to_dict(sage_cfg), lambda: run_loop(sage_cfg, log=_log))
    stage("baseline", to_dict(base_cfg), lambda: run_loop(base_cfg, log=_log))

    sage_models = {k: v["model"] for k, v in lineage_models(out / "sage").items()}
    baseline_model = lineage_models(out / "baseline")["m1"]["model"]
    models = {"base": cfg.base_model, "baseline": baseline_model, **sage_models}
    plain = ("base", "baseline")

    # rollouts on the held-out seeds
    rollouts = {}
    for name, model in models.items():
        rc = _rollout_config(cfg, name, model, name not in plain, seeds, out)
        rec = stage(f"rollout_{name}", to_dict(rc), lambda rc=rc: {"summary": run_search(rc)})
        rollouts[name] = str(Path(rc.output_dir) / "sft.jsonl")

    # pairwise comparisons (B = the system under test)
    lineage = json.loads((out / "sage" / "lineage.json").read_text())["stages"]
    search_dirs = [str(out / "sage" / k) for k, v in lineage.items() if v.get("kind") == "search"]
    exclude = tuple(search_dirs + [seeds["search_file"], data["files"]["train"], data["files"]["train_plain"]])
    pairs = [(x, "base") for x in models if x != "base"] + [(x, "baseline") for x in sage_models]
    comparisons = {}
    for b, a in pairs:
        key = f"{b}_vs_{a}"
        cc = CompareConfig(a=rollouts[a], b=rollouts[b], judge=eval_judge, output=str(out / "compare" / key),
                           exclude_seeds_from=exclude, selection_judge=cfg.judge)
        rec = stage(f"compare_{key}", to_dict(cc), lambda cc=cc: {"summary": run_compare(cc)})
        comparisons[key] = {**rec["summary"], "a": a, "b": b, "file_a": cc.a, "file_b": cc.b}

    # field-level latent accuracy from generation (SAGE models) + the majority baseline
    latent = {}
    for name in sage_models:
        inputs = {"model": models[name], "data": data["files"]["held_out"], "train": data["files"]["train"],
                  "config": dataclasses.asdict(cfg.latent)}

        def fn(name=name):
            res = evaluate_latents(models[name], data["files"]["held_out"], cfg.latent,
                                   output=out / "latent" / f"{name}_turns.jsonl", train=data["files"]["train"])
            write_json(out / "latent" / f"{name}.json", res)
            return {"result": res}

        latent[name] = stage(f"latent_{name}", inputs, fn)["result"]

    # held-out plain-text perplexity against the base
    others = {k: v for k, v in models.items() if k != "base"}
    pcfg, held_sac = cfg.perplexity, data["files"]["held_out"]
    ppl = stage("perplexity", {"models": others, "base": cfg.base_model, "data": held_sac, "config": to_dict(pcfg)},
                lambda: {"result": perplexity_ratios(others, cfg.base_model, [held_sac], pcfg)})["result"]

    report = write_report(cfg, out, seeds=seeds, data=data, models=models, comparisons=comparisons, latent=latent,
                          perplexity=ppl, eval_judge=eval_judge)
    metrics = flat_metrics(seeds, data, comparisons, latent, ppl)
    return {"report": str(report), "stages_file": str(out / STAGES_FILE), "stages_ran": stage.ran,
            "stages_skipped": stage.skipped, "models": models, "seeds": seeds, "data": data,
            "comparisons": {k: _compact(v) for k, v in comparisons.items()}, "metrics": metrics}


def _compact(s: dict) -> dict:
    keep = ("a", "b", "file_a", "file_b", "wins_a", "wins_b", "no_consensus", "total", "win_rate_b_decided",
            "win_rate_b_all", "judge", "judges", "held_out", "warnings")
    return {k: s[k] for k in keep if k in s}


def flat_metrics(seeds: dict, data: dict, comparisons: dict, latent: dict, ppl: dict) -> dict:
    m: dict[str, Any] = {"held_out_seeds": seeds["held_out"], "search_seeds": seeds["search"],
                         "sac_train": data["train"], "sac_held_out": data["held_out"]}
    for key, s in comparisons.items():
        m[f"{key}_wins"], m[f"{key}_losses"], m[f"{key}_ties"] = s["wins_b"], s["wins_a"], s["no_consensus"]
        for which in ("decided", "all"):
            r = s[f"win_rate_b_{which}"]
            m[f"{key}_win_rate_{which}"] = r["rate"]
            m[f"{key}_win_rate_{which}_low"], m[f"{key}_win_rate_{which}_high"] = r["low"], r["high"]
    for name, res in latent.items():
        g = res.get("generated") or {}
        m[f"latent_{name}_parse_rate"] = g.get("parse_rate")
        for field, v in (g.get("fields") or {}).items():
            m[f"latent_{name}_{field}"] = v.get("accuracy", v.get("jaccard"))
            m[f"latent_majority_{field}"] = v.get("majority_baseline")
    for name, r in ppl["models"].items():
        m[f"ppl_ratio_{name}"] = r.get("ratio")
    m["ppl_base"] = ppl["base"]["perplexity"]
    return {k: v for k, v in m.items() if v is None or isinstance(v, (int, float))}


# ---------------------------------------------------------------- report
def verdict(s: dict) -> str:
    """What a comparison's interval says about B (the system under test) against A."""
    r = s["win_rate_b_decided"]
    if r.get("rate") is None:
        return "no decided pair"
    if r["low"] > 0.5:
        return f"{s['b']} better"
    if r["high"] < 0.5:
        return f"{s['b']} worse"
    return "inconclusive (interval contains 0.5)"


def plot_win_rates(comparisons: dict, path: Path) -> Path:
    import matplotlib.pyplot as plt

    keys = list(comparisons)
    fig, ax = plt.subplots(figsize=(7, 0.5 * len(keys) + 1.5))
    for i, k in enumerate(keys):
        r = comparisons[k]["win_rate_b_decided"]
        if r.get("rate") is None:
            continue
        ax.errorbar([r["rate"]], [i], xerr=[[r["rate"] - r["low"]], [r["high"] - r["rate"]]], fmt="o", capsize=4,
                    color="#2a2" if r["low"] > 0.5 else "#a22" if r["high"] < 0.5 else "#555")
    ax.axvline(0.5, color="#999", linestyle="--")
    ax.set_yticks(range(len(keys)), [k.replace("_vs_", " vs ") for k in keys])
    ax.set_xlim(0, 1)
    ax.invert_yaxis()
    ax.set_xlabel("win rate over decided pairs (95% Wilson interval)")
    ax.set_title(f"Pairwise judge ({next(iter(comparisons.values()))['judge']}), both orders")
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return path


def write_report(cfg: Config, out: Path, *, seeds: dict, data: dict, models: dict, comparisons: dict, latent: dict,
                 perplexity: dict, eval_judge: str) -> Path:
    from sage_jax.report import fmt, latent_section, perplexity_section, plot_losses, rate_text

    heuristic = [j for j in {cfg.judge, eval_judge} if j.startswith("rules")]
    L = ["# SAGE, small-scale replication", ""]
    sage_names = ", ".join(f"`{m}`" for m in models if m not in ("base", "baseline"))
    L += [f"- base model: `{cfg.base_model}`; SAGE models: {sage_names}; "
          f"no-latent baseline: the m1 recipe on the same training dialogues with every latent removed",
          f"- selection judge (chose the search's training dialogues and DPO pairs): `{cfg.judge}`; evaluation judge "
          f"(compare): `{eval_judge}`" + (" — **`rules:` is a deterministic heuristic, not an LLM**: these numbers "
                                          "say how the systems score on its rules (see `sage_jax.judge.rules`), not "
                                          "what a human or an LLM judge would prefer" if heuristic else ""),
          f"- seeds: {seeds['held_out']} held-out evaluation seeds and {seeds['search']} search seeds from "
          f"{', '.join(f'`{f}`' for f in seeds['files'])} ({seeds['pool']} distinct), split by a hash of the text; "
          f"disjoint: {seeds['disjoint']}; compare checked every evaluated dialogue against the search outputs, the "
          f"search seed file and the training files",
          f"- SAC data: {data['train']} training and {data['held_out']} held-out dialogues (split by a hash of the "
          f"id; held-out ones are never trained on) from {', '.join(f'`{Path(s).name}`' for s in data['sources'])}",
          f"- rounds: {cfg.rounds} (search with K={cfg.search.k}, {cfg.search.turns} turns on the search seeds, "
          f"then SFT), DPO: {cfg.dpo}; evaluation rollouts: {cfg.rollout.turns} assistant turns, reply budget "
          f"{cfg.rollout.max_new_tokens} tokens (a latent prefix not counted), the simulated user: "
          f"{'the base model for every system' if cfg.eval_user == 'base' else cfg.eval_user}",
          *[f"- note: {n}" for n in seeds.get("notes", [])], ""]

    L += ["## Win / tie / loss on held-out seeds", "",
          "B is the system under test, A the reference. Every pair is judged in both orders; a win counts only when "
          "both orders agree, anything else is a tie. Win rates with 95% Wilson score intervals.", "",
          "| B (tested) | A (reference) | B wins | A wins | ties | n | B win rate, decided pairs | "
          "B win rate, all pairs | verdict |", "|---|---|---|---|---|---|---|---|---|"]
    for s in comparisons.values():
        L.append(f"| {s['b']} | {s['a']} | {s['wins_b']} | {s['wins_a']} | {s['no_consensus']} | {s['total']} | "
                 f"{rate_text(s['win_rate_b_decided'])} | {rate_text(s['win_rate_b_all'])} | {verdict(s)} |")
    warns = sorted({w for s in comparisons.values() for w in s.get("warnings", ())})
    L += [""] + [f"- warning (compare): {w}" for w in warns] + [""]
    if comparisons:
        L += [f"![win rates]({plot_win_rates(comparisons, out / 'win_rates.png').name})", ""]

    L += latent_section(latent, out) + perplexity_section(perplexity, out)

    runs = {}
    for loop in ("sage", "baseline"):
        lp = out / loop / "lineage.json"
        if lp.exists():
            for k, v in json.loads(lp.read_text())["stages"].items():
                if v.get("run") and v.get("kind") in ("sft", "dpo"):
                    runs["baseline" if loop == "baseline" else k] = Path(v["run"])
    L += ["## Training", ""]
    if runs:
        L += [f"![loss curves]({plot_losses(runs, out / 'loss_curves.png').name})", ""]
    L += ["| model | kind | parent | final validation |", "|---|---|---|---|"]
    for loop in ("sage", "baseline"):
        lp = out / loop / "lineage.json"
        for k, v in (json.loads(lp.read_text())["stages"] if lp.exists() else {}).items():
            name = "baseline" if loop == "baseline" else k
            ev = (v.get("evals") or [{}])[-1] if v.get("kind") in ("sft", "dpo") else None
            if ev is not None:
                shown = ", ".join(f"{x} {fmt(ev[x], 4)}" for x in ("loss", "latent_accuracy", "reward_accuracy")
                                  if isinstance(ev.get(x), (int, float)))
                L.append(f"| {name} | {v['kind']} | `{Path(str(v.get('parent'))).name}` | {shown or 'n/a'} |")
            elif v.get("kind") == "search":
                s = v.get("summary", {})
                L.append(f"| ({k}) | search | `{Path(str(v.get('model'))).name}` | {s.get('searched')} dialogues, "
                         f"{s.get('pairs')} pairs, {s.get('abandoned')} abandoned, distinct actions per node "
                         f"{s.get('distinct_actions_mean')} |")
    L += ["", "## What these numbers can and cannot show", "",
          f"- Scale: the `{Path(cfg.base_model).name}` model, m1 trained for "
          + (f"{cfg.sft.max_steps} steps" if cfg.sft.max_steps else f"{cfg.sft.epochs:g} epochs")
          + f", {cfg.search_seeds} search seeds per round; the paper used Mixtral-8x7B, thousands of dialogues and an "
          "LLM judge. A null result here says little about the method at scale; a clear result says the pipeline "
          "moves the models in the direction the judge rewards.",
          "- Intervals: with n held-out seeds a win rate's 95% interval is roughly +-1/sqrt(n); 'inconclusive' means "
          "the data do not separate the systems.",
          "- The judge: " + ("the evaluation judge is the selection judge, so a SAGE model's wins partly measure "
                             "agreement with the judge that chose its training data. " if eval_judge == cfg.judge
                             else "the evaluation judge differs from the selection judge. ")
          + ("`rules:` is a heuristic (question at the end, length, relevance, no repetition): it cannot judge "
             "empathy or naturalness." if heuristic else ""),
          "- Latent accuracy: a field at or below its majority baseline has not been learnt beyond the label "
          "frequencies; the parse rate says how often the model wrote a usable prefix at all.",
          "- Perplexity: a ratio near 1 means plain-chat ability was kept on this data; it says nothing about "
          "other tasks.", ""]
    path = out / "report.md"
    path.write_text("\n".join(L) + "\n", encoding="utf-8")
    return path


# ---------------------------------------------------------------- command line
_main = experiment_main("replicate", Config, run, __doc__)


def main(argv: list[str] | None = None) -> int:
    """``--preset cpu|gpu`` (its overrides go before the command line's key=value), then the experiment idiom."""
    argv = list(sys.argv[1:] if argv is None else argv)
    pre = argparse.ArgumentParser(add_help=False)
    pre.add_argument("--preset", choices=sorted(PRESETS), default=None)
    ns, rest = pre.parse_known_args(argv)
    if ns.preset:
        rest = preset_overrides(ns.preset) + rest
    return _main(rest)


main.config_class = Config  # type: ignore[attr-defined]
main.experiment = "replicate"  # type: ignore[attr-defined]

if __name__ == "__main__":
    raise SystemExit(main())
