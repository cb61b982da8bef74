"""Named closed vocabularies for latent fields (optional: the paper's labels are free text).

A closed vocabulary turns a latent field into a categorical variable, which is what clean
branching over states needs (SAGE.md §7). ``null`` is always allowed.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass

__all__ = ["Vocabulary", "VOCABULARIES", "ED_EMOTIONS", "ED_INTENTS", "ESCONV_STRATEGIES",
           "DAILYDIALOG_ACTS", "DAILYDIALOG_EMOTIONS", "get_vocabulary"]


@dataclass(frozen=True)
class Vocabulary:
    """An ordered set of allowed values (exact, case-sensitive match)."""

    name: str
    values: tuple[str, ...]

    def __post_init__(self):
        if not self.values:
            raise ValueError(f"vocabulary {self.name!r} is empty")
        if len(set(self.values)) != len(self.values):
            raise ValueError(f"vocabulary {self.name!r} has duplicate values")
        for v in self.values:
            if not isinstance(v, str) or not v:
                raise ValueError(f"vocabulary {self.name!r}: values must be non-empty strings, got {v!r}")

    def __contains__(self, value: object) -> bool:
        return value in self._set

    def __iter__(self):
        return iter(self.values)

    def __len__(self) -> int:
        return len(self.values)

    @property
    def _set(self) -> frozenset[str]:  # frozen dataclass: computed lazily, cached on the instance
        try:
            return self.__dict__["_cached_set"]
        except KeyError:
            s = frozenset(self.values)
            object.__setattr__(self, "_cached_set", s)
            return s

    def describe(self, limit: int = 8) -> str:
        shown = ", ".join(self.values[:limit])
        return f"{self.name} ({shown}{', ...' if len(self.values) > limit else ''})"


# The 32 situation emotions of EmpatheticDialogues (Rashkin et al. 2019).
ED_EMOTIONS = Vocabulary("ed_emotions", (
    "afraid", "angry", "annoyed", "anticipating", "anxious", "apprehensive", "ashamed", "caring",
    "confident", "content", "devastated", "disappointed", "disgusted", "embarrassed", "excited",
    "faithful", "furious", "grateful", "guilty", "hopeful", "impressed", "jealous", "joyful",
    "lonely", "nostalgic", "prepared", "proud", "sad", "sentimental", "surprised", "terrified",
    "trusting"))

# The 8 empathetic response intents of the EDOS taxonomy (Welivita & Pu 2020) used by the
# ``ei_auto_label`` of our ED copy (the other labels are the 32 emotions and "neutral").
ED_INTENTS = Vocabulary("ed_intents", (
    "questioning", "acknowledging", "agreeing", "consoling", "encouraging", "suggesting",
    "sympathizing", "wishing"))

# The 8 support strategies of ESConv (Liu et al. 2021), spelled as in its dialogues.
ESCONV_STRATEGIES = Vocabulary("esconv_strategies", (
    "Question", "Restatement or Paraphrasing", "Reflection of feelings", "Self-disclosure",
    "Affirmation and Reassurance", "Providing Suggestions", "Information", "Others"))

# DailyDialog (Li et al. 2017) dialogue acts 1-4 and emotions 1-6 (0, "no emotion", maps to null).
DAILYDIALOG_ACTS = Vocabulary("dailydialog_acts", ("inform", "question", "directive", "commissive"))
DAILYDIALOG_EMOTIONS = Vocabulary("dailydialog_emotions",
                                  ("anger", "disgust", "fear", "happiness", "sadness", "surprise"))

VOCABULARIES: dict[str, Vocabulary] = {v.name: v for v in (
    ED_EMOTIONS, ED_INTENTS, ESCONV_STRATEGIES, DAILYDIALOG_ACTS, DAILYDIALOG_EMOTIONS)}


def get_vocabulary(name: str, extra: dict[str, Iterable[str]] | None = None) -> Vocabulary:
    """A named vocabulary: ``extra`` (user-defined) first, then the built-in ones."""
    if extra and name in extra:
        return Vocabulary(name, tuple(extra[name]))
    try:
        return VOCABULARIES[name]
    except KeyError:
        known = sorted({*VOCABULARIES, *(extra or {})})
        raise ValueError(f"unknown vocabulary {name!r}; known: {', '.join(known)}") from None
