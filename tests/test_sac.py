"""The State-Action Chain: data model, JSON, rendering, strict/lenient parsing, vocabularies."""

import json
import subprocess
import sys
from pathlib import Path

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from sage_jax.sac import (DEFAULT_SCHEMA, ED_EMOTIONS, ESCONV_STRATEGIES, Dialogue, Latent, LatentParseError,
                          SACFormatError, Schema, Turn, check_dialogue, dialogue_from_json, dialogue_to_json,
                          parse_assistant, parse_assistant_lenient, render_assistant, render_latent, strip_latents,
                          to_messages)

DATA = Path(__file__).resolve().parents[1].parent / "shared" / "data"
PAPER = ("{u_motivation: venting, u_emotion: disappointed, u_topic: [driving test]} "
         "{a_motivation: empathy, a_emotion: caring, a_topic: [driving test]} Oh no, that's rough.")
STATE = Latent("venting", "disappointed", ("driving test",))
ACTION = Latent("empathy", "caring", ("driving test",))


# ---------------------------------------------------------------- rendering
def test_render_matches_the_paper_exactly():
    assert render_assistant(STATE, ACTION, "Oh no, that's rough.") == PAPER
    assert parse_assistant(PAPER) == (STATE, ACTION, "Oh no, that's rough.")


def test_null_and_empty_topics_render_plainly():
    text = render_assistant(Latent(None, None, ()), Latent("suggestion", None, ("video games", "zombies")), "Try it!")
    assert text == ("{u_motivation: null, u_emotion: null, u_topic: []} "
                    "{a_motivation: suggestion, a_emotion: null, a_topic: [video games, zombies]} Try it!")


def test_special_token_rendering_and_token_list():
    text = render_assistant(STATE, ACTION, "Oh no.", special_tokens=True)
    assert text == ("<|u_state|>u_motivation: venting, u_emotion: disappointed, u_topic: [driving test]<|/u_state|>"
                    "<|a_action|>a_motivation: empathy, a_emotion: caring, a_topic: [driving test]<|/a_action|>Oh no.")
    assert DEFAULT_SCHEMA.special_tokens() == ("<|u_state|>", "<|/u_state|>", "<|a_action|>", "<|/a_action|>")
    assert parse_assistant(text) == (STATE, ACTION, "Oh no.")  # rendering detected
    assert parse_assistant(text, special_tokens=True) == (STATE, ACTION, "Oh no.")
    with pytest.raises(LatentParseError) as e:
        parse_assistant(text, special_tokens=False)
    assert e.value.position == 0


def test_ambiguous_values_are_json_quoted_and_ordinary_ones_are_not():
    fmt = DEFAULT_SCHEMA.format_value
    assert fmt("driving test") == "driving test"
    assert fmt("café ☕") == "café ☕"
    assert fmt(None) == "null"
    assert fmt("null") == '"null"'
    assert fmt("") == '""'
    assert fmt(" x") == '" x"'
    assert fmt("a, b") == '"a, b"'
    assert fmt("re: work") == '"re: work"'
    assert fmt('say "hi"') == '"say \\"hi\\""'
    assert fmt("line\nbreak") == '"line\\nbreak"'
    assert fmt("x<|/u_state|>") == '"x\\u003c|/u_state|>"'  # a tokenizer never sees a latent token in a value


def test_half_annotated_exchange_is_an_error():
    with pytest.raises(SACFormatError, match="half-annotated"):
        render_assistant(None, ACTION, "hi")
    assert render_assistant(None, None, "hi") == "hi"  # unannotated data: bare reply


# ---------------------------------------------------------------- to_messages
def test_to_messages_system_user_assistant():
    d = Dialogue("d1", (Turn("user", "I failed my driving test.", state=STATE),
                        Turn("assistant", "Oh no, that's rough.", action=ACTION),
                        Turn("user", "Yeah.", state=Latent())), system="You are kind.")
    assert to_messages(d) == [{"role": "system", "content": "You are kind."},
                              {"role": "user", "content": "I failed my driving test."},
                              {"role": "assistant", "content": PAPER},
                              {"role": "user", "content": "Yeah."}]
    assert to_messages(d, include_system=False)[0]["role"] == "user"
    assert to_messages(d, special_tokens=True)[2]["content"].startswith("<|u_state|>")


def test_to_messages_names_the_half_annotated_turn():
    d = Dialogue("d2", (Turn("user", "hi"), Turn("assistant", "hello", action=ACTION)))
    with pytest.raises(SACFormatError, match=r"d2: turns\[1\].*turns\[0\]\.state is missing"):
        to_messages(d)


@pytest.mark.parametrize("roles, where", [(("assistant", "user"), r"turns\[0\]\.role.*starts with a user"),
                                          (("user", "user"), r"turns\[1\]\.role.*alternate")])
def test_dialogue_must_start_with_user_and_alternate(roles, where):
    with pytest.raises(SACFormatError, match=where):
        Dialogue("x", tuple(Turn(r, "t") for r in roles))


def test_turn_latent_must_match_role():
    with pytest.raises(SACFormatError, match="user turn carries a 'state'"):
        Turn("user", "hi", action=ACTION)
    with pytest.raises(SACFormatError, match="assistant turn carries an 'action'"):
        Turn("assistant", "hi", state=STATE)


# ---------------------------------------------------------------- JSON
def test_json_round_trip_and_layout():
    d = Dialogue("ed_17", (Turn("user", "I failed my driving test.", state=STATE),
                           Turn("assistant", "Oh no.", action=ACTION)), meta={"split": "train"})
    obj = dialogue_to_json(d)
    assert obj == {"id": "ed_17", "turns": [
        {"role": "user", "text": "I failed my driving test.",
         "state": {"motivation": "venting", "emotion": "disappointed", "topic": ["driving test"]}},
        {"role": "assistant", "text": "Oh no.",
         "action": {"motivation": "empathy", "emotion": "caring", "topic": ["driving test"]}}],
        "meta": {"split": "train"}}
    assert dialogue_from_json(json.loads(json.dumps(obj))) == d
    raw = Dialogue("r", (Turn("user", "a"), Turn("assistant", "b")), system="sys")
    assert dialogue_to_json(raw) == {"id": "r", "system": "sys", "turns": [{"role": "user", "text": "a"},
                                                                           {"role": "assistant", "text": "b"}]}
    assert dialogue_from_json(dialogue_to_json(raw)) == raw


@pytest.mark.parametrize("obj, field", [
    ([], "<record>"),
    ({"turns": []}, "id"),
    ({"id": "x"}, "turns"),
    ({"id": "x", "turns": [], "extra": 1}, "extra"),
    ({"id": "x", "turns": []}, "turns"),
    ({"id": "x", "turns": [{"role": "bot", "text": "a"}]}, "turns[0].role"),
    ({"id": "x", "turns": [{"role": "user"}]}, "turns[0].text"),
    ({"id": "x", "turns": [{"role": "user", "text": 3}]}, "turns[0].text"),
    ({"id": "x", "turns": [{"role": "user", "text": "a", "action": None}]}, "turns[0].action"),
    ({"id": "x", "turns": [{"role": "user", "text": "a", "state": {"motivation": None, "emotion": None}}]},
     "turns[0].state.topic"),
    ({"id": "x", "turns": [{"role": "user", "text": "a", "state": {"motivation": 1, "emotion": None, "topic": []}}]},
     "turns[0].state.motivation"),
    ({"id": "x", "turns": [{"role": "user", "text": "a",
                            "state": {"motivation": None, "emotion": None, "topic": ["a", 2]}}]},
     "turns[0].state.topic[1]"),
    ({"id": "x", "turns": [{"role": "user", "text": "a"}, {"role": "user", "text": "b"}]}, "turns[1].role"),
    ({"id": "x", "turns": [{"role": "user", "text": "a"}], "meta": []}, "meta"),
])
def test_json_validation_names_the_field(obj, field):
    with pytest.raises(SACFormatError) as e:
        dialogue_from_json(obj)
    assert e.value.field == field, str(e.value)


def test_check_dialogue_text_vocab_and_half_annotation():
    schema = Schema(closed={"u_emotion": "ed_emotions"})
    good = Dialogue("g", (Turn("user", "a", state=Latent(None, "sad")), Turn("assistant", "b", action=Latent())))
    check_dialogue(good, schema, require_latents=True)
    with pytest.raises(SACFormatError, match=r"turns\[0\]\.state\.emotion.*ed_emotions"):
        check_dialogue(Dialogue("b", (Turn("user", "a", state=Latent(None, "happy")),)), schema)
    with pytest.raises(SACFormatError, match=r"turns\[1\]\.text"):
        check_dialogue(Dialogue("e", (Turn("user", "a"), Turn("assistant", "  "))))
    with pytest.raises(SACFormatError, match=r"turns\[0\]\.state"):
        check_dialogue(Dialogue("h", (Turn("user", "a"), Turn("assistant", "b", action=Latent()))), schema)
    with pytest.raises(SACFormatError, match=r"turns\[0\]\.state"):
        check_dialogue(Dialogue("u", (Turn("user", "a"),)), require_latents=True)


# ---------------------------------------------------------------- vocabularies and schema
def test_shipped_vocabularies():
    assert len(ED_EMOTIONS) == 32 and "terrified" in ED_EMOTIONS
    assert len(ESCONV_STRATEGIES) == 8 and "Providing Suggestions" in ESCONV_STRATEGIES


def test_closed_vocabulary_validates_render_and_parse():
    schema = Schema(closed={"u_emotion": "ed_emotions", "a_motivation": "esconv_strategies", "a_topic": "mine"},
                    vocabularies={"mine": ("work", "school")})
    ok = render_assistant(Latent(None, "sad"), Latent("Question", None, ("work",)), "Why?", schema)
    assert parse_assistant(ok, schema).action == Latent("Question", None, ("work",))
    with pytest.raises(SACFormatError, match="ed_emotions"):
        render_assistant(Latent(None, "happy"), Latent(), "x", schema)
    bad = ok.replace("u_emotion: sad", "u_emotion: happy")
    with pytest.raises(LatentParseError, match="closed vocabulary") as e:
        parse_assistant(bad, schema)
    assert e.value.position == bad.index("happy")
    bad_topic = ok.replace("[work]", "[work, play]")
    with pytest.raises(LatentParseError) as e:
        parse_assistant(bad_topic, schema)
    assert e.value.position == bad_topic.index("play")
    lenient = parse_assistant_lenient(bad, schema)
    assert lenient.state.emotion == "happy" and not lenient.missing and len(lenient.problems) == 1


@pytest.mark.parametrize("kwargs, field", [
    ({"user_keys": ("u motivation", "u_emotion", "u_topic")}, "keys"),
    ({"assistant_keys": ("u_motivation", "a_emotion", "a_topic")}, "keys"),
    ({"open": "{{"}, "open"),
    ({"sep": "a"}, "sep"),
    ({"list_open": "{"}, "delimiters"),
    ({"state_tokens": ("<s>", "<s>")}, "tokens"),
    ({"action_tokens": ("<a b>", "</a>")}, "tokens"),
    ({"closed": {"u_mood": "ed_emotions"}}, "closed.u_mood"),
    ({"closed": {"u_emotion": "nope"}}, "closed.u_emotion"),
])
def test_schema_validation(kwargs, field):
    with pytest.raises(SACFormatError) as e:
        Schema(**kwargs)
    assert e.value.field == field


def test_schema_from_config_dict():
    from sage_jax.config import from_dict

    schema = from_dict(Schema, {"user_keys": ["user_motivation", "user_emotion", "user_topic"],
                                "closed": {"a_motivation": "esconv_strategies"}})
    text = render_assistant(Latent("x"), Latent("Question"), "hi", schema)
    assert text.startswith("{user_motivation: x,") and parse_assistant(text, schema).action.motivation == "Question"


def test_custom_delimiters_round_trip():
    schema = Schema(open="<", close=">", list_open="(", list_close=")", sep=";", key_sep="=",
                    state_tokens=("[S]", "[/S]"), action_tokens=("[A]", "[/A]"))
    s, a = Latent("a;b", "c=d", ("x", "(y)")), Latent(None, "<e>", ())
    text = render_assistant(s, a, "r", schema)
    assert text.startswith("<u_motivation= ") and parse_assistant(text, schema) == (s, a, "r")
    text = render_assistant(s, a, "r", schema, special_tokens=True)
    assert text.startswith("[S]") and parse_assistant(text, schema) == (s, a, "r")


# ---------------------------------------------------------------- malformed latents: typed error, right offset
def _blocks(state="u_motivation: venting, u_emotion: sad, u_topic: [x]",
            action="a_motivation: empathy, a_emotion: caring, a_topic: []", reply="Hi"):
    return f"{{{state}}} {{{action}}} {reply}"


MALFORMED = [
    ("no action block", "{u_motivation: a, u_emotion: b, u_topic: []} Hello", "Hello"),
    ("no latents at all", "Hello there", "Hello"),
    ("missing separator", _blocks(state="u_motivation: venting u_emotion: sad, u_topic: [x]"), ": sad"),
    ("unterminated quote", _blocks(state='u_motivation: "venting, u_emotion: sad, u_topic: [x]'), '"venting'),
    ("bad escape", _blocks(state='u_motivation: "a\\qb", u_emotion: sad, u_topic: [x]'), "\\q"),
    ("unknown field", _blocks(state="u_mood: a, u_emotion: sad, u_topic: [x]"), "u_mood"),
    ("duplicate field", _blocks(state="u_motivation: a, u_motivation: b, u_topic: [x]"), "u_motivation: b"),
    ("missing field", _blocks(state="u_motivation: a, u_emotion: b"), "} {a_"),
    ("empty value", _blocks(state="u_motivation: , u_emotion: b, u_topic: []"), ", u_emotion"),
    ("topic not a list", _blocks(state="u_motivation: a, u_emotion: b, u_topic: x"), "x}"),
    ("null in topic list", _blocks(state="u_motivation: a, u_emotion: b, u_topic: [y, null]"), "null]"),
    ("action first", _blocks(state="a_motivation: a, a_emotion: b, a_topic: []"), "a_motivation: a"),
    ("state key in action", _blocks(action="a_motivation: a, u_emotion: b, a_topic: []"), "u_emotion: b"),
    ("bracket in plain value", _blocks(state="u_motivation: a]b, u_emotion: b, u_topic: []"), "]b"),
    ("unterminated list", "{u_motivation: a, u_emotion: b, u_topic: [x, y", None),
    ("truncated", "{u_motivation: a, u_emo", None),
]


@pytest.mark.parametrize("name, text, at", MALFORMED, ids=[m[0] for m in MALFORMED])
def test_malformed_latents_raise_with_position(name, text, at):
    with pytest.raises(LatentParseError) as e:
        parse_assistant(text)
    expected = len(text) if at is None else text.index(at)
    assert e.value.position == expected, f"{e.value} (expected offset {expected})"
    assert isinstance(e.value, ValueError) and f"offset {expected}" in str(e.value)
    parse_assistant_lenient(text)  # never raises


def test_null_topic_is_read_as_empty_and_whitespace_is_tolerated():
    text = "  {u_motivation:a ,u_emotion :  null,u_topic: null}\n{ a_motivation: b, a_emotion: c, a_topic: [ x ,y ] }  hi"
    assert parse_assistant(text) == (Latent("a", None, ()), Latent("b", "c", ("x", "y")), " hi")


# ---------------------------------------------------------------- lenient parsing (model output)
def test_lenient_reports_missing_fields_and_blocks():
    r = parse_assistant_lenient("{u_motivation: venting, u_topic: [test]} I see.")
    assert r.state == Latent("venting", None, ("test",)) and r.action is None and r.reply == "I see."
    assert r.missing == ("u_emotion", "a_motivation", "a_emotion", "a_topic") and not r.ok
    plain = parse_assistant_lenient("Just words, {not: latents}.")
    assert plain.state is None and plain.action is None and plain.reply == "Just words, {not: latents}."
    code = parse_assistant_lenient('{"a": 1} is JSON')
    assert code.reply == '{"a": 1} is JSON'


def test_lenient_accepts_sloppy_output():
    r = parse_assistant_lenient("{u_motivation: complaint: loud, u_emotion: frustrated, u_topic: zombies, games} "
                                "{a_motivation: empathy, humor, a_emotion: null, a_topic: [games, null]}Ha!")
    assert r.state == Latent("complaint: loud", "frustrated", ("zombies", "games"))
    assert r.action == Latent("empathy, humor", None, ("games",))
    assert r.reply == "Ha!" and not r.missing and len(r.problems) == 2  # unbracketed list, null topic


def test_lenient_ignores_stray_quotes_in_plain_values():
    r = parse_assistant_lenient('{u_motivation: it"s, u_emotion: b, u_topic: []} {a_motivation: c, a_emotion: d, '
                                'a_topic: []} He said "hi".')
    assert r.state == Latent('it"s', "b", ()) and r.action == Latent("c", "d", ()) and r.reply == 'He said "hi".'


def test_lenient_truncated_special_token_output():
    text = "<|u_state|>u_motivation: a, u_emotion: b, u_topic: [x]<|a_action|>a_motivation: q"
    r = parse_assistant_lenient(text)
    assert r.state == Latent("a", "b", ("x",)) and r.action == Latent("q", None, ())
    assert r.missing == ("a_emotion", "a_topic") and r.reply == ""
    assert [(p.position, p.message.split(":")[0]) for p in r.problems] == [
        (text.index("<|a_action|>"), "unclosed user state"), (len(text), "unterminated assistant action")]


def test_strip_latents():
    assert strip_latents(PAPER) == "Oh no, that's rough."
    assert strip_latents(render_assistant(STATE, ACTION, "Hi", special_tokens=True)) == "Hi"
    assert strip_latents("No latents here.") == "No latents here."
    assert strip_latents("{u_motivation: a, u_emo") == ""  # a truncated prefix shows nothing


# ---------------------------------------------------------------- properties
NASTY = list('{}[],:"\\ \t\n<|>/_éü☕🙂\u00a0\u2028') + ["null", "u_state", "<|u_state|>", "<|/a_action|>",
                                                           "u_topic:", ", a_emotion: "]


def nasty(max_size):
    return st.lists(st.sampled_from(NASTY), max_size=max_size).map("".join)


values = st.one_of(st.text(max_size=12), nasty(8),
                   st.sampled_from(["null", "", " ", "None", "venting", "driving test", "a, b", "[x]", '"q"']))
latents = st.builds(Latent, st.none() | values, st.none() | values, st.lists(values, max_size=4).map(tuple))
replies = st.one_of(st.text(max_size=30), nasty(10))
FAST = settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow])


@FAST
@given(latents, latents, replies, st.booleans())
def test_render_parse_round_trip(state, action, reply, special):
    text = render_assistant(state, action, reply, special_tokens=special)
    assert parse_assistant(text) == (state, action, reply)
    assert parse_assistant(text, special_tokens=special) == (state, action, reply)
    lenient = parse_assistant_lenient(text)
    assert (lenient.state, lenient.action, lenient.reply) == (state, action, reply)
    assert lenient.ok, lenient.problems
    assert strip_latents(text) == reply
    if special:  # values never contain a latent token, so a tokenizer sees exactly four of them
        assert sum(text[:len(text) - len(reply)].count(t) for t in DEFAULT_SCHEMA.special_tokens()) == 4


@FAST
@given(st.one_of(st.text(max_size=60), st.lists(st.sampled_from(NASTY + list("uame_otivnpc")), max_size=40).map("".join)))
def test_parsers_are_total_on_any_text(text):
    try:
        parse_assistant(text)
    except LatentParseError as e:
        assert 0 <= e.position <= len(text)
    r = parse_assistant_lenient(text)
    assert isinstance(r.reply, str) and all(0 <= p.position <= len(text) for p in r.problems)


@FAST
@given(latents, latents, replies, st.booleans(), st.data())
def test_parsers_are_total_on_corrupted_renders(state, action, reply, special, data):
    text = render_assistant(state, action, reply, special_tokens=special)
    i = data.draw(st.integers(0, len(text)))
    j = data.draw(st.integers(i, min(len(text), i + 4)))
    junk = data.draw(nasty(3))
    bad = text[:i] + junk + text[j:]
    try:
        parse_assistant(bad)
    except LatentParseError as e:
        assert 0 <= e.position <= len(bad)
    parse_assistant_lenient(bad)


@FAST
@given(st.lists(st.tuples(values.filter(str.strip), st.none() | latents, st.none() | latents), min_size=1, max_size=5),
       st.none() | st.text(max_size=10))
def test_dialogue_json_round_trip(rows, system):
    turns = tuple(Turn("user", text, state=lat) if i % 2 == 0 else Turn("assistant", text, action=act)
                  for i, (text, lat, act) in enumerate(rows))
    d = Dialogue("id", turns, system, {"k": [1, "v"]})
    assert dialogue_from_json(json.loads(json.dumps(dialogue_to_json(d), ensure_ascii=False))) == d


def test_render_latent_single_block():
    assert render_latent(ACTION, "assistant") == "{a_motivation: empathy, a_emotion: caring, a_topic: [driving test]}"


# ---------------------------------------------------------------- the real corpora
def _assert_round_trip(dialogues):
    n = 0
    for d in dialogues:
        for special in (False, True):
            for i, msg in enumerate(to_messages(d, special_tokens=special)):
                if msg["role"] != "assistant":
                    continue
                turn = d.turns[i]
                got = parse_assistant(msg["content"])
                assert got == (d.turns[i - 1].state, turn.action, turn.text), (d.id, i)
                assert strip_latents(msg["content"]) == turn.text
                n += 1
    return n


@pytest.mark.parametrize("fmt, name", [("ed", "empatheticdialogues/ed_valid.jsonl"), ("esconv", "esconv/valid.jsonl")])
def test_round_trip_every_validation_dialogue(fmt, name):
    if not (DATA / name).exists():
        pytest.skip(f"shared corpus not found at {DATA / name}")
    from sage_jax.data.readers import read_corpus

    dialogues, report = read_corpus(fmt, DATA / name, progress=False)
    assert report.skipped == 0 and len(dialogues) == {"ed": 2770, "esconv": 195}[fmt]
    assistant_turns = sum(t.role == "assistant" for d in dialogues for t in d.turns)
    assert assistant_turns > 2000 and _assert_round_trip(dialogues) == 2 * assistant_turns  # both renderings


def test_sac_does_not_import_jax():
    code = "import sys, sage_jax.sac; assert 'jax' not in sys.modules, 'sage_jax.sac imported jax'"
    subprocess.run([sys.executable, "-c", code], check=True)
