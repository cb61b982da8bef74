"""Serving throughput: requests/s and completion tokens/s at 1, 8 and 32 concurrent clients
against `sage-jax serve` (in process, on loopback), and against llama.cpp's server on the same
model's GGUF when `llama_cpp` (llama-cpp-python with its server extra) is installed.

Each client sends chat completions back to back (a different short prompt each, temperature 0.7,
seeded, `max_tokens` each) until the level's requests are done; tokens are the `usage`'s
completion tokens. One warm-up round per level (compilation) is not timed.

    python benchmarks/serve.py                                  # SmolLM2-135M-Instruct
    python benchmarks/serve.py --model DIR --clients 1 8 --requests 16 --max-tokens 16   # any HF dir
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import sys
import threading
import time
import urllib.request
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from benchmarks.llama_server import llama_cpp_server  # noqa: E402
from sage_jax.rollout.policy import LAYOUTS, load_policy  # noqa: E402
from sage_jax.serve import make_server  # noqa: E402

TOPICS = ["my exam", "a rainy day", "my cat", "cooking pasta", "a long commute", "learning guitar", "a new job",
          "my garden"]


def _body(i: int, max_tokens: int) -> bytes:
    msg = f"Tell me something about {TOPICS[i % len(TOPICS)]} (request {i})."
    return json.dumps({"model": "m", "messages": [{"role": "user", "content": msg}], "temperature": 0.7,
                       "seed": i, "max_tokens": max_tokens}).encode()


def _ask(url: str, i: int, max_tokens: int, timeout: float) -> int:
    req = urllib.request.Request(url + "/chat/completions", data=_body(i, max_tokens),
                                 headers={"Content-Type": "application/json", "Authorization": "Bearer x"})
    with urllib.request.urlopen(req, timeout=timeout) as r:
        return int(json.loads(r.read())["usage"]["completion_tokens"])


def run_level(url: str, clients: int, requests: int, max_tokens: int, timeout: float) -> tuple[float, float]:
    """(requests/s, completion tokens/s) of `requests` requests over `clients` threads."""
    todo = iter(range(requests))
    lock, tokens, errors = threading.Lock(), [], []

    def client():
        while True:
            with lock:
                i = next(todo, None)
            if i is None:
                return
            try:
                n = _ask(url, i, max_tokens, timeout)
                with lock:
                    tokens.append(n)
            except Exception as e:  # noqa: BLE001
                errors.append(e)

    t0 = time.perf_counter()
    threads = [threading.Thread(target=client) for _ in range(clients)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    wall = time.perf_counter() - t0
    if errors:
        print(f"  {len(errors)} errors, e.g. {errors[0]!r}", flush=True)
    return len(tokens) / wall, sum(tokens) / wall


def sweep(name: str, url: str, levels: list[int], requests: int, max_tokens: int, timeout: float) -> dict:
    out = {}
    for c in levels:
        run_level(url, c, c, max_tokens, timeout)  # warm-up: compile the shapes this level uses
        n = max(requests, c)
        rps, tps = run_level(url, c, n, max_tokens, timeout)
        out[c] = (rps, tps)
        print(f"  {name:>10} clients={c:>3} requests={n:>4}: {rps:8.2f} req/s {tps:9.1f} tok/s", flush=True)
    return out


def llama_cpp_sweep(gguf: str, args) -> dict | None:
    if importlib.util.find_spec("llama_cpp") is None:
        print("llama.cpp: llama_cpp is not installed (pip install -e \".[bench]\"); column skipped")
        return None
    with llama_cpp_server(gguf) as url:
        if url is None:
            print("llama.cpp: column skipped")
            return None
        print("llama.cpp server:", flush=True)
        return sweep("llama.cpp", url, args.clients, args.requests, args.max_tokens, args.timeout)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default="smollm2", help="smollm2 (default), an HF directory or a run directory")
    ap.add_argument("--clients", type=int, nargs="+", default=[1, 8, 32])
    ap.add_argument("--requests", type=int, default=64, help="requests per level (at least one per client)")
    ap.add_argument("--max-tokens", type=int, default=64)
    ap.add_argument("--max-batch", type=int, default=None, help="engine slots (default: the most clients)")
    ap.add_argument("--timeout", type=float, default=600.0)
    ap.add_argument("--layout", default="per_layer", choices=LAYOUTS,
                    help="parameter layout (as `sage-jax serve`, whose default is per_layer)")
    args = ap.parse_args()

    policy = load_policy(args.model, layout=args.layout)
    slots = args.max_batch or max(args.clients)
    srv = make_server(policy, "127.0.0.1", 0, max_batch=slots, max_queue=max(64, 2 * max(args.clients)),
                      max_tokens_limit=args.max_tokens, max_model_len=512).start()
    print(f"sage-jax serve ({policy.name or args.model}, {slots} slots, {args.layout} layout):", flush=True)
    try:
        ours = sweep("sage-jax", srv.url, args.clients, args.requests, args.max_tokens, args.timeout)
    finally:
        srv.close()
    theirs = None
    if args.model == "smollm2":
        from sage_jax.model.smollm2 import default_cache_dir, find_gguf

        theirs = llama_cpp_sweep(str(find_gguf(default_cache_dir())), args)
    else:
        print("llama.cpp: only with --model smollm2 (its GGUF); column skipped")
    print("\nclients | sage-jax req/s | sage-jax tok/s" + (" | llama.cpp req/s | llama.cpp tok/s" if theirs else ""))
    for c in args.clients:
        row = f"{c:>7} | {ours[c][0]:14.2f} | {ours[c][1]:14.1f}"
        if theirs:
            row += f" | {theirs[c][0]:15.2f} | {theirs[c][1]:15.1f}"
        print(row)


if __name__ == "__main__":
    main()
