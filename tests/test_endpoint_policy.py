"""A policy served by an OpenAI-compatible endpoint: `sage-jax serve` on loopback with the tiny
model stands in for vLLM; its answers must equal our own sampler's on the same conversations, and
the tree search and self-play run through it (assistant and user simulator)."""

import json

import pytest

from sage_jax.data.jsonl import read_sac
from sage_jax.data.readers import read_seeds
from sage_jax.data.sample import sample_path
from sage_jax.data.split import seed_id
from sage_jax.data.pairs import read_pairs
from sage_jax.judge import Completion
from sage_jax.rollout import SamplingParams, generate
from sage_jax.rollout.endpoint import EndpointPolicy, is_endpoint_spec, parse_endpoint_spec
from sage_jax.rollout.selfplay import USER_PERSONA
from sage_jax.search import tree
from sage_jax.search.tree import SearchConfig
from test_serve import _post, pol, srv  # noqa: F401 (fixtures: the tiny policy and its loopback server)


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


# --- continue_final_message (vLLM's chat extension) on `sage-jax serve` ----------------------

PARTIAL = "{u_motivation: curiosity, u_emotion: calm, u_topic: [keys]} {a_motivation:"


def test_serve_continue_final_message_continues_the_partial_assistant_message(pol, srv):
    history = _conv("I lost my keys today")
    want = generate(pol.cfg, pol.params, [pol.encode_chat(history, prefill=PARTIAL)],
                    SamplingParams(temperature=0.0, max_new_tokens=12))[0]
    fresh = generate(pol.cfg, pol.params, [pol.encode_chat(history)], SamplingParams(temperature=0.0,
                                                                                      max_new_tokens=12))[0]
    assert want.tokens != fresh.tokens  # the prefill changes what this model says next
    ep = EndpointPolicy(srv.model_name, srv.url, max_retries=0, timeout=120)
    got = ep.chat([history], SamplingParams(temperature=0.0, max_new_tokens=12), prefills=[PARTIAL])
    assert got[0][0].content == pol.decode(want.tokens)  # the continuation only, not the prefill
    # n continuations of one prefill, per-conversation n
    two = ep.chat([history, _conv("hello")], SamplingParams(temperature=1.0, max_new_tokens=6), n=[2, 1],
                  seed=4, prefills=[PARTIAL, None])
    assert [len(x) for x in two] == [2, 1]
    # the request fields as vLLM spells them; the bad combinations are refused
    msgs = history + [{"role": "assistant", "content": PARTIAL}]
    code, body, _ = _post(srv.url, {"messages": msgs, "temperature": 0, "max_tokens": 12,
                                    "continue_final_message": True, "add_generation_prompt": False})
    assert code == 200 and body["choices"][0]["message"]["content"] == pol.decode(want.tokens)
    code, body, _ = _post(srv.url, {"messages": msgs, "continue_final_message": True})
    assert code == 400 and "add_generation_prompt" in body["error"]["message"]
    code, body, _ = _post(srv.url, {"messages": history, "continue_final_message": True,
                                    "add_generation_prompt": False})
    assert code == 400 and "last message must be an assistant" in body["error"]["message"]


# --- the tree search with an endpoint as the assistant and the user simulator -----------------


class FirstOneJudge:
    """Always prefers candidate 1 (the search's plumbing is under test here, not the judge; the
    rules judge may reject this random model's replies and resample the step)."""

    name = "scripted:first"

    def complete(self, prompts, *, temperature=0.8, max_tokens=64, seed=None):
        return [Completion("Response 1 is better") for _ in prompts]


@pytest.fixture
def requests_log(monkeypatch):
    """Every request EndpointPolicy sends (through the real transport to the real server)."""
    log = []
    one = EndpointPolicy._one

    def logged(self, messages, sp, n, seed, prefill=None):
        log.append({"messages": messages, "n": n, "prefill": prefill, "temperature": sp.temperature,
                    "stop": sp.stop_strings})
        return one(self, messages, sp, n, seed, prefill)

    monkeypatch.setattr(EndpointPolicy, "_one", logged)
    return log


def _is_user_sim(request) -> bool:
    return any(USER_PERSONA in m["content"] for m in request["messages"][:2])


def test_search_with_endpoint_assistant_and_user_branching_sample(srv, tmp_path, requests_log, monkeypatch):
    monkeypatch.setattr(tree, "make_judge", lambda spec, **kw: FirstOneJudge())
    spec = f"openai:{srv.model_name}@{srv.url}"
    out = tmp_path / "s"
    before = srv.stats["requests"]
    cfg = SearchConfig(model=spec, user_model=spec, num_seeds=2, turns=2, k=2, branching="sample",
                       max_new_tokens=8, user_max_new_tokens=6, batch_seeds=2, output_dir=str(out))
    summary = tree.run_search(cfg)
    assert summary["searched"] == 2
    trees = {t["id"]: t for t in map(json.loads, open(out / "trees.jsonl"))}
    assert sorted(trees) == sorted(seed_id(x) for x in read_seeds(sample_path("ed_test_seeds.txt"), limit=2))
    for t in trees.values():
        assert 1 <= len(t["nodes"]) <= 2  # 2 unless the simulated user gave up (an empty reply)
        for node in t["nodes"]:
            assert len(node["candidates"]) == 2 and node["chosen"] == 0
            assert all({"content", "finish_reason", "state", "action", "reply"} <= set(c)
                       for c in node["candidates"])
        assert (out / "trees" / f"{t['id']}.html").exists()
    dialogues, _ = read_sac(out / "sft.jsonl", strict=True)
    assert sorted(d.id for d in dialogues) == sorted(trees)
    assert all(d.meta["model"] == spec for d in dialogues)
    pairs, _ = read_pairs(out / "pairs.jsonl", strict=True)
    assert len(pairs) == sum(len(t["nodes"]) for t in trees.values())  # one negative per turn
    assert {p.id.split(":")[0] for p in pairs} == set(trees)
    # what the server received: one request with n=K per dialogue and assistant turn (keyed by the
    # seed text and the assistant turns already in the assistant's view), n=1 per user turn
    asked: dict[tuple, list] = {}
    for r in requests_log:
        if not _is_user_sim(r):
            m = r["messages"]
            asked.setdefault((m[2]["content"], sum(x["role"] == "assistant" for x in m[3:])), []).append(r)
    assert len(asked) == sum(len(t["nodes"]) for t in trees.values())
    assert all(len(rs) == 1 and rs[0]["n"] == 2 and rs[0]["prefill"] is None for rs in asked.values())
    users = [r for r in requests_log if _is_user_sim(r)]
    assert users and all(r["n"] == 1 for r in users)
    assert srv.stats["requests"] - before == len(requests_log)


@pytest.mark.parametrize("branching", ["latent", "enumerate"])
def test_latent_first_search_through_endpoint_continues_the_shared_state(srv, requests_log, branching):
    ep = EndpointPolicy(srv.model_name, srv.url, max_retries=0, timeout=120)
    cfg = SearchConfig(model=ep.name, turns=1, k=2, branching=branching, vocabulary="esconv_strategies",
                       max_new_tokens=6, latent_max_new_tokens=10, batch_seeds=2, action_tries=1)
    results = tree.search_batch(ep, ep, FirstOneJudge(), [("a", "I failed my exam."), ("b", "My dog is ill.")],
                                cfg, seed=1)
    # the state block: one greedy request per dialogue, stopped at the block's close
    states = [r for r in requests_log if r["temperature"] == 0.0]
    assert len(states) == 2 and all(r["prefill"] is None and r["n"] == 1 and r["stop"] == ("}",) for r in states)
    for r in results:
        (node,) = r["nodes"]
        assert r["dialogue"].meta["model"] == ep.name
        cands = node["candidates"]
        assert len(cands) == 2 and all({"content", "finish_reason"} <= set(c) for c in cands)
        # rendered canonically and shared by every child
        prefix = cands[0]["content"][: cands[0]["content"].index("}") + 1]
        assert prefix.startswith("{u_motivation:") and all(c["content"].startswith(prefix) for c in cands)
        if branching == "enumerate":
            assert len({c["pinned"]["a_motivation"] for c in cands}) == 2
            for c in cands:
                assert c["content"].startswith(f"{prefix} {{a_motivation: {c['pinned']['a_motivation']}, a_emotion:")
    # every other request continued that shared state prefix (continue_final_message)
    conts = [r for r in requests_log if r["temperature"] != 0.0]
    assert conts and all(r["prefill"] is not None and r["prefill"].startswith("{u_motivation:") for r in conts)
    if branching == "latent":  # the K action blocks of a dialogue: one request with n=K
        first_round = [r for r in conts if r["stop"] == ("}",)][:2]
        assert len(first_round) == 2 and all(r["n"] == 2 for r in first_round)


@pytest.mark.parametrize("cache", [False, True])
def test_endpoint_user_simulator_with_our_assistant(pol, srv, requests_log, cache):
    ep = EndpointPolicy(srv.model_name, srv.url, max_retries=0, timeout=120)
    cfg = SearchConfig(turns=2, k=2, branching="sample", cache=cache, max_new_tokens=6, user_max_new_tokens=6,
                       batch_seeds=1)
    (r,) = tree.search_batch(pol, ep, FirstOneJudge(), [("a", "I failed my exam.")], cfg, seed=2)
    assert len(r["nodes"]) == 2 and all(len(n["candidates"]) == 2 for n in r["nodes"])
    assert r["dialogue"].meta["model"] == pol.name
    # the simulator's turn went to the endpoint (one request, n=1); the assistant's did not
    assert len(requests_log) == 1 and _is_user_sim(requests_log[0]) and requests_log[0]["n"] == 1
    assert [t.role for t in r["dialogue"].turns] == ["user", "assistant", "user", "assistant"]
    apool, upool, _ = tree.make_pools(pol, ep, cfg)
    assert apool is not None and upool is None  # our side keeps its caches, the endpoint its own
    assert tree.make_pools(ep, ep, cfg) == (None, None, None)


def test_lookahead_with_endpoint_sides(pol, srv, requests_log):
    """lookahead 2 with the simulator behind the endpoint: the futures' user turns go there too."""
    ep = EndpointPolicy(srv.model_name, srv.url, max_retries=0, timeout=120)
    cfg = SearchConfig(turns=2, k=2, branching="sample", max_new_tokens=6, user_max_new_tokens=6, batch_seeds=1,
                       lookahead=2)
    (r,) = tree.search_batch(pol, ep, FirstOneJudge(), [("a", "I failed my exam.")], cfg, seed=2)
    assert [len(c.get("future", [])) for c in r["nodes"][0]["candidates"]] == [2, 2]
    assert sum(_is_user_sim(q) for q in requests_log) == 3  # 2 futures (one per child) + the real turn
