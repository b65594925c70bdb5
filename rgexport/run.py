"""Text generation through an artifact, the loop an app runs: tokenize, prefill the prompt in chunks, decode
token by token, sample, detokenize, stream. `rgexport run` is `run_prompt`; `rgexport chat` drives the same
`generate_reply` turn after turn (rgexport.chat).
"""

from __future__ import annotations

import contextlib
import dataclasses
import signal
import threading
import time
from collections.abc import Callable, Iterator, Sequence
from typing import Any

import numpy as np

from rgexport.errors import RgexportError
from rgexport.runtime import LoadedArtifact
from rgexport.sampling import Sampler, SamplingOptions
from rgexport.tokenizer import Tokenizer

# Positions are int32 in every graph's I/O contract; nothing else bounds a sequence (the state is fixed).
MAX_POSITION = 2**31 - 1


@dataclasses.dataclass
class GenerationStats:
    """What one prompt (or chat turn) cost. Seconds are wall-clock; tok/s are None where nothing ran."""

    prompt_tokens: int
    prefill_seconds: float
    generated_tokens: int = 0
    decode_steps: int = 0
    decode_seconds: float = 0.0
    first_token_seconds: float | None = None  # prefill + sampling the first token
    state_bytes: int = 0
    stop_reason: str = "max_tokens"  # "eos" | "stop" | "max_tokens" | "interrupted"
    start_position: int = 0
    end_position: int = 0  # the next position to feed (pending tokens not yet fed)

    @property
    def prefill_tokens_per_second(self) -> float | None:
        return self.prompt_tokens / self.prefill_seconds if self.prompt_tokens and self.prefill_seconds else None

    @property
    def decode_tokens_per_second(self) -> float | None:
        return self.decode_steps / self.decode_seconds if self.decode_steps and self.decode_seconds else None

    def to_dict(self) -> dict[str, Any]:
        """The figures by name, tok/s included (for --json)."""
        return dataclasses.asdict(self) | {"prefill_tokens_per_second": self.prefill_tokens_per_second,
                                           "decode_tokens_per_second": self.decode_tokens_per_second}

    def summary(self) -> str:
        """One line for stderr."""
        def rate(x: float | None) -> str:
            return f"{x:,.0f} tok/s" if x else "-"

        ttft = f"{self.first_token_seconds * 1e3:.1f} ms" if self.first_token_seconds is not None else "-"
        return (f"prompt {self.prompt_tokens} tokens, prefill {rate(self.prefill_tokens_per_second)} "
                f"({self.prefill_seconds * 1e3:.1f} ms); decode {rate(self.decode_tokens_per_second)} "
                f"({self.generated_tokens} tokens, stop: {self.stop_reason}); first token {ttft}; "
                f"state {self.state_bytes:,} bytes")


@dataclasses.dataclass
class Generation:
    """A reply: its text (stop string excluded), its token ids, the ids sampled but not yet fed into the
    state (the last one, unless generation ended at EOS or a stop token), and the figures."""

    text: str
    tokens: list[int]
    pending: list[int]
    stats: GenerationStats
    logits: np.ndarray | None = None  # the last logits the state produced (after the last fed token)


class Interrupt:
    """A flag Ctrl-C sets while a reply is generated, so the reply stops between two tokens (never inside
    a runtime call, which would leave the state and the position out of step)."""

    def __init__(self) -> None:
        self.set = False

    @contextlib.contextmanager
    def catching_sigint(self) -> Iterator[Interrupt]:
        """Within the block, SIGINT sets the flag instead of raising (main thread only; elsewhere no-op)."""
        self.set = False
        if threading.current_thread() is not threading.main_thread():
            yield self
            return

        def handler(signum: int, frame: Any) -> None:
            self.set = True

        previous = signal.signal(signal.SIGINT, handler)
        try:
            yield self
        finally:
            signal.signal(signal.SIGINT, previous)


def check_prompt(ids: Sequence[int], position: int, max_tokens: int) -> None:
    """Refuses what no artifact can run: nothing to feed, or positions past the int32 range."""
    if not ids:
        raise RgexportError("the prompt is empty: give some text (--prompt TEXT)")
    if position + len(ids) + max_tokens > MAX_POSITION:
        raise RgexportError(f"the sequence would pass position {MAX_POSITION:,} (int32 positions in the graphs); "
                            "start a new one")


def generate_reply(
    art: LoadedArtifact, tokenizer: Tokenizer, ids: Sequence[int], position: int, sampler: Sampler,
    max_tokens: int = 128, stop: Sequence[str] = (), on_text: Callable[[str], None] | None = None,
    interrupt: Interrupt | None = None,
) -> Generation:
    """Feeds `ids` onto the state at `position` (whole chunks through prefill, the rest through decode), then
    samples up to `max_tokens` tokens, decoding each into the state, streaming text through `on_text`.

    Stops at EOS, at any `stop` string (not included in the text), after `max_tokens`, or when `interrupt`
    is set. The state then holds every token but `Generation.pending`."""
    check_prompt(ids, position, max_tokens)
    stop = [s for s in stop if s]
    holdback = max((len(s) for s in stop), default=1) - 1
    t0 = time.perf_counter()
    logits = art.last_logits(ids, position)
    prefill_seconds = time.perf_counter() - t0
    stats = GenerationStats(prompt_tokens=len(ids), prefill_seconds=prefill_seconds, state_bytes=art.state_bytes,
                            start_position=position)
    pos = position + len(ids)
    generated: list[int] = []
    pending: list[int] = []
    emitted = ""
    final_text: str | None = None

    def emit(upto: str) -> None:
        nonlocal emitted
        if upto.startswith(emitted) and len(upto) > len(emitted):
            if on_text:
                on_text(upto[len(emitted):])
            emitted = upto

    for i in range(max_tokens):
        if interrupt is not None and interrupt.set:
            stats.stop_reason = "interrupted"
            break
        token = sampler.sample(logits)
        if stats.first_token_seconds is None:
            stats.first_token_seconds = time.perf_counter() - t0
        if token == tokenizer.eos_id:
            stats.stop_reason = "eos"
            break
        generated.append(token)
        text = tokenizer.decode(generated)  # the whole reply, so multi-byte pieces come out whole
        hits = [text.find(s) for s in stop if s in text]
        if hits:
            final_text = text[:min(hits)]
            emit(final_text)
            stats.stop_reason = "stop"
            pending = [token]
            break
        emit(text[:len(text) - holdback] if holdback else text)
        if i + 1 == max_tokens or (interrupt is not None and interrupt.set):
            pending = [token]
            stats.stop_reason = "max_tokens" if i + 1 == max_tokens else "interrupted"
            break
        t = time.perf_counter()
        logits = art.decode(token, pos)
        stats.decode_seconds += time.perf_counter() - t
        stats.decode_steps += 1
        pos += 1
    if final_text is None:
        final_text = tokenizer.decode(generated)
        emit(final_text)
    stats.generated_tokens = len(generated)
    stats.end_position = pos
    return Generation(final_text, generated, pending, stats, logits)


def open_tokenizer(art: LoadedArtifact) -> Tokenizer:
    """The artifact's own tokenizer (the copy inside its folder)."""
    if art.tokenizer_path is None:
        raise RgexportError(f"{art.source} has no tokenizer (built without tokenizer.model): it cannot take text")
    return Tokenizer(art.tokenizer_path)


def run_prompt(
    art: LoadedArtifact, prompt: str, sampling: SamplingOptions | None = None, max_tokens: int = 128,
    stop: Sequence[str] = (), on_text: Callable[[str], None] | None = None, interrupt: Interrupt | None = None,
) -> Generation:
    """`rgexport run`: `prompt` as raw text (BOS first) from position 0, generated into a reply."""
    if not prompt:
        raise RgexportError("the prompt is empty: give some text (--prompt TEXT)")
    tokenizer = open_tokenizer(art)
    ids = tokenizer.encode(prompt)
    return generate_reply(art, tokenizer, ids, 0, Sampler(sampling), max_tokens, stop, on_text, interrupt)
