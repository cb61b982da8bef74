"""A TFDS builder for SAC dialogue corpora (JSONL -> ``array_record``), readable without TensorFlow.

    builder = build_sac_tfds({"train": [Path("ed_train.jsonl")], "validation": [...], "test": [...]},
                             data_dir="~/tfds")                      # writes data_dir/sac_dialogues/1.0.0
    src = tfds.data_source("sac_dialogues", data_dir="~/tfds")       # {split: ArrayRecordDataSource}
    dialogue = decode_record(src["train"][0])                         # the JSON object of the input line

Input: SAC JSONL files, one dialogue per line (``{"id", "turns": [{"role", "text", "state"|"action"}],
"system"?, "meta"?}``); blank lines are skipped; a line that is not a JSON object with a string
``id`` and a list of ``turns`` (each with ``role`` in user/assistant and a string ``text``) raises
:class:`SacFormatError` naming file and line. Splits are whatever keys ``files_by_split`` has
(usually train / validation / test); a split's files are read in the given order.

Feature spec (one record per dialogue, in input order: shuffling is disabled, the training pipeline
shuffles by index):

    id         Text     the dialogue id
    dialogue   Text     the whole dialogue object as compact JSON (UTF-8, keys as in the input)
    split      Text     the split name it was written to
    num_turns  int32    len(turns)

``tfds.data_source`` returns the Text features as ``bytes``; :func:`decode_record` gives back the
dialogue dict. Several corpora can live in one ``data_dir`` as configs: ``config_name="esconv"``
writes ``sac_dialogues/esconv/1.0.0``, read back as ``tfds.data_source("sac_dialogues/esconv", ...)``.
Reading needs only the files: a process that never imports this module still loads them.
"""

from __future__ import annotations

import json
from collections.abc import Iterator, Mapping, Sequence
from os import PathLike
from pathlib import Path
from typing import Any

import numpy as np
import tensorflow_datasets as tfds

__all__ = [
    "SacFormatError",
    "SacDialogues",
    "DATASET_NAME",
    "build_sac_tfds",
    "load_sac_source",
    "decode_record",
    "read_sac_jsonl",
]

DATASET_NAME = "sac_dialogues"
_ROLES = ("user", "assistant")


class SacFormatError(ValueError):
    """A SAC JSONL line that is not a valid dialogue (the message names file and line)."""


def _check_dialogue(obj: Any, where: str) -> dict:
    if not isinstance(obj, dict):
        raise SacFormatError(f"{where}: a dialogue must be a JSON object, got {type(obj).__name__}")
    if not isinstance(obj.get("id"), str) or not obj["id"]:
        raise SacFormatError(f"{where}: dialogue needs a non-empty string 'id', got {obj.get('id')!r}")
    turns = obj.get("turns")
    if not isinstance(turns, list):
        raise SacFormatError(f"{where}: dialogue {obj['id']!r} needs a list 'turns', got {type(turns).__name__}")
    for i, turn in enumerate(turns):
        if not isinstance(turn, dict):
            raise SacFormatError(f"{where}: dialogue {obj['id']!r} turn {i} is not an object")
        if turn.get("role") not in _ROLES:
            raise SacFormatError(f"{where}: dialogue {obj['id']!r} turn {i} has role {turn.get('role')!r}, "
                                 f"expected one of {_ROLES}")
        if not isinstance(turn.get("text"), str):
            raise SacFormatError(f"{where}: dialogue {obj['id']!r} turn {i} needs a string 'text'")
    return obj


def read_sac_jsonl(path: str | PathLike) -> Iterator[dict]:
    """Yield the dialogues of one SAC JSONL file, validated (see :class:`SacFormatError`)."""
    path = Path(path)
    with open(path, encoding="utf-8") as f:
        for lineno, line in enumerate(f, 1):
            if not line.strip():
                continue
            where = f"{path}:{lineno}"
            try:
                obj = json.loads(line)
            except json.JSONDecodeError as e:
                raise SacFormatError(f"{where}: invalid JSON: {e.msg} (column {e.colno})") from None
            yield _check_dialogue(obj, where)


class SacDialogues(tfds.core.GeneratorBasedBuilder):
    """SAC dialogues (one record per dialogue, stored as JSON text); see the module doc."""

    VERSION = tfds.core.Version("1.0.0")
    RELEASE_NOTES = {"1.0.0": "Dialogue as a JSON string with id, split and number of turns."}

    # No download checksums belong to this builder. TFDS would look for a checksums file next to
    # the code, and for a class inside a package that lookup imports `importlib_resources`, which
    # TFDS does not declare as a dependency (ModuleNotFoundError without it).
    @tfds.core.utils.classproperty
    @classmethod
    def code_path(cls):
        return None

    def __init__(
        self,
        *,
        files_by_split: Mapping[str, Sequence[str | PathLike]] | None = None,
        config: str | tfds.core.BuilderConfig | None = None,
        **kwargs: Any,
    ):
        if isinstance(config, str):
            config = tfds.core.BuilderConfig(name=config)
        if config is not None:
            self.BUILDER_CONFIGS = [config]  # pylint: disable=invalid-name  (one corpus per config)
        self._files_by_split = (
            None if files_by_split is None
            else {str(s): [Path(p) for p in files] for s, files in files_by_split.items()})
        super().__init__(config=config, **kwargs)

    def _info(self) -> tfds.core.DatasetInfo:
        return tfds.core.DatasetInfo(
            builder=self,
            description="SAC (State-Action Chain) dialogues from JSONL, one record per dialogue.",
            features=tfds.features.FeaturesDict({
                "id": tfds.features.Text(doc="dialogue id"),
                "dialogue": tfds.features.Text(doc="the dialogue object as compact JSON"),
                "split": tfds.features.Text(doc="split name"),
                "num_turns": tfds.features.Scalar(np.int32, doc="number of turns"),
            }),
            disable_shuffling=True,
        )

    def _split_generators(self, dl_manager):
        del dl_manager
        if not self._files_by_split:
            raise ValueError(
                f"{self.name} is not built in {self.data_dir}: build it with "
                "sage_jax.data.tfds_sac.build_sac_tfds(files_by_split, data_dir)")
        return {split: self._generate_examples(split, files) for split, files in self._files_by_split.items()}

    def _generate_examples(self, split: str, files: Sequence[Path]):
        key = 0
        for path in files:
            for dialogue in read_sac_jsonl(path):
                yield key, {
                    "id": dialogue["id"],
                    "dialogue": json.dumps(dialogue, ensure_ascii=False, separators=(",", ":")),
                    "split": split,
                    "num_turns": len(dialogue["turns"]),
                }
                key += 1  # integer keys in input order (shuffling is disabled)


def build_sac_tfds(
    files_by_split: Mapping[str, Sequence[str | PathLike]],
    data_dir: str | PathLike,
    *,
    config_name: str | None = None,
    overwrite: bool = False,
) -> SacDialogues:
    """Build (or reuse, unless ``overwrite``) the ``sac_dialogues`` array_record dataset offline.

    Returns the prepared builder; read it with ``tfds.data_source(name, data_dir=data_dir)`` where
    name is ``"sac_dialogues"`` or ``"sac_dialogues/<config_name>"`` (see :func:`load_sac_source`).
    """
    if not files_by_split:
        raise ValueError("files_by_split is empty: give at least one split with its JSONL files")
    for split, files in files_by_split.items():
        if isinstance(files, (str, PathLike)):
            raise TypeError(f"split {split!r}: give a list of files, not a single path {files!r}")
        if not files:
            raise ValueError(f"split {split!r} has no files")
        for p in files:
            if not Path(p).is_file():
                raise FileNotFoundError(f"split {split!r}: no such file {p}")
    builder = SacDialogues(files_by_split=files_by_split, config=config_name,
                           data_dir=str(Path(data_dir).expanduser()), file_format="array_record")
    mode = (tfds.download.GenerateMode.FORCE_REDOWNLOAD if overwrite
            else tfds.download.GenerateMode.REUSE_DATASET_IF_EXISTS)
    builder.download_and_prepare(download_config=tfds.download.DownloadConfig(
        try_download_gcs=False,
        compute_stats=tfds.download.ComputeStatsMode.SKIP,
        download_mode=mode,
    ))
    return builder


def load_sac_source(data_dir: str | PathLike, split: str, *, config_name: str | None = None):
    """The random-access source (``ArrayRecordDataSource``) of one split, via ``tfds.data_source``."""
    name = DATASET_NAME if config_name is None else f"{DATASET_NAME}/{config_name}"
    return tfds.data_source(name, split=split, data_dir=str(Path(data_dir).expanduser()),
                            download=False, try_gcs=False)


def decode_record(record: Mapping[str, Any]) -> dict:
    """A record of the dataset -> the dialogue dict exactly as in the input JSONL line."""
    text = record["dialogue"]
    return json.loads(text.decode("utf-8") if isinstance(text, bytes) else text)
