"""The settings that define a training run's result, recorded so that a resume notices a change.

A run directory holds ``settings.json`` = ``{"hash", "settings"}``: the run config without the
fields that only say how far to train, where to write or how to report (``output_dir``,
``max_steps``, ``epochs``, ``eval_every``, ``save_every``, ``keep``, ``log_every``, ``tensorboard``,
``mesh``, ...; extending a run to more steps or onto another mesh must still resume), plus a
content hash of every data file. Starting again on a directory with a checkpoint compares them:
a difference stops the run with :class:`SettingsChanged`, naming the changed top-level fields
(``optim``, ``train_files``, ``data``), unless ``allow_changed`` (``allow_changed_config=true``)
is set, which logs a warning and records the new settings. A run from before settings were
recorded resumes with a logged note.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
from collections.abc import Iterable, Mapping
from pathlib import Path
from typing import Any

from sage_jax.config import to_dict

__all__ = ["SETTINGS_FILE", "NOT_RESULT", "SettingsChanged", "result_settings", "file_digest", "run_settings",
           "settings_hash", "changed_fields", "describe_changes", "has_checkpoint", "check_settings"]

log = logging.getLogger(__name__)

SETTINGS_FILE = "settings.json"
# How long, where, how often and how loudly: none of these changes what a step computes.
NOT_RESULT = frozenset({"output_dir", "max_steps", "epochs", "eval_every", "save_every", "keep", "log_every",
                        "tensorboard", "mesh", "keep_best", "strict_data", "vocab_chunk", "allow_changed_config"})


class SettingsChanged(ValueError):
    """A resume whose result-defining settings differ from the ones the run was started with."""

    def __init__(self, message: str, fields: list[str]):
        super().__init__(message)
        self.fields = fields


def result_settings(cfg: Any, exclude: Iterable[str] = NOT_RESULT) -> dict:
    """The config (a dataclass or a dict) as plain data, minus the top-level fields in ``exclude``."""
    data = dict(cfg) if isinstance(cfg, Mapping) else to_dict(cfg)
    skip = set(exclude)
    return json.loads(json.dumps({k: v for k, v in data.items() if k not in skip}, default=str))


def file_digest(path: str | os.PathLike) -> str:
    """sha256 of a file's bytes (content, not mtime: a file rewritten identically is the same data)."""
    with open(path, "rb") as f:
        return "sha256:" + hashlib.file_digest(f, "sha256").hexdigest()


def data_digest(path: str | os.PathLike) -> str | None:
    """A file's content digest; for a built dataset directory (`sage-jax data build`) the digest
    of its ``dataset.json``, written last by every build (settings, sources, counts), so a rebuilt
    dataset is a change; None for anything else (missing)."""
    p = Path(path)
    if p.is_file():
        return file_digest(p)
    if (p / "dataset.json").is_file():
        return "dataset.json " + file_digest(p / "dataset.json")
    return None


def run_settings(cfg: Any, files: Iterable[str | os.PathLike] = ()) -> dict:
    """:func:`result_settings` plus ``data``: ``{path: content digest}`` of ``files`` (see `data_digest`)."""
    out = result_settings(cfg)
    out["data"] = {str(f): data_digest(f) for f in files}
    return out


def settings_hash(settings: Mapping) -> str:
    blob = json.dumps(settings, sort_keys=True, ensure_ascii=False, default=str)
    return hashlib.sha256(blob.encode()).hexdigest()


def _leaves(value: Any, prefix: str) -> dict[str, Any]:
    if isinstance(value, Mapping) and value:
        out: dict[str, Any] = {}
        for k, v in value.items():
            out.update(_leaves(v, f"{prefix}.{k}"))
        return out
    return {prefix: value}


def changed_fields(old: Mapping, new: Mapping) -> list[str]:
    """The top-level keys whose values differ (sorted)."""
    return sorted(k for k in set(old) | set(new) if old.get(k, _MISSING) != new.get(k, _MISSING))


_MISSING = object()


def describe_changes(old: Mapping, new: Mapping, limit: int = 6) -> str:
    """``optim (optim.learning_rate: 5e-05 -> 0.0001), train_files (...)``: each changed top-level
    field with up to ``limit`` changed leaves in all."""
    parts, shown = [], 0
    for k in changed_fields(old, new):
        a, b = _leaves(old.get(k), k), _leaves(new.get(k), k)
        diffs = [f"{p}: {_short(a.get(p))} -> {_short(b.get(p))}" for p in sorted(set(a) | set(b))
                 if a.get(p, _MISSING) != b.get(p, _MISSING)]
        keep = diffs[:max(0, limit - shown)]
        shown += len(keep)
        parts.append(f"{k} ({'; '.join(keep)})" if keep else k)
    return ", ".join(parts)


def _short(v: Any, width: int = 60) -> str:
    text = json.dumps(v, default=str) if v is not None else "unset"
    return text if len(text) <= width else text[:width - 3] + "..."


def has_checkpoint(checkpoint_dir: str | os.PathLike) -> bool:
    """Whether ``checkpoint_dir`` holds a finalised Orbax step (a directory named by its step)."""
    d = Path(checkpoint_dir)
    return d.is_dir() and any(p.is_dir() and p.name.isdigit() for p in d.iterdir())


def _write(path: Path, settings: Mapping) -> None:
    tmp = path.with_name(f".{path.name}.tmp{os.getpid()}")
    tmp.write_text(json.dumps({"hash": settings_hash(settings), "settings": settings}, indent=1, sort_keys=True)
                   + "\n")
    os.replace(tmp, path)


def check_settings(run_dir: str | os.PathLike, settings: Mapping, *, resuming: bool, allow_changed: bool = False,
                   what: str = "train", write: bool = True) -> list[str]:
    """Compare ``settings`` with the run's recorded ones when ``resuming``; record them (``write``).

    Returns the changed top-level fields (empty when none, or nothing was recorded). Raises
    :class:`SettingsChanged` on a change unless ``allow_changed``."""
    path = Path(run_dir) / SETTINGS_FILE
    settings = json.loads(json.dumps(settings, default=str))
    changed: list[str] = []
    if resuming:
        if not path.exists():
            log.info("%s: %s records no settings (a run started before they were recorded): resuming without "
                     "checking them", what, run_dir)
        else:
            old = json.loads(path.read_text()).get("settings", {})
            if settings_hash(old) != settings_hash(settings):
                changed = changed_fields(old, settings)
                detail = describe_changes(old, settings)
                if not allow_changed:
                    raise SettingsChanged(
                        f"{what}: {run_dir} was started with other settings; changed: {detail}. Resume with the "
                        f"settings it was started with, use a new output_dir, or pass allow_changed_config=true "
                        f"to continue under the new ones", changed)
                log.warning("%s: continuing %s with changed settings (allow_changed_config): %s", what, run_dir,
                            detail)
    if write and (changed or not resuming or not path.exists()):
        _write(path, settings)
    return changed
