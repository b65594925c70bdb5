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


class LocalAttentionBlock(nn.Module):
    """Local (sliding-window) multi-query attention over a ring buffer of the last `w` keys and values.

    A query at position q attends to positions q - w .. q: the `w` cached ones and itself (DeepMind's
    convention; Hugging Face's window of w covers q - w + 1 .. q). Key and value of position p live in
    slot p % w.
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

    def forward(
        self, x: torch.Tensor, positions: torch.Tensor, keys: torch.Tensor, values: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        b, t, _ = x.shape
        w, kvh, hd = self.window, self.num_kv_heads, self.head_dim
        groups = self.num_heads // kvh
        if t > w:
            raise ValueError(f"A chunk of {t} tokens is longer than the attention window {w}")
        q = self.rope(self.proj_q(x).reshape(b, t, self.num_heads, hd), positions)
        k = self.rope(self.proj_k(x).reshape(b, t, kvh, hd), positions)
        v = self.proj_v(x).reshape(b, t, kvh, hd)

        # Query heads grouped against their K/V head: [b t kvh g hd].
        q = q.reshape(b, t, kvh, groups, hd) * (hd**-0.5)
        all_k = torch.cat([keys.reshape(b, w, kvh, hd), k], dim=1)  # [b w+t kvh hd]
        all_v = torch.cat([values.reshape(b, w, kvh, hd), v], dim=1)
        scores = torch.einsum("btkgh,bskh->bkgts", q, all_k)

        # Validity of each key for each query, as float arithmetic on positions.
        start = positions[:, :1]  # [b 1]
        slots = torch.arange(w, dtype=positions.dtype, device=x.device)
        slot_pos = start - 1.0 - _mod(start - 1.0 - slots, w)  # [b w] position held by each slot
        cache_ok = _at_least_zero(slot_pos)[:, None, :] * _at_least_zero(
            slot_pos[:, None, :] - (positions[:, :, None] - w)
        )  # [b t w]
        causal = torch.ones(t, t, dtype=positions.dtype, device=x.device).tril()
        mask = torch.cat([cache_ok, causal.expand(b, t, t)], dim=-1)  # [b t w+t]
        scores = scores + (1.0 - mask)[:, None, None] * _MASK_VALUE
        probs = torch.softmax(scores, dim=-1)
        out = torch.einsum("bkgts,bskh->btkgh", probs, all_v).reshape(b, t, self.num_heads * hd)

        # Write the chunk into the ring buffer with a one-hot blend (no scatter).
        target = _mod(positions, w)  # [b t]
        onehot = torch.clamp(1.0 - torch.abs(slots - target[:, :, None]), min=0.0)  # [b t w]
        keep = 1.0 - onehot.sum(dim=1)  # [b w]
        keys = keys * keep[:, :, None] + torch.bmm(onehot.transpose(1, 2), k.reshape(b, t, kvh * hd))
        values = values * keep[:, :, None] + torch.bmm(onehot.transpose(1, 2), v.reshape(b, t, kvh * hd))
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
