"""Sharded, jit-compiled SFT and DPO steps.

A step is a pure function (state, frozen, batch) -> (state, metrics) compiled once with explicit
in/out shardings from the rule table; the state buffers are donated. `state` holds what is
trained (all params, or only the LoRA adapters) plus optimizer state, step and RNG; `frozen` is
the base params under LoRA (None for full fine-tuning). Gradient accumulation scans over
micro-batches (leading batch axis [A, ...]) and divides summed token losses by the total token
count of all micro-batches, so A micro-batches equal one batch of the same tokens.
"""

from __future__ import annotations

import dataclasses
from typing import Any, Callable, Literal

import jax
import jax.numpy as jnp
import optax
from jax.sharding import Mesh, NamedSharding, PartitionSpec

from sage_jax import parallel
from sage_jax.model import hidden_states
from sage_jax.model.config import ModelConfig
from sage_jax.model.lora import LoraConfig
from sage_jax.model.params import Params, lora_axes, param_axes
from sage_jax.train.losses import DPOConfig, dpo_loss, masked_nll, sequence_logps, token_logprobs


@dataclasses.dataclass(frozen=True)
class OptimConfig:
    """AdamW + schedule + clipping; defaults are the paper's SFT recipe (lr 5e-5, cosine)."""

    learning_rate: float = 5e-5
    schedule: Literal["cosine", "linear", "constant"] = "cosine"
    warmup_steps: int = 0
    min_lr_ratio: float = 0.0
    weight_decay: float = 0.0
    b1: float = 0.9
    b2: float = 0.999
    eps: float = 1e-8
    max_grad_norm: float = 1.0
    grad_accum_steps: int = 1


def learning_rate_schedule(cfg: OptimConfig, total_steps: int) -> optax.Schedule:
    total = max(total_steps, cfg.warmup_steps + 1)
    end = cfg.learning_rate * cfg.min_lr_ratio
    if cfg.schedule == "cosine":
        return optax.warmup_cosine_decay_schedule(0.0, cfg.learning_rate, cfg.warmup_steps, total, end)
    warm = optax.linear_schedule(0.0, cfg.learning_rate, max(cfg.warmup_steps, 1))
    rest = (optax.linear_schedule(cfg.learning_rate, end, total - cfg.warmup_steps) if cfg.schedule == "linear"
            else optax.constant_schedule(cfg.learning_rate))
    return optax.join_schedules([warm, rest], [cfg.warmup_steps]) if cfg.warmup_steps else rest


def make_optimizer(cfg: OptimConfig, total_steps: int) -> optax.GradientTransformation:
    # Decay only matrices (not norms/biases), as HF/LLaMA-Factory do.
    decay_mask = lambda tree: jax.tree.map(lambda x: x.ndim >= 2, tree)  # noqa: E731
    return optax.chain(
        optax.clip_by_global_norm(cfg.max_grad_norm) if cfg.max_grad_norm > 0 else optax.identity(),
        optax.adamw(learning_rate_schedule(cfg, total_steps), cfg.b1, cfg.b2, cfg.eps,
                    weight_decay=cfg.weight_decay, mask=decay_mask),
    )


@dataclasses.dataclass(frozen=True)
class StepSpec:
    """Everything static about a step (hashable: it keys the compilation)."""

    model: ModelConfig
    lora: LoraConfig | None = None
    vocab_chunk: int = 0  # 0 = auto (losses.effective_vocab_chunk)


def _split(spec: StepSpec, trainable: Params, frozen: Params | None) -> tuple[Params, Params | None]:
    return (trainable, None) if spec.lora is None else (frozen, trainable)


def forward_stats(spec: StepSpec, trainable, frozen, mb: dict, rng=None):
    """Per-token log p(target) and argmax hits for one micro-batch."""
    params, adapters = _split(spec, trainable, frozen)
    x, _ = hidden_states(spec.model, params, mb["inputs"], mb.get("positions"), mb.get("segment_ids"),
                         lora=spec.lora, adapters=adapters, dropout_rng=rng)
    return token_logprobs(spec.model, params, x, mb["targets"], spec.vocab_chunk)


def init_state(trainable: Params, tx: optax.GradientTransformation, rng: jax.Array) -> dict:
    return {"step": jnp.zeros((), jnp.int32), "params": trainable, "opt_state": tx.init(trainable), "rng": rng}


def trainable_axes(spec: StepSpec) -> Params:
    return param_axes(spec.model) if spec.lora is None else lora_axes(spec.model, spec.lora)


def state_shardings(spec: StepSpec, tx: optax.GradientTransformation, trainable: Params, mesh: Mesh,
                    rules=parallel.DEFAULT_RULES) -> dict:
    """Shardings of the train state: optimizer moments follow their params; scalars replicated."""
    p_shard = parallel.tree_shardings(trainable_axes(spec), trainable, mesh, rules)
    replicated = NamedSharding(mesh, PartitionSpec())
    abstract_opt = jax.eval_shape(tx.init, trainable)
    opt_shard = optax.tree_map_params(tx, lambda _, s: s, abstract_opt, p_shard,
                                      transform_non_params=lambda _: replicated)
    return {"step": replicated, "params": p_shard, "opt_state": opt_shard, "rng": replicated}


def batch_shardings(batch: dict, mesh: Mesh, rules=parallel.DEFAULT_RULES) -> dict:
    """[A, B, T] micro-batched arrays: B over data x fsdp; A and T replicated."""

    def one(x):
        logical = (None, "batch", "length")[: x.ndim]
        return NamedSharding(mesh, parallel.logical_to_spec(logical, x.shape, mesh, rules))

    return jax.tree.map(one, batch)


def _apply(tx, state, grads, extra_metrics):
    updates, opt_state = tx.update(grads, state["opt_state"], state["params"])
    params = optax.apply_updates(state["params"], updates)
    metrics = {"grad_norm": optax.tree.norm(grads), **extra_metrics}
    new = {"step": state["step"] + 1, "params": params, "opt_state": opt_state,
           "rng": jax.random.split(state["rng"])[0]}
    return new, metrics


def sft_train_step(spec: StepSpec, tx: optax.GradientTransformation, state: dict, frozen, batch: dict):
    """One optimizer step over batch arrays shaped [A, B, T] (A = accumulation micro-batches)."""

    def micro(carry, xs):
        grads_sum, nll_sum, n_sum, hits = carry
        mb, i = xs

        def loss_fn(trainable):
            rng = None if spec.lora is None or spec.lora.dropout == 0 else jax.random.fold_in(state["rng"], i)
            st = forward_stats(spec, trainable, frozen, mb, rng)
            nll, n = masked_nll(st.logp, mb["loss_mask"])
            return nll, (n, jnp.sum(st.correct & mb["loss_mask"]))

        (nll, (n, h)), g = jax.value_and_grad(loss_fn, has_aux=True)(state["params"])
        grads_sum = jax.tree.map(jnp.add, grads_sum, g)
        return (grads_sum, nll_sum + nll, n_sum + n, hits + h), None

    zeros = jax.tree.map(jnp.zeros_like, state["params"])
    a = jax.tree.leaves(batch)[0].shape[0]
    init = (zeros, jnp.zeros((), jnp.float32), jnp.zeros((), jnp.float32), jnp.zeros((), jnp.int32))
    (grads, nll, n, hits), _ = jax.lax.scan(micro, init, (batch, jnp.arange(a)))
    denom = jnp.maximum(n, 1.0)
    grads = jax.tree.map(lambda g: g / denom, grads)
    return _apply(tx, state, grads, {"loss": nll / denom, "tokens": n, "accuracy": hits / denom})


def eval_step(spec: StepSpec, trainable, frozen, batch: dict) -> dict:
    """Sums over one [B, T] batch: NLL and count over the loss mask, argmax hits over the loss
    mask and over `latent_mask` (the latent state-action tokens) when present."""
    st = forward_stats(spec, trainable, frozen, batch)
    nll, n = masked_nll(st.logp, batch["loss_mask"])
    out = {"nll": nll, "tokens": n, "hits": jnp.sum(st.correct & batch["loss_mask"])}
    if "latent_mask" in batch:
        lm = batch["latent_mask"] & batch["loss_mask"]
        out.update(latent_tokens=jnp.sum(lm), latent_hits=jnp.sum(st.correct & lm))
    return out


def sequence_logprobs(spec: StepSpec, trainable, frozen, batch: dict) -> tuple[jax.Array, jax.Array]:
    """Per-row sum of log p over the loss mask, and the token counts ([B], [B])."""
    st = forward_stats(spec, trainable, frozen, batch)
    return sequence_logps(st.logp, batch["loss_mask"])


def _concat_pairs(batch: dict) -> dict:
    """Chosen and rejected rows in one forward: [2B, T]."""
    return {k: jnp.concatenate([batch["chosen"][k], batch["rejected"][k]], axis=0) for k in batch["chosen"]}


def dpo_pair_loss(spec: StepSpec, dpo: DPOConfig, trainable, frozen, pairs: dict, rng=None):
    """DPO loss and metrics for one batch of pairs ({"chosen", "rejected": [B,T] rows, "ref_*": [B]})."""
    b = pairs["ref_chosen"].shape[0]
    both = _concat_pairs(pairs)
    st = forward_stats(spec, trainable, frozen, both, rng)
    logps, counts = sequence_logps(st.logp, both["loss_mask"])
    return dpo_loss(dpo, logps[:b], logps[b:], pairs["ref_chosen"], pairs["ref_rejected"], counts[:b])


def dpo_train_step(spec: StepSpec, dpo: DPOConfig, tx: optax.GradientTransformation, state: dict, frozen,
                   batch: dict):
    """One DPO step over [A, B, ...] micro-batches of pairs with cached reference log-probs.

    batch = {"chosen": {...[A,B,T]}, "rejected": {...}, "ref_chosen": [A,B], "ref_rejected": [A,B]}.
    Pair losses are averaged over all A*B pairs.
    """
    a = batch["ref_chosen"].shape[0]

    def micro(carry, xs):
        grads_sum, metric_sum = carry
        mb, i = xs

        def loss_fn(trainable):
            rng = None if spec.lora is None or spec.lora.dropout == 0 else jax.random.fold_in(state["rng"], i)
            loss, metrics = dpo_pair_loss(spec, dpo, trainable, frozen, mb, rng)
            return loss / a, {"loss": loss, **metrics}

        (_, metrics), g = jax.value_and_grad(loss_fn, has_aux=True)(state["params"])
        grads_sum = jax.tree.map(jnp.add, grads_sum, g)
        metric_sum = jax.tree.map(lambda s, m: s + m / a, metric_sum, metrics)
        return (grads_sum, metric_sum), None

    zeros = jax.tree.map(jnp.zeros_like, state["params"])
    names = ("loss", "dpo_loss", "sft_loss", "reward_chosen", "reward_rejected", "reward_accuracy")
    init = (zeros, {k: jnp.zeros((), jnp.float32) for k in names})
    (grads, metrics), _ = jax.lax.scan(micro, init, (batch, jnp.arange(a)))
    return _apply(tx, state, grads, metrics)


def compile_step(fn: Callable, *static, state_sharding=None, frozen_sharding=None, batch_sharding=None,
                 donate_state: bool = True) -> Callable:
    """jit a step with explicit shardings; `static` args (spec, tx, ...) are bound first.

    The shardings' mesh is put in context while the step traces (as an abstract mesh, so `aot`'s
    lowering on abstract meshes works alike): the model's activation constraints and its
    mesh-aware layers (the expert-parallel MoE dispatch, splash attention's shard_map) then see it
    in training as they do in inference."""
    mesh = next((s.mesh for s in jax.tree.leaves(state_sharding) if isinstance(s, NamedSharding)), None)

    def bound(state, frozen, batch):
        if mesh is None or mesh.size == 1:
            return fn(*static, state, frozen, batch)
        with jax.sharding.use_abstract_mesh(mesh.abstract_mesh):
            return fn(*static, state, frozen, batch)

    out = (state_sharding, None) if state_sharding is not None else None
    ins = (state_sharding, frozen_sharding, batch_sharding) if state_sharding is not None else None
    return jax.jit(bound, in_shardings=ins, out_shardings=out, donate_argnums=(0,) if donate_state else ())


def shard_frozen(spec: StepSpec, frozen: Params | None, mesh: Mesh, rules=parallel.DEFAULT_RULES) -> Any:
    if frozen is None:
        return None, None
    shardings = parallel.tree_shardings(param_axes(spec.model), frozen, mesh, rules)
    return jax.tree.map(jax.device_put, frozen, shardings), shardings
