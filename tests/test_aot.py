"""AOT check (sage_jax.aot, `sage-jax aot`): targets, lowering on an abstract 16-chip mesh, the per-device
memory table (exact bytes from shardings; fits / does not fit), a real compile on 8 simulated CPU
devices, and — where libtpu is installed — a real XLA:TPU compile for a v5e-16 from this CPU host."""

import json

import jax
import numpy as np
import pytest

from sage_jax.config import apply_overrides
from sage_jax import aot, cli
from sage_jax.model import param_axes, param_shapes
from sage_jax.train.sft import SFTConfig

GiB = 1024**3
TINY = {"model_type": "llama", "vocab_size": 1000, "hidden_size": 64, "intermediate_size": 128,
        "num_hidden_layers": 2, "num_attention_heads": 4, "num_key_value_heads": 2, "max_position_embeddings": 512,
        "rms_norm_eps": 1e-5, "tie_word_embeddings": False}


@pytest.fixture
def tiny_config(tmp_path):
    d = tmp_path / "tiny_cfg"  # only config.json: the check never reads weights
    d.mkdir()
    (d / "config.json").write_text(json.dumps(TINY))
    return d


def cfg_of(*overrides):
    return apply_overrides(SFTConfig(), list(overrides))


def test_targets():
    t = aot.parse_target("v5litepod-16")
    assert (t.platform, t.generation, t.chips, t.topology, t.hosts, t.hbm_gib) == ("tpu", "v5e", 16, "v5e:4x4", 4, 16.0)
    assert aot.parse_target("v5e-16") == aot.Target("v5e-16", *list(vars(t).values())[1:])
    assert aot.parse_target("v5litepod-8").hosts == 1 and aot.parse_target("v5e-32").topology == "v5e:4x8"
    v4 = aot.parse_target("v4-32")
    assert (v4.chips, v4.topology, v4.chip_config, v4.hosts, v4.hbm_gib) == (16, "v4:2x2x4", "megacore", 4, 32.0)
    assert aot.parse_target("v5p-64").topology == "v5p:2x4x4" and aot.parse_target("v5p-128").topology == "v5p:4x4x4"
    assert aot.parse_target("v6e-256").topology == "v6e:16x16" and aot.parse_target("v6e-8").hbm_gib == 32.0
    h = aot.parse_target("h100-16")
    assert (h.platform, h.chips, h.hosts, h.hbm_gib) == ("gpu", 16, 2, 80.0)
    for bad in ("v5litepod-12", "v3-8", "tpu", "v4-4"):
        with pytest.raises(ValueError):
            aot.parse_target(bad)


def test_lowering_on_an_abstract_16_chip_mesh(tiny_config):
    assert jax.device_count() == 8  # fewer real devices than the target: nothing is placed on them
    for mesh in (["mesh.fsdp=-1"], ["mesh.data=2", "mesh.fsdp=4", "mesh.tensor=2"]):
        for lora in ([], ["lora=null"]):
            cfg = cfg_of(f"model.path={tiny_config}", "batch_size=32", "seq_len=64", "optim.grad_accum_steps=2",
                         "model.remat=full", *mesh, *lora)
            r = aot.check(cfg, "v5litepod-16", mode="abstract")
            assert r.lowered, r.lower_error
            assert r.exit_code == 0 and r.fits and r.basis == "estimate" and r.tpu_compile is None
    assert r.mesh_shape == {"data": 2, "fsdp": 4, "tensor": 2, "expert": 1}
    lowered = aot.lower_abstract(aot.build_step(cfg, aot.resolve_model(cfg.model), aot.abstract_mesh((1, 16, 1, 1))),
                                 "tpu")
    text = lowered.as_text()
    assert "num_partitions = 16" in text and '"fsdp"=16' in text


def test_memory_table_exact_bytes_and_fits_vs_does_not_fit(tiny_config, capsys):
    cfg = cfg_of(f"model.path={tiny_config}", "lora=null", "batch_size=16", "seq_len=128", "mesh.fsdp=-1")
    r = aot.check(cfg, "v5litepod-16", mode="estimate")
    model_cfg = aot.resolve_model(cfg.model)
    # Independent count: leaves with an `embed` axis are split 16 ways (fsdp), the norms replicated.
    expected = 0
    for axes, shape in zip(jax.tree.leaves(param_axes(model_cfg), is_leaf=lambda x: isinstance(x, tuple)),
                           jax.tree.leaves(param_shapes(model_cfg), is_leaf=lambda x: isinstance(x, tuple))):
        expected += int(np.prod(shape)) * 4 // (16 if "embed" in axes else 1)
    rows = dict(r.estimate.rows)
    assert rows["trainable params (float32)"] == expected
    assert rows["optimizer state (AdamW moments)"] == pytest.approx(2 * expected, abs=64)  # + adam's counters
    assert rows["gradients (accumulator + micro-batch)"] == 2 * expected
    assert r.estimate.per_device_rows == 1 and rows["batch (1 x 16 rows x 128)"] == 1 * 128 * (4 * 4 + 1)
    assert r.fits and r.exit_code == 0 and r.estimate.total < 0.1 * GiB
    table = r.table()
    assert "verdict: FITS" in table and "HBM per chip (v5e)" in table and "16.000" in table

    # The paper's base model, fully fine-tuned in float32 on a v5e-16: nowhere near 16 GiB per chip.
    code = aot.main(["target=v5litepod-16", "mode=estimate", "model.path=mixtral-8x7b", "lora=null",
                     "batch_size=256", "seq_len=2048", f"json_out={tiny_config / 'aot.json'}"])
    out = capsys.readouterr().out
    assert code == 1 and "verdict: DOES NOT FIT" in out
    rep = json.loads((tiny_config / "aot.json").read_text())
    assert rep["fits"] is False and rep["num_params"] > 46e9 and rep["peak"] > 3 * 16 * GiB
    # ... while LoRA in bf16 with remat on a v5p-128 fits (params sharded 64 ways).
    assert aot.main(["target=v5p-128", "mode=estimate", "model.path=mixtral-8x7b",
                     "model.param_dtype=bfloat16", "model.dtype=bfloat16", "model.remat=full", "batch_size=64",
                     "seq_len=2048"]) == 0
    assert "verdict: FITS" in capsys.readouterr().out
    # `sage-jax aot` is the same command, with the same exit status.
    assert cli.main(["aot", "target=v5litepod-16", "mode=estimate", "model.path=mixtral-8x7b", "lora=null",
                     "batch_size=256", "seq_len=2048"]) == 1
    assert "verdict: DOES NOT FIT" in capsys.readouterr().out


def test_config_errors_and_sharding_warnings(tiny_config, capsys):
    # 6 rows cannot be split over 4 hosts: run_sft would refuse it on the pod -> exit 2.
    r = aot.check(cfg_of(f"model.path={tiny_config}", "batch_size=6", "seq_len=64"), "v5litepod-16", mode="estimate")
    assert r.exit_code == 2 and any("hosts x grad_accum_steps = 4 x 1" in e for e in r.errors)
    # 8 rows over fsdp=16: the batch would be replicated; 4 heads over tensor=8 are not split.
    r = aot.check(cfg_of(f"model.path={tiny_config}", "batch_size=8", "seq_len=64"), "v5litepod-16", mode="estimate")
    assert any("replicated on all 16 chips" in n for n in r.notes) and r.exit_code == 0
    r = aot.check(cfg_of(f"model.path={tiny_config}", "batch_size=8", "seq_len=64", "mesh.tensor=8"),
                  "v5litepod-16", mode="estimate")
    assert not any("replicated on all" in n for n in r.notes)  # data x fsdp = 2 divides 8 rows
    assert any("params/layers/q_proj: heads=4 is not divisible by tensor=8" in n for n in r.notes)
    assert aot.main(["target=v5litepod-16", f"model.path={tiny_config}", "mesh.fsdp=32"]) == 2  # 32 != 16 chips
    assert "needs 32 devices" in capsys.readouterr().err
    assert aot.main(["target=v5litepod-16", "model.path=/no/such/model"]) == 2
    assert aot.main([f"model.path={tiny_config}"]) == 2
    assert "target= is required" in capsys.readouterr().err


def test_compile_on_8_simulated_cpu_devices_gives_memory_analysis(tiny_config):
    cfg = cfg_of(f"model.path={tiny_config}", "batch_size=8", "seq_len=64", "mesh.data=2", "mesh.fsdp=4")
    r = aot.check(cfg, "v5litepod-8", mode="local")
    c = r.local_compile
    assert c is not None and c["ok"], c
    m = c["memory"]
    assert m["argument"] > 0 and m["temp"] > 0 and m["peak"] == (m["argument"] + m["output"] - m["alias"] + m["temp"]
                                                                 + m["generated_code"])
    assert m["alias"] > 0  # the train state is donated
    assert r.basis == "estimate" and r.exit_code == 0  # XLA:CPU numbers are shown, not used for a TPU verdict
    assert "compile on local devices (XLA:CPU, 8 local devices" in r.table()
    r = aot.check(cfg_of(f"model.path={tiny_config}", "batch_size=16", "seq_len=64"), "v5litepod-16", mode="local")
    assert not r.local_compile["ok"] and "needs 16 devices" in r.local_compile["error"] and r.exit_code == 2


@pytest.mark.skipif(not aot.tpu_compiler_available(), reason="libtpu not installed (pip install 'jax[tpu]')")
def test_xla_tpu_compile_for_v5e_16_from_a_cpu_host(tiny_config):
    cfg = cfg_of(f"model.path={tiny_config}", "batch_size=16", "seq_len=128", "model.dtype=bfloat16",
                 "model.remat=full")
    r = aot.check(cfg, "v5litepod-16", mode="auto")
    assert r.lowered and r.tpu_compile["ok"], r.tpu_compile
    assert r.basis == "compiled for TPU" and r.fits and "v5 lite" in r.tpu_compile["backend"]
    assert 0 < r.peak < GiB
    # A batch whose [T, T] attention scores cannot fit: XLA:TPU refuses it, reported as not fitting.
    big = cfg_of(f"model.path={tiny_config}", "batch_size=256", "seq_len=8192", "model.remat=none", "lora=null")
    r = aot.check(big, "v5litepod-16", mode="tpu")
    assert r.tpu_compile["oom"] and not r.fits and r.exit_code == 1
