"""`sage-jax sft`, `sage-jax dpo` and `sage-jax export-hf`: YAML config + key=value overrides."""

from __future__ import annotations

import dataclasses
import json


def summary_without_evals(summary: dict) -> str:
    return json.dumps({k: v for k, v in summary.items() if k != "evals"}, indent=2)


@dataclasses.dataclass(frozen=True)
class ExportConfig:
    """`sage-jax export-hf`: a training run's checkpoint (LoRA merged) as an HF directory."""

    run_dir: str | None = None  # the output_dir of a sft/dpo run (required)
    output: str | None = None  # HF directory to write (required)
    step: int | str | None = None  # a checkpoint step, best or latest (default: best.json's step if the run recorded one, else latest)


def export_hf(cfg: ExportConfig) -> int:
    from transformers import AutoTokenizer

    from sage_jax.model import save_hf
    from sage_jax.model.loader import load_run

    if not cfg.run_dir or not cfg.output:
        raise ValueError("export-hf: run_dir= (RUN_DIR) and output= (-o OUT) are required")
    model_cfg, params, tok_dir, step = load_run(cfg.run_dir, cfg.step)
    tokenizer = AutoTokenizer.from_pretrained(tok_dir) if tok_dir.exists() else None
    out = save_hf(cfg.output, model_cfg, params, tokenizer=tokenizer)
    print(f"exported step {step} of {cfg.run_dir} to {out}")
    return 0


def register(sub) -> None:
    from sage_jax.config import add_config_command

    show = "sage_jax.train.cli:summary_without_evals"
    add_config_command(sub, "sft", "sage_jax.train.sft:SFTConfig:run_sft", show=show,
                       help="supervised fine-tuning on SAC data (LoRA by default)",
                       description="Fields of SFTConfig (sage_jax/train/sft.py) as key=value, e.g. "
                                   "train_files=[data.jsonl] max_steps=100 lora.rank=16 lora=null",
                       example="model.path=smollm2 'train_files=[data/train.jsonl]' output_dir=runs/m1 "
                               "max_steps=100 lora.rank=16")
    add_config_command(sub, "dpo", "sage_jax.train.dpo:DPORunConfig:run_dpo", show=show,
                       help="DPO (+ftx SFT term) on preference pairs (LoRA by default)",
                       description="Fields of DPORunConfig (sage_jax/train/dpo.py) as key=value, e.g. "
                                   "train_files=[pairs.jsonl] model.path=runs/m3_hf dpo.beta=0.1",
                       example="model.path=runs/m3_hf 'train_files=[runs/search/pairs.jsonl]' output_dir=runs/dpo "
                               "dpo.beta=0.1")
    add_config_command(sub, "export-hf", "sage_jax.train.cli:ExportConfig:export_hf",
                       help="export a training run's checkpoint (LoRA merged) to an HF directory (default: "
                            "its best checkpoint when it recorded one, else its latest)",
                       example="runs/m1 -o runs/m1_hf step=200", positionals=["run_dir RUN_DIR"],
                       flags={"-o --output": "output OUT", "--step": "step N"})
