"""Packing and the Grain pipeline: nothing lost, no leaks across segments, host shards, exact resume."""

import collections
import json

import grain
import numpy as np
import pytest

from sage_jax.data.packing import (ExampleTooLongError, check_packed_rows, empty_row, pack_examples,
                                   shift_example, unpack_row)
from sage_jax.data.pipeline import DataConfig, make_dataset, make_iterator, state_from_bytes, state_to_bytes

KEYS = ("inputs", "targets", "loss_mask", "latent_mask", "segment_ids", "positions")


def synthetic_examples(n, seq_len, seed=0, min_len=1):
    """Random tokenized examples (the tokenizer contract): lengths 1..seq_len+1, random tokens/masks."""
    rng = np.random.default_rng(seed)
    out = []
    for _ in range(n):
        t = int(rng.integers(min_len, seq_len + 2))
        out.append({"tokens": rng.integers(1, 50_000, t).astype(np.int32),
                    "loss_mask": rng.random(t) < 0.6})
    return out


def key_of(inputs, targets, mask):
    return (np.asarray(inputs, np.int32).tobytes(), np.asarray(targets, np.int32).tobytes(),
            np.asarray(mask, bool).tobytes())


def expected_counter(examples, repeats=1):
    c = collections.Counter()
    for ex in examples:
        if len(ex["tokens"]) >= 2:
            c[key_of(ex["tokens"][:-1], ex["tokens"][1:], ex["loss_mask"][1:])] += repeats
    return c


def rows_of(batches):
    for b in batches:
        for r in range(b["inputs"].shape[0]):
            yield {k: b[k][r] for k in KEYS}


def packed_counter(rows):
    c = collections.Counter()
    for row in rows:
        for seg in unpack_row(row):
            c[key_of(seg["inputs"], seg["targets"], seg["loss_mask"])] += 1
    return c


def assert_batches_equal(a, b):
    assert len(a) == len(b)
    for x, y in zip(a, b):
        assert sorted(x) == sorted(y)
        for k in x:
            np.testing.assert_array_equal(x[k], y[k])
            assert x[k].dtype == y[k].dtype


# ------------------------------------------------------------------------------------- packing
def test_packed_row_exact_layout():
    ex = [{"tokens": np.array([1, 2, 3, 4], np.int32), "loss_mask": np.array([0, 0, 1, 1], bool)},
          {"tokens": np.array([5, 6, 7], np.int32), "loss_mask": np.array([0, 1, 1], bool)}]
    (row,) = pack_examples(ex, seq_len=8, num_packing_bins=1)
    np.testing.assert_array_equal(row["inputs"], [1, 2, 3, 5, 6, 0, 0, 0])
    np.testing.assert_array_equal(row["targets"], [2, 3, 4, 6, 7, 0, 0, 0])
    np.testing.assert_array_equal(row["loss_mask"], [0, 1, 1, 1, 1, 0, 0, 0])
    np.testing.assert_array_equal(row["segment_ids"], [1, 1, 1, 2, 2, 0, 0, 0])
    np.testing.assert_array_equal(row["positions"], [0, 1, 2, 0, 1, 0, 0, 0])
    np.testing.assert_array_equal(row["latent_mask"], np.zeros(8, bool))  # no latent_mask given
    assert {k: row[k].dtype for k in KEYS} == {"inputs": np.int32, "targets": np.int32, "loss_mask": bool,
                                               "latent_mask": bool, "segment_ids": np.int32,
                                               "positions": np.int32}
    check_packed_rows(row)


@pytest.mark.parametrize("bins", [1, 4, 16])
def test_packing_keeps_every_target_once_and_no_cross_segment_leak(bins):
    seq_len = 32
    ex = synthetic_examples(300, seq_len, seed=bins)
    rows = pack_examples(ex, seq_len, num_packing_bins=bins)
    assert packed_counter(rows) == expected_counter(ex)
    # The supervised targets, counted in the rows, equal those of the sources (nothing lost/duplicated).
    src_targets = collections.Counter(int(t) for e in ex for t, m in zip(e["tokens"][1:], e["loss_mask"][1:]) if m)
    row_targets = collections.Counter(int(t) for r in rows for t in r["targets"][r["loss_mask"]])
    assert row_targets == src_targets
    for row in rows:
        check_packed_rows(row)
        seg, pos = row["segment_ids"], row["positions"]
        assert row["inputs"].shape == (seq_len,)
        # Within a segment the target of token t is the input of token t+1; at a segment's last
        # token it is that example's final token, never the next segment's first input.
        same = (seg[:-1] == seg[1:]) & (seg[:-1] > 0)
        np.testing.assert_array_equal(row["targets"][:-1][same], row["inputs"][1:][same])
        # A same-segment causal mask lets each token see exactly its own example's prefix.
        attend = (seg[:, None] == seg[None, :]) & (np.arange(seq_len)[:, None] >= np.arange(seq_len)[None, :])
        for t in np.nonzero(seg)[0]:
            seen = np.nonzero(attend[t])[0]
            assert seen[0] == t - pos[t] and len(seen) == pos[t] + 1
        assert not row["loss_mask"][seg == 0].any()


def test_full_length_example_fills_a_row_and_short_ones_are_dropped():
    seq_len = 8
    full = {"tokens": np.arange(1, seq_len + 2, dtype=np.int32), "loss_mask": np.ones(seq_len + 1, bool)}
    tiny = {"tokens": np.array([9], np.int32), "loss_mask": np.array([True])}
    empty = {"tokens": np.zeros((0,), np.int32), "loss_mask": np.zeros((0,), bool)}
    assert shift_example(tiny, seq_len) is None and shift_example(empty, seq_len) is None
    rows = pack_examples([tiny, full, empty], seq_len, num_packing_bins=2)
    assert len(rows) == 1
    np.testing.assert_array_equal(rows[0]["segment_ids"], np.ones(seq_len))
    np.testing.assert_array_equal(rows[0]["targets"], np.arange(2, seq_len + 2))


def test_too_long_example_is_an_error_not_a_cut():
    seq_len = 8
    bad = {"id": "d7", "tokens": np.arange(seq_len + 2, dtype=np.int32), "loss_mask": np.ones(seq_len + 2, bool)}
    with pytest.raises(ExampleTooLongError, match=r"10 tokens.*seq_len \+ 1 = 9.*'d7'"):
        shift_example(bad, seq_len)
    with pytest.raises(ExampleTooLongError):
        pack_examples(synthetic_examples(5, seq_len) + [bad], seq_len)
    it = make_iterator(synthetic_examples(5, seq_len) + [bad], DataConfig(seq_len=seq_len, batch_size=2),
                       process_index=0, process_count=1)
    with pytest.raises(ExampleTooLongError):
        list(it)


def test_malformed_examples_are_reported():
    with pytest.raises(ValueError, match="lacks 'loss_mask'"):
        shift_example({"tokens": np.arange(4)}, 8)
    with pytest.raises(ValueError, match="equal length"):
        shift_example({"tokens": np.arange(4), "loss_mask": np.ones(3, bool)}, 8)


def test_row_checker_catches_bad_rows():
    (row,) = pack_examples(synthetic_examples(2, 8, min_len=3)[:1], 8, num_packing_bins=1)
    check_packed_rows(row)
    check_packed_rows(empty_row(8))
    bad = dict(row, loss_mask=np.ones(8, bool))
    if row["segment_ids"].all():
        bad = dict(row, segment_ids=np.array([1, 1, 2, 2, 1, 1, 1, 1], np.int32))
    with pytest.raises(ValueError):
        check_packed_rows(bad)
    with pytest.raises(ValueError, match="positions"):
        check_packed_rows(dict(row, positions=np.arange(8, dtype=np.int32) + 1))


# ------------------------------------------------------------------------------------- pipeline
def run(source, cfg, **kw):
    return list(make_iterator(source, cfg, **kw))


def test_config_validation():
    with pytest.raises(ValueError, match="seq_len"):
        DataConfig(seq_len=0)
    with pytest.raises(ValueError, match="num_epochs"):
        DataConfig(num_epochs=0)
    from sage_jax.config import from_dict  # the shared typed-config loader accepts it

    cfg = from_dict(DataConfig, {"seq_len": 64, "batch_size": 4, "num_epochs": None})
    assert cfg.seq_len == 64 and cfg.num_epochs is None


def test_batches_have_fixed_shapes_and_valid_rows():
    seq_len, bs = 16, 3
    ex = synthetic_examples(101, seq_len)
    for drop in (True, False):
        batches = run(ex, DataConfig(seq_len=seq_len, batch_size=bs, drop_remainder=drop), process_index=0,
                      process_count=1)
        assert batches
        for b in batches:
            assert sorted(b) == sorted(KEYS)
            assert all(b[k].shape == (bs, seq_len) for k in KEYS)
            check_packed_rows(b)
    # Without drop_remainder the last batch is topped up with padding rows and the epoch is complete.
    assert packed_counter(rows_of(batches)) == expected_counter(ex)


def test_deterministic_and_seeded():
    ex = synthetic_examples(80, 16)
    a = run(ex, DataConfig(seq_len=16, batch_size=2, seed=3), process_index=0, process_count=1)
    b = run(ex, DataConfig(seq_len=16, batch_size=2, seed=3), process_index=0, process_count=1)
    c = run(ex, DataConfig(seq_len=16, batch_size=2, seed=4), process_index=0, process_count=1)
    assert_batches_equal(a, b)
    assert any(not np.array_equal(x["inputs"], y["inputs"]) for x, y in zip(a, c))


def test_default_sharding_uses_jax_process():
    ex = synthetic_examples(30, 16)
    cfg = DataConfig(seq_len=16, batch_size=2)
    assert_batches_equal(run(ex, cfg), run(ex, cfg, process_index=0, process_count=1))


@pytest.mark.parametrize("n,shuffle", [(97, True), (97, False), (64, True)])
def test_two_hosts_get_disjoint_shards_covering_each_epoch_once(n, shuffle):
    seq_len, epochs, hosts = 16, 3, 2
    ex = [dict(e, idx=i) for i, e in enumerate(synthetic_examples(n, seq_len, seed=n, min_len=2))]
    reads, outputs = {}, {}
    for h in range(hosts):
        seen = []

        def record(e, seen=seen):
            seen.append(e["idx"])
            return e

        cfg = DataConfig(seq_len=seq_len, batch_size=2, num_epochs=epochs, drop_remainder=False, shuffle=shuffle,
                         seed=11)
        outputs[h] = run(ex, cfg, preprocess=record, process_index=h, process_count=hosts)
        reads[h] = seen
    per_host = [len(range(h, n, hosts)) for h in range(hosts)]
    orders = []
    for e in range(epochs):
        epoch_sets = [reads[h][e * per_host[h]:(e + 1) * per_host[h]] for h in range(hosts)]
        assert all(len(set(s)) == len(s) for s in epoch_sets)  # no duplicate within a host's epoch
        assert set(epoch_sets[0]).isdisjoint(epoch_sets[1])  # disjoint across hosts
        assert sorted(epoch_sets[0] + epoch_sets[1]) == list(range(n))  # together: each record once
        orders.append(reads[0][e * per_host[0]:(e + 1) * per_host[0]])
    assert all(len(reads[h]) == epochs * per_host[h] for h in range(hosts))
    if shuffle:  # reshuffled every epoch
        assert orders[0] != orders[1] and orders[1] != orders[2]
    # What came out of the packer: each example exactly `epochs` times over both hosts, none lost.
    total = packed_counter(rows_of(outputs[0])) + packed_counter(rows_of(outputs[1]))
    assert total == expected_counter(ex, repeats=epochs)


def test_even_shards_give_hosts_equal_counts():
    n, hosts = 10, 3
    ex = [dict(e, idx=i) for i, e in enumerate(synthetic_examples(n, 8, min_len=2))]
    got = []
    for h in range(hosts):
        seen = []
        run(ex, DataConfig(seq_len=8, batch_size=1, even_shards=True, drop_remainder=False),
            preprocess=lambda e, seen=seen: (seen.append(e["idx"]), e)[1], process_index=h, process_count=hosts)
        got.append(seen)
    assert [len(s) for s in got] == [3, 3, 3]
    assert len(set().union(*got)) == 9


def _resume_check(ex, cfg, stops, **kw):
    """For every stop k: run k batches, save the state (through JSON bytes), restore in a fresh
    pipeline, and compare the rest with one uninterrupted run. Returns the saved states."""
    full = run(ex, cfg, **kw)
    states = []
    for k in stops:
        it = make_iterator(ex, cfg, **kw)
        head = [next(it) for _ in range(k)]
        state = it.get_state()
        blob = state_to_bytes(state)
        assert state_from_bytes(blob) == state and json.loads(json.dumps(state)) == state
        states.append(state)
        del it
        resumed = make_iterator(ex, cfg, state=blob, **kw)  # a fresh pipeline, restored
        assert_batches_equal(head + list(resumed), full)
    return full, states


def test_resume_mid_epoch_exact():
    ex = synthetic_examples(60, 16)
    cfg = DataConfig(seq_len=16, batch_size=2, num_epochs=2)
    full, _ = _resume_check(ex, cfg, [3], process_index=0, process_count=1)
    assert len(full) > 6


@pytest.mark.parametrize("cfg_kw", [
    dict(),
    dict(num_packing_bins=5, shuffle_packed_rows=True),  # states in the middle of a packed group
    dict(read_threads=4, drop_remainder=False),  # threaded reads resume identically
])
def test_resume_at_every_batch_across_epoch_boundaries(cfg_kw):
    n = 40
    ex = synthetic_examples(n, 16, seed=5)
    cfg = DataConfig(seq_len=16, batch_size=2, num_epochs=3, seed=7, **cfg_kw)
    kw = dict(process_index=1, process_count=2)
    full, _ = _resume_check(ex, cfg, [0], **kw)
    _, states = _resume_check(ex, cfg, range(1, len(full) + 1), **kw)
    records_per_epoch = n // 2
    # The saved points include ones inside epochs 2 and 3, i.e. resumes across epoch boundaries.
    read_positions = {s["parent"]["next_index"] // records_per_epoch for s in states}
    assert {0, 1, 2} <= read_positions
    if cfg.num_packing_bins and cfg.num_packing_bins > cfg.batch_size:
        assert any(s["next_row"] not in (0,) for s in states)


def test_resume_forever_stream():
    ex = synthetic_examples(25, 16, seed=9)
    cfg = DataConfig(seq_len=16, batch_size=3, num_epochs=None, seed=1)
    it = make_iterator(ex, cfg, process_index=0, process_count=1)
    stream = [next(it) for _ in range(40)]  # several epochs of 25 records
    for k in (7, 19, 33):
        it = make_iterator(ex, cfg, process_index=0, process_count=1)
        for _ in range(k):
            next(it)
        again = make_iterator(ex, cfg, process_index=0, process_count=1, state=it.get_state())
        assert_batches_equal([next(again) for _ in range(40 - k)], stream[k:])


def test_orbax_checkpoints_the_iterator(tmp_path):
    ocp = pytest.importorskip("orbax.checkpoint")
    ex = synthetic_examples(50, 16, seed=2)
    cfg = DataConfig(seq_len=16, batch_size=2, num_epochs=2)
    full = run(ex, cfg, process_index=0, process_count=1)
    it = make_iterator(ex, cfg, process_index=0, process_count=1)
    head = [next(it) for _ in range(4)]
    with ocp.CheckpointManager(tmp_path / "ckpt") as mngr:
        mngr.save(4, args=ocp.args.Composite(data=grain.checkpoint.CheckpointSave(it)))
        mngr.wait_until_finished()
    fresh = make_iterator(ex, cfg, process_index=0, process_count=1)
    with ocp.CheckpointManager(tmp_path / "ckpt") as mngr:
        mngr.restore(4, args=ocp.args.Composite(data=grain.checkpoint.CheckpointRestore(fresh)))
    assert_batches_equal(head + list(fresh), full)


def test_pipeline_is_a_grain_iter_dataset():
    ds = make_dataset(synthetic_examples(10, 8), DataConfig(seq_len=8, batch_size=2), process_index=0,
                      process_count=1)
    assert isinstance(ds, grain.IterDataset)
    assert isinstance(iter(ds), grain.DatasetIterator)


def test_worker_processes_resume_exactly():
    """worker_count > 0 (Grain child processes): complete, and the state (JSON) resumes exactly."""
    import gc

    ex = synthetic_examples(40, 16, seed=4)
    cfg = DataConfig(seq_len=16, batch_size=2, num_epochs=2, worker_count=2, drop_remainder=False)
    it = make_iterator(ex, cfg, process_index=0, process_count=1)
    try:
        head = [next(it) for _ in range(5)]
        blob = state_to_bytes(it.get_state())
        full = head + list(it)
    finally:
        it.close()
    assert packed_counter(rows_of(full)) == expected_counter(ex, repeats=2)
    resumed = make_iterator(ex, cfg, process_index=0, process_count=1, state=blob)
    try:
        assert_batches_equal(head + list(resumed), full)
    finally:
        resumed.close()
    del it, resumed
    gc.collect()


def test_preprocess_can_skip_records():
    raw = [{"idx": i, "n": 2 + i % 7} for i in range(30)]

    def tokenize(r):
        if r["idx"] % 5 == 0:
            return None  # e.g. an unusable dialogue
        return {"tokens": np.arange(r["idx"], r["idx"] + r["n"], dtype=np.int32), "loss_mask": np.ones(r["n"], bool)}

    batches = run(raw, DataConfig(seq_len=8, batch_size=2, drop_remainder=False), preprocess=tokenize,
                  process_index=0, process_count=1)
    want = expected_counter([tokenize(r) for r in raw if r["idx"] % 5])
    assert packed_counter(rows_of(batches)) == want


def test_accepts_objects_with_tokens_and_loss_mask():
    """The tokenizer's `Encoded` dataclass (attributes, not keys) packs like the dict form."""
    import dataclasses

    @dataclasses.dataclass(frozen=True)
    class Enc:
        tokens: np.ndarray
        loss_mask: np.ndarray

    ex = synthetic_examples(20, 16, seed=8)
    objs = [Enc(e["tokens"], e["loss_mask"]) for e in ex]
    a = pack_examples(ex, 16, num_packing_bins=2)
    b = pack_examples(objs, 16, num_packing_bins=2)
    assert_batches_equal(a, b)
    with pytest.raises(ValueError, match="mapping or have .tokens"):
        shift_example(object(), 16)
