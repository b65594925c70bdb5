"""Weight bytes one Core ML decode call reads: the decode function's weight blobs, less gathered tables.

An ML program keeps its large constants as blobs in `weights/weight.bin`, referenced by `const` ops or
bound directly as an op's argument (`blobFileValue` offsets); the decode and prefill functions of one
package reference the same blobs. A decode call reads every blob its ops take, except a table that is
only gathered from (`gather`'s `x`: one row per token), also when it reaches the gather through a
`constexpr_*` decompression op (an int4 or palettised embedding). rgexport's packages keep the tied table
once, read whole by the head, so for them nothing is left out. Sizes come from each blob's own header in
weight.bin (MIL blob storage: a 64-byte metadata record per blob, `sizeInBytes` at byte 8), so only the
headers are read. Bytes are what the package stores (compressed where the recipe compresses).
"""

from __future__ import annotations

import struct
from pathlib import Path
from typing import Any

_GATHERED_INPUTS = {"gather": ("x",)}
_BLOB_SENTINEL = 0xDEADBEEF


def _blob_bytes(weights: Path, offsets: set[int]) -> dict[int, int]:
    out = {}
    with open(weights, "rb") as f:
        for offset in offsets:
            f.seek(offset)
            sentinel, _dtype, size = struct.unpack("<IIQ", f.read(16))
            if sentinel != _BLOB_SENTINEL:
                raise ValueError(f"{weights}: no blob header at offset {offset}")
            out[offset] = size
    return out


def decode_weight_traffic(path: Path, function: str = "decode") -> dict[str, Any]:
    """Blob bytes of `function`: `read` per call, `gathered` (a row per call), and the package's size."""
    import coremltools as ct
    from coremltools.models.utils import _try_get_weights_dir_path

    path = Path(path)
    spec = ct.utils.load_spec(str(path))
    functions = spec.mlProgram.functions
    if function not in functions:
        raise KeyError(f"{path} has no function {function!r}; it has {sorted(functions)}")
    fspec = functions[function]
    block = fspec.block_specializations[fspec.opset]
    # Every use of a blob: through a const op's output, or bound directly as an op's argument value (how
    # constexpr_* ops of iOS 18 hold their compressed data). (op type, parameter, op outputs).
    blob_uses: dict[int, list[tuple[str, str, list[str]]]] = {}
    blob_of: dict[str, int] = {}  # const output name -> blob offset
    uses: dict[str, list[tuple[str, str, list[str]]]] = {}  # var -> (op type, parameter, op outputs)
    for o in block.operations:
        outputs = [out.name for out in o.outputs]
        if o.type == "const":
            val = o.attributes["val"]
            if val.WhichOneof("value") == "blobFileValue":
                blob_of[outputs[0]] = int(val.blobFileValue.offset)
            continue
        for param, arg in o.inputs.items():
            for b in arg.arguments:
                if b.WhichOneof("binding") == "name":
                    uses.setdefault(b.name, []).append((o.type, param, outputs))
                elif b.value.WhichOneof("value") == "blobFileValue":
                    blob_uses.setdefault(int(b.value.blobFileValue.offset), []).append((o.type, param, outputs))
    for var, offset in blob_of.items():
        blob_uses.setdefault(offset, []).extend(uses.get(var, []))

    def only_gathered(seen: list[tuple[str, str, list[str]]]) -> bool:
        return bool(seen) and all(
            param in _GATHERED_INPUTS.get(kind, ())
            or (kind.startswith("constexpr_") and all(only_gathered(uses.get(out, [])) for out in outs))
            for kind, param, outs in seen)

    read = {offset for offset, seen in blob_uses.items() if seen and not only_gathered(seen)}
    gathered = {offset for offset, seen in blob_uses.items() if seen and only_gathered(seen)} - read
    sizes = _blob_bytes(Path(_try_get_weights_dir_path(str(path))) / "weight.bin", read | gathered)
    package = sum(p.stat().st_size for p in path.rglob("*") if p.is_file()) if path.is_dir() else path.stat().st_size
    return {"file_bytes": package, "read_bytes": sum(sizes[o] for o in read),
            "gathered_bytes": sum(sizes[o] for o in gathered)}


def weights_read_per_token(folder: Path, manifest: dict[str, Any]) -> int:
    """Blob bytes a decode call reads (see the module docstring)."""
    return decode_weight_traffic(Path(folder) / manifest["artifact"]["file"])["read_bytes"]
