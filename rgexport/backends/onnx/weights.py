"""Weight bytes one ONNX decode step reads: the decode graph's initializers, less gathered tables.

Initializers count wherever they are stored (a model above 2 GiB keeps them in weights.bin, beside a
decode.onnx of a few MB); a tensor read only as the data of a Gather (the embedding table: one row per
token, not all of them), or as a block-quantised table's data, scales and zero points in
GatherBlockQuantized, is left out.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

# Inputs that an op reads only at the gathered rows, by op type.
_GATHERED_INPUTS = {"Gather": (0,), "GatherBlockQuantized": (0, 2, 3)}


def decode_weight_traffic(path: Path) -> dict[str, Any]:
    """Initializer bytes of the graph at `path`: `read` per step and `gathered` (a row per step)."""
    import onnx

    from rgexport.backends.onnx.export import _initializer_bytes

    model = onnx.load(str(path), load_external_data=False)
    readers: dict[str, set[str]] = {}
    for node in model.graph.node:
        for i, name in enumerate(node.input):
            readers.setdefault(name, set()).add("gather" if i in _GATHERED_INPUTS.get(node.op_type, ()) else "read")
    gathered = [t for t in model.graph.initializer if readers.get(t.name) and "read" not in readers[t.name]]
    model.graph.ClearField("node")
    total = _initializer_bytes(model)
    del model.graph.initializer[:]
    model.graph.initializer.extend(gathered)
    gathered_bytes = _initializer_bytes(model)
    return {"file_bytes": Path(path).stat().st_size, "read_bytes": total - gathered_bytes,
            "gathered_bytes": gathered_bytes}


def weights_read_per_token(folder: Path, manifest: dict[str, Any]) -> int:
    """Bytes of initializers a decode step reads (see the module docstring)."""
    main = manifest["artifact"]["file"]
    if not main.endswith(".onnx"):  # an .ort-only artifact: its files, as the default does
        return sum(f["bytes"] for f in manifest["artifact"]["files"] if f["path"] == main)
    return decode_weight_traffic(Path(folder) / main)["read_bytes"]
