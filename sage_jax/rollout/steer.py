"""Latent steering: generate an assistant turn with some SAC latent fields pinned by the caller.

    from sage_jax.rollout.policy import load_policy
    from sage_jax.rollout.steer import steer
    pol = load_policy("smollm2")
    out = steer(pol, [[{"role": "user", "content": "I failed my exam"}]],
                pins=[{"a_motivation": "humour"}], sampling=SamplingParams(temperature=0))
    out[0].action.motivation, out[0].reply, out[0].content   # content = raw text (prefill included)

How: the six latent fields are ordered (u_motivation, u_emotion, u_topic, a_motivation, a_emotion,
a_topic). The assistant message is built as a prefill up to the last pinned field: pinned values
are rendered (``DEFAULT_SCHEMA.format_value``), an unpinned field *before* a pinned one is
generated alone (a short batched generation stopped on the host at the field's end: ``,``/``}`` or
``]`` for topics), and after the last pinned field the prefill opens the next field (e.g. pinned
a_motivation -> ``{u_motivation: ..., u_topic: [...]} {a_motivation: humour, a_emotion:``). Then
one generation continues prefill -> rest of the latents -> reply, and the whole text is parsed
with :func:`sage_jax.sac.parse_assistant_lenient`. Rows without pins need no prefill: one
generation. Every phase is one batched ``rollout.generate`` call over the rows that need it.
"""

from __future__ import annotations

import dataclasses
from typing import Any, Mapping, Sequence

from sage_jax.rollout.sampler import generate
from sage_jax.rollout.sampling import SamplingParams
from sage_jax.sac import DEFAULT_SCHEMA, Latent, parse_assistant_lenient

__all__ = ["Steered", "steer", "build_prefill", "check_pins", "FIELD_ORDER", "FIELD_TOKENS", "Phase", "plan_phase",
           "steered_result", "cut_field", "cut_stops", "uses_special_tokens"]

FIELD_ORDER: tuple[str, ...] = (*DEFAULT_SCHEMA.user_keys, *DEFAULT_SCHEMA.assistant_keys)
FIELD_TOKENS = 24  # max new tokens for one generated field value


@dataclasses.dataclass
class Steered:
    """One steered assistant turn.

    state/action: the lenient parse of ``content`` (None when a block is missing).
    reply: the reply with the latents stripped. content: the raw assistant text, prefill included.
    prefill: the text the assistant message was forced to start with ("" without pins).
    finish_reason: "stop" | "length" | "cache_full" of the final generation.
    """

    state: Latent | None
    action: Latent | None
    reply: str
    content: str
    finish_reason: str
    prefill: str = ""
    tokens: list[int] = dataclasses.field(default_factory=list)  # generated ids of the final phase
    missing: tuple[str, ...] = ()
    problems: tuple[str, ...] = ()


def check_pins(pins: Mapping[str, Any] | None) -> dict[str, Any]:
    """Validate one row's pins: known field keys; scalars are str/None, topics a list of str (or a str)."""
    out: dict[str, Any] = {}
    for k, v in (pins or {}).items():
        if k not in FIELD_ORDER:
            raise ValueError(f"unknown latent field {k!r}; known: {', '.join(FIELD_ORDER)}")
        if k.endswith("topic"):
            if isinstance(v, str):
                v = [v]
            if v is None:
                v = []
            if not isinstance(v, (list, tuple)) or not all(isinstance(t, str) for t in v):
                raise ValueError(f"pin {k!r} must be a list of strings, got {v!r}")
            v = list(v)
        elif v is not None and not isinstance(v, str):
            raise ValueError(f"pin {k!r} must be a string or null, got {v!r}")
        out[k] = v
    return out


def _render_value(key: str, value: Any) -> str:
    fmt = DEFAULT_SCHEMA.format_value
    if key.endswith("topic"):
        return DEFAULT_SCHEMA.list_open + ", ".join(fmt(t) for t in value) + DEFAULT_SCHEMA.list_close
    return fmt(value)


def _delims(special: bool):
    return DEFAULT_SCHEMA.delimiters(special)


def _opener(i: int, special: bool) -> str:
    """Text that precedes field i's value: block opener or separator, then ``key:``."""
    d, s = _delims(special), DEFAULT_SCHEMA
    key = FIELD_ORDER[i]
    if i == 0:
        lead = d.state_open
    elif i == 3:
        lead = d.state_close + d.block_sep + d.action_open
    else:
        lead = s.sep + " "
    return f"{lead}{key}{s.key_sep}"


def _after_last(i: int, special: bool) -> str:
    """Text after the last pinned field i: open the next field (or close the action block)."""
    if i == len(FIELD_ORDER) - 1:
        d = _delims(special)
        return d.action_close + d.reply_sep
    return _opener(i + 1, special)


def build_prefill(pins: Mapping[str, Any] | None, generated: Mapping[str, str] | None = None, *,
                  special_tokens: bool = False) -> str | None:
    """The prefill text for pinned fields, when every unpinned field before the last pin is in
    ``generated`` (key -> raw value text); None if some earlier unpinned field still needs
    generating. "" without pins."""
    pins = check_pins(pins)
    if not pins:
        return ""
    last = max(FIELD_ORDER.index(k) for k in pins)
    text = ""
    for i in range(last + 1):
        key = FIELD_ORDER[i]
        text += _opener(i, special_tokens)
        if key in pins:
            text += " " + _render_value(key, pins[key])
        elif generated is not None and key in generated:
            text += " " + generated[key]
        else:
            return None
    return text + _after_last(last, special_tokens)


def _next_needed(pins: Mapping[str, Any], generated: Mapping[str, str]) -> int | None:
    """Index of the first unpinned, ungenerated field before the last pin (None: prefill complete)."""
    if not pins:
        return None
    last = max(FIELD_ORDER.index(k) for k in pins)
    for i in range(last + 1):
        k = FIELD_ORDER[i]
        if k not in pins and k not in generated:
            return i
    return None


def _partial(pins, generated, upto: int, special: bool) -> str:
    """Prefix ending in ``key:`` of field ``upto`` (all earlier fields pinned or generated)."""
    text = ""
    for i in range(upto + 1):
        key = FIELD_ORDER[i]
        text += _opener(i, special)
        if i < upto:
            text += " " + (_render_value(key, pins[key]) if key in pins else generated[key])
    return text


def cut_field(text: str, key: str) -> str:
    """The value text of one generated field: up to its end (``]`` for topics, else ``,``/``}``)."""
    s = DEFAULT_SCHEMA
    text = text.lstrip()
    if key.endswith("topic"):
        if not text.startswith(s.list_open):
            j = min([p for p in (text.find(s.sep), text.find(s.close)) if p >= 0], default=len(text))
            return s.list_open + text[:j].strip() + s.list_close
        j = text.find(s.list_close)
        return text if j < 0 else text[: j + 1]
    ends = [p for p in (text.find(s.sep), text.find(s.close), text.find("\n")) if p >= 0]
    for tok in s.special_tokens():
        if (p := text.find(tok)) >= 0:
            ends.append(p)
    val = text[: min(ends, default=len(text))].strip()
    return val if val else s.null


def uses_special_tokens(policy) -> bool:
    """Whether the policy's tokenizer knows the latent special tokens (then blocks use them)."""
    try:
        vocab = policy.tokenizer.get_vocab()
    except Exception:  # noqa: BLE001
        return False
    return all(t in vocab for t in DEFAULT_SCHEMA.special_tokens())


def cut_stops(text: str, stops: Sequence[str]) -> tuple[str, bool]:
    cut = [p for p in (text.find(s) for s in stops if s) if p >= 0]
    return (text[: min(cut)], True) if cut else (text, False)


def steer(policy, conversations: Sequence[Sequence[dict]], pins: Sequence[Mapping[str, Any] | None] | None = None,
          sampling: SamplingParams | Sequence[SamplingParams] = SamplingParams(temperature=0.0), seed: int = 0, *,
          row_seeds: Sequence[int] | None = None, special_tokens: bool | None = None,
          on_generate=None) -> list[Steered]:
    """Generate one assistant turn per conversation with optional pinned latent fields.

    conversations: chat messages (``[{"role", "content"}]``) ending with a user turn.
    pins: one dict per conversation (or None): field key -> value (topics: list of str).
    sampling: one SamplingParams or one per conversation (rows of one call must agree on
      greedy-ness and top_k, as ``rollout.generate`` requires). Its ``stop_strings`` are applied
      on the host to the generated text (after the prefill).
    row_seeds: per-row seeds (default: the row index), so a row's result does not depend on
      which other rows share the batch.
    on_generate: optional callback(num_rows) called before each ``rollout.generate`` call.
    """
    n = len(conversations)
    if n == 0:
        return []
    pins_l = [check_pins(p) for p in (pins if pins is not None else [None] * n)]
    if len(pins_l) != n:
        raise ValueError(f"pins: expected {n} entries, got {len(pins_l)}")
    sp_l = list(sampling) if isinstance(sampling, (list, tuple)) else [sampling] * n
    if len(sp_l) != n:
        raise ValueError(f"sampling: expected {n} entries, got {len(sp_l)}")
    seeds = list(row_seeds) if row_seeds is not None else list(range(n))
    special = uses_special_tokens(policy) if special_tokens is None else special_tokens
    cfg, params = policy.cfg, policy.params

    def run(rows: list[int], phases: list[Phase]):
        if on_generate is not None:
            on_generate(len(rows))
        prompts = [policy.encode_chat(conversations[r], prefill=ph.prefill) for r, ph in zip(rows, phases)]
        return generate(cfg, params, prompts, [ph.sampling for ph in phases], seed=seed,
                        row_seeds=[ph.seed for ph in phases])

    # Field phases: unpinned fields that precede a pinned one, one field position at a time (all
    # rows needing one go together), then one generation of prefill + the rest (latents, reply).
    generated: list[dict[str, str]] = [{} for _ in range(n)]
    while True:
        plans = [plan_phase(pins_l[r], generated[r], sp_l[r], seeds[r], special=special) for r in range(n)]
        todo = [r for r in range(n) if plans[r].field is not None]
        if not todo:
            break
        for r, g in zip(todo, run(todo, [plans[r] for r in todo])):
            generated[r][plans[r].field] = cut_field(policy.decode(g.tokens), plans[r].field)
    gens = run(list(range(n)), plans)
    return [steered_result(plans[r].prefill, policy.decode(g.tokens), sp_l[r].stop_strings, g.finish_reason,
                           list(g.tokens), special=special) for r, g in enumerate(gens)]


@dataclasses.dataclass(frozen=True)
class Phase:
    """One generation of a steered row: the assistant message's forced start (`prefill`), its
    sampling and row seed, and the latent field it generates (None: the final generation)."""

    prefill: str
    sampling: SamplingParams
    seed: int
    field: str | None


def plan_phase(pins: Mapping[str, Any] | None, generated: Mapping[str, str], sampling: SamplingParams,
               row_seed: int, *, special: bool) -> Phase:
    """A row's next generation given the fields generated so far (`generated`: key -> raw value).

    A field phase makes at most `FIELD_TOKENS` tokens with no stop strings and is cut on the host
    (`cut_field`); the k-th field phase of a row uses row seed (row_seed * 7 + k + 1) so phases do
    not replay one another's draws. The final phase keeps the row seed; its stop strings are the
    caller's to apply to the decoded text (`steered_result`). Used by `steer` and the server's slots,
    so a served steered answer equals `steer`'s."""
    pins = pins or {}
    i = _next_needed(pins, generated)
    if i is not None:
        sp = dataclasses.replace(sampling, max_new_tokens=FIELD_TOKENS, min_new_tokens=0, stop_strings=(),
                                 logprobs=False)
        return Phase(_partial(pins, generated, i, special), sp, (row_seed * 7 + len(generated) + 1) % (1 << 31),
                     FIELD_ORDER[i])
    return Phase(build_prefill(pins, generated, special_tokens=special), dataclasses.replace(sampling, stop_strings=()),
                 row_seed, None)


def steered_result(prefill: str, text: str, stops: Sequence[str], finish_reason: str, tokens: list[int], *,
                   special: bool) -> Steered:
    """The `Steered` of a final phase: its decoded `text` cut at the first stop string, parsed
    leniently together with the prefill."""
    text, cut = cut_stops(text, stops)
    content = prefill + text
    parse = parse_assistant_lenient(content, DEFAULT_SCHEMA, special_tokens=special)
    return Steered(parse.state, parse.action, parse.reply, content, "stop" if cut else finish_reason, prefill=prefill,
                   tokens=tokens, missing=parse.missing, problems=tuple(str(p) for p in parse.problems))
