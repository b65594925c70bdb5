"""Griffin's blocks: recurrent (Conv1D + RG-LRU), local multi-query attention, gated MLP, residual.

Shapes: b = batch, t = tokens in the chunk, d = width, w = attention window, k = kv channels.
"""

from __future__ import annotations

import torch
from torch import nn

from rgexport.config import RECURRENT, GriffinConfig
from rgexport.model.layers import RGLRU, Conv1D, RMSNorm, RotaryEmbedding, gelu_tanh

# Added to masked attention logits. Finite and within float16 range (Core ML runs attention in fp16);
# exp(-30000) is 0 in every float format.
_MASK_VALUE = -30_000.0


def _at_least_zero(z: torch.Tensor) -> torch.Tensor:
    """1.0 where the integral float z >= 0, else 0.0 (float arithmetic, no comparison ops)."""
    return torch.clamp(z + 1.0, min=0.0, max=1.0)


def _mod(x: torch.Tensor, n: int) -> torch.Tensor:
    return x - n * torch.floor(x / n)


class RecurrentBlock(nn.Module):
    """Griffin's temporal-mixing recurrent block: gelu(linear_y(x)) * RG-LRU(Conv1D(linear_x(x)))."""

    def __init__(self, config: GriffinConfig):
        super().__init__()
        d, lw = config.width, config.lru_width
        self.linear_y = nn.Linear(d, lw)
        self.linear_x = nn.Linear(d, lw)
        self.linear_out = nn.Linear(lw, d)
        self.conv_1d = Conv1D(lw, config.conv1d_width)
        self.rg_lru = RGLRU(lw, config.num_heads)

    def forward(
        self, x: torch.Tensor, positions: torch.Tensor, rg_lru_state: torch.Tensor, conv1d_state: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        resets = torch.clamp(1.0 - positions, min=0.0, max=1.0)  # [b t]: 1 at position 0
        y = gelu_tanh(self.linear_y(x))
        x = self.linear_x(x)
        x, conv1d_state = self.conv_1d(x, resets[:, 0], conv1d_state)
        x, rg_lru_state = self.rg_lru(x, resets, rg_lru_state)
        return self.linear_out(x * y), rg_lru_state, conv1d_state


def _per_kv_head(x: torch.Tensor, kv_heads: int) -> torch.Tensor:
    """[b n kvh d] -> [b*kvh n d]: each K/V head's rows together. A reshape alone where there is one K/V
    head (every RecurrentGemma and Griffin preset): the 2048-slot cache is then read where it lies."""
    b, n, _, d = x.shape
    if kv_heads == 1:
        return x.reshape(b, n, d)
    return x.transpose(1, 2).reshape(b * kv_heads, n, d)


def _from_kv_heads(x: torch.Tensor, kv_heads: int) -> torch.Tensor:
    """The inverse of `_per_kv_head`, flattened: [b*kvh n d] -> [b n kvh*d]."""
    bk, n, d = x.shape
    b = bk // kv_heads
    if kv_heads == 1:
        return x.reshape(b, n, d)
    return x.reshape(b, kv_heads, n, d).transpose(1, 2).reshape(b, n, kv_heads * d)


class RingBuffer(nn.Module):
    """Writes a chunk's keys and values into the ring buffers: position p goes to slot p % w.

    A one-hot blend (no scatter, see layers.py). A decode step (one token) blends by a broadcast product, one
    pass over each cache; a chunk adds onehot^T @ new. At RecurrentGemma-2B shapes the product form made
    ExecuTorch's step 3.6 ms faster than the matmul form (notes/perf.md).
    """

    def __init__(self, window: int):
        super().__init__()
        self.window = window

    def forward(
        self, positions: torch.Tensor, keys: torch.Tensor, values: torch.Tensor, k: torch.Tensor, v: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """positions [b t]; keys, values [b w kv]; k, v [b t kv] -> the new (keys, values)."""
        b, t, _ = k.shape
        w = self.window
        slots = torch.arange(w, dtype=positions.dtype, device=positions.device)
        target = _mod(positions, w)  # [b t]
        onehot = torch.clamp(1.0 - torch.abs(slots - target[:, :, None]), min=0.0)  # [b t w]
        if t == 1:
            hot = onehot.reshape(b, w, 1)
            return keys * (1.0 - hot) + hot * k, values * (1.0 - hot) + hot * v
        keep = (1.0 - onehot.sum(dim=1))[:, :, None]  # [b w 1]
        into = onehot.transpose(1, 2)  # [b w t]
        return keys * keep + torch.bmm(into, k), values * keep + torch.bmm(into, v)


class LocalAttentionBlock(nn.Module):
    """Local (sliding-window) multi-query attention over a ring buffer of the last `w` keys and values.

    A query at position q attends to positions q - w .. q: the `w` cached ones and itself (DeepMind's
    convention; Hugging Face's window of w covers q - w + 1 .. q). Key and value of position p live in
    slot p % w.

    The cache is never transposed or concatenated with the chunk: scores are `cache @ q^T` (the cache as the
    left operand, as it lies) beside the chunk's own `q @ k^T`, one softmax over both, and the output is the
    sum of the two probability x value products. Each 2048-slot cache is read once by each product; at
    RecurrentGemma-2B shapes this took eight attention blocks in ExecuTorch from 54.3 to 34.8 ms a step
    (notes/perf.md), where the einsum form transposed and copied every cache.
    """

    def __init__(self, config: GriffinConfig):
        super().__init__()
        d, hd = config.width, config.head_dim
        self.num_heads = config.num_heads
        self.num_kv_heads = config.num_kv_heads
        self.head_dim = hd
        self.window = config.attention_window_size
        self.proj_q = nn.Linear(d, config.num_heads * hd, bias=False)
        self.proj_k = nn.Linear(d, config.num_kv_heads * hd, bias=False)
        self.proj_v = nn.Linear(d, config.num_kv_heads * hd, bias=False)
        self.proj_final = nn.Linear(config.num_heads * hd, d, bias=True)
        self.rope = RotaryEmbedding(config.rope_dim, config.rope_theta)
        self.ring_buffer = RingBuffer(self.window)

    def forward(
        self, x: torch.Tensor, positions: torch.Tensor, keys: torch.Tensor, values: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        b, t, _ = x.shape
        w, kvh, hd = self.window, self.num_kv_heads, self.head_dim
        groups = self.num_heads // kvh
        if t > w:
            raise ValueError(f"A chunk of {t} tokens is longer than the attention window {w}")
        q = self.rope(self.proj_q(x).reshape(b, t, self.num_heads, hd), positions) * (hd**-0.5)
        k = self.rope(self.proj_k(x).reshape(b, t, kvh, hd), positions)
        v = self.proj_v(x).reshape(b, t, kvh, hd)

        # Each K/V head's queries as rows (token, group): [b*kvh t*g hd].
        q = _per_kv_head(q.reshape(b, t, kvh, groups * hd), kvh).reshape(b * kvh, t * groups, hd)
        cached_k = _per_kv_head(keys.reshape(b, w, kvh, hd), kvh)
        cached_v = _per_kv_head(values.reshape(b, w, kvh, hd), kvh)
        chunk_k, chunk_v = _per_kv_head(k, kvh), _per_kv_head(v, kvh)
        scores = torch.cat(
            [torch.bmm(cached_k, q.transpose(1, 2)).transpose(1, 2), torch.bmm(q, chunk_k.transpose(1, 2))], dim=-1
        )  # [b*kvh t*g w+t]

        # Validity of each key for each query, as float arithmetic on positions.
        start = positions[:, :1]  # [b 1]
        slots = torch.arange(w, dtype=positions.dtype, device=x.device)
        slot_pos = start - 1.0 - _mod(start - 1.0 - slots, w)  # [b w] position held by each slot
        cache_ok = _at_least_zero(slot_pos)[:, None, :] * _at_least_zero(
            slot_pos[:, None, :] - (positions[:, :, None] - w)
        )  # [b t w]
        causal = torch.ones(t, t, dtype=positions.dtype, device=x.device).tril()
        mask = torch.cat([cache_ok, causal.expand(b, t, t)], dim=-1)  # [b t w+t]
        scores = scores.reshape(b, kvh, t, groups, w + t) + (1.0 - mask)[:, None, :, None, :] * _MASK_VALUE
        probs = torch.softmax(scores, dim=-1).reshape(b * kvh, t * groups, w + t)
        out = torch.bmm(probs[:, :, :w], cached_v) + torch.bmm(probs[:, :, w:], chunk_v)  # [b*kvh t*g hd]
        out = _from_kv_heads(out.reshape(b * kvh, t, groups * hd), kvh)  # [b t heads*hd]

        keys, values = self.ring_buffer(positions, keys, values, k.reshape(b, t, kvh * hd), v.reshape(b, t, kvh * hd))
        return self.proj_final(out), keys, values


class MLPBlock(nn.Module):
    """Gated MLP: ffw_down(gelu(ffw_gate(x)) * ffw_up(x))."""

    def __init__(self, config: GriffinConfig):
        super().__init__()
        self.ffw_gate = nn.Linear(config.width, config.mlp_expanded_width)
        self.ffw_up = nn.Linear(config.width, config.mlp_expanded_width)
        self.ffw_down = nn.Linear(config.mlp_expanded_width, config.width)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.ffw_down(gelu_tanh(self.ffw_gate(x)) * self.ffw_up(x))


class ResidualBlock(nn.Module):
    """Pre-norm residual block: temporal mixing, then the MLP."""

    def __init__(self, config: GriffinConfig, block_type: str):
        super().__init__()
        self.block_type = block_type
        self.temporal_pre_norm = RMSNorm(config.width, config.rms_norm_eps)
        if block_type == RECURRENT:
            self.recurrent_block = RecurrentBlock(config)
        else:
            self.attention_block = LocalAttentionBlock(config)
        self.channel_pre_norm = RMSNorm(config.width, config.rms_norm_eps)
        self.mlp_block = MLPBlock(config)

    def forward(
        self, x: torch.Tensor, positions: torch.Tensor, s0: torch.Tensor, s1: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """s0, s1: (rg_lru, conv1d) for a recurrent block, (keys, values) for an attention block."""
        normed = self.temporal_pre_norm(x)
        if self.block_type == RECURRENT:
            y, s0, s1 = self.recurrent_block(normed, positions, s0, s1)
        else:
            y, s0, s1 = self.attention_block(normed, positions, s0, s1)
        residual = y + x
        return self.mlp_block(self.channel_pre_norm(residual)) + residual, s0, s1
