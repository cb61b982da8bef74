"""A Markdown report with PNG plots of a loop run: loss curves, latent accuracy, win/tie/loss, a tree."""

from __future__ import annotations

import json
import math
import textwrap
from pathlib import Path

import matplotlib
import numpy as np

matplotlib.use("Agg")  # files only: no display on servers and CI
import matplotlib.pyplot as plt  # noqa: E402


def _jsonl(path: Path) -> list[dict]:
    if not path.exists():
        return []
    return [json.loads(x) for x in path.read_text().splitlines() if x.strip()]


def plot_losses(runs: dict[str, Path], out: Path) -> Path:
    fig, ax = plt.subplots(figsize=(7, 4))
    for name, run in runs.items():
        rows = [r for r in _jsonl(run / "logs" / "metrics.jsonl") if "loss" in r]
        if rows:
            ax.plot([r["step"] for r in rows], [r["loss"] for r in rows], label=f"{name} train")
        ev = _jsonl(run / "eval.jsonl")
        if ev:
            ax.plot([r["step"] for r in ev], [r["loss"] for r in ev], "o--", label=f"{name} validation")
    ax.set_xlabel("step")
    ax.set_ylabel("loss")
    ax.legend()
    ax.set_title("Training and validation loss")
    fig.tight_layout()
    fig.savefig(out, dpi=100)
    plt.close(fig)
    return out


def plot_latent_accuracy(run: Path, out: Path) -> Path:
    ev = [r for r in _jsonl(run / "eval.jsonl") if "latent_accuracy" in r]
    fig, ax = plt.subplots(figsize=(6, 3.5))
    ax.plot([r["step"] for r in ev], [r["latent_accuracy"] for r in ev], "o-", label="latent tokens")
    ax.plot([r["step"] for r in ev], [r["accuracy"] for r in ev], "s--", label="all supervised tokens")
    ax.set_xlabel("step")
    ax.set_ylabel("teacher-forced accuracy")
    ax.set_title("Validation accuracy (held-out SAC dialogues)")
    ax.legend()
    fig.tight_layout()
    fig.savefig(out, dpi=100)
    plt.close(fig)
    return out


def plot_compare(summary: dict, labels: tuple[str, str], out: Path) -> Path:
    fig, ax = plt.subplots(figsize=(5, 3.5))
    names = [f"{labels[0]} wins", f"{labels[1]} wins", "no consensus"]
    vals = [summary["wins_a"], summary["wins_b"], summary["no_consensus"]]
    ax.bar(names, vals, color=["#2a2", "#a22", "#999"])
    ax.set_title(f"Pairwise judge ({summary['judge']}), both orders")
    fig.tight_layout()
    fig.savefig(out, dpi=100)
    plt.close(fig)
    return out


def plot_tree(tree: dict, out: Path, max_chars: int = 70) -> Path:
    """One search tree: a row per assistant turn, its K candidates, the chosen one in green."""
    nodes = tree["nodes"]
    k = max(len(n["candidates"]) for n in nodes)
    fig, ax = plt.subplots(figsize=(3.2 * k, 1.6 * len(nodes) + 0.5))
    ax.set_xlim(0, k)
    ax.set_ylim(len(nodes), 0)
    ax.axis("off")
    for i, node in enumerate(nodes):
        for j, c in enumerate(node["candidates"]):
            lat = c["action"]["motivation"] if c.get("action") else (c.get("pinned") or {}).get("a_motivation")
            text = (f"[{lat}] " if lat else "") + (c.get("reply") or "")
            body = textwrap.fill(text[:max_chars], 28)
            chosen = j == node["chosen"]
            ax.text(j + 0.05, i + 0.1, f"turn {node['turn']} · child {j}\n{body}", va="top", fontsize=7,
                    bbox=dict(boxstyle="round", fc="#dfd" if chosen else "#eee", ec="#2a2" if chosen else "#bbb"))
    ax.set_title(f"Search tree {tree['id']} (chosen children in green)")
    fig.tight_layout()
    fig.savefig(out, dpi=100)
    plt.close(fig)
    return out


def fmt(x, d: int = 3) -> str:
    """A number for a table ("n/a" for None, NaN and infinities)."""
    return "n/a" if x is None or (isinstance(x, float) and not math.isfinite(x)) else f"{x:.{d}f}"


def plot_latent_fields(latent: dict, path: Path) -> Path:
    """Per-field accuracy of generated latents (topics: Jaccard) of each model and the majority baseline."""
    from sage_jax.eval.latent import SCALAR_FIELDS, TOPIC_FIELDS

    fields = [*SCALAR_FIELDS, *TOPIC_FIELDS]
    series = {}
    first = next(iter(latent.values()))["generated"]["fields"]
    series["majority baseline"] = [first[f].get("majority_baseline") or 0.0 for f in fields]
    for n in latent:
        g = latent[n]["generated"]["fields"]
        series[n] = [(g[f].get("accuracy") if f in SCALAR_FIELDS else g[f].get("jaccard")) or 0.0 for f in fields]
    fig, ax = plt.subplots(figsize=(8, 3.8))
    w = 0.8 / len(series)
    x = np.arange(len(fields))
    for i, (n, vals) in enumerate(series.items()):
        ax.bar(x + i * w - 0.4 + w / 2, vals, w, label=n, color="#999" if i == 0 else None)
    ax.set_xticks(x, fields, rotation=20)
    ax.set_ylim(0, 1)
    ax.set_ylabel("accuracy (topics: Jaccard)")
    ax.set_title("Latent fields generated on held-out SAC dialogues")
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return path


def latent_section(latent: dict, out: Path) -> list[str]:
    """Markdown lines: the field-level latent accuracy table (``evaluate_latents`` results by model
    name, generated with ``train`` so each field has its majority baseline) and its plot."""
    from sage_jax.eval.latent import SCALAR_FIELDS, TOPIC_FIELDS

    L = ["## Latent fields generated on held-out SAC dialogues", ""]
    if not latent:
        return L + ["(not measured)", ""]
    names = list(latent)
    gen = {n: latent[n]["generated"] for n in names}
    first = gen[names[0]]
    L += [f"{first['turns']} assistant turns of {latent[names[0]]['dialogues']} held-out dialogues: the history "
          "up to the user's message is given, the latent prefix generated greedily, parsed and compared field by "
          "field with the reference (topics: Jaccard overlap). Majority baseline: each field's most frequent "
          "value in the training dialogues. Parse rate: turns whose prefix gave both a state and an action.", "",
          "| field | majority baseline (value) | " + " | ".join(names) + " |",
          "|---|---|" + "---|" * len(names)]
    for fld in (*SCALAR_FIELDS, *TOPIC_FIELDS):
        b = first["fields"][fld]
        key = "accuracy" if fld in SCALAR_FIELDS else "jaccard"
        L.append(f"| {fld} | {fmt(b.get('majority_baseline'))} ({b.get('majority_value')!r}) | "
                 + " | ".join(fmt(gen[n]['fields'][fld].get(key)) for n in names) + " |")
    L.append("| parse rate | - | " + " | ".join(fmt(gen[n].get("parse_rate")) for n in names) + " |")
    return L + ["", f"![latent fields]({plot_latent_fields(latent, out / 'latent_fields.png').name})", ""]


def plot_perplexity(ppl: dict, path: Path) -> Path:
    names = [n for n, r in ppl["models"].items() if r.get("ratio") is not None]
    fig, ax = plt.subplots(figsize=(6, 3.5))
    ax.bar(names, [ppl["models"][n]["ratio"] for n in names], color="#48a")
    ax.axhline(1.0, color="#999", linestyle="--")
    ax.set_ylabel("perplexity / base perplexity")
    ax.set_title("Held-out plain-text perplexity (replies, no latents)")
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return path


def perplexity_section(ppl: dict, out: Path) -> list[str]:
    """Markdown lines: held-out plain-text perplexity of each model against the base (the result of
    ``eval.perplexity.perplexity_ratios``) and its plot."""
    from sage_jax.eval.perplexity import format_perplexity

    L = ["## General ability kept: held-out plain-text perplexity", "",
         "Replies of the held-out SAC dialogues, latents stripped from the whole context, through each model's chat "
         "template; ratio below 1: the model predicts the replies better than the base.", "",
         format_perplexity(ppl), ""]
    if ppl["models"]:
        L += [f"![perplexity ratios]({plot_perplexity(ppl, out / 'perplexity.png').name})", ""]
    return L


def search_parse_rate(search_dir: Path) -> dict:
    """How many searched candidates carried a latent prefix that parsed to a state and an action."""
    cands = [c for t in _jsonl(search_dir / "trees.jsonl") for n in t["nodes"] for c in n["candidates"]]
    ok = sum(c.get("state") is not None and c.get("action") is not None for c in cands)
    return {"candidates": len(cands), "parsed": ok, "rate": ok / len(cands) if cands else None}


def rate_text(r: dict | None) -> str:
    if not r or r.get("rate") is None:
        return f"n/a (n={r.get('n', 0) if r else 0})"
    return f"{r['rate']:.3f} [{r['low']:.3f}, {r['high']:.3f}]"


def write_report(out: Path, *, title: str, sft_run: Path, dpo_run: Path | None, search_dir: Path,
                 compare: dict | None, compare_labels: tuple[str, str], notes: list[str],
                 sections: list[str] = ()) -> Path:
    """report.md with its PNGs beside it; ``sections``: further Markdown lines at the end."""
    out.mkdir(parents=True, exist_ok=True)
    runs = {"sft": sft_run, **({"dpo": dpo_run} if dpo_run else {})}
    lines = [f"# {title}", ""] + [f"- {n}" for n in notes] + [""]
    lines += ["## Training", "", f"![loss curves]({plot_losses(runs, out / 'loss_curves.png').name})", ""]
    ev = _jsonl(sft_run / "eval.jsonl")
    if ev:
        lines += [f"![latent accuracy]({plot_latent_accuracy(sft_run, out / 'latent_accuracy.png').name})", "",
                  "| step | validation loss | token accuracy | latent-token accuracy |", "|---|---|---|---|"]
        lines += [f"| {r['step']} | {r['loss']:.4f} | {r['accuracy']:.4f} | {r.get('latent_accuracy', float('nan')):.4f} |"
                  for r in ev]
        lines.append("")
    if dpo_run:
        dev = _jsonl(dpo_run / "eval.jsonl")
        if dev:
            lines += ["DPO validation: " + ", ".join(f"step {r['step']}: loss {r['loss']:.4f}, reward accuracy "
                                                    f"{r.get('reward_accuracy', float('nan')):.2f}" for r in dev), ""]
    trees = _jsonl(search_dir / "trees.jsonl")
    if trees:
        lines += ["## Tree search", "", f"{len(trees)} dialogues searched; preference pairs in "
                  f"`{search_dir / 'pairs.jsonl'}`; interactive trees in `{search_dir / 'trees'}/`.", "",
                  f"![a search tree]({plot_tree(trees[0], out / 'tree.png').name})", ""]
    if compare:
        lines += ["## Comparison", "", f"![win/tie/loss]({plot_compare(compare, compare_labels, out / 'compare.png').name})",
                  "", f"| {compare_labels[0]} wins | {compare_labels[1]} wins | no consensus | total | "
                  f"{compare_labels[1]} win rate, decided pairs (95% interval) | judge |",
                  "|---|---|---|---|---|---|",
                  f"| {compare['wins_a']} | {compare['wins_b']} | {compare['no_consensus']} | {compare['total']} | "
                  f"{rate_text(compare.get('win_rate_b_decided'))} | {compare['judge']} |", ""]
    lines += list(sections)
    path = out / "report.md"
    path.write_text("\n".join(lines) + "\n")
    return path
