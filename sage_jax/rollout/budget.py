"""Reply budgets that do not count the latent prefix (SAGE.md §1: the prefix comes first).

A SAC model spends about 45 SmolLM2 tokens on `{u_...} {a_...}` before its reply, so a budget of
`max_new_tokens` for the whole message leaves a SAC model a few tokens of reply where a plain
model gets them all. Callers generate with `max_new_tokens + allowance` and then `cut_reply`
keeps the latent prefix and at most `max_reply` tokens after it: decoding is causal, so the kept
tokens are exactly what a budget of (prefix length + max_reply) would have produced.
"""

from __future__ import annotations

from typing import Sequence

from sage_jax.sac import DEFAULT_SCHEMA, Schema, parse_assistant_lenient

DEFAULT_ALLOWANCE = 96  # tokens a latent prefix may take on top of a reply budget (two blocks of 48)


def prefix_length(decode, tokens: Sequence[int], schema: Schema = DEFAULT_SCHEMA) -> int:
    """Tokens of the complete latent prefix (state and action blocks) at the start of `tokens`, 0 if
    there is none. `decode`: token ids -> text. Binary search: completeness is monotone in length."""
    def complete(n: int) -> bool:  # both blocks closed: the probe after them is left as reply
        p = parse_assistant_lenient(decode(list(tokens[:n])) + " \u2063", schema)
        return p.state is not None and p.action is not None and p.reply.endswith("\u2063")

    if not tokens or not complete(len(tokens)):
        return 0
    lo, hi = 1, len(tokens)
    while lo < hi:
        mid = (lo + hi) // 2
        if complete(mid):
            hi = mid
        else:
            lo = mid + 1
    return lo


def needs_allowance(decode, tokens: Sequence[int], finish_reason: str, schema: Schema = DEFAULT_SCHEMA) -> bool:
    """Whether a message that ran out of tokens started with a latent prefix (then its reply budget
    was spent on the prefix, and it is worth generating again with the allowance)."""
    return finish_reason == "length" and decode(list(tokens)).lstrip().startswith(schema.delimiters(False).state_open)


def cut_reply(decode, tokens: Sequence[int], max_reply: int, schema: Schema = DEFAULT_SCHEMA
              ) -> tuple[list[int], bool]:
    """(the latent prefix + at most `max_reply` tokens after it, whether anything was cut)."""
    n = prefix_length(decode, tokens, schema) + int(max_reply)
    return list(tokens[:n]), len(tokens) > n
