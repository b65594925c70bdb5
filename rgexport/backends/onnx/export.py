"""Export of the decode and prefill graphs (torch.onnx, dynamo) and writing them: names, external data, .ort files."""

from __future__ import annotations

import contextlib
import hashlib
import io
import os
import platform
import tempfile
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from rgexport.errors import RgexportError
from rgexport.graphs import input_name, output_name
from rgexport.model import Griffin

OPSET = 21  # the exporter turns anything below 18 into 18 silently; ONNX Runtime 1.20+ runs 21

DECODE_FILE = "decode.onnx"

PREFILL_FILE = "prefill.onnx"

WEIGHTS_FILE = "weights.bin"

ORT_CONFIG_FILE = "required_operators.config"

METHOD_FILES = {"decode": DECODE_FILE, "prefill": PREFILL_FILE}

# A serialised ModelProto (and an ORT-format flatbuffer) must stay below 2 GiB; keep a margin for the graph.
PROTOBUF_LIMIT = (1 << 31) - (64 << 20)

EXPORT_SCRATCH = "_export"  # streamed exports' graphs and float weights, inside the work folder until `write`

_EXTERNAL_MIN_BYTES = 1024  # tensors smaller than this stay inside the .onnx files

_ALIGN = 4096  # external tensors start on page boundaries, so runtimes can map them

class OnnxGraphs(dict):
    """`export`'s (and `lower`'s) result, {method: ModelProto}, with the model the graphs came from (a
    calibrated recipe runs it over the calibration text in `lower` to capture real (token, position, state)
    inputs) and, for a streamed export, the folder its external initializers live in (`base_dir`)."""

    model: Griffin | None = None
    base_dir: Path | None = None

def _token_input(method: str) -> str:
    return "token" if method == "decode" else "tokens"

def expected_names(model_or_specs: Any, method: str) -> tuple[list[str], list[str]]:
    """Input and output names of one method's graph, in order."""
    specs = model_or_specs.state_spec(1) if isinstance(model_or_specs, Griffin) else model_or_specs
    inputs = [_token_input(method), "position", *[input_name(s) for s in specs]]
    outputs = ["logits", *[output_name(s) for s in specs]]
    return inputs, outputs

def _check_names(proto: Any, method: str, inputs: list[str], outputs: list[str]) -> None:
    got_in = [i.name for i in proto.graph.input]
    got_out = [o.name for o in proto.graph.output]
    if got_in != inputs or got_out != outputs:
        raise RgexportError(
            f"The exported {method} graph has inputs {got_in[:4]}... and outputs {got_out[:4]}..., expected "
            f"{inputs[:4]}... and {outputs[:4]}... (torch.onnx.export did not apply input_names/output_names)"
        )

def _initializer_bytes(proto: Any) -> int:
    total = 0
    for t in proto.graph.initializer:
        if t.data_location == 1:  # EXTERNAL
            total += int({e.key: e.value for e in t.external_data}.get("length", 0))
        else:
            total += len(t.raw_data) or _typed_bytes(t)
    return total

def _external_info(t: Any) -> dict[str, str]:
    return {e.key: e.value for e in t.external_data}

def _tensor_raw(t: Any, base_dir: Path | None) -> bytes:
    """An initializer's bytes, read from `base_dir` (only this tensor's range) when it is external."""
    from onnx import TensorProto, numpy_helper

    if t.data_location == TensorProto.EXTERNAL:
        if base_dir is None:
            raise RgexportError(f"Tensor {t.name} is external and no folder was given to read it from")
        info = _external_info(t)
        with open(Path(base_dir) / info["location"], "rb") as f:
            f.seek(int(info.get("offset", 0)))
            return f.read(int(info["length"])) if "length" in info else f.read()
    return t.raw_data or numpy_helper.from_array(numpy_helper.to_array(t)).raw_data

def parameter_bytes(model: Any) -> int:
    return sum(p.numel() * p.element_size() for p in model.parameters())

def _typed_bytes(t: Any) -> int:
    from onnx import numpy_helper

    return numpy_helper.to_array(t).nbytes if not t.raw_data else len(t.raw_data)

# Writing --------------------------------------------------------------------------------------------
def _save_with_shared_weights(protos: Sequence[Any], paths: Sequence[Path], data_path: Path,
                              base_dir: Path | None = None) -> None:
    """Saves models whose large tensors live in one data file, each distinct tensor stored once.

    The decode and prefill graphs hold the same weights (under exporter-generated names that differ);
    tensors are matched by element type and content (bytes), and every tensor with those bytes points at
    one copy whatever its shape: int4's tied table is the gather's [vocab, width/2] data and the head's
    [vocab, blocks, 16] `MatMulNBits` weight, the same bytes and scales (both blocks of 32 along the
    width, symmetric, zero point 8), so it is stored once. Tensors already external (a streamed export)
    are read one at a time from `base_dir`.
    """
    from onnx import TensorProto, save_model

    where: dict[tuple, tuple[int, int]] = {}
    with open(data_path, "wb") as f:
        for proto, path in zip(protos, paths):
            for t in proto.graph.initializer:
                if t.data_location == TensorProto.EXTERNAL and base_dir is None:
                    raise RgexportError(f"Tensor {t.name} is already external; write expects weights in memory")
                raw = _tensor_raw(t, base_dir)
                if len(raw) < _EXTERNAL_MIN_BYTES:
                    if t.data_location == TensorProto.EXTERNAL:  # small, from a streamed export: inline it
                        del t.external_data[:]
                        t.data_location = TensorProto.DEFAULT
                        t.raw_data = raw
                    continue
                key = (t.data_type, len(raw), hashlib.sha256(raw).digest())
                if key not in where:
                    offset = -f.tell() % _ALIGN + f.tell()
                    f.seek(offset)
                    f.write(raw)
                    where[key] = (offset, len(raw))
                offset, length = where[key]
                for field in ("raw_data", "float_data", "int32_data", "int64_data", "double_data", "uint64_data"):
                    t.ClearField(field)
                t.data_location = TensorProto.EXTERNAL
                del t.external_data[:]
                for k, v in (("location", data_path.name), ("offset", str(offset)), ("length", str(length))):
                    entry = t.external_data.add()
                    entry.key, entry.value = k, v
            save_model(proto, str(path))

def convert_to_ort(onnx_paths: Sequence[Path], out_dir: Path, target_platform: str = "arm") -> list[Path]:
    """Converts .onnx files to ORT format with ONNX Runtime's own tool -> [*.ort, required_operators.config].

    Uses `onnxruntime.tools.convert_onnx_models_to_ort` (fixed optimisations at level "all", without the
    x86-only NCHWc layout for target "arm"), which also writes the operator list a reduced ONNX Runtime
    Mobile build needs. The tool converts every .onnx file of a folder into one config, so the files are
    linked into a scratch folder first.
    """
    from onnxruntime.tools.convert_onnx_models_to_ort import OptimizationStyle, convert_onnx_models_to_ort

    out_dir = Path(out_dir)
    with tempfile.TemporaryDirectory(prefix="rgexport-ort-") as tmp:
        staging = Path(tmp)
        for path in onnx_paths:
            os.symlink(Path(path).resolve(), staging / Path(path).name)
        weights = Path(onnx_paths[0]).parent / WEIGHTS_FILE
        if weights.is_file():
            os.symlink(weights.resolve(), staging / WEIGHTS_FILE)
        log = io.StringIO()
        try:
            with contextlib.redirect_stdout(log):
                convert_onnx_models_to_ort(staging, output_dir=out_dir, optimization_styles=[OptimizationStyle.Fixed],
                                           target_platform=target_platform)
        except Exception as e:  # noqa: BLE001 - ORT's pybind errors, ValueError, OSError: all mean "no .ort"
            raise RgexportError(f"ORT-format conversion failed: {e}\n{log.getvalue()[-2000:]}") from None
    ort_files = [out_dir / Path(p).with_suffix(".ort").name for p in onnx_paths]
    config = out_dir / ORT_CONFIG_FILE
    missing = [p.name for p in (*ort_files, config) if not p.is_file()]
    if missing:
        raise RgexportError(f"ORT-format conversion did not write {missing}:\n{log.getvalue()[-2000:]}")
    return [*ort_files, config]

def _cpu_has_fp16_kernels() -> bool:
    """ONNX Runtime's CPU provider has float16 MatMul/Gemm kernels on arm64 builds only."""
    return platform.machine().lower() in ("arm64", "aarch64")
