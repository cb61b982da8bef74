"""Training step throughput: our SFT step (full fine-tuning and LoRA) vs a `transformers` PyTorch
step with AdamW, on SmolLM2-135M-Instruct (fp32), same batch and sequence length, in one run.

    python benchmarks/train.py                      # 4 rows x 256 tokens, 5 timed steps each
    python benchmarks/train.py --batch 8 --seq-len 512 --steps 3 --torch-threads 1

Every side trains on the same random token rows (every position supervised), after one untimed
warm-up step (compilation for us); the timed steps run interleaved per repeat (ours full, ours
LoRA, HF) and the table shows medians. FLOPs per token: 6N + 12 L T d for full fine-tuning (PaLM
appendix B: forward + backward of every weight matmul, plus attention), 4N + 12 L T d for LoRA
(frozen weights need activation gradients but no weight gradients; the adapters' FLOPs are
negligible at rank 8-16). The machine's GEMM rate is measured in the same run (the best of a
jitted fp32 matmul and a torch one, at the MLP's shape of this batch), so "of GEMM" is the share
of what this machine can reach on dense matmuls, not of a vendor peak. The machine may be shared:
read the ratios, not the absolute numbers.
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

import jax  # noqa: E402
import numpy as np  # noqa: E402

from benchmarks.limits import gemm_rate, timed  # noqa: E402


def ours(spec_lora, cfg, params, tokens: np.ndarray):
    """A step function of our SFT trainer (full fine-tuning when spec_lora is None) on `tokens`."""
    from sage_jax.parallel import MeshConfig, make_mesh
    from sage_jax.train import steps
    from sage_jax.train.trainer import init_train_state

    mesh = make_mesh(MeshConfig(num_devices=1))
    spec = steps.StepSpec(cfg, lora=spec_lora)
    tx = steps.make_optimizer(steps.OptimConfig(learning_rate=1e-5, warmup_steps=0), 1000)
    state, s_shard, frozen, f_shard = init_train_state(spec, tx, params, 0, mesh)
    b, t = tokens.shape
    batch = {"inputs": tokens[:, :-1], "targets": tokens[:, 1:], "loss_mask": np.ones((b, t - 1), bool),
             "segment_ids": np.ones((b, t - 1), np.int32),
             "positions": np.broadcast_to(np.arange(t - 1, dtype=np.int32), (b, t - 1))}
    batch = {k: np.asarray(v)[None] for k, v in batch.items()}  # [A=1, B, T]
    b_shard = steps.batch_shardings(batch, mesh)
    batch = jax.tree.map(jax.device_put, batch, b_shard)
    step_fn = steps.compile_step(steps.sft_train_step, spec, tx, state_sharding=s_shard, frozen_sharding=f_shard,
                                 batch_sharding=b_shard)
    box = {"state": state}

    def step():
        box["state"], m = step_fn(box["state"], frozen, batch)
        jax.block_until_ready(m["loss"])
        return float(m["loss"])

    return step


def theirs(hf_dir: str, tokens: np.ndarray):
    """A `transformers` training step (AdamW) on the same rows."""
    import torch
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(hf_dir, torch_dtype=torch.float32)
    model.train()
    opt = torch.optim.AdamW(model.parameters(), lr=1e-5)
    ids = torch.from_numpy(tokens.astype(np.int64))

    def step():
        loss = model(input_ids=ids, labels=ids).loss
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
        return float(loss.detach())

    return step


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--batch", type=int, default=4)
    ap.add_argument("--seq-len", type=int, default=256)
    ap.add_argument("--steps", type=int, default=5, help="timed steps per side (medians reported)")
    ap.add_argument("--lora-rank", type=int, default=None, help="default: LoraConfig's")
    ap.add_argument("--skip-hf", action="store_true")
    ap.add_argument("--torch-threads", type=int, default=None,
                    help="torch.set_num_threads (OpenMP degrades badly when the machine is oversubscribed)")
    args = ap.parse_args(argv)

    import torch

    from sage_jax.model import loader, num_params
    from sage_jax.model.lora import LoraConfig
    from sage_jax.model.smollm2 import fetch_smollm2
    from sage_jax.train.metrics import train_flops_per_token

    if args.torch_threads:
        torch.set_num_threads(args.torch_threads)
    cfg, params, _, _ = loader.load("smollm2")
    n_params = num_params(params)
    b, t = args.batch, args.seq_len
    rng = np.random.default_rng(0)
    tokens = rng.integers(0, cfg.vocab_size, (b, t + 1), dtype=np.int64).astype(np.int32)
    lora = LoraConfig() if args.lora_rank is None else LoraConfig(rank=args.lora_rank)

    sides = {"ours full FT": ours(None, cfg, params, tokens), f"ours LoRA r{lora.rank}": ours(lora, cfg, params, tokens)}
    if not args.skip_hf:
        sides["HF full FT (torch AdamW)"] = theirs(str(fetch_smollm2()), tokens)
    for name, step in sides.items():  # warm-up: compilation, allocator
        t0 = time.perf_counter()
        step()
        print(f"warm-up {name}: {time.perf_counter() - t0:.1f} s", file=sys.stderr)
    times = {name: [] for name in sides}
    for _ in range(args.steps):
        for name, step in sides.items():
            times[name].append(timed(step))

    rates = gemm_rate(b * t, cfg.hidden_size, cfg.intermediate_size)
    gemm = max(rates.values())
    tokens_per_step = b * t
    attn = dict(num_layers=cfg.num_layers, seq_len=t, hidden=cfg.hidden_size)
    full_flops = train_flops_per_token(n_params, **attn)
    lora_flops = full_flops - 2.0 * n_params  # no weight gradients for frozen weights
    hf = statistics.median(times["HF full FT (torch AdamW)"]) if not args.skip_hf else None
    ours_full = statistics.median(times["ours full FT"])
    print(f"\nSmolLM2-135M fp32, {b} rows x {t} tokens, {n_params / 1e6:.1f}M params, {jax.device_count()} device(s), "
          f"torch threads {torch.get_num_threads()}; medians of {args.steps} steps")
    print(f"measured GEMM rate ({b * t}x{cfg.hidden_size}x{cfg.intermediate_size} fp32): jax "
          f"{rates['jax'] / 1e9:.1f} GFLOP/s, torch {rates['torch'] / 1e9:.1f} GFLOP/s\n")
    print(f"| side | s/step | tokens/s | vs HF | vs ours full | FLOPs/token | GFLOP/s | of GEMM rate |")
    print("|---|---|---|---|---|---|---|---|")
    for name, ts in times.items():
        s = statistics.median(ts)
        fpt = lora_flops if "LoRA" in name else full_flops
        tok_s = tokens_per_step / s
        vs_hf = f"{hf / s:.2f}x" if hf else "-"
        print(f"| {name} | {s:.3f} | {tok_s:.0f} | {vs_hf} | {ours_full / s:.2f}x | {fpt / 1e9:.2f} G | "
              f"{tok_s * fpt / 1e9:.1f} | {tok_s * fpt / gemm:.0%} |")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
