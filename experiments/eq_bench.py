"""EQ-Bench v2 (SAGE.md §6; scoring per shared/data/README.md) of a model or any endpoint.

    python -m experiments.eq_bench model=runs/experiments/self_improve/dpo_hf
    python -m experiments.eq_bench model=openai:my-model@http://localhost:8000/v1
"""

from __future__ import annotations

import dataclasses
from pathlib import Path

from experiments.common import experiment_main
from sage_jax.eval.eq_bench import EQBenchConfig, run_eq_bench


@dataclasses.dataclass(frozen=True)
class Config(EQBenchConfig):
    model: str = "smollm2"  # a model dir, a run dir, smollm2, or a judge spec (openai:/local:)
    output_dir: str = "runs/experiments/eq_bench"


def run(cfg: Config) -> dict:
    fields = {f.name for f in dataclasses.fields(EQBenchConfig)}
    res = run_eq_bench(cfg.model, Path(cfg.output_dir) / "answers.jsonl",
                       EQBenchConfig(**{k: getattr(cfg, k) for k in fields}))
    b = res.benchmark
    return {**res.as_dict(), "metrics": {"eq_bench": b.score, "valid": b.valid, "parseable": b.parseable}}


main = experiment_main("eq_bench", Config, run, __doc__)

if __name__ == "__main__":
    raise SystemExit(main())
