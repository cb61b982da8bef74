"""An OpenAI-compatible HTTP server over a policy: FastAPI on uvicorn, continuous batching.

    from sage_jax.rollout.policy import load_policy
    from sage_jax.serve.server import make_server
    srv = make_server(load_policy("smollm2"), "127.0.0.1", 8000, max_batch=8, max_queue=64)
    srv.start()            # uvicorn in a daemon thread (or srv.serve_forever() to block)
    ...; srv.close()       # answer queued and running requests 503, stop the engine and uvicorn

Endpoints: ``GET /v1/models``, ``POST /v1/chat/completions`` (``messages``, ``n``, ``temperature``,
``top_p``, ``max_tokens``/``max_completion_tokens``, ``stop``, ``seed``, ``stream``, and vLLM's
``top_k`` / ``repetition_penalty`` / ``continue_final_message`` + ``add_generation_prompt: false``:
the last message, an assistant one, is rendered without its end-of-turn and the choices continue
it, their content being the continuation only), ``GET /health`` (never needs the API key) and
``GET /v1/stats`` (queue depth, active rows, tokens/s, counters). The extension field
``sage = {"pin": {"a_motivation": "humour", ...}, "return_latents": true}`` steers the latents
(:func:`sage_jax.rollout.steer.steer`); such a choice's ``message.content`` is the reply with the
latents stripped, ``message.sage_latents`` the parsed fields (flat: u_motivation ... a_topic,
plus ``missing``/``problems``/``prefill``) and ``message.sage_raw`` the raw text.

Generation: `serve.engine.SlotEngine` (continuous batching over `max_batch` cache slots; a
request joins the running decode at the next step boundary). A full queue answers 503 with
``Retry-After``. Streaming (``stream: true``) sends each choice's text as it is decoded (every
``decode_steps`` tokens), as server-sent events; requests with the ``sage`` extension stream their
whole answer in one chunk at the end.

Hardening: request bodies are strict JSON validated by pydantic models (`serve.protocol`): 400
with a message for malformed JSON, NaN/Infinity, out-of-range or mistyped fields; 413 for a body
over ``max_body_bytes``; 408 for a body that does not arrive within ``body_timeout_s``; the HTTP
layer answers 400 to an invalid Content-Length; a connection whose request headers are not
complete within ``header_timeout_s`` is closed. A request still unanswered after
``request_timeout_s`` gets 504 and its rows are freed; so are those of a client that disconnects.
``api_key`` (or ``SAGE_JAX_API_KEY``): every ``/v1`` route needs ``Authorization: Bearer KEY``
(401). Binding a non-loopback address logs a warning.
"""

from __future__ import annotations

import asyncio
import dataclasses
import hmac
import json
import logging
import os
import socket
import threading
import time
import uuid
from typing import Any, AsyncIterator

import h11
import uvicorn
from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse, Response, StreamingResponse
from starlette.exceptions import HTTPException as StarletteHTTPException
from starlette.requests import ClientDisconnect
from uvicorn.protocols.http.h11_impl import H11Protocol

from sage_jax.net import is_loopback
from sage_jax.rollout.steer import Steered
from sage_jax.serve.engine import Admitted, Delta, EngineConfig, Failed, Finished, SlotEngine
from sage_jax.serve.protocol import MAX_N, ApiError, ChatRequest, Overloaded, parse_body, parse_chat_request

__all__ = ["make_server", "SageServer", "ServerLimits", "ApiError", "ChatRequest", "Overloaded",
           "parse_chat_request", "MAX_N", "API_KEY_ENV"]

API_KEY_ENV = "SAGE_JAX_API_KEY"
log = logging.getLogger("sage_jax.serve")


@dataclasses.dataclass(frozen=True)
class ServerLimits:
    """What one client may cost the server."""

    max_body_bytes: int = 1 << 20  # 413 above
    max_header_bytes: int = 16 << 10  # h11's limit on an incomplete request head (400 above)
    header_timeout_s: float = 10.0  # close a connection whose request head is not complete by then
    body_timeout_s: float = 30.0  # 408 when the body has not arrived by then
    request_timeout_s: float = 600.0  # 504 (and the rows freed) when not answered by then
    keep_alive_s: int = 5  # idle keep-alive connections close after this
    max_connections: int = 1024  # uvicorn answers 503 beyond this many open connections


# ---------------------------------------------------------------------------------------------
# HTTP layer: uvicorn's h11 protocol with a deadline on request heads


class _HeadDeadlineH11(H11Protocol):
    """uvicorn's h11 protocol, plus: a connection must complete each request head within
    `head_timeout_s` of connecting (or of its previous response), else it is closed. Without
    this, a client that never finishes its headers holds the connection forever."""

    head_timeout_s = 10.0

    def connection_made(self, transport) -> None:  # type: ignore[override]
        super().connection_made(transport)
        self._head_deadline = None
        self._arm_head_deadline()

    def on_response_complete(self) -> None:
        self._disarm_head_deadline()  # the next request head gets the full time
        super().on_response_complete()
        self._arm_head_deadline()

    def connection_lost(self, exc) -> None:
        self._disarm_head_deadline()
        super().connection_lost(exc)

    def _disarm_head_deadline(self) -> None:
        if getattr(self, "_head_deadline", None) is not None:
            self._head_deadline.cancel()
            self._head_deadline = None

    def _arm_head_deadline(self) -> None:
        if self._head_deadline is None and not self.transport.is_closing():
            self._head_deadline = self.loop.call_later(self.head_timeout_s, self._on_head_deadline)

    def _on_head_deadline(self) -> None:
        self._head_deadline = None
        waiting_for_head = self.conn.their_state is h11.IDLE and (self.cycle is None or self.cycle.response_complete)
        if waiting_for_head and not self.transport.is_closing():
            self.transport.close()


def _protocol(limits: ServerLimits) -> type[H11Protocol]:
    return type("SageH11Protocol", (_HeadDeadlineH11,), {"head_timeout_s": float(limits.header_timeout_s)})


def _warn_if_public(host: str, api_key: str | None) -> None:
    if is_loopback(host):
        return
    guard = ("requests need the API key" if api_key else
             f"anyone who can reach it can use the model: set --api-key or {API_KEY_ENV}")
    log.warning("serving on %s, a non-loopback address: %s; plain HTTP (put a TLS proxy in front "
                "for untrusted networks)", host, guard)


def _bind(host: str, port: int) -> socket.socket:
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    sock = socket.socket(family, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    sock.bind((host, port))
    sock.listen(2048)
    sock.set_inheritable(True)
    return sock


# ---------------------------------------------------------------------------------------------
# Responses


def _error_response(e: ApiError, close: bool = False) -> JSONResponse:
    headers = {"Retry-After": "1"} if e.status == 503 else {}
    if close or e.status in (408, 413):  # the body may be unread: do not reuse the connection
        headers["Connection"] = "close"
    if e.status == 401:
        headers["WWW-Authenticate"] = "Bearer"
    return JSONResponse(e.body(), status_code=e.status, headers=headers)


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


def _usage(admitted: Admitted, results) -> dict:
    completion = sum(len(s.tokens) for s in results)
    return {"prompt_tokens": admitted.prompt_tokens, "completion_tokens": completion,
            "total_tokens": admitted.prompt_tokens + completion}


def _finish(s: Steered) -> str:
    return "stop" if s.finish_reason == "stop" else "length"


class _ClientGone(Exception):
    """The client disconnected before its answer was ready."""


class _Exchange:
    """One chat request in flight: its event queue (fed from the engine thread), its deadline,
    and a watch on its client's connection."""

    def __init__(self, request: Request, req: ChatRequest, timeout_s: float):
        self.request, self.req = request, req
        self.loop = asyncio.get_running_loop()
        self.events: asyncio.Queue = asyncio.Queue()
        self.deadline = self.loop.time() + timeout_s
        self.timeout_s = timeout_s
        req.emit = lambda ev: self.loop.call_soon_threadsafe(self.events.put_nowait, ev)
        self.watch: asyncio.Task | None = None

    def watch_client(self) -> None:
        self.watch = asyncio.ensure_future(self._disconnected())

    def unwatch(self) -> None:
        if self.watch is not None:
            self.watch.cancel()
            self.watch = None

    async def _disconnected(self) -> None:
        while (await self.request.receive())["type"] != "http.disconnect":
            pass

    def timed_out(self) -> ApiError:
        self.req.cancel()
        return ApiError(504, f"the request was not answered within {self.timeout_s:g} s", "timeout")

    async def next(self):
        """The next engine event; ApiError 504 at the deadline; _ClientGone if the client left."""
        get = asyncio.ensure_future(self.events.get())
        waits = {get} if self.watch is None else {get, self.watch}
        done, _ = await asyncio.wait(waits, timeout=max(0.0, self.deadline - self.loop.time()),
                                     return_when=asyncio.FIRST_COMPLETED)
        if get in done:
            return get.result()
        get.cancel()
        if self.watch is not None and self.watch in done:
            self.req.cancel()
            raise _ClientGone()
        raise self.timed_out()


def _chunk(cid: str, created: int, model: str, idx: int, delta: dict, finish: str | None = None) -> bytes:
    chunk = {"id": cid, "object": "chat.completion.chunk", "created": created, "model": model,
             "choices": [{"index": idx, "delta": delta, "finish_reason": finish, "logprobs": None}]}
    return b"data: " + json.dumps(chunk).encode() + b"\n\n"


# ---------------------------------------------------------------------------------------------
# The app


class _ApiKeyGuard:
    """ASGI middleware: every /v1 route needs `Authorization: Bearer <key>` (401 otherwise)."""

    def __init__(self, app, key: str):
        self.app, self.key = app, key.encode()

    async def __call__(self, scope, receive, send):
        if scope["type"] == "http" and scope["path"].startswith("/v1"):
            auth = dict(scope["headers"]).get(b"authorization", b"")
            scheme, _, token = auth.partition(b" ")
            if scheme.lower() != b"bearer" or not hmac.compare_digest(token.strip(), self.key):
                await _error_response(ApiError(401, "a valid API key is needed: Authorization: Bearer KEY",
                                               "authentication_error"))(scope, receive, send)
                return
        await self.app(scope, receive, send)


class SageServer:
    """The HTTP server and its engine. `worker` is the engine (`SlotEngine`); `stats` a snapshot
    of its counters."""

    def __init__(self, addr, policy, *, max_batch: int = 8, max_queue: int = 64, default_max_tokens: int = 256,
                 max_tokens_limit: int = 2048, max_model_len: int | None = None, decode_steps: int = 4,
                 request_timeout_s: float | None = None, limits: ServerLimits = ServerLimits(),
                 api_key: str | None = None, verbose: bool = False, model_name: str | None = None):
        host, port = addr[0], int(addr[1])
        if request_timeout_s is not None:
            limits = dataclasses.replace(limits, request_timeout_s=float(request_timeout_s))
        self.policy, self.limits, self.verbose = policy, limits, verbose
        self.model_name = model_name or policy.name or "sage-jax"
        self.created = int(time.time())
        model_len = int(max_model_len or min(policy.cfg.max_position_embeddings, 2048))
        self.default_max_tokens = int(default_max_tokens)
        self.max_tokens_limit = min(int(max_tokens_limit), model_len - 1)
        self.api_key = api_key if api_key is not None else (os.environ.get(API_KEY_ENV) or None)
        _warn_if_public(host, self.api_key)
        self.sock = _bind(host, port)
        self.worker = SlotEngine(policy, EngineConfig(max_batch=max_batch, max_queue=max_queue,
                                                      max_model_len=model_len, max_tokens_limit=self.max_tokens_limit,
                                                      decode_steps=decode_steps))
        self.app = self._build_app()
        config = uvicorn.Config(
            self.app, http=_protocol(limits), lifespan="off", loop="asyncio", log_level="info" if verbose else "warning",
            access_log=verbose, timeout_keep_alive=limits.keep_alive_s, limit_concurrency=limits.max_connections,
            h11_max_incomplete_event_size=limits.max_header_bytes, timeout_graceful_shutdown=5, backlog=2048)
        self._uvicorn = uvicorn.Server(config)
        self._thread: threading.Thread | None = None

    # -- lifecycle ---------------------------------------------------------------------------

    @property
    def server_address(self) -> tuple:
        return self.sock.getsockname()

    @property
    def url(self) -> str:
        host, port = self.server_address[:2]
        host = f"[{host}]" if ":" in host else host
        return f"http://{host}:{port}/v1"

    @property
    def stats(self) -> dict:
        return self.worker.snapshot()

    def start(self, timeout: float = 60.0) -> "SageServer":
        """uvicorn in a daemon thread; returns self once it accepts connections."""
        self._thread = threading.Thread(target=self._uvicorn.run, kwargs={"sockets": [self.sock]},
                                        name="sage-http", daemon=True)
        self._thread.start()
        deadline = time.monotonic() + timeout
        while not self._uvicorn.started:
            if not self._thread.is_alive() or time.monotonic() > deadline:
                raise RuntimeError("the HTTP server did not start")
            time.sleep(0.01)
        return self

    def serve_forever(self) -> None:
        """Serve in this thread until SIGINT/SIGTERM (uvicorn's handlers), then stop the engine."""
        try:
            self._uvicorn.run(sockets=[self.sock])
        finally:
            self.worker.stop()
            self.sock.close()

    def close(self) -> None:
        """Answer queued and running requests 503, stop the engine, then uvicorn; close the socket."""
        self.worker.stop()
        self._uvicorn.should_exit = True
        if self._thread is not None:
            self._thread.join(15)
            self._thread = None
        self.sock.close()

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()

    # -- routes ------------------------------------------------------------------------------

    def _build_app(self):
        app = FastAPI(title="sage-jax", docs_url=None, redoc_url=None, openapi_url=None)
        app.add_exception_handler(ApiError, self._api_error)
        app.add_exception_handler(StarletteHTTPException, self._http_error)
        app.add_exception_handler(Exception, self._internal_error)
        app.add_api_route("/health", self._health, methods=["GET"])
        app.add_api_route("/v1/health", self._health, methods=["GET"])
        app.add_api_route("/v1/stats", self._stats, methods=["GET"])
        app.add_api_route("/v1/models", self._models, methods=["GET"])
        app.add_api_route("/v1/models/{name:path}", self._model, methods=["GET"])
        app.add_api_route("/v1/chat/completions", self._chat, methods=["POST"])
        return _ApiKeyGuard(app, self.api_key) if self.api_key else app

    @staticmethod
    async def _api_error(request: Request, e: ApiError) -> JSONResponse:  # noqa: ARG004
        return _error_response(e)

    @staticmethod
    async def _http_error(request: Request, e: StarletteHTTPException) -> JSONResponse:  # noqa: ARG004
        kind = "not_found" if e.status_code == 404 else "invalid_request_error"
        detail = f"no route {request.method} {request.url.path}" if e.status_code in (404, 405) else str(e.detail)
        return _error_response(ApiError(e.status_code, detail, kind))

    @staticmethod
    async def _internal_error(request: Request, e: Exception) -> JSONResponse:  # noqa: ARG004
        log.exception("internal error")
        return _error_response(ApiError(500, f"internal error: {type(e).__name__}", "server_error"))

    async def _health(self) -> JSONResponse:
        ok = self.worker.alive()
        return JSONResponse({"status": "ok" if ok else "engine stopped", "queued": self.worker.queued(),
                             "active_rows": self.worker.active_rows()}, status_code=200 if ok else 503)

    async def _stats(self) -> JSONResponse:
        return JSONResponse(self.worker.snapshot())

    def _model_card(self) -> dict:
        return {"id": self.model_name, "object": "model", "created": self.created, "owned_by": "sage-jax"}

    async def _models(self) -> JSONResponse:
        return JSONResponse({"object": "list", "data": [self._model_card()]})

    async def _model(self, name: str) -> JSONResponse:
        if name != self.model_name:
            raise ApiError(404, f"no model {name!r}; this server has {self.model_name!r}", "not_found", "model")
        return JSONResponse(self._model_card())

    async def _read_body(self, request: Request) -> bytes:
        limit = self.limits.max_body_bytes
        declared = request.headers.get("content-length")
        if declared is not None and declared.isdigit() and int(declared) > limit:
            raise ApiError(413, f"the body is larger than {limit} bytes", "request_too_large")
        chunks, size = [], 0
        try:
            async with asyncio.timeout(self.limits.body_timeout_s):
                async for chunk in request.stream():
                    size += len(chunk)
                    if size > limit:
                        raise ApiError(413, f"the body is larger than {limit} bytes", "request_too_large")
                    chunks.append(chunk)
        except TimeoutError:
            raise ApiError(408, f"the body did not arrive within {self.limits.body_timeout_s:g} s",
                           "timeout") from None
        return b"".join(chunks)

    async def _chat(self, request: Request) -> Response:
        try:
            raw = await self._read_body(request)
        except ClientDisconnect:
            return Response(status_code=400)
        req = parse_chat_request(parse_body(raw), default_max_tokens=self.default_max_tokens,
                                 max_tokens_limit=self.max_tokens_limit)
        ex = _Exchange(request, req, self.limits.request_timeout_s)
        self.worker.submit(req)  # 503 when the queue is full
        ex.watch_client()
        try:
            first = await ex.next()  # Admitted, or Failed (e.g. a prompt that does not fit: 400)
            if isinstance(first, Failed):
                raise first.error
            if req.stream:
                ex.unwatch()  # the streaming response watches the connection itself
                return StreamingResponse(self._stream(ex, first), media_type="text/event-stream",
                                         headers={"Cache-Control": "no-cache"})
            return await self._complete(ex, first)
        except _ClientGone:
            return Response(status_code=499)  # nobody is listening
        except BaseException:
            req.cancel()
            raise
        finally:
            ex.unwatch()

    async def _complete(self, ex: _Exchange, admitted: Admitted) -> JSONResponse:
        req, results = ex.req, {}
        while len(results) < req.n:
            ev = await ex.next()
            if isinstance(ev, Failed):
                raise ev.error
            if isinstance(ev, Finished):
                results[ev.index] = ev.result
        choices = [{"index": i, "message": _choice_message(req, results[i]), "finish_reason": _finish(results[i]),
                    "logprobs": None} for i in range(req.n)]
        return JSONResponse({"id": f"chatcmpl-{uuid.uuid4().hex[:24]}", "object": "chat.completion",
                             "created": int(time.time()), "model": self.model_name, "choices": choices,
                             "usage": _usage(admitted, results.values())})

    async def _stream(self, ex: _Exchange, admitted: Admitted) -> AsyncIterator[bytes]:
        """SSE: a role chunk per choice, then content chunks as the engine decodes, a finish chunk
        per choice, `data: [DONE]`. The client leaving cancels this generator and the request."""
        req, cid, created, model = ex.req, f"chatcmpl-{uuid.uuid4().hex[:24]}", int(time.time()), self.model_name
        sent, left, results = [""] * req.n, req.n, []
        try:
            for i in range(req.n):
                yield _chunk(cid, created, model, i, {"role": "assistant", "content": ""})
            while left:
                try:
                    ev = await ex.next()
                except ApiError as e:
                    yield b"data: " + json.dumps(e.body()).encode() + b"\n\n"
                    return
                if isinstance(ev, Failed):
                    yield b"data: " + json.dumps(ev.error.body()).encode() + b"\n\n"
                    return
                if isinstance(ev, Delta) and ev.text:
                    sent[ev.index] += ev.text
                    yield _chunk(cid, created, model, ev.index, {"content": ev.text})
                elif isinstance(ev, Finished):
                    left -= 1
                    results.append(ev.result)
                    rest = _final_chunk(cid, created, model, req, ev, sent[ev.index])
                    if rest:
                        yield rest
                    yield _chunk(cid, created, model, ev.index, {}, _finish(ev.result))
            if req.include_usage:  # OpenAI's stream_options: a last chunk without choices
                yield b"data: " + json.dumps({"id": cid, "object": "chat.completion.chunk", "created": created,
                                              "model": model, "choices": [],
                                              "usage": _usage(admitted, results)}).encode() + b"\n\n"
            yield b"data: [DONE]\n\n"
        finally:
            req.cancel()  # no-op once finished; frees the rows when the client left or it timed out


def _final_chunk(cid: str, created: int, model: str, req: ChatRequest, ev: Finished, sent: str) -> bytes:
    """The chunk completing a choice: the text not streamed yet (all of it for the whole-request
    path), plus the latents for the `sage` extension."""
    msg = _choice_message(req, ev.result)
    content = msg["content"]
    delta: dict[str, Any] = {"content": content[len(sent):] if content.startswith(sent) else ""}
    if req.sage:
        delta["sage_latents"], delta["sage_raw"] = msg["sage_latents"], msg["sage_raw"]
    return _chunk(cid, created, model, ev.index, delta) if (delta["content"] or req.sage) else b""


def make_server(policy, host: str = "127.0.0.1", port: int = 0, max_batch: int = 8, max_queue: int = 64,
                **kwargs) -> SageServer:
    """A :class:`SageServer` bound to (host, port) (port 0: a free one; see ``server.url``), not yet
    serving: call ``.start()`` (background thread) or ``.serve_forever()``; ``.close()`` to stop."""
    return SageServer((host, port), policy, max_batch=max_batch, max_queue=max_queue, **kwargs)
