"""The web page's Ogg framing (moshi_jax/engine/web/ogg.js), run with node: the page's muxer output is read
back by the server's Ogg/Opus reader, the page's demuxer splits the server's stream into its packets."""

from __future__ import annotations

import base64
import json
import shutil
import struct
import subprocess

import numpy as np
import pytest

from moshi_jax.engine import protocol as P
from moshi_jax.engine.server import WEB_DIR

NODE = shutil.which("node")
pytestmark = pytest.mark.skipif(NODE is None, reason="node is not installed (the browser test covers ogg.js too)")
FRAME = 1920


def _node(body: str, data: dict) -> dict:
    """Run `body` (an async JS function body with `ogg` = the module, `input` = data) -> its JSON result."""
    script = (f"import * as ogg from {json.dumps((WEB_DIR / 'ogg.js').as_uri())};\n"
              "const input = JSON.parse(require_stdin());\n"
              f"const result = await (async () => {{ {body} }})();\n"
              "process.stdout.write(JSON.stringify(result));\n")
    script = script.replace("require_stdin()", "(await import('node:fs')).readFileSync(0, 'utf8')")
    out = subprocess.run([NODE, "--input-type=module", "-e", script], input=json.dumps(data), capture_output=True,
                         text=True, timeout=60, check=False)
    assert out.returncode == 0, out.stderr
    return json.loads(out.stdout)


JS_HELPERS = """
const b64 = (u8) => Buffer.from(u8).toString('base64');
const unb64 = (s) => new Uint8Array(Buffer.from(s, 'base64'));
"""


def _ogg_crc(data: bytes) -> int:  # independent of the JS table: bit by bit
    crc = 0
    for byte in data:
        crc ^= byte << 24
        for _ in range(8):
            crc = ((crc << 1) ^ 0x04C11DB7) if crc & 0x80000000 else crc << 1
            crc &= 0xFFFFFFFF
    return crc


def _pages(stream: bytes) -> list[dict]:
    """A small independent Ogg page parser (RFC 3533) that checks each page's CRC."""
    pages, at = [], 0
    while at < len(stream):
        assert stream[at:at + 4] == b"OggS", at
        version, flags, granule, serial, seq, crc, nseg = struct.unpack_from("<BBqIIIB", stream, at + 4)
        lacing = stream[at + 27: at + 27 + nseg]
        end = at + 27 + nseg + sum(lacing)
        page = bytearray(stream[at:end])
        page[22:26] = b"\0\0\0\0"
        assert _ogg_crc(bytes(page)) == crc and version == 0
        pages.append({"flags": flags, "granule": granule, "serial": serial, "seq": seq, "lacing": list(lacing)})
        at = end
    return pages


@pytest.fixture(scope="module")
def server_stream():
    """The server's Ogg/Opus output for 1 s of speech, as the websocket messages it sends."""
    from moshi_jax.data.speech_synth import synthesize

    audio = synthesize("Hello there, how are you?", "en-us").audio[: 12 * FRAME]
    audio = np.pad(audio, (0, 12 * FRAME - audio.size))
    enc = P.OpusEncoder()
    return [enc.encode(audio[i * FRAME:(i + 1) * FRAME]) for i in range(12)]


def _decode(stream_msgs: list[bytes]) -> np.ndarray:
    dec = P.OpusDecoder(FRAME)
    for m in stream_msgs:
        dec.feed(m)
    return np.concatenate([dec.pop_frame() for _ in range(dec.frames_ready)])


def test_the_pages_muxer_output_is_decoded_by_the_servers_reader_to_the_same_audio(server_stream):
    got = _node(JS_HELPERS + """
        const demux = new ogg.OggDemuxer();
        const packets = [];
        for (const m of input.msgs) packets.push(...demux.push(unb64(m)));  // message by message
        const head = packets[0];
        const preSkip = new DataView(head.buffer, head.byteOffset).getUint16(10, true);
        const mux = new ogg.OggOpusMuxer({ serial: 1234, preSkip, inputRate: 24000 });
        const msgs = [b64(mux.header())];
        for (const p of packets.slice(2)) msgs.push(b64(mux.packet(p, 960)));
        return { packets: packets.map(b64), pages: demux.pages, msgs };
    """, {"msgs": [base64.b64encode(m).decode() for m in server_stream if m]})
    packets = [base64.b64decode(p) for p in got["packets"]]
    assert packets[0].startswith(b"OpusHead") and packets[1].startswith(b"OpusTags") and len(packets) > 10
    ours = [base64.b64decode(m) for m in got["msgs"]]
    assert ours[0].startswith(b"OggS")  # the protocol's first audio message
    want, back = _decode([m for m in server_stream if m]), _decode(ours)
    assert want.size > 0 and back.size == want.size
    np.testing.assert_array_equal(back, want)  # same packets, same decoder: the same samples

    pages = _pages(b"".join(ours))
    assert pages[0]["flags"] == 2 and all(p["flags"] == 0 for p in pages[1:])  # beginning of stream first
    assert [p["seq"] for p in pages] == list(range(len(pages))) and {p["serial"] for p in pages} == {1234}
    assert [p["granule"] for p in pages[2:]] == [960 * (i + 1) for i in range(len(pages) - 2)]
    assert len(pages) == len(packets)


def test_lacing_edge_cases_survive_a_round_trip_split_at_every_byte():
    got = _node(JS_HELPERS + """
        const sizes = [0, 1, 254, 255, 256, 510, 600, 3000];
        const packets = sizes.map((n, i) => Uint8Array.from({ length: n }, (_, k) => (k * 7 + i) & 255));
        const mux = new ogg.OggOpusMuxer({ serial: 7 });
        const pages = [mux.header(), ...packets.map((p) => mux.packet(p, 960))];
        const stream = new Uint8Array(pages.reduce((a, p) => a + p.length, 0));
        let at = 0;
        for (const p of pages) { stream.set(p, at); at += p.length; }
        const demux = new ogg.OggDemuxer();
        const out = [];
        for (let i = 0; i < stream.length; i++) out.push(...demux.push(stream.subarray(i, i + 1)));
        const same = out.length === packets.length + 2 &&
          packets.every((p, i) => p.length === out[i + 2].length && p.every((x, k) => x === out[i + 2][k]));
        const bad = stream.slice();
        bad[bad.length - 5] ^= 1;
        let error = null;
        try { new ogg.OggDemuxer().push(bad); } catch (e) { error = e.message; }
        return { same, error, stream: b64(stream) };
    """, {})
    assert got["same"] and "CRC mismatch" in got["error"]
    lacing = [p["lacing"] for p in _pages(base64.b64decode(got["stream"]))[2:]]
    assert lacing[:6] == [[0], [1], [254], [255, 0], [255, 1], [255, 255, 0]]
