"""The one way to load a model: a spec -> (ModelConfig, params, tokenizer, name).

A spec is ``smollm2`` (the built-in SmolLM2-135M-Instruct), a Hugging Face model directory, or
the output directory of a training run (``sage-jax sft``/``dpo``, with LoRA adapters merged into
the base model they were trained on). Rollouts, the judge, evaluation, serving and export all
load through here, so none of them imports the trainer.

**Which checkpoint of a run.** By default the best one by validation loss when the run recorded
one (``<run>/best.json``, written by a ``keep_best`` run: DPO by default, as the reference keeps
its best checkpoint), else the latest; the choice and its reason are printed. A spec may name it:
``runs/dpo@best``, ``runs/dpo@latest`` or ``runs/dpo@200`` (a step), as may ``step=`` (an int,
``"best"`` or ``"latest"``).

The run-directory part reads, read-only, what train/checkpoint.py writes under
``<run>/checkpoints/<step>/``: the ``config`` item (JSON: ``{"model": ModelConfig fields,
"run": the run config}``) and the ``params`` entry of the ``state`` item (the full params, or the
LoRA adapters), restored on its own (the optimizer state is never read). The run's tokenizer is
``<run>/tokenizer``.
"""

from __future__ import annotations

import dataclasses
import json
import os
import sys
from pathlib import Path
from typing import Any, NamedTuple

import jax

from sage_jax.model import (LoraConfig, ModelConfig, RopeConfig, grow_vocab, init_lora, load_hf, merge_lora,
                            param_shapes)

# The run layout train/checkpoint.py writes (its STATE and CONFIG item names); best.json is the
# trainer's record of the best evaluation ({"step", "metric", "value"}, keep_best runs).
CHECKPOINTS, STATE_ITEM, CONFIG_ITEM, TOKENIZER_DIR = "checkpoints", "state", "config", "tokenizer"
BEST_FILE = "best.json"
CHOICES = ("best", "latest")


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


class Loaded(NamedTuple):
    cfg: ModelConfig
    params: Any
    tokenizer: Any
    name: str  # the directory's name, or ``<run>@<step>``


def is_run_dir(path: str | os.PathLike) -> bool:
    return (Path(path) / CHECKPOINTS).is_dir()


def resolve_model_path(path: str) -> Path:
    """``smollm2`` -> its cached HF directory (converted on first use); an HF directory as is."""
    if path == "smollm2":
        from sage_jax.model.smollm2 import fetch_smollm2

        return fetch_smollm2()
    p = Path(path)
    if not (p / "config.json").exists():
        raise FileNotFoundError(f"model path {path!r}: no config.json (an HF directory or 'smollm2' expected)")
    return p


def load_base(spec: ModelSpec, special_tokens: tuple[str, ...] = ()):
    """(ModelConfig, params, tokenizer) of a base model, with ``special_tokens`` added to the
    tokenizer (and the vocabulary grown) when ``spec.latent_tokens``."""
    from transformers import AutoTokenizer

    path = resolve_model_path(spec.path)
    tokenizer = AutoTokenizer.from_pretrained(path)
    cfg, params = load_hf(path, param_dtype=spec.param_dtype, dtype=spec.dtype, remat=spec.remat)
    if spec.latent_tokens and special_tokens:
        tokenizer.add_special_tokens({"additional_special_tokens": list(special_tokens)})
        if len(tokenizer) > cfg.vocab_size:
            cfg, params = grow_vocab(cfg, params, len(tokenizer), pad_to_multiple_of=spec.vocab_multiple)
    return cfg, params, tokenizer


def model_config_from_dict(d: dict) -> ModelConfig:
    """A ModelConfig from its ``dataclasses.asdict`` JSON (as stored with a checkpoint)."""
    d = dict(d)
    d["rope"] = RopeConfig(**d["rope"])
    for k in ("layer_types", "eos_token_id"):
        if isinstance(d.get(k), list):
            d[k] = tuple(d[k])
    return ModelConfig(**d)


def _manager(run_dir: Path):
    import orbax.checkpoint as ocp

    directory = os.path.abspath(run_dir / CHECKPOINTS)  # Orbax needs absolute paths
    return ocp, ocp.CheckpointManager(directory, options=ocp.CheckpointManagerOptions(read_only=True, create=False))


def read_best(run_dir: str | os.PathLike) -> dict | None:
    """``<run>/best.json`` (``{"step", "metric", "value"}``) or ``None`` when the run has none."""
    path = Path(run_dir) / BEST_FILE
    try:
        rec = json.loads(path.read_text())
    except FileNotFoundError:
        return None
    except ValueError as e:
        raise ValueError(f"{path}: not valid JSON: {e}") from None
    if not isinstance(rec, dict) or not isinstance(rec.get("step"), int):
        raise ValueError(f"{path}: expected {{\"step\": int, \"metric\": ..., \"value\": ...}}, got {rec!r}")
    return rec


def _as_step(step: int | str | None) -> int | str | None:
    """``None``, ``"best"``, ``"latest"`` or an int (also given as a string of digits)."""
    if step is None or (isinstance(step, int) and not isinstance(step, bool)):
        return step
    if isinstance(step, str):
        if step in CHOICES:
            return step
        if step.strip().isdigit():
            return int(step)
    raise ValueError(f"checkpoint step must be an integer, 'best' or 'latest', got {step!r}")


def choose_step(run_dir: str | os.PathLike, steps: list[int], step: int | str | None = None,
                *, say=None) -> int:
    """The checkpoint step to load from a run with finished ``steps`` (ascending): ``step`` as given;
    ``"latest"``: the newest; ``"best"``: best.json's (an error when the run recorded none);
    ``None``: best.json's when the run recorded one and that checkpoint exists, else the newest.
    ``say`` (default: print to stderr) gets one line naming the step and why."""
    say = say or (lambda m: print(m, file=sys.stderr))
    run_dir = Path(run_dir)
    step = _as_step(step)
    if not steps:
        raise FileNotFoundError(f"{run_dir}/{CHECKPOINTS}: no finished checkpoint")
    if isinstance(step, int):
        if step not in steps:
            raise FileNotFoundError(f"{run_dir}/{CHECKPOINTS}: no finished checkpoint for step {step} (have {steps})")
        return step
    if step == "latest":
        say(f"load {run_dir}: step {steps[-1]}, the latest checkpoint (asked for latest)")
        return steps[-1]
    best = read_best(run_dir)
    if best is not None and best["step"] in steps:
        say(f"load {run_dir}: step {best['step']}, the best by validation {best.get('metric', 'loss')} "
            f"({best.get('value')}, {BEST_FILE}); the latest is {steps[-1]}")
        return int(best["step"])
    if step == "best":
        why = "it recorded none" if best is None else f"its step {best['step']} has no finished checkpoint"
        raise FileNotFoundError(f"{run_dir}: no best checkpoint to load ({BEST_FILE}: {why}; have {steps})")
    if best is not None:
        say(f"load {run_dir}: step {steps[-1]}, the latest checkpoint ({BEST_FILE} names step {best['step']}, "
            "which has no finished checkpoint)")
    else:
        say(f"load {run_dir}: step {steps[-1]}, the latest checkpoint (the run recorded no best)")
    return steps[-1]


def split_spec(spec: str | os.PathLike) -> tuple[str, int | str | None]:
    """``runs/dpo@best`` -> (``runs/dpo``, ``"best"``); ``runs/m1@200`` -> (``runs/m1``, 200); a spec
    without ``@``, or whose whole text is an existing path, -> (spec, None)."""
    text = str(spec)
    if "@" not in text or Path(text).exists():
        return text, None
    path, _, tail = text.rpartition("@")
    if tail in CHOICES or tail.isdigit():
        return path, _as_step(tail)
    return text, None


def load_run(run_dir: str | os.PathLike, step: int | str | None = None):
    """The model a run trained: (ModelConfig, params with LoRA merged, tokenizer dir, step).

    ``step``: a checkpoint step, ``"best"``, ``"latest"`` or ``None`` (the best one when the run
    recorded one in best.json, else the latest; see :func:`choose_step`).
    LoRA runs rebuild the base model from the run's stored ``model`` spec (its vocabulary grown to
    the trained one) and merge the adapters. Works on a directory a trainer is still writing to
    (read-only: only finished checkpoints are seen)."""
    from sage_jax.config import from_dict

    run_dir = Path(run_dir)
    ocp, mngr = _manager(run_dir)
    try:
        steps = sorted(int(s) for s in mngr.all_steps())
        step = choose_step(run_dir, steps, step)
        if not (Path(mngr.directory) / str(step) / CONFIG_ITEM).exists():
            raise ValueError(f"{run_dir}/{CHECKPOINTS}/{step}: no run config stored with the checkpoint")
        conf = dict(mngr.restore(step, args=ocp.args.Composite(**{CONFIG_ITEM: ocp.args.JsonRestore()}))[CONFIG_ITEM])
        if "model" not in conf:
            raise ValueError(f"{run_dir}/{CHECKPOINTS}/{step}: the stored run config has no model")
        run = conf.get("run", {})
        model_cfg = model_config_from_dict(conf["model"])
        lora = from_dict(LoraConfig, run["lora"]) if run.get("lora") else None
        if lora is None:
            abstract = jax.tree.map(lambda s: jax.ShapeDtypeStruct(s, model_cfg.param_dtype), param_shapes(model_cfg),
                                    is_leaf=lambda x: isinstance(x, tuple))
        else:
            abstract = jax.eval_shape(lambda: init_lora(model_cfg, lora, jax.random.key(0)))
        device = jax.sharding.SingleDeviceSharding(jax.local_devices()[0])  # this host's own device
        abstract = jax.tree.map(lambda a: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=device), abstract)
        item = {"params": abstract}
        restore = ocp.args.PyTreeRestore(item=item, restore_args=ocp.checkpoint_utils.construct_restore_args(item),
                                         partial_restore=True)
        trained = mngr.restore(step, args=ocp.args.Composite(**{STATE_ITEM: restore}))[STATE_ITEM]["params"]
    finally:
        mngr.close()
    if lora is None:
        return model_cfg, trained, run_dir / TOKENIZER_DIR, step
    spec = from_dict(ModelSpec, run["model"])
    base_cfg, base = load_hf(resolve_model_path(spec.path), param_dtype=spec.param_dtype, dtype=spec.dtype,
                             remat=spec.remat)
    if model_cfg.vocab_size > base_cfg.vocab_size:  # latent special tokens were added for the run
        base_cfg, base = grow_vocab(base_cfg, base, model_cfg.vocab_size, pad_to_multiple_of=spec.vocab_multiple)
    if base_cfg.embed_rows != model_cfg.embed_rows:
        raise ValueError(f"{run_dir}: base model vocabulary {base_cfg.embed_rows} != trained {model_cfg.embed_rows}")
    return model_cfg, merge_lora(base, trained, lora), run_dir / TOKENIZER_DIR, step


def load(spec: str | os.PathLike, *, step: int | str | None = None, dtype: str | None = None) -> Loaded:
    """``smollm2``, an HF directory or a run directory (``RUN``, ``RUN@best``, ``RUN@latest``,
    ``RUN@STEP``) -> :class:`Loaded` (cfg, params, tokenizer, name). ``step`` picks a run's
    checkpoint (default: the best recorded, else the latest; see :func:`choose_step`); ``dtype``
    overrides the compute dtype."""
    from transformers import AutoTokenizer

    path, at = split_spec(spec)
    if at is not None and is_run_dir(path):
        if step is not None and _as_step(step) != at:
            raise ValueError(f"model {str(spec)!r}: names checkpoint {at!r} but step={step!r} was given too")
        spec, step = path, at
    p = Path(spec)
    if is_run_dir(p):
        cfg, params, tok_dir, step = load_run(p, step)
        name = f"{p.name}@{step}"
    else:
        if step is not None:
            raise ValueError(f"model {str(spec)!r}: step={step} needs a training run directory")
        tok_dir = resolve_model_path(str(spec))
        cfg, params = load_hf(tok_dir)
        name = Path(tok_dir).name
    if dtype is not None:
        cfg = cfg.replace(dtype=dtype)
    return Loaded(cfg, params, AutoTokenizer.from_pretrained(tok_dir), name)
