"""The accelerator check: SFT step MFU and greedy decode tokens/s of a ~1B Llama-shaped random
model in bf16, on whatever device JAX sees, in one call that prints its table and writes JSON.

    python benchmarks/device.py --out "$OUT"      # llama-1b (Llama-3.2-1B's shape), bf16, 8 x 2048
    python benchmarks/device.py --model tiny      # a model of a few MB: the script's own check on CPU

SFT: our full fine-tuning step (`benchmarks/train.py`'s: AdamW, every position supervised) on
random token rows, one untimed warm-up step (compilation), then the median of --steps. MFU =
tokens/s x FLOPs per token (6N + 12 L T d, `train.metrics.train_flops_per_token`) / the device's
peak (`train.metrics.process_peak_flops`: the vendor's dense bf16 figure for TPUs and GPUs, this
host's measured fp32 GEMM rate on CPU), and the same against a bf16 matmul measured in this run
(the share of what the chip reaches on one large GEMM). Decode: `benchmarks.decoding`'s timed
greedy loop (prefill and compilation apart) in both parameter layouts.

On a machine without this project's install (the lent GPU machines have JAX, flax, optax, orbax
and transformers, but not grain, which the trainer's checkpointing imports): carry the wheels of
grain, array-record and portpicker and put them on PYTHONPATH (see the device tool's README), then
`PYTHONPATH=$PWD:/tmp/site python benchmarks/device.py --out "$OUT"`.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402

from benchmarks.decoding import CompiledDecode  # noqa: E402
from benchmarks.limits import gemm_rate, timed  # noqa: E402
from benchmarks.train import ours as sft_step  # noqa: E402

SHAPES = {
    # Llama-3.2-1B: 1.24B parameters (tied embeddings), GQA 32/8 heads of 64.
    "llama-1b": dict(family="llama", vocab_size=128256, hidden_size=2048, intermediate_size=8192, num_layers=16,
                     num_heads=32, num_kv_heads=8, head_dim=64, tie_word_embeddings=True, rms_norm_eps=1e-5,
                     max_position_embeddings=8192),
    "tiny": dict(family="llama", vocab_size=512, hidden_size=64, intermediate_size=128, num_layers=2, num_heads=4,
                 num_kv_heads=2, head_dim=16, tie_word_embeddings=True, max_position_embeddings=1024),
}


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", choices=sorted(SHAPES), default="llama-1b")
    ap.add_argument("--dtype", default="bfloat16", help="compute dtype")
    ap.add_argument("--param-dtype", default="bfloat16")
    ap.add_argument("--remat", choices=("none", "full", "dots"), default="none")
    ap.add_argument("--batch", type=int, default=8)
    ap.add_argument("--seq-len", type=int, default=2048)
    ap.add_argument("--steps", type=int, default=5, help="timed SFT steps (median reported)")
    ap.add_argument("--decode-batches", type=int, nargs="*", default=[1, 64])
    ap.add_argument("--prompt-len", type=int, default=128)
    ap.add_argument("--new-tokens", type=int, default=128)
    ap.add_argument("--repeats", type=int, default=3, help="timed decodes per batch and layout (median)")
    ap.add_argument("--gemm", type=int, default=8192, help="side of the square bf16 matmul measured for reference")
    ap.add_argument("--out", default=None, help="directory for device.json")
    args = ap.parse_args(argv)

    from sage_jax import model, rollout
    from sage_jax.train.metrics import process_peak_flops, train_flops_per_token

    device = jax.devices()[0]
    cfg = model.ModelConfig(**SHAPES[args.model], dtype=args.dtype, param_dtype=args.param_dtype, remat=args.remat)
    params = jax.block_until_ready(jax.jit(model.init_params, static_argnums=0)(cfg, jax.random.key(0)))
    n_params = model.num_params(params)
    peak, peak_label = process_peak_flops([device])
    gemm = gemm_rate(args.gemm, args.gemm, args.gemm, dtype=jnp.dtype(args.dtype), with_torch=False)["jax"]
    result = {"device": f"{device.platform} {device.device_kind}", "jax": jax.__version__, "model": args.model,
              "params": n_params, "dtype": args.dtype, "param_dtype": args.param_dtype, "remat": args.remat,
              "peak_flops": peak, "peak_label": peak_label, f"gemm_{args.dtype}_{args.gemm}_flops": gemm}
    print(f"# {result['device']}, jax {jax.__version__}; {args.model}: {n_params / 1e9:.3f}B parameters, "
          f"{args.param_dtype} weights, {args.dtype} compute; peak {peak / 1e12:.1f} TFLOP/s ({peak_label}); "
          f"measured {args.dtype} GEMM {args.gemm}^3: {gemm / 1e12:.1f} TFLOP/s", flush=True)

    # SFT step
    b, t = args.batch, args.seq_len
    tokens = np.random.default_rng(0).integers(0, cfg.vocab_size, (b, t + 1), dtype=np.int64).astype(np.int32)
    step = sft_step(None, cfg, params, tokens)
    t0 = time.perf_counter()
    first_loss = step()
    warm = time.perf_counter() - t0
    times = [timed(step) for _ in range(args.steps)]
    s = statistics.median(times)
    tok_s = b * t / s
    fpt = train_flops_per_token(n_params, num_layers=cfg.num_layers, seq_len=t, hidden=cfg.hidden_size)
    achieved = tok_s * fpt  # FLOP/s
    sft = result["sft"] = {"batch": b, "seq_len": t, "first_loss": first_loss, "compile_and_first_step_s": warm,
                           "step_s": s, "tokens_per_s": tok_s, "flops_per_token": fpt, "mfu": achieved / peak,
                           "of_measured_gemm": achieved / gemm}
    print(f"\n## SFT step, full fine-tuning, {b} x {t} tokens (median of {args.steps}; first step "
          f"{warm:.1f} s with compilation, loss {first_loss:.3f})")
    print("| s/step | tokens/s | FLOPs/token | TFLOP/s | MFU | of measured GEMM |")
    print("|---|---|---|---|---|---|")
    print(f"| {s:.3f} | {tok_s:.0f} | {fpt / 1e9:.2f} G | {achieved / 1e12:.1f} | {sft['mfu']:.1%} | "
          f"{sft['of_measured_gemm']:.1%} |", flush=True)
    del step

    # Greedy decode, both layouts
    rng = np.random.default_rng(1)
    sp = rollout.SamplingParams.greedy_params(args.new_tokens, min_new_tokens=args.new_tokens)
    layouts = {"stacked": params, "per-layer": jax.block_until_ready(model.decode_layout(params))}
    result["decode"] = []
    print(f"\n## Greedy decode, prompt {args.prompt_len}, {args.new_tokens} new tokens (tokens/s, all rows; "
          f"median of {args.repeats})")
    print("| batch | " + " | ".join(layouts) + " |")
    print("|---|" + "---|" * len(layouts))
    for batch in args.decode_batches:
        prompts = rng.integers(0, cfg.vocab_size, (batch, args.prompt_len)).tolist()
        row = {"batch": batch}
        for name, p in layouts.items():
            dec = CompiledDecode.of(cfg, p, prompts, sp, args.new_tokens)
            per_step = statistics.median(dec.run()[0] for _ in range(args.repeats))
            row[name] = batch / per_step
        result["decode"].append(row)
        print(f"| {batch} | " + " | ".join(f"{row[n]:.1f}" for n in layouts) + " |", flush=True)

    if args.out:
        out = Path(args.out)
        out.mkdir(parents=True, exist_ok=True)
        (out / "device.json").write_text(json.dumps(result, indent=1))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
