"""The decode state: named, fixed-size, documented in bytes.

Legend: b = batch, w = attention window, l = lru_width, k = num_kv_heads * head_dim, c = conv1d_width - 1.

Per recurrent block i:
  `blocks.{i}.rg_lru`  [b, l]     float32  RG-LRU hidden state h_t
  `blocks.{i}.conv1d`  [b, c, l]  float32  the last c inputs of the Conv1D (oldest first)
Per attention block i:
  `blocks.{i}.keys`    [b, w, k]  float32  ring buffer: the key of position p sits in slot p % w
  `blocks.{i}.values`  [b, w, k]  float32  same layout for values

The state holds no position: the caller passes the position of each token, and position 0 starts a new
sequence (the model clears the recurrence and the conv window there, and masks every cache slot).

Runtimes that forbid dots in names (ExecuTorch buffers, Core ML features and states, LiteRT signatures)
all get `identifier(name)`: '.' written '__' (`state.blocks.0.rg_lru` -> `state__blocks__0__rg_lru`).
"""

from __future__ import annotations

import dataclasses

import torch

from rgexport.config import ATTENTION, RECURRENT, GriffinConfig
from rgexport.errors import RgexportError

State = dict[str, torch.Tensor]


def identifier(name: str) -> str:
    """A contract name as a dot-free identifier ('.' -> '__'); refused where `dotted` could not undo it."""
    if "__" in name:
        raise RgexportError(f"Tensor name {name!r} holds '__', which the identifier mapping reserves")
    mapped = name.replace(".", "__")
    if not mapped.isidentifier():
        raise RgexportError(f"Tensor name {name!r} maps to {mapped!r}, which is not a Python identifier")
    return mapped


def dotted(name: str) -> str:
    """Inverse of `identifier`."""
    return name.replace("__", ".")


@dataclasses.dataclass(frozen=True)
class TensorSpec:
    """Name, shape and dtype of one state tensor, with its size in bytes."""

    name: str
    shape: tuple[int, ...]
    dtype: torch.dtype
    kind: str  # rg_lru | conv1d | keys | values

    @property
    def identifier(self) -> str:
        return identifier(self.name)

    @property
    def numel(self) -> int:
        n = 1
        for s in self.shape:
            n *= s
        return n

    @property
    def nbytes(self) -> int:
        return self.numel * torch.empty((), dtype=self.dtype).element_size()

    def to_dict(self) -> dict:
        return {
            "name": self.name,
            "shape": list(self.shape),
            "dtype": str(self.dtype).removeprefix("torch."),
            "kind": self.kind,
            "bytes": self.nbytes,
        }


def state_spec(config: GriffinConfig, batch_size: int = 1, dtype: torch.dtype = torch.float32) -> list[TensorSpec]:
    """Every state tensor in the order backends pass them, with exact shapes and bytes."""
    specs = []
    kv = config.num_kv_heads * config.head_dim
    for i, block in enumerate(config.block_types):
        if block == RECURRENT:
            specs.append(TensorSpec(f"blocks.{i}.rg_lru", (batch_size, config.lru_width), dtype, "rg_lru"))
            specs.append(TensorSpec(
                f"blocks.{i}.conv1d", (batch_size, config.conv1d_width - 1, config.lru_width), dtype, "conv1d"
            ))
        elif block == ATTENTION:
            w = config.attention_window_size
            specs.append(TensorSpec(f"blocks.{i}.keys", (batch_size, w, kv), dtype, "keys"))
            specs.append(TensorSpec(f"blocks.{i}.values", (batch_size, w, kv), dtype, "values"))
    return specs


def state_bytes(config: GriffinConfig, batch_size: int = 1, dtype: torch.dtype = torch.float32) -> int:
    return sum(s.nbytes for s in state_spec(config, batch_size, dtype))


def init_state(config: GriffinConfig, batch_size: int = 1, dtype: torch.dtype = torch.float32) -> State:
    """A zero state. Any state works to start a sequence at position 0; zeros are the canonical one."""
    return {s.name: torch.zeros(s.shape, dtype=s.dtype) for s in state_spec(config, batch_size, dtype)}
