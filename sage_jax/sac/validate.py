"""Content checks beyond the structure every :class:`Dialogue` already guarantees."""

from __future__ import annotations

from sage_jax.sac.dialogue import Dialogue
from sage_jax.sac.errors import SACFormatError
from sage_jax.sac.schema import Schema

__all__ = ["check_dialogue"]


def check_dialogue(d: Dialogue, schema: Schema | None = None, *, require_text: bool = True,
                   require_latents: bool = False) -> None:
    """Raise :class:`SACFormatError` naming the field if ``d`` is unfit for training data.

    Always: no exchange is half annotated (a user state without the next assistant action, or the
    reverse). ``require_text``: every turn has non-blank text. ``schema``: values lie in its
    closed vocabularies. ``require_latents``: every turn is annotated.
    """
    for i, t in enumerate(d.turns):
        if require_text and not t.text.strip():
            raise SACFormatError("empty text", f"turns[{i}].text")
        key = "state" if t.role == "user" else "action"
        if t.latent is None:
            if require_latents:
                raise SACFormatError("missing (annotate every turn)", f"turns[{i}].{key}")
        elif schema is not None:
            schema.validate_latent(t.latent, t.role, f"turns[{i}].{key}")
        if t.role == "assistant" and (t.action is None) != (d.turns[i - 1].state is None):
            missing = f"turns[{i - 1}].state" if t.action is not None else f"turns[{i}].action"
            raise SACFormatError("half-annotated exchange; annotate both or neither", missing)
