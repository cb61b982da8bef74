"""Packing tokenized examples into fixed rows of ``seq_len`` for training.

Input (the tokenizer's contract): an example is ``{"tokens": int32[T], "loss_mask": bool[T]}``
where ``loss_mask[t]`` says whether ``tokens[t]`` is a supervised target, ``2 <= T <= seq_len + 1``
(examples with ``T < 2`` have no target and are dropped; ``T > seq_len + 1`` is an error, never cut).

Each example is shifted **on its own** first (``inputs = tokens[:-1]``, ``targets = tokens[1:]``,
``loss_mask = loss_mask[1:]``, all of length ``T - 1 <= seq_len``), then whole shifted examples are
packed first-fit into rows, so no target ever crosses an example boundary. A packed row is::

    inputs       int32[S]  input tokens (0 on padding)
    targets      int32[S]  next-token targets of the same example (0 on padding)
    loss_mask    bool[S]   supervise targets[t] (False on padding)
    segment_ids  int32[S]  1, 2, 3 ... per example in the row, 0 = padding (padding is at the end)
    positions    int32[S]  0, 1, 2 ... restarting at every example (0 on padding)

The attention mask is "same segment id and causal"; padding (segment 0) attends nowhere useful and
is never supervised. The packer is Grain's ``FirstFitPackIterDataset`` (``grain.experimental``):
deterministic, and its iterator state (``{"parent": ..., "next_row", "counter"}``) is plain JSON,
so a pipeline using it resumes exactly.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from typing import Any

import grain
import numpy as np

__all__ = [
    "ExampleTooLongError",
    "ROW_KEYS",
    "shift_example",
    "pack_dataset",
    "pack_examples",
    "unpack_row",
    "check_packed_rows",
    "empty_row",
]

ROW_KEYS = ("inputs", "targets", "loss_mask", "latent_mask", "segment_ids", "positions")
_ROW_DTYPES = {"inputs": np.int32, "targets": np.int32, "loss_mask": np.bool_, "latent_mask": np.bool_,
               "segment_ids": np.int32, "positions": np.int32}


class ExampleTooLongError(ValueError):
    """A tokenized example does not fit in one packed row (``len(tokens) > seq_len + 1``)."""


def _describe(example: Mapping[str, Any]) -> str:
    for key in ("id", "example_id", "dialogue_id"):
        if key in example:
            value = example[key]
            if isinstance(value, bytes):
                value = value.decode("utf-8", "replace")
            return f" (example {key}={value!r})"
    return ""


def shift_example(example: Mapping[str, Any] | Any, seq_len: int) -> dict[str, np.ndarray] | None:
    """Shift one tokenized example into ``{"inputs", "targets", "loss_mask"}`` of length ``T - 1``.

    ``example`` is a mapping or any object with ``.tokens`` and ``.loss_mask`` (the tokenizer's
    ``Encoded``). Returns None for examples with fewer than 2 tokens (nothing to predict). Raises
    :class:`ExampleTooLongError` when ``T > seq_len + 1`` and ``ValueError`` on malformed input.
    """
    if not isinstance(example, Mapping):  # e.g. sage_jax.data.tokenize.Encoded (a dataclass)
        if not (hasattr(example, "tokens") and hasattr(example, "loss_mask")):
            raise ValueError(f"tokenized example must be a mapping or have .tokens and .loss_mask, "
                             f"got {type(example).__name__}")
        example = {"tokens": example.tokens, "loss_mask": example.loss_mask,
                   "latent_mask": getattr(example, "latent_mask", None)}
    try:
        tokens = np.asarray(example["tokens"])
        mask = np.asarray(example["loss_mask"])
    except KeyError as e:
        raise ValueError(f"tokenized example lacks {e.args[0]!r}; keys are {sorted(example)}"
                         f"{_describe(example)}") from None
    if tokens.ndim != 1 or mask.ndim != 1 or tokens.shape != mask.shape:
        raise ValueError(f"tokens and loss_mask must be 1-D of equal length, got shapes {tokens.shape} "
                         f"and {mask.shape}{_describe(example)}")
    if tokens.size and not np.issubdtype(tokens.dtype, np.integer):
        raise ValueError(f"tokens must be integers, got dtype {tokens.dtype}{_describe(example)}")
    n = tokens.shape[0]
    if n > seq_len + 1:
        raise ExampleTooLongError(
            f"tokenized example has {n} tokens but packed rows hold seq_len + 1 = {seq_len + 1} "
            f"(seq_len={seq_len}){_describe(example)}; the tokenizer must truncate or drop it, "
            "packing never cuts examples")
    if n < 2:
        return None
    tokens = tokens.astype(np.int32, copy=False)
    mask = mask.astype(np.bool_, copy=False)
    # latent_mask (optional): targets inside a latent state-action prefix, for latent accuracy.
    latent = example.get("latent_mask")
    latent = np.zeros(n, np.bool_) if latent is None else np.asarray(latent, np.bool_)
    if latent.shape != tokens.shape:
        raise ValueError(f"latent_mask shape {latent.shape} != tokens shape {tokens.shape}{_describe(example)}")
    return {"inputs": tokens[:-1], "targets": tokens[1:], "loss_mask": mask[1:], "latent_mask": latent[1:]}


def _rename(row: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
    return {
        "inputs": row["inputs"].astype(np.int32, copy=False),
        "targets": row["targets"].astype(np.int32, copy=False),
        "loss_mask": row["loss_mask"].astype(np.bool_, copy=False),
        "latent_mask": row["latent_mask"].astype(np.bool_, copy=False),
        "segment_ids": row["inputs_segment_ids"].astype(np.int32, copy=False),
        "positions": row["inputs_positions"].astype(np.int32, copy=False),
    }


def pack_dataset(
    ds: grain.IterDataset,
    seq_len: int,
    *,
    num_packing_bins: int,
    shuffle_rows: bool = False,
    seed: int = 0,
) -> grain.IterDataset:
    """Pack an ``IterDataset`` of tokenized examples into rows of ``seq_len`` (see module doc).

    ``num_packing_bins`` rows are filled first-fit at once; more bins pack tighter but mix more
    neighbouring (and, with repeat, cross-epoch) examples. ``shuffle_rows`` permutes the rows of
    each packed group with a seed derived from ``seed`` and the row counter (deterministic).
    """
    if seq_len <= 0:
        raise ValueError(f"seq_len must be positive, got {seq_len}")
    if num_packing_bins <= 0:
        raise ValueError(f"num_packing_bins must be positive, got {num_packing_bins}")
    shifted = ds.map(lambda ex: shift_example(ex, seq_len)).filter(lambda ex: ex is not None)
    lengths = {"inputs": seq_len, "targets": seq_len, "loss_mask": seq_len, "latent_mask": seq_len}
    packed = grain.experimental.FirstFitPackIterDataset(
        shifted,
        length_struct=lengths,
        num_packing_bins=num_packing_bins,
        seed=seed,
        shuffle_bins=shuffle_rows,
    )
    return packed.map(_rename)


def pack_examples(
    examples: Iterable[Mapping[str, Any]],
    seq_len: int,
    *,
    num_packing_bins: int = 8,
) -> list[dict[str, np.ndarray]]:
    """Eagerly pack a finite iterable of tokenized examples (evaluation, tests, inspection)."""
    ds = grain.MapDataset.source(list(examples)).to_iter_dataset(grain.ReadOptions(num_threads=0))
    return list(pack_dataset(ds, seq_len, num_packing_bins=num_packing_bins))


def empty_row(seq_len: int) -> dict[str, np.ndarray]:
    """An all-padding row (segment 0, mask False): used to fill a short final batch."""
    return {k: np.zeros((seq_len,), dt) for k, dt in _ROW_DTYPES.items()}


def unpack_row(row: Mapping[str, np.ndarray]) -> list[dict[str, np.ndarray]]:
    """Split one packed row back into its shifted examples ``{"inputs", "targets", "loss_mask"}``."""
    seg = np.asarray(row["segment_ids"])
    out = []
    for s in np.unique(seg[seg > 0]):
        idx = np.nonzero(seg == s)[0]
        out.append({k: np.asarray(row[k])[idx] for k in ("inputs", "targets", "loss_mask", "latent_mask")})
    return out


def check_packed_rows(rows: Mapping[str, np.ndarray]) -> None:
    """Check the invariants of packed rows (one row ``[S]`` or a batch ``[B, S]``); raise ValueError.

    Segments are contiguous, numbered 1, 2, 3 ... from the left, padding (0) only at the end with
    mask False and zero tokens, positions restart at 0 in each segment, dtypes as documented.
    """
    arrays = {k: np.asarray(rows[k]) for k in ROW_KEYS}
    for k, a in arrays.items():
        if a.dtype != _ROW_DTYPES[k]:
            raise ValueError(f"{k}: dtype {a.dtype}, expected {np.dtype(_ROW_DTYPES[k])}")
        if a.shape != arrays["inputs"].shape:
            raise ValueError(f"{k}: shape {a.shape} != inputs shape {arrays['inputs'].shape}")
    seg2 = np.atleast_2d(arrays["segment_ids"])
    pos2 = np.atleast_2d(arrays["positions"])
    for r in range(seg2.shape[0]):
        seg, pos = seg2[r], pos2[r]
        n_real = int(np.count_nonzero(seg))
        if np.any(seg[n_real:] != 0) or np.any(seg[:n_real] == 0):
            raise ValueError(f"row {r}: padding (segment 0) must only appear at the end: {seg}")
        if n_real:
            starts = np.concatenate([[True], seg[1:n_real] != seg[:n_real - 1]])
            ids = seg[:n_real][starts]
            if not np.array_equal(ids, np.arange(1, len(ids) + 1)):
                raise ValueError(f"row {r}: segments must be contiguous and numbered 1..k, got {ids}")
            seg_start = np.maximum.accumulate(np.where(starts, np.arange(n_real), 0))
            if not np.array_equal(pos[:n_real], np.arange(n_real) - seg_start):
                raise ValueError(f"row {r}: positions must restart at 0 per segment: {pos}")
    pad = np.atleast_2d(arrays["segment_ids"]) == 0
    for k in ("inputs", "targets", "positions"):
        if np.any(np.atleast_2d(arrays[k])[pad] != 0):
            raise ValueError(f"{k} must be 0 on padding")
    for k in ("loss_mask", "latent_mask"):
        if np.any(np.atleast_2d(arrays[k])[pad]):
            raise ValueError(f"{k} must be False on padding")
