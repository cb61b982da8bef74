"""`sage-jax sft`, `sage-jax dpo` and `sage-jax export-hf`: YAML config + key=value overrides."""

from __future__ import annotations

import argparse
import json


def summary_without_evals(summary: dict) -> str:
    return json.dumps({k: v for k, v in summary.items() if k != "evals"}, indent=2)


def _export(args: argparse.Namespace) -> int:
    from transformers import AutoTokenizer

    from sage_jax.model import save_hf
    from sage_jax.train.trainer import load_trained

    cfg, params, tok_dir, step = load_trained(args.run_dir, args.step)
    tokenizer = AutoTokenizer.from_pretrained(tok_dir) if tok_dir.exists() else None
    out = save_hf(args.output, cfg, params, tokenizer=tokenizer)
    print(f"exported step {step} of {args.run_dir} to {out}")
    return 0


def register(sub) -> None:
    from sage_jax.config import add_config_command

    show = "sage_jax.train.cli:summary_without_evals"
    add_config_command(sub, "sft", "sage_jax.train.sft:SFTConfig:run_sft", show=show,
                       help="supervised fine-tuning on SAC data (LoRA by default)",
                       description="Fields of SFTConfig (sage_jax/train/sft.py) as key=value, e.g. "
                                   "train_files=[data.jsonl] max_steps=100 lora.rank=16 lora=null")
    add_config_command(sub, "dpo", "sage_jax.train.dpo:DPORunConfig:run_dpo", show=show,
                       help="DPO (+ftx SFT term) on preference pairs (LoRA by default)",
                       description="Fields of DPORunConfig (sage_jax/train/dpo.py) as key=value, e.g. "
                                   "train_files=[pairs.jsonl] model.path=runs/m3_hf dpo.beta=0.1")
    p = sub.add_parser("export-hf", help="export a training run's checkpoint (LoRA merged) to an HF directory")
    p.add_argument("run_dir", help="the output_dir of a sft/dpo run")
    p.add_argument("-o", "--output", required=True, help="HF directory to write")
    p.add_argument("--step", type=int, default=None, help="checkpoint step (default: latest)")
    p.set_defaults(func=_export)
