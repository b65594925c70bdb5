"""ONNX backend: two graphs with the state as named inputs and outputs, run in ONNX Runtime.

Stages (see `rgexport.backends.base`):
1. quantize: nothing at torch level; every recipe works on the exported ONNX graphs.
2. export: `torch.onnx.export(dynamo=True)` of `DecodeIO` and `PrefillIO` at opset 21, static shapes.
   Inputs `token`/`tokens`, `position`, `state.<name>`; outputs `logits`, `new_state.<name>`
   (`rgexport.graphs.input_name` / `output_name`), checked in the written model.
3. lower: the recipe's graph passes (`rgexport.backends.onnx.recipes`), then the exporter's debug metadata
   is dropped and the recipe recorded in the model's metadata.
4. write: `decode.onnx` (the main file) and `prefill.onnx`, both pointing into one `weights.bin` that
   holds each distinct tensor once (`options["external_data"] = False`: self-contained files below 2 GB,
   each with every weight). With `options["ort_format"] = True` also `decode.ort`, `prefill.ort` and
   `required_operators.config` for reduced ONNX Runtime Mobile builds (the ORT format has no external
   data, so each file holds the weights again; skipped above 2 GB, and for fp16 on x86 hosts, where the
   converter would bake float32 Casts into it; see `OnnxBackend.write`).

Options (`BuildContext.options`, from the target profile): `opset` (default 21, at least 18),
`external_data` (default True), `ort_format` (default False), `ort_target` ("arm" or "amd64"),
`calibration_method` (w8a8: "minmax" (default), "entropy" or "percentile"), `stream_export` ("auto", True,
False), `stream_weights` ("auto", True, False), `fuse` (default True: RMSNorm and tanh-GELU become one ONNX
Runtime node each, `onnx_fusions`), `int4_accuracy_level` (4 or 0) and `int4_block_size` (16, 32, 64, 128).

Large models (float32 weights above `config.LARGE_MODEL_BYTES`, or `stream_weights=True`; every recipe but
the calibrated w8a8) are never whole in memory: the build hands `export` a model without weights
(`streaming.fake_griffin`) and the checkpoint as a stream (`BuildContext.stream`). Both graphs are traced
with FakeTensor parameters, then `fill_from_stream` reads the embedding, each block and the final norm in
turn and writes them into a scratch file (`EXPORT_SCRATCH` in the work folder) in the layout the graphs
use, and the graphs are optimised over those external weights as the exporter would have. Without a stream
(`stream_export`, above `PROTOBUF_LIMIT`), each graph is saved by the exporter from the torch model into the
same folder. Either way `export` returns protos whose initializers point there: int4 quantises tensor by
tensor from those files and fp32 copies them into `weights.bin`; `write` deletes the scratch folder.

The calibrated recipe w8a8 runs the model itself (the one `export` returns with the graphs, `OnnxGraphs.model`)
over `ctx.calibration_tokens` in `lower`, capturing real (token, position, state) inputs for each graph.

`OnnxRunner` keeps the state in two sets of OrtValues bound with IO binding and swaps them after each
call, so the state never passes through numpy between tokens. `describe_onnx` summarises a .onnx file
for `rgexport info`.
"""

from __future__ import annotations

import copy
import platform
import shutil
import time
from pathlib import Path
from typing import Any, ClassVar

from rgexport.backends.base import Backend, BuildContext, standard_io_contract
from rgexport.backends.onnx.calibration import _calibration_inputs, calibration_feeds
from rgexport.backends.onnx.export import (
    EXPORT_SCRATCH,
    METHOD_FILES,
    OPSET,
    ORT_CONFIG_FILE,
    PREFILL_FILE,
    PROTOBUF_LIMIT,
    WEIGHTS_FILE,
    OnnxGraphs,
    _check_names,
    _cpu_has_fp16_kernels,
    _initializer_bytes,
    _save_with_shared_weights,
    convert_to_ort,
    expected_names,
    fill_from_stream,
    parameter_bytes,
)
from rgexport.backends.onnx.recipes import (
    INT4_ACCURACY_LEVEL,
    INT4_BLOCK_SIZE,
    INT4_BLOCK_SIZES,
    RECIPES,
    W8A8_FLOAT_GROUPS,
    W8A8_NOTE,
)
from rgexport.backends.onnx.runner import OnnxRunner
from rgexport.errors import RgexportError
from rgexport.graphs import DecodeIO, PrefillIO
from rgexport.memory import release_freed
from rgexport.model import Griffin


class OnnxBackend(Backend):
    name = "onnx"
    extra = "onnx"
    artifact_suffix = ".onnx"
    recipes = RECIPES
    recipe_aliases = {"qdq8": "w8a8"}  # names before the one recipe vocabulary
    quantizes_in = "lower"  # the recipe works on the converted program
    default_recipe = "fp32"
    packages = ("onnx", "onnxruntime", "onnxscript", "torch")
    build_base_bytes = 1 << 30  # measured on the shipped model: 0.65 GB
    device_runtime: ClassVar[dict[str, Any]] = {"dists": {"onnxruntime": "1.31.1"}, "module": "onnxruntime"}
    device_module = "device.py"
    options = {
        "opset": "ONNX opset, at least 18 (default 21)",
        "external_data": "true (default): both graphs' weights in one weights.bin; false: self-contained "
        ".onnx files, each holding every weight (below 2 GB only)",
        "ort_format": "also write .ort files for reduced ONNX Runtime Mobile builds; each holds the weights "
        "again (default false)",
        "ort_target": '"arm" (default) or "amd64": the platform the .ort files are optimised for',
        "calibration_method": 'w8a8: "minmax" (default), "entropy" or "percentile"',
        "stream_export": '"auto" (default: above 2 GB), true or false: export graphs straight to disk',
        "stream_weights": '"auto" (default: above 2 GiB of float32 weights), true or false: export from a model '
                          'without weights and read them from the checkpoint one block at a time',
        "fuse": "fuse RMSNorm and tanh-GELU into one ONNX Runtime node each (default true)",
        "int4_accuracy_level": "int4: MatMulNBits compute, 4 (int8 activations, default) or 0 (float32: "
        "2.5x slower at 2B; notes/onnx.md)",
        "int4_block_size": "int4: weights per scale along K, 16, 32 (default), 64 or 128; larger blocks are "
        "smaller files and faster matmuls, coarser scales (notes/onnx.md)",
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
        if ctx.recipe == "int4":
            _int4_block_size(ctx)
        model.eval()
        for p in model.parameters():
            p.requires_grad_(False)
        return model

    def quantise_part(self, part: Any, kind: str, ctx: BuildContext) -> Any:
        """int4's own quantised model, a part at a time: every nn.Linear weight and the tied table as
        `MatMulNBits` / `GatherBlockQuantized` hold them (ONNX Runtime's kernel, dequantised); at
        int4_accuracy_level 4 (the default) each of those matmuls also quantises its input to int8 per block
        as the kernel does (`int8_blocks`); everything else float32. At level 0 the artifact matches it to KL
        1e-13 (the shipped shapes and a griffin-7b-shaped model); at level 4 what is left is int8 rounding
        flipped by float32 summation order upstream (notes/perf.md)."""
        if ctx.recipe != "int4":
            return None
        import torch
        from torch import nn

        from rgexport.backends.onnx.recipes import dequantised_int4, emulate_int8_inputs_

        block = ctx.facts.get("onnx_int4_block_size") or _int4_block_size(ctx)
        with torch.no_grad():
            for module in part.modules():
                if isinstance(module, nn.Linear):
                    module.weight.copy_(dequantised_int4(module.weight, block))
            if kind == "embedder":
                part.input_embedding.copy_(dequantised_int4(part.input_embedding, block))
        level = ctx.facts.get("onnx_int4_accuracy_level", ctx.options.get("int4_accuracy_level", INT4_ACCURACY_LEVEL))
        if level == 4:
            emulate_int8_inputs_(part, head=kind == "embedder", block_size=block)
        return part

    def streams_weights(self, recipe: str, options: dict[str, Any]) -> bool | None:
        """Every recipe but the calibrated one (w8a8 runs the model over calibration text in `lower`)."""
        want = options.get("stream_weights", "auto")
        if want not in ("auto", True, False):
            raise RgexportError(f'option stream_weights is {want!r}; expected "auto", true or false')
        if self.recipes[self.resolve_recipe(recipe)].calibrated or want is False:
            return False
        return True if want is True else None

    def export(self, prepared: Griffin, ctx: BuildContext) -> dict[str, Any]:
        """Exports decode and prefill with the torch.export-based exporter -> {method: ModelProto}.

        With `ctx.stream` (`streams_weights`), `prepared` is `streaming.fake_griffin`: the graphs are traced
        without weights and `fill_from_stream` writes them into the scratch folder one part at a time."""
        self.require("onnx")
        self.require("onnxscript")
        import torch

        from rgexport.backends.onnx.fusions import fuse_for_ort
        from rgexport.backends.onnx.recipes import drop_initializer_value_info

        opset = int(ctx.options.get("opset", OPSET))
        if opset < 18:
            raise RgexportError(
                f"opset {opset} is not available: torch.onnx.export(dynamo=True) writes opset 18 when asked for "
                f"less and cannot convert down; use 18 or later (default {OPSET})"
            )
        from_stream = ctx.stream is not None
        stream = ctx.options.get("stream_export", "auto")
        if stream == "auto":
            stream = from_stream or parameter_bytes(prepared) > PROTOBUF_LIMIT
        if from_stream and not stream:
            raise RgexportError("stream_weights needs the streamed export: leave stream_export out or set it true")
        graphs = OnnxGraphs()
        # Only a calibrated recipe runs the model in `lower`; a streamed export lets it go, so that the
        # build can free the float32 weights before lowering.
        graphs.model = prepared if not stream or self.recipes[ctx.recipe].calibrated else None
        if from_stream:
            graphs.model = None
        if stream:
            graphs.base_dir = Path(ctx.work_dir) / EXPORT_SCRATCH
            graphs.base_dir.mkdir(parents=True, exist_ok=True)
        seconds, fused = {}, {}
        modules = {"decode": DecodeIO(prepared),
                   "prefill": PrefillIO(prepared, ctx.prefill_chunk, ctx.prefill_last_only)}
        programs = {}
        for method, module in modules.items():
            module.eval()
            inputs, outputs = expected_names(prepared, method)
            start = time.perf_counter()
            with torch.no_grad():
                programs[method] = torch.onnx.export(
                    module, module.example_inputs(), dynamo=True, opset_version=opset,
                    input_names=inputs, output_names=outputs, optimize=not from_stream, verbose=False,
                )
            seconds[method] = round(time.perf_counter() - start, 2)
        if from_stream:
            # Traced without weights: the stream's parts go into the scratch folder one at a time, then the
            # graphs are optimised as the exporter would have (`optimize=True`) over real small constants.
            start = time.perf_counter()
            ctx.facts["onnx_streamed_weights"] = fill_from_stream(programs, ctx.stream, graphs.base_dir)
            for program in programs.values():
                program.optimize()
            seconds["weights"] = round(time.perf_counter() - start, 2)
        for method in modules:
            program = programs.pop(method)
            inputs, outputs = expected_names(prepared, method)
            start = time.perf_counter()
            if ctx.options.get("fuse", True):
                fused[method] = fuse_for_ort(program.model, opset)
            if from_stream:
                import onnx_ir as ir

                proto = ir.to_proto(program.model)  # weights stay external references into the scratch file
                del program
            elif stream:
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
            seconds[method] = round(seconds[method] + time.perf_counter() - start, 2)
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
        from rgexport.backends.onnx import recipes as q

        large = max(_initializer_bytes(p) for p in exported.values()) > PROTOBUF_LIMIT
        base_dir = getattr(exported, "base_dir", None)  # a streamed export: weights in files there
        lowered = OnnxGraphs()
        lowered.base_dir = base_dir
        for method, proto in exported.items():
            inputs = [i.name for i in proto.graph.input]
            outputs = [o.name for o in proto.graph.output]
            if base_dir is not None and ctx.recipe not in ("fp32", "int4", "int8"):
                # These recipes' passes need every weight in memory (int4 and int8 read tensor by tensor, fp32
                # copies the files in `write`); a deep copy of the streamed proto is cheap, then it is loaded.
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
                proto = q.quantize_int8(proto, base_dir=base_dir)
                if base_dir is not None:
                    release_freed()  # as int4: its tensors are in the scratch folder now
                tied = 0
            elif ctx.recipe == "w8a8":
                self.require("onnxruntime")
                method_name, tokens = _calibration_inputs(ctx)
                model = getattr(exported, "model", None)
                if model is None:
                    raise RgexportError("w8a8 calibrates by running the model: lower() needs export()'s result "
                                        "(OnnxGraphs, which carries it), not bare ModelProtos")
                feeds = calibration_feeds(model, tokens, method, ctx.prefill_chunk)
                proto, facts = q.quantize_w8a8(proto, feeds, method=method_name, large=large)
                ctx.facts.setdefault("onnx_w8a8", {"float_groups": W8A8_FLOAT_GROUPS,
                                                   "calibration_tokens": sum(len(t) for t in tokens)})
                ctx.facts["onnx_w8a8"][method] = facts
                tied = 1
            else:
                self.require("onnxruntime")
                # 4 by default: int8 compute decoded the 2B shape 2.5x faster than float32 compute, and on the
                # shipped model gave top-1 92.0% vs 91.8%, the same KL (notes/onnx.md).
                level = ctx.options.get("int4_accuracy_level", INT4_ACCURACY_LEVEL)
                if level not in (0, 1, 2, 3, 4):
                    raise RgexportError(f"int4_accuracy_level is {level!r}; expected 0 or 1 (float32 compute), "
                                        "2 (float16), 3 (bfloat16) or 4 (int8 activations, default)")
                block = _int4_block_size(ctx)
                proto = q.quantize_int4(proto, block_size=block, base_dir=base_dir, accuracy_level=level)
                if base_dir is not None:
                    # Its tensors are in the scratch folder now; what the quantiser held is freed, and handed
                    # back before the next graph is quantised (at 9B: 5.4 GB of 4-bit tensors per graph).
                    release_freed()
                ctx.facts["onnx_int4_accuracy_level"] = level
                ctx.facts["onnx_int4_block_size"] = block
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
                "quantized_once_for_gather_and_head" if ctx.recipe in ("int4", "int8") else "transpose_of_embedding")
        if ctx.recipe == "w8a8":
            ctx.notes.append(W8A8_NOTE.format(method=ctx.facts["onnx_w8a8"]["decode"]["calibration_method"]))
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
        # One weights.bin by default at every size: self-contained files hold every weight once per graph
        # (an 81 M-parameter fp32 build was 0.65 GB of .onnx for 0.32 GB of weights; notes/perf.md).
        external = ctx.options.get("external_data", True)
        if external == "auto":  # the earlier default's name
            external = True
        if not external and weight_bytes > PROTOBUF_LIMIT:
            raise RgexportError(
                f"external_data=false needs self-contained .onnx files, but {weight_bytes / 2**30:.1f} GiB of "
                "weights exceed protobuf's 2 GiB limit; leave the option out (one shared weights.bin)")
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

        # Off by default: the ORT format cannot refer to external data, so each .ort holds the weights again
        # (three copies beside weights.bin); reduced ONNX Runtime Mobile builds need it, full builds do not.
        if ctx.options.get("ort_format", False):
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

    def program_files(self, manifest: dict[str, Any]) -> list[str]:
        """decode.onnx and the weights.bin it points into."""
        data = manifest.get("backend_facts", {}).get("onnx_external_data")
        return [*super().program_files(manifest), *([data] if data else [])]

    def io_contract(self, ctx: BuildContext) -> dict[str, Any]:
        from rgexport.model import state_spec

        return standard_io_contract(ctx.config, ctx.prefill_chunk, state_spec(ctx.config, 1), placement="io",
                                    prefill_logits=ctx.prefill_logits)

    def describe_file(self, path: Path) -> dict[str, Any] | None:
        """A .onnx file's graph summary (`describe_onnx`), read without loading external weights."""
        from rgexport.backends.onnx.graph_info import describe_onnx
        from rgexport.errors import RgexportError
        from rgexport.safety import first_line

        try:
            data = describe_onnx(path)
        except RgexportError:
            raise
        except Exception as e:  # noqa: BLE001 - a damaged user file: one line naming it
            raise RgexportError(f"{path} is not an ONNX model ({type(e).__name__}: {first_line(e)})") from None
        if not data.get("nodes"):
            raise RgexportError(f"{path} is not an ONNX model (it parses, but holds no graph)")
        return data

    # Runtime -------------------------------------------------------------------------------------
    def variants(self, artifact_dir: Path, manifest: dict[str, Any]) -> dict[str, dict[str, Any]]:
        """The .ort files (ONNX Runtime Mobile), where the build wrote them, are validated as well."""
        return {"ort": {"ort_format": True}} if (Path(artifact_dir) / "decode.ort").is_file() else {}

    def check_artifact(self, artifact_dir: Path, manifest: dict[str, Any]) -> Path:
        """Each .onnx parses as an ONNX model (protobuf; external weights are not read) with a graph whose
        external tensors lie inside the artifact folder and inside their file; each .ort file, where
        present, carries ONNX Runtime's flatbuffer identifier."""
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
            _check_external_data(model, p, Path(artifact_dir))
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


def _int4_block_size(ctx: BuildContext) -> int:
    """int4's block size from the options (`int4_block_size`), checked: one that `MatMulNBits` and
    `GatherBlockQuantized` take, and that divides every width the blocks run along (a padded last block
    would widen the tied table's gather)."""
    block = ctx.options.get("int4_block_size", INT4_BLOCK_SIZE)
    if isinstance(block, bool) or block not in INT4_BLOCK_SIZES:
        raise RgexportError(f"int4_block_size is {block!r}; expected one of {', '.join(map(str, INT4_BLOCK_SIZES))} "
                            f"(default {INT4_BLOCK_SIZE})")
    c = ctx.config
    dims = {"width": c.width, "mlp_expanded_width": c.mlp_expanded_width, "lru_width": c.lru_width}
    bad = {k: v for k, v in dims.items() if v % block}
    if bad:
        fits = [b for b in INT4_BLOCK_SIZES if all(v % b == 0 for v in dims.values())]
        raise RgexportError(f"int4_block_size {block} does not divide {bad}; block sizes that fit this model: "
                            f"{', '.join(map(str, fits)) or 'none'}")
    return block


def _check_external_data(model: Any, path: Path, folder: Path) -> None:
    """Every initializer stored as external data names a file inside `folder` and a byte range inside
    that file: ONNX Runtime would otherwise read whatever file the path names, or fail deep in loading."""
    from onnx import TensorProto

    from rgexport.safety import contained

    sizes: dict[str, int] = {}
    for t in model.graph.initializer:
        if t.data_location != TensorProto.EXTERNAL:
            continue
        info = {e.key: e.value for e in t.external_data}
        where = contained(folder, info.get("location", ""), f"{path.name}'s external data for {t.name!r}")
        if where.name not in sizes:
            if not where.is_file():
                raise RgexportError(f"{path.name} keeps its weights in {where.name}, which is missing; rebuild "
                                    "the artifact or copy the whole folder")
            sizes[where.name] = where.stat().st_size
        try:
            end = int(info.get("offset", 0)) + int(info.get("length", 0))
        except ValueError:
            raise RgexportError(f"{path.name}: tensor {t.name!r} has a non-numeric external-data offset or "
                                "length; rebuild the artifact") from None
        if end > sizes[where.name]:
            raise RgexportError(
                f"{path.name}: tensor {t.name!r} ends at byte {end:,} of {where.name}, which holds "
                f"{sizes[where.name]:,} bytes (truncated?); rebuild the artifact or copy the whole file")
