"""SFT end to end on a tiny model: learning, metrics, export, and exact resume after SIGKILL/SIGTERM."""

import json
import os
import signal
import subprocess
import sys
import time

import numpy as np
import pytest
import torch
import transformers

from sage_jax import model
from sage_jax.data.sample import sample_path
from sage_jax.train.sft import SFTConfig, run_sft
from sage_jax.model.loader import ModelSpec, load_run


def overrides(tiny_dir, out, steps=8, extra=()):
    return [f"model.path={tiny_dir}", f"train_files=[{sample_path('ed_train_200.jsonl')}]", f"output_dir={out}",
            "seq_len=128", "batch_size=4", f"max_steps={steps}", "eval_every=0", "save_every=2",
            "eval_fraction=0.05", "optim.learning_rate=5e-3", "tensorboard=false", "mesh.num_devices=1", *extra]


def test_lora_sft_learns_and_exports(tiny_dir, tmp_path):
    from sage_jax.config import apply_overrides

    cfg = apply_overrides(SFTConfig(), overrides(tiny_dir, tmp_path / "run", steps=6,
                                                   extra=["eval_every=3", "optim.learning_rate=5e-2", "lora.rank=16",
                                                          "lora.targets=[q_proj,k_proj,v_proj,o_proj,gate_proj,up_proj,down_proj]"]))
    summary = run_sft(cfg)
    first, last = summary["evals"][0], summary["evals"][-1]
    assert last["loss"] < first["loss"]
    assert last["latent_accuracy"] > first["latent_accuracy"]
    lines = [json.loads(x) for x in open(summary["metrics"])]
    train_steps = [x["step"] for x in lines if "loss" in x]
    assert train_steps == list(range(1, 7))
    assert all(np.isfinite(x["loss"]) and x["tokens_per_s"] > 0 for x in lines if "loss" in x)
    # MFU over a measured peak, its basis written next to it
    assert all(0 < x["mfu"] < 1 and "measured" in x["mfu_basis"] for x in lines if "loss" in x)

    # export-hf of the LoRA run: transformers loads it, same logits as our merged model.
    cfg_m, params, tok_dir, step = load_run(tmp_path / "run")
    assert step == 6
    out = model.save_hf(tmp_path / "hf", cfg_m, params, tokenizer=transformers.AutoTokenizer.from_pretrained(tok_dir))
    hf = transformers.AutoModelForCausalLM.from_pretrained(out, dtype=torch.float32).eval()
    tokens = np.arange(3, 40, dtype=np.int32)[None]
    ours = np.asarray(model.forward(cfg_m, params, tokens)[0])
    with torch.no_grad():
        theirs = hf(torch.tensor(tokens, dtype=torch.long)).logits.numpy()
    np.testing.assert_allclose(ours, theirs, atol=1e-4)  # logits of magnitude ~10: float32 rounding
    base_cfg, base = model.load_hf(tiny_dir)
    assert np.max(np.abs(np.asarray(model.forward(base_cfg, base, tokens)[0]) - ours)) > 1e-4  # LoRA changed it


def _cmd(tiny_dir, out):
    return [sys.executable, "-m", "sage_jax.cli", "sft", *overrides(tiny_dir, out, steps=8, extra=["lora=null"])]


def _env(tmp_path):
    env = dict(os.environ, JAX_ENABLE_COMPILATION_CACHE="true", JAX_COMPILATION_CACHE_DIR=str(tmp_path / "jax_cache"),
               JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS="0", XLA_FLAGS="", JAX_PLATFORMS="cpu")
    return env


def _logged_steps(out):
    f = out / "logs" / "metrics.jsonl"
    if not f.exists():
        return []
    steps = []
    for line in f.read_text().splitlines():
        try:
            rec = json.loads(line)
        except ValueError:  # a line torn by SIGKILL
            continue
        if "loss" in rec:  # training steps (eval lines carry eval/* keys)
            steps.append(rec["step"])
    return steps


def _run_until(cmd, env, out, step, sig, timeout=240):
    proc = subprocess.Popen(cmd, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    t0 = time.time()
    while max(_logged_steps(out), default=0) < step:
        if proc.poll() is not None:
            raise AssertionError(f"run ended early: {proc.stderr.read().decode()[-2000:]}")
        if time.time() - t0 > timeout:
            proc.kill()
            raise AssertionError("timed out waiting for training progress")
        time.sleep(0.05)
    proc.send_signal(sig)
    proc.wait(timeout=120)
    return proc


def test_resume_after_sigkill_and_sigterm_is_exact(tiny_dir, tmp_path):
    env = _env(tmp_path)
    ref_out, out = tmp_path / "ref", tmp_path / "killed"
    subprocess.run(_cmd(tiny_dir, ref_out), env=env, check=True, capture_output=True)

    # SIGKILL mid-run: whatever was not checkpointed is lost, the restart resumes from the last save.
    _run_until(_cmd(tiny_dir, out), env, out, 3, signal.SIGKILL)
    # SIGTERM (preemption): a final checkpoint at the step it reached, clean exit.
    proc = _run_until(_cmd(tiny_dir, out), env, out, 5, signal.SIGTERM)
    assert proc.returncode == 0, proc.stderr.read().decode()[-2000:]
    from sage_jax.train.checkpoint import Checkpointer

    ck = Checkpointer(out / "checkpoints", save_every=2, read_only=True)
    assert ck.latest_step() == max(_logged_steps(out))
    ck.close()
    subprocess.run(_cmd(tiny_dir, out), env=env, check=True, capture_output=True)

    _, ref_params, _, ref_step = load_run(ref_out)
    _, params, _, step = load_run(out)
    assert step == ref_step == 8
    diffs = [float(np.max(np.abs(np.asarray(a) - np.asarray(b))))
             for a, b in zip(jax_leaves(params), jax_leaves(ref_params))]
    assert max(diffs) <= 1e-6, max(diffs)
    assert _logged_steps(out) == list(range(1, 9))  # resumed logs: every step once


def jax_leaves(tree):
    import jax

    return jax.tree.leaves(tree)
