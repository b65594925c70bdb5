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

# Operator -> input positions that take an int8 constant with per-channel scales directly.
_TAKES_INT8 = {"FULLY_CONNECTED": (1,), "EMBEDDING_LOOKUP": (1,)}
_ALIGN = 16


def _builtin_names() -> dict[int, str]:
    from ai_edge_litert import schema_py_generated as schema

    return {v: k for k, v in vars(schema.BuiltinOperator).items() if not k.startswith("_") and isinstance(v, int)}


def drop_weight_dequantize(src: Path, dst: Path) -> dict[str, int]:
    """Writes `src` to `dst` with every DEQUANTIZE of a constant int8 tensor removed where all its consumers take
    it quantised (`_TAKES_INT8`), those consumers reading the constant; an int4 constant's DEQUANTIZE and the
    RESHAPE after it likewise, the consumers reading it in LiteRT's blockwise layout (`_blockwise_int4`). Returns
    {"dropped": n, "kept": m}: m counts the DEQUANTIZEs of int8/int4 constants left because some consumer needs
    float (none in rgexport's graphs)."""
    with open(src, "rb") as f:
        buf = mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ)
    try:
        counts = _drop(buf, dst)
    finally:
        gc.collect()  # the parsed model's views into the map, before it closes
        buf.close()
    return {"dropped": counts["dropped"], "kept": counts["kept"]}


def _drop(buf: mmap.mmap, dst: Path) -> Counter[str]:
    from ai_edge_litert import schema_py_generated as schema

    names = _builtin_names()
    model = schema.ModelT.InitFromPackedBuf(buf, 0)

    def op_name(op) -> str:
        code = model.operatorCodes[op.opcodeIndex]
        return names.get(max(code.builtinCode, code.deprecatedBuiltinCode), "CUSTOM")

    counts: Counter[str] = Counter()
    scale_buffers: dict[int, int] = {}  # int4 weight buffer -> its float16 scales' buffer (shared by subgraphs)
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
            uses = consumers.get(result, [])
            if tensor.type == schema.TensorType.INT4 and len(uses) == 1 and uses[0][0] == "RESHAPE":
                reshape = uses[0][2]
                shaped = int(reshape.outputs[0])
                if takes_quantised(shaped):
                    replace[shaped] = _blockwise_int4(model, graph, tensor, graph.tensors[shaped].shape, scale_buffers)
                    if len(consumers.get(source, [])) == 1:
                        tensor.quantization = None  # read by nothing now: its per-row scales need not stay in the file
                    dropped_ops.update((id(op), id(reshape)))
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


def _blockwise_int4(model, graph, tensor, shape, scale_buffers: dict[int, int]) -> int:
    """A new tensor of `shape` [out, in] over `tensor`'s int4 data in LiteRT's blockwise layout (what
    ai-edge-quantizer writes for int4): the converter gives [out * in / block, block] with a scale per row, and the
    same bytes read as [out, in] hold the blocks along the input dimension in order. The scales become a float16
    [out, in / block] tensor (float16-exact by construction, `recipes.intx_weight`). Returns its index."""
    import numpy as np
    from ai_edge_litert import schema_py_generated as schema

    out, inputs = (int(d) for d in shape)
    block = int(tensor.shape[1])
    if tensor.buffer not in scale_buffers:
        scales = np.asarray(tensor.quantization.scale, np.float32)
        half = scales.astype(np.float16)
        if not np.array_equal(half.astype(np.float32), scales):
            raise ValueError("int4 scales are not float16-exact: quantise with recipes.intx_weight")
        data = schema.BufferT()
        data.data = half.reshape(out, inputs // block).view(np.uint8).reshape(-1)
        model.buffers.append(data)
        scale_buffers[tensor.buffer] = len(model.buffers) - 1
    name = tensor.name if isinstance(tensor.name, bytes) else str(tensor.name).encode()
    scale_tensor = schema.TensorT()
    scale_tensor.shape, scale_tensor.type = [out, inputs // block], schema.TensorType.FLOAT16
    scale_tensor.buffer, scale_tensor.name = scale_buffers[tensor.buffer], name + b"_scales"
    graph.tensors.append(scale_tensor)
    details = schema.BlockwiseQuantizationT()
    details.scales, details.zeroPoints, details.blockSize = len(graph.tensors) - 1, -1, block
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
