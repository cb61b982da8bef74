"""Latent steering (sage_jax.rollout.steer) with the tiny random model."""

import pytest

from sage_jax.rollout import SamplingParams, generate
from sage_jax.rollout.steer import build_prefill, check_pins, steer
from sage_jax.sac import parse_assistant_lenient

CONV = [{"role": "user", "content": "I failed my exam today."}]
CONV2 = [{"role": "user", "content": "Tell me a joke about cats."}]
GREEDY = SamplingParams(temperature=0.0, max_new_tokens=12)


@pytest.fixture(scope="module")
def pol(tiny_dir):
    from sage_jax.rollout.policy import load_policy

    return load_policy(str(tiny_dir))


def test_build_prefill_orders_fields():
    assert build_prefill(None) == ""
    assert build_prefill({"u_motivation": "venting"}) == "{u_motivation: venting, u_emotion:"
    state = {"u_motivation": "venting", "u_emotion": "sad", "u_topic": ["exam"]}
    assert build_prefill({**state, "a_motivation": "humour"}) == (
        "{u_motivation: venting, u_emotion: sad, u_topic: [exam]} {a_motivation: humour, a_emotion:")
    assert build_prefill({"a_motivation": "humour"}) is None  # the state must be generated first
    assert build_prefill({"u_topic": ["a, b"]}, {"u_motivation": "x", "u_emotion": "y"}) == (
        '{u_motivation: x, u_emotion: y, u_topic: ["a, b"]} {a_motivation:')
    with pytest.raises(ValueError, match="unknown latent field"):
        check_pins({"x_mood": "a"})
    with pytest.raises(ValueError):
        check_pins({"a_motivation": 3})


def test_steer_pins_and_parse(pol):
    calls = []
    out = steer(pol, [CONV, CONV2], [{"a_motivation": "humour"}, None], GREEDY, seed=0,
                on_generate=calls.append)
    # phase 1 generates the three state fields (row 0 only), then one final call over both rows
    assert calls == [1, 1, 1, 2]
    s0, s1 = out
    assert s0.prefill.startswith("{u_motivation:")
    assert s0.prefill.endswith("} {a_motivation: humour, a_emotion:")
    assert s0.content.startswith(s0.prefill)
    p = parse_assistant_lenient(s0.content)
    assert (s0.state, s0.action, s0.reply, s0.missing) == (p.state, p.action, p.reply, p.missing)
    assert s0.action is not None and s0.action.motivation == "humour"
    assert s0.state is not None
    # no pins: no prefill, exactly the plain greedy generation of the prompt alone
    assert s1.prefill == ""
    direct = generate(pol.cfg, pol.params, [pol.encode_chat(CONV2)], GREEDY)[0]
    assert s1.content == pol.decode(direct.tokens)
    assert s1.finish_reason == direct.finish_reason


def test_steer_pinned_state_single_call(pol):
    pins = {"u_motivation": "venting", "u_emotion": "sad", "u_topic": ["exam"]}
    calls = []
    out = steer(pol, [CONV], [pins], GREEDY, on_generate=calls.append)[0]
    assert calls == [1]  # every field before the last pin is pinned: prefill + one generation
    assert out.prefill == "{u_motivation: venting, u_emotion: sad, u_topic: [exam]} {a_motivation:"
    assert out.state is not None and (out.state.motivation, out.state.emotion, out.state.topic) == (
        "venting", "sad", ("exam",))
    assert out.content == out.prefill + pol.decode(out.tokens)


def test_steer_stop_strings(pol):
    full = steer(pol, [CONV2], None, GREEDY)[0]
    if len(full.content) < 4:
        pytest.skip("degenerate generation")
    stop = full.content[2:4]
    cut = steer(pol, [CONV2], None, SamplingParams(temperature=0.0, max_new_tokens=12, stop_strings=(stop,)))[0]
    assert cut.content == full.content[: full.content.find(stop)]
    assert cut.finish_reason == "stop"
