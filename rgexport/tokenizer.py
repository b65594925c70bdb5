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
        except Exception as e:  # noqa: BLE001 - a damaged user file: one line naming it
            raise RgexportError(f"{self.path} is not a SentencePiece model: {type(e).__name__}: {e}") from None
        if self._sp.vocab_size() <= 0:
            raise RgexportError(f"{self.path} is a SentencePiece model with no pieces")

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

    def encode_rendered(self, text: str) -> list[int]:
        """Ids of text a chat template rendered: control tokens written as text (`<bos>`, `<eos>`) become
        their ids, as Hugging Face tokenizers do with special tokens; no BOS is added (the template writes
        it). Tokens SentencePiece itself matches in text (Gemma's `<start_of_turn>`) need nothing here."""
        import re

        controls = {self._sp.id_to_piece(i): i for i in range(self.vocab_size) if self._sp.is_control(i)}
        if not controls:
            return self._sp.encode(text)
        pattern = "(" + "|".join(re.escape(c) for c in sorted(controls, key=len, reverse=True)) + ")"
        ids: list[int] = []
        for part in re.split(pattern, text):
            if part in controls:
                ids.append(controls[part])
            elif part:
                ids.extend(self._sp.encode(part))
        return ids

    def decode(self, ids: list[int]) -> str:
        return self._sp.decode(ids)

    def piece(self, token: int) -> str:
        """Text of one token, for streaming (SentencePiece's U+2581 word marker as a space)."""
        if token in (self.bos_id, self.eos_id) or token >= self.vocab_size:
            return ""
        if self._sp.is_byte(token):
            return self._sp.id_to_piece(token)
        return self._sp.id_to_piece(token).replace("\u2581", " ")


def check_tokenizer_fits(tokenizer: Tokenizer, vocab_size: int) -> None:
    """Refuses a tokenizer whose ids the model's embedding cannot look up."""
    if tokenizer.vocab_size > vocab_size:
        raise RgexportError(f"tokenizer {tokenizer.path} has {tokenizer.vocab_size} pieces but the model's vocabulary "
                            f"is {vocab_size}: they do not belong together; pass the model's own --tokenizer")
