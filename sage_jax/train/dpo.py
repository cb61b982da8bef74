"""DPO on the tree search's preference pairs (the paper's last stage), with an SFT term ("ftx").

    sage-jax dpo train_files=[runs/search/pairs.jsonl] model.path=runs/m3_hf output_dir=runs/dpo

Chosen and rejected run in one forward; reference log-probs come from the frozen starting model
(the LoRA base, or the initial weights for full fine-tuning), computed once before training and
cached in output_dir (keyed by the model's identity and the encoded pairs, written atomically).
Defaults: sigmoid loss, beta 0.1, ftx 1.0, LoRA q/v r=8, lr 1e-5 cosine
with 20 warmup steps, 3 epochs, batch 8 pairs per device (paper), max length 4096, evaluation every
100 steps keeping the best checkpoint by validation loss (``keep_best``: ``best.json``, restored by
the run-directory loader, so export, search, eval and the loop use it). Pairs are not packed (one
pair per row), so ``batch_size`` counts pairs and an epoch is ceil(pairs / batch_size) steps, as in
the reference.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import logging
import math
import os
import sys
from collections.abc import Mapping
from pathlib import Path

import grain
import jax
import numpy as np

from sage_jax.config import to_dict
from sage_jax.data.build import BuiltDataset, pair_row, split_built
from sage_jax.data.encode import split_eval
from sage_jax.data.pairs import PreferencePair, last_turn_only, read_pairs
from sage_jax.data.tokenize import encode_dialogue
from sage_jax.model import num_params
from sage_jax.model.loader import ModelSpec, resolve_model_path
from sage_jax.train import steps
from sage_jax.train.metrics import train_flops_per_token
from sage_jax.train.losses import DPOConfig
from sage_jax.train.sft import TrainRunConfig, built_source
from sage_jax.train.trainer import check_run_settings, init_train_state, prepare_run, to_global, train_loop

log = logging.getLogger(__name__)
ROW = ("inputs", "targets", "loss_mask", "segment_ids", "positions")


@dataclasses.dataclass(frozen=True)
class DPORunConfig(TrainRunConfig):
    """DPO on preference pairs (`train_files`: pairs JSONL); the paper's DPO recipe as defaults."""

    output_dir: str = "runs/dpo"
    seq_len: int = 4096
    batch_size: int = 64  # global pairs per optimizer step (8 per device x 8 devices in the paper)
    dpo: DPOConfig = DPOConfig()
    optim: steps.OptimConfig = steps.OptimConfig(learning_rate=1e-5, warmup_steps=20)
    keep_best: bool = True  # the reference keeps the best checkpoint by validation loss


def _row(dialogue, tokenizer, template, seq_len, latent_tokens) -> dict | None:
    """One branch as a right-padded [seq_len] row supervising only its final assistant turn."""
    from sage_jax.sac import DEFAULT_SCHEMA, to_messages

    enc = encode_dialogue(to_messages(dialogue, DEFAULT_SCHEMA, special_tokens=latent_tokens), tokenizer,
                          template=template)
    if enc is None or len(enc.tokens) > seq_len + 1:
        return None
    return pair_row(enc.tokens, last_turn_only(enc.loss_mask), seq_len)


def encode_pairs(pairs: list[PreferencePair], tokenizer, template, seq_len, latent_tokens, desc) -> list[dict]:
    out, dropped = [], 0
    for p in pairs:
        c = _row(p.chosen, tokenizer, template, seq_len, latent_tokens)
        r = _row(p.rejected, tokenizer, template, seq_len, latent_tokens)
        if c is None or r is None:
            dropped += 1
            continue
        out.append({"id": p.id, "chosen": c, "rejected": r})
    print(f"{desc}: {len(out)}/{len(pairs)} pairs encoded, {dropped} dropped (longer than seq_len={seq_len})",
          file=sys.stderr)
    return out


def _built_rows(record: dict, seq_len: int) -> dict:
    """The chosen and rejected rows of one decoded built pair record."""
    return {s: pair_row(record[s]["tokens"], record[s]["loss_mask"], seq_len) for s in ("chosen", "rejected")}


def _pair_dicts(records: list[dict], seq_len: int) -> list[dict]:
    """Decoded built pair records -> the pair dicts :func:`encode_pairs` makes."""
    return [{"id": str(r["index"]), **_built_rows(r, seq_len)} for r in records]


def model_identity(model: ModelSpec, model_cfg) -> dict:
    """What the reference log-probs depend on besides the rows: the model spec, the resolved model
    directory and its files' sizes and modification times (a re-exported model counts as new), the
    model config."""
    path = resolve_model_path(model.path)
    files = {p.name: [p.stat().st_size, p.stat().st_mtime_ns] for p in sorted(Path(path).iterdir()) if p.is_file()}
    return {"spec": dataclasses.asdict(model), "path": os.path.realpath(path), "files": files,
            "config": dataclasses.asdict(model_cfg)}


def reference_key(pairs, model: Mapping) -> str:
    """The cache key of reference log-probs: the model's identity and every row's tokens and mask."""
    key = hashlib.sha256(json.dumps(model, sort_keys=True, default=str).encode())
    for i in range(len(pairs)):
        p = pairs[i]
        for side in ("chosen", "rejected"):
            key.update(p[side]["inputs"].tobytes())
            key.update(p[side]["loss_mask"].tobytes())
    return key.hexdigest()[:16]


def _save_atomic(path: Path, array: np.ndarray) -> None:
    """``np.save`` to a temporary name, then rename: a kill mid-write never leaves a truncated cache."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp{os.getpid()}")
    with open(tmp, "wb") as f:
        np.save(f, array)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)


def _row_batches(pairs, batch: int):
    """The rows [chosen, rejected, chosen, ...] of ``pairs`` in batches of ``batch`` (even), streamed."""
    rows = []
    for i in range(len(pairs)):
        p = pairs[i]
        rows += [p["chosen"], p["rejected"]]
        if len(rows) == batch:
            yield rows
            rows = []
    if rows:
        yield rows


def reference_logps(spec: steps.StepSpec, trainable, frozen, pairs, batch: int, cache: Path,
                    model: Mapping | None = None) -> np.ndarray:
    """Fill pair["ref_chosen"/"ref_rejected"] from the frozen starting model, cached on disk
    (keyed by ``model``, :func:`model_identity`, and the pairs' content; written atomically), so a
    resumed run never recomputes them and another model or data never reuses them. ``pairs``: a
    list of pair dicts (filled in), or a :class:`BuiltPairs` (streamed, given the values). Returns
    them ([pairs, 2])."""
    path = cache / f"reference_logps_{reference_key(pairs, model or {})}.npy"
    if path.exists():
        ref = np.load(path)
        log.info("dpo: reference log-probs from %s", path)
    else:
        fn = jax.jit(lambda t, fz, b: steps.sequence_logprobs(spec, t, fz, b)[0])
        batch += batch % 2  # whole pairs per batch, so the rows stream pair by pair
        vals = []
        for chunk in _row_batches(pairs, batch):
            n = len(chunk)
            chunk = chunk + [chunk[0]] * (batch - n)
            stacked = {k: np.stack([r[k] for r in chunk]) for k in ROW}
            vals.append(np.asarray(fn(trainable, frozen, stacked))[:n])
        ref = np.concatenate(vals).reshape(len(pairs), 2)
        if jax.process_index() == 0:
            _save_atomic(path, ref)
    if isinstance(pairs, BuiltPairs):
        pairs.ref = ref
    else:
        for p, (c, r) in zip(pairs, ref):
            p["ref_chosen"], p["ref_rejected"] = np.float32(c), np.float32(r)
    return ref


class BuiltPairs:
    """A built DPO dataset (`sage-jax data build kind=dpo`) as padded pair rows, read by index
    (never all in memory); with ``ref`` set, each item also carries its reference log-probs."""

    def __init__(self, ds: BuiltDataset, seq_len: int):
        self.ds, self.seq_len, self.ref = ds, seq_len, None

    def __len__(self) -> int:
        return len(self.ds)

    def __getitem__(self, i) -> dict:
        out = _built_rows(self.ds[i], self.seq_len)
        if self.ref is not None:
            out["ref_chosen"], out["ref_rejected"] = np.float32(self.ref[i, 0]), np.float32(self.ref[i, 1])
        return out


def pair_iterator(pairs, host_batch: int, seed: int) -> grain.DatasetIterator:
    """Shuffled (reseeded per epoch), host-sharded, repeated batches of pairs; checkpointable."""
    records = pairs if isinstance(pairs, BuiltPairs) else [
        {"chosen": p["chosen"], "rejected": p["rejected"], "ref_chosen": p["ref_chosen"],
         "ref_rejected": p["ref_rejected"]} for p in pairs]
    ds = grain.MapDataset.source(records)[jax.process_index():: jax.process_count()]
    ds = ds.shuffle(seed=seed).repeat(None).batch(host_batch, drop_remainder=True)
    return iter(ds.to_iter_dataset(grain.ReadOptions(num_threads=0)))


def make_pair_evaluator(spec, dpo: DPOConfig, frozen, pairs: list[dict], batch: int):
    """Validation DPO loss, reward accuracy and margins, averaged over all eval pairs."""
    if not pairs:
        return None
    fn = jax.jit(lambda t, fz, b: steps.dpo_pair_loss(spec, dpo, t, fz, b))
    batches = []
    for i in range(0, len(pairs), batch):
        chunk = pairs[i: i + batch]
        batches.append((len(chunk), {
            "chosen": {k: np.stack([p["chosen"][k] for p in chunk]) for k in ROW},
            "rejected": {k: np.stack([p["rejected"][k] for p in chunk]) for k in ROW},
            "ref_chosen": np.stack([p["ref_chosen"] for p in chunk]),
            "ref_rejected": np.stack([p["ref_rejected"] for p in chunk])}))

    def evaluate(state) -> dict:
        tot: dict[str, float] = {}
        for n, b in batches:
            loss, metrics = jax.device_get(fn(state["params"], frozen, b))
            for k, v in {"loss": loss, **metrics}.items():
                tot[k] = tot.get(k, 0.0) + float(v) * n
        return {k: v / len(pairs) for k, v in tot.items()}

    return evaluate


def run_dpo(cfg: DPORunConfig) -> dict:
    if not cfg.train_files:
        raise ValueError("dpo: train_files is empty (give preference-pair JSONL files)")
    run = prepare_run(cfg.model, cfg.mesh, cfg.output_dir)
    out, mesh, model_cfg, params, tokenizer = run.out, run.mesh, run.model_cfg, run.params, run.tokenizer
    check_run_settings(cfg, out, "dpo")

    def read(files):
        pairs = []
        for f in files:
            got, report = read_pairs(f, strict=cfg.strict_data)
            if report.skipped:
                print(report.summary(5), file=sys.stderr)
            pairs += got
        return pairs

    args = (tokenizer, cfg.template, cfg.seq_len, cfg.model.latent_tokens)
    built, built_eval = built_source(cfg.train_files, tokenizer, cfg, "dpo"), None
    if cfg.eval_files:
        built_eval = built_source(cfg.eval_files, tokenizer, cfg, "dpo")
        eval_x = _pair_dicts(list(built_eval), cfg.seq_len) if built_eval is not None else encode_pairs(
            read(cfg.eval_files), *args, "eval")
    if built is not None:  # streamed by index; the eval split (the JSONL path's) in memory
        train_b = built
        if not cfg.eval_files:
            train_b, held = split_built(built, cfg.eval_fraction, cfg.seed)
            eval_x = _pair_dicts(held, cfg.seq_len)
        train_x = BuiltPairs(train_b, cfg.seq_len)
    else:
        train_p = read(cfg.train_files)
        if not cfg.eval_files:
            train_p, eval_p = split_eval(train_p, cfg.eval_fraction, cfg.seed)
            eval_x = encode_pairs(eval_p, *args, "eval")
        train_x = encode_pairs(train_p, *args, "train")
    if not train_x:
        raise ValueError("dpo: no training pairs left after tokenization")

    accum, hosts = cfg.optim.grad_accum_steps, jax.process_count()
    if cfg.batch_size % (hosts * accum):
        raise ValueError(f"dpo: batch_size={cfg.batch_size} must be divisible by hosts*grad_accum_steps")
    host_batch = cfg.batch_size // hosts
    micro = host_batch // accum
    steps_per_epoch = max(1, math.ceil(len(train_x) / cfg.batch_size))
    total = cfg.max_steps or max(1, math.ceil(cfg.epochs * len(train_x) / cfg.batch_size))

    spec = steps.StepSpec(model_cfg, lora=cfg.lora, vocab_chunk=cfg.vocab_chunk)
    tx = steps.make_optimizer(cfg.optim, total)
    state, s_shard, frozen, f_shard = init_train_state(spec, tx, params, cfg.seed, mesh)
    # The reference is the starting policy (LoRA: b = 0, so adapters + base = the base model).
    ref_batch = max(2, 2 * micro)
    identity = model_identity(cfg.model, model_cfg)
    for pairs in (train_x, eval_x):
        if pairs:
            reference_logps(spec, state["params"], frozen, pairs, ref_batch, out, identity)
    rows = {k: np.zeros((accum, micro * hosts, cfg.seq_len), np.int32) for k in ROW}
    example = {"chosen": rows, "rejected": rows, "ref_chosen": np.zeros((accum, micro * hosts), np.float32),
               "ref_rejected": np.zeros((accum, micro * hosts), np.float32)}
    b_shard = steps.batch_shardings(example, mesh)
    step_fn = steps.compile_step(steps.dpo_train_step, spec, cfg.dpo, tx, state_sharding=s_shard,
                                 frozen_sharding=f_shard, batch_sharding=b_shard)

    def to_device(b: dict) -> dict:
        shaped = jax.tree.map(lambda x: np.asarray(x).reshape((accum, micro) + np.shape(x)[1:]), b)
        return to_global(shaped, b_shard)

    evaluate = make_pair_evaluator(spec, cfg.dpo, frozen, eval_x, max(1, micro))
    run_config = {"kind": "dpo", "run": to_dict(cfg), "model": dataclasses.asdict(model_cfg),
                  "base_model": str(cfg.model.path)}
    n_params = num_params(params)
    best_note = ", keeping the best by validation loss" if cfg.keep_best and evaluate is not None else ""
    print(f"dpo: {len(train_x)} train / {len(eval_x)} eval pairs, {steps_per_epoch} steps/epoch; {total} steps of "
          f"{cfg.batch_size} pairs{best_note}, "
          f"{n_params / 1e6:.1f}M params, mesh {dict(mesh.shape)}", file=sys.stderr)
    state, result = train_loop(
        output_dir=out, state=state, frozen=frozen, step_fn=step_fn, batches=pair_iterator(train_x, host_batch, cfg.seed),
        to_device=to_device, total_steps=total, evaluate=evaluate, eval_every=cfg.eval_every,
        save_every=cfg.save_every, keep=cfg.keep, run_config=run_config, tokenizer_dir=str(run.tokenizer_dir),
        tokens_in=lambda b: int(np.count_nonzero(b["chosen"]["segment_ids"]) + np.count_nonzero(b["rejected"]["segment_ids"])),
        flops_per_token=train_flops_per_token(n_params, num_layers=model_cfg.num_layers, seq_len=cfg.seq_len,
                                              hidden=model_cfg.hidden_size, lora=cfg.lora is not None),
        tensorboard=cfg.tensorboard, log_every=cfg.log_every, keep_best=cfg.keep_best)
    return {"steps": result.step, "preempted": result.preempted, "evals": result.evals, "best": result.best,
            "steps_per_epoch": steps_per_epoch,
            "checkpoints": str(out / "checkpoints"), "metrics": str(out / "logs" / "metrics.jsonl")}
