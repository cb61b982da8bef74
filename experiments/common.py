"""What every experiment module shares: the command line, the config, the result file, the metrics.

An experiment is a module ``experiments/<name>.py`` of about twenty lines::

    @dataclasses.dataclass(frozen=True)
    class Config(SFTConfig):                          # typed, the paper's defaults, has output_dir
        train_files: tuple[str, ...] = ("sample:ed_train_200.jsonl",)
        output_dir: str = "runs/experiments/sft_m1"

    def run(cfg: Config) -> dict:                     # does the work, returns a JSON-able summary
        return run_sft(resolve_files(cfg))

    main = experiment_main("sft_m1", Config, run, __doc__)

    if __name__ == "__main__":
        raise SystemExit(main())

``python -m experiments.<name> [--config run.yaml] key=value ...`` then builds the config
(defaults <- YAML <- overrides, :func:`sage_jax.config.load_config`), writes the resolved
``<output_dir>/config.yaml``, calls ``run`` and writes ``<output_dir>/result.json``::

    {"experiment", "status": "done", "output_dir", "overrides", "config", "summary",
     "metrics": {"steps", "final_eval_loss", "final_eval_latent_accuracy", "final_train_loss", ...},
     "elapsed_s", "finished", "process_count", "jax_version"}

``metrics`` is flat (what :mod:`experiments.sweep` tabulates): ``summary["metrics"]`` if ``run``
returns one, plus what :func:`summary_metrics` derives from a training summary (``steps``,
``first_eval_*``/``final_eval_*`` from ``summary["evals"]``, ``final_train_*`` from the last
line of ``summary["metrics"]``'s JSONL file).

Rules every experiment keeps (multi-host pods run ``main`` on every host):
- The config must have an ``output_dir: str`` field (sweeps set it per cell).
- Only process 0 writes result/config files (atomically); every host decides the same way:
  the "already finished" check is process 0's answer broadcast to all hosts.
- ``result.json`` is written only when the run finished. A preempted run (``summary["preempted"]``)
  exits with :data:`EXIT_PREEMPTED` (75) and no result, so rerunning the same command resumes
  from its checkpoints; a run whose ``result.json`` holds the same config is not rerun.
- Paths ``sample:NAME`` in string fields name files shipped in :mod:`sage_jax.data.sample`
  (:func:`resolve_files`), so defaults run offline out of the box.

Exit codes of ``main``: 0 done (or already done), 2 bad arguments/config, 75 preempted; an
exception in ``run`` propagates (Python exits 1).
"""

from __future__ import annotations

import argparse
import dataclasses
import datetime
import json
import math
import os
import sys
import time
from pathlib import Path
from typing import Any, Callable, Mapping

import numpy as np

from sage_jax import compile_cache

__all__ = [
    "CONFIG_FILE", "EXIT_PREEMPTED", "RESULT_FILE", "agree", "experiment_main", "is_primary", "read_result",
    "resolve_files", "summary_metrics", "write_json",
]

RESULT_FILE = "result.json"
CONFIG_FILE = "config.yaml"
EXIT_PREEMPTED = 75  # EX_TEMPFAIL: rerun the same command to resume
SAMPLE_PREFIX = "sample:"


# ---------------------------------------------------------------- multi-host helpers
def is_primary() -> bool:
    """True on process 0 (the one that writes shared files)."""
    import jax

    return jax.process_index() == 0


def agree(values: Any) -> np.ndarray:
    """Process 0's ``values`` (bool/int array-like) on every host, so all hosts decide the same way."""
    import jax

    arr = np.asarray(values, dtype=np.int32)
    if jax.process_count() == 1:
        return arr
    from jax.experimental import multihost_utils

    return np.asarray(multihost_utils.broadcast_one_to_all(arr))


def write_json(path: str | os.PathLike, obj: Any) -> None:
    """Atomic JSON write (tmp file + rename); values JSON can't hold are written as strings."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp{os.getpid()}")
    tmp.write_text(json.dumps(obj, indent=2, default=str) + "\n", encoding="utf-8")
    os.replace(tmp, path)


def read_result(output_dir: str | os.PathLike) -> dict | None:
    """The finished result of a run directory, or None (missing, unreadable or not done)."""
    try:
        res = json.loads((Path(output_dir) / RESULT_FILE).read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None
    return res if isinstance(res, dict) and res.get("status") == "done" else None


# ---------------------------------------------------------------- configs
def _resolve(value: Any) -> Any:
    if isinstance(value, str) and value.startswith(SAMPLE_PREFIX):
        from sage_jax.data.sample import sample_path

        return str(sample_path(value[len(SAMPLE_PREFIX):]))
    if isinstance(value, tuple):
        return tuple(_resolve(v) for v in value)
    if isinstance(value, list):
        return [_resolve(v) for v in value]
    return value


def resolve_files(cfg):
    """``cfg`` with every ``sample:NAME`` in its top-level string/tuple fields replaced by the path
    of the shipped sample file (``sage_jax.data.sample.sample_path``)."""
    changes = {f.name: _resolve(getattr(cfg, f.name)) for f in dataclasses.fields(cfg) if f.init}
    changes = {k: v for k, v in changes.items() if v != getattr(cfg, k)}
    return dataclasses.replace(cfg, **changes) if changes else cfg


# ---------------------------------------------------------------- metrics
def _number(v: Any) -> float | int | None:
    if isinstance(v, bool) or not isinstance(v, (int, float, np.integer, np.floating)):
        return None
    v = v.item() if isinstance(v, (np.integer, np.floating)) else v
    return v if isinstance(v, int) or math.isfinite(v) else None


def _last_train_record(path: str | os.PathLike) -> dict | None:
    try:
        lines = Path(path).read_text(encoding="utf-8").splitlines()
    except OSError:
        return None
    for line in reversed(lines):
        try:
            rec = json.loads(line)
        except ValueError:
            continue
        if isinstance(rec, dict) and "loss" in rec:
            return rec
    return None


def summary_metrics(summary: Mapping[str, Any]) -> dict[str, Any]:
    """Flat metrics of a training summary (``run_sft``/``run_dpo``): ``steps``, ``preempted``,
    ``first_eval_<k>``/``final_eval_<k>`` for each number of the first/last eval, and
    ``final_train_<k>`` from the last training line of the metrics JSONL."""
    out: dict[str, Any] = {}
    for k in ("steps", "preempted"):
        if k in summary:
            out[k] = summary[k]
    evals = [e for e in summary.get("evals") or [] if isinstance(e, Mapping)]
    for prefix, ev in (("first_eval", evals[0] if evals else None), ("final_eval", evals[-1] if evals else None)):
        for k, v in (ev or {}).items():
            if k != "step" and (n := _number(v)) is not None:
                out[f"{prefix}_{k}"] = n
    if evals:
        out["final_eval_step"] = evals[-1].get("step")
    if isinstance(summary.get("metrics"), str) and (rec := _last_train_record(summary["metrics"])):
        for k in ("loss", "accuracy", "grad_norm", "tokens_per_s", "mfu"):
            if (n := _number(rec.get(k))) is not None:
                out[f"final_train_{k}"] = n
    if isinstance(summary.get("metrics"), Mapping):  # an experiment's own flat metrics win
        out.update(summary["metrics"])
    return out


# ---------------------------------------------------------------- main
def _parser(name: str, cls: type, doc: str | None) -> argparse.ArgumentParser:
    from sage_jax.config import add_config_args

    p = argparse.ArgumentParser(
        prog=f"python -m experiments.{name}", formatter_class=argparse.RawDescriptionHelpFormatter,
        description=(doc or cls.__doc__ or "").strip(),
        epilog=f"Overrides are fields of {cls.__name__} (dotted for nested ones); the result goes to "
               f"<output_dir>/{RESULT_FILE}.")
    add_config_args(p)
    p.add_argument("--print-config", action="store_true", help="print the resolved config (YAML) and exit")
    p.add_argument("--force", action="store_true", help="run even if output_dir holds a finished result")
    return p


def experiment_main(name: str, cls: type, run: Callable[[Any], Mapping[str, Any]],
                    doc: str | None = None) -> Callable[[list[str] | None], int]:
    """The ``main(argv=None) -> exit code`` of an experiment (see the module docstring).

    The returned function carries ``config_class`` and ``experiment`` attributes (the sweep
    validates its cells against ``config_class`` before running any)."""
    if not dataclasses.is_dataclass(cls) or "output_dir" not in {f.name for f in dataclasses.fields(cls)}:
        raise TypeError(f"experiment {name}: {cls.__name__} must be a dataclass with an output_dir field")

    def main(argv: list[str] | None = None) -> int:
        import jax

        from sage_jax import parallel
        from sage_jax.config import ConfigError, config_from_args, to_dict, to_yaml

        parser = _parser(name, cls, doc)
        args = parser.parse_intermixed_args(argv)
        try:
            cfg = config_from_args(cls, args)
        except ConfigError as e:
            print(f"experiments.{name}: {e}", file=sys.stderr)
            return 2
        if args.print_config:
            print(to_yaml(cfg), end="")
            return 0
        compile_cache.enable()
        parallel.initialize_distributed()  # a no-op on one process; needed before agree()
        out = Path(cfg.output_dir)
        config = to_dict(cfg)
        previous = read_result(out) if is_primary() else None
        same = previous is not None and previous.get("config") == json.loads(json.dumps(config, default=str))
        if not args.force and bool(agree(same)):
            print(f"experiments.{name}: {out}/{RESULT_FILE} already holds this config's finished result "
                  f"(--force reruns)", file=sys.stderr)
            return 0
        if is_primary():
            out.mkdir(parents=True, exist_ok=True)
            (out / CONFIG_FILE).write_text(to_yaml(cfg), encoding="utf-8")
        t0 = time.time()
        summary = dict(run(cfg))
        status = "preempted" if summary.get("preempted") else "done"
        result = {
            "experiment": name, "status": status, "output_dir": str(out), "overrides": list(args.overrides or ()),
            "config_file": args.config, "config": config, "summary": summary, "metrics": summary_metrics(summary),
            "elapsed_s": round(time.time() - t0, 3),
            "finished": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
            "process_count": jax.process_count(), "jax_version": jax.__version__,
        }
        if status == "done" and is_primary():
            write_json(out / RESULT_FILE, result)
        if is_primary():
            print(json.dumps({k: result[k] for k in ("experiment", "status", "output_dir", "metrics")}, indent=2,
                             default=str))
        if status != "done":
            print(f"experiments.{name}: preempted at step {summary.get('steps')}; rerun the same command to "
                  f"resume from {out}", file=sys.stderr)
            return EXIT_PREEMPTED
        return 0

    main.config_class = cls  # type: ignore[attr-defined]
    main.experiment = name  # type: ignore[attr-defined]
    return main
