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
module, so inputs cannot. Both directions therefore use `litert_name`: '.' written as '__'
(`state.blocks.0.rg_lru` -> `state__blocks__0__rg_lru`), which `our_name` reverses; the contract
records both.
"""

from __future__ import annotations

import collections
import dataclasses
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any, ClassVar

import numpy as np
import torch
from torch import nn

from rgexport.backends.base import Backend, BuildContext, Recipe, Runner, standard_io_contract
from rgexport.calibrate import sample_facts
from rgexport.errors import RgexportError
from rgexport.graphs import DecodeIO, PrefillIO, input_name, output_name
from rgexport.model import Griffin, state_spec

Dataset = dict[str, list[dict[str, np.ndarray]]]  # signature -> samples, each {LiteRT input name: array}

SIGNATURES = ("decode", "prefill")
ARTIFACT_FILE = "model.tflite"
INT4_BLOCK_SIZES = (32, 64, 128, 256)  # the blockwise granularities ai-edge-quantizer offers
DEFAULT_INT4_BLOCK_SIZE = 32
# Runtime option `delegate` -> the interpreter's op resolver. XNNPACK is LiteRT's default CPU delegate;
# "none" runs LiteRT's builtin kernels (a second opinion on numerics).
DELEGATES = {"xnnpack": "AUTO", "none": "BUILTIN_WITHOUT_DEFAULT_DELEGATES"}
# The build-time check compares the float flatbuffer with eager torch, relative to the output's scale.
# fp32 conversion measured 3e-6..8e-6 on logits; a swapped name or a miscompiled mask is off by ~1.
CHECK_TOLERANCE = 1e-4
# Representative dataset of `w8a8`: at most this many samples per signature, spread over all positions
# of the calibration sequences (`calibrate.capture_samples`).
MAX_CALIBRATION_SAMPLES = {"decode": 256, "prefill": 64}
# Measured on files this backend wrote, in a separate numpy-1 environment with tflite-runtime 2.14
# (its last release; notes/tflite.md).
_OLD_RUNTIME_FAILS = {
    "int8": "runs it and returns wrong logits without an error (0% top-1 agreement)",
    "int4": "refuses it (EMBEDDING_LOOKUP: 'Type not currently supported')",
}


def litert_name(name: str) -> str:
    """Our tensor name as a LiteRT signature name ('.' -> '__'); see the module docstring."""
    if "__" in name:
        raise RgexportError(f"Tensor name {name!r} holds '__', which the LiteRT name mapping reserves")
    mapped = name.replace(".", "__")
    if not mapped.isidentifier():
        raise RgexportError(f"Tensor name {name!r} maps to {mapped!r}, which is not a Python identifier")
    return mapped


def our_name(name: str) -> str:
    """Inverse of `litert_name`."""
    return name.replace("__", ".")


class _NamedSignature(nn.Module):
    """Gives a DecodeIO/PrefillIO keyword inputs and a dict of outputs, so LiteRT names them for us."""

    def __init__(self, io: DecodeIO):
        super().__init__()
        self.io = io
        first = "tokens" if isinstance(io, PrefillIO) else "token"
        self.input_names = [first, "position", *[litert_name(input_name(s)) for s in io.specs]]
        self.output_names = ["logits", *[litert_name(output_name(s)) for s in io.specs]]

    def forward(self, **inputs: torch.Tensor) -> dict[str, torch.Tensor]:
        outputs = self.io(*[inputs[n] for n in self.input_names])
        return dict(zip(self.output_names, outputs))

    def example_inputs(self) -> dict[str, torch.Tensor]:
        return dict(zip(self.input_names, self.io.example_inputs()))


def _signatures(model: Griffin, chunk: int) -> dict[str, _NamedSignature]:
    return {"decode": _NamedSignature(DecodeIO(model)).eval(),
            "prefill": _NamedSignature(PrefillIO(model, chunk)).eval()}


@dataclasses.dataclass
class TFLiteExport:
    """What `export` returns for a calibrated recipe: the float flatbuffer and the representative
    dataset `lower` calibrates with (other recipes get the flatbuffer bytes alone)."""

    flatbuffer: bytes
    calibration: Dataset


def representative_dataset(model: Griffin, sequences: Sequence[Sequence[int]], chunk: int) -> Dataset:
    """Real inputs of both signatures, by LiteRT input name: the (tokens, position, state) of calls
    along the fp32 trajectory over `sequences` (every decode step, every prefill chunk, spread evenly
    down to MAX_CALIBRATION_SAMPLES), so the ranges cover states past the attention window."""
    from rgexport.calibrate import capture_samples

    specs = model.state_spec(1)
    out: Dataset = {}
    for sig, t, first in (("decode", 1, "token"), ("prefill", chunk, "tokens")):
        rows = []
        for sample in capture_samples(model, [list(s) for s in sequences], chunk=t,
                                      max_samples=MAX_CALIBRATION_SAMPLES[sig]):
            tokens = sample.tokens.numpy().astype(np.int32)
            row = {first: tokens[0] if sig == "decode" else tokens,
                   "position": sample.position.numpy().astype(np.int32)}
            for spec in specs:
                row[litert_name(input_name(spec))] = sample.state[spec.name].numpy().astype(np.float32)
            rows.append(row)
        if not rows:
            raise RgexportError(
                f"The calibration sequences ({[len(s) for s in sequences]} tokens) give no {sig} sample: "
                f"each needs at least {t} tokens"
            )
        out[sig] = rows
    return out


class TFLiteBackend(Backend):
    """LiteRT: litert-torch conversion, ai-edge-quantizer recipes, ai_edge_litert Interpreter runner."""

    name = "tflite"
    extra = "tflite"
    artifact_suffix = ".tflite"
    packages = ("litert-torch", "ai-edge-litert", "ai-edge-quantizer", "torch")
    options: ClassVar[dict[str, str]] = {
        "delegate": '"xnnpack" (default) or "none" (the builtin kernels): the runtime path the runner uses',
        "num_threads": "interpreter threads (default: the runtime's)",
        "int4_block_size": "int4: weights per scale along the input dimension (default 32)",
    }
    recipes: ClassVar[dict[str, Recipe]] = {
        "fp32": Recipe("fp32", "float32 weights and activations"),
        "fp16": Recipe("fp16", "float16 weights, dequantised to float32 when the model loads; float32 "
                               "compute", quantized=True),
        "int8": Recipe("int8", "dynamic range: int8 per-channel weights, activations quantised to int8 "
                               "on the fly inside each matmul; state and logits float32", quantized=True),
        "int4": Recipe("int4", "dynamic range with int4 weights in blocks along the input dimension "
                               "(option int4_block_size, default 32); state and logits float32",
                       quantized=True),
        "w8a8": Recipe(
            "w8a8",
            "static int8 activations and int8 weights, calibrated on (tokens, position, state) samples "
            "captured from the fp32 model over calibration text: the recurrent and attention projections, "
            "the MLPs and the RG-LRU gates run int8 in and out. Float32 activations, chosen by a per-group "
            "sensitivity study on the shipped model (one group int8 at a time, 512 held-out tokens): "
            "attention scores/softmax (their -30000 mask leaves int8 a ~118 step: 90.4% top-1 alone), the "
            "RG-LRU recurrence, Conv1D, norms and residual stream (no weights; together they doubled the "
            "KL, 0.0038 -> 0.0067), the state, the logits and soft-cap (97.1% alone); embedding and head "
            "weights dynamic int8",
            quantized=True, calibrated=True),
    }
    default_recipe = "fp32"

    # Build stages --------------------------------------------------------------------------------
    def export(self, prepared: Griffin, ctx: BuildContext) -> bytes | TFLiteExport:
        """Converts decode and prefill into one float flatbuffer and checks it against `prepared`; for a
        calibrated recipe, also captures the representative dataset from `prepared` (a TFLiteExport)."""
        self.check_recipe(ctx.recipe)
        self._check_options(ctx)
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
        signatures = _signatures(prepared, chunk)
        converter = None
        for name, module in signatures.items():
            add = litert_torch.signature if converter is None else converter.signature
            converter = add(name, module, sample_kwargs=module.example_inputs())
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

    def lower(self, exported: bytes | TFLiteExport, ctx: BuildContext) -> bytes:
        """Applies the recipe to the float flatbuffer; the signatures must come out unchanged.

        A calibrated recipe needs the `TFLiteExport` that `export` returns for it (any export's
        flatbuffer will do, with a dataset from `representative_dataset`)."""
        self.check_recipe(ctx.recipe)
        block = self._check_options(ctx)
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
        ctx.facts["ops"] = op_histogram(lowered)
        ctx.facts["recipe"] = {"name": ctx.recipe, "description": self.recipes[ctx.recipe].description}
        if ctx.recipe == "int4":
            ctx.facts["recipe"]["int4_block_size"] = block
        ctx.facts["enable_x64"] = False
        ctx.facts["runtime_options"] = {"delegate": ctx.options.get("delegate", "xnnpack"),
                                        "num_threads": ctx.options.get("num_threads")}
        ctx.facts["name_mapping"] = "litert_name = name with '.' written '__' (inputs cannot hold dots)"
        ctx.facts["file_metadata"] = file_metadata(lowered)
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

    def write(self, lowered: bytes, ctx: BuildContext) -> list[Path]:
        ctx.work_dir.mkdir(parents=True, exist_ok=True)
        path = ctx.work_dir / ARTIFACT_FILE
        path.write_bytes(lowered)
        return [path]

    def io_contract(self, ctx: BuildContext) -> dict[str, Any]:
        """The standard functional contract with each tensor's LiteRT signature name added."""
        specs = state_spec(ctx.config, 1)
        contract = standard_io_contract(ctx.config, ctx.prefill_chunk, specs, placement="io")
        for method_name, method in contract["methods"].items():
            method["signature"] = method_name
            for tensor in (*method["inputs"], *method["outputs"]):
                tensor["litert_name"] = litert_name(tensor["name"])
        for tensor in contract["state"]["tensors"]:
            tensor["litert_input"] = litert_name(tensor["input"])
            tensor["litert_output"] = litert_name(tensor["output"])
        contract["litert_names"] = (
            "Each tensor's LiteRT signature name is its name with '.' written '__' (litert-torch names "
            "signature inputs after Python parameters, which cannot hold dots); outputs follow the same "
            "rule so that new_state__X feeds state__X."
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


# Checks on the flatbuffer --------------------------------------------------------------------------
def _signature_io(flatbuffer: bytes) -> dict[str, dict[str, dict[str, tuple]]]:
    """{signature: {"inputs"|"outputs": {name: (shape, dtype)}}} as the interpreter reports them."""
    from ai_edge_litert.interpreter import Interpreter

    interpreter = Interpreter(model_content=flatbuffer)
    out = {}
    for sig in interpreter.get_signature_list():
        runner = interpreter.get_signature_runner(sig)
        out[sig] = {
            kind: {n: (tuple(int(d) for d in det["shape"]), np.dtype(det["dtype"]).name)
                   for n, det in details.items()}
            for kind, details in (("inputs", runner.get_input_details()),
                                  ("outputs", runner.get_output_details()))
        }
    return out


def op_histogram(flatbuffer: bytes) -> dict[str, dict[str, int]]:
    """{signature subgraph: {builtin op name: count}}, read from the flatbuffer (before delegation)."""
    from ai_edge_litert import schema_py_generated as schema

    names = {v: k for k, v in vars(schema.BuiltinOperator).items() if not k.startswith("_")}
    model = schema.Model.GetRootAs(flatbuffer, 0)
    out = {}
    for i in range(model.SubgraphsLength()):
        subgraph = model.Subgraphs(i)
        counts: collections.Counter[str] = collections.Counter()
        for j in range(subgraph.OperatorsLength()):
            code = model.OperatorCodes(subgraph.Operators(j).OpcodeIndex())
            # Builtin codes above 127 live only in BuiltinCode; older ones in the deprecated field.
            counts[names.get(max(code.BuiltinCode(), code.DeprecatedBuiltinCode()), "CUSTOM")] += 1
        out[(subgraph.Name() or b"").decode() or str(i)] = dict(sorted(counts.items()))
    return out


def file_metadata(flatbuffer: bytes) -> dict[str, str]:
    """The model's small text metadata entries (the converter writes `min_runtime_version`)."""
    from ai_edge_litert import schema_py_generated as schema

    model = schema.Model.GetRootAs(flatbuffer, 0)
    out = {}
    for i in range(model.MetadataLength()):
        entry = model.Metadata(i)
        buffer = model.Buffers(entry.Buffer())
        if 0 < buffer.DataLength() <= 256:
            out[entry.Name().decode()] = bytes(buffer.DataAsNumpy()).rstrip(b"\0").decode(errors="replace")
    return out


def _check_runs(flatbuffer: bytes, dataset: Dataset) -> None:
    """Runs each signature of a quantised file on its last calibration sample (the furthest position):
    every output must be there and finite. ai-edge-quantizer can write a file that converts and loads
    but leaves a signature output unfilled ("Tensor data is null"; see tflite_calibration.static_ops)."""
    from ai_edge_litert.interpreter import Interpreter

    interpreter = Interpreter(model_content=flatbuffer)
    for sig, rows in dataset.items():
        runner = interpreter.get_signature_runner(sig)
        try:
            outputs = runner(**rows[-1])
        except ValueError as e:
            raise RgexportError(f"The quantised signature {sig} does not run: {e}") from None
        bad = sorted(name for name, value in outputs.items() if not np.isfinite(value).all())
        if bad:
            raise RgexportError(f"The quantised signature {sig} returns non-finite values in {bad}")


def _check_against_eager(flatbuffer: bytes, signatures: dict[str, _NamedSignature], ctx: BuildContext) -> None:
    """Runs each signature once on a random state past the window and compares every output by name.

    Fails when a signature lacks a name we expect, holds one we do not, or computes something else
    under a name (a mapping that trusted positional order, or a miscompilation).
    """
    from ai_edge_litert.interpreter import Interpreter

    interpreter = Interpreter(model_content=flatbuffer)
    found = set(interpreter.get_signature_list())
    if found != set(SIGNATURES):
        raise RgexportError(f"The converted model has signatures {sorted(found)}, expected {list(SIGNATURES)}")
    g = torch.Generator().manual_seed(0)
    window = ctx.config.attention_window_size
    worst = {}
    for sig_name, module in signatures.items():
        runner = interpreter.get_signature_runner(sig_name)
        inputs_seen = set(runner.get_input_details())
        outputs_seen = set(runner.get_output_details())
        if inputs_seen != set(module.input_names) or outputs_seen != set(module.output_names):
            raise RgexportError(
                f"Signature {sig_name} has inputs {sorted(inputs_seen)} and outputs {sorted(outputs_seen)}, "
                f"expected {sorted(module.input_names)} and {sorted(module.output_names)}"
            )
        probe = {}
        for name, example in module.example_inputs().items():
            if name in ("token", "tokens"):
                probe[name] = torch.randint(0, ctx.config.vocab_size, example.shape, generator=g,
                                            dtype=torch.int32)
            elif name == "position":
                # Past the window, so the ring buffer has wrapped and position 0's shortcuts are off.
                probe[name] = torch.full(example.shape, window + 3, dtype=torch.int32)
            else:
                probe[name] = torch.randn(example.shape, generator=g)
        with torch.no_grad():
            expected = module(**probe)
        got = runner(**{k: v.numpy() for k, v in probe.items()})
        for name, want in expected.items():
            want = want.numpy()
            err = float(np.abs(got[name] - want).max()) / max(1.0, float(np.abs(want).max()))
            worst[f"{sig_name}.{name}"] = err
            if not err <= CHECK_TOLERANCE:
                raise RgexportError(
                    f"LiteRT signature {sig_name} output {name} differs from eager torch by {err:.3g} "
                    f"(relative; allowed {CHECK_TOLERANCE}) at position {window + 3}: the conversion "
                    "miscompiled the graph or the output name does not hold the tensor it names"
                )
    ctx.facts["conversion_check"] = {
        "position": window + 3,
        "max_relative_error": max(worst.values()),
        "outputs_checked": len(worst),
    }


# Runner --------------------------------------------------------------------------------------------
class TFLiteRunner(Runner):
    """Drives the `decode` and `prefill` signatures, carrying the state between calls in numpy."""

    def __init__(self, interpreter: Any, io: dict[str, Any], model_bytes: int = 0):
        self._interpreter = interpreter
        self._io = io
        self.prefill_chunk = int(io["prefill_chunk"])
        self._model_bytes = model_bytes
        self._runners = {}
        available = set(interpreter.get_signature_list())
        for method in SIGNATURES:
            sig = io["methods"][method].get("signature", method)
            if sig not in available:
                raise RgexportError(f"The LiteRT model has no signature {sig!r} (it has {sorted(available)})")
            runner = interpreter.get_signature_runner(sig)
            _check_contract(method, runner, io["methods"][method])
            self._runners[method] = runner
        # state name -> (LiteRT input name, LiteRT output name, shape)
        self._state_io = [
            (t["name"], t.get("litert_input", litert_name(t["input"])),
             t.get("litert_output", litert_name(t["output"])), tuple(t["shape"]))
            for t in io["state"]["tensors"]
        ]
        self._vocab = int(io["methods"]["decode"]["outputs"][0]["shape"][-1])
        self._state: dict[str, np.ndarray] = {}
        self.reset()

    def reset(self) -> None:
        self._state = {inp: np.zeros(shape, np.float32) for _, inp, _, shape in self._state_io}

    def _run(self, method: str, first: str, tokens: np.ndarray, position: int) -> np.ndarray:
        if tokens.min() < 0 or tokens.max() >= self._vocab:
            raise RgexportError(f"Token ids must be in [0, {self._vocab}), got {tokens.min()}..{tokens.max()}")
        if position < 0:
            raise RgexportError(f"Position must be >= 0, got {position}")
        out = self._runners[method](**{first: tokens, "position": np.array([position], np.int32)}, **self._state)
        # The signature runner returns copies today, but views into the interpreter's arena would be
        # overwritten by the next call: own every array that is fed back.
        self._state = {inp: _owned(out[outp]) for _, inp, outp, _ in self._state_io}
        return _owned(out["logits"][0])

    def decode(self, token: int, position: int) -> np.ndarray:
        return self._run("decode", "token", np.array([token], np.int32), position)

    def prefill(self, tokens: Sequence[int], position: int) -> np.ndarray:
        if len(tokens) != self.prefill_chunk:
            raise RgexportError(f"prefill takes exactly {self.prefill_chunk} tokens, got {len(tokens)}")
        return self._run("prefill", "tokens", np.asarray(tokens, np.int32)[None], position)

    def state(self) -> dict[str, np.ndarray]:
        return {name: self._state[inp].copy() for name, inp, _, _ in self._state_io}

    def memory(self) -> dict[str, int]:
        """Bytes the interpreter holds that it reports: the model, the state, each signature's I/O."""
        out = {"model_bytes": self._model_bytes,
               "state_bytes": sum(a.nbytes for a in self._state.values())}
        for method, runner in self._runners.items():
            out[f"{method}_io_bytes"] = sum(
                _nbytes(d) for details in (runner.get_input_details(), runner.get_output_details())
                for d in details.values()
            )
        return out


def _owned(a: np.ndarray) -> np.ndarray:
    return a if a.flags.owndata and a.base is None else a.copy()


def _nbytes(details: dict[str, Any]) -> int:
    return int(np.prod(details["shape"])) * np.dtype(details["dtype"]).itemsize


def _check_contract(method: str, runner: Any, contract: dict[str, Any]) -> None:
    """The signature's names, shapes and dtypes must be those the manifest promises."""
    for kind, details in (("inputs", runner.get_input_details()), ("outputs", runner.get_output_details())):
        want = {t.get("litert_name", litert_name(t["name"])): (tuple(t["shape"]), t["dtype"])
                for t in contract[kind]}
        got = {n: (tuple(int(x) for x in d["shape"]), np.dtype(d["dtype"]).name) for n, d in details.items()}
        if want != got:
            missing = sorted(set(want) - set(got))
            extra = sorted(set(got) - set(want))
            differ = sorted(n for n in set(want) & set(got) if want[n] != got[n])
            raise RgexportError(
                f"LiteRT signature {method} {kind} do not match the manifest: missing {missing}, "
                f"unexpected {extra}, different shape or dtype {differ}"
            )
