"""EmpatheticDialogues (Rashkin et al. 2019; CC BY-NC 4.0) -> SAC.

Input: ``ed_{train,valid,test}.jsonl``, one conversation per line: ``conv_id, split, emotion`` (one
of 32), ``situation``, ``turns[{utterance_idx, role: speaker|listener, text, ei_auto_label}]``.
``ei_auto_label`` is an automatic per-utterance label from the EDOS taxonomy: one of the 32
emotions, one of 8 empathetic intents (questioning, acknowledging, agreeing, consoling,
encouraging, suggesting, sympathizing, wishing) or ``neutral``.

Mapping (speaker -> user, listener -> assistant; roles must alternate, speaker first):

* user ``state.motivation``: the utterance's intent label when it is one of the 8 intents (e.g.
  ``agreeing``, ``questioning``), otherwise ``sharing`` -- an ED speaker's job is to tell the
  listener about a situation, and an emotion or neutral label says they are doing just that;
* user ``state.emotion``: the utterance's label when it is one of the 32 emotions (utterance-level
  evidence), otherwise the conversation's human-chosen emotion -- always one of the 32, so the
  ``ed_emotions`` closed vocabulary validates every user emotion;
* user ``state.topic``: empty. The situation is a free-text paragraph, not a topic label; it is
  kept in ``meta["situation"]`` (an LLM annotator can derive topics from it);
* assistant ``action.motivation``: the listener utterance's intent label when it is one of the 8
  intents, otherwise null (an emotion or neutral label names no strategy);
* assistant ``action.emotion``: the listener utterance's label when it is one of the 32 emotions,
  otherwise null; ``action.topic``: empty.

A null ``ei_auto_label`` (two conversations have none) maps like ``neutral``. Ids are
``ed_<conv_id>``; ``meta``: source, split, conv_id, emotion, situation. A conversation that ends
with the speaker keeps its last user turn.
"""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

from sage_jax.data.jsonl import ReadReport
from sage_jax.data.readers._common import (bad, convert_json_lines, ordered_split_files, require_str, split_name,
                                           type_name)
from sage_jax.sac import ED_EMOTIONS, ED_INTENTS, Dialogue, Latent, Turn

NAME = "ed"
SOURCE = "empatheticdialogues"
NEUTRAL = "neutral"
USER_SHARING = "sharing"
_LABELS = frozenset((*ED_EMOTIONS, *ED_INTENTS, NEUTRAL))
_ROLE = {"speaker": "user", "listener": "assistant"}


def files(path: Path) -> list[tuple[Path, str]]:
    if path.is_file():
        stem = path.stem
        return [(path, split_name(stem[3:] if stem.startswith("ed_") else stem))]
    return ordered_split_files(path, {f"ed_{s}.jsonl": s for s in ("train", "valid", "test")})


def user_state(label: str | None, conv_emotion: str) -> Latent:
    return Latent(label if label in ED_INTENTS else USER_SHARING,
                  label if label in ED_EMOTIONS else conv_emotion, ())


def assistant_action(label: str | None) -> Latent:
    return Latent(label if label in ED_INTENTS else None, label if label in ED_EMOTIONS else None, ())


def convert(obj, split: str) -> Dialogue:
    if not isinstance(obj, dict):
        bad("<record>", f"expected a JSON object, got {type_name(obj)}")
    conv_id = require_str(obj, "conv_id")
    emotion = require_str(obj, "emotion")
    if emotion not in ED_EMOTIONS:
        bad("emotion", f"{emotion!r} is not one of the 32 EmpatheticDialogues emotions")
    situation = require_str(obj, "situation", empty_ok=True)
    raw = obj.get("turns")
    if not isinstance(raw, list) or not raw:
        bad("turns", f"expected a non-empty list, got {type_name(raw) if not isinstance(raw, list) else 'an empty list'}")
    turns = []
    for i, t in enumerate(raw):
        where = f"turns[{i}]"
        if not isinstance(t, dict):
            bad(where, f"expected an object, got {type_name(t)}")
        role = t.get("role")
        want = "speaker" if i % 2 == 0 else "listener"
        if role != want:
            bad(f"{where}.role", f"expected {want!r}, got {role!r} (speaker and listener alternate, speaker first)")
        text = require_str(t, "text", where).strip()
        if "ei_auto_label" not in t:
            bad(f"{where}.ei_auto_label", "missing field (null if unlabelled)")
        label = t["ei_auto_label"]
        if label is not None and label not in _LABELS:
            bad(f"{where}.ei_auto_label", f"unknown label {label!r} (expected an ED emotion, an EDOS intent "
                                          "or 'neutral')")
        if _ROLE[role] == "user":
            turns.append(Turn("user", text, state=user_state(label, emotion)))
        else:
            turns.append(Turn("assistant", text, action=assistant_action(label)))
    rec_split = obj.get("split")
    meta = {"source": SOURCE, "split": split_name(rec_split) if isinstance(rec_split, str) else split,
            "conv_id": conv_id, "emotion": emotion, "situation": situation}
    return Dialogue(f"ed_{conv_id}", tuple(turns), meta=meta)


def iter_file(path: Path, split: str, report: ReadReport, progress: bool | None = None) -> Iterator[Dialogue]:
    return convert_json_lines(path, report, lambda obj, _line: convert(obj, split), progress)
