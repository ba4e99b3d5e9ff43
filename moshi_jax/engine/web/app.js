// The moshi-jax conversation page: microphone -> Opus (WebCodecs) -> Ogg -> websocket /api/chat; the model's
// Ogg/Opus -> WebCodecs decoder -> jitter-buffered player; its text shown live. Protocol: first byte = kind.
import { OggDemuxer, OggOpusMuxer, isOpusHeader } from "./ogg.js";

const KIND = { HANDSHAKE: 0, AUDIO: 1, TEXT: 2, CONTROL: 3, METADATA: 4, ERROR: 5, PING: 6 };
const RATE = 24000; // the protocol's audio rate
const SETTINGS = ["text_temperature", "text_topk", "audio_temperature", "audio_topk", "pad_mult",
  "repetition_penalty", "repetition_penalty_context", "text_seed", "audio_seed"];

const $ = (id) => document.getElementById(id);
// Figures for people (shown) and for tests (window.moshiStats).
const stats = window.moshiStats = {
  state: "idle", audioSent: 0, audioReceived: 0, textReceived: 0, text: "", errors: [], metadata: null,
  queue: null, sentSeconds: 0, receivedSeconds: 0, player: {}, closeCode: null, closeReason: null,
};
let session = null;

function setState(state, message) {
  stats.state = state;
  document.body.dataset.state = state;
  $("status-text").textContent = message;
  const busy = state === "connecting" || state === "waiting" || state === "talking";
  $("connect").disabled = busy;
  $("disconnect").disabled = !busy;
  for (const input of $("settings").elements) input.disabled = busy;
}

function chatUrl() {
  const query = new URLSearchParams();
  for (const name of SETTINGS) {
    const value = $("settings").elements[name].value.trim();
    if (value !== "") query.set(name, value);
  }
  const scheme = location.protocol === "https:" ? "wss" : "ws";
  return `${scheme}://${location.host}/api/chat?${query}`;
}

function rms(x) {
  let s = 0;
  for (let i = 0; i < x.length; i++) s += x[i] * x[i];
  return Math.sqrt(s / Math.max(1, x.length));
}

function resample(x, from, to) { // linear; only used when the browser refuses a 24 kHz audio context
  const n = Math.round(x.length * to / from);
  const y = new Float32Array(n);
  for (let i = 0; i < n; i++) {
    const t = i * from / to;
    const j = Math.floor(t);
    const f = t - j;
    y[i] = (x[j] ?? 0) * (1 - f) + (x[j + 1] ?? x[j] ?? 0) * f;
  }
  return y;
}

class Session {
  constructor() {
    this.closedByUser = false;
    this.micTime = 0; // microseconds of microphone audio encoded
    this.outTime = 0;
    this.demuxer = new OggDemuxer();
    this.decoderReady = false;
  }

  async start() {
    if (!("AudioEncoder" in window) || !("AudioDecoder" in window)) {
      throw new Error("this browser has no WebCodecs audio (AudioEncoder / AudioDecoder): use a recent Chrome, " +
        "Edge or Firefox");
    }
    const support = await AudioEncoder.isConfigSupported(this.encoderConfig(RATE));
    if (!support.supported) throw new Error("this browser cannot encode Opus at 24 kHz with WebCodecs");
    this.ctx = new AudioContext({ sampleRate: RATE, latencyHint: "interactive" });
    await this.ctx.audioWorklet.addModule(new URL("./worklets.js", import.meta.url));
    this.stream = await navigator.mediaDevices.getUserMedia({
      audio: { channelCount: 1, echoCancellation: true, noiseSuppression: true, autoGainControl: true },
    });
    await this.ctx.resume();
    this.player = new AudioWorkletNode(this.ctx, "jitter-player", {
      numberOfInputs: 0, outputChannelCount: [1], processorOptions: { startMs: 160, maxMs: 1000 },
    });
    this.player.port.onmessage = (e) => { stats.player = e.data; };
    this.player.connect(this.ctx.destination);
    this.ws = new WebSocket(chatUrl());
    this.ws.binaryType = "arraybuffer";
    this.ws.onmessage = (e) => this.onMessage(new Uint8Array(e.data));
    this.ws.onclose = (e) => this.onClose(e);
    this.ws.onerror = () => {};
  }

  encoderConfig(rate) {
    return { codec: "opus", sampleRate: rate, numberOfChannels: 1, bitrate: 32000,
      opus: { frameDuration: 20000, complexity: 5 } };
  }

  send(kind, payload) {
    if (this.ws.readyState !== WebSocket.OPEN) return;
    const msg = new Uint8Array(1 + payload.length);
    msg[0] = kind;
    msg.set(payload, 1);
    this.ws.send(msg);
  }

  startMicrophone() { // after the handshake: the server reads our audio from now on
    const rate = this.ctx.sampleRate;
    this.muxer = new OggOpusMuxer({ inputRate: rate });
    this.encoder = new AudioEncoder({
      output: (chunk) => {
        const data = new Uint8Array(chunk.byteLength);
        chunk.copyTo(data);
        const samples48k = chunk.duration ? Math.round(chunk.duration * 48 / 1000) : 960;
        this.send(KIND.AUDIO, this.muxer.packet(data, samples48k));
        stats.audioSent++;
        stats.sentSeconds += samples48k / 48000;
      },
      error: (e) => this.fail(`microphone encoder: ${e.message}`),
    });
    this.encoder.configure(this.encoderConfig(rate));
    this.send(KIND.AUDIO, this.muxer.header()); // OpusHead + OpusTags: the stream starts with "OggS"
    this.source = this.ctx.createMediaStreamSource(this.stream);
    this.mic = new AudioWorkletNode(this.ctx, "mic-capture", { processorOptions: { chunk: Math.round(rate / 50) } });
    this.mic.port.onmessage = (e) => {
      const pcm = e.data;
      $("mic-level").value = rms(pcm);
      if (this.encoder.state !== "configured") return;
      const frame = new AudioData({ format: "f32-planar", sampleRate: rate, numberOfFrames: pcm.length,
        numberOfChannels: 1, timestamp: this.micTime, data: pcm });
      this.micTime += 1e6 * pcm.length / rate;
      this.encoder.encode(frame);
      frame.close();
    };
    const mute = this.ctx.createGain(); // keeps the tap running without playing the microphone back
    mute.gain.value = 0;
    this.source.connect(this.mic).connect(mute).connect(this.ctx.destination);
  }

  setupDecoder(head) {
    this.decoder = new AudioDecoder({
      output: (frame) => {
        const pcm = new Float32Array(frame.numberOfFrames);
        frame.copyTo(pcm, { planeIndex: 0, format: "f32-planar" });
        const rate = frame.sampleRate;
        frame.close();
        stats.receivedSeconds += pcm.length / rate;
        $("out-level").value = rms(pcm);
        const out = rate === this.ctx.sampleRate ? pcm : resample(pcm, rate, this.ctx.sampleRate);
        this.player.port.postMessage(out, [out.buffer]);
      },
      error: (e) => this.fail(`audio decoder: ${e.message}`),
    });
    this.decoder.configure({ codec: "opus", sampleRate: RATE, numberOfChannels: 1, description: head });
    this.decoderReady = true;
  }

  onAudio(payload) {
    for (const packet of this.demuxer.push(payload)) {
      if (isOpusHeader(packet)) {
        if (!this.decoderReady && String.fromCharCode(...packet.subarray(0, 8)) === "OpusHead") this.setupDecoder(packet);
        continue;
      }
      if (!this.decoderReady) this.setupDecoder(undefined);
      this.decoder.decode(new EncodedAudioChunk({ type: "key", timestamp: this.outTime, data: packet }));
      this.outTime += 20000;
    }
  }

  onMessage(msg) {
    const kind = msg[0];
    const payload = msg.subarray(1);
    if (kind === KIND.HANDSHAKE) {
      stats.queue = null;
      setState("talking", "Talking: speak into your microphone");
      this.startMicrophone();
    } else if (kind === KIND.AUDIO) {
      stats.audioReceived++;
      try { this.onAudio(payload); } catch (e) { this.fail(`bad audio from the server: ${e.message}`); }
    } else if (kind === KIND.TEXT) {
      const piece = new TextDecoder().decode(payload);
      stats.textReceived++;
      stats.text += piece;
      const box = $("text");
      box.textContent += piece;
      box.scrollTop = box.scrollHeight;
    } else if (kind === KIND.METADATA) {
      const meta = JSON.parse(new TextDecoder().decode(payload));
      if ("queue_position" in meta) {
        stats.queue = meta;
        setState("waiting", `Waiting for a slot: position ${meta.queue_position} of ${meta.queue_length} ` +
          `(${meta.max_sessions} conversation${meta.max_sessions === 1 ? "" : "s"} at a time)`);
      } else {
        stats.metadata = meta;
        showServerInfo(meta);
      }
    } else if (kind === KIND.ERROR) {
      const text = new TextDecoder().decode(payload);
      stats.errors.push(text);
      setState("error", `Server error: ${text}`);
    }
  }

  fail(message) {
    stats.errors.push(message);
    setState("error", message);
    this.stop();
  }

  onClose(e) {
    stats.closeCode = e.code;
    stats.closeReason = e.reason;
    if (stats.state !== "error") {
      if (this.closedByUser) setState("idle", "Disconnected");
      else setState("error", `Connection closed by the server${e.reason ? `: ${e.reason}` : ` (code ${e.code})`}`);
    }
    this.stop();
  }

  stop() {
    if (this.stopped) return;
    this.stopped = true;
    try { if (this.ws && this.ws.readyState <= WebSocket.OPEN) this.ws.close(1000, "bye"); } catch { /* closed */ }
    for (const codec of [this.encoder, this.decoder]) {
      try { if (codec && codec.state !== "closed") codec.close(); } catch { /* closed */ }
    }
    this.stream?.getTracks().forEach((t) => t.stop());
    this.ctx?.close();
    if (session === this) session = null;
  }
}

function showServerInfo(meta) {
  const lines = [`model: ${meta.model}`, `server: ${meta.server ?? "?"} ${meta.version ?? ""}`,
    `text: temperature ${meta.text_temperature}, top-k ${meta.text_topk}, seed ${meta.text_seed}`,
    `audio: temperature ${meta.audio_temperature}, top-k ${meta.audio_topk}, seed ${meta.audio_seed}`,
    `PAD multiplier ${meta.pad_mult}; repetition penalty ${meta.repetition_penalty} over ` +
    `${meta.repetition_penalty_context} tokens`];
  if (meta.ignored_parameters?.length) lines.push(`ignored: ${meta.ignored_parameters.join(", ")}`);
  $("server-info").textContent = lines.join("\n");
}

function showFigures() {
  const p = stats.player;
  const talking = stats.state === "talking";
  const lag = Math.max(0, stats.sentSeconds - stats.receivedSeconds) * 1000 + (p.bufferedMs ?? 0);
  $("fig-latency").textContent = talking && stats.receivedSeconds > 0 ? `${lag.toFixed(0)} ms` : "–";
  $("fig-buffer").textContent = p.bufferedMs !== undefined ? `${p.bufferedMs.toFixed(0)} ms` : "–";
  $("fig-underruns").textContent = p.underruns !== undefined ? `${p.underruns} (${p.missedMs.toFixed(0)} ms)` : "–";
  $("fig-sent").textContent = `${stats.audioSent} · ${stats.sentSeconds.toFixed(1)} s`;
  $("fig-received").textContent = `${stats.audioReceived} · ${stats.receivedSeconds.toFixed(1)} s`;
  $("fig-text").textContent = `${stats.textReceived} pieces`;
}

async function connect() {
  $("text").textContent = "";
  Object.assign(stats, { audioSent: 0, audioReceived: 0, textReceived: 0, text: "", errors: [], metadata: null,
    queue: null, sentSeconds: 0, receivedSeconds: 0, player: {}, closeCode: null, closeReason: null });
  setState("connecting", "Connecting…");
  session = new Session();
  try {
    await session.start();
  } catch (e) {
    session.fail(e.message ?? String(e));
  }
}

function disconnect() {
  if (!session) return;
  session.closedByUser = true;
  session.stop();
  setState("idle", "Disconnected");
}

// Settings may come from the page's own query string (a bookmark), e.g. /?text_temperature=0.5&autoconnect=1
const pageQuery = new URLSearchParams(location.search);
for (const name of SETTINGS) if (pageQuery.has(name)) $("settings").elements[name].value = pageQuery.get(name);
$("connect").addEventListener("click", connect);
$("disconnect").addEventListener("click", disconnect);
setInterval(showFigures, 250);
setState("idle", "Not connected");
if (pageQuery.get("autoconnect") === "1") connect();
