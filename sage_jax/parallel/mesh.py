"""The device mesh over the axes data, fsdp, tensor, expert, and multi-host start-up."""

from __future__ import annotations

import dataclasses
import logging
import os

import jax
import numpy as np
from jax.sharding import AxisType, Mesh

log = logging.getLogger(__name__)

MESH_AXES: tuple[str, ...] = ("data", "fsdp", "tensor", "expert")


@dataclasses.dataclass(frozen=True)
class MeshConfig:
    """Mesh shape; exactly one axis may be -1 ("all remaining devices")."""

    data: int = 1
    fsdp: int = -1
    tensor: int = 1
    expert: int = 1
    num_devices: int | None = None  # use the first N devices (None: all of them)

    def shape(self, num_devices: int) -> tuple[int, ...]:
        dims = [self.data, self.fsdp, self.tensor, self.expert]
        if dims.count(-1) > 1 or any(d == 0 or d < -1 for d in dims):
            raise ValueError(f"MeshConfig {dims}: axes must be positive, with at most one -1")
        known = int(np.prod([d for d in dims if d != -1]))
        if -1 in dims:
            if num_devices % known:
                raise ValueError(f"MeshConfig {dims}: {num_devices} devices are not divisible by {known}")
            dims[dims.index(-1)] = num_devices // known
        if int(np.prod(dims)) != num_devices:
            raise ValueError(f"MeshConfig {dict(zip(MESH_AXES, dims))} needs {int(np.prod(dims))} devices, "
                             f"have {num_devices}")
        return tuple(dims)


def make_mesh(cfg: MeshConfig = MeshConfig(), devices=None) -> Mesh:
    """A mesh with Auto (GSPMD) axis types over all (or the given) devices.

    jax.make_mesh orders devices by the physical topology on TPU, so neighbouring mesh
    coordinates are neighbouring chips (fast `tensor` collectives).
    """
    devices = list(devices if devices is not None else jax.devices())
    if cfg.num_devices is not None:
        if not 0 < cfg.num_devices <= len(devices):
            raise ValueError(f"MeshConfig.num_devices={cfg.num_devices}: have {len(devices)} devices")
        devices = devices[: cfg.num_devices]
    shape = cfg.shape(len(devices))
    return jax.make_mesh(shape, MESH_AXES, axis_types=(AxisType.Auto,) * len(MESH_AXES), devices=devices)


def initialize_distributed(
    coordinator_address: str | None = None, num_processes: int | None = None, process_id: int | None = None
) -> None:
    """Start jax.distributed for a multi-host run; a no-op for a single process.

    On a TPU pod (or under SLURM/Open MPI) JAX detects the cluster by itself; elsewhere pass the
    coordinator or set JAX_COORDINATOR_ADDRESS, JAX_NUM_PROCESSES and JAX_PROCESS_ID.
    """
    if jax.distributed.is_initialized():
        return
    coordinator_address = coordinator_address or os.environ.get("JAX_COORDINATOR_ADDRESS")
    if num_processes is None and "JAX_NUM_PROCESSES" in os.environ:
        num_processes = int(os.environ["JAX_NUM_PROCESSES"])
    if process_id is None and "JAX_PROCESS_ID" in os.environ:
        process_id = int(os.environ["JAX_PROCESS_ID"])
    on_pod = "TPU_WORKER_HOSTNAMES" in os.environ or "CLOUD_TPU_TASK_ID" in os.environ
    if coordinator_address is None and not on_pod:
        if num_processes not in (None, 1):
            raise ValueError(f"initialize_distributed: num_processes={num_processes} needs a coordinator address")
        return  # one process: nothing to do
    jax.distributed.initialize(coordinator_address, num_processes, process_id)
    log.info("jax.distributed: process %d of %d, %d global devices", jax.process_index(), jax.process_count(),
             jax.device_count())
