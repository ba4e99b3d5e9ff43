"""Shared by the server tests: one tiny random engine with per-session sampling (as `moshi-jax serve` builds
it), compiled once for the whole test session for SERVER_SESSIONS slots."""

from __future__ import annotations

import pytest

SERVER_SESSIONS = 3


@pytest.fixture(scope="session")
def served_engine():
    from moshi_jax.engine.engine import Engine, EngineConfig
    from moshi_jax.engine.server import ChatServer

    engine, params = Engine.load(None, preset="tiny", seed=0, cfg=EngineConfig(item_sampling=True))
    params = engine.prepare_params(params)
    ChatServer(engine, params, max_sessions=SERVER_SESSIONS).warmup()  # compile step, reset and settings once
    return engine, params
