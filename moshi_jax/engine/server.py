"""`moshi-jax serve`: the reference server's websocket protocol, many clients batched into ONE engine.

    server = ChatServer(engine, params, max_sessions=4)
    await server.start("127.0.0.1", 8998)     # ws://127.0.0.1:8998/api/chat
    ...
    await server.stop()

or `serve(engine, params, host, port, max_sessions)` (blocking, what the CLI runs).

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
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import dataclasses
import logging
import signal
import time
from typing import Any

import numpy as np

from moshi_jax.engine import protocol as proto

log = logging.getLogger("moshi_jax.server")

CHAT_PATH = "/api/chat"
STREAMING_S = 0.5  # a client that sent audio this recently is "streaming": a step waits for its frame


@dataclasses.dataclass
class ServerStats:
    """Counters for tests and logs (updated by the frame loop)."""

    steps: int = 0  # engine steps run
    frames_in: int = 0  # client frames consumed, summed over slots
    frames_out: int = 0  # valid Moshi frames sent, summed over slots
    sessions_opened: int = 0
    sessions_closed: int = 0
    max_batch: int = 0  # most clients served by one engine step
    step_seconds: list[float] = dataclasses.field(default_factory=list)  # wall time of each engine step (last N)


class _Session:
    """One connected client (lives on the event loop)."""

    def __init__(self, slot: int, ws, frame_size: int, sample_rate: int, send_queue_frames: int):
        self.slot = slot
        self.ws = ws
        self.decoder = proto.OpusDecoder(frame_size, sample_rate)
        self.encoder = proto.OpusEncoder(sample_rate)
        self.outbox: asyncio.Queue[bytes | None] = asyncio.Queue(maxsize=send_queue_frames)
        self.closed = False
        self.last_audio = -1e9  # time.monotonic() of the last audio message
        self.frames_in = 0
        self.frames_out = 0

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
    text_piece(token) -> str | None, and mimi_cfg (frame_size, sample_rate)."""

    def __init__(self, engine: Any, params: Any, *, max_sessions: int = 4, batch_window_s: float = 0.08,
                 send_queue_frames: int = 256, max_backlog_frames: int = 1500, step_history: int = 10_000):
        if max_sessions < 1:
            raise ValueError(f"max_sessions must be >= 1, got {max_sessions}")
        if batch_window_s < 0:
            raise ValueError(f"batch_window_s must be >= 0, got {batch_window_s}")
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
        self._state = self.engine.reset(state, np.ones(B, bool))
        return time.perf_counter() - t0

    def _run_step(self, pcm: np.ndarray, active: np.ndarray, reset_mask: np.ndarray):
        """Worker thread: reset the slots that changed hands, then one engine step. Returns host arrays."""
        state = self._state
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
                                               self._take_dirty())
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
            reset_mask = self._take_dirty()
            t0 = time.perf_counter()
            try:
                result = await loop.run_in_executor(self._executor, self._run_step, pcm, active, reset_mask)
            except Exception as e:  # an engine failure ends these conversations, not the server
                log.exception("engine step failed; closing the %d active session(s)", len(sessions))
                for sess in sessions.values():
                    await self._close(sess, proto.CLOSE_INTERNAL_ERROR, f"engine error: {type(e).__name__}")
                # the state may be half-donated: rebuild it (compiled functions are cached, so this is quick)
                await loop.run_in_executor(self._executor, self.warmup)
                self._take_dirty()
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

        ws = web.WebSocketResponse(max_msg_size=4 << 20)
        await ws.prepare(request)
        slot = self._free_slot()
        if slot is None:
            reason = f"server full: all {self.max_sessions} sessions are taken, try again later"
            await ws.send_bytes(proto.encode_error(reason))
            await ws.close(code=proto.CLOSE_TRY_AGAIN_LATER, message=reason.encode())
            return ws
        sess = _Session(slot, ws, self.frame_size, self.sample_rate, self.send_queue_frames)
        self._sessions[slot] = sess
        self._dirty[slot] = True  # fresh conversation: reset the slot before its first step
        self.stats.sessions_opened += 1
        log.info("slot %d: client %s connected (%d/%d sessions)", slot, request.remote, len(self._sessions),
                 self.max_sessions)
        sender = asyncio.ensure_future(self._send_loop(sess))
        try:
            await ws.send_bytes(proto.HANDSHAKE)
            async for msg in ws:
                if msg.type == WSMsgType.BINARY:
                    data = msg.data
                elif msg.type == WSMsgType.TEXT:
                    data = msg.data  # str: rejected by parse_client_message with a clear reason
                elif msg.type == WSMsgType.ERROR:
                    log.warning("slot %d: websocket error %s", slot, ws.exception())
                    break
                else:
                    break
                try:
                    self._handle_message(sess, data)
                except proto.ProtocolError as e:
                    log.info("slot %d: protocol error, closing: %s", slot, e.reason)
                    await self._close(sess, e.code, e.reason)
                    break
        finally:
            await self._leave(sess, sender)
        return ws

    def _handle_message(self, sess: _Session, data: bytes | str) -> None:
        msg = proto.parse_client_message(data)
        if msg.kind == proto.Kind.AUDIO:
            sess.last_audio = time.monotonic()
            sess.decoder.feed(msg.payload)
            if sess.decoder.frames_ready > self.max_backlog_frames:
                raise proto.ProtocolError(proto.CLOSE_POLICY, f"audio arrives faster than it is processed: over "
                                                              f"{self.max_backlog_frames} frames buffered")
            if self._wake is not None:
                self._wake.set()
        elif msg.kind == proto.Kind.CONTROL and msg.control == proto.Control.RESTART:
            self._dirty[sess.slot] = True  # new conversation on the same connection
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
                log.info("slot %d: send failed (%s)", sess.slot, e)
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

    async def _leave(self, sess: _Session, sender: asyncio.Task) -> None:
        sess.closed = True
        sender.cancel()
        try:
            await sender
        except (asyncio.CancelledError, Exception):
            pass
        if self._sessions.get(sess.slot) is sess:
            del self._sessions[sess.slot]
            self._dirty[sess.slot] = True  # forget the conversation now (also done again on the next join)
        self.stats.sessions_closed += 1
        log.info("slot %d: client left after %d frames in, %d out", sess.slot, sess.frames_in, sess.frames_out)

    def _free_slot(self) -> int | None:
        for slot in range(self.max_sessions):
            if slot not in self._sessions:
                return slot
        return None

    @property
    def num_sessions(self) -> int:
        return len(self._sessions)

    # ------------------------------------------------------------------------------------------ lifecycle
    def make_app(self):
        from aiohttp import web

        app = web.Application()
        app.router.add_get(CHAT_PATH, self.handle_chat)
        return app

    async def start(self, host: str = "127.0.0.1", port: int = 8998) -> int:
        """Compile (if not done), start listening and the frame loop. Returns the bound port (port=0: any)."""
        from aiohttp import web

        if self._state is None:
            seconds = await asyncio.get_running_loop().run_in_executor(self._executor, self.warmup)
            log.info("engine warmed up for %d sessions in %.1f s", self.max_sessions, seconds)
        self._stopping = False
        self._wake = asyncio.Event()
        self._runner = web.AppRunner(self.make_app(), handle_signals=False)
        await self._runner.setup()
        site = web.TCPSite(self._runner, host, port)
        await site.start()
        self.port = site._server.sockets[0].getsockname()[1]  # the real port when port=0
        self._loop_task = asyncio.ensure_future(self._frame_loop())
        log.info("serving on ws://%s:%d%s (max %d sessions)", host, self.port, CHAT_PATH, self.max_sessions)
        return self.port

    async def stop(self) -> None:
        """Close every client (1001 going away), stop the frame loop and the listener."""
        self._stopping = True
        for sess in list(self._sessions.values()):
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


def serve(engine: Any, params: Any, host: str = "127.0.0.1", port: int = 8998, max_sessions: int = 4) -> None:
    """Run the server until interrupted (Ctrl-C)."""
    server = ChatServer(engine, params, max_sessions=max_sessions)

    async def main() -> None:
        stop = asyncio.Event()
        loop = asyncio.get_running_loop()
        for sig in (signal.SIGTERM, signal.SIGINT):  # close the clients cleanly (1001) on kill / Ctrl-C
            try:
                loop.add_signal_handler(sig, stop.set)
            except (NotImplementedError, RuntimeError):  # not on this platform / not the main thread
                pass
        await server.start(host, port)
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


__all__ = ["CHAT_PATH", "ChatServer", "ServerStats", "latency_summary", "serve"]
