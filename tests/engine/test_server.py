"""The websocket server, driven by real websocket clients over loopback (127.0.0.1, an ephemeral port).

One tiny random engine (compiled once for the module) serves every test; each test starts its own server,
runs its clients with bounded waits, and stops the server. Clients speak the reference protocol exactly like
the reference client (`moshi/client.py`): sphn Ogg/Opus in and out, kind bytes 0x00 / 0x01 / 0x02.
"""

from __future__ import annotations

import asyncio
import dataclasses
import json

import numpy as np
import pytest

aiohttp = pytest.importorskip("aiohttp")
sphn = pytest.importorskip("sphn")

from moshi_jax.engine import protocol as P  # noqa: E402
from moshi_jax.engine.server import CHAT_PATH, ChatServer  # noqa: E402
from moshi_jax.engine.session import SessionSettings  # noqa: E402
from tests.engine.conftest import SERVER_SESSIONS  # noqa: E402

FRAME = 1920
MAX_SESSIONS = SERVER_SESSIONS
TIMEOUT = 60.0  # seconds: every wait in these tests is bounded


@pytest.fixture(scope="module")
def engine_and_params(served_engine):
    return served_engine  # tests/engine/conftest.py: per-session sampling, compiled for MAX_SESSIONS slots


@pytest.fixture(scope="module")
def speech():
    """Real speech (eSpeak NG), three voices: one utterance per client."""
    from moshi_jax.data.speech_synth import synthesize

    texts = ["Hello there.", "How are you today?", "Good morning."]
    voices = ["en-us", "en-us+f3", "en-gb+m3"]
    return [synthesize(t, v).audio for t, v in zip(texts, voices, strict=True)]


@dataclasses.dataclass
class ClientLog:
    first: bytes | None = None  # the first message (the handshake)
    audio_msgs: int = 0
    ogg: list = dataclasses.field(default_factory=list)  # audio payloads as received
    pcm: list = dataclasses.field(default_factory=list)
    text: list = dataclasses.field(default_factory=list)
    errors: list = dataclasses.field(default_factory=list)  # 0x05 payloads
    metadata: list = dataclasses.field(default_factory=list)  # 0x04 payloads (JSON)
    close_code: int | None = None
    close_reason: str | None = None

    @property
    def samples(self) -> int:
        return sum(p.size for p in self.pcm)


async def _reader(ws, log: ClientLog, want_audio: int | None) -> None:
    """Read server messages until the server closes, or until `want_audio` audio messages arrived."""
    reader = sphn.OpusStreamReader(P.SAMPLE_RATE)
    while want_audio is None or log.audio_msgs < want_audio:
        msg = await asyncio.wait_for(ws.receive(), TIMEOUT)
        if msg.type in (aiohttp.WSMsgType.CLOSE, aiohttp.WSMsgType.CLOSING, aiohttp.WSMsgType.CLOSED):
            is_close = msg.type == aiohttp.WSMsgType.CLOSE  # the close frame itself: code and reason
            log.close_code = msg.data if is_close else ws.close_code
            log.close_reason = msg.extra if is_close else None
            return
        assert msg.type == aiohttp.WSMsgType.BINARY, f"server sent a non-binary message: {msg.type}"
        data = msg.data
        if log.first is None:
            log.first = data
            continue
        kind, payload = data[0], data[1:]
        if kind == P.Kind.AUDIO:
            log.audio_msgs += 1
            log.ogg.append(payload)
            log.pcm.append(reader.append_bytes(payload))
        elif kind == P.Kind.TEXT:
            log.text.append(payload.decode("utf-8"))
        elif kind == P.Kind.ERROR:
            log.errors.append(payload.decode("utf-8"))
        elif kind == P.Kind.METADATA:
            log.metadata.append(json.loads(payload))
        else:
            raise AssertionError(f"unexpected message kind {kind}")


async def _send_audio(ws, audio: np.ndarray, frames: int, period_s: float = 0.08) -> list[bytes]:
    """Send `frames` 80 ms frames of `audio` (zero padded) as Ogg/Opus, paced like a microphone.
    Returns the Ogg payloads sent."""
    writer = sphn.OpusStreamWriter(P.SAMPLE_RATE)
    audio = np.pad(audio, (0, max(0, frames * FRAME - audio.size)))
    sent = []
    for i in range(frames):
        ogg = writer.append_pcm(audio[i * FRAME: (i + 1) * FRAME].astype(np.float32))
        if len(ogg):
            await ws.send_bytes(P.encode_audio(ogg))
            sent.append(bytes(ogg))
        await asyncio.sleep(period_s)
    return sent


async def _run_with_server(engine_and_params, scenario, max_sessions: int = MAX_SESSIONS, **server_kw):
    engine, params = engine_and_params
    server = ChatServer(engine, params, max_sessions=max_sessions, batch_window_s=0.08, **server_kw)
    try:
        port = await server.start("127.0.0.1", 0)
        url = f"http://127.0.0.1:{port}{CHAT_PATH}"
        async with aiohttp.ClientSession() as session:
            return await asyncio.wait_for(scenario(server, session, url), 4 * TIMEOUT)
    finally:
        await server.stop()
        server.close()


def _run(engine_and_params, scenario, **kw):
    return asyncio.run(_run_with_server(engine_and_params, scenario, **kw))


async def _wait_for(cond, what: str) -> None:
    for _ in range(int(TIMEOUT / 0.02)):
        if cond():
            return
        await asyncio.sleep(0.02)
    raise AssertionError(f"timed out waiting for {what}")


async def _join(session, url, want_audio: int | None):
    """Connect one client, start its reader and wait for the server's handshake -> (ws, log, reader task)."""
    ws = await session.ws_connect(url)
    log = ClientLog()
    reader = asyncio.ensure_future(_reader(ws, log, want_audio))
    await _wait_for(lambda: log.first is not None, "the handshake")
    return ws, log, reader


def test_concurrent_clients_get_handshake_then_audio_and_text_from_one_batched_engine(engine_and_params, speech):
    frames = 6  # 480 ms each; the first input frame is dropped as in the reference server -> 5 frames back

    async def scenario(server, session, url):
        wss = [await session.ws_connect(url) for _ in range(MAX_SESSIONS)]
        logs = [ClientLog() for _ in wss]
        readers = [asyncio.ensure_future(_reader(ws, lg, frames - 1)) for ws, lg in zip(wss, logs, strict=True)]
        await _wait_for(lambda: all(lg.first is not None for lg in logs), "the handshakes")
        assert server.num_sessions == MAX_SESSIONS
        await asyncio.gather(*[_send_audio(ws, s, frames) for ws, s in zip(wss, speech, strict=True)])
        await asyncio.wait_for(asyncio.gather(*readers), TIMEOUT)
        for ws in wss:
            await ws.close()
        await _wait_for(lambda: server.num_sessions == 0, "the sessions to close")
        return logs

    logs = _run(engine_and_params, scenario)
    for lg in logs:
        assert lg.first == b"\x00"  # the reference handshake
        assert lg.audio_msgs == frames - 1 and not lg.errors
        assert all(p.dtype == np.float32 for p in lg.pcm)
        assert lg.samples >= (frames - 2) * FRAME  # Opus decoding may hold back a few ms at the end
        assert all(isinstance(t, str) and t for t in lg.text)
    assert sum(len(lg.text) for lg in logs) > 0  # the random model's text is mostly not PAD


def test_the_server_sends_exactly_what_the_engine_computes_from_the_audio_it_received(engine_and_params, speech):
    """End to end, bit for bit: the client's Opus -> the server's PCM frames -> the engine in the client's slot
    -> Opus + text back. Replayed here by hand with the same engine, state history and Opus codec."""
    engine, params = engine_and_params
    frames = 6

    async def scenario(server, session, url):
        ws, lg, reader = await _join(session, url, frames - 1)
        sent = await _send_audio(ws, speech[2], frames)
        await asyncio.wait_for(reader, TIMEOUT)
        try:  # the text piece of the last frame follows its audio
            while True:
                msg = await asyncio.wait_for(ws.receive(), 1.0)
                if msg.type != aiohttp.WSMsgType.BINARY:
                    break
                assert msg.data[0] == P.Kind.TEXT
                lg.text.append(msg.data[1:].decode())
        except TimeoutError:
            pass
        await ws.close()
        return sent, lg

    sent, lg = _run(engine_and_params, scenario)

    dec = P.OpusDecoder(FRAME)  # what the server decoded
    for ogg in sent:
        dec.feed(ogg)
    pcm_in = [dec.pop_frame() for _ in range(dec.frames_ready)]
    assert len(pcm_in) == frames

    B = MAX_SESSIONS
    mine = np.arange(B) == 0  # the first client gets slot 0
    meta = lg.metadata[0]  # the session's settings, with the seeds the server drew for it
    defaults = {k: v for k, v in SessionSettings.from_sampling(engine.cfg.sampling).as_dict().items()
                if not k.endswith("_seed")}
    assert {k: meta[k] for k in defaults} == defaults  # the query was empty
    settings = SessionSettings(**{k: meta[k] for k in SessionSettings().as_dict()})
    state = engine.reset(engine.init_state(B), np.ones(B, bool))  # the server's warm-up ...
    state, _ = engine.step_donated(params, state, np.zeros((B, FRAME), np.float32), np.zeros(B, bool))
    state = engine.reset(state, np.ones(B, bool))
    state = engine.set_item_sampling(state, 0, **settings.engine_values())  # ... the join: settings, reset
    state = engine.reset(state, mine)
    enc = P.OpusEncoder()
    want_ogg, want_text = [], []
    for frame in pcm_in:
        x = np.zeros((B, FRAME), np.float32)
        x[0] = frame
        state, out = engine.step_donated(params, state, x, mine)
        if bool(out.audio_valid[0]):
            want_ogg.append(enc.encode(np.asarray(out.pcm[0])))
        piece = engine.text_piece(int(out.text_token[0])) if bool(out.valid[0]) else None
        if piece:
            want_text.append(piece)
    assert b"".join(lg.ogg) == b"".join(want_ogg) and len(lg.ogg) == frames - 1
    assert lg.text == want_text


def test_clients_are_batched_into_shared_engine_steps(engine_and_params, speech):
    frames = 6

    async def scenario(server, session, url):
        wss = [await session.ws_connect(url) for _ in range(2)]
        logs = [ClientLog() for _ in wss]
        readers = [asyncio.ensure_future(_reader(ws, lg, frames - 1)) for ws, lg in zip(wss, logs, strict=True)]
        await _wait_for(lambda: all(lg.first is not None for lg in logs), "the handshakes")
        await asyncio.gather(*[_send_audio(ws, s, frames) for ws, s in zip(wss, speech[:2], strict=True)])
        await asyncio.wait_for(asyncio.gather(*readers), TIMEOUT)
        for ws in wss:
            await ws.close()
        return server.stats

    stats = _run(engine_and_params, scenario)
    assert stats.frames_in == 2 * frames and stats.frames_out == 2 * (frames - 1)
    assert stats.max_batch == 2  # both conversations advanced in one step at least once
    assert stats.steps < stats.frames_in


def test_a_client_disconnecting_mid_stream_leaves_the_others_served_and_frees_its_slot(engine_and_params, speech):
    frames = 8

    async def scenario(server, session, url):
        # the quitter has its own HTTP session: closing that drops its TCP connection without a close frame
        quitter_session = aiohttp.ClientSession()
        quitter = await quitter_session.ws_connect(url)
        stayers = [await session.ws_connect(url) for _ in range(MAX_SESSIONS - 1)]
        logs = [ClientLog() for _ in stayers]
        readers = [asyncio.ensure_future(_reader(ws, lg, frames - 1)) for ws, lg in zip(stayers, logs, strict=True)]
        qlog = ClientLog()
        qreader = asyncio.ensure_future(_reader(quitter, qlog, 2))
        await _wait_for(lambda: qlog.first is not None and all(lg.first for lg in logs), "the handshakes")

        # the server is full and has no waiting room: one more client is turned away with a clear reason
        extra = await session.ws_connect(url)
        elog = ClientLog()
        await _reader(extra, elog, None)

        async def quit_mid_stream():
            await _send_audio(quitter, speech[0], 3)
            await asyncio.wait_for(qreader, TIMEOUT)  # got its first outputs, then vanishes mid-conversation
            await quitter_session.close()

        senders = [_send_audio(ws, s, frames) for ws, s in zip(stayers, speech[1:], strict=True)]
        await asyncio.gather(quit_mid_stream(), *senders)
        await asyncio.wait_for(asyncio.gather(*readers), TIMEOUT)
        await _wait_for(lambda: server.num_sessions == MAX_SESSIONS - 1, "the quitter's slot to be freed")

        # its slot is free again: a new client joins a fresh conversation there and is served
        late = await session.ws_connect(url)
        llog = ClientLog()
        lreader = asyncio.ensure_future(_reader(late, llog, 2))
        await _send_audio(late, speech[0], 3)
        await asyncio.wait_for(lreader, TIMEOUT)
        for ws in [*stayers, late]:
            await ws.close()
        return logs, qlog, elog, llog

    logs, qlog, elog, llog = _run(engine_and_params, scenario, max_queue=0)  # no waiting room: refused at once
    assert qlog.audio_msgs == 2
    for lg in logs:
        assert lg.audio_msgs == frames - 1 and not lg.errors and lg.close_code is None
    assert elog.first == P.encode_error(elog.close_reason)  # no handshake: an error message, then the close
    assert elog.close_code == P.CLOSE_TRY_AGAIN_LATER and "server full" in elog.close_reason
    assert llog.first == b"\x00" and llog.audio_msgs == 2


BAD_MESSAGES = {
    "text frame": ("str", "hello", P.CLOSE_UNSUPPORTED_DATA, "text websocket frames"),
    "unknown kind": ("bytes", b"\x09\x01\x02", P.CLOSE_UNSUPPORTED_DATA, "unknown message kind 0x09"),
    "server-only kind": ("bytes", b"\x02hi", P.CLOSE_UNSUPPORTED_DATA, "sent by the server only"),
    "not Ogg": ("bytes", b"\x01RIFF\x00\x00\x00\x00WAVE", P.CLOSE_INVALID_PAYLOAD, "must start with an Ogg page"),
    "bad Opus": ("bytes", b"\x01OggS" + bytes(60), P.CLOSE_INVALID_PAYLOAD, "not a valid Ogg/Opus stream"),
    "bad control": ("bytes", b"\x03\x09", P.CLOSE_INVALID_PAYLOAD, "bad control"),
}


def test_malformed_messages_close_only_their_connection_with_a_clear_reason(engine_and_params, speech):
    frames = 8

    async def scenario(server, session, url):
        good, glog, greader = await _join(session, url, frames - 1)

        async def bad_client(how, data):
            ws, lg, reader = await _join(session, url, None)
            if how == "str":
                await ws.send_str(data)
            else:
                await ws.send_bytes(data)
            await asyncio.wait_for(reader, TIMEOUT)
            return lg

        async def bad_clients():
            out = {}
            for name, (how, data, _, _) in BAD_MESSAGES.items():  # two slots stay for them: one at a time
                out[name] = await bad_client(how, data)
            return out

        bad, _ = await asyncio.gather(bad_clients(), _send_audio(good, speech[0], frames))
        await asyncio.wait_for(greader, TIMEOUT)
        await good.close()
        return glog, bad

    glog, bad = _run(engine_and_params, scenario)
    assert glog.audio_msgs == frames - 1 and glog.close_code is None and not glog.errors
    for name, (_, _, code, words) in BAD_MESSAGES.items():
        lg = bad[name]
        assert lg.close_code == code, name
        assert words in lg.close_reason, (name, lg.close_reason)
        assert lg.errors == [lg.close_reason], name  # the same reason as a 0x05 error message first


def test_server_rejects_bad_settings():
    class FakeCfg:
        frame_size, sample_rate = FRAME, P.SAMPLE_RATE

    class NoEngine:
        mimi_cfg = FakeCfg()

    with pytest.raises(ValueError, match="max_sessions must be >= 1"):
        ChatServer(NoEngine(), None, max_sessions=0)
    with pytest.raises(ValueError, match="batch_window_s must be >= 0"):
        ChatServer(NoEngine(), None, batch_window_s=-1)


class _FailingOnce:
    """The real engine, except that its step raises once when `fail` is set (an engine crash mid-stream)."""

    def __init__(self, engine):
        self._engine, self.fail = engine, False

    def __getattr__(self, name):
        return getattr(self._engine, name)

    def step_donated(self, *args):
        if self.fail:
            self.fail = False
            raise RuntimeError("simulated device failure")
        return self._engine.step_donated(*args)


def test_an_engine_failure_closes_its_sessions_with_1011_and_the_server_keeps_serving(engine_and_params, speech):
    engine, params = engine_and_params
    failing = _FailingOnce(engine)

    async def scenario(server, session, url):
        ws, lg, reader = await _join(session, url, None)
        await _send_audio(ws, speech[0], 2)
        await _wait_for(lambda: lg.audio_msgs >= 1, "the first output")
        failing.fail = True
        try:
            await _send_audio(ws, speech[0], 2)
        except ConnectionResetError:  # the server may close us before the second frame is sent
            pass
        await asyncio.wait_for(reader, TIMEOUT)

        again = await session.ws_connect(url)  # the server recovered: a new conversation is served
        lg2 = ClientLog()
        reader2 = asyncio.ensure_future(_reader(again, lg2, 2))
        await _send_audio(again, speech[1], 3)
        await asyncio.wait_for(reader2, TIMEOUT)
        await again.close()
        return lg, lg2

    lg, lg2 = _run((failing, params), scenario)
    assert lg.close_code == P.CLOSE_INTERNAL_ERROR and "engine error: RuntimeError" in lg.close_reason
    assert lg2.first == b"\x00" and lg2.audio_msgs == 2


def test_a_client_buffering_more_audio_than_allowed_is_closed_with_1008(engine_and_params, speech):
    async def scenario(server, session, url):
        ws, lg, reader = await _join(session, url, None)
        try:
            await _send_audio(ws, speech[0], 3, period_s=0.0)
        except ConnectionResetError:
            pass
        await asyncio.wait_for(reader, TIMEOUT)
        return lg

    lg = _run(engine_and_params, scenario, max_backlog_frames=0)  # any buffered frame is too much
    assert lg.close_code == P.CLOSE_POLICY and "faster than it is processed" in lg.close_reason
