"""``openai:`` — chat completions from any OpenAI-compatible server (OpenAI, vLLM, ``sage-jax serve``).

Each prompt is one user message (optionally after a ``system`` message). Every call has a
timeout; failures that may pass (429, 408/409/425, 5xx, timeouts, connection errors, a malformed
response) are retried with exponential backoff and full jitter, waiting at least the server's
``Retry-After`` (or ``retry-after-ms``), up to ``RetryPolicy.max_attempts`` attempts; others (400,
401, 403, 404, 422) fail at once. Prompts run on a thread pool of ``max_concurrency`` workers.
A call that still fails is a :class:`~sage_jax.judge.base.Completion` with ``error`` set.

Transport: the official ``openai`` client (``max_retries=0``: the retry loop is ours) when it is
installed, else a small stdlib (``urllib``) client speaking the same protocol; force one with
``transport="openai"`` or ``"urllib"``.

The API key is held by the transport only: it is not part of the judge's name, repr, cache key or
cache rows, and it is redacted from every error message (servers sometimes echo it back).
"""

from __future__ import annotations

import http.client
import json
import logging
import os
import random
import socket
import threading
import time
import urllib.error
import urllib.request
from concurrent.futures import ThreadPoolExecutor
from typing import Any

from sage_jax.judge.base import (CachingJudge, Completion, RetryPolicy, is_retryable_status, redact,
                                 retry_after_from_headers)

__all__ = ["OpenAIJudge", "CallError", "DEFAULT_BASE_URL"]

log = logging.getLogger("sage_jax.judge")
DEFAULT_BASE_URL = "https://api.openai.com/v1"


class CallError(Exception):
    """One failed HTTP attempt: ``retryable``, the HTTP ``status`` if any, the server's ``retry_after`` (s)."""

    def __init__(self, message: str, *, retryable: bool, status: int | None = None, retry_after: float | None = None):
        super().__init__(message)
        self.message, self.retryable, self.status, self.retry_after = message, retryable, status, retry_after


def _content(data: Any) -> str:
    """The text of a chat-completion response (dict or client object); CallError if it has none."""
    try:
        choice = data["choices"][0] if isinstance(data, dict) else data.choices[0]
        msg = choice["message"] if isinstance(choice, dict) else choice.message
        text = msg.get("content") if isinstance(msg, dict) else msg.content
    except (KeyError, IndexError, TypeError, AttributeError):
        raise CallError("malformed response: no choices[0].message.content", retryable=True) from None
    if not isinstance(text, str):
        raise CallError("empty response: the message has no text content", retryable=True)
    return text


class _ClientTransport:
    """The official ``openai`` client, no retries of its own."""

    name = "openai"

    def __init__(self, base_url: str, api_key: str, timeout: float):
        import openai

        self._o = openai
        self._client = openai.OpenAI(base_url=base_url, api_key=api_key, max_retries=0, timeout=timeout)

    def chat(self, payload: dict[str, Any], timeout: float) -> str:
        o = self._o
        body = dict(payload)
        extra = body.pop("extra_body", None)
        try:
            resp = self._client.chat.completions.create(**body, extra_body=extra, timeout=timeout)
        except o.APITimeoutError:
            raise CallError(f"timeout after {timeout:g}s", retryable=True) from None
        except o.APIConnectionError as e:
            raise CallError(f"connection error: {e}", retryable=True) from None
        except o.APIStatusError as e:
            headers = e.response.headers if e.response is not None else None
            raise CallError(f"HTTP {e.status_code}: {e.message}", retryable=is_retryable_status(e.status_code),
                            status=e.status_code, retry_after=retry_after_from_headers(headers)) from None
        except o.OpenAIError as e:  # e.g. a response that does not validate
            raise CallError(f"{type(e).__name__}: {e}", retryable=True) from None
        return _content(resp)

    def close(self) -> None:
        self._client.close()


class _UrllibTransport:
    """Stdlib HTTP: POST ``{base_url}/chat/completions`` with a bearer key."""

    name = "urllib"

    def __init__(self, base_url: str, api_key: str, timeout: float):
        self._url = base_url.rstrip("/") + "/chat/completions"
        self._key = api_key

    def chat(self, payload: dict[str, Any], timeout: float) -> str:
        body = dict(payload)
        body.update(body.pop("extra_body", None) or {})
        req = urllib.request.Request(self._url, data=json.dumps(body).encode("utf-8"), method="POST",
                                     headers={"Content-Type": "application/json", "Accept": "application/json",
                                              "Authorization": f"Bearer {self._key}"})
        try:
            with urllib.request.urlopen(req, timeout=timeout) as r:
                raw = r.read()
        except urllib.error.HTTPError as e:
            try:
                detail = e.read(500).decode("utf-8", "replace")
            except Exception:  # noqa: BLE001
                detail = ""
            raise CallError(f"HTTP {e.code}: {detail or e.reason}", retryable=is_retryable_status(e.code),
                            status=e.code, retry_after=retry_after_from_headers(e.headers)) from None
        except (TimeoutError, socket.timeout):
            raise CallError(f"timeout after {timeout:g}s", retryable=True) from None
        except urllib.error.URLError as e:
            if isinstance(e.reason, (TimeoutError, socket.timeout)):
                raise CallError(f"timeout after {timeout:g}s", retryable=True) from None
            raise CallError(f"connection error: {e.reason}", retryable=True) from None
        except (http.client.HTTPException, OSError) as e:
            raise CallError(f"connection error: {type(e).__name__}: {e}", retryable=True) from None
        try:
            data = json.loads(raw)
        except (json.JSONDecodeError, UnicodeDecodeError):
            raise CallError("malformed response: not JSON", retryable=True) from None
        return _content(data)

    def close(self) -> None:
        pass


def _make_transport(kind: str, base_url: str, api_key: str, timeout: float):
    if kind not in ("auto", "openai", "urllib"):
        raise ValueError(f"transport must be auto, openai or urllib, got {kind!r}")
    if kind in ("auto", "openai"):
        try:
            return _ClientTransport(base_url, api_key, timeout)
        except ImportError:
            if kind == "openai":
                raise ImportError("transport='openai' needs the openai package (pip install openai)") from None
    return _UrllibTransport(base_url, api_key, timeout)


class OpenAIJudge(CachingJudge):
    """A judge behind an OpenAI-compatible ``/v1/chat/completions`` endpoint (see the module docstring)."""

    backend = "openai"

    def __init__(self, model: str, *, base_url: str | None = None, api_key: str | None = None,
                 cache_dir: str | os.PathLike | None = None, timeout: float = 60.0,
                 retry: RetryPolicy | None = None, max_concurrency: int = 8, system: str | None = None,
                 transport: str = "auto", extra_body: dict[str, Any] | None = None,
                 max_tokens_field: str = "max_tokens"):
        super().__init__(cache_dir)
        if max_concurrency < 1:
            raise ValueError(f"max_concurrency must be >= 1, got {max_concurrency}")
        if timeout <= 0:
            raise ValueError(f"timeout must be > 0, got {timeout}")
        if max_tokens_field not in ("max_tokens", "max_completion_tokens"):
            raise ValueError("max_tokens_field must be max_tokens or max_completion_tokens")
        self.model = model
        self.name = f"openai:{model}"
        self.base_url = (base_url or os.environ.get("SAGE_JUDGE_BASE_URL") or os.environ.get("OPENAI_BASE_URL")
                         or DEFAULT_BASE_URL).rstrip("/")
        key = api_key or os.environ.get("SAGE_JUDGE_API_KEY") or os.environ.get("OPENAI_API_KEY")
        if not key:
            if self.base_url == DEFAULT_BASE_URL:
                raise ValueError("openai judge: no API key (set SAGE_JUDGE_API_KEY or OPENAI_API_KEY)")
            key = "EMPTY"  # local servers (vLLM, sage-jax serve) accept any key
        self._secrets = (key,)
        self.timeout = float(timeout)
        self.retry = retry or RetryPolicy()
        self.max_concurrency = int(max_concurrency)
        self.system = system
        self.extra_body = dict(extra_body or {})
        self.max_tokens_field = max_tokens_field
        self._rng = random.Random()
        self._rng_lock = threading.Lock()
        self._transport = _make_transport(transport, self.base_url, key, self.timeout)
        self.transport = self._transport.name  # "openai" (the official client) or "urllib"

    # the system prompt and extra body change the answer: they are part of the cache key
    def _params(self, temperature, max_tokens, seed):
        p = super()._params(temperature, max_tokens, seed)
        if self.system is not None:
            p["system"] = self.system
        if self.extra_body:
            p["extra_body"] = self.extra_body
        return p

    def _payload(self, prompt: str, params: dict[str, Any]) -> dict[str, Any]:
        msgs = ([{"role": "system", "content": self.system}] if self.system is not None else [])
        msgs.append({"role": "user", "content": prompt})
        payload: dict[str, Any] = {"model": self.model, "messages": msgs, "temperature": params["temperature"],
                                   self.max_tokens_field: params["max_tokens"]}
        if params["seed"] is not None:
            payload["seed"] = params["seed"]
        if self.extra_body:
            payload["extra_body"] = dict(self.extra_body)
        return payload

    def _delay(self, retry: int, retry_after: float | None) -> float:
        with self._rng_lock:
            return self.retry.delay(retry, retry_after, self._rng)

    def _call(self, prompt: str, params: dict[str, Any]) -> Completion:
        payload = self._payload(prompt, params)
        attempts = self.retry.max_attempts
        err: CallError | None = None
        for attempt in range(1, attempts + 1):
            self.stats.add(requests=1)
            try:
                return Completion(self._transport.chat(payload, self.timeout), attempts=attempt)
            except CallError as e:
                err = e
            except Exception as e:  # noqa: BLE001 - never let one call kill the batch
                err = CallError(f"unexpected {type(e).__name__}: {e}", retryable=False)
            msg = redact(err.message, self._secrets)
            if not err.retryable or attempt == attempts:
                break
            wait = self._delay(attempt, err.retry_after)
            log.info("%s: %s; retry %d/%d in %.2fs", self.name, msg, attempt, attempts - 1, wait)
            self.stats.add(retries=1)
            time.sleep(wait)
        assert err is not None
        why = redact(err.message, self._secrets)
        tail = f" (after {attempt} attempts)" if err.retryable else ""
        log.warning("%s: call failed: %s%s", self.name, why, tail)
        return Completion(None, error=f"{why}{tail}", attempts=attempt)

    def _generate(self, prompts, params, done):
        out: list[Completion | None] = [None] * len(prompts)

        def one(j: int) -> None:
            c = self._call(prompts[j], params)
            out[j] = c
            done(j, c)

        workers = min(self.max_concurrency, len(prompts))
        if workers <= 1:
            for j in range(len(prompts)):
                one(j)
        else:
            with ThreadPoolExecutor(workers, thread_name_prefix="sage-judge") as ex:
                list(ex.map(one, range(len(prompts))))
        return out  # type: ignore[return-value]

    def close(self) -> None:
        self._transport.close()
        super().close()
