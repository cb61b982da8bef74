"""One KV cache per live dialogue, kept across turns (DESIGN.md §11), and the tree search's
branching on it.

`RowCache` is R rows of a KV cache on device plus, on the host, the token ids each row holds
(`ids[r]`, always equal to the row's fill level `end[r]` on device) and whether the row's
next-token logits are current. `sync({row: target_ids})` makes row r hold exactly `target_ids`:
the longest common prefix with what the row holds is kept, the rest is dropped (the fill level
is rewound: a slot past `end` is never attended, so this costs nothing) and only the new tokens
are prefilled, in chunks of a bucketed width. A target that extends the cache (the usual case:
the simulated user's reply, the template tokens, a pinned prefill) is a pure append; one that
does not (a chat template that re-renders an earlier turn differently, a generated message whose
re-tokenized text differs from the sampled tokens) is recomputed from the first differing token
and counted in `CacheStats.rewinds`, so the cache always holds the same tokens a full re-prefill
of the history would: what it holds is the chat-template encoding of the dialogue (the sampled
tokens are kept where they coincide with it, which is nearly always). `generate` decodes rows on
the cache in place (the sampler's compiled loop); the generated tokens stay in the cache (all but
each row's last, which the next `sync` appends along with the end-of-turn and template tokens).

`DialoguePool` owns one `RowCache` for one policy, maps dialogue keys to rows, and is reused
across batches (rows are acquired and released, the device buffers stay; `allocations` counts
the buffers ever made). Branching: `fork(k)` gives every row k child rows, the children are
synced/decoded together, and `commit(chosen)` makes the chosen child's cache the dialogue's next
cache. The children share their parent's history (cascade attention, as in Hydragen): each reads
its parent row's cache in place as a shared prefix (one read per parent for its k children, a
grouped einsum) plus a small cache of its own holding what it adds after the fork; `commit`
writes the chosen child's own slots after its parent's prefix. `shared_prefix=False` copies the
parent row to every child instead (the earlier fork, whose attention reads k copies of it).

Meshes: with the policy's parameters on a mesh (`load_policy(..., mesh=...)`), every device call
runs with that mesh in context, the pool's row count is padded to a multiple of the mesh's row
split (`parallel.pad_rows`) and the cache is laid out by its logical axes (`model.CACHE_AXES`: rows
over the batch axes, kv heads over `tensor`), kept so by every program, including a growth.

Capacity: the cache length grows in powers of two up to `max_cache_len` (default: the model's
`max_position_embeddings`); a dialogue whose encoding does not fit is reported (`sync` returns
its key, `CacheStats.cache_full` counts it) and a child that runs out of slots while decoding
finishes with finish_reason "cache_full": nothing is truncated.

Branching modes (`branch`):
  - "latent" (latent-first): the user-state block is decoded once per dialogue (greedy), then K
    action blocks are sampled from it on K forked rows; duplicate actions are resampled (up to
    `action_tries` rounds) so the K children hold K distinct actions where the model can produce
    them (`distinct_actions` per dialogue); each child then decodes its reply from its own latent
    prefix on the shared cache;
  - "enumerate": the same state block, then K distinct values of `a_motivation` from a closed
    vocabulary pinned as each child's prefill;
  - "sample": K whole messages sampled from the dialogue's cache (the earlier default).
"""

from __future__ import annotations

import dataclasses
import functools
import random
import time
from typing import Hashable, Sequence

import jax
import jax.numpy as jnp
import numpy as np

from sage_jax import model as M
from sage_jax import parallel
from sage_jax.model.config import ModelConfig
from sage_jax.rollout import sampler as S
from sage_jax.rollout.policy import Policy
from sage_jax.rollout.sampling import Processing, SamplingParams, update_presence
from sage_jax.sac import DEFAULT_SCHEMA, Latent, Schema, parse_assistant_lenient, render_latent

CHUNK_WIDTHS = (32, 128)  # prefill chunk widths (a longer chunk is prefilled in several calls)
MIN_CACHE = 256
CHILD_CACHE = 64  # own cache length a prefix-shared child starts at (grows as it needs)


# ---------------------------------------------------------------------------------------------
# Device functions
#
# Under a mesh (the host side runs with the params' mesh in context, see `RowCache`) the cache is
# laid out by its logical axes (`M.CACHE_AXES`: rows over the batch axes, kv heads over `tensor`)
# and the logits' rows over the batch axes; the constraints below keep that layout through every
# program (no-ops without a mesh).


def _on_mesh(cache, logits):
    return parallel.constrain_tree(cache, M.CACHE_AXES), parallel.constrain(logits, ("batch",))


@functools.partial(jax.jit, static_argnames=("cfg", "rows", "capacity"))
def empty(cfg: ModelConfig, *, rows: int, capacity: int):
    """An empty cache of `rows` rows and its logits, made in place on the mesh in context."""
    return _on_mesh(M.init_cache(cfg, rows, capacity), jnp.zeros((rows, cfg.vocab_size), jnp.float32))


@functools.partial(jax.jit, static_argnames=("new_len",))
def grow(cache, *, new_len: int):
    """The cache with its length padded to new_len slots (empty, never attended), same layout."""
    pad = new_len - cache["segment_ids"].shape[1]
    return parallel.constrain_tree({
        "k": jnp.pad(cache["k"], ((0, 0), (0, 0), (0, 0), (0, pad), (0, 0))),
        "v": jnp.pad(cache["v"], ((0, 0), (0, 0), (0, 0), (0, pad), (0, 0))),
        "segment_ids": jnp.pad(cache["segment_ids"], ((0, 0), (0, pad))), "end": cache["end"]}, M.CACHE_AXES)


@functools.partial(jax.jit, static_argnames=("new_len",))
def shrink(cache, *, new_len: int):
    """The cache cut to its first new_len slots (a pool starting its next batch), same layout."""
    return parallel.constrain_tree({"k": cache["k"][:, :, :, :new_len], "v": cache["v"][:, :, :, :new_len],
                                    "segment_ids": cache["segment_ids"][:, :new_len],
                                    "end": jnp.minimum(cache["end"], new_len)}, M.CACHE_AXES)


def _prefix_on_mesh(prefix):
    """A shared prefix laid out like the cache it is (rows over the batch axes), base by rows."""
    if prefix is None:
        return None
    return {"k": parallel.constrain(prefix["k"], M.CACHE_AXES["k"]),
            "v": parallel.constrain(prefix["v"], M.CACHE_AXES["v"]),
            "base": parallel.constrain(prefix["base"], ("batch",))}


@functools.partial(jax.jit, static_argnames=("cfg",), donate_argnames=("cache", "logits"))
def extend(cfg: ModelConfig, params, cache, logits, tokens, lengths, start, prefix=None):
    """Rewind each row's fill level to start[b] (<= end[b]) and prefill the chunk [B, T] there
    (lengths [B] >= 0; rows with length 0 keep their logits). prefix: the shared prefix the rows
    continue (`model.forward`'s; start counts own slots)."""
    tokens, lengths, start = (parallel.constrain(a, ("batch",)) for a in (tokens, lengths, start))
    cache, logits = _on_mesh(dict(cache, end=start.astype(jnp.int32)), logits)
    seg = S._chunk_segments(tokens, lengths)
    x, cache = M.hidden_states(cfg, params, tokens, segment_ids=seg, cache=cache, prefix=_prefix_on_mesh(prefix))
    logits = jnp.where((lengths > 0)[:, None], S._last_logits(cfg, params, x, lengths), logits)
    return _on_mesh(cache, logits)


@jax.jit
def take_rows(cache, logits, idx):
    """Rows idx of a cache (k/v on axis 1, the rest on axis 0) and of its logits: fork or select."""
    return _on_mesh({"k": cache["k"][:, idx], "v": cache["v"][:, idx], "segment_ids": cache["segment_ids"][idx],
                     "end": cache["end"][idx]}, logits[idx])


@jax.jit
def take_prefix(k, v, parents):
    """Prefix rows `parents` (k/v [L, P, K, Sp, H]): a prefix of one row per child (G = 1)."""
    return (parallel.constrain(k[:, parents], M.CACHE_AXES["k"]),
            parallel.constrain(v[:, parents], M.CACHE_AXES["v"]))


@functools.partial(jax.jit, static_argnames=("cfg", "k", "capacity"))
def spawn(cfg: ModelConfig, logits, *, k: int, capacity: int):
    """k prefix-shared children per row: an empty own cache each and their parent's logits."""
    return _on_mesh(M.init_cache(cfg, logits.shape[0] * k, capacity), jnp.repeat(logits, k, axis=0))


@functools.partial(jax.jit, static_argnames=("new_len",))
def merge_rows(prefix_k, prefix_v, cache, logits, idx, parents, base, *, new_len: int):
    """Whole-cache rows (new_len slots) from prefix-shared children: row i holds prefix row
    parents[i]'s first base[i] slots, then child idx[i]'s own slots from slot base[i] on."""
    own_end = cache["end"][idx]
    pad = ((0, 0), (0, 0), (0, 0), (0, new_len - prefix_k.shape[3]), (0, 0))
    rows = jnp.arange(idx.shape[0], dtype=jnp.int32)[:, None]
    slots = base[:, None] + jnp.arange(cache["k"].shape[3], dtype=jnp.int32)[None, :]

    def merged(pre, own):  # slots past a row's end hold whatever: never attended
        # indexed by (rows, slots) the target is [B, S, L, K, H]: own's rows and slots moved first
        own = jnp.moveaxis(own[:, idx], (1, 3), (0, 1)).astype(pre.dtype)
        return jnp.pad(pre[:, parents], pad).at[:, rows, :, slots].set(own, mode="drop")

    end = base + own_end
    seg = (jnp.arange(new_len, dtype=jnp.int32)[None, :] < end[:, None]).astype(jnp.int32)
    return _on_mesh({"k": merged(prefix_k, cache["k"]), "v": merged(prefix_v, cache["v"]), "segment_ids": seg,
                     "end": end}, logits[idx])


@functools.partial(jax.jit, donate_argnames=("cache", "logits"))
def put_rows(cache, logits, sub_cache, sub_logits, idx):
    """Rows idx of a cache and its logits replaced by the rows of sub (an index past the last row
    drops that sub row: the padding of a compacted decode)."""
    return _on_mesh({"k": cache["k"].at[:, idx].set(sub_cache["k"], mode="drop"),
                     "v": cache["v"].at[:, idx].set(sub_cache["v"], mode="drop"),
                     "segment_ids": cache["segment_ids"].at[idx].set(sub_cache["segment_ids"], mode="drop"),
                     "end": cache["end"].at[idx].set(sub_cache["end"], mode="drop")},
                    logits.at[idx].set(sub_logits, mode="drop"))


@functools.partial(jax.jit, static_argnames=("cfg", "proc", "new_len"), donate_argnames=("cache",))
def decode_rows(cfg: ModelConfig, proc: Processing, params, cache, logits, history, rows, seed, prefix=None, *,
                new_len: int):
    """The sampler's decode loop on an existing cache. history [B, H] (-1 = none): the ids each
    row holds, for the repetition penalty's presence mask; rows: per-row settings (numpy, see
    `_row_arrays`), row r's key is fold_in(key(seed), rows["seeds"][r]) as in `rollout.generate`;
    prefix: the shared prefix the rows continue (not donated). Returns (cache, tokens, length, reason)."""
    b = logits.shape[0]
    cache, logits = _on_mesh(cache, logits)
    keys = jax.vmap(jax.random.fold_in, in_axes=(None, 0))(jax.random.key(seed), rows["seeds"])
    if proc.repetition_penalty:
        pres = update_presence(jnp.zeros((b, cfg.vocab_size), bool), history, history >= 0)
    else:
        pres = jnp.zeros((b, 1), bool)
    state = S.SamplerState(
        cache=cache, logits=logits, tokens=jnp.zeros((b, new_len), jnp.int32),
        logprobs=jnp.zeros((b, new_len), jnp.float32), length=jnp.zeros((b,), jnp.int32),
        done=rows["max_new"] <= 0, reason=jnp.where(rows["max_new"] <= 0, S.LENGTH, S.RUNNING).astype(jnp.int32),
        presence=pres, stop_ids=rows["stop_ids"], keys=keys, max_new=rows["max_new"],
        min_new=rows["min_new"], temperature=rows["temperature"], top_p=rows["top_p"], penalty=rows["penalty"],
        room=rows["room"], step=jnp.zeros((), jnp.int32))
    state = S.decode(cfg, proc, params, S._rows_on_mesh(state), _prefix_on_mesh(prefix))
    cache = parallel.constrain_tree(state.cache, M.CACHE_AXES)
    return cache, state.tokens, state.length, state.reason


# ---------------------------------------------------------------------------------------------
# Host side


@dataclasses.dataclass
class CacheStats:
    """Counters of one search (or one pool): what was prefilled, reused, rewound, compiled."""

    prefill_tokens: int = 0  # tokens prefilled onto caches (new tokens only)
    prefill_seconds: float = 0.0
    prefill_calls: int = 0
    reused_tokens: int = 0  # tokens a target shared with what its row already held
    rewinds: int = 0  # dialogue rows whose new encoding was not an extension of their cache
    rewound_tokens: int = 0  # tokens those rewinds dropped (and prefilled again)
    trimmed_tokens: int = 0  # tokens decoded past a latent block's end, dropped by design
    decode_seconds: float = 0.0
    decode_calls: int = 0
    forks: int = 0
    cache_full: int = 0  # dialogues whose encoding did not fit max_cache_len
    grows: int = 0  # cache-length bucket increases
    child_grows: int = 0  # prefix-shared children's own caches grown (within a turn)
    unshared_tokens: int = 0  # shared-prefix tokens a child's target diverged from (prefilled on its own cache)
    shrinks: int = 0  # pools cut back to their initial length between batches

    def as_dict(self) -> dict:
        return {k: (round(v, 4) if isinstance(v, float) else v) for k, v in dataclasses.asdict(self).items()}

    def minus(self, other: "CacheStats") -> dict:
        a, b = dataclasses.asdict(self), dataclasses.asdict(other)
        return {k: (round(a[k] - b[k], 4) if isinstance(a[k], float) else a[k] - b[k]) for k in a}

    def copy(self) -> "CacheStats":
        return dataclasses.replace(self)


def _row_arrays(cfg: ModelConfig, per_row: Sequence[SamplingParams], max_new: Sequence[int],
                row_seeds: Sequence[int], room: Sequence[int]) -> dict[str, np.ndarray]:
    """Per-row settings as numpy arrays (what `sampler._row_settings` makes, keys derived on
    device): host arrays go into the jitted call as arguments, no eager transfer programs.
    room: the cache slots each row may fill (`SamplerState.room`)."""
    n = len(per_row)
    stop = np.full((n, S.MAX_STOP_IDS), -1, np.int32)
    out = {"max_new": np.asarray(max_new, np.int32), "min_new": np.zeros((n,), np.int32),
           "room": np.asarray(room, np.int32),
           "temperature": np.ones((n,), np.float32), "top_p": np.ones((n,), np.float32),
           "penalty": np.ones((n,), np.float32), "seeds": np.asarray([s % (1 << 32) for s in row_seeds], np.uint32)}
    for i, sp in enumerate(per_row):
        ids = S._stop_ids(cfg, sp)
        stop[i, : len(ids)] = ids
        out["min_new"][i] = sp.min_new_tokens
        out["temperature"][i] = sp.temperature if sp.temperature > 0 else 1.0
        out["top_p"][i], out["penalty"][i] = sp.top_p, sp.repetition_penalty
    out["stop_ids"] = stop
    return out


def _with_mesh(method):
    """Run a RowCache method with its params' mesh in context (`parallel.mesh_context`): its jitted
    calls shard by the constraints above; a null context for one device."""

    @functools.wraps(method)
    def wrapper(self, *args, **kwargs):
        with parallel.mesh_context(self.params):
            return method(self, *args, **kwargs)

    return wrapper


def _lcp(a: Sequence[int], b: Sequence[int]) -> int:
    n = min(len(a), len(b))
    i = 0
    while i < n and a[i] == b[i]:
        i += 1
    return i


@dataclasses.dataclass
class SharedPrefix:
    """The parent rows' cache arrays a prefix-shared RowCache's rows attend to, read-only: k/v
    [L, P, K, Sp, H]; row r's parent is row r // group (rows parent-major, R = P * group)."""

    k: jax.Array
    v: jax.Array
    group: int

    def arg(self, base: Sequence[int]) -> dict:
        """The model's `prefix` argument for rows sharing the first base[r] slots."""
        return {"k": self.k, "v": self.v, "base": np.asarray(base, np.int32)}


class RowCache:
    """R rows of a KV cache (device) and the token ids each row holds (host).

    With `params` on a mesh, the device work runs with that mesh in context and the cache is laid
    out by its logical axes (rows over the batch axes: R should be a multiple of their size, as
    `DialoguePool` makes it; kv heads over `tensor`).

    Prefix-shared rows (`prefix`, from `children`): row r attends to the first base[r] slots of
    its parent's row in the shared prefix (read in place) and holds only the rest of its tokens
    in its own cache: `ids[r]` is still everything the row represents, own slot s holds
    ids[r][base[r] + s], and `capacity` counts own slots. A target that diverges inside the prefix
    lowers base[r] to where it diverges and is prefilled from there on the row's own cache."""

    def __init__(self, cfg: ModelConfig, params, rows: int, *, limit: int, capacity: int,
                 stats: CacheStats | None = None, _arrays=None, prefix: SharedPrefix | None = None,
                 base: Sequence[int] | None = None):
        self.cfg, self.params, self.rows, self.limit = cfg, params, rows, int(limit)
        self.stats = stats if stats is not None else CacheStats()
        if _arrays is None:
            capacity = min(max(S.bucket(capacity), 1), self.limit)
            with parallel.mesh_context(params):
                self.cache, self.logits = empty(cfg, rows=rows, capacity=capacity)
        else:
            self.cache, self.logits = _arrays
        self.ids: list[list[int]] = [[] for _ in range(rows)]
        self.fresh = [False] * rows  # logits are those after the row's last id
        self.prefix = prefix
        self.base = list(base) if base is not None else [0] * rows  # ids each row reads from the prefix

    @property
    def capacity(self) -> int:
        return int(self.cache["segment_ids"].shape[1])

    def _prefix(self) -> dict | None:
        return None if self.prefix is None else self.prefix.arg(self.base)

    def _own(self, r: int) -> int:
        """Tokens row r holds in its own cache (its fill level on device)."""
        return len(self.ids[r]) - self.base[r]

    @_with_mesh
    def reserve(self, need: int) -> None:
        """Grow the cache length to hold `need` tokens per row (a power of two, at most `limit`)."""
        if need <= self.capacity or self.capacity >= self.limit:
            return
        self.cache = grow(self.cache, new_len=min(S.bucket(need), self.limit))
        if self.prefix is None:
            self.stats.grows += 1
        else:
            self.stats.child_grows += 1

    def reset(self, rows: Sequence[int]) -> None:
        for r in rows:
            self.ids[r], self.fresh[r], self.base[r] = [], False, 0

    @_with_mesh
    def take(self, idx: Sequence[int]) -> "RowCache":
        """A new RowCache whose row i is a copy of row idx[i] (fork when idx repeats rows). Of
        prefix-shared rows: their own slots copied, and a prefix of their parents' rows (G = 1)."""
        cache, logits = take_rows(self.cache, self.logits, np.asarray(idx, np.int32))
        prefix = None
        if self.prefix is not None:
            parents = np.asarray([i // self.prefix.group for i in idx], np.int32)
            prefix = SharedPrefix(*take_prefix(self.prefix.k, self.prefix.v, parents), group=1)
        out = RowCache(self.cfg, self.params, len(idx), limit=self.limit, capacity=self.capacity,
                       stats=self.stats, _arrays=(cache, logits), prefix=prefix, base=[self.base[i] for i in idx])
        out.ids = [list(self.ids[i]) for i in idx]
        out.fresh = [self.fresh[i] for i in idx]
        return out

    @_with_mesh
    def children(self, k: int, capacity: int) -> "RowCache":
        """k prefix-shared children per row (row r's are rows r*k .. r*k+k-1): each attends to this
        cache, read in place, and holds what it adds in its own cache of `capacity` slots (grown as
        it needs). This cache's arrays must stay as they are while the children live."""
        if self.prefix is not None:
            raise ValueError("RowCache.children: the rows already continue a shared prefix")
        capacity = min(S.bucket(capacity), self.limit)
        own, logits = spawn(self.cfg, self.logits, k=k, capacity=capacity)
        out = RowCache(self.cfg, self.params, self.rows * k, limit=self.limit, capacity=capacity, stats=self.stats,
                       _arrays=(own, logits), prefix=SharedPrefix(self.cache["k"], self.cache["v"], group=k),
                       base=[len(self.ids[r]) for r in range(self.rows) for _ in range(k)])
        out.ids = [list(self.ids[r]) for r in range(self.rows) for _ in range(k)]
        out.fresh = [self.fresh[r] for r in range(self.rows) for _ in range(k)]
        return out

    @_with_mesh
    def merge(self, idx: Sequence[int]) -> "RowCache":
        """A whole (not prefix-shared) RowCache whose row i holds prefix-shared row idx[i]: its
        parent's prefix slots, then its own (the chosen child becomes its dialogue's cache)."""
        if self.prefix is None:
            return self.take(idx)
        sp = int(self.prefix.k.shape[3])
        need = max(len(self.ids[i]) for i in idx)
        new_len = max(sp, min(S.bucket(need), self.limit))
        if new_len > sp:
            self.stats.grows += 1
        parents = np.asarray([i // self.prefix.group for i in idx], np.int32)
        cache, logits = merge_rows(self.prefix.k, self.prefix.v, self.cache, self.logits, np.asarray(idx, np.int32),
                                   parents, np.asarray([self.base[i] for i in idx], np.int32), new_len=new_len)
        out = RowCache(self.cfg, self.params, len(idx), limit=self.limit, capacity=new_len, stats=self.stats,
                       _arrays=(cache, logits))
        out.ids = [list(self.ids[i]) for i in idx]
        out.fresh = [self.fresh[i] for i in idx]
        return out

    @_with_mesh
    def sync(self, targets: dict[int, Sequence[int]], *, trim: bool = False) -> list[int]:
        """Make row r hold exactly targets[r] (fresh logits after its last token), prefilling only
        what it does not already hold. Returns the rows whose target does not fit (untouched).

        trim: the dropped tokens were decoded past a cut on purpose (latent blocks), counted as
        `trimmed_tokens`, not as rewinds."""
        full = [r for r, t in targets.items() if len(t) > self.limit]
        self.stats.cache_full += len(full)
        plan = {r: list(t) for r, t in targets.items() if r not in full}
        if not plan:
            return full
        for r, t in plan.items():
            if len(t) == 0:
                raise ValueError("sync: an empty target (a row needs at least one token)")
        starts, rests = {}, {}
        for r, t in plan.items():
            held = self.ids[r]
            n = _lcp(held, t)
            if n == len(t) and n == len(held) and self.fresh[r]:
                continue  # nothing to do
            if n == len(t):
                n -= 1  # recompute the last token: its logits are needed
            dropped = len(held) - n
            if dropped > 0 and not (n == len(t) - 1 and len(held) == len(t)):
                if trim:
                    self.stats.trimmed_tokens += dropped
                else:
                    self.stats.rewinds += 1
                    self.stats.rewound_tokens += dropped
            if n < self.base[r]:  # diverges inside the shared prefix: from there on, its own
                self.stats.unshared_tokens += self.base[r] - n
                self.base[r] = n
            starts[r], rests[r] = n - self.base[r], t[n:]
            self.stats.reused_tokens += n
        if not rests:
            return full
        self.reserve(max(len(t) - self.base[r] for r, t in plan.items()))
        longest = max(len(x) for x in rests.values())
        width = min(next((w for w in CHUNK_WIDTHS if w >= longest), CHUNK_WIDTHS[-1]), self.capacity)
        t0 = time.perf_counter()
        done = 0
        while done < longest:
            toks = np.zeros((self.rows, width), np.int32)
            lens = np.zeros((self.rows,), np.int32)
            start = np.asarray([self._own(r) for r in range(self.rows)], np.int32)  # untouched rows: their end
            for r, rest in rests.items():
                piece = rest[done: done + width]
                toks[r, : len(piece)] = piece
                lens[r] = len(piece)
                start[r] = starts[r] + min(done, len(rest))
            self.cache, self.logits = extend(self.cfg, self.params, self.cache, self.logits, toks, lens, start,
                                             self._prefix())
            self.stats.prefill_calls += 1
            done += width
        self.logits.block_until_ready()
        self.stats.prefill_seconds += time.perf_counter() - t0
        for r, rest in rests.items():
            self.stats.prefill_tokens += len(rest)
        for r, t in plan.items():
            self.ids[r], self.fresh[r] = t, True
        return full

    @_with_mesh
    def generate(self, settings: dict[int, SamplingParams], *, seed: int, row_seeds: dict[int, int] | None = None
                 ) -> dict[int, tuple[list[int], str]]:
        """Decode the given rows (each must be fresh) with their settings; the others stay as they
        are. Returns {row: (tokens, finish_reason)}; a generated token is in the cache except each
        row's last one."""
        if not settings:
            return {}
        for r in settings:
            if not self.fresh[r]:
                raise RuntimeError(f"row {r}: sync it before generating (its logits are stale)")
        any_sp = next(iter(settings.values()))
        per_row = [settings.get(r, any_sp) for r in range(self.rows)]
        mx = [settings[r].max_new_tokens if r in settings else 0 for r in range(self.rows)]
        proc = Processing.of(list(settings.values()), self.cfg.vocab_size)
        self.reserve(max(self._own(r) + mx[r] for r in settings))
        n = parallel.pad_rows(S.bucket(len(settings)))
        if 2 * n <= self.rows:
            return self._generate_compact(settings, n, seed=seed, row_seeds=row_seeds)
        seeds = [(row_seeds or {}).get(r, r) for r in range(self.rows)]
        # a row never holds more than `limit` tokens, its shared prefix included
        rows = _row_arrays(self.cfg, per_row, mx, seeds, [self.limit - b for b in self.base])
        if proc.repetition_penalty:
            width = self.capacity + (0 if self.prefix is None else int(self.prefix.k.shape[3]))
            hist = np.full((self.rows, width), -1, np.int32)
            for r in settings:
                hist[r, : len(self.ids[r])] = self.ids[r]
        else:
            hist = np.zeros((self.rows, 1), np.int32)
        new_len = S.bucket(max(mx), 16)
        t0 = time.perf_counter()
        self.cache, toks, length, reason = decode_rows(self.cfg, proc, self.params, self.cache, self.logits,
                                                       hist, rows, np.uint32(seed % (1 << 32)), self._prefix(),
                                                       new_len=new_len)
        toks, length, reason = jax.device_get((toks, length, reason))
        self.stats.decode_seconds += time.perf_counter() - t0
        self.stats.decode_calls += 1
        out = {}
        for r in settings:
            ln = int(length[r])
            got = toks[r, :ln].tolist()
            out[r] = (got, S.REASONS[int(reason[r])])
            self.ids[r] = self.ids[r] + got[: max(ln - 1, 0)]
            self.fresh[r] = ln == 0
        return out

    def _generate_compact(self, settings: dict[int, SamplingParams], n: int, *, seed: int,
                          row_seeds: dict[int, int] | None) -> dict[int, tuple[list[int], str]]:
        """Decode a few rows of many (resampled duplicates, one side of a turn) on a copy of just
        those rows (n, a row bucket), then put them back: every decode step computes only them.
        The row seeds stay those of the rows, so the tokens are the same as decoding in place."""
        active = sorted(settings)
        sub = self.take(active + [active[0]] * (n - len(active)))
        seeds = row_seeds or {}
        got = sub.generate({i: settings[r] for i, r in enumerate(active)}, seed=seed,
                           row_seeds={i: seeds.get(r, r) for i, r in enumerate(active)})
        idx = np.asarray(active + [self.rows] * (n - len(active)), np.int32)  # padding rows: dropped
        self.cache, self.logits = put_rows(self.cache, self.logits, sub.cache, sub.logits, idx)
        for i, r in enumerate(active):
            self.ids[r], self.fresh[r] = sub.ids[i], sub.fresh[i]
        return {r: got[i] for i, r in enumerate(active)}


class DialoguePool:
    """Cache rows for the live dialogues of one policy, reused across batches."""

    def __init__(self, policy: Policy, rows: int, *, max_cache_len: int | None = None, cache_len: int = MIN_CACHE,
                 stats: CacheStats | None = None, shared_prefix: bool = True, child_cache_len: int = CHILD_CACHE):
        self.policy = policy
        self.shared_prefix, self.child_cache_len = shared_prefix, child_cache_len
        with parallel.mesh_context(policy.params):  # rows: a multiple of the mesh's row split
            self.rows = parallel.pad_rows(S.bucket(rows))
        self.limit = int(max_cache_len or policy.cfg.max_position_embeddings)
        self.stats = stats if stats is not None else CacheStats()
        self.cache = RowCache(policy.cfg, policy.params, self.rows, limit=self.limit,
                              capacity=max(cache_len, MIN_CACHE), stats=self.stats)
        self.initial_capacity = self.cache.capacity  # grown as dialogues grow, back to this between batches
        self.allocations = 1
        self.row_of: dict[Hashable, int] = {}
        self.free = list(range(self.rows))
        self.children: RowCache | None = None
        self.k = 0
        self.rows_used: list[int] = []  # every row handed out, in order (tests: reuse)

    def acquire(self, keys: Sequence[Hashable]) -> None:
        for key in keys:
            if key in self.row_of:
                continue
            if not self.free:
                raise RuntimeError(f"DialoguePool: all {self.rows} rows are in use")
            r = self.free.pop(0)
            self.row_of[key] = r
            self.rows_used.append(r)
            self.cache.reset([r])

    def release(self, keys: Sequence[Hashable]) -> None:
        if self.children is not None:  # forked but not committed: rebuild the parent rows
            self.commit({})
        for key in keys:
            r = self.row_of.pop(key, None)
            if r is not None:
                self.free.append(r)
                self.free.sort()
        if not self.row_of and self.cache.capacity > self.initial_capacity:
            # every row free: the next batch starts short again (each step reads the whole length)
            with parallel.mesh_context(self.policy.params):
                self.cache.cache = shrink(self.cache.cache, new_len=self.initial_capacity)
            self.cache.reset(range(self.rows))
            self.stats.shrinks += 1

    def sync(self, targets: dict[Hashable, Sequence[int]]) -> list[Hashable]:
        """Bring each dialogue's cache to its encoding; returns the keys that do not fit."""
        if self.cache.cache is None:
            raise RuntimeError("DialoguePool: commit(chosen) the forked children first")
        self.acquire(list(targets))
        full = self.cache.sync({self.row_of[k]: t for k, t in targets.items()})
        inv = {r: k for k, r in self.row_of.items()}
        return [inv[r] for r in full]

    def generate(self, settings: dict[Hashable, SamplingParams], *, seed: int) -> dict[Hashable, tuple[list[int], str]]:
        got = self.cache.generate({self.row_of[k]: sp for k, sp in settings.items()}, seed=seed,
                                  row_seeds={self.row_of[k]: i for i, k in enumerate(settings)})
        inv = {r: k for k, r in self.row_of.items()}
        return {inv[r]: v for r, v in got.items()}

    def fork(self, k: int) -> RowCache:
        """k child rows per row (row r's children are rows r*k .. r*k+k-1). Prefix-shared (the
        default): the children read the parent rows in place as their shared prefix and hold what
        they add in small caches of their own (`RowCache.children`); else each child is a copy of
        its parent row. Until `commit` the pool's cache is the children's (the parent arrays live
        on only as their prefix)."""
        if self.shared_prefix:
            self.children = self.cache.children(k, self.child_cache_len)
        else:
            self.children = self.cache.take([r for r in range(self.rows) for _ in range(k)])
        self.cache.cache = self.cache.logits = None
        self.k = k
        self.stats.forks += 1
        return self.children

    def child(self, key: Hashable, j: int) -> int:
        return self.row_of[key] * self.k + j

    def commit(self, chosen: dict[Hashable, int | tuple[Hashable, int]]) -> None:
        """The chosen child's cache becomes its dialogue's cache: chosen[key] = j (the key's own
        child j) or (src_key, j) (child j of another dialogue: a beam that continues from another
        beam's child; a new key is given a row). Other rows get their first child, an unchanged
        copy when the row did not branch."""
        if self.children is None:
            raise RuntimeError("commit without fork")
        self.acquire([key for key in chosen if key not in self.row_of])
        idx = [r * self.k for r in range(self.rows)]
        for key, c in chosen.items():
            src, j = (key, c) if isinstance(c, int) else c
            idx[self.row_of[key]] = self.row_of[src] * self.k + j
        self.cache = self.children.merge(idx)  # prefix-shared: parent's prefix + the child's own slots
        self.children = None

    def assign(self, sources: dict[Hashable, Hashable]) -> None:
        """Row of key becomes a copy of the row of sources[key] (beams: a new beam inherits its
        parent's cache on this side; a new key is given a row)."""
        if self.children is not None:
            raise RuntimeError("DialoguePool: commit(chosen) the forked children first")
        self.acquire([key for key in sources if key not in self.row_of])
        idx = list(range(self.rows))
        for key, src in sources.items():
            idx[self.row_of[key]] = self.row_of[src]
        if idx != list(range(self.rows)):
            self.cache = self.cache.take(idx)


# ---------------------------------------------------------------------------------------------
# Branching: K children per dialogue on the shared cache


def _block_stop_ids(policy: Policy, close: str, max_ids: int = S.MAX_STOP_IDS - 2) -> tuple[int, ...]:
    """Token ids that end a latent block (close the delimiter) as the tokenizer writes it."""
    tok = policy.tokenizer
    ids: list[int] = []
    for probe in ("]" + close, close, " " + close, "null" + close, "a" + close, "] " + close):
        enc = tok(probe, add_special_tokens=False)["input_ids"]
        for t in enc:
            if close in tok.decode([t]) and t not in ids:
                ids.append(t)
    return tuple(ids[:max_ids])


def _eos_ids(policy: Policy) -> tuple[int, ...]:
    eos = policy.cfg.eos_token_id
    return () if eos is None else ((eos,) if isinstance(eos, int) else tuple(eos))


def _cut_block(text: str, close: str) -> tuple[str, bool]:
    """Text up to and including the first `close` (and whether there was one)."""
    i = text.find(close)
    return (text, False) if i < 0 else (text[: i + len(close)], True)


def _action_key(action: Latent | None, raw: str) -> str:
    if action is None:
        return "raw:" + " ".join(raw.split()).lower()
    return "|".join([(action.motivation or "").lower(), (action.emotion or "").lower(),
                     ",".join(t.lower() for t in action.topic)])


def action_key(action: Latent | None, raw: str = "") -> str:
    """What makes two actions the same: their parsed fields (case-folded), else the raw text."""
    return _action_key(action, raw)


def duplicates(keys: dict[Hashable, Sequence[str]]) -> list[tuple[Hashable, int]]:
    """(dialogue, child) pairs whose action repeats an earlier sibling's: the ones to resample."""
    out = []
    for d, ks in keys.items():
        seen = set()
        for j, key in enumerate(ks):
            if key in seen:
                out.append((d, j))
            seen.add(key)
    return out


@dataclasses.dataclass
class BranchConfig:
    mode: str = "latent"  # latent | enumerate | sample
    k: int = 4
    latent_max_new_tokens: int = 48
    action_tries: int = 3  # extra rounds resampling duplicate actions (latent mode)
    vocabulary: Sequence[str] = ()  # enumerate: the closed a_motivation values
    schema: Schema = DEFAULT_SCHEMA


def pinned_children(keys: Sequence[Hashable], prefix_text: dict, bc: BranchConfig, seed: int):
    """enumerate: K distinct a_motivation values of the closed vocabulary per dialogue, pinned
    after its state block. Returns (children per dialogue, each child's prefill, extra fields)."""
    d = bc.schema.delimiters(False)
    rng = random.Random(seed)
    values = list(bc.vocabulary)
    n_children, child_prefill, extra = {}, {}, {}
    for key in keys:
        chosen = rng.sample(values, min(bc.k, len(values)))
        n_children[key] = len(chosen)
        for j, v in enumerate(chosen):
            child_prefill[key, j] = (f"{prefix_text[key]}{d.block_sep}{{a_motivation: "
                                     f"{bc.schema.format_value(v)}, a_emotion:")
            extra[key, j] = {"pinned": {"a_motivation": v}}
    return n_children, child_prefill, extra


def action_block(prefix: str, raw: str, bc: BranchConfig) -> tuple[str, str]:
    """(the sampled action block as the child continues it, the key duplicates are found by): a
    closed block is parsed and rendered canonically, anything else stays raw text."""
    d = bc.schema.delimiters(False)
    raw, closed = _cut_block(raw, d.action_close)
    action = parse_assistant_lenient(prefix + d.block_sep + raw.lstrip() + " x", bc.schema).action if closed else None
    text = (d.block_sep + render_latent(action, "assistant", bc.schema)) if action is not None else raw
    return text, _action_key(action, raw)


def distinct_actions(sample, keys: Sequence[Hashable], bc: BranchConfig) -> dict:
    """K action keys per dialogue from `sample(pairs) -> {(dialogue, child): key}`, duplicates
    resampled (all dialogues together) for up to `action_tries` rounds."""
    akeys = sample([(key, j) for key in keys for j in range(bc.k)])
    for _ in range(bc.action_tries):
        dup = duplicates({key: [akeys[key, j] for j in range(bc.k)] for key in keys})
        if not dup:
            break
        akeys.update(sample(dup))
    return akeys


def branch(policy: Policy, pool: DialoguePool, views: dict[Hashable, list[dict]], sp: SamplingParams,
           bc: BranchConfig, seed: int) -> dict[Hashable, list[dict] | None]:
    """K candidate assistant messages per dialogue ({"content", "finish_reason", ...}), decoded
    on the dialogue's cache; None for a dialogue whose history does not fit the cache. The
    children stay in `pool.children` until `pool.commit(chosen)`."""
    targets = {key: policy.encode_chat(v) for key, v in views.items()}
    full = set(pool.sync(targets))
    live = [key for key in views if key not in full]
    out: dict[Hashable, list[dict] | None] = {key: None for key in full}
    eos = _eos_ids(policy)
    reply_sp = sp.replace(stop_token_ids=eos, stop_strings=())
    d = bc.schema.delimiters(False)
    prefix_text: dict[Hashable, str] = {key: "" for key in live}
    if bc.mode in ("latent", "enumerate") and live:
        state_sp = SamplingParams.greedy_params(bc.latent_max_new_tokens,
                                                stop_token_ids=eos + _block_stop_ids(policy, d.state_close))
        got = pool.generate({key: state_sp for key in live}, seed=seed)
        for key in live:
            raw = policy.decode(got[key][0]).lstrip()
            cut, _ = _cut_block(raw, d.state_close)
            state = parse_assistant_lenient(cut + " x", bc.schema).state
            # Canonical rendering, so every child shares exactly this state; a state the model did
            # not produce is all-null (recorded as such in the tree).
            prefix_text[key] = render_latent(state if state is not None else Latent(), "user", bc.schema)
        pool.cache.sync({pool.row_of[key]: policy.encode_chat(views[key], prefill=prefix_text[key]) for key in live},
                        trim=True)
    kids = pool.fork(bc.k)
    state_targets = {key: kids.ids[pool.child(key, 0)] for key in live}
    child_prefill: dict[tuple, str] = {}
    extra: dict[tuple, dict] = {}
    n_children = {key: bc.k for key in live}
    if bc.mode == "sample":
        for key in live:
            for j in range(bc.k):
                child_prefill[key, j] = ""
    elif bc.mode == "enumerate":
        n_children, child_prefill, extra = pinned_children(live, prefix_text, bc, seed)
        kids.sync({pool.child(key, j): policy.encode_chat(views[key], prefill=child_prefill[key, j])
                   for key in live for j in range(n_children[key])})
    elif bc.mode == "latent":
        act_sp = sp.replace(max_new_tokens=bc.latent_max_new_tokens,
                            stop_token_ids=eos + _block_stop_ids(policy, d.action_close), stop_strings=())
        texts: dict[tuple, str] = {}
        round_no = [0]

        def sample(pairs: list[tuple]) -> dict[tuple, str]:
            rows = {pool.child(key, j): (key, j) for key, j in pairs}
            kids.sync({r: state_targets[key] for r, (key, j) in rows.items()}, trim=True)
            got = kids.generate({r: act_sp for r in rows}, seed=seed + 7919 * round_no[0],
                                row_seeds={r: r + kids.rows * round_no[0] for r in rows})
            round_no[0] += 1
            keys = {}
            for r, (key, j) in rows.items():
                texts[key, j], keys[key, j] = action_block(prefix_text[key], policy.decode(got[r][0]), bc)
            return keys

        distinct_actions(sample, live, bc)
        for key in live:
            for j in range(bc.k):
                child_prefill[key, j] = prefix_text[key] + texts[key, j]
        kids.sync({pool.child(key, j): policy.encode_chat(views[key], prefill=child_prefill[key, j])
                   for key in live for j in range(bc.k)}, trim=True)
    else:
        raise ValueError(f"branching: unknown mode {bc.mode!r} (latent, enumerate or sample)")
    rows = {pool.child(key, j): (key, j) for key in live for j in range(n_children[key])}
    got = kids.generate({r: reply_sp for r in rows}, seed=seed + 1,
                        row_seeds={r: r for r in rows})
    for key in live:
        cands = []
        for j in range(n_children[key]):
            toks, reason = got[pool.child(key, j)]
            c = {"content": child_prefill[key, j] + policy.decode(toks), "finish_reason": reason, "tokens": toks}
            c.update(extra.get((key, j), {}))
            cands.append(c)
        out[key] = cands
    return out
