"""Calibrated full-integer quantisation (recipe `w8a8`) for the LiteRT backend.

- `op_groups`: every operator of a flatbuffer placed in one group (`mlp.3`, `rglru_gates.0`,
  `attention.2`, `positions`, ...), from the module path litert-torch writes into each op's output tensor
  names (the first location of the first output: fused ops list every location they came from) and from
  dataflow (`positions`: ops computed from the position input and constants alone). It works on the
  float file and on a quantised one (QUANTIZE/DEQUANTIZE ops land in the group of the tensor they write).
- `calibrate`: activation ranges of every tensor of both signatures over a representative dataset
  (`tflite.representative_dataset`: real (tokens, position, state) inputs captured from the fp32 model
  over calibration text), with ai-edge-quantizer's profiler-based calibrator. Its ranges equal those of
  the preserve-all-tensors mode (checked to float precision) at about a third of the time.
- `static_recipe` / `quantize`: the chosen groups get static int8 activations and int8 weights; every
  other weight gets dynamic-range int8 (as recipe `int8`).

What `w8a8` quantises statically was decided by a per-group sensitivity study on the shipped model
(`SENSITIVITY`, notes/tflite.md): one group static int8 at a time, the rest float32, 512 held-out tokens.
"""

from __future__ import annotations

import collections
import dataclasses
import os
import re
from collections.abc import Iterable, Sequence
from typing import Any

import numpy as np

from rgexport.backends.tflite.export import Dataset
from rgexport.errors import RgexportError
from rgexport.graphs import input_name
from rgexport.model import Griffin, identifier

# Group kinds. `positions` (masks, rotary angles, resets, ring-buffer slots) never holds activations.
KINDS = ("embed", "positions", "norm", "recurrent_proj", "conv1d", "rglru_gates", "rglru", "attention_proj",
         "rope", "attention", "mlp", "residual", "head", "softcap")

# The w8a8 decision. Static int8 activations (and int8 weights) for the groups that carry weights and
# cost little alone; everything else keeps float32 activations (weights there are dynamic-range int8).
W8A8_STATIC_KINDS = ("recurrent_proj", "rglru_gates", "attention_proj", "mlp")
W8A8_FLOAT_KINDS = {
    "attention": "scores, mask, softmax and the ring-buffer write: the score tensor carries the -30000 "
                 "additive mask, so its int8 step is ~118 and the scores are wiped out (alone: 90.4% top-1, "
                 "perplexity x1.063, KL 0.054)",
    "rglru": "the RG-LRU recurrence and its state: cheap alone (KL <= 4.3e-4) but no weights, and with the "
             "other elementwise groups it doubles the error (KL 0.0038 -> 0.0067, top-1 97.5% -> 95.1%; "
             "94.1% vs 96.4% over 2048 tokens) at no speed gain",
    "conv1d": "elementwise on the Conv1D state: no weights; part of the elementwise set above",
    "norm": "RMSNorm: no weights to shrink; part of the elementwise set above",
    "residual": "the residual stream: no weights; part of the elementwise set above",
    "rope": "rotary embedding: no weights; part of the elementwise set above",
    "softcap": "the logits' soft-cap (tanh): int8 logits over +-30 alone cost 2.9% top-1 (KL 0.0017)",
    "head": "output projection: dynamic int8 (float logits); static alone 98.4% top-1, and with the w8a8 "
            "set it raised the perplexity ratio 1.0043 -> 1.0059 at no size or speed gain",
    "embed": "EMBEDDING_LOOKUP has no static int8 kernel in ai-edge-quantizer 0.10: dynamic int8 weights",
    "positions": "position arithmetic (masks, rotary angles): no activations",
}
W8A8_RANGE_UPDATE = "min_max"

# Sensitivity of the shipped tiny model (rgexport/assets/tiny): one group with static int8 activations and
# int8 weights, everything else float32; 512 held-out tokens, prefill chunk 32 then decode, against eager
# fp32: (top-1 agreement, perplexity ratio, mean KL). Calibration: 256 decode + 48 prefill samples,
# min/max ranges. Per-channel weights except BATCH_MATMUL (per tensor, see STATIC_WEIGHT_GRANULARITY).
SENSITIVITY: dict[str, tuple[float, float, float]] = {
    "int8 (dynamic, for scale)": (0.9961, 1.0003, 3.4e-4),
    "attention.2": (0.9043, 1.0631, 0.054), "attention.5": (0.9453, 1.0143, 0.018),
    "attention_proj.2": (0.9961, 1.0001, 4.0e-5), "attention_proj.5": (0.9961, 1.0004, 1.8e-5),
    "conv1d.0": (0.9922, 1.0000, 9.4e-5), "conv1d.1": (0.9941, 1.0004, 4.9e-5),
    "conv1d.3": (0.9941, 1.0003, 8.7e-5), "conv1d.4": (0.9941, 0.9999, 3.0e-5),
    "head": (0.9844, 1.0027, 4.4e-4),
    "mlp.0": (0.9883, 0.9982, 9.3e-4), "mlp.1": (0.9902, 0.9997, 3.8e-4), "mlp.2": (0.9980, 1.0005, 1.3e-4),
    "mlp.3": (0.9922, 1.0011, 1.3e-4), "mlp.4": (0.9961, 1.0006, 1.4e-4), "mlp.5": (0.9961, 0.9994, 1.1e-4),
    "norm.0": (0.9902, 1.0006, 1.9e-4), "norm.1": (0.9922, 1.0003, 1.3e-4), "norm.2": (0.9941, 0.9989, 8.4e-5),
    "norm.3": (0.9980, 1.0004, 7.8e-5), "norm.4": (0.9941, 0.9997, 6.4e-5), "norm.5": (0.9941, 1.0005, 5.8e-5),
    "norm.final": (0.9941, 0.9997, 2.3e-4),
    "recurrent_proj.0": (0.9844, 1.0021, 5.7e-4), "recurrent_proj.1": (0.9941, 0.9966, 5.0e-4),
    "recurrent_proj.3": (0.9941, 1.0007, 2.4e-4), "recurrent_proj.4": (0.9980, 1.0012, 1.4e-4),
    "residual.0": (0.9902, 1.0003, 3.8e-4), "residual.1": (0.9863, 1.0012, 4.6e-4),
    "residual.2": (0.9883, 1.0021, 3.2e-4), "residual.3": (0.9980, 1.0000, 2.5e-4),
    "residual.4": (0.9863, 1.0001, 2.5e-4), "residual.5": (0.9766, 1.0003, 3.1e-4),
    "rglru.0": (0.9844, 1.0014, 2.4e-4), "rglru.1": (0.9902, 0.9997, 2.4e-4), "rglru.3": (0.9961, 1.0009, 2.4e-4),
    "rglru.4": (0.9980, 0.9991, 4.3e-4),
    "rglru_gates.0": (1.0000, 0.9997, 4.5e-6), "rglru_gates.1": (0.9961, 0.9999, 3.0e-6),
    "rglru_gates.3": (0.9980, 1.0002, 8.2e-6), "rglru_gates.4": (0.9980, 0.9999, 6.9e-6),
    "rope.2": (0.9941, 1.0009, 4.0e-5), "rope.5": (1.0000, 0.9997, 1.3e-5),
    "softcap": (0.9707, 1.0028, 1.7e-3),
}

# Per-tensor weights for BATCH_MATMUL (the RG-LRU gates' [heads, b, b] blocks): ai-edge-quantizer 0.10
# writes 64 per-channel scales for it and LiteRT 2.3's int8 BATCH_MATMUL (builtin and XNNPACK alike) then
# computes wrong gates: 93.6% top-1 with only block 0's gate matmuls static; per tensor, 100%.
STATIC_WEIGHT_GRANULARITY = {"FULLY_CONNECTED": "CHANNELWISE", "BATCH_MATMUL": "TENSORWISE"}
QSV_UPDATES = ("min_max", "moving_average")  # how per-sample ranges merge (see `calibrate`)

_BLOCK = re.compile(r"\.ResidualBlock_(\d+)(?:/|$)")
_STATE_OUT = re.compile(r"^(?:decode|prefill)_new_state__blocks__(\d+)__(rg_lru|conv1d|keys|values)_output")
_TYPE_NAMES = {0: "float32", 1: "float16", 2: "int32", 3: "uint8", 4: "int64", 6: "bool", 7: "int16", 9: "int8"}


@dataclasses.dataclass(frozen=True)
class Op:
    subgraph: str  # signature subgraph name
    index: int  # operator index in that subgraph
    op_type: str  # builtin name, e.g. FULLY_CONNECTED
    scope: str  # ai-edge-quantizer's scope (output tensor names), which recipes match
    group: str  # e.g. "mlp.3", "positions"
    touches_output: bool  # produces or reads a tensor that is a signature output
    inputs: tuple[str, ...]  # tensor types ("float32", "int8", ...), absent optional inputs left out
    outputs: tuple[str, ...]

    @property
    def kind(self) -> str:
        return self.group.split(".")[0]


def _first_location(scope: str) -> str:
    return scope.split(";", 1)[0]


def _classify(op_type: str, scope: str, seen_block: bool, position_only: bool) -> str:
    first = _first_location(scope)
    state = _STATE_OUT.match(first)
    if state:  # an op that writes a new state tensor (or, quantised, a copy of it)
        block, kind = state.groups()
        return {"rg_lru": "rglru", "conv1d": "conv1d"}.get(kind, "attention") + f".{block}"
    if "_logits_output" in first:  # the last op before the logits: a reshape or the cap's multiply
        return "head" if op_type in ("FULLY_CONNECTED", "RESHAPE") else "softcap"
    if position_only:
        return "positions"
    match = _BLOCK.search(first)
    if match is None:
        if "RMSNorm_final_norm" in first:
            return "norm.final"
        if not seen_block:
            return "embed"
        return "head" if op_type in ("FULLY_CONNECTED", "RESHAPE") else "softcap"
    block, inner = match.group(1), first[match.end():]
    if "RMSNorm_" in inner:
        kind = "norm"
    elif inner == "":
        kind = "residual"
    elif "MLPBlock_" in inner:
        kind = "mlp"
    elif "LocalAttentionBlock_" in inner:
        if "RotaryEmbedding_" in inner:
            kind = "rope"
        elif op_type == "FULLY_CONNECTED" or "Linear_proj_" in inner:
            kind = "attention_proj"
        else:
            kind = "attention"
    elif "RecurrentBlock_" in inner:
        if "Conv1D_" in inner:
            kind = "conv1d"
        elif "BlockDiagonalLinear_" in inner or (op_type == "LOGISTIC" and "RGLRU_" in inner):
            kind = "rglru_gates"
        elif "RGLRU_" in inner:
            kind = "rglru"
        else:  # linear_x, linear_y, linear_out and the gelu(y) * x gate
            kind = "recurrent_proj"
    else:
        raise RgexportError(f"Cannot place the {op_type} op with scope {scope[:200]!r} in an op group")
    return f"{kind}.{block}"


def op_groups(flatbuffer: bytes) -> list[Op]:
    """Every operator of every signature subgraph, with its group and its tensor types."""
    from ai_edge_litert import schema_py_generated as schema
    from ai_edge_quantizer.utils import tfl_flatbuffer_utils as fu

    names = {v: k for k, v in vars(schema.BuiltinOperator).items() if not k.startswith("_")}
    model = fu.read_model(bytearray(flatbuffer))
    out = []
    for sg in model.subgraphs:
        sg_name = (sg.name or b"").decode()
        position = [i for i in sg.inputs if fu.get_tensor_name(sg.tensors[i]) == f"{sg_name}_position"]
        if len(position) != 1:
            raise RgexportError(f"Signature {sg_name} has no single position input to trace masks from")
        constant = {i for i, t in enumerate(sg.tensors)
                    if t.buffer > 0 and model.buffers[t.buffer].data is not None
                    and len(model.buffers[t.buffer].data) > 0}
        position_only = set(position) | constant
        outputs = {i for i in sg.outputs if i >= 0}
        seen_block = False
        for index, op in enumerate(sg.operators):
            code = model.operatorCodes[op.opcodeIndex]
            op_type = names.get(max(code.builtinCode, code.deprecatedBuiltinCode), "CUSTOM")
            scope = fu.get_op_scope(op, sg.tensors)
            ins = [i for i in op.inputs if i >= 0]
            outs = [o for o in op.outputs if o >= 0]
            from_position = bool(ins) and all(i in position_only for i in ins)
            if from_position:
                position_only.update(outs)
            group = _classify(op_type, scope, seen_block, from_position)
            seen_block = seen_block or _BLOCK.search(_first_location(scope)) is not None
            out.append(Op(sg_name, index, op_type, scope, group, bool(outputs & set(ins + outs)),
                          tuple(_TYPE_NAMES.get(sg.tensors[i].type, str(sg.tensors[i].type)) for i in ins),
                          tuple(_TYPE_NAMES.get(sg.tensors[o].type, str(sg.tensors[o].type)) for o in outs)))
    return out


def group_summary(ops: Iterable[Op]) -> dict[str, dict[str, int]]:
    """{group: {op type: count}}."""
    out: dict[str, collections.Counter[str]] = collections.defaultdict(collections.Counter)
    for op in ops:
        out[op.group][op.op_type] += 1
    return {g: dict(sorted(c.items())) for g, c in sorted(out.items())}


def integer_ops(ops: Iterable[Op]) -> dict[str, dict[str, dict[str, int]]]:
    """{signature: {kind: {op type: count}}} of compute ops that read an int8 activation (their first
    input; QUANTIZE/DEQUANTIZE and the embedding's token ids left out)."""
    out: dict[str, dict[str, collections.Counter[str]]] = collections.defaultdict(
        lambda: collections.defaultdict(collections.Counter))
    for op in ops:
        if op.op_type not in ("QUANTIZE", "DEQUANTIZE") and op.inputs and op.inputs[0] == "int8":
            out[op.subgraph][op.kind][op.op_type] += 1
    return {s: {k: dict(sorted(c.items())) for k, c in sorted(kinds.items())} for s, kinds in sorted(out.items())}


# Calibration and quantisation ----------------------------------------------------------------------
def calibrate(flatbuffer: bytes, dataset: dict[str, Sequence[dict[str, np.ndarray]]],
              update: str = W8A8_RANGE_UPDATE, num_threads: int | None = None) -> dict[str, Any]:
    """Runs every sample of `dataset` ({signature: [inputs by name]}) through the float model and returns
    the ranges (QSVs) of every tensor of those signatures.

    update: "min_max" keeps the extremes over all samples (w8a8 uses it); "moving_average" is
    ai-edge-quantizer's default (smoothing 0.95: the last ~20 samples of each signature dominate and
    the rest get clipped; on the shipped model, projections and MLPs static, top-1 fell from 95.9% to
    90.4% and the perplexity ratio rose from 1.0002 to 1.060; with the norms static too, 64% top-1).
    """
    from ai_edge_quantizer import calibrator, qtyping, recipe_manager
    from ai_edge_quantizer.utils import qsv_utils

    if update not in QSV_UPDATES:
        raise RgexportError(f"Calibration range update {update!r}, expected one of {QSV_UPDATES}")
    empty = [sig for sig, rows in dataset.items() if not rows]
    if empty or not dataset:
        raise RgexportError(f"The representative dataset has no samples for {empty or 'any signature'}")
    rm = recipe_manager.RecipeManager()
    rm.add_static_config(".*", qtyping.TFLOperationName.ALL_SUPPORTED, 8, 8)  # profiler mode ignores it
    func = qsv_utils.min_max_update if update == "min_max" else qsv_utils.moving_average_update
    calib = calibrator.Calibrator(bytes(flatbuffer), num_threads=num_threads or min(8, os.cpu_count() or 1),
                                  mode=calibrator.CalibrationMode.CALIBRATION_PROFILER_BASED,
                                  qsv_update_func=func)
    calib.calibrate(dataset, rm)
    return calib.get_model_qsvs()


def supports_static(op_type: str, activation_bits: int = 8) -> bool:
    """Whether ai-edge-quantizer has a static int`activation_bits` rule for this op type."""
    from ai_edge_quantizer import algorithm_manager, qtyping

    try:
        op = qtyping.TFLOperationName(op_type)
    except ValueError:
        return False
    config = qtyping.OpQuantizationConfig(
        activation_tensor_config=qtyping.TensorQuantizationConfig(
            num_bits=activation_bits, symmetric=activation_bits == 16),
        weight_tensor_config=qtyping.TensorQuantizationConfig(
            num_bits=8, symmetric=True,
            granularity=qtyping.QuantGranularity(STATIC_WEIGHT_GRANULARITY.get(op_type, "CHANNELWISE"))),
        compute_precision=qtyping.ComputePrecision.INTEGER,
        explicit_dequantize=False,
    )
    try:
        algorithm_manager.check_op_quantization_config(
            algorithm_manager.AlgorithmName.MIN_MAX_UNIFORM_QUANT, op, config)
    except ValueError:
        return False
    return True


def static_ops(ops: Sequence[Op], static_groups: Iterable[str], op_types: Iterable[str] | None = None,
               activation_bits: int = 8) -> list[Op]:
    """The ops of `static_groups` that `static_recipe` quantises statically.

    Ops that produce or read a signature output stay float: quantising one that reads an output (the
    decode step's `x * y` reads the new RG-LRU state) makes ai-edge-quantizer 0.10 list the quantised copy
    as the subgraph output while the signature keeps the float tensor, which the interpreter then never
    fills ("Tensor data is null"); quantising one that produces an output changes the output's dtype.
    """
    chosen = set(static_groups)
    types = set(op_types) if op_types is not None else None
    return [op for op in ops if op.group in chosen and not op.touches_output
            and (types is None or op.op_type in types) and supports_static(op.op_type, activation_bits)]


def static_recipe(ops: Sequence[Op], static_groups: Iterable[str], dynamic_rest: bool = True,
                  activation_bits: int = 8, op_types: Iterable[str] | None = None) -> list[dict[str, Any]]:
    """An ai-edge-quantizer recipe: `static_ops` get static int`activation_bits` activations and int8
    weights (STATIC_WEIGHT_GRANULARITY); with `dynamic_rest` every other weight gets dynamic-range int8
    per channel (recipe `int8`). Each rule matches its ops' scopes exactly."""
    from ai_edge_quantizer import qtyping, recipe_manager

    scopes: dict[str, list[str]] = collections.defaultdict(list)
    for op in static_ops(ops, static_groups, op_types, activation_bits):
        scopes[op.op_type].append(op.scope)
    rm = recipe_manager.RecipeManager()
    if dynamic_rest:
        rm.add_dynamic_config(regex=".*", operation_name=qtyping.TFLOperationName.ALL_SUPPORTED, num_bits=8,
                              granularity=qtyping.QuantGranularity.CHANNELWISE)
    for op_type, names in sorted(scopes.items()):  # later rules win over the catch-all above
        regex = "^(?:" + "|".join(re.escape(s) for s in names) + ")$"
        rm.add_static_config(regex, qtyping.TFLOperationName(op_type), activation_bits, 8,
                             qtyping.QuantGranularity(STATIC_WEIGHT_GRANULARITY.get(op_type, "CHANNELWISE")))
    return rm.get_quantization_recipe()


def quantize(flatbuffer: bytes, recipe: list[dict[str, Any]], qsvs: dict[str, Any] | None) -> bytes:
    from ai_edge_quantizer import quantizer

    qt = quantizer.Quantizer(bytearray(flatbuffer), recipe)
    if qt.need_calibration and qsvs is None:
        raise RgexportError("This recipe has static activations and needs calibration ranges")
    result = qt.quantize(qsvs if qt.need_calibration else None, enable_progress_bar=False,
                         enable_progress_report=False)
    return bytes(result.quantized_model)


def w8a8_groups(ops: Iterable[Op]) -> list[str]:
    return sorted({op.group for op in ops if op.kind in W8A8_STATIC_KINDS})



# Representative dataset of `w8a8`: at most this many samples per signature, spread over all positions
# of the calibration sequences (`calibrate.capture_samples`).
MAX_CALIBRATION_SAMPLES = {"decode": 256, "prefill": 64}

def representative_dataset(model: Griffin, sequences: Sequence[Sequence[int]], chunk: int) -> Dataset:
    """Real inputs of both signatures, by LiteRT input name: the (tokens, position, state) of calls
    along the fp32 trajectory over `sequences` (every decode step, every prefill chunk, spread evenly
    down to MAX_CALIBRATION_SAMPLES), so the ranges cover states past the attention window."""
    from rgexport.calibrate import capture_samples

    specs = model.state_spec(1)
    out: Dataset = {}
    for sig, t, first in (("decode", 1, "token"), ("prefill", chunk, "tokens")):
        rows = []
        for sample in capture_samples(model, [list(s) for s in sequences], chunk=t,
                                      max_samples=MAX_CALIBRATION_SAMPLES[sig]):
            tokens = sample.tokens.numpy().astype(np.int32)
            row = {first: tokens[0] if sig == "decode" else tokens,
                   "position": sample.position.numpy().astype(np.int32)}
            for spec in specs:
                row[identifier(input_name(spec))] = sample.state[spec.name].numpy().astype(np.float32)
            rows.append(row)
        if not rows:
            raise RgexportError(
                f"The calibration sequences ({[len(s) for s in sequences]} tokens) give no {sig} sample: "
                f"each needs at least {t} tokens"
            )
        out[sig] = rows
    return out
