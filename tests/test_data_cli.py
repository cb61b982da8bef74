"""`sage-jax data convert|stats` and `sage-jax mix` through `register`, and the shipped sample."""

import argparse
import json
import re
from pathlib import Path

import pytest

from sage_jax.data.cli import register
from sage_jax.data.jsonl import RecordError, read_sac
from sage_jax.data.sample import SAMPLE_DIR, SAMPLES, build_sample, sample_path
from sage_jax.sac import DEFAULT_SCHEMA, check_dialogue, to_messages

DATA = Path(__file__).resolve().parents[1].parent / "shared" / "data"
README_COUNTS = {"ed": {"train": 19541, "valid": 2770, "test": 2547},
                 "esconv": {"train": 910, "valid": 195, "test": 195},
                 "dailydialog": {"train": 11117, "valid": 1000, "test": 1000}}  # + 1 misaligned, skipped


def need(rel: str) -> Path:
    path = DATA / rel
    if not path.exists():
        pytest.skip(f"shared corpus not found at {path}")
    return path


def run(*argv) -> int:
    parser = argparse.ArgumentParser(prog="sage-jax")
    register(parser.add_subparsers(dest="command", required=True))
    args = parser.parse_args([str(a) for a in argv])
    return args.func(args)


def stats_json(capsys, *argv) -> dict:
    capsys.readouterr()
    assert run("data", "stats", *argv, "--json", "--no-progress") == 0
    return json.loads(capsys.readouterr().out)


def ed_line(conv_id, roles=("speaker", "listener")):
    return json.dumps({"conv_id": conv_id, "emotion": "sad", "situation": "s", "turns": [
        {"role": r, "text": f"t{i}", "ei_auto_label": "neutral"} for i, r in enumerate(roles)]})


def test_register_adds_data_and_mix(capsys):
    import yaml

    from sage_jax.config import ConfigError

    def resolved(*argv):
        capsys.readouterr()
        assert run(*argv, "--print-config") == 0
        return yaml.safe_load(capsys.readouterr().out)

    # the documented flags and positionals are shorthands for config fields; key=value anywhere
    assert resolved("data", "convert", "-f", "ed", "in", "-o", "out", "strict=true") == {
        "format": "ed", "input": "in", "output": "out", "strict": True, "progress": True}
    assert resolved("mix", "seed=7", "spec.yaml", "-o", "o", "--blend", "--no-progress") == {
        "spec": "spec.yaml", "output": "o", "seed": 7, "blend": True, "strict": False, "progress": False}
    assert resolved("mix", "spec.yaml", "--seed", "3", "seed=4")["seed"] == 4  # key=value wins over a flag
    with pytest.raises(ConfigError, match="format"):
        run("data", "convert", "-f", "csv", "in", "-o", "out")


def test_convert_reports_skips_and_strict_stops(tmp_path, capsys):
    src = tmp_path / "ed_train.jsonl"
    src.write_text("\n".join([ed_line("a"), ed_line("b", ("listener", "speaker")), "nope", ed_line("c")]) + "\n")
    out = tmp_path / "out.jsonl"
    assert run("data", "convert", "--format", "ed", src, "-o", out, "--no-progress") == 0
    captured = capsys.readouterr()
    assert "wrote 2 dialogues" in captured.out
    assert "4 records, 2 converted, 2 skipped" in captured.err
    assert f"{src}:2: turns[0].role" in captured.err and f"{src}:3: <json>" in captured.err
    dialogues, report = read_sac(out, strict=True)
    assert [d.id for d in dialogues] == ["ed_a", "ed_c"]
    strict_out = tmp_path / "strict.jsonl"
    with pytest.raises(RecordError, match=r"ed_train\.jsonl:2: turns\[0\]\.role"):
        run("data", "convert", "-f", "ed", src, "-o", strict_out, "--strict", "--no-progress")
    assert not strict_out.exists() and not (tmp_path / "strict.jsonl.tmp").exists()


def test_stats_of_a_sac_file(tmp_path, capsys):
    s = stats_json(capsys, sample_path("esconv_train_100.jsonl"))
    assert s["dialogues"] == 100 and s["splits"] == {"train": 100} and s["read"]["skipped"] == 0
    assert s["labels"]["a_motivation"]["distinct"] == 8  # the 8 ESConv strategies
    assert s["labels"]["u_motivation"]["top"] == {"null": s["user_turns"]}
    assert sum(s["turn_histogram"].values()) == 100 and s["tokens"] is None
    capsys.readouterr()
    assert run("data", "stats", sample_path("ed_train_200.jsonl"), "--no-progress") == 0
    text = capsys.readouterr().out
    assert "dialogues: 200" in text and "u_emotion: 32 distinct" in text


def _tiny_tokenizer(path: Path) -> Path:
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    tk = Tokenizer(models.WordLevel(vocab={"[UNK]": 0}, unk_token="[UNK]"))
    tk.pre_tokenizer = pre_tokenizers.Whitespace()  # one token per \w+ or [^\w\s]+ run
    fast = PreTrainedTokenizerFast(tokenizer_object=tk, unk_token="[UNK]")
    fast.chat_template = "{% for m in messages %}<{{ m['role'] }}> {{ m['content'] }}\n{% endfor %}"
    fast.save_pretrained(path)
    return path


def _expected_tokens(d, special: bool) -> int:
    text = "".join(f"<{m['role']}> {m['content']}\n" for m in to_messages(d, special_tokens=special))
    n_latent = 0
    if special:  # each latent token is one token instead of 3 regex runs (<| name |>)
        n_latent = sum(text.count(t) for t in DEFAULT_SCHEMA.special_tokens())
        for t in DEFAULT_SCHEMA.special_tokens():
            text = text.replace(t, " ")
    return len(re.findall(r"\w+|[^\w\s]+", text)) + n_latent


@pytest.mark.parametrize("special", [False, True])
def test_stats_token_lengths_and_truncation(tmp_path, capsys, special):
    tok = _tiny_tokenizer(tmp_path / "tok")
    path = sample_path("ed_train_200.jsonl")
    dialogues, _ = read_sac(path)
    expected = sorted(_expected_tokens(d, special) for d in dialogues)
    max_len = expected[150]
    flags = ["--special-tokens"] if special else []
    s = stats_json(capsys, path, "--tokenizer", tok, "--max-len", max_len, *flags)
    t = s["tokens"]
    assert (t["lengths"]["min"], t["lengths"]["max"], t["lengths"]["n"]) == (expected[0], expected[-1], 200)
    assert t["over_max_len"] == sum(n > max_len for n in expected) == t["by_split_over"]["train"]
    with pytest.raises(ValueError, match="--max-len needs --tokenizer"):
        run("data", "stats", path, "--max-len", "5")


def test_mix_cli_deterministic(tmp_path, capsys):
    spec = tmp_path / "mix.yaml"
    spec.write_text("ed: {path: 'sample:ed_train_200.jsonl', size: 40}\n"
                    f"esconv: {{path: '{sample_path('esconv_train_100.jsonl')}', size: 10, prompt: ''}}\n")
    outs = {}
    for name, seed in (("a", 5), ("b", 5), ("c", 6)):
        outs[name] = tmp_path / f"{name}.jsonl"
        assert run("mix", spec, "-o", outs[name], "--seed", seed, "--blend", "--no-progress") == 0
    err = capsys.readouterr().err
    assert "ed: took 40 of 40" in err and "esconv: took 10 of 10" in err
    assert outs["a"].read_bytes() == outs["b"].read_bytes() != outs["c"].read_bytes()
    dialogues, report = read_sac(outs["a"], strict=True)
    too_short = int(re.search(r"(\d+) too short to blend", err).group(1))  # 1-turn dialogues
    assert len(dialogues) + too_short == 50 and all(len(d.meta["blend"]) == 3 for d in dialogues)


def test_cli_errors_are_plain_exceptions(tmp_path):
    with pytest.raises(FileNotFoundError):
        run("data", "convert", "-f", "esconv", tmp_path / "missing", "-o", tmp_path / "o.jsonl")
    with pytest.raises(ValueError, match="cannot tell which corpus"):
        run("data", "stats", tmp_path)


# ---------------------------------------------------------------- the full corpora, through the CLI
@pytest.mark.slow
@pytest.mark.parametrize("fmt, folder", [("ed", "empatheticdialogues"), ("esconv", "esconv"),
                                         ("dailydialog", "dailydialog")])
def test_convert_full_corpus_then_stats_match_the_readme(tmp_path, capsys, fmt, folder):
    out = tmp_path / f"{fmt}.jsonl"
    assert run("data", "convert", "-f", fmt, need(folder), "-o", out, "--no-progress") == 0
    s = stats_json(capsys, out)
    assert s["splits"] == README_COUNTS[fmt] and s["read"]["skipped"] == 0
    direct = stats_json(capsys, DATA / folder)  # a corpus folder, converted in memory
    assert direct["splits"] == README_COUNTS[fmt]
    assert direct["read"]["skipped"] == (1 if fmt == "dailydialog" else 0)
    assert direct["read"]["records"] == sum(README_COUNTS[fmt].values()) + direct["read"]["skipped"]


# ---------------------------------------------------------------- the shipped sample
def test_sample_files_are_small_clean_and_loadable():
    assert sum(p.stat().st_size for p in SAMPLE_DIR.iterdir() if p.is_file()) < 1_000_000
    for name, (fmt, _, n) in SAMPLES.items():
        path = sample_path(name)
        if fmt == "seeds":
            from sage_jax.data.readers import read_seeds

            assert len(read_seeds(path)) == n
            continue
        dialogues, report = read_sac(path, strict=True)
        assert len(dialogues) == n and report.balanced
        for d in dialogues:
            check_dialogue(d, require_latents=True)
    assert (SAMPLE_DIR / "README.md").read_text().count("CC BY-NC 4.0") >= 2
    with pytest.raises(FileNotFoundError, match="available: ed_train_200.jsonl"):
        sample_path("nope.jsonl")


def test_sample_matches_a_fresh_conversion(tmp_path):
    need("empatheticdialogues")
    need("esconv")
    build_sample(DATA, tmp_path)
    for name in SAMPLES:
        assert (tmp_path / name).read_bytes() == sample_path(name).read_bytes(), f"{name} is stale: rebuild it"
