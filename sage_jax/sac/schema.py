"""The one SAC schema: field names, delimiters, the quoting rule and optional closed vocabularies.

Plain rendering (the paper's)::

    {u_motivation: venting, u_emotion: disappointed, u_topic: [driving test]} {a_motivation: ...} reply

Special-token rendering (``special_tokens=True``) keeps the same inside but swaps the braces for
latent tokens and drops the spaces the tokens make redundant::

    <|u_state|>u_motivation: venting, u_emotion: disappointed, u_topic: [driving test]<|/u_state|><|a_action|>...<|/a_action|>reply

Quoting rule: a value is written plain unless it would be ambiguous, in which case it is written
as a JSON string (``"..."``). Ambiguous = empty, equal to the null word, leading/trailing
whitespace, a structural character (``{ } [ ] , : "``), a control or non-space whitespace
character, or a latent special token inside (whose first character is then \\u-escaped so a
tokenizer never sees the token in a value). Ordinary labels keep the paper's plain look.

The schema is a frozen dataclass of plain fields, so a YAML config can build it with
``sage_jax.config.from_dict(Schema, ...)``.
"""

from __future__ import annotations

import json
import re
import unicodedata
from dataclasses import dataclass, field
from typing import Literal

from sage_jax.sac.dialogue import Latent
from sage_jax.sac.errors import SACFormatError
from sage_jax.sac.vocab import Vocabulary, get_vocabulary

__all__ = ["Schema", "Side", "Delimiters", "DEFAULT_SCHEMA"]

Side = Literal["user", "assistant"]
_FIELDS = ("motivation", "emotion", "topic")
_IDENT = re.compile(r"[A-Za-z_][A-Za-z0-9_]*\Z")


@dataclass(frozen=True)
class Delimiters:
    """The block delimiters of one rendering (plain or special tokens)."""

    state_open: str
    state_close: str
    action_open: str
    action_close: str
    block_sep: str  # between the state block and the action block
    reply_sep: str  # between the action block and the reply


@dataclass(frozen=True)
class Schema:
    """Field names, delimiters and closed vocabularies of the State-Action Chain (one for every stage)."""

    user_keys: tuple[str, str, str] = ("u_motivation", "u_emotion", "u_topic")
    assistant_keys: tuple[str, str, str] = ("a_motivation", "a_emotion", "a_topic")
    open: str = "{"
    close: str = "}"
    list_open: str = "["
    list_close: str = "]"
    sep: str = ","  # rendered as ", "
    key_sep: str = ":"  # rendered as ": "
    null: str = "null"
    state_tokens: tuple[str, str] = ("<|u_state|>", "<|/u_state|>")
    action_tokens: tuple[str, str] = ("<|a_action|>", "<|/a_action|>")
    # Closed vocabularies: field key (e.g. "u_emotion") -> vocabulary name (built-in or below).
    closed: dict[str, str] = field(default_factory=dict)
    # User-defined named vocabularies: name -> allowed values.
    vocabularies: dict[str, tuple[str, ...]] = field(default_factory=dict)

    def __post_init__(self):
        keys = (*self.user_keys, *self.assistant_keys)
        for k in keys:
            if not isinstance(k, str) or not _IDENT.match(k):
                raise SACFormatError(f"field name {k!r} must be an identifier ([A-Za-z_][A-Za-z0-9_]*)", "keys")
        if len(set(keys)) != 6:
            raise SACFormatError(f"field names must be distinct, got {keys}", "keys")
        structural = (self.open, self.close, self.list_open, self.list_close, self.sep, self.key_sep)
        for name, d in zip(("open", "close", "list_open", "list_close", "sep", "key_sep"), structural):
            if not isinstance(d, str) or len(d) != 1 or d.isalnum() or d.isspace() or d in '_"\\':
                raise SACFormatError(f"must be one punctuation character (not _, \", \\), got {d!r}", name)
        if len(set(structural)) != len(structural):
            raise SACFormatError(f"structural delimiters must be distinct, got {structural}", "delimiters")
        if not _IDENT.match(self.null or ""):
            raise SACFormatError(f"the null word must be an identifier, got {self.null!r}", "null")
        tokens = (*self.state_tokens, *self.action_tokens)
        for t in tokens:
            if (not isinstance(t, str) or len(t) < 2 or any(c.isspace() for c in t) or '"' in t or "\\" in t
                    or t[0].isalnum() or t[0] in structural):
                raise SACFormatError(f"special token {t!r} must be 2+ characters without whitespace, quotes or "
                                     "backslashes, starting with a non-structural punctuation character", "tokens")
        if len(set(tokens)) != 4:
            raise SACFormatError(f"special tokens must be distinct, got {tokens}", "tokens")
        side_of = {k: ("user", i) for i, k in enumerate(self.user_keys)}
        side_of.update({k: ("assistant", i) for i, k in enumerate(self.assistant_keys)})
        vocabs: dict[str, Vocabulary] = {}
        for key, vname in self.closed.items():
            if key not in side_of:
                raise SACFormatError(f"unknown field; known: {', '.join(keys)}", f"closed.{key}")
            try:
                vocabs[key] = get_vocabulary(vname, self.vocabularies)
            except ValueError as e:
                raise SACFormatError(str(e), f"closed.{key}") from None
        # Derived lookups, cached on the instance (not dataclass fields: replace()/to_dict ignore them).
        object.__setattr__(self, "_side_of", side_of)
        object.__setattr__(self, "_vocabs", vocabs)
        object.__setattr__(self, "_special_chars", frozenset((*structural, '"')))

    # ------------------------------------------------------------ names
    def keys(self, side: Side) -> tuple[str, str, str]:
        """The three field names of a side, in order motivation, emotion, topic."""
        if side == "user":
            return self.user_keys
        if side == "assistant":
            return self.assistant_keys
        raise ValueError(f"side must be 'user' or 'assistant', got {side!r}")

    def side_of(self, key: str) -> tuple[Side, int] | None:
        """(side, field index) of a field name, or None if it is not one of ours."""
        return self._side_of.get(key)

    def special_tokens(self) -> tuple[str, ...]:
        """The latent special tokens, to add to a tokenizer (and grow the embedding) before training."""
        return (*self.state_tokens, *self.action_tokens)

    def delimiters(self, special_tokens: bool) -> Delimiters:
        if special_tokens:
            return Delimiters(*self.state_tokens, *self.action_tokens, block_sep="", reply_sep="")
        return Delimiters(self.open, self.close, self.open, self.close, block_sep=" ", reply_sep=" ")

    # ------------------------------------------------------------ vocabularies
    def vocabulary(self, key: str) -> Vocabulary | None:
        return self._vocabs.get(key)

    def check_value(self, key: str, value: str | None) -> str | None:
        """Why ``value`` is not allowed for ``key`` (closed vocabulary), or None if it is."""
        vocab = self._vocabs.get(key)
        if vocab is None or value is None or value in vocab:
            return None
        return f"{value!r} is not in the closed vocabulary {vocab.describe()} of {key}"

    def validate_latent(self, latent: Latent, side: Side, path: str = "") -> None:
        """Raise :class:`SACFormatError` if a value is outside a closed vocabulary."""
        if not self._vocabs:
            return
        keys = self.keys(side)
        for key, name in zip(keys, _FIELDS):
            values = getattr(latent, name)
            for i, v in (enumerate(values) if name == "topic" else [(None, values)]):
                if (msg := self.check_value(key, v)) is not None:
                    where = f"{name}[{i}]" if i is not None else name
                    raise SACFormatError(msg, f"{path}.{where}" if path else where)

    # ------------------------------------------------------------ quoting
    def needs_quote(self, value: str) -> bool:
        """Whether ``value`` must be written as a JSON string to parse back exactly."""
        if value == "" or value == self.null or value != value.strip():
            return True
        for c in value:
            if c in self._special_chars or (c.isspace() and c != " ") or unicodedata.category(c) == "Cc":
                return True
        return any(t in value for t in self.special_tokens())

    def format_value(self, value: str | None) -> str:
        """One scalar value as rendered: ``null``, plain text, or a JSON string when ambiguous."""
        if value is None:
            return self.null
        if not self.needs_quote(value):
            return value
        s = json.dumps(value, ensure_ascii=False)
        for t in self.special_tokens():  # break tokens apart so no tokenizer sees one inside a value
            s = s.replace(t, f"\\u{ord(t[0]):04x}{t[1:]}")
        return s


DEFAULT_SCHEMA = Schema()
