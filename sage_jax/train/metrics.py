"""Training metrics: JSONL (always) and TensorBoard (optional), fetched without per-step host syncs;
model FLOPs utilisation. (The progress bar is :mod:`sage_jax.progress`.)

``MetricsWriter.write(step, metrics)`` takes values that may still be computing on the device. It
starts their device-to-host copies and queues them; a step's values are fetched only once ``lag``
later steps have been written (by then they are long done, so the fetch does not stall the
dispatch of the next step), or on ``flush()``/``close()``. Each fetched step becomes one JSON line
``{"step": s, "time": t, name: value, ...}`` in ``<log_dir>/metrics.jsonl`` (``time`` is the
wall time of the ``write`` call) and TensorBoard scalars. Non-finite floats are written as the
JSON extensions ``NaN``/``Infinity`` (Python's ``json`` and pandas read them).

Resuming from a checkpoint at step ``s``: ``MetricsWriter(log_dir, resume_step=s)`` first drops
the lines with ``step > s`` (and a torn last line) so the file has each step once, and tells
TensorBoard to purge events after ``s``.

Only process 0 writes (``enabled`` defaults to ``jax.process_index() == 0``); on other processes
``write`` is a no-op that fetches nothing.
"""

from __future__ import annotations

import collections
import functools
import json
import logging
import math
import os
import time
from pathlib import Path
from typing import Any, Mapping

import jax
import numpy as np

log = logging.getLogger(__name__)

METRICS_FILE = "metrics.jsonl"


def _start_host_copy(x: Any) -> None:
    if isinstance(x, jax.Array):
        try:
            x.copy_to_host_async()
        except Exception:  # noqa: BLE001 - an optimisation only (e.g. deleted or non-addressable)
            pass


def _to_host_value(x: Any) -> Any:
    """A fetched value as a plain Python scalar (or a list for arrays with several elements)."""
    if isinstance(x, (str, bool, int, float)) or x is None:
        return x
    arr = np.asarray(x)
    return arr.item() if arr.size == 1 else arr.tolist()


def truncate_jsonl(path: str | os.PathLike, after_step: int) -> int:
    """Drop the lines of a metrics JSONL with ``step > after_step`` (and unparseable lines, e.g.
    a torn last line after a crash); atomic rewrite. Returns the number of lines kept."""
    p = Path(path)
    if not p.exists():
        return 0
    kept, dropped = [], 0
    with p.open("r", encoding="utf-8") as f:
        for line in f:
            try:
                rec = json.loads(line)
                step = int(rec["step"])
            except (ValueError, KeyError, TypeError):
                dropped += 1
                continue
            if step <= after_step:
                kept.append(line if line.endswith("\n") else line + "\n")
            else:
                dropped += 1
    if dropped:
        tmp = p.with_name(p.name + ".tmp")
        with tmp.open("w", encoding="utf-8") as f:
            f.writelines(kept)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, p)
        log.info("resume: dropped %d metric lines after step %d from %s", dropped, after_step, p)
    return len(kept)


class MetricsWriter:
    """Append-only per-step metrics without blocking the training loop.

    Args:
      log_dir: directory for ``metrics.jsonl`` and the TensorBoard event files.
      tensorboard: also write TensorBoard scalars (tensorboardX).
      resume_step: when resuming from a checkpoint at this step, drop logged steps after it.
      lag: how many newer steps may be pending before a step is fetched (``0``: fetch at once).
      enabled: write on this process (default: process 0 only).
    """

    def __init__(
        self,
        log_dir: str | os.PathLike,
        *,
        tensorboard: bool = True,
        resume_step: int | None = None,
        lag: int = 1,
        enabled: bool | None = None,
    ):
        self.log_dir = Path(log_dir)
        self.enabled = (jax.process_index() == 0) if enabled is None else bool(enabled)
        self.lag = max(0, int(lag))
        self.last: dict[str, Any] = {}
        self.last_step: int | None = None
        self._pending: collections.deque[tuple[int, float, dict[str, Any]]] = collections.deque()
        self._file = None
        self._tb = None
        self._closed = False
        if not self.enabled:
            return
        self.log_dir.mkdir(parents=True, exist_ok=True)
        self.path = self.log_dir / METRICS_FILE
        if resume_step is not None:
            truncate_jsonl(self.path, int(resume_step))
        self._file = self.path.open("a", encoding="utf-8")
        if tensorboard:
            from tensorboardX import SummaryWriter

            self._tb = SummaryWriter(
                logdir=str(self.log_dir),
                purge_step=None if resume_step is None else int(resume_step) + 1,
                flush_secs=30,
            )

    def write(self, step: int, metrics: Mapping[str, Any]) -> None:
        """Queue ``metrics`` for ``step``; values may be device arrays (not waited on here)."""
        if not self.enabled or self._closed:
            return
        metrics = dict(metrics)
        for v in metrics.values():
            _start_host_copy(v)
        self._pending.append((int(step), time.time(), metrics))
        while len(self._pending) > self.lag:
            self._emit(*self._pending.popleft())
        if self.lag == 0:
            self._file.flush()

    def _emit(self, step: int, wall: float, metrics: dict[str, Any]) -> None:
        host = jax.device_get(metrics)
        values = {k: _to_host_value(v) for k, v in host.items()}
        rec = {"step": step, "time": round(wall, 3), **{k: v for k, v in values.items() if k not in ("step", "time")}}
        self._file.write(json.dumps(rec) + "\n")
        self._file.flush()
        if self._tb is not None:
            for k, v in values.items():
                if isinstance(v, (int, float)) and not isinstance(v, bool):
                    self._tb.add_scalar(k, v, global_step=step, walltime=wall)
        self.last, self.last_step = values, step

    def flush(self) -> None:
        """Fetch and write every pending step (blocks on their values)."""
        if not self.enabled or self._closed:
            return
        while self._pending:
            self._emit(*self._pending.popleft())
        self._file.flush()
        if self._tb is not None:
            self._tb.flush()

    def close(self) -> None:
        if self._closed:
            return
        self.flush()
        self._closed = True
        if self._file is not None:
            self._file.close()
        if self._tb is not None:
            self._tb.close()

    def __enter__(self) -> "MetricsWriter":
        return self

    def __exit__(self, *exc) -> None:
        self.close()


def read_jsonl(path: str | os.PathLike) -> list[dict]:
    """The records of a metrics JSONL (for tests and reports)."""
    with open(path, encoding="utf-8") as f:
        return [json.loads(line) for line in f if line.strip()]


# --------------------------------------------------------------------------------------------
# MFU
# --------------------------------------------------------------------------------------------

# Peak dense bf16 FLOP/s per chip (vendor figures, no sparsity). Matched against
# ``device.device_kind`` lower-cased, first match wins (order matters: "v5 lite" before "v5").
PEAK_FLOPS_TABLE: tuple[tuple[tuple[str, ...], float, str], ...] = (
    (("tpu v4",), 275e12, "TPU v4 bf16"),
    (("tpu v5 lite", "tpu v5e", "v5litepod"), 197e12, "TPU v5e bf16"),
    (("tpu v5p", "tpu v5"), 459e12, "TPU v5p bf16"),
    (("tpu v6 lite", "tpu v6e", "tpu v6"), 918e12, "TPU v6e bf16"),
    (("h200",), 989e12, "H200 bf16 dense"),
    (("h100 pcie",), 756e12, "H100 PCIe bf16 dense"),
    (("h100 nvl",), 835e12, "H100 NVL bf16 dense"),
    (("h100",), 989e12, "H100 SXM bf16 dense"),
    (("a100",), 312e12, "A100 bf16 dense"),
)
CPU_FLOPS_ESTIMATE = 150e9  # fp32, this class of CPU host: used only where nothing was measured


@functools.lru_cache(maxsize=1)
def measured_cpu_gemm_flops(n: int = 1024, repeats: int = 3) -> float:
    """This host's fp32 GEMM rate (FLOP/s, all cores): the best of a few jitted n x n x n matmuls.
    Simulated CPU devices share these cores, so this is the peak of the whole process."""
    a = jax.device_put(np.ones((n, n), np.float32), jax.local_devices(backend="cpu")[0])  # on the host's cores
    f = jax.jit(lambda x: x @ x)
    f(a).block_until_ready()
    best = math.inf
    for _ in range(repeats):
        t = time.perf_counter()
        f(a).block_until_ready()
        best = min(best, time.perf_counter() - t)
    return 2.0 * n ** 3 / best


def peak_flops_info(device: Any = None, *, cpu_flops: float | None = CPU_FLOPS_ESTIMATE) -> tuple[float, str]:
    """``(peak FLOP/s of one device, label)``: the vendor table for TPUs and GPUs; a CPU gives
    ``cpu_flops`` labelled as an estimate (None: this host's measured GEMM rate); an unknown
    accelerator ``nan``."""
    device = device if device is not None else jax.devices()[0]
    kind = str(getattr(device, "device_kind", "")).lower()
    platform = str(getattr(device, "platform", "")).lower()
    for keys, flops, label in PEAK_FLOPS_TABLE:
        if any(k in kind for k in keys):
            return flops, label
    if platform == "cpu" or "cpu" in kind:
        if cpu_flops is None:
            rate = measured_cpu_gemm_flops()
            return rate, f"CPU fp32 GEMM rate measured at start ({rate / 1e9:.0f} GFLOP/s for the host)"
        return float(cpu_flops), f"CPU fp32 estimate ({cpu_flops / 1e9:.0f} GFLOP/s per device)"
    return math.nan, f"unknown device kind {kind!r}"


def peak_flops_per_device(device: Any = None, *, cpu_flops: float = CPU_FLOPS_ESTIMATE) -> float:
    """Peak FLOP/s of one device (see :func:`peak_flops_info`)."""
    return peak_flops_info(device, cpu_flops=cpu_flops)[0]


def process_peak_flops(devices: Any = None) -> tuple[float, str]:
    """``(peak FLOP/s of every device of the run, label)`` for MFU: accelerators add up; CPU
    devices (real or simulated) share one host, whose GEMM rate is measured once."""
    devices = list(devices if devices is not None else jax.devices())
    flops, label = peak_flops_info(devices[0], cpu_flops=None)
    if str(getattr(devices[0], "platform", "")).lower() == "cpu":
        return flops, label
    return flops * len(devices), f"{len(devices)} x {label}"


def train_flops_per_token(num_params: int, *, num_layers: int = 0, seq_len: int = 0, hidden: int = 0,
                          lora: bool = False) -> float:
    """Training FLOPs per token: ``6 N`` (forward 2N, backward 4N) plus attention ``12 L T d``
    (PaLM appendix B); with ``lora`` the frozen weights need activation gradients but no weight
    gradients: ``4 N`` (the rank-r adapters' FLOPs are negligible)."""
    return (4.0 if lora else 6.0) * num_params + 12.0 * num_layers * seq_len * hidden


def mfu(tokens_per_s: float, flops_per_token: float, peak_flops: float) -> float:
    """Model FLOPs utilisation. ``tokens_per_s`` and ``peak_flops`` must cover the same devices
    (e.g. global tokens/s and ``peak_flops_per_device() * jax.device_count()``)."""
    if not peak_flops or math.isnan(peak_flops):
        return math.nan
    return float(tokens_per_s) * float(flops_per_token) / float(peak_flops)
