"""Batched beam search with length penalty and early stopping: Hugging Face semantics, one jit.

It mirrors `transformers` 5.x `GenerationMixin._beam_search` (the vectorised rewrite) step by
step, so it returns the same sequences, in the same order, with the same scores:

- Scores are accumulated log-softmax values (float32). Beams start with scores [0, -1e9, ...]
  so the first step expands beam 0 only.
- Each step keeps the top `beams_to_keep = max(2, 1 + n_stop_ids) * num_beams` candidates over
  all beams x vocabulary. Candidates ending in a stop token (or reaching max_new_tokens) are
  "finished"; the best `num_beams` unfinished ones continue.
- Only finished candidates ranked within the top `num_beams` may enter the n-best list, with
  score `sum_logprobs / generated_len ** length_penalty`, where generated_len counts the new
  tokens *including* the stop token (HF: `cur_len + 1 - decoder_prompt_len`). The n-best list
  is the top `num_beams` of (old list + new finished), and is frozen once it is full if
  `early_stopping is True`, or once the running beams cannot beat it (HF's heuristic: the best
  running score / (current length ** length_penalty), or / (max_new_tokens ** penalty) for
  `early_stopping="never"` with a positive penalty).
- The loop stops when no batch item can improve, or (early_stopping=True) every item's list is
  full, or every candidate hit max_new_tokens.

The KV cache is reordered each step by gathering rows (beam sources) on the batch axis. The
prompt is prefilled once per prompt and broadcast to its beams.
"""

from __future__ import annotations

import dataclasses
import functools
from typing import Sequence

import jax
import jax.numpy as jnp
import numpy as np

from sage_jax import model as M
from sage_jax import parallel
from sage_jax.model.config import ModelConfig
from sage_jax.rollout.sampler import _check_prompts, _chunk_segments, _last_logits, bucket, repeat_cache

NEG = -1.0e9


@dataclasses.dataclass
class BeamHypothesis:
    tokens: list[int]  # generated ids (a final stop token included)
    score: float  # sum of log-probs / len(tokens) ** length_penalty (HF's sequences_scores)
    finish_reason: str  # "stop" or "length"


@functools.partial(
    jax.jit,
    static_argnames=("cfg", "num_beams", "beams_to_keep", "new_len", "cache_len"),
)
def _beam_search(
    cfg: ModelConfig,
    params,
    tokens: jax.Array,  # [B, T] right-padded prompts
    lengths: jax.Array,  # [B]; 0 marks an inert padding row
    stop_ids: jax.Array,  # [n_stop] int32 (may be empty)
    max_new: jax.Array,  # [] int32
    length_penalty: jax.Array,  # [] f32
    len_pow: jax.Array,  # [new_len + 1] f32: float32(i ** length_penalty), computed in float64
    es_true: jax.Array,  # [] bool: early_stopping is True
    es_never: jax.Array,  # [] bool: early_stopping == "never"
    *,
    num_beams: int,
    beams_to_keep: int,
    new_len: int,
    cache_len: int,
):
    b, _ = tokens.shape
    nb, kk, n = num_beams, beams_to_keep, new_len
    real = lengths > 0
    lengths = jnp.maximum(lengths, 1)
    cache = M.init_cache(cfg, b, cache_len)
    x, cache = M.hidden_states(cfg, params, tokens, segment_ids=_chunk_segments(tokens, lengths), cache=cache)
    logits = jnp.repeat(_last_logits(cfg, params, x, lengths), nb, axis=0)  # [B*nb, V]
    cache = repeat_cache(cache, nb)
    v = logits.shape[-1]

    run_score = jnp.full((b, nb), NEG, jnp.float32).at[:, 0].set(0.0)
    state = dict(
        cache=cache,
        logits=logits,
        run_seq=jnp.zeros((b, nb, n), jnp.int32),
        run_score=run_score,
        seq=jnp.zeros((b, nb, n), jnp.int32),
        score=jnp.full((b, nb), NEG, jnp.float32),
        fin=jnp.broadcast_to(~real[:, None], (b, nb)),
        fin_len=jnp.zeros((b, nb), jnp.int32),
        unsat=real,
        step=jnp.zeros((), jnp.int32),
        stop=jnp.zeros((), bool),
    )
    top_nb_mask = jnp.arange(kk) < nb
    rows = jnp.arange(b)[:, None]

    def gather(a, idx):  # a [B, M, ...], idx [B, J] -> [B, J, ...]
        return jnp.take_along_axis(a, idx.reshape(idx.shape + (1,) * (a.ndim - 2)), axis=1)

    def body(st):
        s = st["step"]
        logp = jax.nn.log_softmax(st["logits"].astype(jnp.float32), axis=-1).reshape(b, nb, v)
        logp = (logp + st["run_score"][:, :, None]).reshape(b, nb * v)
        topk_lp, topk_idx = jax.lax.top_k(logp, kk)
        src, tok = topk_idx // v, (topk_idx % v).astype(jnp.int32)
        topk_seq = gather(st["run_seq"], src).at[:, :, s].set(tok)
        hits = jnp.any(tok[:, :, None] == stop_ids[None, None, :], axis=-1) | (s + 1 >= max_new)

        # e. the best num_beams unfinished candidates keep running
        run_lp = topk_lp + hits.astype(jnp.float32) * NEG
        nxt = jax.lax.top_k(run_lp, nb)[1]
        run_seq, run_score, run_src = gather(topk_seq, nxt), gather(run_lp, nxt), gather(src, nxt)

        # f. finished candidates (within the top num_beams) may enter the n-best list
        just = hits & top_nb_mask[None, :]
        fl = topk_lp / len_pow[s + 1]
        full = jnp.all(st["fin"], axis=1, keepdims=True) & es_true
        fl = fl + full.astype(jnp.float32) * NEG
        fl = fl + (~st["unsat"])[:, None].astype(jnp.float32) * NEG
        fl = fl + (~just).astype(jnp.float32) * NEG
        m_seq = jnp.concatenate([st["seq"], topk_seq], axis=1)
        m_score = jnp.concatenate([st["score"], fl], axis=1)
        m_fin = jnp.concatenate([st["fin"], just], axis=1)
        m_len = jnp.concatenate([st["fin_len"], jnp.full((b, kk), s + 1, jnp.int32)], axis=1)
        top = jax.lax.top_k(m_score, nb)[1]
        seq, score, fin, fin_len = gather(m_seq, top), gather(m_score, top), gather(m_fin, top), gather(m_len, top)

        # g. reorder the cache by beam source, feed the new tokens
        flat_src = (rows * nb + run_src).reshape(-1)
        cache = st["cache"]
        cache = {
            "k": jnp.take(cache["k"], flat_src, axis=1),
            "v": jnp.take(cache["v"], flat_src, axis=1),
            "segment_ids": jnp.take(cache["segment_ids"], flat_src, axis=0),
            "end": jnp.take(cache["end"], flat_src, axis=0),
        }
        new_tok = run_seq[:, :, s].reshape(-1, 1)
        x, cache = M.hidden_states(cfg, params, new_tok, cache=cache)
        logits = M.lm_head(cfg, params, x[:, 0]).astype(jnp.float32)

        # the early-stop heuristic and the global stopping condition
        s1 = s + 1
        best_len_pow = jnp.where(es_never & (length_penalty > 0.0), len_pow[max_new], len_pow[s1])
        best_running = run_score[:, :1] / best_len_pow
        worst = jnp.where(fin, jnp.min(score, axis=1, keepdims=True), NEG)
        unsat = st["unsat"] & jnp.any(best_running > worst, axis=-1)
        improvement = jnp.any(unsat)
        open_beam = ~(jnp.all(fin) & es_true)
        valid = ~jnp.all(hits)
        return dict(cache=cache, logits=logits, run_seq=run_seq, run_score=run_score, seq=seq, score=score,
                    fin=fin, fin_len=fin_len, unsat=unsat, step=s1, stop=~(improvement & open_beam & valid))

    st = jax.lax.while_loop(lambda st: ~st["stop"] & (st["step"] < n), body, state)
    return st["seq"], st["score"], st["fin"], st["fin_len"], st["run_seq"], st["step"]


@parallel.on_params_mesh  # params on a mesh: run sharded, rows padded to the data axes
def beam_search(
    cfg: ModelConfig,
    params,
    prompts: Sequence[Sequence[int]],
    num_beams: int = 4,
    max_new_tokens: int = 20,
    length_penalty: float = 1.0,
    early_stopping: bool | str = False,
    num_return_sequences: int | None = None,
    stop_token_ids: Sequence[int] | None = None,
) -> list[list[BeamHypothesis]]:
    """n-best lists (best first, `num_return_sequences` each, default num_beams) per prompt.

    Equals `transformers` `generate(num_beams=..., length_penalty=..., early_stopping=...,
    do_sample=False, max_new_tokens=...)` on each prompt alone. stop_token_ids: default the
    model's eos_token_id.
    """
    if not prompts:
        return []
    if early_stopping not in (True, False, "never"):
        raise ValueError(f"early_stopping must be True, False or 'never', got {early_stopping!r}")
    nrs = num_beams if num_return_sequences is None else int(num_return_sequences)
    if not 1 <= nrs <= num_beams:
        raise ValueError("num_return_sequences must be in [1, num_beams]")
    if max_new_tokens < 1:
        raise ValueError("max_new_tokens must be >= 1")
    _check_prompts(prompts, cfg.vocab_size)
    if stop_token_ids is None:
        eos = cfg.eos_token_id
        stop_token_ids = () if eos is None else ((eos,) if isinstance(eos, int) else tuple(eos))
    stop = np.asarray(list(stop_token_ids), np.int32)
    beams_to_keep = max(2, 1 + len(stop)) * num_beams
    if beams_to_keep > num_beams * cfg.vocab_size:
        raise ValueError("vocabulary too small for this many beams")

    n = len(prompts)
    rows = parallel.pad_rows(bucket(n))
    new_len = bucket(max_new_tokens, 16)
    t_len = bucket(max(len(p) for p in prompts), 16)
    toks = np.zeros((rows, t_len), np.int32)
    lens = np.zeros((rows,), np.int32)
    for i, p in enumerate(prompts):
        toks[i, : len(p)] = p
        lens[i] = len(p)
    len_pow = np.asarray([float(i) ** float(length_penalty) if i else 1.0 for i in range(new_len + 1)],
                         np.float64).astype(np.float32)
    out = _beam_search(
        cfg, params, jnp.asarray(toks), jnp.asarray(lens), jnp.asarray(stop), jnp.asarray(max_new_tokens, jnp.int32),
        jnp.asarray(length_penalty, jnp.float32), jnp.asarray(len_pow),
        jnp.asarray(early_stopping is True), jnp.asarray(early_stopping == "never"),
        num_beams=num_beams, beams_to_keep=beams_to_keep, new_len=new_len, cache_len=t_len + new_len,
    )
    seq, score, fin, fin_len, _, _ = jax.device_get(out)
    stop_set = set(stop.tolist())
    results = []
    for i in range(n):
        hyps = []
        for j in range(nrs):
            if not fin[i, j]:  # cannot happen with HF's rules: the loop ends with full n-best lists
                raise RuntimeError(f"beam search: prompt {i} hypothesis {j} did not finish")
            t = seq[i, j, : fin_len[i, j]].tolist()
            reason = "stop" if t and t[-1] in stop_set else "length"
            hyps.append(BeamHypothesis(tokens=t, score=float(score[i, j]), finish_reason=reason))
        results.append(hyps)
    return results
