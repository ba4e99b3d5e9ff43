"""Text tokenizer on a tiny SentencePiece model trained inside the test (no downloads)."""

from __future__ import annotations

import pytest
import sentencepiece

from moshi_jax.lm.tokenizer import TextTokenizer

SENTENCES = [
    "hello there how are you doing today",
    "the quick brown fox jumps over the lazy dog",
    "moshi is a speech text foundation model",
    "streaming generation runs one frame at a time",
    "hello hello the model speaks and listens",
    "a small tokenizer for the tests of the project",
] * 4


@pytest.fixture(scope="module")
def spm_path(tmp_path_factory):
    out = tmp_path_factory.mktemp("spm")
    prefix = out / "tiny"
    # ids as in the released Moshi tokenizer: 0 unk (used as EPAD), 1 bos, 2 eos, 3 pad
    sentencepiece.SentencePieceTrainer.train(
        sentence_iterator=iter(SENTENCES), model_prefix=str(prefix), vocab_size=60, model_type="unigram",
        unk_id=0, bos_id=1, eos_id=2, pad_id=3, minloglevel=2)
    return prefix.with_suffix(".model")


@pytest.fixture(scope="module")
def tok(spm_path):
    return TextTokenizer.load(spm_path)


def test_loads_model_and_reports_special_ids(tok):
    assert tok.vocab_size == 60
    assert (tok.bos_id, tok.eos_id) == (1, 2)


def test_decode_piece_skips_pad_and_epad(tok):
    assert tok.decode_piece(3) is None
    assert tok.decode_piece(0) is None


def test_decode_piece_replaces_word_marker_with_space(tok):
    ids = tok.encode("hello there")
    pieces = [tok.piece(i) for i in ids]
    assert pieces[0].startswith("\u2581")
    shown = [tok.decode_piece(i) for i in ids]
    assert shown[0] == pieces[0].replace("\u2581", " ") and shown[0].startswith(" ")
    assert "".join(shown) == " hello there"


def test_stream_with_padding_decodes_to_the_words(tok):
    stream = [3, 3, 0] + tok.encode("hello") + [3, 0] + tok.encode("fox") + [3, 3]
    assert tok.decode_stream(stream) == " hello fox"
    assert tok.decode(stream) == "hello fox"


def test_encode_words_gives_one_id_list_per_word(tok):
    words = tok.encode_words("the quick  fox")
    assert len(words) == 3
    assert [tok.decode(w) for w in words] == ["the", "quick", "fox"]


def test_out_of_vocabulary_token_is_an_error(tok):
    with pytest.raises(ValueError, match="outside the tokenizer vocabulary"):
        tok.decode_piece(60)


def test_missing_file_is_a_clear_error(tmp_path):
    with pytest.raises(ValueError, match="not found"):
        TextTokenizer.load(tmp_path / "nope.model")


def test_corrupt_file_is_a_clear_error(tmp_path):
    bad = tmp_path / "bad.model"
    bad.write_bytes(b"this is not a sentencepiece model")
    with pytest.raises(ValueError, match="not a valid SentencePiece model"):
        TextTokenizer.load(bad)


def test_every_id_of_the_vocabulary_has_a_piece_and_ids_outside_are_errors(tok):
    assert tok.piece(0) == "<unk>" and tok.piece(59)  # both ends of [0, vocab_size)
    for bad in (-1, 60):
        with pytest.raises(ValueError, match=f"text token {bad} outside"):
            tok.piece(bad)
        with pytest.raises(ValueError, match="outside the tokenizer vocabulary"):
            tok.decode([5, bad])


def test_other_padding_ids_are_honoured(spm_path):
    tok = TextTokenizer.load(spm_path, padding_id=4, end_padding_id=5)
    assert tok.decode_piece(4) is None and tok.decode_piece(5) is None
    assert tok.decode_piece(3) is not None and tok.decode_piece(0) == tok.piece(0)
    assert not tok.is_padding(3) and tok.is_padding(5)


def test_a_tokenizer_built_from_a_processor_uses_moshis_pad_3_and_epad_0(tok):
    plain = TextTokenizer(tok.sp)
    assert (plain.padding_id, plain.end_padding_id) == (3, 0)
    assert plain.decode_stream([3, 0] + tok.encode("fox")) == " fox"
