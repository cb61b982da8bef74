"""Chat replies for evaluation prompts from a model (our sampler) or any judge backend.

    from sage_jax.eval.generation import make_chat_backend
    chat = make_chat_backend("smollm2")             # or an HF dir, a run dir, "local:DIR", "openai:M@URL", "rules:"
    outs = chat.chat([[{"role": "user", "content": "Hi"}]], temperature=0.0, max_tokens=64, seed=0)
    outs[0].text, outs[0].error                     # a sage_jax.judge.Completion: failures recorded, never raised

One protocol, :class:`ChatBackend` (``name`` + ``chat(conversations, temperature=, max_tokens=,
seed=, row_seeds=)``), three implementations:

* :class:`ModelChat`: a :class:`~sage_jax.rollout.policy.Policy` (``smollm2``, an HF directory, a
  training run directory, or ``local:DIR``) through :func:`sage_jax.rollout.generate` with the
  model's chat template. ``temperature`` may differ per conversation (a list); greedy (0) and
  sampled rows go to separate batches (the sampler cannot mix them). A SAGE model's latent prefix
  is stripped from the returned text unless ``strip_latents=False`` (the raw text is in ``raw``).
* :class:`OpenAIChat`: ``openai:MODEL[@URL]``, the judge package's OpenAI backend (cache, retries,
  concurrency) sending the whole message list (system and earlier turns included).
* :class:`JudgeChat`: any other :class:`~sage_jax.judge.Judge` (``rules:``, or one you built), which
  only takes one string per call: a lone user message is sent as is, ``system + user`` as
  ``system\\n\\nuser``, a longer conversation as a ``### User:`` / ``### Assistant:`` transcript.
  ``rules:`` only answers the judge package's own prompts, so on evaluation prompts it records a
  failure for every item (honest, and what the tests rely on to exercise failure accounting).
"""

from __future__ import annotations

import dataclasses
import json
import logging
import os
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Protocol, runtime_checkable

from sage_jax.judge.base import Completion
from sage_jax.rollout.budget import DEFAULT_ALLOWANCE, cut_reply, needs_allowance

__all__ = ["ChatBackend", "ChatCompletion", "ModelChat", "OpenAIChat", "JudgeChat", "make_chat_backend",
           "flatten_messages", "Message"]

log = logging.getLogger("sage_jax.eval")

Message = dict  # {"role": "system" | "user" | "assistant", "content": str}


@dataclass(frozen=True)
class ChatCompletion(Completion):
    """A :class:`Completion` that also keeps the raw generated text (latents included) of a model."""

    raw: str | None = None
    finish_reason: str | None = None


@runtime_checkable
class ChatBackend(Protocol):
    name: str

    def chat(self, conversations: Sequence[Sequence[Message]], *, temperature: float | Sequence[float] = 0.0,
             max_tokens: int = 256, seed: int = 0, row_seeds: Sequence[int] | None = None) -> list[Completion]:
        """One completion per conversation (the assistant's next message), in order; never raises per item."""
        ...


def _check_conversations(conversations) -> list[list[Message]]:
    out = []
    for i, conv in enumerate(conversations):
        if not conv:
            raise ValueError(f"conversation {i}: empty message list")
        for j, m in enumerate(conv):
            if not isinstance(m, dict) or m.get("role") not in ("system", "user", "assistant") \
                    or not isinstance(m.get("content"), str):
                raise ValueError(f"conversation {i}: message {j}: expected {{'role': system|user|assistant, "
                                 f"'content': str}}, got {m!r}")
        out.append(list(conv))
    return out


def _temperatures(temperature, n: int) -> list[float]:
    if isinstance(temperature, (int, float)):
        return [float(temperature)] * n
    temps = [float(t) for t in temperature]
    if len(temps) != n:
        raise ValueError(f"temperature: expected one value or {n}, got {len(temps)}")
    return temps


def flatten_messages(messages: Sequence[Message]) -> str:
    """One prompt string for a single-string backend (see the module docstring)."""
    msgs = list(messages)
    system = [m["content"] for m in msgs if m["role"] == "system"]
    rest = [m for m in msgs if m["role"] != "system"]
    head = ("\n\n".join(system) + "\n\n") if system else ""
    if len(rest) == 1 and rest[0]["role"] == "user":
        return head + rest[0]["content"]
    parts = [f"### {'User' if m['role'] == 'user' else 'Assistant'}:\n{m['content']}" for m in rest]
    return head + "\n\n".join(parts) + "\n\n### Assistant:\n"


# ---------------------------------------------------------------- model: our sampler
class ModelChat:
    """A policy (model + tokenizer + chat template) generating with :func:`sage_jax.rollout.generate`."""

    def __init__(self, policy, *, batch_size: int = 16, strip_latents: bool = True, stop_strings: Sequence[str] = (),
                 latent_allowance: int = DEFAULT_ALLOWANCE):
        if batch_size < 1:
            raise ValueError(f"batch_size must be >= 1, got {batch_size}")
        self.policy = policy
        self.batch_size = int(batch_size)
        self.strip_latents = strip_latents
        self.stop_strings = tuple(stop_strings)
        # max_tokens is the reply's budget: a SAC model's latent prefix may take this many more
        # (rollout.budget); 0 counts the prefix in max_tokens
        self.latent_allowance = int(latent_allowance)
        self.name = f"model:{policy.name}" if policy.name else "model"

    @classmethod
    def load(cls, path: str, *, template: str | None = None, dtype: str | None = None, mesh=None,
             **kw) -> ModelChat:
        """mesh: a `parallel.MeshConfig` laying the model out on this process's devices (None: one)."""
        from sage_jax.rollout.policy import load_policy

        return cls(load_policy(str(path), template=template, dtype=dtype, mesh=mesh), **kw)

    def _strip(self, text: str) -> str:
        if not self.strip_latents:
            return text
        from sage_jax.sac import strip_latents

        return strip_latents(text).strip()

    def generate_ids(self, prompts: list[list[int]], temps: list[float], max_tokens: int, seed: int,
                     row_seeds: list[int]) -> list[Any]:
        """Raw :class:`~sage_jax.rollout.Generation` per prompt (batched, greedy and sampled apart)."""
        from sage_jax import rollout

        gens: list[Any] = [None] * len(prompts)
        groups: dict[bool, list[int]] = {}
        for i, t in enumerate(temps):
            groups.setdefault(t <= 0.0, []).append(i)
        for greedy, idx in groups.items():
            for s in range(0, len(idx), self.batch_size):
                chunk = idx[s:s + self.batch_size]
                sps = [rollout.SamplingParams(temperature=0.0 if greedy else temps[i], max_new_tokens=max_tokens,
                                              stop_strings=self.stop_strings) for i in chunk]
                out = rollout.generate(self.policy.cfg, self.policy.params, [prompts[i] for i in chunk], sps,
                                       seed=seed, row_seeds=[row_seeds[i] for i in chunk],
                                       tokenizer=self.policy.tokenizer)
                for i, g in zip(chunk, out):
                    gens[i] = g
        return gens

    def chat(self, conversations, *, temperature=0.0, max_tokens: int = 256, seed: int = 0,
             row_seeds: Sequence[int] | None = None) -> list[Completion]:
        convs = _check_conversations(conversations)
        if not convs:
            return []
        temps = _temperatures(temperature, len(convs))
        seeds = list(row_seeds) if row_seeds is not None else list(range(len(convs)))
        if len(seeds) != len(convs):
            raise ValueError(f"row_seeds: expected {len(convs)} entries, got {len(seeds)}")
        out: list[Completion | None] = [None] * len(convs)
        prompts: list[list[int] | None] = []
        for i, conv in enumerate(convs):
            try:
                prompts.append(self.policy.encode_chat(conv))
            except Exception as e:  # noqa: BLE001 - a template error is this item's failure
                prompts.append(None)
                out[i] = ChatCompletion(None, error=f"chat template failed: {type(e).__name__}: {e}")
        ok = [i for i, p in enumerate(prompts) if p is not None]
        if ok:
            try:
                gens = self.generate_ids([prompts[i] for i in ok], [temps[i] for i in ok], int(max_tokens), seed,
                                         [seeds[i] for i in ok])
                gens = self._reply_budget(ok, gens, prompts, temps, int(max_tokens), seed, seeds)
                for i, g in zip(ok, gens):
                    raw = self.policy.decode(g.tokens)
                    if g.stop_string is not None and g.text is not None:
                        raw = g.text  # cut at the stop string
                    out[i] = ChatCompletion(self._strip(raw), raw=raw, finish_reason=g.finish_reason)
            except Exception as e:  # noqa: BLE001 - a failed batch is recorded on its items
                log.warning("%s: generation failed: %s", self.name, e)
                for i in ok:
                    out[i] = ChatCompletion(None, error=f"generation failed: {type(e).__name__}: {e}")
        return out  # type: ignore[return-value]

    def _reply_budget(self, ok, gens, prompts, temps, max_tokens: int, seed: int, seeds) -> list[Any]:
        """Rows that ran out of tokens after starting a latent prefix are generated again with
        `latent_allowance` more and cut to the prefix + max_tokens of reply (rollout.budget), so a
        SAC model's reply gets the same budget as a plain model's; other rows stay as they are."""
        if self.latent_allowance <= 0:
            return gens
        again = [j for j, g in enumerate(gens) if needs_allowance(self.policy.decode, g.tokens, g.finish_reason)]
        if not again:
            return gens
        more = self.generate_ids([prompts[ok[j]] for j in again], [temps[ok[j]] for j in again],
                                 max_tokens + self.latent_allowance, seed, [seeds[ok[j]] for j in again])
        gens = list(gens)
        for j, g in zip(again, more):
            kept, cut = cut_reply(self.policy.decode, g.tokens, max_tokens)
            gens[j] = dataclasses.replace(g, tokens=kept, text=None if cut else g.text,
                                          logprobs=None if g.logprobs is None else g.logprobs[:len(kept)],
                                          finish_reason="length" if cut else g.finish_reason)
        return gens

    def close(self) -> None:
        pass


# ---------------------------------------------------------------- openai: message lists
_CHAT_MARK = "\x00sage-jax-chat:"


def _openai_chat_class():
    from sage_jax.judge.openai_backend import OpenAIJudge

    class _OpenAIMessages(OpenAIJudge):
        """OpenAIJudge whose prompt string may carry a whole message list (JSON after a marker)."""

        def _payload(self, prompt, params):
            payload = super()._payload(prompt, params)
            if prompt.startswith(_CHAT_MARK):
                payload["messages"] = json.loads(prompt[len(_CHAT_MARK):])
            return payload

    return _OpenAIMessages


class OpenAIChat:
    """``openai:MODEL[@URL]``: whole conversations to an OpenAI-compatible endpoint (cached, retried)."""

    def __init__(self, spec: str, *, cache_dir: str | os.PathLike | None = None, **options):
        from sage_jax.judge.base import parse_spec

        s = parse_spec(spec)
        if s.kind != "openai":
            raise ValueError(f"OpenAIChat needs an openai: spec, got {spec!r}")
        if s.base_url is not None and options.get("base_url") is None:
            options["base_url"] = s.base_url
        self.judge = _openai_chat_class()(s.model, cache_dir=cache_dir, **options)
        self.name = self.judge.name

    def chat(self, conversations, *, temperature=0.0, max_tokens: int = 256, seed: int = 0,
             row_seeds: Sequence[int] | None = None) -> list[Completion]:
        return _complete_by_temperature(self.judge, conversations, temperature, max_tokens, seed,
                                        lambda conv: _CHAT_MARK + json.dumps(conv, ensure_ascii=False))

    def close(self) -> None:
        self.judge.close()


def _complete_by_temperature(judge, conversations, temperature, max_tokens: int, seed: int,
                             to_prompt) -> list[Completion]:
    """One judge call per distinct temperature; `to_prompt` turns a conversation into the prompt
    string the judge takes. Results come back in the conversations' order."""
    convs = _check_conversations(conversations)
    temps = _temperatures(temperature, len(convs))
    out: list[Completion | None] = [None] * len(convs)
    by_temp: dict[float, list[int]] = {}
    for i, t in enumerate(temps):
        by_temp.setdefault(t, []).append(i)
    for t, idx in by_temp.items():
        prompts = [to_prompt(convs[i]) for i in idx]
        for i, c in zip(idx, judge.complete(prompts, temperature=t, max_tokens=max_tokens, seed=seed)):
            out[i] = c
    return out  # type: ignore[return-value]


# ---------------------------------------------------------------- any Judge: one string per call
class JudgeChat:
    """A :class:`~sage_jax.judge.Judge` (one prompt string per call) as a chat backend."""

    def __init__(self, judge):
        self.judge = judge
        self.name = getattr(judge, "name", type(judge).__name__)

    def chat(self, conversations, *, temperature=0.0, max_tokens: int = 256, seed: int = 0,
             row_seeds: Sequence[int] | None = None) -> list[Completion]:
        return _complete_by_temperature(self.judge, conversations, temperature, max_tokens, seed, flatten_messages)

    def close(self) -> None:
        close = getattr(self.judge, "close", None)
        if close is not None:
            close()


def make_chat_backend(what: Any, *, cache_dir: str | os.PathLike | None = None, batch_size: int = 16,
                      template: str | None = None, dtype: str | None = None, strip_latents: bool = True,
                      mesh=None, **options) -> ChatBackend:
    """A chat backend from a spec, a path or an object (see the module docstring).

    ``what``: ``openai:MODEL[@URL]`` | ``rules:[V]`` | ``local:DIR`` | ``smollm2`` | an HF model
    directory | a training run directory (``checkpoints/`` inside) | a :class:`ChatBackend` | a
    :class:`~sage_jax.judge.Judge`. ``options`` go to the OpenAI backend (timeout, retry, ...).
    ``mesh`` (a ``parallel.MeshConfig``): the layout of a model of ours (ignored by openai:/rules:).
    """
    if isinstance(what, (ModelChat, OpenAIChat, JudgeChat)):
        return what
    if not isinstance(what, (str, os.PathLike)):
        if hasattr(what, "chat"):
            return what
        if hasattr(what, "complete"):
            return JudgeChat(what)
        raise TypeError(f"cannot make a chat backend from {type(what).__name__}")
    s = str(what)
    kind = s.partition(":")[0].strip().lower() if ":" in s else ""
    if kind == "openai":
        return OpenAIChat(s, cache_dir=cache_dir, **options)
    if kind == "rules":
        from sage_jax.judge.base import make_judge

        return JudgeChat(make_judge(s))
    if kind == "local":
        s = s.partition(":")[2].strip()
        if not s:
            raise ValueError(f"{what!r}: missing model path (local:PATH)")
    elif kind and not Path(s).exists():
        raise ValueError(f"{what!r}: unknown backend {kind!r} (expected openai:, rules:, local: or a model path)")
    base, at, step = s.rpartition("@")
    run_step = at and (step in ("best", "latest") or step.isdigit())  # RUN@best | RUN@latest | RUN@200
    p = Path(base if run_step else s).expanduser()
    if s != "smollm2" and not p.exists():
        raise FileNotFoundError(f"model {s!r}: no such directory (expected smollm2, an HF model directory, a run "
                                "directory, or a judge spec openai:/rules:/local:)")
    if s != "smollm2" and not (p / "config.json").exists() and not (p / "checkpoints").is_dir():
        raise FileNotFoundError(f"model {s!r}: neither an HF model directory (config.json) nor a training run "
                                "directory (checkpoints/)")
    chat = ModelChat.load(s if s == "smollm2" else str(p) + (f"@{step}" if run_step else ""), template=template, dtype=dtype, batch_size=batch_size,
                          strip_latents=strip_latents, mesh=mesh)
    if kind == "local":
        chat.name = f"local:{s}"
    return chat
