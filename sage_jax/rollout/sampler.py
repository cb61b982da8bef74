"""The sampler: batched prefill, then a compiled decode loop over a preallocated KV cache.

Device side (all fixed-shape, all jitted, cache keyed on static config):

- `prefill`: right-padded prompts [B, T] -> a fresh `SamplerState` (KV cache filled, next-token
  logits [B, V] gathered at each row's last prompt token, repetition-penalty presence mask).
  With `repeat=K` the prompt cache is computed once and broadcast to K rows per prompt
  (`jnp.repeat` on the batch axis): prefix sharing.
- `append`: a right-padded chunk [B, T] onto an existing state's cache (multi-turn reuse, or the
  K different suffixes after a shared prefix); rows with an empty chunk keep their logits.
- `decode`: one `lax.while_loop` (state donated) that samples, writes, checks stop tokens /
  per-row `max_new_tokens` / cache capacity, and feeds the chosen tokens back through the model
  until every row is done. Rows that finish keep running as padding (segment id 0, so their
  cache does not advance).

Host side (`generate`, `generate_branches`): shape buckets (batch, prompt length and new-token
buffer rounded up to powers of two, so a whole search compiles a handful of times), per-row
settings, and the result as `Generation`s; stop strings are applied on the host after the loop.

Randomness: row r's key is `fold_in(key(seed), row_seed[r])` (row_seed defaults to the row's
index in the flattened output), and its n-th token uses `fold_in(row_key, n)`. So a row's
samples depend on its seed and its own logits only, not on the batch it shares or the bucket.

Cache full: a row that needs another forward step while its cache has no free slot (or, after a
shared prefix, has filled its `room`) finishes with `finish_reason="cache_full"`; nothing is
truncated silently. A prompt longer than the cache is an error (ValueError).
"""

from __future__ import annotations

import dataclasses
import functools
from typing import Any, Sequence

import jax
import jax.numpy as jnp
import numpy as np

from sage_jax import model as M
from sage_jax import parallel
from sage_jax.model.config import ModelConfig
from sage_jax.rollout.sampling import (
    Processing,
    SamplingParams,
    sample,
    update_presence,
)

RUNNING, STOP, LENGTH, CACHE_FULL = 0, 1, 2, 3
REASONS = {STOP: "stop", LENGTH: "length", CACHE_FULL: "cache_full"}
MAX_STOP_IDS = 8
# From this many rows the decode loop stores each layer's keys transposed, for the faster
# multiply-reduce scores (`model.split_cache`; measured at batch 64: 160-167 vs 195-200 ms per
# step; batch 1 is faster without).
TRANSPOSED_KEYS_MIN_ROWS = 16


# ---------------------------------------------------------------------------------------------
# State


@jax.tree_util.register_dataclass
@dataclasses.dataclass
class SamplerState:
    """Everything one decode needs, as one pytree (the while_loop carry; donated)."""

    cache: dict[str, jax.Array]  # model KV cache; end[b] = tokens in row b's cache
    logits: jax.Array  # [B, V] f32: next-token logits (unprocessed)
    tokens: jax.Array  # [B, N] int32: generated tokens (pad after `length`)
    logprobs: jax.Array  # [B, N] f32: raw-model log-prob of each generated token (0 if not asked)
    length: jax.Array  # [B] int32: tokens generated so far
    done: jax.Array  # [B] bool
    reason: jax.Array  # [B] int32: RUNNING / STOP / LENGTH / CACHE_FULL
    presence: jax.Array  # [B, V] bool (repetition penalty) or [B, 1] when unused
    stop_ids: jax.Array  # [B, MAX_STOP_IDS] int32, -1 = unused
    keys: jax.Array  # [B] PRNG keys (one per row)
    max_new: jax.Array  # [B] int32
    min_new: jax.Array  # [B] int32
    temperature: jax.Array  # [B] f32
    top_p: jax.Array  # [B] f32
    penalty: jax.Array  # [B] f32
    room: jax.Array  # [B] int32: cache slots the row may fill (fewer than the cache's after a shared prefix)
    step: jax.Array  # [] int32: loop iterations run

    @property
    def batch(self) -> int:
        return self.tokens.shape[0]


@dataclasses.dataclass
class Generation:
    """One generated continuation.

    tokens: the generated ids; a stop token that ended the row is included (as HF does).
    finish_reason: "stop" (stop token or stop string), "length" (max_new_tokens) or
      "cache_full" (the KV cache had no slot left for the next step).
    logprobs: raw-model log-probs of `tokens` (SamplingParams.logprobs), else None.
    text: decoded `tokens` (special tokens skipped) when a tokenizer was given; with stop strings
      it is cut just before the first stop string, and `tokens` is cut to the shortest prefix
      whose text contains it.
    """

    tokens: list[int]
    finish_reason: str
    logprobs: list[float] | None = None
    text: str | None = None
    prompt_index: int = 0
    continuation_index: int = 0
    stop_string: str | None = None


# ---------------------------------------------------------------------------------------------
# Device functions


def _last_logits(cfg: ModelConfig, params, x: jax.Array, lengths: jax.Array) -> jax.Array:
    """Logits [B, V] at each row's last real token of a chunk (x [B, T, D], lengths [B] >= 1)."""
    idx = jnp.clip(lengths - 1, 0, x.shape[1] - 1)
    last = jnp.take_along_axis(x, idx[:, None, None], axis=1)[:, 0]
    return M.lm_head(cfg, params, last).astype(jnp.float32)


def _chunk_segments(tokens: jax.Array, lengths: jax.Array) -> jax.Array:
    return (jnp.arange(tokens.shape[1], dtype=jnp.int32)[None, :] < lengths[:, None]).astype(jnp.int32)


def _repeat_rows(tree, k: int):
    return jax.tree.map(lambda a: jnp.repeat(a, k, axis=0) if a.ndim else a, tree)


def repeat_cache(cache: dict[str, jax.Array], k: int) -> dict[str, jax.Array]:
    """Broadcast every row of a KV cache to k consecutive rows (k/v on axis 1, the rest axis 0)."""
    return parallel.constrain_tree({
        "k": jnp.repeat(cache["k"], k, axis=1),
        "v": jnp.repeat(cache["v"], k, axis=1),
        "segment_ids": jnp.repeat(cache["segment_ids"], k, axis=0),
        "end": jnp.repeat(cache["end"], k, axis=0),
    }, M.CACHE_AXES)


def _rows_on_mesh(state: SamplerState) -> SamplerState:
    """Every per-row array over the mesh's batch axes (no-op without a mesh; the cache has its own)."""
    return dataclasses.replace(state, **{f.name: parallel.constrain(getattr(state, f.name), ("batch",))
                                         for f in dataclasses.fields(state) if f.name not in ("cache", "step")})


@functools.partial(jax.jit, static_argnames=("cfg", "cache_len", "new_len", "repeat", "presence"))
def prefill(
    cfg: ModelConfig,
    params,
    tokens: jax.Array,
    lengths: jax.Array,
    rows: dict[str, jax.Array],
    *,
    cache_len: int,
    new_len: int,
    repeat: int = 1,
    presence: bool = False,
) -> SamplerState:
    """Prompts [P, T] (right-padded, lengths [P] >= 1) -> state of P * repeat rows.

    rows: per-output-row settings, each [P * repeat]: keys, max_new, min_new, temperature,
    top_p, penalty, stop_ids [P * repeat, MAX_STOP_IDS].
    """
    p, _ = tokens.shape
    cache = M.init_cache(cfg, p, cache_len)
    seg = _chunk_segments(tokens, lengths)
    x, cache = M.hidden_states(cfg, params, tokens, segment_ids=seg, cache=cache)
    logits = _last_logits(cfg, params, x, lengths)
    pres = (update_presence(jnp.zeros((p, cfg.vocab_size), bool), tokens, seg != 0) if presence
            else jnp.zeros((p, 1), bool))
    if repeat > 1:
        cache = repeat_cache(cache, repeat)
        logits, pres = _repeat_rows((logits, pres), repeat)
    b = p * repeat
    return _rows_on_mesh(SamplerState(
        cache=cache,
        logits=logits,
        tokens=jnp.zeros((b, new_len), jnp.int32),
        logprobs=jnp.zeros((b, new_len), jnp.float32),
        length=jnp.zeros((b,), jnp.int32),
        done=rows["max_new"] <= 0,
        reason=jnp.where(rows["max_new"] <= 0, LENGTH, RUNNING).astype(jnp.int32),
        presence=pres,
        stop_ids=rows["stop_ids"],
        keys=rows["keys"],
        max_new=rows["max_new"],
        min_new=rows["min_new"],
        temperature=rows["temperature"],
        top_p=rows["top_p"],
        penalty=rows["penalty"],
        room=jnp.full((b,), cache_len, jnp.int32),
        step=jnp.zeros((), jnp.int32),
    ))


@functools.partial(jax.jit, static_argnames=("cfg",), donate_argnames=("state",))
def append(cfg: ModelConfig, params, state: SamplerState, tokens: jax.Array, lengths: jax.Array) -> SamplerState:
    """Prefill a right-padded chunk [B, T] (lengths [B] >= 0) onto each row's cache.

    Rows with length 0 keep their logits. Raises nothing on device: check capacity on the host.
    """
    seg = _chunk_segments(tokens, lengths)
    x, cache = M.hidden_states(cfg, params, tokens, segment_ids=seg, cache=state.cache)
    logits = jnp.where((lengths > 0)[:, None], _last_logits(cfg, params, x, lengths), state.logits)
    pres = state.presence
    if pres.shape[1] > 1:
        pres = update_presence(pres, tokens, seg != 0)
    return dataclasses.replace(state, cache=cache, logits=logits, presence=pres)


def _is_stop(stop_ids: jax.Array, tok: jax.Array) -> jax.Array:
    return jnp.any(stop_ids == tok[:, None], axis=-1)


def _decode_step(cfg: ModelConfig, proc: Processing, params, prefix, st: SamplerState) -> SamplerState:
    b, n = st.tokens.shape
    v = st.logits.shape[1]
    rows = jnp.arange(b)
    active = ~st.done
    banned = None
    if proc.min_new_tokens:  # ban the stop tokens of rows still short of min_new_tokens
        early = (st.length < st.min_new)[:, None]
        banned = jnp.where((st.stop_ids >= 0) & early, st.stop_ids, v)  # v: out of range, none
    keys = jax.vmap(jax.random.fold_in)(st.keys, st.length)
    tok = sample(proc, st.logits, keys, presence=st.presence, penalty=st.penalty, temperature=st.temperature,
                 top_p=st.top_p, banned=banned)
    tok = jnp.where(active, tok, 0)
    slot = jnp.where(active, st.length, n)  # n: out of range, dropped
    tokens = st.tokens.at[rows, slot].set(tok, mode="drop")
    logprobs = st.logprobs
    if proc.logprobs:
        lp = jax.nn.log_softmax(st.logits, axis=-1)
        chosen = jnp.take_along_axis(lp, tok[:, None], axis=-1)[:, 0]
        logprobs = logprobs.at[rows, slot].set(chosen, mode="drop")
    length = st.length + active.astype(jnp.int32)
    hit_stop = active & _is_stop(st.stop_ids, tok)
    hit_len = active & ~hit_stop & (length >= st.max_new)
    capacity = jnp.minimum(st.cache["segment_ids"].shape[1], st.room)
    full = active & ~hit_stop & ~hit_len & (st.cache["end"] >= capacity)
    reason = jnp.where(hit_stop, STOP, jnp.where(hit_len, LENGTH, jnp.where(full, CACHE_FULL, st.reason)))
    done = st.done | hit_stop | hit_len | full
    presence = st.presence
    if proc.repetition_penalty:
        presence = update_presence(presence, tok, active)

    def forward(cache):
        x, cache = M.hidden_states(cfg, params, tok[:, None], segment_ids=(~done).astype(jnp.int32)[:, None],
                                   cache=cache, prefix=prefix)
        return M.lm_head(cfg, params, x[:, 0]).astype(jnp.float32), cache

    # Skip the forward once every row is done (the loop is about to end).
    logits, cache = jax.lax.cond(jnp.any(~done), forward, lambda c: (st.logits, c), st.cache)
    return dataclasses.replace(
        st, cache=cache, logits=logits, tokens=tokens, logprobs=logprobs, length=length, done=done,
        reason=reason.astype(jnp.int32), presence=presence, step=st.step + 1,
    )


@functools.partial(jax.jit, static_argnames=("cfg", "proc"), donate_argnames=("state",))
def decode(cfg: ModelConfig, proc: Processing, params, state: SamplerState, prefix=None) -> SamplerState:
    """Decode until every row is done (stop token, its max_new_tokens, or a full cache). prefix: a
    read-only shared prefix the cache's rows continue (`model.forward`'s), not donated."""
    n = state.tokens.shape[1]
    split = M.per_layer(params) is not None  # the decode layout: each layer's cache its own buffer too
    transpose_keys = state.tokens.shape[0] >= TRANSPOSED_KEYS_MIN_ROWS
    stacked = state.cache
    cache = M.split_cache(stacked, transpose_keys=transpose_keys) if split else stacked
    if split and prefix is not None:  # per-layer buffers once per loop: each layer's slice of the stacked
        prefix = M.split_cache(prefix)  # prefix was copied every step (4 x K=4 rows, 440 slots: 14 of 145 ms)
    state = dataclasses.replace(state, cache=cache, done=state.done | (state.max_new <= 0))
    state = jax.lax.while_loop(
        lambda st: jnp.any(~st.done) & (st.step < n),
        functools.partial(_decode_step, cfg, proc, params, prefix),
        state,
    )
    return dataclasses.replace(state, cache=M.stack_cache(state.cache, into=stacked)) if split else state


# ---------------------------------------------------------------------------------------------
# Host side: buckets, per-row settings, results


def bucket(n: int, minimum: int = 1) -> int:
    """n rounded up to a power of two (at least `minimum`)."""
    n = max(int(n), minimum, 1)
    return 1 << (n - 1).bit_length()


def _stop_ids(cfg: ModelConfig, sp: SamplingParams) -> list[int]:
    ids = sp.stop_token_ids
    if ids is None:
        eos = cfg.eos_token_id
        ids = () if eos is None else ((eos,) if isinstance(eos, int) else tuple(eos))
    if len(ids) > MAX_STOP_IDS:
        raise ValueError(f"at most {MAX_STOP_IDS} stop token ids, got {len(ids)}")
    return list(ids)


def _pad_rows(seqs: Sequence[Sequence[int]], rows: int, width: int) -> tuple[np.ndarray, np.ndarray]:
    out = np.zeros((rows, width), np.int32)
    lengths = np.zeros((rows,), np.int32)
    for i, s in enumerate(seqs):
        out[i, : len(s)] = s
        lengths[i] = len(s)
    return out, lengths


def _row_settings(
    cfg: ModelConfig,
    per_row: Sequence[SamplingParams],
    max_new: Sequence[int],
    row_seeds: Sequence[int],
    seed: int,
    rows: int,
) -> dict[str, jax.Array]:
    """Per-row arrays for `rows` rows (the first len(per_row) real, the rest inert padding)."""
    n = len(per_row)
    stop = np.full((rows, MAX_STOP_IDS), -1, np.int32)
    mx = np.zeros((rows,), np.int32)
    mn = np.zeros((rows,), np.int32)
    temp = np.ones((rows,), np.float32)
    top_p = np.ones((rows,), np.float32)
    pen = np.ones((rows,), np.float32)
    seeds = np.zeros((rows,), np.uint32)
    for i, sp in enumerate(per_row):
        ids = _stop_ids(cfg, sp)
        stop[i, : len(ids)] = ids
        mx[i], mn[i] = max_new[i], sp.min_new_tokens
        temp[i] = sp.temperature if sp.temperature > 0 else 1.0
        top_p[i], pen[i] = sp.top_p, sp.repetition_penalty
        seeds[i] = np.uint32(row_seeds[i] % (1 << 32))
    seeds[n:] = np.arange(n, rows, dtype=np.uint32)
    keys = jax.vmap(jax.random.fold_in, in_axes=(None, 0))(jax.random.key(seed), jnp.asarray(seeds))
    return dict(keys=keys, max_new=jnp.asarray(mx), min_new=jnp.asarray(mn), temperature=jnp.asarray(temp),
                top_p=jnp.asarray(top_p), penalty=jnp.asarray(pen), stop_ids=jnp.asarray(stop))


def _apply_stop_strings(gen: Generation, stops: Sequence[str], tokenizer) -> Generation:
    """Cut at the first occurrence of any stop string (host side, after the loop)."""
    text = tokenizer.decode(gen.tokens, skip_special_tokens=True)
    gen.text = text
    hits = [(text.find(s), s) for s in stops if s and text.find(s) >= 0]
    if not hits:
        return gen
    pos, s = min(hits)
    end = pos + len(s)
    for n in range(1, len(gen.tokens) + 1):  # shortest token prefix whose text covers the stop string
        if len(tokenizer.decode(gen.tokens[:n], skip_special_tokens=True)) >= end:
            break
    gen.tokens = gen.tokens[:n]
    if gen.logprobs is not None:
        gen.logprobs = gen.logprobs[:n]
    gen.text, gen.finish_reason, gen.stop_string = text[:pos], "stop", s
    return gen


def _results(state: SamplerState, per_row, n_rows: int, k: int, tokenizer) -> list[Generation]:
    tokens, lengths, reasons, logprobs = jax.device_get((state.tokens, state.length, state.reason, state.logprobs))
    out = []
    for r in range(n_rows):
        sp = per_row[r]
        ln = int(lengths[r])
        reason = int(reasons[r])
        if reason == RUNNING:  # cannot happen: the loop runs until every row is done
            raise RuntimeError(f"row {r} did not finish")
        g = Generation(
            tokens=tokens[r, :ln].tolist(),
            finish_reason=REASONS[reason],
            logprobs=logprobs[r, :ln].tolist() if sp.logprobs else None,
            prompt_index=r // k,
            continuation_index=r % k,
        )
        if tokenizer is not None:
            if sp.stop_strings:
                g = _apply_stop_strings(g, sp.stop_strings, tokenizer)
            else:
                g.text = tokenizer.decode(g.tokens, skip_special_tokens=True)
        elif sp.stop_strings:
            raise ValueError("SamplingParams.stop_strings needs a tokenizer (generate(..., tokenizer=tok))")
        out.append(g)
    return out


def _as_list(x, n: int, name: str) -> list:
    if isinstance(x, (list, tuple)):
        if len(x) != n:
            raise ValueError(f"{name}: expected {n} entries, got {len(x)}")
        return list(x)
    return [x] * n


def _check_prompts(prompts: Sequence[Sequence[int]], vocab: int, name: str = "prompts", allow_empty=False):
    for i, p in enumerate(prompts):
        if not allow_empty and len(p) == 0:
            raise ValueError(f"{name}[{i}] is empty: a prompt needs at least one token")
        if len(p) and (min(p) < 0 or max(p) >= vocab):
            raise ValueError(f"{name}[{i}] has token ids outside [0, {vocab})")


@parallel.on_params_mesh  # params on a mesh: run sharded, rows padded to the data axes
def generate(
    cfg: ModelConfig,
    params,
    prompts: Sequence[Sequence[int]],
    sampling: SamplingParams | Sequence[SamplingParams] = SamplingParams(),
    seed: int = 0,
    max_cache_len: int | None = None,
    num_continuations: int = 1,
    *,
    max_new_tokens: int | Sequence[int] | None = None,
    row_seeds: Sequence[int] | None = None,
    tokenizer: Any = None,
    return_state: bool = False,
) -> list[Generation] | tuple[list[Generation], SamplerState]:
    """Generate `num_continuations` continuations of each prompt (token-id lists).

    Returns len(prompts) * num_continuations `Generation`s, continuation j of prompt i at index
    i * num_continuations + j. With num_continuations > 1 each prompt is prefilled once and its
    cache is broadcast to its continuations. Continuation j of prompt i uses row seed
    `row_seeds[i * K + j]` (default: that index), so it equals `generate([prompt_i] * K)`'s row j.

    sampling: one SamplingParams, or one per prompt (rows may differ in temperature, top_p,
      penalty, stop ids, max/min_new_tokens; not in greedy-ness or top_k).
    max_new_tokens: per-prompt override of sampling.max_new_tokens.
    max_cache_len: KV-cache capacity in tokens (prompt + generated); default: enough for every
      row. A row that outgrows it finishes with finish_reason "cache_full".
    return_state: also return the final `SamplerState` (its cache holds prompt + generated
      tokens except each row's last one, ready for `append`).
    """
    if not prompts:
        return ([], None) if return_state else []
    k = int(num_continuations)
    if k < 1:
        raise ValueError("num_continuations must be >= 1")
    _check_prompts(prompts, cfg.vocab_size)
    n = len(prompts)
    per_prompt = _as_list(sampling, n, "sampling")
    mx = _as_list(max_new_tokens, n, "max_new_tokens") if max_new_tokens is not None else [
        sp.max_new_tokens for sp in per_prompt]
    proc = Processing.of(per_prompt, cfg.vocab_size)

    longest = max(len(p) for p in prompts)
    new_len = bucket(max(mx), 16)
    t_len = bucket(longest, 16)
    cache_len = int(max_cache_len) if max_cache_len is not None else t_len + new_len
    if longest > cache_len:
        raise ValueError(f"a prompt of {longest} tokens does not fit max_cache_len={cache_len}")
    t_len = min(t_len, cache_len)

    p_rows = parallel.pad_rows(bucket(n))
    per_row = [sp for sp in per_prompt for _ in range(k)]
    mx_rows = [m for m in mx for _ in range(k)]
    seeds = list(row_seeds) if row_seeds is not None else list(range(n * k))
    if len(seeds) != n * k:
        raise ValueError(f"row_seeds: expected {n * k} entries, got {len(seeds)}")
    rows = _row_settings(cfg, per_row, mx_rows, seeds, seed, p_rows * k)
    toks, lens = _pad_rows(prompts, p_rows, t_len)
    lens[n:] = 1  # inert padding rows: one token, max_new 0
    state = prefill(cfg, params, jnp.asarray(toks), jnp.asarray(lens), rows, cache_len=cache_len,
                    new_len=new_len, repeat=k, presence=proc.repetition_penalty)
    state = decode(cfg, proc, params, state)
    gens = _results(state, per_row, n * k, k, tokenizer)
    return (gens, state) if return_state else gens


@parallel.on_params_mesh
def generate_branches(
    cfg: ModelConfig,
    params,
    prefix: Sequence[int],
    suffixes: Sequence[Sequence[int]],
    sampling: SamplingParams | Sequence[SamplingParams] = SamplingParams(),
    seed: int = 0,
    max_cache_len: int | None = None,
    *,
    max_new_tokens: int | Sequence[int] | None = None,
    row_seeds: Sequence[int] | None = None,
    tokenizer: Any = None,
    return_state: bool = False,
):
    """K branches of one shared prefix: row j continues `prefix + suffixes[j]`.

    The prefix is prefilled once (one row), its cache broadcast to the K rows, the suffixes
    (possibly empty, possibly of different lengths) prefilled onto it together, then all K rows
    decode together. Row j equals row j of `generate([prefix + s for s in suffixes])` (same seed,
    same row seeds): the tree search's "share the node's cache, branch K children".
    """
    k = len(suffixes)
    if k == 0:
        return ([], None) if return_state else []
    _check_prompts([prefix], cfg.vocab_size, "prefix")
    _check_prompts(suffixes, cfg.vocab_size, "suffixes", allow_empty=True)
    per_row = _as_list(sampling, k, "sampling")
    mx = _as_list(max_new_tokens, k, "max_new_tokens") if max_new_tokens is not None else [
        sp.max_new_tokens for sp in per_row]
    proc = Processing.of(per_row, cfg.vocab_size)
    longest_suffix = max(len(s) for s in suffixes)
    new_len = bucket(max(mx), 16)
    p_len = bucket(len(prefix), 16)
    s_len = bucket(longest_suffix, 8) if longest_suffix else 0
    # The same default capacity as `generate` on the concatenated prompts: the same decode shapes.
    cache_len = (int(max_cache_len) if max_cache_len is not None
                 else bucket(len(prefix) + longest_suffix, 16) + new_len)
    if len(prefix) + longest_suffix > cache_len:
        raise ValueError(f"prefix + suffix ({len(prefix) + longest_suffix} tokens) does not fit "
                         f"max_cache_len={cache_len}")
    p_len = min(p_len, cache_len)
    rows_b = parallel.pad_rows(bucket(k))
    seeds = list(row_seeds) if row_seeds is not None else list(range(k))
    rows = _row_settings(cfg, per_row, mx, seeds, seed, rows_b)
    toks, lens = _pad_rows([prefix], 1, p_len)
    state = prefill(cfg, params, jnp.asarray(toks), jnp.asarray(lens), rows, cache_len=cache_len,
                    new_len=new_len, repeat=rows_b, presence=proc.repetition_penalty)
    if longest_suffix:
        s_len = min(s_len, cache_len)
        stoks, slens = _pad_rows(suffixes, rows_b, s_len)
        state = append(cfg, params, state, jnp.asarray(stoks), jnp.asarray(slens))
    state = decode(cfg, proc, params, state)
    gens = _results(state, per_row, k, k, tokenizer)
    for j, g in enumerate(gens):
        g.prompt_index, g.continuation_index = 0, j
    return (gens, state) if return_state else gens
