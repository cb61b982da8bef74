"""Mixing SAC sources (first N, validate, shuffle) and blending, deterministic under a seed."""

import json
from collections import Counter

import pytest

from sage_jax.config import ConfigError
from sage_jax.data.jsonl import write_sac
from sage_jax.data.mix import MixSource, blend, cut_even, load_mix_spec, mix
from sage_jax.sac import Dialogue, Latent, Turn


def dlg(i: int, n_turns: int, prefix: str = "d", latents: bool = True) -> Dialogue:
    turns = []
    for k in range(n_turns):
        lat = Latent(f"m{k}", None, (f"t{i}",)) if latents else None
        turns.append(Turn("user", f"{prefix}{i} u{k}", state=lat) if k % 2 == 0
                     else Turn("assistant", f"{prefix}{i} a{k}", action=lat))
    return Dialogue(f"{prefix}{i}", tuple(turns), meta={"split": "train"})


@pytest.fixture
def sources(tmp_path):
    write_sac(tmp_path / "a.jsonl", [dlg(i, 3 + i % 4, "a") for i in range(30)])
    write_sac(tmp_path / "b.jsonl", [dlg(i, 2 + i % 3, "b") for i in range(10)])
    return tmp_path


def test_load_spec_yaml_and_json(tmp_path):
    (tmp_path / "m.yaml").write_text("ed:\n  path: a.jsonl\n  size: 5\nesconv: {path: b.jsonl, prompt: '[x] '}\n")
    spec = load_mix_spec(tmp_path / "m.yaml")
    assert spec == {"ed": MixSource("a.jsonl", 5, ""), "esconv": MixSource("b.jsonl", None, "[x] ")}
    (tmp_path / "m.json").write_text(json.dumps({"ed": {"path": "a.jsonl", "size": 5}}))
    assert load_mix_spec(tmp_path / "m.json") == {"ed": MixSource("a.jsonl", 5, "")}


@pytest.mark.parametrize("text, match", [
    ("ed:\n  path: a.jsonl\n  size: lots\n", r"m\.yaml:3: sources\.ed\.size: expected int"),
    ("ed:\n  path: a.jsonl\n  sizes: 3\n", r"m\.yaml:3: sources\.ed\.sizes: unknown key.*did you mean size"),
    ("ed:\n  size: 3\n", r"m\.yaml:1: sources\.ed\.path: missing required field"),
    ("ed:\n  path: a.jsonl\n  size: -1\n", r"m\.yaml:1: sources\.ed: invalid MixSource: size must be >= 0"),
    ("[1, 2]\n", r"non-empty mapping"),
    ("ed: {path: [\n", r"invalid YAML"),
])
def test_spec_errors_name_file_line_and_field(tmp_path, text, match):
    (tmp_path / "m.yaml").write_text(text)
    with pytest.raises(ConfigError, match=match):
        load_mix_spec(tmp_path / "m.yaml")


def test_mix_takes_first_n_applies_prompt_and_shuffles(sources):
    spec = {"a": MixSource("a.jsonl", 12), "b": MixSource("b.jsonl", None, prompt="[B] ")}
    out, report = mix(spec, seed=1, base_dir=sources)
    assert Counter(d.id[0] for d in out) == {"a": 12, "b": 10} and report.total == 22
    assert {d.id for d in out if d.id.startswith("a")} == {f"a{i}" for i in range(12)}  # the first 12
    assert [s.taken for s in report.sources] == [12, 10] and report.skipped == 0
    for d in out:
        assert d.meta["mix_source"] == d.id[0]
        for t in d.turns:
            assert t.text.startswith("[B] ") == (d.id[0] == "b" and t.role == "assistant")
    assert [d.id for d in out] != sorted((d.id for d in out), key=lambda s: (s[0], int(s[1:])))  # shuffled


def test_mix_is_deterministic_under_the_seed(sources):
    spec = {"a": MixSource("a.jsonl"), "b": MixSource("b.jsonl")}
    first, _ = mix(spec, seed=7, base_dir=sources)
    again, _ = mix(spec, seed=7, base_dir=sources)
    other, _ = mix(spec, seed=8, base_dir=sources)
    assert first == again
    assert [d.id for d in first] != [d.id for d in other] and sorted(first, key=lambda d: d.id) == sorted(
        other, key=lambda d: d.id)


def test_mix_skips_invalid_dialogues_and_reports_short_sources(tmp_path):
    half = Dialogue("half", (Turn("user", "a"), Turn("assistant", "b", action=Latent())))
    blank = Dialogue("blank", (Turn("user", " "),))
    write_sac(tmp_path / "c.jsonl", [dlg(0, 2), half, blank, dlg(1, 2)])
    with open(tmp_path / "c.jsonl", "a") as f:
        f.write("{broken\n")
    out, report = mix({"c": MixSource(str(tmp_path / "c.jsonl"), size=5)})
    src = report.sources[0]
    assert sorted(d.id for d in out) == ["d0", "d1"] and src.taken == 2 and src.short
    assert (src.read.records, src.read.converted, src.read.skipped) == (5, 2, 3)
    assert [(e.line, e.field) for e in src.read.errors] == [(2, "turns[0].state"), (3, "turns[0].text"), (5, "<json>")]
    assert "fewer than requested" in report.summary()
    with pytest.raises(ValueError, match=r"c\.jsonl:2: turns\[0\]\.state"):
        mix({"c": MixSource(str(tmp_path / "c.jsonl"))}, strict=True)
    with pytest.raises(FileNotFoundError, match="mix source 'x'"):
        mix({"x": MixSource("nope.jsonl")}, base_dir=tmp_path)


def test_cut_even():
    assert cut_even(dlg(0, 1)) is None
    assert len(cut_even(dlg(0, 5)).turns) == 4 and cut_even(dlg(0, 4)) == dlg(0, 4)


def test_blend_structure():
    ds = [dlg(i, 1 + i % 6) for i in range(40)]  # lengths 1..6; the 1-turn ones cannot be blended
    out, dropped = blend(ds, seed=3)
    by_id = {d.id: cut_even(d) for d in ds if cut_even(d) is not None}
    assert dropped == sum(len(d.turns) == 1 for d in ds) and len(out) == len(by_id)
    partners = Counter()
    for b, src in zip(out, by_id):
        parts = b.meta["blend"]
        assert b.id == "+".join(parts) and parts[0] == src and len(set(parts)) == 3
        assert b.turns == tuple(t for p in parts for t in by_id[p].turns)
        assert len(b.turns) % 2 == 0 and b.turns[-1].role == "assistant"  # Dialogue checked the alternation
        partners.update(parts[1:])
    assert len(partners) > len(by_id) // 2  # partners are spread, not always the same two
    assert blend(ds, seed=3) == (out, dropped)
    assert [b.meta["blend"] for b in blend(ds, seed=4)[0]] != [b.meta["blend"] for b in out]
    with pytest.raises(ValueError, match="more than 2 dialogues"):
        blend([dlg(0, 2), dlg(1, 2), dlg(2, 1)])


def test_mix_with_blend_and_sample_source(sources):
    spec = {"a": MixSource("a.jsonl", 10), "ed": MixSource("sample:ed_train_200.jsonl", 20)}
    out, report = mix(spec, seed=0, blend_dialogues=True, base_dir=sources)
    again, _ = mix(spec, seed=0, blend_dialogues=True, base_dir=sources)
    assert out == again and report.blended and len(out) == 30 - report.dropped_by_blend
    assert all(len(d.meta["blend"]) == 3 and len(d.turns) % 2 == 0 for d in out)
    assert any(d.id.startswith("ed_") for d in out)
