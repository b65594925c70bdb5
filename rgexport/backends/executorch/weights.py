"""Weight bytes one ExecuTorch decode step reads, from the `.pte` program itself.

A `.pte` is a flatbuffer program followed by data segments: each method's delegate blob, XNNPACK's
named weight data (keyed by content, so decode and prefill share one copy), the constant segment of the
tensors left to portable kernels, and the initial values of mutable buffers (the state). A decode step
reads its own delegate blob, the named weight data, and the constants its portable kernels read whole. It
does not read the prefill method's blob, the state's initial values (copied in once, when a method
loads), or a table that its kernels only gather from: the embedding, one row per token (`aten::embedding`,
or the weight, scales and zero points of `quantized_decomposed::embedding_byte`, ExecuTorch's quantised
gather). Only the flatbuffer part of the file is read here, never the segments, so a multi-GB program
costs a few MB to inspect.

What this cannot see: the named weight data is counted whole, as every method reads it; a weight only the
prefill delegate used would be counted too (the graphs of rgexport share all their weights).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

# Kernel -> argument positions read only at the gathered rows.
_GATHERED_ARGS = {
    "aten::embedding": (0,),
    "quantized_decomposed::embedding_byte": (0, 1, 2),
    "quantized_decomposed::embedding_4bit": (0, 1, 2),
    "quantized_decomposed::embedding_2bit": (0, 1, 2),
}


def _itemsize(scalar_type: int) -> float:
    from executorch.exir.scalar_type import ScalarType as S

    sizes = {S.BYTE: 1, S.CHAR: 1, S.SHORT: 2, S.INT: 4, S.LONG: 8, S.HALF: 2, S.FLOAT: 4, S.DOUBLE: 8,
             S.BOOL: 1, S.QINT8: 1, S.QUINT8: 1, S.QINT32: 4, S.BFLOAT16: 2, S.QUINT4x2: 0.5, S.QUINT2x4: 0.25,
             S.BITS16: 2, S.UINT16: 2, S.UINT32: 4, S.UINT64: 8}
    return sizes.get(S(scalar_type), 1)


def read_program(path: Path) -> Any:
    """The `Program` (executorch.exir.schema) of a `.pte`, parsed from its flatbuffer part only."""
    from executorch.exir._serialize._flatbuffer_program import _flatbuffer_to_program
    from executorch.exir._serialize._program import _ExtendedHeader, _get_extended_header

    with open(path, "rb") as f:
        head = f.read(_ExtendedHeader.NUM_HEAD_BYTES)
        header = _get_extended_header(head)
        size = header.program_size if header else Path(path).stat().st_size
        f.seek(0)
        return _flatbuffer_to_program(f.read(size))


def decode_weight_traffic(path: Path, method: str = "decode") -> dict[str, Any]:
    """Bytes of `method`'s weights: `read` per step, `gathered` (a row per step), and the file's size."""
    from executorch.exir.schema import DataLocation, DelegateCall, KernelCall, Tensor

    program = read_program(path)
    plans = {p.name: p for p in program.execution_plan}
    if method not in plans:
        raise KeyError(f"{path} has no method {method!r}; it has {sorted(plans)}")
    plan = plans[method]

    def constant_bytes(value: Any) -> tuple[int, int] | None:
        """(constant buffer index, bytes) of a constant tensor value, else None."""
        t = value.val
        if not isinstance(t, Tensor) or t.allocation_info is not None or t.data_buffer_idx <= 0:
            return None
        numel = 1
        for s in t.sizes:
            numel *= int(s)
        return t.data_buffer_idx, int(numel * _itemsize(int(t.scalar_type)))

    whole: dict[int, int] = {}
    gathered: dict[int, int] = {}
    blobs: list[Any] = []
    for chain in plan.chains:
        for instruction in chain.instructions:
            call = instruction.instr_args
            if isinstance(call, KernelCall):
                op = plan.operators[call.op_index].name
                gathered_args = _GATHERED_ARGS.get(op, ())
            elif isinstance(call, DelegateCall):
                blobs.append(plan.delegates[call.delegate_index].processed)
                gathered_args = ()
            else:
                continue
            for pos, arg in enumerate(call.args):
                const = constant_bytes(plan.values[arg])
                if const is not None:
                    (gathered if pos in gathered_args else whole)[const[0]] = const[1]
    for index in whole:
        gathered.pop(index, None)  # read whole by another kernel: read whole
    segments = program.segments
    refs = {(int(b.location), int(b.index)) for b in blobs}  # a delegate called twice is read once
    blob_bytes = sum(segments[i].size if loc == DataLocation.SEGMENT else len(program.backend_delegate_data[i].data)
                     for loc, i in refs)
    named = {d.segment_index for d in program.named_data or []}
    named_bytes = sum(segments[i].size for i in named)
    return {"file_bytes": Path(path).stat().st_size,
            "read_bytes": blob_bytes + named_bytes + sum(whole.values()),
            "gathered_bytes": sum(gathered.values()),
            "delegate_bytes": blob_bytes, "named_data_bytes": named_bytes, "constant_bytes": sum(whole.values())}


def named_data_bytes(path: Path) -> int:
    """The data bytes of a `.ptd` (ExecuTorch's FlatTensor file), from its header: every segment, padding
    between them included (at most the alignment, 128 bytes, per segment)."""
    from executorch.extension.flat_tensor.serialize.serialize import FlatTensorHeader

    with open(path, "rb") as f:
        head = f.read(8 + FlatTensorHeader.EXPECTED_LENGTH)
    header = FlatTensorHeader.from_bytes(head[8:])
    if not header.is_valid():
        raise ValueError(f"{path} is not an ExecuTorch named data file (.ptd)")
    return header.segment_data_size


def weights_read_per_token(folder: Path, manifest: dict[str, Any]) -> int:
    """Bytes of weights a decode step reads (see the module docstring). A `.ptd` beside the program (backend fact
    data_file) holds the tied head's packed weights and scales, whose bytes the gather table shares: the head
    reads them whole every step, so they count once, whole; the gather's table is not counted again (it is no
    constant of the program's, only a name into that file)."""
    read = decode_weight_traffic(Path(folder) / manifest["artifact"]["file"])["read_bytes"]
    data = manifest.get("backend_facts", {}).get("data_file")
    return read + (named_data_bytes(Path(folder) / data) if data else 0)
