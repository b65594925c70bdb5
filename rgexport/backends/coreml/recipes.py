"""Core ML recipes: fp16, and weight compression with coremltools.optimize (weight-only w8 and w4, 4-bit palettes),
and calibrated w8a8."""

from __future__ import annotations

import collections
import contextlib
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

def _zero_blocks_exact(data: np.ndarray, scale: np.ndarray) -> tuple[np.ndarray, np.ndarray] | None:
    """Blocks with scale 0 (all-zero weights) -> scale 1 over zero data: still exact zeros, no 0 scale; None
    where no scale is 0.

    A zero scale dequantises to zeros, but the quantised data under it is whatever NaN cast to int gave,
    and any runtime or tool that divides by the scale gets NaN.
    """
    zero = scale == 0
    if not zero.any():
        return None
    data = data.copy()  # a copy keeps coremltools' int4 dtype marker
    data[_block_mask(zero, data.shape)] = 0
    return data, np.where(zero, np.ones_like(scale), scale)

def _zero_scale_to_one(op: Any) -> dict[str, Any] | None:
    """`_zero_blocks_exact` on a `constexpr_blockwise_shift_scale` op: its new inputs, or None."""
    fixed = _zero_blocks_exact(op.data.val, op.scale.val)
    if fixed is None:
        return None
    new = {"data": fixed[0], "scale": fixed[1]}
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


# coremltools' arithmetic, in PyTorch --------------------------------------------------------------
def blockwise_compress(value: np.ndarray, dtype: Any, mode: str, block_sizes: list[int]) -> Any:
    """coremltools' `linear_quantize_weights.blockwise_compress_by_dtype` on `value` cast to fp16 (what the
    fp16 program holds), with all-zero blocks made exact zeros over scale 1 (`_zero_scale_to_one`): a
    QuantParams. The symmetric signed case (recipes w8 and w4) runs coremltools' steps in PyTorch's fp16
    arithmetic (each op rounds its result to fp16, as numpy's fp16 ops do; max, round-half-even and clip as
    in numpy), about ten times faster than numpy's scalar fp16 loops (150 s for 2B's weights); the
    result is the same (tests compare). Other modes run coremltools' own function. None where coremltools
    cannot compress the shape."""
    import torch
    from coremltools.converters.mil.mil import types
    from coremltools.optimize import _utils as cto_utils
    from coremltools.optimize.coreml._quantization_passes import linear_quantize_weights

    if isinstance(dtype, str):
        dtype = types.string_to_builtin(dtype)
    # Rounded to fp16 by PyTorch's conversion: numpy's rounding (round to nearest even), about 10x faster.
    value = torch.from_numpy(np.ascontiguousarray(value)).to(torch.float16).numpy()
    if mode != "LINEAR_SYMMETRIC" or not types.is_int(dtype) or dtype.is_unsigned():
        params = linear_quantize_weights.blockwise_compress_by_dtype(value, dtype, mode, block_sizes)
    else:
        new_shape, scale_shape, keep = [], [], []
        for d, b in zip(value.shape, block_sizes):
            if b > 0:
                if d % b:
                    return None
                keep.append(len(new_shape))
                new_shape += [d // b, b]
                scale_shape.append(d // b)
            else:
                new_shape.append(d)
                scale_shape.append(1)
        axes = tuple(a for a in range(len(new_shape)) if a not in keep)
        q_min, q_max = cto_utils.get_quant_range_by_dtype(dtype, mode)
        w = torch.from_numpy(value.reshape(new_shape))
        # The extremes of the fp16 values found in float32 (exact; PyTorch's fp16 min and max are 10x slower).
        wf = w.float()
        max_abs = torch.maximum(wf.amin(dim=axes, keepdim=True).abs(), wf.amax(dim=axes, keepdim=True).abs()).half()
        del wf
        scale = (max_abs - (-max_abs)) / (q_max - q_min)
        data = torch.clamp(torch.round(w / scale), q_min, q_max)
        np_dtype = types.nptype_from_builtin(dtype)
        out = np.empty(value.shape, dtype=np_dtype)  # coremltools' dtype: int8 carrying its int4 marker
        out[...] = data.reshape(value.shape).to(torch.int8).numpy()
        data = out
        params = cto_utils.QuantParams(data=data, scale=scale.numpy().reshape(scale_shape), offset=None,
                                       nbits=np.uint8(dtype.get_bitwidth()))
    if params is None:
        return None
    fixed = _zero_blocks_exact(params.data, params.scale)
    return params if fixed is None else params._replace(data=fixed[0], scale=fixed[1])


def row_slices(shape: tuple[int, ...], first_block: int, elements: int = 1 << 24) -> list[tuple[int, int]]:
    """Slices of the first axis of about `elements` each, whole blocks of `first_block` rows (0: the whole axis
    is one block, so one slice)."""
    rows = max(1, first_block) * max(1, elements // max(1, int(np.prod(shape[1:]))) // max(1, first_block))
    if first_block == 0 or rows >= shape[0]:
        return [(0, shape[0])]
    return [(i, min(shape[0], i + rows)) for i in range(0, shape[0], rows)]


def _part_of(name: str) -> tuple[str, int | None, str]:
    """"model.blocks.3.mlp_block.ffw_up.weight" -> ("block", 3, "mlp_block.ffw_up.weight");
    "model.embedder.input_embedding" -> ("embedder", None, "input_embedding"): which streamed part holds a
    parameter named as the stand-in's MIL consts are, and its name within the part."""
    head, _, rest = name.removeprefix("model.").partition(".")
    if head == "embedder":
        return "embedder", None, rest
    if head == "blocks":
        index, _, attr = rest.partition(".")
        return "block", int(index), attr
    raise RgexportError(f"Core ML: no streamed part holds {name}")


# The own quantised model -----------------------------------------------------------------------
def block_sizes_by_part(blocks: dict[str, list[int]]) -> dict[str, list[int]]:
    """{"model.blocks.3.mlp_block.ffw_up.weight": [1, 32], ...} -> {"block:mlp_block.ffw_up.weight": [1, 32]}:
    the block sizes coremltools gave each compressed weight, by part kind and name within the part (the form
    `quantise_part` meets them in). Blocks that disagree for one name are an error."""
    out: dict[str, list[int]] = {}
    for name, sizes in blocks.items():
        kind, _, attr = _part_of(name)
        key = f"{kind}:{attr}"
        if out.setdefault(key, sizes) != sizes:
            raise RgexportError(f"Core ML: {key} has blocks {out[key]} and {sizes} in different blocks")
    return out


def compressed_block_sizes(mlmodel: Any, parameter_names: list[str]) -> dict[str, list[int]]:
    """The block sizes of every `constexpr_blockwise_shift_scale` of a converted program, by parameter name
    ("model." + name; the op is named after the parameter, dots as underscores, plus the suffixes of a
    whole-model compression, `_to_fp16_quantized[_exact_zeros]`, or of a streamed one, `_quantized_cast_fp16`)."""
    by_op = {"model_" + n.replace(".", "_"): "model." + n for n in parameter_names}
    out = {}
    for f in mlmodel._mil_program.functions.values():
        for op in f.operations:
            if op.op_type == "constexpr_blockwise_shift_scale":
                base = op.name
                for suffix in ("_exact_zeros", "_cast_fp16", "_quantized", "_to_fp16"):
                    base = base.removesuffix(suffix)
                if base in by_op:
                    out[by_op[base]] = [int(d // s) for d, s in zip(op.data.shape, op.scale.shape)]
    return out


def dequantise_(weight: Any, recipe: str, blocks: list[int]) -> None:
    """Sets `weight` (a float32 tensor, in place, a slice of rows at a time: the 2.6 GB table of 2B gets no
    second copy) to what the package holds after `recipe` compressed it in blocks of `blocks`: coremltools'
    arithmetic on its fp16 value, all-zero blocks exact zeros, dequantised to fp16 values (what a
    `constexpr_blockwise_shift_scale` gives the program)."""
    import torch

    from rgexport.backends.coreml.mil_interpreter import TensorType, _blockwise_shift_scale, _round

    op_config = _compression_config(recipe).global_config
    value = weight.detach().numpy()
    for i, j in row_slices(value.shape, blocks[0]):
        params = blockwise_compress(value[i:j], op_config.dtype, op_config.mode, blocks)
        if params is None:
            raise RgexportError(f"Core ML {recipe}: coremltools cannot compress a {value.shape} weight in blocks "
                                f"of {blocks}")
        scale, data = params.scale, params.data
        # Rounded to fp16 as the interpreter rounds (PyTorch's conversion above 16K elements: numpy's rounding,
        # faster; numpy's own took 22 s of the own model's 40 at 2B).
        dense = _round(_blockwise_shift_scale(data, scale, params.offset), TensorType(np.float16, ()))
        with torch.no_grad():
            weight[i:j] = torch.from_numpy(dense)


# Compression from a stream ----------------------------------------------------------------------
# A model above 2 GiB of float32 weights (or option stream_weights=true) is converted from a stand-in whose
# large weights are untouched zero pages (`export.placeholder_model`): the frontend only reads them, and a pass
# at the head of coremltools' default pipeline (`rgexport::stream_compress`) gives each its real value, read
# from the checkpoint a part at a time, and compresses it at once with coremltools' own pass
# (`linear_quantize_weights`: its choice of weights, block sizes and arithmetic), so the float model is never
# whole and no fp16 copy of a weight is made. The results are kept by name: the second function (prefill)
# takes the first's compressed weights instead of reading the checkpoint again, and the multifunction package
# stores them once. Where coremltools does not compress a weight (too small, or no channel axis), the real
# value stays a float const, as in a whole-model conversion.
STREAMED_RECIPES = ("w8", "w4")


class StreamedWeights:
    """The real values of a stand-in model's weights, by MIL const name ("model." + parameter name), read from
    a `StreamedCheckpoint` one part (embedding, block) at a time; and what each became once compressed."""

    def __init__(self, stream: Any, names: set[str]):
        self.stream = stream
        self.names = names  # the stand-ins: parameter names, "model." + name
        self.compressed: dict[str, Any] = {}  # name -> coremltools QuantParams
        self.read: set[str] = set()
        self.reads = 0  # parts read from the stream
        self._key: tuple[str, int | None] | None = None
        self._part: Any = None

    def value(self, name: str) -> np.ndarray:
        """The float32 value of the weight named `name` (a view of the part in hand)."""
        kind, index, attr = _part_of(name)
        key = (kind, index)
        if key != self._key:
            self._part = None  # the previous part goes before the next is read
            self._part = self.stream.embedder() if key[0] == "embedder" else self.stream.block(key[1])
            self._key = key
            self.reads += 1
        self.read.add(name)
        return self._part.get_parameter(attr).detach().numpy()

    def release(self) -> None:
        self._part = self._key = None


_ACTIVE: list[tuple[StreamedWeights, Any]] = []  # the conversion in progress: (weights, OptimizationConfig)


def _streamed_compressor() -> Any:
    """The `rgexport::stream_compress` pass (registered with coremltools on first use)."""
    from coremltools.converters.mil.mil import Builder as mb
    from coremltools.converters.mil.mil.passes.graph_pass import AbstractGraphPass
    from coremltools.converters.mil.mil.passes.pass_registry import PASS_REGISTRY, register_pass
    from coremltools.optimize.coreml._quantization_passes import linear_quantize_weights

    if "rgexport::stream_compress" in PASS_REGISTRY:
        return PASS_REGISTRY["rgexport::stream_compress"]

    class Compress(linear_quantize_weights):
        def __init__(self, weights: StreamedWeights, config: Any):
            super().__init__(config)
            self.weights, self._name = weights, None

        def is_valid_op(self, op: Any) -> bool:
            return op.op_type == "const" and op.name in self.weights.names

        def transform_op(self, op: Any) -> None:
            name, block = op.name, op.enclosing_block
            done = self.weights.compressed.get(name)
            if done is not None:  # the first function's result: the same arrays, nothing read again
                new = self._create_constexpr_var(op, done)
                block.replace_uses_of_var_after_op(anchor_op=op, old_var=op.outputs[0], new_var=new,
                                                   no_check_var_types=True)
                block.remove_ops([op])
                return
            with block:
                real = mb.const(val=self.weights.value(name), before_op=op, name=name)
            block.replace_uses_of_var_after_op(anchor_op=op, old_var=op.outputs[0], new_var=real)
            block.remove_ops([op])
            self._name = name
            super().transform_op(real.op)  # leaves the real const where coremltools does not compress

        def blockwise_compress_by_dtype(self, original_data: Any, dtype: Any, mode: str, block_sizes: Any) -> Any:
            """coremltools' arithmetic on the weight as the fp16 program holds it (a whole-model conversion
            compresses after the fp16 cast), over slices of rows; the scale returned in float32 (exact), which
            the fp16 pass casts back, so the package holds what the whole-model path writes."""
            parts = [blockwise_compress(original_data[i:j], dtype, mode, block_sizes)
                     for i, j in row_slices(original_data.shape, block_sizes[0])]
            if any(p is None for p in parts):
                return None
            first = parts[0]

            def joined(arrays: list[np.ndarray]) -> np.ndarray:
                # filled in place: np.concatenate drops the dtype's metadata, coremltools' int4 marker
                out = np.empty((sum(a.shape[0] for a in arrays), *arrays[0].shape[1:]), dtype=arrays[0].dtype)
                np.concatenate(arrays, out=out)
                return out

            data = joined([p.data for p in parts]) if len(parts) > 1 else first.data
            scale = joined([p.scale for p in parts]) if len(parts) > 1 else first.scale
            offset = None if first.offset is None else joined([p.offset for p in parts])
            params = first._replace(data=data, scale=scale.astype(np.float32), offset=offset)
            self.weights.compressed[self._name] = params
            return params

    @register_pass(namespace="rgexport")
    class stream_compress(AbstractGraphPass):  # coremltools names a pass after its class
        def apply(self, prog: Any) -> None:
            weights, config = _ACTIVE[-1]
            Compress(weights, config).apply(prog)

    return PASS_REGISTRY["rgexport::stream_compress"]


def streamed_pipeline(weights: StreamedWeights, recipe: str) -> tuple[Any, Any]:
    """(pass pipeline, context manager) for a `ct.convert` that compresses `weights` as it goes."""
    import coremltools as ct

    _streamed_compressor()
    pipeline = ct.PassPipeline.DEFAULT
    pipeline.insert_pass(0, "rgexport::stream_compress")

    @contextlib.contextmanager
    def active() -> Any:
        _ACTIVE.append((weights, _compression_config(recipe)))
        try:
            yield
        finally:
            _ACTIVE.pop()

    return pipeline, active()
