"""The server's sessions: per-session settings and 0x04 metadata, the waiting room, idle timeout and heartbeats,
the web page at /, the port bound before the warm-up. Real websocket clients over loopback, the tiny engine
of tests/engine/conftest.py (per-session sampling, compiled once)."""

from __future__ import annotations

import asyncio
import dataclasses
import json
import socket

import numpy as np
import pytest

aiohttp = pytest.importorskip("aiohttp")
sphn = pytest.importorskip("sphn")

from moshi_jax.engine import protocol as P  # noqa: E402
from moshi_jax.engine.server import CHAT_PATH, WEB_DIR, ChatServer  # noqa: E402
from tests.engine.conftest import SERVER_SESSIONS  # noqa: E402
from tests.engine.test_server import TIMEOUT, _send_audio, _wait_for  # noqa: E402

REFERENCE_CLIENT_INFO = {  # the fields (and types) the reference web client's server-info panel requires
    "text_temperature": float, "text_topk": int, "audio_temperature": float, "audio_topk": int, "pad_mult": float,
    "repetition_penalty_context": int, "repetition_penalty": float, "lm_model_file": str, "instance_name": str}


@pytest.fixture(scope="module")
def speech():
    from moshi_jax.data.speech_synth import synthesize

    return [synthesize(t, v).audio for t, v in (("Hello there.", "en-us"), ("Good morning.", "en-gb+m3"))]


@dataclasses.dataclass
class Peer:
    """One websocket client and everything it received, in order."""

    ws: object
    msgs: list = dataclasses.field(default_factory=list)  # (kind, payload)
    close_code: int | None = None
    close_reason: str | None = None
    task: asyncio.Task | None = None

    def of(self, kind) -> list[bytes]:
        return [p for k, p in self.msgs if k == kind]

    @property
    def admitted(self) -> bool:
        return bool(self.of(P.Kind.HANDSHAKE))

    @property
    def metadata(self) -> list[dict]:
        return [json.loads(p) for p in self.of(P.Kind.METADATA)]

    @property
    def queue(self) -> list[tuple[int, int]]:
        return [(m["queue_position"], m["queue_length"]) for m in self.metadata if "queue_position" in m]

    @property
    def closed(self) -> bool:
        return self.task is not None and self.task.done()

    def pcm(self) -> np.ndarray:
        reader = sphn.OpusStreamReader(P.SAMPLE_RATE)
        return np.concatenate([reader.append_bytes(p) for p in self.of(P.Kind.AUDIO)] or [np.zeros(0, np.float32)])

    def text(self) -> str:
        return "".join(p.decode() for p in self.of(P.Kind.TEXT))


async def _read(peer: Peer) -> None:
    while True:
        msg = await peer.ws.receive()
        if msg.type == aiohttp.WSMsgType.CLOSE:
            peer.close_code, peer.close_reason = msg.data, msg.extra
            return
        if msg.type in (aiohttp.WSMsgType.CLOSING, aiohttp.WSMsgType.CLOSED, aiohttp.WSMsgType.ERROR):
            peer.close_code = peer.ws.close_code
            return
        if msg.type == aiohttp.WSMsgType.BINARY:
            peer.msgs.append((msg.data[0], msg.data[1:]))


async def _connect(session, url, query: str = "", **kw) -> Peer:
    peer = Peer(await session.ws_connect(url + (f"?{query}" if query else ""), **kw))
    peer.task = asyncio.ensure_future(_read(peer))
    return peer


async def _wait(cond, what):
    await _wait_for(cond, what)


async def _run_server(engine_and_params, scenario, **kw):
    engine, params = engine_and_params
    kw.setdefault("idle_timeout_s", None)  # silent test clients stay unless a test sets a timeout
    server = ChatServer(engine, params, max_sessions=SERVER_SESSIONS, **kw)
    try:
        port = await server.start("127.0.0.1", 0)
        async with aiohttp.ClientSession() as session:
            base = f"http://127.0.0.1:{port}"
            return await asyncio.wait_for(scenario(server, session, base + CHAT_PATH, base), 4 * TIMEOUT)
    finally:
        await server.stop()
        server.close()


def _run(engine_and_params, scenario, **kw):
    return asyncio.run(_run_server(engine_and_params, scenario, **kw))


# ------------------------------------------------------------------------------------------ settings, metadata
def test_the_handshake_is_followed_by_metadata_with_the_sessions_settings_and_seeds(served_engine):
    async def scenario(server, session, url, base):
        peer = await _connect(session, url, "text_topk=5&text_seed=7&pad_mult=0.5&email=me")
        await _wait(lambda: len(peer.msgs) >= 2, "handshake + metadata")
        await peer.ws.close()
        return peer

    peer = _run(served_engine, scenario)
    assert peer.msgs[0] == (P.Kind.HANDSHAKE, b"")
    assert peer.msgs[1][0] == P.Kind.METADATA
    meta = peer.metadata[0]
    assert meta["text_topk"] == 5 and meta["text_seed"] == 7 and meta["pad_mult"] == 0.5
    assert isinstance(meta["audio_seed"], int)  # drawn by the server, reported so the session can be replayed
    assert meta["defaults"]["text_topk"] == 25 and meta["ignored_parameters"] == ["email"]
    assert meta["version"] and meta["model"] == "moshi-jax"
    for name, kind in REFERENCE_CLIENT_INFO.items():
        assert isinstance(meta[name], kind if kind is not float else (int, float)), name
    assert set(meta["build_info"]) >= {"build_timestamp", "git_hash", "rustc_version", "cargo_target_triple"}


@pytest.mark.parametrize("query, name", [("text_temperature=-1", "text_temperature"), ("audio_topk=x", "audio_topk"),
                                         ("repetition_penalty_context=9999", "repetition_penalty_context")])
def test_a_bad_setting_gets_a_0x05_naming_it_and_a_close_before_any_handshake(served_engine, query, name):
    async def scenario(server, session, url, base):
        peer = await _connect(session, url, query)
        await asyncio.wait_for(peer.task, TIMEOUT)
        return peer, server.num_sessions

    peer, sessions = _run(served_engine, scenario)
    assert [k for k, _ in peer.msgs] == [P.Kind.ERROR] and sessions == 0
    assert peer.close_code == P.CLOSE_POLICY and f"bad setting {name}=" in peer.close_reason
    assert peer.of(P.Kind.ERROR)[0].decode() == peer.close_reason


def test_a_session_is_reproducible_from_its_seeds_whatever_its_neighbour_does(served_engine, speech):
    frames = 6
    mine = "text_seed=1&audio_seed=2&text_temperature=0.9&audio_topk=50&repetition_penalty=1.3"

    async def converse(session, url, query, audio):
        peer = await _connect(session, url, query)
        await _wait(lambda: peer.admitted, "the handshake")
        await _send_audio(peer.ws, audio, frames)
        await _wait(lambda: len(peer.of(P.Kind.AUDIO)) >= frames - 1, "the replies")
        await asyncio.sleep(0.3)  # the last text piece follows its audio
        await peer.ws.close()
        return peer

    async def scenario(server, session, url, base):
        alone = await converse(session, url, mine, speech[0])  # slot 0, alone
        await _wait(lambda: server.num_sessions == 0, "the slot to free")
        other = await _connect(session, url, "text_seed=5&audio_seed=6&text_temperature=2&audio_temperature=1.5")
        await _wait(lambda: other.admitted, "the neighbour")  # takes slot 0 and talks at the same time
        neighbour = asyncio.ensure_future(_send_audio(other.ws, speech[1], frames))
        again = await converse(session, url, mine, speech[0])  # slot 1, batched with the neighbour
        await neighbour
        await other.ws.close()
        return alone, again, server.stats.max_batch

    alone, again, max_batch = _run(served_engine, scenario)
    assert alone.metadata[0]["slot"] == 0 and again.metadata[0]["slot"] == 1 and max_batch == 2
    np.testing.assert_array_equal(alone.pcm(), again.pcm())
    assert alone.text() == again.text() and alone.pcm().size > 0


# ------------------------------------------------------------------------------------------ waiting room
def test_the_waiting_room_admits_in_arrival_order_and_tells_each_client_its_position(served_engine, speech):
    async def scenario(server, session, url, base):
        inside = [await _connect(session, url) for _ in range(SERVER_SESSIONS)]
        await _wait(lambda: all(p.admitted for p in inside), "the first clients")
        b, c, d = [await _connect(session, url) for _ in range(3)]
        await _wait(lambda: server.num_waiting == 3 and d.queue, "three waiting")
        refused = await _connect(session, url)  # the queue is full (max_queue=3)
        await asyncio.wait_for(refused.task, TIMEOUT)
        await c.ws.close()  # leaves the queue: d moves up, b keeps its place
        await _wait(lambda: d.queue[-1] == (2, 2), "d to move up")
        await inside[0].ws.close()  # a slot frees: b (first in line) gets in, d is next
        await _wait(lambda: b.admitted and d.queue[-1] == (1, 1), "b admitted")
        await b.ws.close()
        await _wait(lambda: d.admitted, "d admitted")
        await _send_audio(d.ws, speech[0], 3)  # and is served
        await _wait(lambda: len(d.of(P.Kind.AUDIO)) >= 2, "d's replies")
        for p in [*inside[1:], d]:
            await p.ws.close()
        return server.stats, inside, b, c, d, refused

    stats, inside, b, c, d, refused = _run(served_engine, scenario, max_queue=3)
    assert b.queue == [(1, 1)] and c.queue == [(2, 2)] and d.queue == [(3, 3), (2, 2), (1, 1)]
    assert not c.admitted and b.msgs[1][0] == P.Kind.HANDSHAKE  # b: position, then the handshake
    first = [m["slot"] for m in (p.metadata[0] for p in inside)]
    assert first == list(range(SERVER_SESSIONS))
    assert b.metadata[-1]["slot"] == 0 and d.metadata[-1]["slot"] == 0  # the freed slot, in turn
    assert stats.admitted_order == [1, 2, 3, SERVER_SESSIONS + 1, SERVER_SESSIONS + 3] and stats.queued == 3
    assert refused.close_code == P.CLOSE_TRY_AGAIN_LATER and "server full" in refused.close_reason
    assert not refused.admitted and refused.of(P.Kind.ERROR)


def test_audio_sent_while_waiting_is_dropped_and_its_stream_goes_on_after_admission(served_engine, speech):
    """A client that streams before its handshake (one Ogg stream from the start): what it sent while waiting
    is not part of the conversation, the rest of the same stream is; stopping the server closes everyone."""
    async def scenario(server, session, url, base):
        inside = [await _connect(session, url) for _ in range(SERVER_SESSIONS)]
        waiting = await _connect(session, url)
        await _wait(lambda: waiting.queue, "the queue position")
        writer = sphn.OpusStreamWriter(P.SAMPLE_RATE)  # one stream: its headers are sent while waiting
        audio = np.pad(speech[0], (0, 10 * 1920))

        async def send(frames):
            for i in frames:
                ogg = writer.append_pcm(audio[i * 1920:(i + 1) * 1920].astype(np.float32))
                if len(ogg):
                    await waiting.ws.send_bytes(P.encode_audio(ogg))
                await asyncio.sleep(0.02)

        await send(range(0, 4))
        await asyncio.sleep(0.2)
        dropped = server.stats.frames_in
        await inside[0].ws.close()
        await _wait(lambda: waiting.admitted, "admission")
        await send(range(4, 10))
        await _wait(lambda: len(waiting.of(P.Kind.AUDIO)) >= 3, "replies to the rest of the stream")
        await server.stop()  # while the clients are still connected
        await asyncio.wait_for(asyncio.gather(*(p.task for p in [*inside[1:], waiting])), TIMEOUT)
        return inside[1:], waiting, dropped, server.stats.frames_in

    inside, waiting, dropped, frames_in = _run(served_engine, scenario)
    assert dropped == 0 and 3 <= frames_in <= 6  # only the frames sent after the handshake are stepped
    for p in [*inside, waiting]:  # server.stop() closed everyone with 1001 and the reason
        assert p.close_code == P.CLOSE_GOING_AWAY and p.close_reason == "server shutting down"


# ------------------------------------------------------------------------------------------ silent clients
def test_idle_clients_are_dropped_after_the_timeout_and_a_waiting_user_gets_in(served_engine, speech):
    async def scenario(server, session, url, base):
        silent = [await _connect(session, url) for _ in range(SERVER_SESSIONS)]
        await _wait(lambda: all(p.admitted for p in silent), "the silent clients")
        waiting = await _connect(session, url)
        await _wait(lambda: waiting.queue, "the queue position")
        await _wait(lambda: waiting.admitted, "the waiting user to get in")
        # it talks for longer than the timeout and is not dropped
        await _send_audio(waiting.ws, speech[0], 25)
        served = len(waiting.of(P.Kind.AUDIO))
        await waiting.ws.close()
        return silent, waiting, served, server.stats.idle_closed

    silent, waiting, served, idle_closed = _run(served_engine, scenario, idle_timeout_s=1.5)
    assert idle_closed == SERVER_SESSIONS
    for p in silent:
        assert p.close_code == P.CLOSE_POLICY and "idle: no audio for 1.5 s" in p.close_reason
    assert waiting.close_code is None and served >= 20


def test_a_peer_that_stops_answering_pings_is_dropped(served_engine):
    async def scenario(server, session, url, base):
        # autoping=False and nobody reading: the client never answers the server's pings (a dead peer)
        mute = [await session.ws_connect(url, autoping=False) for _ in range(SERVER_SESSIONS)]
        await _wait(lambda: server.num_sessions == SERVER_SESSIONS, "the mute clients")
        waiting = await _connect(session, url)
        await _wait(lambda: waiting.queue, "the queue position")
        await _wait(lambda: waiting.admitted, "the waiting user to get in")
        await waiting.ws.close()
        return server.stats, len(mute)

    stats, mute = _run(served_engine, scenario, heartbeat_s=1.5, idle_timeout_s=None)
    assert stats.sessions_closed >= mute and stats.idle_closed == 0  # dropped by the heartbeat, not the timeout


# ------------------------------------------------------------------------------------------ page, port
def test_the_web_page_and_its_modules_are_served_at_root(served_engine, tmp_path):
    async def scenario(server, session, url, base):
        out = {}
        for path in ("/", "/app.js", "/ogg.js", "/worklets.js", "/style.css", "/nope.js"):
            async with session.get(base + path) as r:
                out[path] = (r.status, r.content_type, await r.text())
        return out

    got = _run(served_engine, scenario)
    assert got["/"][0] == 200 and got["/"][1] == "text/html" and 'src="app.js"' in got["/"][2]
    for path in ("/app.js", "/ogg.js", "/worklets.js"):
        assert got[path][0] == 200 and "javascript" in got[path][1], path
    assert got["/"][2] == (WEB_DIR / "index.html").read_text() and got["/nope.js"][0] == 404

    (tmp_path / "index.html").write_text("<html>another client</html>")
    got = _run(served_engine, scenario, static_dir=tmp_path)
    assert got["/"][2] == "<html>another client</html>" and got["/app.js"][0] == 404
    with pytest.raises(ValueError, match="has no index.html"):
        ChatServer(*served_engine, static_dir=tmp_path / "missing")


def test_a_port_in_use_fails_before_the_model_is_warmed_up(served_engine):
    engine, params = served_engine
    taken = socket.socket()
    taken.bind(("127.0.0.1", 0))
    taken.listen(1)
    server = ChatServer(engine, params, max_sessions=SERVER_SESSIONS)
    try:
        with pytest.raises(OSError):
            asyncio.run(server.start("127.0.0.1", taken.getsockname()[1]))
        assert server._state is None  # nothing was compiled or allocated
    finally:
        server.close()
        taken.close()


@pytest.mark.parametrize("kw, words", [({"max_queue": -1}, "max_queue must be >= 0"),
                                       ({"idle_timeout_s": 0}, "idle_timeout_s must be > 0"),
                                       ({"heartbeat_s": -1}, "heartbeat_s must be > 0")])
def test_server_rejects_bad_waiting_room_and_timeout_settings(served_engine, kw, words):
    with pytest.raises(ValueError, match=words):
        ChatServer(*served_engine, **kw)
