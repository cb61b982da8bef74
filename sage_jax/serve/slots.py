"""Slots: a fixed set of sampler rows that requests join and leave between decode steps
(continuous batching for `sage-jax serve`).

Built from the sampler's own pieces (`prefill`, `decode`, its row settings), so a row's tokens are
the ones `rollout.generate` gives it: its key is fold_in(key(seed), row_seed), its n-th token uses
fold_in(row_key, n), its logits come from its own cache. A served answer therefore does not depend
on which rows shared the batch or when it joined.

    state = empty_slots(cfg, params, rows=8, cache_len=2048, new_len=256)
    new = prefill_slots(cfg, params, prompt, sampling, row_seeds=[s0, s1], cache_len=2048, new_len=256)
    state = insert_slots(state, new, jnp.asarray([3, 5]))       # rows 3 and 5 join
    state = decode_slots(cfg, proc, params, state, [3, 5], steps=4)  # <= 4 steps of rows 3 and 5
    state = finish_slots(state, cancelled_mask)                  # rows leave early
"""

from __future__ import annotations

import dataclasses
import functools
from typing import Sequence

import jax
import jax.numpy as jnp
import numpy as np

from sage_jax import parallel
from sage_jax.model.config import ModelConfig
from sage_jax.rollout.sampler import (
    STOP,
    SamplerState,
    _check_prompts,
    _pad_rows,
    _row_settings,
    bucket,
    decode,
    prefill,
)
from sage_jax.rollout.sampling import Processing, SamplingParams

__all__ = ["empty_slots", "prefill_slots", "insert_slots", "finish_slots", "decode_slots"]


@parallel.on_params_mesh
def empty_slots(cfg: ModelConfig, params, rows: int, cache_len: int, new_len: int) -> SamplerState:
    """A state of `rows` free rows (all done, max_new 0), shaped like `prefill_slots` rows. The
    presence mask is always [rows, V], so rows with and without a repetition penalty share it."""
    rows = parallel.pad_rows(rows)
    settings = _row_settings(cfg, [], [], [], 0, rows)  # inert rows: max_new 0
    toks, lens = _pad_rows([[0]] * rows, rows, 16)
    return prefill(cfg, params, jnp.asarray(toks), jnp.asarray(lens), settings, cache_len=int(cache_len),
                   new_len=int(new_len), presence=True)


@parallel.on_params_mesh
def prefill_slots(cfg: ModelConfig, params, prompt: Sequence[int], sampling: SamplingParams,
                  row_seeds: Sequence[int], *, cache_len: int, new_len: int, seed: int = 0) -> SamplerState:
    """One prompt prefilled once and broadcast to len(row_seeds) rows (padded to a power of two;
    padding rows are done) with `generate`'s per-row settings. ValueError if it does not fit."""
    _check_prompts([prompt], cfg.vocab_size)
    if len(prompt) >= cache_len:
        raise ValueError(f"a prompt of {len(prompt)} tokens does not fit the context of {cache_len} tokens "
                         f"(max_model_len)")
    n, k = len(row_seeds), bucket(len(row_seeds))
    max_new = [min(sampling.max_new_tokens, new_len)] * n
    settings = _row_settings(cfg, [sampling] * n, max_new, list(row_seeds), seed, k)
    toks, lens = _pad_rows([prompt], 1, min(bucket(len(prompt), 16), cache_len))
    return prefill(cfg, params, jnp.asarray(toks), jnp.asarray(lens), settings, cache_len=int(cache_len),
                   new_len=int(new_len), repeat=k, presence=True)


def _put(dst: jax.Array, src: jax.Array, index: jax.Array, axis: int) -> jax.Array:
    if axis == 1:
        return dst.at[:, index].set(src, mode="drop")
    return dst.at[index].set(src, mode="drop")


def _insert(state: SamplerState, rows: SamplerState, index: jax.Array) -> SamplerState:
    cache = {name: _put(state.cache[name], rows.cache[name], index, 1 if name in ("k", "v") else 0)
             for name in state.cache}
    fields = {f.name: _put(getattr(state, f.name), getattr(rows, f.name), index, 0)
              for f in dataclasses.fields(state) if f.name not in ("cache", "step")}
    return dataclasses.replace(state, cache=cache, **fields)


insert_slots = jax.jit(_insert, donate_argnames=("state",))
insert_slots.__doc__ = """`rows`' rows into `state` at row indices `index` (one per row of `rows`; an index >=
state.batch drops that row). The whole row is replaced: cache, logits, settings, counters."""


@functools.partial(jax.jit, donate_argnames=("state",))
def finish_slots(state: SamplerState, mask: jax.Array) -> SamplerState:
    """Mark rows (mask [B] bool) done: a cancelled request, or a stop string seen on the host."""
    reason = jnp.where(mask & ~state.done, STOP, state.reason).astype(jnp.int32)
    return dataclasses.replace(state, done=state.done | mask, reason=reason)


def _take(a: jax.Array, index: jax.Array, axis: int) -> jax.Array:
    return a[:, index] if axis == 1 else a[index]


@functools.partial(jax.jit, static_argnames=("cfg", "proc", "steps"), donate_argnames=("state",))
def _decode_gathered(cfg: ModelConfig, proc: Processing, params, state: SamplerState, index: jax.Array,
                  steps: int) -> SamplerState:
    # Decode a copy of just the rows in `index` (the per-row work, vocabulary-wide sampling above
    # all, is paid for active rows only), then put them back; out-of-range indices are padding.
    pad = index >= state.batch
    rows = jnp.minimum(index, state.batch - 1)  # padding reads a real row, is marked done, is not put back
    cache = {name: _take(state.cache[name], rows, 1 if name in ("k", "v") else 0) for name in state.cache}
    fields = {f.name: _take(getattr(state, f.name), rows, 0)
              for f in dataclasses.fields(state) if f.name not in ("cache", "step")}
    sub = dataclasses.replace(state, cache=cache, **fields)
    n = state.tokens.shape[1]
    # `decode` runs while step < n: starting at n - steps bounds it to `steps` iterations.
    sub = dataclasses.replace(sub, done=sub.done | pad, step=jnp.asarray(n - steps, jnp.int32))
    sub = decode(cfg, proc, params, sub)
    return dataclasses.replace(_insert(state, sub, index), step=state.step)


@functools.partial(jax.jit, static_argnames=("cfg", "proc", "steps"), donate_argnames=("state",))
def _decode_masked(cfg: ModelConfig, proc: Processing, params, state: SamplerState, rows: jax.Array,
                   steps: int) -> SamplerState:
    # Decode the whole state in place with the rows not in `rows` held done (no copy of the cache:
    # for when most rows take part).
    others = ~rows
    n = state.tokens.shape[1]
    st = dataclasses.replace(state, done=state.done | others, step=jnp.asarray(n - steps, jnp.int32))
    st = decode(cfg, proc, params, st)
    # The other rows' cache slot at `end` got a padding write, which their next token overwrites;
    # their logits and flags stay theirs.
    return dataclasses.replace(
        st, done=jnp.where(others, state.done, st.done), reason=jnp.where(others, state.reason, st.reason),
        logits=jnp.where(others[:, None], state.logits, st.logits), step=state.step)


@parallel.on_params_mesh
def decode_slots(cfg: ModelConfig, proc: Processing, params, state: SamplerState, rows: Sequence[int],
                 steps: int) -> SamplerState:
    """At most `steps` decode steps of the rows `rows` (indices of active rows that share `proc`,
    a static processing pipeline); the other rows are left as they are. A few rows of many run on
    a copy of just those rows (padded to a power of two), most rows in place."""
    steps = int(min(steps, state.tokens.shape[1]))
    width = parallel.pad_rows(bucket(len(rows)))
    if width >= state.batch:
        mask = np.zeros((state.batch,), bool)
        mask[list(rows)] = True
        return _decode_masked(cfg, proc, params, state, jnp.asarray(mask), steps)
    index = np.full((width,), state.batch, np.int32)
    index[: len(rows)] = rows
    return _decode_gathered(cfg, proc, params, state, jnp.asarray(index), steps)
