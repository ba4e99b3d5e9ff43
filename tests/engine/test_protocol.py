"""The websocket protocol: message encoding, client message validation, Ogg/Opus streams."""

from __future__ import annotations

import json
import struct

import numpy as np
import pytest

from moshi_jax.engine import protocol as P

FRAME = 1920


def _tone(n: int, freq: float = 440.0, amp: float = 0.3) -> np.ndarray:
    t = np.arange(n) / P.SAMPLE_RATE
    return (amp * np.sin(2 * np.pi * freq * t)).astype(np.float32)


def test_server_messages_are_kind_byte_plus_payload_as_the_reference_sends_them():
    assert P.HANDSHAKE == b"\x00" == P.encode_handshake()
    assert P.encode_handshake(0, 7) == b"\x00" + struct.pack("<II", 0, 7)
    assert P.encode_audio(b"OggS...") == b"\x01OggS..."
    assert P.encode_text(" héllo") == b"\x02" + " héllo".encode()
    assert P.encode_error("boom") == b"\x05boom"
    assert json.loads(P.encode_metadata({"a": 1})[1:]) == {"a": 1}
    assert P.encode_control(P.Control.RESTART) == b"\x03\x03"
    assert P.encode_ping() == b"\x06"


def test_valid_client_messages_parse_to_their_kind():
    assert P.parse_client_message(b"\x01OggSabc") == P.ClientMessage(P.Kind.AUDIO, b"OggSabc")
    assert P.parse_client_message(bytearray(b"\x03\x02")).control == P.Control.PAUSE
    assert P.parse_client_message(b"\x04" + b'{"x": [1]}').metadata == {"x": [1]}
    assert P.parse_client_message(b"\x06").kind == P.Kind.PING
    assert P.parse_client_message(b"\x00").kind == P.Kind.HANDSHAKE
    assert P.parse_client_message(b"\x00\x00\x00").kind == P.Kind.HANDSHAKE  # the web client's version + model


@pytest.mark.parametrize("data, code, words", [
    ("hello", P.CLOSE_UNSUPPORTED_DATA, "text websocket frames"),
    (b"", P.CLOSE_UNSUPPORTED_DATA, "empty message"),
    (b"\x09abc", P.CLOSE_UNSUPPORTED_DATA, "unknown message kind 0x09"),
    (b"\xff", P.CLOSE_UNSUPPORTED_DATA, "unknown message kind 0xff"),
    (b"\x02hi", P.CLOSE_UNSUPPORTED_DATA, "0x02 (text) is sent by the server only"),
    (b"\x05err", P.CLOSE_UNSUPPORTED_DATA, "0x05 (error) is sent by the server only"),
    (b"\x01", P.CLOSE_INVALID_PAYLOAD, "empty payload"),
    (b"\x03", P.CLOSE_INVALID_PAYLOAD, "bad control"),
    (b"\x03\x07", P.CLOSE_INVALID_PAYLOAD, "bad control"),
    (b"\x03\x00\x00", P.CLOSE_INVALID_PAYLOAD, "bad control"),
    (b"\x04{not json", P.CLOSE_INVALID_PAYLOAD, "bad metadata"),
    (b"\x04[1, 2]", P.CLOSE_INVALID_PAYLOAD, "expected a JSON object"),
    (b"\x04\xff\xfe", P.CLOSE_INVALID_PAYLOAD, "bad metadata"),
    (b"\x06x", P.CLOSE_INVALID_PAYLOAD, "bad ping"),
    (b"\x00abc", P.CLOSE_INVALID_PAYLOAD, "bad handshake"),
])
def test_malformed_client_messages_raise_protocol_error_with_close_code_and_reason(data, code, words):
    with pytest.raises(P.ProtocolError) as e:
        P.parse_client_message(data)
    assert e.value.code == code
    assert words in e.value.reason
    assert len(e.value.reason.encode()) <= P.MAX_CLOSE_REASON_BYTES


def test_close_reasons_are_cut_to_what_a_close_frame_carries_without_splitting_characters():
    long = "é" * 200
    cut = P.truncate_reason(long)
    assert len(cut.encode()) <= P.MAX_CLOSE_REASON_BYTES and cut.endswith("...")
    assert P.ProtocolError(1003, long).reason == cut
    assert P.truncate_reason("short") == "short"


def test_opus_stream_roundtrip_reassembles_whole_frames_from_uneven_pushes():
    enc, dec = P.OpusEncoder(), P.OpusDecoder(FRAME)
    audio = _tone(FRAME * 6)
    pushes = [FRAME, FRAME * 2, FRAME, FRAME * 2]  # the writer emits pages as Opus packets complete
    pos, got = 0, []
    for n in pushes:
        ogg = enc.encode(audio[pos: pos + n])
        pos += n
        assert ogg.startswith(b"OggS")
        dec.feed(ogg)
        while (f := dec.pop_frame()) is not None:
            assert f.shape == (FRAME,) and f.dtype == np.float32
            got.append(f)
    assert dec.frames_ready == 0
    out = np.concatenate(got)
    assert out.size == audio.size
    # Opus is lossy and delays by a few ms: compare energies, and find the tone at the right pitch
    assert 0.5 < np.sqrt(np.mean(out[FRAME:] ** 2)) / np.sqrt(np.mean(audio ** 2)) < 1.5
    spec = np.abs(np.fft.rfft(out[FRAME:]))
    peak_hz = np.argmax(spec) * P.SAMPLE_RATE / (out.size - FRAME)
    assert abs(peak_hz - 440) < 5


def test_opus_decoder_accepts_a_page_split_across_messages():
    enc, dec = P.OpusEncoder(), P.OpusDecoder(FRAME)
    first = enc.encode(_tone(FRAME))
    dec.feed(first)
    second = enc.encode(_tone(FRAME))
    dec.feed(second[:17])  # the tail of a split page does not start with OggS: still fine
    dec.feed(second[17:])
    assert dec.frames_ready == 2


@pytest.mark.parametrize("payload, words", [
    (b"RIFF....WAVEfmt ", "must start with an Ogg page"),
    (b"OggS" + bytes(60), "not a valid Ogg/Opus stream"),
])
def test_opus_decoder_rejects_bytes_that_are_not_ogg_opus(payload, words):
    with pytest.raises(P.ProtocolError) as e:
        P.OpusDecoder(FRAME).feed(payload)
    assert e.value.code == P.CLOSE_INVALID_PAYLOAD and words in e.value.reason


def test_wire_values_are_the_reference_protocol_and_rfc_6455_numbers():
    # What a client sees on the wire (rust/protocol.md, the web client's encoder): kind and control bytes, close
    # codes (RFC 6455 section 7.4.1), 24 kHz audio.
    assert {k.name: int(k) for k in P.Kind} == {"HANDSHAKE": 0, "AUDIO": 1, "TEXT": 2, "CONTROL": 3, "METADATA": 4,
                                                "ERROR": 5, "PING": 6, "COLORED_TEXT": 7}
    assert {c.name: int(c) for c in P.Control} == {"START": 0, "END_TURN": 1, "PAUSE": 2, "RESTART": 3}
    assert [P.encode_control(c) for c in P.Control] == [b"\x03\x00", b"\x03\x01", b"\x03\x02", b"\x03\x03"]
    assert (P.CLOSE_NORMAL, P.CLOSE_GOING_AWAY, P.CLOSE_UNSUPPORTED_DATA, P.CLOSE_INVALID_PAYLOAD, P.CLOSE_POLICY,
            P.CLOSE_INTERNAL_ERROR, P.CLOSE_TRY_AGAIN_LATER) == (1000, 1001, 1003, 1007, 1008, 1011, 1013)
    assert P.MAX_CLOSE_REASON_BYTES == 123 and P.SAMPLE_RATE == 24_000
    assert P.kind_name(7) == "0x07 (colored_text)" and P.kind_name(0x2a) == "0x2a (unknown)"
    assert P.CLIENT_KINDS == {P.Kind.HANDSHAKE, P.Kind.AUDIO, P.Kind.CONTROL, P.Kind.METADATA, P.Kind.PING}
    for control in P.Control:
        assert P.parse_client_message(P.encode_control(control)).control == control


def test_a_close_reason_of_exactly_123_bytes_is_kept_whole():
    assert P.truncate_reason("x" * 123) == "x" * 123
    assert P.truncate_reason("x" * 124) == "x" * 120 + "..."
    assert P.truncate_reason("é" * 62) == "é" * 60 + "..."  # 124 bytes
    assert P.truncate_reason("a" + "é" * 62) == "a" + "é" * 59 + "..."  # never half a character


def test_handshake_echoes_of_the_web_client_are_accepted_with_their_payload():
    for payload in (b"", b"\x00\x01", struct.pack("<II", 0, 1)):
        msg = P.parse_client_message(b"\x00" + payload)
        assert msg == P.ClientMessage(P.Kind.HANDSHAKE, payload)
    for n in (1, 3, 7, 9):
        with pytest.raises(P.ProtocolError, match=f"bad handshake: payload of {n} bytes"):
            P.parse_client_message(b"\x00" + bytes(n))


def test_rust_handshake_carries_the_protocol_version_and_model_version_zero_by_default():
    assert P.encode_handshake(1) == b"\x00\x01\x00\x00\x00\x00\x00\x00\x00"


def test_parsed_client_messages_are_immutable():
    import dataclasses

    msg = P.parse_client_message(b"\x03\x01")
    with pytest.raises(dataclasses.FrozenInstanceError):
        msg.control = P.Control.START


def test_opus_decoder_frames_are_the_decoded_stream_cut_in_order_whatever_the_frame_size():
    import sphn

    enc = P.OpusEncoder()
    pages = [enc.encode(_tone(n, 300.0)) for n in (FRAME, FRAME * 2, FRAME, FRAME * 3)]
    ref = sphn.OpusStreamReader(P.SAMPLE_RATE)
    want = np.concatenate([np.asarray(ref.append_bytes(p), np.float32).reshape(-1) for p in pages])
    for frame in (700, FRAME, 5000, want.size, want.size + 1):
        dec = P.OpusDecoder(frame)
        assert dec.frames_ready == 0 and dec.pop_frame() is None
        got = []
        for i, p in enumerate(pages):  # pop only now and then: several decoded pieces wait in the buffer
            dec.feed(p)
            if i == 1 and dec.frames_ready:
                got.append(dec.pop_frame())
        ready = dec.frames_ready
        assert type(ready) is int and ready + len(got) == want.size // frame
        got += [dec.pop_frame() for _ in range(ready)]
        assert dec.frames_ready == 0 and dec.pop_frame() is None
        if got:
            assert all(g.shape == (frame,) and g.dtype == np.float32 for g in got)
            np.testing.assert_array_equal(np.concatenate(got), want[: len(got) * frame])


def test_discard_drops_the_buffered_samples_and_later_pages_still_decode_and_count_from_zero():
    import sphn

    enc = P.OpusEncoder()
    pages = [enc.encode(_tone(n, 300.0)) for n in (FRAME * 2, FRAME, FRAME * 3)]
    ref = sphn.OpusStreamReader(P.SAMPLE_RATE)
    parts = [np.asarray(ref.append_bytes(p), np.float32).reshape(-1) for p in pages]
    after = np.concatenate(parts[1:])  # what decodes after the discard
    for frame, ready in ((after.size, 1), (after.size + 1, 0)):  # exactly the rest, and one sample more
        dec = P.OpusDecoder(frame)
        dec.feed(pages[0])
        dec.discard()
        assert dec.frames_ready == 0 and dec.pop_frame() is None
        for p in pages[1:]:
            dec.feed(p)
        assert dec.frames_ready == ready
        got = dec.pop_frame()
        if ready:
            np.testing.assert_array_equal(got, after)
        else:
            assert got is None
