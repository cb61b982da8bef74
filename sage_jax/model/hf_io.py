"""Hugging Face import/export: safetensors + config.json <-> (ModelConfig, params).

Weights stay in the HF layout, so both directions are renaming, transposing and reshaping only.
Export goes tensor by tensor (a layer slice at a time, fetched from devices) into size-capped
shards, in the parameter dtype, with an index; only process 0 writes.
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any, Iterator

import jax
import jax.numpy as jnp
import numpy as np
from safetensors import safe_open
from safetensors.numpy import save_file

from sage_jax.model.config import ModelConfig
from sage_jax.model.params import Params, param_shapes, unpadded

INDEX_FILE = "model.safetensors.index.json"


def _tensor_map(cfg: ModelConfig) -> Iterator[tuple[str, tuple[str, ...], tuple[int, ...]]]:
    """(HF tensor name, path in our params, index into the stacked leaf) for every tensor.

    The index is () for unstacked leaves, (layer,) or (layer, expert) for stacked ones.
    """
    yield "model.embed_tokens.weight", ("embed",), ()
    for i in range(cfg.num_layers):
        pre = f"model.layers.{i}."
        attn = [
            ("input_layernorm.weight", "attn_norm"),
            ("self_attn.q_proj.weight", "q_proj"),
            ("self_attn.k_proj.weight", "k_proj"),
            ("self_attn.v_proj.weight", "v_proj"),
            ("self_attn.o_proj.weight", "o_proj"),
            ("post_attention_layernorm.weight", "mlp_norm"),
        ]
        if cfg.qkv_bias:
            attn += [(f"self_attn.{n}_proj.bias", f"{n}_bias") for n in "qkv"]
        if cfg.o_bias:
            attn.append(("self_attn.o_proj.bias", "o_bias"))
        if cfg.qk_norm:
            attn += [("self_attn.q_norm.weight", "q_norm"), ("self_attn.k_norm.weight", "k_norm")]
        for hf, ours in attn:
            yield pre + hf, ("layers", ours), (i,)
        if cfg.is_moe:
            yield pre + "block_sparse_moe.gate.weight", ("layers", "router"), (i,)
            for e in range(cfg.num_experts):
                for w, ours in (("w1", "gate_proj"), ("w3", "up_proj"), ("w2", "down_proj")):
                    yield f"{pre}block_sparse_moe.experts.{e}.{w}.weight", ("layers", ours), (i, e)
        else:
            for n in ("gate_proj", "up_proj", "down_proj"):
                yield f"{pre}mlp.{n}.weight", ("layers", n), (i,)
    yield "model.norm.weight", ("final_norm",), ()
    if not cfg.tie_word_embeddings:
        yield "lm_head.weight", ("lm_head",), ()


def _is_matrix(name: str) -> bool:
    """HF stores linear weights [out, in]; ours are [in, ...out] (the embedding is not a linear)."""
    return name.endswith(".weight") and "norm" not in name and "embed_tokens" not in name


def _to_ours(name: str, w: np.ndarray, shape: tuple[int, ...]) -> np.ndarray:
    return (w.T if _is_matrix(name) else w).reshape(shape)


def _to_hf(name: str, w: np.ndarray) -> np.ndarray:
    if _is_matrix(name):
        n_in = 2 if name.endswith("o_proj.weight") else 1  # o_proj is [N, H, D]; others [D, ...]
        return np.ascontiguousarray(w.reshape(int(np.prod(w.shape[:n_in])), -1).T)
    return w if "embed_tokens" in name else w.reshape(-1)


def _get(tree: Params, path: tuple) -> Any:
    for p in path:
        tree = tree[p]
    return tree


# ---- import ---------------------------------------------------------------------------------


def _tensor_files(path: Path) -> dict[str, Path]:
    index = path / INDEX_FILE
    if index.exists():
        weight_map = json.loads(index.read_text())["weight_map"]
        return {name: path / f for name, f in weight_map.items()}
    single = path / "model.safetensors"
    if not single.exists():
        raise FileNotFoundError(f"{path}: no {INDEX_FILE} or model.safetensors (safetensors weights are required)")
    with safe_open(single, "np") as f:
        return {name: single for name in f.keys()}


def load_hf(
    path: str | os.PathLike, *, shardings: Any = None, **cfg_overrides
) -> tuple[ModelConfig, Params]:
    """Read an HF directory into (cfg, params). `cfg_overrides` set ModelConfig fields
    (e.g. param_dtype="bfloat16", dtype="bfloat16"); `shardings`, a pytree of shardings matching
    the params (see sage_jax.parallel), places each array directly on the mesh."""
    path = Path(path)
    config_file = path / "config.json"
    if not config_file.exists():
        raise FileNotFoundError(f"{config_file}: not found (is {path} a Hugging Face model directory?)")
    cfg = ModelConfig.from_hf(json.loads(config_file.read_text()), source=str(config_file), **cfg_overrides)
    files = _tensor_files(path)
    shapes = param_shapes(cfg)
    dtype = jnp.dtype(cfg.param_dtype)
    host = jax.tree.map(lambda s: np.empty(s, dtype), shapes, is_leaf=lambda x: isinstance(x, tuple))
    handles: dict[Path, Any] = {}
    try:
        for name, target, index in _tensor_map(cfg):
            if name not in files:
                raise KeyError(f"{path}: tensor {name!r} missing from the checkpoint (model_type={cfg.family})")
            f = files[name]
            if f not in handles:
                handles[f] = safe_open(f, "np")
            arr = _get(host, target)
            want = arr.shape[len(index):]
            w = handles[f].get_tensor(name)
            try:
                arr[index] = _to_ours(name, w, want).astype(dtype)
            except ValueError as e:
                raise ValueError(f"{f}: tensor {name!r} has shape {w.shape}, expected {want} (transposed)") from e
    finally:
        for h in handles.values():
            h.__exit__(None, None, None)
    if shardings is None:
        params = jax.tree.map(jnp.asarray, host)
    else:
        params = jax.tree.map(jax.device_put, host, shardings)
    return cfg, params


# ---- export ---------------------------------------------------------------------------------


def _fetch(x: jax.Array) -> np.ndarray:
    if isinstance(x, jax.Array) and not x.is_fully_addressable:
        from jax.experimental import multihost_utils

        return np.asarray(multihost_utils.process_allgather(x, tiled=True))
    return np.asarray(jax.device_get(x))


def save_hf(
    path: str | os.PathLike,
    cfg: ModelConfig,
    params: Params,
    tokenizer: Any = None,
    *,
    max_shard_bytes: int = 2 * 1024**3,
) -> Path:
    """Write `path` as an HF directory that `AutoModelForCausalLM.from_pretrained` loads as is."""
    path = Path(path)
    params = unpadded(cfg, params)
    writer = jax.process_index() == 0
    itemsize = jnp.dtype(cfg.param_dtype).itemsize
    entries = list(_tensor_map(cfg))

    # Plan the shards from shapes alone, then fill one shard at a time.
    shard_of, sizes, current, bytes_in = [], [], 0, 0
    for _, target, index in entries:
        nbytes = int(np.prod(_get(params, target).shape[len(index):])) * itemsize
        if bytes_in and bytes_in + nbytes > max_shard_bytes:
            sizes.append(bytes_in)
            current, bytes_in = current + 1, 0
        shard_of.append(current)
        bytes_in += nbytes
    sizes.append(bytes_in)
    n = len(sizes)
    names = [f"model-{k + 1:05d}-of-{n:05d}.safetensors" for k in range(n)]

    if writer:
        path.mkdir(parents=True, exist_ok=True)
    weight_map: dict[str, str] = {}
    shard: dict[str, np.ndarray] = {}
    for j, (name, target, index) in enumerate(entries):
        w = _get(params, target)
        w = w[index] if index else w
        shard[name] = _to_hf(name, _fetch(w.astype(cfg.param_dtype)))
        weight_map[name] = names[shard_of[j]]
        if j + 1 == len(entries) or shard_of[j + 1] != shard_of[j]:
            if writer:
                save_file(shard, str(path / names[shard_of[j]]), metadata={"format": "pt"})
            shard = {}
    if writer:
        index = {"metadata": {"total_size": sum(sizes)}, "weight_map": weight_map}
        (path / INDEX_FILE).write_text(json.dumps(index, indent=2) + "\n")
        (path / "config.json").write_text(json.dumps(cfg.to_hf(), indent=2) + "\n")
        gen = {k: v for k, v in cfg.to_hf().items() if k in ("bos_token_id", "eos_token_id", "pad_token_id")}
        (path / "generation_config.json").write_text(json.dumps(gen, indent=2) + "\n")
        if tokenizer is not None:
            tokenizer.save_pretrained(str(path))
    return path
