"""A fault-injecting OpenAI-compatible ``/v1/chat/completions`` server on loopback (a test helper).

    with FaultServer(seed=0, fault_rate=0.3) as srv:
        judge = make_judge(f"openai:test-model@{srv.url}", timeout=0.3)
        ...
        srv.requests            # requests seen (all paths)
        srv.records             # RequestRecord per chat-completions request, in arrival order

A real HTTP server (stdlib ``ThreadingHTTPServer`` in a daemon thread, bound to 127.0.0.1).
Each request is identified by its *key*: sha256 of (model, messages, temperature, max tokens,
seed), i.e. what the judge's cache keys on; its *attempt* is how many earlier requests the server
saw with the same key. Whether attempt n of a key is faulted, and how, is a pure function of
(seed, key, n), so a run is reproducible whatever the thread interleaving. Faults (on about
``fault_rate`` of the requests):

* ``500`` / ``503``: a server error;
* ``429-0`` / ``429-1``: rate limited with ``Retry-After: 0`` / ``1``;
* ``slow``: the answer comes after ``slow_delay`` seconds (longer than the client's timeout);
* ``garbage``: a 200 whose text is no valid verdict (prose, an out-of-range response, empty).

Only by ``script``: ``badjson`` (a 200 whose body is not JSON) and ``nocontent`` (a 200 whose
message content is null): malformed responses.

Honest answers come from ``answer(prompt)`` (default: the ``rules:`` judge, so best-of-K,
pairwise and annotation prompts all get well-formed answers). ``script(key, attempt, body)`` may
force a fault (or ``"ok"``) for specific requests; ``"401-echo"`` answers 401 quoting the bearer key
back, as some servers do (to test that clients redact it). ``api_key``: require this bearer key.
"""

from __future__ import annotations

import hashlib
import json
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any

FAULTS = ("500", "503", "429-0", "429-1", "slow", "garbage")
GARBAGE = ("Hmm, both responses have their merits and I cannot decide.", "Response 97 is better", "",
           "Response 1 is better. Actually, Response 2 is better.")


@dataclass(frozen=True)
class RequestRecord:
    t: float  # arrival time (time.monotonic)
    key: str
    attempt: int
    fault: str | None  # None = honest answer
    status: int
    retry_after: float | None
    authorization: str | None
    body: dict


def request_key(body: dict) -> str:
    parts = {k: body.get(k) for k in ("model", "messages", "temperature", "max_tokens", "max_completion_tokens",
                                       "seed")}
    return hashlib.sha256(json.dumps(parts, sort_keys=True).encode()).hexdigest()


def _default_answer(prompt: str) -> str:
    from sage_jax.judge.rules import RulesJudge

    text = RulesJudge().answer(prompt)
    return text if text is not None else "Response 1 is better"


class FaultServer:
    def __init__(self, *, seed: int = 0, fault_rate: float = 0.3, slow_delay: float = 1.0,
                 faults: tuple[str, ...] = FAULTS, answer: Callable[[str], str] | None = None,
                 script: Callable[[str, int, dict], str | None] | None = None, api_key: str | None = None):
        self.seed, self.fault_rate, self.slow_delay, self.faults = seed, fault_rate, slow_delay, tuple(faults)
        self.answer = answer or _default_answer
        self.script = script
        self.api_key = api_key
        self._lock = threading.Lock()
        self._records: list[RequestRecord] = []
        self._attempts: dict[str, int] = {}
        self._requests = 0
        self._inflight = 0
        self.max_inflight = 0
        self._httpd: ThreadingHTTPServer | None = None
        self._thread: threading.Thread | None = None

    # -------------------------------------------------------- lifecycle
    def start(self) -> FaultServer:
        server = self

        class Handler(BaseHTTPRequestHandler):
            def log_message(self, *a):  # quiet
                pass

            def do_GET(self):
                server._count()
                self._send(404, {"error": {"message": "not found", "type": "invalid_request_error"}})

            def do_POST(self):
                server._count()
                server._enter()
                try:
                    server._handle(self)
                finally:
                    server._leave()

            def _send(self, status: int, obj: Any, headers: dict[str, str] | None = None):
                data = json.dumps(obj).encode()
                try:
                    self.send_response(status)
                    self.send_header("Content-Type", "application/json")
                    self.send_header("Content-Length", str(len(data)))
                    for k, v in (headers or {}).items():
                        self.send_header(k, v)
                    self.end_headers()
                    self.wfile.write(data)
                except (BrokenPipeError, ConnectionResetError):  # the client gave up (timeout)
                    pass

        class Server(ThreadingHTTPServer):
            request_queue_size = 128  # listen backlog: many concurrent clients must not be refused
            daemon_threads = True

        self._httpd = Server(("127.0.0.1", 0), Handler)
        self._thread = threading.Thread(target=self._httpd.serve_forever, kwargs={"poll_interval": 0.05},
                                        daemon=True, name="fault-server")
        self._thread.start()
        return self

    def stop(self) -> None:
        if self._httpd is not None:
            self._httpd.shutdown()
            self._httpd.server_close()
            self._httpd = None

    def __enter__(self) -> FaultServer:
        return self.start()

    def __exit__(self, *exc) -> None:
        self.stop()

    @property
    def url(self) -> str:
        assert self._httpd is not None, "server not started"
        return f"http://127.0.0.1:{self._httpd.server_address[1]}/v1"

    # -------------------------------------------------------- bookkeeping
    @property
    def requests(self) -> int:
        with self._lock:
            return self._requests

    @property
    def records(self) -> list[RequestRecord]:
        with self._lock:
            return list(self._records)

    def _count(self):
        with self._lock:
            self._requests += 1

    def _enter(self):
        with self._lock:
            self._inflight += 1
            self.max_inflight = max(self.max_inflight, self._inflight)

    def _leave(self):
        with self._lock:
            self._inflight -= 1

    def fault_for(self, key: str, attempt: int) -> str | None:
        h = hashlib.sha256(f"{self.seed}|{key}|{attempt}".encode()).digest()
        r = int.from_bytes(h[:4], "big") / 2 ** 32
        if r >= self.fault_rate or not self.faults:
            return None
        return self.faults[int.from_bytes(h[4:8], "big") % len(self.faults)]

    # -------------------------------------------------------- the endpoint
    def _handle(self, h: BaseHTTPRequestHandler) -> None:
        t = time.monotonic()
        if h.path.rstrip("/") != "/v1/chat/completions":
            h._send(404, {"error": {"message": f"no route {h.path}", "type": "invalid_request_error"}})
            return
        try:
            body = json.loads(h.rfile.read(int(h.headers.get("Content-Length", "0"))))
        except (ValueError, json.JSONDecodeError):
            h._send(400, {"error": {"message": "body is not JSON", "type": "invalid_request_error"}})
            return
        auth = h.headers.get("Authorization")
        key = request_key(body)
        with self._lock:
            attempt = self._attempts.get(key, 0)
            self._attempts[key] = attempt + 1
        fault = self.script(key, attempt, body) if self.script is not None else None
        if fault is None:
            fault = self.fault_for(key, attempt)
        if fault == "ok":
            fault = None
        if self.api_key is not None and auth != f"Bearer {self.api_key}":
            fault = "401-echo"  # authentication comes before anything else, as on a real server
        status, retry_after, headers = 200, None, {}
        if fault in ("500", "503"):
            status = int(fault)
        elif fault in ("429-0", "429-1"):
            status, retry_after = 429, float(fault[-1])
            headers["Retry-After"] = fault[-1]
        elif fault == "401-echo":
            status = 401
        with self._lock:
            self._records.append(RequestRecord(t, key, attempt, fault, status, retry_after, auth, body))
        if status == 401:
            got = (auth or "").removeprefix("Bearer ")
            h._send(401, {"error": {"message": f"Incorrect API key provided: {got}", "type": "invalid_request_error",
                                    "code": "invalid_api_key"}})
            return
        if status != 200:
            h._send(status, {"error": {"message": f"injected fault {fault}", "type": "server_error"}}, headers)
            return
        if fault == "slow":
            time.sleep(self.slow_delay)
        if fault == "badjson":
            data = b'{"id": "chatcmpl-x", "choices": [{"message": {"content": "Response 1 is be'
            h.send_response(200)
            h.send_header("Content-Type", "application/json")
            h.send_header("Content-Length", str(len(data)))
            h.end_headers()
            h.wfile.write(data)
            return
        prompt = next((m.get("content", "") for m in reversed(body.get("messages", [])) if m.get("role") == "user"), "")
        if fault == "garbage":
            n = int.from_bytes(hashlib.sha256(f"g|{key}|{attempt}".encode()).digest()[:2], "big")
            text = GARBAGE[n % len(GARBAGE)]
        elif fault == "nocontent":
            text = None
        else:
            text = self.answer(prompt)
        h._send(200, {"id": f"chatcmpl-{key[:12]}-{attempt}", "object": "chat.completion", "created": int(time.time()),
                      "model": body.get("model", ""),
                      "choices": [{"index": 0, "message": {"role": "assistant", "content": text},
                                   "finish_reason": "stop", "logprobs": None}],
                      "usage": {"prompt_tokens": len(prompt.split()), "completion_tokens": len((text or "").split()),
                                "total_tokens": len(prompt.split()) + len((text or "").split())}})
