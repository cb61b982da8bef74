"""The SAC TFDS builder: JSONL -> array_record, read back with tfds.data_source, no TensorFlow."""

import collections
import json
import subprocess
import sys
import textwrap

import numpy as np
import pytest

import tensorflow_datasets as tfds
from sage_jax.data.packing import unpack_row
from sage_jax.data.pipeline import DataConfig, make_iterator
from sage_jax.data.tfds_sac import SacFormatError, build_sac_tfds, decode_record, load_sac_source, read_sac_jsonl

EMOTIONS = ["sad", "anxious", "joyful", "caring", "angry"]


def make_dialogue(i, rng):
    turns = []
    for t in range(int(rng.integers(1, 6))):
        topic = [f"topic {int(x)}" for x in rng.integers(0, 9, int(rng.integers(0, 3)))]
        latent = {"motivation": f"m{t}", "emotion": EMOTIONS[int(rng.integers(len(EMOTIONS)))], "topic": topic}
        if t % 2 == 0:
            turns.append({"role": "user", "text": f"I feel {latent['emotion']} — día {i}/{t} 😊", "state": latent})
        else:
            turns.append({"role": "assistant", "text": f"That sounds hard ({i}, {t}). \"Quoted\"\nline",
                          "action": latent})
    d = {"id": f"ed_{i}", "turns": turns}
    if i % 3 == 0:
        d["system"] = "You are a caring listener."
    if i % 4 == 0:
        d["meta"] = {"source": "synthetic", "n": i, "tags": ["a", "b"]}
    return d


@pytest.fixture(scope="module")
def corpus(tmp_path_factory):
    """Three splits from four JSONL files (train has two), built once into an array_record TFDS dir."""
    root = tmp_path_factory.mktemp("sac")
    rng = np.random.default_rng(0)
    dialogues = [make_dialogue(i, rng) for i in range(40)]
    parts = {"train_a.jsonl": dialogues[:15], "train_b.jsonl": dialogues[15:28],
             "validation.jsonl": dialogues[28:34], "test.jsonl": dialogues[34:]}
    for name, ds in parts.items():
        lines = [json.dumps(d, ensure_ascii=name.endswith("a.jsonl")) for d in ds]
        (root / name).write_text("\n".join(lines) + "\n\n", encoding="utf-8")  # trailing blank line
    files = {"train": [root / "train_a.jsonl", root / "train_b.jsonl"], "validation": [root / "validation.jsonl"],
             "test": [root / "test.jsonl"]}
    expected = {"train": dialogues[:28], "validation": dialogues[28:34], "test": dialogues[34:]}
    data_dir = root / "tfds"
    builder = build_sac_tfds(files, data_dir)
    return builder, data_dir, expected


def test_builds_and_reads_back_offline_without_tensorflow(corpus):
    builder, data_dir, expected = corpus
    assert builder.info.file_format.value == "array_record"
    assert {s: builder.info.splits[s].num_examples for s in expected} == {s: len(v) for s, v in expected.items()}
    sources = tfds.data_source("sac_dialogues", data_dir=str(data_dir))
    assert sorted(sources) == sorted(expected)
    for split, dialogues in expected.items():
        src = sources[split]
        assert len(src) == len(dialogues)
        records = [src[i] for i in range(len(src))]
        assert [decode_record(r) for r in records] == dialogues  # equal contents, in input order
        assert [r["id"].decode() for r in records] == [d["id"] for d in dialogues]
        assert {r["split"].decode() for r in records} == {split}
        assert [int(r["num_turns"]) for r in records] == [len(d["turns"]) for d in dialogues]
    assert "tensorflow" not in sys.modules


def test_fresh_process_reads_from_files_alone(corpus):
    """A user process that never imports sage_jax loads the corpus by name from data_dir."""
    _, data_dir, expected = corpus
    code = textwrap.dedent(f"""
        import json, sys
        import tensorflow_datasets as tfds
        src = tfds.data_source("sac_dialogues", split="validation", data_dir={str(data_dir)!r})
        out = [json.loads(src[i]["dialogue"]) for i in range(len(src))]
        assert "tensorflow" not in sys.modules and "sage_jax" not in sys.modules
        print(json.dumps(out))
    """)
    res = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert res.returncode == 0, res.stderr[-3000:]
    assert json.loads(res.stdout.strip().splitlines()[-1]) == expected["validation"]


def test_rebuild_reuses_or_overwrites(corpus, tmp_path):
    _, data_dir, expected = corpus
    one = tmp_path / "one.jsonl"
    one.write_text(json.dumps(expected["test"][0]) + "\n")
    # Reuse: an existing build is kept (same dir, the files argument is not re-read).
    build_sac_tfds({"test": [one]}, data_dir)
    assert len(load_sac_source(data_dir, "test")) == len(expected["test"])
    # A separate config in the same data_dir, and overwrite.
    build_sac_tfds({"test": [one]}, data_dir, config_name="tiny")
    src = load_sac_source(data_dir, "test", config_name="tiny")
    assert [decode_record(src[0])] == expected["test"][:1]
    two = tmp_path / "two.jsonl"
    two.write_text("".join(json.dumps(d) + "\n" for d in expected["test"][:2]))
    build_sac_tfds({"test": [two]}, data_dir, config_name="tiny", overwrite=True)
    assert len(load_sac_source(data_dir, "test", config_name="tiny")) == 2


@pytest.mark.parametrize("line,match", [
    ("{not json", "invalid JSON"),
    ('["a"]', "JSON object"),
    ('{"turns": []}', "'id'"),
    ('{"id": "x", "turns": [{"role": "bot", "text": "hi"}]}', "role 'bot'"),
    ('{"id": "x", "turns": [{"role": "user"}]}', "string 'text'"),
])
def test_malformed_lines_name_file_and_line(tmp_path, line, match):
    path = tmp_path / "bad.jsonl"
    path.write_text('{"id": "ok", "turns": []}\n\n' + line + "\n")
    with pytest.raises(SacFormatError, match=rf"bad\.jsonl:3: .*{match}"):
        list(read_sac_jsonl(path))
    with pytest.raises(SacFormatError):
        build_sac_tfds({"train": [path]}, tmp_path / "tfds")


def test_missing_inputs_are_reported(tmp_path):
    with pytest.raises(FileNotFoundError):
        build_sac_tfds({"train": [tmp_path / "nope.jsonl"]}, tmp_path / "tfds")
    with pytest.raises(ValueError, match="empty"):
        build_sac_tfds({}, tmp_path / "tfds")
    with pytest.raises(ValueError, match="not built"):
        tfds.data_source("sac_dialogues", data_dir=str(tmp_path / "empty"))


def toy_tokenize(record, seq_len):
    """A stand-in tokenizer: UTF-8 bytes of each turn; assistant bytes are supervised."""
    d = decode_record(record)
    tokens, mask = [1], [False]
    for turn in d["turns"]:
        b = list(turn["text"].encode("utf-8"))[:20] + [2]
        tokens += b
        mask += [turn["role"] == "assistant"] * len(b)
    return {"tokens": np.array(tokens[:seq_len + 1], np.int32), "loss_mask": np.array(mask[:seq_len + 1], bool)}


@pytest.mark.parametrize("read_threads", [0, 4])
def test_pipeline_consumes_the_tfds_source(corpus, read_threads):
    _, data_dir, expected = corpus
    seq_len = 64
    src = load_sac_source(data_dir, "train")
    want = collections.Counter()
    for d in expected["train"]:
        ex = toy_tokenize({"dialogue": json.dumps(d)}, seq_len)
        if len(ex["tokens"]) >= 2:
            want[(ex["tokens"][:-1].tobytes(), ex["loss_mask"][1:].tobytes())] += 1
    got = collections.Counter()
    for h in range(2):  # two simulated hosts together read the split once
        cfg = DataConfig(seq_len=seq_len, batch_size=4, drop_remainder=False, read_threads=read_threads)
        for batch in make_iterator(src, cfg, preprocess=lambda r: toy_tokenize(r, seq_len),
                                   process_index=h, process_count=2):
            for r in range(batch["inputs"].shape[0]):
                for seg in unpack_row({k: v[r] for k, v in batch.items()}):
                    got[(seg["inputs"].tobytes(), seg["loss_mask"].tobytes())] += 1
    assert got == want
    assert "tensorflow" not in sys.modules
