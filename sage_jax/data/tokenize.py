"""Chat-template tokenization with an exact SFT loss mask.

Supervised = every assistant turn's content (latent prefix + reply, as the template renders it)
plus the end-of-turn token that closes it; nothing else (system/user turns, role headers, the
generation prompt, template whitespace after the end token).

How the spans are found, without `{% generation %}` tags: render the conversation once for real
and once with each assistant content replaced by a sentinel. Splitting the sentinel render gives
the exact template text between assistant contents, so walking the real render piece by piece
yields each content's character span (markup-looking text inside a message cannot confuse it).
The real render is tokenized in one piece (identical to ``apply_chat_template(tokenize=True)``,
so no drift at boundaries) and a token is supervised iff its characters overlap a span. A token
straddling a boundary (byte-level BPE fuses the space in Mistral's "[/INST] {" into " {") is
therefore supervised when it carries reply text: the first reply token is always a target.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from typing import Callable

import numpy as np

from sage_jax.data.templates import resolve_template

__all__ = ["Encoded", "EncodeStats", "assistant_char_spans", "encode_dialogue", "encode_many"]

_SENTINEL = "\ue000{}\ue001"  # private-use code points: never produced by a template
_SENTINEL_RE = re.compile("\ue000(\\d+)\ue001")


@dataclass(frozen=True)
class Encoded:
    """One dialogue. `loss_mask[t]` is True iff `tokens[t]` is a supervised target (aligned with
    tokens; the trainer uses inputs = tokens[:-1], targets = tokens[1:], mask = loss_mask[1:])."""

    tokens: np.ndarray  # int32 [T]
    loss_mask: np.ndarray  # bool [T]
    truncated_turns: int = 0  # messages dropped from the end to fit max_len
    # Tokens inside the latent state-action prefix of an assistant turn (see `latent_chars`).
    latent_mask: np.ndarray | None = None


def _render(tokenizer, messages, jinja: str) -> str:
    return tokenizer.apply_chat_template(messages, chat_template=jinja, tokenize=False)


def assistant_char_spans(
    messages, tokenizer, jinja: str, end_of_turn: str
) -> tuple[str, list[tuple[int, int, int]]]:
    """Render `messages`; return ``(text, [(message_index, start, end), ...])`` where
    ``text[start:end]`` is an assistant turn's content followed by its end-of-turn token."""
    if any("\ue000" in m["content"] for m in messages):
        raise ValueError("message content contains U+E000, reserved as a sentinel")
    text = _render(tokenizer, messages, jinja)
    which = [i for i, m in enumerate(messages) if m["role"] == "assistant"]
    masked = [dict(m) for m in messages]
    for k, i in enumerate(which):
        masked[i]["content"] = _SENTINEL.format(k)
    parts = _SENTINEL_RE.split(_render(tokenizer, masked, jinja))
    pieces, order = parts[0::2], [int(k) for k in parts[1::2]]
    if order != list(range(len(which))):
        raise ValueError(f"template renders assistant messages as {order}, expected each once in order")

    spans, pos = [], 0
    for k, i in enumerate(which):
        if not text.startswith(pieces[k], pos):
            raise ValueError("template renders differently when assistant content changes; cannot align")
        pos += len(pieces[k])
        content, nxt = messages[i]["content"], pieces[k + 1]
        # Templates may trim content (Llama-3 does); accept the first rendering that fits exactly.
        for cand in dict.fromkeys((content, content.strip(), content.lstrip(), content.rstrip())):
            if text.startswith(cand, pos) and text.startswith(nxt, pos + len(cand)):
                break
        else:
            raise ValueError(f"cannot find assistant message {i} in the rendered text")
        if not nxt.startswith(end_of_turn):
            raise ValueError(f"assistant turn is not closed by {end_of_turn!r}: {nxt[:40]!r}")
        spans.append((i, pos, pos + len(cand) + len(end_of_turn)))
        pos += len(cand)
    if text[pos:] != pieces[-1]:
        raise ValueError("rendered text does not end as the template's last piece")
    return text, spans


def encode_dialogue(
    messages, tokenizer, *, template: str | None = None, max_len: int | None = None,
    latent_chars: Callable[[str], int] | None = None,
) -> Encoded | None:
    """Tokenize a chat (list of ``{"role", "content"}``) with its assistant-turn loss mask.

    `template`: None (the tokenizer's own chat template), a built-in name ("chatml", "mistral",
    "llama3"; see `apply_template`) or a raw jinja string. With `max_len` (bound on len(tokens)),
    an over-long dialogue is cut right after the end-of-turn token of the last assistant turn that
    fits, and the dropped messages are counted in `truncated_turns`. Returns None when nothing
    supervised remains (no assistant turn, or the first exchange alone exceeds `max_len`).
    `latent_chars(content)` gives the length of an assistant content's latent prefix; the tokens
    overlapping it form `latent_mask` (for latent-prediction accuracy).
    """
    jinja, eot = resolve_template(tokenizer, template)
    text, spans = assistant_char_spans(messages, tokenizer, jinja, eot)
    if not spans:
        return None
    enc = tokenizer(text, add_special_tokens=False, return_offsets_mapping=True)
    tokens = np.asarray(enc["input_ids"], dtype=np.int32)
    offsets = np.asarray(enc["offset_mapping"], dtype=np.int64).reshape(-1, 2)
    ends = offsets[:, 1]
    # A token covers [start, end); tokenizers that trim whitespace off offsets leave gaps, so
    # extend each start back to the previous token's end (tokens tile the text).
    prev_end = np.concatenate([[0], ends[:-1]])
    starts = np.minimum(offsets[:, 0], prev_end)

    mask = np.zeros(len(tokens), dtype=bool)
    latent = np.zeros(len(tokens), dtype=bool) if latent_chars is not None else None
    cuts = []  # (number of tokens up to and including this turn's end token, message index)
    for i, s, e in spans:
        mask |= (starts < e) & (ends > s)
        if latent is not None:
            n_latent = latent_chars(messages[i]["content"])
            latent |= (starts < s + n_latent) & (ends > s) & (n_latent > 0)
        n = int(np.searchsorted(ends, e, side="right"))
        if n == 0 or ends[n - 1] != e:
            raise ValueError(f"end-of-turn of message {i} is not a token boundary")
        cuts.append((n, i))

    if max_len is None or len(tokens) <= max_len:
        return Encoded(tokens, mask, 0, latent)
    fitting = [(n, i) for n, i in cuts if n <= max_len]
    if not fitting:
        return None
    n, i = fitting[-1]
    return Encoded(tokens[:n], mask[:n], len(messages) - (i + 1), None if latent is None else latent[:n])


@dataclass
class EncodeStats:
    dialogues: int = 0
    kept: int = 0
    truncated: int = 0  # kept, but later turns dropped to fit max_len
    turns_dropped: int = 0
    dropped_too_long: int = 0  # first exchange alone exceeds max_len
    dropped_no_assistant: int = 0
    tokens: int = 0
    supervised_tokens: int = 0
    dropped_indices: list[int] = field(default_factory=list)


def encode_many(
    dialogues_messages,
    tokenizer,
    template: str | None = None,
    max_len: int | None = None,
    *,
    progress: bool = True,
    latent_chars: Callable[[str], int] | None = None,
) -> tuple[list[Encoded], EncodeStats]:
    """Encode many chats; returns the kept encodings (input order) and counts of what was cut."""
    from sage_jax.progress import progress as progress_bar

    out, st = [], EncodeStats()
    total = len(dialogues_messages) if hasattr(dialogues_messages, "__len__") else None
    bar = progress_bar(total, "tokenize", unit="dlg", show=progress)
    for idx, messages in enumerate(dialogues_messages):
        bar.update(1)
        st.dialogues += 1
        try:
            enc = encode_dialogue(messages, tokenizer, template=template, max_len=max_len, latent_chars=latent_chars)
        except Exception as e:
            raise ValueError(f"dialogue {idx}: {e}") from e
        if enc is None:
            st.dropped_indices.append(idx)
            if any(m["role"] == "assistant" for m in messages):
                st.dropped_too_long += 1
            else:
                st.dropped_no_assistant += 1
            continue
        out.append(enc)
        st.kept += 1
        st.truncated += enc.truncated_turns > 0
        st.turns_dropped += enc.truncated_turns
        st.tokens += len(enc.tokens)
        st.supervised_tokens += int(enc.loss_mask.sum())
    bar.close()
    return out, st
