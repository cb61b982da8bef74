"""General ability kept: held-out plain-text perplexity of a model on the replies of SAC dialogues.

    from sage_jax.eval.perplexity import perplexity, perplexity_ratios
    perplexity("runs/m1", "heldout.jsonl")["perplexity"]
    perplexity_ratios({"m1": "runs/m1", "dpo": "runs/dpo"}, "smollm2", ["heldout.jsonl"])

Each held-out dialogue is rendered as a plain chat: its user turns and assistant replies, with the
latents stripped from the whole context (a SAC model is scored on what any chat model would see),
through the model's chat template (:func:`sage_jax.data.tokenize.encode_dialogue`). The loss runs
over the assistant replies' tokens and the end-of-turn token closing each (not the user turns, the
role headers or the template's system text). A dialogue longer than ``seq_len + 1`` tokens loses its
last exchanges (cut after the last assistant turn that fits); the counts say how many.

Rows are packed (:func:`sage_jax.data.packing.pack_examples`, attention kept within each dialogue)
and scored in fixed-shape batches by one jitted :func:`sage_jax.train.steps.eval_step`. Reported:
supervised ``tokens``, mean ``nll`` per token (nats) and ``perplexity = exp(nll)``.
:func:`perplexity_ratios` scores several models and a base model on the same files and gives each
model's ``ratio`` (its perplexity / the base's) and ``nll_delta``; ratios are only per-token
comparable when the tokenizations agree (``same_tokens``: the token counts match).
"""

from __future__ import annotations

import functools
import math
import sys
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

__all__ = ["PerplexityConfig", "plain_messages", "encode_plain", "nll_of_examples", "perplexity",
           "perplexity_ratios", "format_perplexity"]


@dataclass(frozen=True)
class PerplexityConfig:
    seq_len: int = 1024  # row length (a dialogue keeps at most seq_len + 1 tokens)
    batch_rows: int = 8  # rows per forward pass
    max_dialogues: int | None = None  # the first N dialogues
    include_system: bool = True  # a dialogue's own system message (if any) stays in the context
    template: str | None = None  # None: each model's own chat template
    dtype: str | None = None  # compute dtype override when loading
    progress: bool | None = None
    mesh: Any = None  # a parallel.MeshConfig laying each model out on this process's devices


def plain_messages(dialogue, *, include_system: bool = True) -> list[dict[str, str]]:
    """The dialogue as plain chat messages: the texts only, no latent anywhere."""
    msgs = [{"role": "system", "content": dialogue.system}] if include_system and dialogue.system else []
    return msgs + [{"role": t.role, "content": t.text} for t in dialogue.turns]


def encode_plain(dialogues: Sequence, tokenizer, template: str | None, seq_len: int, *,
                 include_system: bool = True) -> tuple[list, dict]:
    """Token examples (``Encoded``: tokens, loss mask on assistant replies + their end-of-turn) of
    the dialogues as plain chat, and counts of what was kept, truncated and dropped."""
    from sage_jax.data.tokenize import encode_many

    messages = [plain_messages(d, include_system=include_system) for d in dialogues]
    examples, st = encode_many(messages, tokenizer, template, max_len=seq_len + 1, progress=False)
    return examples, {"dialogues": st.dialogues, "encoded": st.kept, "truncated": st.truncated,
                      "turns_dropped": st.turns_dropped, "dropped_too_long": st.dropped_too_long,
                      "dropped_no_assistant": st.dropped_no_assistant}


def nll_of_examples(policy, examples: Sequence, *, seq_len: int, batch_rows: int = 8,
                    progress: bool | None = None) -> tuple[float, int]:
    """(summed NLL in nats, supervised tokens) of ``examples`` under ``policy`` (packed rows,
    fixed [batch_rows, seq_len] batches, one jitted eval step)."""
    import jax
    import numpy as np

    from sage_jax.data.packing import empty_row, pack_examples
    from sage_jax.progress import progress as progress_bar
    from sage_jax.train.steps import StepSpec

    rows = pack_examples(list(examples), seq_len) if examples else []
    if not rows:
        return 0.0, 0
    fn = _eval_fn(StepSpec(model=policy.cfg))
    pad = empty_row(seq_len)
    nll, n = 0.0, 0
    bar = progress_bar(len(rows), "perplexity", unit="row", show=progress)
    for i in range(0, len(rows), batch_rows):
        chunk = rows[i:i + batch_rows]
        chunk = chunk + [pad] * (batch_rows - len(chunk))
        batch = {k: np.stack([np.asarray(r[k]) for r in chunk]) for k in ("inputs", "targets", "loss_mask",
                                                                         "segment_ids", "positions")}
        out = jax.device_get(fn(policy.params, batch))
        nll += float(out["nll"])
        n += int(out["tokens"])
        bar.update(len(rows[i:i + batch_rows]))
    bar.close()
    return nll, n


@functools.lru_cache(maxsize=8)
def _eval_fn(spec):
    """One jitted eval step per model config: models of one architecture share the compiled program."""
    import jax

    from sage_jax.train import steps

    return jax.jit(lambda params, batch: steps.eval_step(spec, params, None, batch))


def _policy(model, cfg: PerplexityConfig):
    if hasattr(model, "params") and hasattr(model, "tokenizer") and hasattr(model, "cfg"):
        return model
    if isinstance(model, str) and model.startswith("openai:"):
        raise ValueError(f"perplexity: {model!r} is an endpoint; perplexity needs a model of ours "
                         "(smollm2 | an HF directory | a training run directory)")
    from sage_jax.rollout.policy import load_policy

    return load_policy(str(model), template=cfg.template, dtype=cfg.dtype, mesh=cfg.mesh)


def perplexity(model: Any, data: Any, cfg: PerplexityConfig = PerplexityConfig()) -> dict:
    """Held-out plain-text perplexity of ``model`` (any spec :func:`~sage_jax.rollout.load_policy`
    takes, or a loaded Policy) on ``data`` (SAC JSONL path(s) or Dialogues): ``{"model", "tokens",
    "nll", "perplexity", "dialogues", "encoded", "truncated", ...}``."""
    from sage_jax.eval.latent import load_dialogues

    if cfg.seq_len < 2 or cfg.batch_rows < 1:
        raise ValueError(f"perplexity: seq_len >= 2 and batch_rows >= 1 needed, got {cfg.seq_len}, {cfg.batch_rows}")
    dialogues = load_dialogues(data, "held-out")
    if cfg.max_dialogues is not None:
        dialogues = dialogues[: cfg.max_dialogues]
    policy = _policy(model, cfg)
    template = cfg.template if cfg.template is not None else policy.template
    examples, counts = encode_plain(dialogues, policy.tokenizer, template, cfg.seq_len,
                                    include_system=cfg.include_system)
    nll, n = nll_of_examples(policy, examples, seq_len=cfg.seq_len, batch_rows=cfg.batch_rows, progress=cfg.progress)
    mean = nll / n if n else None
    if not n:
        print(f"perplexity: {policy.name}: no supervised tokens (no assistant reply fits seq_len={cfg.seq_len})",
              file=sys.stderr)
    return {"model": policy.name or str(model), "spec": model if isinstance(model, str) else policy.name,
            **counts, "tokens": n, "nll": mean, "perplexity": math.exp(mean) if mean is not None else None,
            "seq_len": cfg.seq_len}


def perplexity_ratios(models: Mapping[str, Any], base_spec: Any, files: Any,
                      cfg: PerplexityConfig = PerplexityConfig()) -> dict:
    """The base model and each of ``models`` (name -> spec) on the same held-out ``files``, one model
    in memory at a time: ``{"base": {...}, "models": {name: {..., "ratio", "nll_delta", "same_tokens"}}}``
    (ratio = the model's perplexity / the base's; below 1 the model predicts the replies better)."""
    from sage_jax.eval.latent import load_dialogues

    dialogues = load_dialogues(files, "held-out")  # read once, shared by every model
    base = perplexity(base_spec, dialogues, cfg)
    out: dict[str, Any] = {"base": base, "models": {}}
    for name, spec in models.items():
        r = perplexity(spec, dialogues, cfg)
        ok = r["nll"] is not None and base["nll"] is not None
        r.update(ratio=r["perplexity"] / base["perplexity"] if ok else None,
                 nll_delta=r["nll"] - base["nll"] if ok else None, same_tokens=r["tokens"] == base["tokens"])
        if not r["same_tokens"]:
            print(f"perplexity: {name} scores {r['tokens']} tokens, the base {base['tokens']}: different "
                  "tokenizations or truncation, so the ratio is not per-token comparable", file=sys.stderr)
        out["models"][name] = r
    return out


def format_perplexity(res: dict) -> str:
    f = lambda x, d=4: "n/a" if x is None else f"{x:.{d}f}"  # noqa: E731
    lines = ["| model | tokens | mean NLL | perplexity | ratio to base |", "|---|---|---|---|---|"]
    b = res.get("base")
    if b:
        lines.append(f"| base: {b['model']} | {b['tokens']} | {f(b['nll'])} | {f(b['perplexity'], 3)} | 1 |")
    for name, r in res["models"].items():
        lines.append(f"| {name} ({r['model']}) | {r['tokens']} | {f(r['nll'])} | {f(r['perplexity'], 3)} | "
                     f"{f(r.get('ratio'), 4) if b else '-'} |")
    return "\n".join(lines)
