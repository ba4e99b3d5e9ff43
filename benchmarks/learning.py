"""Does the stack learn? Word error rates of the trained small streaming ASR and TTS models on held-out speech.

    moshi-jax data synth runs/corpus                  # corpus + codec + tokens (see moshi_jax.data.speech_corpus)
    moshi-jax train asr_small; moshi-jax train tts_small
    python -m benchmarks.learning --asr-run runs/asr_small --tts-run runs/tts_small --corpus runs/corpus \
        --out benchmarks/results/learning

ASR: the trained model runs through the engine's streaming "asr" mode (`EngineConfig(mode="asr",
text_delay_frames=d)`, greedy, one 80 ms frame per step, batched utterances) on the held-out sentences spoken by
seen voices (`heldout_sentences`) and by unseen voices (`heldout_voices`); the transcript is the text tokens the
engine emits, decoded with the corpus's SentencePiece model; WER against the sentence (word-level Levenshtein,
`moshi_jax.eval.speech_metrics`). `--curve` evaluates every saved checkpoint of the ASR run (exported with
`moshi-jax export --step`) on `--curve-utterances` seen-voice utterances: eval WER against training steps.

TTS: the trained model runs through the engine's "tts" mode (the reference's word state machine feeds each
held-out sentence; sampled audio) and its speech is scored two ways: (1) the engine's decoded audio is
transcribed by the trained ASR model through its engine (the whole loop: audio -> codec -> ASR); (2) the Mimi
codes the TTS engine generated are transcribed by the ASR model directly (its teacher-forced forward, greedy; the
same model and layout, no codec round trip). With the corpus's seeded random codec (fitted codebooks, no trained
decoder) decode -> encode does not give the codes back, so (1) measures the codec as much as the LM, and (2)
is the TTS model's own WER. DTW log-mel distance: the TTS audio against the codec's rendering of eSpeak's audio
of the same sentence (decode(encode(eSpeak))), with the same distance between two different sentences as the
scale of "unrelated speech", and against eSpeak's raw audio.

Writes `<out>.json`, `<out>.md` and `<out>.png` (WER against steps, train / eval loss curves of both runs).
"""

from __future__ import annotations

import argparse
import json
import logging
import tempfile
import time
from collections.abc import Sequence
from pathlib import Path

import numpy as np

log = logging.getLogger("moshi_jax.bench")

FRAME = 1920
SKIP_TEXT_IDS = (0, 1, 2, 3)  # EPAD, BOS, EOS, PAD: not words


# ------------------------------------------------------------------------------------------------ loading
def load_codec(corpus: Path):
    """(MimiConfig, params) of the codec the corpus was tokenized with (its mimi.safetensors + mimi.json)."""
    from moshi_jax.mimi import checkpoint as mimi_ckpt

    info = json.loads((corpus / "corpus.json").read_text())
    path = Path(info["tokens"]["mimi"])
    if not path.is_file():  # a corpus moved since it was built: its own codec file
        path = corpus / path.name
    cfg = mimi_ckpt.config_beside(path)
    if cfg is None:
        raise SystemExit(f"{path}: no codec config beside it")
    return cfg, mimi_ckpt.load_reference(str(path), cfg)


def load_tokenizer(corpus: Path):
    from moshi_jax.lm.tokenizer import TextTokenizer

    return TextTokenizer.load(corpus / "tokenizer.model")


def run_steps(run_dir: Path) -> list[int]:
    from moshi_jax.training import export

    return export.checkpoint_steps(export.checkpoint_dir(run_dir, export.read_run_config(run_dir)))


def load_model(run_dir: Path, step: int | None = None):
    """(TrainConfig, LMConfig, LM params) of a training run at `step` (None: the latest checkpoint), exported to
    the reference layout and loaded back, as a user of `moshi-jax export` would."""
    from moshi_jax.lm import checkpoint as lm_ckpt
    from moshi_jax.lm.config import LMConfig
    from moshi_jax.training import config as config_lib
    from moshi_jax.training import export

    saved = export.read_run_config(run_dir)
    cfg = config_lib.from_dict(config_lib.TrainConfig, saved)
    steps = run_steps(run_dir)
    if not steps:
        raise SystemExit(f"{run_dir}: no checkpoints")
    step = steps[-1] if step is None else step
    with tempfile.TemporaryDirectory() as tmp:
        export.export_run(export.ExportRequest(run_dir, Path(tmp), step=step, progress=False))
        conf = json.loads((Path(tmp) / "config.json").read_text())
        lm_cfg = LMConfig.from_reference_kwargs(conf).with_dtypes("float32", "float32")
        params = lm_ckpt.load_reference(Path(tmp) / "model.safetensors", lm_cfg)
    return cfg, lm_cfg, params, step


# ------------------------------------------------------------------------------------------------ ASR
def decode_text(tokenizer, tokens: Sequence[int]) -> str:
    """Text tokens -> words; padding / special ids are dropped, and so are ids past the tokenizer's vocabulary
    (the LM's text head is larger than the small corpus vocabulary; an untrained model emits such ids)."""
    keep = [int(t) for t in tokens if int(t) not in SKIP_TEXT_IDS and 0 <= int(t) < tokenizer.vocab_size]
    return tokenizer.decode(keep)


def asr_engine(mimi_cfg, lm_cfg, delay: int, tokenizer):
    from moshi_jax.engine.engine import Engine, EngineConfig
    from moshi_jax.nn.sampling import SamplingConfig

    return Engine(mimi_cfg, lm_cfg, EngineConfig(mode="asr", sampling=SamplingConfig.greedy(),
                                                 text_delay_frames=delay), tokenizer)


def transcribe(engine, params, wavs: Sequence[np.ndarray], batch: int = 32) -> list[str]:
    """Streaming ASR through the engine: each utterance fed frame by frame, followed by `d + 2` frames of
    silence so that the text of its last frame (`d` frames later) comes out, its valid text tokens decoded.
    Utterances share a fixed-size batch (one compile); a shorter one's stream goes on with silence until the
    longest ends, and only its own frames + `d + 2` count: what the same stream run alone gives. A model
    trained on recordings without trailing silence never heard silence after an utterance (its windows end with
    the recording): `moshi-jax data synth` appends `--trailing-silence` (1 s) to every recording for that."""
    out: list[str] = []
    d = engine.cfg.text_delay_frames
    for i in range(0, len(wavs), batch):
        chunk = list(wavs[i:i + batch])
        n = len(chunk)
        chunk += [np.zeros(FRAME, np.float32)] * (batch - n)  # fixed batch: one compile
        own = [-(-len(w) // FRAME) + d + 2 for w in chunk]
        frames = max(own)
        pcm = np.zeros((batch, frames * FRAME), np.float32)
        for b, w in enumerate(chunk):
            pcm[b, :len(w)] = w
        state = engine.init_state(batch)
        active = np.ones(batch, bool)
        toks: list[list[int]] = [[] for _ in range(batch)]
        for f in range(frames):
            state, fo = engine.step(params, state, pcm[:, f * FRAME:(f + 1) * FRAME], active)
            text, valid = np.asarray(fo.text_token), np.asarray(fo.valid)
            for b in range(batch):
                if valid[b] and f < own[b]:
                    toks[b].append(int(text[b]))
        out += [decode_text(engine.tokenizer, t) for t in toks[:n]]
    return out


def transcribe_codes(lm_cfg, lm_params, codes: Sequence[np.ndarray], delay: int, tokenizer,
                     batch: int = 32, extra_frames: int | None = None) -> list[str]:
    """ASR on Mimi codes [K, N] (no codec): the model's forward on the training grid, greedy text one frame at a
    time (the engine's ASR step computes the same argmax; tests/engine/test_asr.py). The grid runs
    `extra_frames` (default `delay + 1`) frames past the longest codes, with no audio input there (-1), so the
    text of the last frames comes out."""
    import jax

    from moshi_jax.data import pipeline
    from moshi_jax.lm import model as M

    fwd = jax.jit(lambda p, g: M.forward(p, g, lm_cfg).text_logits[:, 0])
    K = lm_cfg.n_q
    extra = delay + 1 if extra_frames is None else extra_frames
    out: list[str] = []
    for i in range(0, len(codes), batch):
        chunk = list(codes[i:i + batch])
        L = max(c.shape[1] for c in chunk) + extra
        grid = np.full((batch, 1 + K, L), pipeline.PAD_VALUE, np.int32)
        for b, c in enumerate(chunk):
            grid[b, 1:, :c.shape[1]] = c[:K]
        for s in range(delay, L):
            logits = np.asarray(fwd(lm_params, grid))
            grid[:, 0, s] = logits[:, s].argmax(-1)
        # each item's own frames + `extra` only (a shorter item's grid runs on until the longest ends)
        out += [decode_text(tokenizer, grid[b, 0, delay:c.shape[1] + extra]) for b, c in enumerate(chunk)]
    return out


# ------------------------------------------------------------------------------------------------ TTS
def tts_engine(mimi_cfg, lm_cfg, delay: int, tokenizer, temp: float, seed: int, initial_padding: int = 0):
    """The engine in "tts" mode. `initial_padding`: PADs the word state machine forces before the first word
    (the reference's default is 2; 0 here because the corpus's first word starts at the recording's start)."""
    from moshi_jax.engine.engine import Engine, EngineConfig
    from moshi_jax.nn.sampling import SamplingConfig

    sampling = SamplingConfig(use_sampling=True, temp=temp, top_k=25, temp_text=temp, top_k_text=25)
    return Engine(mimi_cfg, lm_cfg, EngineConfig(mode="tts", sampling=sampling, text_delay_frames=delay,
                                                 seed=seed, tts_initial_padding=initial_padding), tokenizer)


def synthesize(engine, params, texts: Sequence[str], batch: int = 32, max_frames: int = 120
               ) -> list[tuple[np.ndarray, np.ndarray]]:
    """TTS through the engine: each text loaded into its batch item, frames stepped until every item is done
    (or `max_frames`). Returns per text (pcm float32 [T], codes int32 [dep_q, N]) of its valid audio frames."""
    results = []
    for i in range(0, len(texts), batch):
        chunk = list(texts[i:i + batch])
        n = len(chunk)
        state = engine.init_state(batch)
        for b in range(batch):
            state = engine.load_text(state, b, chunk[b] if b < n else chunk[0])
        pcm: list[list[np.ndarray]] = [[] for _ in range(batch)]
        codes: list[list[np.ndarray]] = [[] for _ in range(batch)]
        done = np.zeros(batch, bool)
        silence = np.zeros((batch, FRAME), np.float32)
        for _ in range(max_frames):
            state, fo = engine.step(params, state, silence, ~done)
            av, p, c = np.asarray(fo.audio_valid), np.asarray(fo.pcm), np.asarray(fo.codes)
            for b in range(batch):
                if av[b] and not done[b]:
                    pcm[b].append(p[b])
                    codes[b].append(c[b])
            done |= np.asarray(fo.done)
            if done[:n].all():
                break
        for b in range(n):
            wav = np.concatenate(pcm[b]) if pcm[b] else np.zeros(FRAME, np.float32)
            cod = np.stack(codes[b], axis=1) if codes[b] else np.zeros((engine.lm_cfg.dep_q, 1), np.int32)
            results.append((wav, cod))
    return results


def synthesize_forced_text(lm_cfg, lm_params, records: Sequence[np.ndarray], delay: int, temp: float, seed: int,
                           ) -> list[np.ndarray]:
    """TTS with the text stream forced to each record's own (training-layout) text: the audio the model samples
    when the words come exactly when the recording said them, without the engine's word state machine (which
    lets the model's own EPAD predictions time the words). As in training (and in the engine's "tts" mode) the
    audio streams before the text lead are the zero token, not samples. records: tokenized codes [1 + K, F]
    (text + audio); returns the sampled audio codes [dep_q, F] of each record's audio frames (temp 0: greedy)."""
    import jax
    import jax.numpy as jnp

    from moshi_jax.data import pipeline
    from moshi_jax.lm import generate as G
    from moshi_jax.nn.sampling import SamplingConfig

    if delay > 0:
        raise ValueError(f"forced-text TTS needs text ahead of (or aligned with) the audio, got text delay {delay}")
    lead, dep_q = -delay, lm_cfg.dep_q
    dk = np.asarray(lm_cfg.delays[1:1 + dep_q], np.int32)
    layout = pipeline._Layout(1, dep_q, delay)
    grids = [pipeline.to_model_grid(r[:1 + dep_q], "audio", 1, layout) for r in records]
    B, T = len(grids), max(g.shape[1] for g in grids) + int(dk.max())
    text = np.full((B, T), lm_cfg.existing_text_padding_id, np.int32)  # PAD after a record's end
    for i, g in enumerate(grids):
        text[i, :g.shape[1]] = np.where(g[0] >= 0, g[0], lm_cfg.existing_text_padding_id)
    sampling = SamplingConfig(use_sampling=temp > 0, temp=temp or 1.0, top_k=25, temp_text=temp or 1.0,
                              top_k_text=25)
    params = G.prepare_streaming_params(lm_params, lm_cfg)
    state = G.init_gen_state(lm_cfg, B)
    user = jnp.zeros((B, lm_cfg.n_q - dep_q), jnp.int32)
    keys = jax.random.split(jax.random.key(seed), T)
    rows, streams, CT = jnp.arange(B)[:, None], jnp.arange(1, 1 + dep_q)[None], lm_cfg.max_delay + 2
    sampled = np.zeros((B, dep_q, T), np.int32)  # delayed domain: codebook k at call s is time s - d_k
    for s in range(T):
        state, out = G.step(params, state, user, keys[s], cfg=lm_cfg, sampling=sampling,
                            forced_text=jnp.asarray(text[:, s]))
        if s < lead + dk.max():  # the engine's rule: codebook k of a time before the lead is the zero token
            col = (state.offsets % CT)[:, None]
            cur = state.cache[rows, streams, col]
            zero = jnp.where(s < jnp.asarray(dk)[None] + lead, lm_cfg.zero_token_id, cur)
            state = state.replace(cache=state.cache.at[rows, streams, col].set(zero))
        sampled[:, :, s] = np.asarray(out.sampled_audio)
    return [np.stack([sampled[i, k, lead + dk[k]: lead + dk[k] + r.shape[1]] for k in range(dep_q)])
            for i, r in enumerate(records)]


# ------------------------------------------------------------------------------------------------ the benchmark
def _utterances(corpus: Path, split: str, limit: int) -> list[dict]:
    from moshi_jax.data.speech_corpus import read_transcripts

    return read_transcripts(corpus / f"{split}.jsonl")[:limit]


def _wavs(items: list[dict]) -> list[np.ndarray]:
    from moshi_jax.audio import load_audio

    return [load_audio(it["path"], 24000)[0] for it in items]


def _examples(refs: list[str], hyps: list[str], k: int = 5) -> list[dict]:
    return [{"reference": r, "hypothesis": h} for r, h in zip(refs[:k], hyps[:k], strict=True)]


def bench_asr(args, mimi_cfg, mimi_params, tok) -> dict:
    from moshi_jax.eval.speech_metrics import wer

    cfg, lm_cfg, lm_params, step = load_model(args.asr_run)
    engine = asr_engine(mimi_cfg, lm_cfg, cfg.data.text_delay_frames, tok)
    params = {"mimi": mimi_params, "lm": lm_params}
    result = {"run": str(args.asr_run), "step": step, "text_delay_frames": cfg.data.text_delay_frames, "splits": {},
              "_model": (engine, params, lm_cfg, cfg.data.text_delay_frames)}
    if args.no_asr_eval:
        return result
    for split in ("heldout_sentences", "heldout_voices"):
        items = _utterances(args.corpus, split, args.utterances)
        t0 = time.perf_counter()
        hyps = transcribe(engine, params, _wavs(items), args.batch)
        refs = [it["text"] for it in items]
        result["splits"][split] = {"wer": wer(refs, hyps), "utterances": len(items),
                                   "seconds": time.perf_counter() - t0, "examples": _examples(refs, hyps)}
        log.info("ASR %s: WER %.3f on %d utterances", split, result["splits"][split]["wer"], len(items))
    if args.curve:
        items = _utterances(args.corpus, "heldout_sentences", args.curve_utterances)
        voices = _utterances(args.corpus, "heldout_voices", args.curve_utterances)
        wavs, vwavs = _wavs(items), _wavs(voices)
        refs, vrefs = [it["text"] for it in items], [it["text"] for it in voices]
        curve = []
        steps = [s for s in run_steps(args.asr_run) if s > 1 and (not args.curve_steps or s in args.curve_steps)]
        for s in steps:
            _, _, p, _ = load_model(args.asr_run, s)
            ps = {"mimi": mimi_params, "lm": p}
            point = {"step": s, "wer_seen_voices": wer(refs, transcribe(engine, ps, wavs, args.batch)),
                     "wer_unseen_voices": wer(vrefs, transcribe(engine, ps, vwavs, args.batch))}
            log.info("ASR curve: %s", point)
            curve.append(point)
        result["curve"] = {"utterances": len(items), "points": curve}
    return result


def _codec_roundtrip(codec, mimi_params, wavs: Sequence[np.ndarray], num_codebooks: int
                     ) -> list[tuple[np.ndarray, np.ndarray]]:
    """(codes [K, frames], decoded audio [frames * 1920]) of each recording: one batched call on copies
    zero-padded to the longest (one compile; the codec is causal, so the padding after a recording does not
    change its frames), then cut back to each recording's own frames."""
    import jax

    frames = [-(-len(w) // FRAME) for w in wavs]
    batch = np.zeros((len(wavs), 1, max(frames) * FRAME), np.float32)
    for i, w in enumerate(wavs):
        batch[i, 0, :len(w)] = w
    codes = np.asarray(jax.jit(lambda p, w: codec.encode_stream(p, w, num_codebooks))(mimi_params, batch))
    audio = np.asarray(jax.jit(codec.decode_stream)(mimi_params, codes))
    return [(codes[i, :, :f], audio[i, 0, :f * FRAME]) for i, f in enumerate(frames)]


def bench_tts(args, mimi_cfg, mimi_params, tok, asr) -> dict:
    from moshi_jax.eval.speech_metrics import mel_dtw_distance, wer

    cfg, lm_cfg, lm_params, step = load_model(args.tts_run)
    engine = tts_engine(mimi_cfg, lm_cfg, cfg.data.text_delay_frames, tok, args.tts_temp, args.seed,
                        args.tts_initial_padding)
    params = {"mimi": mimi_params, "lm": lm_params}
    items = _utterances(args.corpus, "heldout_sentences", args.tts_utterances)
    refs = [it["text"] for it in items]
    t0 = time.perf_counter()
    gen = synthesize(engine, params, refs, args.batch)
    seconds = time.perf_counter() - t0
    result = {"run": str(args.tts_run), "step": step, "text_delay_frames": cfg.data.text_delay_frames,
              "utterances": len(items), "seconds": seconds, "temperature": args.tts_temp,
              "initial_padding": args.tts_initial_padding,
              "generated_seconds_mean": float(np.mean([len(w) / 24000 for w, _ in gen]))}
    if asr is not None:
        asr_engine_, asr_params, asr_lm_cfg, asr_delay = asr["_model"]
        hyps_audio = transcribe(asr_engine_, asr_params, [w for w, _ in gen], args.batch)
        hyps_codes = transcribe_codes(asr_lm_cfg, asr_params["lm"], [c for _, c in gen], asr_delay, tok, args.batch)
        result["wer_audio"] = wer(refs, hyps_audio)
        result["wer_codes"] = wer(refs, hyps_codes)
        result["examples_codes"] = _examples(refs, hyps_codes)
        result["examples_audio"] = _examples(refs, hyps_audio)
        # The same ASR on the codec's codes of eSpeak's own rendering: the ceiling of the codes path.
        wavs = _wavs(items)
        espeak = _codec_roundtrip(engine.codec, mimi_params, wavs, lm_cfg.dep_q)
        result["wer_codes_espeak"] = wer(refs, transcribe_codes(asr_lm_cfg, asr_params["lm"], [c for c, _ in espeak],
                                                                asr_delay, tok, args.batch))
        # ... and the ASR engine on the codec's decoding of those codes: the ceiling of the audio path (what the
        # codec's decode -> encode round trip costs on eSpeak's own speech)
        result["wer_audio_espeak"] = wer(refs, transcribe(asr_engine_, asr_params, [w for _, w in espeak],
                                                          args.batch))
        # The model with the recording's own word timing (no word state machine): how much is timing?
        from moshi_jax.data.records import TokenizedDataset

        # the run's own held-out tokens (its text layout, e.g. `--epad-every-word`), else the corpus's
        evals = [Path(src.path) for src in cfg.data.eval_sources if Path(src.path).name == "heldout_sentences"]
        held = TokenizedDataset.open(evals[0] if evals else args.corpus / "tokens" / "heldout_sentences")
        index = {Path(r["path"]).name: i for i, r in enumerate(held.records)}  # the manifest's order, by file
        forced = synthesize_forced_text(lm_cfg, lm_params, [held.read(index[Path(it["path"]).name])[0] for it in items],
                                        cfg.data.text_delay_frames, args.tts_temp, args.seed)
        hyps_forced = transcribe_codes(asr_lm_cfg, asr_params["lm"], forced, asr_delay, tok, args.batch)
        result["wer_codes_forced_text"] = wer(refs, hyps_forced)
        result["examples_forced_text"] = _examples(refs, hyps_forced)
        if args.tts_curve_steps:
            n = min(len(items), args.curve_utterances)
            curve = []
            for s in [s for s in run_steps(args.tts_run) if s in args.tts_curve_steps]:
                _, _, p, _ = load_model(args.tts_run, s)
                codes = [c for _, c in synthesize(engine, {"mimi": mimi_params, "lm": p}, refs[:n], args.batch)]
                point = {"step": s, "wer_codes": wer(refs[:n], transcribe_codes(asr_lm_cfg, asr_params["lm"], codes,
                                                                                asr_delay, tok, args.batch))}
                log.info("TTS curve: %s", point)
                curve.append(point)
            result["curve"] = {"utterances": n, "points": curve}
    # DTW log-mel distances
    wavs = _wavs(items)
    roundtrip = [w for _, w in _codec_roundtrip(engine.codec, mimi_params, wavs, lm_cfg.dep_q)]
    n = min(len(items), args.dtw_utterances)
    result["dtw"] = {
        "utterances": n,
        "tts_vs_codec_espeak_same_sentence": float(np.mean([mel_dtw_distance(gen[i][0], roundtrip[i], 24000)
                                                            for i in range(n)])),
        "codec_espeak_other_sentence": float(np.mean([mel_dtw_distance(roundtrip[(i + 1) % n], roundtrip[i], 24000)
                                                      for i in range(n)])),
        "tts_vs_codec_espeak_other_sentence": float(np.mean([mel_dtw_distance(gen[(i + 1) % n][0], roundtrip[i],
                                                                              24000) for i in range(n)])),
        "tts_vs_raw_espeak_same_sentence": float(np.mean([mel_dtw_distance(gen[i][0], wavs[i], 24000)
                                                          for i in range(n)])),
    }
    log.info("TTS: %s", {k: v for k, v in result.items() if not k.startswith("examples")})
    return result


def codec_probe(corpus: Path, pairs: int, num_codebooks: int = 8) -> dict:
    """Do the corpus's codes carry what was said, across voices? The held-out sentences are spoken once by a seen
    voice and once by an unseen voice: mean DTW distance between the two renderings of the SAME sentence against
    renderings of DIFFERENT sentences, on the Mimi codes (one-hot, `num_codebooks` levels), on the codec's
    quantized latent of the semantic level alone and of all `num_codebooks` levels (a trained codec's codes of
    two voices rarely match exactly, while their latents can still be close), and on the audio's log-mel frames
    (80 ms hop, per-utterance standardised). Same < different means the representation tells
    sentences apart whoever speaks them; equal means it mostly encodes the voice."""
    import jax.numpy as jnp

    from moshi_jax.audio import load_audio
    from moshi_jax.data.records import TokenizedDataset
    from moshi_jax.eval.speech_metrics import dtw_distance, log_mel
    from moshi_jax.mimi.model import MimiCodec

    a = [c[1:1 + num_codebooks] for c, _ in TokenizedDataset.open(corpus / "tokens" / "heldout_sentences")]
    b = [c[1:1 + num_codebooks] for c, _ in TokenizedDataset.open(corpus / "tokens" / "heldout_voices")]
    n = min(pairs, len(a) - 1)

    bins = 1 + max(int(c.max()) for c in a[:n + 1] + b[:n + 1])  # the codec's codebook size (as used)

    def onehot(c):
        out = np.zeros((c.shape[1], c.shape[0] * bins), np.float32)
        for k in range(c.shape[0]):
            out[np.arange(c.shape[1]), k * bins + c[k]] = 1
        return out

    def z(x):
        return (x - x.mean(0)) / (x.std(0) + 1e-6)

    cfg, params = load_codec(corpus)
    codec = MimiCodec(cfg)

    def latent(c, levels):  # the codec's quantized latent of the first `levels` codebooks, [F, D] standardised
        return z(np.asarray(codec.decode_latent(params, jnp.asarray(c[None, :levels].astype(np.int32))))[0].T)

    lat = {}
    for levels in (1, num_codebooks):  # the semantic level alone, and every level
        la, lb = [latent(c, levels) for c in a[:n + 1]], [latent(c, levels) for c in b[:n + 1]]
        lat[f"latent{levels}_same_sentence"] = float(np.mean([dtw_distance(la[i], lb[i]) for i in range(n)]))
        lat[f"latent{levels}_other_sentence"] = float(np.mean([dtw_distance(la[i], lb[i + 1]) for i in range(n)]))
    ia = _utterances(corpus, "heldout_sentences", n + 1)
    ib = _utterances(corpus, "heldout_voices", n + 1)
    ma = [z(log_mel(load_audio(x["path"], 24000)[0], 24000, hop=FRAME // 2)) for x in ia]
    mb = [z(log_mel(load_audio(x["path"], 24000)[0], 24000, hop=FRAME // 2)) for x in ib]
    return {"pairs": n, "num_codebooks": num_codebooks,
            "codes_same_sentence": float(np.mean([dtw_distance(onehot(a[i]), onehot(b[i])) for i in range(n)])),
            "codes_other_sentence": float(np.mean([dtw_distance(onehot(a[i]), onehot(b[i + 1])) for i in range(n)])),
            "logmel_same_sentence": float(np.mean([dtw_distance(ma[i], mb[i]) for i in range(n)])),
            "logmel_other_sentence": float(np.mean([dtw_distance(ma[i], mb[i + 1]) for i in range(n)])), **lat}


def _plot(result: dict, out_png: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from moshi_jax.training.curves import read_metrics

    panels = [k for k in ("asr", "tts") if k in result]
    curve, tts_curve = result.get("asr", {}).get("curve"), result.get("tts", {}).get("curve")
    n = len(panels) + bool(curve) + bool(tts_curve)
    fig, axes = plt.subplots(1, n, figsize=(5 * n, 3.8), squeeze=False)
    axes = list(axes[0])
    # WER-against-steps panels: (curve, [(key, style, label)], target %, title)
    wer_panels = [(tts_curve, [("wer_codes", "o-", "TTS codes read by the ASR")], 40,
                   "streaming TTS through the engine"),
                  (curve, [("wer_seen_voices", "o-", "seen voices"), ("wer_unseen_voices", "s-", "unseen voices")],
                   20, "streaming ASR through the engine")]
    for c, series, target, title in wer_panels:
        if not c:
            continue
        ax = axes.pop(0)
        for key, style, label in series:
            ax.plot([p["step"] for p in c["points"]], [100 * p[key] for p in c["points"]], style, label=label)
        ax.axhline(target, color="gray", ls="--", lw=0.8, label=f"target {target}%")
        ax.set_xlabel("step")
        ax.set_ylabel("WER % (held-out sentences)")
        ax.set_title(title)
        ax.grid(alpha=0.3)
        ax.legend()
    for ax, k in zip(axes, panels, strict=True):
        data = read_metrics(Path(result[k]["run"]) / "metrics.jsonl")
        for prefix, style in (("train", "-"), ("eval", "o-")):
            recs = data.get(prefix, [])
            for key in ("text_loss", "audio_loss"):
                pts = [(r["step"], r[key]) for r in recs if key in r and r[key] > 0]
                if pts:
                    ax.plot(*zip(*pts, strict=True), style, ms=3, lw=0.8 if prefix == "train" else 1.2,
                            label=f"{prefix} {key}")
        ax.set_yscale("log")
        ax.set_xlabel("step")
        ax.set_title(f"{k.upper()} losses (eval: held-out sentences)")
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(out_png, dpi=110)
    plt.close(fig)


def _markdown(result: dict) -> str:
    lines = ["# Learning benchmark (issue 13)", ""]
    if "asr" in result:
        a = result["asr"]
        lines += [f"ASR run `{a['run']}` at step {a['step']} (text delay {a['text_delay_frames']} frames), streaming "
                  "through the engine's asr mode, greedy:", "", "| split | utterances | WER |", "|---|---|---|"]
        lines += [f"| {s} | {v['utterances']} | {100 * v['wer']:.1f}% |" for s, v in a["splits"].items()]
        if a.get("curve"):
            lines += ["", f"WER against training steps ({a['curve']['utterances']} utterances per split):", "",
                      "| step | seen voices | unseen voices |", "|---|---|---|"]
            lines += [f"| {p['step']} | {100 * p['wer_seen_voices']:.1f}% | {100 * p['wer_unseen_voices']:.1f}% |"
                      for p in a["curve"]["points"]]
        lines += ["", "Examples (held-out sentences, seen voices):", ""]
        lines += [f"- ref `{e['reference']}` / hyp `{e['hypothesis']}`"
                  for e in a["splits"]["heldout_sentences"]["examples"]]
    if "tts" in result:
        t = result["tts"]
        lines += ["", f"TTS run `{t['run']}` at step {t['step']} (text {-t['text_delay_frames']} frames ahead), "
                  f"{t['utterances']} held-out sentences, sampled at temperature {t['temperature']}:", ""]
        for key, what in (("wer_codes", "WER of the generated codes, transcribed by the trained ASR model"),
                          ("wer_codes_espeak", "(ceiling) the same ASR on the codec's codes of eSpeak's rendering"),
                          ("wer_codes_forced_text", "the TTS model with the text forced to the recording's own word "
                                                    "timing (no word state machine), codes read by the ASR model"),
                          ("wer_audio", "WER of the decoded audio through the ASR engine (codec round trip)"),
                          ("wer_audio_espeak", "(ceiling) the same on the codec's decoding of eSpeak's codes")):
            if key in t:
                lines.append(f"- {what}: {100 * t[key]:.1f}%")
        if t.get("curve"):
            lines += ["", f"TTS WER (codes read by the ASR) against training steps ({t['curve']['utterances']} "
                      "sentences):", "", "| step | WER |", "|---|---|"]
            lines += [f"| {p['step']} | {100 * p['wer_codes']:.1f}% |" for p in t["curve"]["points"]]
            lines.append("")
        d = t["dtw"]
        lines += [f"- DTW log-mel distance ({d['utterances']} utterances): TTS vs codec(eSpeak) same sentence "
                  f"{d['tts_vs_codec_espeak_same_sentence']:.2f}, TTS vs codec(eSpeak) other sentence "
                  f"{d['tts_vs_codec_espeak_other_sentence']:.2f}, codec(eSpeak) between different sentences "
                  f"{d['codec_espeak_other_sentence']:.2f}, TTS vs raw eSpeak "
                  f"{d['tts_vs_raw_espeak_same_sentence']:.2f}"]
        if "examples_codes" in t:
            lines += ["", "Examples (codes path):", ""]
            lines += [f"- ref `{e['reference']}` / hyp `{e['hypothesis']}`" for e in t["examples_codes"]]
    if "codec_probe" in result:
        c = result["codec_probe"]
        lines += ["", f"Codec probe ({c['pairs']} held-out sentences, each spoken by a seen and an unseen voice; mean "
                  "DTW distance, same sentence vs a different sentence): Mimi codes "
                  f"{c['codes_same_sentence']:.3f} vs {c['codes_other_sentence']:.3f}, log-mel "
                  f"{c['logmel_same_sentence']:.3f} vs {c['logmel_other_sentence']:.3f}"
                  + "".join(f", quantized latent of {k} level{'s' if k > 1 else ''} "
                            f"{c[f'latent{k}_same_sentence']:.3f} vs {c[f'latent{k}_other_sentence']:.3f}"
                            for k in (1, c["num_codebooks"]) if f"latent{k}_same_sentence" in c) + "."]
    lines += ["", "![learning curves](learning.png)"]
    return "\n".join(lines) + "\n"


def main(argv: Sequence[str] | None = None) -> dict:
    p = argparse.ArgumentParser(prog="python -m benchmarks.learning", description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter, epilog=__doc__)
    p.add_argument("--corpus", type=Path, default=Path("runs/corpus"), help="`moshi-jax data synth` output")
    p.add_argument("--asr-run", type=Path, default=None, help="ASR training run dir (e.g. runs/asr_small)")
    p.add_argument("--tts-run", type=Path, default=None, help="TTS training run dir (e.g. runs/tts_small)")
    p.add_argument("--utterances", type=int, default=200, help="held-out utterances per ASR split (default 200)")
    p.add_argument("--no-asr-eval", action="store_true",
                   help="load the ASR model only to score TTS; keep the ASR results already in <out>.json")
    p.add_argument("--curve", action="store_true", help="ASR WER at every saved checkpoint")
    p.add_argument("--curve-steps", type=lambda v: [int(x) for x in v.split(",")], default=None,
                   help="comma list of checkpoint steps for the curve (default: every saved one)")
    p.add_argument("--curve-utterances", type=int, default=64, help="utterances per split for the curve")
    p.add_argument("--tts-curve-steps", type=lambda v: [int(x) for x in v.split(",")], default=None,
                   help="comma list of TTS checkpoint steps: TTS WER (codes read by the ASR) at each, on "
                        "--curve-utterances held-out sentences")
    p.add_argument("--tts-utterances", type=int, default=64, help="held-out sentences for TTS (default 64)")
    p.add_argument("--dtw-utterances", type=int, default=32, help="TTS utterances scored by DTW (default 32)")
    p.add_argument("--tts-temp", type=float, default=0.7, help="TTS sampling temperature (text and audio)")
    p.add_argument("--tts-initial-padding", type=int, default=0,
                   help="PADs forced before the first word by the TTS word state machine (default 0: the corpus's "
                        "first word starts its recording; the reference's default is 2)")
    p.add_argument("--batch", type=int, default=32, help="utterances per engine batch")
    p.add_argument("--probe-pairs", type=int, default=40, help="sentence pairs of the codec probe (default 40)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--out", type=Path, default=Path("benchmarks/results/learning"),
                   help="output prefix: <out>.json, <out>.md, <out>.png")
    args = p.parse_args(argv)
    from moshi_jax.training.loop import setup_logging

    setup_logging()
    log.setLevel(logging.INFO)
    if args.asr_run is None and args.tts_run is None:
        p.error("give --asr-run and/or --tts-run")
    mimi_cfg, mimi_params = load_codec(args.corpus)
    tok = load_tokenizer(args.corpus)
    previous = args.out.with_suffix(".json")
    result: dict = {"corpus": str(args.corpus)}
    if args.no_asr_eval and previous.is_file():
        result.update({k: v for k, v in json.loads(previous.read_text()).items() if k == "asr"})
    asr = bench_asr(args, mimi_cfg, mimi_params, tok) if args.asr_run else None
    if asr is not None and not args.no_asr_eval:
        result["asr"] = asr
        result["codec_probe"] = codec_probe(args.corpus, args.probe_pairs)
    elif previous.is_file() and "codec_probe" in json.loads(previous.read_text()):
        result["codec_probe"] = json.loads(previous.read_text())["codec_probe"]
    if args.tts_run:
        result["tts"] = bench_tts(args, mimi_cfg, mimi_params, tok, asr)
    if asr is not None:
        asr.pop("_model")
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.with_suffix(".json").write_text(json.dumps(result, indent=2))
    md = _markdown(result).replace("learning.png", args.out.with_suffix(".png").name)
    args.out.with_suffix(".md").write_text(md)
    try:
        _plot(result, args.out.with_suffix(".png"))
    except ImportError:
        log.info("matplotlib missing: no figure")
    print(md)
    return result


if __name__ == "__main__":
    main()
