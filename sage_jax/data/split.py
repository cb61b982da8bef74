"""Seed splits for trustworthy evaluation: which seeds may be searched/trained on, which are held out.

    from sage_jax.data.split import split_seeds
    search, held_out = split_seeds(read_seeds("seeds.txt"), held_out_count=50, salt="ed")

A seed's side is decided by a hash of its normalised text (:func:`normalise_seed`) and ``salt``,
never by its id or its position in the file: the same seed text lands on the same side whatever
order the lines come in, whatever ids a run gives them, and duplicates (up to whitespace) can
never be on both sides.

* ``held_out_fraction=f``: a seed is held out when its hash, read as a number in [0, 1), is below
  ``f``. Each seed is decided on its own, so adding seeds to the file never moves an existing seed
  to the other side; the held-out count is about ``f * n`` (not exact).
* ``held_out_count=n``: the ``n`` distinct seed texts with the smallest hashes are held out
  (exactly ``n`` distinct texts when there are that many).

Pure Python (hashlib only): the data layer and everything above it can use it.
"""

from __future__ import annotations

import hashlib
from collections.abc import Iterable

__all__ = ["normalise_seed", "seed_hash", "seed_id", "split_seeds"]


def normalise_seed(text: str) -> str:
    """Whitespace collapsed to single spaces and stripped (case and punctuation kept)."""
    return " ".join(str(text).split())


def seed_hash(text: str, salt: str = "") -> float:
    """A number in [0, 1) from the SHA-256 of ``salt`` and the normalised ``text``."""
    digest = hashlib.sha256(f"{salt}\x00{normalise_seed(text)}".encode("utf-8")).digest()
    return int.from_bytes(digest[:8], "big") / 2.0 ** 64


def seed_id(text: str) -> str:
    """A seed's id from its content (``seed-`` + 12 hex digits of the SHA-256 of the normalised
    text): the same seed keeps its id whatever file, line or order it comes from, so outputs keyed
    by it resume correctly after the seed file is reordered or extended."""
    return "seed-" + hashlib.sha256(normalise_seed(text).encode("utf-8")).hexdigest()[:12]


def split_seeds(seeds: Iterable[str], *, held_out_fraction: float | None = None,
                held_out_count: int | None = None, salt: str = "") -> tuple[list[str], list[str]]:
    """(search_seeds, held_out): the seeds (input order kept within each side) split by a hash of
    their text (see the module docstring). Give exactly one of ``held_out_fraction`` (in [0, 1])
    and ``held_out_count`` (>= 0). Raises ValueError on bad arguments and, as a check, if a
    normalised seed text ended up on both sides."""
    seeds = [str(s) for s in seeds]
    if (held_out_fraction is None) == (held_out_count is None):
        raise ValueError("split_seeds: give exactly one of held_out_fraction and held_out_count")
    h = {s: seed_hash(s, salt) for s in {normalise_seed(x) for x in seeds}}
    if held_out_fraction is not None:
        if not 0.0 <= float(held_out_fraction) <= 1.0:
            raise ValueError(f"split_seeds: held_out_fraction must be in [0, 1], got {held_out_fraction}")
        held = {s for s, v in h.items() if v < float(held_out_fraction)}
    else:
        if int(held_out_count) != held_out_count or held_out_count < 0:
            raise ValueError(f"split_seeds: held_out_count must be an integer >= 0, got {held_out_count}")
        held = set(sorted(h, key=lambda s: (h[s], s))[: int(held_out_count)])
    search = [s for s in seeds if normalise_seed(s) not in held]
    held_out = [s for s in seeds if normalise_seed(s) in held]
    overlap = {normalise_seed(s) for s in search} & {normalise_seed(s) for s in held_out}
    if overlap:  # cannot happen by construction; the check is the contract
        raise ValueError(f"split_seeds: {len(overlap)} seed(s) on both sides, e.g. {sorted(overlap)[:3]}")
    return search, held_out
