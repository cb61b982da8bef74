"""MoE dispatch: one Mixtral-shaped MoE layer (8 experts, top 2, scaled down), forward and
forward+backward, for each dispatch of sage_jax.model.moe, with the ratio to `dense`.

    python benchmarks/moe.py                          # 2048 tokens, D=512, F=1792
    python benchmarks/moe.py --tokens 4096 --hidden 1024 --mlp 3584

Routed FLOPs per token are 2 k 3 D F (forward); `dense` computes E/k times that. On CPU
`ragged` is XLA's masked fallback (E times the routed work): the grouped-matmul kernel exists on
TPU and GPU only; `blocks` is the CPU path. Medians of --repeats after a compile.

    python benchmarks/moe.py --cpu-devices 8 --mesh data=2,expert=4

adds two rows on that mesh (the weights laid out by the rule table, experts over `expert`, tokens
over data x fsdp): the `auto`-without-a-mesh path that GSPMD places (`blocks/ragged (GSPMD)`) and
the explicit `expert_parallel` dispatch (all_to_all over `expert`). --cpu-devices simulates
devices on the host CPU: they share its cores, so those rows measure the overhead of the exchange,
not a speedup.
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

# Simulated devices must be requested before jax starts.
if "--cpu-devices" in sys.argv[:-1]:
    os.environ["XLA_FLAGS"] = (os.environ.get("XLA_FLAGS", "") + " --xla_force_host_platform_device_count="
                               + sys.argv[sys.argv.index("--cpu-devices") + 1]).strip()
    os.environ["JAX_PLATFORMS"] = "cpu"

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
from jax.sharding import NamedSharding  # noqa: E402

from sage_jax import parallel  # noqa: E402
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
    ap.add_argument("--cpu-devices", type=int, default=None, help="simulate this many CPU devices")
    ap.add_argument("--mesh", default=None, help="e.g. data=2,expert=4: add the expert-parallel rows")
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

    def pair(disp, *a):
        fwd = jax.jit(lambda *a: M.moe(*a, k=k, dispatch=disp))
        bwd = jax.jit(jax.grad(lambda *a: jnp.sum(M.moe(*a, k=k, dispatch=disp) ** 2), argnums=(0, 2, 3, 4)))
        return timed(fwd, *a), timed(bwd, *a)

    rows = {}
    for disp in args.dispatches.split(","):
        rows[disp] = pair(disp, x, router, gate, up, down)
    where = f"{jax.default_backend()} ({jax.device_count()} device(s))"
    if args.mesh:
        mesh_cfg = parallel.MeshConfig(**{"fsdp": 1, **{a: int(v) for a, v in
                                                         (kv.split("=") for kv in args.mesh.split(","))}})
        mesh = parallel.make_mesh(mesh_cfg)
        axes = (("batch", None), ("embed", None), ("expert", "embed", "mlp"), ("expert", "embed", "mlp"),
                ("expert", "mlp", "embed"))
        placed = [jax.device_put(a, NamedSharding(mesh, parallel.logical_to_spec(ax, a.shape, mesh)))
                  for ax, a in zip(axes, (x, router, gate, up, down))]
        tag = " x ".join(f"{a} {s}" for a, s in mesh.shape.items() if s > 1)
        rows[f"{M.resolve_dispatch('auto')} (GSPMD, {tag})"] = pair("auto", *placed)  # no mesh in context
        with jax.set_mesh(mesh):
            rows[f"expert_parallel ({tag})"] = pair("expert_parallel", *placed)
        where += "; mesh rows: simulated devices share the host's cores (overhead, not speedup)" \
            if jax.default_backend() == "cpu" else ""
    print(f"\nMoE layer, {n} tokens, D={d}, F={f}, {e} experts, top {k}, fp32, {where}; "
          f"medians of {args.repeats}\n")
    print("| dispatch | forward ms | vs dense | routed GFLOP/s | fwd+bwd ms | vs dense |")
    print("|---|---|---|---|---|---|")
    f0, b0 = rows.get("dense", next(iter(rows.values())))
    for disp, (fw, bw) in rows.items():
        print(f"| {disp} | {fw * 1e3:.1f} | {f0 / fw:.2f}x | {n * routed / fw / 1e9:.1f} | {bw * 1e3:.1f} | {b0 / bw:.2f}x |")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
