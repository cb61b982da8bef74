"""Corpus readers -> SAC, the JSONL reader/writer and rollout seeds: mappings, errors, counts."""

import json
import re
from pathlib import Path

import pytest

from sage_jax.data.jsonl import JsonlWriter, ReadReport, RecordError, done_ids, iter_sac, read_sac, write_sac
from sage_jax.data.readers import corpus_files, detect_format, read_corpus, read_seeds
from sage_jax.sac import Dialogue, Latent, Turn, dialogue_to_json

DATA = Path(__file__).resolve().parents[1].parent / "shared" / "data"


def need(rel: str) -> Path:
    path = DATA / rel
    if not path.exists():
        pytest.skip(f"shared corpus not found at {path}")
    return path


def jsonl(path: Path, records) -> Path:
    path.write_text("".join((r if isinstance(r, str) else json.dumps(r)) + "\n" for r in records), encoding="utf-8")
    return path


def assert_error(err: RecordError, path: Path, line: int, field: str):
    assert (err.file, err.line, err.field) == (str(path), line, field), str(err)
    assert str(err).startswith(f"{path}:{line}: {field}: ")


# ---------------------------------------------------------------- EmpatheticDialogues
def ed_record(conv_id="hit:1_conv:2", labels=("sad", "questioning", "agreeing", "surprised"), **kw):
    roles = ["speaker", "listener"] * 4
    turns = [{"utterance_idx": i + 1, "role": roles[i], "text": f" u{i} ", "ei_auto_label": lab}
             for i, lab in enumerate(labels)]
    return {"conv_id": conv_id, "split": "train", "emotion": "lonely", "situation": "I moved away.",
            "turns": turns, **kw}


def test_ed_mapping(tmp_path):
    path = jsonl(tmp_path / "ed_train.jsonl", [ed_record(labels=("sad", "questioning", "agreeing", "surprised",
                                                                    "neutral", "neutral", None, None))])
    (d,), report = read_corpus("ed", path)
    assert report.converted == 1 and d.id == "ed_hit:1_conv:2"
    assert [t.role for t in d.turns] == ["user", "assistant"] * 4
    assert d.turns[0] == Turn("user", "u0", state=Latent("sharing", "sad", ()))  # emotion label: utterance-level
    assert d.turns[1].action == Latent("questioning", None, ())  # intent -> strategy
    assert d.turns[2].state == Latent("agreeing", "lonely", ())  # intent; emotion from the conversation
    assert d.turns[3].action == Latent(None, "surprised", ())  # listener emotion label
    assert d.turns[4].state == Latent("sharing", "lonely", ()) and d.turns[5].action == Latent()  # neutral
    assert d.turns[6].state == Latent("sharing", "lonely", ()) and d.turns[7].action == Latent()  # unlabelled
    assert d.meta == {"source": "empatheticdialogues", "split": "train", "conv_id": "hit:1_conv:2",
                      "emotion": "lonely", "situation": "I moved away."}


def test_ed_malformed_records_are_reported_with_file_line_field(tmp_path):
    bad_role = ed_record("c2")
    bad_role["turns"][1]["role"] = "speaker"
    path = jsonl(tmp_path / "ed_valid.jsonl", [
        ed_record("c1"),
        "{not json",
        bad_role,
        ed_record("c3", labels=("sad", "bored")),
        ed_record("c4", emotion="meh"),
        "",  # blank lines are not records
        [1, 2],
        ed_record("c5"),
    ])
    dialogues, report = read_corpus("ed", path)
    assert [d.id for d in dialogues] == ["ed_c1", "ed_c5"]
    assert (report.records, report.converted, report.skipped) == (7, 2, 5) and report.balanced
    fields = [(e.line, e.field) for e in report.errors]
    assert fields == [(2, "<json>"), (3, "turns[1].role"), (4, "turns[1].ei_auto_label"), (5, "emotion"),
                      (7, "<record>")]
    assert_error(report.errors[1], path, 3, "turns[1].role")
    assert "5 skipped" in report.summary()
    with pytest.raises(RecordError) as e:
        read_corpus("ed", path, strict=True)
    assert_error(e.value, path, 2, "<json>")


def test_ed_full_corpus_counts_match_the_data_readme():
    dialogues, report = read_corpus("ed", need("empatheticdialogues"), progress=False)
    splits = [d.meta["split"] for d in dialogues]
    assert (splits.count("train"), splits.count("valid"), splits.count("test")) == (19541, 2770, 2547)
    assert report.skipped == 0 and report.balanced and len({d.id for d in dialogues}) == len(dialogues)
    from sage_jax.sac import ED_EMOTIONS

    assert all(t.state.emotion in ED_EMOTIONS for d in dialogues for t in d.turns if t.role == "user")


# ---------------------------------------------------------------- ESConv
def esconv_record(dialog, **kw):
    return {"experience_type": "Current Experience", "emotion_type": "anxiety", "problem_type": "Job Crisis",
            "situation": "s", "survey_score": {}, "dialog": dialog, **kw}


def u(text, speaker, strategy=None):
    return {"text": text, "speaker": speaker, **({"strategy": strategy} if strategy else {})}


def test_esconv_mapping_merge_and_opening(tmp_path):
    rec = esconv_record([u("Hi, how can I help?", "sys", "Question"), u("Hello", "usr"), u("I am worried", "usr"),
                         u("I hear you.", "sys", "Reflection of feelings"), u("Why?", "sys", "Question"),
                         u("Work.", "usr"), u("Try resting.", "sys", "Providing Suggestions")])
    path = jsonl(tmp_path / "train.jsonl", [rec])
    (d,), report = read_corpus("esconv", path)
    state = Latent(None, "anxiety", ("job crisis",))
    assert d.id == "esconv_train_1" and report.balanced
    assert d.turns == (Turn("user", "Hello I am worried", state=state),
                       Turn("assistant", "I hear you. Why?", action=Latent("Reflection of feelings", None,
                                                                            ("job crisis",))),
                       Turn("user", "Work.", state=state),
                       Turn("assistant", "Try resting.", action=Latent("Providing Suggestions", None,
                                                                      ("job crisis",))))
    assert d.meta["opening"] == [{"text": "Hi, how can I help?", "strategy": "Question"}]
    assert d.meta["strategies"] == {"1": ["Reflection of feelings", "Question"]}


def test_esconv_malformed(tmp_path):
    path = jsonl(tmp_path / "valid.jsonl", [
        esconv_record([u("Hi", "sys", "Question")]),  # no seeker utterance
        esconv_record([u("Hi", "usr"), u("Yo", "sys", "Joking")]),
        esconv_record([u("Hi", "usr"), u("Yo", "sys")]),
        esconv_record([u("Hi", "usr"), u("  ", "sys", "Question")]),
        esconv_record([u("Hi", "usr"), u("Yo", "bot")]),
        esconv_record([u("Hi", "usr"), u("Yo", "sys", "Others")]),
    ])
    dialogues, report = read_corpus("esconv", path)
    assert [(e.line, e.field) for e in report.errors] == [
        (1, "dialog"), (2, "dialog[1].strategy"), (3, "dialog[1].strategy"), (4, "dialog[1].text"),
        (5, "dialog[1].speaker")]
    assert len(dialogues) == 1 and dialogues[0].id == "esconv_valid_6" and report.balanced


def test_esconv_full_corpus_counts():
    dialogues, report = read_corpus("esconv", need("esconv"), progress=False)
    splits = [d.meta["split"] for d in dialogues]
    assert (splits.count("train"), splits.count("valid"), splits.count("test")) == (910, 195, 195)
    assert report.skipped == 0 and sum("opening" in d.meta for d in dialogues) == 488 + 101 + 94


# ---------------------------------------------------------------- DailyDialog
def dd_split(folder: Path, split: str, texts, acts, emotions) -> Path:
    folder.mkdir(parents=True)
    for name, lines in ((f"dialogues_{split}.txt", texts), (f"dialogues_act_{split}.txt", acts),
                        (f"dialogues_emotion_{split}.txt", emotions)):
        (folder / name).write_text("".join(x + "\n" for x in lines), encoding="utf-8")
    return folder


def test_dailydialog_mapping_and_misaligned_record(tmp_path):
    folder = dd_split(tmp_path / "dd" / "validation", "validation",
                      ["Hi , Tom . __eou__ Hello ! __eou__ Coffee ? __eou__",
                       "One __eou__ Two __eou__",
                       "A __eou__ B __eou__",
                       "C __eou__ D __eou__"],
                      ["2 1 2 ", "1 ", "1 9", "1 2"],
                      ["0 4 6 ", "0 0", "0 0", "0 0"])
    assert detect_format(tmp_path / "dd") == "dailydialog" and detect_format(folder) == "dailydialog"
    dialogues, report = read_corpus("dailydialog", tmp_path / "dd")
    assert [d.id for d in dialogues] == ["dailydialog_valid_1", "dailydialog_valid_4"]
    d = dialogues[0]
    assert d.turns == (Turn("user", "Hi , Tom .", state=Latent("question", None, ())),
                       Turn("assistant", "Hello !", action=Latent("inform", "happiness", ())),
                       Turn("user", "Coffee ?", state=Latent("question", "surprise", ())))
    text_file = folder / "dialogues_validation.txt"
    assert_error(report.errors[0], text_file, 2, "dialogues_act_validation.txt")
    assert "1 act labels for 2 utterances" in str(report.errors[0])
    assert_error(report.errors[1], text_file, 3, "dialogues_act_validation.txt[1]")
    assert report.balanced and report.skipped == 2
    with pytest.raises(RecordError, match="misaligned"):
        read_corpus("dailydialog", folder, strict=True)


def test_dailydialog_full_corpus_skips_the_misaligned_dialogue():
    dialogues, report = read_corpus("dailydialog", need("dailydialog"), progress=False)
    splits = [d.meta["split"] for d in dialogues]
    assert (splits.count("train"), splits.count("valid"), splits.count("test")) == (11117, 1000, 1000)
    assert report.records == 13118 and report.skipped == 1
    assert_error(report.errors[0], DATA / "dailydialog/train/dialogues_train.txt", 7852, "dialogues_act_train.txt")


# ---------------------------------------------------------------- ShareGPT
def sg(*pairs, **kw):
    return {"conversations": [{"from": f, "value": v} for f, v in pairs], **kw}


def test_sharegpt_json_list_and_jsonl(tmp_path):
    recs = [sg(("human", "hi"), ("gpt", "hello"), id="a"),
            sg(("system", "be nice"), ("human", "q"), ("gpt", "a"), ("human", "q2")),
            sg(("human", "x"), ("gpt", "y"), id=7, system="sys")]
    as_list = tmp_path / "chats.json"
    as_list.write_text(json.dumps(recs, indent=2), encoding="utf-8")
    as_lines = jsonl(tmp_path / "chats.jsonl", recs)
    ids = []
    for path in (as_list, as_lines):
        dialogues, report = read_corpus("sharegpt", path)
        ids.append([d.id for d in dialogues])
        assert ids[-1][0] == "a" and ids[-1][2] == "7" and report.balanced
        assert re.fullmatch(r"chats_[0-9a-f]{12}", ids[-1][1])  # no id: one from the content
        assert dialogues[0].turns == (Turn("user", "hi"), Turn("assistant", "hello"))
        assert dialogues[1].system == "be nice" and len(dialogues[1].turns) == 3
        assert dialogues[2].system == "sys"
        assert all(t.latent is None for d in dialogues for t in d.turns)
    assert ids[0] == ids[1]  # the same record in either layout, at another line
    moved = jsonl(tmp_path / "chats.jsonl", [sg(("human", "new"), ("gpt", "one")), *reversed(recs)])
    assert ids[0][1] in [d.id for d in read_corpus("sharegpt", moved)[0]]  # reordered: same id


def test_sharegpt_validation(tmp_path):
    recs = [sg(("human", "ok"), ("gpt", "fine")),
            {"conversations": [{"from": "human", "value": "hi", "weight": 1}]},
            sg(("gpt", "hello")),
            sg(("human", "a"), ("human", "b")),
            sg(("human", "a"), ("gpt", "  ")),
            {"conversations": [{"from": "human"}]},
            {"id": "x"},
            sg(("human", "a"), ("bot", "b"))]
    path = tmp_path / "bad.json"
    path.write_text(json.dumps(recs, indent=1), encoding="utf-8")
    dialogues, report = read_corpus("sharegpt", path)
    assert len(dialogues) == 1 and report.skipped == 7 and report.balanced
    assert [e.field for e in report.errors] == [
        "[1].conversations[0].weight", "[2].conversations[0].from", "[3].conversations[1].from",
        "[4].conversations[1].value", "[5].conversations[0].value", "[6].conversations",
        "[7].conversations[1].from"]
    starts = [i for i, line in enumerate(path.read_text().splitlines(), 1) if line == " {"]  # each record's line
    assert [e.line for e in report.errors] == starts[1:]
    with pytest.raises(RecordError, match=r"\[1\]\.conversations\[0\]\.weight"):
        read_corpus("sharegpt", path, strict=True)
    broken = tmp_path / "broken.json"
    broken.write_text('[{"conversations": []},\n {"conversations": [}\n]', encoding="utf-8")
    with pytest.raises(RecordError, match="broken.json:2"):
        read_corpus("sharegpt", broken)


# ---------------------------------------------------------------- seeds
def test_read_seeds(tmp_path):
    path = tmp_path / "seeds.tsv"
    path.write_text("I lost my keys.\n\n  My dog ran off.\tx\n", encoding="utf-8")
    assert read_seeds(path) == ["I lost my keys.", "My dog ran off."]
    assert read_seeds(path, with_report=True).blank == 1
    assert read_seeds(path, limit=1) == ["I lost my keys."]
    seeds = read_seeds(need("empatheticdialogues/test_sent.tsv"))
    assert len(seeds) == 2542 and all(s.strip() == s and s for s in seeds)


# ---------------------------------------------------------------- SAC JSONL
D1 = Dialogue("d1", (Turn("user", "hi", state=Latent("greeting", None, ())), Turn("assistant", "yo", action=Latent())))


def test_read_sac_reports_and_skips(tmp_path):
    good = dialogue_to_json(D1)
    path = jsonl(tmp_path / "x.jsonl", [good, '{"id": "d2", "turns": [{"role": "user", "text": "a", "state": '
                                              '{"motivation": 1, "emotion": null, "topic": []}}]}',
                                        "", "oops", dict(good, id="d3")])
    dialogues, report = read_sac(path)
    assert [d.id for d in dialogues] == ["d1", "d3"] and (report.records, report.skipped) == (4, 2)
    assert_error(report.errors[0], path, 2, "turns[0].state.motivation")
    assert_error(report.errors[1], path, 4, "<json>")
    with pytest.raises(RecordError) as e:
        read_sac(path, strict=True)
    assert_error(e.value, path, 2, "turns[0].state.motivation")
    (path.parent / "bin.jsonl").write_bytes(b'\xff\xfe\n' + json.dumps(good).encode() + b"\n")
    dialogues, report = read_sac(path.parent / "bin.jsonl")
    assert len(dialogues) == 1 and report.errors[0].field == "<bytes>"


def test_writer_appends_flushes_and_repairs_a_torn_line(tmp_path):
    path = tmp_path / "out" / "run.jsonl"
    w = JsonlWriter(path)
    w.write(D1)
    assert read_sac(path)[0] == [D1]  # flushed: visible before close
    w.close()
    with open(path, "ab") as f:
        f.write(b'{"id": "torn", "tur')  # a killed writer
    with JsonlWriter(path) as w:
        w.write(D1.replace(id="d2"))
        w.write({"id": "d3", "turns": [{"role": "user", "text": "\ud800 lone surrogate"}]})
    dialogues, report = read_sac(path)
    assert [d.id for d in dialogues] == ["d1", "d2", "d3"] and report.skipped == 0
    assert dialogues[2].turns[0].text == "\ud800 lone surrogate"
    assert done_ids(path) == {"d1", "d2", "d3"}
    with open(path, "ab") as f:
        f.write(json.dumps(dialogue_to_json(D1.replace(id="d4"))).encode())  # complete, no newline
    with JsonlWriter(path) as w:
        w.write(D1.replace(id="d5"))
    assert [d.id for d in read_sac(path)[0]] == ["d1", "d2", "d3", "d4", "d5"]


def test_overwrite_is_atomic(tmp_path):
    path = tmp_path / "o.jsonl"
    write_sac(path, [D1])
    with pytest.raises(RuntimeError):
        with JsonlWriter(path, append=False) as w:
            w.write(D1.replace(id="new"))
            raise RuntimeError("killed")
    assert [d.id for d in read_sac(path)[0]] == ["d1"] and not (tmp_path / "o.jsonl.tmp").exists()
    assert write_sac(path, [D1.replace(id="a"), D1.replace(id="b")]) == 2
    assert [d.id for d in iter_sac(path, ReadReport(str(path)))] == ["a", "b"]


def test_corpus_files_errors(tmp_path):
    with pytest.raises(FileNotFoundError, match="no such"):
        corpus_files("ed", tmp_path / "missing")
    with pytest.raises(FileNotFoundError, match="no ed corpus files"):
        corpus_files("ed", tmp_path)
    with pytest.raises(ValueError, match="unknown corpus format"):
        read_corpus("csv", tmp_path)


def test_detect_format(tmp_path):
    assert detect_format(jsonl(tmp_path / "x.jsonl", [ed_record()])) == "ed"
    assert detect_format(jsonl(tmp_path / "y.jsonl", [esconv_record([u("Hi", "usr")])])) == "esconv"
    assert detect_format(jsonl(tmp_path / "z.jsonl", [sg(("human", "a"))])) == "sharegpt"
    assert detect_format(jsonl(tmp_path / "ed_train.jsonl", [dialogue_to_json(D1)])) == "sac"  # content wins
    (tmp_path / "l.json").write_text("[]")
    assert detect_format(tmp_path / "l.json") == "sharegpt"
    (tmp_path / "empty").mkdir()
    assert detect_format(tmp_path / "empty") is None and detect_format(tmp_path) == "ed"  # ed_train.jsonl above
    folder = dd_split(tmp_path / "dd", "test", ["a __eou__"], ["1"], ["0"])
    with pytest.raises(ValueError, match="a label file"):
        read_corpus("dailydialog", folder / "dialogues_act_test.txt")
    assert len(read_corpus("dailydialog", folder / "dialogues_test.txt")[0]) == 1
