"""A chat policy served by an OpenAI-compatible endpoint (`openai:MODEL@URL`): vLLM, SGLang, or
`sage-jax serve`, for when a user outgrows our engine.

The search and self-play use it through the same message-level call as our own sampler
(`chat(conversations, sampling, n=K)`): K samples of one conversation are one request with
`n=K`, so an engine with prefix caching prefills the shared history once, which is what the
reference relied on vLLM for. `chat(..., prefills=[...])` continues a partial assistant message
(vLLM's chat extension `continue_final_message: true` + `add_generation_prompt: false`, which
`sage-jax serve` honours too): what the latent-first and enumerate branchings need (`branch`, the
endpoint counterpart of `dialogue_cache.branch`). `top_k` and `repetition_penalty` go in the
request body as vLLM's extensions (`sage-jax serve` honours them too). Requests run concurrently (bounded); transport
retries, backoff and `Retry-After` are the `openai` client's.

The API key comes from `$SAGE_POLICY_API_KEY`, else `$OPENAI_API_KEY` ("EMPTY" when neither is
set, as vLLM expects); it is only sent over https or to a loopback host.
"""

from __future__ import annotations

import dataclasses
import os
from concurrent.futures import ThreadPoolExecutor
from typing import Hashable, Sequence
from urllib.parse import urlparse

import openai

from sage_jax.net import is_loopback
from sage_jax.rollout.dialogue_cache import (BranchConfig, _cut_block, action_block, distinct_actions,
                                             pinned_children)
from sage_jax.rollout.sampling import SamplingParams
from sage_jax.sac import Latent, parse_assistant_lenient, render_latent

SPEC_PREFIX = "openai:"


def is_endpoint_spec(spec: str | None) -> bool:
    return isinstance(spec, str) and spec.startswith(SPEC_PREFIX)


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
        if key and url.scheme != "https" and not is_loopback(url.hostname):
            raise ValueError(f"policy endpoint {self.base_url!r}: refusing to send an API key over plain http "
                             "to a non-loopback host (use https)")
        self._client = openai.OpenAI(base_url=self.base_url, api_key=key or "EMPTY", timeout=self.timeout,
                                     max_retries=self.max_retries)

    @property
    def name(self) -> str:
        return f"{SPEC_PREFIX}{self.model}@{self.base_url}"

    def _one(self, messages: list[dict], sp: SamplingParams, n: int, seed: int,
             prefill: str | None = None) -> list[EndpointCompletion]:
        extra = {}
        if sp.top_k:
            extra["top_k"] = sp.top_k
        if sp.repetition_penalty != 1.0:
            extra["repetition_penalty"] = sp.repetition_penalty
        if prefill is not None:  # continue this partial assistant message (vLLM's chat extension)
            messages = [*messages, {"role": "assistant", "content": prefill}]
            extra.update(continue_final_message=True, add_generation_prompt=False)
        resp = self._client.chat.completions.create(
            model=self.model, messages=messages, n=n, temperature=sp.temperature, top_p=sp.top_p,
            max_tokens=sp.max_new_tokens, seed=seed, stop=list(sp.stop_strings) or None, extra_body=extra or None)
        choices = sorted(resp.choices, key=lambda c: c.index)
        if len(choices) != n:
            raise RuntimeError(f"{self.name}: asked for n={n} choices, the endpoint returned {len(choices)}")
        return [EndpointCompletion(c.message.content or "", c.finish_reason or "stop") for c in choices]

    def chat(self, conversations: Sequence[list[dict]], sampling: SamplingParams, *, n: int | Sequence[int] = 1,
             seed: int = 0, prefills: Sequence[str | None] | None = None) -> list[list[EndpointCompletion]]:
        """`n` completions of the next assistant message for every conversation (chat messages);
        `n` may differ per conversation. prefills[i] (not None): the assistant message starts
        with this text and the completions continue it (they do not repeat it). Conversation i
        is one request with seed `seed + i`."""
        if not conversations:
            return []
        ns = [n] * len(conversations) if isinstance(n, int) else list(n)
        pre = list(prefills) if prefills is not None else [None] * len(conversations)
        if len(ns) != len(conversations) or len(pre) != len(conversations):
            raise ValueError("chat: n and prefills need one entry per conversation")
        with ThreadPoolExecutor(min(self.max_concurrency, len(conversations))) as pool:
            futures = [pool.submit(self._one, list(c), sampling, k, seed + i, p)
                       for i, (c, k, p) in enumerate(zip(conversations, ns, pre))]
            return [f.result() for f in futures]


def _closed(c: EndpointCompletion, close: str) -> str:
    """A completion asked to stop at `close`: the endpoint drops the stop string from the text
    (OpenAI semantics), so a stopped completion gets it back (what our sampler's cut keeps)."""
    if c.finish_reason == "stop" and close not in c.content:
        return c.content + close
    return c.content


def branch(policy: EndpointPolicy, views: dict[Hashable, list[dict]], sp: SamplingParams, bc: BranchConfig,
           seed: int) -> dict[Hashable, list[dict]]:
    """K candidate assistant messages per dialogue ({"content", "finish_reason", ...}) from an
    endpoint: `dialogue_cache.branch`'s algorithm with requests instead of cache rows.

    sample: one request per dialogue with n=K (the engine's prefix caching and n-sampling share
    the history). latent / enumerate: the user-state block is decoded once per dialogue
    (greedy, stopped at the block's close) and rendered canonically; latent: K action blocks
    are sampled continuing it (one request per dialogue, n=K, stopped at the action block's
    close), duplicates resampled (`action_tries` rounds, n = the duplicates); enumerate: K
    distinct a_motivation values of the vocabulary pinned; then each child's reply continues its
    own latent prefix (one request per child). The continuations use `continue_final_message`."""
    keys = list(views)
    d = bc.schema.delimiters(False)
    reply_sp = sp.replace(stop_strings=())
    if bc.mode == "sample":
        got = policy.chat([views[key] for key in keys], reply_sp, n=bc.k, seed=seed)
        return {key: [{"content": c.content, "finish_reason": c.finish_reason} for c in cs]
                for key, cs in zip(keys, got)}
    if bc.mode not in ("latent", "enumerate"):
        raise ValueError(f"branching: unknown mode {bc.mode!r} (latent, enumerate or sample)")
    state_sp = SamplingParams.greedy_params(bc.latent_max_new_tokens, stop_strings=(d.state_close,))
    prefix_text: dict[Hashable, str] = {}
    for key, (c,) in zip(keys, policy.chat([views[key] for key in keys], state_sp, n=1, seed=seed)):
        cut, _ = _cut_block(_closed(c, d.state_close).lstrip(), d.state_close)
        state = parse_assistant_lenient(cut + " x", bc.schema).state
        # canonical rendering, as on our own engine: every child shares exactly this state
        prefix_text[key] = render_latent(state if state is not None else Latent(), "user", bc.schema)
    n_children = {key: bc.k for key in keys}
    child_prefill: dict[tuple, str] = {}
    extra: dict[tuple, dict] = {}
    if bc.mode == "enumerate":
        n_children, child_prefill, extra = pinned_children(keys, prefix_text, bc, seed)
    else:
        act_sp = sp.replace(max_new_tokens=bc.latent_max_new_tokens, stop_strings=(d.action_close,))
        texts: dict[tuple, str] = {}
        round_no = [0]

        def sample(pairs: list[tuple]) -> dict[tuple, str]:
            todo: dict[Hashable, list[int]] = {}
            for key, j in pairs:
                todo.setdefault(key, []).append(j)
            ks = list(todo)
            got = policy.chat([views[key] for key in ks], act_sp, n=[len(todo[key]) for key in ks],
                              seed=seed + 7919 * round_no[0], prefills=[prefix_text[key] for key in ks])
            round_no[0] += 1
            out = {}
            for key, cs in zip(ks, got):
                for j, c in zip(todo[key], cs):
                    texts[key, j], out[key, j] = action_block(prefix_text[key], _closed(c, d.action_close), bc)
            return out

        distinct_actions(sample, keys, bc)
        for key in keys:
            for j in range(bc.k):
                child_prefill[key, j] = prefix_text[key] + texts[key, j]
    rows = [(key, j) for key in keys for j in range(n_children[key])]
    got = policy.chat([views[key] for key, _ in rows], reply_sp, n=1, seed=seed + 1,
                      prefills=[child_prefill[r] for r in rows])
    out: dict[Hashable, list[dict]] = {key: [] for key in keys}
    for r, (c,) in zip(rows, got):
        out[r[0]].append({"content": child_prefill[r] + c.content, "finish_reason": c.finish_reason,
                          **extra.get(r, {})})
    return out


def parse_endpoint_spec(spec: str, **options) -> EndpointPolicy:
    """`openai:MODEL@URL` -> EndpointPolicy (the URL is required: a policy endpoint has no default)."""
    if not is_endpoint_spec(spec):
        raise ValueError(f"policy spec {spec!r}: expected openai:MODEL@URL")
    model, sep, url = spec[len(SPEC_PREFIX):].partition("@")
    if not model or not sep or not url:
        raise ValueError(f"policy spec {spec!r}: expected openai:MODEL@URL (e.g. openai:my-model@http://127.0.0.1:8000/v1)")
    return EndpointPolicy(model, url, **options)
