"""The training loop shared by SFT and DPO, readable on one screen.

    state <- restore latest checkpoint (params/adapters, optimizer, step, RNG, data iterator) or init
    for step in [start, total):
        batch -> global arrays on the mesh -> jit step (donated state) -> metrics (fetched lazily)
        every eval_every: evaluate (keep_best: a new best validation loss is checkpointed with its
        metrics and recorded in best.json); every save_every or on SIGTERM: checkpoint (async)
    final evaluation and checkpoint, wait for it, close.

``best.json`` (``keep_best``) is ``{"step", "metric", "value"}`` of the best evaluation so far
(steps > 0), written atomically once that checkpoint is committed; Orbax keeps that step beyond
the ``keep`` latest (:class:`~sage_jax.train.checkpoint.Checkpointer`) and the run-directory
loader restores it by default. On resume the best so far is read back from the checkpoints'
own metrics, so a kill between the commit and ``best.json`` loses nothing.

On resume, ``eval.jsonl`` keeps only the evaluations up to the restored step (a fresh start
clears it) and the log says "resuming from step N". The settings that define the result are
checked against the run's recorded ones first (:func:`check_run_settings`,
:mod:`sage_jax.train.settings`).

Every host makes the same decisions (step counts and the preemption flag are shared), only
process 0 writes metrics and JSON items.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import math
import os
import sys
import time
from pathlib import Path
from typing import Any, Callable, Iterator

import jax
import numpy as np
from jax.sharding import NamedSharding

from sage_jax.model.config import ModelConfig
from sage_jax.model.loader import BEST_FILE, ModelSpec, load_base
from sage_jax.train.checkpoint import Checkpointer, abstract_like
from sage_jax.progress import progress
from sage_jax.train.metrics import MetricsWriter, mfu, process_peak_flops, truncate_jsonl
from sage_jax.train.preemption import PreemptionGuard
from sage_jax.train.settings import check_settings, has_checkpoint, run_settings

log = logging.getLogger(__name__)
EVAL_FILE = "eval.jsonl"


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
    model_cfg, params, tokenizer = load_base(model, DEFAULT_SCHEMA.special_tokens())
    tokenizer_dir = out / "tokenizer"
    if jax.process_index() == 0:
        tokenizer.save_pretrained(tokenizer_dir)
    return RunSetup(out, mesh, model_cfg, params, tokenizer, tokenizer_dir)


def check_run_settings(cfg, out: Path, what: str) -> list[str]:
    """Stop a resume whose result-defining settings (config and data content) changed, unless
    ``cfg.allow_changed_config``; record them for the next start (see :mod:`sage_jax.train.settings`)."""
    settings = run_settings(cfg, [*cfg.train_files, *cfg.eval_files])
    return check_settings(out, settings, resuming=has_checkpoint(out / "checkpoints"),
                          allow_changed=cfg.allow_changed_config, what=what, write=jax.process_index() == 0)


def _restart_evals(output_dir: Path, latest: int | None) -> list[dict]:
    """``eval.jsonl`` as of the restored step (later lines came after the checkpoint and will be
    evaluated again; a fresh start clears it); returns the kept records."""
    path = output_dir / EVAL_FILE
    if jax.process_index() == 0:
        if latest is None:
            path.unlink(missing_ok=True)
        else:
            truncate_jsonl(path, latest)
    if latest is None or not path.exists():
        return []
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


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
    best: dict | None = None  # best.json's content (keep_best), else None


def write_best(output_dir: Path, step: int, metric: str, value: float) -> dict:
    """``<output_dir>/best.json`` = ``{"step", "metric", "value"}``, replaced atomically (process 0)."""
    rec = {"step": int(step), "metric": metric, "value": float(value)}
    if jax.process_index() == 0:
        path = Path(output_dir) / BEST_FILE
        tmp = path.with_name(f".{BEST_FILE}.tmp{os.getpid()}")
        tmp.write_text(json.dumps(rec) + "\n")
        os.replace(tmp, path)
    return rec


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
    keep_best: bool = False,
    best_metric: str = "loss",
) -> tuple[dict, LoopResult]:
    """Run (or resume) a training loop; returns the final state and a summary.

    ``keep_best``: at every evaluation after step 0, a validation ``best_metric`` lower than any
    before is checkpointed (with its metrics) and recorded in ``best.json``; that checkpoint is
    kept beyond the ``keep`` latest."""
    data_iter = batches if hasattr(batches, "get_state") else None  # a Grain iterator: checkpointed by Grain
    guard = PreemptionGuard()
    ckpt = Checkpointer(output_dir / "checkpoints", save_every=save_every, keep=keep, preemption=guard,
                        keep_best=keep_best, best_metric=best_metric)
    start = 0
    latest = ckpt.latest_step()
    if latest is not None:
        log.info("resuming from step %d of %d (%s)", latest, total_steps, ckpt.directory)
        state = ckpt.restore(abstract_like(state), latest, data_iter=data_iter).state
        start = latest
    best: dict | None = None
    if keep_best:
        found = ckpt.best()  # from the checkpoints' own metrics: survives a kill before best.json
        if found is not None:
            best = write_best(output_dir, found[0], best_metric, found[1])
        elif jax.process_index() == 0:
            (output_dir / BEST_FILE).unlink(missing_ok=True)  # names no checkpoint of this run
    metrics = MetricsWriter(output_dir / "logs", tensorboard=tensorboard, resume_step=start if latest else None)
    peak, peak_label = process_peak_flops()  # the label goes next to every MFU number
    log.info("MFU: %.3g FLOPs per token over %s", flops_per_token, peak_label)
    evals: list[dict] = _restart_evals(output_dir, latest)

    def run_eval(step: int) -> dict | None:
        if evaluate is None:
            return None
        result = {"step": step, **evaluate(state)}
        evals.append(result)
        metrics.write(step, {f"eval/{k}": v for k, v in result.items() if k != "step"})
        if jax.process_index() == 0:
            with open(output_dir / EVAL_FILE, "a") as f:
                f.write(json.dumps(result) + "\n")
        return result

    def save(step: int, force: bool = False, result: dict | None = None) -> None:
        nonlocal best
        value = None if result is None else result.get(best_metric)
        is_best = (keep_best and step > 0 and value is not None and math.isfinite(float(value))
                   and (best is None or float(value) < best["value"]))
        vals = {k: float(v) for k, v in result.items() if k != "step"} if is_best else None
        saved = ckpt.save(step, state=state, data_iter=data_iter, config=run_config, tokenizer_dir=tokenizer_dir,
                          force=force or is_best, metrics=vals)
        if is_best and saved:
            ckpt.wait()  # best.json names only committed checkpoints
            best = write_best(output_dir, step, best_metric, float(value))
            if jax.process_index() == 0:
                print(f"train: step {step}: best validation {best_metric} so far ({float(value):.4f}), "
                      f"checkpoint kept ({output_dir / BEST_FILE})", file=sys.stderr)

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
                m = {**m, "tokens_per_s": tok_s, "mfu": mfu(tok_s, flops_per_token, peak), "mfu_basis": peak_label}
                metrics.write(done, m)
                last = metrics.last or {}
                bar.update(done - bar.n, postfix={k: last[k] for k in ("loss", "tokens_per_s") if k in last})
            if done == total_steps:
                break  # the final evaluation and checkpoint follow the loop
            result = run_eval(done) if eval_every and done % eval_every == 0 else None
            # If Orbax's policies say so (every save_every steps, or a preemption: SIGTERM), or a
            # new best validation loss (keep_best).
            save(done, result=result)
            if guard.should_stop(done):  # saved just above
                preempted = True
                break
    bar.close()
    if not preempted and start < total_steps:
        save(total_steps, force=True, result=run_eval(total_steps))
    ckpt.wait()
    ckpt.close()
    metrics.flush()
    last = dict(metrics.last or {})
    metrics.close()
    return state, LoopResult(step=done, last_metrics=last, evals=evals, preempted=preempted, best=best)
