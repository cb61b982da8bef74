"""The training loop shared by SFT and DPO, readable on one screen.

    state <- restore latest checkpoint (params/adapters, optimizer, step, RNG, data iterator) or init
    for step in [start, total):
        batch -> global arrays on the mesh -> jit step (donated state) -> metrics (fetched lazily)
        every eval_every: evaluate; every save_every or on SIGTERM: checkpoint (async)
    final checkpoint, wait for it, close.

Every host makes the same decisions (step counts and the preemption flag are shared), only
process 0 writes metrics and JSON items.
"""

from __future__ import annotations

import dataclasses
import json
import time
from pathlib import Path
from typing import Any, Callable, Iterator

import jax
import numpy as np
from jax.sharding import NamedSharding

from sage_jax.model.config import ModelConfig
from sage_jax.train.checkpoint import Checkpointer, abstract_like
from sage_jax.progress import progress
from sage_jax.train.metrics import MetricsWriter, mfu, peak_flops_info
from sage_jax.train.preemption import PreemptionGuard


@dataclasses.dataclass(frozen=True)
class ModelSpec:
    """Which base model to start from and how to run it."""

    path: str = "smollm2"  # an HF directory, or "smollm2" for the built-in SmolLM2-135M-Instruct
    param_dtype: str = "float32"
    dtype: str = "float32"  # compute dtype: bfloat16 on TPU/GPU
    remat: str = "none"  # "none" | "full" | "dots"
    # Render latents with special tokens (added to the tokenizer; the vocabulary grows, padded
    # to a multiple of vocab_multiple so it shards evenly) instead of the paper's plain text.
    latent_tokens: bool = False
    vocab_multiple: int = 128


def resolve_model_path(path: str) -> Path:
    if path == "smollm2":
        from sage_jax.model.smollm2 import fetch_smollm2

        return fetch_smollm2()
    p = Path(path)
    if not (p / "config.json").exists():
        raise FileNotFoundError(f"model path {path!r}: no config.json (an HF directory or 'smollm2' expected)")
    return p


def load_model_and_tokenizer(spec: ModelSpec, special_tokens: tuple[str, ...] = ()):
    """(ModelConfig, params, tokenizer), with latent special tokens added when asked."""
    from transformers import AutoTokenizer

    from sage_jax.model import grow_vocab, load_hf

    path = resolve_model_path(spec.path)
    tokenizer = AutoTokenizer.from_pretrained(path)
    cfg, params = load_hf(path, param_dtype=spec.param_dtype, dtype=spec.dtype, remat=spec.remat)
    if spec.latent_tokens and special_tokens:
        tokenizer.add_special_tokens({"additional_special_tokens": list(special_tokens)})
        if len(tokenizer) > cfg.vocab_size:
            cfg, params = grow_vocab(cfg, params, len(tokenizer), pad_to_multiple_of=spec.vocab_multiple)
    return cfg, params, tokenizer


@dataclasses.dataclass
class RunSetup:
    out: Path
    mesh: Any
    model_cfg: ModelConfig
    params: Any
    tokenizer: Any
    tokenizer_dir: Path


def prepare_run(model: ModelSpec, mesh_cfg, output_dir: str) -> RunSetup:
    """Start-up shared by sft and dpo: distributed init, output dir, mesh, model + tokenizer
    (latent tokens added if asked; the tokenizer is saved with the run)."""
    from sage_jax import parallel
    from sage_jax.sac import DEFAULT_SCHEMA

    parallel.initialize_distributed()
    out = Path(output_dir)
    out.mkdir(parents=True, exist_ok=True)
    mesh = parallel.make_mesh(mesh_cfg)
    model_cfg, params, tokenizer = load_model_and_tokenizer(model, DEFAULT_SCHEMA.special_tokens())
    tokenizer_dir = out / "tokenizer"
    if jax.process_index() == 0:
        tokenizer.save_pretrained(tokenizer_dir)
    return RunSetup(out, mesh, model_cfg, params, tokenizer, tokenizer_dir)


def init_train_state(spec, tx, params, seed: int, mesh):
    """(state, state shardings, frozen, frozen shardings): LoRA trains fresh adapters over
    frozen base params; full fine-tuning trains the params themselves."""
    from sage_jax.model import init_lora
    from sage_jax.train import steps

    frozen, f_shard = None, None
    if spec.lora is None:
        trainable = params
    else:
        trainable = init_lora(spec.model, spec.lora, jax.random.key(seed))
        frozen, f_shard = steps.shard_frozen(spec, params, mesh)
    s_shard = steps.state_shardings(spec, tx, trainable, mesh)
    state = jax.jit(lambda t: steps.init_state(t, tx, jax.random.key(seed + 1)), out_shardings=s_shard)(trainable)
    return state, s_shard, frozen, f_shard


def model_config_from_dict(d: dict) -> ModelConfig:
    from sage_jax.model.config import RopeConfig

    d = dict(d)
    d["rope"] = RopeConfig(**d["rope"])
    for k in ("layer_types", "eos_token_id"):
        if isinstance(d.get(k), list):
            d[k] = tuple(d[k])
    return ModelConfig(**d)


def to_global(batch: dict, shardings: dict) -> dict:
    """This host's rows -> global jax.Arrays (batch axis 1 of [A, B, T] arrays is split by host)."""

    def one(x, s: NamedSharding):
        x = np.asarray(x)
        if jax.process_count() == 1:
            return jax.device_put(x, s)
        shape = list(x.shape)
        shape[1 if x.ndim > 1 else 0] *= jax.process_count()
        return jax.make_array_from_process_local_data(s, x, tuple(shape))

    return jax.tree.map(one, batch, shardings)


@dataclasses.dataclass
class LoopResult:
    step: int
    last_metrics: dict
    evals: list[dict]
    preempted: bool


def train_loop(
    *,
    output_dir: Path,
    state: dict,
    frozen: Any,
    step_fn: Callable,
    batches: Iterator,
    to_device: Callable[[dict], dict],
    total_steps: int,
    evaluate: Callable[[dict], dict] | None,
    eval_every: int,
    save_every: int,
    keep: int,
    run_config: dict,
    tokenizer_dir: str | None,
    tokens_in: Callable[[dict], int],
    flops_per_token: float,
    tensorboard: bool = True,
    log_every: int = 1,
) -> tuple[dict, LoopResult]:
    """Run (or resume) a training loop; returns the final state and a summary."""
    data_iter = batches if hasattr(batches, "get_state") else None  # a Grain iterator: checkpointed by Grain
    guard = PreemptionGuard()
    ckpt = Checkpointer(output_dir / "checkpoints", save_every=save_every, keep=keep, preemption=guard)
    start = 0
    latest = ckpt.latest_step()
    if latest is not None:
        state = ckpt.restore(abstract_like(state), latest, data_iter=data_iter).state
        start = latest
    metrics = MetricsWriter(output_dir / "logs", tensorboard=tensorboard, resume_step=start if latest else None)
    peak, peak_label = peak_flops_info()
    peak *= jax.device_count()
    evals: list[dict] = []

    def run_eval(step: int) -> None:
        if evaluate is None:
            return
        result = {"step": step, **evaluate(state)}
        evals.append(result)
        metrics.write(step, {f"eval/{k}": v for k, v in result.items() if k != "step"})
        if jax.process_index() == 0:
            with open(output_dir / "eval.jsonl", "a") as f:
                f.write(json.dumps(result) + "\n")

    def save(step: int, force: bool = False) -> None:
        ckpt.save(step, state=state, data_iter=data_iter, config=run_config, tokenizer_dir=tokenizer_dir,
                  force=force)

    if start == 0:
        run_eval(0)
    bar = progress(total_steps, "train", unit="step", initial=start, show=jax.process_index() == 0)
    preempted, done = False, start
    t_last, tokens_since, prev = time.perf_counter(), 0, None
    with guard:
        for step in range(start, total_steps):
            host_batch = next(batches)
            tokens_since += tokens_in(host_batch)
            state, m = step_fn(state, frozen, to_device(host_batch))
            done = step + 1
            if done % log_every == 0 or done == total_steps:
                # Rate between completions of the previous logged step: waiting on step N-1
                # while step N is already queued never idles the device.
                if prev is not None:
                    jax.block_until_ready(prev)
                now = time.perf_counter()
                tok_s = tokens_since * jax.process_count() / max(now - t_last, 1e-9)
                t_last, tokens_since, prev = now, 0, m
                m = {**m, "tokens_per_s": tok_s, "mfu": mfu(tok_s, flops_per_token, peak)}
                metrics.write(done, m)
                last = metrics.last or {}
                bar.update(done - bar.n, postfix={k: last[k] for k in ("loss", "tokens_per_s") if k in last})
            if eval_every and done % eval_every == 0 and done != total_steps:
                run_eval(done)
            save(done)  # if Orbax's policies say so: every save_every steps, or a preemption (SIGTERM)
            if guard.should_stop(done):  # saved just above
                preempted = True
                break
    bar.close()
    if not preempted and start < total_steps:
        run_eval(total_steps)
        save(total_steps, force=True)
    ckpt.wait()
    ckpt.close()
    metrics.flush()
    last = dict(metrics.last or {})
    metrics.close()
    return state, LoopResult(step=done, last_metrics=last, evals=evals, preempted=preempted)


def load_trained(run_dir: str | Path, step: int | None = None):
    """The model a run trained, ready for rollouts or export: (ModelConfig, merged params,
    tokenizer dir, step). LoRA runs rebuild the base model and merge the adapters."""
    from sage_jax.config import from_dict
    from sage_jax.model import init_lora, merge_lora
    from sage_jax.model.lora import LoraConfig
    from sage_jax.model.params import param_shapes
    from sage_jax.train import steps

    run_dir = Path(run_dir)
    ckpt = Checkpointer(run_dir / "checkpoints", save_every=1, read_only=True)
    step = step if step is not None else ckpt.latest_step()
    if step is None:
        raise FileNotFoundError(f"{run_dir}/checkpoints: no finished checkpoint")
    conf = ckpt.restore_config(step)
    if not conf or "model" not in conf:
        raise ValueError(f"{run_dir}/checkpoints/{step}: no run config stored with the checkpoint")
    run = conf["run"]
    model_cfg = model_config_from_dict(conf["model"])
    lora = from_dict(LoraConfig, run["lora"]) if run.get("lora") else None
    optim = from_dict(steps.OptimConfig, run["optim"])
    tx = steps.make_optimizer(optim, 1)
    device = jax.sharding.SingleDeviceSharding(jax.local_devices()[0])  # this host's own device
    base = None
    if lora is None:
        shapes = param_shapes(model_cfg)
        trainable = jax.tree.map(lambda s: jax.ShapeDtypeStruct(s, model_cfg.param_dtype), shapes,
                                 is_leaf=lambda x: isinstance(x, tuple))
    else:
        spec = from_dict(ModelSpec, run["model"])
        from sage_jax.sac import DEFAULT_SCHEMA

        base_cfg, base, _ = load_model_and_tokenizer(spec, DEFAULT_SCHEMA.special_tokens())
        if base_cfg.embed_rows != model_cfg.embed_rows:
            raise ValueError(f"{run_dir}: base model vocabulary {base_cfg.embed_rows} != trained {model_cfg.embed_rows}")
        trainable = jax.eval_shape(lambda: init_lora(model_cfg, lora, jax.random.key(0)))
    abstract = jax.eval_shape(lambda t: steps.init_state(t, tx, jax.random.key(0)), trainable)
    abstract = jax.tree.map(lambda a: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=device), abstract)
    restored = ckpt.restore(abstract, step, data=False)
    trained = restored.state["params"]
    params = trained if lora is None else merge_lora(base, trained, lora)
    tok_dir = run_dir / "tokenizer"
    ckpt.close()
    return model_cfg, params, tok_dir, step
