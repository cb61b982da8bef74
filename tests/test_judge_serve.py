"""The `openai:` judge backend driving `sage-jax serve` running SmolLM2 as a real judge, on loopback."""

import pytest

from sage_jax.judge import make_judge, select_best
from sage_jax.rollout.policy import load_policy
from sage_jax.serve import make_server

pytestmark = pytest.mark.slow


def test_openai_backend_judges_with_smollm2_served_on_loopback(tmp_path, smollm2_dir, monkeypatch):
    monkeypatch.setenv("SAGE_JUDGE_API_KEY", "sk-test-not-a-real-key")
    server = make_server(load_policy(str(smollm2_dir)), max_batch=8).start()
    try:
        judge = make_judge(f"openai:smollm2@{server.url}", cache_dir=tmp_path / "cache")  # url ends in /v1
        contexts = [[("user", "I failed my driving test today.")], [("user", "My cat just had kittens!")]]
        candidates = [["Oh no, that's rough. What happened?", "ok."],
                      ["Congratulations! How many did she have?", "Cats are animals."]]
        sels = select_best(judge, contexts, candidates, tries=2, max_tokens=16)
        assert len(sels) == 2
        for s in sels:  # a real small model: a verdict or a recorded failure, never a crash
            assert s.verdict.kind in ("choice", "none", "failure") and s.tries >= 1
            assert (s.index is not None) == (s.verdict.kind == "choice")
        served = server.stats["requests"]
        assert served >= 2  # the judge really went through the HTTP server
        again = select_best(judge, contexts, candidates, tries=2, max_tokens=16)
        assert [s.verdict.kind for s in again] == [s.verdict.kind for s in sels]
        assert server.stats["requests"] == served or any(s.verdict.kind == "failure" for s in sels)
    finally:
        server.close()
