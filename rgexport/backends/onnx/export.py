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

EXTERNAL_MIN_BYTES = 1024  # tensors smaller than this stay inside the .onnx files

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
def append_aligned(f: Any, raw: Any) -> int:
    """Writes `raw` to the open file `f` at its next `_ALIGN` boundary; returns the offset."""
    offset = -f.tell() % _ALIGN + f.tell()
    f.seek(offset)
    f.write(raw)
    return offset


def point_external(t: Any, location: str, offset: int, length: int) -> None:
    """Makes initializer `t` refer to `length` bytes at `offset` of `location` (its own data cleared)."""
    from onnx import TensorProto

    for field in ("raw_data", "float_data", "int32_data", "int64_data", "double_data", "uint64_data"):
        t.ClearField(field)
    t.data_location = TensorProto.EXTERNAL
    del t.external_data[:]
    for key, value in (("location", location), ("offset", str(offset)), ("length", str(length))):
        entry = t.external_data.add()
        entry.key, entry.value = key, value


def offload_initializers(model: Any, base_dir: str | Path, min_bytes: int = EXTERNAL_MIN_BYTES) -> int:
    """Moves every in-memory initializer of at least `min_bytes` into a new file of `base_dir` (in place),
    leaving an external-data reference that `write` reads from there; returns the bytes moved."""
    from onnx import TensorProto

    moved = 0
    with tempfile.NamedTemporaryFile(dir=base_dir, prefix="lowered-", suffix=".bin", delete=False) as f:
        for t in model.graph.initializer:
            if t.data_location == TensorProto.EXTERNAL or len(t.raw_data) < min_bytes:
                continue
            length = len(t.raw_data)
            point_external(t, Path(f.name).name, append_aligned(f, t.raw_data), length)
            moved += length
    return moved


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
                if len(raw) < EXTERNAL_MIN_BYTES:
                    if t.data_location == TensorProto.EXTERNAL:  # small, from a streamed export: inline it
                        del t.external_data[:]
                        t.data_location = TensorProto.DEFAULT
                        t.raw_data = raw
                    continue
                key = (t.data_type, len(raw), hashlib.sha256(raw).digest())
                if key not in where:
                    where[key] = (append_aligned(f, raw), len(raw))
                point_external(t, data_path.name, *where[key])
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


# Weights from a stream ------------------------------------------------------------------------------
# In the export scratch folder: the stream's float weights, in the layout the graphs use.
STREAMED_WEIGHTS_FILE = "float32.bin"

# onnxscript's constant folder (the exporter's `optimize=True`) reads constant inputs up to this many elements
# (`DEFAULT_CONSTANT_FOLD_INPUT_SIZE_LIMIT`) and folds nodes over them: those get their real values before
# optimising, larger ones stay external (the folder only looks at their size), so the folding decisions are
# the ones the in-memory export makes.
FOLD_INPUT_LIMIT = 8192

_GRAPH_PREFIX = "model."  # DecodeIO/PrefillIO hold the Griffin as `model`: its parameters' initializer names


def _is_fake(value: Any) -> bool:
    from torch._subclasses.fake_tensor import FakeTensor

    return isinstance(getattr(value.const_value, "raw", None), FakeTensor)


def _single_transpose(value: Any) -> Any | None:
    """The Transpose(perm=[1, 0]) node that is `value`'s only use (the exporter's `linear`), else None;
    the constant folder would fold it into a transposed initializer."""
    uses = list(value.uses())
    if len(uses) != 1 or len(value.shape) != 2:
        return None
    node = uses[0].node
    perm = node.attributes.get("perm")
    if node.op_type != "Transpose" or node.domain != "" or (perm is not None and list(perm.as_ints()) != [1, 0]):
        return None
    return node


def fill_from_stream(programs: dict[str, Any], stream: Any, base_dir: Path) -> dict[str, Any]:
    """Gives exported graphs whose parameters are FakeTensors their weights from `stream`, one part at a time.

    `programs`: {method: ONNXProgram} exported with `optimize=False` from `streaming.fake_griffin(config)`
    (shapes, no storage). Each parameter is read once from the stream (a `StreamedCheckpoint`: the embedding,
    each block, the final norm, each float32 only while in hand) and written into `STREAMED_WEIGHTS_FILE` in
    `base_dir` in the layout the graphs use: a parameter whose only use is `Transpose` (every `nn.Linear`)
    is written transposed and the Transpose dropped, which is what the constant folder does in memory.
    Parameters of at most `FOLD_INPUT_LIMIT` elements (norm scales, biases, RG-LRU gates) stay in memory, so
    that the optimiser folds over them as it does for an in-memory export. Afterwards every initializer is
    either real or an `ExternalTensor` into that file, and the programs can be optimised and serialised
    without the float32 model ever being whole. Returns facts: tensors written, bytes, parts read.
    """
    import numpy as np
    import onnx_ir as ir

    # What each graph wants of each parameter: {(fqn, transposed)}.
    wanted: dict[str, set[bool]] = {}
    plans: dict[str, list[tuple[Any, str, Any]]] = {}  # method -> [(value, fqn, transpose node or None)]
    for method, program in programs.items():
        plan = plans.setdefault(method, [])
        for name, value in program.model.graph.initializers.items():
            if not _is_fake(value):
                continue
            if not name.startswith(_GRAPH_PREFIX):
                raise RgexportError(f"The exported {method} graph has a weight '{name}' that is not a model parameter")
            fqn = name[len(_GRAPH_PREFIX):]
            node = _single_transpose(value)
            wanted.setdefault(fqn, set()).add(node is not None)
            plan.append((value, fqn, node))

    base_dir = Path(base_dir)
    where: dict[tuple[str, bool], tuple[int, int, tuple[int, ...]]] = {}
    small: dict[tuple[str, bool], np.ndarray] = {}
    parts = 0
    with open(base_dir / STREAMED_WEIGHTS_FILE, "wb") as f:
        def take(prefix: str, part: Any) -> None:
            for key, tensor in part.state_dict().items():
                fqn = prefix + key
                for transposed in sorted(wanted.get(fqn, ())):
                    t = (tensor.t() if transposed else tensor).detach().contiguous()
                    if t.numel() <= FOLD_INPUT_LIMIT:
                        small[(fqn, transposed)] = t.numpy().copy()
                        continue
                    raw = memoryview(t.numpy()).cast("B")  # the tensor's own bytes: no copy of a 2.6 GB table
                    where[(fqn, transposed)] = (append_aligned(f, raw), raw.nbytes, tuple(t.shape))
                    del raw

        take("embedder.", stream.embedder())
        parts += 1
        for i in range(len(stream.config.block_types)):
            take(f"blocks.{i}.", stream.block(i))  # the block goes when `take` returns
            parts += 1
        take("final_norm.", stream.final_norm())
        parts += 1

    missing = sorted({fqn for fqn, ts in wanted.items() for t in ts if (fqn, t) not in where and (fqn, t) not in small})
    if missing:
        raise RgexportError(f"The checkpoint stream has no tensor for the graph weights {missing[:3]}")
    for method, plan in plans.items():
        graph = programs[method].model.graph
        for value, fqn, node in plan:
            key = (fqn, node is not None)
            name = value.name + (".T" if node is not None else "")
            if key in small:
                tensor = ir.Tensor(small[key], name=name)
            else:
                offset, length, shape = where[key]
                tensor = ir.ExternalTensor(STREAMED_WEIGHTS_FILE, offset, length, ir.DataType.FLOAT,
                                           shape=ir.Shape(shape), name=name, base_dir=str(base_dir))
            if node is None:
                value.const_value = tensor
                continue
            # The folded Transpose: a new initializer in its place, the parameter and the node removed.
            folded = ir.Value(name=name, shape=ir.Shape(tensor.shape), type=ir.TensorType(ir.DataType.FLOAT),
                              const_value=tensor)
            ir.convenience.replace_all_uses_with(node.outputs[0], folded)
            graph.remove(node, safe=True)
            del graph.initializers[value.name]
            graph.register_initializer(folded)
    return {"tensors": len(where), "bytes": (base_dir / STREAMED_WEIGHTS_FILE).stat().st_size,
            "in_memory_tensors": len(small), "parts": parts}
