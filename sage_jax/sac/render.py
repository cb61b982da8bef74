"""Rendering SAC latents into assistant messages, and dialogues into chat messages.

An assistant message is the state of the user turn just read, then this turn's action, then the
reply (SAGE.md §1): ``{u_...} {a_...} reply``. User messages never carry latents.
"""

from __future__ import annotations

from sage_jax.sac.dialogue import Dialogue, Latent
from sage_jax.sac.errors import SACFormatError
from sage_jax.sac.schema import DEFAULT_SCHEMA, Schema, Side

__all__ = ["render_latent", "render_latents", "render_assistant", "to_messages"]


def render_latent(latent: Latent, side: Side, schema: Schema = DEFAULT_SCHEMA, *,
                  special_tokens: bool = False) -> str:
    """One block: ``{u_motivation: x, u_emotion: y, u_topic: [a, b]}`` (or between latent tokens)."""
    schema.validate_latent(latent, side)
    d = schema.delimiters(special_tokens)
    opn, cls = (d.state_open, d.state_close) if side == "user" else (d.action_open, d.action_close)
    k_mot, k_emo, k_top = schema.keys(side)
    ks, sep, fmt = schema.key_sep + " ", schema.sep + " ", schema.format_value
    topics = sep.join(fmt(t) for t in latent.topic)
    body = sep.join((f"{k_mot}{ks}{fmt(latent.motivation)}", f"{k_emo}{ks}{fmt(latent.emotion)}",
                     f"{k_top}{ks}{schema.list_open}{topics}{schema.list_close}"))
    return f"{opn}{body}{cls}"


def render_latents(state: Latent, action: Latent, schema: Schema = DEFAULT_SCHEMA, *,
                   special_tokens: bool = False) -> str:
    """The latent prefix of an assistant message: the state block, then the action block."""
    d = schema.delimiters(special_tokens)
    return (render_latent(state, "user", schema, special_tokens=special_tokens) + d.block_sep
            + render_latent(action, "assistant", schema, special_tokens=special_tokens))


def render_assistant(state: Latent | None, action: Latent | None, reply: str, schema: Schema = DEFAULT_SCHEMA,
                     *, special_tokens: bool = False) -> str:
    """A full assistant message. Both latents None (unannotated data) gives the bare reply."""
    if state is None and action is None:
        return reply
    if state is None or action is None:
        missing = "state (of the preceding user turn)" if state is None else "action"
        raise SACFormatError(f"half-annotated turn: the {missing} is missing; annotate both or neither")
    d = schema.delimiters(special_tokens)
    return render_latents(state, action, schema, special_tokens=special_tokens) + d.reply_sep + reply


def to_messages(dialogue: Dialogue, schema: Schema = DEFAULT_SCHEMA, *, special_tokens: bool = False,
                include_system: bool = True) -> list[dict[str, str]]:
    """Chat messages ``[{"role", "content"}]``: optional system first, user text, assistant latents + reply."""
    msgs: list[dict[str, str]] = []
    if include_system and dialogue.system is not None:
        msgs.append({"role": "system", "content": dialogue.system})
    prev_state: Latent | None = None
    for i, t in enumerate(dialogue.turns):
        want = "user" if i % 2 == 0 else "assistant"
        if t.role != want:  # Dialogue validates on construction; re-check for objects built around it
            raise SACFormatError(f"expected role {want!r}, got {t.role!r} (a dialogue starts with a user turn "
                                 "and alternates)", f"{dialogue.id}: turns[{i}].role")
        if t.role == "user":
            msgs.append({"role": "user", "content": t.text})
            prev_state = t.state
            continue
        where = f"{dialogue.id}: turns[{i}]"
        if (prev_state is None) != (t.action is None):
            missing = f"turns[{i - 1}].state" if prev_state is None else f"turns[{i}].action"
            raise SACFormatError(f"half-annotated exchange: {missing} is missing; annotate both or neither", where)
        if prev_state is not None:  # closed vocabularies, with the field named
            schema.validate_latent(prev_state, "user", f"{dialogue.id}: turns[{i - 1}].state")
            schema.validate_latent(t.action, "assistant", f"{where}.action")
        content = render_assistant(prev_state, t.action, t.text, schema, special_tokens=special_tokens)
        msgs.append({"role": "assistant", "content": content})
    return msgs
