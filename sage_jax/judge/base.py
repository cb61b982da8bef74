"""The :class:`Judge` protocol, judge specs, the on-disk completion cache, retry policy, :func:`make_judge`.

    judge = make_judge("openai:gpt-4o-mini", cache_dir="~/.cache/sage_jax/judge")
    outs = judge.complete(prompts, temperature=0.8, max_tokens=64, seed=0)
    outs[0].text, outs[0].error        # exactly one is None: a failed call is recorded, never raised

Specs (DESIGN.md §6):

* ``openai:MODEL`` or ``openai:MODEL@http://host:port/v1``: any OpenAI-compatible chat-completions
  endpoint. Base URL: the ``@URL`` of the spec, else ``$SAGE_JUDGE_BASE_URL``, else
  ``$OPENAI_BASE_URL``, else ``https://api.openai.com/v1``. Key: ``$SAGE_JUDGE_API_KEY``, else
  ``$OPENAI_API_KEY`` (never logged, never cached, redacted from every recorded error).
* ``rules:`` (= ``rules:v1``): the deterministic heuristic judge of :mod:`sage_jax.judge.rules`,
  the offline default. Its name (``rules:v1``) is recorded with every result.
* ``local:PATH``: ``smollm2``, an HF model directory or a training run directory run by our own
  JAX sampler with the tokenizer's chat template (:mod:`sage_jax.judge.local`).

Cache: :class:`CompletionCache`, one SQLite file ``completions.sqlite`` under ``cache_dir``,
keyed by the sha256 of (backend, endpoint, model, identity, prompt, sampling params): the endpoint
is the base URL (two servers answering to one model name never share answers), the identity what
the client knows of the served weights (``openai:``: the ``identity`` option, e.g. a revision, or
``identity="auto"``: read once from ``GET /models/MODEL``; ``local:``: the checkpoint step and the
model files' sizes and times). Only successful completions are stored, each as soon as it arrives,
so a rerun or a resumed run sends no request for a cached prompt. The commands keep the cache in
their output directory (``judge_cache/``) unless ``cache_dir`` names another.

The API key is sent only over https or to a loopback host (``127.0.0.1``, ``::1``,
``localhost``): a key with a plain ``http://`` URL to any other host is refused unless
``allow_insecure=True`` or ``SAGE_JUDGE_ALLOW_INSECURE=1``.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import re
import sqlite3
import threading
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field, fields
from pathlib import Path
from typing import Any, Protocol, runtime_checkable

from sage_jax import cache_root

__all__ = ["Completion", "Judge", "JudgeStats", "RetryPolicy", "CompletionCache", "CachingJudge", "JudgeSpec",
           "JudgeConfig", "parse_spec", "make_judge", "redact", "default_cache_dir", "output_cache_dir"]

log = logging.getLogger("sage_jax.judge")


# ---------------------------------------------------------------- protocol
@dataclass(frozen=True)
class Completion:
    """One completion: ``text`` on success, else ``error`` (why the call failed after its retries)."""

    text: str | None
    error: str | None = None
    cached: bool = False
    attempts: int = 0  # HTTP attempts made (0 for a cache hit or a non-HTTP backend)

    def __post_init__(self):
        if (self.text is None) == (self.error is None):
            raise ValueError("a Completion has either text or error")

    @property
    def ok(self) -> bool:
        return self.error is None


@runtime_checkable
class Judge(Protocol):
    """A batched text-completion backend. ``name`` labels every result (``openai:gpt-4o``, ``rules:v1``)."""

    name: str

    def complete(self, prompts: list[str], *, temperature: float = 0.8, max_tokens: int = 64,
                 seed: int | None = None) -> list[Completion]:
        """One :class:`Completion` per prompt, in order; failures are recorded, never raised."""
        ...


@dataclass
class JudgeStats:
    """Counters of one judge (thread-safe through :meth:`add`)."""

    prompts: int = 0  # prompts asked (including cache hits)
    cache_hits: int = 0
    requests: int = 0  # backend calls (HTTP attempts, or generation batches for local:)
    retries: int = 0
    failures: int = 0  # completions that ended as an error
    _lock: threading.Lock = field(default_factory=threading.Lock, repr=False, compare=False)

    def add(self, **counts: int) -> None:
        with self._lock:
            for k, v in counts.items():
                setattr(self, k, getattr(self, k) + v)

    def as_dict(self) -> dict[str, int]:
        with self._lock:
            return {f.name: getattr(self, f.name) for f in fields(self) if not f.name.startswith("_")}


# ---------------------------------------------------------------- secrets
def redact(text: str, secrets: Sequence[str | None]) -> str:
    """``text`` with every secret (and any ``Bearer ...`` credential) replaced by ``***``."""
    for s in secrets:
        if s:
            text = text.replace(s, "***")
    return re.sub(r"(?i)(bearer\s+)\S+", r"\1***", text)


# ---------------------------------------------------------------- retry
@dataclass(frozen=True)
class RetryPolicy:
    """Bounded retries of the ``openai:`` backend: at most ``max_attempts`` HTTP attempts per request.

    The official ``openai`` client does the retrying (``max_retries = max_attempts - 1``): its
    exponential backoff with jitter, or the server's ``Retry-After`` / ``retry-after-ms`` when sent.
    """

    max_attempts: int = 6

    def __post_init__(self):
        if self.max_attempts < 1:
            raise ValueError(f"max_attempts must be >= 1, got {self.max_attempts}")


# ---------------------------------------------------------------- cache
def output_cache_dir(output: str | os.PathLike, *, is_dir: bool = False) -> Path:
    """The default completion cache of a command: ``judge_cache/`` in its output directory (the
    directory itself when ``is_dir``, else the output file's folder)."""
    out = Path(output)
    return (out if is_dir else out.parent) / "judge_cache"


def default_cache_dir() -> Path:
    """``$SAGE_JAX_CACHE/judge`` (default ``~/.cache/sage_jax/judge``): a cache shared by every run,
    for ``cache_dir=`` when that is wanted (the commands default to :func:`output_cache_dir`)."""
    return cache_root() / "judge"


class CompletionCache:
    """Successful completions on disk (SQLite, WAL), keyed by sha256 of (backend, model, prompt, params).

    Safe to share between threads and between processes. The table holds the key, the text, the
    backend and model names and a timestamp: no prompt, no header, no credential.
    """

    FILE = "completions.sqlite"

    def __init__(self, cache_dir: str | os.PathLike):
        self.dir = Path(cache_dir).expanduser()
        self.dir.mkdir(parents=True, exist_ok=True)
        self.path = self.dir / self.FILE
        self._lock = threading.Lock()
        self._db = sqlite3.connect(self.path, check_same_thread=False, timeout=30.0, isolation_level=None)
        with self._lock:
            self._db.execute("PRAGMA journal_mode=WAL")
            self._db.execute("CREATE TABLE IF NOT EXISTS completions (key TEXT PRIMARY KEY, text TEXT NOT NULL, "
                             "backend TEXT, model TEXT, created REAL)")

    @staticmethod
    def key(backend: str, model: str, prompt: str, params: Mapping[str, Any], *, endpoint: str = "",
            identity: str = "") -> str:
        blob = json.dumps({"v": 2, "backend": backend, "endpoint": endpoint, "model": model, "identity": identity,
                           "prompt": prompt, "params": dict(params)}, sort_keys=True, ensure_ascii=False)
        return hashlib.sha256(blob.encode("utf-8", "surrogatepass")).hexdigest()

    def get(self, key: str) -> str | None:
        with self._lock:
            row = self._db.execute("SELECT text FROM completions WHERE key = ?", (key,)).fetchone()
        return None if row is None else row[0]

    def put(self, key: str, text: str, *, backend: str = "", model: str = "") -> None:
        with self._lock:
            self._db.execute("INSERT OR REPLACE INTO completions VALUES (?, ?, ?, ?, ?)",
                             (key, text, backend, model, time.time()))

    def __len__(self) -> int:
        with self._lock:
            return self._db.execute("SELECT COUNT(*) FROM completions").fetchone()[0]

    def close(self) -> None:
        with self._lock:
            self._db.close()


class CachingJudge:
    """Base of the model backends: cache look-up, de-duplication of identical prompts, stats.

    Subclasses set ``backend``, ``model`` and ``name`` and implement :meth:`_generate`, which gets
    the uncached prompts and reports each result through ``done(j, completion)`` as soon as it is
    ready (it is cached at once if successful) and returns them all, in order.
    """

    backend: str = ""
    model: str = ""
    name: str = ""
    endpoint: str = ""  # where the model is served (the base URL); part of the cache key
    identity: str = ""  # what is known of the served weights; part of the cache key

    def __init__(self, cache_dir: str | os.PathLike | None = None):
        self.cache = CompletionCache(cache_dir) if cache_dir is not None else None
        self.stats = JudgeStats()

    def _params(self, temperature: float, max_tokens: int, seed: int | None) -> dict[str, Any]:
        return {"temperature": float(temperature), "max_tokens": int(max_tokens), "seed": seed}

    def _generate(self, prompts: list[str], params: dict[str, Any],
                  done: Callable[[int, Completion], None]) -> list[Completion]:
        raise NotImplementedError

    def complete(self, prompts: list[str], *, temperature: float = 0.8, max_tokens: int = 64,
                 seed: int | None = None) -> list[Completion]:
        for i, p in enumerate(prompts):
            if not isinstance(p, str):
                raise TypeError(f"prompt {i}: expected a str, got {type(p).__name__}")
        params = self._params(temperature, max_tokens, seed)
        out: list[Completion | None] = [None] * len(prompts)
        misses: dict[str, list[int]] = {}
        for i, p in enumerate(prompts):
            key = CompletionCache.key(self.backend, self.model, p, params, endpoint=self.endpoint,
                                      identity=self.identity)
            text = self.cache.get(key) if self.cache is not None else None
            if text is not None:
                out[i] = Completion(text, cached=True)
            else:
                misses.setdefault(key, []).append(i)
        self.stats.add(prompts=len(prompts), cache_hits=len(prompts) - sum(len(v) for v in misses.values()))
        keys = list(misses)

        def done(j: int, c: Completion) -> None:
            if c.ok and self.cache is not None:
                try:
                    self.cache.put(keys[j], c.text, backend=self.backend, model=self.model)
                except sqlite3.Error as e:  # a full disk must not lose the completion itself
                    log.warning("%s: cannot cache a completion: %s", self.name, e)

        if keys:
            results = self._generate([prompts[misses[k][0]] for k in keys], params, done)
            for k, c in zip(keys, results):
                if not c.ok:
                    self.stats.add(failures=len(misses[k]))
                for i in misses[k]:
                    out[i] = c
        return out  # type: ignore[return-value]

    def close(self) -> None:
        if self.cache is not None:
            self.cache.close()

    def __repr__(self) -> str:  # never shows credentials
        return f"{type(self).__name__}({self.name!r})"


# ---------------------------------------------------------------- specs
@dataclass(frozen=True)
class JudgeSpec:
    kind: str  # "openai" | "rules" | "local"
    model: str  # model name, rules version, or model path
    base_url: str | None = None


_URL_SUFFIX = re.compile(r"^(.*)@(https?://\S+)$")


def parse_spec(spec: str) -> JudgeSpec:
    """``openai:MODEL[@URL]``, ``rules:[VERSION]`` or ``local:PATH`` -> :class:`JudgeSpec` (ValueError if bad)."""
    if not isinstance(spec, str) or ":" not in spec:
        raise ValueError(f"judge spec {spec!r}: expected openai:MODEL[@URL], rules: or local:PATH")
    kind, _, rest = spec.partition(":")
    kind = kind.strip().lower()
    if kind == "openai":
        url = None
        m = _URL_SUFFIX.match(rest)
        if m:
            rest, url = m.group(1), m.group(2).rstrip("/")
        if not rest.strip():
            raise ValueError(f"judge spec {spec!r}: missing model name (openai:MODEL)")
        return JudgeSpec("openai", rest.strip(), url)
    if kind == "rules":
        return JudgeSpec("rules", rest.strip() or "v1")
    if kind == "local":
        if not rest.strip():
            raise ValueError(f"judge spec {spec!r}: missing model path (local:PATH)")
        return JudgeSpec("local", rest.strip())
    raise ValueError(f"judge spec {spec!r}: unknown backend {kind!r} (expected openai, rules or local)")


@dataclass(frozen=True)
class JudgeConfig:
    """Judge settings as a typed config (``sage_jax.config``): ``judge.spec=openai:gpt-4o judge.timeout=30``."""

    spec: str = "rules:"
    cache_dir: str | None = None
    timeout: float = 60.0
    max_attempts: int = 6  # HTTP attempts per request (openai:), retried by the openai client
    max_concurrency: int = 8
    identity: str | None = None  # openai: the served weights (a revision), or "auto": from GET /models/MODEL
    allow_insecure: bool = False  # openai: allow sending the API key over plain http to a non-loopback host

    def make(self) -> Judge:
        opts: dict[str, Any] = {}
        if parse_spec(self.spec).kind == "openai":
            opts = dict(identity=self.identity, allow_insecure=self.allow_insecure)
        return make_judge(self.spec, cache_dir=self.cache_dir, timeout=self.timeout,
                          retry=RetryPolicy(self.max_attempts), max_concurrency=self.max_concurrency, **opts)


def make_judge(spec: str, *, cache_dir: str | os.PathLike | None = None, **options: Any) -> Judge:
    """A judge from a spec string (see the module docstring).

    ``options`` go to the backend: for ``openai:`` ``timeout``, ``retry`` (a :class:`RetryPolicy`),
    ``max_concurrency``, ``api_key``, ``base_url``, ``system``, ``extra_body``,
    ``max_tokens_field``, ``identity``, ``allow_insecure``; for ``local:`` ``batch_size`` and ``mesh``
    (a ``parallel.MeshConfig``: the judge model's layout; ignored by the others). ``rules:`` takes none (and no cache).
    """
    s = parse_spec(spec)
    if s.kind == "rules":
        from sage_jax.judge.rules import RulesJudge

        return RulesJudge(s.model)
    if s.kind == "openai":
        from sage_jax.judge.openai_backend import OpenAIJudge

        opts = {k: v for k, v in options.items() if k != "mesh"}  # mesh: for local: only
        if s.base_url is not None and opts.get("base_url") is None:
            opts["base_url"] = s.base_url
        return OpenAIJudge(s.model, cache_dir=cache_dir, **opts)
    from sage_jax.judge.local import LocalJudge  # JAX and the model only for local:

    local_opts = {k: v for k, v in options.items() if k in ("batch_size", "mesh")}
    return LocalJudge(s.model, cache_dir=cache_dir, **local_opts)
