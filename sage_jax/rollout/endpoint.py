"""A chat policy served by an OpenAI-compatible endpoint (`openai:MODEL@URL`): vLLM, SGLang, or
`sage-jax serve`, for when a user outgrows our engine.

The search and self-play use it through the same message-level call as our own sampler
(`chat(conversations, sampling, n=K)`): K samples of one conversation are one request with
`n=K`, so an engine with prefix caching prefills the shared history once, which is what the
reference relied on vLLM for. `top_k` and `repetition_penalty` go in the request body as vLLM's
extensions (`sage-jax serve` honours them too). Requests run concurrently (bounded); transport
retries, backoff and `Retry-After` are the `openai` client's.

The API key comes from `$SAGE_POLICY_API_KEY`, else `$OPENAI_API_KEY` ("EMPTY" when neither is
set, as vLLM expects); it is only sent over https or to a loopback host.
"""

from __future__ import annotations

import dataclasses
import ipaddress
import os
from concurrent.futures import ThreadPoolExecutor
from typing import Sequence
from urllib.parse import urlparse

import openai

from sage_jax.rollout.sampling import SamplingParams

SPEC_PREFIX = "openai:"


def is_endpoint_spec(spec: str | None) -> bool:
    return isinstance(spec, str) and spec.startswith(SPEC_PREFIX)


def _loopback(host: str) -> bool:
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


@dataclasses.dataclass(frozen=True)
class EndpointCompletion:
    content: str
    finish_reason: str


@dataclasses.dataclass
class EndpointPolicy:
    """A remote chat model; `name` is its spec (recorded in trees and dialogue metadata)."""

    model: str
    base_url: str
    timeout: float = 300.0
    max_retries: int = 4
    max_concurrency: int = 16
    api_key: str | None = dataclasses.field(default=None, repr=False)

    def __post_init__(self):
        key = self.api_key or os.environ.get("SAGE_POLICY_API_KEY") or os.environ.get("OPENAI_API_KEY")
        url = urlparse(self.base_url)
        if url.scheme not in ("http", "https") or not url.hostname:
            raise ValueError(f"policy endpoint {self.base_url!r}: expected an http(s)://HOST[:PORT]/v1 URL")
        if key and url.scheme != "https" and not _loopback(url.hostname):
            raise ValueError(f"policy endpoint {self.base_url!r}: refusing to send an API key over plain http "
                             "to a non-loopback host (use https)")
        self._client = openai.OpenAI(base_url=self.base_url, api_key=key or "EMPTY", timeout=self.timeout,
                                     max_retries=self.max_retries)

    @property
    def name(self) -> str:
        return f"{SPEC_PREFIX}{self.model}@{self.base_url}"

    def _one(self, messages: list[dict], sp: SamplingParams, n: int, seed: int) -> list[EndpointCompletion]:
        extra = {}
        if sp.top_k:
            extra["top_k"] = sp.top_k
        if sp.repetition_penalty != 1.0:
            extra["repetition_penalty"] = sp.repetition_penalty
        resp = self._client.chat.completions.create(
            model=self.model, messages=messages, n=n, temperature=sp.temperature, top_p=sp.top_p,
            max_tokens=sp.max_new_tokens, seed=seed, stop=list(sp.stop_strings) or None, extra_body=extra or None)
        choices = sorted(resp.choices, key=lambda c: c.index)
        if len(choices) != n:
            raise RuntimeError(f"{self.name}: asked for n={n} choices, the endpoint returned {len(choices)}")
        return [EndpointCompletion(c.message.content or "", c.finish_reason or "stop") for c in choices]

    def chat(self, conversations: Sequence[list[dict]], sampling: SamplingParams, *, n: int = 1,
             seed: int = 0) -> list[list[EndpointCompletion]]:
        """`n` completions of the next assistant message for every conversation (chat messages)."""
        if not conversations:
            return []
        with ThreadPoolExecutor(min(self.max_concurrency, len(conversations))) as pool:
            futures = [pool.submit(self._one, list(c), sampling, n, seed + i) for i, c in enumerate(conversations)]
            return [f.result() for f in futures]


def parse_endpoint_spec(spec: str, **options) -> EndpointPolicy:
    """`openai:MODEL@URL` -> EndpointPolicy (the URL is required: a policy endpoint has no default)."""
    if not is_endpoint_spec(spec):
        raise ValueError(f"policy spec {spec!r}: expected openai:MODEL@URL")
    model, sep, url = spec[len(SPEC_PREFIX):].partition("@")
    if not model or not sep or not url:
        raise ValueError(f"policy spec {spec!r}: expected openai:MODEL@URL (e.g. openai:my-model@http://127.0.0.1:8000/v1)")
    return EndpointPolicy(model, url, **options)
