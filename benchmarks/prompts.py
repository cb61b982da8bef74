"""Prompts of real text for the decode benchmarks: windows of one tokenized paragraph, so the
logits (and a sampler's nucleus sizes) are those of text, not of random token ids."""

from __future__ import annotations

from typing import Callable

import numpy as np

TEXT = ("I lost my job last week and I have been feeling anxious about money and about telling my "
        "family. Every morning I wake up early and cannot get back to sleep. ") * 64


def text_prompts(tok, rng: np.random.Generator) -> Callable[[int, int], list[list[int]]]:
    """prompts_of(b, length): b windows of `length` tokens of TEXT at starts drawn from rng."""
    corpus = tok(TEXT)["input_ids"]

    def prompts_of(b: int, length: int) -> list[list[int]]:
        starts = rng.integers(0, len(corpus) - length, size=b)
        return [corpus[s: s + length] for s in starts]

    return prompts_of
