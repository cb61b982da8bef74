"""sage-jax: SAGE (State-Action Chain dialogue steering) in JAX/Flax."""

import os
from pathlib import Path

__version__ = "0.1.0"


def cache_root() -> Path:
    """Where sage-jax keeps what it can rebuild: ``$SAGE_JAX_CACHE`` or ``~/.cache/sage_jax``
    (``models/`` the converted SmolLM2, ``judge/`` shared completions, ``xla/`` compiled programs)."""
    return Path(os.environ.get("SAGE_JAX_CACHE") or Path.home() / ".cache" / "sage_jax")
