"""Preemption (SIGTERM) handling for training loops.

Usage::

    with PreemptionGuard() as guard:
        for step in range(start, total):
            state, metrics = train_step(state, batch)
            if guard.should_stop(step + 1):          # the same answer on every host
                ckpt.save(step + 1, state=state, data_state=it.get_state(), force=True)
                ckpt.wait()
                break
    # exit 0: the scheduler restarts the job, which resumes from the checkpoint

``guard.requested`` is this process's own flag (set by the signal handler).
``guard.should_stop(step)`` is the decision every host must take together:

- one process: a plain read of the flag;
- several processes with JAX's preemption sync manager (``jax.distributed.initialize`` starts it
  unless ``jax_enable_preemption_service`` is off): ``multihost_utils.reached_preemption_sync_point``,
  which the coordination service turns true on all hosts at the same step once any host got
  SIGTERM. In this mode the guard leaves SIGTERM to JAX's own (C++) handler; a Python handler
  would replace it and the service would never hear of the preemption;
- several processes without it: the flags are OR-ed across hosts with
  ``multihost_utils.process_allgather`` every ``sync_every`` steps.

In the multi-process modes every host must call ``should_stop`` at every step (it is a
collective), from the same starting step.
"""

from __future__ import annotations

import logging
import signal
import threading
import time
from typing import Iterable

import jax
import numpy as np

log = logging.getLogger(__name__)


def _jax_preemption_sync_available() -> bool:
    """Whether ``jax.distributed`` runs a preemption sync manager in this process."""
    try:
        from jax._src import distributed as _dist  # the manager is not exposed publicly
    except ImportError:  # pragma: no cover
        return False
    state = getattr(_dist, "global_state", None)
    return (getattr(state, "client", None) is not None
            and getattr(state, "preemption_sync_manager", None) is not None)


class PreemptionGuard:
    """Context manager that turns preemption signals into a flag the training loop polls.

    Args:
      signals: the signals to catch (default SIGTERM, what TPU/GKE/Slurm send before eviction).
      use_jax_sync: multi-process only: use JAX's preemption sync manager for ``should_stop``
        (``None``: when available).
      sync_every: multi-process without JAX's sync manager: combine the flags only at steps that
        are multiples of this (the all-gather is a host round-trip).
    """

    def __init__(
        self,
        signals: Iterable[int] = (signal.SIGTERM,),
        *,
        use_jax_sync: bool | None = None,
        sync_every: int = 1,
    ):
        self.signals = tuple(signals)
        self.sync_every = max(1, int(sync_every))
        self._use_jax_sync = use_jax_sync
        self._event = threading.Event()
        self.signum: int | None = None
        self.received_at: float | None = None
        self._old: dict[int, object] = {}
        self._mode = "local"
        self._stopped = False

    # ---- context manager ----------------------------------------------------------------

    def __enter__(self) -> "PreemptionGuard":
        multi = jax.process_count() > 1
        jax_sync = multi and (self._use_jax_sync if self._use_jax_sync is not None
                              else _jax_preemption_sync_available())
        if jax_sync and not _jax_preemption_sync_available():
            raise RuntimeError("use_jax_sync=True but jax.distributed runs no preemption sync manager")
        self._mode = "jax" if jax_sync else ("allgather" if multi else "local")
        if threading.current_thread() is not threading.main_thread():
            log.warning("PreemptionGuard entered outside the main thread: no signal handler installed")
            return self
        for sig in self.signals:
            if self._mode == "jax" and sig == signal.SIGTERM:
                continue  # JAX's coordination service owns SIGTERM (see module docstring)
            self._old[sig] = signal.signal(sig, self._handler)
        return self

    def __exit__(self, *exc) -> None:
        for sig, old in self._old.items():
            # ``None`` means the old handler was not installed from Python; SIG_DFL is the best
            # we can restore then.
            signal.signal(sig, old if old is not None else signal.SIG_DFL)
        self._old.clear()

    def _handler(self, signum, frame) -> None:  # noqa: ARG002
        if not self._event.is_set():
            self.signum, self.received_at = signum, time.time()
            self._event.set()
            # logging from a signal handler is mostly fine in CPython (runs between bytecodes),
            # but keep it to one line.
            log.warning("received %s: will checkpoint and stop at the next step boundary",
                        signal.Signals(signum).name)

    # ---- queries ------------------------------------------------------------------------

    @property
    def mode(self) -> str:
        """``local`` (one process), ``jax`` (JAX's preemption sync manager) or ``allgather``."""
        return self._mode

    @property
    def requested(self) -> bool:
        """This process received a preemption signal (or :meth:`request` was called)."""
        return self._event.is_set()

    def request(self) -> None:
        """Ask for a stop as if a signal had arrived (tests, max-time limits)."""
        if not self._event.is_set():
            self.received_at = time.time()
            self._event.set()

    def should_stop(self, step: int) -> bool:
        """Whether to save and stop at ``step``; the same answer on every process.

        One process: a plain read of :attr:`requested`. Several: a collective (see module doc);
        call it on every host at every step.
        """
        if self._stopped:
            return True
        if self._mode == "local":
            decided = self.requested
        elif self._mode == "jax":
            from jax.experimental import multihost_utils

            decided = bool(multihost_utils.reached_preemption_sync_point(int(step)))
        else:
            if int(step) % self.sync_every:
                return False
            decided = any_process(self.requested)
        self._stopped = decided
        return decided


def any_process(flag: bool) -> bool:
    """OR a host-local boolean across all processes (plain read with one process)."""
    if jax.process_count() == 1:
        return bool(flag)
    from jax.experimental import multihost_utils

    flags = multihost_utils.process_allgather(np.asarray(bool(flag), dtype=np.int32))
    return bool(np.asarray(flags).any())
