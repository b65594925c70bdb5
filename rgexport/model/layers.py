"""Primitives of Griffin, written so that every export path computes the same function.

Rules kept here for all backends (each one a silent miscompilation seen on some backend):
- tanh-GELU is written as its formula; `gelu(approximate="tanh")` is computed as exact GELU by
  ExecuTorch's XNNPACK delegate and by coremltools' torch.export frontend (2.7e-4 logit error).
- Masks and position tests are float arithmetic on the position, never `where` on int64 comparisons
  (litert-torch miscompiled that form: exact at position 0, ~1.0 logit error afterwards).
- Query heads are grouped against the shared K/V head by reshaping, never `repeat_interleave`.
- No scatter: the ring buffer is written by a one-hot blend (`blocks.RingBuffer`). A backend whose runtime
  writes buffers in place may swap in its own write of the same values (ExecuTorch: `graphs.RowPutRingBuffer`).
Shapes: b = batch, t = tokens in the chunk, d = width, l = lru_width.
"""

from __future__ import annotations

import math

import torch
from torch import nn

_SQRT_2_OVER_PI = math.sqrt(2.0 / math.pi)


def gelu_tanh(x: torch.Tensor) -> torch.Tensor:
    """tanh-approximated GELU, written out (see module docstring for why)."""
    return 0.5 * x * (1.0 + torch.tanh(_SQRT_2_OVER_PI * (x + 0.044715 * x * x * x)))


def is_start(positions: torch.Tensor) -> torch.Tensor:
    """1.0 where the (float, non-negative, integral) position is 0, else 0.0."""
    return torch.clamp(1.0 - positions, min=0.0, max=1.0)


class RMSNorm(nn.Module):
    """RMSNorm with a zero-centred scale: x / rms(x) * (1 + scale)."""

    def __init__(self, width: int, eps: float = 1e-6):
        super().__init__()
        self.eps = eps
        self.scale = nn.Parameter(torch.zeros(width))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        var = torch.mean(x * x, dim=-1, keepdim=True)
        return x * torch.rsqrt(var + self.eps) * (self.scale + 1.0)


class BlockDiagonalLinear(nn.Module):
    """One dense [block, block] matrix per head: the RG-LRU gate layers."""

    def __init__(self, width: int, num_blocks: int):
        super().__init__()
        self.num_blocks = num_blocks
        self.block_width = width // num_blocks
        self.w = nn.Parameter(torch.zeros(num_blocks, self.block_width, self.block_width))
        self.b = nn.Parameter(torch.zeros(num_blocks, self.block_width))

    def forward(self, x: torch.Tensor) -> torch.Tensor:  # [b t l] -> [b t l]
        b, t, _ = x.shape
        xh = x.reshape(b * t, self.num_blocks, self.block_width).transpose(0, 1)  # [h, bt, i]
        y = torch.bmm(xh, self.w) + self.b[:, None, :]  # [h, bt, j]
        return y.transpose(0, 1).reshape(b, t, self.num_blocks * self.block_width)


class Conv1D(nn.Module):
    """Causal depthwise temporal convolution of width `temporal_width` over the lru channels.

    The state holds the previous `temporal_width - 1` inputs; it is cleared where the chunk starts a
    sequence (position 0), so that a state object can be reused for a new sequence.
    """

    def __init__(self, width: int, temporal_width: int = 4):
        super().__init__()
        self.temporal_width = temporal_width
        self.w = nn.Parameter(torch.zeros(temporal_width, width))  # w[k] multiplies x[t - (tw - 1) + k]
        self.b = nn.Parameter(torch.zeros(width))

    def forward(
        self, x: torch.Tensor, start: torch.Tensor, conv_state: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """x: [b t l]; start: [b] 1.0 if the chunk starts a sequence; conv_state: [b tw-1 l]."""
        t = x.shape[1]
        history = conv_state * (1.0 - start)[:, None, None]
        x_ext = torch.cat([history, x], dim=1)  # [b, tw-1+t, l]
        out = self.b
        for k in range(self.temporal_width):
            out = out + x_ext[:, k : k + t] * self.w[k]
        return out, x_ext[:, t:]


class RGLRU(nn.Module):
    """Real-Gated Linear Recurrent Unit.

    a_t = exp(-8 * sigmoid(gate_a(x_t)) * softplus(a_param)); h_t = a_t * h_{t-1} + sqrt(1 - a_t^2) *
    (sigmoid(gate_x(x_t)) * x_t). At position 0, a = 0 and the input is not normalised (reset).
    The recurrence runs in float32 whatever the activations' dtype.
    """

    def __init__(self, width: int, num_heads: int):
        super().__init__()
        self.a_param = nn.Parameter(torch.zeros(width))
        self.input_gate = BlockDiagonalLinear(width, num_heads)
        self.a_gate = BlockDiagonalLinear(width, num_heads)

    def forward(
        self, x: torch.Tensor, resets: torch.Tensor, h: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """x: [b t l]; resets: [b t] 1.0 at position 0; h: [b l] -> (y [b t l], h [b l])."""
        gate_x = torch.sigmoid(self.input_gate(x))
        gate_a = torch.sigmoid(self.a_gate(x))
        log_a = -8.0 * gate_a * nn.functional.softplus(self.a_param)
        a = torch.exp(log_a)
        a_square = torch.exp(2.0 * log_a)
        r = resets[:, :, None]
        multiplier = r + (1.0 - r) * torch.sqrt(1.0 - a_square)
        normalized_x = x * gate_x * multiplier
        a = a * (1.0 - r)
        h = h.to(torch.float32)
        if x.shape[1] == 1:  # decode: one step, written as the step it is
            h = a[:, 0].to(torch.float32) * h + normalized_x[:, 0].to(torch.float32)
            return torch.stack([h], dim=1).to(x.dtype), h
        y = linear_scan(a.to(torch.float32), normalized_x.to(torch.float32), h)
        return y.to(x.dtype), y[:, -1]


def linear_scan(a: torch.Tensor, x: torch.Tensor, h: torch.Tensor) -> torch.Tensor:
    """Every h_t of h_t = a_t * h_{t-1} + x_t over a chunk; a, x: [b t l], h: [b l] -> [b t l].

    A log-depth (Hillis-Steele) scan: after the level of offset d, position t holds the composition of the
    steps t-2d+1 .. t, as (product of a, what they add). ceil(log2 t) levels of a few whole-chunk ops,
    where a loop over the chunk gives t of them: the exported prefill graph has a fraction of the nodes,
    which is what lowering's time follows (notes/perf.md). The same associative scan DeepMind's Griffin
    code offers; no division and no log, so no value is computed that the loop would not bound.
    """
    t = x.shape[1]
    d = 1
    while d < t:
        # Shifted by d along the chunk; the first d positions compose with the identity step (1, 0).
        x = a * nn.functional.pad(x[:, :-d], (0, 0, d, 0)) + x
        a = a * nn.functional.pad(a[:, :-d], (0, 0, d, 0), value=1.0)
        d *= 2
    return x + a * h[:, None]


class RotaryEmbedding(nn.Module):
    """Rotary position embedding on the first `rope_dim` channels of each head (partial rotary)."""

    def __init__(self, rope_dim: int, theta: float = 10_000.0):
        super().__init__()
        self.rope_dim = rope_dim
        self.theta = theta
        self.register_buffer("inv_frequencies", self._frequencies(), persistent=False)

    def _frequencies(self) -> torch.Tensor:
        freq = torch.arange(self.rope_dim // 2, dtype=torch.float32, device="cpu")
        return 1.0 / (self.theta ** (2.0 * freq / self.rope_dim))

    def reset_buffers(self) -> None:
        self.inv_frequencies = self._frequencies()

    def forward(self, x: torch.Tensor, positions: torch.Tensor) -> torch.Tensor:
        """x: [b t n h]; positions: [b t] float."""
        angles = positions[:, :, None, None] * self.inv_frequencies  # [b t 1 r/2]
        sin, cos = torch.sin(angles), torch.cos(angles)
        half = self.rope_dim // 2
        x1 = x[..., :half]
        x2 = x[..., half : self.rope_dim]
        rest = x[..., self.rope_dim :]
        return torch.cat([x1 * cos - x2 * sin, x2 * cos + x1 * sin, rest], dim=-1)
