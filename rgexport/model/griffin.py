"""Griffin as a stateful step function: (tokens, position, state) -> (logits, state).

`forward` runs a chunk of t <= window tokens starting at `position`; `step` is the one-token case and
`prefill` the chunk case. Nothing is mutated: state goes in and comes out, and mapping it onto mutable
buffers or graph inputs/outputs is each backend's job (see rgexport.backends).
"""

from __future__ import annotations

import math

import torch
from torch import nn

from rgexport.config import RECURRENT, GriffinConfig
from rgexport.model.blocks import ResidualBlock
from rgexport.model.layers import RMSNorm, RotaryEmbedding
from rgexport.model.state import State, TensorSpec, init_state, state_spec


class Embedder(nn.Module):
    """Input embedding (scaled by bf16-rounded sqrt(width)) and the tied output projection."""

    def __init__(self, config: GriffinConfig):
        super().__init__()
        self.input_embedding = nn.Parameter(torch.zeros(config.vocab_size, config.width))
        self.scale = config.embedding_scale

    def encode(self, tokens: torch.Tensor) -> torch.Tensor:
        return nn.functional.embedding(tokens, self.input_embedding) * self.scale

    def decode(self, x: torch.Tensor) -> torch.Tensor:
        return nn.functional.linear(x, self.input_embedding)


class Griffin(nn.Module):
    """Griffin / RecurrentGemma language model with explicit decode state."""

    def __init__(self, config: GriffinConfig):
        super().__init__()
        self.config = config
        self.embedder = Embedder(config)
        self.blocks = nn.ModuleList([ResidualBlock(config, bt) for bt in config.block_types])
        self.final_norm = RMSNorm(config.width, config.rms_norm_eps)
        self._state_names = [
            (f"blocks.{i}.rg_lru", f"blocks.{i}.conv1d") if bt == RECURRENT
            else (f"blocks.{i}.keys", f"blocks.{i}.values")
            for i, bt in enumerate(config.block_types)
        ]

    def forward(self, tokens: torch.Tensor, position: torch.Tensor, state: State,
                last_only: bool = False) -> tuple[torch.Tensor, State]:
        """tokens: [b t] int; position: [b] int, the position of tokens[:, 0] -> (logits [b t v], state).

        Position 0 starts a new sequence whatever the state holds. `last_only`: logits for the last token
        alone, [b 1 v]: the head (a quarter of RecurrentGemma-2B's multiply-adds per token) runs on one row.
        """
        t = tokens.shape[1]
        positions = position.to(torch.float32)[:, None] + torch.arange(t, dtype=torch.float32)
        x = self.embedder.encode(tokens)
        new_state: State = {}
        for block, (n0, n1) in zip(self.blocks, self._state_names):
            x, new_state[n0], new_state[n1] = block(x, positions, state[n0], state[n1])
        if last_only:
            x = x[:, -1:]
        logits = self.embedder.decode(self.final_norm(x))
        cap = self.config.logits_soft_cap
        if cap:
            logits = torch.tanh(logits / cap) * cap
        return logits, new_state

    def step(self, token: torch.Tensor, position: torch.Tensor, state: State) -> tuple[torch.Tensor, State]:
        """One token: token [b], position [b] -> (logits [b v], state)."""
        logits, state = self.forward(token[:, None], position, state)
        return logits[:, 0], state

    def prefill(self, tokens: torch.Tensor, position: torch.Tensor, state: State,
                last_only: bool = False) -> tuple[torch.Tensor, State]:
        """A chunk of t <= window tokens starting at `position` -> (logits [b t v], or [b 1 v] for the last
        token with `last_only`, state)."""
        return self.forward(tokens, position, state, last_only)

    @torch.no_grad()
    def reset_parameters_(self, generator: torch.Generator | None = None) -> Griffin:
        """Initialises weights as the Griffin paper and DeepMind's code do (for training from scratch).

        Draws in a fixed order (the embedding, then each block, `init_block_`), so that a streamed build
        that initialises one part at a time from the same generator gets the same values.
        """
        init_embedder_(self.embedder, self.config, generator)
        self.final_norm.scale.zero_()
        for block in self.blocks:
            init_block_(block, self.config, generator)
        return self

    def materialize_buffers(self) -> None:
        """Recomputes non-persistent buffers (rotary frequencies) after loading onto a meta model."""
        for module in self.modules():
            if isinstance(module, RotaryEmbedding):
                module.reset_buffers()

    def init_state(self, batch_size: int = 1) -> State:
        return init_state(self.config, batch_size)

    def state_spec(self, batch_size: int = 1) -> list[TensorSpec]:
        return state_spec(self.config, batch_size)

    @torch.no_grad()
    def score(self, tokens: torch.Tensor, chunk: int | None = None) -> torch.Tensor:
        """Teacher-forced logits for a whole sequence [b n] from position 0, run in chunks -> [b n v]."""
        chunk = chunk or self.config.attention_window_size
        state = self.init_state(tokens.shape[0])
        out = []
        for s in range(0, tokens.shape[1], chunk):
            position = torch.full((tokens.shape[0],), s, dtype=torch.long)
            logits, state = self.forward(tokens[:, s : s + chunk], position, state)
            out.append(logits)
        return torch.cat(out, dim=1)


@torch.no_grad()
def init_embedder_(embedder: Embedder, config: GriffinConfig, generator: torch.Generator | None = None) -> Embedder:
    """The embedding's part of `Griffin.reset_parameters_` (drawn first)."""
    embedder.input_embedding.normal_(0.0, math.sqrt(1.0 / config.width), generator=generator)
    return embedder


@torch.no_grad()
def init_block_(block: ResidualBlock, config: GriffinConfig, generator: torch.Generator | None = None) -> ResidualBlock:
    """One block's part of `Griffin.reset_parameters_`: paper initialisation, norm scales and biases zero."""
    c = config
    final_scale = 2.0 / c.num_layers

    def normal_(t: torch.Tensor, std: float) -> None:
        t.normal_(0.0, std, generator=generator)

    for module in block.modules():
        if isinstance(module, RMSNorm):
            module.scale.zero_()
    mlp = block.mlp_block
    normal_(mlp.ffw_gate.weight, math.sqrt(1.0 / c.width))
    normal_(mlp.ffw_up.weight, math.sqrt(1.0 / c.width))
    normal_(mlp.ffw_down.weight, math.sqrt(final_scale / c.mlp_expanded_width))
    for lin in (mlp.ffw_gate, mlp.ffw_up, mlp.ffw_down):
        lin.bias.zero_()
    if block.block_type == RECURRENT:
        rb = block.recurrent_block
        for lin in (rb.linear_x, rb.linear_y):
            normal_(lin.weight, math.sqrt(1.0 / c.width))
            lin.bias.zero_()
        normal_(rb.linear_out.weight, math.sqrt(final_scale / c.lru_width))
        rb.linear_out.bias.zero_()
        normal_(rb.conv_1d.w, math.sqrt(0.01 / c.conv1d_width))
        rb.conv_1d.b.zero_()
        for gate in (rb.rg_lru.input_gate, rb.rg_lru.a_gate):
            normal_(gate.w, math.sqrt(1.0 / c.lru_block_width))
            gate.b.zero_()
        # a = sigma(Lambda)^c spread uniformly on the ring 0.9 <= |a| <= 0.999 (softplus inverse).
        u = torch.rand(c.lru_width, generator=generator) * (0.999**2 - 0.9**2) + 0.9**2 + 1e-8
        rb.rg_lru.a_param.copy_(torch.log(torch.exp(-0.5 * torch.log(u)) - 1.0))
    else:
        ab = block.attention_block
        for lin in (ab.proj_q, ab.proj_k, ab.proj_v):
            normal_(lin.weight, math.sqrt(1.0 / c.width))
        normal_(ab.proj_final.weight, math.sqrt(final_scale / c.width))
        ab.proj_final.bias.zero_()
    return block
