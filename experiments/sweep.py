"""Sweeps: a grid over an experiment's config, run cell by cell, sliced over jobs, tabulated.

    python -m experiments.sweep sft_m1 --grid optim.learning_rate=1e-4,5e-5 --grid lora.rank=8,16 \
        --root runs/sweeps/lr_rank max_steps=200 model.path=smollm2
    python -m experiments.sweep --grid-file sweep.yaml --slice 1/4      # job 1 of 4 (0-based)
    python -m experiments.sweep --grid-file sweep.yaml --collect        # only rebuild the table
    python -m experiments.sweep --grid-file sweep.yaml --list           # print the cells, run nothing

A grid file (every key optional except ``grid``; command-line options override it)::

    experiment: sft_m1                  # a module experiments.<name> with main(argv)
    config: base.yaml                   # the experiment's own YAML, passed as --config to every cell
    root: runs/sweeps/lr_rank           # default runs/sweeps/<experiment>
    fixed: {max_steps: 200}             # or a list of key=value strings; same for every cell
    grid:                               # the cartesian product, in this key order
      optim.learning_rate: [1.0e-4, 5.0e-5]
      lora.rank: [8, 16]
    metrics: [final_eval_loss, final_eval_latent_accuracy]

Cells are the cartesian product of the grid values in the order given (last key varies
fastest), so every host and every job derives the same list. Each cell runs
``experiments.<name>.main([--config base.yaml] + fixed + cell overrides + [output_dir=<root>/<cell>])``
where ``<cell>`` is named from its overrides (``learning_rate=1e-4__rank=8``; the last dotted
component of each key, the full key where two would clash; unsafe characters replaced, a hash
appended where names would collide or grow too long). ``--grid key=a,b`` splits on commas
outside brackets, so ``--grid "lora.targets=[q_proj,v_proj],[q_proj,k_proj,v_proj]"`` has two values.

``--slice i/n`` runs only cells ``i, i+n, i+2n, ...`` (0-based; ``--slice auto`` reads
``SWEEP_SLICE=i/n``, or ``SLURM_ARRAY_TASK_ID``/``SLURM_ARRAY_TASK_COUNT``): one slice per pod
slice or array job, together covering every cell exactly once. A cell whose
``<root>/<cell>/result.json`` exists (status done) is skipped, so a rerun after preemption or a
crash continues with the unfinished cells (and each unfinished run resumes from its checkpoints).
On a multi-host pod every host runs the same cells in the same order (the experiment is a
collective program); which cells are finished is process 0's view, broadcast to all hosts.

Finally process 0 collects every cell's result into ``<root>/results.md`` (Markdown),
``results.csv`` and ``results.jsonl``: one row per cell, the swept keys and the chosen metrics
as columns (``status`` is done / failed / pending). ``<root>/sweep.json`` records the grid and
the cells. Exit code: 0 when every cell of the slice is done, 1 if one failed, 75 when a cell
was preempted (the sweep stops there; rerun the same command).
"""

from __future__ import annotations

import argparse
import csv
import dataclasses
import hashlib
import importlib
import io
import itertools
import json
import os
import re
import subprocess
import sys
import time
import traceback
from pathlib import Path
from typing import Any, Sequence

import yaml

from experiments.common import EXIT_PREEMPTED, agree, read_result, write_json

__all__ = ["Cell", "SweepSpec", "cell_dir", "collect", "expand", "finished_cells", "main", "parse_grid_arg",
           "parse_slice", "render_table", "run_sweep", "slice_cells", "split_values", "write_tables"]

DEFAULT_METRICS = ("final_eval_loss", "final_eval_latent_accuracy", "final_train_loss", "steps")
ERROR_FILE = "error.txt"
MAX_NAME = 120


@dataclasses.dataclass(frozen=True)
class SweepSpec:
    experiment: str
    grid: dict[str, list[Any]]  # key -> values (strings from the command line, YAML values from a file)
    fixed: tuple[str, ...] = ()  # key=value overrides for every cell
    config: str | None = None  # the experiment's YAML
    root: str | None = None
    metrics: tuple[str, ...] = DEFAULT_METRICS

    @property
    def root_dir(self) -> Path:
        return Path(self.root or f"runs/sweeps/{self.experiment}")


@dataclasses.dataclass(frozen=True)
class Cell:
    index: int
    name: str
    values: dict[str, str]  # swept key -> value as written in the override
    overrides: tuple[str, ...]  # the cell's key=value overrides


# ---------------------------------------------------------------- grid expansion
def split_values(text: str) -> list[str]:
    """Split ``a,b,[c,d],{e: 1, f: 2}`` on the commas outside brackets and quotes."""
    out, cur, depth, quote = [], [], 0, None
    for ch in text:
        if quote:
            quote = None if ch == quote else quote
        elif ch in "\"'":
            quote = ch
        elif ch in "[{(":
            depth += 1
        elif ch in "]})":
            depth -= 1
        elif ch == "," and depth == 0:
            out.append("".join(cur).strip())
            cur = []
            continue
        cur.append(ch)
    out.append("".join(cur).strip())
    if any(v == "" for v in out):
        raise ValueError(f"empty value in {text!r}")
    return out


def parse_grid_arg(arg: str) -> tuple[str, list[str]]:
    """``key=v1,v2`` -> (key, [v1, v2])."""
    key, sep, values = arg.partition("=")
    if not sep or not key.strip():
        raise ValueError(f"--grid {arg!r}: expected key=v1,v2,...")
    return key.strip(), split_values(values)


def format_value(v: Any) -> str:
    """A grid value as override text (strings as given; other values as YAML flow)."""
    if isinstance(v, str):
        return v
    text = yaml.safe_dump(v, default_flow_style=True, width=10**6).strip()
    return text[:-4].strip() if text.endswith("\n...") else text.removesuffix("...").strip()


def _slug(text: str) -> str:
    s = re.sub(r"[^A-Za-z0-9._+=-]+", "-", text).strip("-.")
    return s or "x"


def _short_keys(keys: Sequence[str]) -> dict[str, str]:
    last = [k.rsplit(".", 1)[-1] for k in keys]
    return {k: (s if last.count(s) == 1 else k) for k, s in zip(keys, last)}


def _digest(text: str, n: int = 8) -> str:
    return hashlib.sha1(text.encode()).hexdigest()[:n]


def expand(spec: SweepSpec) -> list[Cell]:
    """The cells of the grid: the cartesian product in key order, deterministic names."""
    if not spec.grid:
        raise ValueError("sweep: the grid is empty (give --grid key=v1,v2 or a grid file)")
    keys = list(spec.grid)
    for k in keys:
        if not isinstance(spec.grid[k], (list, tuple)) or not spec.grid[k]:
            raise ValueError(f"sweep: grid key {k!r} needs a non-empty list of values, got {spec.grid[k]!r}")
        if k == "output_dir":
            raise ValueError("sweep: output_dir is set per cell; sweep over something else")
    short = _short_keys(keys)
    raw = []
    for combo in itertools.product(*(spec.grid[k] for k in keys)):
        values = {k: format_value(v) for k, v in zip(keys, combo)}
        overrides = tuple(f"{k}={v}" for k, v in values.items())
        name = "__".join(f"{_slug(short[k])}={_slug(v)}" for k, v in values.items())
        if len(name) > MAX_NAME:
            name = f"{name[:MAX_NAME - 9].rstrip('-_.')}-{_digest(' '.join(overrides))}"
        raw.append((values, overrides, name))
    counts: dict[str, int] = {}
    for _, _, n in raw:
        counts[n] = counts.get(n, 0) + 1
    cells = []
    for i, (values, overrides, name) in enumerate(raw):
        if counts[name] > 1:  # e.g. 1e-4 and 0.0001, or values that slug alike
            name = f"{name}-{_digest(' '.join(overrides))}"
        cells.append(Cell(i, name, values, overrides))
    if len({c.name for c in cells}) != len(cells):
        raise ValueError("sweep: duplicate cells in the grid (a value is listed twice)")
    return cells


def parse_slice(text: str | None) -> tuple[int, int] | None:
    """``i/n`` (0 <= i < n) -> (i, n); ``auto`` reads SWEEP_SLICE or SLURM array variables."""
    if text is None:
        return None
    if text == "auto":
        if os.environ.get("SWEEP_SLICE"):
            text = os.environ["SWEEP_SLICE"]
        elif os.environ.get("SLURM_ARRAY_TASK_ID") and os.environ.get("SLURM_ARRAY_TASK_COUNT"):
            text = f"{os.environ['SLURM_ARRAY_TASK_ID']}/{os.environ['SLURM_ARRAY_TASK_COUNT']}"
        else:
            return None
    m = re.fullmatch(r"\s*(\d+)\s*/\s*(\d+)\s*", text)
    if not m or not 0 <= int(m.group(1)) < int(m.group(2)):
        raise ValueError(f"--slice {text!r}: expected i/n with 0 <= i < n (e.g. 0/4)")
    return int(m.group(1)), int(m.group(2))


def slice_cells(cells: Sequence[Cell], index: int, count: int) -> list[Cell]:
    """Cells index, index+count, ...: the slices partition the cells and balance their sizes."""
    return [c for c in cells if c.index % count == index]


def cell_dir(spec: SweepSpec, cell: Cell) -> Path:
    return spec.root_dir / cell.name


def finished_cells(spec: SweepSpec, cells: Sequence[Cell]) -> list[bool]:
    """Whether each cell has a finished result, as process 0 sees it (the same on every host)."""
    from experiments.common import is_primary

    local = [read_result(cell_dir(spec, c)) is not None for c in cells] if is_primary() else [False] * len(cells)
    return [bool(x) for x in agree(local)] if cells else []


# ---------------------------------------------------------------- running
def load_experiment(name: str):
    if not re.fullmatch(r"[A-Za-z_][A-Za-z0-9_]*", name) or name in ("common", "sweep"):
        raise ValueError(f"sweep: {name!r} is not an experiment module name")
    try:
        module = importlib.import_module(f"experiments.{name}")
    except ModuleNotFoundError as e:
        if e.name == f"experiments.{name}":
            known = sorted(p.stem for p in Path(__file__).parent.glob("*.py")
                           if p.stem not in ("__init__", "common", "sweep"))
            raise ValueError(f"sweep: no experiment {name!r} (known: {', '.join(known)})") from None
        raise
    if not callable(getattr(module, "main", None)):
        raise ValueError(f"sweep: experiments.{name} has no main(argv)")
    return module


def cell_argv(spec: SweepSpec, cell: Cell) -> list[str]:
    argv = ["--config", spec.config] if spec.config else []
    return argv + list(spec.fixed) + list(cell.overrides) + [f"output_dir={cell_dir(spec, cell)}"]


def validate(spec: SweepSpec, module, cells: Sequence[Cell]) -> None:
    """Build every cell's config before running any, so a typo fails the sweep at once."""
    from sage_jax.config import load_config

    cls = getattr(module.main, "config_class", None) or getattr(module, "Config", None)
    if cls is None:
        return
    for c in cells:
        load_config(cls, spec.config, [*spec.fixed, *c.overrides, f"output_dir={cell_dir(spec, c)}"])


def _run_cell(spec: SweepSpec, module, cell: Cell, subprocess_mode: bool) -> int:
    argv = cell_argv(spec, cell)
    if subprocess_mode:
        repo = Path(__file__).resolve().parents[1]
        env = {**os.environ, "PYTHONPATH": os.pathsep.join(filter(None, [str(repo), os.environ.get("PYTHONPATH")]))}
        return subprocess.run([sys.executable, "-m", f"experiments.{spec.experiment}", *argv], env=env).returncode
    return int(module.main(argv) or 0)


def run_sweep(spec: SweepSpec, slice_: tuple[int, int] | None = None, *, subprocess_mode: bool = False,
              fail_fast: bool = False) -> dict:
    """Run the unfinished cells of this slice in order; returns {"ran", "skipped", "failed", "preempted"}."""
    from experiments.common import is_primary

    module = load_experiment(spec.experiment)
    cells = expand(spec)
    validate(spec, module, cells)
    if not subprocess_mode:  # the cells run in this process: start jax.distributed once, here
        from sage_jax import parallel

        parallel.initialize_distributed()
    mine = slice_cells(cells, *slice_) if slice_ else list(cells)
    if is_primary():
        write_manifest(spec, cells)
    done = finished_cells(spec, mine)
    report: dict[str, list[str]] = {"ran": [], "skipped": [], "failed": [], "preempted": []}
    label = f"slice {slice_[0]}/{slice_[1]}" if slice_ else "all"
    print(f"sweep {spec.experiment}: {len(cells)} cells, {len(mine)} in {label}, {sum(done)} finished",
          file=sys.stderr)
    for cell, finished in zip(mine, done):
        if finished:
            report["skipped"].append(cell.name)
            continue
        print(f"sweep: cell {cell.index} {cell.name}: {' '.join(cell.overrides)}", file=sys.stderr)
        t0 = time.time()
        try:
            code = _run_cell(spec, module, cell, subprocess_mode)
            error = None if code in (0, EXIT_PREEMPTED) else f"exit code {code}"
        except Exception:  # noqa: BLE001 - one cell's failure must not stop the others
            code, error = 1, traceback.format_exc()
        if code == EXIT_PREEMPTED:
            report["preempted"].append(cell.name)
            print(f"sweep: cell {cell.name} preempted; stopping (rerun the same command)", file=sys.stderr)
            break
        if error is not None:
            report["failed"].append(cell.name)
            print(f"sweep: cell {cell.name} failed after {time.time() - t0:.0f}s: {error.strip().splitlines()[-1]}",
                  file=sys.stderr)
            if is_primary():
                d = cell_dir(spec, cell)
                d.mkdir(parents=True, exist_ok=True)
                (d / ERROR_FILE).write_text(error, encoding="utf-8")
            if fail_fast:
                break
            continue
        report["ran"].append(cell.name)
    if is_primary():
        rows = collect(spec, cells)
        paths = write_tables(spec, rows)
        print(render_table(spec, rows))
        print(f"sweep: results in {paths['md']}, {paths['csv']}, {paths['jsonl']}", file=sys.stderr)
    return report


# ---------------------------------------------------------------- results
def write_manifest(spec: SweepSpec, cells: Sequence[Cell]) -> None:
    write_json(spec.root_dir / "sweep.json", {
        "experiment": spec.experiment, "config": spec.config, "fixed": list(spec.fixed),
        "grid": {k: [format_value(v) for v in vs] for k, vs in spec.grid.items()}, "metrics": list(spec.metrics),
        "cells": [{"index": c.index, "name": c.name, "overrides": list(c.overrides)} for c in cells]})


def _lookup(result: dict, key: str) -> Any:
    """A metric by name: result["metrics"][key], else a dotted path into result["summary"]/result."""
    if key in (result.get("metrics") or {}):
        return result["metrics"][key]
    for base in (result.get("summary") or {}, result):
        node: Any = base
        for part in key.split("."):
            if not isinstance(node, dict) or part not in node:
                node = None
                break
            node = node[part]
        if node is not None:
            return node
    return None


def collect(spec: SweepSpec, cells: Sequence[Cell] | None = None) -> list[dict]:
    """One row per cell: cell name, swept values, status, the chosen metrics."""
    rows = []
    for c in cells if cells is not None else expand(spec):
        d = cell_dir(spec, c)
        result = read_result(d)
        status = "done" if result else "failed" if (d / ERROR_FILE).exists() else "pending"
        row: dict[str, Any] = {"cell": c.name, **c.values, "status": status}
        for m in spec.metrics:
            row[m] = _lookup(result, m) if result else None
        rows.append(row)
    return rows


def _columns(spec: SweepSpec) -> list[str]:
    return ["cell", *spec.grid, "status", *spec.metrics]


def _fmt(v: Any) -> str:
    if v is None:
        return ""
    if isinstance(v, float):
        return f"{v:.6g}"
    if isinstance(v, (dict, list)):
        return json.dumps(v)
    return str(v)


def render_table(spec: SweepSpec, rows: Sequence[dict]) -> str:
    """A Markdown table (swept keys and metrics as columns)."""
    cols = _columns(spec)
    esc = lambda s: s.replace("|", "\\|")  # noqa: E731
    lines = ["| " + " | ".join(cols) + " |", "|" + "|".join("---" for _ in cols) + "|"]
    lines += ["| " + " | ".join(esc(_fmt(r.get(c))) for c in cols) + " |" for r in rows]
    return "\n".join(lines)


def write_tables(spec: SweepSpec, rows: Sequence[dict]) -> dict[str, Path]:
    root = spec.root_dir
    root.mkdir(parents=True, exist_ok=True)
    cols = _columns(spec)
    paths = {"md": root / "results.md", "csv": root / "results.csv", "jsonl": root / "results.jsonl"}
    title = f"# sweep {spec.experiment}\n\n{len(rows)} cells; fixed: {' '.join(spec.fixed) or '-'}\n\n"
    _atomic_text(paths["md"], title + render_table(spec, rows) + "\n")
    buf = io.StringIO()
    w = csv.DictWriter(buf, fieldnames=cols, extrasaction="ignore", lineterminator="\n")
    w.writeheader()
    for r in rows:
        w.writerow({c: _fmt(r.get(c)) for c in cols})
    _atomic_text(paths["csv"], buf.getvalue())
    _atomic_text(paths["jsonl"], "".join(json.dumps(r, default=str) + "\n" for r in rows))
    return paths


def _atomic_text(path: Path, text: str) -> None:
    tmp = path.with_name(f".{path.name}.tmp{os.getpid()}")
    tmp.write_text(text, encoding="utf-8")
    os.replace(tmp, path)


# ---------------------------------------------------------------- command line
def load_spec(args: argparse.Namespace) -> SweepSpec:
    data: dict[str, Any] = {}
    if args.grid_file:
        with open(args.grid_file, encoding="utf-8") as f:
            data = yaml.safe_load(f) or {}
        if not isinstance(data, dict):
            raise ValueError(f"{args.grid_file}: expected a mapping with a 'grid' key")
        unknown = set(data) - {"experiment", "config", "root", "fixed", "grid", "metrics"}
        if unknown:
            raise ValueError(f"{args.grid_file}: unknown keys {sorted(unknown)}")
    grid = dict(data.get("grid") or {})
    for g in args.grid or ():
        k, vs = parse_grid_arg(g)
        grid[k] = vs
    fixed = data.get("fixed") or []
    if isinstance(fixed, dict):
        fixed = [f"{k}={format_value(v)}" for k, v in fixed.items()]
    fixed = [*fixed, *args.overrides]
    experiment = args.experiment or data.get("experiment")
    if not experiment:
        raise ValueError("sweep: name the experiment (first argument, or 'experiment:' in the grid file)")
    metrics = args.metrics.split(",") if args.metrics else data.get("metrics") or DEFAULT_METRICS
    return SweepSpec(experiment=experiment, grid=grid, fixed=tuple(fixed), config=args.config or data.get("config"),
                     root=args.root or data.get("root"), metrics=tuple(metrics))


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m experiments.sweep", description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter,
                                epilog="See the module docstring of experiments/sweep.py for the grid file format.")
    p.add_argument("experiment", nargs="?", help="experiment module (experiments.<name>)")
    p.add_argument("overrides", nargs="*", metavar="KEY=VALUE", help="fixed overrides for every cell")
    p.add_argument("--grid-file", help="YAML: experiment, config, root, fixed, grid, metrics")
    p.add_argument("--grid", action="append", metavar="KEY=V1,V2", help="a swept key (repeat for more)")
    p.add_argument("--config", help="the experiment's YAML config, for every cell")
    p.add_argument("--root", help="sweep directory (default runs/sweeps/<experiment>)")
    p.add_argument("--slice", help="i/n: run only cells i, i+n, ... (0-based); 'auto' reads SWEEP_SLICE")
    p.add_argument("--metrics", help="comma-separated metric columns (default: %s)" % ",".join(DEFAULT_METRICS))
    p.add_argument("--list", action="store_true", help="print the cells (of the slice) and exit")
    p.add_argument("--collect", action="store_true", help="only (re)write the results table")
    p.add_argument("--subprocess", action="store_true",
                   help="run each cell as `python -m experiments.<name>` (single host only)")
    p.add_argument("--fail-fast", action="store_true", help="stop at the first failed cell")
    return p


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_intermixed_args(argv)
    if args.experiment and "=" in args.experiment:  # no experiment named: it was an override
        args.overrides = [args.experiment, *args.overrides]
        args.experiment = None
    try:
        spec = load_spec(args)
        slice_ = parse_slice(args.slice)
        cells = expand(spec)
    except (OSError, ValueError, yaml.YAMLError) as e:
        parser.error(str(e))
    if args.list:
        for c in slice_cells(cells, *slice_) if slice_ else cells:
            print(f"{c.index}\t{cell_dir(spec, c)}\t{' '.join(c.overrides)}")
        return 0
    if args.collect:
        rows = collect(spec, cells)
        paths = write_tables(spec, rows)
        print(render_table(spec, rows))
        print(f"sweep: results in {paths['md']}", file=sys.stderr)
        return 0
    from sage_jax.config import ConfigError

    try:
        report = run_sweep(spec, slice_, subprocess_mode=args.subprocess, fail_fast=args.fail_fast)
    except (ConfigError, ValueError) as e:
        print(f"sweep: {e}", file=sys.stderr)
        return 2
    if report["preempted"]:
        return EXIT_PREEMPTED
    return 1 if report["failed"] else 0


if __name__ == "__main__":
    raise SystemExit(main())
