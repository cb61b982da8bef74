"""Preemption (SIGTERM) handling for training loops, on top of Orbax's.

Usage::

    guard = PreemptionGuard()
    ckpt = Checkpointer(directory, save_every=100, preemption=guard)   # the guard feeds should_save
    with guard:
        for step in range(start, total):
            state, metrics = train_step(state, batch)
            ckpt.save(step + 1, state=state, data_iter=it)  # Orbax decides: interval or preemption
            if guard.should_stop(step + 1):                 # the same answer on every host
                ckpt.wait()
                break
    # exit 0: the scheduler restarts the job, which resumes from the checkpoint

``guard.requested`` is this process's own flag (set by the signal handler).
``guard.should_stop(step)`` is the decision every host must take together:

- several processes with JAX's preemption sync manager (``jax.distributed.initialize`` starts it
  unless ``jax_enable_preemption_service`` is off): Orbax's ``reached_preemption`` (JAX's
  preemption sync point, which the coordination service turns true on all hosts at the same step
  once any host got SIGTERM; the same check as Orbax's ``PreemptionCheckpointingPolicy``). In
  this mode the guard leaves SIGTERM to JAX's own (C++) handler; a Python handler would replace
  it and the service would never hear of the preemption;
- one process: Orbax cannot see a plain SIGTERM there (no sync manager runs without
  ``jax.distributed``), so a minimal Python signal hook sets a flag, which the guard's
  :meth:`PreemptionGuard.save_policy` feeds into Orbax's ``should_save``;
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
import orbax.checkpoint as ocp

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
        self._decided: tuple[int, bool] | None = None  # (step, decision): one collective per step

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
        call it on every host at every step (a second call for the same step reuses the answer).
        """
        step = int(step)
        if self._stopped:
            return True
        if self._decided is not None and self._decided[0] == step:
            return self._decided[1]
        if self._mode == "local":
            decided = self.requested
        elif self._mode == "jax":
            decided = bool(ocp.multihost.reached_preemption(step))
        elif step % self.sync_every:
            decided = False
        else:
            decided = any_process(self.requested)
        self._decided = (step, decided)
        self._stopped = decided
        return decided

    def save_policy(self) -> "ocp.checkpoint_managers.SaveDecisionPolicy":
        """An Orbax ``SaveDecisionPolicy`` that saves when :meth:`should_stop` says so (what
        :class:`~sage_jax.train.checkpoint.Checkpointer` adds to its policies)."""
        return _GuardPolicy(self)


class _GuardPolicy(ocp.checkpoint_managers.SaveDecisionPolicy):
    """Orbax save policy: save at the step where the guard decides to stop."""

    def __init__(self, guard: PreemptionGuard):
        self.guard = guard

    def should_save(self, step, previous_steps, *, context) -> bool:  # noqa: ARG002
        return self.guard.should_stop(step.step)


def any_process(flag: bool) -> bool:
    """OR a host-local boolean across all processes (plain read with one process)."""
    if jax.process_count() == 1:
        return bool(flag)
    from jax.experimental import multihost_utils

    flags = multihost_utils.process_allgather(np.asarray(bool(flag), dtype=np.int32))
    return bool(np.asarray(flags).any())
