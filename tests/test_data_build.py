"""`sage-jax data build`: records == the in-memory tokenization, SFT/DPO from a built dataset == from
the JSONL (same first steps), refusal of other settings, bad input named, resume after interruption."""

import argparse
import json
import pickle

import numpy as np
import pytest

from sage_jax.data import build as build_mod
from sage_jax.data.build import (BuildSpec, BuiltMismatch, build_dataset, check_built, expected_settings,
                                 load_tokenizer, open_built, packed_row_count, split_built)
from sage_jax.data.cli import register
from sage_jax.data.encode import encode_dialogues, read_dialogues, split_eval
from sage_jax.data.jsonl import RecordError
from sage_jax.data.packing import pack_examples
from sage_jax.data.pipeline import DataConfig, make_iterator
from sage_jax.data.sample import sample_path

SAMPLE = sample_path("ed_train_200.jsonl")


def run(*argv) -> int:
    parser = argparse.ArgumentParser(prog="sage-jax")
    register(parser.add_subparsers(dest="command", required=True))
    args = parser.parse_args([str(a) for a in argv])
    return args.func(args)


def in_memory(tok, files, seq_len, latent_tokens=False):
    return encode_dialogues(read_dialogues(files, False), tok, None, seq_len, latent_tokens, "test")


@pytest.mark.parametrize("latent_tokens", [False, True])
def test_records_equal_in_memory_tokenization(tiny_dir, tmp_path, latent_tokens):
    out = tmp_path / "built"
    assert run("data", "build", "--inputs", SAMPLE, "-o", out, "--tokenizer", tiny_dir, "--seq-len", 128,
               "records_per_shard=50", f"latent_tokens={str(latent_tokens).lower()}", "--no-progress") == 0
    tok = load_tokenizer(tiny_dir, latent_tokens)
    want = in_memory(tok, [SAMPLE], 128, latent_tokens)
    ds = open_built(out)
    assert len(ds) == len(want) == ds.meta["counts"]["kept"] and ds.meta["items"] == 200
    assert len(ds.meta["shards"]) == -(-len(want) // 50)
    for i, e in enumerate(want):
        r = ds[i]
        np.testing.assert_array_equal(r["tokens"], e.tokens)
        np.testing.assert_array_equal(r["loss_mask"], e.loss_mask)
        np.testing.assert_array_equal(r["latent_mask"], e.latent_mask)
    assert any(e.latent_mask.any() for e in want)  # the latent masks compared are not all empty
    np.testing.assert_array_equal(ds.lengths(), [len(e.tokens) for e in want])
    for bins in (1, 4):  # row counts for the step plan, from lengths alone
        assert packed_row_count(ds, 128, bins) == len(pack_examples(want, 128, num_packing_bins=bins))
    rng = np.random.default_rng(0)  # and the count's algorithm against Grain's packer on random lengths
    fake = [{"tokens": np.zeros(n, np.int32), "loss_mask": np.zeros(n, bool)} for n in rng.integers(1, 130, 400)]
    for bins in (1, 3, 16):
        assert packed_row_count(fake, 128, bins) == len(pack_examples(fake, 128, num_packing_bins=bins))
    assert len(pickle.dumps(ds)) < 10_000  # what Grain workers receive: paths and metadata, no records


def test_built_split_and_per_host_batches_equal_jsonl(tiny_dir, tmp_path):
    tok = load_tokenizer(tiny_dir, False)
    build_dataset(BuildSpec("sft", (str(SAMPLE),), str(tmp_path / "b"), seq_len=128, progress=False), tok)
    ds = open_built(tmp_path / "b")
    train_d, eval_d = split_eval(read_dialogues([SAMPLE], False), 0.05, 3)
    want_train = encode_dialogues(train_d, tok, None, 128, False, "t")
    want_eval = encode_dialogues(eval_d, tok, None, 128, False, "e")
    train, held = split_built(ds, 0.05, 3)
    assert len(train) == len(want_train) and len(held) == len(want_eval) > 0
    for got, want in ((held, want_eval), ([train[i] for i in range(len(train))], want_train)):
        for r, e in zip(got, want):
            np.testing.assert_array_equal(r["tokens"], e.tokens)
    cfg = DataConfig(seq_len=128, batch_size=2, seed=5, num_epochs=None, num_packing_bins=4)
    for host in range(2):  # Grain's per-host slices: the same batches from either source
        a = make_iterator(train, cfg, process_index=host, process_count=2)
        b = make_iterator(want_train, cfg, process_index=host, process_count=2)
        for _ in range(6):
            x, y = next(a), next(b)
            for k in y:
                np.testing.assert_array_equal(x[k], y[k])


def _metrics(path):
    return [json.loads(x) for x in open(path)]


def test_sft_from_built_equals_jsonl(tiny_dir, tmp_path):
    from sage_jax.config import apply_overrides
    from sage_jax.train.sft import SFTConfig, run_sft

    tok = load_tokenizer(tiny_dir, False)
    build_dataset(BuildSpec("sft", (str(SAMPLE),), str(tmp_path / "b"), seq_len=128, progress=False), tok)
    results = {}
    for name, data in (("jsonl", SAMPLE), ("built", tmp_path / "b")):
        cfg = apply_overrides(SFTConfig(), [
            f"model.path={tiny_dir}", f"train_files=[{data}]", f"output_dir={tmp_path / name}", "seq_len=128",
            "batch_size=8", "max_steps=2", "eval_every=2", "save_every=0", "eval_fraction=0.05",
            "optim.learning_rate=5e-3", "tensorboard=false", "mesh.num_devices=1"])
        results[name] = run_sft(cfg)
    a, b = results["jsonl"], results["built"]
    assert (a["steps_per_epoch"], a["rows_per_step"]) == (b["steps_per_epoch"], b["rows_per_step"])
    la = [x for x in _metrics(a["metrics"]) if "loss" in x]
    lb = [x for x in _metrics(b["metrics"]) if "loss" in x]
    assert [x["step"] for x in la] == [x["step"] for x in lb] == [1, 2]
    for x, y in zip(la, lb):  # same rows in the same order: the same losses
        assert x["loss"] == pytest.approx(y["loss"], rel=1e-6, abs=1e-7)
    assert a["evals"] and [e["loss"] for e in a["evals"]] == pytest.approx([e["loss"] for e in b["evals"]], rel=1e-6)


def test_dpo_from_built_equals_jsonl(tiny_dir, tmp_path):
    from test_dpo import make_pairs

    from sage_jax.config import apply_overrides
    from sage_jax.train.dpo import DPORunConfig, run_dpo

    pairs = make_pairs(tmp_path / "pairs.jsonl", n=12)
    assert run("data", "build", "--inputs", pairs, "-o", tmp_path / "b", "--tokenizer", tiny_dir, "--kind", "dpo",
               "--seq-len", 192, "--no-progress") == 0
    results = {}
    for name, data in (("jsonl", pairs), ("built", tmp_path / "b")):
        cfg = apply_overrides(DPORunConfig(), [
            f"model.path={tiny_dir}", f"train_files=[{data}]", f"output_dir={tmp_path / name}", "seq_len=192",
            "batch_size=4", "max_steps=2", "eval_every=2", "save_every=0", "eval_fraction=0.2",
            "optim.learning_rate=5e-2", "optim.warmup_steps=0", "tensorboard=false", "mesh.num_devices=1"])
        results[name] = run_dpo(cfg)
    a, b = results["jsonl"], results["built"]
    la = [x for x in _metrics(a["metrics"]) if "dpo_loss" in x and "loss" in x]
    lb = [x for x in _metrics(b["metrics"]) if "dpo_loss" in x and "loss" in x]
    assert [x["step"] for x in la] == [x["step"] for x in lb] and la
    for x, y in zip(la, lb):
        assert x["loss"] == pytest.approx(y["loss"], rel=1e-6, abs=1e-7)
        assert x["dpo_loss"] == pytest.approx(y["dpo_loss"], rel=1e-6, abs=1e-7)
    assert a["evals"] and [e["loss"] for e in a["evals"]] == pytest.approx([e["loss"] for e in b["evals"]], rel=1e-6)
    # the same reference log-probs (the cache key covers every row, so one file name for both)
    ra, rb = (sorted((tmp_path / d).glob("reference_logps_*")) for d in ("jsonl", "built"))
    assert [p.name for p in ra] == [p.name for p in rb] and len(ra) == 2


def test_other_settings_are_refused(tiny_dir, tmp_path):
    from sage_jax.config import apply_overrides
    from sage_jax.train.sft import SFTConfig, run_sft

    tok = load_tokenizer(tiny_dir, False)
    build_dataset(BuildSpec("sft", (str(SAMPLE),), str(tmp_path / "b"), seq_len=128, progress=False), tok)
    ds = open_built(tmp_path / "b")
    check_built(ds, expected_settings("sft", tok, None, 128, False))  # the build's own settings pass
    other = load_tokenizer(tiny_dir, False)
    other.add_tokens(["<|not_in_the_build|>"])
    with pytest.raises(BuiltMismatch, match="tokenizer: built with 'sha256:"):
        check_built(ds, expected_settings("sft", other, None, 128, False))
    with pytest.raises(BuiltMismatch, match="seq_len: built with 128, the run has 256"):
        check_built(ds, expected_settings("sft", tok, None, 256, False))
    with pytest.raises(BuiltMismatch, match="kind: built with 'sft', the run has 'dpo'"):
        check_built(ds, expected_settings("dpo", tok, None, 128, False))
    # through sft: latent tokens change the tokenizer and the rendering
    cfg = apply_overrides(SFTConfig(), [f"model.path={tiny_dir}", f"train_files=[{tmp_path / 'b'}]",
                                        f"output_dir={tmp_path / 'run'}", "seq_len=128", "model.latent_tokens=true",
                                        "tensorboard=false", "mesh.num_devices=1"])
    with pytest.raises(BuiltMismatch, match=r"latent_tokens: built with False, the run has True.*tokenizer"):
        run_sft(cfg)


def _bad_file(tmp_path):
    lines = SAMPLE.read_text().splitlines()[:6]
    bad = json.loads(lines[2])
    bad["turns"][1]["role"] = "robot"
    lines[2] = json.dumps(bad)
    lines[4] = "{not json"
    p = tmp_path / "bad.jsonl"
    p.write_text("\n".join(lines) + "\n")
    return p


def test_bad_input_names_file_line_field(tiny_dir, tmp_path):
    p = _bad_file(tmp_path)
    with pytest.raises(RecordError, match=rf"{p}:3: turns\[1\]\.role: "):
        run("data", "build", "--inputs", p, "-o", tmp_path / "b", "--tokenizer", tiny_dir, "--strict", "--no-progress")
    assert not (tmp_path / "b" / "dataset.json").exists()
    # not strict: skipped and counted as the JSONL path does, the rest built identically
    tok = load_tokenizer(tiny_dir, False)
    meta = build_dataset(BuildSpec("sft", (str(p),), str(tmp_path / "b"), seq_len=128, progress=False), tok)
    assert meta["counts"]["skipped"] == 2 and meta["items"] == 4
    want = in_memory(tok, [p], 128)
    ds = open_built(tmp_path / "b")
    assert [ds[i]["tokens"].tolist() for i in range(len(ds))] == [e.tokens.tolist() for e in want]
    with pytest.raises(FileNotFoundError, match="no such input file"):
        build_dataset(BuildSpec("sft", (str(tmp_path / "missing.jsonl"),), str(tmp_path / "c")), tok)


def test_interrupted_build_resumes(tiny_dir, tmp_path, monkeypatch, capsys):
    tok = load_tokenizer(tiny_dir, False)
    spec = BuildSpec("sft", (str(SAMPLE),), str(tmp_path / "b"), seq_len=128, records_per_shard=40, progress=False)
    ref = build_dataset(BuildSpec("sft", (str(SAMPLE),), str(tmp_path / "ref"), seq_len=128, records_per_shard=40,
                                  progress=False), tok)
    real, calls = build_mod._encode_item, []

    def flaky(*a):
        calls.append(1)
        if len(calls) == 130:
            raise KeyboardInterrupt
        return real(*a)

    monkeypatch.setattr(build_mod, "_encode_item", flaky)
    with pytest.raises(KeyboardInterrupt):
        build_dataset(spec, tok)
    state = json.loads((tmp_path / "b" / "build_state.json").read_text())
    assert len(state["shards"]) >= 2 and not (tmp_path / "b" / "dataset.json").exists()
    with pytest.raises(FileNotFoundError, match="unfinished build"):
        open_built(tmp_path / "b")
    monkeypatch.setattr(build_mod, "_encode_item", real)
    calls.clear()
    meta = build_dataset(spec, tok)
    assert "resuming" in capsys.readouterr().err
    assert {k: meta[k] for k in ("records", "items", "counts", "shards")} == \
        {k: ref[k] for k in ("records", "items", "counts", "shards")}
    a, b = open_built(tmp_path / "b"), open_built(tmp_path / "ref")
    for i in range(len(a)):
        np.testing.assert_array_equal(a[i]["tokens"], b[i]["tokens"])
        np.testing.assert_array_equal(a[i]["loss_mask"], b[i]["loss_mask"])
    np.testing.assert_array_equal(a.dialogue_index, b.dialogue_index)
    # finished: a rerun is a no-op; other settings need overwrite
    assert build_dataset(spec, tok)["records"] == meta["records"]
    with pytest.raises(FileExistsError, match="overwrite=true"):
        build_dataset(BuildSpec("sft", (str(SAMPLE),), str(tmp_path / "b"), seq_len=64, progress=False), tok)
