"""Streaming TTS: the vectorised word state machine against the reference `StateMachine`, script parsing against
the reference `script_to_entries`, and the TTS engine's feeding / delays checked against the LM's training
forward (greedy: the audio the engine emits is the argmax of the teacher-forced forward on the grid the data
pipeline would build for this text with the same text/audio delay)."""

from __future__ import annotations

import dataclasses

import jax
import numpy as np
import pytest

from moshi_jax.engine import tts as T
from moshi_jax.engine.engine import Engine, EngineConfig, default_tokenizer, preset_configs, random_lm_params
from moshi_jax.lm import model as M
from moshi_jax.nn.sampling import SamplingConfig

ref_tts = pytest.importorskip("moshi.models.tts")

DELAY = 2  # audio lags text by 2 frames


@pytest.fixture(scope="module")
def tokenizer():
    return default_tokenizer(512)


def _random_entries(r: np.random.Generator) -> list[T.Entry]:
    out = []
    for _ in range(r.integers(1, 7)):
        if r.random() < 0.2:
            out.append(T.Entry((), "", int(r.integers(0, 4))))
        else:
            toks = tuple(int(x) for x in r.integers(10, 100, r.integers(1, 4)))
            out.append(T.Entry(toks, "w", int(r.integers(0, 3))))
    return out


@pytest.mark.parity
def test_state_machine_matches_reference_on_random_predictions():
    r = np.random.default_rng(0)
    Bn, steps, max_pad, init_pad = 5, 60, 4, 2
    scripts = [_random_entries(r) for _ in range(Bn)]
    preds = r.choice([0, 3, 3, 3, 17, 42], size=(steps, Bn)).astype(np.int32)  # EPAD, PAD, other tokens

    machine = ref_tts.StateMachine(ref_tts.TokenIds(card=513), max_padding=max_pad, initial_padding=init_pad)
    ref_states = [machine.new_state([ref_tts.Entry(list(e.tokens), e.text, e.padding) for e in s]) for s in scripts]
    ref_out = np.array([[machine.process(i, st, int(preds[i, b]))[0] for b, st in enumerate(ref_states)]
                        for i in range(steps)])

    state = T.init_tts_state(Bn, 8, 32, init_pad)
    rows = [T.pack_entries(s, 8, 32) for s in scripts]
    state = state.replace(**{k: np.stack([row[k] for row in rows]) for k in rows[0]})
    proc = jax.jit(T.process, static_argnums=3)
    got = []
    for i in range(steps):
        state, fed = proc(state, np.full(Bn, i, np.int32), preds[i], max_pad)
        got.append(np.asarray(fed))
    assert np.array_equal(np.stack(got), ref_out)
    assert [s.end_step if s.end_step is not None else -1 for s in ref_states] == list(np.asarray(state.end_step))
    for b, s in enumerate(ref_states):
        assert list(np.asarray(state.consumed_at[b, :len(s.consumption_times)])) == s.consumption_times


@pytest.mark.parity
@pytest.mark.parametrize("multi_speaker,padding_between", [(False, 0), (True, 1)])
def test_script_to_entries_matches_reference(tokenizer, multi_speaker, padding_between):
    script = ["Hello there: how (are) you’re doing <break time=\"0.5s\"/> today?", "the quick brown fox"]
    ref = ref_tts.script_to_entries(tokenizer.sp, ref_tts.TokenIds(card=513), 12.5, script,
                                    multi_speaker=multi_speaker, padding_between=padding_between)
    got = T.script_to_entries(tokenizer.encode, script, 12.5, multi_speaker, padding_between)
    assert [(list(e.tokens), e.text, e.padding) for e in got] == [(e.tokens, e.text, e.padding) for e in ref]


def test_pack_entries_refuses_texts_over_capacity():
    with pytest.raises(ValueError, match="tts_max_words"):
        T.pack_entries([T.Entry((5,), "a")] * 3, 2, 10)
    with pytest.raises(ValueError, match="tts_max_tokens"):
        T.pack_entries([T.Entry((5, 6, 7), "a")], 2, 2)


@pytest.fixture(scope="module")
def tts_engine(tokenizer):
    mimi_cfg, lm_cfg = preset_configs("tiny")
    cfg = EngineConfig(mode="tts", sampling=SamplingConfig.greedy(), text_delay_frames=-DELAY, tts_max_padding=3,
                       tts_final_padding=2, tts_max_words=16, tts_max_tokens=64)
    engine = Engine(mimi_cfg, lm_cfg, cfg, tokenizer)
    params = {"mimi": engine.codec.init(jax.random.PRNGKey(3)), "lm": random_lm_params(lm_cfg, 4)}
    return engine, params


def _run_tts(engine, params, texts, n):
    state = engine.init_state(len(texts))
    for b, text in enumerate(texts):
        state = engine.load_text(state, b, text)
    outs = []
    zeros = np.zeros((len(texts), engine.frame_size), np.float32)
    for _ in range(n):
        state, out = engine.step(params, state, zeros, np.ones(len(texts), bool))
        outs.append(jax.device_get(out))
    return state, outs


def test_tts_engine_feeds_words_by_the_rules_and_audio_lags_text(tts_engine):
    engine, params = tts_engine
    lm = engine.lm_cfg
    texts = ["hello there", "the quick brown fox jumps"]
    n = 40
    state, outs = _run_tts(engine, params, texts, n)
    fed = np.stack([o.text_token for o in outs])  # [n, B]
    for b, text in enumerate(texts):
        words = [tuple(engine.tokenizer.encode(w)) for w in text.split()]
        seq = list(fed[:, b])
        assert seq[:2] == [3, 3]  # tts_initial_padding PADs first
        # the word tokens come in order, each word right after an EPAD (new word), one token per frame
        i, got_words = 0, []
        while i < len(seq):
            if seq[i] == 0:
                j = i + 1
                while j < len(seq) and seq[j] not in (0, 3):
                    j += 1
                got_words.append(tuple(seq[i + 1:j]))
                i = j
            else:
                assert seq[i] == 3, "a word token outside a word"
                i += 1
        assert got_words == words
        # never more than max_padding PADs before a new word while words remain
        first_pad_run = max(len(r) for r in "".join("p" if t == 3 else "x" for t in seq[:seq.index(0, 2)]).split("x"))
        assert first_pad_run <= max(engine.cfg.tts_max_padding, engine.cfg.tts_initial_padding)
        end = int(state.tts.end_step[b])
        assert end > 0
        done = [bool(o.done[b]) for o in outs]
        first_done = done.index(True)
        assert first_done == end + DELAY + engine.cfg.tts_final_padding + lm.max_delay
        assert all(done[first_done:])
    # audio: Moshi frame of time t comes at frame t + max_delay; frames of time < DELAY are zero tokens
    audio_valid = np.stack([o.audio_valid for o in outs])
    assert not audio_valid[:DELAY + lm.max_delay].any() and audio_valid[DELAY + lm.max_delay:].all()
    assert all(np.abs(o.pcm).max() > 0 for o in outs[DELAY + lm.max_delay:])
    assert engine.step._cache_size() == 1


def test_tts_engine_audio_is_the_teacher_forced_forward_argmax(tts_engine):
    """The greedy audio codes equal the argmax of the training forward on the grid [fed text ; audio with
    DELAY zero-token frames ; user streams -1]: the engine feeds what training would have seen."""
    engine, params = tts_engine
    lm = engine.lm_cfg
    n = 14
    _, outs = _run_tts(engine, params, ["hello there friend", "the fox"], n)  # B = 2: the compiled step is shared
    Tn = n - lm.max_delay  # Moshi times 0..Tn-1 are complete
    grid = np.full((2, lm.num_streams, Tn), -1, np.int32)
    grid[:, 0] = np.stack([o.text_token for o in outs[:Tn]], axis=1)
    for t in range(DELAY, Tn):
        grid[:, 1:1 + lm.dep_q, t] = outs[t + lm.max_delay].codes
    logits = M.forward(params["lm"], grid, lm).audio_logits  # [2, dep_q, Tn, card]
    pred = np.asarray(logits.argmax(-1))  # [2, dep_q, Tn]
    for k in range(lm.dep_q):
        last = Tn - lm.delays[1 + k]  # the forward predicts codebook k up to time Tn - 1 - delay
        np.testing.assert_array_equal(pred[:, k, DELAY:last], grid[:, 1 + k, DELAY:last], err_msg=f"codebook {k}")


def test_load_text_restarts_only_that_item_and_checks_vocabulary(tts_engine):
    engine, params = tts_engine
    state, _ = _run_tts(engine, params, ["hello there", "hello there"], 6)
    state = engine.load_text(state, 1, "the fox")
    assert list(np.asarray(state.frame)) == [6, 0]
    assert int(state.tts.n_words[1]) == 2 and int(state.tts.n_words[0]) == 2
    with pytest.raises(ValueError, match="text vocabulary"):
        engine.load_text(state, 0, [T.Entry((10_000,), "x")])
    with pytest.raises(ValueError, match="outside the batch"):
        engine.load_text(state, 2, "hi")
    big = dataclasses.replace(engine.cfg, tts_max_words=1)
    assert big.tts_max_words == 1
