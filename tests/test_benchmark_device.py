"""The benchmarks' shared decode timer and the accelerator check (`benchmarks/device.py`), run at a
tiny size on CPU: what they time is the real decode and the real SFT step, and the MFU arithmetic
is what the docstring says."""

import json
import math
import subprocess
import sys
from pathlib import Path

import jax
import numpy as np

from sage_jax import model, rollout

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from benchmarks.decoding import CompiledDecode  # noqa: E402
from benchmarks.device import SHAPES  # noqa: E402


def test_compiled_decode_times_what_generate_returns():
    cfg = model.ModelConfig(**SHAPES["tiny"])
    params = model.init_params(cfg, jax.random.key(0), std=0.5)
    prompts = np.random.default_rng(0).integers(0, cfg.vocab_size, (3, 5)).tolist()
    sp = rollout.SamplingParams.greedy_params(7, min_new_tokens=7)
    want = [g.tokens for g in rollout.generate(cfg, params, prompts, sp)]
    for p in (params, model.decode_layout(params)):
        dec = CompiledDecode.of(cfg, p, prompts, sp, 7)
        for _ in range(2):  # the prefilled state survives a run (decode donates a copy)
            per_step, tokens = dec.run()
            assert per_step > 0 and tokens.tolist() == want


def test_device_check_on_cpu_writes_its_table(tmp_path):
    out = tmp_path / "out"
    done = subprocess.run(
        [sys.executable, str(ROOT / "benchmarks" / "device.py"), "--model", "tiny", "--dtype", "float32",
         "--param-dtype", "float32", "--batch", "2", "--seq-len", "32", "--steps", "1", "--decode-batches", "1", "2",
         "--prompt-len", "4", "--new-tokens", "4", "--repeats", "1", "--gemm", "128", "--out", str(out)],
        capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-3000:]
    assert "## SFT step" in done.stdout and "## Greedy decode" in done.stdout
    r = json.loads((out / "device.json").read_text())
    cfg = SHAPES["tiny"]
    assert r["model"] == "tiny" and r["params"] == model.num_params(
        model.init_params(model.ModelConfig(**cfg), jax.random.key(0)))
    sft = r["sft"]
    # random init (std 0.02): near-uniform logits, so the first loss is about ln(vocab)
    assert abs(sft["first_loss"] - math.log(cfg["vocab_size"])) < 0.1
    assert sft["flops_per_token"] == 6 * r["params"] + 12 * cfg["num_layers"] * 32 * cfg["hidden_size"]
    assert math.isclose(sft["tokens_per_s"], 2 * 32 / sft["step_s"])
    assert math.isclose(sft["mfu"], sft["tokens_per_s"] * sft["flops_per_token"] / r["peak_flops"])
    assert "CPU" in r["peak_label"]  # the host's measured rate, not a vendor figure
    assert [d["batch"] for d in r["decode"]] == [1, 2]
    assert all(d["stacked"] > 0 and d["per-layer"] > 0 for d in r["decode"])
