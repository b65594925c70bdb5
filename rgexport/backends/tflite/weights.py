"""Weight bytes one LiteRT decode step reads: the decode signature's constant buffers, less gathered tables.

A `.tflite` holds both signatures as subgraphs over one buffer table; constants the two share are stored
once. A decode step reads every constant buffer its subgraph's operators take, except a table that is
only ever gathered from (GATHER's params, EMBEDDING_LOOKUP's value: one row per token, not all of them),
also when the gather reads it through a DEQUANTIZE of the constant (a quantised embedding table: LiteRT
dequantises a constant once, at prepare time). Buffers stored past the flatbuffer (`Buffer.offset/size`,
models above 2 GB) count the same as inline ones. The file is memory-mapped and parsed lazily, so a
multi-GB model is not read into memory.
"""

from __future__ import annotations

import mmap
from pathlib import Path
from typing import Any

# Builtin operator -> input positions read only at the gathered rows.
_GATHERED_INPUTS = {"GATHER": (0,), "EMBEDDING_LOOKUP": (1,)}
_PASS_THROUGH = ("DEQUANTIZE",)  # a constant's dequantised copy is gathered as the constant would be


def _builtin_names() -> dict[int, str]:
    from ai_edge_litert import schema_py_generated as schema

    return {v: k for k, v in vars(schema.BuiltinOperator).items() if not k.startswith("_") and isinstance(v, int)}


def decode_weight_traffic(path: Path, signature: str = "decode") -> dict[str, Any]:
    """Constant buffer bytes of `signature`'s subgraph: `read` per step, `gathered` (read a row per step),
    and the file's size, for `weights_read_per_token` and reports."""
    from ai_edge_litert import schema_py_generated as schema

    names = _builtin_names()
    with open(path, "rb") as f, mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ) as buf:
        model = schema.Model.GetRootAs(buf, 0)
        keys = {model.SignatureDefs(i).SignatureKey().decode(): model.SignatureDefs(i).SubgraphIndex()
                for i in range(model.SignatureDefsLength())}
        if signature not in keys:
            raise KeyError(f"{path} has no signature {signature!r}; it has {sorted(keys)}")
        graph = model.Subgraphs(keys[signature])

        def buffer_bytes(index: int) -> int:
            b = model.Buffers(index)
            return int(b.Size()) if b.Offset() > 1 else int(b.DataLength())  # offset 0/1: inline data

        const = {}  # tensor index -> buffer index, for tensors holding constant data
        for t in range(graph.TensorsLength()):
            b = graph.Tensors(t).Buffer()
            if b > 0 and buffer_bytes(b) > 0:
                const[t] = b
        uses: dict[int, list[tuple[str, int, list[int]]]] = {}  # tensor -> (op, input position, op outputs)
        for k in range(graph.OperatorsLength()):
            op = graph.Operators(k)
            code = model.OperatorCodes(op.OpcodeIndex())
            name = names.get(max(code.BuiltinCode(), code.DeprecatedBuiltinCode()), "CUSTOM")
            outputs = [int(o) for o in op.OutputsAsNumpy()] if op.OutputsLength() else []
            for pos, t in enumerate(op.InputsAsNumpy() if op.InputsLength() else []):
                uses.setdefault(int(t), []).append((name, pos, outputs))

        def only_gathered(t: int) -> bool:
            seen = uses.get(t, [])
            return bool(seen) and all(
                pos in _GATHERED_INPUTS.get(name, ()) or (name in _PASS_THROUGH and all(map(only_gathered, outs)))
                for name, pos, outs in seen)

        read: set[int] = set()
        gathered: set[int] = set()
        for t, b in const.items():
            if t not in uses:
                continue
            (gathered if only_gathered(t) else read).add(b)
        gathered -= read  # a buffer another operator reads whole is read whole
        return {"file_bytes": Path(path).stat().st_size,
                "read_bytes": sum(buffer_bytes(b) for b in read),
                "gathered_bytes": sum(buffer_bytes(b) for b in gathered)}


def weights_read_per_token(folder: Path, manifest: dict[str, Any]) -> int:
    """Bytes of constant buffers a decode step reads (see the module docstring)."""
    return decode_weight_traffic(Path(folder) / manifest["artifact"]["file"])["read_bytes"]
