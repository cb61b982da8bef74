"""Count XLA compilations (programs and seconds) while a block of code runs.

    with CompileCounter() as cc:
        run_search(cfg)
    cc.count, cc.seconds, cc.by_function      # e.g. 14, 21.3, {"jit(decode)": 4, ...}

Listens to JAX's own monitoring event `/jax/core/compile/backend_compile_duration` (recorded once
per backend compilation, i.e. a cache miss of a jitted function or of an eager op on a new shape),
so every program counts, ours or JAX's. One process-wide listener feeds all open counters.
"""

from __future__ import annotations

import collections
import threading

BACKEND_COMPILE_EVENT = "/jax/core/compile/backend_compile_duration"

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


def _install() -> None:
    global _installed
    with _lock:
        if _installed:
            return
        import jax.monitoring

        jax.monitoring.register_event_duration_secs_listener(_listener)
        _installed = True


class CompileCounter:
    """Backend compilations seen between __enter__ and __exit__ (nestable, thread-safe)."""

    def __init__(self):
        self.count = 0
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
        return {"count": self.count, "seconds": round(self.seconds, 3),
                "by_function": dict(self.by_function.most_common(top))}

    def __str__(self) -> str:
        return f"{self.count} compilations, {self.seconds:.1f} s"
