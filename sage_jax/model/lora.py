"""LoRA (Hu et al. 2021): the paper's recipe is rank 8, alpha 16, no dropout, on q_proj and v_proj.

Adapters are `nnx.LoRAParam` variables of a small `LoRAAdapter` module that a decoder layer holds
under `lora/<target>` (see sage_jax.model.modules), so "train only the adapters" is the state
filter `nnx.LoRAParam` and the frozen base is everything else. For a target kernel W [*in, *out]
(per layer) the adapter is a [*in, r] and b [r, *out]; the layer computes
x @ W + (alpha / r) * dropout(x) @ a @ b. `a` starts uniform(±1/sqrt(fan_in)) (PEFT's
kaiming-uniform) and `b` at zero, so training starts exactly at the base model. `merge` folds the
adapters into W for rollouts and export.
"""

from __future__ import annotations

import dataclasses
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from sage_jax.model.layers import dense

TARGETS = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")

Params = dict[str, Any]


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
    """Number of input axes of a kernel (o_proj takes [heads, head_dim]; the others [embed])."""
    return 2 if target == "o_proj" else 1


class LoRAAdapter(nnx.Module):
    """The low-rank pair for one kernel of one layer: a [*in, r], b [r, *out]."""

    def __init__(self, target: str, shape: tuple[int, ...], axes: tuple, rank: int, dtype, rngs: nnx.Rngs):
        n = in_ndim(target)
        bound = 1.0 / np.sqrt(int(np.prod(shape[:n])))
        a = jax.random.uniform(rngs.params(), shape[:n] + (rank,), jnp.float32, -bound, bound)
        self.a = nnx.LoRAParam(a.astype(dtype), out_sharding=axes[:n] + (None,))
        self.b = nnx.LoRAParam(jnp.zeros((rank,) + shape[n:], dtype), out_sharding=(None,) + axes[n:])


def apply(x: jax.Array, w: jax.Array, target: str, adapter: LoRAAdapter | None, lora: LoraConfig | None,
          rng: jax.Array | None) -> jax.Array:
    """x @ W (+ the adapter's low-rank path); x [..., *in], W [*in, *out] for one layer."""
    n = in_ndim(target)
    out = dense(x, w, n)
    if adapter is None:
        return out
    h = x
    if lora.dropout > 0 and rng is not None:
        keep = jax.random.bernoulli(rng, 1.0 - lora.dropout, h.shape)
        h = jnp.where(keep, h / (1.0 - lora.dropout), 0).astype(x.dtype)
    low = jnp.tensordot(h, adapter.a[...].astype(x.dtype), axes=n)
    return out + lora.scale * jnp.tensordot(low, adapter.b[...].astype(x.dtype), axes=1)


def _stacked(a: jax.Array, b: jax.Array) -> jax.Array:
    return jax.vmap(lambda x, y: jnp.tensordot(x, y, axes=1))(a, b)


def with_adapters(params: Params, adapters: Params) -> Params:
    """The full module state (pure dict): base params plus the adapters under layers/lora."""
    return {**params, "layers": {**params["layers"], "lora": adapters["layers"]["lora"]}}


def merge(params: Params, adapters: Params, lora: LoraConfig) -> Params:
    """Plain params with W <- W + (alpha/r) a @ b for every target (what rollouts and export use)."""
    layers = dict(params["layers"])
    for t, ab in adapters["layers"]["lora"].items():
        w = layers[t]
        delta = _stacked(ab["a"].astype(jnp.float32), ab["b"].astype(jnp.float32))
        layers[t] = (w.astype(jnp.float32) + lora.scale * delta).astype(w.dtype)
    return {**params, "layers": layers}
