"""TFLite recipes: fp32, and the weight (and calibrated activation) quantisation ai-edge-quantizer applies."""

from __future__ import annotations

from rgexport.backends.base import Recipe

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
