"""The paper's m1: LoRA SFT of a chat model on State-Action Chain dialogues (SAGE.md §3).

Defaults are the paper's recipe (those of SFTConfig): LoRA rank 8, alpha 16, dropout 0 on
q_proj/v_proj; AdamW lr 5e-5, cosine, no weight decay, clip 1.0; 3 epochs; global batch 256
dialogues (batch_unit=dialogues); 2048 tokens; 1% of dialogues held out. The data default is the shipped SAC sample
(200 EmpatheticDialogues dialogues) and the model the built-in SmolLM2-135M-Instruct; the paper
trained Mixtral-8x7B-Instruct-v0.1 in bf16 on its own annotated mix:

    python -m experiments.sft_m1 model.path=/models/Mixtral-8x7B-Instruct-v0.1 model.dtype=bfloat16 \
        model.param_dtype=bfloat16 model.remat=full "train_files=[data/sac_mix.jsonl]" output_dir=runs/m1
"""

from __future__ import annotations

import dataclasses

from experiments.common import experiment_main, resolve_files
from sage_jax.train.sft import SFTConfig, run_sft


@dataclasses.dataclass(frozen=True)
class Config(SFTConfig):
    train_files: tuple[str, ...] = ("sample:ed_train_200.jsonl",)
    output_dir: str = "runs/experiments/sft_m1"


def run(cfg: Config) -> dict:
    return run_sft(resolve_files(cfg))


main = experiment_main("sft_m1", Config, run, __doc__)

if __name__ == "__main__":
    raise SystemExit(main())
