"""The OpenAI-compatible server (sage_jax.serve.server) with the tiny model and the `openai` client."""

import json
import threading
import urllib.error
import urllib.request

import pytest

from sage_jax.rollout import SamplingParams, generate
from sage_jax.sac import strip_latents
from sage_jax.serve import make_server

openai = pytest.importorskip("openai")


@pytest.fixture(scope="module")
def pol(tiny_dir):
    from sage_jax.rollout.policy import load_policy

    return load_policy(str(tiny_dir))


@pytest.fixture(scope="module")
def srv(pol):
    s = make_server(pol, "127.0.0.1", 0, max_batch=16, max_queue=64).start()
    yield s
    s.close()


@pytest.fixture(scope="module")
def client(srv):
    return openai.OpenAI(base_url=srv.url, api_key="none", max_retries=0, timeout=120)


def _msgs(text):
    return [{"role": "user", "content": text}]


def _direct(pol, text, max_tokens):
    g = generate(pol.cfg, pol.params, [pol.encode_chat(_msgs(text))],
                 SamplingParams(temperature=0.0, max_new_tokens=max_tokens))[0]
    return pol.decode(g.tokens)


def test_models(client, srv):
    ids = [m.id for m in client.models.list().data]
    assert ids == [srv.model_name]


def test_chat_n_and_stream(client, pol):
    r = client.chat.completions.create(model="x", messages=_msgs("hello there"), temperature=0, max_tokens=8)
    assert r.object == "chat.completion" and len(r.choices) == 1
    assert r.choices[0].message.content == _direct(pol, "hello there", 8)
    assert r.usage.completion_tokens > 0
    r3 = client.chat.completions.create(model="x", messages=_msgs("hello there"), n=3, temperature=1.0,
                                        top_p=0.9, max_tokens=8, seed=7)
    assert [c.index for c in r3.choices] == [0, 1, 2]
    again = client.chat.completions.create(model="x", messages=_msgs("hello there"), n=3, temperature=1.0,
                                           top_p=0.9, max_tokens=8, seed=7)
    assert [c.message.content for c in again.choices] == [c.message.content for c in r3.choices]
    stream = client.chat.completions.create(model="x", messages=_msgs("hello there"), temperature=0,
                                            max_tokens=8, stream=True)
    text = "".join(ch.choices[0].delta.content or "" for ch in stream if ch.choices)
    assert text == r.choices[0].message.content


def test_concurrent_clients_batched(client, pol, srv):
    prompts = [f"question number {i}: what is {i} plus {i * 3}?" for i in range(16)]
    before = dict(srv.stats)
    answers = [None] * 16
    errors = []

    def ask(i):
        try:
            r = client.chat.completions.create(model="x", messages=_msgs(prompts[i]), temperature=0, max_tokens=6)
            answers[i] = r.choices[0].message.content
        except Exception as e:  # noqa: BLE001
            errors.append(e)

    threads = [threading.Thread(target=ask, args=(i,)) for i in range(16)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(120)
    assert not errors
    assert answers == [_direct(pol, p, 6) for p in prompts]
    batches = srv.stats["batches"] - before["batches"]
    assert srv.stats["requests"] - before["requests"] == 16
    assert batches < 16, srv.stats
    assert srv.stats["max_rows"] > 1


def test_sage_extension_pin(client):
    r = client.chat.completions.create(
        model="x", messages=_msgs("I failed my exam"), temperature=0, max_tokens=16,
        extra_body={"sage": {"pin": {"a_motivation": "humour"}, "return_latents": True}})
    msg = r.choices[0].message.model_dump()
    raw, lat = msg["sage_raw"], msg["sage_latents"]
    assert raw.startswith("{u_motivation:")
    assert lat["prefill"] in raw and "{a_motivation: humour, a_emotion:" in lat["prefill"]
    assert lat["a_motivation"] == "humour"  # the prefill pins it; the lenient parse reads it back
    assert msg["content"] == strip_latents(raw)
    assert "{a_motivation" not in msg["content"]
    # a whole pinned user state
    state = {"u_motivation": "venting", "u_emotion": "sad", "u_topic": ["exam"]}
    r = client.chat.completions.create(model="x", messages=_msgs("I failed my exam"), temperature=0,
                                       max_tokens=8, extra_body={"sage": {"pin": state}})
    lat = r.choices[0].message.model_dump()["sage_latents"]
    assert {k: lat[k] for k in state} == state


def _post(url, body, timeout=120):
    req = urllib.request.Request(url + "/chat/completions", data=json.dumps(body).encode(),
                                 headers={"Content-Type": "application/json"})
    try:
        with urllib.request.urlopen(req, timeout=timeout) as resp:
            return resp.status, json.loads(resp.read()), dict(resp.headers)
    except urllib.error.HTTPError as e:
        return e.code, json.loads(e.read()), dict(e.headers)


def test_bad_requests(srv):
    code, body, _ = _post(srv.url, {"messages": []})
    assert code == 400 and "messages" in body["error"]["message"]
    code, body, _ = _post(srv.url, {"messages": _msgs("hi"), "sage": {"pin": {"zz": "x"}}})
    assert code == 400 and "unknown latent field" in body["error"]["message"]
    code, body, _ = _post(srv.url, {"messages": _msgs("hi"), "n": 99})
    assert code == 400


def test_overload_503(pol):
    gate, entered = threading.Event(), threading.Event()
    s = make_server(pol, "127.0.0.1", 0, max_batch=1, max_queue=1).start()

    def slow(batch):
        entered.set()
        gate.wait(60)

    s.worker.before_batch = slow
    results = []
    try:
        body = {"messages": _msgs("hi"), "temperature": 0, "max_tokens": 2}
        first = threading.Thread(target=lambda: results.append(_post(s.url, body)))
        first.start()
        assert entered.wait(30)  # the worker holds request 1; the queue (size 1) is empty
        rest = [threading.Thread(target=lambda: results.append(_post(s.url, body))) for _ in range(3)]
        for t in rest:
            t.start()
        deadline = 30
        while s.stats["rejected"] < 2 and deadline > 0:
            threading.Event().wait(0.05)
            deadline -= 0.05
        gate.set()
        for t in [first, *rest]:
            t.join(60)
    finally:
        gate.set()
        s.close()
    codes = sorted(r[0] for r in results)
    assert codes == [200, 200, 503, 503], codes
    over = [r for r in results if r[0] == 503][0]
    assert over[1]["error"]["type"] == "server_overloaded" and "queue is full" in over[1]["error"]["message"]
    assert {k.lower(): v for k, v in over[2].items()}.get("retry-after") == "1"  # header names: any case


def _sage_body(n, pin, seed, max_tokens=12):
    return {"messages": _msgs("I failed my exam"), "n": n, "temperature": 1.0, "seed": seed, "max_tokens": max_tokens,
            "sage": {"pin": pin, "return_latents": True}}


def test_sage_requests_run_in_the_slots_and_equal_steer(pol, srv):
    """A pinned action needs the three user fields generated first: each is a phase of the row in
    its slot (no whole-request call holding the other slots); the choices equal `steer`'s."""
    from sage_jax.rollout.steer import steer
    from sage_jax.serve.protocol import parse_chat_request

    body = _sage_body(3, {"a_motivation": "humour"}, seed=11)
    before = dict(srv.stats)
    code, out, _ = _post(srv.url, body)
    assert code == 200, out
    assert srv.stats["phases"] - before["phases"] == 3 * 3  # u_motivation, u_emotion, u_topic per choice
    req = parse_chat_request(body, default_max_tokens=16, max_tokens_limit=srv.worker.config.max_tokens_limit)
    want = steer(pol, [req.messages] * 3, [req.pins] * 3, req.sampling, row_seeds=req.row_seeds())
    got = [c["message"] for c in out["choices"]]
    assert [m["sage_raw"] for m in got] == [w.content for w in want]
    assert [m["content"] for m in got] == [w.reply for w in want]
    assert len({m["sage_raw"] for m in got}) > 1  # sampled rows differ


def test_more_choices_than_slots_start_as_slots_free_up(pol, srv):
    """n > max_batch: the choices start as slots free up (never more rows than slots) and equal
    the answers of a server with room for all of them; `sage` requests too."""
    small = make_server(pol, "127.0.0.1", 0, max_batch=2, max_queue=8).start()
    try:
        plain = {"messages": _msgs("hello there"), "n": 5, "temperature": 1.0, "seed": 3, "max_tokens": 6}
        sage = _sage_body(3, {"u_emotion": "sad"}, seed=5, max_tokens=8)
        for body in (plain, sage):
            code, out, _ = _post(small.url, body)
            ref_code, ref, _ = _post(srv.url, body)
            assert code == ref_code == 200, (out, ref)
            assert len(out["choices"]) == body["n"]
            assert [c["message"] for c in out["choices"]] == [c["message"] for c in ref["choices"]]
        assert small.stats["max_rows"] <= 2 and small.stats["requests"] == 2
    finally:
        small.close()
