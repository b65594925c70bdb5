"""The graphs that backends export, built around one Griffin step model.

Two ways to carry the decode state across calls; each backend picks the one its runtime supports:
- functional (`DecodeIO`, `PrefillIO`): state tensors are graph inputs and outputs, in `state_spec`
  order, inputs named `state.<name>` and outputs `new_state.<name>` (ONNX, LiteRT, Core ML fp32-state;
  runtimes that forbid dots take `identifier` of these names).
- stateful (`StatefulModel`): state tensors are module buffers updated in place, so the runtime keeps
  them inside the program (ExecuTorch mutable buffers, Core ML `StateType`).
Tokens and positions are int32 at every boundary: phones' runtimes and LiteRT prefer it and a 2^31
position limit is far beyond any sequence. Logits are float32.

`put_decode_rows` gives a model the K/V-cache write for a runtime that puts one row in place (ExecuTorch), where
the shared model blends over every slot.
"""

from __future__ import annotations

import torch
from torch import nn

from rgexport.model import Griffin, TensorSpec
from rgexport.model.blocks import RingBuffer


class RowPutRingBuffer(RingBuffer):
    """A decode step's ring-buffer write (batch 1) as one row put, `index_put(cache, [None, slot], k)`, where
    `RingBuffer` blends over every slot; a chunk, or a batch, keeps the blend. The same values as the blend,
    row for row. ExecuTorch's reinplace pass makes it an in-place write of the state buffer (its in-place
    kernel takes one non-null index only). ONNX Runtime's ScatterND of the same row was no faster than the
    blend at 2 threads (notes/onnx.md), so ONNX keeps the blend.
    """

    def forward(
        self, positions: torch.Tensor, keys: torch.Tensor, values: torch.Tensor, k: torch.Tensor, v: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor]:
        b, t, _ = k.shape
        if t != 1 or b != 1:
            return super().forward(positions, keys, values, k, v)
        slot = torch.remainder(positions[0], self.window).to(torch.long)  # [1]; positions are integral floats
        return torch.ops.aten.index_put(keys, [None, slot], k), torch.ops.aten.index_put(values, [None, slot], v)


def put_decode_rows(module: nn.Module) -> None:
    """Gives every attention block of `module` the row-put decode write (`RowPutRingBuffer`)."""
    for parent in list(module.modules()):
        for name, child in list(parent.named_children()):
            if type(child) is RingBuffer:
                setattr(parent, name, RowPutRingBuffer(child.window))


def input_name(spec: TensorSpec) -> str:
    return f"state.{spec.name}"


def output_name(spec: TensorSpec) -> str:
    return f"new_state.{spec.name}"


class DecodeIO(nn.Module):
    """(token [1] int32, position [1] int32, *state) -> (logits [1, v], *new_state)."""

    def __init__(self, model: Griffin):
        super().__init__()
        self.model = model
        self.specs = model.state_spec(1)

    def forward(self, token: torch.Tensor, position: torch.Tensor, *state: torch.Tensor):
        named = {s.name: t for s, t in zip(self.specs, state)}
        logits, new = self.model.step(token.to(torch.long), position, named)
        return (logits, *[new[s.name] for s in self.specs])

    def example_inputs(self) -> tuple[torch.Tensor, ...]:
        return (torch.zeros(1, dtype=torch.int32), torch.zeros(1, dtype=torch.int32),
                *[torch.zeros(s.shape, dtype=s.dtype) for s in self.specs])


class PrefillIO(DecodeIO):
    """(tokens [1, chunk] int32, position [1] int32, *state) -> (logits [1, chunk, v], *new_state); with
    `last_only`, logits [1, 1, v] for the chunk's last token (`config.PREFILL_LOGITS`)."""

    def __init__(self, model: Griffin, chunk: int, last_only: bool = False):
        super().__init__(model)
        self.chunk = chunk
        self.last_only = last_only

    def forward(self, tokens: torch.Tensor, position: torch.Tensor, *state: torch.Tensor):
        named = {s.name: t for s, t in zip(self.specs, state)}
        logits, new = self.model.prefill(tokens.to(torch.long), position, named, self.last_only)
        return (logits, *[new[s.name] for s in self.specs])

    def example_inputs(self) -> tuple[torch.Tensor, ...]:
        return (torch.zeros(1, self.chunk, dtype=torch.int32), *super().example_inputs()[1:])


class StatefulModel(nn.Module):
    """Decode and prefill with the state held in buffers, written back in place. Buffers are named
    `TensorSpec.identifier` (`blocks__0__rg_lru`): attribute names cannot hold dots.

    `forward(tokens [1, t] int32, position [1] int32) -> logits [1, t, v]`; export it once with t = 1
    (decode) and once with t = chunk (prefill). Both share the same buffers. `assign_slices` writes
    `buf[:] = new` instead of `buf.copy_(new)`, the form Core ML's TorchScript path recognises.
    `prefill_last_only`: a chunk (t > 1) returns the last token's logits alone, [1, 1, v].
    """

    def __init__(self, model: Griffin, assign_slices: bool = False, state_dtype: torch.dtype = torch.float32,
                 prefill_last_only: bool = False):
        super().__init__()
        self.model = model
        self.specs = model.state_spec(1)
        self.assign_slices = assign_slices
        self.prefill_last_only = prefill_last_only
        for s in self.specs:
            self.register_buffer(s.identifier, torch.zeros(s.shape, dtype=state_dtype))

    def forward(self, tokens: torch.Tensor, position: torch.Tensor) -> torch.Tensor:
        state = {s.name: getattr(self, s.identifier).to(torch.float32) for s in self.specs}
        last_only = self.prefill_last_only and tokens.shape[1] > 1  # static at export: one graph per shape
        logits, new = self.model.forward(tokens.to(torch.long), position, state, last_only)
        for s in self.specs:
            buf = getattr(self, s.identifier)
            value = new[s.name].to(buf.dtype)
            if self.assign_slices:
                buf[:] = value
            else:
                buf.copy_(value)
        return logits
