"""`sage-jax demo`: the whole SAGE loop, offline, on CPU, on the shipped sample.

    held-out splits (seeds never searched, SAC dialogues never trained on)
    -> m1: SFT with latents (full fine-tuning) -> tree search on the search seeds (rules judge)
    -> DPO on its pairs -> self-play of the base and the final model on the held-out seeds
    -> A/B compare (95% interval) + field-level latent accuracy and parse rate + perplexity -> report

Default: SmolLM2-135M-Instruct (about 12 minutes on 2 CPU cores). `--quick`: the same
pipeline on a tiny random model built offline with the SmolLM2 tokenizer (about a minute; CI
runs it: it checks the plumbing, not quality). The judge is the deterministic `rules:` heuristic
unless `judge=openai:...` is given: every output names the judge that produced it.
"""

from __future__ import annotations

import dataclasses
import json
import sys
from pathlib import Path

from sage_jax.loop import LoopConfig, run_loop


@dataclasses.dataclass(frozen=True)
class DemoConfig:
    quick: bool = False
    output_dir: str = "runs/demo"
    model: str | None = None  # default: smollm2 (or the tiny model with quick)
    judge: str = "rules:"
    seeds: int | None = None  # search seeds (default 4; quick 2)
    eval_seeds: int | None = None  # held-out seeds of the compare, never searched (default 8; quick 2)
    held_out_dialogues: int | None = None  # SAC dialogues never trained on (latents, perplexity; default 12; quick 4)


def tiny_model(out: Path) -> Path:
    """A tiny random Llama with SmolLM2's tokenizer and chat template, built without torch."""
    import jax
    from transformers import AutoTokenizer

    from sage_jax import model
    from sage_jax.model.smollm2 import fetch_smollm2

    if (out / "config.json").exists():
        return out
    src = fetch_smollm2()
    tok = AutoTokenizer.from_pretrained(src)
    cfg = model.ModelConfig(family="llama", vocab_size=len(tok), hidden_size=64, intermediate_size=128,
                            num_layers=2, num_heads=4, num_kv_heads=2, head_dim=16, rms_norm_eps=1e-5,
                            rope=model.RopeConfig(theta=100000.0), max_position_embeddings=2048,
                            tie_word_embeddings=True, bos_token_id=1, eos_token_id=2, pad_token_id=2)
    return model.save_hf(out, cfg, model.init_params(cfg, jax.random.key(0), std=0.5), tokenizer=tok)


def loop_config(cfg: DemoConfig, base: str, out: Path, *, sac_files: tuple[str, ...] = (),
                search_seeds: str | None = None) -> LoopConfig:
    """The demo's loop. m1 is fully fine-tuned long enough that SmolLM2 writes parseable latents in
    most turns (12 LoRA steps never did); budgets are reply tokens after the latent prefix."""
    from sage_jax.search.tree import SearchConfig
    from sage_jax.train.dpo import DPORunConfig
    from sage_jax.train.sft import SFTConfig
    from sage_jax.parallel import MeshConfig
    from sage_jax.train.steps import OptimConfig

    q = cfg.quick
    seeds = cfg.seeds or (2 if q else 4)
    mesh = MeshConfig(num_devices=1)
    sft = SFTConfig(seq_len=128 if q else 256, batch_size=4, max_steps=4 if q else 30, eval_every=2 if q else 10,
                    save_every=100, eval_fraction=0.05, mesh=mesh, tensorboard=not q, lora=None,
                    optim=OptimConfig(learning_rate=5e-2 if q else 1e-4, warmup_steps=0 if q else 3))
    search = SearchConfig(judge=cfg.judge, num_seeds=None if search_seeds else seeds, seeds=search_seeds,
                          turns=2, k=2 if q else 3, max_new_tokens=12 if q else 48,
                          user_max_new_tokens=8 if q else 24, batch_seeds=seeds,
                          layout="stacked")  # a search of a few minutes: compiling dominates
    dpo = DPORunConfig(seq_len=256 if q else 512, batch_size=2, max_steps=2 if q else 6, eval_every=0,
                       save_every=100, eval_fraction=0.25, mesh=mesh, tensorboard=not q,
                       optim=OptimConfig(learning_rate=1e-2 if q else 1e-4, warmup_steps=0))
    return LoopConfig(base_model=base, sac_files=sac_files, output_dir=str(out / "loop"), rounds=0, dpo=True,
                      sft=sft, search=search, dpo_run=dpo)


def _demo_notes(cfg: DemoConfig, base: str, result: dict, cmp: dict, seeds: dict, sac: dict, parse: dict) -> list[str]:
    rules = cmp["judge"].startswith("rules")
    return [
        f"base model: `{base}`{' (tiny random model: plumbing check, not quality)' if cfg.quick else ''}",
        f"judge (selection and evaluation): `{cmp['judge']}`" + (" — a deterministic heuristic, not an LLM" if rules else ""),
        f"seeds: {seeds['search']} searched, {seeds['held_out']} held out for the compare (split by a hash of the "
        f"text, disjoint; compare checked every dialogue against the search outputs and files)",
        f"SAC data: {sac['train']} training dialogues, {sac['held_out']} held out (never trained on) for latent "
        f"accuracy and perplexity",
        f"latent prefixes in the search: {parse['parsed']} of {parse['candidates']} candidates parsed to a state "
        f"and an action (rate {parse['rate'] if parse['rate'] is None else round(parse['rate'], 3)})",
        f"stages and lineage: `{result['lineage']}`; final model (HF format): `{result['final_model']}`",
    ]


def _caveats(cfg: DemoConfig, cmp: dict) -> list[str]:
    n = cmp["total"]
    return ["## What these numbers can and cannot show", "",
            f"- The compare has {n} held-out seeds: a win rate's 95% interval is about +-1/sqrt(n) wide, so only a "
            "very large difference could show; 'inconclusive' is the expected verdict at this scale.",
            "- The judge that chose the training pairs also judges the compare"
            + (" and `rules:` is a heuristic (question at the end, length, relevance, no repetition): a win says the "
               "model learnt its rules, not that replies are more empathetic." if cmp["judge"].startswith("rules")
               else "; give `judge=` an LLM endpoint for a judgement of quality."),
            "- Latent accuracy at or below a field's majority baseline means the field is not learnt beyond the "
            "label frequencies; the parse rate says how often a usable prefix was written at all.",
            "- Perplexity near 1 means plain-chat ability was kept on these dialogues, nothing about other tasks.",
            "- For a replication with a no-latent baseline, self-improvement rounds and 50+ held-out seeds run "
            "`python -m experiments.replicate --preset cpu` (README).", ""]


def run_demo(cfg: DemoConfig) -> Path:
    from sage_jax.data.holdout import write_sac_split, write_seed_split
    from sage_jax.data.sample import sample_path
    from sage_jax.eval.compare import CompareConfig, run_compare
    from sage_jax.eval.latent import LatentEvalConfig, evaluate_latents
    from sage_jax.eval.perplexity import PerplexityConfig, perplexity_ratios
    from sage_jax.report import latent_section, perplexity_section, search_parse_rate, write_report
    from sage_jax.search.tree import run_search

    q = cfg.quick
    out = Path(cfg.output_dir)
    out.mkdir(parents=True, exist_ok=True)
    base = cfg.model or (str(tiny_model(out / "tiny_model")) if q else "smollm2")
    seeds = write_seed_split([str(sample_path("ed_test_seeds.txt"))], search=cfg.seeds or (2 if q else 4),
                             held_out=cfg.eval_seeds or (2 if q else 8), salt="demo", out=out / "seeds")
    sac = write_sac_split([str(sample_path("ed_train_200.jsonl")), str(sample_path("esconv_train_100.jsonl"))],
                          held_out=cfg.held_out_dialogues or (4 if q else 12), salt="demo", out=out / "data")
    lc = loop_config(cfg, base, out, sac_files=(sac["files"]["train"],), search_seeds=seeds["search_file"])
    result = run_loop(lc)
    loop_dir = Path(lc.output_dir)
    stages = json.loads((loop_dir / "lineage.json").read_text())["stages"]
    models = {"m1": stages["m1"]["model"], "final": result["final_model"]}
    # Self-play on the held-out seeds (K=1: no search), the base model as the user of both: the base
    # writes plain messages, the final model its latents first.
    for name, model, branching in (("base", base, "sample"), ("final", models["final"], "latent")):
        run_search(dataclasses.replace(lc.search, model=model, user_model=base, k=1, branching=branching,
                                       seeds=seeds["held_out_file"], num_seeds=None, batch_seeds=8,
                                       output_dir=str(out / f"selfplay_{name}")))
    exclude = (str(loop_dir / "search_dpo"), seeds["search_file"], sac["files"]["train"])
    cmp = run_compare(CompareConfig(a=str(out / "selfplay_base" / "sft.jsonl"), b=str(out / "selfplay_final" / "sft.jsonl"),
                                    judge=cfg.judge, output=str(out / "compare"), exclude_seeds_from=exclude,
                                    selection_judge=cfg.judge))
    lat_cfg = LatentEvalConfig(max_dialogues=None, max_turns=2, teacher_forced=False, max_new_tokens=64,
                               batch_size=16, progress=False)
    latent = {name: evaluate_latents(spec, sac["files"]["held_out"], lat_cfg, train=sac["files"]["train"])
              for name, spec in models.items()}
    ppl = perplexity_ratios(models, base, [sac["files"]["held_out"]], PerplexityConfig(seq_len=512, progress=False))
    parse = search_parse_rate(loop_dir / "search_dpo")
    report = write_report(out, title="sage-jax demo: the SAGE loop end to end", sft_run=loop_dir / "m1",
                          dpo_run=loop_dir / "dpo", search_dir=loop_dir / "search_dpo", compare=cmp,
                          compare_labels=("base", "final"),
                          notes=_demo_notes(cfg, base, result, cmp, seeds, sac, parse),
                          sections=latent_section(latent, out) + perplexity_section(ppl, out) + _caveats(cfg, cmp))
    summary = {"report": str(report), **{k: cmp[k] for k in ("wins_a", "wins_b", "no_consensus", "total", "judge")},
               "final_win_rate_decided": cmp.get("win_rate_b_decided"), "search_parse_rate": parse["rate"],
               "latent_parse_rate": {n: r["generated"].get("parse_rate") for n, r in latent.items()},
               "perplexity_ratio": {n: r.get("ratio") for n, r in ppl["models"].items()}}
    (out / "summary.json").write_text(json.dumps(summary, indent=2) + "\n")
    print(json.dumps(summary, indent=2))
    return report


def main(argv=None) -> int:
    import argparse

    from sage_jax.config import add_config_args, config_from_args

    p = argparse.ArgumentParser(prog="sage-jax demo", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--quick", action="store_true", help="a tiny random model (about a minute)")
    add_config_args(p)
    args = p.parse_args(argv)
    cfg = config_from_args(DemoConfig, args)
    if args.quick:
        cfg = dataclasses.replace(cfg, quick=True)
    run_demo(cfg)
    return 0


if __name__ == "__main__":
    sys.exit(main())
