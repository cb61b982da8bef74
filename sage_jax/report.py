"""A Markdown report with PNG plots of a loop run: loss curves, latent accuracy, win/tie/loss, a tree."""

from __future__ import annotations

import json
import textwrap
from pathlib import Path

import matplotlib

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


def write_report(out: Path, *, title: str, sft_run: Path, dpo_run: Path | None, search_dir: Path,
                 compare: dict | None, compare_labels: tuple[str, str], notes: list[str]) -> Path:
    """report.md with its PNGs beside it."""
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
                  "", f"| {compare_labels[0]} wins | {compare_labels[1]} wins | no consensus | total | judge |",
                  "|---|---|---|---|---|",
                  f"| {compare['wins_a']} | {compare['wins_b']} | {compare['no_consensus']} | {compare['total']} | "
                  f"{compare['judge']} |", ""]
    path = out / "report.md"
    path.write_text("\n".join(lines) + "\n")
    return path
