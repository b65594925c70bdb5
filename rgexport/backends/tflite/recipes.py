"""TFLite recipes: fp32, and the weight (and calibrated activation) quantisation ai-edge-quantizer applies."""

from __future__ import annotations

import contextlib
from collections.abc import Iterator

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


# int8 from a stream of weights ----------------------------------------------------------------------------
# A model too large to hold in float32 (RecurrentGemma-2B: 10.7 GB) cannot take the route above, which
# quantises a float flatbuffer that the converter first builds in full. From a stream (option stream_weights,
# the default for a large model), the int8 recipe quantises each part as it is read instead: per-channel
# symmetric int8 weights as torchao tensors, which litert-torch converts (in strict QDQ mode) into int8
# constants, each behind a DEQUANTIZE that `rewrites.drop_weight_dequantize` then removes. The file is the
# dynamic-range form that ai-edge-quantizer writes (float activations quantised on the fly inside each
# FULLY_CONNECTED; EMBEDDING_LOOKUP reads int8 rows), with the tied table stored once for the gather and the
# head. The RG-LRU's block-diagonal gates (BATCH_MATMUL, 1-2 % of the weights) stay float32.
STREAMED_INT8 = "streamed"
QUANTISER_INT8 = "ai-edge-quantizer"

_ROWS_PER_CHUNK = 8192  # rows of a weight quantised at once: no whole-table float temporaries at 2B


def int8_per_channel(weight: torch.Tensor, activations: bool = False) -> nn.Parameter:
    """`weight` [out, in] as torchao's per-row symmetric int8 tensor (one scale per output channel), quantised
    in chunks of rows. With `activations`, the tensor also quantises its inputs per token to int8 (asymmetric),
    as the runtime's dynamic-range kernels do: the own model of validation."""
    from torchao.quantization.quantize_.workflows.intx.intx_unpacked_to_int8_tensor import (
        IntxUnpackedToInt8Tensor,
        IntxUnpackedToInt8TensorActivationQuantization,
    )

    block = (1, weight.shape[1])
    parts = [IntxUnpackedToInt8Tensor.from_hp(weight[i:i + _ROWS_PER_CHUNK].float(), block, torch.int8)
             for i in range(0, weight.shape[0], _ROWS_PER_CHUNK)]
    tensors = [torch.cat([getattr(p, n) for p in parts]) for n in ("qdata", "scale", "zero_point")]
    del parts
    mode = IntxUnpackedToInt8TensorActivationQuantization.INT8_ASYM_PER_TOKEN if activations else None
    return nn.Parameter(IntxUnpackedToInt8Tensor(*tensors, torch.int8, block, torch.float32, mode),
                        requires_grad=False)


def quantise_int8_part_(part: nn.Module, kind: str, activations: bool = False) -> nn.Module:
    """One streamed part (an Embedder, a ResidualBlock or the final norm) quantised in place: every nn.Linear's
    weight, and the embedder's tied table (gathered and used as the head: one int8 tensor). With `activations`,
    the own model of validation: the linears and the head quantise their inputs as the runtime does, the gather
    reads the same int8 rows."""
    if kind == "embedder":
        table = int8_per_channel(part.input_embedding.data)
        part.input_embedding = table
        if activations:
            part.head_weight = _with_activations(table)
            part.__class__ = _HeadEmbedder
        return part
    for module in part.modules():
        if isinstance(module, nn.Linear):
            module.weight = int8_per_channel(module.weight.data, activations)
    return part


def _with_activations(table: nn.Parameter) -> nn.Parameter:
    """The same int8 tensor (its data shared), quantising its inputs per token."""
    from torchao.quantization.quantize_.workflows.intx.intx_unpacked_to_int8_tensor import (
        IntxUnpackedToInt8Tensor,
        IntxUnpackedToInt8TensorActivationQuantization,
    )

    t = table.data
    return nn.Parameter(IntxUnpackedToInt8Tensor(
        t.qdata, t.scale, t.zero_point, t.target_dtype, t.block_size, t.dtype,
        IntxUnpackedToInt8TensorActivationQuantization.INT8_ASYM_PER_TOKEN), requires_grad=False)


class _HeadEmbedder(Embedder):
    """The own model's embedder: the gather reads the int8 table's rows, the head (`head_weight`, the same int8
    data) quantises its input per token as the runtime's FULLY_CONNECTED does. Both work a chunk of rows at a
    time: torchao's tensor dequantises the whole table per call (2.6 GB of float32 at RecurrentGemma-2B)."""

    head_weight: nn.Parameter

    def encode(self, tokens: torch.Tensor) -> torch.Tensor:
        t = self.input_embedding.data
        rows = t.qdata[tokens].float() - t.zero_point[tokens]  # torchao's dequantisation, of the rows gathered
        return (rows * t.scale[tokens]) * self.scale

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
    """`model` (int8 from `quantise_int8_part_`, weight-only) computing as the converted file does, for as long as
    the block runs: each linear and the head quantise their inputs per token (the same int8 data, shared)."""
    linears = [m for m in model.modules() if isinstance(m, nn.Linear)]
    weights = [m.weight for m in linears]
    embedder = model.embedder
    try:
        for m, w in zip(linears, weights):
            m.weight = _with_activations(w)
        embedder.head_weight = _with_activations(embedder.input_embedding)
        embedder.__class__ = _HeadEmbedder
        yield model
    finally:
        for m, w in zip(linears, weights):
            m.weight = w
        embedder.__class__ = Embedder
        del embedder.head_weight
