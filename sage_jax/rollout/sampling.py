"""Sampling parameters and logit processors (pure functions over [B, V] logits).

Semantics follow Hugging Face `transformers` (the test oracle), in HF's order:
repetition penalty -> temperature -> top-k -> top-p -> sample (or argmax when greedy).

- Repetition penalty (`RepetitionPenaltyLogitsProcessor`): over every token present in the prompt
  or generated so far, positive logits are divided by the penalty and negative ones multiplied.
  Presence is a [B, V] bool mask updated by a scatter (never a [B, T, V] one-hot).
- Temperature: logits / temperature (temperature 0 means greedy).
- Top-k: keep the k largest logits. Where several logits tie at the k-th value HF keeps all of
  them; we keep exactly k (ties of float32 logits are measure-zero for real models).
- Top-p (nucleus): sorted by probability, keep the smallest prefix whose mass reaches top_p (the
  top token always kept). HF's rule "remove tokens whose ascending cumulative mass <= 1 - top_p"
  is the same set as "keep tokens whose descending exclusive cumulative mass < top_p".
  With top-k on, top-p runs on the k survivors only (what HF computes, since the others are -inf),
  which avoids sorting the vocabulary. Without top-k the nucleus is looked for among the
  largest logits first, in widening tiers (`NUCLEUS_CANDIDATES`), and the full row is sorted
  only when some row's largest tier holds less than its top_p mass (`nucleus`); the sampler then
  draws among those sorted candidates by inverse CDF (`nucleus_sample`) instead of over all V.

Per-row values (temperature, top_p, penalty) are arrays so rows of one batch may differ; which
processors run at all (`Processing`) is static, part of the jit cache key.
"""

from __future__ import annotations

import dataclasses
from typing import NamedTuple, Sequence

import jax
import jax.numpy as jnp

NEG_INF = -jnp.inf
# Top-p without top-k: the tiers of candidates taken by `lax.top_k` before the full sort. Over
# [64, 49152] logits on a 2-core CPU: top_k 256 17 ms, 4096 102 ms, the full argsort 0.92 s (of
# a ~250 ms decode step). Measured in SmolLM2 batch-64 sampled decodes (the largest nucleus of
# the 64 rows, per step): T=0.7/top_p 0.9 within 256 in every step; T=1.0/top_p 0.9 within 256
# in 23% of steps, within 4096 in all; T=1.0/top_p 0.95 in 5% and 98%.
NUCLEUS_CANDIDATES = (256, 4096)


@dataclasses.dataclass(frozen=True)
class SamplingParams:
    """How to pick tokens. `temperature=0` is greedy decoding (argmax after the penalty).

    stop_token_ids: None means the model's `eos_token_id`; () means never stop on a token.
    stop_strings: checked on the host after the loop (see `rollout.generate`): the text and tokens
      are cut at the first occurrence; the device loop does not stop early for them.
    min_new_tokens: stop tokens are masked out (logit -inf) until a row has this many tokens, as
      HF's `MinNewTokensLengthLogitsProcessor` does (used by benchmarks to force equal lengths).
    logprobs: also return the log-probability of each chosen token under the *unprocessed* model
      distribution (log_softmax of the raw logits: what RL / DPO scoring needs).
    """

    temperature: float = 1.0
    top_k: int = 0  # 0 = off
    top_p: float = 1.0  # 1.0 = off
    repetition_penalty: float = 1.0  # 1.0 = off
    max_new_tokens: int = 64
    min_new_tokens: int = 0
    stop_token_ids: tuple[int, ...] | None = None
    stop_strings: tuple[str, ...] = ()
    logprobs: bool = False

    def __post_init__(self):
        if self.temperature < 0:
            raise ValueError(f"SamplingParams.temperature must be >= 0, got {self.temperature}")
        if self.top_k < 0:
            raise ValueError(f"SamplingParams.top_k must be >= 0, got {self.top_k}")
        if not 0.0 < self.top_p <= 1.0:
            raise ValueError(f"SamplingParams.top_p must be in (0, 1], got {self.top_p}")
        if self.repetition_penalty <= 0:
            raise ValueError(f"SamplingParams.repetition_penalty must be > 0, got {self.repetition_penalty}")
        if self.max_new_tokens < 0 or self.min_new_tokens < 0:
            raise ValueError("SamplingParams.max_new_tokens and min_new_tokens must be >= 0")
        if isinstance(self.stop_strings, str):
            object.__setattr__(self, "stop_strings", (self.stop_strings,))
        if self.stop_token_ids is not None:
            object.__setattr__(self, "stop_token_ids", tuple(int(t) for t in self.stop_token_ids))

    @property
    def greedy(self) -> bool:
        return self.temperature == 0.0

    @classmethod
    def paper(cls, **overrides) -> "SamplingParams":
        """The SAGE paper's decoding defaults."""
        fields = dict(temperature=0.95, top_k=50, top_p=0.7, repetition_penalty=1.1, max_new_tokens=512)
        fields.update(overrides)
        return cls(**fields)

    @classmethod
    def greedy_params(cls, max_new_tokens: int = 64, **overrides) -> "SamplingParams":
        return cls(temperature=0.0, max_new_tokens=max_new_tokens, **overrides)

    def replace(self, **kw) -> "SamplingParams":
        return dataclasses.replace(self, **kw)


class Processing(NamedTuple):
    """The static shape of the processing pipeline (a jit cache key)."""

    greedy: bool
    top_k: int  # 0 = off
    top_p: bool
    repetition_penalty: bool
    min_new_tokens: bool
    logprobs: bool

    @classmethod
    def of(cls, params: Sequence[SamplingParams] | SamplingParams, vocab_size: int) -> "Processing":
        ps = [params] if isinstance(params, SamplingParams) else list(params)
        greedy = {p.greedy for p in ps}
        if len(greedy) > 1:
            raise ValueError("one batch cannot mix greedy and sampled rows")
        top_ks = {p.top_k for p in ps}
        if len(top_ks) > 1:
            raise ValueError("one batch must share top_k (it is a static shape)")
        g = greedy.pop()
        k = min(top_ks.pop(), vocab_size)
        return cls(
            greedy=g,
            top_k=0 if g else k,
            top_p=(not g) and any(p.top_p < 1.0 for p in ps),
            repetition_penalty=any(p.repetition_penalty != 1.0 for p in ps),
            min_new_tokens=any(p.min_new_tokens > 0 for p in ps),
            logprobs=any(p.logprobs for p in ps),
        )


def apply_repetition_penalty(logits: jax.Array, presence: jax.Array, penalty: jax.Array) -> jax.Array:
    """HF `RepetitionPenaltyLogitsProcessor` with a [B, V] presence mask; penalty [B] or scalar."""
    penalty = jnp.asarray(penalty, logits.dtype)
    if penalty.ndim == 1:
        penalty = penalty[:, None]
    # A full [B, V] divisor (1 where absent), not a broadcast scalar: XLA rewrites x / broadcast(p)
    # as x * (1 / p), which is off by an ulp from HF's true division.
    factor = jnp.where(presence, penalty, jnp.ones((), logits.dtype))
    return jnp.where(logits < 0, logits * factor, logits / factor)


def update_presence(presence: jax.Array, tokens: jax.Array, valid: jax.Array | None = None) -> jax.Array:
    """presence [B, V] |= tokens [B] or [B, T] (entries with valid == False are ignored)."""
    if tokens.ndim == 1:
        tokens = tokens[:, None]
        valid = None if valid is None else valid[:, None]
    v = presence.shape[1]
    if valid is not None:
        tokens = jnp.where(valid, tokens, v)  # out of range: dropped by the scatter
    rows = jnp.broadcast_to(jnp.arange(presence.shape[0])[:, None], tokens.shape)
    return presence.at[rows, tokens].set(True, mode="drop")


def top_p_keep_sorted(sorted_logits: jax.Array, top_p: jax.Array) -> jax.Array:
    """Keep mask over logits sorted in descending order ([B, n]) for nucleus mass top_p ([B])."""
    return _nucleus_prefix(jax.nn.softmax(sorted_logits.astype(jnp.float32), axis=-1), top_p)[1]


def _nucleus_prefix(probs: jax.Array, top_p: jax.Array) -> tuple[jax.Array, jax.Array]:
    """(inclusive cumulative mass, keep mask) over probabilities [B, n] sorted in descending
    order: keep while the mass before a token is below top_p ([B]); the top token always."""
    inclusive = jnp.cumsum(probs, axis=-1)
    keep = inclusive - probs < jnp.asarray(top_p, jnp.float32).reshape(-1, 1)
    return inclusive, keep.at[:, 0].set(True)


def process_logits(
    proc: Processing,
    logits: jax.Array,
    *,
    presence: jax.Array | None = None,
    penalty: jax.Array | None = None,
    temperature: jax.Array | None = None,
    top_p: jax.Array | None = None,
    banned: jax.Array | None = None,
) -> tuple[jax.Array, jax.Array | None]:
    """Processed logits [B, n] and, when top-k is on, the vocabulary ids [B, n] they stand for
    (n = k); otherwise n = V and ids is None. Removed entries are -inf.

    banned [B, M] int32: vocabulary ids forced to -inf (min_new_tokens's stop tokens) before
    anything else; ids >= V stand for none. Scattered into a copy of the logits: a [B, V] mask
    would be read alongside them, which at batch 64 cost a transposing pass over the logits
    (3 ms of a SmolLM2 decode step) where the copy keeps their layout.
    """
    logits = logits.astype(jnp.float32)
    if banned is not None:
        logits = logits.at[jnp.arange(logits.shape[0])[:, None], banned].set(NEG_INF, mode="drop")
    if proc.repetition_penalty:
        logits = apply_repetition_penalty(logits, presence, penalty)
    if proc.greedy:
        return logits, None
    logits = logits / jnp.asarray(temperature, jnp.float32).reshape(-1, 1)
    ids = None
    if proc.top_k:
        logits, ids = jax.lax.top_k(logits, proc.top_k)  # descending
        if proc.top_p:
            logits = jnp.where(top_p_keep_sorted(logits, top_p), logits, NEG_INF)
    elif proc.top_p:
        logits = nucleus(logits, top_p)
    return logits, ids


def _nucleus_sorted(logits: jax.Array, top_p: jax.Array) -> jax.Array:
    order = jnp.argsort(-logits, axis=-1)  # stable: ties in index order
    keep_sorted = top_p_keep_sorted(jnp.take_along_axis(logits, order, axis=-1), top_p)
    rows = jnp.arange(logits.shape[0])[:, None]
    keep = jnp.zeros(logits.shape, bool).at[rows, order].set(keep_sorted)
    return jnp.where(keep, logits, NEG_INF)


def nucleus(logits: jax.Array, top_p: jax.Array, candidates: Sequence[int] = NUCLEUS_CANDIDATES) -> jax.Array:
    """logits [B, V] with everything outside each row's top-p nucleus set to -inf.

    The nucleus is a prefix of the row sorted in descending order, so when the k largest logits
    (`lax.top_k`: descending, ties in index order like the stable sort) hold at least top_p of
    the row's probability, the tokens after them are all removed and the nucleus is found among
    them (probabilities normalized over the whole row). k runs through the tiers `candidates`,
    the next one (`lax.cond`) only when some row of the batch is not covered; after the last,
    the full sort: the same set either way. Rows with top_p >= 1 keep every token (HF skips the
    warper there)."""
    b, v = logits.shape
    top_p = jnp.broadcast_to(jnp.asarray(top_p, jnp.float32).reshape(-1), (b,))
    whole = (top_p >= 1.0)[:, None]
    return jnp.where(whole, logits, _nucleus_tiers(logits, top_p, whole, tuple(k for k in candidates if k < v)))


def _nucleus_tiers(logits: jax.Array, top_p: jax.Array, whole: jax.Array, tiers: tuple[int, ...]) -> jax.Array:
    """`nucleus` for rows with top_p < 1, among the `tiers[0]` largest logits if they cover every
    such row, else among the next tier's (the full sort after the last)."""
    if not tiers:
        return _nucleus_sorted(logits, top_p)
    top, ids, _, _, keep, covered = _candidates(logits, tiers[0], top_p, whole)

    def among_candidates(logits):
        rows = jnp.arange(logits.shape[0])[:, None]
        return jnp.full_like(logits, NEG_INF).at[rows, ids].set(jnp.where(keep, top, NEG_INF))

    return jax.lax.cond(covered, among_candidates, lambda x: _nucleus_tiers(x, top_p, whole, tiers[1:]), logits)


def _candidates(logits: jax.Array, k: int, top_p: jax.Array, whole: jax.Array):
    """The k largest logits of each row, descending (top, ids [B, k]), their probabilities over
    the whole row and inclusive cumulative mass, the nucleus mask among them (keep), and whether
    they hold the nucleus of every row with top_p < 1 (covered, a scalar)."""
    # The barrier keeps top_k XLA CPU's TopK kernel: with a cond reading its output directly,
    # XLA lowers it to a sort of the whole row (measured: 1.4 s instead of 17 ms).
    top, ids = jax.lax.optimization_barrier(jax.lax.top_k(logits, k))
    probs = jnp.exp(top - top[:, :1]) / jnp.sum(jnp.exp(logits - top[:, :1]), axis=-1, keepdims=True)
    inclusive, keep = _nucleus_prefix(probs, top_p)
    covered = jnp.all((inclusive[:, -1:] >= top_p[:, None]) | whole)
    return top, ids, probs, inclusive, keep, covered


def nucleus_sample(logits: jax.Array, top_p: jax.Array, keys: jax.Array,
                   candidates: Sequence[int] = NUCLEUS_CANDIDATES) -> jax.Array:
    """One token per row [B] drawn from softmax(nucleus(logits, top_p)) (keys [B]), without
    building the masked [B, V] row: by inverse CDF inside the tier of candidates that `nucleus`
    would use (u ~ U[0, 1) per row, the first kept token whose cumulative mass exceeds u times the
    nucleus mass). The candidates are the sorted prefix of the row whichever tier (or the full
    sort) runs, so a row's token depends on its key and logits only, not on which tier its batch
    needed. A draw over the whole vocabulary (Gumbel noise for all V logits, ~100 ms of a batch-64
    step) is left to rows with top_p >= 1, which keep every token (`jax.random.categorical`)."""
    b, v = logits.shape
    top_p = jnp.broadcast_to(jnp.asarray(top_p, jnp.float32).reshape(-1), (b,))
    whole = top_p >= 1.0
    u = jax.vmap(lambda k: jax.random.uniform(k, (), jnp.float32))(keys)
    tok = _nucleus_sample_tiers(logits, top_p, whole[:, None], u, tuple(k for k in candidates if k < v))
    full = jax.lax.cond(jnp.any(whole), lambda x: jax.vmap(jax.random.categorical)(keys, x),
                        lambda x: jnp.zeros((b,), jnp.int32), logits)
    return jnp.where(whole, full, tok).astype(jnp.int32)


def _inverse_cdf(probs: jax.Array, inclusive: jax.Array, keep: jax.Array, u: jax.Array) -> jax.Array:
    """Index [B] into sorted candidates: the first kept one whose inclusive mass exceeds u times
    the kept mass (keep is a prefix; the last kept one absorbs rounding)."""
    target = u * jnp.sum(jnp.where(keep, probs, 0.0), axis=-1)
    below = jnp.sum(keep & (inclusive <= target[:, None]), axis=-1)
    return jnp.minimum(below, jnp.sum(keep, axis=-1) - 1)


def _nucleus_sample_tiers(logits, top_p, whole, u, tiers: tuple[int, ...]) -> jax.Array:
    """`nucleus_sample` for rows with top_p < 1, tier by tier as `_nucleus_tiers`."""
    rows = jnp.arange(logits.shape[0])
    if not tiers:
        order = jnp.argsort(-logits, axis=-1)  # stable: ties in index order, as top_k
        probs = jax.nn.softmax(jnp.take_along_axis(logits, order, axis=-1), axis=-1)
        inclusive, keep = _nucleus_prefix(probs, top_p)
        return order[rows, _inverse_cdf(probs, inclusive, keep, u)]
    _, ids, probs, inclusive, keep, covered = _candidates(logits, tiers[0], top_p, whole)
    return jax.lax.cond(covered, lambda x: ids[rows, _inverse_cdf(probs, inclusive, keep, u)],
                        lambda x: _nucleus_sample_tiers(x, top_p, whole, u, tiers[1:]), logits)


def sample(proc: Processing, logits: jax.Array, keys: jax.Array, **kw) -> jax.Array:
    """One token per row [B]: `process_logits(proc, logits, **kw)` and then `choose`; top-p
    without top-k draws inside the nucleus's candidates (`nucleus_sample`) instead."""
    if proc.top_p and not proc.top_k and not proc.greedy:
        scaled, _ = process_logits(proc._replace(top_p=False), logits, **kw)
        return nucleus_sample(scaled, kw["top_p"], keys)
    processed, ids = process_logits(proc, logits, **kw)
    return choose(proc, processed, ids, keys)


def argmax(x: jax.Array) -> jax.Array:
    """jnp.argmax over the last axis (the first maximum; the first NaN where there is one) as a
    max and then a min over the indices that hit it: two plain reductions that XLA CPU
    vectorizes, where argmax's (value, index) pair reduction is not (measured over [64, 49152]
    logits: 3.8 vs 14.5 ms, a few ms of every batch-64 decode step)."""
    peak = jnp.max(x, axis=-1, keepdims=True)
    index = jax.lax.broadcasted_iota(jnp.int32, x.shape, x.ndim - 1)
    return jnp.min(jnp.where((x == peak) | jnp.isnan(x), index, x.shape[-1]), axis=-1)


def choose(proc: Processing, processed: jax.Array, ids: jax.Array | None, keys: jax.Array) -> jax.Array:
    """One token per row [B] from processed logits; keys [B] (one PRNG key per row)."""
    if proc.greedy:
        choice = argmax(processed)
    else:
        choice = jax.vmap(lambda k, l: jax.random.categorical(k, l))(keys, processed)
    if ids is not None:
        choice = jnp.take_along_axis(ids, choice[:, None], axis=-1)[:, 0]
    return choice.astype(jnp.int32)


def processed_probs(proc: Processing, logits: jax.Array, **kw) -> jax.Array:
    """The exact distribution [B, V] that `sample` draws from (for tests and scoring)."""
    processed, ids = process_logits(proc, logits, **kw)
    if proc.greedy:
        return jax.nn.one_hot(argmax(processed), logits.shape[-1])
    probs = jax.nn.softmax(processed, axis=-1)
    if ids is None:
        return probs
    rows = jnp.arange(logits.shape[0])[:, None]
    return jnp.zeros(logits.shape, jnp.float32).at[rows, ids].add(probs)
