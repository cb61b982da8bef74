"""Count XLA compilations (programs and seconds) while a block of code runs.

    with CompileCounter() as cc:
        run_search(cfg)
    cc.count, cc.seconds, cc.by_function      # e.g. 14, 21.3, {"jit(decode)": 4, ...}

Listens to JAX's own monitoring event `/jax/core/compile/backend_compile_duration` (recorded once
per backend compilation, i.e. a cache miss of a jitted function or of an eager op on a new shape),
so every program counts, ours or JAX's. A program loaded from the persistent compilation cache
(`sage_jax.compile_cache`) counts there too, and in `cached` as well (JAX's
`/jax/compilation_cache/cache_hits`). One process-wide listener feeds all open counters.
"""

from __future__ import annotations

import collections
import threading

BACKEND_COMPILE_EVENT = "/jax/core/compile/backend_compile_duration"
CACHE_HIT_EVENT = "/jax/compilation_cache/cache_hits"

_lock = threading.Lock()
_active: list["CompileCounter"] = []
_installed = False


def _listener(event: str, duration: float, **kwargs) -> None:
    if event != BACKEND_COMPILE_EVENT:
        return
    name = str(kwargs.get("fun_name", "?"))
    with _lock:
        for c in _active:
            c.count += 1
            c.seconds += float(duration)
            c.by_function[name] += 1


def _hit_listener(event: str, **kwargs) -> None:
    if event != CACHE_HIT_EVENT:
        return
    with _lock:
        for c in _active:
            c.cached += 1


def _install() -> None:
    global _installed
    with _lock:
        if _installed:
            return
        import jax.monitoring

        jax.monitoring.register_event_duration_secs_listener(_listener)
        jax.monitoring.register_event_listener(_hit_listener)
        _installed = True


class CompileCounter:
    """Backend compilations seen between __enter__ and __exit__ (nestable, thread-safe)."""

    def __init__(self):
        self.count = 0
        self.cached = 0  # of count: loaded from the persistent compilation cache
        self.seconds = 0.0
        self.by_function: collections.Counter[str] = collections.Counter()

    def __enter__(self) -> "CompileCounter":
        _install()
        with _lock:
            _active.append(self)
        return self

    def __exit__(self, *exc) -> None:
        with _lock:
            if self in _active:
                _active.remove(self)

    def summary(self, top: int = 40) -> dict:
        return {"count": self.count, "cached": self.cached, "seconds": round(self.seconds, 3),
                "by_function": dict(self.by_function.most_common(top))}

    def __str__(self) -> str:
        cached = f" ({self.cached} loaded from the compilation cache)" if self.cached else ""
        return f"{self.count} programs{cached}, {self.seconds:.1f} s"
