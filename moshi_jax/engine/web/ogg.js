// Ogg framing for Opus (RFC 3533 + RFC 7845): a muxer for the microphone's Opus packets and a demuxer for
// the server's Ogg pages. Pure functions of bytes, no browser API, so node can run them too.

const CRC_TABLE = (() => {
  // Ogg's CRC-32: polynomial 0x04c11db7, MSB first, initial value 0, no final xor.
  const table = new Uint32Array(256);
  for (let i = 0; i < 256; i++) {
    let r = i << 24;
    for (let j = 0; j < 8; j++) r = r & 0x80000000 ? (r << 1) ^ 0x04c11db7 : r << 1;
    table[i] = r >>> 0;
  }
  return table;
})();

export function oggCrc(bytes) {
  let crc = 0;
  for (let i = 0; i < bytes.length; i++) crc = ((crc << 8) ^ CRC_TABLE[((crc >>> 24) ^ bytes[i]) & 0xff]) >>> 0;
  return crc >>> 0;
}

/** One Ogg page holding whole `packets` (Uint8Array[]); flags: 2 = first page, 4 = last page. */
export function oggPage(packets, { granule, serial, sequence, flags = 0 }) {
  const lacing = [];
  for (const p of packets) {
    let n = p.length;
    while (n >= 255) { lacing.push(255); n -= 255; }
    lacing.push(n); // a packet whose size is a multiple of 255 ends with a 0
  }
  if (lacing.length > 255) throw new Error(`too many segments for one Ogg page: ${lacing.length}`);
  const size = packets.reduce((a, p) => a + p.length, 0);
  const page = new Uint8Array(27 + lacing.length + size);
  const view = new DataView(page.buffer);
  page.set([0x4f, 0x67, 0x67, 0x53]); // "OggS"
  page[4] = 0; // version
  page[5] = flags;
  view.setBigInt64(6, BigInt(granule), true);
  view.setUint32(14, serial >>> 0, true);
  view.setUint32(18, sequence >>> 0, true);
  page[26] = lacing.length;
  page.set(lacing, 27);
  let at = 27 + lacing.length;
  for (const p of packets) { page.set(p, at); at += p.length; }
  view.setUint32(22, oggCrc(page), true); // computed with the CRC field zero
  return page;
}

/** OpusHead (RFC 7845 section 5.1): mono, `preSkip` samples at 48 kHz, the input rate for information. */
export function opusHead({ channels = 1, preSkip = 312, inputRate = 24000 } = {}) {
  const head = new Uint8Array(19);
  const view = new DataView(head.buffer);
  head.set(new TextEncoder().encode("OpusHead"));
  head[8] = 1; // version
  head[9] = channels;
  view.setUint16(10, preSkip, true);
  view.setUint32(12, inputRate, true);
  view.setInt16(16, 0, true); // output gain
  head[18] = 0; // channel mapping family 0 (mono / stereo)
  return head;
}

export function opusTags(vendor = "moshi-jax web") {
  const v = new TextEncoder().encode(vendor);
  const tags = new Uint8Array(8 + 4 + v.length + 4);
  const view = new DataView(tags.buffer);
  tags.set(new TextEncoder().encode("OpusTags"));
  view.setUint32(8, v.length, true);
  tags.set(v, 12);
  view.setUint32(12 + v.length, 0, true); // no user comments
  return tags;
}

/** Opus packets -> Ogg pages: `header()` once (OpusHead and OpusTags pages), then one page per packet. */
export class OggOpusMuxer {
  constructor({ serial = (Math.random() * 0xffffffff) >>> 0, preSkip = 312, inputRate = 24000 } = {}) {
    this.serial = serial;
    this.preSkip = preSkip;
    this.inputRate = inputRate;
    this.sequence = 0;
    this.granule = 0; // 48 kHz samples of audio in the pages so far (the Ogg Opus clock)
  }

  header() {
    const a = oggPage([opusHead({ preSkip: this.preSkip, inputRate: this.inputRate })],
      { granule: 0, serial: this.serial, sequence: this.sequence++, flags: 2 });
    const b = oggPage([opusTags()], { granule: 0, serial: this.serial, sequence: this.sequence++ });
    const out = new Uint8Array(a.length + b.length);
    out.set(a);
    out.set(b, a.length);
    return out;
  }

  /** One audio page; `samples48k`: the packet's duration in 48 kHz samples (960 for 20 ms). */
  packet(data, samples48k) {
    this.granule += samples48k;
    return oggPage([data], { granule: this.granule, serial: this.serial, sequence: this.sequence++ });
  }
}

/** Ogg bytes arriving in arbitrary pieces -> whole packets (`push(bytes)` returns the packets completed). */
export class OggDemuxer {
  constructor() {
    this.buffer = new Uint8Array(0);
    this.partial = []; // pieces of a packet continued on the next page
    this.pages = 0;
  }

  push(bytes) {
    const joined = new Uint8Array(this.buffer.length + bytes.length);
    joined.set(this.buffer);
    joined.set(bytes, this.buffer.length);
    this.buffer = joined;
    const packets = [];
    let at = 0;
    while (this.buffer.length - at >= 27) {
      const b = this.buffer;
      if (b[at] !== 0x4f || b[at + 1] !== 0x67 || b[at + 2] !== 0x67 || b[at + 3] !== 0x53) {
        throw new Error("bad Ogg stream: no 'OggS' capture pattern at a page start");
      }
      const nseg = b[at + 26];
      if (b.length - at < 27 + nseg) break;
      const lacing = b.subarray(at + 27, at + 27 + nseg);
      const size = lacing.reduce((a, x) => a + x, 0);
      const end = at + 27 + nseg + size;
      if (b.length < end) break;
      const page = b.slice(at, end);
      const stored = new DataView(page.buffer).getUint32(22, true);
      page.fill(0, 22, 26);
      if (oggCrc(page) !== stored) throw new Error("bad Ogg page: CRC mismatch");
      let pos = at + 27 + nseg;
      for (let i = 0; i < nseg; i++) {
        this.partial.push(b.subarray(pos, pos + lacing[i]));
        pos += lacing[i];
        if (lacing[i] < 255) { // a packet ends here
          const len = this.partial.reduce((a, x) => a + x.length, 0);
          const packet = new Uint8Array(len);
          let k = 0;
          for (const piece of this.partial) { packet.set(piece, k); k += piece.length; }
          packets.push(packet);
          this.partial = [];
        }
      }
      this.partial = this.partial.map((x) => x.slice()); // keep unfinished pieces past the buffer's reuse
      this.pages++;
      at = end;
    }
    this.buffer = this.buffer.slice(at);
    return packets;
  }
}

export function isOpusHeader(packet) {
  if (packet.length < 8) return false;
  const tag = String.fromCharCode(...packet.subarray(0, 8));
  return tag === "OpusHead" || tag === "OpusTags";
}
