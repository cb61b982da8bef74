"""Forward-pass speed on SmolLM2-135M-Instruct: ours (JAX) vs transformers (PyTorch), same CPU.

Prefill: tokens/s of one forward over a prompt that fills a KV cache. Decode: tokens/s of one
cached decode step (batch rows x 1 token). Both sides run float32 on the same threads; every
figure is the median of --repeats timings, and the ratio column is ours / transformers.

    python benchmarks/forward.py            # full table (a few minutes on 2 cores)
    python benchmarks/forward.py --quick    # fewer cases
"""

from __future__ import annotations

import argparse
import statistics
import time

import jax
import numpy as np

from sage_jax import model
from sage_jax.model.smollm2 import fetch_smollm2


def median_time(fn, repeats: int) -> float:
    fn()  # warm-up (compilation / allocator)
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return statistics.median(times)


def ours(cfg, params, batch: int, prompt: int, steps: int, repeats: int) -> tuple[float, float]:
    tokens = np.random.default_rng(0).integers(0, cfg.vocab_size, (batch, prompt), dtype=np.int32)
    max_len = prompt + steps + 1
    step = jax.jit(lambda p, t, c: model.forward(cfg, p, t, cache=c), donate_argnums=2)

    def prefill():
        logits, cache = step(params, tokens, model.init_cache(cfg, batch, max_len))
        logits.block_until_ready()
        return cache

    t_prefill = median_time(prefill, repeats)
    nxt = tokens[:, :1]

    def decode():
        cache = prefill()
        t0 = time.perf_counter()
        c = cache
        for _ in range(steps):
            logits, c = step(params, nxt, c)
        logits.block_until_ready()
        return time.perf_counter() - t0

    decode()
    t_decode = statistics.median(decode() for _ in range(repeats)) / steps
    return batch * prompt / t_prefill, batch / t_decode


def transformers_side(hf, batch: int, prompt: int, steps: int, repeats: int) -> tuple[float, float]:
    import torch

    tokens = torch.tensor(np.random.default_rng(0).integers(0, hf.config.vocab_size, (batch, prompt)))

    @torch.no_grad()
    def prefill():
        return hf(tokens, use_cache=True).past_key_values

    t_prefill = median_time(prefill, repeats)
    nxt = tokens[:, :1]

    @torch.no_grad()
    def decode():
        cache = prefill()
        t0 = time.perf_counter()
        for _ in range(steps):
            cache = hf(nxt, past_key_values=cache, use_cache=True).past_key_values
        return time.perf_counter() - t0

    decode()
    t_decode = statistics.median(decode() for _ in range(repeats)) / steps
    return batch * prompt / t_prefill, batch / t_decode


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--quick", action="store_true")
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--steps", type=int, default=16, help="decode steps per timing")
    args = ap.parse_args()

    import torch
    import transformers

    path = fetch_smollm2()
    cfg, params = model.load_hf(path)
    hf = transformers.AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32).eval()
    cases = [(1, 128), (8, 128)] if args.quick else [(1, 128), (1, 512), (8, 128), (16, 128), (64, 64)]
    flop_per_token = 2 * model.num_params(params)  # matmul FLOPs per token, ignoring attention
    rows = []
    for batch, prompt in cases:
        op, od = ours(cfg, params, batch, prompt, args.steps, args.repeats)
        tp, td = transformers_side(hf, batch, prompt, args.steps, args.repeats)
        rows.append((batch, prompt, op, tp, od, td))
        print(f"  measured batch={batch} prompt={prompt}", flush=True)

    print(f"\nSmolLM2-135M-Instruct, float32, {jax.devices()[0].platform}, torch threads {torch.get_num_threads()}, "
          f"median of {args.repeats}; decode = {args.steps} cached steps after the prompt\n")
    hdr = ("batch", "prompt", "prefill ours tok/s", "prefill HF tok/s", "ratio", "decode ours tok/s",
           "decode HF tok/s", "ratio", "decode ours GFLOP/s")
    print("| " + " | ".join(hdr) + " |")
    print("|" + "---|" * len(hdr))
    for batch, prompt, op, tp, od, td in rows:
        print(f"| {batch} | {prompt} | {op:.0f} | {tp:.0f} | {op / tp:.2f} | {od:.1f} | {td:.1f} | {od / td:.2f} | "
              f"{od * flop_per_token / 1e9:.1f} |")


if __name__ == "__main__":
    main()
