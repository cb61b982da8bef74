"""Decode step time under sampling settings: our sampler vs `transformers.generate` (do_sample) on
SmolLM2-135M-Instruct (fp32), batch 64 by default.

    python benchmarks/sampling.py                 # batch 64, prompt 64, 64 new tokens, 3 repeats
    python benchmarks/sampling.py --batch 16 --new-tokens 32

The settings: greedy, the paper's (temperature 0.95, top-k 50, top-p 0.7), and top-p without
top-k (what OpenAI-style clients send) at three temperatures. Top-p without top-k is where the
sampler's cost depends on the logits: it looks for each row's nucleus among the largest logits
in tiers (`rollout.sampling.NUCLEUS_CANDIDATES`) and sorts the vocabulary only when the last tier
does not cover every row of the batch, so prompts are real text and the table says how often
each path ran (measured on the generated tokens, teacher-forced).

Per step = decode time / (N - 1): for us the `decode` jit of the per-layer layout (what `serve`
runs), prefill synced apart; for transformers the time between the first and last call of a
timestamping logits processor. Medians of interleaved repeats; compile time excluded. Both sides
draw different random tokens, so their rows take different paths: compare the ratios within a
row, and the greedy row for the machine's noise.
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

# name -> (temperature, top_k, top_p); temperature 0 = greedy
SETTINGS = {
    "greedy": (0.0, 0, 1.0),
    "paper: T 0.95, top-k 50, top-p 0.7": (0.95, 50, 0.7),
    "T 0.7, top-p 0.9": (0.7, 0, 0.9),
    "T 1.0, top-p 0.9": (1.0, 0, 0.9),
    "T 1.0, top-p 0.95": (1.0, 0, 0.95),
}


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--batch", type=int, default=64)
    ap.add_argument("--prompt-len", type=int, default=64)
    ap.add_argument("--new-tokens", type=int, default=64)
    ap.add_argument("--repeats", type=int, default=3)
    args = ap.parse_args(argv)
    b, n = args.batch, args.new_tokens

    import jax
    import jax.numpy as jnp
    import numpy as np
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer, LogitsProcessorList

    from benchmarks.decoding import CompiledDecode
    from benchmarks.prompts import text_prompts
    from benchmarks.stamps import Stamps

    from sage_jax import model, rollout
    from sage_jax.model.smollm2 import fetch_smollm2
    from sage_jax.rollout.sampling import NUCLEUS_CANDIDATES

    hf_dir = fetch_smollm2()
    tok = AutoTokenizer.from_pretrained(hf_dir)
    cfg, params = model.load_hf(hf_dir)
    params = jax.block_until_ready(model.decode_layout(params))
    hf = AutoModelForCausalLM.from_pretrained(hf_dir, dtype=torch.float32).eval()
    forward = jax.jit(lambda p, t: model.forward(cfg, p, t)[0])
    print(f"# jax {jax.__version__}, torch {torch.__version__} ({torch.get_num_threads()} threads), "
          f"load average {os.getloadavg()[0]:.1f}; SmolLM2-135M fp32, batch {b}, prompt {args.prompt_len}, "
          f"{n} new tokens, median of {args.repeats}; nucleus tiers {NUCLEUS_CANDIDATES}")

    prompts = text_prompts(tok, np.random.default_rng(0))(b, args.prompt_len)

    def hf_step(temperature, top_k, top_p):
        stamps, ids = Stamps(), torch.tensor(prompts, dtype=torch.long)
        kw = dict(do_sample=True, temperature=temperature, top_k=top_k, top_p=top_p) if temperature else \
            dict(do_sample=False)
        with torch.no_grad():
            hf.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=n, min_new_tokens=n, pad_token_id=2,
                        logits_processor=LogitsProcessorList([stamps]), **kw)
        return (stamps.t[-1] - stamps.t[0]) / (n - 1)

    def tier_paths(tokens, temperature, top_p) -> str:
        """How often each nucleus path ran in our decode: per step, the largest nucleus of the batch."""
        logits = np.asarray(forward(params, jnp.asarray([p + list(t) for p, t in zip(prompts, tokens)])))
        probs = np.sort(np.asarray(jax.nn.softmax(jnp.asarray(logits[:, args.prompt_len - 1: -1]) / temperature)),
                        axis=-1)[..., ::-1]
        need = ((np.cumsum(probs, axis=-1) < top_p).sum(-1) + 1).max(axis=0)  # [N]
        edges = (0, *NUCLEUS_CANDIDATES)
        shares = [f"{np.mean((need > lo) & (need <= hi)):.0%} <= {hi}" for lo, hi in zip(edges, edges[1:])]
        return ", ".join(shares + [f"{np.mean(need > edges[-1]):.0%} sorted"])

    compiled = {}
    for name, (temperature, top_k, top_p) in SETTINGS.items():
        sp = (rollout.SamplingParams.greedy_params(n, min_new_tokens=n) if not temperature else
              rollout.SamplingParams(temperature=temperature, top_k=top_k, top_p=top_p, max_new_tokens=n,
                                     min_new_tokens=n))
        compiled[name] = CompiledDecode.of(cfg, params, prompts, sp, n)
    hf_step(*SETTINGS["greedy"])  # torch's warm-up
    times = {name: ([], []) for name in SETTINGS}
    tokens = {}
    for _ in range(args.repeats):  # interleaved: every setting sees the same (shared, noisy) machine
        for name, c in compiled.items():
            dt, tokens[name] = c.run()
            times[name][0].append(dt)
            times[name][1].append(hf_step(*SETTINGS[name]))
        print("  repeat done", file=sys.stderr, flush=True)

    print("\n## Decode step by sampling setting (ms per step, all rows together)")
    print("| setting | ours | HF | ours / HF speed | our nucleus path (steps) |")
    print("| --- | ---: | ---: | ---: | --- |")
    for name, (temperature, top_k, top_p) in SETTINGS.items():
        o, h = (statistics.median(x) for x in times[name])
        paths = tier_paths(tokens[name], temperature, top_p) if temperature and not top_k and top_p < 1 else "-"
        print(f"| {name} | {o * 1e3:.0f} | {h * 1e3:.0f} | {h / o:.2f}x | {paths} |")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
