"""Latent-prediction accuracy of a SAGE model on held-out SAC dialogues.

    from sage_jax.eval.latent import LatentEvalConfig, evaluate_latents
    res = evaluate_latents("runs/m1", "heldout.jsonl", LatentEvalConfig(max_dialogues=50))
    res["teacher_forced"]["latent_accuracy"], res["generated"]["fields"]["u_emotion"]["accuracy"]

Two measures:

* **teacher-forced** (:func:`teacher_forced_accuracy`): the training data path
  (:func:`sage_jax.data.encode.encode_dialogues` -> :func:`sage_jax.data.packing.pack_examples` ->
  :func:`sage_jax.train.steps.eval_step`): next-token loss and argmax accuracy over all supervised
  tokens, and argmax accuracy over the tokens of the latent prefixes (``latent_mask``).
* **generated fields** (:func:`generated_field_accuracy`): for each assistant turn with reference
  latents, the history up to the user's message is given (past assistant turns *with* their
  latents, as at inference, SAGE.md §1), the latent prefix is generated greedily, parsed with
  :func:`sage_jax.sac.parse_assistant_lenient`, and each field compared with the reference:
  ``u_motivation``, ``u_emotion``, ``a_motivation``, ``a_emotion`` by exact match after
  normalising case and whitespace (a reference null matches a predicted null or a field missing
  from a block that is there); ``u_topic`` / ``a_topic`` by the Jaccard overlap of the normalised
  sets (1.0 when both are empty), with the exact-set rate alongside. When a whole block (state or
  action) is missing, every field of it scores 0, null references included. ``parse_rate`` is the
  fraction of generated turns whose prefix gave both a state and an action.
* **majority baseline** (:func:`majority_values`, :func:`majority_baseline`): given the *training*
  dialogues (``train=``), each field's most frequent normalised value in their latents (null is a
  value; for topics, the most frequent topic set), predicted for every evaluated turn and scored
  with the same metric; reported per field next to the model's score as ``majority_baseline`` and
  ``majority_value``.

Bounded by ``max_dialogues`` and ``max_turns`` (assistant turns per dialogue).
"""

from __future__ import annotations

import json
import os
import re
import sys
from collections.abc import Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

__all__ = ["LatentEvalConfig", "SCALAR_FIELDS", "TOPIC_FIELDS", "normalise_label", "topic_set", "jaccard",
           "compare_fields", "teacher_forced_accuracy", "generated_field_accuracy", "evaluate_latents",
           "format_latent_summary", "uses_latent_tokens", "majority_values", "majority_baseline",
           "load_dialogues"]

SCALAR_FIELDS = ("u_motivation", "u_emotion", "a_motivation", "a_emotion")
TOPIC_FIELDS = ("u_topic", "a_topic")
_NULLS = frozenset({"", "null", "none", "n/a", "na"})


@dataclass(frozen=True)
class LatentEvalConfig:
    max_dialogues: int | None = 50
    max_turns: int | None = None  # assistant turns per dialogue (generation-based measure)
    seq_len: int = 1024  # teacher-forced rows (longer dialogues lose their last turns)
    batch_rows: int = 8
    max_new_tokens: int = 64  # enough for both latent blocks; the reply after them is not needed
    batch_size: int = 16
    teacher_forced: bool = True
    generate: bool = True
    template: str | None = None  # None: the tokenizer's own chat template
    latent_tokens: bool | None = None  # None: detect from the tokenizer (latent special tokens present)
    seed: int = 0
    progress: bool | None = None


# ---------------------------------------------------------------- comparison
def normalise_label(v: Any) -> str | None:
    """Lower case, whitespace collapsed, quotes stripped; null-like words -> None."""
    if v is None:
        return None
    s = re.sub(r"\s+", " ", str(v)).strip().strip("\"'`").strip().lower()
    return None if s in _NULLS else s


def topic_set(topics: Sequence[str] | None) -> frozenset[str]:
    return frozenset(t for t in (normalise_label(x) for x in (topics or ())) if t is not None)


def jaccard(a: frozenset, b: frozenset) -> float:
    if not a and not b:
        return 1.0
    return len(a & b) / len(a | b)


def compare_fields(ref_state, ref_action, pred_state, pred_action) -> dict[str, float]:
    """Per-field scores in [0, 1] of predicted latents (``None`` = block missing) against the reference."""
    out: dict[str, float] = {}
    for side, ref, pred in (("u", ref_state, pred_state), ("a", ref_action, pred_action)):
        if pred is None:  # no block at all: every field of it is wrong, even a null reference
            out.update({f"{side}_motivation": 0.0, f"{side}_emotion": 0.0, f"{side}_topic": 0.0,
                        f"{side}_topic_exact": 0.0})
            continue
        for name in ("motivation", "emotion"):
            r = normalise_label(getattr(ref, name))
            p = normalise_label(getattr(pred, name))
            out[f"{side}_{name}"] = float(r == p)
        rt = topic_set(ref.topic)
        pt = topic_set(pred.topic)
        out[f"{side}_topic"] = jaccard(rt, pt)
        out[f"{side}_topic_exact"] = float(rt == pt)
    return out


# ---------------------------------------------------------------- helpers
def uses_latent_tokens(tokenizer) -> bool:
    """True if the tokenizer knows the latent special tokens (the model was trained with them)."""
    from sage_jax.sac import DEFAULT_SCHEMA

    vocab = tokenizer.get_vocab()
    return all(t in vocab for t in DEFAULT_SCHEMA.special_tokens())


def _annotated_turns(dialogue) -> list[int]:
    """Indices of assistant turns whose preceding user turn has a state and which have an action."""
    return [i for i, t in enumerate(dialogue.turns)
            if t.role == "assistant" and t.action is not None and dialogue.turns[i - 1].state is not None]


# ---------------------------------------------------------------- teacher-forced
def teacher_forced_accuracy(policy, dialogues, *, seq_len: int = 1024, batch_rows: int = 8,
                            latent_tokens: bool = False) -> dict:
    """Loss, token accuracy and latent-token accuracy (teacher forcing) over the dialogues."""
    import jax
    import numpy as np

    from sage_jax.data.packing import pack_examples
    from sage_jax.train import steps
    from sage_jax.data.encode import encode_dialogues

    examples = encode_dialogues(list(dialogues), policy.tokenizer, policy.template, seq_len, latent_tokens,
                                "latent-eval")
    rows = pack_examples(examples, seq_len) if examples else []
    res = {"dialogues": len(dialogues), "encoded": len(examples), "rows": len(rows), "tokens": 0,
           "latent_tokens": 0, "loss": None, "accuracy": None, "latent_accuracy": None}
    if not rows:
        return res
    spec = steps.StepSpec(model=policy.cfg)
    fn = jax.jit(lambda params, b: steps.eval_step(spec, params, None, b))
    tot: dict[str, float] = {}
    for i in range(0, len(rows), batch_rows):
        chunk = rows[i:i + batch_rows]
        chunk = chunk + [{k: np.zeros_like(v) for k, v in rows[0].items()}] * (batch_rows - len(chunk))
        batch = {k: np.stack([r[k] for r in chunk]) for k in rows[0]}
        for k, v in jax.device_get(fn(policy.params, batch)).items():
            tot[k] = tot.get(k, 0.0) + float(v)
    n, nl = int(tot.get("tokens", 0)), int(tot.get("latent_tokens", 0))
    res.update(tokens=n, latent_tokens=nl, loss=tot["nll"] / n if n else None, accuracy=tot["hits"] / n if n else None,
               latent_accuracy=tot["latent_hits"] / nl if nl else None)
    return res


# ---------------------------------------------------------------- majority baseline
def _read_dialogues(data: Any, what: str) -> list:
    """Dialogues from a SAC JSONL path, a sequence of paths, or a sequence of Dialogues."""
    if isinstance(data, (str, os.PathLike)):
        data = [data]
    data = list(data)
    if not data or not all(isinstance(x, (str, os.PathLike)) for x in data):
        return data
    from sage_jax.data.jsonl import read_sac

    out = []
    for f in data:
        p = Path(f)
        if not p.exists():
            raise FileNotFoundError(f"latent eval: {what} file {p} not found")
        dialogues, report = read_sac(p, strict=False)
        if report.skipped:
            shown = "; ".join(str(e) for e in report.errors[:3])
            print(f"{p}: skipped {report.skipped} malformed record(s): {shown}", file=sys.stderr)
        out.extend(dialogues)
    if not out:
        raise ValueError(f"{', '.join(map(str, data))}: no valid SAC dialogues ({what})")
    return out


load_dialogues = _read_dialogues


def majority_values(train_dialogues: Sequence) -> dict:
    """Each field's most frequent normalised value over the annotated exchanges (a user state
    answered by an assistant action) of the training dialogues: ``{"values": {field: value},
    "counts": {field: count of that value}, "exchanges": n}``. A null is a value like any other;
    a topic field's value is a topic set (a sorted list). Ties go to the smallest value (null first)."""
    from collections import Counter

    counters = {k: Counter() for k in (*SCALAR_FIELDS, *TOPIC_FIELDS)}
    n = 0
    for d in train_dialogues:
        for i in _annotated_turns(d):
            n += 1
            for side, lat in (("u", d.turns[i - 1].state), ("a", d.turns[i].action)):
                counters[f"{side}_motivation"][normalise_label(lat.motivation)] += 1
                counters[f"{side}_emotion"][normalise_label(lat.emotion)] += 1
                counters[f"{side}_topic"][tuple(sorted(topic_set(lat.topic)))] += 1
    values, counts = {}, {}
    for k, c in counters.items():
        if not c:
            values[k], counts[k] = (None if k in SCALAR_FIELDS else []), 0
            continue
        v, cnt = min(c.items(), key=lambda kv: (-kv[1], "" if kv[0] is None else "\x01" + str(kv[0])))
        values[k], counts[k] = (list(v) if k in TOPIC_FIELDS else v), cnt
    return {"values": values, "counts": counts, "exchanges": n}


def _majority_latents(values: dict):
    from sage_jax.sac import Latent

    return (Latent(values["u_motivation"], values["u_emotion"], tuple(values["u_topic"])),
            Latent(values["a_motivation"], values["a_emotion"], tuple(values["a_topic"])))


def _eval_items(dialogues, max_turns: int | None, latent_tokens: bool) -> tuple[list, int]:
    """(dialogue, assistant turn index, history messages) of every evaluated turn, and the skipped count."""
    from sage_jax.sac import DEFAULT_SCHEMA, SACError, to_messages

    items, skipped = [], 0
    for d in dialogues:
        turns = _annotated_turns(d)
        if max_turns is not None:
            turns = turns[:max_turns]
        for i in turns:
            try:
                msgs = to_messages(d.replace(turns=d.turns[:i]), DEFAULT_SCHEMA, special_tokens=latent_tokens)
            except SACError as e:  # e.g. a half-annotated earlier exchange
                print(f"latent eval: {d.id} turn {i}: skipped: {e}", file=sys.stderr)
                skipped += 1
                continue
            items.append((d, i, msgs))
    return items, skipped


_SCORE_KEYS = (*SCALAR_FIELDS, *TOPIC_FIELDS, "u_topic_exact", "a_topic_exact")


def _baseline_sums(values: dict, items) -> dict[str, float]:
    ps, pa = _majority_latents(values)
    sums = dict.fromkeys(_SCORE_KEYS, 0.0)
    for d, i, _ in items:
        sc = compare_fields(d.turns[i - 1].state, d.turns[i].action, ps, pa)
        for k in _SCORE_KEYS:
            sums[k] += sc[k]
    return sums


def _field_table(n: int, sums: dict | None, base: dict | None, majority: dict | None) -> dict:
    r = lambda x: x / n if n else None  # noqa: E731
    fields = {}
    for k in SCALAR_FIELDS:
        fields[k] = {**({"accuracy": r(sums[k])} if sums is not None else {}), "n": n}
        if base is not None:
            fields[k].update(majority_baseline=r(base[k]), majority_value=majority["values"][k])
    for k in TOPIC_FIELDS:
        fields[k] = {**({"jaccard": r(sums[k]), "exact": r(sums[f"{k}_exact"])} if sums is not None else {}),
                     "n": n}
        if base is not None:
            fields[k].update(majority_baseline=r(base[k]), majority_baseline_exact=r(base[f"{k}_exact"]),
                             majority_value=majority["values"][k])
    return fields


def majority_baseline(train: Any, dialogues: Any, *, max_turns: int | None = None) -> dict:
    """The majority-class baseline alone (no model): the majority values of ``train`` (SAC JSONL
    path(s) or Dialogues) scored on the evaluated turns of ``dialogues`` (same selection and metric
    as :func:`generated_field_accuracy`). ``{"turns", "majority", "fields": {field: {"majority_baseline",
    "majority_value", "n", ...}}}``."""
    majority = majority_values(_read_dialogues(train, "training"))
    items, skipped = _eval_items(_read_dialogues(dialogues, "held-out"), max_turns, False)
    base = _baseline_sums(majority["values"], items)
    return {"turns": len(items), "skipped": skipped, "majority": majority,
            "fields": _field_table(len(items), None, base, majority)}


# ---------------------------------------------------------------- generated
def generated_field_accuracy(chat, dialogues, *, max_turns: int | None = None, max_new_tokens: int = 64,
                             latent_tokens: bool = False, seed: int = 0, output: str | os.PathLike | None = None,
                             progress: bool | None = None, train: Any = None) -> dict:
    """Per-field accuracy of greedily generated latent prefixes (see the module docstring).

    ``chat``: a :class:`~sage_jax.eval.generation.ModelChat` (needs the raw text, latents included).
    ``output``: optional per-turn JSONL (dialogue id, turn, generated text, parsed and reference latents,
    field scores), rewritten each call. ``train``: the training dialogues (SAC JSONL path(s) or
    Dialogues): each field then also carries ``majority_baseline`` and ``majority_value``.
    """
    from sage_jax.progress import progress as progress_bar

    from sage_jax.sac import DEFAULT_SCHEMA, parse_assistant_lenient
    from sage_jax.sac.dialogue import latent_to_json

    items, skipped = _eval_items(dialogues, max_turns, latent_tokens)
    keys = _SCORE_KEYS
    sums = dict.fromkeys(keys, 0.0)
    parsed_ok = blocks_ok = 0
    recs = []
    bar = progress_bar(len(items), "latent-eval", unit="turn", show=progress)
    step = max(1, getattr(chat, "batch_size", 16))
    for s in range(0, len(items), step):
        chunk = items[s:s + step]
        outs = chat.chat([m for _, _, m in chunk], temperature=0.0, max_tokens=max_new_tokens, seed=seed,
                         row_seeds=list(range(s, s + len(chunk))))
        for (d, i, _), c in zip(chunk, outs):
            raw = getattr(c, "raw", None) or c.text or ""
            lp = parse_assistant_lenient(raw, DEFAULT_SCHEMA, special_tokens=latent_tokens) if c.ok else None
            ref_s, ref_a = d.turns[i - 1].state, d.turns[i].action
            sc = compare_fields(ref_s, ref_a, lp.state if lp else None, lp.action if lp else None)
            for k in keys:
                sums[k] += sc[k]
            parsed_ok += bool(lp and lp.ok)
            blocks_ok += bool(lp and lp.state is not None and lp.action is not None)
            recs.append({"id": d.id, "turn": i, "generated": raw, "error": c.error,
                         "parse_ok": bool(lp and lp.ok),
                         "pred_state": latent_to_json(lp.state) if lp and lp.state else None,
                         "pred_action": latent_to_json(lp.action) if lp and lp.action else None,
                         "ref_state": latent_to_json(ref_s), "ref_action": latent_to_json(ref_a), "scores": sc})
        bar.update(len(chunk))
    bar.close()
    if output is not None:
        from sage_jax.data.jsonl import JsonlWriter

        with JsonlWriter(output, append=False) as w:
            w.write_all(recs)
    n = len(items)
    majority = base = None
    if train is not None:
        majority = majority_values(_read_dialogues(train, "training"))
        base = _baseline_sums(majority["values"], items)
    res = {"turns": n, "skipped": skipped, "dialogues": len({id(d) for d, _, _ in items}),
           "parse_ok_rate": parsed_ok / n if n else None, "both_blocks_rate": blocks_ok / n if n else None,
           # parse rate: generated turns whose prefix gave both a state and an action
           "parse_rate": blocks_ok / n if n else None, "parsed_turns": blocks_ok,
           "fields": _field_table(n, sums, base, majority)}
    if majority is not None:
        res["majority"] = majority
    return res


# ---------------------------------------------------------------- the whole evaluation
def evaluate_latents(model: Any, data: Any, cfg: LatentEvalConfig = LatentEvalConfig(), *,
                     output: str | os.PathLike | None = None, train: Any = None) -> dict:
    """Both measures for ``model`` (``smollm2`` | HF dir | run dir | a Policy | a ModelChat) on ``data``
    (a SAC JSONL path or a list of :class:`~sage_jax.sac.Dialogue`). ``train`` (SAC JSONL path(s) or
    Dialogues: the model's training data) adds the per-field majority-class baseline."""
    from sage_jax.eval.generation import ModelChat

    if isinstance(data, (str, os.PathLike)):
        p = Path(data)
        if not p.exists():
            raise FileNotFoundError(f"latent eval: data file {p} not found")
        dialogues = _read_dialogues(p, "held-out")
    else:
        dialogues = list(data)
    if cfg.max_dialogues is not None:
        dialogues = dialogues[: cfg.max_dialogues]
    train_dialogues = _read_dialogues(train, "training") if train is not None else None
    if isinstance(model, ModelChat):
        chat = model
    elif hasattr(model, "encode_chat") and hasattr(model, "params"):
        chat = ModelChat(model, batch_size=cfg.batch_size, strip_latents=False)
    else:
        chat = ModelChat.load(str(model), template=cfg.template, batch_size=cfg.batch_size, strip_latents=False)
    policy = chat.policy
    if cfg.template is not None:
        policy.template = cfg.template
    lt = uses_latent_tokens(policy.tokenizer) if cfg.latent_tokens is None else cfg.latent_tokens
    annotated = sum(len(_annotated_turns(d)) for d in dialogues)
    res: dict[str, Any] = {"model": chat.name, "dialogues": len(dialogues), "annotated_turns": annotated,
                           "latent_tokens": lt, "config": asdict(cfg)}
    if annotated == 0:
        print("latent eval: no annotated assistant turns (state + action) in the data", file=sys.stderr)
    if cfg.teacher_forced:
        res["teacher_forced"] = teacher_forced_accuracy(policy, dialogues, seq_len=cfg.seq_len,
                                                        batch_rows=cfg.batch_rows, latent_tokens=lt)
    if cfg.generate:
        res["generated"] = generated_field_accuracy(chat, dialogues, max_turns=cfg.max_turns,
                                                    max_new_tokens=cfg.max_new_tokens, latent_tokens=lt,
                                                    seed=cfg.seed, output=output, progress=cfg.progress,
                                                    train=train_dialogues)
    return res


def format_latent_summary(res: dict) -> str:
    f = lambda x: "n/a" if x is None else f"{x:.3f}"  # noqa: E731
    lines = [f"latent eval of {res['model']}: {res['dialogues']} dialogues, {res['annotated_turns']} annotated turns"]
    tf = res.get("teacher_forced")
    if tf:
        lines.append(f"teacher-forced: loss {f(tf['loss'])}  token acc {f(tf['accuracy'])}  "
                     f"latent-token acc {f(tf['latent_accuracy'])} ({tf['latent_tokens']} latent tokens)")
    g = res.get("generated")
    if g:
        lines.append(f"generated ({g['turns']} turns, parse rate (state and action) {f(g.get('parse_rate'))}, "
                     f"fully parsed {f(g['parse_ok_rate'])}):")
        base = "majority_baseline" in g["fields"][SCALAR_FIELDS[0]]
        for k in SCALAR_FIELDS:
            v = g["fields"][k]
            lines.append(f"  {k:<13} accuracy {f(v['accuracy'])}"
                         + (f"  majority baseline {f(v['majority_baseline'])} ({v['majority_value']!r})" if base else ""))
        for k in TOPIC_FIELDS:
            v = g["fields"][k]
            lines.append(f"  {k:<13} jaccard  {f(v['jaccard'])}  exact {f(v['exact'])}"
                         + (f"  majority baseline {f(v['majority_baseline'])} ({v['majority_value']!r})"
                            if base else ""))
    return "\n".join(lines)


def _dump(res: dict) -> str:  # pragma: no cover - CLI helper
    return json.dumps(res, indent=2)
