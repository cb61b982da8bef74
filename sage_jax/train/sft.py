"""Supervised fine-tuning on State-Action Chain data (the paper's model m1 and later rounds).

    sage-jax sft --config sft.yaml train_files=[data/train.jsonl] output_dir=runs/m1

Data: SAC JSONL -> chat messages (latents rendered into assistant turns) -> the chat template with
an exact assistant-only loss mask -> packed rows (Grain, sharded per host, resumable). Defaults are
the paper's recipe: LoRA r=8, alpha=16 on q_proj/v_proj, AdamW lr 5e-5 cosine, 3 epochs, global
batch 256 dialogues, max length 2048, 1% held out for validation.

**Batch unit.** The reference's global batch is 256 *dialogues* per optimizer step, so an epoch is
ceil(dialogues / 256) steps. Packing puts several dialogues in a row, so ``batch_unit=dialogues``
(the default) keeps the reference's step count: the rows per step are fixed once up front at
ceil(packed rows per epoch / steps per epoch) (rounded up to a multiple of hosts x grad_accum_steps;
the step compiles once), packed with as many first-fit bins per host as dialogues per host step,
so a step holds about ``batch_size`` dialogues (exactly on average over an epoch). The startup line
states the plan. ``batch_unit=rows`` (ours before) makes ``batch_size`` packed rows per step: far
fewer steps per epoch when rows hold several dialogues.
"""

from __future__ import annotations

import dataclasses
import math
import sys
from pathlib import Path
from typing import Literal

import jax
import numpy as np

from sage_jax import parallel
from sage_jax.config import to_dict
from sage_jax.data.build import (BuiltDataset, check_built, expected_settings, open_built, packed_row_count,
                                 split_built)
from sage_jax.data.encode import encode_dialogues, read_dialogues, split_eval
from sage_jax.data.packing import pack_examples
from sage_jax.data.pipeline import DataConfig, make_iterator
from sage_jax.model import num_params
from sage_jax.model.lora import LoraConfig
from sage_jax.model.loader import ModelSpec
from sage_jax.train import steps
from sage_jax.train.metrics import train_flops_per_token
from sage_jax.train.trainer import check_run_settings, init_train_state, prepare_run, to_global, train_loop


@dataclasses.dataclass(frozen=True)
class TrainRunConfig:
    """What every training run (sft, dpo) is configured by; defaults are the paper's SFT recipe."""

    model: ModelSpec = ModelSpec()
    train_files: tuple[str, ...] = ()
    eval_files: tuple[str, ...] = ()  # empty: hold out eval_fraction of the training dialogues
    eval_fraction: float = 0.01
    template: str | None = None  # None: the model's own chat template; or "mistral", "llama3", "chatml"
    output_dir: str = "runs/sft"
    seq_len: int = 2048
    batch_size: int = 256  # global batch per optimizer step (all hosts, all micro-batches); sft: in batch_unit
    epochs: float = 3.0
    max_steps: int | None = None  # overrides epochs
    optim: steps.OptimConfig = steps.OptimConfig()
    lora: LoraConfig | None = LoraConfig()  # null: full fine-tuning
    mesh: parallel.MeshConfig = parallel.MeshConfig()
    eval_every: int = 100
    save_every: int = 100
    keep: int = 3
    log_every: int = 1
    seed: int = 0
    vocab_chunk: int = 0  # LM-head vocabulary chunk; 0 = auto (losses.effective_vocab_chunk)
    tensorboard: bool = True
    strict_data: bool = False  # stop at the first malformed record instead of skipping it
    # Also checkpoint every new best validation loss (evaluations after step 0), keep it beyond
    # `keep`, record it in <output_dir>/best.json; the run-dir loader then restores it by default.
    keep_best: bool = False
    # A resume whose result-defining settings (settings.json: config minus output_dir, max_steps,
    # epochs, eval/save/log cadence, mesh...; data file contents) changed stops, naming the
    # changed fields; true: continue under the new settings (logged).
    allow_changed_config: bool = False


@dataclasses.dataclass(frozen=True)
class SFTConfig(TrainRunConfig):
    """SFT on SAC dialogues (`train_files`: SAC JSONL, or one directory built by `sage-jax data build`)."""

    # "dialogues" (the reference): batch_size dialogues per step, ceil(dialogues / batch_size)
    # steps per epoch; "rows": batch_size packed rows per step.
    batch_unit: Literal["dialogues", "rows"] = "dialogues"


@dataclasses.dataclass(frozen=True)
class StepPlan:
    """How an SFT run's epoch maps onto optimizer steps (see the module docstring)."""

    unit: str  # "dialogues" | "rows"
    batch_size: int  # as configured, in `unit`
    dialogues: int  # training examples (dialogues kept after tokenization)
    rows_per_epoch: int  # packed rows of one pass over them (with `packing_bins` bins per host)
    steps_per_epoch: int
    rows_per_step: int  # global packed rows per optimizer step (fixed: the step compiles once)
    packing_bins: int  # first-fit bins per host

    def describe(self) -> str:
        if self.unit == "dialogues":
            return (f"{self.steps_per_epoch} steps/epoch of {self.batch_size} dialogues "
                    f"(~{self.dialogues / max(self.steps_per_epoch, 1):.1f} each; {self.rows_per_step} packed rows per step)")
        return f"{self.steps_per_epoch} steps/epoch of {self.rows_per_step} packed rows"


def plan_steps(examples, seq_len: int, batch_size: int, unit: str = "dialogues", *, hosts: int = 1,
               accum: int = 1) -> StepPlan:
    """Steps per epoch and rows per step for ``examples`` (tokenized dialogues).

    ``dialogues``: ceil(len(examples) / batch_size) steps per epoch; rows per step = ceil(packed rows
    per epoch / steps per epoch), rounded up to a multiple of ``hosts * accum``; packed with
    ceil(batch_size / hosts) bins per host. ``rows``: batch_size rows per step (a multiple of
    ``hosts * accum``), packed rows per epoch // batch_size steps per epoch (at least 1)."""
    if batch_size < 1:
        raise ValueError(f"batch_size must be >= 1, got {batch_size}")
    multiple = hosts * accum
    if unit == "rows":
        if batch_size % multiple:
            raise ValueError(f"sft: batch_size={batch_size} rows must be divisible by hosts*grad_accum_steps={multiple}")
        bins = max(batch_size // hosts, 1)
        rows = packed_row_count(examples, seq_len, bins)
        return StepPlan(unit, batch_size, len(examples), rows, max(1, rows // batch_size), batch_size, bins)
    if unit != "dialogues":
        raise ValueError(f"batch_unit must be 'dialogues' or 'rows', got {unit!r}")
    n = len(examples)
    spe = max(1, math.ceil(n / batch_size))
    bins = max(1, math.ceil(batch_size / hosts))
    rows = packed_row_count(examples, seq_len, bins)
    per_step = max(1, math.ceil(rows / spe))
    per_step = math.ceil(per_step / multiple) * multiple
    return StepPlan(unit, batch_size, n, rows, spe, per_step, bins)


def make_evaluator(spec: steps.StepSpec, frozen, rows: list[dict], batch_rows: int, mesh):
    """Teacher-forced loss, token accuracy and latent-token accuracy over packed eval rows."""
    if not rows:
        return None
    fn = jax.jit(lambda trainable, fz, b: steps.eval_step(spec, trainable, fz, b))
    batches = []
    for i in range(0, len(rows), batch_rows):
        chunk = rows[i: i + batch_rows]
        chunk += [{k: np.zeros_like(v) for k, v in rows[0].items()}] * (batch_rows - len(chunk))
        batches.append({k: np.stack([r[k] for r in chunk]) for k in rows[0]})

    def evaluate(state) -> dict:
        tot: dict[str, float] = {}
        for b in batches:
            out = jax.device_get(fn(state["params"], frozen, b))
            for k, v in out.items():
                tot[k] = tot.get(k, 0.0) + float(v)
        res = {"loss": tot["nll"] / max(tot["tokens"], 1), "accuracy": tot["hits"] / max(tot["tokens"], 1)}
        if tot.get("latent_tokens"):
            res["latent_accuracy"] = tot["latent_hits"] / tot["latent_tokens"]
        return res

    return evaluate


def built_source(files, tokenizer, cfg: TrainRunConfig, kind: str) -> BuiltDataset | None:
    """The built dataset (`sage-jax data build`) ``files`` name (a directory), checked against the
    run's tokenizer and settings; None for JSONL files."""
    if not any(Path(f).is_dir() for f in files):
        return None
    ds = open_built(files)
    check_built(ds, expected_settings(kind, tokenizer, cfg.template, cfg.seq_len, cfg.model.latent_tokens))
    print(f"{ds.path}: built dataset, {len(ds)} {kind} records read by index ({ds.meta['counts']})", file=sys.stderr)
    return ds


def load_examples(cfg: SFTConfig, tokenizer):
    """(train, eval) tokenized examples: SAC JSONL read and tokenized in memory, or a built dataset
    whose training records Grain streams (its eval split is the JSONL path's, held in memory)."""
    args = (tokenizer, cfg.template, cfg.seq_len, cfg.model.latent_tokens)

    def in_memory(files, desc):
        ds = built_source(files, tokenizer, cfg, "sft")
        return list(ds) if ds is not None else encode_dialogues(read_dialogues(files, cfg.strict_data), *args, desc)

    built = built_source(cfg.train_files, tokenizer, cfg, "sft")
    if built is not None:
        if cfg.eval_files:
            return built, in_memory(cfg.eval_files, "eval")
        return split_built(built, cfg.eval_fraction, cfg.seed)
    train_d = read_dialogues(cfg.train_files, cfg.strict_data)
    if cfg.eval_files:
        return encode_dialogues(train_d, *args, "train"), in_memory(cfg.eval_files, "eval")
    train_d, eval_d = split_eval(train_d, cfg.eval_fraction, cfg.seed)
    return encode_dialogues(train_d, *args, "train"), encode_dialogues(eval_d, *args, "eval")


def run_sft(cfg: SFTConfig) -> dict:
    """Train; returns a summary (steps, first/last eval, output paths)."""
    if not cfg.train_files:
        raise ValueError("sft: train_files is empty (give SAC JSONL files: train_files=[a.jsonl,b.jsonl])")
    run = prepare_run(cfg.model, cfg.mesh, cfg.output_dir)
    out, mesh, model_cfg, params, tokenizer = run.out, run.mesh, run.model_cfg, run.params, run.tokenizer
    check_run_settings(cfg, out, "sft")

    train_ex, eval_ex = load_examples(cfg, tokenizer)
    if not train_ex:
        raise ValueError("sft: no training examples left after tokenization")

    accum = cfg.optim.grad_accum_steps
    hosts = jax.process_count()
    plan = plan_steps(train_ex, cfg.seq_len, cfg.batch_size, cfg.batch_unit, hosts=hosts, accum=accum)
    host_rows = plan.rows_per_step // hosts
    total = cfg.max_steps or max(1, math.ceil(cfg.epochs * plan.steps_per_epoch))

    spec = steps.StepSpec(model_cfg, lora=cfg.lora, vocab_chunk=cfg.vocab_chunk)
    tx = steps.make_optimizer(cfg.optim, total)
    state, s_shard, frozen, f_shard = init_train_state(spec, tx, params, cfg.seed, mesh)

    data_cfg = DataConfig(seq_len=cfg.seq_len, batch_size=host_rows, seed=cfg.seed, num_epochs=None,
                          num_packing_bins=plan.packing_bins)
    batches = make_iterator(train_ex, data_cfg)
    micro = host_rows // accum
    example = {k: np.zeros((accum, micro * hosts, cfg.seq_len), v) for k, v in
               (("inputs", np.int32), ("targets", np.int32), ("loss_mask", bool), ("segment_ids", np.int32),
                ("positions", np.int32))}
    b_shard = steps.batch_shardings(example, mesh)
    step_fn = steps.compile_step(steps.sft_train_step, spec, tx, state_sharding=s_shard, frozen_sharding=f_shard,
                                 batch_sharding=b_shard)

    def to_device(b: dict) -> dict:
        b = {k: np.asarray(b[k]).reshape((accum, micro) + np.shape(b[k])[1:]) for k in example}
        return to_global(b, b_shard)

    eval_rows = pack_examples(eval_ex, cfg.seq_len, num_packing_bins=8) if eval_ex else []
    evaluate = make_evaluator(spec, frozen, eval_rows, max(1, micro), mesh)
    run_config = {"kind": "sft", "run": to_dict(cfg), "model": dataclasses.asdict(model_cfg),
                  "base_model": str(cfg.model.path)}
    n_params = num_params(params)
    flops = train_flops_per_token(n_params, num_layers=model_cfg.num_layers, seq_len=cfg.seq_len,
                                  hidden=model_cfg.hidden_size, lora=cfg.lora is not None)
    print(f"sft: {len(train_ex)} train / {len(eval_ex)} eval dialogues, {plan.rows_per_epoch} packed rows/epoch, "
          f"batch_unit={cfg.batch_unit}: {plan.describe()}; {total} steps"
          f"{' (max_steps)' if cfg.max_steps else f' ({cfg.epochs:g} epochs)'} of {plan.rows_per_step} rows x "
          f"{cfg.seq_len} tokens, {n_params / 1e6:.1f}M params, mesh {dict(mesh.shape)}", file=sys.stderr)
    state, result = train_loop(
        output_dir=out, state=state, frozen=frozen, step_fn=step_fn, batches=batches, to_device=to_device,
        total_steps=total, evaluate=evaluate, eval_every=cfg.eval_every, save_every=cfg.save_every, keep=cfg.keep,
        run_config=run_config, tokenizer_dir=str(run.tokenizer_dir), tensorboard=cfg.tensorboard,
        tokens_in=lambda b: int(np.count_nonzero(b["segment_ids"])), flops_per_token=flops, log_every=cfg.log_every,
        keep_best=cfg.keep_best)
    summary = {"steps": result.step, "preempted": result.preempted, "evals": result.evals,
               "steps_per_epoch": plan.steps_per_epoch, "rows_per_step": plan.rows_per_step,
               "batch_unit": cfg.batch_unit, "best": result.best,
               "checkpoints": str(out / "checkpoints"), "metrics": str(out / "logs" / "metrics.jsonl")}
    if result.evals:
        first, last = result.evals[0], result.evals[-1]
        print(f"sft: eval loss {first['loss']:.4f} -> {last['loss']:.4f}; latent-token accuracy "
              f"{first.get('latent_accuracy', float('nan')):.4f} -> {last.get('latent_accuracy', float('nan')):.4f}",
              file=sys.stderr)
    return summary
