"""MoE dispatch: one Mixtral-shaped MoE layer (8 experts, top 2, scaled down), forward and
forward+backward, for each dispatch of sage_jax.model.moe, with the ratio to `dense`.

    python benchmarks/moe.py                          # 2048 tokens, D=512, F=1792
    python benchmarks/moe.py --tokens 4096 --hidden 1024 --mlp 3584

Routed FLOPs per token are 2 k 3 D F (forward); `dense` computes E/k times that. On CPU
`ragged` is XLA's masked fallback (E times the routed work): the grouped-matmul kernel exists on
TPU and GPU only; `blocks` is the CPU path. Medians of --repeats after a compile.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402

from sage_jax.model import moe as M  # noqa: E402


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--tokens", type=int, default=2048)
    ap.add_argument("--hidden", type=int, default=512)
    ap.add_argument("--mlp", type=int, default=1792)
    ap.add_argument("--experts", type=int, default=8)
    ap.add_argument("--top-k", type=int, default=2)
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument("--dispatches", default="dense,blocks,ragged")
    args = ap.parse_args(argv)
    n, d, f, e, k = args.tokens, args.hidden, args.mlp, args.experts, args.top_k
    ks = jax.random.split(jax.random.key(0), 5)
    x = jax.random.normal(ks[0], (n, d))
    router = jax.random.normal(ks[1], (d, e)) * 0.1
    gate, up = (jax.random.normal(kk, (e, d, f)) * d ** -0.5 for kk in ks[2:4])
    down = jax.random.normal(ks[4], (e, f, d)) * f ** -0.5
    routed = 2 * k * 3 * d * f  # forward FLOPs per token through its k experts

    def timed(fn, *a) -> float:
        jax.block_until_ready(fn(*a))
        ts = []
        for _ in range(args.repeats):
            t = time.perf_counter()
            jax.block_until_ready(fn(*a))
            ts.append(time.perf_counter() - t)
        return statistics.median(ts)

    rows = {}
    for disp in args.dispatches.split(","):
        fwd = jax.jit(lambda *a, disp=disp: M.moe(*a, k=k, dispatch=disp))
        bwd = jax.jit(jax.grad(lambda *a, disp=disp: jnp.sum(M.moe(*a, k=k, dispatch=disp) ** 2), argnums=(0, 2, 3, 4)))
        rows[disp] = (timed(fwd, x, router, gate, up, down), timed(bwd, x, router, gate, up, down))
    print(f"\nMoE layer, {n} tokens, D={d}, F={f}, {e} experts, top {k}, fp32, {jax.default_backend()} "
          f"({jax.device_count()} device(s)); medians of {args.repeats}\n")
    print("| dispatch | forward ms | vs dense | routed GFLOP/s | fwd+bwd ms | vs dense |")
    print("|---|---|---|---|---|---|")
    f0, b0 = rows.get("dense", next(iter(rows.values())))
    for disp, (fw, bw) in rows.items():
        print(f"| {disp} | {fw * 1e3:.1f} | {f0 / fw:.2f}x | {n * routed / fw / 1e9:.1f} | {bw * 1e3:.1f} | {b0 / bw:.2f}x |")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
