"""Parallelism: the mesh, the logical-axis rule table, and sharding helpers."""

from sage_jax.parallel.inference import (SINGLE_DEVICE, constrain, constrain_tree, inference_mesh, mesh_context,
                                          on_params_mesh, pad_rows, params_mesh, place_params, row_multiple)
from sage_jax.parallel.mesh import MESH_AXES, MeshConfig, initialize_distributed, make_mesh
from sage_jax.parallel.rules import (
    DEFAULT_RULES, batch_sharding, logical_to_spec, merge_rules, shard_batch,
    shard_params, tree_shardings,
)

__all__ = [
    "DEFAULT_RULES", "MESH_AXES", "MeshConfig", "SINGLE_DEVICE", "batch_sharding", "constrain", "constrain_tree",
    "inference_mesh", "initialize_distributed", "logical_to_spec", "make_mesh", "merge_rules", "mesh_context",
    "on_params_mesh", "pad_rows", "params_mesh", "place_params", "row_multiple", "shard_batch", "shard_params", "tree_shardings",
]
