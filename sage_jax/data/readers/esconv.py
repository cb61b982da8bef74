"""ESConv (Liu et al. 2021; research use only, see its LICENSE) -> SAC.

Input: ``{train,valid,test}.jsonl``, one conversation per line: ``emotion_type, problem_type,
situation, experience_type, survey_score, dialog[{text, speaker: usr|sys, strategy}]`` (every
``sys`` utterance has one of the 8 support strategies).

Mapping (seeker ``usr`` -> user, supporter ``sys`` -> assistant):

* consecutive utterances of the same speaker are merged into one turn, texts joined by a space;
* user ``state``: motivation null (the corpus labels no per-utterance seeker intent), emotion =
  the conversation's ``emotion_type`` (e.g. ``anxiety``), topic = ``[problem_type]`` lower-cased
  (``Sleep Problems`` -> ``sleep problems``);
* assistant ``action``: motivation = the support strategy (closed vocabulary
  ``esconv_strategies``), emotion null, topic = ``[problem_type]`` lower-cased. A merged
  supporter turn takes the strategy of its first utterance (the move that opens the turn); when
  its utterances used several strategies, all are kept in ``meta["strategies"]`` as
  ``{"<turn index>": [strategy, ...]}``;
* about half the conversations open with the supporter ("Hi, how can I help you?"). A SAC
  dialogue starts with the user, so these leading supporter utterances are dropped and kept in
  ``meta["opening"]`` as ``[{"text", "strategy"}]``; a conversation with no seeker utterance is a
  malformed record.

Ids are ``esconv_<split>_<line>``; ``meta``: source, split, line, emotion_type, problem_type,
experience_type, situation (+ opening, strategies when present).
"""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

from sage_jax.data.jsonl import ReadReport
from sage_jax.data.readers._common import (bad, convert_json_lines, ordered_split_files, require_str, split_name,
                                           type_name)
from sage_jax.sac import ESCONV_STRATEGIES, Dialogue, Latent, Turn

NAME = "esconv"
SOURCE = "esconv"


def files(path: Path) -> list[tuple[Path, str]]:
    if path.is_file():
        return [(path, split_name(path.stem))]
    return ordered_split_files(path, {f"{s}.jsonl": s for s in ("train", "valid", "test")})


def convert(obj, split: str, line: int) -> Dialogue:
    if not isinstance(obj, dict):
        bad("<record>", f"expected a JSON object, got {type_name(obj)}")
    emotion = require_str(obj, "emotion_type").strip()
    problem = require_str(obj, "problem_type").strip().lower()
    dialog = obj.get("dialog")
    if not isinstance(dialog, list) or not dialog:
        bad("dialog", "expected a non-empty list of utterances")
    # Group consecutive utterances of one speaker: [(speaker, [texts], [strategies])].
    groups: list[tuple[str, list[str], list[str]]] = []
    for i, u in enumerate(dialog):
        where = f"dialog[{i}]"
        if not isinstance(u, dict):
            bad(where, f"expected an object, got {type_name(u)}")
        speaker = u.get("speaker")
        if speaker not in ("usr", "sys"):
            bad(f"{where}.speaker", f"expected 'usr' or 'sys', got {speaker!r}")
        text = require_str(u, "text", where).strip()
        strategy = None
        if speaker == "sys":
            strategy = require_str(u, "strategy", where)
            if strategy not in ESCONV_STRATEGIES:
                bad(f"{where}.strategy", f"unknown strategy {strategy!r} (expected one of {', '.join(ESCONV_STRATEGIES)})")
        if groups and groups[-1][0] == speaker:
            groups[-1][1].append(text)
            groups[-1][2].append(strategy)
        else:
            groups.append((speaker, [text], [strategy]))
    opening = []
    if groups[0][0] == "sys":
        _, texts, strategies = groups.pop(0)
        opening = [{"text": t, "strategy": s} for t, s in zip(texts, strategies)]
    if not groups:
        bad("dialog", "no seeker ('usr') utterance")
    state = Latent(None, emotion, (problem,))
    turns, multi = [], {}
    for k, (speaker, texts, strategies) in enumerate(groups):
        text = " ".join(texts)
        if speaker == "usr":
            turns.append(Turn("user", text, state=state))
        else:
            turns.append(Turn("assistant", text, action=Latent(strategies[0], None, (problem,))))
            distinct = list(dict.fromkeys(strategies))
            if len(distinct) > 1:
                multi[str(k)] = distinct
    meta = {"source": SOURCE, "split": split, "line": line, "emotion_type": emotion, "problem_type": problem,
            "experience_type": obj.get("experience_type"), "situation": obj.get("situation")}
    if opening:
        meta["opening"] = opening
    if multi:
        meta["strategies"] = multi
    return Dialogue(f"esconv_{split}_{line}", tuple(turns), meta=meta)


def iter_file(path: Path, split: str, report: ReadReport, progress: bool | None = None) -> Iterator[Dialogue]:
    return convert_json_lines(path, report, lambda obj, line: convert(obj, split, line), progress)
