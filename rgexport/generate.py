"""Eager text generation with the step model: the quickest check that a checkpoint is sane."""

from __future__ import annotations

from collections.abc import Callable, Iterator

import torch

from rgexport.model import Griffin
from rgexport.tokenizer import Tokenizer


@torch.no_grad()
def generate(
    model: Griffin, tokenizer: Tokenizer, prompt: str, max_tokens: int = 64, temperature: float = 0.0,
    top_k: int = 0, seed: int = 0, prefill_chunk: int = 32,
) -> Iterator[str]:
    """Yields text pieces as tokens are generated (greedy when temperature is 0). Stops at </s>."""
    ids = tokenizer.encode(prompt)
    state = model.init_state()
    chunk = min(prefill_chunk, model.config.attention_window_size)
    logits = None
    for s in range(0, len(ids), chunk):
        out, state = model.prefill(torch.tensor([ids[s : s + chunk]]), torch.tensor([s]), state)
        logits = out[0, -1]
    g = torch.Generator().manual_seed(seed)
    generated: list[int] = []
    text_so_far = ""
    for i in range(max_tokens):
        token = _sample(logits, temperature, top_k, g)
        if token == tokenizer.eos_id:
            break
        generated.append(token)
        text = tokenizer.decode(generated)  # decode the whole tail so multi-byte pieces come out whole
        if text.startswith(text_so_far):
            yield text[len(text_so_far):]
            text_so_far = text
        logits, state = model.step(torch.tensor([token]), torch.tensor([len(ids) + i]), state)
        logits = logits[0]


MIN_TEMPERATURE = 1e-3  # below this, logits / temperature overflows float32; use 0 (greedy)
MAX_TEMPERATURE = 100.0


def check_sampling(temperature: float, top_k: int, vocab_size: int | None = None) -> None:
    """Refuses sampling options that cannot sample: a temperature that is not 0 or in
    [MIN_TEMPERATURE, MAX_TEMPERATURE], a negative top-k, or one above the vocabulary."""
    import math

    from rgexport.errors import RgexportError

    if not math.isfinite(temperature) or temperature < 0 or (
            temperature and not MIN_TEMPERATURE <= temperature <= MAX_TEMPERATURE):
        raise RgexportError(f"--temperature is {temperature!r}; use 0 (greedy) or a value from {MIN_TEMPERATURE:g} to "
                            f"{MAX_TEMPERATURE:g}")
    if top_k < 0 or (vocab_size is not None and top_k > vocab_size):
        limit = f"the vocabulary ({vocab_size})" if vocab_size is not None else "the vocabulary"
        raise RgexportError(f"--top-k is {top_k}; use 0 (all tokens) or at most {limit}")


def _sample(logits: torch.Tensor, temperature: float, top_k: int, g: torch.Generator) -> int:
    if temperature <= 0:
        return int(torch.argmax(logits))
    logits = logits / temperature
    if top_k:
        kth = torch.topk(logits, top_k).values[-1]
        logits = torch.where(logits < kth, torch.full_like(logits, float("-inf")), logits)
    return int(torch.multinomial(torch.softmax(logits, -1), 1, generator=g))


def generate_text(model: Griffin, tokenizer: Tokenizer, prompt: str, on_piece: Callable[[str], None] | None = None,
                  **kwargs) -> str:
    pieces = []
    for piece in generate(model, tokenizer, prompt, **kwargs):
        pieces.append(piece)
        if on_piece:
            on_piece(piece)
    return "".join(pieces)
