"""Mixtral's top-k mixture of experts, three ways to compute the same function.

Routing (all three): softmax over the router logits, the top k renormalised (HF Mixtral).

- ``dense``: every expert on every token, combined by the (mostly zero) routing weights. Exact,
  no gathers, shards over the ``expert`` axis with one reduction; E/k times the routed FLOPs.
- ``ragged``: the token-expert assignments sorted by expert and run through
  ``jax.lax.ragged_dot`` (grouped matmul: the MegaBlox kernel on TPU, XLA's on GPU); only routed
  FLOPs. On CPU XLA lowers ragged_dot to a masked dense product (E times the work): use ``blocks``.
- ``blocks``: the sorted assignments padded per expert to a multiple of ``block`` rows (a static
  bound: N k + E (block - 1) rows, so nothing is ever dropped), then a scan over blocks, each a
  plain matmul with its one expert's weights: routed FLOPs plus at most E - 1 padding blocks, fast
  wherever dense matmuls are (the CPU).

All three are exact (no capacity factor, no dropped tokens) and differentiable; tests check logits
and gradients against ``dense``. ``ModelConfig.moe_dispatch`` picks one ("auto": ragged on TPU/GPU,
blocks on CPU).
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

__all__ = ["DISPATCHES", "moe", "resolve_dispatch", "route"]

DISPATCHES = ("auto", "dense", "ragged", "blocks")
BLOCK = 64  # rows per block of the `blocks` dispatch


def resolve_dispatch(dispatch: str, platform: str | None = None) -> str:
    """``auto`` -> ``ragged`` on accelerators (a real grouped-matmul kernel), ``blocks`` on CPU."""
    if dispatch not in DISPATCHES:
        raise ValueError(f"moe_dispatch must be one of {DISPATCHES}, got {dispatch!r}")
    if dispatch != "auto":
        return dispatch
    platform = platform or jax.default_backend()
    return "blocks" if platform == "cpu" else "ragged"


def route(x: jax.Array, router: jax.Array, k: int) -> tuple[jax.Array, jax.Array]:
    """Top-k routing weights (renormalised, float32) and expert ids, both [..., k]."""
    logits = jnp.einsum("...d,de->...e", x, router).astype(jnp.float32)
    top_w, top_i = jax.lax.top_k(jax.nn.softmax(logits, axis=-1), k)
    return top_w / jnp.sum(top_w, axis=-1, keepdims=True), top_i


def _dense(x, top_w, top_i, gate, up, down):
    experts = jnp.arange(gate.shape[0])
    combine = jnp.sum(jnp.where(top_i[..., None] == experts, top_w[..., None], 0.0), axis=-2)  # [N, E]
    h = jax.nn.silu(jnp.einsum("nd,edf->nef", x, gate)) * jnp.einsum("nd,edf->nef", x, up)
    out = jnp.einsum("nef,efd->ned", h, down)
    return jnp.einsum("ned,ne->nd", out.astype(jnp.float32), combine)


def _sorted_assignments(top_i: jax.Array, num_experts: int):
    """(order, token, group_sizes): the N k assignments sorted by expert (stable), the token each
    came from, and the number of assignments per expert."""
    flat = top_i.reshape(-1)
    order = jnp.argsort(flat, stable=True)
    token = order // top_i.shape[-1]
    sizes = jnp.bincount(flat, length=num_experts).astype(jnp.int32)
    return order, token, sizes


def _ragged(x, top_w, top_i, gate, up, down):
    order, token, sizes = _sorted_assignments(top_i, gate.shape[0])
    xs = x[token]
    h = jax.nn.silu(jax.lax.ragged_dot(xs, gate, sizes)) * jax.lax.ragged_dot(xs, up, sizes)
    y = jax.lax.ragged_dot(h, down, sizes).astype(jnp.float32)
    w = top_w.reshape(-1)[order]
    return jnp.zeros((x.shape[0], x.shape[1]), jnp.float32).at[token].add(y * w[:, None])


def _blocks(x, top_w, top_i, gate, up, down, block: int = BLOCK):
    n, d = x.shape
    e = gate.shape[0]
    order, token, sizes = _sorted_assignments(top_i, e)
    # Each expert's run of sorted assignments starts on a block boundary of the padded layout.
    padded = (sizes + block - 1) // block * block
    pad_start = jnp.cumsum(padded) - padded
    run_start = jnp.cumsum(sizes) - sizes
    expert_of = top_i.reshape(-1)[order]  # expert of each sorted assignment (no second sort)
    slot = pad_start[expert_of] + jnp.arange(order.shape[0]) - run_start[expert_of]
    num_blocks = (order.shape[0] + e * (block - 1) + block - 1) // block  # static bound
    rows = num_blocks * block
    xs = jnp.zeros((rows, d), x.dtype).at[slot].set(x[token])
    ws = jnp.zeros((rows,), jnp.float32).at[slot].set(top_w.reshape(-1)[order])
    # A block's expert: the last expert whose padded run starts at or before it (empty experts
    # have zero-length runs and are skipped by side="right").
    block_expert = jnp.searchsorted(pad_start, jnp.arange(num_blocks) * block, side="right") - 1
    block_expert = jnp.clip(block_expert, 0, e - 1)

    def one(_, xs_b):
        xb, ex = xs_b
        h = jax.nn.silu(xb @ gate[ex]) * (xb @ up[ex])
        return None, h @ down[ex]

    _, ys = jax.lax.scan(one, None, (xs.reshape(num_blocks, block, d), block_expert))
    ys = ys.reshape(rows, d).astype(jnp.float32) * ws[:, None]  # padding rows carry weight 0
    src = jnp.full((rows,), n, jnp.int32).at[slot].set(token)  # padding rows: out of range, dropped
    return jnp.zeros((n, d), jnp.float32).at[src].add(ys, mode="drop")


_IMPLS = {"dense": _dense, "ragged": _ragged, "blocks": _blocks}


def moe(x: jax.Array, router: jax.Array, gate: jax.Array, up: jax.Array, down: jax.Array, *, k: int,
        dispatch: str = "dense") -> jax.Array:
    """x [..., D] through the top-k SwiGLU experts (gate/up [E, D, F], down [E, F, D]) -> [..., D]."""
    shape = x.shape
    xf = x.reshape(-1, shape[-1])
    top_w, top_i = route(xf, router, k)
    out = _IMPLS[resolve_dispatch(dispatch)](xf, top_w, top_i, gate, up, down)
    return out.astype(x.dtype).reshape(shape)
