"""An OpenAI-compatible HTTP server over a policy, with a batching worker.

    from sage_jax.rollout.policy import load_policy
    from sage_jax.serve.server import make_server
    srv = make_server(load_policy("smollm2"), "127.0.0.1", 8000, max_batch=8, max_queue=64)
    srv.start()            # serve_forever in a daemon thread (or srv.serve_forever() to block)
    ...; srv.close()       # stop accepting, fail queued requests (503), join the worker

Endpoints: ``GET /v1/models``, ``POST /v1/chat/completions`` (``messages``, ``n``, ``temperature``,
``top_p``, ``max_tokens``/``max_completion_tokens``, ``stop``, ``seed``, ``stream``, and vLLM's
``top_k`` / ``repetition_penalty`` / ``continue_final_message`` + ``add_generation_prompt: false``:
the last message, an assistant one, is rendered without its end-of-turn and the choices continue
it, their content being the continuation only), ``GET /health``
and ``GET /v1/stats`` (batching counters). The extension field
``sage = {"pin": {"a_motivation": "humour", ...}, "return_latents": true}`` steers the latents
(:func:`sage_jax.rollout.steer.steer`); such a choice's ``message.content`` is the reply with the
latents stripped, ``message.sage_latents`` the parsed fields (flat: u_motivation ... a_topic,
plus ``missing``/``problems``/``prefill``) and ``message.sage_raw`` the raw text.

Batching: each HTTP handler thread queues its request on a bounded queue; one worker thread takes
up to ``max_batch`` queued requests (all their ``n`` rows) and runs each group of compatible
requests (same greedy-ness and top_k: what one ``rollout.generate`` call allows) as ONE batched
generation. A full queue answers HTTP 503 with a JSON error and ``Retry-After``. Each row's seed
is derived from the request's ``seed`` (or a random one), so answers do not depend on batching.

Streaming (``stream: true``): *not* token by token. Generation runs to the end, then the answer is
sent as Server-Sent Events: per choice a role chunk, one content chunk with the whole text and a
finish chunk, then ``data: [DONE]``.
"""

from __future__ import annotations

import dataclasses
import json
import queue
import random
import threading
import time
import uuid
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any, Callable

from sage_jax.rollout.sampler import generate
from sage_jax.rollout.sampling import SamplingParams
from sage_jax.rollout.steer import Steered, _cut_stops, check_pins, steer

__all__ = ["make_server", "SageServer", "BatchWorker", "ChatRequest", "Overloaded", "ApiError",
           "parse_chat_request", "MAX_N"]

MAX_N = 16


class ApiError(Exception):
    def __init__(self, status: int, message: str, type_: str = "invalid_request_error", param: str | None = None):
        super().__init__(message)
        self.status, self.message, self.type, self.param = status, message, type_, param

    def body(self) -> dict:
        return {"error": {"message": self.message, "type": self.type, "param": self.param, "code": self.status}}


class Overloaded(ApiError):
    def __init__(self, message: str = "server overloaded: the request queue is full; retry later"):
        super().__init__(503, message, "server_overloaded")


@dataclasses.dataclass
class ChatRequest:
    messages: list[dict]
    n: int = 1
    sampling: SamplingParams = SamplingParams(temperature=1.0)
    seed: int | None = None
    pins: dict | None = None
    sage: bool = False  # the `sage` extension was given: strip latents, return them
    stream: bool = False
    prefill: str | None = None  # continue_final_message: the partial assistant message to continue
    # filled by the worker
    done: threading.Event = dataclasses.field(default_factory=threading.Event)
    results: list[Steered] | None = None
    error: ApiError | None = None
    prompt_tokens: int = 0

    @property
    def group_key(self) -> tuple:
        return (self.sampling.greedy, self.sampling.top_k, self.prefill is not None)

    def row_seeds(self) -> list[int]:
        base = self.seed if self.seed is not None else random.getrandbits(31)
        return [(int(base) * 1_000_003 + j) % (1 << 31) for j in range(self.n)]


def _text_content(content: Any, where: str) -> str:
    if isinstance(content, str):
        return content
    if content is None:
        return ""
    if isinstance(content, list):  # OpenAI content parts
        parts = []
        for p in content:
            if isinstance(p, dict) and p.get("type") == "text" and isinstance(p.get("text"), str):
                parts.append(p["text"])
            else:
                raise ApiError(400, f"{where}: only text content parts are supported", param="messages")
        return "".join(parts)
    raise ApiError(400, f"{where}: content must be a string or a list of text parts", param="messages")


def parse_chat_request(body: Any, *, default_max_tokens: int, max_tokens_limit: int) -> ChatRequest:
    """Validate an OpenAI chat.completions body into a :class:`ChatRequest` (ApiError 400 if bad)."""
    if not isinstance(body, dict):
        raise ApiError(400, "the body must be a JSON object")
    msgs = body.get("messages")
    if not isinstance(msgs, list) or not msgs:
        raise ApiError(400, "'messages' must be a non-empty list", param="messages")
    messages = []
    for i, m in enumerate(msgs):
        if not isinstance(m, dict) or m.get("role") not in ("system", "user", "assistant", "developer"):
            raise ApiError(400, f"messages[{i}]: needs a role of system/user/assistant", param="messages")
        role = "system" if m["role"] == "developer" else m["role"]
        messages.append({"role": role, "content": _text_content(m.get("content"), f"messages[{i}]")})

    def num(name, typ, default, lo=None, hi=None):
        v = body.get(name)
        if v is None:
            return default
        if isinstance(v, bool) or not isinstance(v, (int, float)) or (typ is int and int(v) != v):
            raise ApiError(400, f"'{name}' must be a{'n integer' if typ is int else ' number'}", param=name)
        v = typ(v)
        if (lo is not None and v < lo) or (hi is not None and v > hi):
            raise ApiError(400, f"'{name}' must be in [{lo}, {hi}], got {v}", param=name)
        return v

    n = num("n", int, 1, 1, MAX_N)
    temperature = num("temperature", float, 1.0, 0.0, 2.0)
    top_p = num("top_p", float, 1.0, 0.0, 1.0)
    if top_p == 0.0:
        top_p = 1e-6
    mt_name = "max_completion_tokens" if body.get("max_completion_tokens") is not None else "max_tokens"
    max_tokens = num(mt_name, int, default_max_tokens, 1, None)
    max_tokens = min(max_tokens, max_tokens_limit)
    seed = body.get("seed")
    if seed is not None and (isinstance(seed, bool) or not isinstance(seed, int)):
        raise ApiError(400, "'seed' must be an integer", param="seed")
    stop = body.get("stop")
    if stop is None:
        stops: tuple[str, ...] = ()
    elif isinstance(stop, str):
        stops = (stop,)
    elif isinstance(stop, list) and all(isinstance(s, str) for s in stop) and len(stop) <= 4:
        stops = tuple(s for s in stop if s)
    else:
        raise ApiError(400, "'stop' must be a string or a list of up to 4 strings", param="stop")
    sage = body.get("sage")
    pins = None
    if sage is not None:
        if not isinstance(sage, dict):
            raise ApiError(400, "'sage' must be an object {pin: {...}, return_latents: bool}", param="sage")
        try:
            pins = check_pins(sage.get("pin") or {}) or None
        except ValueError as e:
            raise ApiError(400, f"sage.pin: {e}", param="sage") from None
    stream = body.get("stream", False)
    if not isinstance(stream, bool):
        raise ApiError(400, "'stream' must be a boolean", param="stream")
    # vLLM's sampling extensions (what an endpoint policy sends for the paper's search settings)
    top_k = num("top_k", int, 0, -1, None)
    repetition_penalty = num("repetition_penalty", float, 1.0, 1e-6, None)
    sp = SamplingParams(temperature=temperature, top_k=max(top_k, 0), top_p=top_p,
                        repetition_penalty=repetition_penalty, max_new_tokens=max_tokens, stop_strings=stops)
    # vLLM's chat extensions: continue the last (assistant) message instead of starting a new one
    cont, gen_prompt = body.get("continue_final_message", False), body.get("add_generation_prompt", True)
    for name, v in (("continue_final_message", cont), ("add_generation_prompt", gen_prompt)):
        if not isinstance(v, bool):
            raise ApiError(400, f"'{name}' must be a boolean", param=name)
    prefill = None
    if cont:
        if gen_prompt:
            raise ApiError(400, "continue_final_message needs add_generation_prompt: false (they cannot both be "
                                "true)", param="add_generation_prompt")
        if messages[-1]["role"] != "assistant":
            raise ApiError(400, "continue_final_message: the last message must be an assistant message",
                           param="messages")
        if sage is not None:
            raise ApiError(400, "continue_final_message cannot be combined with the 'sage' extension", param="sage")
        messages, prefill = messages[:-1], messages[-1]["content"]
    elif not gen_prompt:
        raise ApiError(400, "add_generation_prompt: false is only supported with continue_final_message: true",
                       param="add_generation_prompt")
    return ChatRequest(messages, n, sp, seed, pins, sage is not None, stream, prefill)


class BatchWorker:
    """A bounded request queue and one thread running batched generations.

    Hooks for tests: ``before_batch(requests)`` is called by the worker before each batch
    (e.g. to slow it down). ``stats``: batches (generation groups run), generate_calls, rows,
    requests, max_rows (largest batch), rejected (503s).
    """

    def __init__(self, policy, *, max_batch: int = 8, max_queue: int = 64, batch_wait_s: float = 0.005):
        if max_batch < 1 or max_queue < 1:
            raise ValueError("max_batch and max_queue must be >= 1")
        self.policy, self.max_batch, self.batch_wait_s = policy, int(max_batch), float(batch_wait_s)
        self.queue: queue.Queue[ChatRequest] = queue.Queue(maxsize=int(max_queue))
        self.before_batch: Callable[[list[ChatRequest]], None] | None = None
        self.stats = {"batches": 0, "generate_calls": 0, "rows": 0, "requests": 0, "max_rows": 0, "rejected": 0}
        self._lock = threading.Lock()
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._loop, name="sage-batch-worker", daemon=True)
        self._thread.start()

    def submit(self, req: ChatRequest) -> None:
        if self._stop.is_set():
            raise ApiError(503, "server shutting down", "server_shutting_down")
        try:
            self.queue.put_nowait(req)
        except queue.Full:
            with self._lock:
                self.stats["rejected"] += 1
            raise Overloaded() from None

    def stop(self, timeout: float = 30.0) -> None:
        self._stop.set()
        self._thread.join(timeout)
        while True:  # fail whatever is still queued
            try:
                req = self.queue.get_nowait()
            except queue.Empty:
                break
            req.error = ApiError(503, "server shutting down", "server_shutting_down")
            req.done.set()

    def _take(self) -> list[ChatRequest]:
        try:
            first = self.queue.get(timeout=0.1)
        except queue.Empty:
            return []
        batch = [first]
        deadline = time.monotonic() + self.batch_wait_s
        while len(batch) < self.max_batch:
            try:
                batch.append(self.queue.get(timeout=max(0.0, deadline - time.monotonic())))
            except queue.Empty:
                break
        return batch

    def _loop(self) -> None:
        while not self._stop.is_set():
            batch = self._take()
            if not batch:
                continue
            try:
                if self.before_batch is not None:
                    self.before_batch(batch)
                groups: dict[tuple, list[ChatRequest]] = {}
                for r in batch:
                    groups.setdefault(r.group_key, []).append(r)
                for reqs in groups.values():
                    self._run(reqs)
            except Exception as e:  # noqa: BLE001 - every request must be answered
                for r in batch:
                    if not r.done.is_set():
                        r.error = ApiError(500, f"generation failed: {type(e).__name__}: {e}", "server_error")
                        r.done.set()

    def _continue(self, reqs: list[ChatRequest], prompts: list[list[int]], seeds: list[int],
                  counted) -> list[Steered]:
        """continue_final_message rows (prompts: each request's history + its prefill): one
        generation continuing them (as steer's last phase continues its own prefill); a choice's
        content is the continuation only."""
        rows = [(r, p) for r, p in zip(reqs, prompts) for _ in range(r.n)]
        counted(len(rows))
        gens = generate(self.policy.cfg, self.policy.params, [p for _, p in rows],
                        [dataclasses.replace(r.sampling, stop_strings=()) for r, _ in rows], seed=0,
                        row_seeds=seeds)
        out = []
        for (r, _), g in zip(rows, gens):
            text, cut = _cut_stops(self.policy.decode(g.tokens), r.sampling.stop_strings)
            out.append(Steered(None, None, text, text, "stop" if cut else g.finish_reason, tokens=list(g.tokens)))
        return out

    def _run(self, reqs: list[ChatRequest]) -> None:
        convs, pins, sps, seeds, owner, prompts = [], [], [], [], [], []
        for r in reqs:
            prompt = self.policy.encode_chat(r.messages, prefill=r.prefill or "")
            r.prompt_tokens = len(prompt)
            prompts.append(prompt)
            for s in r.row_seeds():
                convs.append(r.messages)
                pins.append(r.pins)
                sps.append(r.sampling)
                seeds.append(s)
                owner.append(r)

        def counted(rows: int) -> None:
            with self._lock:
                self.stats["generate_calls"] += 1

        try:
            if reqs[0].prefill is not None:  # a group is all continuations or none (group_key)
                out = self._continue(reqs, prompts, seeds, counted)
            else:
                out = steer(self.policy, convs, pins, sps, seed=0, row_seeds=seeds, on_generate=counted)
        except ValueError as e:  # e.g. a prompt longer than the model's cache
            for r in reqs:
                r.error = ApiError(400, str(e))
                r.done.set()
            return
        with self._lock:
            self.stats["batches"] += 1
            self.stats["rows"] += len(convs)
            self.stats["requests"] += len(reqs)
            self.stats["max_rows"] = max(self.stats["max_rows"], len(convs))
        i = 0
        for r in reqs:
            r.results = out[i: i + r.n]
            i += r.n
            r.done.set()


def _latents_json(s: Steered) -> dict:
    out: dict[str, Any] = {}
    for side, lat in (("u", s.state), ("a", s.action)):
        for f in ("motivation", "emotion", "topic"):
            out[f"{side}_{f}"] = None if lat is None else (list(lat.topic) if f == "topic" else getattr(lat, f))
    out["missing"] = list(s.missing)
    out["problems"] = list(s.problems)
    out["prefill"] = s.prefill
    return out


def _choice_message(req: ChatRequest, s: Steered) -> dict:
    msg: dict[str, Any] = {"role": "assistant", "content": s.content}
    if req.sage:
        msg["content"] = s.reply
        msg["sage_latents"] = _latents_json(s)
        msg["sage_raw"] = s.content
    return msg


def _finish(s: Steered) -> str:
    return "stop" if s.finish_reason == "stop" else "length"


class _Handler(BaseHTTPRequestHandler):
    server: "SageServer"
    protocol_version = "HTTP/1.1"

    def log_message(self, fmt, *args):  # quiet by default
        if self.server.verbose:
            super().log_message(fmt, *args)

    def _json(self, status: int, obj: Any, headers: dict | None = None) -> None:
        data = json.dumps(obj).encode()
        self.send_response(status)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(data)))
        for k, v in (headers or {}).items():
            self.send_header(k, v)
        self.end_headers()
        self.wfile.write(data)

    def _error(self, e: ApiError) -> None:
        headers = {"Retry-After": "1"} if e.status == 503 else None
        self._json(e.status, e.body(), headers)

    def do_GET(self):  # noqa: N802
        path = self.path.split("?")[0].rstrip("/")
        if path == "/v1/models":
            self._json(200, {"object": "list", "data": [
                {"id": self.server.model_name, "object": "model", "created": self.server.created,
                 "owned_by": "sage-jax"}]})
        elif path == f"/v1/models/{self.server.model_name}":
            self._json(200, {"id": self.server.model_name, "object": "model", "created": self.server.created,
                             "owned_by": "sage-jax"})
        elif path in ("/health", "/v1/health"):
            self._json(200, {"status": "ok", "queued": self.server.worker.queue.qsize()})
        elif path == "/v1/stats":
            self._json(200, dict(self.server.worker.stats, queued=self.server.worker.queue.qsize()))
        else:
            self._error(ApiError(404, f"no route {self.path}", "not_found"))

    def do_POST(self):  # noqa: N802
        path = self.path.split("?")[0].rstrip("/")
        length = int(self.headers.get("Content-Length") or 0)
        raw = self.rfile.read(length) if length else b""
        if path != "/v1/chat/completions":
            self._error(ApiError(404, f"no route {self.path}", "not_found"))
            return
        try:
            try:
                body = json.loads(raw or b"null")
            except ValueError:
                raise ApiError(400, "the body is not valid JSON") from None
            req = parse_chat_request(body, default_max_tokens=self.server.default_max_tokens,
                                     max_tokens_limit=self.server.max_tokens_limit)
            self.server.worker.submit(req)
            if not req.done.wait(self.server.request_timeout_s):
                raise ApiError(504, "generation timed out", "timeout")
            if req.error is not None:
                raise req.error
        except ApiError as e:
            self._error(e)
            return
        cid, created, model = f"chatcmpl-{uuid.uuid4().hex[:24]}", int(time.time()), self.server.model_name
        if req.stream:
            self._stream(req, cid, created, model)
            return
        choices = [{"index": i, "message": _choice_message(req, s), "finish_reason": _finish(s), "logprobs": None}
                   for i, s in enumerate(req.results)]
        completion = sum(len(s.tokens) for s in req.results)
        self._json(200, {"id": cid, "object": "chat.completion", "created": created, "model": model,
                         "choices": choices,
                         "usage": {"prompt_tokens": req.prompt_tokens, "completion_tokens": completion,
                                   "total_tokens": req.prompt_tokens + completion}})

    def _stream(self, req: ChatRequest, cid: str, created: int, model: str) -> None:
        self.send_response(200)
        self.send_header("Content-Type", "text/event-stream")
        self.send_header("Cache-Control", "no-cache")
        self.send_header("Connection", "close")
        self.end_headers()
        self.close_connection = True

        def send(choice_delta: dict, idx: int, finish: str | None = None) -> None:
            chunk = {"id": cid, "object": "chat.completion.chunk", "created": created, "model": model,
                     "choices": [{"index": idx, "delta": choice_delta, "finish_reason": finish, "logprobs": None}]}
            self.wfile.write(b"data: " + json.dumps(chunk).encode() + b"\n\n")

        for i, s in enumerate(req.results):
            msg = _choice_message(req, s)
            send({"role": "assistant", "content": ""}, i)
            delta = {"content": msg["content"]}
            if req.sage:
                delta["sage_latents"], delta["sage_raw"] = msg["sage_latents"], msg["sage_raw"]
            send(delta, i)
            send({}, i, _finish(s))
        self.wfile.write(b"data: [DONE]\n\n")
        self.wfile.flush()


class SageServer(ThreadingHTTPServer):
    daemon_threads = True
    allow_reuse_address = True

    def __init__(self, addr, policy, *, max_batch: int, max_queue: int, default_max_tokens: int = 256,
                 max_tokens_limit: int = 2048, request_timeout_s: float = 600.0, verbose: bool = False,
                 model_name: str | None = None):
        super().__init__(addr, _Handler)
        self.policy = policy
        self.model_name = model_name or policy.name or "sage-jax"
        self.created = int(time.time())
        self.default_max_tokens, self.max_tokens_limit = int(default_max_tokens), int(max_tokens_limit)
        self.request_timeout_s, self.verbose = float(request_timeout_s), verbose
        self.worker = BatchWorker(policy, max_batch=max_batch, max_queue=max_queue)
        self._thread: threading.Thread | None = None

    @property
    def url(self) -> str:
        host, port = self.server_address[:2]
        return f"http://{host}:{port}/v1"

    @property
    def stats(self) -> dict:
        return self.worker.stats

    def start(self) -> "SageServer":
        """serve_forever in a daemon thread; returns self."""
        self._thread = threading.Thread(target=self.serve_forever, name="sage-http", daemon=True)
        self._thread.start()
        return self

    def close(self) -> None:
        """Stop accepting, answer queued requests with 503, stop the worker, close the socket."""
        if self._thread is not None:
            self.shutdown()
            self._thread.join(10)
            self._thread = None
        self.worker.stop()
        self.server_close()

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()


def make_server(policy, host: str = "127.0.0.1", port: int = 0, max_batch: int = 8, max_queue: int = 64,
                **kwargs) -> SageServer:
    """A :class:`SageServer` bound to (host, port) (port 0: a free one; see ``server.url``), not yet
    serving: call ``.start()`` (background thread) or ``.serve_forever()``; ``.close()`` to stop."""
    return SageServer((host, port), policy, max_batch=max_batch, max_queue=max_queue, **kwargs)
