"""Rollout seeds: one user opening per line (EmpatheticDialogues ``test_sent.tsv`` situations).

Each non-blank line is one seed, stripped; in a tab-separated file the first column is the seed.
Blank lines are not seeds and are counted in the report's ``blank`` (nothing vanishes silently).
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path

from sage_jax.data.jsonl import RecordError

__all__ = ["read_seeds", "SeedFile"]


@dataclass(frozen=True)
class SeedFile:
    seeds: tuple[str, ...]
    blank: int  # blank lines skipped


def read_seeds(path: str | os.PathLike, *, limit: int | None = None, with_report: bool = False
               ) -> list[str] | SeedFile:
    """The seeds of a file (first ``limit``); ``with_report=True`` also returns the blank-line count."""
    path, seeds, blank = Path(path), [], 0
    with open(path, "rb") as f:
        for line_no, raw in enumerate(f, 1):
            try:
                text = raw.decode("utf-8-sig" if line_no == 1 else "utf-8")
            except UnicodeDecodeError as e:
                raise RecordError(path, line_no, "<bytes>", f"not UTF-8 at byte {e.start}") from None
            seed = text.split("\t", 1)[0].strip()
            if not seed:
                blank += 1
                continue
            seeds.append(seed)
            if limit is not None and len(seeds) >= limit:
                break
    return SeedFile(tuple(seeds), blank) if with_report else seeds
