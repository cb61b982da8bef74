"""Judge client safety: the cache key holds the endpoint and the served model's identity, the default
cache lives in the output directory, the API key goes only over https or to loopback."""

from __future__ import annotations

import json
import sys
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).parent))

from fault_server import FaultServer  # noqa: E402

from sage_jax import cli  # noqa: E402
from sage_jax import judge as J  # noqa: E402
from sage_jax.judge.base import CompletionCache  # noqa: E402
from sage_jax.judge.openai_backend import INSECURE_ENV, is_loopback  # noqa: E402

PARAMS = {"temperature": 0.8, "max_tokens": 64, "seed": 0}


def test_cache_key_holds_endpoint_and_identity():
    k = CompletionCache.key("openai", "m", "p", PARAMS, endpoint="http://127.0.0.1:1/v1")
    assert k != CompletionCache.key("openai", "m", "p", PARAMS, endpoint="http://127.0.0.1:2/v1")
    assert k != CompletionCache.key("openai", "m", "p", PARAMS, endpoint="http://127.0.0.1:1/v1", identity="rev2")
    assert k == CompletionCache.key("openai", "m", "p", PARAMS, endpoint="http://127.0.0.1:1/v1")


def test_two_servers_with_one_model_name_do_not_share_cached_answers(tmp_path):
    cache = tmp_path / "cache"
    with FaultServer(fault_rate=0.0, answer=lambda prompt: "from server A") as a, \
            FaultServer(fault_rate=0.0, answer=lambda prompt: "from server B") as b:
        ja = J.make_judge(f"openai:same-name@{a.url}", cache_dir=cache)
        jb = J.make_judge(f"openai:same-name@{b.url}", cache_dir=cache)
        assert ja.complete(["hello"])[0].text == "from server A"
        got = jb.complete(["hello"])[0]
        assert got.text == "from server B" and not got.cached and b.requests == 1
        again = J.make_judge(f"openai:same-name@{a.url}", cache_dir=cache).complete(["hello"])[0]
        assert again.text == "from server A" and again.cached and a.requests == 1  # a rerun: from the cache
        # an explicit identity (new weights under the same name) is a new cache namespace
        jr = J.make_judge(f"openai:same-name@{a.url}", cache_dir=cache, identity="rev-2")
        assert not jr.complete(["hello"])[0].cached and a.requests == 2


class _ModelServer:
    """A loopback OpenAI-compatible server whose ``GET /v1/models/NAME`` says which weights it serves."""

    def __init__(self, root: str):
        self.root, self.chats = root, 0
        outer = self

        class Handler(BaseHTTPRequestHandler):
            def log_message(self, *a):
                pass

            def _send(self, obj):
                data = json.dumps(obj).encode()
                self.send_response(200)
                self.send_header("Content-Type", "application/json")
                self.send_header("Content-Length", str(len(data)))
                self.end_headers()
                self.wfile.write(data)

            def do_GET(self):  # noqa: N802
                import time

                self._send({"id": "judge", "object": "model", "created": int(time.time() * 1000),
                            "owned_by": "vllm", "root": outer.root})

            def do_POST(self):  # noqa: N802
                self.rfile.read(int(self.headers.get("Content-Length") or 0))
                outer.chats += 1
                self._send({"id": "x", "object": "chat.completion", "created": 0, "model": "judge",
                            "choices": [{"index": 0, "finish_reason": "stop",
                                         "message": {"role": "assistant", "content": f"answer of {outer.root}"}}]})

        self.httpd = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self.httpd.server_address[1]}/v1"
        threading.Thread(target=self.httpd.serve_forever, daemon=True).start()

    def close(self):
        self.httpd.shutdown()
        self.httpd.server_close()


def test_identity_auto_reads_the_served_weights(tmp_path):
    cache = tmp_path / "cache"
    old = _ModelServer("/weights/v1")
    try:
        j = J.make_judge(f"openai:judge@{old.url}", cache_dir=cache, identity="auto")
        assert "/weights/v1" in j.identity and "created" not in j.identity
        assert j.complete(["q"])[0].text == "answer of /weights/v1"
        again = J.make_judge(f"openai:judge@{old.url}", cache_dir=cache, identity="auto")
        assert again.identity == j.identity and again.complete(["q"])[0].cached
    finally:
        old.close()
    new = _ModelServer("/weights/v2")  # other weights under the same name (the port may differ too)
    try:
        j2 = J.make_judge(f"openai:judge@{new.url}", cache_dir=cache, identity="auto")
        assert j2.complete(["q"])[0].text == "answer of /weights/v2" and new.chats == 1
    finally:
        new.close()


def test_api_key_only_over_https_or_loopback(monkeypatch):
    monkeypatch.delenv(INSECURE_ENV, raising=False)
    with pytest.raises(ValueError, match="refusing to send the API key over http:// to judge.example.org"):
        J.make_judge("openai:m@http://judge.example.org/v1", api_key="sk-test")
    for url in ("https://judge.example.org/v1", "http://127.0.0.1:9/v1", "http://localhost:9/v1",
                "http://[::1]:9/v1"):
        J.make_judge(f"openai:m@{url}", api_key="sk-test").close()
    J.make_judge("openai:m@http://judge.example.org/v1").close()  # no key, nothing to leak
    J.make_judge("openai:m@http://judge.example.org/v1", api_key="sk-test", allow_insecure=True).close()
    monkeypatch.setenv(INSECURE_ENV, "1")
    J.make_judge("openai:m@http://judge.example.org/v1", api_key="sk-test").close()
    assert is_loopback("127.0.0.5") and not is_loopback("10.0.0.1") and not is_loopback(None)


def test_annotate_keeps_its_judge_cache_beside_the_output(tmp_path, monkeypatch, capsys):
    monkeypatch.delenv("OPENAI_API_KEY", raising=False)
    monkeypatch.delenv("SAGE_JUDGE_API_KEY", raising=False)
    src = tmp_path / "raw.jsonl"
    src.write_text(json.dumps({"id": "a", "conversations": [{"from": "human", "value": "my dog is sick"},
                                                            {"from": "gpt", "value": "Oh no. What happened?"}]})
                   + "\n")
    out = tmp_path / "out" / "sac.jsonl"
    with FaultServer(fault_rate=0.0) as srv:
        rc = cli.main(["annotate", str(src), "-o", str(out), "--judge", f"openai:m@{srv.url}", "--no-progress"])
    assert rc == 0, capsys.readouterr().err
    assert (tmp_path / "out" / "judge_cache" / CompletionCache.FILE).exists()
