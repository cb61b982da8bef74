"""Logical axis names -> mesh axes: the one rule table, and the helpers that apply it.

Every parameter, cache and batch array carries logical axis names; this table alone decides how
they are laid out on the mesh. Nothing here knows the model: callers pass the logical-axes tree
(`model.param_axes(cfg)`, `model.lora_axes(...)`, `model.CACHE_AXES`) with the arrays or shapes.
The default is FSDP (ZeRO-3 style: parameters sharded over `fsdp`, batch over `data` x `fsdp`)
plus Megatron tensor parallelism over `tensor` (heads, mlp, vocab) and expert parallelism over
`expert`.
"""

from __future__ import annotations

import logging
from typing import Any, Mapping

import jax
import numpy as np
from jax.sharding import Mesh, NamedSharding, PartitionSpec

log = logging.getLogger(__name__)

Rules = Mapping[str, tuple[str, ...]]

DEFAULT_RULES: dict[str, tuple[str, ...]] = {
    "batch": ("data", "fsdp"),
    "length": (),
    "vocab": ("tensor",),
    "embed": ("fsdp",),
    "heads": ("tensor",),
    "kv_heads": ("tensor",),
    "head_dim": (),
    "mlp": ("tensor",),
    "expert": ("expert",),
    "layers": (),
    "norm": (),
}


def merge_rules(overrides: Mapping[str, Any] | None) -> dict[str, tuple[str, ...]]:
    """The default table with some logical axes remapped (None or [] = replicated)."""
    rules = dict(DEFAULT_RULES)
    for name, axes in (overrides or {}).items():
        rules[name] = () if axes is None else (axes,) if isinstance(axes, str) else tuple(axes)
    return rules


_warned: set = set()


def logical_to_spec(
    logical: tuple[str | None, ...], shape: tuple[int, ...], mesh: Mesh, rules: Rules = DEFAULT_RULES
) -> PartitionSpec:
    """The PartitionSpec for an array of `shape` with these logical axes.

    A mesh axis is used at most once per array (first come), and mesh axes that don't divide
    a dimension are dropped, with a warning (e.g. 3 kv heads over tensor=2 are replicated).
    """
    used: set[str] = set()
    spec = []
    for name, dim in zip(logical, shape):
        if name is not None and name not in rules:
            raise KeyError(f"logical axis {name!r} has no rule (known: {sorted(rules)})")
        chosen = []
        for ax in rules.get(name, ()) if name is not None else ():
            size = mesh.shape[ax]
            if ax in used or size == 1:
                continue
            if dim % (int(np.prod([mesh.shape[a] for a in chosen])) * size):
                key = (name, dim, ax, size)
                if key not in _warned:
                    _warned.add(key)
                    log.warning("logical axis %r (size %d) does not divide mesh axis %r (%d): not sharded on it",
                                name, dim, ax, size)
                continue
            chosen.append(ax)
        used.update(chosen)
        spec.append(None if not chosen else chosen[0] if len(chosen) == 1 else tuple(chosen))
    return PartitionSpec(*spec)


def _is_axes(x) -> bool:
    return isinstance(x, tuple) and all(a is None or isinstance(a, str) for a in x)


def tree_shardings(axes_tree: Any, shapes_tree: Any, mesh: Mesh, rules: Rules = DEFAULT_RULES) -> Any:
    """NamedShardings for a tree of arrays (or shapes) given the matching tree of logical axes."""

    def one(axes, x):
        shape = x if isinstance(x, tuple) else x.shape
        return NamedSharding(mesh, logical_to_spec(axes, shape, mesh, rules))

    return jax.tree.map(one, axes_tree, shapes_tree, is_leaf=_is_axes)


def shard_params(axes: Any, params: Any, mesh: Mesh, rules: Rules = DEFAULT_RULES) -> Any:
    """Place (or re-lay) `params` on the mesh per the rules, given their logical-axes tree (e.g.
    `model.param_axes(cfg)` or `model.lora_axes(cfg, lora)`)."""
    return jax.tree.map(jax.device_put, params, tree_shardings(axes, params, mesh, rules))


def batch_sharding(mesh: Mesh, shape: tuple[int, ...], rules: Rules = DEFAULT_RULES) -> NamedSharding:
    """Batch-major arrays ([B] or [B, T, ...]): batch over data x fsdp, the rest replicated."""
    logical = ("batch", "length") + (None,) * max(0, len(shape) - 2)
    return NamedSharding(mesh, logical_to_spec(logical[: len(shape)], shape, mesh, rules))


def shard_batch(batch: Any, mesh: Mesh, rules: Rules = DEFAULT_RULES) -> Any:
    """Turn each host's local batch into global arrays (the global batch = all hosts' rows).

    On one process this is a device_put; on several, each host passes only its own rows
    (e.g. from Grain sharded by process index).
    """

    def one(x):
        x = np.asarray(x)
        global_shape = (x.shape[0] * jax.process_count(),) + x.shape[1:]
        sharding = batch_sharding(mesh, global_shape, rules)
        if jax.process_count() == 1:
            return jax.device_put(x, sharding)
        return jax.make_array_from_process_local_data(sharding, x, global_shape)

    return jax.tree.map(one, batch)
