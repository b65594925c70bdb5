"""Core ML recipes: fp16, and weight compression with coremltools.optimize (weight-only w8 and w4, 4-bit palettes),
and calibrated w8a8."""

from __future__ import annotations

import collections
import time
from typing import Any

import numpy as np

from rgexport.backends.base import BuildContext, Recipe
from rgexport.backends.coreml.calibration import _calibration_feeds
from rgexport.errors import RgexportError
from rgexport.model import TensorSpec


# Weight compression -----------------------------------------------------------------------------
def _compression_config(recipe: str) -> Any:
    from coremltools.optimize import coreml as cto

    if recipe == "w8":
        op = cto.OpLinearQuantizerConfig(mode="linear_symmetric", dtype="int8", granularity="per_channel")
    elif recipe == "w4":
        op = cto.OpLinearQuantizerConfig(
            mode="linear_symmetric", dtype="int4", granularity="per_block", block_size=32
        )
    elif recipe == "palette4":
        op = cto.OpPalettizerConfig(mode="kmeans", nbits=4, granularity="per_grouped_channel", group_size=16)
    else:
        return None
    return cto.OptimizationConfig(global_config=op)

def _compress(mlmodel: Any, recipe: str) -> Any:
    import warnings

    from coremltools.optimize import coreml as cto

    config = _compression_config(recipe)
    if config is None:
        return mlmodel
    zero_rows = _zero_rows(mlmodel)
    with warnings.catch_warnings():
        # coremltools' quantiser divides an all-zero block by its zero scale (0/0) and casts the NaN to
        # int; `_zero_scale_to_one` makes those blocks exact zeros again.
        warnings.filterwarnings("ignore", message="invalid value encountered in (divide|cast)")
        if recipe == "palette4":
            compressed = cto.palettize_weights(mlmodel, config)
        else:
            compressed = cto.linear_quantize_weights(mlmodel, config)
    if recipe == "palette4":
        return _replace_constexpr_ops(compressed, "constexpr_lut_to_dense",
                                      lambda op: _zero_row_in_palette(op, zero_rows))
    return _replace_constexpr_ops(compressed, "constexpr_blockwise_shift_scale", _zero_scale_to_one)

def _zero_rows(mlmodel: Any) -> dict[str, np.ndarray]:
    """All-zero rows of the 2-D float weights (an embedding's padding row), by const op name."""
    out = {}
    for f in mlmodel._mil_program.functions.values():
        for op in f.operations:
            value = op.outputs[0].val if op.op_type == "const" else None
            if isinstance(value, np.ndarray) and value.ndim == 2 and np.issubdtype(value.dtype, np.floating):
                zero = ~value.any(axis=1)
                if zero.any():
                    out[op.name] = zero
    return out

def _block_mask(block_values: np.ndarray, shape: tuple[int, ...]) -> np.ndarray:
    """Repeats a per-block array over the blocks of a tensor of `shape`."""
    for axis, (d, s) in enumerate(zip(shape, block_values.shape)):
        block_values = np.repeat(block_values, d // s, axis)
    return block_values

def _zero_scale_to_one(op: Any) -> dict[str, Any] | None:
    """Blocks with scale 0 (all-zero weights) -> scale 1 over zero data: still exact zeros, no 0 scale.

    A zero scale dequantises to zeros, but the quantised data under it is whatever NaN cast to int gave,
    and any runtime or tool that divides by the scale gets NaN.
    """
    zero = op.scale.val == 0
    if not zero.any():
        return None
    data = op.data.val.copy()  # a copy keeps coremltools' int4 dtype marker
    data[_block_mask(zero, data.shape)] = 0
    new = {"data": data, "scale": np.where(zero, np.ones_like(op.scale.val), op.scale.val)}
    if op.offset is not None:
        new["offset"] = op.offset.val
    return new

def _zero_row_in_palette(op: Any, zero_rows: dict[str, np.ndarray]) -> dict[str, Any] | None:
    """An all-zero row of a palettised weight -> exact zeros: the entry nearest 0 of each of its tables is
    set to 0 and the row points at it. Other weights on that entry move by less than the entry itself,
    a fraction of their own quantisation error (k-means puts an entry near the row's zeros)."""
    zero = zero_rows.get(op.name.removesuffix("_palettized"))
    lut = np.array(op.lut.val)
    if zero is None or lut.shape[-1] != 1:
        return None
    indices = op.indices.val.copy()  # keeps the uint4 dtype marker
    rows_per_table = indices.shape[0] // lut.shape[0]
    cols_per_table = indices.shape[1] // lut.shape[1]
    for row in np.flatnonzero(zero):
        for t1 in range(lut.shape[1]):
            table = lut[row // rows_per_table, t1, :, 0]
            k = int(np.argmin(np.abs(table)))
            table[k] = 0.0
            indices[row, t1 * cols_per_table:(t1 + 1) * cols_per_table] = k
    return {"indices": indices, "lut": lut.astype(op.lut.val.dtype)}

def _replace_constexpr_ops(mlmodel: Any, op_type: str, rewrite: Any) -> Any:
    """Rebuilds each `op_type` op for which `rewrite(op)` returns new inputs; the model as is if none."""
    from coremltools.converters.mil.mil import Builder as mb
    from coremltools.converters.mil.mil.passes.graph_pass import AbstractGraphPass
    from coremltools.models.utils import _apply_graph_pass

    def targets(prog: Any) -> list[tuple[Any, Any, dict[str, Any]]]:
        found = []
        for f in prog.functions.values():
            for op in list(f.operations):
                new = rewrite(op) if op.op_type == op_type else None
                if new is not None:
                    found.append((f, op, new))
        return found

    if not targets(mlmodel._mil_program):
        return mlmodel  # nothing to rewrite: skip the spec -> program -> spec round trip

    class Rewrite(AbstractGraphPass):
        def apply(self, prog: Any) -> None:
            for f, op, new in targets(prog):
                with f:
                    var = getattr(mb, op_type)(**new, before_op=op, name=op.name + "_exact_zeros")
                f.replace_uses_of_var_after_op(anchor_op=op, old_var=op.outputs[0], new_var=var,
                                               force_replace=True)
                f.remove_ops([op])

    return _apply_graph_pass(mlmodel, Rewrite(), skip_model_load=True)

def _w8a8(mlmodel: Any, fn: str, samples: list[Any], specs: list[TensorSpec], stateful: bool,
          ctx: BuildContext) -> Any:
    """int8 weights (as recipe w8), then int8 activations around the ops of W8A8_GROUPS: ranges from the
    interpreter running the weight-quantised program on the samples, pairs inserted by coremltools."""
    from rgexport.backends.coreml import calibration as cal
    from rgexport.backends.coreml.mil_interpreter import Program

    groups = cal.op_groups(mlmodel)  # before any save: the module scopes live on the converted program
    chosen = [name for name, group in groups.items() if group in cal.W8A8_GROUPS]
    mlmodel = _compress(mlmodel, "w8")
    start = time.perf_counter()
    program = Program(mlmodel.get_spec(), mlmodel.weights_dir)
    stats = cal.activation_ranges(program, "main", _calibration_feeds(samples, fn, specs, stateful))
    calibrate_s = time.perf_counter() - start
    names = {o.name for o in program.functions["main"].ops}
    missing = [n for n in chosen if n not in names]
    if missing:
        raise RgexportError(f"Core ML {fn}: ops {missing[:3]} lost their names in weight compression")
    quantized = cal.quantize_activations(mlmodel, chosen, stats)
    counts = cal.quantized_op_counts(Program(quantized.get_spec(), quantized.weights_dir), "main")
    if not counts.get("quantize"):
        raise RgexportError(f"Core ML {fn}: coremltools inserted no quantize op for w8a8")
    facts = ctx.facts.setdefault("coreml_w8a8", {})
    facts.setdefault("groups_int8", list(cal.W8A8_GROUPS))
    facts.setdefault("groups_float", dict(cal.FLOAT_GROUPS))
    facts.setdefault("functions", {})[fn] = {
        "ops_by_group": dict(sorted(collections.Counter(groups.values()).items())),
        "ops_int8": len(chosen),
        "program_ops": counts,
        "calibration_seconds": round(calibrate_s, 2),
    }
    return quantized

# Backend ----------------------------------------------------------------------------------------
RECIPES = {
    "fp16": Recipe("fp16", "fp16 weights and compute; positions and the RG-LRU in float32"),
    "w8": Recipe("w8", "weight-only int8: int8 weights per output channel (linear_quantize_weights), fp16 "
                 "compute",
                   quantized=True),
    "w4": Recipe("w4", "weight-only int4: int4 weights in blocks of 32 input channels (iOS 18), fp16 compute",
                   quantized=True),
    "palette4": Recipe("palette4", "4-bit k-means palettised weights, a 16-entry table per 16 output "
                       "channels, fp16 compute", quantized=True),
    "w8a8": Recipe(
        "w8a8",
        "int8 weights per output channel and int8 activations (quantize/dequantize pairs, symmetric, per "
        "tensor) around every linear layer, for the Neural Engine; ranges calibrated by running the "
        "program on (tokens, position, state) samples captured from the fp32 model over calibration "
        "text. Float (fp16, with the float32 islands): the attention scores and mask, the RG-LRU "
        "recurrence, the Conv1D, the state writes, the residual stream and the rest of the "
        "elementwise ops, chosen by a per-group sensitivity study on the shipped model",
        quantized=True, calibrated=True),
}
