"""`sage-jax serve` on its ASGI stack (FastAPI on uvicorn), tiny model, loopback: a fuzz of bad
requests over raw sockets, many parallel clients with mid-stream disconnects, token-by-token
streaming, continuous batching, request timeouts and the API key."""

import json
import logging
import socket
import threading
import time
import urllib.error
import urllib.request

import pytest

from sage_jax.serve import ServerLimits, make_server
from sage_jax.serve.server import API_KEY_ENV, _warn_if_public

openai = pytest.importorskip("openai")

LIMITS = ServerLimits(max_body_bytes=64 << 10, header_timeout_s=1.0, body_timeout_s=1.0, request_timeout_s=120.0)
CHAT = {"messages": [{"role": "user", "content": "hello there"}], "temperature": 0, "max_tokens": 4}


@pytest.fixture(scope="module")
def pol(tiny_dir):
    from sage_jax.rollout.policy import load_policy

    return load_policy(str(tiny_dir))


@pytest.fixture(scope="module")
def srv(pol):
    s = make_server(pol, "127.0.0.1", 0, max_batch=8, max_queue=64, max_model_len=256, max_tokens_limit=64,
                    limits=LIMITS).start()
    for extra in ({}, {"min_tokens": 2}):  # compile the slots' programs before the timed tests
        assert _status(_post_raw(s, _chat_body(**extra))) == 200
    yield s
    s.close()


@pytest.fixture
def hooks(srv):
    """Reset the engine's test hooks after a test."""
    yield srv.worker
    srv.worker.before_batch = srv.worker.after_step = None


def _addr(srv):
    return srv.server_address[:2]


def _raw(srv, data: bytes, timeout: float = 120.0, shutdown: bool = False) -> bytes:
    """Send raw bytes; the response bytes until the server closes or answers (b"" = closed)."""
    with socket.create_connection(_addr(srv), timeout=timeout) as s:
        s.sendall(data)
        if shutdown:
            s.shutdown(socket.SHUT_WR)
        out = b""
        while True:
            try:
                chunk = s.recv(65536)
            except ConnectionResetError:
                return out
            if not chunk:
                return out
            out += chunk
            head, sep, body = out.partition(b"\r\n\r\n")
            if sep and b"content-length:" in head.lower():
                n = int(head.lower().split(b"content-length:")[1].split(b"\r\n")[0])
                if len(body) >= n:
                    return out


def _status(resp: bytes) -> int | None:
    return int(resp.split(b" ", 2)[1]) if resp.startswith(b"HTTP/1.1 ") else None


def _post_raw(srv, body: bytes, headers: str | None = None) -> bytes:
    h = headers if headers is not None else f"Content-Type: application/json\r\nContent-Length: {len(body)}\r\n"
    return _raw(srv, b"POST /v1/chat/completions HTTP/1.1\r\nHost: x\r\n" + h.encode() + b"\r\n" + body)


def _get(srv, path: str, headers: dict | None = None, timeout: float = 30.0):
    req = urllib.request.Request(srv.url.removesuffix("/v1") + path, headers=headers or {})
    try:
        with urllib.request.urlopen(req, timeout=timeout) as r:
            return r.status, json.loads(r.read())
    except urllib.error.HTTPError as e:
        return e.code, json.loads(e.read())


def _chat_body(**kw) -> bytes:
    return json.dumps(dict(CHAT, **kw)).encode()


def test_fuzz_bad_requests_get_an_answer(srv):
    cases = {
        "malformed json": (_post_raw(srv, b'{"messages": [}'), 400),
        "not an object": (_post_raw(srv, b"[1, 2]"), 400),
        "empty body": (_post_raw(srv, b""), 400),
        "NaN temperature": (_post_raw(srv, _chat_body(temperature=float("nan"))), 400),
        "Infinity top_p": (_post_raw(srv, _chat_body(top_p=float("inf"))), 400),
        "n 1e999": (_post_raw(srv, b'{"messages": [{"role": "user", "content": "hi"}], "n": 1e999}'), 400),
        "max_tokens NaN": (_post_raw(srv, b'{"messages": [{"role": "user", "content": "hi"}], "max_tokens": NaN}'),
                           400),
        "n a bool": (_post_raw(srv, _chat_body(n=True)), 400),
        "n fractional": (_post_raw(srv, _chat_body(n=1.5)), 400),
        "temperature 3": (_post_raw(srv, _chat_body(temperature=3)), 400),
        "deep nesting": (_post_raw(srv, b"[" * 20000 + b"]" * 20000), 400),
        "bad role": (_post_raw(srv, _chat_body(messages=[{"role": "tool", "content": "x"}])), 400),
        "prompt too long": (_post_raw(srv, _chat_body(messages=[{"role": "user", "content": "word " * 400}])), 400),
        "Content-Length abc": (_post_raw(srv, b"{}", "Content-Length: abc\r\n"), 400),
        "Content-Length -1": (_post_raw(srv, b"{}", "Content-Length: -1\r\n"), 400),
        "Content-Length huge": (_post_raw(srv, b"{}", f"Content-Length: {10 ** 30}\r\n"), (400, 413)),  # h11: 400
        "Content-Length large": (_post_raw(srv, b"{}", f"Content-Length: {10 ** 12}\r\n"), 413),
        "body over the limit": (_post_raw(srv, b'{"x": "' + b"a" * (80 << 10) + b'"}'), 413),
        "body never arrives": (_post_raw(srv, b"{", "Content-Length: 100\r\n"), 408),
        "unknown route": (_raw(srv, b"GET /v1/nothing HTTP/1.1\r\nHost: x\r\n\r\n"), 404),
        "garbage request line": (_raw(srv, b"\x00\x01 garbage\r\n\r\n"), 400),
    }
    for name, (resp, want) in cases.items():
        assert _status(resp) in (want if isinstance(want, tuple) else (want,)), (name, resp[:300])
        if want == 400 and b"application/json" in resp.split(b"\r\n\r\n")[0]:
            body = json.loads(resp.split(b"\r\n\r\n", 1)[1])
            assert body["error"]["message"], name
    nan = json.loads(cases["NaN temperature"][0].split(b"\r\n\r\n", 1)[1])["error"]["message"]
    assert "NaN" in nan and "finite" in nan
    # a client that never finishes its headers is closed after header_timeout_s
    t0 = time.monotonic()
    assert _raw(srv, b"POST /v1/chat/completions HTTP/1.1\r\nHost: x\r\nContent-Le", timeout=20) == b""
    assert time.monotonic() - t0 < 15
    # ... and so is one that connects and says nothing
    t0 = time.monotonic()
    assert _raw(srv, b"", timeout=20) == b""
    assert time.monotonic() - t0 < 15
    assert _get(srv, "/health")[0] == 200


def test_parallel_clients_and_disconnects_keep_the_server_healthy(srv):
    n_clients, results, health, stop = 200, [], [], threading.Event()

    def poll_health():
        while not stop.is_set():
            t0 = time.monotonic()
            code, _ = _get(srv, "/health", timeout=10)
            health.append((code, time.monotonic() - t0))
            time.sleep(0.1)

    def client(i):
        kind = i % 4
        try:
            if kind == 0:  # a normal request
                resp = _post_raw(srv, _chat_body(seed=i))
                results.append(_status(resp) or f"kind 0: {resp!r}")
            elif kind == 1:  # a stream the client leaves after its first bytes
                with socket.create_connection(_addr(srv), timeout=60) as s:
                    body = _chat_body(stream=True, max_tokens=32, min_tokens=32)
                    s.sendall(b"POST /v1/chat/completions HTTP/1.1\r\nHost: x\r\nContent-Length: %d\r\n\r\n%s"
                              % (len(body), body))
                    resp = s.recv(4096)
                    results.append(_status(resp) or f"kind 1: {resp!r}")
            elif kind == 2:  # a non-stream request whose client leaves before the answer
                with socket.create_connection(_addr(srv), timeout=60) as s:
                    body = _chat_body(max_tokens=32, min_tokens=32)
                    s.sendall(b"POST /v1/chat/completions HTTP/1.1\r\nHost: x\r\nContent-Length: %d\r\n\r\n%s"
                              % (len(body), body))
                results.append("left")
            else:  # garbage
                results.append(_status(_post_raw(srv, b'{"messages": NaN}')))
        except Exception as e:  # noqa: BLE001
            results.append(f"kind {kind}: {e!r}")

    watcher = threading.Thread(target=poll_health)
    watcher.start()
    threads = [threading.Thread(target=client, args=(i,)) for i in range(n_clients)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(120)
    # the rows of the clients that left are freed
    deadline = time.monotonic() + 60
    while (srv.worker.active_rows() or srv.worker.queued()) and time.monotonic() < deadline:
        time.sleep(0.1)
    stop.set()
    watcher.join(30)
    bad = [r for r in results if not (r == "left" or (isinstance(r, int) and (200 <= r < 300 or 400 <= r < 600)))]
    assert len(results) == n_clients and not bad, bad[:5]
    assert results.count(400) == n_clients // 4
    assert health and all(code == 200 for code, _ in health), health
    assert srv.worker.active_rows() == 0 and srv.worker.queued() == 0, srv.stats
    assert srv.stats["cancelled"] > 0, srv.stats
    assert _get(srv, "/health")[0] == 200


def test_openai_client_streams_token_by_token(srv, hooks):
    client = openai.OpenAI(base_url=srv.url, api_key="none", max_retries=0, timeout=120)
    got_first, decoded_at_first = threading.Event(), []

    def hold_until_client_saw_a_chunk():  # the engine waits (<= 30 s) until the client has a chunk
        if srv.worker.active_rows():
            got_first.wait(30)

    whole = client.chat.completions.create(model="x", messages=CHAT["messages"], temperature=0, max_tokens=24,
                                           extra_body={"min_tokens": 24})
    hooks.after_step = hold_until_client_saw_a_chunk
    tokens_before = srv.stats["tokens"]
    stream = client.chat.completions.create(model="x", messages=CHAT["messages"], temperature=0, max_tokens=24,
                                            stream=True, stream_options={"include_usage": True},
                                            extra_body={"min_tokens": 24})
    parts, usage = [], []
    for ch in stream:
        if ch.usage is not None:
            usage.append(ch.usage)
        text = ch.choices[0].delta.content if ch.choices else None
        if text:
            if not parts:
                decoded_at_first.append(srv.stats["tokens"] - tokens_before)
                got_first.set()
            parts.append(text)
    assert "".join(parts) == whole.choices[0].message.content
    assert len(parts) >= 3, parts
    assert decoded_at_first[0] < 24  # the first chunk arrived before the last token was decoded
    assert [u.completion_tokens for u in usage] == [24] and usage[0].prompt_tokens == whole.usage.prompt_tokens


def test_continuous_batching_short_request_finishes_first(srv, hooks):
    done_at, long_started = {}, threading.Event()

    def wait_for_the_short_one():  # once the long request decodes, hold it until the short one queues
        if srv.worker.active_rows() and not long_started.is_set():
            long_started.set()
            deadline = time.monotonic() + 30
            while not srv.worker.queued() and time.monotonic() < deadline:
                time.sleep(0.005)

    hooks.after_step = wait_for_the_short_one

    def ask(name, **kw):
        code = _status(_post_raw(srv, _chat_body(**kw)))
        done_at[name] = (time.monotonic(), code)

    long = threading.Thread(target=ask, args=("long",), kwargs=dict(max_tokens=64, min_tokens=64))
    long.start()
    assert long_started.wait(60)
    short = threading.Thread(target=ask, args=("short",), kwargs=dict(max_tokens=2, min_tokens=2))
    short.start()
    short.join(60)
    long.join(60)
    assert done_at["short"][1] == done_at["long"][1] == 200
    assert done_at["short"][0] < done_at["long"][0]
    assert srv.stats["max_rows"] >= 2


def test_timeout_answers_504_and_frees_the_rows(srv, hooks):
    import dataclasses

    hooks.after_step = lambda: time.sleep(0.2)
    limits = srv.limits
    srv.limits = dataclasses.replace(limits, request_timeout_s=0.5)
    try:
        resp = _post_raw(srv, _chat_body(max_tokens=64, min_tokens=64))
    finally:
        srv.limits = limits
    assert _status(resp) == 504 and b"not answered within" in resp
    deadline = time.monotonic() + 30
    while srv.worker.active_rows() and time.monotonic() < deadline:
        time.sleep(0.05)
    assert srv.worker.active_rows() == 0


def test_api_key(pol, monkeypatch):
    monkeypatch.setenv(API_KEY_ENV, "sekret")
    s = make_server(pol, "127.0.0.1", 0, max_batch=2, max_queue=4).start()
    try:
        assert _get(s, "/v1/models")[0] == 401
        code, body = _get(s, "/v1/models", {"Authorization": "Bearer wrong"})
        assert code == 401 and body["error"]["type"] == "authentication_error"
        assert _get(s, "/v1/models", {"Authorization": "Bearer sekret"})[0] == 200
        assert _get(s, "/health")[0] == 200  # health checks need no key
        with pytest.raises(openai.AuthenticationError):
            openai.OpenAI(base_url=s.url, api_key="nope", max_retries=0).models.list()
        assert [m.id for m in openai.OpenAI(base_url=s.url, api_key="sekret", max_retries=0).models.list().data]
    finally:
        s.close()


def test_public_address_warns(caplog):
    with caplog.at_level(logging.WARNING, logger="sage_jax.serve"):
        _warn_if_public("127.0.0.1", None)
        _warn_if_public("localhost", None)
        assert not caplog.records
        _warn_if_public("0.0.0.0", None)
    assert "non-loopback" in caplog.text and API_KEY_ENV in caplog.text
