"""Eager text generation with the step model: the quickest check that a checkpoint is sane."""

from __future__ import annotations

from collections.abc import Callable, Iterator

import torch

from rgexport.model import Griffin
from rgexport.sampling import Sampler, SamplingOptions
from rgexport.tokenizer import Tokenizer


@torch.no_grad()
def generate_tokens(
    model: Griffin, tokenizer: Tokenizer, prompt: str, max_tokens: int = 64, temperature: float = 0.0,
    top_k: int = 0, seed: int = 0, prefill_chunk: int = 32, top_p: float = 1.0,
) -> Iterator[int]:
    """Yields generated token ids (greedy when temperature is 0); stops at </s> or after `max_tokens`.

    Sampling is `rgexport.sampling.Sampler`, the one `run` and `chat` use on artifacts."""
    sampler = Sampler(SamplingOptions(temperature=temperature, top_k=top_k, top_p=top_p, seed=seed))
    ids = tokenizer.encode(prompt)
    state = model.init_state()
    chunk = min(prefill_chunk, model.config.attention_window_size)
    logits = None
    for s in range(0, len(ids), chunk):
        out, state = model.prefill(torch.tensor([ids[s : s + chunk]]), torch.tensor([s]), state)
        logits = out[0, -1]
    for i in range(max_tokens):
        token = sampler.sample(logits.numpy())
        if token == tokenizer.eos_id:
            break
        yield token
        if i + 1 < max_tokens:
            logits, state = model.step(torch.tensor([token]), torch.tensor([len(ids) + i]), state)
            logits = logits[0]


def generate(model: Griffin, tokenizer: Tokenizer, prompt: str, **kwargs) -> Iterator[str]:
    """Yields text pieces as tokens are generated (`generate_tokens`'s arguments)."""
    generated: list[int] = []
    text_so_far = ""
    for token in generate_tokens(model, tokenizer, prompt, **kwargs):
        generated.append(token)
        text = tokenizer.decode(generated)  # decode the whole tail so multi-byte pieces come out whole
        if text.startswith(text_so_far):
            yield text[len(text_so_far):]
            text_so_far = text


def generate_text(model: Griffin, tokenizer: Tokenizer, prompt: str, on_piece: Callable[[str], None] | None = None,
                  **kwargs) -> str:
    pieces = []
    for piece in generate(model, tokenizer, prompt, **kwargs):
        pieces.append(piece)
        if on_piece:
            on_piece(piece)
    return "".join(pieces)


def check_sampling(temperature: float, top_k: int, vocab_size: int | None = None) -> None:
    """Refuses sampling options that cannot sample (`SamplingOptions.check`)."""
    SamplingOptions(temperature=temperature, top_k=top_k).check(vocab_size)
