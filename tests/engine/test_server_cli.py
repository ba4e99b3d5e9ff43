"""`moshi-jax serve` argument checks (fail fast with a clear message, before any model is built)."""

from __future__ import annotations

import pytest

from moshi_jax import cli


@pytest.mark.parametrize("argv, words", [
    (["serve", "--max-sessions", "0"], "--max-sessions must be >= 1"),
    (["serve", "--port", "70000"], "--port must be in 0..65535"),
    (["serve", "--preset", "huge"], "--preset must be one of"),
    (["serve", "--weights-dir", "/nonexistent/moshi-repo"], "is not a directory"),
])
def test_serve_rejects_bad_arguments_with_a_clear_error(argv, words, caplog):
    assert cli.main(argv) == 2
    assert words in caplog.text


def test_serve_help_names_the_protocol_and_the_defaults(capsys):
    with pytest.raises(SystemExit) as e:
        cli.main(["serve", "--help"])
    assert e.value.code == 0
    out = capsys.readouterr().out
    assert "/api/chat" in out and "8998" in out and "127.0.0.1" in out
