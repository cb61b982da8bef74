"""The State-Action Chain (SAC): one schema for training, rollouts and the judge (DESIGN.md §3).

    from sage_jax.sac import Latent, Turn, Dialogue, DEFAULT_SCHEMA, render_assistant, parse_assistant

* data model: :class:`Latent`, :class:`Turn`, :class:`Dialogue`; JSON via :func:`dialogue_to_json` /
  :func:`dialogue_from_json`;
* :class:`Schema`: field names, delimiters, quoting, closed vocabularies, latent special tokens;
* rendering: :func:`render_assistant`, :func:`render_latents`, :func:`to_messages`;
* parsing: :func:`parse_assistant` (strict, raises :class:`LatentParseError`),
  :func:`parse_assistant_lenient` (model output), :func:`strip_latents`.

Pure Python: this package must not import JAX.
"""

from sage_jax.sac.dialogue import (Dialogue, Latent, Role, Turn, dialogue_from_json, dialogue_to_json,
                                   latent_from_json, latent_to_json)
from sage_jax.sac.errors import LatentParseError, SACError, SACFormatError
from sage_jax.sac.parse import (LenientParse, ParsedAssistant, detect_special_tokens, parse_assistant,
                                parse_assistant_lenient, strip_latents)
from sage_jax.sac.render import render_assistant, render_latent, render_latents, to_messages
from sage_jax.sac.schema import DEFAULT_SCHEMA, Delimiters, Schema, Side
from sage_jax.sac.validate import check_dialogue
from sage_jax.sac.vocab import (DAILYDIALOG_ACTS, DAILYDIALOG_EMOTIONS, ED_EMOTIONS, ED_INTENTS, ESCONV_STRATEGIES,
                                VOCABULARIES, Vocabulary, get_vocabulary)

__all__ = [
    "Latent", "Turn", "Dialogue", "Role", "dialogue_to_json", "dialogue_from_json", "latent_to_json",
    "latent_from_json", "SACError", "SACFormatError", "LatentParseError", "Schema", "Side", "Delimiters",
    "DEFAULT_SCHEMA", "render_latent", "render_latents", "render_assistant", "to_messages", "ParsedAssistant",
    "LenientParse", "parse_assistant", "parse_assistant_lenient", "strip_latents", "detect_special_tokens",
    "check_dialogue", "Vocabulary", "VOCABULARIES", "get_vocabulary", "ED_EMOTIONS", "ED_INTENTS",
    "ESCONV_STRATEGIES", "DAILYDIALOG_ACTS", "DAILYDIALOG_EMOTIONS",
]
