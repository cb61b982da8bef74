"""SAC dialogue files -> token examples: reading, the train/eval split, and chat-template encoding
with the assistant-only loss mask (shared by SFT, DPO and the latent-accuracy evaluation)."""

from __future__ import annotations

import random
import sys

from sage_jax.data.jsonl import read_sac
from sage_jax.data.tokenize import encode_many
from sage_jax.sac import DEFAULT_SCHEMA, strip_latents, to_messages


def latent_chars(content: str) -> int:
    """Characters of an assistant content's latent prefix (0 if it has none)."""
    reply = strip_latents(content)
    if reply == content:
        return 0
    return len(content[: len(content) - len(reply)].rstrip())


def read_dialogues(files, strict: bool):
    """The dialogues of SAC JSONL ``files``, in order; malformed records are skipped with a note
    on stderr (``strict``: the first one raises)."""
    out = []
    for f in files:
        dialogues, report = read_sac(f, strict=strict)
        if report.skipped:
            shown = "; ".join(str(e) for e in report.errors[:3])
            print(f"{f}: skipped {report.skipped} malformed record(s): {shown}", file=sys.stderr)
        out.extend(dialogues)
    return out


def encode_dialogues(dialogues, tokenizer, template, seq_len: int, latent_tokens: bool, desc: str):
    """Token examples (chat template, assistant-only loss mask, latent spans marked) of at most
    ``seq_len + 1`` tokens; a one-line summary of what was kept goes to stderr."""
    messages = [to_messages(d, DEFAULT_SCHEMA, special_tokens=latent_tokens) for d in dialogues]
    examples, stats = encode_many(messages, tokenizer, template, max_len=seq_len + 1, latent_chars=latent_chars)
    print(f"{desc}: {stats.kept}/{stats.dialogues} dialogues, {stats.tokens} tokens "
          f"({stats.supervised_tokens} supervised); truncated {stats.truncated} (turns dropped "
          f"{stats.turns_dropped}), dropped too long {stats.dropped_too_long}, "
          f"no assistant turn {stats.dropped_no_assistant}", file=sys.stderr)
    return examples


def split_eval(items, fraction: float, seed: int):
    """(train, held out): a seeded ``fraction`` of ``items`` held out (at least one when there are two)."""
    idx = list(range(len(items)))
    random.Random(seed).shuffle(idx)
    n_eval = max(1, int(round(len(idx) * fraction))) if fraction > 0 and len(idx) > 1 else 0
    held = set(idx[:n_eval])
    return [d for i, d in enumerate(items) if i not in held], [d for i, d in enumerate(items) if i in held]
