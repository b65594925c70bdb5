"""SentencePiece tokenizer, the format RecurrentGemma ships (`tokenizer.model`)."""

from __future__ import annotations

from pathlib import Path

from rgexport.errors import RgexportError


class Tokenizer:
    """Thin wrapper over `sentencepiece.SentencePieceProcessor` with Gemma's special ids."""

    def __init__(self, path: str | Path):
        import sentencepiece as spm

        self.path = Path(path)
        if not self.path.is_file():
            raise RgexportError(f"Tokenizer {self.path} does not exist")
        try:
            self._sp = spm.SentencePieceProcessor(model_file=str(self.path))
        except (RuntimeError, OSError) as e:
            raise RgexportError(f"{self.path} is not a SentencePiece model: {e}") from None

    @property
    def vocab_size(self) -> int:
        return self._sp.vocab_size()

    @property
    def bos_id(self) -> int:
        return self._sp.bos_id()

    @property
    def eos_id(self) -> int:
        return self._sp.eos_id()

    def encode(self, text: str, bos: bool = True) -> list[int]:
        ids = self._sp.encode(text)
        return [self.bos_id, *ids] if bos else ids

    def decode(self, ids: list[int]) -> str:
        return self._sp.decode(ids)

    def piece(self, token: int) -> str:
        """Text of one token, for streaming (SentencePiece's U+2581 word marker as a space)."""
        if token in (self.bos_id, self.eos_id) or token >= self.vocab_size:
            return ""
        if self._sp.is_byte(token):
            return self._sp.id_to_piece(token)
        return self._sp.id_to_piece(token).replace("\u2581", " ")
