"""Parsing assistant messages back into (state, action, reply): a strict parser and a lenient one.

Both are total: the strict parser returns or raises :class:`LatentParseError` with the character
offset of the first problem; the lenient parser (for model output at inference) never raises on
a string and reports what is missing or wrong instead. On any text the renderer produces, the two
agree and give back exactly the rendered latents and reply. Whitespace around delimiters is
tolerated by both; the reply is everything after the action block minus one reply separator.
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass
from typing import NamedTuple

from sage_jax.sac.dialogue import Latent
from sage_jax.sac.errors import LatentParseError
from sage_jax.sac.schema import DEFAULT_SCHEMA, Delimiters, Schema, Side

__all__ = ["ParsedAssistant", "LenientParse", "parse_assistant", "parse_assistant_lenient", "strip_latents",
           "detect_special_tokens"]

_IDENT = re.compile(r"[A-Za-z_][A-Za-z0-9_]*")
_DECODER = json.JSONDecoder()


class ParsedAssistant(NamedTuple):
    state: Latent
    action: Latent
    reply: str


@dataclass(frozen=True)
class LenientParse:
    """What a lenient parse found. ``missing`` lists field keys not found (all three for a missing block)."""

    state: Latent | None
    action: Latent | None
    reply: str
    missing: tuple[str, ...]
    problems: tuple[LatentParseError, ...]

    @property
    def ok(self) -> bool:
        return not self.missing and not self.problems


def _ws(text: str, p: int) -> int:
    n = len(text)
    while p < n and text[p].isspace():
        p += 1
    return p


def detect_special_tokens(text: str, schema: Schema = DEFAULT_SCHEMA) -> bool:
    """True if ``text`` starts (after whitespace) with a latent special token."""
    p = _ws(text, 0)
    return text.startswith(schema.state_tokens[0], p) or text.startswith(schema.action_tokens[0], p)


def _block_names(side: Side) -> str:
    return "user state" if side == "user" else "assistant action"


# ================================================================ strict
class _Strict:
    def __init__(self, text: str, schema: Schema, special: bool):
        self.t, self.s, self.special, self.n = text, schema, special, len(text)
        self.d: Delimiters = schema.delimiters(special)
        s = schema
        self.forbidden = {s.open, s.close, s.list_open, s.list_close, s.key_sep, '"'}
        self.tokens = schema.special_tokens() if special else ()

    def err(self, msg: str, pos: int):
        raise LatentParseError(msg, pos)

    def parse(self) -> ParsedAssistant:
        d = self.d
        p = _ws(self.t, 0)
        state, p = self.block(p, "user", d.state_open, d.state_close)
        p = _ws(self.t, p)
        action, p = self.block(p, "assistant", d.action_open, d.action_close)
        if d.reply_sep and self.t.startswith(d.reply_sep, p):
            p += len(d.reply_sep)
        return ParsedAssistant(state, action, self.t[p:])

    def block(self, p: int, side: Side, opn: str, cls: str) -> tuple[Latent, int]:
        t, s = self.t, self.s
        keys = s.keys(side)
        if not t.startswith(opn, p):
            got = repr(t[p:p + 12]) if p < self.n else "end of text"
            self.err(f"expected {opn!r} to open the {_block_names(side)}, got {got}", p)
        p += len(opn)
        values: dict[int, object] = {}
        while True:
            p = _ws(t, p)
            m = _IDENT.match(t, p)
            if not m:
                if t.startswith(cls, p):
                    self.err(f"missing field(s) {', '.join(k for i, k in enumerate(keys) if i not in values)} "
                             f"in the {_block_names(side)}", p)
                self.err(f"expected a field name ({', '.join(keys)})", p)
            key, kpos, p = m.group(), p, m.end()
            where = s.side_of(key)
            if where is None and p == self.n:
                self.err(f"unexpected end of text in the {_block_names(side)} (truncated?)", p)
            if where is None or where[0] != side:
                self.err(f"unexpected field {key!r} in the {_block_names(side)} (expected {', '.join(keys)})", kpos)
            idx = where[1]
            if idx in values:
                self.err(f"duplicate field {key!r}", kpos)
            p = _ws(t, p)
            if not t.startswith(s.key_sep, p):
                self.err(f"expected {s.key_sep!r} after {key!r}", p)
            p = _ws(t, p + 1)
            if idx == 2:
                values[idx], p = self.topic_list(p, key, cls)
            else:
                vpos = p
                values[idx], p = self.scalar(p, cls, in_list=False)
                if (msg := s.check_value(key, values[idx])) is not None:
                    self.err(msg, vpos)
            p = _ws(t, p)
            if t.startswith(cls, p):
                p += len(cls)
                break
            if t.startswith(s.sep, p):
                p += 1
                continue
            self.err(f"expected {s.sep!r} or {cls!r}" if p < self.n else
                     f"unterminated {_block_names(side)}: expected {cls!r} before the end of text", p)
        if len(values) < 3:
            self.err(f"missing field(s) {', '.join(k for i, k in enumerate(keys) if i not in values)} "
                     f"in the {_block_names(side)}", p - len(cls))
        return Latent(values[0], values[1], tuple(values[2])), p

    def quoted(self, p: int) -> tuple[str, int]:
        try:
            return _DECODER.raw_decode(self.t, p)
        except json.JSONDecodeError as e:
            self.err(f"bad quoted value: {e.msg}", e.pos)

    def scalar(self, p: int, cls: str, in_list: bool) -> tuple[str | None, int]:
        """A quoted or plain value; plain values end at the separator, the block (or list) end."""
        t, s = self.t, self.s
        if p < self.n and t[p] == '"':
            return self.quoted(p)
        end = s.list_close if in_list else cls
        q = p
        while q < self.n:
            c = t[q]
            if c == s.sep or t.startswith(end, q):
                break
            if c in self.forbidden or any(t.startswith(tok, q) for tok in self.tokens):
                what = "latent token" if c not in self.forbidden else repr(c)
                self.err(f"unexpected {what} in an unquoted value (values with special characters "
                         "are written as JSON strings)", q)
            q += 1
        else:
            self.err(f"unexpected end of text: expected {end!r}", q)
        v = t[p:q].strip()
        if not v:
            self.err('empty value (write "" for an empty string, or null)', p)
        return (None if v == s.null else v), q

    def topic_list(self, p: int, key: str, cls: str) -> tuple[list[str], int]:
        t, s = self.t, self.s
        if t.startswith(s.null, p):  # null topic list = no topics
            q = _ws(t, p + len(s.null))
            if t.startswith(s.sep, q) or t.startswith(cls, q):
                return [], p + len(s.null)
        if not t.startswith(s.list_open, p):
            self.err(f"expected {s.list_open!r} to open the {key} list", p)
        p = _ws(t, p + 1)
        items: list[str] = []
        if t.startswith(s.list_close, p):
            return items, p + 1
        while True:
            p = _ws(t, p)
            ipos = p
            v, p = self.scalar(p, cls, in_list=True)
            if v is None:
                self.err(f"null is not a topic (write {s.list_open}{s.list_close} for no topics)", ipos)
            if (msg := s.check_value(key, v)) is not None:
                self.err(msg, ipos)
            items.append(v)
            p = _ws(t, p)
            if t.startswith(s.list_close, p):
                return items, p + 1
            if t.startswith(s.sep, p):
                p += 1
                continue
            self.err(f"expected {s.sep!r} or {s.list_close!r} in the {key} list" if p < self.n
                     else f"unterminated {key} list", p)


def parse_assistant(text: str, schema: Schema = DEFAULT_SCHEMA, *,
                    special_tokens: bool | None = None) -> ParsedAssistant:
    """Strictly parse ``{state} {action} reply``; ``special_tokens=None`` detects the rendering.

    Raises :class:`LatentParseError` (with ``position``) on any malformed latent.
    """
    if not isinstance(text, str):
        raise TypeError(f"parse_assistant expects a str, got {type(text).__name__}")
    special = detect_special_tokens(text, schema) if special_tokens is None else special_tokens
    return _Strict(text, schema, special).parse()


# ================================================================ lenient
def _string_end(t: str, i: int, stop: int) -> int | None:
    """End (exclusive) of the JSON-ish string starting at ``t[i] == '"'``, or None if unterminated."""
    j = i + 1
    while j < stop:
        c = t[j]
        if c == "\\":
            j += 2
            continue
        if c == '"':
            return j + 1
        j += 1
    return None


class _Lenient:
    def __init__(self, text: str, schema: Schema, special: bool):
        self.t, self.s, self.special, self.n = text, schema, special, len(text)
        self.d = schema.delimiters(special)
        self.problems: list[LatentParseError] = []

    def problem(self, msg: str, pos: int):
        self.problems.append(LatentParseError(msg, pos))

    def parse(self) -> LenientParse:
        t, d = self.t, self.d
        found: dict[str, tuple[Latent, list[str]]] = {}
        p, last_end = _ws(t, 0), None
        for _ in range(2):
            blk = self.block(p)
            if blk is None:
                break
            side, latent, missing, end = blk
            if side in found:
                self.problem(f"a second {_block_names(side)} block (ignored)", p)
            else:
                if side == "user" and "assistant" in found:
                    self.problem("the user state comes after the assistant action", p)
                found[side] = (latent, missing)
            last_end = end
            p = _ws(t, end)
        if last_end is None:
            reply = t
        else:
            reply = t[last_end:]
            if d.reply_sep and reply.startswith(d.reply_sep):
                reply = reply[len(d.reply_sep):]
        missing: list[str] = []
        out: dict[str, Latent | None] = {}
        for side in ("user", "assistant"):
            if side in found:
                out[side], miss = found[side]
                missing += miss
            else:
                out[side] = None
                missing += self.s.keys(side)
        return LenientParse(out["user"], out["assistant"], reply, tuple(missing), tuple(self.problems))

    # ------------------------------------------------------------ blocks
    def block(self, p: int):
        """(side, latent, missing keys, end) of a latent block starting at ``p``, or None if none starts there."""
        t, s, d = self.t, self.s, self.d
        if self.special:
            if t.startswith(d.state_open, p):
                side, opn, cls = "user", d.state_open, d.state_close
            elif t.startswith(d.action_open, p):
                side, opn, cls = "assistant", d.action_open, d.action_close
            else:
                return None
        else:
            if not t.startswith(s.open, p):
                return None
            q = _ws(t, p + 1)
            m = _IDENT.match(t, q)
            if not m or s.side_of(m.group()) is None or not t.startswith(s.key_sep, _ws(t, m.end())):
                return None  # a brace that is not a latent block (e.g. the reply is code)
            side, opn, cls = s.side_of(m.group())[0], s.open, s.close
        body = p + len(opn)
        others = [tok for tok in s.special_tokens() if tok != cls] if self.special else []
        i, body_end, end = body, self.n, self.n
        while i < self.n:
            if t[i] == '"' and self._opens_value(i, body):
                j = _string_end(t, i, self.n)
                i = j if j is not None else i + 1
                continue
            if t.startswith(cls, i):
                body_end, end = i, i + len(cls)
                break
            if others and any(t.startswith(tok, i) for tok in others):
                body_end = end = i
                self.problem(f"unclosed {_block_names(side)}: {cls!r} missing", i)
                break
            i += 1
        else:
            self.problem(f"unterminated {_block_names(side)}: {cls!r} missing", self.n)
        latent, missing = self.fields(side, body, body_end)
        return side, latent, missing, end

    def _opens_value(self, i: int, lo: int) -> bool:
        """Whether the quote at ``i`` starts a quoted value (follows ``:``, ``,`` or ``[``), not a stray one."""
        j = i - 1
        while j >= lo and self.t[j].isspace():
            j -= 1
        return j < lo or self.t[j] in (self.s.key_sep, self.s.sep, self.s.list_open)

    def _top_seps(self, a: int, b: int) -> list[int]:
        """Positions of separators in t[a:b] outside quoted strings and topic lists."""
        t, s = self.t, self.s
        out, depth, i = [], 0, a
        while i < b:
            c = t[i]
            if c == '"' and self._opens_value(i, a):
                j = _string_end(t, i, b)
                i = j if j is not None else i + 1
                continue
            if c == s.list_open:
                depth += 1
            elif c == s.list_close and depth:
                depth -= 1
            elif c == s.sep and depth == 0:
                out.append(i)
            i += 1
        return out

    def _field_at(self, b: int, stop: int):
        """(key, key position, value start) if a known ``key:`` starts at or after whitespace from ``b``."""
        t, s = self.t, self.s
        q = _ws(t, b)
        m = _IDENT.match(t, q, stop)
        if m and s.side_of(m.group()) is not None:
            r = _ws(t, m.end())
            if r < stop and t.startswith(s.key_sep, r):
                return m.group(), q, r + 1
        return None

    def fields(self, side: Side, a: int, b: int) -> tuple[Latent, list[str]]:
        s = self.s
        keys = s.keys(side)
        starts = []  # (where the previous value ends, key, key pos, value start)
        for pos, at in [(a, a), *((q, q + 1) for q in self._top_seps(a, b))]:
            f = self._field_at(at, b)
            if f is not None:
                starts.append((pos, *f))
        if not starts and _ws(self.t, a) < b:
            self.problem(f"no field found in the {_block_names(side)}", a)
        elif starts and _ws(self.t, a) < starts[0][2]:
            self.problem("unexpected text before the first field", _ws(self.t, a))
        values: dict[int, object] = {}
        for n, (_, key, kpos, vs) in enumerate(starts):
            ve = starts[n + 1][0] if n + 1 < len(starts) else b
            where = s.side_of(key)
            if where[0] != side:
                self.problem(f"field {key!r} does not belong in the {_block_names(side)} (ignored)", kpos)
                continue
            if where[1] in values:
                self.problem(f"duplicate field {key!r} (ignored)", kpos)
                continue
            values[where[1]] = self.topic(key, vs, ve) if where[1] == 2 else self.scalar(key, vs, ve)
        latent = Latent(values.get(0), values.get(1), tuple(values.get(2, ())))
        return latent, [k for i, k in enumerate(keys) if i not in values]

    # ------------------------------------------------------------ values
    def _item(self, a: int, b: int) -> tuple[str, bool] | None:
        """(value, was_quoted) of t[a:b] stripped; None if empty."""
        t = self.t
        a, raw = _ws(t, a), t[a:b].strip()
        if not raw:
            return None
        if raw[0] == '"' and _string_end(raw, 0, len(raw)) == len(raw):
            try:
                return json.loads(raw), True
            except ValueError:
                self.problem("bad quoted value (kept as text)", a)
        return raw, False

    def scalar(self, key: str, a: int, b: int) -> str | None:
        item = self._item(a, b)
        if item is None:
            self.problem(f"empty value for {key!r} (read as null)", a)
            return None
        v, quoted = item
        if not quoted and v == self.s.null:
            return None
        if (msg := self.s.check_value(key, v)) is not None:
            self.problem(msg, _ws(self.t, a))
        return v

    def topic(self, key: str, a: int, b: int) -> list[str]:
        t, s = self.t, self.s
        a = _ws(t, a)
        raw = t[a:b].strip()
        if raw == s.null or not raw:
            if not raw:
                self.problem(f"empty value for {key!r} (read as no topics)", a)
            return []
        if t.startswith(s.list_open, a):
            inner_a, inner_b, i = a + 1, None, a + 1
            while i < b:  # the first list end outside quoted strings
                if t[i] == '"':
                    j = _string_end(t, i, b)
                    i = j if j is not None else i + 1
                    continue
                if t[i] == s.list_close:
                    inner_b = i
                    break
                i += 1
            if inner_b is None:
                inner_b = b
                self.problem(f"unterminated {key} list", b)
            elif t[inner_b + 1:b].strip():
                self.problem(f"text after the {key} list (ignored)", _ws(t, inner_b + 1))
        else:
            inner_a, inner_b = a, b
            self.problem(f"{key} is not a bracketed list (read as one)", a)
        items: list[str] = []
        bounds = [inner_a - 1, *self._top_seps(inner_a, inner_b), inner_b]
        for lo, hi in zip(bounds, bounds[1:]):
            item = self._item(lo + 1, hi)
            if item is None:
                if len(bounds) > 2:
                    self.problem(f"empty item in the {key} list (dropped)", lo + 1)
                continue
            v, quoted = item
            if not quoted and v == s.null:
                self.problem(f"null in the {key} list (dropped)", _ws(t, lo + 1))
                continue
            if (msg := s.check_value(key, v)) is not None:
                self.problem(msg, _ws(t, lo + 1))
            items.append(v)
        return items


def parse_assistant_lenient(text: str, schema: Schema = DEFAULT_SCHEMA, *,
                            special_tokens: bool | None = None) -> LenientParse:
    """Parse whatever latents are there (model output); never raises on a string.

    A missing block gives ``None`` and all its keys in ``missing``; a missing field gives null (or
    no topics) and its key in ``missing``; anything odd is a :class:`LatentParseError` in ``problems``.
    Text with no latent block at the start is all reply.
    """
    if not isinstance(text, str):
        raise TypeError(f"parse_assistant_lenient expects a str, got {type(text).__name__}")
    special = detect_special_tokens(text, schema) if special_tokens is None else special_tokens
    return _Lenient(text, schema, special).parse()


def strip_latents(text: str, schema: Schema = DEFAULT_SCHEMA, *, special_tokens: bool | None = None) -> str:
    """The reply without its latent prefix (for display, the user simulator and the judge)."""
    return parse_assistant_lenient(text, schema, special_tokens=special_tokens).reply
