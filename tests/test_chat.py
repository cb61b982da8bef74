"""`sage-jax chat` (sage_jax.serve.chat) fed through stdin, and the serve/chat CLI registration."""

import argparse
import os
import subprocess
import sys

import pytest

from sage_jax.serve.chat import parse_pin


def test_parse_pin():
    assert parse_pin("a_motivation=humour") == {"a_motivation": "humour"}
    assert parse_pin("a_topic=[exam, school]") == {"a_topic": ["exam", "school"]}
    assert parse_pin("u_emotion=null") == {"u_emotion": None}
    with pytest.raises(ValueError):
        parse_pin("a_motivation")
    with pytest.raises(ValueError):
        parse_pin("mood=x")


def test_register_adds_serve_and_chat():
    from sage_jax.serve.cli import register

    from sage_jax.config import resolve_command_config
    from sage_jax.serve.chat import ChatConfig
    from sage_jax.serve.cli import ServeConfig

    p = argparse.ArgumentParser()
    register(p.add_subparsers(dest="command"))
    a = p.parse_args(["serve", "--model", "m", "--port", "0", "--max-batch", "4", "--max-queue", "2"])
    spec = a.func.args[0]  # the command's CommandSpec: flags are shorthands for config fields
    assert resolve_command_config(ServeConfig, a, spec) == ServeConfig(model="m", port=0, max_batch=4, max_queue=2)
    a = p.parse_args(["chat", "--model", "m", "--max-new-tokens", "5", "--temperature", "0", "top_p=0.5"])
    assert resolve_command_config(ChatConfig, a, a.func.args[0]) == ChatConfig(
        model="m", max_new_tokens=5, temperature=0.0, top_p=0.5)


def test_chat_subprocess(tiny_dir):
    env = dict(os.environ, JAX_PLATFORMS="cpu", XLA_FLAGS="")
    script = "hello\n/pin a_motivation=humour\nhi again\n/latents\n/reset\n/quit\n"
    r = subprocess.run([sys.executable, "-m", "sage_jax.serve.chat", "--model", str(tiny_dir),
                        "--max-new-tokens", "12", "--temperature", "0"],
                       input=script, capture_output=True, text=True, timeout=240, env=env)
    assert r.returncode == 0, r.stderr[-2000:]
    out = r.stdout
    assert out.count("assistant> ") == 2, out
    assert "[pinned for the next turn: {'a_motivation': 'humour'}]" in out
    # the pinned turn's action shows the pinned motivation (the prefill pins it)
    second = out.split("[pinned for the next turn")[1]
    assert "[action]     motivation=humour" in second
    assert "[latents off]" in out and "[new conversation]" in out and "[bye]" in out
