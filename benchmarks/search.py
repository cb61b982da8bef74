"""Tree-search benchmarks on SmolLM2-135M (CPU float32 unless a device is there). Three modes:

    python benchmarks/search.py cost     [--seeds 4] [--max-new-tokens 48] [--repeats 3] [--ks 1,4,8]
                                         [--layouts stacked,per_layer]
    python benchmarks/search.py turns    [--seeds 4] [--k 4] [--turns 8] [--layouts stacked,per_layer]
    python benchmarks/search.py distinct --model RUN_DIR [--seeds 8] [--turns 2] [--k 4]

cost: seconds per assistant turn at K = 1, 4, 8 children (one batch of dialogues, each on its own
  KV cache, the K children forked from it and decoded together, the rules judge picking), medians
  of --repeats after a warm-up (compilation), and the ratio to K=1 (the K=8/K=1 ratio is the
  price of branching). --branching picks the mode (default latent); --copy-children forks each
  child onto a copy of its dialogue's cache (shared_prefix=false, the earlier fork) to compare.
  --layouts: the policy's parameter layouts to measure in the same run (search.layout; default
  stacked), with each row's speed against the stacked layout's.
turns: one --turns search of a batch (K children, the rules judge, the simulated user; after an
  untimed warm-up search of the same shapes that compiles every program), per assistant turn:
  tokens prefilled through the caches vs the tokens a full re-prefill of the history would take,
  prefill, decode and whole-turn seconds (and the ratio to turn 1), rewinds; then the programs
  the warm-up compiled (count and seconds); with several --layouts, a table each and the
  whole searches side by side.
distinct: mean distinct actions per node at K (default 4) with branching=latent vs
  branching=sample, same seeds, on a model that writes latents, e.g. SmolLM2 after SFT on the
  shipped sample:
      sage-jax sft model.path=smollm2 "train_files=[sage_jax/data/sample/ed_train_200.jsonl]" \\
          max_steps=60 output_dir=runs/bench_m1
      python benchmarks/search.py distinct --model runs/bench_m1
"""

from __future__ import annotations

import argparse
import statistics
import tempfile
import time

from sage_jax.judge import make_judge, select_best
from sage_jax.rollout.compiles import CompileCounter
from sage_jax.rollout.dialogue_cache import CacheStats
from sage_jax.rollout.policy import LAYOUTS, load_policy
from sage_jax.rollout.selfplay import Episode
from sage_jax.search.tree import SearchConfig, cache_len, expand, make_pools, run_search, search_batch


def _seeds(n: int) -> list[str]:
    from sage_jax.data.readers import read_seeds
    from sage_jax.data.sample import sample_path

    return read_seeds(sample_path("ed_test_seeds.txt"), limit=n)


def cost(args) -> None:
    judge = make_judge("rules:")
    episodes = [Episode.start(f"s{i}", s) for i, s in enumerate(_seeds(args.seeds))]
    rows, compiled = [], {}
    for layout in args.layouts:
        policy = load_policy(args.model, layout=layout)
        with CompileCounter() as cc:
            for k in (int(x) for x in args.ks.split(",")):
                cfg = SearchConfig(k=k, max_new_tokens=args.max_new_tokens, branching=args.branching,
                                   batch_seeds=args.seeds, shared_prefix=not args.copy_children)
                apool, _, _ = make_pools(policy, policy, cfg)

                def turn(rep: int) -> float:
                    apool.release([e.id for e in episodes])  # each repeat prefills the whole prompt again
                    t0 = time.perf_counter()
                    cands = expand(policy, episodes, cfg, seed=rep, pool=apool)
                    apool.commit({})
                    if k > 1:
                        select_best(judge, [e.turns for e in episodes], [[c["content"] for c in cs] for cs in cands])
                    return time.perf_counter() - t0

                turn(0)  # compile
                t = statistics.median(turn(r + 1) for r in range(args.repeats))
                rows.append((layout, k, t / args.seeds, t))
                print(f"  measured {layout} K={k}: {t:.2f} s per batch turn", flush=True)
        compiled[layout] = cc
    print(f"\n{args.model}, {args.seeds} dialogues per batch, branching={args.branching}, up to "
          f"{args.max_new_tokens} new tokens per child, paper sampling, median of {args.repeats}\n")
    print("| layout | K | s per assistant turn (per dialogue) | s per batch turn | ratio to K=1 | "
          "children per second | speed vs stacked |")
    print("|---|---|---|---|---|---|---|")
    per = {(layout, k): p for layout, k, p, _ in rows}
    for layout, k, p, batch in rows:
        base = per[layout, rows[0][1]]
        vs = f"{per['stacked', k] / p:.2f}x" if ("stacked", k) in per else "-"
        print(f"| {layout} | {k} | {p:.2f} | {batch:.2f} | {p / base:.2f} | {k * args.seeds / batch:.1f} | {vs} |")
    for layout, cc in compiled.items():
        print(f"\ncompiled ({layout}): {cc}")


def turns(args) -> None:
    wall = {layout: turns_of(args, layout) for layout in args.layouts}
    if len(wall) > 1:
        print("\n| layout | whole search s | speed vs stacked |\n|---|---|---|")
        for layout, w in wall.items():
            print(f"| {layout} | {w:.1f} | " + (f"{wall['stacked'] / w:.2f}x |" if "stacked" in wall else "- |"))


def turns_of(args, layout: str) -> float:
    """One layout's turns table; returns the timed search's wall seconds."""
    policy = load_policy(args.model, layout=layout)
    judge = make_judge("rules:")
    cfg = SearchConfig(k=args.k, turns=args.turns, max_new_tokens=args.max_new_tokens,
                       shared_prefix=not args.copy_children,
                       user_max_new_tokens=args.user_max_new_tokens, branching=args.branching,
                       batch_seeds=args.seeds)
    seeds = [(f"s{i}", s) for i, s in enumerate(_seeds(args.seeds))]
    with CompileCounter() as cc:  # the first search compiles every program (and is not timed)
        t0 = time.perf_counter()
        search_batch(policy, policy, judge, seeds, cfg, seed=0, pools=make_pools(policy, policy, cfg))
        first = time.perf_counter() - t0
    print(f"  warm-up search {first:.1f} s, compiled: {cc} {dict(cc.by_function)}", flush=True)
    stats = CacheStats()
    log: list[dict] = []
    t0 = time.perf_counter()
    with CompileCounter() as cc2:
        results = search_batch(policy, policy, judge, seeds, cfg, seed=0, pools=make_pools(policy, policy, cfg, stats),
                               turn_log=log)
    wall = time.perf_counter() - t0
    # what re-prefilling the whole history would prefill at turn t: the assistant's prompt then
    full = []
    for t in range(args.turns):
        full.append(sum(len(policy.encode_chat(r["assistant_view"][:3 + 2 * t])) for r in results
                        if len(r["assistant_view"]) > 3 + 2 * t))
    print(f"\n{args.model} ({layout} layout), {args.seeds} dialogues, K={args.k}, branching={args.branching}, "
          f"{args.turns} turns, up to {args.max_new_tokens}/{args.user_max_new_tokens} new tokens "
          f"(assistant/user), cache length {cache_len(cfg)}\n")
    print("| turn | dialogues | tokens prefilled (both sides) | assistant prompt tokens (full re-prefill) | "
          "prefill s | decode s | turn s (incl. user, judge) | turn s / turn 1 | rewinds |")
    print("|---|---|---|---|---|---|---|---|---|")
    for row, f in zip(log, full):
        print(f"| {row['turn']} | {row['dialogues']} | {row['prefill_tokens']} | {f} | {row['prefill_seconds']:.2f} "
              f"| {row['decode_seconds']:.2f} | {row['seconds']:.2f} | {row['seconds'] / log[0]['seconds']:.2f} "
              f"| {row['rewinds']} |")
    print(f"\nwhole search {wall:.1f} s (compiled on the way: {cc2}); the warm-up search compiled {cc} "
          f"{dict(cc.by_function)}; cache: {stats.as_dict()}")
    return wall


def distinct(args) -> None:
    out = {}
    for mode in ("sample", "latent"):
        with tempfile.TemporaryDirectory() as d:
            s = run_search(SearchConfig(model=args.model, num_seeds=args.seeds, turns=args.turns, k=args.k,
                                        branching=mode, max_new_tokens=args.max_new_tokens,
                                        user_max_new_tokens=args.user_max_new_tokens, batch_seeds=args.seeds,
                                        output_dir=d))
        out[mode] = s["distinct_actions_mean"]
        print(f"  {mode}: mean distinct actions per node {out[mode]}", flush=True)
    print(f"\n{args.model}, K={args.k}, {args.seeds} seeds x {args.turns} turns: mean distinct actions per node: "
          f"branching=sample {out['sample']}, branching=latent {out['latent']}")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("mode", nargs="?", default="cost", choices=("cost", "turns", "distinct"))
    ap.add_argument("--model", default="smollm2")
    ap.add_argument("--seeds", type=int, default=4)
    ap.add_argument("--max-new-tokens", type=int, default=48)
    ap.add_argument("--user-max-new-tokens", type=int, default=24)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--ks", default="1,4,8")
    ap.add_argument("--k", type=int, default=4)
    ap.add_argument("--turns", type=int, default=8)
    ap.add_argument("--branching", default="latent", choices=("latent", "sample", "enumerate"))
    ap.add_argument("--copy-children", action="store_true",
                    help="cost/turns: each child decodes on a copy of its dialogue's cache (shared_prefix=false)")
    ap.add_argument("--layouts", type=lambda v: v.split(","), default=["stacked"],
                    help="cost/turns: parameter layouts measured in the same run, e.g. stacked,per_layer")
    args = ap.parse_args()
    bad = sorted(set(args.layouts) - set(LAYOUTS))
    if bad:
        ap.error(f"--layouts: {bad} not in {LAYOUTS}")
    if args.mode == "distinct" and args.turns == 8:
        args.turns = 2
    {"cost": cost, "turns": turns, "distinct": distinct}[args.mode](args)


if __name__ == "__main__":
    main()
