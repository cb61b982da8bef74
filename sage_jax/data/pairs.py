"""Preference pairs (what tree search writes and DPO reads), one JSON object per line:

    {"id": "seed7_turn3", "system": null,
     "history": [<SAC turns, starting with a user turn and ending with the user turn answered>],
     "chosen":   {"text": "...", "state": {...}, "action": {...}},
     "rejected": {"text": "...", "state": {...}, "action": {...}}}

`state` is the user state the assistant inferred on that branch (it is rendered before the action,
exactly as in SFT data); both branches answer the same history. Only the final assistant turn is
scored: its latents, reply and end-of-turn token.
"""

from __future__ import annotations

import dataclasses
import os
from typing import Any, Iterator

import numpy as np

from sage_jax.data.jsonl import ReadReport, iter_records
from sage_jax.sac import Dialogue, SACFormatError, dialogue_from_json


@dataclasses.dataclass(frozen=True)
class PreferencePair:
    id: str
    chosen: Dialogue  # history + the chosen assistant turn (its state set on the last user turn)
    rejected: Dialogue


def _branch(obj: dict, history: list, which: str, pid: str, system) -> Dialogue:
    branch = obj.get(which)
    if not isinstance(branch, dict) or not isinstance(branch.get("text"), str):
        raise SACFormatError(f"must be an object with a 'text' string, got {type(branch).__name__}", which)
    unknown = set(branch) - {"text", "state", "action"}
    if unknown:
        raise SACFormatError(f"unknown keys {sorted(unknown)}", which)
    if not history or not isinstance(history[-1], dict):
        raise SACFormatError("must end with the user turn being answered", "history")
    last_user = dict(history[-1])
    if branch.get("state") is not None:
        last_user["state"] = branch["state"]
    turn = {"role": "assistant", "text": branch["text"]}
    if branch.get("action") is not None:
        turn["action"] = branch["action"]
    d = {"id": f"{pid}:{which}", "turns": history[:-1] + [last_user, turn]}
    if system is not None:
        d["system"] = system
    try:
        return dialogue_from_json(d)
    except SACFormatError as e:
        field = e.field.replace("turns", "history", 1) if e.field else which
        if e.field and e.field.startswith(f"turns[{len(history)}]"):
            field = which + e.field[len(f"turns[{len(history)}]"):]
        raise SACFormatError(e.message, field) from None


def pair_from_json(obj: Any) -> PreferencePair:
    if not isinstance(obj, dict):
        raise SACFormatError(f"a pair must be a JSON object, got {type(obj).__name__}", "")
    unknown = set(obj) - {"id", "system", "history", "chosen", "rejected", "meta"}
    if unknown:
        raise SACFormatError(f"unknown keys {sorted(unknown)}", "")
    pid = obj.get("id")
    if not isinstance(pid, str) or not pid:
        raise SACFormatError("must be a non-empty string", "id")
    history = obj.get("history")
    if not isinstance(history, list):
        raise SACFormatError("must be a list of turns", "history")
    system = obj.get("system")
    return PreferencePair(pid, _branch(obj, history, "chosen", pid, system),
                          _branch(obj, history, "rejected", pid, system))


def iter_pairs(path: str | os.PathLike, report: ReadReport) -> Iterator[PreferencePair]:
    for _, pair in iter_records(path, report, lambda obj, _line: pair_from_json(obj)):
        yield pair


def read_pairs(path: str | os.PathLike, *, strict: bool = False) -> tuple[list[PreferencePair], ReadReport]:
    report = ReadReport(str(path), strict=strict)
    return list(iter_pairs(path, report)), report


def last_turn_only(mask: np.ndarray) -> np.ndarray:
    """Keep only the last contiguous run of a loss mask (the final assistant turn)."""
    idx = np.flatnonzero(mask)
    out = np.zeros_like(mask)
    if idx.size:
        start = idx[-1]
        while start > 0 and mask[start - 1]:
            start -= 1
        out[start: idx[-1] + 1] = True
    return out
