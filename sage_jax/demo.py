"""`sage-jax demo`: the whole SAGE loop, offline, on CPU, on the shipped sample.

    SAC SFT (LoRA) -> tree search on a few seeds (rules judge) -> DPO on its pairs
    -> self-play of the base and the final model from the same seeds -> A/B compare -> report

Default: SmolLM2-135M-Instruct (about ten minutes on 2 CPU cores). `--quick`: the same pipeline on
a tiny random model built offline with the SmolLM2 tokenizer (about a minute; CI runs it: it
checks the plumbing, not quality). The judge is the deterministic `rules:` heuristic unless
`judge=openai:...` is given: every output names the judge that produced it.
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
    seeds: int | None = None  # rollout seeds for search and compare (default 4; quick 2)


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


def loop_config(cfg: DemoConfig, base: str, out: Path) -> LoopConfig:
    from sage_jax.search.tree import SearchConfig
    from sage_jax.train.dpo import DPORunConfig
    from sage_jax.train.sft import SFTConfig
    from sage_jax.parallel import MeshConfig
    from sage_jax.train.steps import OptimConfig

    q = cfg.quick
    seeds = cfg.seeds or (2 if q else 4)
    mesh = MeshConfig(num_devices=1)
    sft = SFTConfig(seq_len=128 if q else 256, batch_size=4, max_steps=4 if q else 12, eval_every=2 if q else 4,
                    save_every=100, eval_fraction=0.05, mesh=mesh, tensorboard=not q,
                    optim=OptimConfig(learning_rate=5e-2 if q else 3e-4, warmup_steps=0 if q else 2))
    search = SearchConfig(judge=cfg.judge, num_seeds=seeds, turns=2, k=2 if q else 3,
                          max_new_tokens=12 if q else 48, user_max_new_tokens=8 if q else 24, batch_seeds=seeds)
    dpo = DPORunConfig(seq_len=256 if q else 512, batch_size=2, max_steps=2 if q else 6, eval_every=0,
                       save_every=100, eval_fraction=0.25, mesh=mesh, tensorboard=not q,
                       optim=OptimConfig(learning_rate=1e-2 if q else 1e-4, warmup_steps=0))
    return LoopConfig(base_model=base, output_dir=str(out / "loop"), rounds=0, dpo=True, sft=sft, search=search,
                      dpo_run=dpo)


def run_demo(cfg: DemoConfig) -> Path:
    from sage_jax.eval.compare import CompareConfig, run_compare
    from sage_jax.report import write_report
    from sage_jax.search.tree import run_search

    out = Path(cfg.output_dir)
    out.mkdir(parents=True, exist_ok=True)
    base = cfg.model or (str(tiny_model(out / "tiny_model")) if cfg.quick else "smollm2")
    lc = loop_config(cfg, base, out)
    result = run_loop(lc)
    # Self-play of the base and the final model from the same seeds (K=1: no search), then A/B.
    selfplay = dataclasses.replace(lc.search, k=1)
    for name, model in (("base", base), ("final", str(Path(lc.output_dir) / "dpo"))):
        run_search(dataclasses.replace(selfplay, model=model, output_dir=str(out / f"selfplay_{name}")))
    cmp = run_compare(CompareConfig(a=str(out / "selfplay_final" / "sft.jsonl"), b=str(out / "selfplay_base" / "sft.jsonl"),
                                    judge=cfg.judge, output=str(out / "compare")))
    loop_dir = Path(lc.output_dir)
    notes = [f"base model: `{base}`{' (tiny random model: plumbing check, not quality)' if cfg.quick else ''}",
             f"judge: `{cmp['judge']}`" + (" — a deterministic heuristic, not an LLM" if cmp["judge"].startswith("rules") else ""),
             f"stages and lineage: `{result['lineage']}`; final model (HF format): `{result['final_model']}`"]
    report = write_report(out, title="sage-jax demo: the SAGE loop end to end", sft_run=loop_dir / "m1",
                          dpo_run=loop_dir / "dpo", search_dir=loop_dir / "search_dpo", compare=cmp,
                          compare_labels=("final", "base"), notes=notes)
    print(json.dumps({"report": str(report), **cmp}, indent=2))
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
