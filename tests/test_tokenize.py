"""Chat templates and the SFT loss mask: exact supervised text, label shift, truncation, fuzzing.

Expected strings are built from the messages and the templates' documented formats, not from the
code under test. Mistral/Llama-3 tokenizers are the SmolLM2 tokenizer with those templates applied.
"""

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from sage_jax.data.templates import TEMPLATES, apply_template, end_of_turn_token
from sage_jax.data.tokenize import encode_dialogue, encode_many

EOT = {"own": "<|im_end|>", "mistral": "</s>", "llama3": "<|eot_id|>"}
# How each template shows an assistant message: Llama-3 trims it; Mistral puts a space before it
# that byte-level BPE fuses into the first reply token (" {"), so it is part of the first target.
SHOWN = {"own": lambda c: c, "mistral": lambda c: " " + c, "llama3": lambda c: c.strip()}
# How the template renders an assistant content (Llama-3 trims it; see also PRE_CONTENT).
RENDERED = {"own": lambda c: c, "mistral": lambda c: c, "llama3": lambda c: c.strip()}
# Template text right before an assistant content.
PRE_CONTENT = {"own": "<|im_start|>assistant\n", "mistral": " [/INST] ", "llama3": "<|end_header_id|>\n\n"}
# Last characters of the generation prompt (what a sampler feeds before the reply).
HEADER = {
    "own": "<|im_start|>assistant\n",
    "mistral": " [/INST]",
    "llama3": "<|start_header_id|>assistant<|end_header_id|>\n\n",
}

A1 = ("{u_motivation: venting, u_emotion: sad, u_topic: [exam]} "
      "{a_motivation: empathy, a_emotion: caring, a_topic: [exam]} Oh no… 😢 {x}")
A2 = ("{u_motivation: null, u_emotion: calm, u_topic: []} "
      "{a_motivation: question, a_emotion: null, a_topic: [life]}\nWhat's next? [INST]")
A3 = ("{u_motivation: x, u_emotion: y, u_topic: [z]} {a_motivation: a, a_emotion: b, a_topic: [c, d]} "
      "Sure\t— 你好 </s> <|eot_id|> end")
DIALOGUE = [
    {"role": "system", "content": "You are a caring companion. {Be brief}"},
    {"role": "user", "content": "I failed my exam [/INST] assistant\n<|im_start|>assistant lol"},
    {"role": "assistant", "content": A1},
    {"role": "user", "content": "Ça va. Être ou ne pas être?\n\n{}"},
    {"role": "assistant", "content": A2},
    {"role": "user", "content": "assistant"},
    {"role": "assistant", "content": A3},
]


def _load(smollm2_dir, name):
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(smollm2_dir)
    if name != "own":
        apply_template(tok, name)
    return tok


@pytest.fixture(scope="module")
def toks(smollm2_dir):
    return {name: _load(smollm2_dir, name) for name in ("own", "mistral", "llama3")}


def ref_ids(tok, messages, **kw):
    return list(tok.apply_chat_template(messages, tokenize=True, return_dict=False, **kw))


def supervised_runs(tok, enc):
    """Decoded text of each maximal run of supervised tokens."""
    runs, cur = [], []
    for t, m in zip(enc.tokens.tolist(), enc.loss_mask.tolist()):
        if m:
            cur.append(t)
        elif cur:
            runs.append(cur)
            cur = []
    if cur:
        runs.append(cur)
    return [tok.decode(r, skip_special_tokens=False) for r in runs]


def run_ends(enc):
    """Token counts up to and including the last token of each supervised run."""
    m = enc.loss_mask
    return [j + 1 for j in range(len(m)) if m[j] and (j + 1 == len(m) or not m[j + 1])]


def assistant_contents(messages):
    return [m["content"] for m in messages if m["role"] == "assistant"]


# ---------------------------------------------------------------- templates


def test_apply_template_adds_tokens_and_sets_eot(smollm2_dir):
    from transformers import AutoTokenizer

    base = len(AutoTokenizer.from_pretrained(smollm2_dir))
    for name, n_new in (("chatml", 0), ("mistral", 2), ("llama3", 4)):
        tok = AutoTokenizer.from_pretrained(smollm2_dir)
        assert apply_template(tok, name) == n_new
        assert len(tok) == base + n_new
        assert apply_template(tok, name) == 0  # idempotent
        spec = TEMPLATES[name]
        assert tok.eos_token == spec.end_of_turn == end_of_turn_token(tok)
        for t in spec.special_tokens:  # every control token is one id, never split
            assert len(tok.encode(t, add_special_tokens=False)) == 1
    assert _load(smollm2_dir, "mistral").eos_token == "</s>"


def test_named_template_requires_its_tokens(smollm2_dir):
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(smollm2_dir)
    with pytest.raises(ValueError, match="apply_template"):
        encode_dialogue(DIALOGUE, tok, template="mistral")
    with pytest.raises(ValueError, match="unknown chat template"):
        encode_dialogue(DIALOGUE, tok, template="vicuna")


def test_mistral_requires_alternation(toks):
    bad = [{"role": "user", "content": "a"}, {"role": "user", "content": "b"}]
    with pytest.raises(Exception, match="alternate"):
        encode_dialogue(bad, toks["mistral"])


def test_rendered_formats(toks):
    """The built-in templates write the documented formats."""
    m = [{"role": "system", "content": "S"}, {"role": "user", "content": "U1"},
         {"role": "assistant", "content": "A1"}, {"role": "user", "content": "U2"},
         {"role": "assistant", "content": "A2"}]
    render = lambda name: toks[name].apply_chat_template(m, tokenize=False)  # noqa: E731
    assert render("mistral") == "<s>[INST] S\n\nU1 [/INST] A1</s>[INST] U2 [/INST] A2</s>"
    h = lambda r: f"<|start_header_id|>{r}<|end_header_id|>\n\n"  # noqa: E731
    assert render("llama3") == (f"<|begin_of_text|>{h('system')}S<|eot_id|>{h('user')}U1<|eot_id|>"
                                f"{h('assistant')}A1<|eot_id|>{h('user')}U2<|eot_id|>{h('assistant')}A2<|eot_id|>")
    assert render("own") == ("<|im_start|>system\nS<|im_end|>\n<|im_start|>user\nU1<|im_end|>\n"
                             "<|im_start|>assistant\nA1<|im_end|>\n<|im_start|>user\nU2<|im_end|>\n"
                             "<|im_start|>assistant\nA2<|im_end|>\n")


# ---------------------------------------------------------------- exact masks


@pytest.mark.parametrize("name", ["own", "mistral", "llama3"])
@pytest.mark.parametrize("with_system", [True, False])
def test_exact_supervised_text(toks, name, with_system):
    tok = toks[name]
    msgs = DIALOGUE if with_system else DIALOGUE[1:]
    enc = encode_dialogue(msgs, tok)
    assert enc.tokens.dtype == np.int32 and enc.loss_mask.dtype == bool
    assert enc.tokens.shape == enc.loss_mask.shape and enc.truncated_turns == 0
    # same ids as the tokenizer's own apply_chat_template: no drift at span boundaries
    assert enc.tokens.tolist() == ref_ids(tok, msgs)
    expected = [SHOWN[name](c) + EOT[name] for c in assistant_contents(msgs)]
    assert supervised_runs(tok, enc) == expected
    assert tok.decode(enc.tokens[enc.loss_mask].tolist()) == "".join(expected)
    unsup = tok.decode(enc.tokens[~enc.loss_mask].tolist())
    assert "I failed my exam" in unsup and "Oh no" not in unsup
    if with_system:
        assert "You are a caring companion" in unsup


def test_chatml_exact_masked_text(toks):
    """Everything unsupervised, spelled out for SmolLM2's template (default system injected)."""
    tok = toks["own"]
    msgs = [{"role": "user", "content": "hi <|im_end|> there"}, {"role": "assistant", "content": "{a} yo\n"},
            {"role": "user", "content": "ok"}]
    enc = encode_dialogue(msgs, tok)
    sys = "<|im_start|>system\nYou are a helpful AI assistant named SmolLM, trained by Hugging Face<|im_end|>\n"
    assert tok.decode(enc.tokens[~enc.loss_mask].tolist()) == (
        sys + "<|im_start|>user\nhi <|im_end|> there<|im_end|>\n<|im_start|>assistant\n"
        + "\n<|im_start|>user\nok<|im_end|>\n")
    assert supervised_runs(tok, enc) == ["{a} yo\n<|im_end|>"]


@pytest.mark.parametrize("name", ["own", "mistral", "llama3"])
def test_label_shift_first_reply_token(toks, name):
    """inputs = tokens[:-1], targets = tokens[1:], mask = loss_mask[1:]: after the generation
    prompt the first target is the first reply token and it is supervised; header targets aren't."""
    tok = toks[name]
    enc = encode_dialogue(DIALOGUE, tok)
    targets, m = enc.tokens[1:], enc.loss_mask[1:]
    eot_id = tok.convert_tokens_to_ids(EOT[name])
    k, prev_end = 0, 0
    for i, msg in enumerate(DIALOGUE):
        if msg["role"] != "assistant":
            continue
        k += 1
        # p = tokens before the reply: those of the generation prompt a sampler would feed
        full_text = tok.apply_chat_template(DIALOGUE, tokenize=False)
        prompt_text = tok.apply_chat_template(DIALOGUE[:i], tokenize=False, add_generation_prompt=True)
        assert full_text.startswith(prompt_text)
        offs = tok(full_text, add_special_tokens=False, return_offsets_mapping=True)["offset_mapping"]
        p = [e for _, e in offs].index(len(prompt_text)) + 1
        if name != "llama3":
            # Not for llama3 here: SmolLM2's GPT-2 regex splits the header's "\n\n" into "\n","\n"
            # before the reply but keeps "\n\n" whole at the end of a bare prompt (real Llama-3's
            # regex keeps it whole); a sampler must not retokenize the prompt separately there.
            assert enc.tokens[:p].tolist() == ref_ids(tok, DIALOGUE[:i], add_generation_prompt=True)
        assert tok.decode(enc.tokens[prev_end:p].tolist()).endswith(HEADER[name])
        # nothing from the previous turn's end through the header is a supervised target
        assert not enc.loss_mask[prev_end:p].any()
        # input position p-1 (last header token) predicts the first reply token, supervised
        first = tok.encode(SHOWN[name](msg["content"]), add_special_tokens=False)[0]
        assert targets[p - 1] == first and m[p - 1]
        # targets are supervised up to the turn's end token and not after it
        end = next(j for j in run_ends(enc) if j > p)
        assert enc.tokens[end - 1] == eot_id and m[p - 1:end - 1].all()
        if end < len(enc.tokens):
            assert not m[end - 1]
        prev_end = end
    assert k == 3
    if name == "own":  # ChatML's "\n" after <|im_end|> is the last token and is not supervised
        assert tok.decode(enc.tokens[-1:].tolist()) == "\n" and not enc.loss_mask[-1]


# ---------------------------------------------------------------- truncation


@pytest.mark.parametrize("name", ["own", "mistral"])
def test_truncation_at_turn_boundaries(toks, name):
    tok = toks[name]
    full = encode_dialogue(DIALOGUE, tok)
    eot_id = tok.convert_tokens_to_ids(EOT[name])
    ends = run_ends(full)
    # token counts up to and including each assistant turn's end token
    assert len(ends) == 3 and all(full.tokens[j - 1] == eot_id for j in ends)
    assert encode_dialogue(DIALOGUE, tok, max_len=len(full.tokens)).truncated_turns == 0

    cases = [(ends[1], ends[1], 2), (ends[2] - 1, ends[1], 2), (ends[1] - 1, ends[0], 4), (ends[0], ends[0], 4)]
    for max_len, keep, dropped in cases:
        enc = encode_dialogue(DIALOGUE, tok, max_len=max_len)
        assert len(enc.tokens) == keep <= max_len and enc.truncated_turns == dropped
        assert enc.tokens.tolist() == full.tokens[:keep].tolist()
        assert enc.loss_mask.tolist() == full.loss_mask[:keep].tolist()
        assert enc.tokens[-1] == eot_id and enc.loss_mask[-1]  # cut right after a whole turn
        kept = [c for c in assistant_contents(DIALOGUE)][: 3 - dropped // 2]
        assert supervised_runs(tok, enc) == [SHOWN[name](c) + EOT[name] for c in kept]

    assert encode_dialogue(DIALOGUE, tok, max_len=ends[0] - 1) is None  # first exchange too long


def test_encode_many_counts(toks):
    tok = toks["own"]
    short = [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "{a} hello"}]
    long_first = [{"role": "user", "content": "word " * 200}, {"role": "assistant", "content": "ok"}]
    no_reply = [{"role": "user", "content": "anyone?"}]
    truncable = short + [{"role": "user", "content": "tell me " * 100}, {"role": "assistant", "content": "no"}]
    encs, stats = encode_many([short, long_first, no_reply, truncable], tok, max_len=100, progress=False)
    assert len(encs) == stats.kept == 2
    assert (stats.dialogues, stats.truncated, stats.turns_dropped) == (4, 1, 2)
    assert (stats.dropped_too_long, stats.dropped_no_assistant, stats.dropped_indices) == (1, 1, [1, 2])
    # truncable is cut back to short's turn, right after its <|im_end|> (ChatML's "\n" goes too)
    assert encs[1].tokens.tolist() == encs[0].tokens[:-1].tolist()
    assert stats.tokens == sum(len(e.tokens) for e in encs)
    assert stats.supervised_tokens == sum(int(e.loss_mask.sum()) for e in encs)


def test_unclosed_turn_is_an_error(toks):
    bad = "{% for m in messages %}{{ m['role'] + ': ' + m['content'] + '\n' }}{% endfor %}"
    with pytest.raises(ValueError, match="not closed"):
        encode_dialogue(DIALOGUE, toks["own"], template=bad)


# ---------------------------------------------------------------- property test

# SmolLM2's byte-level vocabulary lacks 21 of the 256 byte symbols (0x04, 0x06, 0x13, 0x14, 0x16,
# 0x1d, 0xc0, 0xc1, 0xf1, 0xf2, 0xf5-0xff): control characters and unassigned-plane code points
# (U+40000-U+BFFFF) are silently dropped by the tokenizer itself, so they can't round-trip.
# \n and \t come from the sampled fragments; U+E000 is the encoder's reserved sentinel.
_chars = st.characters(exclude_categories=("Cs", "Cn", "Cc"), exclude_characters="\ue000")
_text = st.lists(
    st.one_of(st.text(_chars, max_size=6), st.sampled_from([
        "[/INST]", "[INST]", "assistant", "user", "<|im_start|>", "<|im_end|>", "</s>", "<s>", "<|eot_id|>",
        "{", "}", "{u_motivation: x}", "\n", " ", "\t", "😀", "é", "12"])),
    max_size=6).map("".join)


@st.composite
def dialogues(draw):
    msgs = [{"role": "system", "content": draw(_text)}] if draw(st.booleans()) else []
    for _ in range(draw(st.integers(1, 4))):
        msgs += [{"role": "user", "content": draw(_text)}, {"role": "assistant", "content": draw(_text)}]
    if draw(st.booleans()):
        msgs.append({"role": "user", "content": draw(_text)})
    return msgs


@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(msgs=dialogues(), frac=st.floats(0.0, 1.0))
def test_random_dialogues(toks, msgs, frac):
    contents = assistant_contents(msgs)
    for name, tok in toks.items():
        enc = encode_dialogue(msgs, tok)
        assert enc.tokens.tolist() == ref_ids(tok, msgs)
        runs = supervised_runs(tok, enc)
        assert len(runs) == len(contents)
        for run, c in zip(runs, contents):
            want = RENDERED[name](c) + EOT[name]
            # A token may fuse template whitespace right before the content with its first
            # characters (e.g. ChatML "\n" + "\n..."): only such whitespace may lead the run.
            assert run.endswith(want), (name, run, want)
            pre = run[: len(run) - len(want)]
            assert pre == "" or (pre.isspace() and PRE_CONTENT[name].endswith(pre)), (name, run, want)

        # truncation: a prefix ending on a whole assistant turn, or None if turn 1 can't fit
        max_len = int(frac * len(enc.tokens))
        cut = encode_dialogue(msgs, tok, max_len=max_len)
        eot_id = tok.convert_tokens_to_ids(EOT[name])
        if max_len < run_ends(enc)[0]:
            assert cut is None
            continue
        assert len(cut.tokens) <= max_len
        assert cut.tokens.tolist() == enc.tokens[: len(cut.tokens)].tolist()
        assert cut.loss_mask.tolist() == enc.loss_mask[: len(cut.tokens)].tolist()
        kept = len(msgs) - cut.truncated_turns
        assert msgs[kept - 1]["role"] == "assistant" or cut.truncated_turns == 0
        if cut.truncated_turns:
            assert cut.tokens[-1] == eot_id
        assert len(supervised_runs(tok, cut)) == len(assistant_contents(msgs[:kept]))


def test_llama3_trims_content(toks):
    """Meta's Llama-3 template trims each message: the supervised text is the trimmed content."""
    tok = toks["llama3"]
    msgs = [{"role": "user", "content": " hi "}, {"role": "assistant", "content": "  {a} yo \n"}]
    enc = encode_dialogue(msgs, tok)
    assert enc.tokens.tolist() == ref_ids(tok, msgs)
    assert supervised_runs(tok, enc) == ["{a} yo<|eot_id|>"]


def test_latent_mask_covers_exactly_the_latent_prefix(smollm2_dir):
    from transformers import AutoTokenizer

    from sage_jax.data.packing import shift_example

    tok = AutoTokenizer.from_pretrained(smollm2_dir)
    prefix = "{u_motivation: venting, u_emotion: sad, u_topic: [exam]} {a_motivation: empathy, a_emotion: caring, a_topic: [exam]}"
    messages = [{"role": "user", "content": "I failed my exam."},
                {"role": "assistant", "content": prefix + " Oh no, I'm sorry."},
                {"role": "user", "content": "Thanks."},
                {"role": "assistant", "content": prefix + " Anytime."}]
    enc = encode_dialogue(messages, tok, latent_chars=lambda c: len(prefix) if c.startswith("{") else 0)
    runs = []
    idx = np.nonzero(enc.latent_mask)[0]
    for group in np.split(idx, np.nonzero(np.diff(idx) > 1)[0] + 1):
        runs.append(tok.decode(enc.tokens[group]))
    assert runs == [prefix, prefix]
    assert not np.any(enc.latent_mask & ~enc.loss_mask)
    shifted = shift_example(enc, seq_len=len(enc.tokens))
    np.testing.assert_array_equal(shifted["latent_mask"], enc.latent_mask[1:])
