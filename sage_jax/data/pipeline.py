"""The Grain training pipeline: shard per host, shuffle per epoch, repeat, pack, batch; resumable.

    cfg = DataConfig(seq_len=2048, batch_size=8, seed=0, num_epochs=None)
    it = make_iterator(source, cfg)                    # grain.DatasetIterator of packed batches
    batch = next(it)                                   # {inputs, targets, loss_mask, segment_ids,
                                                       #  positions}: np arrays [batch_size, seq_len]
    state = it.get_state()                             # a small JSON-able dict
    it2 = make_iterator(source, cfg); it2.set_state(state)   # continues exactly where `it` was

``source`` is any random-access sequence (``len`` + ``__getitem__``): a list of tokenized examples,
a ``grain.sources.ArrayRecordDataSource``, a ``tfds.data_source(...)[split]``, or a ``MapDataset``.
Its records are tokenized examples (``{"tokens", "loss_mask"}``, see :mod:`.packing`) or anything a
``preprocess`` callable turns into one (returning None skips a record).

Order of operations (all on Grain's dataset API, so the iterator state is a few integers):
``source -> [global index shuffle, reseeded each epoch] -> [this host's slice
process_index::process_count] -> repeat(num_epochs) -> preprocess -> shift + length check ->
first-fit pack -> batch``. The shuffle is an index permutation over the whole source (no buffer):
all hosts compute the same permutation and take disjoint strided slices of it, so per epoch the
hosts together read every record exactly once; each epoch uses seed ``seed + epoch``.

State for checkpoints: ``it.get_state()`` / ``it.set_state()`` (JSON-serialisable dict; use
:func:`state_to_bytes` / :func:`state_from_bytes`, or Orbax with
``grain.checkpoint.CheckpointSave(it)`` / ``CheckpointRestore(it)``, one file per process). A
restored state is only valid for the same source, config and process index/count.

Multi-host: packing density differs between shards, so with a finite ``num_epochs`` hosts can run
out after different numbers of batches. Train for a fixed number of steps with ``num_epochs=None``
(or stop on a decision all hosts share), never "until my iterator ends".
"""

from __future__ import annotations

import dataclasses
import json
from collections.abc import Callable, Mapping, Sequence
from typing import Any

import grain
import numpy as np

from sage_jax.data.packing import ROW_KEYS, empty_row, pack_dataset

__all__ = [
    "DataConfig",
    "make_dataset",
    "make_iterator",
    "shard_range",
    "state_to_bytes",
    "state_from_bytes",
]


@dataclasses.dataclass(frozen=True)
class DataConfig:
    """Configuration of the training data pipeline (per host).

    seq_len: tokens per packed row (inputs/targets length); examples may have up to seq_len + 1
        tokens before the shift.
    batch_size: packed rows per batch on this host (the global batch is batch_size * hosts).
    seed: shuffle seed (epoch e is shuffled with seed + e); also seeds row shuffling.
    shuffle: global index shuffle of the records, reseeded every epoch.
    num_epochs: passes over the data; None repeats forever (stop by step count).
    drop_remainder: drop the last incomplete batch; if False it is filled up with all-padding rows
        (segment 0, mask False) so every batch has the same shape.
    num_packing_bins: rows filled at once by the first-fit packer (None: batch_size). More bins pack
        tighter; examples from neighbouring epochs may share a group.
    shuffle_packed_rows: permute rows within each packed group (deterministic).
    even_shards: give every host the same number of records per epoch (drops up to
        process_count - 1 records per epoch, different ones each epoch when shuffling).
    read_threads: threads reading/preprocessing records (0: in the calling thread; use >0 for
        ArrayRecord on slow disks). Order and state are the same for any value.
    read_buffer_size: records read ahead by those threads.
    worker_count: Grain worker processes (0: none). Deterministic for a fixed worker_count, but
        the batch order depends on it, so keep it fixed across a resume.
    worker_buffer_size: batches buffered per worker process.
    """

    seq_len: int = 2048
    batch_size: int = 8
    seed: int = 0
    shuffle: bool = True
    num_epochs: int | None = 1
    drop_remainder: bool = True
    num_packing_bins: int | None = None
    shuffle_packed_rows: bool = False
    even_shards: bool = False
    read_threads: int = 0
    read_buffer_size: int = 64
    worker_count: int = 0
    worker_buffer_size: int = 2

    def __post_init__(self):
        def need(cond: bool, msg: str):
            if not cond:
                raise ValueError(f"DataConfig: {msg}")

        need(self.seq_len > 0, f"seq_len must be > 0, got {self.seq_len}")
        need(self.batch_size > 0, f"batch_size must be > 0, got {self.batch_size}")
        need(0 <= self.seed < 2**31, f"seed must be in [0, 2**31), got {self.seed}")
        need(self.num_epochs is None or self.num_epochs > 0,
             f"num_epochs must be > 0 or None (forever), got {self.num_epochs}")
        need(self.num_packing_bins is None or self.num_packing_bins > 0,
             f"num_packing_bins must be > 0 or None, got {self.num_packing_bins}")
        need(self.read_threads >= 0, f"read_threads must be >= 0, got {self.read_threads}")
        need(self.read_buffer_size > 0, f"read_buffer_size must be > 0, got {self.read_buffer_size}")
        need(self.worker_count >= 0, f"worker_count must be >= 0, got {self.worker_count}")
        need(self.worker_buffer_size > 0, f"worker_buffer_size must be > 0, got {self.worker_buffer_size}")


def _process_index_and_count(process_index: int | None, process_count: int | None) -> tuple[int, int]:
    if process_index is None or process_count is None:
        import jax  # only when not given explicitly (tests and tools pass them)

        process_index = jax.process_index() if process_index is None else process_index
        process_count = jax.process_count() if process_count is None else process_count
    if not 0 <= process_index < process_count:
        raise ValueError(f"process_index {process_index} out of range for process_count {process_count}")
    return int(process_index), int(process_count)


def shard_range(num_records: int, process_index: int, process_count: int, *, even: bool = False) -> range:
    """Positions (in the per-epoch shuffled order) of the records host ``process_index`` reads."""
    stop = (num_records // process_count) * process_count if even else num_records
    return range(process_index, stop, process_count)


def _stack(rows: Sequence[Mapping[str, np.ndarray]], batch_size: int, seq_len: int) -> dict[str, np.ndarray]:
    rows = list(rows)
    if len(rows) < batch_size:  # only the last batch, with drop_remainder=False
        rows += [empty_row(seq_len)] * (batch_size - len(rows))
    return {k: np.stack([r[k] for r in rows]) for k in ROW_KEYS}


def _ensure_absl_flags_parsed() -> None:
    """Grain's worker processes read an absl flag unguarded (grain 0.2.18: UnparsedFlagAccessError
    in a program that does not run ``absl.app``); use the defaults if nobody parsed flags."""
    from absl import flags

    if not flags.FLAGS.is_parsed():
        flags.FLAGS.mark_as_parsed()


def make_dataset(
    source: Sequence[Any] | grain.MapDataset,
    cfg: DataConfig,
    *,
    preprocess: Callable[[Any], Mapping[str, Any] | None] | None = None,
    process_index: int | None = None,
    process_count: int | None = None,
) -> grain.IterDataset:
    """The pipeline as a ``grain.IterDataset`` of packed batches (see the module doc).

    ``process_index`` / ``process_count`` default to ``jax.process_index()`` /
    ``jax.process_count()``; pass them to simulate hosts or to shard without JAX.
    """
    index, count = _process_index_and_count(process_index, process_count)
    ds = source if isinstance(source, grain.MapDataset) else grain.MapDataset.source(source)
    n = len(ds)
    if n == 0:
        raise ValueError("the data source is empty")
    if cfg.shuffle:
        ds = ds.shuffle(seed=cfg.seed)  # a different permutation per epoch (seed + epoch)
    shard = shard_range(n, index, count, even=cfg.even_shards)
    if len(shard) == 0:
        raise ValueError(f"host {index} of {count} gets no records from a source of {n}")
    ds = ds[shard.start:shard.stop:shard.step]
    ds = ds.repeat(cfg.num_epochs)  # epoch e reads shuffled indices of epoch e: reshuffled
    if preprocess is not None:
        ds = ds.map(preprocess)  # None results are skipped by to_iter_dataset
    it_ds = ds.to_iter_dataset(
        grain.ReadOptions(num_threads=cfg.read_threads, prefetch_buffer_size=cfg.read_buffer_size))
    it_ds = pack_dataset(
        it_ds,
        cfg.seq_len,
        num_packing_bins=cfg.num_packing_bins or cfg.batch_size,
        shuffle_rows=cfg.shuffle_packed_rows,
        seed=cfg.seed,
    )
    it_ds = it_ds.batch(
        cfg.batch_size,
        drop_remainder=cfg.drop_remainder,
        batch_fn=lambda rows: _stack(rows, cfg.batch_size, cfg.seq_len),
    )
    if cfg.worker_count > 0:
        _ensure_absl_flags_parsed()
        it_ds = it_ds.mp_prefetch(grain.MultiprocessingOptions(
            num_workers=cfg.worker_count, per_worker_buffer_size=cfg.worker_buffer_size))
        # Batches arrive as views of shared memory blocks; copy them out so each block is released
        # at once instead of piling up (and being reported as leaked) while batches are kept.
        it_ds = it_ds.map(lambda batch: {k: np.array(v, copy=True) for k, v in batch.items()})
    return it_ds


def make_iterator(
    source: Sequence[Any] | grain.MapDataset,
    cfg: DataConfig,
    *,
    preprocess: Callable[[Any], Mapping[str, Any] | None] | None = None,
    process_index: int | None = None,
    process_count: int | None = None,
    state: Mapping[str, Any] | bytes | str | None = None,
) -> grain.DatasetIterator:
    """A fresh iterator over :func:`make_dataset`, optionally restored from a saved ``state``."""
    it = iter(make_dataset(source, cfg, preprocess=preprocess,
                           process_index=process_index, process_count=process_count))
    if state is not None:
        it.set_state(state_from_bytes(state) if isinstance(state, (bytes, str)) else dict(state))
    return it


def state_to_bytes(state: Mapping[str, Any]) -> bytes:
    """Serialise an iterator state (``it.get_state()``) to UTF-8 JSON bytes."""
    return json.dumps(state, sort_keys=True).encode("utf-8")


def state_from_bytes(data: bytes | str) -> dict[str, Any]:
    """Inverse of :func:`state_to_bytes`."""
    return json.loads(data.decode("utf-8") if isinstance(data, bytes) else data)
