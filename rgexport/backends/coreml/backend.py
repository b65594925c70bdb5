"""Core ML backend: a multifunction ML program (.mlpackage, iOS 18) with `decode` and `prefill` functions.

Stages: export traces the step model twice with TorchScript (one token; one prefill chunk) -> lower
converts each with coremltools (fp16 compute with float32 islands, see below) and compresses its weights
per recipe -> write merges the two programs into one multifunction package whose functions share their
weights and their state.

State, two ways (option `state_dtype`):
- "float16": Core ML states (`ct.StateType`), kept inside the program; Core ML only stores states in
  fp16, so the RG-LRU hidden state and the K/V window are held in fp16 between calls.
- "float32": functional state, passed in and out as float32 tensors (`state__*` -> `new_state__*`,
  `identifier` of the contract's `state.*` -> `new_state.*`).
Default "float16": over 4096 tokens of the shipped model, fp16 state adds no measurable drift (error
flat with position, perplexity equal to 4 digits; notes/coreml.md), and Core ML states avoid copying
the state through every call.

Float32 islands in the fp16 program (`fp32_islands`):
- Position arithmetic (attention mask, rotary angles, ring-buffer slots, the reset at position 0):
  fp16 has integers exactly only up to 2048, and rotary angles of position p are p * inv_freq.
- The RG-LRU: its decay a = exp(log_a) lies just below 1, where fp16's spacing (4.9e-4) is as large as
  1 - a itself; sqrt(1 - a^2) cancels catastrophically; the recurrence h = a * h + x compounds every
  rounding. The island is everything elementwise feeding the RG-LRU state (gates' arithmetic after the
  sigmoid, Conv1D, recurrence); the matmuls stay fp16.
- RMSNorm's mean of squares (x * x, mean, + eps, rsqrt): x * x passes fp16's 65504 once |x| > 256, and
  the residual streams of trained Gemma-family models do (a 2B checkpoint folder's reach 457); the rsqrt
  is then 0, and every logit the same. x and the normalised product stay fp16.
The Neural Engine computes in fp16 only, so Core ML runs the islands on CPU or GPU whatever the option
`compute_units` (recorded in the manifest, applied when loading on macOS) asks for.

Weights: fp16 (default), or compressed with coremltools.optimize.coreml (int8 per channel, int4 per block
of 32, 4-bit k-means palettes). An all-zero row (an embedding padding row kept at zero) gets a zero scale
from coremltools' quantiser, which divides 0/0 and casts the NaN to int (a platform-dependent value):
`_zero_scale_to_one` rewrites such blocks as scale 1 over zero data; for palettes,
`_zero_row_in_palette` gives the row an exact 0 entry. Either way the row dequantises to exact zeros.

Large models (above 2 GiB of float32 weights, or option stream_weights=true), recipes w8 and w4: export
traces a stand-in whose large weights are untouched zero pages (`export.placeholder_model`), and lower compresses
each weight as coremltools' pipeline reaches it, read from the checkpoint a part at a time
(`recipes.StreamedWeights`, the pass `rgexport::stream_compress`), so the float32 model is never whole; write
assembles the multifunction package from the programs in memory (`export.save_multifunction_in_memory`).
The package holds what compressing the whole converted program writes (tests compare). The manifest
records each compressed weight's block sizes, from which `quantise_part` builds the own quantised model.

Recipe `w8a8` (calibrated): int8 weights as recipe w8, then int8 activations around every linear layer,
inserted by coremltools' own activation passes with ranges that rgexport's MIL interpreter measures on real
(tokens, position, state) samples (coremltools' calibration needs `predict`, i.e. macOS, and passes no
state; rgexport/backends/coreml_calibration.py has the details and the per-group decision).

Running on Linux: `predict()` needs macOS, so `load` returns a runner backed by rgexport's MIL
interpreter (`mil_interpreter`); on macOS it uses `MLModel.predict` with `make_state()`.
"""

from __future__ import annotations

import contextlib
import platform
import shutil
import time
from pathlib import Path
from typing import Any

import numpy as np

from rgexport.backends.base import Backend, BuildContext, Runner, standard_io_contract
from rgexport.backends.coreml.export import (
    ARTIFACT_FILE,
    COMPUTE_UNITS,
    DEFAULT_STATE_DTYPE,
    FUNCTIONS,
    STATE_DTYPES,
    _graphs,
    _IslandSelector,
    placeholder_model,
    save_multifunction_in_memory,
    validated_once,
)
from rgexport.backends.coreml.recipes import (
    RECIPES,
    STREAMED_RECIPES,
    StreamedWeights,
    _compress,
    _w8a8,
    block_sizes_by_part,
    compressed_block_sizes,
    dequantise_,
    streamed_pipeline,
)
from rgexport.backends.coreml.runner import CoreMLRunner, InterpreterRunner, _names_from_contract, _specs_from_contract
from rgexport.calibrate import sample_facts
from rgexport.errors import RgexportError
from rgexport.graphs import input_name, output_name
from rgexport.memory import map_large_allocations
from rgexport.model import Griffin, TensorSpec, identifier


class CoreMLBackend(Backend):
    name = "coreml"
    extra = "coreml"
    artifact_suffix = ".mlpackage"
    packages = ("coremltools", "torch")
    build_base_bytes = int(1.5 * (1 << 30))  # a larger toolchain than ONNX's and LiteRT's
    # `build --target ios` from a 0.89 B checkpoint (3.56 GB of float32 weights) passed 21 GB in the fp16
    # conversion and was stopped there (issue 15): at least 5.9x, a lower bound. Applies to the recipes that
    # load the whole model (fp16, palette4, w8a8); w8 and w4 stream above 2 GiB.
    whole_model_build_factor = 5.9
    options = {
        "state_dtype": '"float16" (default) or "float32": how the state is held (module docstring)',
        "compute_units": '"ALL" (default), "CPU_ONLY", "CPU_AND_GPU" or "CPU_AND_NE", used when loading',
        "stream_weights": '"auto" (default: above 2 GiB of float32 weights), true or false: w8 and w4 convert a '
                          "stand-in and compress each weight as it is read from the checkpoint",
    }
    recipes = RECIPES
    recipe_aliases = {"int8": "w8", "int4": "w4"}  # names before the one recipe vocabulary
    quantizes_in = "lower"  # the recipe works on the converted program
    default_recipe = "fp16"

    def state_dtype(self, ctx: BuildContext) -> str:
        value = ctx.options.get("state_dtype", DEFAULT_STATE_DTYPE)
        if value not in STATE_DTYPES:
            raise RgexportError(f"Core ML option state_dtype is {value!r}, expected one of {list(STATE_DTYPES)}")
        return value

    def compute_units(self, ctx: BuildContext) -> str:
        value = ctx.options.get("compute_units", "ALL")
        if value not in COMPUTE_UNITS:
            raise RgexportError(f"Core ML option compute_units is {value!r}, expected one of {list(COMPUTE_UNITS)}")
        return value

    def quantize(self, model: Griffin, ctx: BuildContext) -> Griffin:
        """Core ML compresses the converted program (in `lower`), not the torch model. A calibrated
        recipe's calibration tokens are checked here, before the conversion's cost."""
        self.check_recipe(ctx.recipe)
        self.state_dtype(ctx)
        self.compute_units(ctx)
        if self.recipes[ctx.recipe].calibrated:
            ctx.calibration_sequences()
        return model

    def streams_weights(self, recipe: str, options: dict[str, Any]) -> bool | None:
        """w8 and w4 (`recipes.STREAMED_RECIPES`): coremltools compresses weight by weight, so each is read
        from the stream as its pass reaches it; fp16 would hold every weight in fp16 anyway, palette4's k-means
        and w8a8's calibration run over the whole float program."""
        want = options.get("stream_weights", "auto")
        if want not in ("auto", True, False):
            raise RgexportError(f'option stream_weights is {want!r}; expected "auto", true or false')
        if self.resolve_recipe(recipe) not in STREAMED_RECIPES or want is False:
            return False
        return True if want is True else None

    def quantise_part(self, part: Any, kind: str, ctx: BuildContext) -> Any:
        """w8 and w4's own quantised model, a part at a time: each weight the build compressed (the manifest's
        `compressed_blocks`: which, and in what blocks) as the package holds it (`recipes.dequantise_`), the
        rest float32, computed in float32 where the package computes in fp16 (with float32 islands)."""
        blocks = ctx.facts.get("coreml", {}).get("compressed_blocks")
        if ctx.recipe not in STREAMED_RECIPES or not blocks:
            return None
        import torch

        with torch.no_grad():
            for name, p in part.named_parameters():
                sizes = blocks.get(f"{kind}:{name}")
                if sizes is not None:
                    dequantise_(p, ctx.recipe, sizes)
        return part

    def export(self, prepared: Griffin, ctx: BuildContext) -> dict[str, Any]:
        """Traces decode and prefill (TorchScript: the route whose state writes coremltools maps to states).
        From a stream (`streams_weights`), the traced model is `placeholder_model`'s stand-in, and `lower`
        reads the weights."""
        import torch

        self.require("coremltools")
        weights = None
        if ctx.stream is not None:
            prepared, names = placeholder_model(ctx.stream)
            weights = StreamedWeights(ctx.stream, names)
        model = prepared.eval().requires_grad_(False)
        traced = {}
        with torch.no_grad():
            for fn, (module, example) in _graphs(model, ctx.prefill_chunk, self.state_dtype(ctx),
                                                      ctx.prefill_last_only).items():
                traced[fn] = (torch.jit.trace(module, example, check_trace=False), example)
        # A calibrated recipe runs the model itself over the calibration text in `lower`.
        return {"traced": traced, "specs": model.state_spec(1), "model": model, "weights": weights}

    def lower(self, exported: dict[str, Any], ctx: BuildContext) -> dict[str, Any]:
        ct = self.require("coremltools")
        if ctx.recipe == "palette4":
            self.require("sklearn")  # coremltools' k-means (kmeans1d, its other option, is not installed)
        specs: list[TensorSpec] = exported["specs"]
        weights: StreamedWeights | None = exported.get("weights")
        if weights is not None:
            map_large_allocations()  # each weight's temporaries go back when freed (rgexport.memory)
        stateful = self.state_dtype(ctx) == "float16"
        lowered, seconds, islands, checks = {}, {}, {}, {}
        samples = None
        if ctx.recipe == "w8a8":
            from rgexport.backends.coreml import calibration as cal

            tokens = ctx.calibration_sequences()
            if exported.get("model") is None:
                raise RgexportError("w8a8 calibrates by running the model: lower() needs export()'s result")
            start = time.perf_counter()
            samples = cal.calibration_samples(exported["model"], tokens, ctx.prefill_chunk)
            ctx.facts["coreml_w8a8"] = {
                "calibration": sample_facts(
                    {fn: [int(x.position[0]) for x in rows] for fn, rows in samples.items()}, tokens,
                    ctx.config.attention_window_size),
                "capture_seconds": round(time.perf_counter() - start, 2),
            }
        for fn, (traced, example) in exported["traced"].items():
            token_name = "token" if fn == "decode" else "tokens"
            inputs = [ct.TensorType(name=token_name, shape=tuple(example[0].shape), dtype=np.int32),
                      ct.TensorType(name="position", shape=(1,), dtype=np.int32)]
            outputs = [ct.TensorType(name="logits", dtype=np.float32)]
            states = None
            if stateful:
                states = [ct.StateType(wrapped_type=ct.TensorType(shape=s.shape, dtype=np.float16),
                                       name=s.identifier) for s in specs]
            else:
                inputs += [ct.TensorType(name=identifier(input_name(s)), shape=s.shape, dtype=np.float32)
                           for s in specs]
                outputs += [ct.TensorType(name=identifier(output_name(s)), dtype=np.float32) for s in specs]
            selector = _IslandSelector()
            start = time.perf_counter()
            pipeline, active = ct.PassPipeline.DEFAULT, contextlib.nullcontext()
            if weights is not None:
                pipeline, active = streamed_pipeline(weights, ctx.recipe)
            with active, validated_once() as once:
                mlmodel = ct.convert(
                    traced,
                    inputs=inputs,
                    outputs=outputs,
                    states=states,
                    minimum_deployment_target=ct.target.iOS18,
                    compute_precision=ct.transform.FP16ComputePrecision(op_selector=selector),
                    pass_pipeline=pipeline,
                    skip_model_load=True,
                )
            if weights is not None:
                weights.release()
                missing = weights.names - weights.read
                if missing:
                    raise RgexportError(f"Core ML {fn}: {len(missing)} weights (e.g. {sorted(missing)[0]}) were "
                                        "not given their values during conversion")
            elif samples is not None:
                mlmodel = _w8a8(mlmodel, fn, samples[fn], specs, stateful, ctx)
            else:
                mlmodel = _compress(mlmodel, ctx.recipe)
            seconds[fn] = round(time.perf_counter() - start, 2)
            checks[fn] = once
            islands[fn] = selector.counts
            norms = 2 * len(ctx.config.block_types) + 1  # two per residual block, and the final norm
            if not selector.counts.get("position") or (
                any(s.kind == "rg_lru" for s in specs) and not selector.counts.get("rg_lru")
            ) or selector.counts.get("rms_norm") != 4 * norms:
                raise RgexportError(f"Core ML {fn}: float32 islands not found ({selector.counts}); the "
                                    "converted graph no longer has the shape rgexport expects")
            lowered[fn] = mlmodel
        ctx.facts["coreml"] = {
            "functions": list(FUNCTIONS),
            "default_function": "decode",
            "minimum_deployment_target": "iOS18",
            "state_dtype": self.state_dtype(ctx),
            "compute_units": self.compute_units(ctx),
            "compute_precision": "float16 with float32 islands",
            "fp32_island_ops": islands,
            "conversion_seconds": seconds,
            "program_checks": checks,  # validated_once: checks made, the per-pass checks they stand for
        }
        if weights is not None:
            ctx.facts["coreml"]["streamed_weights"] = {
                "stand_ins": len(weights.names), "compressed": len(weights.compressed),
                "parts_read": weights.reads}
            weights.compressed.clear()  # the programs hold the compressed weights now
        if ctx.recipe in STREAMED_RECIPES:  # the own model's recipe: which weights, in what blocks (decode's)
            names = [n for n, _ in exported["model"].named_parameters()]
            ctx.facts["coreml"]["compressed_blocks"] = block_sizes_by_part(
                compressed_block_sizes(lowered["decode"], names))
        ctx.notes.append(
            "Core ML: one multifunction .mlpackage (functions decode and prefill share weights and state); "
            f"state held as {self.state_dtype(ctx)}"
            + (" in Core ML states." if stateful else " tensors passed in and out of each call.")
            + " Position arithmetic and the RG-LRU run in float32 inside the fp16 program."
        )
        if samples is not None:
            from rgexport.backends.coreml.calibration import W8A8_NOTE

            ctx.notes.append(W8A8_NOTE)
        return lowered

    def write(self, lowered: dict[str, Any], ctx: BuildContext) -> list[Path]:
        self.require("coremltools")
        out = Path(ctx.work_dir) / ARTIFACT_FILE
        if out.exists():
            shutil.rmtree(out)
        save_multifunction_in_memory(lowered, out, default="decode")
        lowered.clear()  # `write` consumes `lowered`: the programs are not needed once written
        return [out]

    def io_contract(self, ctx: BuildContext) -> dict[str, Any]:
        from rgexport.model import state_spec

        specs = state_spec(ctx.config, 1)
        stateful = self.state_dtype(ctx) == "float16"
        contract = standard_io_contract(
            ctx.config, ctx.prefill_chunk, specs, "internal" if stateful else "io",
            state_dtype="float16" if stateful else "float32", prefill_logits=ctx.prefill_logits,
        )
        # Core ML feature names cannot hold dots: every name is the `identifier` of the contract's name
        # (new dicts: decode and prefill share their state entries).
        for method in contract["methods"].values():
            for kind in ("inputs", "outputs"):
                method[kind] = [{**t, "name": identifier(t["name"]), "identifier": identifier(t["name"])}
                                for t in method[kind]]
        if not stateful:
            for t in contract["state"]["tensors"]:
                t["input"], t["output"] = identifier(t["input"]), identifier(t["output"])
        contract["functions"] = {"decode": "decode", "prefill": "prefill", "default": "decode"}
        return contract

    def check_artifact(self, artifact_dir: Path, manifest: dict[str, Any]) -> Path:
        """The package's manifest and model spec parse (protobuf), and the spec is an ML program."""
        from rgexport.safety import first_line

        path = super().check_artifact(artifact_dir, manifest)
        ct = self.require("coremltools")
        try:
            spec = ct.utils.load_spec(str(path))
        except Exception as e:  # noqa: BLE001 - a damaged user file: one line naming it
            raise RgexportError(f"{path} is not a Core ML package ({type(e).__name__}: {first_line(e)}); rebuild "
                                "the artifact") from None
        if spec.WhichOneof("Type") != "mlProgram":
            raise RgexportError(f"{path} is not a Core ML ML program; rebuild the artifact")
        return path

    def stand_in_here(self) -> str:
        return "" if platform.system() == "Darwin" else InterpreterRunner.stand_in

    def load(self, artifact_dir: Path, manifest: dict[str, Any], *, threads: int | None = None) -> Runner:
        """`threads` is accepted and unused: Core ML exposes no CPU thread count."""
        self.require("coremltools")
        path = Path(artifact_dir) / manifest["artifact"]["file"]
        io = manifest["io"]
        chunk = int(io["prefill_chunk"])
        specs, names = _specs_from_contract(io), _names_from_contract(io)
        stateful = io["state"]["placement"] == "internal"
        if not self.stand_in_here():
            facts = manifest.get("backend_facts", manifest.get("facts", {})).get("coreml", {})
            return CoreMLRunner(path, specs, names, chunk, stateful, facts.get("compute_units", "ALL"))
        return InterpreterRunner(path, specs, names, chunk, stateful)


