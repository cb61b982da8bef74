"""LoRA (Hu et al. 2021) as a separate small pytree: the paper's recipe is rank 8, alpha 16, no
dropout, on q_proj and v_proj.

For a target kernel W [L, *in, *out] the adapter is a [L, *in, r] and b [L, r, *out]; the layer
computes x @ W + (alpha / r) * dropout(x) @ a @ b. `a` starts uniform(±1/sqrt(fan_in)) (PEFT's
kaiming-uniform) and `b` at zero, so training starts exactly at the base model. Only the adapter
is trained and checkpointed; `merge` folds it into W for rollouts and export.
"""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np

from sage_jax.model.config import ModelConfig
from sage_jax.model.params import Params, param_axes, param_shapes

TARGETS = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")


@dataclasses.dataclass(frozen=True)
class LoraConfig:
    rank: int = 8
    alpha: float = 16.0
    dropout: float = 0.0
    targets: tuple[str, ...] = ("q_proj", "v_proj")

    def __post_init__(self):
        bad = [t for t in self.targets if t not in TARGETS]
        if bad or self.rank <= 0:
            raise ValueError(f"LoraConfig: rank must be > 0 and targets among {TARGETS}; got {self.rank}, {bad}")

    @property
    def scale(self) -> float:
        return self.alpha / self.rank


def in_ndim(target: str) -> int:
    """Number of input axes of a kernel after the layer axis (o_proj takes [heads, head_dim])."""
    return 2 if target == "o_proj" else 1


def _check(cfg: ModelConfig, lora: LoraConfig) -> None:
    if cfg.is_moe and any(t in ("gate_proj", "up_proj", "down_proj") for t in lora.targets):
        raise ValueError("LoRA on MoE expert kernels is not supported; target attention projections")


def lora_axes(cfg: ModelConfig, lora: LoraConfig) -> Params:
    _check(cfg, lora)
    axes = param_axes(cfg)["layers"]
    out = {}
    for t in lora.targets:
        n = in_ndim(t) + 1
        out[t] = {"a": axes[t][:n] + (None,), "b": (axes[t][0], None) + axes[t][n:]}
    return {"layers": out}


def init_lora(cfg: ModelConfig, lora: LoraConfig, key: jax.Array) -> Params:
    _check(cfg, lora)
    shapes = param_shapes(cfg)["layers"]
    out = {}
    for t, k in zip(lora.targets, jax.random.split(key, len(lora.targets))):
        shape, n = shapes[t], in_ndim(t) + 1
        fan_in = int(np.prod(shape[1:n]))
        bound = 1.0 / np.sqrt(fan_in)
        a = jax.random.uniform(k, shape[:n] + (lora.rank,), jnp.float32, -bound, bound)
        out[t] = {"a": a.astype(cfg.param_dtype), "b": jnp.zeros((shape[0], lora.rank) + shape[n:], cfg.param_dtype)}
    return {"layers": out}


def _stacked(a: jax.Array, b: jax.Array) -> jax.Array:
    return jax.vmap(lambda x, y: jnp.tensordot(x, y, axes=1))(a, b)


def merge(params: Params, lora_params: Params, lora: LoraConfig) -> Params:
    """Plain params with W <- W + (alpha/r) a @ b for every target (what rollouts and export use)."""
    layers = dict(params["layers"])
    for t, ab in lora_params["layers"].items():
        w = layers[t]
        layers[t] = (w.astype(jnp.float32) + lora.scale * _stacked(ab["a"].astype(jnp.float32),
                                                                   ab["b"].astype(jnp.float32))).astype(w.dtype)
    return {**params, "layers": layers}


def apply(x: jax.Array, w: jax.Array, target: str, adapter: dict | None, lora: LoraConfig | None,
          rng: jax.Array | None) -> jax.Array:
    """x @ W (+ the adapter's low-rank path); x [..., *in], W [*in, *out] for one layer."""
    n = in_ndim(target)
    out = jnp.tensordot(x, w.astype(x.dtype), axes=n)
    if adapter is None:
        return out
    h = x
    if lora.dropout > 0 and rng is not None:
        keep = jax.random.bernoulli(rng, 1.0 - lora.dropout, h.shape)
        h = jnp.where(keep, h / (1.0 - lora.dropout), 0).astype(x.dtype)
    low = jnp.tensordot(h, adapter["a"].astype(x.dtype), axes=n)
    return out + lora.scale * jnp.tensordot(low, adapter["b"].astype(x.dtype), axes=1)
