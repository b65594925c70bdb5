"""ONNX backend: two graphs with the state as named inputs and outputs, run in ONNX Runtime.

Stages (see `rgexport.backends.base`):
1. quantize: nothing at torch level; every recipe works on the exported ONNX graphs.
2. export: `torch.onnx.export(dynamo=True)` of `DecodeIO` and `PrefillIO` at opset 21, static shapes.
   Inputs `token`/`tokens`, `position`, `state.<name>`; outputs `logits`, `new_state.<name>`
   (`rgexport.graphs.input_name` / `output_name`), checked in the written model.
3. lower: the recipe's graph passes (`rgexport.backends.onnx.quant`), then the exporter's debug metadata
   is dropped and the recipe recorded in the model's metadata.
4. write: `decode.onnx` (the main file) and `prefill.onnx`, self-contained while they fit protobuf's
   2 GB limit; above it (or with `options["external_data"] = True`) both point into one `weights.bin`
   that holds each distinct tensor once. Then `decode.ort`, `prefill.ort` and `required_operators.config`
   for ONNX Runtime Mobile (the ORT format has no external data, so it is skipped above 2 GB, and for fp16
   on x86 hosts, where the converter would bake float32 Casts into it; see `OnnxBackend.write`).

Options (`BuildContext.options`, from the target profile): `opset` (default 21, at least 18),
`external_data` ("auto", True, False), `ort_format` (default True), `ort_target` ("arm" or "amd64"),
`calibration_method` (qdq8: "minmax" (default), "entropy" or "percentile"), `stream_export` ("auto", True,
False), `fuse` (default True: RMSNorm and tanh-GELU become one ONNX Runtime node each, `onnx_fusions`).

Large models (float32 weights above `PROTOBUF_LIMIT`, or `stream_export=True`) never hold an exported graph's
weights in memory: each graph is saved by the exporter straight from the torch tensors into a scratch folder
(`EXPORT_SCRATCH` in the work folder, external data), and `export` returns protos whose initializers point
there. int4 quantises tensor by tensor from those files and fp32 copies them into `weights.bin`; `write`
deletes the scratch folder. In memory, `program.model_proto` of each graph was another full copy of the
weights: torch model + decode + prefill = three copies, 32 GB for RecurrentGemma-2B (notes/perf.md).

The calibrated recipe qdq8 runs the model itself (the one `export` returns with the graphs, `OnnxGraphs.model`)
over `ctx.calibration_tokens` in `lower`, capturing real (token, position, state) inputs for each graph.

`OnnxRunner` keeps the state in two sets of OrtValues bound with IO binding and swaps them after each
call, so the state never passes through numpy between tokens. `describe_onnx` summarises a .onnx file
for `rgexport info`.
"""

from __future__ import annotations

import contextlib
import copy
import hashlib
import io
import os
import platform
import shutil
import tempfile
import time
from collections import Counter
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np

from rgexport.backends.base import Backend, BuildContext, Recipe, Runner, standard_io_contract
from rgexport.errors import RgexportError
from rgexport.graphs import DecodeIO, PrefillIO, input_name, output_name
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

RECIPES = {
    "fp32": Recipe("fp32", "float32 weights and compute; the tied head read through Gemm(transB=1)"),
    "fp16": Recipe("fp16", "float16 weights and activations; RG-LRU, RMSNorm, positions and I/O in float32",
                   quantized=True),
    "int8": Recipe("int8", "ONNX Runtime dynamic quantisation: 8-bit (uint8) weights, uint8 activations per call",
                   quantized=True),
    "int4": Recipe("int4", "4-bit weights (MatMulNBits / GatherBlockQuantized, block 32, symmetric); the "
                   "matmuls quantise activations to int8 per block (accuracy_level 4; option "
                   "int4_accuracy_level=0 computes in float32)", quantized=True),
    "qdq8": Recipe(
        "qdq8",
        "static int8 QDQ calibrated on real text: uint8 activations (option calibration_method: minmax (default), "
        "entropy, percentile) and uint8 weights, per tensor, on the MatMul/Gemm of the MLPs, recurrent-block "
        "linears, RG-LRU gates, attention projections and the tied head/embedding (QLinearMatMul/QGemm in ONNX "
        "Runtime). Float by measurement on the shipped model: the RG-LRU recurrence and its state (quantising it "
        "too: top-1 97.5% -> 94.9%, mean KL 0.004 -> 0.007), Conv1D, norms, attention scores/masks (alone: top-1 "
        "87%, the -30000 mask) and cache writes, gating, residuals (notes/onnx.md)",
        quantized=True, calibrated=True),
}


INT4_ACCURACY_LEVEL = 4  # MatMulNBits computes with int8 activations (see OnnxBackend.lower)


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


# qdq8: what stays float, and the calibration inputs ----------------------------------------------------
QDQ8_FLOAT_GROUPS = ["rglru", "conv1d", "attention_scores", "attention_other", "ring_write", "rope", "norms",
                     "gating", "residual", "top", "position", "embedding output"]
QDQ8_NOTE = ("qdq8: static int8 on the MLP, recurrent-block, RG-LRU gate and attention projection MatMuls and the "
             "tied head/embedding (uint8 activations calibrated with {method} on real decode/prefill inputs, uint8 "
             "weights). Kept float after a per-group sensitivity study on the shipped tiny model (512 held-out "
             "tokens, notes/onnx.md): the RG-LRU recurrence and its state (quantising it too took top-1 agreement "
             "from 97.5% to 94.9% and mean KL from 0.0039 to 0.0074), the Conv1D (+0.0016 KL) and norms (+0.0028), "
             "gating and residuals (elementwise: no weights to shrink), and the attention scores, masks and cache "
             "writes (quantising the -30000 mask alone: top-1 87%).")
CALIBRATION_SAMPLES = 256  # decode samples kept (evenly over positions); prefill keeps every chunk up to this


def _calibration_inputs(ctx: BuildContext) -> tuple[str, list[list[int]]]:
    """(calibration method, token sequences) of a calibrated recipe, checked."""
    from rgexport.backends.onnx.quant import DEFAULT_CALIBRATION_METHOD, calibration_method

    method = calibration_method(ctx.options.get("calibration_method", DEFAULT_CALIBRATION_METHOD))
    return method, ctx.calibration_sequences()


def calibration_feeds(model: Griffin, sequences: list[list[int]], method: str, chunk: int,
                      max_samples: int = CALIBRATION_SAMPLES) -> list[dict[str, np.ndarray]]:
    """Input dicts for one graph (`method` "decode" or "prefill") captured along the fp32 model's own
    trajectory over `sequences` (`rgexport.calibrate.capture_samples`: positions past the window, real state)."""
    from rgexport.calibrate import capture_samples

    t = 1 if method == "decode" else chunk
    if max(len(s) for s in sequences) < t:
        raise RgexportError(f"calibration sequences are shorter than one prefill chunk ({t} tokens)")
    inputs, _ = expected_names(model, method)
    feeds = []
    for sample in capture_samples(model, sequences, chunk=t, max_samples=max_samples):
        tokens = sample.tokens.numpy().astype(np.int32)
        feed = {inputs[0]: tokens.reshape(-1) if method == "decode" else tokens,
                "position": sample.position.numpy().astype(np.int32).reshape(1)}
        for name in inputs[2:]:
            feed[name] = sample.state[name.removeprefix("state.")].numpy().astype(np.float32)
        feeds.append(feed)
    return feeds


class OnnxBackend(Backend):
    name = "onnx"
    extra = "onnx"
    artifact_suffix = ".onnx"
    recipes = RECIPES
    default_recipe = "fp32"
    packages = ("onnx", "onnxruntime", "onnxscript", "torch")
    options = {
        "opset": "ONNX opset, at least 18 (default 21)",
        "external_data": '"auto" (default: above 2 GB), true or false: weights in one weights.bin',
        "ort_format": "also write .ort files for ONNX Runtime Mobile (default true)",
        "ort_target": '"arm" (default) or "amd64": the platform the .ort files are optimised for',
        "calibration_method": 'qdq8: "minmax" (default), "entropy" or "percentile"',
        "stream_export": '"auto" (default: above 2 GB), true or false: export graphs straight to disk',
        "fuse": "fuse RMSNorm and tanh-GELU into one ONNX Runtime node each (default true)",
        "int4_accuracy_level": "int4: MatMulNBits compute, 4 (int8 activations, default) or 0 (float32: "
        "2.5x slower at 2B; notes/onnx.md)",
        "execution_provider": "the provider the app will run (recorded in the manifest; validation here runs "
        "CPUExecutionProvider)",
    }

    # Build stages --------------------------------------------------------------------------------
    def quantize(self, model: Griffin, ctx: BuildContext) -> Griffin:
        """Checks the recipe (and a calibrated recipe's inputs, before the export's cost); the model goes
        on unchanged (every recipe works on the ONNX graphs)."""
        self.check_recipe(ctx.recipe)
        if self.recipes[ctx.recipe].calibrated:
            _calibration_inputs(ctx)
        model.eval()
        for p in model.parameters():
            p.requires_grad_(False)
        return model

    def export(self, prepared: Griffin, ctx: BuildContext) -> dict[str, Any]:
        """Exports decode and prefill with the torch.export-based exporter -> {method: ModelProto}."""
        self.require("onnx")
        self.require("onnxscript")
        import torch

        from rgexport.backends.onnx.fusions import fuse_for_ort
        from rgexport.backends.onnx.quant import drop_initializer_value_info

        opset = int(ctx.options.get("opset", OPSET))
        if opset < 18:
            raise RgexportError(
                f"opset {opset} is not available: torch.onnx.export(dynamo=True) writes opset 18 when asked for "
                f"less and cannot convert down; use 18 or later (default {OPSET})"
            )
        stream = ctx.options.get("stream_export", "auto")
        if stream == "auto":
            stream = parameter_bytes(prepared) > PROTOBUF_LIMIT
        graphs = OnnxGraphs()
        # Only a calibrated recipe runs the model in `lower`; a streamed export lets it go, so that the
        # build can free the float32 weights before lowering.
        graphs.model = prepared if not stream or self.recipes[ctx.recipe].calibrated else None
        if stream:
            graphs.base_dir = Path(ctx.work_dir) / EXPORT_SCRATCH
            graphs.base_dir.mkdir(parents=True, exist_ok=True)
        seconds, fused = {}, {}
        modules = {"decode": DecodeIO(prepared), "prefill": PrefillIO(prepared, ctx.prefill_chunk)}
        for method, module in modules.items():
            module.eval()
            inputs, outputs = expected_names(prepared, method)
            start = time.perf_counter()
            with torch.no_grad():
                program = torch.onnx.export(
                    module, module.example_inputs(), dynamo=True, opset_version=opset,
                    input_names=inputs, output_names=outputs, optimize=True, verbose=False,
                )
            if ctx.options.get("fuse", True):
                fused[method] = fuse_for_ort(program.model, opset)
            if stream:
                # The exported IR wraps the torch tensors without copying; `model_proto` would serialise
                # every weight into the proto. Saving with external data writes them one at a time.
                import onnx

                path = graphs.base_dir / METHOD_FILES[method]
                program.save(path, external_data=True)
                # Something beyond this function keeps the exporter's IR alive after `program` goes (seen at
                # 2B: the float32 parameters stayed resident through lowering, held by the IR's TorchTensors);
                # cutting the IR's links to the torch tensors lets the build free them.
                for value in program.model.graph.initializers.values():
                    value.const_value = None
                del program
                proto = onnx.load(str(path), load_external_data=False)
            else:
                proto = program.model_proto
            seconds[method] = round(time.perf_counter() - start, 2)
            _check_names(proto, method, inputs, outputs)
            written = {o.domain: o.version for o in proto.opset_import}.get("", None)
            if written != opset:
                raise RgexportError(f"Asked the exporter for opset {opset}, it wrote opset {written}")
            drop_initializer_value_info(proto)
            graphs[method] = proto
        ctx.facts["onnx_export_seconds"] = seconds
        ctx.facts["onnx_opset"] = opset
        ctx.facts["onnx_fused"] = fused  # {method: {op: count}}; empty with option fuse=False
        if "execution_provider" in ctx.options:
            ctx.facts["onnx_app_execution_provider"] = str(ctx.options["execution_provider"])
        ctx.facts["onnx_streamed_export"] = bool(stream)
        return graphs

    def lower(self, exported: dict[str, Any], ctx: BuildContext) -> dict[str, Any]:
        """Applies the recipe's graph passes to both graphs -> {method: ModelProto}."""
        self.check_recipe(ctx.recipe)
        self.require("onnx")
        from rgexport.backends.onnx import quant as q

        large = max(_initializer_bytes(p) for p in exported.values()) > PROTOBUF_LIMIT
        base_dir = getattr(exported, "base_dir", None)  # a streamed export: weights in files there
        lowered = OnnxGraphs()
        lowered.base_dir = base_dir
        for method, proto in exported.items():
            inputs = [i.name for i in proto.graph.input]
            outputs = [o.name for o in proto.graph.output]
            if base_dir is not None and ctx.recipe not in ("fp32", "int4"):
                # These recipes' passes need every weight in memory (int4 reads tensor by tensor, fp32 copies
                # the files in `write`); a deep copy of the streamed proto is cheap, then it is loaded.
                from onnx.external_data_helper import load_external_data_for_model

                proto = copy.deepcopy(proto)
                load_external_data_for_model(proto, str(base_dir))
            if ctx.recipe in ("fp32", "fp16"):
                proto = copy.deepcopy(proto)  # `exported` stays reusable for other recipes
                tied = q.tie_head_as_gemm(proto)
                if ctx.recipe == "fp16":
                    proto = q.to_fp16(proto)
            elif ctx.recipe == "int8":
                self.require("onnxruntime")
                proto = q.quantize_int8(proto, large=large)
                tied = 0
            elif ctx.recipe == "qdq8":
                self.require("onnxruntime")
                method_name, tokens = _calibration_inputs(ctx)
                model = getattr(exported, "model", None)
                if model is None:
                    raise RgexportError("qdq8 calibrates by running the model: lower() needs export()'s result "
                                        "(OnnxGraphs, which carries it), not bare ModelProtos")
                feeds = calibration_feeds(model, tokens, method, ctx.prefill_chunk)
                proto, facts = q.quantize_qdq8(proto, feeds, method=method_name, large=large)
                ctx.facts.setdefault("onnx_qdq8", {"float_groups": QDQ8_FLOAT_GROUPS,
                                                   "calibration_tokens": sum(len(t) for t in tokens)})
                ctx.facts["onnx_qdq8"][method] = facts
                tied = 1
            else:
                self.require("onnxruntime")
                # 4 by default: int8 compute decoded the 2B shape 2.5x faster than float32 compute, and on the
                # shipped model gave top-1 92.0% vs 91.8%, the same KL (notes/onnx.md).
                level = ctx.options.get("int4_accuracy_level", INT4_ACCURACY_LEVEL)
                if level not in (0, 1, 2, 3, 4):
                    raise RgexportError(f"int4_accuracy_level is {level!r}; expected 0 or 1 (float32 compute), "
                                        "2 (float16), 3 (bfloat16) or 4 (int8 activations, default)")
                proto = q.quantize_int4(proto, base_dir=base_dir, accuracy_level=level)
                ctx.facts["onnx_int4_accuracy_level"] = level
                tied = 0
            q.strip_debug_metadata(proto)
            _check_names(proto, method, inputs, outputs)
            meta = {"rgexport.recipe": ctx.recipe, "rgexport.method": method,
                    "rgexport.prefill_chunk": str(ctx.prefill_chunk)}
            del proto.metadata_props[:]
            for key, value in meta.items():
                prop = proto.metadata_props.add()
                prop.key, prop.value = key, value
            lowered[method] = proto
            ctx.facts.setdefault("onnx_head", {})[method] = "gemm_transB_tied" if tied else (
                "untied_quantized" if ctx.recipe == "int4" else "transpose_of_embedding")
        if ctx.recipe == "qdq8":
            ctx.notes.append(QDQ8_NOTE.format(method=ctx.facts["onnx_qdq8"]["decode"]["calibration_method"]))
        return lowered

    def write(self, lowered: dict[str, Any], ctx: BuildContext) -> list[Path]:
        """Writes decode.onnx (main), prefill.onnx [, weights.bin], then the ORT-format files.

        Consumes `lowered`: with external data the tensors' bytes move into weights.bin.
        """
        self.require("onnx")
        import onnx

        out_dir = Path(ctx.work_dir)
        out_dir.mkdir(parents=True, exist_ok=True)
        base_dir = getattr(lowered, "base_dir", None)
        weight_bytes = max(_initializer_bytes(p) for p in lowered.values())
        external = ctx.options.get("external_data", "auto")
        if external == "auto":
            external = weight_bytes > PROTOBUF_LIMIT
        paths = [out_dir / METHOD_FILES[m] for m in ("decode", "prefill")]
        if base_dir is not None and not external:
            from onnx.external_data_helper import load_external_data_for_model

            for proto in lowered.values():  # a small streamed export (stream_export=True): self-contained files
                load_external_data_for_model(proto, str(base_dir))
        if external:
            _save_with_shared_weights([lowered["decode"], lowered["prefill"]], paths, out_dir / WEIGHTS_FILE,
                                      base_dir=base_dir)
            files = [*paths, out_dir / WEIGHTS_FILE]
            ctx.notes.append(
                f"ONNX weights are external data in {WEIGHTS_FILE}, one copy shared by decode.onnx and "
                "prefill.onnx; keep the three files together."
            )
        else:
            for proto, path in zip((lowered["decode"], lowered["prefill"]), paths):
                onnx.save_model(proto, str(path))
            files = list(paths)
        if base_dir is not None and Path(base_dir).resolve().parent == out_dir.resolve():
            shutil.rmtree(base_dir)  # the streamed export's scratch files are not part of the artifact
        ctx.facts["onnx_files"] = {m: METHOD_FILES[m] for m in ("decode", "prefill")}
        ctx.facts["onnx_external_data"] = WEIGHTS_FILE if external else None

        if ctx.options.get("ort_format", True):
            if ctx.recipe == "fp16" and not _cpu_has_fp16_kernels():
                ctx.notes.append(
                    f"No ORT-format files for fp16 on this {platform.machine()} host: the converter bakes the host "
                    "CPU provider's kernels into the .ort file, and without float16 MatMul/Gemm kernels it "
                    "inserts Casts and folds the weights back to float32. Convert decode.onnx/prefill.onnx "
                    "on an arm64 host (python -m onnxruntime.tools.convert_onnx_models_to_ort --target_platform arm)."
                )
            elif weight_bytes > PROTOBUF_LIMIT:
                ctx.notes.append(
                    f"No ORT-format files: {weight_bytes / 2**30:.1f} GiB of weights exceed the 2 GiB limit of "
                    "the ORT format, which cannot hold external data."
                )
            else:
                files += convert_to_ort(paths, out_dir, target_platform=ctx.options.get("ort_target", "arm"))
                ctx.facts["onnx_ort_files"] = {m: Path(METHOD_FILES[m]).with_suffix(".ort").name
                                               for m in ("decode", "prefill")}
                ctx.facts["onnx_ort_config"] = ORT_CONFIG_FILE
        ctx.facts["onnx_file_bytes"] = {f.name: f.stat().st_size for f in files}
        return files

    def io_contract(self, ctx: BuildContext) -> dict[str, Any]:
        from rgexport.model import state_spec

        return standard_io_contract(ctx.config, ctx.prefill_chunk, state_spec(ctx.config, 1), placement="io")

    # Runtime -------------------------------------------------------------------------------------
    def variants(self, artifact_dir: Path, manifest: dict[str, Any]) -> dict[str, dict[str, Any]]:
        """The .ort files (ONNX Runtime Mobile), where the build wrote them, are validated as well."""
        return {"ort": {"ort_format": True}} if (Path(artifact_dir) / "decode.ort").is_file() else {}

    def check_artifact(self, artifact_dir: Path, manifest: dict[str, Any]) -> Path:
        """Each .onnx parses as an ONNX model (protobuf; external weights are not read) with a graph; each
        .ort file, where present, carries ONNX Runtime's flatbuffer identifier."""
        import onnx

        from rgexport.errors import RgexportError
        from rgexport.safety import check_magic, first_line

        path = super().check_artifact(artifact_dir, manifest)
        main = manifest["artifact"]["file"]
        prefill = Path(artifact_dir) / (main.replace("decode", "prefill") if "decode" in main else PREFILL_FILE)
        for p in (path, prefill):
            if not p.is_file():
                raise RgexportError(f"{p} does not exist; rebuild the artifact")
            try:
                model = onnx.load(str(p), load_external_data=False)
            except Exception as e:  # noqa: BLE001 - a damaged user file: one line naming it
                raise RgexportError(f"{p} is not an ONNX model ({type(e).__name__}: {first_line(e)}); rebuild the "
                                    "artifact") from None
            if not model.graph.node or not model.graph.output:
                raise RgexportError(f"{p} is not an rgexport ONNX model (its graph is empty); rebuild the artifact")
            ort = p.with_suffix(".ort")
            if ort.is_file():
                check_magic(ort, b"ORTM", 4, "an ONNX Runtime (.ort) model")
        return path

    def load(
        self, artifact_dir: Path, manifest: dict[str, Any], *, ort_format: bool = False,
        threads: int | None = None,
    ) -> OnnxRunner:
        """A runner over decode + prefill; `ort_format=True` loads the .ort files instead of the .onnx.

        The main file is `manifest["artifact"]["file"]` (decode); prefill is the file beside it named with
        "prefill" for "decode" (`prefill.onnx`). `threads` sets ONNX Runtime's intra-op thread count.
        """
        self.require("onnxruntime")
        artifact_dir = Path(artifact_dir)
        try:
            main = manifest["artifact"]["file"]
            chunk = int(manifest["io"]["prefill_chunk"])
        except (KeyError, TypeError) as e:
            raise RgexportError(f"The manifest lacks {e}: expected artifact.file and io.prefill_chunk") from None
        decode = artifact_dir / main
        prefill = artifact_dir / (main.replace("decode", "prefill") if "decode" in main else PREFILL_FILE)
        if ort_format:
            decode, prefill = decode.with_suffix(".ort"), prefill.with_suffix(".ort")
        for path in (decode, prefill):
            if not path.is_file():
                raise RgexportError(f"{path} does not exist" + (
                    " (no ORT-format files are written above 2 GiB of weights, nor for fp16 on x86 hosts; "
                    "the build's notes say which)" if ort_format else ""))
        return OnnxRunner(decode, prefill, chunk, threads=threads)


# Writing --------------------------------------------------------------------------------------------
def _save_with_shared_weights(protos: Sequence[Any], paths: Sequence[Path], data_path: Path,
                              base_dir: Path | None = None) -> None:
    """Saves models whose large tensors live in one data file, each distinct tensor stored once.

    The decode and prefill graphs hold the same weights (under exporter-generated names that differ);
    tensors are matched by dtype, shape and content, and both models point at the same bytes. Tensors
    already external (a streamed export) are read one at a time from `base_dir`.
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
                key = (t.data_type, tuple(t.dims), hashlib.sha256(raw).digest())
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


# Running ----------------------------------------------------------------------------------------------
def _rss_bytes() -> int:
    try:
        with open("/proc/self/statm") as f:
            return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")
    except (OSError, ValueError):
        return 0


def _peak_rss_bytes() -> int:
    try:
        import resource
    except ImportError:  # not on Windows
        return 0
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return peak if platform.system() == "Darwin" else peak * 1024  # bytes on macOS, KiB on Linux


class OnnxRunner(Runner):
    """Decode and prefill sessions sharing one double-buffered state held in OrtValues.

    Each call binds the current state set as `state.*` inputs and the other set as `new_state.*` outputs
    (four IO bindings made once: two methods x two parities) and then swaps sets, so the state stays in
    ONNX Runtime's buffers between tokens; only the token, position and logits cross into numpy.
    """

    def __init__(self, decode_path: Path, prefill_path: Path, prefill_chunk: int, threads: int | None = None):
        import onnxruntime as ort

        self.paths = {"decode": Path(decode_path), "prefill": Path(prefill_path)}
        self.prefill_chunk = prefill_chunk
        options = ort.SessionOptions()
        options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
        if threads:
            options.intra_op_num_threads = threads
            options.inter_op_num_threads = 1
        self.sessions = {
            m: ort.InferenceSession(str(p), options, providers=["CPUExecutionProvider"])
            for m, p in self.paths.items()
        }

        inputs = {m: {i.name: i for i in s.get_inputs()} for m, s in self.sessions.items()}
        outputs = {m: {o.name: o for o in s.get_outputs()} for m, s in self.sessions.items()}
        state_inputs = [i for i in self.sessions["decode"].get_inputs() if i.name.startswith("state.")]
        self.state_names = [i.name.removeprefix("state.") for i in state_inputs]
        self.state_shapes = [list(i.shape) for i in state_inputs]
        for m in self.sessions:
            names = [i.name for i in self.sessions[m].get_inputs() if i.name.startswith("state.")]
            out_names = [o.name for o in self.sessions[m].get_outputs() if o.name.startswith("new_state.")]
            want = ([f"state.{n}" for n in self.state_names], [f"new_state.{n}" for n in self.state_names])
            if (names, out_names) != want:
                raise RgexportError(f"{self.paths[m].name}: state inputs/outputs do not match decode's")
        tokens_shape = list(inputs["prefill"]["tokens"].shape)
        if tokens_shape != [1, prefill_chunk]:
            raise RgexportError(f"{self.paths['prefill'].name} takes tokens {tokens_shape}, the manifest says "
                                f"chunk {prefill_chunk}")
        self.vocab_size = int(outputs["decode"]["logits"].shape[-1])

        def buffer(shape: list[int], dtype: type) -> Any:
            value = ort.OrtValue.ortvalue_from_shape_and_type(shape, dtype, "cpu", 0)
            value.update_inplace(np.zeros(shape, dtype))
            return value

        self._states = [[buffer(s, np.float32) for s in self.state_shapes] for _ in range(2)]
        self._token = {"decode": buffer([1], np.int32), "prefill": buffer([1, prefill_chunk], np.int32)}
        self._position = buffer([1], np.int32)
        self._logits = {"decode": buffer([1, self.vocab_size], np.float32),
                        "prefill": buffer([1, prefill_chunk, self.vocab_size], np.float32)}
        self._bindings = {}
        for method, session in self.sessions.items():
            for parity in (0, 1):
                b = session.io_binding()
                b.bind_ortvalue_input(_token_input(method), self._token[method])
                b.bind_ortvalue_input("position", self._position)
                b.bind_ortvalue_output("logits", self._logits[method])
                for name, src, dst in zip(self.state_names, self._states[parity], self._states[1 - parity]):
                    b.bind_ortvalue_input(f"state.{name}", src)
                    b.bind_ortvalue_output(f"new_state.{name}", dst)
                self._bindings[method, parity] = b
        self._current = 0

    def _run(self, method: str, tokens: np.ndarray, position: int) -> np.ndarray:
        self._token[method].update_inplace(tokens)
        self._position.update_inplace(np.array([position], np.int32))
        self.sessions[method].run_with_iobinding(self._bindings[method, self._current])
        self._current ^= 1
        return self._logits[method].numpy()[0].copy()  # numpy() is a view of the bound buffer

    def reset(self) -> None:
        for states in self._states:
            for value, shape in zip(states, self.state_shapes):
                value.update_inplace(np.zeros(shape, np.float32))
        self._current = 0

    def decode(self, token: int, position: int) -> np.ndarray:
        return self._run("decode", np.array([token], np.int32), position)

    def prefill(self, tokens: Sequence[int], position: int) -> np.ndarray:
        if len(tokens) != self.prefill_chunk:
            raise RgexportError(f"prefill takes exactly {self.prefill_chunk} tokens, got {len(tokens)}")
        return self._run("prefill", np.asarray(tokens, np.int32).reshape(1, -1), position)

    def state(self) -> dict[str, np.ndarray]:
        return {n: v.numpy().copy() for n, v in zip(self.state_names, self._states[self._current])}

    def memory(self) -> dict[str, int]:
        """Bytes: weights as stored in the loaded files (each of the two sessions holds its own copy), the
        two state sets and the bound I/O buffers (`OrtValue.tensor_size_in_bytes`), and the process's
        current and peak resident size. ONNX Runtime's Python API has no per-session allocator statistics,
        and a resident-size difference around session creation is meaningless once the process has freed
        memory before (measured per session in a fresh process: notes/onnx.md)."""
        weights = 0
        for path in self.paths.values():
            if path.suffix == ".onnx":
                weights += describe_onnx(path)["weights"]["bytes"]
            else:
                weights += path.stat().st_size
        io_values = [*self._token.values(), self._position, *self._logits.values()]
        return {
            "weights_bytes": weights,
            "state_bytes": sum(v.tensor_size_in_bytes() for s in self._states for v in s),
            "io_bytes": sum(v.tensor_size_in_bytes() for v in io_values),
            "process_rss_bytes": _rss_bytes(),
            "process_peak_rss_bytes": _peak_rss_bytes(),
        }


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
