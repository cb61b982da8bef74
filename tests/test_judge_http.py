"""The ``openai:`` judge against a real HTTP server on loopback that injects faults (tests/fault_server.py)."""

from __future__ import annotations

import logging
import sys
from collections import defaultdict
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).parent))

from fault_server import FaultServer  # noqa: E402

from sage_jax import judge as J  # noqa: E402
from sage_jax.judge.base import RetryPolicy  # noqa: E402

TIMEOUT = 0.4  # client timeout (s); the server's slow fault waits longer
RETRY = RetryPolicy(max_attempts=8)  # the openai client's own backoff (0.5 s doubling) between attempts
SECRET = "sk-test-SECRET-0123456789abcdef"


def _judge(srv, cache_dir=None, **kw):
    opts = dict(timeout=TIMEOUT, retry=RETRY, max_concurrency=16, api_key=SECRET)
    opts.update(kw)
    return J.make_judge(f"openai:test-model@{srv.url}", cache_dir=cache_dir, **opts)


def _items(n=200):
    ctxs = [[("user", f"I went hiking on trail {i} this weekend and saw a bear!"),
             ("assistant", "Whoa, a bear? That must have been scary."),
             ("user", f"Yes! Trail {i} is usually so quiet.")] for i in range(n)]
    cands = [[f"Quiet trails can surprise you! Did the bear on trail {i} notice you?",
              "ok",
              f"I am a human hiker too and trail {i} trail {i} trail {i} trail {i} is quiet quiet quiet."]
             for i in range(n)]
    return ctxs, cands


def _check_retry_after_honoured(records):
    """Every 429 with Retry-After was followed by the next attempt of its key no sooner than that."""
    by_key = defaultdict(list)
    for r in records:
        by_key[r.key].append(r)
    checked = 0
    for recs in by_key.values():
        for prev, nxt in zip(recs, recs[1:]):
            if prev.retry_after is not None:
                assert nxt.t - prev.t >= prev.retry_after, (prev, nxt)
                checked += 1
    return checked


def test_best_of_k_200_items_with_faults_then_rerun_from_cache(tmp_path, caplog):
    caplog.set_level(logging.DEBUG)  # everything any library logs, to check that the key never appears
    ctxs, cands = _items(200)
    cache = tmp_path / "cache"
    with FaultServer(seed=0, fault_rate=0.3, slow_delay=TIMEOUT + 0.4, api_key=SECRET) as srv:
        j = _judge(srv, cache)
        sels = J.select_best(j, ctxs, cands, tries=5)
        first_requests = srv.requests
        records = srv.records

        # nothing lost: one result per item, each a verdict or a recorded failure
        assert len(sels) == 200
        for s in sels:
            assert s.judge == "openai:test-model" and s.tries >= 1
            assert s.verdict.ok or (s.verdict.kind == "failure" and s.errors)
            assert s.failures == len(s.errors)
        summary = J.selection_summary(sels)
        assert summary["items"] == summary["chosen"] + summary["none"] + summary["failed"] == 200
        # the faults happened, and were survived
        faults = {r.fault for r in records}
        assert {"500", "503", "429-0", "429-1", "slow", "garbage"} <= faults
        assert 0.2 < sum(r.fault is not None for r in records) / len(records) < 0.4
        assert summary["failed_calls"] > 0  # unparseable verdicts were resampled ...
        assert summary["chosen"] >= 195  # ... and then answered (rules-backed server: Response 1 wins)
        assert all(s.index == 0 for s in sels if s.index is not None)
        assert j.stats.retries > 0 and j.stats.failures == 0
        assert _check_retry_after_honoured(records) > 0
        assert srv.max_inflight <= 16
        assert all(r.authorization == f"Bearer {SECRET}" for r in records)  # the key was sent ...
        j.close()

        # a rerun with the same cache is served from it: the server sees no new request
        j2 = _judge(srv, cache)
        again = J.select_best(j2, ctxs, cands, tries=5)
        assert srv.requests == first_requests
        assert [s.to_json() for s in again] == [s.to_json() for s in sels]
        assert j2.stats.cache_hits == j2.stats.prompts > 0 and j2.stats.requests == 0
        j2.close()

    # ... but never stored or logged
    files = [p for p in cache.rglob("*") if p.is_file()]
    assert files and all(SECRET.encode() not in p.read_bytes() for p in files)
    assert SECRET not in caplog.text and all(SECRET not in str(r.args) for r in caplog.records)


def test_retry_after_is_honoured(tmp_path):
    # every key: attempt 0 -> 429 with Retry-After: 1, then an honest answer
    with FaultServer(script=lambda key, attempt, body: "429-1" if attempt == 0 else "ok") as srv:
        j = _judge(srv)
        out = j.complete([J.best_of_k_prompt([("user", "hi there")], ["Hey! How's your day going?", "no"])] * 1 +
                         [J.best_of_k_prompt([("user", "hello")], ["Hi! What's new with you today?", "no"])], seed=0)
        assert [c.text for c in out] == ["Response 1 is better"] * 2 and [c.attempts for c in out] == [2, 2]
        recs = srv.records
        assert len(recs) == 4 and [r.status for r in recs].count(429) == 2
        assert _check_retry_after_honoured(recs) == 2  # the gap the server saw is >= 1 s


def test_timeouts_and_server_errors_are_retried():
    faults = iter(["slow", "500", "503", "429-0"])
    with FaultServer(script=lambda key, attempt, body: next(faults, "ok"), slow_delay=TIMEOUT + 0.4) as srv:
        j = _judge(srv, max_concurrency=1)
        c = j.complete(["Say hi."], seed=0)[0]
        assert c.ok and c.attempts == 5 and j.stats.retries == 4
        assert [r.fault for r in srv.records] == ["slow", "500", "503", "429-0", None]


def test_bounded_attempts_end_in_a_recorded_failure():
    with FaultServer(script=lambda key, attempt, body: "503") as srv:
        j = _judge(srv, retry=RetryPolicy(max_attempts=3))
        out = j.complete(["a", "b"], seed=0)
        assert all(not c.ok and "503" in c.error and "after 3 attempts" in c.error for c in out)
        assert srv.requests == 6
        sel = J.select_best(j, [[("user", "x")]], [["a", "b"]], tries=2)[0]
        assert sel.verdict.kind == "failure" and sel.tries == 2 and "call failed" in sel.errors[0]


def test_client_errors_are_not_retried_and_echoed_keys_are_redacted(tmp_path, caplog):
    caplog.set_level(logging.DEBUG)
    with FaultServer(api_key="the-right-key") as srv:
        j = _judge(srv, tmp_path / "cache")
        c = j.complete(["hello"], seed=0)[0]
        assert not c.ok and c.attempts == 1 and "401" in c.error
        assert SECRET not in c.error and "***" in c.error  # the server quoted our key back
        assert srv.requests == 1
    assert SECRET not in caplog.text
    assert all(SECRET.encode() not in p.read_bytes() for p in (tmp_path / "cache").rglob("*") if p.is_file())


@pytest.mark.parametrize("fault", ["badjson", "nocontent"])
def test_malformed_responses_are_recorded_then_re_asked_by_the_verdict_layer(fault):
    # a 200 the client cannot use is no transport fault: no HTTP retry, a recorded failure ...
    with FaultServer(script=lambda key, attempt, body: fault if attempt == 0 else "ok") as srv:
        j = _judge(srv)
        c = j.complete(["Say hi."], seed=0)[0]
        assert not c.ok and "malformed" in c.error and c.attempts == 1 and srv.requests == 1
        assert j.stats.retries == 0 and j.stats.failures == 1
    # ... which select_best's re-ask (a new seed, so a new request) turns into a verdict
    with FaultServer(script=lambda key, attempt, body: fault if body.get("seed") == 0 else "ok") as srv:
        j = _judge(srv)
        sel = J.select_best(j, [[("user", "hi there")]], [["Hey! How's your day going?", "no"]], tries=3, seed=0)[0]
        assert sel.verdict.ok and sel.index == 0 and sel.tries == 2 and sel.failures == 1
        assert [r.fault for r in srv.records] == [fault, None]


def test_connection_refused_is_a_recorded_failure():
    srv = FaultServer().start()
    url = srv.url
    srv.stop()
    j = J.make_judge(f"openai:m@{url}", timeout=TIMEOUT, retry=RetryPolicy(max_attempts=2))
    c = j.complete(["hi"])[0]
    assert not c.ok and "connection" in c.error.lower()


def test_system_prompt_and_params_reach_the_server():
    with FaultServer(fault_rate=0.0) as srv:
        j = _judge(srv, system="You are a strict judge.")
        j.complete(["hello"], temperature=0.3, max_tokens=7, seed=42)
        body = srv.records[0].body
        assert body["model"] == "test-model" and body["temperature"] == 0.3 and body["max_tokens"] == 7
        assert body["seed"] == 42
        assert body["messages"] == [{"role": "system", "content": "You are a strict judge."},
                                    {"role": "user", "content": "hello"}]
        j.complete(["hello"], seed=None)
        assert "seed" not in srv.records[-1].body


def test_pairwise_and_annotation_over_http():
    with FaultServer(seed=3, fault_rate=0.3, slow_delay=TIMEOUT + 0.4) as srv:
        j = _judge(srv)
        nat = [("user", "I'm nervous about my exam."), ("assistant", "Aw, you've got this! What's the subject?")]
        verb = [("user", "I'm nervous about my exam."), ("assistant", "Examinations are assessments. " * 12)]
        res = J.compare_with_swap(j, [(nat, verb)] * 5)
        assert [r.winner for r in res] == ["a"] * 5
        from sage_jax.sac import Dialogue, Turn

        ds = [Dialogue(f"d{i}", (Turn("user", f"My dog {i} is sick."),
                                 Turn("assistant", "Oh no, I'm sorry. What happened?"))) for i in range(10)]
        annotated, failures = J.annotate_dialogues(j, ds)
        assert len(annotated) + len(failures) == 10 and len(annotated) >= 9
        assert all(d.meta["annotator"] == "openai:test-model" for d in annotated)
