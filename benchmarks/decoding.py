"""Our decode loop, timed apart from prefill and compilation: what the decode columns of
`rollout.py`, `sampling.py` and `device.py` measure.

    decode = CompiledDecode.of(cfg, params, prompts, sp, n)  # prefill once, compile decode ahead
    seconds_per_step, tokens = decode.run()                  # one timed decode of n tokens

`prompts` are rows of equal length (no padding); `sp` sets min_new_tokens = max_new_tokens = n so
every row decodes n tokens: the loop runs n - 1 steps after prefill's first token.
"""

from __future__ import annotations

import dataclasses
import time

import jax
import jax.numpy as jnp
import numpy as np

from sage_jax import rollout
from sage_jax.rollout import sampler as S


@dataclasses.dataclass(frozen=True)
class CompiledDecode:
    compiled: object  # `sampler.decode` lowered and compiled for this state's shapes
    params: object
    state: S.SamplerState  # the prefilled state (copied per run: decode donates it)
    n: int
    rows: int

    @classmethod
    def of(cls, cfg, params, prompts, sp: rollout.SamplingParams, n: int) -> "CompiledDecode":
        b = len(prompts)
        proc = rollout.Processing.of(sp, cfg.vocab_size)
        settings = S._row_settings(cfg, [sp] * b, [n] * b, list(range(b)), 0, S.bucket(b))
        toks, lens = S._pad_rows(prompts, S.bucket(b), S.bucket(len(prompts[0]), 16))
        new_len = S.bucket(n, 16)
        st = jax.block_until_ready(S.prefill(cfg, params, jnp.asarray(toks), jnp.asarray(lens), settings,
                                             cache_len=toks.shape[1] + new_len, new_len=new_len))
        return cls(S.decode.lower(cfg, proc, params, st).compile(), params, st, n, b)

    def run(self) -> tuple[float, np.ndarray]:
        """(seconds per decode step, the rows' n tokens [b, n]) of one decode from the prefilled state."""
        st = jax.block_until_ready(jax.tree.map(jnp.copy, self.state))
        t = time.perf_counter()
        st = jax.block_until_ready(self.compiled(self.params, st))
        dt = (time.perf_counter() - t) / (self.n - 1)
        if int(st.length[0]) != self.n:
            raise RuntimeError(f"decode stopped after {int(st.length[0])} of {self.n} tokens")
        return dt, np.asarray(st.tokens[: self.rows, : self.n])
