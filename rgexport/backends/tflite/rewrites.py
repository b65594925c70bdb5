"""Flatbuffer rewrites: a converted `.tflite` made into what the runtime should run, file to file.

`drop_weight_dequantize`: litert-torch converts a torchao int8 weight (strict QDQ mode) into an int8 constant
behind a DEQUANTIZE. LiteRT evaluates a DEQUANTIZE of a constant once, at prepare time, into a float32 copy
that it keeps: 4 bytes per parameter resident beside the file's 1 (10.7 GB at RecurrentGemma-2B). Its
FULLY_CONNECTED and EMBEDDING_LOOKUP take the int8 constant itself (the dynamic-range form ai-edge-quantizer
writes: activations quantised on the fly, rows dequantised as gathered), so each such DEQUANTIZE is dropped and
its consumers read the constant.

The file is parsed through a memory map and written back with every tensor's data past the flatbuffer
(`Buffer.offset/size`, 16-byte aligned), the layout LiteRT reads at any size (and the only one past 2 GB); the
data is copied from the map a buffer at a time, so a multi-GB model is never read into memory.
"""

from __future__ import annotations

import gc
import mmap
from collections import Counter
from pathlib import Path
from typing import Any

from rgexport.backends.tflite.weights import _builtin_names

# Operator -> input positions that take an int8 constant with per-channel scales directly.
_TAKES_INT8 = {"FULLY_CONNECTED": (1,), "EMBEDDING_LOOKUP": (1,)}
_ALIGN = 16


def drop_weight_dequantize(src: Path, dst: Path, block_scales: dict[float, Any] | None = None) -> dict[str, int]:
    """Writes `src` to `dst` with every DEQUANTIZE of a constant int8 tensor removed where all its consumers take
    it quantised (`_TAKES_INT8`), those consumers reading the constant; an int4 constant's likewise, the consumers
    reading it in LiteRT's blockwise layout with the float16 scales `block_scales` holds under its tag
    (`_blockwise_int4`). Returns
    {"dropped": n, "kept": m}: m counts the DEQUANTIZEs of int8/int4 constants left because some consumer needs
    float (none in rgexport's graphs)."""
    with open(src, "rb") as f:
        buf = mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ)
    try:
        counts = _drop(buf, dst, block_scales)
    finally:
        gc.collect()  # the parsed model's views into the map, before it closes
        buf.close()
    return {"dropped": counts["dropped"], "kept": counts["kept"]}


def _drop(buf: mmap.mmap, dst: Path, block_scales: dict[float, Any] | None) -> Counter[str]:
    from ai_edge_litert import schema_py_generated as schema

    names = _builtin_names()
    model = schema.ModelT.InitFromPackedBuf(buf, 0)

    def op_name(op) -> str:
        code = model.operatorCodes[op.opcodeIndex]
        return names.get(max(code.builtinCode, code.deprecatedBuiltinCode), "CUSTOM")

    counts: Counter[str] = Counter()
    scale_buffers: dict[float, int] = {}  # int4 weight's tag -> its float16 scales' buffer (shared by subgraphs)
    for graph in model.subgraphs:
        consumers: dict[int, list[tuple[str, int, Any]]] = {}
        for op in graph.operators:
            for pos, t in enumerate(op.inputs if op.inputs is not None else []):
                consumers.setdefault(int(t), []).append((op_name(op), pos, op))
        outputs = set(int(t) for t in graph.outputs)

        def takes_quantised(t: int) -> bool:
            uses = consumers.get(t, [])
            return bool(uses) and t not in outputs and all(p in _TAKES_INT8.get(n, ()) for n, p, _ in uses)

        replace: dict[int, int] = {}
        dropped_ops: set[int] = set()
        for op in graph.operators:
            if op_name(op) != "DEQUANTIZE":
                continue
            source, result = int(op.inputs[0]), int(op.outputs[0])
            tensor = graph.tensors[source]
            if not (tensor.buffer > 0 and _buffer_bytes(model.buffers[tensor.buffer]) > 0):
                continue  # not a constant
            if tensor.type == schema.TensorType.INT8 and takes_quantised(result):
                replace[result] = source
                dropped_ops.add(id(op))
                counts["dropped"] += 1
                continue
            if tensor.type == schema.TensorType.INT4 and block_scales and takes_quantised(result):
                replace[result] = _blockwise_int4(model, graph, tensor, block_scales, scale_buffers)
                if len(consumers.get(source, [])) == 1:
                    tensor.quantization = None  # read by nothing now: its placeholder scales need not stay
                dropped_ops.add(id(op))
                counts["dropped"] += 1
                continue
            if tensor.type in (schema.TensorType.INT8, schema.TensorType.INT4):
                counts["kept"] += 1
        kept_ops = [op for op in graph.operators if id(op) not in dropped_ops]
        for op in kept_ops:
            op.inputs = [replace.get(int(t), int(t)) for t in op.inputs]
        graph.operators = kept_ops
    _write_with_offsets(model, buf, dst)
    return counts


def _blockwise_int4(model, graph, tensor, block_scales: dict[float, Any], scale_buffers: dict[float, int]) -> int:
    """A new tensor over `tensor`'s int4 data [out, in] in LiteRT's blockwise layout (what ai-edge-quantizer writes
    for int4): its float16 scales [out, in / block] from `block_scales`, under the tag that the converter carried
    as the first of the placeholder per-channel scales (`recipes.intx_weight`). Returns its index."""
    import numpy as np
    from ai_edge_litert import schema_py_generated as schema

    tag = float(tensor.quantization.scale[0])
    if tag not in block_scales:
        raise ValueError(f"int4 constant {tensor.name!r} carries tag {tag}, which has no block scales")
    scales = np.ascontiguousarray(block_scales[tag], np.float16)
    out, inputs = (int(d) for d in tensor.shape)
    if scales.shape[0] != out or inputs % scales.shape[1]:
        raise ValueError(f"block scales {scales.shape} do not fit int4 constant {tensor.name!r} {[out, inputs]}")
    if tag not in scale_buffers:
        data = schema.BufferT()
        data.data = scales.view(np.uint8).reshape(-1)
        model.buffers.append(data)
        scale_buffers[tag] = len(model.buffers) - 1
    name = tensor.name if isinstance(tensor.name, bytes) else str(tensor.name).encode()
    scale_tensor = schema.TensorT()
    scale_tensor.shape, scale_tensor.type = list(scales.shape), schema.TensorType.FLOAT16
    scale_tensor.buffer, scale_tensor.name = scale_buffers[tag], name + b"_scales"
    graph.tensors.append(scale_tensor)
    details = schema.BlockwiseQuantizationT()
    details.scales, details.zeroPoints, details.blockSize = len(graph.tensors) - 1, -1, inputs // scales.shape[1]
    quantization = schema.QuantizationParametersT()
    quantization.detailsType, quantization.details = schema.QuantizationDetails.BlockwiseQuantization, details
    weight = schema.TensorT()
    weight.shape, weight.type, weight.buffer = [out, inputs], schema.TensorType.INT4, tensor.buffer
    weight.name, weight.quantization = name + b"_blockwise", quantization
    graph.tensors.append(weight)
    return len(graph.tensors) - 1


def _buffer_bytes(buffer) -> int:
    if buffer.offset > 1:
        return int(buffer.size)
    return 0 if buffer.data is None else len(buffer.data)


def _write_with_offsets(model, source: mmap.mmap, dst: Path) -> None:
    """Packs `model` (a ModelT read from `source`) into `dst`, every tensor buffer's data placed after the
    flatbuffer; other buffers (metadata) stay inline."""
    import flatbuffers
    from ai_edge_litert import schema_py_generated as schema
    from ai_edge_litert.tools import flatbuffer_utils

    tensor_buffers = {int(t.buffer) for g in model.subgraphs for t in g.tensors if t.buffer > 0}
    moved: dict[int, tuple[int, int] | memoryview] = {}  # buffer -> (offset, size) in source, or inline data
    for index in sorted(tensor_buffers):
        b = model.buffers[index]
        if b.offset > 1:
            moved[index] = (int(b.offset), int(b.size))
        elif b.data is not None and len(b.data):
            moved[index] = memoryview(b.data).cast("B")
        else:
            continue
        # Non-zero placeholders, so that the packed Buffer has room for the real offset and size.
        b.data, b.offset, b.size = None, 1, 1
    builder = flatbuffers.Builder(1 << 20)
    builder.Finish(model.Pack(builder), file_identifier=b"TFL3")
    head = bytearray(builder.Output())
    packed = schema.Model.GetRootAs(head, 0)
    position = _aligned(len(head))
    layout = []
    for index, data in moved.items():
        size = data[1] if isinstance(data, tuple) else len(data)
        flatbuffer_utils.update_packed_buffer(packed.Buffers(index), offset=position, size=size)
        layout.append((position, data))
        position = _aligned(position + size)
    tmp = dst.with_name(dst.name + ".partial")
    with open(tmp, "wb") as out:
        out.write(head)
        for start, data in layout:
            out.write(b"\0" * (start - out.tell()))
            if isinstance(data, tuple):
                offset, size = data
                for at in range(offset, offset + size, 1 << 26):  # 64 MiB at a time, its pages let go after
                    end = min(at + (1 << 26), offset + size)
                    out.write(source[at:end])
                    source.madvise(mmap.MADV_DONTNEED, at - at % mmap.PAGESIZE, end - at + at % mmap.PAGESIZE)
            else:
                out.write(data)
    tmp.replace(dst)


def _aligned(n: int) -> int:
    return (n + _ALIGN - 1) // _ALIGN * _ALIGN
