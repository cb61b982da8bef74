"""Multi-host training on CPU: two real `jax.distributed` processes on loopback (2 simulated CPU
devices each, gloo collectives) run the real `run_sft`, then the sharded LoRA SFT step directly on
the same global 4-device mesh (adapters and base params sharded across the hosts), with a
checkpoint save and restore.

Checked: both processes finish; they agree on every loss (train and eval); the per-host data
iterator states land in one checkpoint; the restored state equals the saved one bit for bit;
the step after a restore equals the step without it; and the 2-process loss equals a
single-process step on the same global batch.
"""

import json
import os
import socket
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import numpy as np
import pytest

REPO = Path(__file__).resolve().parents[1]
SEQ, ROWS = 128, 4  # global batch: 4 rows (2 per host) of 128 tokens, the shape run_sft uses below

SCRIPT = textwrap.dedent("""
    import json, os, sys, time
    pid, tiny, root, out = int(sys.argv[1]), sys.argv[2], sys.argv[3], sys.argv[4]
    t00 = time.time()
    import jax
    try:  # cross-process CPU collectives (older jaxlibs had no gloo and no such option)
        jax.config.update("jax_cpu_collectives_implementation", "gloo")
    except Exception as e:
        print("NO_GLOO", e, flush=True)
        raise SystemExit(3)
    import numpy as np
    from sage_jax import parallel
    from sage_jax.config import apply_overrides
    from sage_jax.data.sample import sample_path
    from sage_jax.train.sft import SFTConfig, run_sft

    t0 = time.time()
    res = {"process": pid, "t_import": t0 - t00}
    # 1) The real SFT runner (it calls parallel.initialize_distributed(), which reads
    #    JAX_COORDINATOR_ADDRESS / JAX_NUM_PROCESSES / JAX_PROCESS_ID).
    cfg = apply_overrides(SFTConfig(), [
        f"model.path={tiny}", f"train_files=[{sample_path('ed_train_200.jsonl')}]", f"output_dir={root}/sft",
        "seq_len=128", "batch_size=4", "max_steps=2", "eval_every=0", "save_every=2", "eval_fraction=0.01",
        "optim.learning_rate=5e-3", "tensorboard=false", "vocab_chunk=16384"])
    summary = run_sft(cfg)
    res["process_count"], res["device_count"] = jax.process_count(), jax.device_count()
    res["sft"] = {"steps": summary["steps"], "evals": summary["evals"]}
    res["t_sft"] = time.time() - t0

    # 2) The same sharded LoRA step on the same global mesh (data=1, fsdp=4 over both hosts), driven
    #    directly: its own batch, a checkpoint save and restore. Same program as run_sft's, so the
    #    persistent compilation cache (JAX_COMPILATION_CACHE_DIR) makes its compile a cache hit.
    from sage_jax.model import load_hf
    from sage_jax.model.lora import LoraConfig
    from sage_jax.train import steps
    from sage_jax.train.checkpoint import Checkpointer, abstract_like
    from sage_jax.train.trainer import init_train_state, to_global

    mesh = parallel.make_mesh(parallel.MeshConfig())
    model_cfg, params = load_hf(tiny, param_dtype="float32", dtype="float32", remat="none")
    spec = steps.StepSpec(model_cfg, lora=LoraConfig(), vocab_chunk=16384)
    tx = steps.make_optimizer(steps.OptimConfig(learning_rate=5e-3), 2)
    state, s_shard, frozen, f_shard = init_train_state(spec, tx, params, 0, mesh)
    res["t_init"] = time.time() - t0
    glob = np.load(f"{root}/batch.npz")  # [A=1, ROWS, SEQ] global arrays; this host takes its rows
    half = glob["inputs"].shape[1] // 2
    local = {k: glob[k][:, pid * half:(pid + 1) * half] for k in glob.files}
    b_shard = steps.batch_shardings({k: glob[k] for k in glob.files}, mesh)
    step_fn = steps.compile_step(steps.sft_train_step, spec, tx, state_sharding=s_shard,
                                 frozen_sharding=f_shard, batch_sharding=b_shard)
    batch = to_global(local, b_shard)
    state, m = step_fn(state, frozen, batch)
    res["loss1"] = float(m["loss"])
    res["t_step1"] = time.time() - t0
    res["grad_norm1"] = float(m["grad_norm"])
    import grain

    data = iter(grain.MapDataset.range(100)[pid::2].to_iter_dataset())  # this host's own data position
    next(data)
    with Checkpointer(f"{root}/steps_ckpt", save_every=1) as ck:
        ck.save(1, state=state, data_iter=data, config={"mesh": [2, 2]}, force=True)
        ck.wait()
        data = iter(grain.MapDataset.range(100)[pid::2].to_iter_dataset())
        r = ck.restore(abstract_like(state), data_iter=data)
    res["t_ckpt"] = time.time() - t0

    def shards(tree):
        out = []
        for x in jax.tree.leaves(tree):
            if jax.dtypes.issubdtype(x.dtype, jax.dtypes.prng_key):
                x = jax.random.key_data(x)
            out.append((x.sharding, [(s.index, np.asarray(s.data)) for s in x.addressable_shards]))
        return out

    same = r.step == 1 and r.data_restored and next(data) == pid + 2
    for (sa, a), (sb, b) in zip(shards(state), shards(r.state)):
        same &= sa == sb and len(a) == len(b)
        same &= all(ia == ib and np.array_equal(xa, xb) for (ia, xa), (ib, xb) in zip(a, b))
    res["restored_equal"] = bool(same)
    res["sharded_across_hosts"] = not (state["params"]["layers"]["lora"]["q_proj"]["a"].is_fully_addressable
                                       or frozen["embed"].is_fully_addressable)
    state, m2 = step_fn(state, frozen, batch)
    restored, m2r = step_fn(r.state, frozen, batch)
    res["loss2"], res["loss2_restored"] = float(m2["loss"]), float(m2r["loss"])
    res["t_total"] = time.time() - t0
    with open(out, "w") as f:
        json.dump(res, f)
""")


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("localhost", 0))
        return s.getsockname()[1]


def _global_batch(vocab: int) -> dict:
    rng = np.random.default_rng(0)
    tokens = rng.integers(3, vocab, size=(1, ROWS, SEQ + 1)).astype(np.int32)
    mask = np.ones((1, ROWS, SEQ), bool)
    mask[:, :, : SEQ // 4] = False  # a "prompt" without loss
    seg = np.ones((1, ROWS, SEQ), np.int32)
    seg[:, 1, SEQ // 2:] = 2  # one packed row with two segments
    pos = np.broadcast_to(np.arange(SEQ, dtype=np.int32), (1, ROWS, SEQ)).copy()
    pos[:, 1, SEQ // 2:] -= SEQ // 2
    return {"inputs": tokens[..., :-1], "targets": tokens[..., 1:], "loss_mask": mask, "segment_ids": seg,
            "positions": pos}


def _single_process_losses(tiny_dir, batch: dict) -> tuple[float, float]:
    """The same two steps on one device of this (pytest) process."""
    import jax

    from sage_jax import parallel
    from sage_jax.model import load_hf
    from sage_jax.model.lora import LoraConfig
    from sage_jax.train import steps
    from sage_jax.train.trainer import init_train_state

    mesh = parallel.make_mesh(parallel.MeshConfig(num_devices=1))
    cfg, params = load_hf(tiny_dir)
    spec = steps.StepSpec(cfg, lora=LoraConfig(), vocab_chunk=16384)
    tx = steps.make_optimizer(steps.OptimConfig(learning_rate=5e-3), 2)
    state, s_shard, frozen, f_shard = init_train_state(spec, tx, params, 0, mesh)
    b_shard = steps.batch_shardings(batch, mesh)
    fn = steps.compile_step(steps.sft_train_step, spec, tx, state_sharding=s_shard, frozen_sharding=f_shard,
                            batch_sharding=b_shard)
    dev = jax.device_put(batch, b_shard)
    state, m1 = fn(state, frozen, dev)
    state, m2 = fn(state, frozen, dev)
    return float(m1["loss"]), float(m2["loss"])


def test_two_process_sft_and_checkpoint_on_global_mesh(tiny_dir, tmp_path):
    from sage_jax.model import load_hf

    cfg, _ = load_hf(tiny_dir)
    batch = _global_batch(cfg.vocab_size)
    np.savez(tmp_path / "batch.npz", **batch)
    script = tmp_path / "worker.py"
    script.write_text(SCRIPT)
    port = _free_port()
    procs = []
    for pid in range(2):
        env = {**os.environ, "PYTHONPATH": f"{REPO}{os.pathsep}{os.environ.get('PYTHONPATH', '')}",
               "JAX_PLATFORMS": "cpu", "XLA_FLAGS": "--xla_force_host_platform_device_count=2",
               "JAX_COORDINATOR_ADDRESS": f"localhost:{port}", "JAX_NUM_PROCESSES": "2",
               "JAX_PROCESS_ID": str(pid), "TOKENIZERS_PARALLELISM": "false", "HF_HUB_OFFLINE": "1",
               "JAX_COMPILATION_CACHE_DIR": str(tmp_path / "jax_cache"), "JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS": "0",
               "JAX_ENABLE_COMPILATION_CACHE": "true"}
        procs.append(subprocess.Popen(
            [sys.executable, str(script), str(pid), str(tiny_dir), str(tmp_path), str(tmp_path / f"out{pid}.json")],
            env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT))
    outs = []
    t0 = time.time()
    try:
        for p in procs:
            outs.append(p.communicate(timeout=max(10.0, 180 - (time.time() - t0)))[0].decode(errors="replace"))
    finally:
        for p in procs:
            if p.poll() is None:
                p.kill()
    if any(p.returncode == 3 and "NO_GLOO" in o for p, o in zip(procs, outs)):
        pytest.skip("this jaxlib has no gloo CPU collectives (jax_cpu_collectives_implementation)")
    for p, out in zip(procs, outs):
        assert p.returncode == 0, out[-4000:]
    res = [json.loads((tmp_path / f"out{i}.json").read_text()) for i in range(2)]

    for r in res:
        assert (r["process_count"], r["device_count"]) == (2, 4)
        assert r["sft"]["steps"] == 2
        assert r["restored_equal"], "restored state differs from the saved one"
        assert r["sharded_across_hosts"]
        assert r["loss2"] == r["loss2_restored"], "the step after restore differs"
    # Both hosts computed the same losses (they are replicated global values).
    assert res[0]["sft"]["evals"] == res[1]["sft"]["evals"]
    assert len(res[0]["sft"]["evals"]) == 2 and all(np.isfinite(e["loss"]) for e in res[0]["sft"]["evals"])
    for k in ("loss1", "grad_norm1", "loss2"):
        assert res[0][k] == res[1][k], k
    # The run_sft checkpoint holds each host's own data-iterator state.
    names = sorted(p.name for p in (tmp_path / "sft" / "checkpoints" / "2" / "data").glob("process_*"))
    assert names == ["process_0-of-2.json", "process_1-of-2.json"]
    assert (tmp_path / "sft" / "logs" / "metrics.jsonl").exists()
    # 2 processes x 2 devices (fsdp=4) == one device on the same global batch.
    ref1, ref2 = _single_process_losses(tiny_dir, batch)
    np.testing.assert_allclose([res[0]["loss1"], res[0]["loss2"]], [ref1, ref2], rtol=2e-5)
