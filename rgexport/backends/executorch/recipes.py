"""ExecuTorch recipes: fp32, and torchao / PT2E quantisation for XNNPACK (int4, int8, calibrated w8a8)."""

from __future__ import annotations

from typing import Any

import torch
from torch import nn

from rgexport.backends.base import Recipe
from rgexport.model import Griffin
from rgexport.model.griffin import Embedder

GROUP_SIZE = 32  # int4 weight group: must divide the in-features of every quantised linear
SLICE_BYTES = 64 << 20  # float32 rows quantised at a time by `quantize_rows_`


def quantize_rows_(linear: nn.Linear, config: Any, slice_bytes: int = SLICE_BYTES) -> None:
    """torchao's `quantize_(linear, config)` for a config whose blocks lie within one row (PerAxis(0), or
    PerGroup along the row), a slice of rows at a time.

    On a whole weight, torchao's affine quantisation makes several float temporaries the size of the weight:
    quantising the tied 256000 x 2560 head (2.6 GB in float32) peaked 6 GB above the table (notes/perf.md).
    Each row's scales and values depend on that row alone, so each slice goes through `quantize_` itself
    (a temporary nn.Linear) and its int rows, scales and zero points are copied into one preallocated
    tensor of torchao's own type: the same tensor, byte for byte (tests/test_backend_executorch.py)."""
    from torchao.quantization import quantize_
    from torchao.quantization.quantize_.workflows.intx.intx_unpacked_to_int8_tensor import (
        IntxUnpackedToInt8Tensor,
    )

    weight = linear.weight.detach()
    rows, cols = weight.shape
    step = max(1, slice_bytes // (cols * weight.element_size()))
    qdata = scale = zero_point = first = None
    for start in range(0, rows, step):
        part = nn.Linear(cols, min(step, rows - start), bias=False, device="meta")  # no weight of its own
        part.weight = nn.Parameter(weight[start:start + step], requires_grad=False)
        quantize_(part, config)
        q = part.weight
        if first is None:
            block = tuple(q.block_size)
            if block[0] != 1 or cols % block[1]:
                raise ValueError(f"quantize_rows_ needs blocks within a row; torchao gave block size {block}")
            first = q
            qdata = torch.empty((rows, cols), dtype=q.qdata.dtype)
            scale = torch.empty((rows, cols // block[1]), dtype=q.scale.dtype)
            zero_point = torch.empty((rows, cols // block[1]), dtype=q.zero_point.dtype)
        qdata[start:start + step] = q.qdata
        scale[start:start + step] = q.scale
        zero_point[start:start + step] = q.zero_point
        del part, q
    linear.weight = nn.Parameter(
        IntxUnpackedToInt8Tensor(qdata, scale, zero_point, first.target_dtype, first.block_size, first.dtype,
                                 first.activation_quantization),
        requires_grad=False,
    )


def pack_int4_rows(qdata: torch.Tensor, slice_rows: int = 1 << 13) -> torch.Tensor:
    """int4 values (int8 storage, -8..7) as `embedding_4bit` reads them: two per byte, offset by 8, the even
    column in the high nibble. A slice of rows at a time (the 2B table is 655 M values)."""
    rows, cols = qdata.shape
    if cols % 2:
        raise ValueError(f"int4 rows need an even width, got {cols}")
    packed = torch.empty((rows, cols // 2), dtype=torch.uint8)
    for s in range(0, rows, slice_rows):
        q = qdata[s:s + slice_rows].to(torch.int16) + 8
        packed[s:s + slice_rows] = (q[:, 0::2] * 16 + q[:, 1::2]).to(torch.uint8)
    return packed


class TiedHeadEmbedder(Embedder):
    """The embedding whose output projection is `self.head`, an nn.Linear over the table
    (`_tie_head_as_linear_`). A class, not a closure on the instance: a closure over the module would make a
    reference cycle that keeps the quantised table alive after its last use until Python's cycle collector
    happens to run (1.3 GB at RecurrentGemma-2B, seen in the own-model pass)."""

    head: nn.Linear

    def decode(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(x)


class QuantizedGatherEmbedder(TiedHeadEmbedder):
    """The gather reads the head's quantised rows (buffers `embedding_scales` and the subclass's table)
    through one of ExecuTorch's quantized embedding ops, the op the `.pte` runs."""

    def _gather(self, table: torch.Tensor, scales: torch.Tensor, tokens: torch.Tensor) -> torch.Tensor:
        raise NotImplementedError

    def table(self) -> torch.Tensor:
        raise NotImplementedError

    def encode(self, tokens: torch.Tensor) -> torch.Tensor:
        return self._gather(self.table(), self.embedding_scales, tokens) * self.scale


class Int8GatherEmbedder(QuantizedGatherEmbedder):
    """int8 rows (buffer `embedding_int8`) and a scale per row, through `embedding_byte`."""

    def table(self) -> torch.Tensor:
        return self.embedding_int8

    def _gather(self, table: torch.Tensor, scales: torch.Tensor, tokens: torch.Tensor) -> torch.Tensor:
        return torch.ops.quantized_decomposed.embedding_byte.dtype(
            table, scales, None, -128, 127, tokens, dtype=torch.float32)


class Int4GatherEmbedder(QuantizedGatherEmbedder):
    """int4 rows (buffer `embedding_int4`, two values a byte: `pack_int4_rows`) and a scale per group of
    GROUP_SIZE, through `embedding_4bit`."""

    def table(self) -> torch.Tensor:
        return self.embedding_int4

    def _gather(self, table: torch.Tensor, scales: torch.Tensor, tokens: torch.Tensor) -> torch.Tensor:
        return torch.ops.quantized_decomposed.embedding_4bit.dtype(
            table, scales, None, -8, 7, tokens, dtype=torch.float32)


def swap_column_pairs(x: torch.Tensor) -> torch.Tensor:
    """`x` with the columns of its last dimension swapped in pairs (1, 0, 3, 2, ...): slices, a concatenation
    and reshapes, which XNNPACK runs inside the head's partition (an index op would be a portable kernel
    between two delegate calls)."""
    pairs = x.unflatten(-1, (-1, 2))
    return torch.cat((pairs[..., 1:], pairs[..., :1]), dim=-1).flatten(-2)


class SharedTableEmbedder(Int4GatherEmbedder):
    """`Int4GatherEmbedder` whose 4-bit head holds its columns swapped in pairs (`share_table_with_head_`) and
    takes its input swapped the same way: the same logits, bit for bit.

    Why: XNNPACK packs a 4-bit weight two columns a byte with the odd column in the high nibble
    (`NodeVisitor.convert_to_qc4w`, executorch 1.5.1); `embedding_4bit` reads the even column there
    (`pack_int4_rows`). Swapped, the head's packed bytes are the gather table's bytes, so ExecuTorch's named
    data store keeps them once (`model.ptd`), not twice (notes/perf.md)."""

    def decode(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(swap_column_pairs(x))


def share_table_with_head_(embedder: Int4GatherEmbedder, slice_rows: int = 1 << 13) -> None:
    """Makes `embedder` a `SharedTableEmbedder`: its head's int4 values swapped in pairs of columns, in place, a
    slice of rows at a time. The groups of GROUP_SIZE (an even number) keep their members and scales."""
    if not isinstance(embedder, Int4GatherEmbedder):
        raise TypeError(f"only an Int4GatherEmbedder's head can share its table, not a {type(embedder).__name__}")
    qdata = embedder.head.weight.qdata
    with torch.no_grad():
        for s in range(0, qdata.shape[0], slice_rows):
            qdata[s:s + slice_rows] = swap_column_pairs(qdata[s:s + slice_rows])
    embedder.__class__ = SharedTableEmbedder


def _head_in_slices(self: TiedHeadEmbedder, x: torch.Tensor) -> torch.Tensor:
    """The head's linear over SLICE_BYTES of float32 rows at a time: torchao's eager int8 linear dequantises
    its whole weight per call (2.6 GB at RecurrentGemma-2B, and its temporaries more)."""
    weight = self.head.weight
    rows, cols = weight.shape
    step = max(1, SLICE_BYTES // (cols * 4))
    return torch.cat([nn.functional.linear(x, weight[s:s + step]) for s in range(0, rows, step)], dim=-1)


def _gather_rows_only(self: QuantizedGatherEmbedder, tokens: torch.Tensor) -> torch.Tensor:
    """The quantized gather given only the rows the tokens ask for: the ops' eager kernels dequantise the
    whole table per call (the same op, the same values)."""
    flat = tokens.reshape(-1)
    positions = torch.arange(flat.numel()).reshape(tokens.shape)
    rows = self._gather(self.table()[flat], self.embedding_scales[flat], positions)
    return rows * self.scale


class EagerTiedHeadEmbedder(TiedHeadEmbedder):
    """`TiedHeadEmbedder` for eager runs (the own model of validation): the same ops on slices."""

    decode = _head_in_slices


class EagerInt8GatherEmbedder(Int8GatherEmbedder):
    """`Int8GatherEmbedder` for eager runs: the head over slices, the gather over the tokens' rows only."""

    decode = _head_in_slices
    encode = _gather_rows_only


class EagerInt4GatherEmbedder(Int4GatherEmbedder):
    """`Int4GatherEmbedder` for eager runs: the head over slices, the gather over the tokens' rows only."""

    decode = _head_in_slices
    encode = _gather_rows_only


_EAGER = {Int8GatherEmbedder: EagerInt8GatherEmbedder, Int4GatherEmbedder: EagerInt4GatherEmbedder}


def eager_in_slices_(embedder: TiedHeadEmbedder) -> None:
    """Switches a quantised embedding to its eager-friendly class (same values, no whole-table temporaries)."""
    embedder.__class__ = _EAGER.get(type(embedder), EagerTiedHeadEmbedder)


def _tie_head_as_linear_(model: Griffin) -> nn.Linear:
    """Routes the tied output projection through an nn.Linear sharing the embedding table.

    Griffin computes logits with F.linear on the embedding parameter, which torchao's `quantize_` cannot
    see. Here (in place, like all quantisation) the embedder becomes a `TiedHeadEmbedder` whose `decode`
    calls a real nn.Linear over the same tensor; quantising it then replaces the head's weight only, and the
    gather keeps the table.
    """
    embedder = model.embedder
    # On the meta device: a CPU nn.Linear would first allocate and initialise a weight of its own, as large
    # as the table (2.6 GB at RecurrentGemma-2B, freed only when replaced below).
    head = nn.Linear(model.config.width, model.config.vocab_size, bias=False, device="meta")
    head.weight = embedder.input_embedding
    embedder.head = head
    embedder.__class__ = TiedHeadEmbedder
    return head

RECIPES = {
    "fp32": Recipe("fp32", "float32 weights and activations, XNNPACK delegate"),
    "int4": Recipe(
        "int4", f"int8 dynamic activations, int4 weights in groups of {GROUP_SIZE} (torchao) on every "
        "linear layer, int8 per-channel on the tied output head; embedding gather and RG-LRU stay float32",
        quantized=True,
    ),
    "int8": Recipe(
        "int8", "int8 dynamic activations, int8 per-channel weights (XNNPACK PT2E quantizer) on every "
        "linear op, the tied output head included; RG-LRU and state stay float32", quantized=True,
    ),
    "w8a8": Recipe(
        "w8a8", "int8 static activations calibrated on real decode/prefill inputs and int8 per-channel "
        "weights (XNNPACK PT2E quantizer) on the MLP, recurrent-block and attention projection linears; "
        "the tied head int8 weights with dynamic int8 activations; float32: the RG-LRU recurrence and "
        "gates, Conv1D, attention scores/mask/softmax, norms, residuals, gating products and the state",
        quantized=True, calibrated=True,
    ),
}
