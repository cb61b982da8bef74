"""Tree-search cost per assistant turn on SmolLM2-135M: K = 1, 4, 8 children (batched, one shared
prefix cache per dialogue), for a batch of dialogues, as seconds per assistant turn and ratios to K=1.

    python benchmarks/search.py [--seeds 4] [--max-new-tokens 48] [--repeats 3]

Each timing expands one assistant turn for every seed (prefill once per dialogue, K rows decoded
together) and lets the rules judge pick; medians of --repeats after a warm-up (compilation).
"""

from __future__ import annotations

import argparse
import statistics
import time

from sage_jax.judge import make_judge, select_best
from sage_jax.rollout.policy import load_policy
from sage_jax.rollout.selfplay import Episode
from sage_jax.search.tree import SearchConfig, expand


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--seeds", type=int, default=4)
    ap.add_argument("--max-new-tokens", type=int, default=48)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--ks", default="1,4,8")
    args = ap.parse_args()
    from sage_jax.data.readers import read_seeds
    from sage_jax.data.sample import sample_path

    policy = load_policy("smollm2")
    judge = make_judge("rules:")
    seeds = read_seeds(sample_path("ed_test_seeds.txt"), limit=args.seeds)
    episodes = [Episode.start(f"s{i}", s) for i, s in enumerate(seeds)]
    rows = []
    for k in (int(x) for x in args.ks.split(",")):
        cfg = SearchConfig(k=k, max_new_tokens=args.max_new_tokens)

        def turn(rep: int) -> float:
            t0 = time.perf_counter()
            cands = expand(policy, episodes, cfg, seed=rep)
            if k > 1:
                select_best(judge, [e.turns for e in episodes], [[c["content"] for c in cs] for cs in cands])
            return time.perf_counter() - t0

        turn(0)  # compile
        t = statistics.median(turn(r + 1) for r in range(args.repeats))
        rows.append((k, t / args.seeds, t))
        print(f"  measured K={k}", flush=True)
    base = rows[0][1]
    print(f"\nSmolLM2-135M-Instruct, CPU float32, {args.seeds} dialogues per batch, up to {args.max_new_tokens} new "
          f"tokens per child, sampled (paper settings), median of {args.repeats}\n")
    print("| K | s per assistant turn (per dialogue) | s per batch turn | ratio to K=1 | children per second |")
    print("|---|---|---|---|---|")
    for k, per, batch in rows:
        print(f"| {k} | {per:.2f} | {batch:.2f} | {per / base:.2f} | {k * args.seeds / batch:.1f} |")


if __name__ == "__main__":
    main()
