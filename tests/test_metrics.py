"""Metrics: deferred fetch of device values, JSONL + TensorBoard, resume truncation; progress; MFU."""

import io
import json
import math
import struct
from types import SimpleNamespace

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from sage_jax.progress import progress
from sage_jax.train.metrics import (MetricsWriter, mfu, peak_flops_info, peak_flops_per_device, read_jsonl,
                                    train_flops_per_token, truncate_jsonl)


def tb_scalars(log_dir):
    """{tag: [(step, value)]} parsed from the TFRecord event files (no tensorboard needed)."""
    from tensorboardX.proto import event_pb2

    out = {}
    files = sorted(log_dir.glob("events.out.tfevents.*"))
    assert files, "no TensorBoard event file"
    for path in files:
        data = path.read_bytes()
        pos = 0
        while pos + 12 <= len(data):
            (length,) = struct.unpack("<Q", data[pos:pos + 8])
            rec = data[pos + 12:pos + 12 + length]
            pos += 12 + length + 4
            ev = event_pb2.Event.FromString(rec)
            for v in ev.summary.value:
                out.setdefault(v.tag, []).append((ev.step, v.simple_value))
    return out


@jax.jit
def fake_step(x):
    return {"loss": jnp.mean(x ** 2), "tokens": jnp.sum(jnp.ones_like(x, dtype=jnp.int32))}


def test_device_values_written_late_with_right_steps(tmp_path):
    w = MetricsWriter(tmp_path, tensorboard=True)
    path = tmp_path / "metrics.jsonl"
    expected = {}
    for step in range(1, 6):
        x = jnp.arange(4, dtype=jnp.float32) * step
        m = fake_step(x)  # device arrays, maybe still computing
        w.write(step, {**m, "lr": 1e-3 * step})
        expected[step] = (float(np.mean(np.asarray(x) ** 2)), 4, 1e-3 * step)
        # Deferred: the newest step is still pending, older ones are on disk already.
        assert [r["step"] for r in read_jsonl(path)] == list(range(1, step))
    w.close()
    recs = read_jsonl(path)
    assert [r["step"] for r in recs] == [1, 2, 3, 4, 5]
    for r in recs:
        loss, tokens, lr = expected[r["step"]]
        assert r["loss"] == pytest.approx(loss) and r["tokens"] == tokens and isinstance(r["tokens"], int)
        assert r["lr"] == pytest.approx(lr) and r["time"] > 0
    assert w.last_step == 5 and w.last["loss"] == pytest.approx(expected[5][0])
    sc = tb_scalars(tmp_path)
    assert [s for s, _ in sc["loss"]] == [1, 2, 3, 4, 5]
    assert [v for _, v in sc["loss"]] == pytest.approx([expected[s][0] for s in range(1, 6)])


def test_flush_writes_pending_and_nan_survives(tmp_path):
    with MetricsWriter(tmp_path, tensorboard=False, lag=3) as w:
        w.write(1, {"loss": jnp.float32(jnp.nan), "vec": jnp.arange(3)})
        w.write(2, {"loss": np.float64(0.5)})
        assert not (tmp_path / "metrics.jsonl").read_text()
        w.flush()
        recs = read_jsonl(tmp_path / "metrics.jsonl")
        assert [r["step"] for r in recs] == [1, 2]
        assert math.isnan(recs[0]["loss"]) and recs[0]["vec"] == [0, 1, 2] and recs[1]["loss"] == 0.5
    assert not list(tmp_path.glob("events.out.tfevents.*"))


def test_resume_truncates_and_appends_without_duplicates(tmp_path):
    with MetricsWriter(tmp_path, tensorboard=True) as w:
        for s in range(1, 11):
            w.write(s, {"loss": jnp.float32(s)})
    with open(tmp_path / "metrics.jsonl", "a") as f:
        f.write('{"step": 11, "lo')  # a torn last line from a crash
    # The checkpoint we resume from is at step 6: steps 7.. are redone.
    with MetricsWriter(tmp_path, tensorboard=True, resume_step=6) as w:
        assert [r["step"] for r in read_jsonl(tmp_path / "metrics.jsonl")] == [1, 2, 3, 4, 5, 6]
        for s in range(7, 9):
            w.write(s, {"loss": jnp.float32(100 + s)})
    recs = read_jsonl(tmp_path / "metrics.jsonl")
    assert [r["step"] for r in recs] == [1, 2, 3, 4, 5, 6, 7, 8]
    assert [r["loss"] for r in recs] == [1, 2, 3, 4, 5, 6, 107, 108]
    assert truncate_jsonl(tmp_path / "metrics.jsonl", 100) == 8  # nothing to drop
    assert truncate_jsonl(tmp_path / "nope.jsonl", 3) == 0


def test_disabled_writer_writes_and_fetches_nothing(tmp_path):
    w = MetricsWriter(tmp_path / "m", enabled=False)
    w.write(1, {"loss": jnp.float32(1)})
    w.close()
    assert not (tmp_path / "m").exists()


def test_progress_bar_shows_rate_eta_and_postfix():
    buf = io.StringIO()
    bar = progress(10, "train", unit="step", show=True, file=buf)
    for i in range(10):
        bar.update(1, postfix={"loss": 1.0 / (i + 1), "lr": np.float32(3e-4), "dev": jnp.float32(1),
                               "n": np.int64(i), "phase": "warm"})
    bar.close()
    text = buf.getvalue()
    assert bar.n == 10
    assert "train" in text and "10/10" in text and "step/s" in text and "loss=0.1" in text
    assert "<00:00" in text  # elapsed<remaining (ETA)
    assert "dev=" not in text  # device arrays are never synced by the bar
    assert "n=9" in text and "phase=warm" in text and "lr=0.0003" in text
    with progress(None, "unbounded", initial=5, show=False) as p:
        p.update(2)
        assert p.n == 7
    buf = io.StringIO()
    with progress(None, "bytes", unit="B", unit_scale=True, initial=5, show=False, file=buf) as p:
        p.update(2_000_000)
    assert buf.getvalue() == ""  # hidden: nothing drawn, still counted
    buf = io.StringIO()
    with progress(3_000_000, "read", unit="B", unit_scale=True, show=True, file=buf) as p:
        p.update(3_000_000)
    assert "3.00M/3.00M" in buf.getvalue() and "B/s" in buf.getvalue()


def test_progress_helper_imports_nothing_of_ours():
    import subprocess
    import sys

    code = ("import sys, sage_jax.progress as p; bar = p.progress(2, show=False); bar.update(2); bar.close(); "
            "print(sorted(m for m in sys.modules if m.startswith('sage_jax')), 'jax' in sys.modules)")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout.split("\n")[0]
    assert out == "['sage_jax', 'sage_jax.progress'] False"


def test_peak_flops_table_and_mfu():
    dev = lambda kind, platform="tpu": SimpleNamespace(device_kind=kind, platform=platform)  # noqa: E731
    assert peak_flops_per_device(dev("TPU v4")) == 275e12
    assert peak_flops_per_device(dev("TPU v5 lite")) == 197e12
    assert peak_flops_per_device(dev("TPU v5e")) == 197e12
    assert peak_flops_per_device(dev("TPU v5p")) == 459e12
    assert peak_flops_per_device(dev("TPU v6 lite")) == 918e12
    assert peak_flops_per_device(dev("NVIDIA H100 80GB HBM3", "gpu")) == 989e12
    assert peak_flops_per_device(dev("NVIDIA H200", "gpu")) == 989e12
    assert peak_flops_per_device(dev("NVIDIA H100 PCIe", "gpu")) == 756e12
    flops, label = peak_flops_info(jax.devices()[0])  # this CPU
    assert flops == 150e9 and "estimate" in label
    assert math.isnan(peak_flops_per_device(dev("Mystery 9000", "gpu")))
    assert train_flops_per_token(1000) == 6000
    assert train_flops_per_token(1000, num_layers=2, seq_len=8, hidden=4) == 6000 + 12 * 2 * 8 * 4
    assert train_flops_per_token(1000, lora=True) == 4000  # frozen weights: no weight gradients
    assert mfu(1000.0, 6e9, 12e12) == pytest.approx(0.5)
    assert math.isnan(mfu(1.0, 1.0, math.nan))


def test_jsonl_lines_are_plain_json(tmp_path):
    with MetricsWriter(tmp_path, tensorboard=False, lag=0) as w:
        w.write(3, {"loss": jnp.float32(0.25), "ok": True, "name": "sft"})
        line = (tmp_path / "metrics.jsonl").read_text().strip()  # lag=0: written at once
    assert json.loads(line)["step"] == 3 and json.loads(line)["ok"] is True and json.loads(line)["name"] == "sft"


def test_cpu_peak_is_measured_once_for_the_host_and_labelled():
    from sage_jax.train.metrics import measured_cpu_gemm_flops, process_peak_flops

    flops, label = process_peak_flops()
    assert flops == measured_cpu_gemm_flops() > 1e8 and "measured" in label  # not the 150 GFLOP/s guess
    many, label8 = process_peak_flops([jax.devices()[0]] * 8)  # simulated devices share the host's cores
    assert many == flops and label8 == label
    tpu = SimpleNamespace(device_kind="TPU v4", platform="tpu")
    assert process_peak_flops([tpu] * 4) == (4 * 275e12, "4 x TPU v4 bf16")
