"""The serving engine: one thread owning `max_batch` cache slots (continuous batching).

Loop: admit queued requests into free slots (each prompt prefilled once, broadcast to its `n`
rows), run at most `decode_steps` decode steps of every active row (one compiled step loop per
distinct processing pipeline among them: greedy vs sampled, top_k, ...), hand each request its
new text (`Delta`, for streaming) and its finished choices (`Finished`), and free the rows whose
request finished, was cancelled (client gone, timed out) or hit a stop string. A request that
arrives during a decode joins at the next step boundary instead of waiting for the batch.

Per-row seeds (the request's `seed`, else a random one) make a row's tokens independent of the
rows it shares the batch with (see `serve.slots`).

Every request runs in the slots. A request with `n` above the slot count starts its choices as
slots free up (its waiting choices go before newer requests). A `sage` request's row runs the
phases of `rollout.steer` in its slot: each unpinned field before a pinned one is a short
generation, cut on the host, after which the row is prefilled again with the longer forced start,
then the final generation; its answer equals `steer`'s (same phases, same row seeds).

Events (passed to `ChatRequest.emit`, from the engine thread): `Admitted(prompt_tokens)` once,
`Delta(index, text)` (streaming requests only), `Finished(index, Steered)` per choice, or
`Failed(ApiError)`.
"""

from __future__ import annotations

import collections
import dataclasses
import queue
import threading
import time
from typing import Callable

import jax
import jax.numpy as jnp
import numpy as np

from sage_jax.rollout.sampler import REASONS, STOP, bucket
from sage_jax.rollout.sampling import Processing
from sage_jax.rollout.steer import Phase, Steered, cut_field, cut_stops, plan_phase, steered_result, uses_special_tokens
from sage_jax.serve.protocol import ApiError, ChatRequest, Overloaded
from sage_jax.serve.slots import decode_slots, empty_slots, finish_slots, insert_slots, prefill_slots

__all__ = ["EngineConfig", "SlotEngine", "Admitted", "Delta", "Finished", "Failed"]


@dataclasses.dataclass(frozen=True)
class Admitted:
    prompt_tokens: int


@dataclasses.dataclass(frozen=True)
class Delta:
    index: int
    text: str


@dataclasses.dataclass(frozen=True)
class Finished:
    index: int
    result: Steered


@dataclasses.dataclass(frozen=True)
class Failed:
    error: ApiError


@dataclasses.dataclass(frozen=True)
class EngineConfig:
    max_batch: int = 8  # cache slots: rows decoding at once
    max_queue: int = 64  # requests waiting for a slot before answering 503
    max_model_len: int = 2048  # tokens per slot (prompt + reply); longer prompts are refused (400)
    max_tokens_limit: int = 2048  # a request's max_tokens is clamped to this
    decode_steps: int = 4  # decode steps between admissions (and stream flushes)
    batch_wait_s: float = 0.005  # an idle engine waits this long for more arrivals to admit together

    def __post_init__(self):
        if self.max_batch < 1 or self.max_queue < 1 or self.decode_steps < 1:
            raise ValueError("max_batch, max_queue and decode_steps must be >= 1")
        if self.max_model_len < 2 or self.max_tokens_limit < 1:
            raise ValueError("max_model_len must be >= 2 and max_tokens_limit >= 1")


@dataclasses.dataclass(eq=False)
class _Job:
    req: ChatRequest
    seeds: list[int]  # one per choice
    remaining: int  # choices not finished
    started: int = 0  # choices given a slot so far (n > slots: they start as slots free up)
    dropped: bool = False  # cancelled or failed: nothing more is sent, its rows are freed


@dataclasses.dataclass(eq=False)
class _Row:
    job: _Job
    index: int  # the choice index
    phase: Phase
    proc: Processing
    generated: dict[str, str] = dataclasses.field(default_factory=dict)  # `sage`: latent fields made so far
    tokens: list[int] = dataclasses.field(default_factory=list)
    sent: str = ""  # text streamed so far


class _Rate:
    """Tokens per second over the last `window_s` seconds."""

    def __init__(self, window_s: float = 10.0):
        self.window_s, self.events = window_s, collections.deque()

    def add(self, n: int) -> None:
        now = time.monotonic()
        self.events.append((now, n))
        while self.events and self.events[0][0] < now - self.window_s:
            self.events.popleft()

    def per_s(self) -> float:
        now = time.monotonic()
        total = sum(n for t, n in list(self.events) if t >= now - self.window_s)
        return total / self.window_s


def _emit(req: ChatRequest, event) -> None:
    if req.emit is not None:
        try:
            req.emit(event)
        except RuntimeError:  # the server's event loop is gone (shutting down)
            pass


def _stable(text: str, hold: int) -> str:
    """The part of a growing text that can be streamed: not a possible start of a stop string
    (the last `hold` characters) nor an incomplete UTF-8 sequence."""
    if hold:
        text = text[: max(0, len(text) - hold)]
    return text.rstrip("\ufffd")


class SlotEngine:
    """A bounded request queue and the thread running the slots (see the module docstring).

    Hooks for tests: ``before_batch(requests)`` is called before each admission round,
    ``after_step()`` after each round of decode steps (rows' new text already handed out).
    ``stats``: requests (answered), rejected (503s), batches (admission rounds), rows (rows
    admitted), phases (`sage` field generations), max_rows (most rows decoding at once), tokens
    (generated), decode_calls,
    cancelled (requests dropped because their client left or timed out), errors.
    """

    def __init__(self, policy, config: EngineConfig = EngineConfig()):
        self.policy, self.config = policy, config
        self.queue: queue.Queue[ChatRequest] = queue.Queue(maxsize=config.max_queue)
        self.before_batch: Callable[[list[ChatRequest]], None] | None = None
        self.after_step: Callable[[], None] | None = None
        self.stats = {"requests": 0, "rejected": 0, "batches": 0, "rows": 0, "max_rows": 0, "tokens": 0,
                      "decode_calls": 0, "phases": 0, "cancelled": 0, "errors": 0}
        self.new_len = bucket(config.max_tokens_limit, 16)
        self._rate = _Rate()
        self._pending: collections.deque[ChatRequest] = collections.deque()
        self._slots: list[_Row | None] = [None] * config.max_batch
        self._waiting: list[_Job] = []  # started requests with choices still waiting for a slot
        self._special: bool | None = None  # whether latent blocks use special tokens (`sage` rows)
        self._state = None
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._loop, name="sage-engine", daemon=True)
        self._thread.start()

    # -- public ------------------------------------------------------------------------------

    @property
    def max_batch(self) -> int:
        return self.config.max_batch

    def submit(self, req: ChatRequest) -> None:
        if self._stop.is_set():
            raise ApiError(503, "server shutting down", "server_shutting_down")
        try:
            self.queue.put_nowait(req)
        except queue.Full:
            self.stats["rejected"] += 1
            raise Overloaded() from None

    def queued(self) -> int:
        return self.queue.qsize() + len(self._pending)

    def active_rows(self) -> int:
        return sum(r is not None for r in self._slots)

    def snapshot(self) -> dict:
        return dict(self.stats, queued=self.queued(), active_rows=self.active_rows(), slots=self.max_batch,
                    tokens_per_s=round(self._rate.per_s(), 2))

    def alive(self) -> bool:
        return self._thread.is_alive()

    def stop(self, timeout: float = 30.0) -> None:
        """Stop the thread; answer every queued and running request with 503."""
        self._stop.set()
        self._thread.join(timeout)
        gone = ApiError(503, "server shutting down", "server_shutting_down")
        while True:
            try:
                self._pending.append(self.queue.get_nowait())
            except queue.Empty:
                break
        for req in self._pending:
            _emit(req, Failed(gone))
        self._pending.clear()
        for job in self._jobs():
            _emit(job.req, Failed(gone))
        self._slots = [None] * self.max_batch
        self._waiting.clear()

    # -- the loop ----------------------------------------------------------------------------

    def _loop(self) -> None:
        while not self._stop.is_set():
            try:
                self._admit()
                if self.active_rows():
                    self._step()
            except Exception as e:  # noqa: BLE001 - every request must be answered; the slots restart
                self._fail_active(ApiError(500, f"generation failed: {type(e).__name__}: {e}", "server_error"))

    def _jobs(self) -> list[_Job]:
        """Requests holding slots or waiting for more (n > slots), once each."""
        jobs = {id(r.job): r.job for r in self._slots if r is not None}
        jobs.update((id(j), j) for j in self._waiting)
        return list(jobs.values())

    def _fail_active(self, err: ApiError) -> None:
        self.stats["errors"] += 1
        for job in self._jobs():
            _emit(job.req, Failed(err))
        self._slots = [None] * self.max_batch
        self._waiting.clear()
        self._state = None

    def _free(self) -> list[int]:
        return [i for i, r in enumerate(self._slots) if r is None]

    def _pull(self, block: bool) -> None:
        """Move queued requests to `_pending` (an idle engine waits briefly to admit a group)."""
        try:
            self._pending.append(self.queue.get(timeout=0.1) if block else self.queue.get_nowait())
        except queue.Empty:
            return
        deadline = time.monotonic() + (self.config.batch_wait_s if block else 0.0)
        while len(self._pending) < self.max_batch:
            try:
                self._pending.append(self.queue.get(timeout=max(0.0, deadline - time.monotonic())))
            except queue.Empty:
                break

    def _take(self, free: int) -> list[ChatRequest]:
        """Pending requests that start now, in arrival order: all of a request's choices fit the
        free slots, or (n > slots) at least one does."""
        out = []
        while self._pending:
            req = self._pending[0]
            if req.cancelled.is_set():
                self._pending.popleft()
                self.stats["cancelled"] += 1
                continue
            need = req.n if req.n <= self.max_batch else 1
            if need > free:
                break
            out.append(self._pending.popleft())
            free -= min(req.n, free)
        return out

    def _admit(self) -> None:
        if not self._pending:
            self._pull(block=not (self.active_rows() or self._waiting))
        for job in list(self._waiting):  # older requests' remaining choices first
            if job.dropped or job.req.cancelled.is_set():
                self._drop(job, cancelled=not job.dropped)
            elif self._free():
                self._launch(job, len(self._free()))
        reqs = self._take(len(self._free()))
        if not reqs:
            return
        if self.before_batch is not None:
            self.before_batch(reqs)
        self.stats["batches"] += 1
        for req in reqs:
            prompt_tokens = self._launch(_Job(req, req.row_seeds(), req.n), len(self._free()))
            if prompt_tokens is not None:
                if req.sage:  # usage counts the conversation, not the forced latent start of a phase
                    prompt_tokens = len(self.policy.encode_chat(req.messages))
                _emit(req, Admitted(prompt_tokens))

    def _ensure_state(self) -> None:
        if self._state is None:
            pol = self.policy
            self._state = empty_slots(pol.cfg, pol.params, self.max_batch, self.config.max_model_len, self.new_len)

    def _plan(self, job: _Job, index: int, generated: dict[str, str]) -> Phase:
        req = job.req
        if not req.sage:  # one generation of the request as given
            return Phase(req.prefill or "", req.sampling, job.seeds[index], None)
        if self._special is None:
            self._special = uses_special_tokens(self.policy)
        return plan_phase(req.pins, generated, req.sampling, job.seeds[index], special=self._special)

    def _launch(self, job: _Job, count: int) -> int | None:
        """Start up to `count` more of a request's choices in free slots (their first phases share
        one prompt: one prefill). The prompt's length; None if the request failed."""
        count = min(count, job.req.n - job.started)
        rows = [_Row(job, job.started + j, self._plan(job, job.started + j, {}), None) for j in range(count)]
        job.started += count
        if job.started < job.req.n and job not in self._waiting:
            self._waiting.append(job)
        elif job.started == job.req.n and job in self._waiting:
            self._waiting.remove(job)
        return self._prefill(rows)

    def _prefill(self, rows: list[_Row]) -> int | None:
        """Prefill rows of one request that share a phase prompt into free slots (one per row).
        The prompt's length; None if the request failed (it was answered with the error)."""
        pol, job, phase = self.policy, rows[0].job, rows[0].phase
        try:
            prompt = pol.encode_chat(job.req.messages, prefill=phase.prefill)
        except Exception as e:  # noqa: BLE001 - the chat template refused this conversation
            self._fail(job, ApiError(400, f"cannot render the conversation: {type(e).__name__}: {e}"))
            return None
        try:
            self._ensure_state()
            new = prefill_slots(pol.cfg, pol.params, prompt, phase.sampling, [r.phase.seed for r in rows],
                                cache_len=self.config.max_model_len, new_len=self.new_len)
        except ValueError as e:  # e.g. a prompt longer than max_model_len
            self._fail(job, ApiError(400, str(e)))
            return None
        except Exception as e:  # noqa: BLE001 - this request is answered; the slots were not touched
            self._fail(job, ApiError(500, f"generation failed: {type(e).__name__}: {e}", "server_error"))
            return None
        free = self._free()[: len(rows)]
        index = free + [self._state.batch] * (new.batch - len(rows))  # padding rows: dropped
        self._state = insert_slots(self._state, new, jnp.asarray(index, jnp.int32))
        proc = Processing.of(phase.sampling, pol.cfg.vocab_size)
        for slot, row in zip(free, rows):
            row.proc, row.tokens, row.sent = proc, [], ""
            self._slots[slot] = row
        self.stats["rows"] += sum(r.phase.field is None for r in rows)
        self.stats["phases"] += sum(r.phase.field is not None for r in rows)
        self.stats["max_rows"] = max(self.stats["max_rows"], self.active_rows())
        return len(prompt)

    def _step(self) -> None:
        pol = self.policy
        groups: dict[Processing, list[int]] = {}
        for i, row in enumerate(self._slots):
            if row is not None:
                groups.setdefault(row.proc, []).append(i)
        for proc, rows in groups.items():
            self._state = decode_slots(pol.cfg, proc, pol.params, self._state, rows, self.config.decode_steps)
            self.stats["decode_calls"] += 1
        st = self._state
        tokens, lengths, done, reasons = jax.device_get((st.tokens, st.length, st.done, st.reason))
        stop = np.zeros((st.batch,), bool)
        next_phase: list[_Row] = []
        for i, row in enumerate(self._slots):
            if row is not None:
                stop[i] = self._advance(i, row, tokens[i, len(row.tokens): int(lengths[i])], bool(done[i]),
                                        int(reasons[i]), next_phase)
        if stop.any():
            self._state = finish_slots(self._state, jnp.asarray(stop))
        for row in next_phase:  # a `sage` row's next phase, in a free slot (its own was just freed)
            if not row.job.dropped:
                self._prefill([row])
        if self.after_step is not None:
            self.after_step()

    def _advance(self, slot: int, row: _Row, new: np.ndarray, done: bool, reason: int,
                 next_phase: list[_Row]) -> bool:
        """Take a row's new tokens; stream them; finish its phase if done. True: mark it done on device."""
        job = row.job
        req = job.req
        if job.dropped or req.cancelled.is_set():
            self._slots[slot] = None
            if not job.dropped:
                self._drop(job, cancelled=True)
            return not done
        row.tokens.extend(int(t) for t in new)
        self.stats["tokens"] += len(new)
        self._rate.add(len(new))
        if row.phase.field is not None:  # a latent field before a pin: cut it, plan the next phase
            if done:
                self._slots[slot] = None
                row.generated[row.phase.field] = cut_field(self.policy.decode(row.tokens), row.phase.field)
                row.phase = self._plan(job, row.index, row.generated)
                next_phase.append(row)
            return False
        stops = req.sampling.stop_strings
        if not (req.stream or stops) and not done:
            return False
        decoded = self.policy.decode(row.tokens)
        text, cut = cut_stops(decoded, stops)
        finished = done or cut
        if req.stream and not req.sage:  # a `sage` choice is sent whole: its latents are stripped
            safe = text if finished else _stable(text, max((len(s) for s in stops), default=1) - 1)
            if safe.startswith(row.sent) and len(safe) > len(row.sent):
                _emit(req, Delta(row.index, safe[len(row.sent):]))
                row.sent = safe
        if finished:
            finish = "stop" if cut or reason == STOP else REASONS.get(reason, "length")
            if req.sage:
                result = steered_result(row.phase.prefill, decoded, stops, finish, list(row.tokens),
                                        special=bool(self._special))
            else:
                result = Steered(None, None, text, text, finish, tokens=list(row.tokens))
            self._slots[slot] = None
            _emit(req, Finished(row.index, result))
            job.remaining -= 1
            if job.remaining == 0:
                self.stats["requests"] += 1
        return cut and not done

    def _drop(self, job: _Job, cancelled: bool) -> None:
        """Free a request's rows and forget its waiting choices (once)."""
        if not job.dropped and cancelled:
            self.stats["cancelled"] += 1
        job.dropped = True
        if job in self._waiting:
            self._waiting.remove(job)
        for i, r in enumerate(self._slots):
            if r is not None and r.job is job:
                self._slots[i] = None  # a freed slot is no longer decoded; the next insert replaces it

    def _fail(self, job: _Job, err: ApiError) -> None:
        if not job.dropped:
            _emit(job.req, Failed(err))
        self._drop(job, cancelled=False)
