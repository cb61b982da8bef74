"""Held-out splits written to disk, for evaluations that can be trusted (issue 12): seeds that are
never searched, SAC dialogues that are never trained on.

    seeds = write_seed_split(["seeds.txt"], search=6, held_out=50, salt="demo", out=Path("run/seeds"))
    sac = write_sac_split(["ed.jsonl"], held_out=30, salt="demo", out=Path("run/data"))

Both split by a hash of the text (seeds) or the dialogue id (SAC) with :func:`split_seeds`, so
a split never depends on file order, and both check the sides are disjoint. `sage-jax demo` and
`experiments/replicate.py` use them.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Sequence

from sage_jax.data.jsonl import read_sac
from sage_jax.data.readers.seeds import read_seeds
from sage_jax.data.split import normalise_seed, split_seeds
from sage_jax.sac import Turn, dialogue_to_json

__all__ = ["strip_dialogue", "write_sac_split", "write_seed_split"]


def write_seed_split(files: Sequence[str], *, search: int, held_out: int, salt: str, out: Path) -> dict:
    """out/search.txt (``search`` seeds) and out/held_out.txt (up to ``held_out``, disjoint by
    normalised text) from the distinct seeds of ``files``. ``notes``: what fell short."""
    pool, seen = [], set()
    for f in files:
        for s in read_seeds(f):
            n = normalise_seed(s)
            if n and n not in seen:  # one copy of each text (duplicates could not be split apart anyway)
                seen.add(n)
                pool.append(n)
    if search < 1 or held_out < 1:
        raise ValueError("seed split: the search and held-out counts must be >= 1")
    held_n = min(held_out, len(pool) - search)
    if held_n < 1:
        raise ValueError(f"seed split: {len(pool)} distinct seeds in {', '.join(map(str, files))}: too few for "
                         f"{search} search seeds and any held-out seed")
    notes = []
    if held_n < held_out:
        notes.append(f"only {len(pool)} distinct seeds in {', '.join(map(str, files))}: {held_n} held out "
                     f"instead of {held_out}")
    rest, held = split_seeds(pool, held_out_count=held_n, salt=salt + ":seeds")
    searched = rest[:search]
    if {normalise_seed(s) for s in searched} & {normalise_seed(s) for s in held}:
        raise AssertionError("seed split: a seed is both searched and held out")
    out.mkdir(parents=True, exist_ok=True)
    (out / "search.txt").write_text("".join(s + "\n" for s in searched), encoding="utf-8")
    (out / "held_out.txt").write_text("".join(s + "\n" for s in held), encoding="utf-8")
    return {"files": [str(f) for f in files], "pool": len(pool), "search": len(searched), "held_out": len(held),
            "search_file": str(out / "search.txt"), "held_out_file": str(out / "held_out.txt"), "disjoint": True,
            "notes": notes}


def strip_dialogue(d):
    """The dialogue with every latent removed (texts, system and meta kept)."""
    return d.replace(turns=tuple(Turn(t.role, t.text) for t in d.turns), meta={**d.meta, "latents": "stripped"})


def write_sac_split(files: Sequence[str], *, held_out: int, salt: str, out: Path, plain: bool = False,
                    log=None) -> dict:
    """out/sac_train.jsonl and out/sac_held_out.jsonl (``held_out`` dialogues chosen by a hash of
    the id), plus out/sac_train_plain.jsonl (every latent removed) with ``plain``."""
    dialogues = []
    for f in files:
        ds, report = read_sac(f)
        if report.skipped and log is not None:
            log(report.summary(3))
        dialogues += ds
    ids = [d.id for d in dialogues]
    if len(set(ids)) != len(ids):
        raise ValueError(f"SAC split: duplicate dialogue ids in {', '.join(map(str, files))} (the split is by id)")
    if not 0 < held_out < len(dialogues):
        raise ValueError(f"SAC split: the held-out count must be in 1..{len(dialogues) - 1}, got {held_out}")
    _, held_ids = split_seeds(ids, held_out_count=held_out, salt=salt + ":sac")
    held_ids = set(held_ids)
    train = [d for d in dialogues if d.id not in held_ids]
    held = [d for d in dialogues if d.id in held_ids]
    out.mkdir(parents=True, exist_ok=True)

    def write(name, ds):
        (out / name).write_text("".join(json.dumps(dialogue_to_json(x), ensure_ascii=False) + "\n" for x in ds),
                                encoding="utf-8")
        return str(out / name)

    written = {"train": write("sac_train.jsonl", train), "held_out": write("sac_held_out.jsonl", held)}
    if plain:
        written["train_plain"] = write("sac_train_plain.jsonl", [strip_dialogue(x) for x in train])
    return {"files": written, "sources": [str(f) for f in files], "train": len(train), "held_out": len(held),
            "disjoint": not ({x.id for x in train} & held_ids)}
