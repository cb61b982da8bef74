"""``openai:`` — chat completions from any OpenAI-compatible server (OpenAI, vLLM, ``sage-jax serve``).

Each prompt is one user message (optionally after a ``system`` message), sent through the official
``openai`` client (``openai.OpenAI(base_url=..., api_key=..., max_retries=..., timeout=...)``). The
client owns the transport: every attempt has the ``timeout``; 408, 409, 429, 5xx, timeouts and
connection errors are retried with its exponential backoff (0.5 s doubling up to 8 s, jitter),
waiting the server's ``Retry-After`` / ``retry-after-ms`` instead when it sent one, up to
``RetryPolicy.max_attempts`` attempts in all; other statuses (400, 401, 403, 404, 422) fail at
once. Prompts run on a thread pool of ``max_concurrency`` workers sharing one client.

A call that still fails, or a response with no text content (malformed), is a
:class:`~sage_jax.judge.base.Completion` with ``error`` set; re-asking for it, like re-asking for an
unparseable verdict, is the caller's (``select_best(..., tries=)``, ``annotate_dialogues(..., tries=)``).

The API key is held by the client only: it is not part of the judge's name, repr, cache key or
cache rows, and it is redacted from every error message (servers sometimes echo it back). It is
sent only over https or to a loopback host: a key with ``http://`` to any other host raises
(:func:`check_transport`) unless ``allow_insecure=True`` or ``SAGE_JUDGE_ALLOW_INSECURE=1``.

The cache key holds the base URL and ``identity``: ``None`` (the name is all that is known),
a string naming the served weights (a revision, a checkpoint hash), or ``"auto"``: one
``GET {base_url}/models/{model}`` at construction, whose stable fields (``id``, vLLM's ``root``,
``parent``, ``owned_by``) become the identity; that costs one request per run, even a cached one.
"""

from __future__ import annotations

import json
import logging
import os
from concurrent.futures import ThreadPoolExecutor
from typing import Any
from urllib.parse import urlsplit

import openai

from sage_jax.judge.base import CachingJudge, Completion, RetryPolicy, redact
from sage_jax.net import is_loopback

__all__ = ["OpenAIJudge", "DEFAULT_BASE_URL", "check_transport", "is_loopback", "INSECURE_ENV"]

log = logging.getLogger("sage_jax.judge")
DEFAULT_BASE_URL = "https://api.openai.com/v1"
_RETRY_COUNT_HEADER = "x-stainless-retry-count"  # set by the client on every attempt (0, 1, ...)
INSECURE_ENV = "SAGE_JUDGE_ALLOW_INSECURE"
_IDENTITY_FIELDS = ("id", "root", "parent", "owned_by")  # not "created": vLLM sets it to the request time


def check_transport(base_url: str, *, sends_key: bool, allow_insecure: bool = False) -> None:
    """Refuse to send an API key in clear text: over ``http://`` only to a loopback host, unless
    ``allow_insecure`` or ``$SAGE_JUDGE_ALLOW_INSECURE`` is 1/true."""
    parts = urlsplit(base_url)
    if not sends_key or parts.scheme == "https" or is_loopback(parts.hostname):
        return
    if allow_insecure or os.environ.get(INSECURE_ENV, "").strip().lower() in ("1", "true", "yes"):
        log.warning("openai judge: sending the API key over %s to %s (allowed explicitly)", parts.scheme,
                    parts.hostname)
        return
    raise ValueError(f"openai judge: refusing to send the API key over {parts.scheme}:// to {parts.hostname} "
                     f"(not https, not loopback); use https, or allow it with allow_insecure=true or "
                     f"{INSECURE_ENV}=1")


def _attempts(request: Any) -> int:
    """HTTP attempts the client made for a call, read from its last request's retry-count header."""
    try:
        return int(request.headers.get(_RETRY_COUNT_HEADER, 0)) + 1
    except (AttributeError, TypeError, ValueError):
        return 1


def _content(resp: Any) -> str | None:
    """The text of a chat completion, or None when the response has none (malformed or empty message)."""
    try:
        text = resp.choices[0].message.content
    except (AttributeError, IndexError, TypeError):
        return None
    return text if isinstance(text, str) else None


class OpenAIJudge(CachingJudge):
    """A judge behind an OpenAI-compatible ``/v1/chat/completions`` endpoint (see the module docstring)."""

    backend = "openai"

    def __init__(self, model: str, *, base_url: str | None = None, api_key: str | None = None,
                 cache_dir: str | os.PathLike | None = None, timeout: float = 60.0,
                 retry: RetryPolicy | None = None, max_concurrency: int = 8, system: str | None = None,
                 extra_body: dict[str, Any] | None = None, max_tokens_field: str = "max_tokens",
                 identity: str | None = None, allow_insecure: bool = False):
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
        self.endpoint = self.base_url
        key = api_key or os.environ.get("SAGE_JUDGE_API_KEY") or os.environ.get("OPENAI_API_KEY")
        if not key:
            if self.base_url == DEFAULT_BASE_URL:
                raise ValueError("openai judge: no API key (set SAGE_JUDGE_API_KEY or OPENAI_API_KEY)")
            key = "EMPTY"  # local servers (vLLM, sage-jax serve) accept any key
        check_transport(self.base_url, sends_key=key != "EMPTY", allow_insecure=allow_insecure)
        self._secrets = (key,)
        self.timeout = float(timeout)
        self.retry = retry or RetryPolicy()
        self.max_concurrency = int(max_concurrency)
        self.system = system
        self.extra_body = dict(extra_body or {})
        self.max_tokens_field = max_tokens_field
        self._client = openai.OpenAI(base_url=self.base_url, api_key=key, timeout=self.timeout,
                                     max_retries=self.retry.max_attempts - 1)
        self.identity = self._served_identity() if identity == "auto" else (identity or "")

    def _served_identity(self) -> str:
        """The stable fields of ``GET /models/MODEL`` as the cache identity (``identity="auto"``)."""
        try:
            card = self._client.models.retrieve(self.model).model_dump()
        except openai.OpenAIError as e:
            raise ValueError(f"openai judge: cannot read the served model's identity from {self.base_url}/models/"
                             f"{self.model}: {redact(str(e), self._secrets)}; give identity= explicitly") from None
        ident = {k: card[k] for k in _IDENTITY_FIELDS if card.get(k) is not None}
        log.info("%s: served model identity %s", self.name, ident)
        return json.dumps(ident, sort_keys=True)

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

    def _call(self, prompt: str, params: dict[str, Any]) -> Completion:
        """One client call (the client retries the transport); never raises."""
        payload = self._payload(prompt, params)
        try:
            raw = self._client.chat.completions.with_raw_response.create(**payload)
            attempts = raw.retries_taken + 1
            try:
                text = _content(raw.parse())
                why = None if text is not None else "malformed response: no choices[0].message.content"
            except (ValueError, openai.OpenAIError) as e:  # a 200 whose body is no JSON / does not validate
                text, why = None, f"malformed response: {type(e).__name__}: {e}"
        except openai.APITimeoutError as e:
            attempts, text, why = _attempts(e.request), None, f"timeout after {self.timeout:g}s"
        except openai.APIConnectionError as e:
            attempts, text, why = _attempts(e.request), None, f"connection error: {e}"
        except openai.APIStatusError as e:
            attempts, text, why = _attempts(e.response.request), None, f"HTTP {e.status_code}: {e.message}"
        except openai.OpenAIError as e:
            attempts, text, why = 1, None, f"{type(e).__name__}: {e}"
        except Exception as e:  # noqa: BLE001 - never let one call kill the batch
            attempts, text, why = 1, None, f"unexpected {type(e).__name__}: {e}"
        self.stats.add(requests=attempts, retries=attempts - 1)
        if text is not None:
            return Completion(text, attempts=attempts)
        why = redact(why, self._secrets)
        tail = f" (after {attempts} attempts)" if attempts > 1 else ""
        log.warning("%s: call failed: %s%s", self.name, why, tail)
        return Completion(None, error=f"{why}{tail}", attempts=attempts)

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
        self._client.close()
        super().close()
