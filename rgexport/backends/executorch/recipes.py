"""ExecuTorch recipes: fp32, and torchao / PT2E quantisation for XNNPACK (int4, int8, calibrated w8a8)."""

from __future__ import annotations

from torch import nn

from rgexport.backends.base import Recipe
from rgexport.model import Griffin

GROUP_SIZE = 32  # int4 weight group: must divide the in-features of every quantised linear

def _tie_head_as_linear_(model: Griffin) -> nn.Linear:
    """Routes the tied output projection through an nn.Linear sharing the embedding table.

    Griffin computes logits with F.linear on the embedding parameter, which torchao's `quantize_` cannot
    see. Here (in place, like all quantisation) `embedder.decode` becomes a call of a real nn.Linear over
    the same tensor; quantising it then replaces the head's weight only, and the gather keeps the table.
    """
    embedder = model.embedder
    head = nn.Linear(model.config.width, model.config.vocab_size, bias=False)
    head.weight = embedder.input_embedding
    embedder.head = head
    embedder.decode = lambda x: embedder.head(x)  # an instance attribute shadows Embedder.decode
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
