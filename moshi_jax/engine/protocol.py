"""The Moshi websocket protocol (reference `moshi/server.py`, `rust/protocol.md`, the web client's encoder).

Every websocket message is BINARY: one kind byte, then a payload.

    0x00 handshake   server -> client first; the Python reference sends the bare byte, the Rust server adds
                     protocol version + model version (two little-endian u32). Both forms are accepted.
    0x01 audio       both ways; Ogg pages of Opus audio, 24 kHz mono (sphn.OpusStreamWriter / Reader)
    0x02 text        server -> client; a UTF-8 text piece (SentencePiece "▁" already turned into a space)
    0x03 control     client -> server; one byte: 0 start, 1 end turn, 2 pause, 3 restart
    0x04 metadata    either way; UTF-8 JSON
    0x05 error       server -> client; UTF-8 error description
    0x06 ping        no payload
    0x07 colored text  server -> client (web client): one color byte + UTF-8 text

This module is pure (no I/O): `encode_*` build messages, `parse_client_message` validates what a client
sent and raises `ProtocolError` with a websocket close code and a human-readable reason that fits into a
close frame (<= 123 bytes), so the server can close just that connection with a clear reason.
"""

from __future__ import annotations

import dataclasses
import enum
import json
import struct

import numpy as np

SAMPLE_RATE = 24_000  # the protocol's audio is always 24 kHz mono

# Websocket close codes (RFC 6455 section 7.4.1) used for the reasons we close a connection.
CLOSE_NORMAL = 1000
CLOSE_GOING_AWAY = 1001  # server shutting down
CLOSE_UNSUPPORTED_DATA = 1003  # text frames, unknown kinds, kinds only the server may send
CLOSE_INVALID_PAYLOAD = 1007  # bad Opus / UTF-8 / JSON / control byte
CLOSE_POLICY = 1008  # client too slow to read what we send
CLOSE_INTERNAL_ERROR = 1011
CLOSE_TRY_AGAIN_LATER = 1013  # all sessions taken

MAX_CLOSE_REASON_BYTES = 123  # RFC 6455: control frame payload 125 bytes minus the 2-byte code


class Kind(enum.IntEnum):
    HANDSHAKE = 0x00
    AUDIO = 0x01
    TEXT = 0x02
    CONTROL = 0x03
    METADATA = 0x04
    ERROR = 0x05
    PING = 0x06
    COLORED_TEXT = 0x07


class Control(enum.IntEnum):
    START = 0
    END_TURN = 1
    PAUSE = 2
    RESTART = 3


_KIND_VALUES = frozenset(int(k) for k in Kind)
_CONTROL_VALUES = frozenset(int(c) for c in Control)

# Kinds a client may send. Text / error / colored text only flow server -> client.
CLIENT_KINDS = frozenset({Kind.HANDSHAKE, Kind.AUDIO, Kind.CONTROL, Kind.METADATA, Kind.PING})


class ProtocolError(Exception):
    """A client broke the protocol. `code` is the websocket close code, `reason` the close reason."""

    def __init__(self, code: int, reason: str):
        self.code = code
        self.reason = truncate_reason(reason)
        super().__init__(self.reason)


def truncate_reason(reason: str) -> str:
    """Cut `reason` to the 123 UTF-8 bytes a close frame can carry (never in the middle of a character)."""
    raw = reason.encode("utf-8")
    if len(raw) <= MAX_CLOSE_REASON_BYTES:
        return reason
    return raw[: MAX_CLOSE_REASON_BYTES - 3].decode("utf-8", errors="ignore") + "..."


def kind_name(kind: int) -> str:
    try:
        return f"0x{kind:02x} ({Kind(kind).name.lower()})"
    except ValueError:
        return f"0x{kind:02x} (unknown)"


# ----------------------------------------------------------------------------------------- server -> client
HANDSHAKE = bytes([Kind.HANDSHAKE])  # what the Python reference server sends


def encode_handshake(protocol_version: int | None = None, model_version: int = 0) -> bytes:
    """The bare 0x00 byte (Python reference), or with `protocol_version` the Rust server's form."""
    if protocol_version is None:
        return HANDSHAKE
    return HANDSHAKE + struct.pack("<II", protocol_version, model_version)


def encode_audio(ogg_bytes: bytes) -> bytes:
    return bytes([Kind.AUDIO]) + ogg_bytes


def encode_text(piece: str) -> bytes:
    return bytes([Kind.TEXT]) + piece.encode("utf-8")


def encode_error(description: str) -> bytes:
    return bytes([Kind.ERROR]) + description.encode("utf-8")


def encode_metadata(data: dict) -> bytes:
    return bytes([Kind.METADATA]) + json.dumps(data).encode("utf-8")


def encode_control(action: Control) -> bytes:
    return bytes([Kind.CONTROL, int(action)])


def encode_ping() -> bytes:
    return bytes([Kind.PING])


# ----------------------------------------------------------------------------------------- client -> server
@dataclasses.dataclass(frozen=True)
class ClientMessage:
    """One validated client message. `payload` is the raw bytes after the kind byte; `control` is set for
    control messages, `metadata` for metadata messages."""

    kind: Kind
    payload: bytes = b""
    control: Control | None = None
    metadata: dict | None = None


OGG_CAPTURE_PATTERN = b"OggS"


def parse_client_message(data: bytes | bytearray | memoryview | str) -> ClientMessage:
    """Validate one websocket message from a client. Raises ProtocolError (close code + reason)."""
    if isinstance(data, str):
        raise ProtocolError(CLOSE_UNSUPPORTED_DATA, "text websocket frames are not part of the protocol: send "
                                                    "binary messages (kind byte + payload)")
    data = bytes(data)
    if not data:
        raise ProtocolError(CLOSE_UNSUPPORTED_DATA, "empty message: every message starts with a kind byte")
    kind, payload = data[0], data[1:]
    if kind not in _KIND_VALUES:
        raise ProtocolError(CLOSE_UNSUPPORTED_DATA, f"unknown message kind {kind_name(kind)}; clients send "
                                                    "0x01 audio, 0x03 control, 0x04 metadata, 0x06 ping")
    kind = Kind(kind)
    if kind not in CLIENT_KINDS:
        raise ProtocolError(CLOSE_UNSUPPORTED_DATA, f"message kind {kind_name(kind)} is sent by the server only")
    if kind == Kind.AUDIO:
        if not payload:
            raise ProtocolError(CLOSE_INVALID_PAYLOAD, "bad audio: empty payload (expected Ogg/Opus pages)")
        return ClientMessage(kind, payload)
    if kind == Kind.CONTROL:
        if len(payload) != 1 or payload[0] not in _CONTROL_VALUES:
            raise ProtocolError(CLOSE_INVALID_PAYLOAD, f"bad control message: payload must be one byte in 0..3, "
                                                       f"got {payload[:8]!r}")
        return ClientMessage(kind, payload, control=Control(payload[0]))
    if kind == Kind.METADATA:
        try:
            meta = json.loads(payload.decode("utf-8"))
        except (UnicodeDecodeError, json.JSONDecodeError) as e:
            raise ProtocolError(CLOSE_INVALID_PAYLOAD, f"bad metadata: not UTF-8 JSON ({e})") from e
        if not isinstance(meta, dict):
            raise ProtocolError(CLOSE_INVALID_PAYLOAD, "bad metadata: expected a JSON object")
        return ClientMessage(kind, payload, metadata=meta)
    if kind == Kind.HANDSHAKE:  # the web client may echo one: bare byte or two u32
        if len(payload) not in (0, 2, 8):
            raise ProtocolError(CLOSE_INVALID_PAYLOAD, f"bad handshake: payload of {len(payload)} bytes")
        return ClientMessage(kind, payload)
    # PING
    if payload:
        raise ProtocolError(CLOSE_INVALID_PAYLOAD, "bad ping: a ping has no payload")
    return ClientMessage(kind)


# ----------------------------------------------------------------------------------------- Opus streams
class OpusDecoder:
    """Ogg/Opus bytes from one client -> float32 PCM at 24 kHz, buffered into whole frames."""

    def __init__(self, frame_size: int, sample_rate: int = SAMPLE_RATE):
        import sphn

        self._reader = sphn.OpusStreamReader(sample_rate)
        self.frame_size = frame_size
        self._pending: list[np.ndarray] = []
        self._pending_len = 0
        self._started = False

    def feed(self, ogg_bytes: bytes) -> None:
        """Decode more Ogg pages. Raises ProtocolError when the bytes are not a valid Ogg/Opus stream."""
        if not self._started and not ogg_bytes.startswith(OGG_CAPTURE_PATTERN):
            # the stream must open with an Ogg page; later messages may continue a page split by the client
            raise ProtocolError(CLOSE_INVALID_PAYLOAD, "bad audio: the stream must start with an Ogg page "
                                                       f"('OggS'), got {ogg_bytes[:8]!r}")
        self._started = True
        try:
            pcm = self._reader.append_bytes(ogg_bytes)
        except (ValueError, RuntimeError) as e:  # sphn raises ValueError on bad capture patterns / packets
            raise ProtocolError(CLOSE_INVALID_PAYLOAD, f"bad audio: not a valid Ogg/Opus stream ({e})") from e
        pcm = np.asarray(pcm, np.float32).reshape(-1)
        if pcm.size:
            if not np.all(np.isfinite(pcm)):
                raise ProtocolError(CLOSE_INVALID_PAYLOAD, "bad audio: decoded samples are not finite")
            self._pending.append(pcm)
            self._pending_len += pcm.size

    @property
    def frames_ready(self) -> int:
        return self._pending_len // self.frame_size

    def discard(self) -> None:
        """Drop the decoded samples not popped yet (the stream state is kept: later pages still decode)."""
        self._pending, self._pending_len = [], 0

    def pop_frame(self) -> np.ndarray | None:
        """The next [frame_size] float32 frame, or None when less than a frame is buffered."""
        if self._pending_len < self.frame_size:
            return None
        buf = np.concatenate(self._pending) if len(self._pending) > 1 else self._pending[0]
        frame, rest = buf[: self.frame_size], buf[self.frame_size:]
        self._pending = [rest] if rest.size else []
        self._pending_len = rest.size
        return frame


class OpusEncoder:
    """float32 PCM at 24 kHz -> Ogg/Opus bytes for one client (the first bytes carry the Ogg headers)."""

    def __init__(self, sample_rate: int = SAMPLE_RATE):
        import sphn

        self._writer = sphn.OpusStreamWriter(sample_rate)

    def encode(self, pcm: np.ndarray) -> bytes:
        pcm = np.ascontiguousarray(np.asarray(pcm, np.float32).reshape(-1))
        return bytes(self._writer.append_pcm(pcm))
