"""Multi-host search: each process searches its share of the seeds into its own output shard
files; after a barrier, process 0 merges the shards into the usual files.

- Work split: the batches of unfinished seeds (`batch_seeds` each, in seed order, exactly as one
  process would form them) are dealt round-robin: process p takes batches p, p + n, p + 2n, ...
  A batch is searched with the same seed offset as on one process, so each dialogue comes out as
  it would on one process; no seed is searched by two processes.
- Files: process p of n (n > 1) appends to `<kind>.p<p>.jsonl` (trees, sft, trajectories, pairs);
  one process writes `<kind>.jsonl` directly, as before. `trees/<id>.html` is per seed anyway.
- Merge (process 0, after every process finished): the shard records not yet in `<kind>.jsonl` are
  appended to it in seed order (a seed's own records keep their order), then the shards are
  removed. A run killed before or during the merge leaves shards behind: they count as finished
  seeds on restart (resume skips them) and the next run's merge picks them up; records already
  merged are never appended twice.
"""

from __future__ import annotations

import json
import os
import re
from pathlib import Path
from typing import Sequence, TypeVar

import jax

from sage_jax.data.jsonl import _repair_tail, done_ids, read_records
from sage_jax.data.split import normalise_seed

KINDS = ("trees", "sft", "trajectories", "pairs")
T = TypeVar("T")


def process_info() -> tuple[int, int]:
    return jax.process_index(), jax.process_count()


def file_name(kind: str, process: int | None = None, count: int | None = None) -> str:
    """`trees.jsonl` on one process, `trees.p<p>.jsonl` for process p of several."""
    p, n = process_info()
    p = p if process is None else process
    n = n if count is None else count
    return f"{kind}.jsonl" if n == 1 else f"{kind}.p{p}.jsonl"


def shard_files(out: Path, kind: str) -> list[Path]:
    pat = re.compile(rf"^{re.escape(kind)}\.p(\d+)\.jsonl$")
    found = [(int(m.group(1)), f) for f in Path(out).glob(f"{kind}.p*.jsonl") if (m := pat.match(f.name))]
    return [f for _, f in sorted(found)]


def finished_ids(out: Path) -> set[str]:
    """Seeds with a tree in `trees.jsonl` or in any process's `trees.p<p>.jsonl`."""
    ids = done_ids(Path(out) / "trees.jsonl")
    for f in shard_files(out, "trees"):
        ids |= done_ids(f)
    return ids


def finished_seed_texts(out: Path) -> set[str]:
    """Normalised seed texts of every finished tree (main file and shards): how a run whose ids
    were positions in the seed file (before content ids) is resumed without searching again."""
    texts = set()
    for f in [Path(out) / "trees.jsonl", *shard_files(out, "trees")]:
        if f.exists():
            for rec in read_records(f).values():
                if isinstance(rec, dict) and rec.get("seed") is not None:
                    texts.add(normalise_seed(rec["seed"]))
    return texts


def _groups(out: Path) -> list[str]:
    """File-name suffixes of the output groups: "" (the main files) and ".p<p>" per shard set."""
    pat = re.compile(rf"^(?:{'|'.join(KINDS)})(\.p\d+)\.jsonl$")
    found = {m.group(1) for f in Path(out).glob("*.p*.jsonl") if (m := pat.match(f.name))}
    return [""] + sorted(found)


def reconcile(out: Path) -> dict[str, int]:
    """Make every output group hold exactly its finished seeds, once.

    A seed's tree line is written last, so it marks the seed finished; a kill before it leaves
    that seed's sft/trajectory/pair lines behind. Here (at start, before any work) those lines,
    and any repeated record, are dropped, each file rewritten atomically (temp file + rename) when
    it changes; the seed is then searched again and written once. Returns lines dropped per file."""
    out = Path(out)
    dropped = {}
    for g in _groups(out):
        trees = out / f"trees{g}.jsonl"
        if trees.exists():
            _repair_tail(trees)
        finished = {rid for rid, _ in _lines(trees)} if trees.exists() else set()
        for kind in KINDS:
            path = out / f"{kind}{g}.jsonl"
            if not path.exists():
                continue
            _repair_tail(path)
            lines, seen, keep = _lines(path), set(), []
            for rid, line in lines:
                if _seed_of(rid) in finished and rid not in seen:
                    seen.add(rid)
                    keep.append(line)
            if len(keep) != len(lines) or path.stat().st_size != sum(map(len, keep)):
                tmp = path.with_name(f".{path.name}.tmp")
                tmp.write_bytes(b"".join(keep))
                os.replace(tmp, path)
                dropped[path.name] = len(lines) - len(keep)
    return dropped


def my_batches(todo: Sequence[T], batch_seeds: int, process: int | None = None,
               count: int | None = None) -> list[tuple[int, list[T]]]:
    """(offset, batch) pairs this process searches: every n-th batch of `todo`, starting at its index."""
    p, n = process_info()
    p = p if process is None else process
    n = n if count is None else count
    batches = [(b, list(todo[b: b + batch_seeds])) for b in range(0, len(todo), batch_seeds)]
    return batches[p::n]


def barrier(name: str) -> None:
    """Wait for every process (a no-op on one)."""
    if jax.process_count() > 1:
        from jax.experimental import multihost_utils

        multihost_utils.sync_global_devices(name)


def _seed_of(record_id: str) -> str:
    return str(record_id).split(":", 1)[0]  # pairs: "<seed>:t<turn>:r<j>"


def _lines(path: Path) -> list[tuple[str, bytes]]:
    out = []
    with open(path, "rb") as f:
        for line in f:
            if not line.strip():
                continue
            try:
                rid = json.loads(line)["id"]
            except (ValueError, KeyError, TypeError):
                continue  # a torn last line of a killed process: that seed is searched again
            out.append((str(rid), line if line.endswith(b"\n") else line + b"\n"))
    return out


def merge(out: Path, kinds: Sequence[str] = KINDS, seed_order: Sequence[str] = ()) -> dict[str, int]:
    """Append every shard's records not yet in `<kind>.jsonl` to it in seed order (``seed_order``: the
    seed ids in the seed file's order; ids not in it go last, by id); remove the shards.

    Trees go last, so a crash mid-merge leaves a seed either still in a shard or fully merged
    (its tree is what marks it finished).
    """
    out = Path(out)
    counts = {}
    order = [k for k in kinds if k != "trees"] + [k for k in kinds if k == "trees"]
    shards = {k: shard_files(out, k) for k in order}
    for kind in order:
        if not shards[kind]:
            continue
        main = out / f"{kind}.jsonl"
        have = set()
        if main.exists():
            _repair_tail(main)
            have = done_ids(main)
        records = [r for f in shards[kind] for r in _lines(f)]
        # seed order, then each seed's records in their written order (a stable sort)
        rank = {sid: i for i, sid in enumerate(seed_order)}
        records = sorted(enumerate(records),
                         key=lambda ir: (rank.get(_seed_of(ir[1][0]), len(rank)), _seed_of(ir[1][0]), ir[0]))
        new = [line for _, (rid, line) in records if rid not in have]
        with open(main, "ab") as f:
            f.writelines(new)
        counts[kind] = len(new)
    for kind in order:
        for f in shards[kind]:
            f.unlink()
    return counts


def finish(out: Path, seed_order: Sequence[str] = ()) -> dict[str, int]:
    """After a (possibly multi-process) search: barrier, then process 0 merges any shards; barrier."""
    barrier("sage_jax.search.done")
    counts = {}
    if jax.process_index() == 0:
        counts = merge(out, seed_order=seed_order)
    barrier("sage_jax.search.merged")
    return counts
