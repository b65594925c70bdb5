"""LiteRT (TFLite) backend for Android: one `.tflite` holding a `decode` and a `prefill` signature.

Stages:
  export  litert-torch converts both signatures of `rgexport.graphs` (state passed in and out) into one
          float flatbuffer; every named output of both signatures is then checked against the eager
          model at a position past the attention window, so neither a wrong name mapping nor a
          miscompilation that spares position 0 can get through.
  lower   ai-edge-quantizer applies the recipe to the float flatbuffer; the signatures must come out
          unchanged. fp16/int8/int4 change only constant weights. `w8a8` (calibrated) also gives the
          projections, MLPs and RG-LRU gates static int8 activations, with ranges from a representative
          dataset that `export` captures from the fp32 model over calibration text
          (`representative_dataset`); the recurrence, the state, attention scores, norms, the residual
          stream and the logits stay float32 (rgexport/backends/tflite_calibration.py has the decision
          and the per-group sensitivity it rests on).
  write   the flatbuffer to `model.tflite`.
The runner drives the two signatures with `ai_edge_litert.interpreter`.

Names: LiteRT signature names may hold dots (a signature output named `new_state.blocks.0.rg_lru`
converts and runs), but litert-torch names each signature input after a Python parameter of the traced
module, so inputs cannot. Both directions therefore use `rgexport.model.state.identifier`: '.' written
as '__' (`state.blocks.0.rg_lru` -> `state__blocks__0__rg_lru`), which `dotted` reverses; the contract
records both (`identifier`).
"""

from __future__ import annotations

import time
from pathlib import Path
from typing import Any, ClassVar

import torch

from rgexport.backends.base import RECIPE_BITS, Backend, BuildContext, Runner, standard_io_contract
from rgexport.backends.tflite.calibration import Dataset, representative_dataset
from rgexport.backends.tflite.export import (
    _OLD_RUNTIME_FAILS,
    ARTIFACT_FILE,
    CONVERTER_FILE_LIMIT,
    HYBRID_CHECK_TOLERANCE,
    Flatbuffer,
    StreamedExport,
    TFLiteExport,
    _check_against_eager,
    _check_runs,
    _signature_io,
    _signatures,
    check_converted,
    check_probe,
    converted_bytes_at_least,
    converter_for,
    eager_probe,
    file_metadata,
    op_histogram,
    strict_qdq_mode,
)
from rgexport.backends.tflite.recipes import (
    AI_EDGE_QUANTIZER,
    DEFAULT_INT4_BLOCK_SIZE,
    INT4_BLOCK_SIZES,
    RECIPES,
    STREAMED,
    STREAMED_RECIPES,
    quantise_part_,
    runtime_activations,
)
from rgexport.backends.tflite.runner import DELEGATES, TFLiteRunner
from rgexport.calibrate import sample_facts
from rgexport.errors import RgexportError
from rgexport.model import Griffin, identifier, state_spec


class TFLiteBackend(Backend):
    """LiteRT: litert-torch conversion, ai-edge-quantizer recipes, ai_edge_litert Interpreter runner."""

    name = "tflite"
    extra = "tflite"
    artifact_suffix = ".tflite"
    packages = ("litert-torch", "ai-edge-litert", "ai-edge-quantizer", "torch")
    build_base_bytes = 1 << 30  # measured on the shipped model: 0.83 GB
    # `build --target android` from a 0.89 B checkpoint (2B width and vocabulary, three blocks): 18.07 GB
    # peak, LiteRT's conversion 13.7 GB of it, for 3.56 GB of float32 weights (issue 15).
    whole_model_build_factor = 5.1
    device_runtime: ClassVar[dict[str, Any]] = {"dists": {"ai-edge-litert": "2.3.0"},
                                                "module": "ai_edge_litert.interpreter"}
    device_module = "device.py"
    options: ClassVar[dict[str, str]] = {
        "delegate": '"xnnpack" (default) or "none" (the builtin kernels): the runtime path the runner uses',
        "num_threads": "interpreter threads (default: the runtime's)",
        "int4_block_size": "int4: weights per scale along the input dimension (default 32)",
        "stream_weights": 'int8 and int4: "auto" (default: a model too large to load whole), true or false: quantise '
        "each block as the checkpoint is read and convert the quantised model, instead of quantising a float "
        "flatbuffer converted from the whole float32 model",
    }
    recipes = RECIPES
    quantizes_in = "lower"  # the recipe works on the converted program
    default_recipe = "fp32"

    def check_size(self, config: Any, recipe: str, options: dict[str, Any], streams: bool) -> None:
        """Refuses a model whose converted file would be 4 GiB or more (`export.CONVERTER_FILE_LIMIT`): the
        converter writes such a file wrong. Its weights are converted at the recipe's bits where the build
        streams them (int8, int4), else as the float32 flatbuffer that the recipe then quantises."""
        bits = RECIPE_BITS[recipe] if streams else 32
        need = converted_bytes_at_least(config, bits)
        if need >= CONVERTER_FILE_LIMIT:
            raise RgexportError(
                f"tflite / {recipe} at {config.num_parameters() / 1e9:.2f} B parameters: the converter's file would "
                f"hold at least {need / 1e9:.2f} GB of {bits}-bit weights, and litert-torch's converter writes files "
                f"of 4 GiB or more wrong (a 9B int4 file came out as 0.23 GB with no model in it). Nothing was "
                "loaded. Build --target onnx or --target executorch --recipe int4 at this size"
                + (", or --target tflite --recipe int4" if recipe != "int4" and converted_bytes_at_least(config, 4)
                   < CONVERTER_FILE_LIMIT else "") + "."
            )

    def streams_weights(self, recipe: str, options: dict[str, Any]) -> bool | None:
        """int8 and int4 (`recipes.STREAMED`): each block is quantised as it is read and the quantised model is
        converted. The other recipes quantise the float flatbuffer, which needs the whole float32 model."""
        want = options.get("stream_weights", "auto")
        if want not in ("auto", True, False):
            raise RgexportError(f'option stream_weights is {want!r}; expected "auto", true or false')
        if self.resolve_recipe(recipe) not in STREAMED_RECIPES or want is False:
            if want is True:
                raise RgexportError(f"LiteRT streams the weights for int8 and int4 only, not {recipe}; leave "
                                    "stream_weights out or set it false")
            return False
        return True if want is True else None

    # Build stages --------------------------------------------------------------------------------
    def quantize(self, model: Griffin, ctx: BuildContext) -> Griffin:
        """From a stream (`streams_weights`): the int8 or int4 model, read and quantised a part at a time into `model`
        (`streaming.fake_griffin`), so the float32 model is never whole. Otherwise `model` as it is: the recipes
        quantise the converted flatbuffer in `lower`."""
        if ctx.stream is None:
            return model
        from rgexport.memory import release_freed
        from rgexport.streaming import assert_real

        self.check_recipe(ctx.recipe)
        block = self._check_options(ctx)
        if ctx.recipe not in STREAMED_RECIPES:
            raise RgexportError(f"LiteRT streams the weights for int8 and int4 only, not {ctx.recipe}")
        self.require("torchao")
        stream, bits = ctx.stream, RECIPE_BITS[ctx.recipe]
        tags: dict[float, Any] = {}  # int4: the real block scales, by the tag the converter carries (`intx_weight`)
        model.embedder = quantise_part_(stream.embedder(), "embedder", bits, block, tags=tags)
        for i in range(len(model.blocks)):
            model.blocks[i] = quantise_part_(stream.block(i), "block", bits, block, tags=tags)
        model.block_scales = tags
        model.final_norm = stream.final_norm()
        assert_real(model)
        release_freed()  # the float parts' heap, before conversion
        ctx.facts["quantiser"] = STREAMED
        return model

    def export(self, prepared: Griffin, ctx: BuildContext) -> bytes | TFLiteExport | StreamedExport:
        """Converts decode and prefill into one float flatbuffer and checks it against `prepared`; for a
        calibrated recipe, also captures the representative dataset from `prepared` (a TFLiteExport). The
        streamed model (`quantize`) converts to a file of quantised weights instead (a StreamedExport)."""
        self.check_recipe(ctx.recipe)
        self._check_options(ctx)
        if ctx.facts.get("quantiser") == STREAMED:
            return self._export_streamed(prepared, ctx)
        calibrated = self.recipes[ctx.recipe].calibrated
        if calibrated:
            ctx.calibration_sequences()
        litert_torch = self.require("litert_torch")
        self.require("ai_edge_litert.interpreter")
        chunk = ctx.prefill_chunk
        window = ctx.config.attention_window_size
        if not 1 <= chunk <= window:
            raise RgexportError(f"prefill_chunk {chunk} must be between 1 and the attention window {window}")
        if any(p.dtype != torch.float32 for p in prepared.parameters()):
            raise RgexportError("The TFLite backend converts a float32 model; recipes quantise afterwards")
        signatures = _signatures(prepared, chunk, ctx.prefill_last_only)
        converter = converter_for(litert_torch, signatures)
        start = time.perf_counter()
        with torch.no_grad():
            # Tokens and positions are int32 in the graphs already, so `enable_x64=False` (the default,
            # which would downcast 64-bit I/O) changes no signature tensor; the int64 gather indices
            # inside become int32.
            edge_model = converter.convert(enable_x64=False)
        flatbuffer = bytes(edge_model.model_content())
        ctx.facts["conversion_seconds"] = round(time.perf_counter() - start, 2)
        ctx.facts["float_bytes"] = len(flatbuffer)
        _check_against_eager(flatbuffer, signatures, ctx)
        if not calibrated:
            return flatbuffer
        start = time.perf_counter()
        dataset = representative_dataset(prepared, ctx.calibration_tokens, chunk)
        positions = {sig: [int(r["position"][0]) for r in rows] for sig, rows in dataset.items()}
        ctx.facts["calibration"] = {**sample_facts(positions, ctx.calibration_tokens, window),
                                    "capture_seconds": round(time.perf_counter() - start, 2)}
        return TFLiteExport(flatbuffer, dataset)

    def _export_streamed(self, prepared: Griffin, ctx: BuildContext) -> StreamedExport:
        """The quantised model converted in strict QDQ mode to `converted.tflite` in the work folder, the model let go
        before the file is written (where the build allows it), and the eager outputs `lower` checks against."""
        from rgexport.memory import forget_last_export, release_freed

        litert_torch = self.require("litert_torch")
        self.require("ai_edge_litert.interpreter")
        signatures = _signatures(prepared, ctx.prefill_chunk, ctx.prefill_last_only)
        with runtime_activations(prepared):
            probe = eager_probe(signatures, ctx)
        converter = converter_for(litert_torch, signatures)
        start = time.perf_counter()
        with strict_qdq_mode(), torch.no_grad():
            edge_model = converter.convert(enable_x64=False)
        converted = time.perf_counter()
        del converter, signatures
        if ctx.disposable_weights:
            # The converter holds its own copy of every constant now; the torch model's weights (2.7 GB of int8 at
            # RecurrentGemma-2B) go before the file is written, the write's peak being the build's highest. The
            # traced programs' nodes that litert-torch inlined them into stay in a torch global until let go.
            for name, _ in list(prepared.named_children()):
                setattr(prepared, name, None)
            forget_last_export()
        release_freed()
        ctx.work_dir.mkdir(parents=True, exist_ok=True)
        path = ctx.work_dir / "converted.tflite"
        edge_model.export(str(path))
        del edge_model
        release_freed()
        ctx.facts["conversion_seconds"] = round(converted - start, 2)
        ctx.facts["write_seconds"] = round(time.perf_counter() - converted, 2)
        ctx.facts["converted_bytes"] = path.stat().st_size
        check_converted(path, converted_bytes_at_least(ctx.config, RECIPE_BITS[ctx.recipe]))
        return StreamedExport(path, probe, getattr(prepared, "block_scales", {}))

    def _lower_streamed(self, exported: StreamedExport, ctx: BuildContext) -> Path:
        """The converted file with its weights' DEQUANTIZEs dropped (`rewrites.drop_weight_dequantize`), checked
        against the eager quantised model by name."""
        from rgexport.backends.tflite.rewrites import drop_weight_dequantize

        start = time.perf_counter()
        lowered = ctx.work_dir / (ARTIFACT_FILE + ".lowered")
        counts = drop_weight_dequantize(exported.path, lowered, exported.block_scales)
        exported.path.unlink()
        ctx.facts["dequantize_dropped"] = counts
        ctx.facts["rewrite_seconds"] = round(time.perf_counter() - start, 2)
        if counts["kept"] or not counts["dropped"]:
            raise RgexportError(f"The streamed {ctx.recipe} model kept {counts['kept']} weight DEQUANTIZEs (dropped "
                                f"{counts['dropped']}): LiteRT would hold a float32 copy of those weights")
        check_probe(lowered, exported.probe, ctx, HYBRID_CHECK_TOLERANCE)
        return lowered

    def lower(self, exported: bytes | TFLiteExport | StreamedExport, ctx: BuildContext) -> Flatbuffer:
        """Applies the recipe to the float flatbuffer; the signatures must come out unchanged.

        A calibrated recipe needs the `TFLiteExport` that `export` returns for it (any export's
        flatbuffer will do, with a dataset from `representative_dataset`). A streamed recipe's file (a
        StreamedExport) is quantised already: its weights' DEQUANTIZEs are dropped."""
        self.check_recipe(ctx.recipe)
        block = self._check_options(ctx)
        if isinstance(exported, StreamedExport):
            lowered = self._lower_streamed(exported, ctx)
            self._record(lowered, ctx, block)
            size = lowered.stat().st_size
            how = "a scale per output channel" if ctx.recipe == "int8" else f"a float16 scale per {block} inputs"
            ctx.notes.append(
                f"LiteRT {ctx.recipe}: {size:,} bytes, converted from {ctx.recipe} weights quantised block by block "
                f"as the checkpoint was read (torchao, symmetric, {how}; the tied table stored once for the gather "
                "and the head; the RG-LRU gates float32). No float flatbuffer was built.")
            return lowered
        if ctx.recipe in STREAMED_RECIPES:
            ctx.facts["quantiser"] = AI_EDGE_QUANTIZER
        dataset = None
        if isinstance(exported, TFLiteExport):
            exported, dataset = exported.flatbuffer, exported.calibration
        if ctx.recipe == "fp32":
            lowered = exported
        else:
            self.require("ai_edge_quantizer.quantizer")
            if self.recipes[ctx.recipe].calibrated:
                if dataset is None:
                    raise RgexportError(
                        f"Recipe {ctx.recipe} is calibrated: lower needs the TFLiteExport (flatbuffer and "
                        "representative dataset) that export returns for it, not bare flatbuffer bytes"
                    )
                lowered = self._lower_calibrated(exported, dataset, ctx)
            else:
                quantizer = self.require("ai_edge_quantizer.quantizer")
                qt = quantizer.Quantizer(bytearray(exported), self._quantizer_recipe(ctx.recipe, block))
                result = qt.quantize(enable_progress_bar=False, enable_progress_report=False)
                lowered = bytes(result.quantized_model)
            want, got = _signature_io(exported), _signature_io(lowered)
            if want != got:
                raise RgexportError(f"Quantising with recipe {ctx.recipe} changed the signatures: {got} != {want}")
        self._record(lowered, ctx, block)
        ctx.notes.append(
            f"LiteRT {ctx.recipe}: {len(lowered):,} bytes ({len(lowered) / len(exported):.2f} of float32)."
        )
        if ctx.recipe in _OLD_RUNTIME_FAILS:
            ctx.notes.append(
                f"Run this file with LiteRT as measured (ai-edge-litert 2.3.0). Its min_runtime_version "
                f"metadata says {ctx.facts['file_metadata'].get('min_runtime_version', '?')} and its op "
                f"versions are those of float ops, yet tflite-runtime 2.14 {_OLD_RUNTIME_FAILS[ctx.recipe]}."
            )
        return lowered

    def _record(self, lowered: Flatbuffer, ctx: BuildContext, block: int) -> None:
        """The lowered file's facts for the manifest."""
        ctx.facts["ops"] = op_histogram(lowered)
        ctx.facts["recipe"] = {"name": ctx.recipe, "description": self.recipes[ctx.recipe].description}
        if ctx.recipe == "int4":
            ctx.facts["recipe"]["int4_block_size"] = block
        ctx.facts["enable_x64"] = False
        ctx.facts["runtime_options"] = {"delegate": ctx.options.get("delegate", "xnnpack"),
                                        "num_threads": ctx.options.get("num_threads")}
        ctx.facts["name_mapping"] = "identifier = name with '.' written '__' (inputs cannot hold dots)"
        ctx.facts["file_metadata"] = file_metadata(lowered)

    def _lower_calibrated(self, flatbuffer: bytes, dataset: Dataset, ctx: BuildContext) -> bytes:
        """w8a8: calibrate on the dataset, quantise the chosen groups statically, check the result runs."""
        from rgexport.backends.tflite import calibration as tc

        ops = tc.op_groups(flatbuffer)
        groups = tc.w8a8_groups(ops)
        chosen = tc.static_ops(ops, groups)
        if not chosen:
            raise RgexportError("Found none of the w8a8 op groups in the converted model; its op names changed?")
        start = time.perf_counter()
        qsvs = tc.calibrate(flatbuffer, dataset, tc.W8A8_RANGE_UPDATE)
        calibrated = time.perf_counter()
        lowered = tc.quantize(flatbuffer, tc.static_recipe(ops, groups), qsvs)
        ctx.facts.setdefault("calibration", {}).update({
            "samples": {sig: len(rows) for sig, rows in dataset.items()},
            "range_update": tc.W8A8_RANGE_UPDATE,
            "calibrator": "ai-edge-quantizer, profiler-based min/max per tensor",
            "calibration_seconds": round(calibrated - start, 2),
            "quantisation_seconds": round(time.perf_counter() - calibrated, 2),
        })
        integer = tc.integer_ops(tc.op_groups(lowered))
        missing = sorted({op.kind for op in chosen} - {k for sig in integer.values() for k in sig})
        if missing:
            raise RgexportError(f"w8a8 left the groups {missing} without int8 activations")
        _check_runs(lowered, dataset)
        ctx.facts["w8a8"] = {
            "static_int8_groups": groups,
            "static_int8_ops": len(chosen),
            "integer_activation_ops": integer,
            "float_activations": tc.W8A8_FLOAT_KINDS,
            "weight_granularity": tc.STATIC_WEIGHT_GRANULARITY,
            "sensitivity": {
                "measured_on": "shipped tiny model, 512 held-out tokens; one group static int8, the rest "
                               "float32; [top-1 agreement, perplexity ratio, mean KL] vs eager fp32",
                "groups": {g: list(v) for g, v in tc.SENSITIVITY.items()},
            },
        }
        calib = ctx.facts["calibration"]
        ctx.notes.append(
            f"LiteRT w8a8: {len(chosen)} ops with static int8 activations and int8 weights (projections, MLPs, "
            f"RG-LRU gates: {', '.join(groups)}), ranges calibrated on "
            + ", ".join(f"{n} {sig}" for sig, n in calib["samples"].items())
            + " samples of the fp32 model over calibration text"
            + (" (" + ", ".join(f"{sig} positions {lo}-{hi}, {calib['samples_past_window'][sig]} past the window"
                                for sig, (lo, hi) in calib["positions"].items()) + ")"
               if "positions" in calib else "")
            + ". Float32 activations, by a per-group sensitivity study on the shipped model: "
            + "; ".join(f"{k}: {v}" for k, v in tc.W8A8_FLOAT_KINDS.items()) + "."
        )
        return lowered

    def write(self, lowered: Flatbuffer, ctx: BuildContext) -> list[Path]:
        ctx.work_dir.mkdir(parents=True, exist_ok=True)
        path = ctx.work_dir / ARTIFACT_FILE
        if isinstance(lowered, Path):
            lowered.replace(path)  # the streamed recipe's file, in the work folder already
        else:
            path.write_bytes(lowered)
        return [path]

    def io_contract(self, ctx: BuildContext) -> dict[str, Any]:
        """The standard functional contract with each tensor's LiteRT signature name added."""
        specs = state_spec(ctx.config, 1)
        contract = standard_io_contract(ctx.config, ctx.prefill_chunk, specs, placement="io",
                                        prefill_logits=ctx.prefill_logits)
        for method_name, method in contract["methods"].items():
            method["signature"] = method_name
            for tensor in (*method["inputs"], *method["outputs"]):
                tensor["identifier"] = identifier(tensor["name"])
        for tensor in contract["state"]["tensors"]:
            tensor["litert_input"] = identifier(tensor["input"])
            tensor["litert_output"] = identifier(tensor["output"])
        contract["litert_names"] = (
            "Each tensor's LiteRT signature name is its `identifier`: its name with '.' written '__' "
            "(litert-torch names signature inputs after Python parameters, which cannot hold dots); outputs "
            "follow the same rule so that new_state__X feeds state__X."
        )
        return contract

    # Runtime -------------------------------------------------------------------------------------
    def check_artifact(self, artifact_dir: Path, manifest: dict[str, Any]) -> Path:
        """The flatbuffer's file identifier; LiteRT's own verifier runs when it loads (and raises)."""
        from rgexport.safety import check_magic

        path = super().check_artifact(artifact_dir, manifest)
        check_magic(path, b"TFL3", 4, "a LiteRT (TFLite) flatbuffer")
        return path

    def load(self, artifact_dir: Path, manifest: dict[str, Any], *, threads: int | None = None) -> Runner:
        """A runner over the decode and prefill signatures; `threads` overrides the build's num_threads."""
        interpreter_module = self.require("ai_edge_litert.interpreter")
        path = Path(artifact_dir) / manifest["artifact"]["file"]
        if not path.is_file():
            raise RgexportError(f"LiteRT model {path} does not exist")
        options = manifest.get("backend_facts", {}).get("runtime_options", {})
        resolver = interpreter_module.OpResolverType[DELEGATES[options.get("delegate") or "xnnpack"]]
        interpreter = interpreter_module.Interpreter(
            model_path=str(path), num_threads=threads or options.get("num_threads"),
            experimental_op_resolver_type=resolver,
        )
        return TFLiteRunner(interpreter, manifest["io"], model_bytes=path.stat().st_size)

    def weight_bits(self, recipe: str, options: dict[str, Any]) -> float:
        """int4 stores a scale per block (`int4_block_size` inputs, 32 by default), at least 16 bits each:
        4.5 bits per parameter at 32."""
        if recipe == "int4":
            return RECIPE_BITS[recipe] + 16 / int(options.get("int4_block_size", DEFAULT_INT4_BLOCK_SIZE))
        return super().weight_bits(recipe, options)

    def table_copies_bits(self, recipe: str, options: dict[str, Any]) -> tuple[float, ...]:
        """The tied table once (the gather and the head read one tensor), at the stored bits."""
        return (self.weight_bits(recipe, options),)

    def packed_at_load_bits(self, recipe: str, options: dict[str, Any]) -> tuple[float, float]:
        """int8 and int4 on XNNPACK (the default delegate): the delegate packs every FULLY_CONNECTED weight it runs
        (the head, that is the tied table, included) into its own layout, once for each signature's subgraph,
        while the memory-mapped file stays resident. Measured at RecurrentGemma-2B (the streamed files, one
        decode step in a fresh process, both subgraphs packed whichever signature runs): int8 (2.78 GB) 5.28 GiB
        of anonymous memory, 2.1 bytes per parameter; int4 (1.59 GB, blocks of 32) 3.09 GiB, 1.24. A weight in
        one subgraph packs at 1 byte per parameter for int8 (one 32768 x 4096 FULLY_CONNECTED: 132 MiB for 128 MiB
        of weights). Counted as two copies at the stored bits
        (`weight_bits`: int4's block scales included, 4.5 bits at blocks of 32; XNNPACK's measure 4.95). Not
        measured at scale for the other recipes; the builtin kernels (delegate "none") pack nothing."""
        if recipe in STREAMED_RECIPES and options.get("delegate", "xnnpack") == "xnnpack":
            bits = 2 * self.weight_bits(recipe, options)
            return (bits, bits)
        return super().packed_at_load_bits(recipe, options)

    def quantise_part(self, part: Any, kind: str, ctx: BuildContext) -> Any:
        """A streamed recipe's own quantised model, a part at a time: the same int8 or int4 weights, the linears
        and the head quantising their inputs per token as LiteRT's dynamic-range kernels do. None for the
        recipes that ai-edge-quantizer applies to the float flatbuffer."""
        if ctx.recipe not in STREAMED_RECIPES or ctx.facts.get("quantiser") != STREAMED:
            return None
        block = ctx.options.get("int4_block_size", DEFAULT_INT4_BLOCK_SIZE)
        return quantise_part_(part, kind, RECIPE_BITS[ctx.recipe], block, activations=True)

    # Helpers -------------------------------------------------------------------------------------
    def _check_options(self, ctx: BuildContext) -> int:
        """Checks the runtime options and returns the int4 block size, checked against every dimension
        that int4 quantises."""
        delegate = ctx.options.get("delegate", "xnnpack")
        if delegate not in DELEGATES:
            raise RgexportError(f"delegate is {delegate!r}, expected one of {sorted(DELEGATES)}")
        threads = ctx.options.get("num_threads")
        if threads is not None and (not isinstance(threads, int) or isinstance(threads, bool) or threads < 1):
            raise RgexportError(f"num_threads must be a positive integer, got {threads!r}")
        block = ctx.options.get("int4_block_size", DEFAULT_INT4_BLOCK_SIZE)
        if block not in INT4_BLOCK_SIZES:
            raise RgexportError(f"int4_block_size is {block!r}, expected one of {list(INT4_BLOCK_SIZES)}")
        if ctx.recipe == "int4":
            # Blocks run along each weight's input dimension: the embedding table and the FC layers
            # that read the residual stream (width), the MLP's down projection and the recurrent
            # block's output projection. ai-edge-quantizer refuses a block that does not divide one.
            c = ctx.config
            dims = {"width": c.width, "mlp_expanded_width": c.mlp_expanded_width, "lru_width": c.lru_width}
            bad = {k: v for k, v in dims.items() if v % block}
            if bad:
                fits = [b for b in INT4_BLOCK_SIZES if all(v % b == 0 for v in dims.values())]
                raise RgexportError(
                    f"int4_block_size {block} does not divide {bad}; block sizes that fit this model: "
                    f"{fits or 'none (use int8)'}"
                )
        return block

    def _quantizer_recipe(self, recipe: str, block: int) -> Any:
        qtyping = self.require("ai_edge_quantizer.qtyping")
        recipe_manager = self.require("ai_edge_quantizer.recipe_manager")
        algorithms = self.require("ai_edge_quantizer.algorithm_manager").AlgorithmName
        everything = qtyping.TFLOperationName.ALL_SUPPORTED
        rm = recipe_manager.RecipeManager()
        if recipe == "fp16":
            rm.add_quantization_config(
                regex=".*", operation_name=everything, algorithm_key=algorithms.FLOAT_CASTING,
                op_config=qtyping.OpQuantizationConfig(
                    weight_tensor_config=qtyping.TensorQuantizationConfig(
                        num_bits=16, dtype=qtyping.TensorDataType.FLOAT),
                    compute_precision=qtyping.ComputePrecision.FLOAT,
                    explicit_dequantize=True,
                ),
            )
        elif recipe == "int8":
            rm.add_dynamic_config(regex=".*", operation_name=everything, num_bits=8,
                                  granularity=qtyping.QuantGranularity.CHANNELWISE)
        elif recipe == "int4":
            rm.add_dynamic_config(regex=".*", operation_name=everything, num_bits=4,
                                  granularity=qtyping.QuantGranularity(f"BLOCKWISE_{block}"))
        else:
            raise RgexportError(f"Recipe {recipe!r} has no quantiser recipe")
        return rm.get_quantization_recipe()


