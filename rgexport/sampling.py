"""The one sampler, shared by `generate` (eager), `run` and `chat` (artifacts) and mirrored in the generated
app samples: greedy by default, or temperature with optional top-k and top-p (nucleus), seeded.

Logits come in as numpy (one row, [vocab]); the order of operations is the usual one (and the samples'):
divide by the temperature, keep the top k, keep the smallest set of tokens whose probability reaches p,
renormalise, draw.
"""

from __future__ import annotations

import dataclasses

import numpy as np

from rgexport.errors import RgexportError

MIN_TEMPERATURE = 1e-3  # below this, logits / temperature overflows float32; use 0 (greedy)
MAX_TEMPERATURE = 100.0


@dataclasses.dataclass(frozen=True)
class SamplingOptions:
    """How to pick the next token. temperature 0 is greedy (top_k, top_p and seed then do nothing)."""

    temperature: float = 0.0
    top_k: int = 0  # 0: no limit
    top_p: float = 1.0  # 1: no limit
    seed: int = 0

    def check(self, vocab_size: int | None = None) -> SamplingOptions:
        """Raises RgexportError for a value no sampler can use (top-k above `vocab_size`, where given);
        returns self."""
        t = self.temperature
        if not np.isfinite(t) or t < 0 or (t and not MIN_TEMPERATURE <= t <= MAX_TEMPERATURE):
            raise RgexportError(f"--temperature is {t!r}; use 0 (greedy) or a value from {MIN_TEMPERATURE:g} to "
                                f"{MAX_TEMPERATURE:g}")
        if self.top_k < 0 or (vocab_size is not None and self.top_k > vocab_size):
            limit = f"the vocabulary ({vocab_size})" if vocab_size is not None else "the vocabulary"
            raise RgexportError(f"--top-k is {self.top_k}; use 0 (all tokens) or at most {limit}")
        if not 0 < self.top_p <= 1:
            raise RgexportError(f"--top-p must be in (0, 1], got {self.top_p}")
        return self

    @property
    def greedy(self) -> bool:
        return self.temperature == 0


class Sampler:
    """Draws token ids from logits with `SamplingOptions`; the same seed gives the same tokens."""

    def __init__(self, options: SamplingOptions | None = None):
        self.options = (options or SamplingOptions()).check()
        self._rng = np.random.default_rng(self.options.seed)

    def reseed(self, seed: int | None = None) -> None:
        """Restarts the random stream (at the options' seed unless given)."""
        self._rng = np.random.default_rng(self.options.seed if seed is None else seed)

    def probabilities(self, logits: np.ndarray) -> np.ndarray:
        """The distribution `sample` draws from ([vocab] float64, zeros outside top-k / top-p)."""
        x = np.asarray(logits, dtype=np.float64).reshape(-1)
        o = self.options
        if o.greedy:
            p = np.zeros_like(x)
            p[int(np.argmax(x))] = 1.0
            return p
        x = x / o.temperature
        if o.top_k and o.top_k < x.size:
            kth = np.partition(x, -o.top_k)[-o.top_k]
            x = np.where(x < kth, -np.inf, x)
        x = x - np.max(x)
        p = np.exp(x)
        p /= p.sum()
        if o.top_p < 1.0:
            order = np.argsort(-p, kind="stable")
            cumulative = np.cumsum(p[order])
            keep = int(np.searchsorted(cumulative, o.top_p)) + 1  # smallest prefix reaching top_p
            mask = np.zeros_like(p, dtype=bool)
            mask[order[:keep]] = True
            p = np.where(mask, p, 0.0)
            p /= p.sum()
        return p

    def sample(self, logits: np.ndarray) -> int:
        """The next token id for one row of logits [vocab]."""
        if self.options.greedy:
            return int(np.argmax(np.asarray(logits).reshape(-1)))
        p = self.probabilities(logits)
        return int(self._rng.choice(p.size, p=p))
