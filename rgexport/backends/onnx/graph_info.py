"""What a .onnx file holds: inputs, outputs, opset, operators and weight bytes (`rgexport info FILE.onnx`)."""

from __future__ import annotations

from collections import Counter
from pathlib import Path
from typing import Any

from rgexport.backends.onnx.export import _typed_bytes
from rgexport.errors import RgexportError


# Inspection -----------------------------------------------------------------------------------------
def describe_onnx(path: str | Path) -> dict[str, Any]:
    """Summary of a .onnx file for `rgexport info`, read without loading external weights.

    Returns:
        {
          "path": str, "file_bytes": int (the .onnx file alone),
          "ir_version": int, "opsets": {domain: version} ("" is the default domain),
          "producer": "pytorch 2.13.0", "metadata": {key: value} (rgexport.recipe, rgexport.method, ...),
          "inputs":  [{"name": str, "shape": [int | str], "dtype": "float32" | "int32" | ...}],
          "outputs": [same],
          "nodes": int, "ops": {"MatMul": 51, "com.microsoft.MatMulNBits": 38, ...} (most used first),
          "weights": {"count": int, "bytes": int (all initializers, external ones included),
                      "by_dtype": {"float32": bytes, ...}, "external_bytes": int,
                      "external_files": [str]},
        }
    """
    import onnx
    from google.protobuf.message import DecodeError
    from onnx import TensorProto, helper

    path = Path(path)
    try:
        model = onnx.load(str(path), load_external_data=False)
    except (DecodeError, ValueError, OSError) as e:
        raise RgexportError(f"{path} is not an ONNX model: {e}") from None

    def dtype_name(elem_type: int) -> str:
        try:
            return helper.tensor_dtype_to_np_dtype(elem_type).name
        except (KeyError, TypeError, ValueError):
            return TensorProto.DataType.Name(elem_type).lower()

    def io_entry(vi: Any) -> dict[str, Any]:
        dims = [d.dim_value if d.HasField("dim_value") else (d.dim_param or "?")
                for d in vi.type.tensor_type.shape.dim]
        return {"name": vi.name, "shape": dims, "dtype": dtype_name(vi.type.tensor_type.elem_type)}

    ops = Counter(f"{n.domain}.{n.op_type}" if n.domain not in ("", "ai.onnx") else n.op_type
                  for n in model.graph.node)
    by_dtype: Counter = Counter()
    external = set()
    external_bytes = 0
    for t in model.graph.initializer:
        if t.data_location == TensorProto.EXTERNAL:
            info = {e.key: e.value for e in t.external_data}
            nbytes = int(info.get("length", 0))
            external.add(info.get("location", ""))
            external_bytes += nbytes
        else:
            nbytes = _typed_bytes(t)
        by_dtype[dtype_name(t.data_type)] += nbytes
    return {
        "path": str(path),
        "file_bytes": path.stat().st_size,
        "ir_version": model.ir_version,
        "opsets": {o.domain: o.version for o in model.opset_import},
        "producer": f"{model.producer_name} {model.producer_version}".strip(),
        "metadata": {p.key: p.value for p in model.metadata_props},
        "inputs": [io_entry(i) for i in model.graph.input],
        "outputs": [io_entry(o) for o in model.graph.output],
        "nodes": len(model.graph.node),
        "ops": dict(ops.most_common()),
        "weights": {"count": len(model.graph.initializer), "bytes": sum(by_dtype.values()),
                    "by_dtype": dict(by_dtype), "external_bytes": external_bytes,
                    "external_files": sorted(external)},
    }
