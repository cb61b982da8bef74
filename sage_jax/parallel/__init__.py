"""Parallelism: the mesh, the logical-axis rule table, and sharding helpers."""

from sage_jax.parallel.mesh import MESH_AXES, MeshConfig, initialize_distributed, make_mesh
from sage_jax.parallel.rules import (
    DEFAULT_RULES, batch_sharding, logical_to_spec, merge_rules, shard_batch,
    shard_params, tree_shardings,
)

__all__ = [
    "DEFAULT_RULES", "MESH_AXES", "MeshConfig", "batch_sharding", "initialize_distributed",
    "logical_to_spec", "make_mesh", "merge_rules", "shard_batch", "shard_params",
    "tree_shardings",
]
