"""Mixing SAC sources into one shuffled training set, and blending dialogues (SAGE.md §2).

A mix spec (YAML or JSON) maps a source name to a SAC JSONL file::

    ed:     {path: ed_train.jsonl, size: 5000}             # the first 5000 valid dialogues
    esconv: {path: esconv_train.jsonl, prompt: ""}         # size null/absent: all of them
    demo:   {path: "sample:ed_train_200.jsonl", size: 50}  # a shipped sample file

Relative paths are relative to the spec file. ``prompt`` is a prefix written before the words of
every assistant turn of that source (after the latents), as in the reference recipe; empty by
default. Each source is read in order, malformed or invalid dialogues (empty text, half-annotated
exchanges) are reported and skipped, the first ``size`` valid ones are taken, and the union is
shuffled under the seed.

**Blend**: every dialogue is cut to an even number of turns (ending on an assistant turn), then
the turns of 2 other random dialogues (also cut) are appended, giving topic shifts and long-horizon
state tracking. Output order and partners are a pure function of the seed.
"""

from __future__ import annotations

import os
import random
from collections import Counter
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path


from sage_jax.config import ConfigError, _LineDict, from_dict, load_yaml_lines
from sage_jax.data.jsonl import ReadReport, iter_sac
from sage_jax.sac import Dialogue, Schema, Turn, check_dialogue

__all__ = ["MixSource", "MixSpec", "SourceReport", "MixReport", "load_mix_spec", "mix", "blend", "cut_even",
           "blend_files"]

SAMPLE_PREFIX = "sample:"


@dataclass(frozen=True)
class MixSource:
    """One source of a mix: a SAC JSONL file, how many dialogues to take, a prefix for assistant turns."""

    path: str
    size: int | None = None  # first N valid dialogues; None = all
    prompt: str = ""

    def __post_init__(self):
        if not self.path:
            raise ValueError("path must not be empty")
        if self.size is not None and self.size < 0:
            raise ValueError(f"size must be >= 0 or null, got {self.size}")


@dataclass(frozen=True)
class MixSpec:
    sources: dict[str, MixSource]


def load_mix_spec(path: str | os.PathLike) -> dict[str, MixSource]:
    """Read and validate a mix spec; errors name the file, line and field."""
    path = Path(path)
    data = load_yaml_lines(path, "mix spec")
    if not isinstance(data, dict) or not data:
        raise ConfigError(f"{path}: a mix spec is a non-empty mapping {{source_name: {{path, size, prompt}}}}")
    spec = from_dict(MixSpec, _LineDict({"sources": data}, {"sources": 1}), source=str(path))
    return spec.sources


def _resolve(p: str, base_dir: Path | None) -> Path:
    if p.startswith(SAMPLE_PREFIX):
        from sage_jax.data.sample import sample_path

        return sample_path(p[len(SAMPLE_PREFIX):])
    path = Path(p).expanduser()
    return path if path.is_absolute() or base_dir is None else base_dir / path


@dataclass
class SourceReport:
    name: str
    path: str
    requested: int | None
    taken: int
    read: ReadReport

    @property
    def short(self) -> bool:
        return self.requested is not None and self.taken < self.requested


@dataclass
class MixReport:
    seed: int
    sources: list[SourceReport] = field(default_factory=list)
    total: int = 0
    duplicate_ids: int = 0
    blended: bool = False
    dropped_by_blend: int = 0  # dialogues with < 2 turns: nothing left after cutting to even

    @property
    def skipped(self) -> int:
        return sum(s.read.skipped for s in self.sources)

    def summary(self) -> str:
        lines = []
        for s in self.sources:
            want = "all" if s.requested is None else s.requested
            lines.append(f"{s.name}: took {s.taken} of {want} from {s.path} "
                         f"({s.read.records} records read, {s.read.skipped} skipped)"
                         + ("  WARNING: fewer than requested" if s.short else ""))
            lines += [f"  {e}" for e in s.read.errors[:10]]
        lines.append(f"total: {self.total} dialogues (seed {self.seed}"
                     + (f", blended; {self.dropped_by_blend} too short to blend" if self.blended else "") + ")")
        if self.duplicate_ids:
            lines.append(f"WARNING: {self.duplicate_ids} duplicate dialogue ids across sources")
        return "\n".join(lines)


def _with_prompt(d: Dialogue, prompt: str, name: str) -> Dialogue:
    turns = d.turns
    if prompt:
        turns = tuple(Turn("assistant", prompt + t.text, action=t.action) if t.role == "assistant" else t
                      for t in turns)
    return d.replace(turns=turns, meta={**d.meta, "mix_source": name})


def cut_even(d: Dialogue) -> Dialogue | None:
    """``d`` cut to an even number of turns (ending on an assistant turn); None if nothing is left."""
    n = len(d.turns) - len(d.turns) % 2
    if n == 0:
        return None
    return d if n == len(d.turns) else d.replace(turns=d.turns[:n])


def blend(dialogues: Sequence[Dialogue], *, seed: int = 0, n_others: int = 2) -> tuple[list[Dialogue], int]:
    """Cut each dialogue to even length and append the turns of ``n_others`` other random dialogues.

    Returns the blended dialogues (same order as the input, minus those with fewer than 2 turns)
    and how many were dropped for being too short. Ids become ``a+b+c``; ``meta["blend"]`` lists them.
    """
    cut = [c for c in (cut_even(d) for d in dialogues) if c is not None]
    dropped = len(dialogues) - len(cut)
    if len(cut) <= n_others:
        raise ValueError(f"blending needs more than {n_others} dialogues with at least 2 turns, got {len(cut)}")
    rng = random.Random(f"blend:{seed}")
    out = []
    for i, d in enumerate(cut):
        others = [j + (j >= i) for j in rng.sample(range(len(cut) - 1), n_others)]  # distinct, never i
        parts = [d, *(cut[j] for j in others)]
        out.append(Dialogue("+".join(p.id for p in parts), tuple(t for p in parts for t in p.turns), d.system,
                            {**d.meta, "blend": [p.id for p in parts]}))
    return out, dropped


def mix(spec: Mapping[str, MixSource], *, seed: int = 0, blend_dialogues: bool = False,
        base_dir: str | os.PathLike | None = None, strict: bool = False, schema: Schema | None = None,
        progress: bool | None = None) -> tuple[list[Dialogue], MixReport]:
    """Take the first ``size`` valid dialogues of each source, shuffle under ``seed``, optionally blend."""
    base = Path(base_dir) if base_dir is not None else None
    report, out = MixReport(seed=seed), []

    def check(d: Dialogue) -> None:
        check_dialogue(d, schema)

    for name, src in spec.items():
        path = _resolve(src.path, base)
        if not path.is_file():
            raise FileNotFoundError(f"mix source {name!r}: {path} not found")
        read = ReadReport(str(path), strict=strict)
        taken = []
        if src.size != 0:
            for d in iter_sac(path, read, check=check, progress=progress):
                taken.append(_with_prompt(d, src.prompt, name))
                if src.size is not None and len(taken) >= src.size:
                    break
        report.sources.append(SourceReport(name, str(path), src.size, len(taken), read))
        out += taken
    report.duplicate_ids = sum(c - 1 for c in Counter(d.id for d in out).values() if c > 1)
    random.Random(seed).shuffle(out)
    if blend_dialogues:
        out, report.dropped_by_blend = blend(out, seed=seed)
        report.blended = True
    report.total = len(out)
    return out, report


def blend_files(files: Sequence[str | os.PathLike], output: str | os.PathLike, *, seed: int = 0,
                strict: bool = False) -> MixReport:
    """Every valid dialogue of the SAC ``files``, shuffled under ``seed`` and blended (see :func:`blend`),
    written to ``output`` (SAC JSONL, replaced atomically). The loop's m1 training data (SAGE.md §2)."""
    from sage_jax.data.jsonl import write_sac

    names = [f"{i}:{Path(f).stem}" for i, f in enumerate(files)]
    spec = {name: MixSource(str(f)) for name, f in zip(names, files)}
    dialogues, report = mix(spec, seed=seed, blend_dialogues=True, strict=strict, progress=False)
    write_sac(output, dialogues)
    return report
