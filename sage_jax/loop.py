"""The SAGE self-improvement loop (SAGE.md §3-5):

    m1 = SFT(base, SAC data, blended: each dialogue cut to an even number of turns + the turns of
                2 other random dialogues, SAGE.md §2; blend_m1=false trains on the data as given)
    for r in 1..rounds:  search with m_r (judge picks branches) -> m_{r+1} = SFT(m_r, selected dialogues)
    pairs = search with the last model;  final = DPO(last model, pairs)

Each stage writes into its own folder under output_dir and records itself in lineage.json (inputs,
outputs, parent model, config, and ``settings``: what defines its result) when done; a rerun skips
finished stages, and the stage runners themselves resume mid-stage (SFT/DPO from checkpoints,
search per seed). A finished stage whose recorded settings differ from the current ones stops the
rerun with a message naming the stage and the changed fields (``allow_changed_config=true`` keeps
the finished stage anyway, with a warning, and lets an unfinished training stage continue under
the new settings); a record from before settings were recorded is reused with a logged note. A
stage's model is exported from its run's best checkpoint when the run recorded one (DPO keeps its
best by validation loss), else its latest (:func:`sage_jax.model.loader.choose_step`); later
stages load that export.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import sys
import time
from pathlib import Path
from typing import Callable

from sage_jax.config import to_dict
from sage_jax.model.loader import load_run
from sage_jax.search.tree import SearchConfig, run_search
from sage_jax.train.dpo import DPORunConfig, run_dpo
from sage_jax.train.settings import SettingsChanged, changed_fields, describe_changes, result_settings, run_settings
from sage_jax.train.sft import SFTConfig, run_sft

logger = logging.getLogger(__name__)
# Search settings that say where and how fast, not what is searched.
SEARCH_NOT_RESULT = frozenset({"output_dir", "judge_cache", "mesh", "progress"})


def _sample_files() -> tuple[str, ...]:
    from sage_jax.data.sample import sample_path

    return (str(sample_path("ed_train_200.jsonl")), str(sample_path("esconv_train_100.jsonl")))


@dataclasses.dataclass(frozen=True)
class LoopConfig:
    base_model: str = "smollm2"
    sac_files: tuple[str, ...] = ()  # empty: the shipped sample (ED + ESConv)
    # m1 trains on a blended copy of sac_files (written to <output_dir>/m1/train_blended.jsonl,
    # seed sft.seed), as the reference does; false: on sac_files as they are.
    blend_m1: bool = True
    output_dir: str = "runs/loop"
    rounds: int = 2  # search + fine-tune rounds after m1 (the paper: m2, m3)
    dpo: bool = True
    # Templates for each stage; the loop fills in models, data files and output dirs.
    sft: SFTConfig = SFTConfig()
    round_sft: SFTConfig = SFTConfig(epochs=1.0)
    search: SearchConfig = SearchConfig()
    dpo_run: DPORunConfig = DPORunConfig()
    # A finished stage recorded with other settings stops the rerun; true: keep it (warning), and
    # let unfinished training stages continue under changed settings.
    allow_changed_config: bool = False


class Lineage:
    """lineage.json: one record per finished stage (what it read, what it wrote, its config)."""

    def __init__(self, path: Path):
        self.path = path
        self.stages: dict[str, dict] = json.loads(path.read_text())["stages"] if path.exists() else {}

    def done(self, name: str) -> dict | None:
        return self.stages.get(name)

    def record(self, name: str, **info) -> dict:
        self.stages[name] = {"finished": time.strftime("%Y-%m-%dT%H:%M:%S"), **info}
        tmp = self.path.with_suffix(".tmp")
        tmp.write_text(json.dumps({"stages": self.stages}, indent=2) + "\n")
        tmp.replace(self.path)
        return self.stages[name]


def export_model(run_dir: Path, out: Path) -> Path:
    """Merge a run's checkpoint (its best when it recorded one, else its latest) into a plain HF
    directory (the next stage's base)."""
    from transformers import AutoTokenizer

    from sage_jax.model import save_hf

    cfg, params, tok_dir, _ = load_run(run_dir)
    return save_hf(out, cfg, params, tokenizer=AutoTokenizer.from_pretrained(tok_dir))


M1_BLENDED = "train_blended.jsonl"


def blend_m1_data(files, run_dir: Path, seed: int, log: Callable[[str], None]) -> tuple[Path, dict]:
    """The blended copy of ``files`` that m1 trains on, written into m1's run directory (the same
    file for the same inputs and seed, so a resumed m1 reads the same data)."""
    from sage_jax.data.mix import blend_files

    path = run_dir / M1_BLENDED
    report = blend_files(list(files), path, seed=seed)
    log(f"loop: m1 data blended -> {path}\n{report.summary()}")
    return path, {"blended": True, "sources": [str(f) for f in files], "dialogues": report.total,
                  "too_short_to_blend": report.dropped_by_blend, "seed": seed}


def check_stage(name: str, rec: dict, settings: dict, *, allow_changed: bool, lineage_path: Path) -> None:
    """Refuse to reuse a finished stage whose recorded settings differ from ``settings``."""
    old = rec.get("settings")
    if old is None:
        logger.info("loop: stage %s was recorded without its settings (an older lineage.json): reused unchecked",
                    name)
        return
    if old == settings:
        return
    detail = describe_changes(old, settings)
    if not allow_changed:
        raise SettingsChanged(
            f"loop: stage {name!r} finished with other settings; changed: {detail}. Use a new output_dir, delete "
            f"the stage's record from {lineage_path} (and its folder) to redo it, or pass "
            f"allow_changed_config=true to keep it", changed_fields(old, settings))
    logger.warning("loop: keeping finished stage %s although its settings changed (allow_changed_config): %s",
                   name, detail)


def run_loop(cfg: LoopConfig, log: Callable[[str], None] = lambda m: print(m, file=sys.stderr)) -> dict:
    out = Path(cfg.output_dir)
    out.mkdir(parents=True, exist_ok=True)
    lineage = Lineage(out / "lineage.json")
    sac = cfg.sac_files or _sample_files()

    def stage(name: str, settings: dict, fn: Callable[[], dict]) -> dict:
        settings = json.loads(json.dumps(settings, default=str))
        if (rec := lineage.done(name)) is not None:
            check_stage(name, rec, settings, allow_changed=cfg.allow_changed_config, lineage_path=lineage.path)
            log(f"loop: {name} already done, skipping")
            return rec
        log(f"loop: {name} ...")
        return lineage.record(name, **fn(), settings=settings)

    def sft_stage(name: str, template: SFTConfig, model: str, files, blend: bool = False) -> dict:
        data = [str(out / name / M1_BLENDED)] if blend else [str(f) for f in files]
        c = dataclasses.replace(template, model=dataclasses.replace(template.model, path=model),
                                train_files=tuple(data), output_dir=str(out / name),
                                allow_changed_config=cfg.allow_changed_config)
        # blended data is written by the stage: its sources (and the blend seed, sft's seed) define it
        settings = run_settings(c, files if blend else data)
        if blend:
            settings["blend_sources"] = settings.pop("data")

        def fn():
            extra = {}
            if blend:
                _, extra["blend"] = blend_m1_data(files, out / name, template.seed, log)
            summary = run_sft(c)
            hf = export_model(out / name, out / f"{name}_hf")
            return {"kind": "sft", "parent": model, "data": data, **extra, "model": str(hf), "run": str(out / name),
                    "evals": summary["evals"], "config": to_dict(c)}
        return stage(name, settings, fn)

    def search_stage(name: str, model_run: str) -> dict:
        c = dataclasses.replace(cfg.search, model=model_run, output_dir=str(out / name))

        def fn():
            summary = run_search(c)
            return {"kind": "search", "model": model_run, "sft_data": str(out / name / "sft.jsonl"),
                    "pairs": str(out / name / "pairs.jsonl"), "summary": summary, "config": to_dict(c)}
        return stage(name, result_settings(c, SEARCH_NOT_RESULT), fn)

    m = sft_stage("m1", cfg.sft, cfg.base_model, sac, blend=cfg.blend_m1)
    for r in range(1, cfg.rounds + 1):
        s = search_stage(f"search{r}", m["run"])
        m = sft_stage(f"m{r + 1}", cfg.round_sft, m["model"], [s["sft_data"]])
    result = {"final_model": m["model"], "final_run": m["run"]}
    if cfg.dpo:
        s = search_stage("search_dpo", m["run"])
        parent = m["model"]

        dc = dataclasses.replace(cfg.dpo_run, model=dataclasses.replace(cfg.dpo_run.model, path=parent),
                                 train_files=(s["pairs"],), output_dir=str(out / "dpo"),
                                 allow_changed_config=cfg.allow_changed_config)

        def dpo_fn():
            summary = run_dpo(dc)
            hf = export_model(out / "dpo", out / "dpo_hf")
            return {"kind": "dpo", "parent": parent, "data": [s["pairs"]], "model": str(hf), "run": str(out / "dpo"),
                    "evals": summary["evals"], "config": to_dict(dc)}

        d = stage("dpo", run_settings(dc, dc.train_files), dpo_fn)
        result = {"final_model": d["model"], "final_run": d["run"]}
    return {**result, "lineage": str(out / "lineage.json"), "stages": list(lineage.stages)}
