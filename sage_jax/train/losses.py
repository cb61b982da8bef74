"""Losses from integer labels: token log-probs chunked over the vocabulary, masked cross-entropy
(normalised by target tokens, not a mean of means) and DPO with an SFT ("ftx") term.

Nothing here builds a [B, T, V] one-hot or a full-vocabulary log-softmax copy. When the logits are
large the LM head runs one vocabulary chunk at a time inside a rematerialised scan, keeping a
running max, log-sum-exp and the target's logit, so the peak is [B, T, chunk].
"""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp

from sage_jax.model import layers as L
from sage_jax.model.config import ModelConfig
from sage_jax.model.params import Params

NEG = -1e30


@dataclasses.dataclass(frozen=True)
class TokenStats:
    logp: jax.Array  # [B, T] log p(target) in float32
    correct: jax.Array  # [B, T] argmax == target


FULL_LOGITS_MAX = 1 << 26  # elements: 256 MiB of float32 logits
AUTO_CHUNK = 8192


def effective_vocab_chunk(vocab_size: int, tokens: int, vocab_chunk: int = 0) -> int:
    """Vocabulary columns per pass of the LM head. vocab_chunk > 0 forces that size; 0 (auto) takes
    the whole vocabulary at once when the [tokens, vocab] float32 logits fit in 256 MiB (nothing
    to recompute in the backward pass: 9% of a SmolLM2 SFT step on CPU), else chunks of 8192."""
    if vocab_chunk < 0:
        raise ValueError(f"vocab_chunk must be >= 0 (0 = auto), got {vocab_chunk}")
    if vocab_chunk == 0:
        vocab_chunk = vocab_size if tokens * vocab_size <= FULL_LOGITS_MAX else AUTO_CHUNK
    return min(vocab_chunk, vocab_size)


@jax.custom_vjp
def _whole_vocab(x2: jax.Array, w: jax.Array, targets: jax.Array) -> tuple[jax.Array, jax.Array, jax.Array]:
    """(target logit, log-sum-exp, hit) [N] from x2 [N, D], w [D, V], targets [N]: the LM head over
    the whole vocabulary in one pass."""
    return _whole_vocab_fwd(x2, w, targets)[0]


def _whole_vocab_fwd(x2, w, targets):
    logits = jnp.dot(x2, w, preferred_element_type=jnp.float32)
    peak = jnp.max(logits, axis=-1)
    lse = peak + jnp.log(jnp.sum(jnp.exp(logits - peak[:, None]), axis=-1))
    tgt = jnp.take_along_axis(logits, targets[:, None], axis=-1)[:, 0]
    return (tgt, lse, (tgt >= peak).astype(jnp.float32)), (x2, w, targets, logits, lse)


def _whole_vocab_bwd(res, cts):
    # d logits = d_lse * softmax + d_tgt * one-hot, in one elementwise pass (autodiff makes a
    # one-hot, a select and a transposed copy of the [N, V] gradient). Hits carry no gradient.
    x2, w, targets, logits, lse = res
    d_tgt, d_lse, _ = cts
    cols = jnp.arange(logits.shape[-1], dtype=targets.dtype)
    d_logits = (jnp.exp(logits - lse[:, None]) * d_lse[:, None]
                + jnp.where(cols == targets[:, None], d_tgt[:, None], 0.0))
    d_x = jnp.dot(d_logits.astype(x2.dtype), w.T, preferred_element_type=jnp.float32).astype(x2.dtype)
    return d_x, L.weight_grad(x2, d_logits.astype(x2.dtype)).astype(w.dtype), None


_whole_vocab.defvjp(_whole_vocab_fwd, _whole_vocab_bwd)


def token_logprobs(cfg: ModelConfig, params: Params, x: jax.Array, targets: jax.Array,
                   vocab_chunk: int = 0) -> TokenStats:
    """log p(targets) and argmax hits from final hidden states x [B, T, D].

    A target is a hit when its logit equals the maximum (`argmax == target` but for exact ties,
    without a second pass over the logits for the argmax)."""
    w = params["embed"].T if cfg.tie_word_embeddings else params["lm_head"]  # [D, rows]
    w = w[:, : cfg.vocab_size].astype(x.dtype)  # vocabulary padding never competes
    v = cfg.vocab_size
    b, t = targets.shape
    chunk = effective_vocab_chunk(v, b * t, vocab_chunk)
    if chunk == v:
        tgt, lse, hit = _whole_vocab(x.reshape(b * t, -1), w, targets.reshape(-1))
        return TokenStats(logp=(tgt - lse).reshape(b, t), correct=hit.reshape(b, t) > 0)
    # Chunked: recompute each chunk's logits in the backward pass instead of storing them.
    n = -(-v // chunk)
    if n * chunk != v:
        w = jnp.pad(w, ((0, 0), (0, n * chunk - v)))

    def body(carry, xs):
        m, s, tgt = carry
        wc, start = xs
        logits = jnp.einsum("btd,dc->btc", x, wc, preferred_element_type=jnp.float32)
        if n * chunk != v:
            logits = jnp.where(start + jnp.arange(chunk) < v, logits, NEG)
        m_new = jnp.maximum(m, jnp.max(logits, axis=-1))
        s = s * jnp.exp(m - m_new) + jnp.sum(jnp.exp(logits - m_new[..., None]), axis=-1)
        local = targets - start
        inside = (local >= 0) & (local < chunk)
        picked = jnp.take_along_axis(logits, jnp.clip(local, 0, chunk - 1)[..., None], axis=-1)[..., 0]
        return (m_new, s, jnp.where(inside, picked, tgt)), None

    init = (jnp.full((b, t), NEG, jnp.float32), jnp.zeros((b, t), jnp.float32), jnp.zeros((b, t), jnp.float32))
    w = w.reshape(w.shape[0], n, chunk).transpose(1, 0, 2)  # [n, D, chunk]
    starts = jnp.arange(n, dtype=jnp.int32) * chunk
    (m, s, tgt), _ = jax.lax.scan(jax.checkpoint(body), init, (w, starts))
    return TokenStats(logp=tgt - (m + jnp.log(s)), correct=tgt >= m)


def masked_nll(logp: jax.Array, mask: jax.Array) -> tuple[jax.Array, jax.Array]:
    """(sum of -log p over masked tokens, number of masked tokens); divide the totals across
    micro-batches, never per micro-batch, so accumulation equals one big batch."""
    mask = mask.astype(jnp.float32)
    return -jnp.sum(logp * mask), jnp.sum(mask)


def sequence_logps(logp: jax.Array, mask: jax.Array) -> tuple[jax.Array, jax.Array]:
    """Per-sequence sum of log p over the response tokens and their count ([B], [B])."""
    mask = mask.astype(jnp.float32)
    return jnp.sum(logp * mask, axis=-1), jnp.sum(mask, axis=-1)


@dataclasses.dataclass(frozen=True)
class DPOConfig:
    """DPO (sigmoid) + ftx * SFT on the chosen response; the paper's defaults."""

    beta: float = 0.1
    ftx: float = 1.0
    label_smoothing: float = 0.0


def dpo_loss(cfg: DPOConfig, chosen: jax.Array, rejected: jax.Array, ref_chosen: jax.Array,
             ref_rejected: jax.Array, chosen_tokens: jax.Array) -> tuple[jax.Array, dict]:
    """Mean over pairs of -log sigmoid(beta * margin) (+ ftx * mean per-token NLL of chosen).

    All inputs [B] in float32: policy/reference log-probs summed over response tokens; the SFT
    term is the chosen log-prob averaged over its tokens (LLaMA-Factory's `pref_ftx`).
    """
    margin = (chosen - ref_chosen) - (rejected - ref_rejected)
    eps = cfg.label_smoothing
    dpo = -(1 - eps) * jax.nn.log_sigmoid(cfg.beta * margin) - eps * jax.nn.log_sigmoid(-cfg.beta * margin)
    sft = -chosen / jnp.maximum(chosen_tokens, 1.0)
    loss = jnp.mean(dpo + cfg.ftx * sft)
    metrics = {
        "dpo_loss": jnp.mean(dpo),
        "sft_loss": jnp.mean(sft),
        "reward_chosen": jnp.mean(cfg.beta * (chosen - ref_chosen)),
        "reward_rejected": jnp.mean(cfg.beta * (rejected - ref_rejected)),
        "reward_accuracy": jnp.mean((margin > 0).astype(jnp.float32)),
    }
    return loss, metrics
