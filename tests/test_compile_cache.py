"""sage_jax.compile_cache: the entry points' persistent compilation cache, chosen by the environment
(a search run twice through the command loads its programs from it: tests/test_search_resume.py)."""

import os

from sage_jax import compile_cache

VARS = ("JAX_ENABLE_COMPILATION_CACHE", "JAX_COMPILATION_CACHE_DIR", "JAX_COMPILATION_CACHE_MAX_SIZE", "SAGE_JAX_CACHE")


def _clear(monkeypatch):
    for v in VARS:  # monkeypatch restores what enable() sets
        monkeypatch.delenv(v, raising=False)


def test_default_is_the_cache_root_bounded(monkeypatch, tmp_path):
    _clear(monkeypatch)
    monkeypatch.setenv("SAGE_JAX_CACHE", str(tmp_path))
    assert compile_cache.enable() == str(tmp_path / "xla") == os.environ["JAX_COMPILATION_CACHE_DIR"]
    assert os.environ["JAX_COMPILATION_CACHE_MAX_SIZE"] == str(4 << 30)


def test_the_users_choice_wins(monkeypatch, tmp_path):
    _clear(monkeypatch)
    monkeypatch.setenv("JAX_COMPILATION_CACHE_DIR", str(tmp_path / "mine"))
    assert compile_cache.enable() == str(tmp_path / "mine")
    assert "JAX_COMPILATION_CACHE_MAX_SIZE" not in os.environ  # JAX's unbounded default, as they set it
    for off in ("false", "0", "OFF"):
        _clear(monkeypatch)
        monkeypatch.setenv("JAX_ENABLE_COMPILATION_CACHE", off)
        assert compile_cache.enable() is None and "JAX_COMPILATION_CACHE_DIR" not in os.environ
