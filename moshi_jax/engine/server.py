"""`moshi-jax serve`: the reference server's websocket protocol, many clients batched into ONE engine.

    server = ChatServer(engine, params, max_sessions=4)
    await server.start("127.0.0.1", 8998)     # ws://127.0.0.1:8998/api/chat
    ...
    await server.stop()

or `serve(engine, params, host, port, max_sessions)` (blocking, what the CLI runs). `GET /` serves the web
page (moshi_jax/engine/web/, or `static_dir`): open http://127.0.0.1:8998 in a browser.

Design
- One engine state of batch B = max_sessions. Each websocket client gets a free slot (batch row); free
  slots are inactive (the engine leaves them untouched). A slot is reset when a client joins it and when
  it leaves, so a conversation never sees its predecessor's KV cache / codec state.
- One frame loop (a single task) owns the engine state and steps the engine once per 80 ms frame for all
  slots that have a full 1920-sample input frame (the others are inactive for that step). Batching: when
  a client's frame is ready, the loop waits up to `batch_window_s` (one frame period) for the frames of the
  other clients that are streaming, so in steady state one step serves everyone; clients with a backlog
  (sending faster than real time) are stepped without waiting. The jitted step runs in a worker thread, so
  the event loop keeps receiving audio meanwhile.
- Per client: an Ogg/Opus decoder for its input, an encoder for its output, and a bounded send queue
  drained by its own task, so one slow reader cannot stall the others (it is closed when its queue fills).
- Protocol errors (text frames, unknown kinds, bad Opus, ...) close only that connection, with a 0x05
  error message and a websocket close frame that carries the reason; the others keep being served.
- Per-session sampling settings come from the query string (`engine.session`); with an engine built with
  `EngineConfig(item_sampling=True)` they are runtime values of the one compiled step (set when the client
  is admitted, together with the reset of its slot).
- Waiting room: when every slot is taken, a client waits with its socket open (up to `max_queue` of them),
  is told its position as 0x04 metadata `{"queue_position": n, "queue_length": m}` whenever it changes, and
  is admitted in arrival order when a slot frees up: then it gets the 0x00 handshake and a 0x04 metadata
  JSON (model, version, the session's settings and seeds, the server's defaults). Past the cap: 0x05 + 1013.
- Silent clients: an admitted client that sends no audio for `idle_timeout_s` is closed (1008) and its slot
  goes to the next in line; websocket pings every `heartbeat_s` drop peers that stopped answering.
- The listening socket is bound before the model is warmed up (`bind_socket`), so a port in use fails fast.
"""

from __future__ import annotations

import asyncio
import collections
import concurrent.futures
import dataclasses
import logging
import signal
import socket
import time
from pathlib import Path
from typing import Any

import numpy as np

from moshi_jax.engine import protocol as proto
from moshi_jax.engine import session as session_settings

log = logging.getLogger("moshi_jax.server")

CHAT_PATH = "/api/chat"
STREAMING_S = 0.5  # a client that sent audio this recently is "streaming": a step waits for its frame
WEB_DIR = Path(__file__).parent / "web"  # the page served at / (index.html + ES modules)


def bind_socket(host: str, port: int) -> socket.socket:
    """A listening TCP socket on (host, port) (port 0: any free port). Raises OSError (e.g. the port is in use);
    bound before the model is built or warmed up, so that mistake costs nothing."""
    family, kind, proto_, _, addr = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM,
                                                       flags=socket.AI_PASSIVE)[0]
    sock = socket.socket(family, kind, proto_)
    try:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)  # restart at once after TIME_WAIT (Linux still
        sock.bind(addr)                                            # refuses a port another server listens on)
        sock.listen(128)
    except OSError:
        sock.close()
        raise
    sock.setblocking(False)
    return sock


def package_version() -> str:
    from importlib import metadata

    try:
        return metadata.version("moshi-jax")
    except metadata.PackageNotFoundError:
        return "unknown"


@dataclasses.dataclass
class ServerStats:
    """Counters for tests and logs (updated by the frame loop)."""

    steps: int = 0  # engine steps run
    frames_in: int = 0  # client frames consumed, summed over slots
    frames_out: int = 0  # valid Moshi frames sent, summed over slots
    sessions_opened: int = 0
    sessions_closed: int = 0
    queued: int = 0  # clients that had to wait for a slot
    idle_closed: int = 0  # sessions closed for sending no audio
    admitted_order: list[int] = dataclasses.field(default_factory=list)  # client ids in order of admission (last N)
    max_batch: int = 0  # most clients served by one engine step
    step_seconds: list[float] = dataclasses.field(default_factory=list)  # wall time of each engine step (last N)


class _Session:
    """One connected client (lives on the event loop): waiting (slot None) until admitted to a slot."""

    def __init__(self, client_id: int, ws, remote: str | None, settings: session_settings.SessionSettings,
                 send_queue_frames: int):
        self.id = client_id
        self.slot: int | None = None
        self.ws = ws
        self.remote = remote
        self.settings = settings
        self.decoder: proto.OpusDecoder | None = None
        self.encoder: proto.OpusEncoder | None = None  # created on admission
        self.outbox: asyncio.Queue[bytes | None] = asyncio.Queue(maxsize=send_queue_frames)
        self.closed = False
        self.released = False  # its slot / queue place was given up
        self.arrived = time.monotonic()
        self.last_audio = -1e9  # time.monotonic() of the last audio message
        self.last_activity = self.arrived  # admission or last audio (idle timeout)
        self.queue_position = 0  # last position told to the client (0: not waiting)
        self.frames_in = 0
        self.frames_out = 0

    @property
    def name(self) -> str:
        return f"slot {self.slot}" if self.slot is not None else f"client {self.id} (waiting)"

    def send_nowait(self, msg: bytes) -> bool:
        """Queue a message; False when the client does not read fast enough (queue full)."""
        try:
            self.outbox.put_nowait(msg)
            return True
        except asyncio.QueueFull:
            return False


class ChatServer:
    """Websocket server on `/api/chat` batching up to `max_sessions` conversations into one engine.

    `engine` follows moshi_jax.engine.engine.Engine: init_state(B), step(params, state, pcm [B, frame],
    active [B]) -> (state, out with pcm [B, frame], text_token [B], valid [B]), reset(state, mask [B]),
    text_piece(token) -> str | None, and mimi_cfg (frame_size, sample_rate); with `cfg.item_sampling` also
    set_item_sampling (per-session settings). `max_queue`: clients that may wait for a slot; `idle_timeout_s`
    / `heartbeat_s`: None = off; `static_dir`: served at / (default: the built-in page, WEB_DIR);
    `model_name`: reported in the 0x04 metadata."""

    def __init__(self, engine: Any, params: Any, *, max_sessions: int = 4, batch_window_s: float = 0.08,
                 send_queue_frames: int = 256, max_backlog_frames: int = 1500, step_history: int = 10_000,
                 max_queue: int = 16, idle_timeout_s: float | None = 30.0, heartbeat_s: float | None = 10.0,
                 static_dir: str | Path | None = None, model_name: str = "moshi-jax"):
        if max_sessions < 1:
            raise ValueError(f"max_sessions must be >= 1, got {max_sessions}")
        if batch_window_s < 0:
            raise ValueError(f"batch_window_s must be >= 0, got {batch_window_s}")
        if max_queue < 0:
            raise ValueError(f"max_queue must be >= 0, got {max_queue}")
        for name, v in (("idle_timeout_s", idle_timeout_s), ("heartbeat_s", heartbeat_s)):
            if v is not None and not v > 0:
                raise ValueError(f"{name} must be > 0 (or None: off), got {v}")
        static_dir = Path(static_dir) if static_dir is not None else WEB_DIR
        if not (static_dir / "index.html").is_file():
            raise ValueError(f"static_dir {static_dir} has no index.html")
        self.static_dir = static_dir
        self.max_queue, self.idle_timeout_s, self.heartbeat_s = max_queue, idle_timeout_s, heartbeat_s
        self.model_name = model_name
        cfg = getattr(engine, "cfg", None)
        self.per_session_sampling = bool(getattr(cfg, "item_sampling", False))
        sampling = getattr(cfg, "sampling", None)
        self.default_settings = (session_settings.SessionSettings.from_sampling(sampling, getattr(cfg, "pad_bias", 0.0))
                                 if sampling is not None else session_settings.SessionSettings())
        self._waiting: collections.deque[_Session] = collections.deque()
        self._pending_settings: dict[int, dict] = {}  # slot -> engine values to set before its reset
        self._next_id = 0
        self._watchdog: asyncio.Task | None = None
        self.engine, self.params = engine, params
        # the donating step reuses the state's buffers (no second copy of the KV caches per frame)
        self._step_fn = getattr(engine, "step_donated", engine.step)
        self.max_sessions = max_sessions
        self.batch_window_s = batch_window_s
        self.frame_size = int(engine.mimi_cfg.frame_size)
        self.sample_rate = int(engine.mimi_cfg.sample_rate)
        self.send_queue_frames = send_queue_frames
        self.max_backlog_frames = max_backlog_frames  # input buffered per client before it is cut off (2 min)
        self.stats = ServerStats()
        self._step_history = step_history
        self._sessions: dict[int, _Session] = {}  # slot -> session
        self._dirty = np.zeros(max_sessions, bool)  # slots to reset before the next step (join / leave)
        self._state = None
        self._executor = concurrent.futures.ThreadPoolExecutor(max_workers=1, thread_name_prefix="engine")
        self._wake: asyncio.Event | None = None
        self._loop_task: asyncio.Task | None = None
        self._runner = None
        self._stopping = False
        self.port: int | None = None

    # ------------------------------------------------------------------------------------------ engine side
    def warmup(self) -> float:
        """Build the batched state and compile step + reset (blocking). Returns the seconds it took."""
        t0 = time.perf_counter()
        B = self.max_sessions
        state = self.engine.init_state(B)
        state = self.engine.reset(state, np.ones(B, bool))
        state, out = self._step_fn(self.params, state, np.zeros((B, self.frame_size), np.float32),
                                   np.zeros(B, bool))
        np.asarray(out.pcm)
        if self.per_session_sampling:  # compile the per-session settings update too (with the defaults)
            state = self._apply_settings(state, {0: self.default_settings.with_seeds().engine_values()})
        self._state = self.engine.reset(state, np.ones(B, bool))
        return time.perf_counter() - t0

    def _apply_settings(self, state, settings: dict[int, dict]):
        for slot, values in settings.items():
            state = self.engine.set_item_sampling(state, slot, **values)
        return state

    def _run_step(self, pcm: np.ndarray, active: np.ndarray, reset_mask: np.ndarray,
                  settings: dict[int, dict] | None = None):
        """Worker thread: set the settings of new sessions, reset the slots that changed hands (which also
        restarts their random streams from the new seeds), then one engine step. Returns host arrays."""
        state = self._state
        if settings:
            state = self._apply_settings(state, settings)
        if reset_mask.any():
            state = self.engine.reset(state, reset_mask)
        if not active.any():
            self._state = state
            return None
        state, out = self._step_fn(self.params, state, pcm, active)
        self._state = state
        valid = np.asarray(out.valid)
        audio_valid = np.asarray(getattr(out, "audio_valid", valid))
        return np.asarray(out.pcm), np.asarray(out.text_token), valid, audio_valid

    def _live(self) -> dict[int, _Session]:
        return {slot: sess for slot, sess in self._sessions.items() if not sess.closed}

    def _take_settings(self) -> dict[int, dict]:
        settings, self._pending_settings = self._pending_settings, {}
        return settings

    async def _wait_wake(self, timeout: float) -> None:
        """Sleep until a client's audio arrives (or a join / leave / stop), at most `timeout` seconds."""
        self._wake.clear()
        try:
            await asyncio.wait_for(self._wake.wait(), timeout=max(0.0, timeout))
        except TimeoutError:
            pass

    async def _gather_batch(self) -> None:
        """Some client has a frame: wait up to `batch_window_s` for the frames of the other clients that are
        streaming (sent audio in the last STREAMING_S), so that one step serves them all. No waiting while a
        client has a backlog (it catches up at the machine's speed)."""
        loop = asyncio.get_running_loop()
        deadline = loop.time() + self.batch_window_s
        while not self._stopping and loop.time() < deadline:
            live = self._live().values()
            if any(sess.decoder.frames_ready >= 2 for sess in live):
                return
            now = time.monotonic()
            if not any(not sess.decoder.frames_ready and now - sess.last_audio < STREAMING_S for sess in live):
                return
            await self._wait_wake(deadline - loop.time())

    async def _frame_loop(self) -> None:
        loop = asyncio.get_running_loop()
        B = self.max_sessions
        while not self._stopping:
            if not any(sess.decoder.frames_ready for sess in self._live().values()):
                if self._dirty.any():  # joins / leaves with no audio to process: reset those slots now
                    await loop.run_in_executor(self._executor, self._run_step, None, np.zeros(B, bool),
                                               self._take_dirty(), self._take_settings())
                await self._wait_wake(0.5)
                continue
            await self._gather_batch()
            sessions = self._live()
            active = np.zeros(B, bool)
            pcm = np.zeros((B, self.frame_size), np.float32)
            for slot, sess in sessions.items():
                frame = sess.decoder.pop_frame()
                if frame is not None:
                    pcm[slot], active[slot] = frame, True
            reset_mask, settings = self._take_dirty(), self._take_settings()
            t0 = time.perf_counter()
            try:
                result = await loop.run_in_executor(self._executor, self._run_step, pcm, active, reset_mask,
                                                    settings)
            except Exception as e:  # an engine failure ends these conversations, not the server
                log.exception("engine step failed; closing the %d active session(s)", len(sessions))
                for sess in sessions.values():
                    await self._close(sess, proto.CLOSE_INTERNAL_ERROR, f"engine error: {type(e).__name__}")
                # the state may be half-donated: rebuild it (compiled functions are cached, so this is quick)
                await loop.run_in_executor(self._executor, self.warmup)
                self._take_dirty()
                for slot, sess in self._live().items():  # clients admitted meanwhile: settings, then a reset
                    if self.per_session_sampling:
                        self._pending_settings[slot] = self._engine_values(sess)
                    self._dirty[slot] = True
                continue
            if result is not None:
                self._record_step(time.perf_counter() - t0, int(active.sum()))
                self._dispatch(sessions, active, *result)
            await asyncio.sleep(0)  # let receivers and senders run between steps

    def _take_dirty(self) -> np.ndarray:
        mask, self._dirty = self._dirty, np.zeros(self.max_sessions, bool)
        return mask

    def _record_step(self, seconds: float, batch: int) -> None:
        self.stats.steps += 1
        self.stats.max_batch = max(self.stats.max_batch, batch)
        self.stats.step_seconds.append(seconds)
        if len(self.stats.step_seconds) > self._step_history:
            del self.stats.step_seconds[: -self._step_history]

    def _dispatch(self, sessions: dict[int, _Session], active: np.ndarray, out_pcm: np.ndarray,
                  text: np.ndarray, valid: np.ndarray, audio_valid: np.ndarray) -> None:
        """Encode and queue each active client's output frame (+ text piece)."""
        for slot, sess in sessions.items():
            if not active[slot] or sess.closed:
                continue
            sess.frames_in += 1
            self.stats.frames_in += 1
            msgs = []  # nothing during the warm-up frames of a fresh conversation (nothing aligned yet)
            if audio_valid[slot]:
                ogg = sess.encoder.encode(out_pcm[slot])
                if ogg:
                    msgs.append(proto.encode_audio(ogg))
                sess.frames_out += 1
                self.stats.frames_out += 1
            piece = self.engine.text_piece(int(text[slot])) if valid[slot] else None
            if piece:
                msgs.append(proto.encode_text(piece))
            for m in msgs:
                if not sess.send_nowait(m):
                    log.warning("slot %d: client does not read its messages; closing it", slot)
                    asyncio.ensure_future(self._close(sess, proto.CLOSE_POLICY,
                                                      "client too slow: send queue full"))
                    break

    # ------------------------------------------------------------------------------------------ websocket side
    async def handle_chat(self, request):
        from aiohttp import WSMsgType, web

        ws = web.WebSocketResponse(max_msg_size=4 << 20, heartbeat=self.heartbeat_s)
        await ws.prepare(request)
        try:
            settings = self._settings_from_query(request)
        except session_settings.SettingsError as e:
            log.info("client %s: refused: %s", request.remote, e)
            await self._refuse(ws, proto.CLOSE_POLICY, str(e))
            return ws
        slot = self._free_slot()
        if slot is None and len(self._waiting) >= self.max_queue:
            reason = (f"server full: all {self.max_sessions} sessions are taken and {len(self._waiting)} users "
                      "wait, try again later")
            log.info("client %s: refused, %s", request.remote, reason)
            await self._refuse(ws, proto.CLOSE_TRY_AGAIN_LATER, reason)
            return ws
        self._next_id += 1
        sess = _Session(self._next_id, ws, request.remote, settings, self.send_queue_frames)
        sess.decoder = proto.OpusDecoder(self.frame_size, self.sample_rate)
        sender = asyncio.ensure_future(self._send_loop(sess))
        if slot is not None:
            self._admit(sess, slot)
        else:
            self._waiting.append(sess)
            self.stats.queued += 1
            log.info("client %d (%s) waits for a slot: position %d of %d", sess.id, request.remote,
                     len(self._waiting), len(self._waiting))
            self._tell_queue_positions()
        try:
            async for msg in ws:
                if msg.type == WSMsgType.BINARY:
                    data = msg.data
                elif msg.type == WSMsgType.TEXT:
                    data = msg.data  # str: rejected by parse_client_message with a clear reason
                elif msg.type == WSMsgType.ERROR:
                    log.warning("%s: websocket error %s", sess.name, ws.exception())
                    break
                else:
                    break
                try:
                    self._handle_message(sess, data)
                except proto.ProtocolError as e:
                    log.info("%s: protocol error, closing: %s", sess.name, e.reason)
                    await self._close(sess, e.code, e.reason)
                    break
        finally:
            await self._leave(sess, sender)
        return ws

    async def _refuse(self, ws, code: int, reason: str) -> None:
        reason = proto.truncate_reason(reason)
        try:
            await ws.send_bytes(proto.encode_error(reason))
            await ws.close(code=code, message=reason.encode())
        except (ConnectionError, RuntimeError):  # the peer is already gone
            pass

    def _settings_from_query(self, request) -> session_settings.SessionSettings:
        settings = session_settings.parse_query(request.query.items(), self.default_settings)
        if not self.per_session_sampling:
            given = [k for k in request.query if k in session_settings.LIMITS]
            if any(getattr(settings, k) != getattr(self.default_settings, k) for k in given):
                raise session_settings.SettingsError(
                    f"this server's engine has fixed sampling settings (EngineConfig.item_sampling=False): "
                    f"{', '.join(given)[:60]} cannot be changed")
        if settings.ignored:
            log.info("client %s: unknown query parameters ignored: %s", request.remote, ", ".join(settings.ignored))
        return settings.with_seeds()

    @staticmethod
    def _engine_values(sess: _Session) -> dict:
        return sess.settings.engine_values()

    def _admit(self, sess: _Session, slot: int) -> None:
        """Give `slot` to `sess`: fresh codec streams, its settings and a reset before its first step, then the
        handshake and the metadata (queued in order before any audio)."""
        sess.slot = slot
        sess.queue_position = 0
        sess.decoder.discard()  # audio sent while waiting is not part of the conversation
        sess.encoder = proto.OpusEncoder(self.sample_rate)
        sess.last_activity = time.monotonic()
        self._sessions[slot] = sess
        self._dirty[slot] = True  # fresh conversation: reset the slot before its first step
        if self.per_session_sampling:
            self._pending_settings[slot] = self._engine_values(sess)
        self.stats.sessions_opened += 1
        self.stats.admitted_order.append(sess.id)
        if len(self.stats.admitted_order) > self._step_history:
            del self.stats.admitted_order[: -self._step_history]
        waited = time.monotonic() - sess.arrived
        log.info("slot %d: client %d (%s) admitted%s (%d/%d sessions, %d waiting); settings %s", slot, sess.id,
                 sess.remote, f" after waiting {waited:.1f} s" if waited > 0.5 else "", len(self._sessions),
                 self.max_sessions, len(self._waiting), sess.settings.as_dict())
        sess.send_nowait(proto.HANDSHAKE)
        sess.send_nowait(proto.encode_metadata(self.metadata(sess)))
        if self._wake is not None:
            self._wake.set()

    def metadata(self, sess: _Session) -> dict:
        """The 0x04 JSON sent after the handshake: the Rust server's fields (which the reference client's
        server-info panel reads) plus the version, the server's defaults and this session's seeds."""
        s, version = sess.settings, package_version()
        return {
            **s.as_dict(),
            "lm_model_file": self.model_name, "mimi_model_file": self.model_name, "instance_name": "moshi-jax",
            "build_info": {"build_timestamp": "", "build_date": "", "git_branch": "", "git_timestamp": "",
                           "git_date": "", "git_hash": "", "git_describe": version, "rustc_host_triple": "",
                           "rustc_version": "", "cargo_target_triple": ""},
            "model": self.model_name, "version": version, "server": "moshi-jax",
            "defaults": {k: v for k, v in self.default_settings.as_dict().items() if not k.endswith("_seed")},
            "per_session_sampling": self.per_session_sampling, "ignored_parameters": list(s.ignored),
            "max_sessions": self.max_sessions, "slot": sess.slot, "sample_rate": self.sample_rate,
            "frame_size": self.frame_size, "idle_timeout_s": self.idle_timeout_s,
        }

    def _tell_queue_positions(self) -> None:
        """0x04 {"queue_position": n, "queue_length": m} to every waiting client whose position changed."""
        n = len(self._waiting)
        for pos, sess in enumerate(self._waiting, start=1):
            if sess.queue_position != pos and not sess.closed:
                sess.queue_position = pos
                sess.send_nowait(proto.encode_metadata({"queue_position": pos, "queue_length": n,
                                                        "max_sessions": self.max_sessions}))

    def _handle_message(self, sess: _Session, data: bytes | str) -> None:
        msg = proto.parse_client_message(data)
        if sess.slot is None:  # waiting: audio is decoded (its Ogg stream goes on after admission) and dropped
            if msg.kind == proto.Kind.AUDIO:
                sess.decoder.feed(msg.payload)
                sess.decoder.discard()
            return
        if msg.kind == proto.Kind.AUDIO:
            sess.last_audio = sess.last_activity = time.monotonic()
            sess.decoder.feed(msg.payload)
            if sess.decoder.frames_ready > self.max_backlog_frames:
                raise proto.ProtocolError(proto.CLOSE_POLICY, f"audio arrives faster than it is processed: over "
                                                              f"{self.max_backlog_frames} frames buffered")
            if self._wake is not None:
                self._wake.set()
        elif msg.kind == proto.Kind.CONTROL and msg.control == proto.Control.RESTART:
            self._dirty[sess.slot] = True  # new conversation on the same connection (random streams restart)
            sess.decoder = proto.OpusDecoder(self.frame_size, self.sample_rate)
        # handshake echo, other controls (unused in full-duplex streaming), metadata and pings: nothing to do

    async def _send_loop(self, sess: _Session) -> None:
        while True:
            msg = await sess.outbox.get()
            if msg is None or sess.ws.closed:
                return
            try:
                await sess.ws.send_bytes(msg)
            except (ConnectionError, RuntimeError) as e:  # peer went away mid-send
                log.info("%s: send failed (%s)", sess.name, e)
                return

    async def _close(self, sess: _Session, code: int, reason: str) -> None:
        if sess.closed:
            return
        sess.closed = True
        reason = proto.truncate_reason(reason)
        try:
            if not sess.ws.closed:
                await sess.ws.send_bytes(proto.encode_error(reason))
                await sess.ws.close(code=code, message=reason.encode())
        except (ConnectionError, RuntimeError):
            pass

    def _release(self, sess: _Session) -> None:
        """Give up `sess`'s slot (or its place in the queue) and admit the next waiting client. Idempotent."""
        if sess.released:
            return
        sess.released = True
        if sess.slot is None:
            try:
                self._waiting.remove(sess)
            except ValueError:
                pass
            log.info("client %d (%s) left the queue after %.1f s (%d waiting)", sess.id, sess.remote,
                     time.monotonic() - sess.arrived, len(self._waiting))
            self._tell_queue_positions()
            return
        if self._sessions.get(sess.slot) is sess:
            del self._sessions[sess.slot]
            self._dirty[sess.slot] = True  # forget the conversation now (also done again on the next join)
            self._pending_settings.pop(sess.slot, None)
        self.stats.sessions_closed += 1
        log.info("slot %d: client %d left after %d frames in, %d out", sess.slot, sess.id, sess.frames_in,
                 sess.frames_out)
        self._admit_waiting()

    def _admit_waiting(self) -> None:
        while self._waiting and not self._stopping:
            slot = self._free_slot()
            if slot is None:
                break
            nxt = self._waiting.popleft()
            if nxt.closed:
                continue
            self._admit(nxt, slot)
        self._tell_queue_positions()

    async def _leave(self, sess: _Session, sender: asyncio.Task) -> None:
        sess.closed = True
        self._release(sess)
        sender.cancel()
        try:
            await sender
        except (asyncio.CancelledError, Exception):
            pass

    async def _watch_idle(self) -> None:
        """Close admitted clients that sent no audio for `idle_timeout_s` (their slot goes to the next user)."""
        period = min(1.0, self.idle_timeout_s / 4)
        while not self._stopping:
            await asyncio.sleep(period)
            now = time.monotonic()
            for sess in list(self._sessions.values()):
                idle = now - sess.last_activity
                if not sess.closed and idle > self.idle_timeout_s:
                    self.stats.idle_closed += 1
                    log.info("slot %d: client %d sent no audio for %.1f s: closing it", sess.slot, sess.id, idle)
                    self._release(sess)  # at once: the close handshake may wait on a dead peer
                    asyncio.ensure_future(self._close(sess, proto.CLOSE_POLICY, f"idle: no audio for "
                                                                                f"{self.idle_timeout_s:g} s"))

    def _free_slot(self) -> int | None:
        for slot in range(self.max_sessions):
            if slot not in self._sessions:
                return slot
        return None

    @property
    def num_sessions(self) -> int:
        return len(self._sessions)

    @property
    def num_waiting(self) -> int:
        return len(self._waiting)

    # ------------------------------------------------------------------------------------------ lifecycle
    def make_app(self):
        from aiohttp import web

        app = web.Application()
        app.router.add_get(CHAT_PATH, self.handle_chat)
        index = self.static_dir / "index.html"

        async def page(request):
            return web.FileResponse(index, headers={"Cache-Control": "no-cache"})

        app.router.add_get("/", page)
        app.router.add_static("/", self.static_dir, follow_symlinks=False)
        return app

    async def start(self, host: str = "127.0.0.1", port: int = 8998, sock: socket.socket | None = None) -> int:
        """Listen (on `sock` if given, else bind host:port first, so a port in use fails before any compile),
        compile (if not done), then start serving and the frame loop. Returns the bound port (port=0: any)."""
        from aiohttp import web

        sock = sock if sock is not None else bind_socket(host, port)
        if self._state is None:
            seconds = await asyncio.get_running_loop().run_in_executor(self._executor, self.warmup)
            log.info("engine warmed up for %d sessions in %.1f s", self.max_sessions, seconds)
        self._stopping = False
        self._wake = asyncio.Event()
        self._runner = web.AppRunner(self.make_app(), handle_signals=False)
        await self._runner.setup()
        site = web.SockSite(self._runner, sock)
        await site.start()
        addr = sock.getsockname()
        self.port = addr[1]  # the real port when port=0
        self._loop_task = asyncio.ensure_future(self._frame_loop())
        if self.idle_timeout_s is not None:
            self._watchdog = asyncio.ensure_future(self._watch_idle())
        shown = f"[{addr[0]}]" if ":" in addr[0] else addr[0]
        log.info("serving on http://%s:%d (web page; websocket %s; max %d sessions, %d waiting, idle timeout %s)",
                 shown, self.port, CHAT_PATH, self.max_sessions, self.max_queue,
                 "off" if self.idle_timeout_s is None else f"{self.idle_timeout_s:g} s")
        return self.port

    async def stop(self) -> None:
        """Close every client (1001 going away), stop the frame loop and the listener."""
        self._stopping = True
        if self._watchdog is not None:
            self._watchdog.cancel()
            self._watchdog = None
        for sess in [*self._sessions.values(), *self._waiting]:
            await self._close(sess, proto.CLOSE_GOING_AWAY, "server shutting down")
        if self._loop_task is not None:
            self._wake.set()
            try:
                await self._loop_task
            finally:
                self._loop_task = None
        if self._runner is not None:
            await self._runner.cleanup()
            self._runner = None

    def close(self) -> None:
        self._executor.shutdown(wait=True)


def serve(engine: Any, params: Any, host: str = "127.0.0.1", port: int = 8998, max_sessions: int = 4,
          sock: socket.socket | None = None, **server_kw) -> None:
    """Run the server until interrupted (Ctrl-C). `sock`: an already bound socket (`bind_socket`);
    `server_kw`: ChatServer options (max_queue, idle_timeout_s, heartbeat_s, static_dir, model_name)."""
    server = ChatServer(engine, params, max_sessions=max_sessions, **server_kw)

    async def main() -> None:
        stop = asyncio.Event()
        loop = asyncio.get_running_loop()
        for sig in (signal.SIGTERM, signal.SIGINT):  # close the clients cleanly (1001) on kill / Ctrl-C
            try:
                loop.add_signal_handler(sig, stop.set)
            except (NotImplementedError, RuntimeError):  # not on this platform / not the main thread
                pass
        await server.start(host, port, sock=sock)
        try:
            await stop.wait()
            log.info("stopping: closing %d client(s)", server.num_sessions)
        finally:
            await server.stop()

    try:
        asyncio.run(main())
    except KeyboardInterrupt:
        log.info("interrupted; server stopped")
    finally:
        server.close()


# Per-step latency summary for logs / the CLI (seconds -> ms percentiles).
def latency_summary(step_seconds: list[float]) -> dict[str, float]:
    if not step_seconds:
        return {}
    ms = np.asarray(step_seconds) * 1e3
    return {"steps": float(ms.size), "median_ms": float(np.median(ms)), "p99_ms": float(np.percentile(ms, 99)),
            "max_ms": float(ms.max())}


__all__ = ["CHAT_PATH", "WEB_DIR", "ChatServer", "ServerStats", "bind_socket", "latency_summary", "serve"]
