"""The SAGE self-improvement loop (SAGE.md §3-5):

    m1 = SFT(base, SAC data, blended: each dialogue cut to an even number of turns + the turns of
                2 other random dialogues, SAGE.md §2; blend_m1=false trains on the data as given)
    for r in 1..rounds:  search with m_r (judge picks branches) -> m_{r+1} = SFT(m_r, selected dialogues)
    pairs = search with the last model;  final = DPO(last model, pairs)

Each stage writes into its own folder under output_dir and records itself in lineage.json (inputs,
outputs, parent model, config) when done; a rerun skips finished stages, and the stage runners
themselves resume mid-stage (SFT/DPO from checkpoints, search per seed). A stage's model is exported
from its run's best checkpoint when the run recorded one (DPO keeps its best by validation loss),
else its latest (:func:`sage_jax.model.loader.choose_step`); later stages load that export.
"""

from __future__ import annotations

import dataclasses
import json
import sys
import time
from pathlib import Path
from typing import Callable

from sage_jax.config import to_dict
from sage_jax.model.loader import load_run
from sage_jax.search.tree import SearchConfig, run_search
from sage_jax.train.dpo import DPORunConfig, run_dpo
from sage_jax.train.sft import SFTConfig, run_sft


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


def run_loop(cfg: LoopConfig, log: Callable[[str], None] = lambda m: print(m, file=sys.stderr)) -> dict:
    out = Path(cfg.output_dir)
    out.mkdir(parents=True, exist_ok=True)
    lineage = Lineage(out / "lineage.json")
    sac = cfg.sac_files or _sample_files()

    def stage(name: str, fn: Callable[[], dict]) -> dict:
        if (rec := lineage.done(name)) is not None:
            log(f"loop: {name} already done, skipping")
            return rec
        log(f"loop: {name} ...")
        return lineage.record(name, **fn())

    def sft_stage(name: str, template: SFTConfig, model: str, files, blend: bool = False) -> dict:
        def fn():
            data, extra = list(files), {}
            if blend:
                path, extra["blend"] = blend_m1_data(files, out / name, template.seed, log)
                data = [str(path)]
            c = dataclasses.replace(template, model=dataclasses.replace(template.model, path=model),
                                    train_files=tuple(data), output_dir=str(out / name))
            summary = run_sft(c)
            hf = export_model(out / name, out / f"{name}_hf")
            return {"kind": "sft", "parent": model, "data": data, **extra, "model": str(hf), "run": str(out / name),
                    "evals": summary["evals"], "config": to_dict(c)}
        return stage(name, fn)

    def search_stage(name: str, model_run: str) -> dict:
        def fn():
            c = dataclasses.replace(cfg.search, model=model_run, output_dir=str(out / name))
            summary = run_search(c)
            return {"kind": "search", "model": model_run, "sft_data": str(out / name / "sft.jsonl"),
                    "pairs": str(out / name / "pairs.jsonl"), "summary": summary, "config": to_dict(c)}
        return stage(name, fn)

    m = sft_stage("m1", cfg.sft, cfg.base_model, sac, blend=cfg.blend_m1)
    for r in range(1, cfg.rounds + 1):
        s = search_stage(f"search{r}", m["run"])
        m = sft_stage(f"m{r + 1}", cfg.round_sft, m["model"], [s["sft_data"]])
    result = {"final_model": m["model"], "final_run": m["run"]}
    if cfg.dpo:
        s = search_stage("search_dpo", m["run"])
        parent = m["model"]

        def dpo_fn():
            c = dataclasses.replace(cfg.dpo_run, model=dataclasses.replace(cfg.dpo_run.model, path=parent),
                                    train_files=(s["pairs"],),
                                    output_dir=str(out / "dpo"))
            summary = run_dpo(c)
            hf = export_model(out / "dpo", out / "dpo_hf")
            return {"kind": "dpo", "parent": parent, "data": [s["pairs"]], "model": str(hf), "run": str(out / "dpo"),
                    "evals": summary["evals"], "config": to_dict(c)}

        d = stage("dpo", dpo_fn)
        result = {"final_model": d["model"], "final_run": d["run"]}
    return {**result, "lineage": str(out / "lineage.json"), "stages": list(lineage.stages)}
