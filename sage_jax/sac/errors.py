"""Typed errors of the State-Action Chain: every problem names a field or a character offset."""

from __future__ import annotations

__all__ = ["SACError", "SACFormatError", "LatentParseError"]


class SACError(ValueError):
    """Base class of every SAC error (a ValueError, so CLIs print it as one clear line)."""


class SACFormatError(SACError):
    """A dialogue, turn or latent that breaks the SAC format; ``field`` is a path like ``turns[3].state.topic``."""

    def __init__(self, message: str, field: str = ""):
        self.message, self.field = message, field
        super().__init__(f"{field}: {message}" if field else message)


class LatentParseError(SACError):
    """Latent text that does not parse; ``position`` is the character offset of the problem."""

    def __init__(self, message: str, position: int):
        self.message, self.position = message, position
        super().__init__(f"{message} (at offset {position})")
