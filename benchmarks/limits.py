"""This machine's limits, measured in the benchmark's own run (never assumed): the fp32 GEMM rate
(best of a jitted JAX matmul and a torch one) and the memory bandwidth (a jitted reduction over an
array far larger than the caches: every byte read once). A decode step must read every weight once
and do 2 FLOPs per weight per row, so its floor is max(bytes / bandwidth, FLOPs / GEMM rate)."""

from __future__ import annotations

import time

import jax
import jax.numpy as jnp


def timed(fn) -> float:
    """Wall seconds of one call."""
    t = time.perf_counter()
    fn()
    return time.perf_counter() - t


def gemm_rate(m: int, k: int, n: int, repeats: int = 5, dtype=jnp.float32,
              with_torch: bool = True) -> dict[str, float]:
    """FLOP/s of a [m, k] x [k, n] matmul in `dtype`: jitted JAX on the default device and, unless
    with_torch=False, a float32 torch one on the CPU (each the best of repeats)."""
    a = jax.random.normal(jax.random.key(0), (m, k), dtype)
    b = jax.random.normal(jax.random.key(1), (k, n), dtype)
    f = jax.jit(lambda a, b: a @ b)
    f(a, b).block_until_ready()
    out = {}
    best = min(timed(lambda: f(a, b).block_until_ready()) for _ in range(repeats))
    out["jax"] = 2 * m * k * n / best
    if not with_torch:
        return out
    import torch

    ta, tb = torch.randn(m, k), torch.randn(k, n)
    ta @ tb
    best = min(timed(lambda: ta @ tb) for _ in range(repeats))
    out["torch"] = 2 * m * k * n / best
    return out


def memory_bandwidth(mbytes: int = 512, repeats: int = 5) -> float:
    """Bytes/s of reading an fp32 array of `mbytes` MB once (a jitted sum; the best of repeats)."""
    x = jnp.ones((mbytes * (1 << 20) // 4,), jnp.float32)
    f = jax.jit(jnp.sum)
    f(x).block_until_ready()
    best = min(timed(lambda: f(x).block_until_ready()) for _ in range(repeats))
    return x.size * 4 / best


def decode_floor_s(n_params: int, batch: int, gemm_flops: float, bandwidth: float,
                   bytes_per_param: int = 4) -> tuple[float, str]:
    """(seconds, "compute" | "bandwidth"): the least time one decode step of `batch` rows can take."""
    t_bw = n_params * bytes_per_param / bandwidth
    t_fl = 2.0 * n_params * batch / gemm_flops
    return (t_fl, "compute") if t_fl >= t_bw else (t_bw, "bandwidth")
