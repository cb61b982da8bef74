"""A `transformers` logits processor that timestamps every call: generate calls it once per step,
after each forward, so the time between the first and the last call is the N - 1 decode steps."""

from __future__ import annotations

import time

from transformers import LogitsProcessor


class Stamps(LogitsProcessor):
    def __init__(self):
        self.t: list[float] = []

    def __call__(self, input_ids, scores):
        self.t.append(time.perf_counter())
        return scores
