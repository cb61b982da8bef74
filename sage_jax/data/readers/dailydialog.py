"""DailyDialog (Li et al. 2017; CC BY-NC-SA 4.0) -> SAC.

Input: per split a folder with three parallel files, one dialogue per line:
``dialogues_<split>.txt`` (utterances separated by ``__eou__``), ``dialogues_act_<split>.txt`` and
``dialogues_emotion_<split>.txt`` (one integer per utterance). IN may be the corpus root (all
splits), a split folder or the ``dialogues_<split>.txt`` file.

Mapping (two speakers alternate; the first -> user, the second -> assistant; the same labels
become the user's state and the assistant's action):

* ``motivation`` = the dialogue act: 1 inform, 2 question, 3 directive, 4 commissive
  (closed vocabulary ``dailydialog_acts``);
* ``emotion`` = 1 anger, 2 disgust, 3 fear, 4 happiness, 5 sadness, 6 surprise; 0 ("no emotion")
  -> null (closed vocabulary ``dailydialog_emotions``);
* ``topic`` empty (the per-dialogue topic file is not in the split folders).

Utterance text is kept as in the corpus (tokenised, e.g. ``Good morning , sir .``), stripped. A
dialogue whose label count differs from its utterance count (one train dialogue) is a malformed
record: reported with file, line and field, skipped (default) or fatal (strict). Ids are
``dailydialog_<split>_<line>``.
"""

from __future__ import annotations

from collections.abc import Iterator
from itertools import zip_longest
from pathlib import Path

from sage_jax.data.jsonl import ReadReport, RecordError
from sage_jax.progress import progress as progress_bar
from sage_jax.data.readers._common import SPLIT_ORDER, split_name
from sage_jax.sac import DAILYDIALOG_ACTS, DAILYDIALOG_EMOTIONS, Dialogue, Latent, SACFormatError, Turn

NAME = "dailydialog"
SOURCE = "dailydialog"
EOU = "__eou__"
ACTS = dict(enumerate(DAILYDIALOG_ACTS, 1))
EMOTIONS = {0: None, **dict(enumerate(DAILYDIALOG_EMOTIONS, 1))}


def _split_of(text_file: Path) -> str:
    stem = text_file.stem  # dialogues_<split>
    return stem.split("_", 1)[1] if "_" in stem else text_file.parent.name


def files(path: Path) -> list[tuple[Path, str]]:
    if path.is_file():
        if path.name.startswith(("dialogues_act_", "dialogues_emotion_")):
            raise ValueError(f"{path}: a label file; pass the dialogues_<split>.txt file or its folder")
        return [(path, split_name(_split_of(path)))]
    out = []
    for folder in [path, *sorted(p for p in path.iterdir() if p.is_dir())]:
        for f in sorted(folder.glob("dialogues_*.txt")):
            if not f.name.startswith(("dialogues_act_", "dialogues_emotion_", "dialogues_topic")):
                out.append((f, split_name(_split_of(f))))
    return sorted(out, key=lambda fs: SPLIT_ORDER.index(fs[1]) if fs[1] in SPLIT_ORDER else 99)


def _labels(line: str | None, table: dict[int, object], utterances: int, label_file: Path, kind: str) -> list:
    if line is None:
        raise SACFormatError(f"no line in {label_file.name} (file ends early)", label_file.name)
    raw = line.split()
    if len(raw) != utterances:
        raise SACFormatError(f"{len(raw)} {kind} labels for {utterances} utterances (misaligned)", label_file.name)
    out = []
    for j, x in enumerate(raw):
        try:
            out.append(table[int(x)])
        except (ValueError, KeyError):
            raise SACFormatError(f"{kind} label {x!r} of utterance {j} is not one of {sorted(table)}",
                                 f"{label_file.name}[{j}]") from None
    return out


def convert(text: str, acts: list, emotions: list, split: str, line: int) -> Dialogue:
    turns = []
    for j, (utt, act, emo) in enumerate(zip(_utterances(text), acts, emotions)):
        lat = Latent(act, emo, ())
        turns.append(Turn("user", utt, state=lat) if j % 2 == 0 else Turn("assistant", utt, action=lat))
    return Dialogue(f"dailydialog_{split}_{line}", tuple(turns),
                    meta={"source": SOURCE, "split": split, "line": line})


def _utterances(text: str) -> list[str]:
    parts = [u.strip() for u in text.split(EOU)]
    if parts and not parts[-1]:
        parts.pop()  # the line ends with __eou__
    return parts


def iter_file(path: Path, split: str, report: ReadReport, progress: bool | None = None) -> Iterator[Dialogue]:
    stem_split = _split_of(path)
    act_file = path.with_name(f"dialogues_act_{stem_split}.txt")
    emo_file = path.with_name(f"dialogues_emotion_{stem_split}.txt")
    for f in (act_file, emo_file):
        if not f.is_file():
            raise FileNotFoundError(f"{path}: DailyDialog label file {f.name} not found next to it")
    with (open(path, encoding="utf-8") as ft, open(act_file, encoding="utf-8") as fa,
          open(emo_file, encoding="utf-8") as fe,
          progress_bar(None, path.name, unit="dlg", unit_scale=True, leave=False, show=progress) as bar):
        for line_no, (text, act, emo) in enumerate(zip_longest(ft, fa, fe), 1):
            bar.update(1)
            if text is None:  # label files longer than the text file
                if (act or "").strip() or (emo or "").strip():
                    report.records += 1
                    report.fail(RecordError(path, line_no, "<line>", "label line without a dialogue"))
                continue
            if not text.strip():
                continue
            report.records += 1
            try:
                utts = _utterances(text)
                for j, u in enumerate(utts):
                    if not u:
                        raise SACFormatError("empty utterance", f"utterances[{j}]")
                acts = _labels(act, ACTS, len(utts), act_file, "act")
                emotions = _labels(emo, EMOTIONS, len(utts), emo_file, "emotion")
                d = convert(text, acts, emotions, split, line_no)
            except SACFormatError as e:
                report.fail(RecordError(path, line_no, e.field, e.message))
                continue
            report.ok()
            yield d
