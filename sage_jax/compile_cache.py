"""The persistent XLA compilation cache of the entry points (`sage-jax ...`, `python -m experiments.X`).

A search on SmolLM2 spends ~30 s compiling before its first token (~100 s at search scale in the
decode layout), and a sweep or a rerun compiles the same programs again. With this cache a program
compiled once is loaded from disk by every later process with the same shapes, flags and devices
(JAX's own cache, as MaxText's `jax_cache_dir`): a 4-seed, 3-turn, K=4 SmolLM2 search took 91.5 s,
then 59.0 s the second time (its programs: 32.9 s compiling, then 3.3 s).

Where: ``$JAX_COMPILATION_CACHE_DIR`` when set (JAX's variable: a local path, or ``gs://...`` shared
by a pod's hosts), else ``<cache root>/xla`` (``$SAGE_JAX_CACHE`` or ``~/.cache/sage_jax``), kept
under 4 GiB by evicting the least recently used programs unless ``JAX_COMPILATION_CACHE_MAX_SIZE``
says otherwise (eviction also locks the directory, so concurrent runs may share it). Off:
``JAX_ENABLE_COMPILATION_CACHE=false``. Programs compiled in less than
``JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS`` (JAX's default: 1 s) are not stored.

Set through the environment, so JAX need not be imported yet and child processes (a sweep's
cells) share the choice; when JAX is already imported its config is updated as well.
"""

from __future__ import annotations

import os
import sys

from sage_jax import cache_root

MAX_BYTES = 4 << 30
_FALSE = ("0", "false", "f", "no", "n", "off")


def enable() -> str | None:
    """Turn the cache on for this process and its children, unless the environment chose
    otherwise; call it before the first compilation. Returns the directory, None when off."""
    if os.environ.get("JAX_ENABLE_COMPILATION_CACHE", "true").strip().lower() in _FALSE:
        return None
    ours = not os.environ.get("JAX_COMPILATION_CACHE_DIR")
    if ours:
        os.environ["JAX_COMPILATION_CACHE_DIR"] = str(cache_root() / "xla")
        os.environ.setdefault("JAX_COMPILATION_CACHE_MAX_SIZE", str(MAX_BYTES))
    path = os.environ["JAX_COMPILATION_CACHE_DIR"]
    jax = sys.modules.get("jax")  # already imported: it read the environment then
    if jax is not None and jax.config.jax_enable_compilation_cache and jax.config.jax_compilation_cache_dir is None:
        jax.config.update("jax_compilation_cache_dir", path)
        if ours and jax.config.jax_compilation_cache_max_size == -1:
            jax.config.update("jax_compilation_cache_max_size", int(os.environ["JAX_COMPILATION_CACHE_MAX_SIZE"]))
    return path
