"""Rollout throughput: our sampler vs `transformers.generate` on SmolLM2-135M-Instruct (fp32).

    python benchmarks/rollout.py            # batch 1, 16, 64; 64 new tokens; 3 repeats
    python benchmarks/rollout.py --quick    # batch 1, 16; 16 new tokens; 3 repeats

Measured in the same process, same prompts (identical lengths, no padding), greedy, and
min_new_tokens = max_new_tokens on both sides so every row generates the same count.
Decode tokens/s = batch * (N - 1) / (time of the N - 1 decode steps): for us the `decode` jit
timed apart from `prefill`; for transformers the time between the first and the last call of a
timestamping logits processor (called once per step, after each forward). End-to-end tokens/s
(prefill + decode + host work, batch * N / wall time of one generate call) is reported too.
Compile time is excluded (one warm-up call per shape) and printed separately. Medians of >= 3
interleaved repeats; the machine may be shared and noisy, so read the ratios, not the absolute
numbers. On an oversubscribed machine torch's OpenMP threads slow down far more than XLA's (we
saw HF fall to ~1 tok/s at batch 1 with 2 threads and a load average of 5): pass
`--torch-threads 1` there, or the ratios flatter us.

Layouts: "stacked" scans over stacked layer weights (the default: quick to compile); "per-layer"
is `model.decode_layout` (each weight its own buffer, q/k/v and gate/up fused, an unrolled loop:
`serve`'s default); end-to-end
columns use the stacked layout. Limits (benchmarks/limits.py, measured in the same run): a decode step reads every weight once
(fp32: 4 bytes per parameter) and does 2 FLOPs per parameter per row, so its floor is
max(bytes / memory bandwidth, FLOPs / GEMM rate); "of limit" is the measured decode tokens/s over
the tokens/s of that floor (bandwidth-bound at small batch, compute-bound at large). The limits are
measured at the start and again after each batch's timings (the bandwidth three times each), and
the table uses their medians: on a shared machine one measurement can land in a burst (we saw the
bandwidth read 70 GB/s once between readings of 36-42), which would make every share of it look
half as large.

llama.cpp (when `llama_cpp` is installed: `pip install -e ".[bench]"`): the same model's GGUF
(Q4_1, so it reads ~7x fewer weight bytes than our fp32), greedy; batch 1 in process
(`Llama.create_completion`, decode tokens/s from its own timings), batch B as B concurrent requests
to its OpenAI server (`python -m llama_cpp.server`, which serves them one at a time): completion
tokens / wall.

Prefix sharing: K=8 continuations of one long prefix with `num_continuations=8` (one prefill,
cache broadcast) vs 8 independent copies of the prefix (8 prefills), and K=1 for scale.
"""

from __future__ import annotations

import argparse
import importlib.util
import os
import statistics
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from benchmarks.decoding import CompiledDecode  # noqa: E402
from benchmarks.limits import decode_floor_s, gemm_rate, memory_bandwidth  # noqa: E402
from benchmarks.llama_server import llama_cpp_server  # noqa: E402
from benchmarks.prompts import text_prompts  # noqa: E402

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")


def median_time(fn, repeats: int) -> float:
    times = []
    for _ in range(repeats):
        t = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t)
    return statistics.median(times)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--quick", action="store_true", help="batch 1 and 16, 16 new tokens")
    ap.add_argument("--batches", type=int, nargs="*", default=None)
    ap.add_argument("--new-tokens", type=int, default=None)
    ap.add_argument("--prompt-len", type=int, default=64)
    ap.add_argument("--prefix-len", type=int, default=512)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--skip-hf", action="store_true")
    ap.add_argument("--skip-llama-cpp", action="store_true")
    ap.add_argument("--torch-threads", type=int, default=None,
                    help="torch.set_num_threads (OpenMP degrades badly when the machine is oversubscribed)")
    args = ap.parse_args(argv)
    batches = args.batches or ([1, 16] if args.quick else [1, 16, 64])
    n_new = args.new_tokens or (16 if args.quick else 64)
    repeats = max(3, args.repeats)

    import jax
    import numpy as np
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from sage_jax import model, rollout
    from sage_jax.model.smollm2 import fetch_smollm2

    if args.torch_threads:
        torch.set_num_threads(args.torch_threads)
    hf_dir = fetch_smollm2()
    tok = AutoTokenizer.from_pretrained(hf_dir)
    cfg, params = model.load_hf(hf_dir)
    hf = None if args.skip_hf else AutoModelForCausalLM.from_pretrained(hf_dir, dtype=torch.float32).eval()
    print(f"# jax {jax.__version__} on {jax.devices()[0].platform}, torch {torch.__version__} "
          f"({torch.get_num_threads()} threads), cpu count {os.cpu_count()}, "
          f"load average {os.getloadavg()[0]:.1f} (others share this machine when > 0.5)")
    print(f"# SmolLM2-135M fp32; prompt {args.prompt_len} tokens; {n_new} new tokens; median of {repeats}")
    n_params = model.num_params(params)
    # Readings at the start and after each batch's timings; the bandwidth 3 at a time (a cheap
    # 512 MB sum), so that even a one-batch run has a median a single burst does not move.
    gemms, widths = [], []

    def measure_limits():
        gemms.append(max(max(gemm_rate(m, k, n).values()) for m, k, n in
                         ((max(batches), cfg.hidden_size, cfg.intermediate_size), (1024, 1024, 1024))))
        widths.extend(memory_bandwidth() for _ in range(3))

    measure_limits()
    print(f"# measured: fp32 GEMM rate {gemms[0] / 1e9:.1f} GFLOP/s, memory bandwidth "
          f"{statistics.median(widths) / 1e9:.1f} GB/s; {n_params / 1e6:.1f}M parameters ({n_params * 4 / 1e6:.0f} MB fp32)")

    prompts_of = text_prompts(tok, np.random.default_rng(0))

    from transformers import LogitsProcessorList

    from benchmarks.stamps import Stamps

    def ours(prompts, n, k=1, sp=None):
        sp = sp or rollout.SamplingParams.greedy_params(n, min_new_tokens=n)
        gens = rollout.generate(cfg, params, prompts, sp, num_continuations=k)
        assert all(len(g.tokens) == n for g in gens)
        return gens

    per_layer = jax.block_until_ready(model.decode_layout(params))

    def theirs(prompts, n, stamps=None):
        ids = torch.tensor(prompts, dtype=torch.long)
        with torch.no_grad():
            out = hf.generate(ids, attention_mask=torch.ones_like(ids), do_sample=False, max_new_tokens=n,
                              min_new_tokens=n, pad_token_id=2,
                              logits_processor=LogitsProcessorList([stamps]) if stamps else None)
        assert out.shape[1] == ids.shape[1] + n
        return out

    def theirs_decode_time(prompts, n) -> float:
        st = Stamps()
        theirs(prompts, n, st)
        assert len(st.t) == n
        return st.t[-1] - st.t[0]

    rows = []
    for b in batches:
        prompts = prompts_of(b, args.prompt_len)
        t0 = time.perf_counter()
        ours(prompts, n_new)
        compile_s = time.perf_counter() - t0
        if hf is not None:
            theirs(prompts, 2)  # warm-up
        # Interleaved repeats, so both sides see the same (shared, noisy) machine.
        greedy = rollout.SamplingParams.greedy_params(n_new, min_new_tokens=n_new)
        decodes = {"dec": CompiledDecode.of(cfg, params, prompts, greedy, n_new),
                   "dec_pl": CompiledDecode.of(cfg, per_layer, prompts, greedy, n_new)}
        t = {"e2e": [], "dec": [], "dec_pl": [], "h_e2e": [], "h_dec": []}
        for _ in range(repeats):
            t["e2e"].append(median_time(lambda: ours(prompts, n_new), 1))
            for key, d in decodes.items():
                t[key].append(d.run()[0] * (n_new - 1))
            if hf is not None:
                t["h_e2e"].append(median_time(lambda: theirs(prompts, n_new), 1))
                t["h_dec"].append(theirs_decode_time(prompts, n_new))
        med = {key: statistics.median(v) for key, v in t.items() if v}
        r = dict(batch=b, compile=compile_s, ours_dec=b * (n_new - 1) / med["dec"], ours_e2e=b * n_new / med["e2e"],
                 ours_pl=b * (n_new - 1) / med["dec_pl"])
        if hf is not None:
            r.update(hf_dec=b * (n_new - 1) / med["h_dec"], hf_e2e=b * n_new / med["h_e2e"])
        rows.append(r)
        measure_limits()
        print(f"  batch {b}: done", file=sys.stderr, flush=True)

    llama = None
    if args.skip_llama_cpp:
        print("\nllama.cpp: skipped (--skip-llama-cpp)")
    elif importlib.util.find_spec("llama_cpp") is None:
        print("\nllama.cpp: skipped (the `llama_cpp` package is not importable here: pip install -e \".[bench]\", "
              "a 6-12 minute source build)")
    else:
        from sage_jax.model.smollm2 import default_cache_dir, find_gguf

        llama = llama_cpp_decode(str(find_gguf(default_cache_dir())), tok, [r["batch"] for r in rows],
                                 lambda b: prompts_of(b, args.prompt_len), n_new)

    gemm, bandwidth = statistics.median(gemms), statistics.median(widths)
    spread = lambda xs, mid, unit: f"{min(xs) / 1e9:.1f}-{max(xs) / 1e9:.1f} {unit} (median {mid / 1e9:.1f})"  # noqa: E731
    print(f"\n# limits measured in this run: GEMM rate {spread(gemms, gemm, 'GFLOP/s')} over {len(gemms)} readings, "
          f"memory bandwidth {spread(widths, bandwidth, 'GB/s')} over {len(widths)}; the limit column uses the medians")
    print("\n## Decode throughput, greedy (tokens/s, all rows together)")
    print("| batch | ours decode (stacked) | ours decode (per-layer) | HF decode | best ours / HF | llama.cpp (Q4_1) | "
          "limit (bound) | ours of limit | HF of limit | ours end-to-end | HF end-to-end | ratio | our compile s |")
    print("| ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: |")
    for r in rows:
        hd, he = r.get("hf_dec"), r.get("hf_e2e")
        f = lambda x: "-" if x is None else f"{x:.1f}"  # noqa: E731
        ratio = lambda a, c: "-" if c is None else f"{a / c:.2f}x"  # noqa: E731
        floor, bound = decode_floor_s(n_params, r["batch"], gemm, bandwidth)
        limit = r["batch"] / floor
        share = lambda x: "-" if x is None else f"{x / limit:.0%}"  # noqa: E731
        lc = None if llama is None else llama.get(r["batch"])
        best = max(r["ours_dec"], r["ours_pl"])
        print(f"| {r['batch']} | {r['ours_dec']:.1f} | {r['ours_pl']:.1f} | {f(hd)} | {ratio(best, hd)} | {f(lc)} | "
              f"{limit:.0f} ({bound}) | {share(best)} | {share(hd)} | {r['ours_e2e']:.1f} | "
              f"{f(he)} | {ratio(r['ours_e2e'], he)} | {r['compile']:.1f} |")

    # Prefix sharing: K continuations of one long prefix.
    k = 8
    prefix = prompts_of(1, args.prefix_len)[0]
    sp = rollout.SamplingParams.paper(max_new_tokens=n_new, min_new_tokens=n_new)
    for fn in (lambda: ours([prefix], n_new, k=k, sp=sp), lambda: ours([prefix] * k, n_new, sp=sp),
               lambda: ours([prefix], n_new, sp=sp)):
        fn()  # compile
    t_shared = median_time(lambda: ours([prefix], n_new, k=k, sp=sp), repeats)
    t_indep = median_time(lambda: ours([prefix] * k, n_new, sp=sp), repeats)
    t_one = median_time(lambda: ours([prefix], n_new, sp=sp), repeats)
    print(f"\n## Prefix sharing: prefix {args.prefix_len} tokens, {n_new} new tokens, paper sampling preset")
    print("| run | rows | seconds | new tokens/s | vs 8 independent |")
    print("| --- | ---: | ---: | ---: | ---: |")
    print(f"| K=1 (one continuation) | 1 | {t_one:.2f} | {n_new / t_one:.1f} | - |")
    print(f"| K=8 shared prefix (num_continuations=8) | 8 | {t_shared:.2f} | {k * n_new / t_shared:.1f} | "
          f"{t_indep / t_shared:.2f}x |")
    print(f"| 8 independent copies of the prefix | 8 | {t_indep:.2f} | {k * n_new / t_indep:.1f} | 1.00x |")

    return 0


def llama_cpp_decode(gguf: str, tok, batches: list[int], prompts_of, n_new: int) -> dict[int, float]:
    """llama.cpp tokens/s per batch: batch 1 in process (decode rate from its own timings), batch B
    as B concurrent requests to its server (completion tokens / wall)."""
    import json
    import threading
    import urllib.request

    from llama_cpp import Llama

    out = {}
    threads = os.cpu_count() or 1
    if 1 in batches:
        llm = Llama(model_path=gguf, n_ctx=2048, n_threads=threads, n_batch=512, verbose=False)
        prompt = prompts_of(1)[0]
        llm.create_completion(prompt, max_tokens=4, temperature=0.0)  # warm-up
        import llama_cpp

        rates = []
        for _ in range(3):
            llama_cpp.llama_perf_context_reset(llm.ctx)
            llm.create_completion(prompt, max_tokens=n_new, temperature=0.0)
            perf = llama_cpp.llama_perf_context(llm.ctx)  # decode steps alone, as our "decode" column
            rates.append(perf.n_eval / (perf.t_eval_ms / 1e3))
        out[1] = statistics.median(rates)
        del llm
    rest = [b for b in batches if b > 1]
    if not rest:
        return out
    with llama_cpp_server(gguf) as base:
        if base is None:
            print("llama.cpp: its batch > 1 column is empty", file=sys.stderr)
            return out
        url = base + "/completions"

        def ask(prompt, counts):
            body = json.dumps({"prompt": tok.decode(prompt), "max_tokens": n_new, "temperature": 0.0}).encode()
            req = urllib.request.Request(url, data=body, headers={"Content-Type": "application/json"})
            with urllib.request.urlopen(req, timeout=1200) as r:
                counts.append(json.loads(r.read())["usage"]["completion_tokens"])

        ask(prompts_of(1)[0], [])  # warm-up
        for b in rest:
            counts: list[int] = []
            workers = [threading.Thread(target=ask, args=(p, counts)) for p in prompts_of(b)]
            t = time.perf_counter()
            for w in workers:
                w.start()
            for w in workers:
                w.join()
            out[b] = sum(counts) / (time.perf_counter() - t)
            print(f"  llama.cpp batch {b}: done", file=sys.stderr, flush=True)
    return out


if __name__ == "__main__":
    raise SystemExit(main())
