"""Ahead-of-time check of the SFT train step for a target topology: does it shard, does it fit?

    sage-jax aot target=v5litepod-16 model.path=mixtral-8x7b model.dtype=bfloat16 \
        model.param_dtype=bfloat16 model.remat=full batch_size=256 seq_len=2048
    sage-jax aot --config sft.yaml target=v5p-64 json_out=aot.json
    python -m sage_jax.aot target=v5litepod-16 mode=local local_devices=16 model.path=smollm2

The config (`AOTConfig`) is the `sage-jax sft` config (`SFTConfig`: `--config run.yaml` and
`key=value` overrides, so the sft_m1 experiment's YAML works as is) plus `target`, `mode`,
`headroom`, `local_devices` and `json_out`. This module sits above `train` (it compiles the
train step); `parallel` below it knows nothing of the model. `model.path` is an HF directory (only
its `config.json` is read, no weights) or a preset: smollm2 (SmolLM2-135M-Instruct), llama3-8b,
mistral-7b, mixtral-8x7b (the paper's base model), qwen2.5-7b. Targets: `v4-N`, `v5p-N` (N
TensorCores = 2 per chip), `v5litepod-N`/`v5e-N`, `v6e-N` (N chips), `h100-N` (N GPUs). The
mesh is `mesh.*` of the config resolved for the target's chip count (default: all chips on
`fsdp`); nothing is allocated for the model in any mode.

What is checked, in order (`mode`; `auto` = estimate + abstract + tpu when libtpu is installed):

1. **Config vs topology** (always). The mesh shape against the chip count; `batch_size`
   divisible by hosts x `optim.grad_accum_steps` (as `run_sft` requires on the pod; hosts =
   chips / chips per host of the target); every dimension a sharding rule wants sharded but
   the mesh axis does not divide (it silently stays replicated — for example 9 SmolLM2 heads
   over tensor=2, or micro-batch rows over data x fsdp, which would replicate the batch and
   every activation on all chips).
2. **Memory estimate per device** (always, `estimate`). From the real shardings of the real
   train-state pytree (the same `state_shardings`, frozen-param and `batch_shardings` that
   `run_sft` uses, on an `AbstractMesh`): bytes per device of frozen params, trainable params,
   optimizer state (AdamW moments), gradients (accumulator + micro-batch gradient) and the batch,
   computed exactly from each array's shard shape; plus estimates of the FSDP all-gathered
   weights (two layers and the embedding/head in the compute dtype), the activations of one
   micro-batch for the `model.remat` setting (the layer inputs kept by the scan, the saved
   projections, and this model's plain attention, which materialises [T, T] scores in float32
   per head), and the chunked-vocabulary loss. Compared with the chip's HBM (v4 32 GiB, v5e
   16 GiB, v5p 95 GiB, v6e 32 GiB, H100 80 GiB) minus `headroom` (default 10%). Exit 1
   when it does not fit. The activation part is a formula, not XLA's buffer assignment. Against
   XLA's TPU compiler (libtpu 0.0.42, v5e, SmolLM2-135M and a 1024-wide 8-layer Llama, 1-2 rows
   of 1-2k tokens per chip) the whole estimate was within 6% with `model.remat=full`; with
   `none` and `dots` the compiler's temporaries were 1.1-4x the formula's activations (it keeps
   more of the [T, T] attention intermediates than the residuals JAX saves), so for those two
   the estimate is a lower bound: "does not fit" is reliable, "fits" needs step 4.
3. **Lowering on an abstract mesh** (`abstract`). `jax.jit(step).trace(...).lower(lowering_platforms=
   (platform,))` with `ShapeDtypeStruct`s carrying `NamedSharding`s on a
   `jax.sharding.AbstractMesh` of the target's shape: no device, no allocation. This runs the
   real step (model, LoRA, loss, optimizer, gradient accumulation) through tracing and StableHLO
   lowering with its in/out shardings and donation, catching shape errors, invalid or
   inconsistent shardings and unsupported configurations for that mesh. It does not run GSPMD
   partitioning or the backend compiler: collectives, memory and compile-time failures are not
   seen here. (The report also prints the model FLOPs per step, from a formula — 6 N per token,
   4 N under LoRA, plus attention — and the time that takes at 100% of the chips' bf16 peak, a
   lower bound on the step time; XLA's cost analysis counts a scanned layer once, so it is not
   used.)
4. **Compile for the TPU target** (`tpu`, needs `libtpu`, which `pip install "jax[tpu]"`
   brings; it runs on a CPU-only host). `jax.experimental.topologies.get_topology_desc` makes
   compile-only devices of the target topology (e.g. `v5e:4x4`), the step is lowered on a real
   `Mesh` of them and compiled by XLA's TPU compiler: GSPMD partitioning, collectives, fusion,
   buffer assignment. `compiled.memory_analysis()` gives the per-device arguments, outputs,
   aliased (donated) bytes, temporaries and code; peak = arguments + outputs - aliased +
   temporaries + code, compared with the HBM. An out-of-memory compile (`RESOURCE_EXHAUSTED`)
   is reported as not fitting. When this ran, its verdict replaces the estimate's. This is what
   the pod would compile (same jax/libtpu versions assumed), minus runtime effects: memory
   fragmentation, host offload, and the input pipeline.
5. **Compile on the local backend** (`local`). The same step on a real mesh of local devices
   of the target's mesh shape (CPU: `local_devices=N` simulates N devices, set before JAX
   starts; on a GPU host, its GPUs), then `memory_analysis()`. On CPU this checks that the
   partitioned program compiles and gives XLA:CPU's buffer sizes (a different compiler than
   the TPU's: indicative only, not used for the verdict); on a GPU host of the target kind it is
   the real thing and decides the verdict.

Not checked anywhere: multi-slice (DCN) topologies, GPU targets without a GPU of that kind
at hand (no CUDA compiler in a CPU-only jaxlib: only steps 1-3 apply), the runtime (speed,
collectives' bandwidth, the data pipeline, checkpoint I/O), and memory outside the step
(evaluation, the reference model of DPO, rollouts).

Exit status: 0 fits, 1 does not fit, 2 the config, the sharding or the lowering failed
(`sage-jax aot` exits 1 with `sage-jax: error: ...` on a config error, like every command).
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import importlib.util
import json
import math
import os
import re
import sys
import time
from pathlib import Path
from typing import Any, Literal, Sequence

import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import AbstractMesh, AxisType, Mesh

from sage_jax import model, parallel
from sage_jax.config import ConfigError, add_config_args, config_from_args
from sage_jax.parallel.mesh import MESH_AXES
from sage_jax.parallel.rules import DEFAULT_RULES
from sage_jax.sac import DEFAULT_SCHEMA
from sage_jax.train import steps
from sage_jax.train.losses import effective_vocab_chunk
from sage_jax.train.sft import SFTConfig

__all__ = [
    "AOTConfig", "AOTReport", "HBM_GIB", "MODEL_PRESETS", "MemoryEstimate", "Target", "abstract_mesh", "build_step",
    "check", "compile_local", "compile_tpu", "estimate_memory", "lower_abstract", "main", "parse_target",
    "StepPlan", "activation_bytes", "device_bytes", "format_report", "resolve_model", "run_aot", "sharding_notes",
    "step_flops", "tpu_compiler_available",
]

GiB = 1024**3
HBM_GIB = {"v4": 32.0, "v5e": 16.0, "v5p": 95.0, "v6e": 32.0, "h100": 80.0}
PEAK_TFLOPS_BF16 = {"v4": 275.0, "v5e": 197.0, "v5p": 459.0, "v6e": 918.0, "h100": 989.0}

# Config of well-known bases (no weights needed); anything else: an HF directory's config.json.
MODEL_PRESETS: dict[str, dict[str, Any]] = {
    "smollm2": dict(family="llama", vocab_size=49152, hidden_size=576, intermediate_size=1536, num_layers=30,
                    num_heads=9, num_kv_heads=3, head_dim=64, tie_word_embeddings=True, rms_norm_eps=1e-5,
                    max_position_embeddings=8192),
    "llama3-8b": dict(family="llama", vocab_size=128256, hidden_size=4096, intermediate_size=14336, num_layers=32,
                      num_heads=32, num_kv_heads=8, head_dim=128, rms_norm_eps=1e-5, max_position_embeddings=8192),
    "mistral-7b": dict(family="mistral", vocab_size=32768, hidden_size=4096, intermediate_size=14336,
                       num_layers=32, num_heads=32, num_kv_heads=8, head_dim=128, rms_norm_eps=1e-5,
                       max_position_embeddings=32768),
    "mixtral-8x7b": dict(family="mixtral", vocab_size=32000, hidden_size=4096, intermediate_size=14336,
                         num_layers=32, num_heads=32, num_kv_heads=8, head_dim=128, num_experts=8,
                         num_experts_per_tok=2, rms_norm_eps=1e-5, max_position_embeddings=32768),
    "qwen2.5-7b": dict(family="qwen2", vocab_size=152064, hidden_size=3584, intermediate_size=18944,
                       num_layers=28, num_heads=28, num_kv_heads=4, head_dim=128, qkv_bias=True, rms_norm_eps=1e-6,
                       max_position_embeddings=32768),
}
MODEL_PRESETS["smollm2-135m"] = MODEL_PRESETS["smollm2"]


# ---------------------------------------------------------------- targets
@dataclasses.dataclass(frozen=True)
class Target:
    name: str
    platform: Literal["tpu", "gpu"]
    generation: str  # v4 | v5e | v5p | v6e | h100
    chips: int  # JAX devices (TPU v4/v5p: one megacore device per chip)
    topology: str | None  # e.g. "v5e:4x4" for get_topology_desc
    chip_config: str  # "default" | "megacore"
    chips_per_host: int
    hbm_gib: float
    peak_tflops: float

    @property
    def hosts(self) -> int:
        return max(1, self.chips // self.chips_per_host)


def _grid_2d(n: int) -> str:
    a = 2 ** (int(math.log2(n)) // 2)
    return f"{a}x{n // a}"


def _grid_3d(n: int) -> str:
    if n < 4:
        return f"1x1x{n}" if n > 1 else "1x1x1"
    dims = [2, 2, 1]
    while int(np.prod(dims)) < n:
        i = max(j for j in range(3) if dims[j] == min(dims))  # the rightmost smallest: 2x2x2 -> 2x2x4 -> 2x4x4
        dims[i] *= 2
    return "x".join(map(str, dims))


def parse_target(name: str) -> Target:
    """``v5litepod-16`` / ``v5e-16`` / ``v6e-8`` (chips), ``v4-32`` / ``v5p-64`` (TensorCores), ``h100-8``."""
    m = re.fullmatch(r"(v5litepod|v5e|v6e|v4|v5p|h100(?:-80gb)?)-(\d+)", name.strip().lower())
    if not m or int(m.group(2)) < 1 or (int(m.group(2)) & (int(m.group(2)) - 1)):
        raise ValueError(f"target {name!r}: expected v5litepod-N, v5e-N, v6e-N, v4-N, v5p-N or h100-N "
                         f"with N a power of 2 (e.g. v5litepod-16)")
    kind, n = m.group(1), int(m.group(2))
    if kind.startswith("h100"):
        return Target(name, "gpu", "h100", n, None, "default", min(n, 8), HBM_GIB["h100"], PEAK_TFLOPS_BF16["h100"])
    gen = "v5e" if kind in ("v5litepod", "v5e") else kind
    if gen in ("v4", "v5p"):  # the name counts TensorCores; one megacore device per chip
        if n < 8:
            raise ValueError(f"target {name!r}: the smallest {gen} slice is {gen}-8")
        chips = n // 2
        return Target(name, "tpu", gen, chips, f"{gen}:{_grid_3d(chips)}", "megacore", 4, HBM_GIB[gen],
                      PEAK_TFLOPS_BF16[gen])
    per_host = n if n <= 8 else 4  # v5e/v6e: 1, 4 or 8 chips on one VM; 4 per VM in larger slices
    return Target(name, "tpu", gen, n, f"{gen}:{_grid_2d(n)}", "default", per_host, HBM_GIB[gen],
                  PEAK_TFLOPS_BF16[gen])


# ---------------------------------------------------------------- model and step
def resolve_model(spec) -> Any:
    """The ModelConfig of a ModelSpec (a preset name or an HF directory's config.json), with its
    dtypes and remat, and the vocabulary grown for latent tokens as `run_sft` would."""

    kw = dict(param_dtype=spec.param_dtype, dtype=spec.dtype, remat=spec.remat)
    key = str(spec.path).lower()
    if key in MODEL_PRESETS:
        cfg = model.ModelConfig(**MODEL_PRESETS[key], **kw)
    else:
        f = Path(spec.path) / "config.json"
        if not f.exists():
            raise FileNotFoundError(f"model.path={spec.path!r}: not a preset ({', '.join(sorted(MODEL_PRESETS))}) "
                                    f"and no {f}")
        cfg = model.ModelConfig.from_hf(json.loads(f.read_text()), source=str(f), **kw)
    if spec.latent_tokens:
        new = cfg.vocab_size + len(DEFAULT_SCHEMA.special_tokens())
        rows = -(-new // spec.vocab_multiple) * spec.vocab_multiple
        cfg = cfg.replace(vocab_size=new, padded_vocab_size=rows if rows != new else None)
    return cfg


def abstract_mesh(shape: Sequence[int]) -> AbstractMesh:
    return AbstractMesh(tuple(shape), MESH_AXES, axis_types=(AxisType.Auto,) * len(MESH_AXES))


@dataclasses.dataclass
class StepPlan:
    """The SFT step and abstract arguments (ShapeDtypeStructs with shardings) on one mesh."""

    spec: Any
    mesh: Any
    jitted: Any
    state: Any
    frozen: Any
    batch: Any
    micro_rows: int  # global rows per micro-batch
    accum: int


def _with_sharding(abstract, shardings):
    return jax.tree.map(lambda a, s: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=s), abstract, shardings)


def build_step(cfg, model_cfg, mesh, total_steps: int = 1000) -> StepPlan:
    """Exactly the step `run_sft` compiles (same StepSpec, optimizer, shardings, donation), with
    abstract arguments instead of arrays."""

    spec = steps.StepSpec(model_cfg, lora=cfg.lora, vocab_chunk=cfg.vocab_chunk)
    tx = steps.make_optimizer(cfg.optim, total_steps)
    pdt = jnp.dtype(model_cfg.param_dtype)
    params = jax.tree.map(lambda s: jax.ShapeDtypeStruct(s, pdt), model.param_shapes(model_cfg),
                          is_leaf=lambda x: isinstance(x, tuple))
    frozen, f_shard = None, None
    if cfg.lora is None:
        trainable = params
    else:
        trainable = jax.eval_shape(lambda: model.init_lora(model_cfg, cfg.lora, jax.random.key(0)))
        f_shard = parallel.tree_shardings(model.param_axes(model_cfg), params, mesh)
        frozen = _with_sharding(params, f_shard)
    s_shard = steps.state_shardings(spec, tx, trainable, mesh)
    state = _with_sharding(jax.eval_shape(lambda t: steps.init_state(t, tx, jax.random.key(0)), trainable), s_shard)
    accum = cfg.optim.grad_accum_steps
    micro = cfg.batch_size // accum
    example = {k: jax.ShapeDtypeStruct((accum, micro, cfg.seq_len), d) for k, d in (
        ("inputs", jnp.int32), ("targets", jnp.int32), ("loss_mask", jnp.bool_), ("segment_ids", jnp.int32),
        ("positions", jnp.int32))}
    b_shard = steps.batch_shardings(example, mesh)
    jitted = steps.compile_step(steps.sft_train_step, spec, tx, state_sharding=s_shard, frozen_sharding=f_shard,
                                batch_sharding=b_shard)
    return StepPlan(spec, mesh, jitted, state, frozen, _with_sharding(example, b_shard), micro, accum)


# ---------------------------------------------------------------- memory estimate
def _itemsize(dtype) -> int:
    if jax.dtypes.issubdtype(dtype, jax.dtypes.prng_key):
        return 8  # threefry: 2 x uint32
    return jnp.dtype(dtype).itemsize


def device_bytes(tree) -> int:
    """Bytes per device of a tree of ShapeDtypeStructs with shardings (the largest shard)."""
    total = 0
    for x in jax.tree.leaves(tree):
        shard = x.sharding.shard_shape(x.shape) if getattr(x, "sharding", None) is not None else x.shape
        total += int(np.prod(shard, dtype=np.int64)) * _itemsize(x.dtype)
    return total


def _sharded_on(x, axis: str) -> bool:
    spec = getattr(x.sharding, "spec", ())
    return any(axis == p or (isinstance(p, tuple) and axis in p) for p in spec)


@dataclasses.dataclass
class MemoryEstimate:
    rows: list[tuple[str, int]]  # (component, bytes per device)
    per_device_rows: int  # batch rows per device per micro-batch
    notes: list[str]

    @property
    def total(self) -> int:
        return sum(b for _, b in self.rows)


def activation_bytes(model_cfg, rows: int, seq: int, mesh_shape: dict, vocab_chunk: int) -> dict[str, int]:
    """Activation memory of one micro-batch on one device (see the module docstring, step 2)."""
    c = jnp.dtype(model_cfg.dtype).itemsize
    tp = mesh_shape.get("tensor", 1)
    ep = mesh_shape.get("expert", 1)
    div = lambda n, a: n // a if a > 1 and n % a == 0 else n  # noqa: E731 - rules drop non-dividing axes
    b, t, d, hd, layers = rows, seq, model_cfg.hidden_size, model_cfg.head_dim, model_cfg.num_layers
    n, k = div(model_cfg.num_heads, tp), div(model_cfg.num_kv_heads, tp)
    f = div(model_cfg.intermediate_size, tp)
    if model_cfg.is_moe:  # the MoE layer evaluates every expert densely: [b, t, E, F]
        f = f * div(model_cfg.num_experts, ep)
    lin = b * t * c * (4 * d + 2 * (n + 2 * k) * hd + n * hd + 4 * f)  # norms, q/k/v (+rope), attn out, MLP
    scores = b * n * t * t  # elements of one layer's attention scores
    att_saved = scores * (4 * 4 + c) + b * t * t  # f32 scores, masked, exp, probs + probs in `dtype`; mask
    att_bwd = scores * 4 * 2  # f32 gradients of the scores in the backward pass
    layer = lin + att_saved
    carry = b * t * d * c
    if model_cfg.remat == "full":
        saved, transient = layers * carry, layer + att_bwd
    elif model_cfg.remat == "dots":  # matmuls without batch dims are kept: projections, not attention
        saved, transient = layers * (carry + b * t * c * ((n + 2 * k) * hd + 2 * d + 2 * f)), layer + att_bwd
    else:
        saved, transient = layers * layer, lin + att_bwd
    chunk = effective_vocab_chunk(model_cfg.vocab_size, b * t, vocab_chunk)
    loss = b * t * div(chunk, tp) * 4 * 3 + -(-model_cfg.vocab_size // chunk) * b * t * 16 + b * t * d * c * 2
    return {"saved": int(saved), "transient": int(transient), "loss": int(loss)}


def estimate_memory(plan: StepPlan, model_cfg, cfg) -> MemoryEstimate:
    """Per-device bytes: exact for the arrays the step receives (from their shardings), a
    formula for what it creates (gathered weights, activations, loss)."""
    mesh_shape = dict(plan.mesh.shape)
    state, frozen = plan.state, plan.frozen
    trainable = device_bytes(state["params"])
    c = jnp.dtype(model_cfg.dtype).itemsize
    rows: list[tuple[str, int]] = []
    if frozen is not None:
        rows.append((f"frozen params ({model_cfg.param_dtype})", device_bytes(frozen)))
    rows += [
        (f"trainable params ({'LoRA' if cfg.lora else model_cfg.param_dtype})", trainable),
        ("optimizer state (AdamW moments)", device_bytes(state["opt_state"])),
        ("gradients (accumulator + micro-batch)", 2 * trainable),
        (f"batch ({plan.accum} x {plan.micro_rows} rows x {cfg.seq_len})", device_bytes(plan.batch)),
    ]
    # FSDP: each layer's weights are all-gathered (in the compute dtype) when used; count two
    # layers in flight, plus the embedding/head gathered for the loss.
    params = frozen if frozen is not None else state["params"]
    fsdp = mesh_shape.get("fsdp", 1)
    gathered = 0
    if fsdp > 1:
        for path, x in jax.tree_util.tree_flatten_with_path(params)[0]:
            per_dev = device_bytes(x) * (fsdp if _sharded_on(x, "fsdp") else 1) * c // _itemsize(x.dtype)
            top = getattr(path[0], "key", None)
            gathered += 2 * per_dev // model_cfg.num_layers if top == "layers" else per_dev
    rows.append(("gathered weights (FSDP all-gather)", gathered))
    b_rows = plan.batch["inputs"].sharding.shard_shape(plan.batch["inputs"].shape)[1]
    act = activation_bytes(model_cfg, b_rows, cfg.seq_len, mesh_shape, cfg.vocab_chunk)
    rows += [(f"activations kept for backward (remat={model_cfg.remat})", act["saved"]),
             ("activations of the layer in flight", act["transient"]),
             (f"loss (vocab chunks of {effective_vocab_chunk(model_cfg.vocab_size, b_rows * cfg.seq_len, cfg.vocab_chunk)})",
              act["loss"])]
    return MemoryEstimate(rows, b_rows, [])


# ---------------------------------------------------------------- config vs topology
def sharding_notes(plan: StepPlan, model_cfg, cfg, target: Target) -> list[str]:
    """Problems the mesh has with this config (replicated dimensions, host divisibility)."""

    notes, mesh_shape = [], dict(plan.mesh.shape)
    accum = cfg.optim.grad_accum_steps
    if cfg.batch_size % (target.hosts * accum):
        notes.append(f"ERROR batch_size={cfg.batch_size} is not divisible by hosts x grad_accum_steps = "
                     f"{target.hosts} x {accum}: run_sft refuses it on this pod")
    if cfg.batch_size % accum:
        notes.append(f"ERROR batch_size={cfg.batch_size} is not divisible by grad_accum_steps={accum}")
    data_par = mesh_shape.get("data", 1) * mesh_shape.get("fsdp", 1)
    if data_par > 1 and plan.micro_rows % data_par:
        notes.append(f"WARNING micro-batch of {plan.micro_rows} rows is not divisible by data x fsdp = {data_par}: "
                     f"the batch (and every activation) is replicated on all {target.chips} chips")

    def walk(axes_tree, shapes_tree, prefix):
        flat_axes = jax.tree_util.tree_flatten_with_path(axes_tree, is_leaf=lambda x: isinstance(x, tuple))[0]
        flat_shapes = jax.tree.leaves(shapes_tree, is_leaf=lambda x: isinstance(x, tuple))
        for (path, axes), shape in zip(flat_axes, flat_shapes):
            shape = shape if isinstance(shape, tuple) else shape.shape
            for name, dim in zip(axes, shape):
                for ax in DEFAULT_RULES.get(name, ()) if name else ():
                    size = mesh_shape.get(ax, 1)
                    if size > 1 and dim % size:
                        key = "/".join(str(getattr(p, "key", p)) for p in path)
                        notes.append(f"WARNING {prefix}{key}: {name}={dim} is not divisible by {ax}={size}: "
                                     f"not sharded on {ax}")

    walk(model.param_axes(model_cfg), model.param_shapes(model_cfg), "params/")
    if cfg.lora is not None:
        walk(model.lora_axes(model_cfg, cfg.lora), plan.state["params"], "lora/")
    return list(dict.fromkeys(notes))


# ---------------------------------------------------------------- lowering and compiling
def lower_abstract(plan: StepPlan, platform: str):
    """Trace + lower the step on an AbstractMesh for `platform` (no devices involved)."""
    traced = plan.jitted.trace(plan.state, plan.frozen, plan.batch)
    return traced.lower(lowering_platforms=(platform,))


def step_flops(model_cfg, cfg, n_params: int) -> float:
    """Model FLOPs of one optimizer step: per token 6 N (4 N under LoRA: no weight gradients of
    the frozen base) plus this model's full [T, T] attention, 12 L T heads head_dim."""
    tokens = cfg.batch_size * cfg.seq_len
    per_token = (4 if cfg.lora is not None else 6) * n_params
    per_token += 12 * model_cfg.num_layers * cfg.seq_len * model_cfg.num_heads * model_cfg.head_dim
    return float(tokens * per_token)


def _memory(compiled) -> dict[str, int] | None:
    m = compiled.memory_analysis()
    if m is None:
        return None
    out = {k: int(getattr(m, f"{k}_size_in_bytes", 0)) for k in ("argument", "output", "alias", "temp",
                                                                    "generated_code")}
    out["peak"] = out["argument"] + out["output"] - out["alias"] + out["temp"] + out["generated_code"]
    return out


_OOM = re.compile(r"RESOURCE_EXHAUSTED|[Oo]ut of memory|exceeds available")


def tpu_compiler_available() -> bool:
    return importlib.util.find_spec("libtpu") is not None


@contextlib.contextmanager
def _quiet_tpu_env(target: Target):
    """libtpu, away from a TPU VM, asks the metadata server and warns about missing host info;
    give it the target's values for the duration (never on a real TPU host)."""
    if "TPU_WORKER_HOSTNAMES" in os.environ or os.environ.get("TPU_NAME"):
        yield
        return
    env = {"TPU_SKIP_MDS_QUERY": "1", "TPU_WORKER_HOSTNAMES": "localhost", "TPU_ACCELERATOR_TYPE": target.name}
    old = {k: os.environ.get(k) for k in env}
    os.environ.update(env)
    try:
        yield
    finally:
        for k, v in old.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v


def tpu_devices(target: Target) -> list:
    from jax.experimental import topologies

    with _quiet_tpu_env(target):
        topo = topologies.get_topology_desc(target.topology, "tpu", chip_config_name=target.chip_config,
                                            chips_per_host_bounds=(2, 2, 1), num_slices=1,
                                            wrap=(False, False, False))
    return list(topo.devices)


def compile_tpu(cfg, model_cfg, target: Target, mesh_shape: Sequence[int]) -> dict:
    """Compile the step with XLA's TPU compiler for compile-only devices of the target topology."""
    devices = tpu_devices(target)
    if len(devices) != target.chips:
        raise RuntimeError(f"topology {target.topology}: {len(devices)} devices, expected {target.chips}")
    mesh = jax.make_mesh(tuple(mesh_shape), MESH_AXES, axis_types=(AxisType.Auto,) * len(MESH_AXES),
                         devices=devices)
    return _compile(build_step(cfg, model_cfg, mesh), f"XLA:TPU, {devices[0].device_kind}")


def compile_local(cfg, model_cfg, mesh_shape: Sequence[int]) -> dict:
    """Compile the step on a real mesh of this process's devices (CPU: simulated ones)."""
    n = int(np.prod(mesh_shape))
    devices = jax.devices()
    if len(devices) < n:
        raise RuntimeError(f"local compile needs {n} devices, this process has {len(devices)} "
                           f"(--local-devices {n}, or XLA_FLAGS=--xla_force_host_platform_device_count={n})")
    mesh = Mesh(np.asarray(devices[:n]).reshape(tuple(mesh_shape)), MESH_AXES,
                axis_types=(AxisType.Auto,) * len(MESH_AXES))
    out = _compile(build_step(cfg, model_cfg, mesh), f"XLA:{devices[0].platform.upper()}, {n} local devices")
    out["platform"] = devices[0].platform
    return out


def _compile(plan: StepPlan, label: str) -> dict:
    t0 = time.time()
    lowered = plan.jitted.lower(plan.state, plan.frozen, plan.batch)
    try:
        compiled = lowered.compile()
    except Exception as e:  # noqa: BLE001 - an XLA error is the answer here
        msg = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        return {"backend": label, "ok": False, "oom": bool(_OOM.search(str(e))), "error": msg[:2000],
                "seconds": round(time.time() - t0, 2)}
    return {"backend": label, "ok": True, "oom": False, "memory": _memory(compiled),
            "seconds": round(time.time() - t0, 2)}


# ---------------------------------------------------------------- the check
@dataclasses.dataclass
class AOTReport:
    target: Target
    model: str
    num_params: int
    mesh_shape: dict[str, int]
    estimate: MemoryEstimate
    notes: list[str]
    headroom: float
    lowered: bool | None = None  # None: not tried
    lower_error: str | None = None
    flops: float | None = None
    tpu_compile: dict | None = None
    local_compile: dict | None = None
    summary_lines: list[str] = dataclasses.field(default_factory=list)

    @property
    def hbm(self) -> int:
        return int(self.target.hbm_gib * GiB)

    @property
    def basis(self) -> str:
        if self.tpu_compile is not None:
            return "compiled for TPU"
        lc = self.local_compile
        if lc is not None and lc.get("platform") == self.target.platform:
            return f"compiled on local {lc['platform']}"
        return "estimate"

    @property
    def compiled_verdict(self) -> dict | None:
        return self.tpu_compile if self.tpu_compile is not None else (
            self.local_compile if self.basis.startswith("compiled on local") else None)

    @property
    def peak(self) -> int:
        c = self.compiled_verdict
        if c is not None and c.get("ok") and c.get("memory"):
            return c["memory"]["peak"]
        return self.estimate.total

    @property
    def fits(self) -> bool:
        c = self.compiled_verdict
        if c is not None:
            return bool(c.get("ok")) and self.peak <= self.hbm
        return self.estimate.total <= self.hbm * (1 - self.headroom)

    @property
    def errors(self) -> list[str]:
        out = [n for n in self.notes if n.startswith("ERROR")]
        if self.lowered is False:
            out.append(f"ERROR lowering failed: {self.lower_error}")
        for c in (self.tpu_compile, self.local_compile):
            if c is not None and not c.get("ok") and not c.get("oom"):
                out.append(f"ERROR compile ({c['backend']}) failed: {c['error']}")
        return out

    @property
    def exit_code(self) -> int:
        return 2 if self.errors else 0 if self.fits else 1

    def table(self) -> str:
        g = lambda b: f"{b / GiB:9.3f}"  # noqa: E731
        t = self.target
        lines = [*self.summary_lines, "", f"{'per-device memory (estimate)':<52}{'GiB':>9}"]
        lines += [f"  {name:<50}{g(b)}" for name, b in self.estimate.rows]
        lines += [f"  {'total (estimate)':<50}{g(self.estimate.total)}",
                  f"  {'HBM per chip (' + t.generation + ')':<50}{g(self.hbm)}"]
        if self.flops:
            lines.append(f"model FLOPs per step ~{self.flops:.3e}: >= {self.flops / (t.chips * t.peak_tflops * 1e12):.3g} s "
                         f"at 100% of {t.chips} x {t.peak_tflops:g} TFLOP/s (bf16 peak)")
        if self.lowered is not None:
            lines.append(f"lowering on AbstractMesh {self.mesh_shape} for {t.platform}: "
                         + ("ok" if self.lowered else f"FAILED: {self.lower_error}"))
        for label, c in (("compile for the target", self.tpu_compile), ("compile on local devices", self.local_compile)):
            if c is None:
                continue
            if c.get("ok") and c.get("memory"):
                m = c["memory"]
                lines.append(f"{label} ({c['backend']}, {c['seconds']} s): ok; per device GiB: arguments "
                             f"{m['argument'] / GiB:.3f}, outputs {m['output'] / GiB:.3f}, aliased "
                             f"{m['alias'] / GiB:.3f}, temporaries {m['temp'] / GiB:.3f}, code "
                             f"{m['generated_code'] / GiB:.3f} -> peak {m['peak'] / GiB:.3f}")
            elif c.get("ok"):
                lines.append(f"{label} ({c['backend']}): ok (no memory analysis)")
            else:
                lines.append(f"{label} ({c['backend']}): {'OUT OF MEMORY' if c.get('oom') else 'FAILED'}: {c['error']}")
        lines += self.notes
        verdict = "FITS" if self.fits else "DOES NOT FIT"
        if self.errors:
            verdict = "ERROR"
        usable = self.hbm * (1 if self.basis != "estimate" else 1 - self.headroom)
        lines.append(f"verdict: {verdict} ({self.basis}: {self.peak / GiB:.2f} GiB per device of "
                     f"{usable / GiB:.2f} GiB usable{'' if self.basis != 'estimate' else f', headroom {self.headroom:.0%}'})")
        return "\n".join(lines)

    def to_dict(self) -> dict:
        return {"target": dataclasses.asdict(self.target), "model": self.model, "num_params": self.num_params,
                "mesh": self.mesh_shape, "estimate": {"rows": self.estimate.rows, "total": self.estimate.total,
                                                      "rows_per_device": self.estimate.per_device_rows},
                "lowered": self.lowered, "lower_error": self.lower_error, "flops": self.flops,
                "tpu_compile": self.tpu_compile, "local_compile": self.local_compile, "notes": self.notes,
                "basis": self.basis, "peak": self.peak, "hbm": self.hbm, "fits": self.fits, "errors": self.errors,
                "exit_code": self.exit_code}


Mode = Literal["auto", "estimate", "abstract", "tpu", "local"]


def check(cfg, target: str | Target, *, mode: Mode = "auto", headroom: float = 0.1) -> AOTReport:
    """Run the checks of ``mode`` (see the module docstring) for an SFTConfig on a target."""

    target = parse_target(target) if isinstance(target, str) else target
    model_cfg = resolve_model(cfg.model)
    if mode == "tpu" and target.platform != "tpu":
        raise ValueError(f"--mode tpu: {target.name} is not a TPU target")
    if mode == "tpu" and not tpu_compiler_available():
        raise RuntimeError("--mode tpu needs libtpu (pip install 'jax[tpu]' brings the matching version)")
    mesh_cfg = dataclasses.replace(cfg.mesh, num_devices=None)
    shape = mesh_cfg.shape(target.chips)
    mesh = abstract_mesh(shape)
    plan = build_step(cfg, model_cfg, mesh)
    n_params = int(sum(np.prod(s) for s in jax.tree.leaves(model.param_shapes(model_cfg),
                                                           is_leaf=lambda x: isinstance(x, tuple))))
    est = estimate_memory(plan, model_cfg, cfg)
    if model_cfg.remat != "full":
        est.notes.append(f"NOTE remat={model_cfg.remat}: the activation estimate is a lower bound (XLA's TPU compiler "
                         f"needed up to 4x more in our measurements); --mode tpu (libtpu) compiles for the target")
    mesh_shape = dict(zip(MESH_AXES, shape))
    report = AOTReport(target, str(cfg.model.path), n_params, mesh_shape, est,
                       sharding_notes(plan, model_cfg, cfg, target) + est.notes, headroom,
                       flops=step_flops(model_cfg, cfg, n_params))
    lora = (f"LoRA r={cfg.lora.rank} on {','.join(cfg.lora.targets)}" if cfg.lora else "full fine-tuning")
    report.summary_lines = [
        f"AOT check of the SFT step: model {cfg.model.path} ({n_params / 1e9:.3g}B params, {model_cfg.family}), {lora}",
        f"target {target.name}: {target.platform} {target.generation}, {target.chips} chips"
        f"{' (' + target.topology + ')' if target.topology else ''}, {target.hosts} host(s), "
        f"{target.hbm_gib:g} GiB HBM per chip",
        f"mesh {' '.join(f'{k}={v}' for k, v in mesh_shape.items())}; global batch {cfg.batch_size} rows x "
        f"{cfg.seq_len} tokens in {plan.accum} micro-batch(es), {est.per_device_rows} row(s) per device; remat "
        f"{model_cfg.remat}; params {model_cfg.param_dtype}, compute {model_cfg.dtype}",
    ]
    if mode != "estimate":
        platform = "cuda" if target.platform == "gpu" else "tpu"
        try:
            lower_abstract(plan, platform)
            report.lowered = True
        except Exception as e:  # noqa: BLE001 - reported, exit code 2
            report.lowered, report.lower_error = False, f"{type(e).__name__}: {e}"[:2000]
    run_tpu = mode == "tpu" or (mode == "auto" and target.platform == "tpu" and tpu_compiler_available())
    if run_tpu and report.lowered is not False:
        try:
            report.tpu_compile = compile_tpu(cfg, model_cfg, target, shape)
        except Exception as e:  # noqa: BLE001
            report.tpu_compile = {"backend": f"TPU {target.generation}", "ok": False, "oom": False,
                                  "error": f"{type(e).__name__}: {e}"[:2000], "seconds": 0}
    if mode == "local" and report.lowered is not False:
        try:
            report.local_compile = compile_local(cfg, model_cfg, shape)
        except Exception as e:  # noqa: BLE001
            report.local_compile = {"backend": "local", "ok": False, "oom": False,
                                    "error": f"{type(e).__name__}: {e}"[:2000], "seconds": 0}
    return report


# ---------------------------------------------------------------- command line
@dataclasses.dataclass(frozen=True)
class AOTConfig(SFTConfig):
    """The SFT run to check (every `sage-jax sft` field) and where and how to check it."""

    target: str = ""  # v5litepod-16, v5e-16, v6e-8, v4-32, v5p-64, h100-8, ...
    mode: Mode = "auto"
    headroom: float = 0.1  # fraction of HBM kept free by the estimate's verdict
    local_devices: int | None = None  # simulate N CPU devices for mode=local (before JAX starts its backend)
    json_out: str | None = None  # also write the report as JSON here


def run_aot(cfg: AOTConfig) -> AOTReport:
    """`sage-jax aot`: the checks of `cfg.mode` for `cfg.target`; writes `cfg.json_out` if set."""
    if not cfg.target:
        raise ConfigError("target= is required (v5litepod-16, v5e-16, v6e-8, v4-32, v5p-64, h100-8, ...)")
    if cfg.mode != "local" and not os.environ.get("JAX_PLATFORMS"):
        try:  # nothing here runs on a device: never take a TPU/GPU this host may have
            jax.config.update("jax_platforms", "cpu")
        except RuntimeError:
            pass
    if cfg.local_devices:
        try:
            jax.config.update("jax_num_cpu_devices", cfg.local_devices)
        except RuntimeError as e:
            print(f"aot: local_devices ignored: {e}", file=sys.stderr)
    report = check(cfg, cfg.target, mode=cfg.mode, headroom=cfg.headroom)
    if cfg.json_out:
        Path(cfg.json_out).write_text(json.dumps(report.to_dict(), indent=2, default=str) + "\n", encoding="utf-8")
    return report


def format_report(report: AOTReport) -> str:
    return report.table()


def main(argv: list[str] | None = None) -> int:
    """`python -m sage_jax.aot`: the same config as `sage-jax aot`; exit 0 fits, 1 not, 2 error."""
    p = argparse.ArgumentParser(prog="python -m sage_jax.aot", description=__doc__.split("\n\n")[0],
                                epilog="Overrides are AOTConfig fields: SFTConfig's (as for `sage-jax sft`) and "
                                       "target, mode, headroom, local_devices, json_out. See the module docstring "
                                       "for what each mode checks.")
    add_config_args(p)
    args = p.parse_args(argv)
    try:
        report = run_aot(config_from_args(AOTConfig, args))
    except (ConfigError, ValueError, FileNotFoundError, RuntimeError) as e:
        print(f"aot: {e}", file=sys.stderr)
        return 2
    print(format_report(report))
    return report.exit_code


if __name__ == "__main__":
    raise SystemExit(main())
