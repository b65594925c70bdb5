"""Graph passes on exported ONNX models: tidying, the tied output head, and each recipe's precision.

The passes work on `ModelProto`s from `torch.onnx.export(dynamo=True)` (static shapes, a value_info entry
for every intermediate tensor). Only `onnx` and, for int8/int4, `onnxruntime.quantization` are needed;
both are imported inside the functions. What `OnnxBackend.lower` does per recipe:
- fp32: `tie_head_as_gemm`: the output head reads the tied embedding through `Gemm(transB=1)`.
- fp16: the same, then `to_fp16`: weights and activations in float16 except the RG-LRU, the RMSNorms and
  the position arithmetic; graph inputs and outputs stay float32, so the I/O contract does not change.
- int8: `quantize_int8`: dynamic int8 as ONNX Runtime's `quantize_dynamic` writes it (uint8 weights per tensor,
  uint8 activations per call), a tensor at a time, with the tied head as `QGemm` over the 8-bit table.
- int4: `quantize_int4`: `MatMulNBits` (4-bit, block 32, symmetric) for every 2-D MatMul, the head
  included, and `GatherBlockQuantized` for the embedding.
- w8a8: `quantize_w8a8`: static QDQ int8 (calibrated activations) on the MatMul/Gemm of the groups in
  `W8A8_GROUPS` (`qdq_groups` names each node's group from the exporter's module metadata); everything else
  stays float.
"""

from __future__ import annotations

import contextlib
import copy
import io
import logging
import tempfile
from collections import defaultdict
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

from rgexport.backends.base import Recipe
from rgexport.backends.onnx.export import (
    EXTERNAL_MIN_BYTES,
    _external_info,
    append_aligned,
    offload_initializers,
    point_external,
)
from rgexport.errors import RgexportError

# Node metadata the torch exporter writes: which nn.Module classes a node came from.
_CLASS_HIERARCHY = "pkg.torch.onnx.class_hierarchy"
# Modules kept in float32 by the fp16 recipe: the recurrence (h = a * h + x over many steps) and RMSNorm
# (mean of x * x, which overflows float16 once |x| > 256).
FP32_MODULES = ("rgexport.model.layers.RGLRU", "rgexport.model.layers.RMSNorm")
INT4_BLOCK_SIZE = 32  # the int4 default (ONNX Runtime GenAI's too): finer scales than 128, which runs faster
# Block sizes `MatMulNBits` and `GatherBlockQuantized` take (powers of two from 16). At 2B shapes, M = 32 rows,
# 2 threads, level 4: 16 / 32 / 64 / 128 ran at 225 / 265 / 285 / 393 GFLOP/s (notes/onnx.md).
INT4_BLOCK_SIZES = (16, 32, 64, 128)
# Whole-model shape inference serialises the model: only below protobuf's limit.
_INFER_LIMIT = 1 << 30


# Small helpers -----------------------------------------------------------------------------------
def _onnx() -> Any:
    import onnx

    return onnx


def _consumers(graph) -> dict[str, list]:
    out: dict[str, list] = defaultdict(list)
    for node in graph.node:
        for name in node.input:
            out[name].append(node)
    return out


def _shape_of(graph, name: str) -> list[int] | None:
    for vi in (*graph.value_info, *graph.input, *graph.output):
        if vi.name == name:
            dims = vi.type.tensor_type.shape.dim
            if all(d.HasField("dim_value") for d in dims):
                return [d.dim_value for d in dims]
            return None
    return None


def _unique_name(taken: set[str], base: str) -> str:
    name, i = base, 1
    while name in taken:
        i += 1
        name = f"{base}_{i}"
    taken.add(name)
    return name


def _all_names(graph) -> set[str]:
    names = {i.name for i in graph.initializer} | {i.name for i in graph.input}
    for node in graph.node:
        names.update(node.output)
        names.add(node.name)
    return names


# Tidying ----------------------------------------------------------------------------------------
def drop_initializer_value_info(model) -> None:
    """Removes value_info entries that restate an initializer's shape (in place).

    onnx-ir, which writes the dynamo exporter's output, records every initializer's type and shape in
    `graph.value_info` as well as in the tensor itself. ONNX Runtime's dynamic quantiser rewrites
    `Gemm(transB=1)` as MatMul by transposing the weight initializer in place under the same name and
    leaves that value_info alone; its next shape inference then fails with "[ShapeInferenceError]
    Inferred shape and existing shape differ in dimension 0: (128) vs (192)" for a [192, 128] weight.
    The tensor's own dims are authoritative, so the copy can only ever go stale.
    """
    initializers = {i.name for i in model.graph.initializer}
    keep = [vi for vi in model.graph.value_info if vi.name not in initializers]
    del model.graph.value_info[:]
    model.graph.value_info.extend(keep)


def strip_debug_metadata(model) -> None:
    """Removes the exporter's per-node metadata (stack traces, FX nodes): about 40% of a small file."""
    for node in model.graph.node:
        del node.metadata_props[:]


def node_classes(node) -> str:
    for prop in node.metadata_props:
        if prop.key == _CLASS_HIERARCHY:
            return prop.value
    return ""


# The tied output head -----------------------------------------------------------------------------
def _transposes_a_table(node, inits: dict[str, Any]) -> bool:
    """Whether `node` is a Transpose of a 2-D initializer (no perm, or [1, 0])."""
    return (node.op_type == "Transpose" and node.input[0] in inits and len(inits[node.input[0]].dims) == 2
            and [list(a.ints) for a in node.attribute if a.name == "perm"] in ([[1, 0]], []))


def _only_matmul_weight(users: list, name: str) -> bool:
    """Whether `users` (every reader of tensor `name`) are MatMuls that take it as their right-hand side."""
    return bool(users) and all(u.op_type == "MatMul" and list(u.input).index(name) == 1 for u in users)


def _tied_heads(model) -> list[tuple[Any, list, Any]]:
    """(Transpose, its MatMul users, E) for each `MatMul(x, Transpose(E))` with E a 2-D initializer."""
    graph = model.graph
    inits = {i.name: i for i in graph.initializer}
    consumers = _consumers(graph)
    return [(node, consumers[node.output[0]], inits[node.input[0]]) for node in graph.node
            if _transposes_a_table(node, inits) and _only_matmul_weight(consumers[node.output[0]], node.output[0])]


def _flattened_matmul(graph, taken: set[str], source: str, source_type: int, y: str, y_shape: list[int],
                      width: int, vocab: int, name: str, tag: str) -> tuple[str, str, list]:
    """The Reshapes around a 2-D op standing for the head `y = x @ W` (x [..., width], y [..., vocab]):
    `source` (x or x quantised) flattened to [rows, width] and the op's [rows, vocab] result given `y`'s
    shape back. Adds the shape initializers and value_info -> (2-D input, 2-D output, [Reshape in, Reshape out])."""
    import numpy as np
    from onnx import TensorProto, helper, numpy_helper

    rows = int(np.prod(y_shape[:-1]))
    shape_in = _unique_name(taken, f"{y}_{tag}_in_shape")
    shape_out = _unique_name(taken, f"{y}_{tag}_out_shape")
    x2d, y2d = _unique_name(taken, f"{source}_2d"), _unique_name(taken, f"{y}_2d")
    graph.initializer.extend([numpy_helper.from_array(np.array([rows, width], np.int64), shape_in),
                              numpy_helper.from_array(np.array(y_shape, np.int64), shape_out)])
    graph.value_info.extend([helper.make_tensor_value_info(x2d, source_type, [rows, width]),
                             helper.make_tensor_value_info(y2d, TensorProto.FLOAT, [rows, vocab])])
    return x2d, y2d, [
        helper.make_node("Reshape", [source, shape_in], [x2d], name=_unique_name(taken, f"{name}_in")),
        helper.make_node("Reshape", [y2d, shape_out], [y], name=_unique_name(taken, f"{name}_out")),
    ]


def tie_head_as_gemm(model) -> int:
    """Rewrites `MatMul(x, Transpose(E))` as `Reshape -> Gemm(x2d, E, transB=1) -> Reshape` (in place).

    The exporter writes the tied head as a Transpose of the embedding; ONNX Runtime folds it into a
    transposed copy at session start and the ORT-format converter stores that copy, so every .ort file
    would carry the embedding twice. Gemm reads E transposed in place. Returns the number rewritten.
    Not for the int8 recipe: the dynamic quantiser turns Gemm(transB=1) back into MatMul by transposing
    E in place, which would break the embedding Gather that shares it.
    """
    from onnx import helper

    graph = model.graph
    taken = _all_names(graph)
    new_nodes: dict[int, list] = {}
    dead = set()
    for transpose, matmuls, emb in _tied_heads(model):
        shapes = [(_shape_of(graph, m.input[0]), _shape_of(graph, m.output[0])) for m in matmuls]
        if any(x is None or y is None for x, y in shapes):
            continue  # dynamic shapes: leave the MatMuls
        vocab, width = emb.dims
        for matmul, (_, y_shape) in zip(matmuls, shapes):
            x2d, y2d, (into, out) = _flattened_matmul(graph, taken, matmul.input[0], emb.data_type,
                                                      matmul.output[0], y_shape, width, vocab, matmul.name, "gemm")
            gemm = helper.make_node("Gemm", [x2d, emb.name], [y2d], name=_unique_name(taken, f"{matmul.name}_gemm"),
                                    transB=1)
            replacement = [into, gemm, out]
            for node in replacement:  # keep the provenance that the fp16 pass reads
                node.metadata_props.extend(matmul.metadata_props)
            new_nodes[id(matmul)] = replacement
        dead.add(id(transpose))
    if new_nodes:
        nodes = [n for node in graph.node if id(node) not in dead for n in new_nodes.get(id(node), [node])]
        del graph.node[:]
        graph.node.extend(nodes)
    return len(new_nodes)


# fp16 -------------------------------------------------------------------------------------------
# Ops whose float output dtype is set by an attribute rather than by their inputs.
_TYPED_BY_ATTRIBUTE = {"Cast": "to", "EyeLike": "dtype", "RandomNormal": "dtype", "RandomUniform": "dtype"}


def position_only_nodes(model, position_inputs: tuple[str, ...] = ("position",)) -> set[str]:
    """Names of nodes that depend on no graph input but the position (masks, rotary angles, resets).

    They run once per call on a handful of values, and they must stay float32: float16 holds integers
    exactly only up to 2048, and the mask and ring-buffer slot arithmetic works on positions as floats.
    """
    graph = model.graph
    activation = {i.name for i in graph.input if i.name not in position_inputs}
    out = set()
    for node in graph.node:
        if any(name in activation for name in node.input):
            activation.update(node.output)
        else:
            out.add(node.name)
    return out


def to_fp16(model, keep_fp32: Callable[[Any], bool] | None = None):
    """A float16 copy of `model`: float32 tensors become float16 except in nodes `keep_fp32` selects.

    Graph inputs and outputs keep float32 (Casts at the boundary); a Cast is inserted wherever a tensor
    crosses between the float16 and float32 regions; float32 initializers become float16 where float16
    nodes read them. The default `keep_fp32` keeps `FP32_MODULES` and the position arithmetic
    (`position_only_nodes`) in float32. It finds the modules through the exporter's class-hierarchy
    metadata; a model without that metadata is refused rather than converted whole, since the
    recurrence would then silently run in float16.
    """
    onnx = _onnx()
    import numpy as np
    from onnx import TensorProto, helper, numpy_helper

    FLOAT, HALF = TensorProto.FLOAT, TensorProto.FLOAT16
    if keep_fp32 is None:
        if not any(node_classes(n) for n in model.graph.node):
            raise RgexportError(
                "The fp16 recipe needs the exporter's node metadata (pkg.torch.onnx.class_hierarchy) to keep "
                "the RG-LRU recurrence in float32; this model has none (was it tidied before lowering?)"
            )
        positional = position_only_nodes(model)

        def keep_fp32(node) -> bool:
            classes = node_classes(node)
            return node.name in positional or any(m in classes for m in FP32_MODULES)

    model = copy.deepcopy(model)
    if model.ByteSize() < _INFER_LIMIT:
        model = onnx.shape_inference.infer_shapes(model)
    graph = model.graph
    taken = _all_names(graph)
    elem: dict[str, int] = {}
    for vi in (*graph.input, *graph.output, *graph.value_info):
        elem[vi.name] = vi.type.tensor_type.elem_type
    inits = {i.name: i for i in graph.initializer}
    for name, t in inits.items():
        elem[name] = t.data_type
    graph_outputs = {o.name for o in graph.output}

    actual: dict[str, int] = dict(elem)  # dtype of each tensor after conversion
    casts: dict[tuple[str, int], str] = {}
    half_inits: dict[str, str] = {}
    new_inits = []
    nodes = []

    def as_dtype(name: str, want: int) -> str:
        """`name`, or a tensor holding it converted to `want` (a converted initializer or a Cast)."""
        if not name or actual.get(name) not in (FLOAT, HALF) or actual[name] == want:
            return name
        if name in inits and want == HALF:
            if name not in half_inits:
                array = numpy_helper.to_array(inits[name])
                array = np.clip(array, -65504.0, 65504.0).astype(np.float16)
                new = _unique_name(taken, f"{name}_fp16")
                new_inits.append(numpy_helper.from_array(array, new))
                actual[new] = HALF
                half_inits[name] = new
            return half_inits[name]
        key = (name, want)
        if key not in casts:
            out = _unique_name(taken, f"{name}_{'fp16' if want == HALF else 'fp32'}")
            nodes.append(helper.make_node("Cast", [name], [out], to=want, name=_unique_name(taken, f"cast_{out}")))
            actual[out] = want
            casts[key] = out
        return casts[key]

    for node in graph.node:
        unknown = [o for o in node.output if o and o not in elem]
        if unknown:
            raise RgexportError(f"fp16: no dtype recorded for {unknown} (node {node.name}); run shape inference first")
        region = FLOAT if keep_fp32(node) else HALF
        if region == HALF:
            for i, name in enumerate(node.input):
                node.input[i] = as_dtype(name, HALF)
            for attr in node.attribute:
                if node.op_type in _TYPED_BY_ATTRIBUTE and attr.name == _TYPED_BY_ATTRIBUTE[node.op_type]:
                    if attr.i == FLOAT:
                        attr.i = HALF
                elif attr.type == onnx.AttributeProto.TENSOR and attr.t.data_type == FLOAT:
                    attr.t.CopyFrom(numpy_helper.from_array(
                        numpy_helper.to_array(attr.t).astype(np.float16), attr.t.name))
            for out in node.output:
                if elem.get(out) == FLOAT:
                    actual[out] = HALF
        else:
            for i, name in enumerate(node.input):
                node.input[i] = as_dtype(name, FLOAT)
        nodes.append(node)

    # Graph outputs keep float32: the producer writes a float16 tensor under a new name, a Cast restores it.
    renames = {}
    for name in graph_outputs:
        if elem.get(name) == FLOAT and actual.get(name) == HALF:
            renames[name] = _unique_name(taken, f"{name}_fp16")
    if renames:
        for node in nodes:
            for i, out in enumerate(node.output):
                if out in renames:
                    node.output[i] = renames[out]
            for i, inp in enumerate(node.input):
                if inp in renames:
                    node.input[i] = renames[inp]
        for name, new in renames.items():
            nodes.append(helper.make_node("Cast", [new], [name], to=FLOAT, name=_unique_name(taken, f"cast_{name}")))
            actual[new] = HALF
            actual[name] = FLOAT

    # Initializers no float32 node reads any more are dropped in favour of their float16 copies.
    still_read = {name for node in nodes for name in node.input}
    kept = [t for t in graph.initializer if t.name in still_read]
    del graph.initializer[:]
    graph.initializer.extend(kept + [t for t in new_inits if t.name in still_read])
    del graph.node[:]
    graph.node.extend(nodes)
    value_info = []
    for vi in graph.value_info:
        if vi.name in actual and vi.name in still_read | {o for n in nodes for o in n.output}:
            vi.type.tensor_type.elem_type = actual[vi.name]
            value_info.append(vi)
    for name, new in renames.items():
        vi = helper.make_tensor_value_info(new, HALF, _shape_of(graph, name))
        value_info.append(vi)
    del graph.value_info[:]
    graph.value_info.extend(value_info)
    return model


# int8 / int4 ----------------------------------------------------------------------------------------
@contextlib.contextmanager
def _quiet_quantizer_logs() -> Iterator[None]:
    """Silences the root-logger warning ORT's quantisers print on every call ("consider pre-processing")."""
    logger = logging.getLogger()
    level = logger.level
    logger.setLevel(logging.ERROR)
    try:
        yield
    finally:
        logger.setLevel(level)


def _float_slices(t, base_dir: str | Path | None, slice_bytes: int) -> Iterator[Any]:
    """A float32 initializer's values, flat, in order, `slice_bytes` at a time (read alone from its external
    file when it has one, so a 2.6 GB table is never whole in memory)."""
    import numpy as np
    from onnx import TensorProto, numpy_helper

    count = int(np.prod(t.dims)) if t.dims else 1
    step = max(1, slice_bytes // 4)
    if t.data_location != TensorProto.EXTERNAL:
        flat = np.frombuffer(t.raw_data, np.float32) if t.raw_data else numpy_helper.to_array(t).reshape(-1)
        for start in range(0, count, step):
            yield flat[start:start + step]
        return
    if base_dir is None:
        raise RgexportError(f"{t.name} is external data and no folder was given to read it from")
    info = _external_info(t)
    with open(Path(base_dir) / info["location"], "rb") as f:
        f.seek(int(info.get("offset", 0)))
        for start in range(0, count, step):
            yield np.frombuffer(f.read(4 * min(step, count - start)), np.float32)


def _quantized_8bit(t, name: str, base_dir: str | Path | None, signed: bool, slice_bytes: int = 64 << 20,
                    sink: Any = None):
    """`t` (float32) in 8 bits, per tensor, as ONNX Runtime's `quantize_dynamic` quantises a weight (its own
    `compute_data_quant_params` and `quantize_nparray`: uint8 asymmetric by default, int8 symmetric with
    `signed`), computed a slice at a time -> (data, scale, zero point) initializers named after `name`.
    With `sink` (a file open for writing in `base_dir`) each quantised slice is appended to it as it is made
    and the data initializer refers to it: neither the float nor the 8-bit tensor is ever whole in memory."""
    import numpy as np
    from onnx import TensorProto, helper, numpy_helper
    from onnxruntime.quantization.quant_utils import compute_data_quant_params, quantize_nparray

    qtype = TensorProto.INT8 if signed else TensorProto.UINT8
    rmin, rmax = np.float32(np.inf), np.float32(-np.inf)
    for part in _float_slices(t, base_dir, slice_bytes):
        rmin, rmax = min(rmin, part.min()), max(rmax, part.max())
    zero_point, scale = compute_data_quant_params(np.zeros(1, np.float32), qtype, signed,
                                                  rmin_override=rmin, rmax_override=rmax)
    count = int(np.prod(t.dims))
    if sink is not None:
        data = TensorProto(name=f"{name}_quantized", data_type=qtype, dims=list(t.dims))
        offset = None
        for part in _float_slices(t, base_dir, slice_bytes):
            raw = quantize_nparray(qtype, part, scale, zero_point).tobytes()
            if offset is None:
                offset = append_aligned(sink, raw)
            else:
                sink.write(raw)
        point_external(data, Path(sink.name).name, offset, count)
    else:
        values = np.empty(count, np.int8 if signed else np.uint8)
        at = 0
        for part in _float_slices(t, base_dir, slice_bytes):
            values[at:at + part.size] = quantize_nparray(qtype, part, scale, zero_point)
            at += part.size
        data = numpy_helper.from_array(values.reshape(tuple(t.dims)), f"{name}_quantized")
    return (data,
            helper.make_tensor(f"{name}_scale", TensorProto.FLOAT, [], scale.reshape(-1).tolist()),
            helper.make_tensor(f"{name}_zero_point", qtype, [], zero_point.reshape(-1).tolist()))


def quantize_int8(model, base_dir: str | Path | None = None, signed_weights: bool = False, slice_bytes: int = 64 << 20):
    """Dynamic int8: every MatMul weight and the embedding table in 8 bits (per tensor), activations quantised
    per call; returns a new model (`model` is left as it was).

    The graph is what ONNX Runtime's `quantize_dynamic` writes, and the weights are byte for byte its own
    (tested against it): `DynamicQuantizeLinear` of each MatMul input (once per input), then `MatMulInteger`,
    `Cast` and `Mul` by the product of the two scales, which ONNX Runtime fuses at load into
    `DynamicQuantizeMatMul` / `MatMulIntegerToFloat`; an embedding `Gather` reads the 8-bit table and
    dequantises its rows. Two differences: the tied head reads the 8-bit table in place through `QGemm`
    (`int8_head_as_qgemm`; `quantize_dynamic` transposes and dequantises the whole table on every call),
    and a Gather at a fixed index (a Conv1D tap too large to fold, 2B and up) stays float, as in int4.

    Done here rather than by `quantize_dynamic` because that loads every float weight and holds its
    quantised copies beside them: at RecurrentGemma-2B the build passed 21 GiB and was stopped. This reads
    one tensor at a time, `slice_bytes` of it at a time (from `base_dir` when the weights are external data:
    a streamed export) and, with `base_dir`, appends each 8-bit tensor to a file there as its slices are made.
    Raises if a whole-table dequantised head is left (a head whose shapes are not static).

    uint8 weights by default: with int8 weights and uint8 activations ONNX Runtime's x86 kernels use
    VPMADDUBSW, whose 16-bit pair sums saturate on CPUs without VNNI (AVX2): a random 128-192-128 MLP
    came out 0.19 off (of 0.65) instead of 0.007 with uint8 weights (FINDINGS.md: x86 int8 errors three
    times Arm's). Per tensor, not per channel: per-channel zero points fail at run time on the RG-LRU
    gates' 3-D weights ("b zero point is not valid").
    """
    import numpy as np
    from onnx import TensorProto, helper

    model = copy.deepcopy(model)  # with external weights: the graph only
    graph = model.graph
    inits = {t.name: t for t in graph.initializer}
    floats = {n for n, t in inits.items() if t.data_type == TensorProto.FLOAT and len(t.dims) >= 2}
    fixed = set(_fixed_index_gathers(model))
    consumers = _consumers(graph)
    for node in graph.node:
        if node.op_type in ("Gemm", "Conv") and any(i in floats for i in node.input[1:2]):
            raise RgexportError(f"int8: {node.op_type} node {node.name or node.output[0]} has a float weight; this "
                                "recipe quantises MatMul and Gather weights (the exporter writes linears as MatMul)")
    taken = _all_names(graph)
    quantized: dict[str, tuple[str, str, str]] = {}  # float weight -> its 8-bit data, scale, zero point
    # With a folder, each 8-bit tensor of at least EXTERNAL_MIN_BYTES goes into a file there as it is made (what
    # offload_initializers would do afterwards), so nothing large is left in memory to offload.
    sink = (tempfile.NamedTemporaryFile(dir=base_dir, prefix="lowered-", suffix=".bin", delete=False)
            if base_dir is not None else None)

    def weight(name: str) -> tuple[str, str, str]:
        if name not in quantized:
            t = inits[name]
            outside = sink is not None and int(np.prod(t.dims)) >= EXTERNAL_MIN_BYTES
            tensors = _quantized_8bit(t, name, base_dir, signed_weights, slice_bytes, sink if outside else None)
            for tensor in tensors:
                tensor.name = _unique_name(taken, tensor.name)
            graph.initializer.extend(tensors)
            quantized[name] = tuple(tensor.name for tensor in tensors)
        return quantized[name]

    activations: dict[str, tuple[str, str, str]] = {}  # MatMul input -> its DynamicQuantizeLinear outputs
    out_nodes: list = []

    def quantize_input(name: str) -> tuple[str, str, str]:
        if name not in activations:
            names = tuple(_unique_name(taken, f"{name}_{s}") for s in ("quantized", "scale", "zero_point"))
            out_nodes.append(helper.make_node("DynamicQuantizeLinear", [name], list(names),
                                              name=_unique_name(taken, f"{name}_QuantizeLinear")))
            activations[name] = names
        return activations[name]

    def dequantized(node, op: str, inputs: list[str], scale: str, zero: str, **attrs) -> list:
        """`op` on the 8-bit table, then DequantizeLinear into `node`'s output (a Gather, the head's Transpose)."""
        moved = _unique_name(taken, f"{node.output[0]}_quantized")
        return [helper.make_node(op, inputs, [moved], name=node.name, **attrs),
                helper.make_node("DequantizeLinear", [moved, scale, zero], list(node.output),
                                 name=_unique_name(taken, f"{node.output[0]}_DequantizeLinear"))]

    def replacement(node) -> list | None:
        op, ins = node.op_type, list(node.input)
        if op == "MatMul" and len(ins) == 2 and ins[1] in floats and ins[0] not in inits:
            q, scale, zero = weight(ins[1])
            a_q, a_scale, a_zero = quantize_input(ins[0])
            base = node.name or node.output[0]
            scales, product, cast = (_unique_name(taken, f"{base}_{s}") for s in ("scales", "integer", "float"))
            return [
                helper.make_node("Mul", [a_scale, scale], [scales], name=_unique_name(taken, f"{base}_scales")),
                helper.make_node("MatMulInteger", [a_q, q, a_zero, zero], [product],
                                 name=_unique_name(taken, f"{base}_MatMulInteger")),
                helper.make_node("Cast", [product], [cast], name=_unique_name(taken, f"{base}_Cast"),
                                 to=TensorProto.FLOAT),
                helper.make_node("Mul", [cast, scales], list(node.output), name=_unique_name(taken, f"{base}_Mul")),
            ]
        if op == "Gather" and ins[0] in floats and node.name not in fixed:
            q, scale, zero = weight(ins[0])
            axis = next((helper.get_attribute_value(a) for a in node.attribute if a.name == "axis"), 0)
            return dequantized(node, "Gather", [q, ins[1]], scale, zero, axis=axis)
        if (ins and ins[0] in floats and _transposes_a_table(node, inits)
                and _only_matmul_weight(consumers[node.output[0]], node.output[0])):
            q, scale, zero = weight(ins[0])  # the tied head: int8_head_as_qgemm below replaces this form
            return dequantized(node, "Transpose", [q], scale, zero, perm=[1, 0])
        return None

    with sink if sink is not None else contextlib.nullcontext():
        for node in list(graph.node):
            before = len(out_nodes)  # quantize_input may add a DynamicQuantizeLinear first
            new = replacement(node)
            if new is None:
                out_nodes.append(node)
                continue
            out_nodes += new
            for added in out_nodes[before:]:  # the provenance of the node each replaces
                if not added.metadata_props:
                    added.metadata_props.extend(node.metadata_props)
    del graph.node[:]
    graph.node.extend(out_nodes)
    used = {i for n in graph.node for i in n.input}
    kept = [t for t in graph.initializer if t.name in used or t.name not in quantized]
    del graph.initializer[:]
    graph.initializer.extend(kept)
    int8_head_as_qgemm(model)
    if dequantised_tied_heads(model):
        raise RgexportError("int8: the tied head was not rewritten as QGemm over the quantised table; "
                            "it would transpose and dequantise the whole table on every call")
    return model


def dequantised_tied_heads(model) -> list[tuple[Any, Any, list, Any]]:
    """(Transpose, DequantizeLinear, MatMul users, E_q) for each `MatMul(x, DequantizeLinear(Transpose(E_q)))`:
    the head `quantize_dynamic` leaves when the embedding Gather shares E (it quantises E once, then the head
    transposes and dequantises the whole table on every call)."""
    graph = model.graph
    inits = {i.name: i for i in graph.initializer}
    consumers = _consumers(graph)
    found = []
    for node in graph.node:
        users = consumers[node.output[0]]
        if not _transposes_a_table(node, inits) or len(users) != 1 or users[0].op_type != "DequantizeLinear":
            continue
        dq = users[0]
        if list(dq.input).index(node.output[0]) != 0 or any(i not in inits for i in dq.input[1:]):
            continue
        if any(inits[i].dims for i in dq.input[1:]):  # per-axis scales or zero points: not this pattern
            continue
        if _only_matmul_weight(consumers[dq.output[0]], dq.output[0]):
            found.append((node, dq, consumers[dq.output[0]], inits[node.input[0]]))
    return found


def int8_head_as_qgemm(model) -> int:
    """Rewrites the int8 head `MatMul(x, DequantizeLinear(Transpose(E_q)))` as an integer Gemm over E_q in
    place: `DynamicQuantizeLinear(x) -> Reshape -> QGemm(x_q, E_q, transB=1) -> Reshape` (in place).

    `quantize_dynamic` quantises the tied table once (the embedding Gather reads rows of it, then
    dequantises them), but leaves the head as Transpose + DequantizeLinear of the whole table and a float
    MatMul: every decode step copies the table twice, as uint8 and as float32 (3.3 GB at RecurrentGemma-2B).
    ONNX Runtime's `QGemm` (com.microsoft) reads E_q transposed in place and, without an output scale,
    returns float; the activations are quantised per call (uint8, per tensor) as every other matmul of
    the int8 recipe already does. Returns the number of heads rewritten.
    """
    from onnx import TensorProto, helper

    graph = model.graph
    taken = _all_names(graph)
    new_nodes: dict[int, list] = {}
    dead: set[int] = set()
    gone: set[str] = set()  # the table's transposed and dequantised copies
    for transpose, dq, matmuls, emb in dequantised_tied_heads(model):
        shapes = [(_shape_of(graph, m.input[0]), _shape_of(graph, m.output[0])) for m in matmuls]
        if any(x is None or y is None for x, y in shapes):
            continue  # dynamic shapes: leave the head as it is
        vocab, width = emb.dims
        scale, zero_point = dq.input[1], dq.input[2] if len(dq.input) > 2 else ""
        if not zero_point:
            raise RgexportError(f"{emb.name}: a dequantised head without a zero point; expected uint8 from "
                                "quantize_dynamic")
        for matmul, (_, y_shape) in zip(matmuls, shapes):
            x, y = matmul.input[0], matmul.output[0]
            name = matmul.name or y
            x_q, x_scale, x_zero = (_unique_name(taken, f"{x}_{s}") for s in ("quantized", "scale", "zero_point"))
            x2d, y2d, (into, out) = _flattened_matmul(graph, taken, x_q, TensorProto.UINT8, y, y_shape, width, vocab,
                                                      name, "qgemm")
            new_nodes[id(matmul)] = [
                helper.make_node("DynamicQuantizeLinear", [x], [x_q, x_scale, x_zero],
                                 name=_unique_name(taken, f"{name}_quantize")),
                into,
                helper.make_node("QGemm", [x2d, x_scale, x_zero, emb.name, scale, zero_point], [y2d],
                                 name=_unique_name(taken, f"{name}_qgemm"), domain="com.microsoft", transB=1),
                out,
            ]
        dead.update((id(transpose), id(dq)))
        gone.update((transpose.output[0], dq.output[0]))
    if new_nodes:
        nodes = [n for node in graph.node if id(node) not in dead for n in new_nodes.get(id(node), [node])]
        del graph.node[:]
        graph.node.extend(nodes)
        kept = [vi for vi in graph.value_info if vi.name not in gone]
        del graph.value_info[:]
        graph.value_info.extend(kept)
        if not any(o.domain == "com.microsoft" for o in model.opset_import):
            model.opset_import.append(helper.make_opsetid("com.microsoft", 1))
    return len(new_nodes)


def quantize_int4(model, block_size: int = INT4_BLOCK_SIZE, base_dir: str | Path | None = None,
                  accuracy_level: int = 0):
    """4-bit symmetric block quantisation of every 2-D MatMul weight (`MatMulNBits`) and the embedding.

    Runs on the exported graph as is: after `quant_pre_process` fuses MatMul + Add into Gemm, which
    `MatMulNBits` does not handle, most weights would stay float. The tied table (the embedding Gather and
    the head's `MatMul(x, Transpose(E))`) is quantised once, a slice of rows at a time
    (`quantize_tied_tables`); ONNX Runtime's `MatMulNBitsQuantizer` does every other MatMul, and an untied
    embedding Gather becomes `GatherBlockQuantized` (blocks along the width). Returns a new model; `model` is
    left as it was.

    `accuracy_level`: `MatMulNBits`' compute type. 0 dequantises the weights and multiplies in float32; 4
    (the backend's default) quantises each activation block to int8 and multiplies in int8, as ExecuTorch's
    int4 does: 2.5x faster decode at 2B on this AVX2 machine, same accuracy on the shipped model
    (notes/onnx.md).

    `base_dir`: `model`'s initializers are external data in this folder (a streamed export). ONNX Runtime's
    quantiser reads an external tensor only when it reaches its node (`ir.from_proto(...).numpy()`,
    `numpy_helper.to_array`, both relative to the working directory), so it runs from that folder and holds
    one float tensor at a time instead of the whole model. Its results then go into a file of that folder
    too (`offload_initializers`): the returned model refers to `base_dir` for every large tensor, so the
    lowered decode graph is not held while the prefill graph is quantised, and `write` copies the tensors
    one at a time.
    """
    from onnxruntime.quantization import QuantFormat
    from onnxruntime.quantization.matmul_nbits_quantizer import (
        DefaultWeightOnlyQuantConfig,
        MatMulNBitsQuantizer,
    )

    model = copy.deepcopy(model)  # with external weights: the graph only
    quantize_tied_tables(model, base_dir, block_size, accuracy_level)
    config = DefaultWeightOnlyQuantConfig(
        block_size=block_size, is_symmetric=True, quant_format=QuantFormat.QOperator,
        accuracy_level=accuracy_level or None,
        op_types_to_quantize=("MatMul", "Gather"), quant_axes=(("MatMul", 0), ("Gather", 1)),
    )
    where = contextlib.chdir(base_dir) if base_dir is not None else contextlib.nullcontext()
    with _quiet_quantizer_logs(), where:
        quantizer = MatMulNBitsQuantizer(model, algo_config=config, nodes_to_exclude=_fixed_index_gathers(model))
        quantizer.process()
    model = quantizer.model.model
    del quantizer
    _pack_int4_gathers(model)
    if base_dir is not None:
        offload_initializers(model, base_dir)
    return model


def _fixed_index_gathers(model) -> list[str]:
    """Gathers that read a weight at a fixed index: a Conv1D tap `w[i]` where the weight is too large for the
    exporter to fold (above 8192 elements: RecurrentGemma-2B's [4, 2560] and up). The quantiser would make
    each a 4-bit `GatherBlockQuantized`; int4 means the embedding and the MatMul weights, and a 4-bit
    Conv1D was a silent accuracy loss at real sizes that the small models (taps folded to constants) never
    showed (found by validation's own-model layer: notes/perf.md). Unnamed nodes get a name to be left out by."""
    constants = {i.name for i in model.graph.initializer}
    constants |= {o for n in model.graph.node if n.op_type == "Constant" for o in n.output}
    fixed = []
    for k, node in enumerate(model.graph.node):
        if node.op_type == "Gather" and len(node.input) > 1 and node.input[1] in constants:
            node.name = node.name or f"fixed_index_gather_{k}"
            fixed.append(node.name)
    return fixed


def dequantised_int4(weight, block_size: int = INT4_BLOCK_SIZE, slice_bytes: int = 64 << 20):
    """A float32 [N, K] weight (an nn.Linear's, or the tied table: the head multiplies by its transpose) as
    int4 leaves it: quantised by ONNX Runtime's own kernel as `MatMulNBits` holds it (B = weight^T, blocks of
    `block_size` along K, symmetric, zero point 8), then dequantised. What the artifact's own quantised model
    multiplies by (`OnnxBackend.quantise_part`); a slice of rows at a time, like `quantize_tied_tables`."""
    import numpy as np
    import torch

    w = weight.detach().to(torch.float32).numpy()
    n, k = w.shape
    blocks = -(-k // block_size)
    out = np.empty((n, k), np.float32)
    step = max(1, slice_bytes // (4 * k))
    for start in range(0, n, step):
        stop = min(n, start + step)
        packed = np.zeros((stop - start, blocks, block_size // 2), np.uint8)
        scales = np.zeros((stop - start, blocks), np.float32)
        _quantize_rows_4bit(w[start:stop], block_size, packed, scales)
        q = np.stack([packed & 0x0F, packed >> 4], axis=-1).reshape(stop - start, blocks, block_size)  # low first
        out[start:stop] = ((q.astype(np.float32) - 8) * scales[..., None]).reshape(stop - start, -1)[:, :k]
    return torch.from_numpy(out)


def int8_blocks(x, block_size: int = INT4_BLOCK_SIZE):
    """`x` as `MatMulNBits` at accuracy_level 4 multiplies it: each row cut into blocks of `block_size` along
    its last axis (the last one padded with zeros), each block quantised to int8 on its own and dequantised.
    MLAS's `QuantizeARow_CompInt8`: scale max|x| / 127, x * (127 / max|x|) rounded to nearest, ties to even
    (`_mm256_round_ps(_MM_ROUND_NEAREST)`), an all-zero block stays zero."""
    import torch
    import torch.nn.functional as F

    k = x.shape[-1]
    pad = -k % block_size
    blocks = (F.pad(x, (0, pad)) if pad else x).reshape(*x.shape[:-1], -1, block_size)
    amax = blocks.abs().amax(-1, keepdim=True)
    inverse = torch.where(amax > 0, 127.0 / amax, torch.zeros_like(amax))
    q = torch.round(blocks * inverse) * (amax / 127.0)
    return q.reshape(*x.shape[:-1], k + pad)[..., :k]


def emulate_int8_inputs_(part, head: bool, block_size: int = INT4_BLOCK_SIZE) -> None:
    """Makes every nn.Linear of `part`, and with `head` an embedder's tied head (`decode`), quantise its input
    as `MatMulNBits` at accuracy_level 4 does (`int8_blocks`), in place."""
    from torch import nn

    def hook(module, args):
        return (int8_blocks(args[0], block_size), *args[1:])

    for module in part.modules():
        if isinstance(module, nn.Linear):
            module.register_forward_pre_hook(hook)
    if head:
        decode = part.decode
        part.decode = lambda x: decode(int8_blocks(x, block_size))


def _quantize_rows_4bit(rows, block_size: int, packed, scales) -> None:
    """Float32 rows [n, K] of a weight whose transpose B is `MatMulNBits`' input (a linear's weight, the tied
    table) into `packed` [n, blocks, block_size / 2] and `scales` [n, blocks], by ONNX Runtime's own kernel:
    each row is a column of B, quantised on its own (symmetric, zero point 8, K padded to whole blocks)."""
    import numpy as np
    from onnxruntime.capi._pybind_state import quantize_matmul_4bits

    n, k = rows.shape
    blocks = scales.shape[1]
    b = np.zeros((blocks * block_size, n), np.float32)  # B's columns, padded
    b[:k] = rows.T
    zero_points = np.zeros((n, (blocks + 1) // 2), np.uint8)  # unused: symmetric
    quantize_matmul_4bits(packed, b, scales, zero_points, block_size, n, blocks * block_size, True)


def quantize_tied_tables(model, base_dir: str | Path | None = None, block_size: int = INT4_BLOCK_SIZE,
                         accuracy_level: int = 0, slice_bytes: int = 64 << 20) -> int:
    """Quantises each tied table E [vocab, width] once for both of its uses (in place); returns how many.

    The head `MatMul(x, Transpose(E))` becomes `MatMulNBits` over B = E^T (K = width, N = vocab) and each
    `Gather(E, ids)` becomes `GatherBlockQuantized` over the same bytes. `MatMulNBits` stores B's columns
    (E's rows) in blocks of `block_size` along K, symmetric 4-bit with the default zero point 8, low nibble
    first, one float scale per block: [vocab, blocks, block_size / 2] uint8 and [vocab, blocks]. That is
    exactly `GatherBlockQuantized`'s uint8 `bits=4` layout along `quantize_axis=1`, so the gather's data is
    the head's weight reshaped (one copy in weights.bin) and its scales are the same initializer.

    The blocks are computed by ONNX Runtime's own kernel (`quantize_matmul_4bits`, what its
    `MatMulNBitsQuantizer` calls), one slice of E's rows (`slice_bytes` of float32) at a time: each column of
    B is quantised on its own, so the result is byte for byte what the quantiser gives for the whole
    transposed head, without the float table (2.6 GB at RecurrentGemma-2B) or its transpose in memory.
    E and the Transpose leave the graph.
    """
    import numpy as np
    from onnx import TensorProto, helper, numpy_helper

    graph = model.graph
    taken = _all_names(graph)
    count = 0
    for transpose, matmuls, emb in _tied_heads(model):
        if emb.data_type != TensorProto.FLOAT:
            continue
        vocab, width = emb.dims
        blocks = -(-width // block_size)
        packed = np.zeros((vocab, blocks, block_size // 2), np.uint8)
        scales = np.zeros((vocab, blocks), np.float32)
        step = max(1, slice_bytes // (4 * width))  # rows per slice
        for start, rows in zip(range(0, vocab, step), _float_slices(emb, base_dir, 4 * width * step)):
            stop = start + len(rows) // width
            _quantize_rows_4bit(rows.reshape(-1, width), block_size, packed[start:stop], scales[start:stop])
        weight_name = _unique_name(taken, f"{emb.name}_Q4")
        data_name = _unique_name(taken, f"{emb.name}_Q4_rows")
        scales_name = _unique_name(taken, f"{emb.name}_scales")
        graph.initializer.extend([numpy_helper.from_array(packed, weight_name),
                                  numpy_helper.from_array(packed.reshape(vocab, -1), data_name),
                                  numpy_helper.from_array(scales, scales_name)])
        del packed, scales
        nodes = list(graph.node)  # held, so that id() names each node until the graph is rebuilt
        replaced: dict[int, Any] = {}
        for matmul in matmuls:
            attrs = {"K": width, "N": vocab, "bits": 4, "block_size": block_size}
            if accuracy_level:
                attrs["accuracy_level"] = accuracy_level
            replaced[id(matmul)] = helper.make_node(
                "MatMulNBits", [matmul.input[0], weight_name, scales_name], list(matmul.output),
                name=f"{matmul.name}_Q4" if matmul.name else "", domain="com.microsoft", **attrs)
        for node in nodes:
            if node.op_type == "Gather" and node.input[0] == emb.name:
                axis = next((helper.get_attribute_value(a) for a in node.attribute if a.name == "axis"), 0)
                replaced[id(node)] = helper.make_node(
                    "GatherBlockQuantized", [data_name, node.input[1], scales_name], list(node.output),
                    name=node.name, domain="com.microsoft", gather_axis=axis, quantize_axis=1,
                    block_size=block_size, bits=4)
        kept = []
        for node in nodes:
            if node is transpose:
                continue
            new = replaced.get(id(node), node)
            if new is not node:
                new.metadata_props.extend(node.metadata_props)
            kept.append(new)
        if any(emb.name in n.input for n in kept):
            raise RgexportError(f"{emb.name} has uses besides the gather and the head; the int4 recipe cannot drop it")
        del graph.node[:]
        graph.node.extend(kept)
        del nodes, kept
        graph.initializer.remove(emb)
        count += 1
    if count and not any(o.domain == "com.microsoft" for o in model.opset_import):
        model.opset_import.append(helper.make_opsetid("com.microsoft", 1))
    return count


def _pack_int4_gathers(model) -> int:
    """Stores `GatherBlockQuantized` data as uint8 holding two 4-bit values (`bits=4`) instead of INT4.

    The ORT format has no INT4 tensors ("Unsupported tensor data type ... Invalid ORT format model").
    Symmetric int4 v in [-8, 7] becomes the unsigned nibble v + 8 (flipping the top bit of each nibble),
    which is what uint8 data means to the kernel when no zero points are given (default zero point 8);
    both pack two values per byte, low nibble first. Returns the number of tensors repacked.
    """
    import numpy as np
    from onnx import TensorProto, helper, numpy_helper

    inits = {t.name: t for t in model.graph.initializer}
    count = 0
    for node in model.graph.node:
        if node.op_type != "GatherBlockQuantized" or node.input[0] not in inits:
            continue
        data = inits[node.input[0]]
        if data.data_type != TensorProto.INT4:
            continue
        if len(node.input) > 3 and node.input[3]:
            raise RgexportError(f"{node.name}: int4 data with zero points; the int4 recipe is symmetric")
        rows, cols = data.dims
        packed = np.frombuffer(data.raw_data, np.uint8) ^ np.uint8(0x88)
        data.CopyFrom(numpy_helper.from_array(packed.reshape(rows, (cols + 1) // 2).copy(), data.name))
        kept = [a for a in node.attribute if a.name != "bits"]
        del node.attribute[:]
        node.attribute.extend([*kept, helper.make_attribute("bits", 4)])
        count += 1
    return count


# Static int8 (w8a8) ---------------------------------------------------------------------------------
_NAME_SCOPES = "pkg.torch.onnx.name_scopes"
# Op groups of the sensitivity study (notes/onnx.md), by the module a node came from.
QDQ_GROUPS = {
    "embedding": "the token embedding Gather: E in 8 bits (its output shares E's scale, so it adds no error)",
    "head": "the output head (Gemm on the tied embedding; its int8 weight also feeds the embedding Gather)",
    "mlp": "MLP linears (ffw_gate, ffw_up, ffw_down)",
    "recurrent_linear": "recurrent block linears (linear_x, linear_y, linear_out)",
    "lru_gates": "RG-LRU gate layers (input_gate, a_gate: block-diagonal MatMuls)",
    "attention_proj": "attention projections (proj_q, proj_k, proj_v, proj_final)",
    "attention_scores": "attention scores, softmax and probabilities x values over the cache and the chunk "
                        "(MatMul, Softmax)",
    "ring_write": "the ring-buffer write of the new key/value into the cache state (one-hot blend)",
    "attention_other": "attention mask addition, the scores' concat, the two outputs' sum",
    "rope": "rotary embedding",
    "rglru": "the RG-LRU recurrence (sigmoid/exp gates, h = a * h + x on the state)",
    "conv1d": "the Conv1D over the conv state",
    "norms": "RMSNorms",
    "gating": "GELU and the gating products (MLP and recurrent block)",
    "residual": "residual additions",
    "top": "embedding scale and logit soft-cap",
    "position": "position arithmetic (masks, slots, resets)",
}
# What w8a8 quantises, decided by the sensitivity study on the shipped model (notes/onnx.md): the weight-bearing
# MatMul/Gemm groups. Everything else (the recurrence and the state, the Conv1D, attention scores, masks and
# the cache write, norms, gating, residuals, positions) stays float: those groups either cost accuracy for no
# gain (elementwise work, no weights to shrink) or break outright (the -30000 attention mask).
W8A8_GROUPS = ("head", "mlp", "recurrent_linear", "lru_gates", "attention_proj")
W8A8_OP_TYPES = ("MatMul", "Gemm")
CALIBRATION_METHODS = ("minmax", "entropy", "percentile")
DEFAULT_CALIBRATION_METHOD = "minmax"
# ORT's Entropy calibrator with its defaults (128 histogram bins, 128 quantised bins) has exactly one
# candidate threshold, the full range: it is MinMax under another name. These give it a real search.
_CALIBRATOR_OPTIONS = {
    "minmax": {},
    "entropy": {"num_bins": 512, "num_quantized_bins": 128},
    # uint8 activations are asymmetric; ORT's percentile calibrator defaults to a symmetric range.
    "percentile": {"percentile": 99.999, "symmetric": False},
}
_LINEAR_GROUPS = {"linear_x": "recurrent_linear", "linear_y": "recurrent_linear", "linear_out": "recurrent_linear",
                  "ffw_gate": "mlp", "ffw_up": "mlp", "ffw_down": "mlp", "proj_q": "attention_proj",
                  "proj_k": "attention_proj", "proj_v": "attention_proj", "proj_final": "attention_proj"}
_CLASS_GROUPS = {"BlockDiagonalLinear": "lru_gates", "RGLRU": "rglru", "Conv1D": "conv1d", "RMSNorm": "norms",
                 "RotaryEmbedding": "rope", "MLPBlock": "gating", "RecurrentBlock": "gating",
                 "ResidualBlock": "residual", "RingBuffer": "ring_write"}


def _literal_list(node, key: str) -> list[str]:
    import ast

    for prop in node.metadata_props:
        if prop.key == key:
            return list(ast.literal_eval(prop.value))
    return []


def qdq_groups(model) -> dict[str, str]:
    """Node name -> op group (a key of `QDQ_GROUPS`), from the exporter's module metadata.

    Raises RgexportError for a model without that metadata (it is stripped at the end of lowering).
    """
    graph = model.graph
    if not any(node_classes(n) for n in graph.node):
        raise RgexportError("w8a8 needs the exporter's node metadata (pkg.torch.onnx.class_hierarchy) to tell the "
                            "recurrence from the linears; this model has none (was it tidied before lowering?)")
    inits = {t.name: t for t in graph.initializer}
    heads = {m.name for _, users, _ in _tied_heads(model) for m in users}
    positional = position_only_nodes(model)
    groups = {}
    for node in graph.node:
        classes = _literal_list(node, _CLASS_HIERARCHY)
        scopes = _literal_list(node, _NAME_SCOPES)
        owner = classes[-2].rsplit(".", 1)[-1] if len(classes) >= 2 else ""
        module = scopes[-2].rsplit(".", 1)[-1] if len(scopes) >= 2 else ""
        if node.name in positional:
            group = "position"
        elif owner == "Linear" and module in _LINEAR_GROUPS:
            group = _LINEAR_GROUPS[module]
        elif owner in _CLASS_GROUPS:
            group = _CLASS_GROUPS[owner]
        elif owner == "LocalAttentionBlock":
            group = {"MatMul": "attention_scores", "Softmax": "attention_scores"}.get(node.op_type, "attention_other")
        elif node.op_type == "Gather" and node.input[0] in inits and len(inits[node.input[0]].dims) == 2:
            group = "embedding"
        elif node.name in heads or (node.op_type in ("MatMul", "Gemm") and len(scopes) <= 2):
            group = "head"  # the MatMul form, or the Gemm that tie_head_as_gemm made of it
        else:
            group = "top"
        groups[node.name] = group
    return groups


def calibration_method(name: Any) -> str:
    """Checks a `calibration_method` option: one of `CALIBRATION_METHODS` (case-insensitive)."""
    method = str(name).lower() if isinstance(name, str) else None
    if method not in CALIBRATION_METHODS:
        raise RgexportError(f"calibration_method {name!r} is not one of {list(CALIBRATION_METHODS)} "
                            f"(default {DEFAULT_CALIBRATION_METHOD!r})")
    return method


def _data_reader(feeds: list[dict[str, Any]]):
    from onnxruntime.quantization import CalibrationDataReader

    class Reader(CalibrationDataReader):
        def __init__(self) -> None:
            self._items = iter(feeds)

        def get_next(self) -> dict[str, Any] | None:
            return next(self._items, None)

        def __len__(self) -> int:
            return len(feeds)

        def set_range(self, start_index: int, end_index: int) -> None:
            self._items = iter(feeds[start_index:end_index])

    return Reader()


def quantize_w8a8(
    model, feeds: list[dict[str, Any]], method: str = DEFAULT_CALIBRATION_METHOD,
    groups: tuple[str, ...] = W8A8_GROUPS, op_types: tuple[str, ...] = W8A8_OP_TYPES, large: bool = False,
) -> tuple[Any, dict[str, Any]]:
    """Static QDQ int8 of the nodes of `groups` whose op is in `op_types`, calibrated on `feeds`.

    `feeds` are input dicts of this graph (real (token, position, state) samples); `method` one of
    `CALIBRATION_METHODS`. The head is first rewritten as `Gemm(x, E, transB=1)` on the tied embedding, so
    E is quantised once (as the head's weight) and the embedding Gather reads the same int8 tensor.
    Activations uint8 (asymmetric, per tensor), weights uint8 (symmetric, per tensor): with int8 weights
    ONNX Runtime's AVX2 kernels (no VNNI) saturate 16-bit pair sums, 3x the deviation from the QDQ
    arithmetic (notes/onnx.md); per channel fails on the 3-D RG-LRU gate weights ("weight zero point must
    be a scalar"). MatMul outputs are quantised too, which is what lets ONNX Runtime fuse
    DQ -> MatMul -> Q into QLinearMatMul (integer kernels); without it the weights are folded back to float.
    Returns (model, facts).
    """
    onnx = _onnx()
    from onnxruntime.quantization import CalibrationMethod, QuantFormat, QuantType, quantize_static
    from onnxruntime.quantization.calibrate import create_calibrator, save_tensors_data

    method = calibration_method(method)
    if not feeds:
        raise RgexportError("w8a8 needs calibration samples; got none")
    model = copy.deepcopy(model)
    tie_head_as_gemm(model)
    group_of = qdq_groups(model)
    unknown = set(groups) - set(QDQ_GROUPS)
    if unknown:
        raise RgexportError(f"unknown op groups {sorted(unknown)}; expected some of {list(QDQ_GROUPS)}")
    nodes = [n.name for n in model.graph.node if group_of[n.name] in groups and n.op_type in op_types]
    if not nodes:
        raise RgexportError(f"no {'/'.join(op_types)} node in groups {list(groups)} to quantise")
    enum = {"minmax": CalibrationMethod.MinMax, "entropy": CalibrationMethod.Entropy,
            "percentile": CalibrationMethod.Percentile}[method]
    with tempfile.TemporaryDirectory(prefix="rgexport-w8a8-") as tmp, _quiet_quantizer_logs(), \
            contextlib.redirect_stdout(io.StringIO()):  # the histogram calibrators print progress
        src, out, cache = Path(tmp) / "float.onnx", Path(tmp) / "w8a8.onnx", Path(tmp) / "ranges.json"
        onnx.save_model(model, str(src), save_as_external_data=large)
        # Calibrated by hand rather than inside quantize_static, which passes no histogram sizes on.
        calibrator = create_calibrator(src, list(op_types), augmented_model_path=str(Path(tmp) / "augmented.onnx"),
                                       calibrate_method=enum, use_external_data_format=large,
                                       extra_options=dict(_CALIBRATOR_OPTIONS[method]))
        calibrator.collect_data(_data_reader(feeds))
        save_tensors_data(calibrator.compute_data(), cache)
        del calibrator
        quantize_static(src, out, None, quant_format=QuantFormat.QDQ, op_types_to_quantize=list(op_types),
                        nodes_to_quantize=nodes, per_channel=False, reduce_range=False,
                        activation_type=QuantType.QUInt8, weight_type=QuantType.QUInt8, calibrate_method=enum,
                        use_external_data_format=large, calibration_cache_path=cache)
        quantized = onnx.load(str(out))
    ops = {n.op_type for n in quantized.graph.node}
    if not {"QuantizeLinear", "DequantizeLinear"} <= ops:
        raise RgexportError("quantize_static inserted no QuantizeLinear/DequantizeLinear nodes")
    facts = {"calibration_method": method, "calibration_samples": len(feeds), "quantized_nodes": len(nodes),
             "quantized_groups": list(groups), "op_types": list(op_types)}
    return quantized, facts


RECIPES = {
    "fp32": Recipe("fp32", "float32 weights and compute; the tied head read through Gemm(transB=1)"),
    "fp16": Recipe("fp16", "float16 weights and activations; RG-LRU, RMSNorm, positions and I/O in float32",
                   quantized=True),
    "int8": Recipe("int8", "ONNX Runtime dynamic quantisation: 8-bit (uint8) weights per tensor, uint8 activations "
                   "per call; the tied table stored once, read by the embedding Gather and the head's QGemm",
                   quantized=True),
    "int4": Recipe("int4", "4-bit weights (MatMulNBits / GatherBlockQuantized, block 32 (option int4_block_size: "
                   "16, 64, 128), symmetric); the matmuls quantise activations to int8 per block (accuracy_level 4; "
                   "option int4_accuracy_level=0 computes in float32)", quantized=True),
    "w8a8": Recipe(
        "w8a8",
        "static int8 QDQ calibrated on real text: uint8 activations (option calibration_method: minmax (default), "
        "entropy, percentile) and uint8 weights, per tensor, on the MatMul/Gemm of the MLPs, recurrent-block "
        "linears, RG-LRU gates, attention projections and the tied head/embedding (QLinearMatMul/QGemm in ONNX "
        "Runtime). Float by measurement on the shipped model: the RG-LRU recurrence and its state (quantising it "
        "too: top-1 97.5% -> 94.9%, mean KL 0.004 -> 0.007), Conv1D, norms, attention scores/masks (alone: top-1 "
        "87%, the -30000 mask) and cache writes, gating, residuals (notes/onnx.md)",
        quantized=True, calibrated=True),
}

INT4_ACCURACY_LEVEL = 4  # MatMulNBits computes with int8 activations (see OnnxBackend.lower)

# w8a8: what stays float, and the calibration inputs ----------------------------------------------------
W8A8_FLOAT_GROUPS = ["rglru", "conv1d", "attention_scores", "attention_other", "ring_write", "rope", "norms",
                     "gating", "residual", "top", "position", "embedding output"]

W8A8_NOTE = ("w8a8: static int8 on the MLP, recurrent-block, RG-LRU gate and attention projection MatMuls and the "
             "tied head/embedding (uint8 activations calibrated with {method} on real decode/prefill inputs, uint8 "
             "weights). Kept float after a per-group sensitivity study on the shipped tiny model (512 held-out "
             "tokens, notes/onnx.md): the RG-LRU recurrence and its state (quantising it too took top-1 agreement "
             "from 97.5% to 94.9% and mean KL from 0.0039 to 0.0074), the Conv1D (+0.0016 KL) and norms (+0.0028), "
             "gating and residuals (elementwise: no weights to shrink), and the attention scores, masks and cache "
             "writes (quantising the -30000 mask alone: top-1 87%).")
