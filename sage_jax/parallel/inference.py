"""Sharded inference: the mesh an inference call runs on, activation constraints, row padding.

Inference (the sampler, beam search, search, serve, the ``local:`` judge, eval) is laid out like
training: parameters placed by the rule table (`shard_params`), dialogues (rows) over the
``batch`` rule's mesh axes, KV caches by their logical axes. The host-side entry points
(`rollout.generate`, `rollout.beam_search`, ...) look at the parameters they are given: when
they live on a mesh of more than one device, the call runs with that mesh in context
(`params_mesh` / `mesh_context`), so

- `constrain(x, logical)` inside the jitted functions becomes a sharding constraint (it is a
  no-op without a mesh in context, e.g. in training steps, which pass explicit shardings);
- the row bucket is padded to a multiple of the batch axes' size (`row_multiple`).

jit's cache is keyed on the mesh in context, so a sharded and an unsharded call never share a
compiled program. Nothing here knows the model: callers pass logical axis names.

Multi-host inference (search): each process lays its *own* devices out as a mesh
(`inference_mesh(cfg, devices=jax.local_devices())`) and works on its share of the items; no
collective crosses processes.
"""

from __future__ import annotations

import contextlib
import dataclasses
from typing import Any, Sequence

import jax
import numpy as np
from jax.sharding import Mesh, NamedSharding

from sage_jax.parallel.mesh import MeshConfig, make_mesh
from sage_jax.parallel.rules import DEFAULT_RULES, Rules, logical_to_spec, tree_shardings

# The inference default: one device, i.e. no sharding at all (`mesh.*` overrides lay it out).
SINGLE_DEVICE = MeshConfig(data=1, fsdp=1, tensor=1, expert=1)


def inference_mesh(cfg: MeshConfig | Mesh | None, devices: Sequence | None = None) -> Mesh | None:
    """The mesh for an inference config, or None for one device (nothing to shard).

    Unlike training (whose default spreads `fsdp` over all devices), a MeshConfig without a -1
    axis and without `num_devices` uses the first data*fsdp*tensor*expert devices: the default
    `SINGLE_DEVICE` is one device; `mesh.data=4 mesh.tensor=2` is 8. `devices` defaults to this
    process's own devices (multi-host inference shards within a host).
    """
    if cfg is None or isinstance(cfg, Mesh):
        return None if cfg is None or cfg.size == 1 else cfg
    devices = list(devices if devices is not None else jax.local_devices())
    dims = (cfg.data, cfg.fsdp, cfg.tensor, cfg.expert)
    if cfg.num_devices is None and -1 not in dims:
        cfg = dataclasses.replace(cfg, num_devices=int(np.prod(dims)))
    mesh = make_mesh(cfg, devices=devices)
    return None if mesh.size == 1 else mesh


def place_params(axes: Any, params: Any, mesh: MeshConfig | Mesh | None, rules: Rules = DEFAULT_RULES) -> Any:
    """`params` laid out on the inference mesh (unchanged for one device)."""
    m = inference_mesh(mesh)
    if m is None:
        return params
    return jax.tree.map(jax.device_put, params, tree_shardings(axes, params, m, rules))


def params_mesh(params: Any) -> Mesh | None:
    """The mesh the parameters are laid out on (None: one device, or not on a mesh)."""
    for leaf in jax.tree.leaves(params):
        sharding = getattr(leaf, "sharding", None)
        if isinstance(sharding, NamedSharding) and isinstance(sharding.mesh, Mesh):
            return sharding.mesh if sharding.mesh.size > 1 else None
        return None
    return None


def mesh_context(params: Any):
    """A context with the parameters' mesh set (`jax.set_mesh`), or a null context."""
    mesh = params_mesh(params)
    if mesh is None or not jax.sharding.get_abstract_mesh().empty:
        return contextlib.nullcontext()
    return jax.set_mesh(mesh)


def _context_mesh():
    mesh = jax.sharding.get_abstract_mesh()
    return None if mesh.empty or mesh.size == 1 else mesh


def row_multiple(rules: Rules = DEFAULT_RULES) -> int:
    """How many ways the mesh in context splits rows (the `batch` rule's axes); 1 without one."""
    mesh = _context_mesh()
    if mesh is None:
        return 1
    return int(np.prod([mesh.shape[a] for a in rules.get("batch", ()) if a in mesh.shape]))


def pad_rows(n: int, rules: Rules = DEFAULT_RULES) -> int:
    """A row count rounded up to a multiple of `row_multiple()` (unchanged without a mesh)."""
    m = row_multiple(rules)
    return -(-int(n) // m) * m


def constrain(x: jax.Array, logical: tuple[str | None, ...], rules: Rules = DEFAULT_RULES) -> jax.Array:
    """A sharding constraint from logical axis names when a mesh is in context; else `x` as is.

    `logical` names x's leading dimensions (missing trailing ones are unsharded); axes that do not
    divide a dimension are dropped, as for parameters.
    """
    mesh = _context_mesh()
    if mesh is None:
        return x
    logical = tuple(logical)[: x.ndim] + (None,) * max(0, x.ndim - len(logical))
    return jax.lax.with_sharding_constraint(x, logical_to_spec(logical, x.shape, mesh, rules))


def constrain_tree(tree: Any, axes_tree: Any, rules: Rules = DEFAULT_RULES) -> Any:
    """`constrain` over a tree (e.g. a KV cache with `model.CACHE_AXES`)."""
    if _context_mesh() is None:
        return tree
    return jax.tree.map(lambda axes, x: constrain(x, axes, rules), axes_tree, tree,
                        is_leaf=lambda a: isinstance(a, tuple) and all(e is None or isinstance(e, str) for e in a))


def on_params_mesh(fn):
    """Decorate a host-side entry point `fn(cfg, params, ...)`: it runs with the parameters' mesh
    in context (see `mesh_context`), so its jitted calls shard and its row buckets pad."""
    import functools

    @functools.wraps(fn)
    def wrapper(*args, **kwargs):
        params = args[1] if len(args) > 1 else kwargs.get("params")
        with mesh_context(params):
            return fn(*args, **kwargs)

    return wrapper
