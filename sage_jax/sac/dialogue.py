"""The SAC data model (frozen dataclasses) and its JSON form (DESIGN.md §3).

On disk, one dialogue per JSONL line::

    {"id": "ed_17", "system": "optional", "meta": {...optional},
     "turns": [{"role": "user", "text": "...", "state": {"motivation": "venting", "emotion": "sad", "topic": ["x"]}},
               {"role": "assistant", "text": "...", "action": {"motivation": null, "emotion": null, "topic": []}}]}

A user turn may carry ``state``, an assistant turn ``action``; an absent (or ``null``) latent
means "not annotated" (e.g. raw ShareGPT), which is different from an annotated latent whose
fields are all null. Construction validates, so an invalid dialogue cannot exist in memory.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field, replace
from typing import Any, Literal

from sage_jax.sac.errors import SACFormatError

__all__ = ["Latent", "Turn", "Dialogue", "Role", "dialogue_to_json", "dialogue_from_json", "latent_to_json",
           "latent_from_json"]

Role = Literal["user", "assistant"]
_ROLES = ("user", "assistant")


def _type(v: Any) -> str:
    return "null" if v is None else type(v).__name__


@dataclass(frozen=True)
class Latent:
    """Latent variables of one turn: a user's state or an assistant's action. ``None`` = null."""

    motivation: str | None = None
    emotion: str | None = None
    topic: tuple[str, ...] = ()

    def __post_init__(self):
        for name in ("motivation", "emotion"):
            v = getattr(self, name)
            if v is not None and not isinstance(v, str):
                raise SACFormatError(f"expected a string or null, got {v!r} ({_type(v)})", name)
        if isinstance(self.topic, list):  # accept lists, store a tuple (hashable, immutable)
            object.__setattr__(self, "topic", tuple(self.topic))
        if not isinstance(self.topic, tuple):
            raise SACFormatError(f"expected a list of strings, got {self.topic!r} ({_type(self.topic)})", "topic")
        for i, t in enumerate(self.topic):
            if not isinstance(t, str):
                raise SACFormatError(f"expected a string, got {t!r} ({_type(t)})", f"topic[{i}]")

    @property
    def is_null(self) -> bool:
        return self.motivation is None and self.emotion is None and not self.topic


@dataclass(frozen=True)
class Turn:
    """One utterance. User turns may carry ``state``, assistant turns ``action`` (never the other)."""

    role: Role
    text: str
    state: Latent | None = None
    action: Latent | None = None

    def __post_init__(self):
        if self.role not in _ROLES:
            raise SACFormatError(f"expected 'user' or 'assistant', got {self.role!r}", "role")
        if not isinstance(self.text, str):
            raise SACFormatError(f"expected a string, got {_type(self.text)}", "text")
        for name in ("state", "action"):
            if getattr(self, name) is not None and not isinstance(getattr(self, name), Latent):
                raise SACFormatError(f"expected a Latent or None, got {_type(getattr(self, name))}", name)
        if self.role == "user" and self.action is not None:
            raise SACFormatError("a user turn carries a 'state', not an 'action'", "action")
        if self.role == "assistant" and self.state is not None:
            raise SACFormatError("an assistant turn carries an 'action', not a 'state' (the user's state "
                                 "belongs to the preceding user turn)", "state")

    @property
    def latent(self) -> Latent | None:
        return self.state if self.role == "user" else self.action


@dataclass(frozen=True)
class Dialogue:
    """A dialogue: starts with a user turn, roles alternate. ``meta`` is free JSON (source, split, ...)."""

    id: str
    turns: tuple[Turn, ...]
    system: str | None = None
    meta: dict = field(default_factory=dict)

    def __post_init__(self):
        if not isinstance(self.id, str) or not self.id:
            raise SACFormatError(f"expected a non-empty string, got {self.id!r}", "id")
        if isinstance(self.turns, list):
            object.__setattr__(self, "turns", tuple(self.turns))
        if not isinstance(self.turns, tuple):
            raise SACFormatError(f"expected a list of turns, got {_type(self.turns)}", "turns")
        if not self.turns:
            raise SACFormatError("a dialogue needs at least one turn", "turns")
        for i, t in enumerate(self.turns):
            if not isinstance(t, Turn):
                raise SACFormatError(f"expected a Turn, got {_type(t)}", f"turns[{i}]")
            want = _ROLES[i % 2]
            if t.role != want:
                why = "a dialogue starts with a user turn" if i == 0 else "roles must alternate user/assistant"
                raise SACFormatError(f"expected role {want!r}, got {t.role!r} ({why})", f"turns[{i}].role")
        if self.system is not None and not isinstance(self.system, str):
            raise SACFormatError(f"expected a string or null, got {_type(self.system)}", "system")
        if not isinstance(self.meta, dict):
            raise SACFormatError(f"expected an object, got {_type(self.meta)}", "meta")

    def replace(self, **changes) -> Dialogue:
        """A copy with some fields changed (validated again)."""
        return replace(self, **changes)


# ---------------------------------------------------------------- JSON
def latent_to_json(latent: Latent) -> dict:
    return {"motivation": latent.motivation, "emotion": latent.emotion, "topic": list(latent.topic)}


def dialogue_to_json(d: Dialogue) -> dict:
    """The JSON object of a dialogue (keys: id, [system], turns, [meta]); empty system/meta are left out."""
    out: dict[str, Any] = {"id": d.id}
    if d.system is not None:
        out["system"] = d.system
    turns = []
    for t in d.turns:
        obj: dict[str, Any] = {"role": t.role, "text": t.text}
        if t.latent is not None:
            obj["state" if t.role == "user" else "action"] = latent_to_json(t.latent)
        turns.append(obj)
    out["turns"] = turns
    if d.meta:
        out["meta"] = d.meta
    return out


def _fail(msg: str, path: str):
    raise SACFormatError(msg, path)


def latent_from_json(obj: Any, path: str = "latent") -> Latent:
    if not isinstance(obj, Mapping):
        _fail(f"expected an object with motivation, emotion, topic; got {_type(obj)}", path)
    for k in obj:
        if k not in ("motivation", "emotion", "topic"):
            _fail("unknown field (expected motivation, emotion, topic)", f"{path}.{k}")
    for k in ("motivation", "emotion", "topic"):
        if k not in obj:
            _fail("missing field (use null or [] for an unknown value)", f"{path}.{k}")
    try:
        return Latent(obj["motivation"], obj["emotion"], obj["topic"])
    except SACFormatError as e:
        raise SACFormatError(e.message, f"{path}.{e.field}") from None


def dialogue_from_json(obj: Any) -> Dialogue:
    """Validate a JSON object and build a :class:`Dialogue`; errors name the field (``turns[2].text``)."""
    if not isinstance(obj, Mapping):
        _fail(f"expected a JSON object, got {_type(obj)}", "<record>")
    for k in obj:
        if k not in ("id", "turns", "system", "meta"):
            _fail("unknown field (expected id, turns, system, meta; put extra data under 'meta')", str(k))
    if "id" not in obj:
        _fail("missing field", "id")
    if not isinstance(obj["id"], str) or not obj["id"]:
        _fail(f"expected a non-empty string, got {obj['id']!r}", "id")
    if "turns" not in obj:
        _fail("missing field", "turns")
    raw_turns = obj["turns"]
    if not isinstance(raw_turns, list):
        _fail(f"expected a list, got {_type(raw_turns)}", "turns")
    turns = []
    for i, t in enumerate(raw_turns):
        p = f"turns[{i}]"
        if not isinstance(t, Mapping):
            _fail(f"expected an object, got {_type(t)}", p)
        role = t.get("role")
        if "role" not in t:
            _fail("missing field", f"{p}.role")
        if role not in _ROLES:
            _fail(f"expected 'user' or 'assistant', got {role!r}", f"{p}.role")
        latent_key = "state" if role == "user" else "action"
        for k in t:
            if k not in ("role", "text", latent_key):
                wrong = k in ("state", "action")
                _fail(f"a {role} turn carries {latent_key!r}, not {k!r}" if wrong
                      else f"unknown field (expected role, text, {latent_key})", f"{p}.{k}")
        if "text" not in t:
            _fail("missing field", f"{p}.text")
        if not isinstance(t["text"], str):
            _fail(f"expected a string, got {_type(t['text'])}", f"{p}.text")
        lat = t.get(latent_key)
        latent = None if lat is None else latent_from_json(lat, f"{p}.{latent_key}")
        turns.append(Turn(role, t["text"], **{latent_key: latent}))
    system = obj.get("system")
    if system is not None and not isinstance(system, str):
        _fail(f"expected a string or null, got {_type(system)}", "system")
    meta = obj.get("meta", {})
    if meta is None:
        meta = {}
    if not isinstance(meta, dict):
        _fail(f"expected an object, got {_type(meta)}", "meta")
    return Dialogue(obj["id"], tuple(turns), system, dict(meta))
