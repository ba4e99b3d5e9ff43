"""Text tokenizer: a SentencePiece model (the released Moshi uses `tokenizer_spm_32k_3.model`, 32k unigram).

`TextTokenizer.load(path)`; `decode_piece(token) -> str | None` shows one generated text token the way
the reference server and `run_inference.py` do: PAD (3) and EPAD (0) give None (nothing to show), any
other id gives its piece with the SentencePiece word marker "▁" replaced by a space.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from pathlib import Path

import sentencepiece

WORD_MARKER = "\u2581"  # "▁": SentencePiece's word-boundary marker


class TextTokenizer:
    """Thin wrapper over `sentencepiece.SentencePieceProcessor` with the Moshi PAD/EPAD conventions."""

    def __init__(self, processor: sentencepiece.SentencePieceProcessor, padding_id: int = 3,
                 end_padding_id: int = 0):
        self.sp = processor
        self.padding_id = padding_id
        self.end_padding_id = end_padding_id

    @classmethod
    def load(cls, path: str | Path, padding_id: int = 3, end_padding_id: int = 0) -> TextTokenizer:
        """Load a `.model` file. A missing or unreadable file is a ValueError naming the path."""
        path = Path(path)
        if not path.is_file():
            raise ValueError(f"SentencePiece model not found: {path} (expected a .model file, e.g. "
                             "tokenizer_spm_32k_3.model from a Kyutai Moshi repository)")
        sp = sentencepiece.SentencePieceProcessor()
        try:
            sp.Load(str(path))
        except (OSError, RuntimeError) as e:  # sentencepiece raises OSError/RuntimeError on bad files
            raise ValueError(f"not a valid SentencePiece model: {path} ({e})") from e
        return cls(sp, padding_id, end_padding_id)

    @property
    def vocab_size(self) -> int:
        return self.sp.GetPieceSize()

    @property
    def bos_id(self) -> int:
        return self.sp.bos_id()

    @property
    def eos_id(self) -> int:
        return self.sp.eos_id()

    def _check(self, token: int) -> int:
        token = int(token)
        if not 0 <= token < self.vocab_size:
            raise ValueError(f"text token {token} outside the tokenizer vocabulary [0, {self.vocab_size})")
        return token

    def is_padding(self, token: int) -> bool:
        return int(token) in (self.padding_id, self.end_padding_id)

    def piece(self, token: int) -> str:
        """The raw SentencePiece piece of `token` (with "▁")."""
        return self.sp.IdToPiece(self._check(token))

    def decode_piece(self, token: int) -> str | None:
        """Text shown for one generated token: None for PAD / EPAD, else the piece with "▁" -> " "."""
        if self.is_padding(token):
            return None
        return self.piece(token).replace(WORD_MARKER, " ")

    def decode_stream(self, tokens: Iterable[int]) -> str:
        """Concatenate `decode_piece` over a stream of generated tokens (what a server would show)."""
        return "".join(p for p in (self.decode_piece(t) for t in tokens) if p is not None)

    def decode(self, tokens: Sequence[int]) -> str:
        """Proper SentencePiece detokenisation of `tokens`, PAD / EPAD removed."""
        return self.sp.DecodeIds([self._check(t) for t in tokens if not self.is_padding(t)])

    def encode(self, text: str) -> list[int]:
        """Token ids of `text` (no BOS/EOS)."""
        return self.sp.EncodeAsIds(text)  # a list already

    def encode_words(self, text: str) -> list[list[int]]:
        """Token ids per whitespace-separated word (what an aligned-transcript text stream places per word)."""
        return [self.encode(w) for w in text.split()]
