"""TFLite recipes: fp32, and the weight (and calibrated activation) quantisation ai-edge-quantizer applies."""

from __future__ import annotations

import contextlib
from collections.abc import Iterator

import numpy as np
import torch
from torch import nn

from rgexport.backends.base import Recipe
from rgexport.model.griffin import Embedder

INT4_BLOCK_SIZES = (32, 64, 128, 256)  # the blockwise granularities ai-edge-quantizer offers

DEFAULT_INT4_BLOCK_SIZE = 32

RECIPES = {
    "fp32": Recipe("fp32", "float32 weights and activations"),
    "fp16": Recipe("fp16", "float16 weights, dequantised to float32 when the model loads; float32 "
                           "compute", quantized=True),
    "int8": Recipe("int8", "dynamic range: int8 per-channel weights, activations quantised to int8 "
                           "on the fly inside each matmul; state and logits float32", quantized=True),
    "int4": Recipe("int4", "dynamic range with int4 weights in blocks along the input dimension "
                           "(option int4_block_size, default 32); state and logits float32",
                   quantized=True),
    "w8a8": Recipe(
        "w8a8",
        "static int8 activations and int8 weights, calibrated on (tokens, position, state) samples "
        "captured from the fp32 model over calibration text: the recurrent and attention projections, "
        "the MLPs and the RG-LRU gates run int8 in and out. Float32 activations, chosen by a per-group "
        "sensitivity study on the shipped model (one group int8 at a time, 512 held-out tokens): "
        "attention scores/softmax (their -30000 mask leaves int8 a ~118 step: 90.4% top-1 alone), the "
        "RG-LRU recurrence, Conv1D, norms and residual stream (no weights; together they doubled the "
        "KL, 0.0038 -> 0.0067), the state, the logits and soft-cap (97.1% alone); embedding and head "
        "weights dynamic int8",
        quantized=True, calibrated=True),
}


# int8 and int4 from a stream of weights ----------------------------------------------------------------
# A model too large to hold in float32 (RecurrentGemma-2B: 10.7 GB) cannot take the route above, which
# quantises a float flatbuffer that the converter first builds in full. From a stream (option stream_weights,
# the default for a large model), int8 and int4 quantise each part as it is read instead: symmetric weights as
# torchao tensors (int8: a scale per output channel; int4: a float16-exact scale per block of input channels),
# which litert-torch converts (in strict QDQ mode) into int8 / int4 constants, each behind a DEQUANTIZE that
# `rewrites.drop_weight_dequantize` then removes. The file is the dynamic-range form that ai-edge-quantizer writes
# (float activations quantised on the fly inside each FULLY_CONNECTED; EMBEDDING_LOOKUP reads quantised rows),
# with the tied table stored once for the gather and the head. The RG-LRU's block-diagonal gates (BATCH_MATMUL,
# 1-2 % of the weights) stay float32.
STREAMED = "torchao, streamed"
AI_EDGE_QUANTIZER = "ai-edge-quantizer"
STREAMED_RECIPES = ("int8", "int4")

_ROWS_PER_CHUNK = 8192  # rows of a weight quantised at once: no whole-table float temporaries at 2B


def intx_weight(weight: torch.Tensor, bits: int = 8, group: int | None = None,
                tags: dict[float, np.ndarray] | None = None) -> nn.Parameter:
    """`weight` [out, in] as torchao's symmetric intx tensor, quantised in chunks of rows: int8 with one scale per
    output channel, or int4 with one per `group` input channels. int4's scales are rounded to float16 (LiteRT's
    blockwise int4 stores them so) and the weights quantised with the rounded ones, so the file holds exactly
    these values. Weight-only: `_to_runtime_` gives the form that quantises its inputs as the runtime does.

    With `tags` (int4, for the converter): the tensor handed to litert-torch holds the same int4 values under one
    placeholder scale per output channel, the first of them a tag (1, 2, 3...) under which `tags` keeps the real
    float16 block scales for `rewrites.drop_weight_dequantize` to put back. Given block scales, the converter
    carries one per block through MLIR's quantised types and the file (84 M of them at RecurrentGemma-2B: its
    conversion then peaked at 21.9 GiB). The parameter keeps the real scales (`block_scales`) for
    `runtime_activations`."""
    from torchao.quantization.quantize_.workflows.intx.intx_unpacked_to_int8_tensor import IntxUnpackedToInt8Tensor

    group = weight.shape[1] if bits == 8 else group
    block = (1, group)
    qdata, scales = [], []
    for i in range(0, weight.shape[0], _ROWS_PER_CHUNK):
        chunk = weight[i:i + _ROWS_PER_CHUNK].float()
        if bits == 8:
            part = IntxUnpackedToInt8Tensor.from_hp(chunk, block, torch.int8)
            qdata.append(part.qdata)
            scales.append(part.scale)
            continue
        blocks = chunk.unflatten(-1, (-1, group))
        scale = (blocks.abs().amax(-1) / 7.5).clamp_min(2.0 ** -14).half().float()  # torchao's int4 step
        qdata.append((blocks / scale[..., None]).round().clamp(-8, 7).to(torch.int8).flatten(-2))
        scales.append(scale)
    qdata, scale = torch.cat(qdata), torch.cat(scales)
    dtype = torch.int8 if bits == 8 else torch.int4
    if bits == 4 and tags is not None:
        tag = float(len(tags) + 1)
        tags[tag] = scale.half().numpy()
        placeholder = torch.ones(qdata.shape[0], 1)
        placeholder[0, 0] = tag
        param = nn.Parameter(IntxUnpackedToInt8Tensor(
            qdata, placeholder, torch.zeros_like(placeholder, dtype=torch.int8), dtype, (1, qdata.shape[1]),
            torch.float32, None), requires_grad=False)
        param.block_scales = scale
        return param
    return nn.Parameter(IntxUnpackedToInt8Tensor(
        qdata, scale, torch.zeros_like(scale, dtype=torch.int8), dtype, block, torch.float32, None),
        requires_grad=False)


def quantise_part_(part: nn.Module, kind: str, bits: int = 8, group: int | None = None,
                   activations: bool = False, tags: dict[float, np.ndarray] | None = None) -> nn.Module:
    """One streamed part (an Embedder, a ResidualBlock or the final norm) quantised in place: every nn.Linear's
    weight, and the embedder's tied table (gathered and used as the head: one tensor). With `activations`, the
    own model of validation (`_to_runtime_`). `tags`: int4 for the converter (`intx_weight`)."""
    if kind == "embedder":
        part.input_embedding = intx_weight(part.input_embedding.data, bits, group, tags=tags)
    for module in part.modules():
        if isinstance(module, nn.Linear):
            module.weight = intx_weight(module.weight.data, bits, group, tags)
    if activations:
        _to_runtime_(part)
    return part


def _to_runtime_(module: nn.Module) -> list[tuple[nn.Module, str, nn.Parameter]]:
    """`module`'s quantised linears, and an embedder's table, computing as the converted file does: each linear
    and the head quantise their inputs per token, the gather reads the quantised rows (the same data, shared; the
    real block scales where the converter got placeholders). Returns (module, attribute, weight) to undo it."""
    undo = []
    for m in list(module.modules()):
        if isinstance(m, nn.Linear):
            undo.append((m, "weight", m.weight))
            m.weight = _with_activations(m.weight)
        elif isinstance(m, Embedder):
            table = m.input_embedding
            undo.append((m, "input_embedding", table))
            m.input_embedding = _with_activations(table, activations=False)
            m.head_weight = _with_activations(table)
            m.__class__ = _HeadEmbedder
    return undo


def _with_activations(table: nn.Parameter, activations: bool = True) -> nn.Parameter:
    """The same quantised tensor (its data shared), quantising its inputs per token; with the real block scales
    where `table` carries placeholders (`intx_weight` with tags)."""
    from torchao.quantization.quantize_.workflows.intx.intx_unpacked_to_int8_tensor import (
        IntxUnpackedToInt8Tensor,
        IntxUnpackedToInt8TensorActivationQuantization,
    )

    t = table.data
    scale, block = t.scale, t.block_size
    if getattr(table, "block_scales", None) is not None:
        scale = table.block_scales
        block = (1, t.qdata.shape[1] // scale.shape[1])
    mode = IntxUnpackedToInt8TensorActivationQuantization.INT8_ASYM_PER_TOKEN if activations else None
    return nn.Parameter(IntxUnpackedToInt8Tensor(
        t.qdata, scale, torch.zeros_like(scale, dtype=torch.int8), t.target_dtype, block, t.dtype, mode),
        requires_grad=False)


class _HeadEmbedder(Embedder):
    """The own model's embedder: the gather reads the table's quantised rows, the head (`head_weight`, the same
    data) quantises its input per token as the runtime's FULLY_CONNECTED does. Both work a chunk of rows at a
    time: torchao's tensor dequantises the whole table per call (2.6 GB of float32 at RecurrentGemma-2B)."""

    head_weight: nn.Parameter

    def encode(self, tokens: torch.Tensor) -> torch.Tensor:
        t = self.input_embedding.data
        # torchao's dequantisation, of the rows gathered: each block of a row by its scale.
        rows = (t.qdata[tokens].float().unflatten(-1, (t.scale.shape[-1], -1)) - t.zero_point[tokens][..., None])
        return (rows * t.scale[tokens][..., None]).flatten(-2) * self.scale

    def decode(self, x: torch.Tensor) -> torch.Tensor:
        from torchao.quantization.quantize_.workflows.intx.intx_unpacked_to_int8_tensor import (
            IntxUnpackedToInt8Tensor,
        )

        w = self.head_weight.data
        # Per-token input quantisation does not depend on the rows, so chunks of the head give the whole head's.
        return torch.cat([nn.functional.linear(x, IntxUnpackedToInt8Tensor(
            w.qdata[i:i + _ROWS_PER_CHUNK], w.scale[i:i + _ROWS_PER_CHUNK], w.zero_point[i:i + _ROWS_PER_CHUNK],
            w.target_dtype, w.block_size, w.dtype, w.activation_quantization))
            for i in range(0, w.qdata.shape[0], _ROWS_PER_CHUNK)], dim=-1)


@contextlib.contextmanager
def runtime_activations(model: nn.Module) -> Iterator[nn.Module]:
    """`model` (from `quantise_part_`, weight-only) computing as the converted file does (`_to_runtime_`), for as
    long as the block runs."""
    undo = _to_runtime_(model)
    try:
        yield model
    finally:
        for m, name, weight in undo:
            setattr(m, name, weight)
            if isinstance(m, _HeadEmbedder):
                m.__class__ = Embedder
                del m.head_weight
