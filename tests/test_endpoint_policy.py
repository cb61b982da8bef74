"""A policy served by an OpenAI-compatible endpoint: `sage-jax serve` on loopback with the tiny
model stands in for vLLM; its answers must equal our own sampler's on the same conversations."""

import pytest

from sage_jax.rollout import SamplingParams, generate
from sage_jax.rollout.endpoint import EndpointPolicy, is_endpoint_spec, parse_endpoint_spec
from test_serve import pol, srv  # noqa: F401 (fixtures: the tiny policy and its loopback server)


def _conv(text):
    return [{"role": "user", "content": text}]


def test_greedy_equals_our_sampler_with_vllm_sampling_extensions(pol, srv):
    ep = parse_endpoint_spec(f"openai:{srv.model_name}@{srv.url}", max_retries=0, timeout=120)
    assert ep.name == f"openai:{srv.model_name}@{srv.url}"
    sp = SamplingParams(temperature=0.0, repetition_penalty=2.0, max_new_tokens=16)
    convs = [_conv("hello there"), _conv("I lost my keys today")]
    got = ep.chat(convs, sp, n=1)
    want = generate(pol.cfg, pol.params, [pol.encode_chat(c) for c in convs], sp)
    assert [g[0].content for g in got] == [pol.decode(w.tokens) for w in want]
    # top_k reaches the server: temperature 1 with top_k=1 is greedy there too, while plain
    # temperature-1 sampling of this random model is not (checked on our sampler first)
    greedy = generate(pol.cfg, pol.params, [pol.encode_chat(c) for c in convs],
                      SamplingParams(temperature=0.0, max_new_tokens=16))
    hot = generate(pol.cfg, pol.params, [pol.encode_chat(c) for c in convs],
                   SamplingParams(temperature=1.0, max_new_tokens=16), seed=3)
    assert [g.tokens for g in hot] != [g.tokens for g in greedy]
    top1 = ep.chat(convs, SamplingParams(temperature=1.0, top_k=1, max_new_tokens=16), n=1, seed=3)
    assert [g[0].content for g in top1] == [pol.decode(w.tokens) for w in greedy]


def test_n_samples_per_conversation_and_seeded(srv):
    ep = EndpointPolicy(srv.model_name, srv.url, max_retries=0)
    sp = SamplingParams(temperature=1.0, top_k=20, top_p=0.9, max_new_tokens=8)
    a = ep.chat([_conv("tell me a joke"), _conv("how are you")], sp, n=3, seed=5)
    b = ep.chat([_conv("tell me a joke"), _conv("how are you")], sp, n=3, seed=5)
    assert [len(x) for x in a] == [3, 3]
    assert [[c.content for c in x] for x in a] == [[c.content for c in x] for x in b]
    assert all(c.finish_reason in ("stop", "length") for x in a for c in x)


def test_specs_and_key_safety(monkeypatch):
    assert is_endpoint_spec("openai:m@http://127.0.0.1:1/v1") and not is_endpoint_spec("smollm2")
    with pytest.raises(ValueError, match="MODEL@URL"):
        parse_endpoint_spec("openai:model-without-url")
    monkeypatch.setenv("SAGE_POLICY_API_KEY", "sk-secret")
    with pytest.raises(ValueError, match="plain http"):
        EndpointPolicy("m", "http://example.com/v1")
    EndpointPolicy("m", "https://example.com/v1")  # https: fine
    EndpointPolicy("m", "http://localhost:8000/v1")  # loopback: fine
