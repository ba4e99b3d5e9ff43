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


@pytest.mark.parametrize("argv, words", [
    (["serve", "--max-queue", "-1"], "--max-queue must be >= 0"),
    (["serve", "--idle-timeout", "-1"], "--idle-timeout must be >= 0"),
    (["serve", "--heartbeat", "nan"], "--heartbeat must be >= 0"),
    (["serve", "--static", "/nonexistent/client/dist"], "is not a folder with an index.html"),
])
def test_serve_rejects_bad_waiting_room_timeout_and_static_arguments(argv, words, caplog):
    assert cli.main(argv) == 2
    assert words in caplog.text


def test_a_port_in_use_is_a_one_line_error_before_any_model_is_built(monkeypatch, caplog, capsys):
    import socket

    from moshi_jax.engine.engine import Engine

    def no_model(*args, **kwargs):
        raise AssertionError("the model was built before the port was checked")

    monkeypatch.setattr(Engine, "load", no_model)
    taken = socket.socket()
    taken.bind(("127.0.0.1", 0))
    taken.listen(1)
    port = taken.getsockname()[1]
    try:
        assert cli.main(["serve", "--port", str(port)]) == 2
    finally:
        taken.close()
    assert f"cannot listen on 127.0.0.1:{port}: Address already in use" in caplog.text
    assert "Traceback" not in caplog.text + capsys.readouterr().err
