"""A small SAC sample shipped with the package (for the demo, tests and quick starts).

    from sage_jax.data.sample import sample_path
    dialogues, _ = read_sac(sample_path("ed_train_200.jsonl"))

Files (see README.md here for attribution and licences): ``ed_train_200.jsonl`` (the first 200
EmpatheticDialogues train conversations), ``esconv_train_100.jsonl`` (the first 100 ESConv train
conversations), both converted by :mod:`sage_jax.data.readers`, and ``ed_test_seeds.txt`` (the
first 50 EmpatheticDialogues test situations, rollout seeds). Rebuild from the corpora with
``python -m sage_jax.data.sample DATA_DIR``.
"""

from __future__ import annotations

import os
from pathlib import Path

__all__ = ["SAMPLE_DIR", "SAMPLES", "sample_path", "build_sample"]

SAMPLE_DIR = Path(__file__).resolve().parent
# name -> (corpus format, file inside the shared data folder, how many records)
SAMPLES = {
    "ed_train_200.jsonl": ("ed", "empatheticdialogues/ed_train.jsonl", 200),
    "esconv_train_100.jsonl": ("esconv", "esconv/train.jsonl", 100),
    "ed_test_seeds.txt": ("seeds", "empatheticdialogues/test_sent.tsv", 50),
}


def sample_path(name: str) -> Path:
    """Path of a shipped sample file; raises FileNotFoundError naming the available ones."""
    path = SAMPLE_DIR / name
    if name not in SAMPLES or not path.is_file():
        raise FileNotFoundError(f"no sample {name!r}; available: {', '.join(SAMPLES)}")
    return path


def build_sample(data_dir: str | os.PathLike, out_dir: str | os.PathLike = SAMPLE_DIR) -> dict[str, Path]:
    """Write the sample files from the corpora under ``data_dir`` (strict: the sample must be clean)."""
    from itertools import islice

    from sage_jax.data.jsonl import ReadReport, write_sac
    from sage_jax.data.readers import iter_corpus, read_seeds

    data_dir, out_dir, out = Path(data_dir), Path(out_dir), {}
    for name, (fmt, rel, n) in SAMPLES.items():
        path = out_dir / name
        if fmt == "seeds":
            seeds = read_seeds(data_dir / rel, limit=n)
            path.write_text("".join(s + "\n" for s in seeds), encoding="utf-8")
        else:
            report = ReadReport(str(data_dir / rel), strict=True)
            write_sac(path, islice(iter_corpus(fmt, data_dir / rel, report, progress=False), n))
        out[name] = path
    return out
