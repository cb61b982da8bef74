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

- ``expert_parallel``: explicit expert parallelism over the ``expert`` mesh axis (shard_map over
  the mesh in context, ``jax.set_mesh``): each device holds E/ep experts' weights; its tokens (the
  batch over data x fsdp, split a further ep ways over ``expert``) are routed, their rows sent to
  the devices owning their experts with ``all_to_all``, run through the local experts with
  ``ragged`` (TPU/GPU) or ``blocks`` (CPU), sent back with ``all_to_all`` and combined by router
  weight; an ``all_gather`` over ``expert`` restores the token layout. With ``mlp`` sharded over
  ``tensor``, each expert is tensor-parallel too (a psum over ``tensor``).

All four are exact (no capacity factor, no dropped tokens) and differentiable; tests check logits
and gradients against ``dense``. ``ModelConfig.moe_dispatch`` picks one. ``auto``:
``expert_parallel`` when a mesh in context has ``expert`` > 1 (not manual) dividing E, else ragged
on TPU/GPU and blocks on CPU (GSPMD then places the computation as the shardings say).
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
from jax.sharding import AxisType, PartitionSpec as P

from sage_jax.parallel.rules import DEFAULT_RULES, logical_to_spec

__all__ = ["DISPATCHES", "EXPERT_AXIS", "expert_parallel_buffer_rows", "moe", "resolve_dispatch", "route"]

DISPATCHES = ("auto", "dense", "ragged", "blocks", "expert_parallel")
EXPERT_AXIS = "expert"  # the mesh axis the experts are split over (the `expert` rule's)
BLOCK = 64  # rows per block of the `blocks` dispatch


def _expert_mesh(num_experts: int | None):
    """(mesh in context, ep) when expert parallelism can run on it, else (None, reason)."""
    mesh = jax.sharding.get_abstract_mesh()
    if mesh.empty or EXPERT_AXIS not in mesh.axis_names:
        return None, "no mesh with an `expert` axis in context (jax.set_mesh)"
    ep = mesh.shape[EXPERT_AXIS]
    if ep == 1:
        return None, "the mesh in context has expert=1"
    if dict(zip(mesh.axis_names, mesh.axis_types))[EXPERT_AXIS] == AxisType.Manual:
        return None, "the `expert` axis is already manual (inside a shard_map)"
    if num_experts is not None and num_experts % ep:
        return None, f"{num_experts} experts do not divide over expert={ep}"
    return mesh, ep


def resolve_dispatch(dispatch: str, platform: str | None = None, num_experts: int | None = None) -> str:
    """``auto`` -> ``expert_parallel`` under a mesh with expert > 1 dividing the experts, else
    ``ragged`` on accelerators (a real grouped-matmul kernel), ``blocks`` on CPU."""
    if dispatch not in DISPATCHES:
        raise ValueError(f"moe_dispatch must be one of {DISPATCHES}, got {dispatch!r}")
    if dispatch != "auto":
        return dispatch
    if _expert_mesh(num_experts)[0] is not None:
        return "expert_parallel"
    return _local_impl(platform)


def _local_impl(platform: str | None = None) -> str:
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


def expert_parallel_buffer_rows(tokens: int, k: int, num_experts: int, ep: int) -> int:
    """Rows of each all_to_all buffer per device: ep slots of tokens * min(k, E/ep) rows.

    A token's k experts are distinct, so it sends at most min(k, E/ep) rows to any one device:
    the bound holds even when every token picks the same device's experts (nothing dropped). The
    routed rows are tokens * k, so the buffers cost ep * min(k, E/ep) / k times them (Mixtral,
    E=8, k=2 over ep=4: 4x), twice (send and receive) plus the returned outputs."""
    return ep * tokens * min(k, num_experts // ep)


def _expert_parallel(x, router, gate, up, down, *, k: int, mesh, ep: int, impl: str):
    """x [B, ..., D] -> float32 [B, ..., D] under shard_map (see the module docstring)."""
    e = gate.shape[0]
    e_local = e // ep
    batch_spec = logical_to_spec(("batch",) + (None,) * (x.ndim - 1), x.shape, mesh)
    batch_axes = batch_spec[0] if isinstance(batch_spec[0], tuple) else (batch_spec[0],) if batch_spec[0] else ()
    if EXPERT_AXIS in batch_axes:
        raise ValueError("expert_parallel: the `batch` rule must not use the `expert` mesh axis")
    w_in = logical_to_spec((EXPERT_AXIS, None, "mlp"), gate.shape, mesh)
    w_out = logical_to_spec((EXPERT_AXIS, "mlp", None), down.shape, mesh)
    mlp_axes = w_in[2] if isinstance(w_in[2], tuple) else (w_in[2],) if w_in[2] else ()

    def body(x, router, gate, up, down):
        shape = x.shape
        xf = x.reshape(-1, shape[-1])
        # This device's share of the tokens its expert group holds in common: pad to ep slices.
        n_all = xf.shape[0]
        n = -(-n_all // ep)
        me = jax.lax.axis_index(EXPERT_AXIS)
        xf = jnp.pad(xf, ((0, n * ep - n_all), (0, 0)))
        xs = jax.lax.dynamic_slice_in_dim(xf, me * n, n)
        top_w, top_i = route(xs, router, k)  # [n, k]
        # Slot of each assignment in its destination's buffer: its rank among those going there.
        dest, local = top_i.reshape(-1) // e_local, top_i.reshape(-1) % e_local
        onehot = (dest[:, None] == jnp.arange(ep)).astype(jnp.int32)
        pos = jnp.sum((jnp.cumsum(onehot, axis=0) - 1) * onehot, axis=1)
        cap = n * min(k, e_local)  # rows per destination: nothing can overflow (see buffer_rows)
        token = jnp.arange(n * k) // k
        send_x = jnp.zeros((ep, cap, xs.shape[1]), xs.dtype).at[dest, pos].set(xs[token])
        send_id = jnp.full((ep, cap), e_local, jnp.int32).at[dest, pos].set(local)
        recv_x = jax.lax.all_to_all(send_x, EXPERT_AXIS, 0, 0)
        recv_id = jax.lax.all_to_all(send_id, EXPERT_AXIS, 0, 0).reshape(-1)
        # Empty slots (id e_local) run through expert e_local - 1 with weight 0: exact zeros.
        valid = (recv_id < e_local).astype(jnp.float32)[:, None]
        y = _IMPLS[impl](recv_x.reshape(ep * cap, -1), valid, jnp.minimum(recv_id, e_local - 1)[:, None],
                         gate, up, down)
        if mlp_axes:  # each expert's F split over `tensor`: partial sums
            y = jax.lax.psum(y, mlp_axes)
        back = jax.lax.all_to_all(y.reshape(ep, cap, -1), EXPERT_AXIS, 0, 0)
        out = jnp.zeros((n, xs.shape[1]), jnp.float32).at[token].add(back[dest, pos] * top_w.reshape(-1, 1))
        out = jax.lax.all_gather(out, EXPERT_AXIS, tiled=True)[:n_all]
        return out.reshape(shape)

    return jax.shard_map(body, mesh=mesh, in_specs=(batch_spec, P(), w_in, w_in, w_out), out_specs=batch_spec,
                         check_vma=False)(x, router, gate, up, down)


def moe(x: jax.Array, router: jax.Array, gate: jax.Array, up: jax.Array, down: jax.Array, *, k: int,
        dispatch: str = "dense", local_dispatch: str | None = None) -> jax.Array:
    """x [..., D] through the top-k SwiGLU experts (gate/up [E, D, F], down [E, F, D]) -> [..., D].

    For ``expert_parallel`` the leading dimension of x is the batch (sharded over data x fsdp), and
    ``local_dispatch`` (dense | ragged | blocks; None: by platform) runs each device's experts."""
    dispatch = resolve_dispatch(dispatch, num_experts=gate.shape[0])
    if dispatch == "expert_parallel":
        if local_dispatch not in (None, *_IMPLS):
            raise ValueError(f"local_dispatch must be one of {tuple(_IMPLS)} or None, got {local_dispatch!r}")
        mesh, ep = _expert_mesh(gate.shape[0])
        if mesh is None:
            raise ValueError(f"moe_dispatch='expert_parallel' cannot run: {ep}")
        return _expert_parallel(x, router, gate, up, down, k=k, mesh=mesh, ep=ep,
                                impl=local_dispatch or _local_impl()).astype(x.dtype)
    shape = x.shape
    xf = x.reshape(-1, shape[-1])
    top_w, top_i = route(xf, router, k)
    out = _IMPLS[dispatch](xf, top_w, top_i, gate, up, down)
    return out.astype(x.dtype).reshape(shape)
