"""Judge prompts (SAGE.md §2, §4, §6) in one structured format, and the parser of that format.

Three prompt kinds, each a single user message:

* **best of K** (:func:`best_of_k_prompt`): the dialogue so far and K candidate replies for the
  assistant's next turn (or K continuations, each a ``### Response X`` section of turns, when a
  deeper search compares futures); the judge answers only ``Response X is better`` or ``No good one``.
  The companion rubric is SAGE.md §4's; ``humour=True`` uses the humour rubric instead.
* **pairwise** (:func:`pairwise_prompt`): ``Dialog A`` and ``Dialog B``; the judge answers only
  ``Dialog X is better`` (rubric of SAGE.md §6: sounds like a real human).
* **annotation** (:func:`annotation_prompt`): a whole dialogue, utterances numbered; the
  annotator returns one JSON object labelling motivation, emotion and topic of every utterance
  (SAGE.md §2, "future-aware": the whole dialogue is in view).

Layout (what :func:`parse_prompt` relies on, and what the ``rules:`` judge reads): a section
starts with a line ``### Title`` at column 0; an item starts at column 0 with its label
(``User: ``, ``Assistant: ``, ``Response 3: ``, ``[4] User: ``) and every further line of its
text is indented by two spaces. Texts are therefore reversible (:func:`decode_text`) and can
never fake a heading or an item, whatever they contain. Latents are stripped from every
assistant text before it is shown, except in the best-of-K selector prompt with ``latents=True``
(the reference selector sees the assistant's latents, SAGE.md §4).
"""

from __future__ import annotations

import json
import re
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any, Union

from sage_jax.sac import DEFAULT_SCHEMA, Dialogue, Schema, Turn, render_assistant, strip_latents

__all__ = [
    "COMPANION_RUBRIC", "HUMOUR_RUBRIC", "PAIRWISE_RUBRIC", "Context", "as_turns", "encode_text", "decode_text",
    "best_of_k_prompt", "pairwise_prompt", "annotation_prompt", "BestOfKPrompt", "PairwisePrompt",
    "AnnotationPrompt", "parse_prompt", "ANNOTATION_EXAMPLE",
]

COMPANION_RUBRIC = (
    "A good companion chatbot is consistent, humorous, interesting, sympathetic, informative, engaging, "
    "appropriate and respectful. It keeps the dialogue going without interrogating the user, and it knows "
    "that it is an AI.")
HUMOUR_RUBRIC = (
    "A good reply here is genuinely funny: witty, playful and light-hearted, with humour that fits what the "
    "user said. It stays relevant, kind, appropriate and respectful, never mocks the user, keeps the dialogue "
    "going without interrogating the user, and the chatbot knows that it is an AI.")
PAIRWISE_RUBRIC = (
    "A good social chatbot sounds like a real human: colloquial, humorous, intriguing, sympathetic, natural, "
    "and not verbose.")

# Section titles (column 0, after "### ").
_DIALOGUE = "Dialogue so far"
_CANDIDATES = "Candidate responses"
_RESPONSE_SECTION = "Response"  # "### Response 3": one candidate continuation
_ANSWER = "Answer"
_TO_ANNOTATE = "Dialogue to annotate"
_EXAMPLE = "Example dialogue"
_EXAMPLE_OUT = "Example output"
_LABELS = "Label sets"
_OUTPUT = "Output"
_INDENT = "  "

_ROLE_LABEL = {"user": "User", "assistant": "Assistant"}
_LABEL_ROLE = {v: k for k, v in _ROLE_LABEL.items()}

Context = Union[Dialogue, Sequence[Turn], Sequence[Mapping[str, Any]], Sequence[tuple[str, str]]]


# ---------------------------------------------------------------- texts and contexts
def encode_text(text: str) -> str:
    """A text as one item body: newlines normalised, every line after the first indented by two spaces."""
    return text.replace("\r\n", "\n").replace("\r", "\n").replace("\n", "\n" + _INDENT)


def decode_text(first: str, more: Sequence[str]) -> str:
    """Inverse of :func:`encode_text`: the first line and the (indented) continuation lines."""
    return "\n".join([first, *(line[len(_INDENT):] for line in more)])


def _clean_assistant(text: str, schema: Schema) -> str:
    return strip_latents(text, schema)


def as_turns(context: Context, schema: Schema = DEFAULT_SCHEMA, *, latents: bool = False) -> list[tuple[str, str]]:
    """``[(role, text)]`` of a dialogue context; system messages are dropped, assistant latents
    stripped (``latents=True``: kept, and an assistant :class:`Turn` rendered with the state of
    the user turn before it and its own action, as the assistant wrote it).

    Accepts a :class:`Dialogue`, a sequence of :class:`Turn`, chat messages ``{"role", "content"}``
    or ``(role, text)`` pairs.
    """
    items = context.turns if isinstance(context, Dialogue) else context
    out: list[tuple[str, str]] = []
    prev_state = None
    for i, it in enumerate(items):
        if isinstance(it, Turn):
            role, text = it.role, it.text
            if latents and role == "assistant" and prev_state is not None and it.action is not None:
                text = render_assistant(prev_state, it.action, text, schema)
            prev_state = it.state if role == "user" else None
        elif isinstance(it, Mapping):
            role, text = it.get("role"), it.get("content", it.get("text"))
        elif isinstance(it, (tuple, list)) and len(it) == 2:
            role, text = it
        else:
            raise TypeError(f"context item {i}: expected a Turn, a chat message or a (role, text) pair, "
                            f"got {type(it).__name__}")
        if role == "system":
            continue
        if role not in _ROLE_LABEL:
            raise ValueError(f"context item {i}: role must be 'user' or 'assistant', got {role!r}")
        if not isinstance(text, str):
            raise TypeError(f"context item {i}: text must be a string, got {type(text).__name__}")
        out.append((role, _clean_assistant(text, schema) if role == "assistant" and not latents else text))
    return out


def _turn_lines(turns: Sequence[tuple[str, str]], numbered: bool = False) -> list[str]:
    lines = []
    for i, (role, text) in enumerate(turns, 1):
        prefix = f"[{i}] " if numbered else ""
        lines.append(f"{prefix}{_ROLE_LABEL[role]}: {encode_text(text)}")
    return lines


# ---------------------------------------------------------------- builders
def best_of_k_prompt(context: Context, candidates: Sequence[str | Context], *, humour: bool = False,
                     latents: bool = False, schema: Schema = DEFAULT_SCHEMA) -> str:
    """The selector prompt of SAGE.md §4: dialogue so far + K candidates; answer ``Response X is better``.
    ``latents=True`` (the reference selector) shows the assistant's latent prefixes in the dialogue
    and the candidates; otherwise they are stripped.

    A candidate is the assistant's next message (a string) or, for a deeper search (lookahead,
    beams that diverged earlier), a continuation of the dialogue so far: turns that start with
    the assistant's (a context, see :func:`as_turns`). With any continuation among them, each
    candidate is its own section ``### Response X`` of turns, so the judge compares whole futures."""
    if len(candidates) < 1:
        raise ValueError("best_of_k_prompt needs at least one candidate")
    turns = as_turns(context, schema, latents=latents)
    futures = not all(isinstance(c, str) for c in candidates)
    intro = (["You are judging how funny a chatbot's reply is.", HUMOUR_RUBRIC] if humour else
             ["You are judging the replies of a companion chatbot.", COMPANION_RUBRIC])
    what = ("candidate continuations of it (the chatbot's next turn and what followed), then pick the best "
            "continuation." if futures else
            "the candidate responses for the chatbot's next turn, then pick the best response.")
    lines = [" ".join(intro), f"Read the dialogue so far and {what}", "", f"### {_DIALOGUE}"]
    lines += _turn_lines(turns) if turns else ["(the chatbot speaks first)"]
    if futures:
        for i, c in enumerate(candidates, 1):
            cont = as_turns([("assistant", c)] if isinstance(c, str) else c, schema, latents=latents)
            if not cont or cont[0][0] != "assistant":
                raise ValueError(f"candidate {i}: a continuation starts with the assistant's turn")
            lines += ["", f"### {_RESPONSE_SECTION} {i}", *_turn_lines(cont)]
    else:
        lines += ["", f"### {_CANDIDATES}"]
        lines += [f"Response {i}: {encode_text(c if latents else _clean_assistant(c, schema))}"
                  for i, c in enumerate(candidates, 1)]
    best = "continuation" if futures else "response"
    lines += ["", f"### {_ANSWER}",
              f'Answer only "Response X is better", where X is the number (1 to {len(candidates)}) of the best '
              f'{best}, or "No good one" if none of them is acceptable.']
    return "\n".join(lines)


def pairwise_prompt(dialog_a: Context, dialog_b: Context, *, schema: Schema = DEFAULT_SCHEMA) -> str:
    """The comparison prompt of SAGE.md §6: ``Dialog A`` vs ``Dialog B``; answer ``Dialog X is better``."""
    lines = ["You are comparing two dialogues between a user and a social chatbot. " + PAIRWISE_RUBRIC,
             "Read both dialogues and decide in which one the chatbot is better.", ""]
    for name, d in (("A", dialog_a), ("B", dialog_b)):
        lines += [f"### Dialog {name}", *_turn_lines(as_turns(d, schema)), ""]
    lines += [f"### {_ANSWER}", 'Answer only "Dialog A is better" or "Dialog B is better".']
    return "\n".join(lines)


# One in-context example (the reference annotator uses one).
ANNOTATION_EXAMPLE: dict[str, Any] = {
    "turns": [
        ("user", "I failed my driving test this morning."),
        ("assistant", "Oh no, that's rough. Do you know what went wrong?"),
        ("user", "I panicked at the roundabout. I've been practising for months!"),
        ("assistant", "Roundabouts are scary at first, and nerves happen to everyone. When can you retake it?"),
    ],
    "labels": [
        {"motivation": "venting", "emotion": "disappointed", "topic": ["driving test"]},
        {"motivation": "sympathizing", "emotion": "caring", "topic": ["driving test"]},
        {"motivation": "explaining", "emotion": "frustrated", "topic": ["driving test", "roundabouts"]},
        {"motivation": "encouraging", "emotion": "caring", "topic": ["driving test", "retake"]},
    ],
}


def _annotation_json(turns: Sequence[tuple[str, str]], labels: Sequence[Mapping[str, Any]]) -> str:
    rows = [{"turn": i, "role": role, **lab} for i, ((role, _), lab) in enumerate(zip(turns, labels), 1)]
    return json.dumps({"annotations": rows}, ensure_ascii=False)


def _label_sets(schema: Schema) -> list[str]:
    """``user emotion: a | b | c`` lines for the fields with a closed vocabulary."""
    out = []
    for side, keys in (("user", schema.user_keys), ("assistant", schema.assistant_keys)):
        for key, name in zip(keys, ("motivation", "emotion", "topic")):
            vocab = schema.vocabulary(key)
            if vocab is not None:
                out.append(f"{side} {name}: {' | '.join(vocab.values)}")
    return out


_REWRITE = "Rewriting"  # the section that allows rewrites (parse_prompt reads its presence back)


def annotation_prompt(dialogue: Context, *, schema: Schema = DEFAULT_SCHEMA, example: bool = True,
                      allow_rewrite: bool = True) -> str:
    """The whole-dialogue annotation prompt (SAGE.md §2); the answer is parsed by
    :func:`sage_jax.judge.annotate.parse_annotation`.

    ``allow_rewrite`` (the reference annotator): the annotator may lightly rewrite an utterance for
    readability and must append a short bridging question to an assistant utterance that does not
    end with one, giving the new utterance as the entry's ``"text"``; otherwise only labels."""
    turns = as_turns(dialogue, schema)
    if not turns:
        raise ValueError("annotation_prompt: the dialogue has no user or assistant turn")
    lines = [
        "You are annotating a dialogue between a user and an AI assistant. For every utterance, label the "
        "speaker's motivation (for the user: why they say it, e.g. venting, asking for advice, sharing news; for "
        "the assistant: its strategy, e.g. sympathizing, suggesting, questioning, informing), the speaker's "
        "emotion (one word, e.g. sad, excited, caring) and the topics (a list of short noun phrases). Read the "
        "whole dialogue first: a label may reflect where the conversation goes next.", ""]
    sets = _label_sets(schema)
    if sets:
        lines += [f"### {_LABELS}", "Use only these values (or null) for these fields:", *sets, ""]
    if example:
        ex_turns = ANNOTATION_EXAMPLE["turns"]
        lines += [f"### {_EXAMPLE}", *_turn_lines(ex_turns, numbered=True), "",
                  f"### {_EXAMPLE_OUT}", _annotation_json(ex_turns, ANNOTATION_EXAMPLE["labels"]), ""]
    if allow_rewrite:
        lines += [f"### {_REWRITE}",
                  "You may lightly rewrite an utterance for readability (typos, awkward phrasing), keeping its "
                  "meaning, speaker and tone. When an assistant utterance does not end with a question, append a "
                  "short bridging question that invites the user to keep talking. Give the whole new utterance "
                  'as "text" in its entry; leave "text" out for an utterance you keep as it is. Label the '
                  "utterance as it was meant, not the appended question.", ""]
    text_field = ', and "text": "..." if you rewrote it' if allow_rewrite else ""
    lines += [f"### {_TO_ANNOTATE}", *_turn_lines(turns, numbered=True), "",
              f"### {_OUTPUT}",
              'Return only a JSON object {"annotations": [...]} with exactly '
              f'{len(turns)} entries, one per utterance in order, each of the form {{"turn": N, "role": "user" or '
              '"assistant", "motivation": "...", "emotion": "...", "topic": ["..."]}' + text_field + ". Use null "
              "for an unknown motivation or emotion and [] for no topic. No other text."]
    return "\n".join(lines)


# ---------------------------------------------------------------- parsing our own prompts
@dataclass(frozen=True)
class BestOfKPrompt:
    turns: tuple[tuple[str, str], ...]
    candidates: tuple[str, ...]  # each candidate's first (assistant) turn
    humour: bool
    continuations: tuple[tuple[tuple[str, str], ...], ...] | None = None  # whole futures, when compared


@dataclass(frozen=True)
class PairwisePrompt:
    dialog_a: tuple[tuple[str, str], ...]
    dialog_b: tuple[tuple[str, str], ...]


@dataclass(frozen=True)
class AnnotationPrompt:
    turns: tuple[tuple[str, str], ...]
    label_sets: dict[str, tuple[str, ...]]  # "user emotion" -> allowed values
    allow_rewrite: bool = False  # the prompt allows rewrites ("text") and asks for bridging questions


_HEADING = re.compile(r"### (.+)\Z")
_TURN = re.compile(r"(?:\[(\d+)\] )?(User|Assistant): (.*)\Z", re.S)
_RESPONSE = re.compile(r"Response (\d+): (.*)\Z", re.S)


def _sections(text: str) -> tuple[str, dict[str, list[str]]]:
    """(preamble, {title: lines}) of a prompt; a repeated title keeps its first section."""
    pre: list[str] = []
    sections: dict[str, list[str]] = {}
    cur = pre
    for line in text.split("\n"):
        m = _HEADING.match(line)
        if m:
            cur = [] if m.group(1) in sections else sections.setdefault(m.group(1), [])
            continue
        cur.append(line)
    return "\n".join(pre), sections


def _items(lines: Sequence[str], pattern: re.Pattern) -> list[tuple[re.Match, list[str]]]:
    """Items of a section: a column-0 line matching ``pattern`` plus its indented continuation lines."""
    items: list[tuple[re.Match, list[str]]] = []
    for line in lines:
        if line.startswith(_INDENT) and items:
            items[-1][1].append(line)
            continue
        m = pattern.match(line)
        if m:
            items.append((m, []))
    return items


def _turn_items(lines: Sequence[str], numbered: bool) -> tuple[tuple[str, str], ...] | None:
    out = []
    for i, (m, more) in enumerate(_items(lines, _TURN), 1):
        if numbered and (m.group(1) is None or int(m.group(1)) != i):
            return None
        out.append((_LABEL_ROLE[m.group(2)], decode_text(m.group(3), more)))
    return tuple(out)


def parse_prompt(text: str) -> BestOfKPrompt | PairwisePrompt | AnnotationPrompt | None:
    """Read back a prompt built by this module (for the ``rules:`` judge); None if it is not one."""
    if not isinstance(text, str):
        return None
    pre, sec = _sections(text)
    if _CANDIDATES in sec and _DIALOGUE in sec:
        turns = _turn_items(sec[_DIALOGUE], numbered=False)
        items = _items(sec[_CANDIDATES], _RESPONSE)
        if turns is None or not items or [int(m.group(1)) for m, _ in items] != list(range(1, len(items) + 1)):
            return None
        cands = tuple(decode_text(m.group(2), more) for m, more in items)
        return BestOfKPrompt(turns, cands, humour=pre.startswith("You are judging how funny"))
    futures = sorted((int(m.group(1)), t) for t in sec if (m := re.fullmatch(_RESPONSE_SECTION + r" (\d+)", t)))
    if _DIALOGUE in sec and futures:
        turns = _turn_items(sec[_DIALOGUE], numbered=False)
        conts = tuple(_turn_items(sec[t], numbered=False) for _, t in futures)
        if (turns is None or [n for n, _ in futures] != list(range(1, len(futures) + 1))
                or any(not c or c[0][0] != "assistant" for c in conts)):
            return None
        return BestOfKPrompt(turns, tuple(c[0][1] for c in conts), humour=pre.startswith("You are judging how funny"),
                             continuations=conts)
    if "Dialog A" in sec and "Dialog B" in sec:
        a, b = _turn_items(sec["Dialog A"], False), _turn_items(sec["Dialog B"], False)
        return None if a is None or b is None else PairwisePrompt(a, b)
    if _TO_ANNOTATE in sec:
        turns = _turn_items(sec[_TO_ANNOTATE], numbered=True)
        if not turns:
            return None
        sets: dict[str, tuple[str, ...]] = {}
        for line in sec.get(_LABELS, []):
            m = re.match(r"(user|assistant) (motivation|emotion|topic): (.+)\Z", line)
            if m:
                sets[f"{m.group(1)} {m.group(2)}"] = tuple(v.strip() for v in m.group(3).split("|"))
        return AnnotationPrompt(turns, sets, allow_rewrite=_REWRITE in sec)
    return None
