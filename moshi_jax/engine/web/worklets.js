// Audio worklets (run on the audio thread): the microphone tap and the jitter-buffered player.

// Collects the microphone's 128-sample render quanta into chunks of `chunk` samples for the encoder.
class MicCapture extends AudioWorkletProcessor {
  constructor(options) {
    super();
    this.chunk = options.processorOptions?.chunk ?? 480;
    this.buf = new Float32Array(this.chunk);
    this.fill = 0;
  }

  process(inputs) {
    const input = inputs[0]?.[0];
    if (input) {
      let i = 0;
      while (i < input.length) {
        const n = Math.min(input.length - i, this.chunk - this.fill);
        this.buf.set(input.subarray(i, i + n), this.fill);
        this.fill += n;
        i += n;
        if (this.fill === this.chunk) {
          this.port.postMessage(this.buf, [this.buf.buffer]);
          this.buf = new Float32Array(this.chunk);
          this.fill = 0;
        }
      }
    }
    return true;
  }
}

// Plays the model's audio through a jitter buffer: starts (and restarts after an underrun) once `startMs`
// of audio is buffered, drops the oldest audio when more than `maxMs` piles up (keeps the latency bounded),
// and reports its figures to the page every ~100 ms.
class JitterPlayer extends AudioWorkletProcessor {
  constructor(options) {
    super();
    const o = options.processorOptions ?? {};
    this.start = Math.round((o.startMs ?? 160) * sampleRate / 1000);
    this.max = Math.round((o.maxMs ?? 1000) * sampleRate / 1000);
    this.queue = [];
    this.offset = 0; // read position in queue[0]
    this.buffered = 0;
    this.playing = false;
    this.stats = { underruns: 0, droppedMs: 0, playedMs: 0, missedMs: 0 };
    this.sinceReport = 0;
    this.port.onmessage = (e) => {
      if (e.data === "reset") { this.queue = []; this.offset = 0; this.buffered = 0; this.playing = false; return; }
      this.queue.push(e.data);
      this.buffered += e.data.length;
      if (this.buffered > this.max) this.drop(this.buffered - this.start);
    };
  }

  drop(n) {
    this.stats.droppedMs += 1000 * n / sampleRate;
    while (n > 0 && this.queue.length) {
      const left = this.queue[0].length - this.offset;
      const k = Math.min(n, left);
      this.offset += k;
      this.buffered -= k;
      n -= k;
      if (this.offset >= this.queue[0].length) { this.queue.shift(); this.offset = 0; }
    }
  }

  process(_inputs, outputs) {
    const out = outputs[0][0];
    if (!this.playing && this.buffered >= this.start) this.playing = true;
    let i = 0;
    if (this.playing) {
      while (i < out.length && this.queue.length) {
        const head = this.queue[0];
        const k = Math.min(out.length - i, head.length - this.offset);
        out.set(head.subarray(this.offset, this.offset + k), i);
        i += k;
        this.offset += k;
        this.buffered -= k;
        if (this.offset >= head.length) { this.queue.shift(); this.offset = 0; }
      }
      this.stats.playedMs += 1000 * i / sampleRate;
      if (i < out.length) { // ran dry: count it, play silence and buffer up again
        this.stats.underruns++;
        this.stats.missedMs += 1000 * (out.length - i) / sampleRate;
        this.playing = false;
      }
    }
    out.fill(0, i);
    for (let c = 1; c < outputs[0].length; c++) outputs[0][c].set(out);
    this.sinceReport += out.length;
    if (this.sinceReport >= sampleRate / 10) {
      this.sinceReport = 0;
      this.port.postMessage({ bufferedMs: 1000 * this.buffered / sampleRate, playing: this.playing, ...this.stats });
    }
    return true;
  }
}

registerProcessor("mic-capture", MicCapture);
registerProcessor("jitter-player", JitterPlayer);
