"""Conversion with litert-torch: named signatures over the step model, and checks of the converted flatbuffer."""

from __future__ import annotations

import collections
import contextlib
import dataclasses
import mmap
import struct
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from rgexport.backends.base import BuildContext
from rgexport.errors import RgexportError
from rgexport.graphs import DecodeIO, PrefillIO, input_name, output_name
from rgexport.model import Griffin, identifier

Dataset = dict[str, list[dict[str, np.ndarray]]]  # signature -> samples, each {LiteRT input name: array}
Flatbuffer = bytes | Path  # a model in memory, or its file (a streamed build's, past 2 GB, stays on disk)

SIGNATURES = ("decode", "prefill")

ARTIFACT_FILE = "model.tflite"

# The build-time check compares the float flatbuffer with eager torch, relative to the output's scale.
# fp32 conversion measured 3e-6..8e-6 on logits; a swapped name or a miscompiled mask is off by ~1.
CHECK_TOLERANCE = 1e-4

# A streamed file (`recipes.STREAMED`) is checked after its DEQUANTIZEs are dropped, against the
# torch model quantising its linears' inputs per token (`recipes.runtime_activations`). Measured (relative to the
# output's scale, random state past the window), decode / prefill: shipped model 2.9e-7 / 1.2e-2; SMALL
# (tests) 4.3e-7 at worst; RecurrentGemma-2B with random weights 2.7e-2 / 2.8e-2, both at the last blocks' Conv1D
# states (not traced further: int8 roundings of inputs that differ by float order, carried through 26
# random blocks, would do it). Against the weight-only model the shipped model's are 2-3e-2. A swapped
# name or a miscompiled mask is off by ~1.
HYBRID_CHECK_TOLERANCE = 5e-2

# Measured on files this backend wrote, in a separate numpy-1 environment with tflite-runtime 2.14
# (its last release; notes/tflite.md).
_OLD_RUNTIME_FAILS = {
    "int8": "runs it and returns wrong logits without an error (0% top-1 agreement)",
    "int4": "refuses it (EMBEDDING_LOOKUP: 'Type not currently supported')",
}

class _NamedSignature(nn.Module):
    """Gives a DecodeIO/PrefillIO keyword inputs and a dict of outputs, so LiteRT names them for us."""

    def __init__(self, io: DecodeIO):
        super().__init__()
        self.io = io
        first = "tokens" if isinstance(io, PrefillIO) else "token"
        self.input_names = [first, "position", *[identifier(input_name(s)) for s in io.specs]]
        self.output_names = ["logits", *[identifier(output_name(s)) for s in io.specs]]

    def forward(self, **inputs: torch.Tensor) -> dict[str, torch.Tensor]:
        outputs = self.io(*[inputs[n] for n in self.input_names])
        return dict(zip(self.output_names, outputs))

    def example_inputs(self) -> dict[str, torch.Tensor]:
        return dict(zip(self.input_names, self.io.example_inputs()))

def _signatures(model: Griffin, chunk: int, last_only: bool = False) -> dict[str, _NamedSignature]:
    return {"decode": _NamedSignature(DecodeIO(model)).eval(),
            "prefill": _NamedSignature(PrefillIO(model, chunk, last_only)).eval()}

def converter_for(litert_torch: Any, signatures: dict[str, _NamedSignature]) -> Any:
    """litert-torch's converter over every signature, each named and with its example inputs."""
    converter = None
    for name, module in signatures.items():
        add = litert_torch.signature if converter is None else converter.signature
        converter = add(name, module, sample_kwargs=module.example_inputs())
    return converter


@dataclasses.dataclass
class StreamedExport:
    """What `export` returns for a streamed recipe: the converted file (quantised weights behind DEQUANTIZE),
    the eager outputs that `lower` checks the rewritten file against, and int4's block scales."""

    path: Path
    probe: Probe
    block_scales: dict[float, np.ndarray] = dataclasses.field(default_factory=dict)  # int4 (`recipes.intx_weight`)


@dataclasses.dataclass
class TFLiteExport:
    """What `export` returns for a calibrated recipe: the float flatbuffer and the representative
    dataset `lower` calibrates with (other recipes get the flatbuffer bytes alone)."""

    flatbuffer: bytes
    calibration: Dataset

@contextlib.contextmanager
def strict_qdq_mode() -> Iterator[None]:
    """litert-torch's LiteRT conversion in strict QDQ mode, for as long as the block runs: a torchao int8 weight
    becomes an int8 constant behind a DEQUANTIZE (without it, StableHLO custom calls are left in the model).
    `ConvertToTFLConfig.strict_qdq_mode` is a flag that litert-torch 0.10's V1 converter does not set itself;
    the config it builds is given it here."""
    from litert_torch._convert import litert_converter

    api = litert_converter.converter_api_ext
    original = api.ConvertToTFLConfig
    if not hasattr(original(), "strict_qdq_mode"):
        raise RgexportError("This litert-converter has no strict_qdq_mode; the streamed int8 recipe needs "
                            "litert-converter 0.5 (litert-torch 0.10)")

    def strict() -> Any:
        config = original()
        config.strict_qdq_mode = True
        return config

    api.ConvertToTFLConfig = strict
    try:
        yield
    finally:
        api.ConvertToTFLConfig = original


# litert-torch's converter (litert-converter 0.5.0) writes a file of 4 GiB or more wrong, and says nothing: at
# RecurrentGemma-9B int4 (4.53 GB of weights) it wrote 231,876,576 bytes, the true size less 2**32, whose root
# table holds no model. A file from 2 to 4 GiB is written with its weights past the flatbuffer (the converter
# retries by itself: int8 at 2B, 2.78 GB).
CONVERTER_FILE_LIMIT = 1 << 32


def converted_bytes_at_least(config: Any, bits: int) -> int:
    """A lower bound of the converter's file for `config`: every nn.Linear weight and the tied table (stored
    once) at `bits` with a float32 scale per row, every other parameter float32 (a model on the meta device:
    nothing is allocated). RecurrentGemma-2B int4: 1,431,578,624 against the converted 1,447,977,040."""
    from rgexport.model.griffin import Embedder

    with torch.device("meta"):
        model = Griffin(config)
    total = 0
    for module in model.modules():
        for name, p in module.named_parameters(recurse=False):
            quantised = (isinstance(module, nn.Linear) and name == "weight") or (
                isinstance(module, Embedder) and name == "input_embedding")
            total += p.numel() * bits // 8 + 4 * p.shape[0] if quantised else 4 * p.numel()
    return total


def check_converted(path: Path, at_least: int) -> None:
    """Raises where the converter's file at `path` is not a model (no subgraphs) or is smaller than the weights
    it must hold (`converted_bytes_at_least`): what the converter writes past `CONVERTER_FILE_LIMIT`."""
    from ai_edge_litert import schema_py_generated as schema

    size = path.stat().st_size
    try:
        with _buffer(path) as buf:
            subgraphs = schema.Model.GetRootAs(buf, 0).SubgraphsLength()
    except (ValueError, IndexError, struct.error):  # offsets that point outside the file
        subgraphs = 0
    if subgraphs == 0 or size < at_least:
        raise RgexportError(
            f"the LiteRT converter wrote a broken file: {size:,} bytes with {subgraphs} subgraphs, where the weights "
            f"alone are at least {at_least:,} bytes (it writes files of 4 GiB or more wrong). Build a smaller "
            "model or recipe, or another backend (--target onnx, --target executorch --recipe int4)"
        )


@contextlib.contextmanager
def _buffer(model: Flatbuffer) -> Iterator[Any]:
    """The model's bytes: as given, or its file memory-mapped (read lazily, never whole in memory)."""
    if isinstance(model, (bytes, bytearray)):
        yield model
        return
    with open(model, "rb") as f, mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ) as buf:
        yield buf


def interpreter(model: Flatbuffer) -> Any:
    from ai_edge_litert.interpreter import Interpreter

    if isinstance(model, (bytes, bytearray)):
        return Interpreter(model_content=model)
    return Interpreter(model_path=str(model))


# Checks on the flatbuffer --------------------------------------------------------------------------
def _signature_io(flatbuffer: Flatbuffer) -> dict[str, dict[str, dict[str, tuple]]]:
    """{signature: {"inputs"|"outputs": {name: (shape, dtype)}}} as the interpreter reports them."""
    loaded = interpreter(flatbuffer)
    out = {}
    for sig in loaded.get_signature_list():
        runner = loaded.get_signature_runner(sig)
        out[sig] = {
            kind: {n: (tuple(int(d) for d in det["shape"]), np.dtype(det["dtype"]).name)
                   for n, det in details.items()}
            for kind, details in (("inputs", runner.get_input_details()),
                                  ("outputs", runner.get_output_details()))
        }
    return out

def op_histogram(flatbuffer: Flatbuffer) -> dict[str, dict[str, int]]:
    """{signature subgraph: {builtin op name: count}}, read from the flatbuffer (before delegation)."""
    with _buffer(flatbuffer) as buf:
        return _op_histogram(buf)


def _op_histogram(flatbuffer: Any) -> dict[str, dict[str, int]]:
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

def file_metadata(flatbuffer: Flatbuffer) -> dict[str, str]:
    """The model's small text metadata entries (the converter writes `min_runtime_version`)."""
    with _buffer(flatbuffer) as buf:
        return _file_metadata(buf)


def _file_metadata(flatbuffer: Any) -> dict[str, str]:
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

@dataclasses.dataclass
class Probe:
    """Inputs for each signature (a random state past the window, so the ring buffer has wrapped and position
    0's shortcuts are off) and the eager model's outputs for them, by LiteRT name."""

    window: int
    inputs: dict[str, dict[str, np.ndarray]]
    expected: dict[str, dict[str, np.ndarray]]
    names: dict[str, tuple[list[str], list[str]]]  # signature -> (input names, output names)


def eager_probe(signatures: dict[str, _NamedSignature], ctx: BuildContext) -> Probe:
    """Runs each signature once in torch on a random state at position window + 3."""
    g = torch.Generator().manual_seed(0)
    window = ctx.config.attention_window_size
    inputs, expected, names = {}, {}, {}
    for sig_name, module in signatures.items():
        probe = {}
        for name, example in module.example_inputs().items():
            if name in ("token", "tokens"):
                probe[name] = torch.randint(0, ctx.config.vocab_size, example.shape, generator=g,
                                            dtype=torch.int32)
            elif name == "position":
                probe[name] = torch.full(example.shape, window + 3, dtype=torch.int32)
            else:
                probe[name] = torch.randn(example.shape, generator=g)
        with torch.no_grad():
            expected[sig_name] = {k: v.numpy() for k, v in module(**probe).items()}
        inputs[sig_name] = {k: v.numpy() for k, v in probe.items()}
        names[sig_name] = (list(module.input_names), list(module.output_names))
    return Probe(window, inputs, expected, names)


def _check_against_eager(flatbuffer: Flatbuffer, signatures: dict[str, _NamedSignature], ctx: BuildContext) -> None:
    """Runs each signature once on a random state past the window and compares every output by name.

    Fails when a signature lacks a name we expect, holds one we do not, or computes something else
    under a name (a mapping that trusted positional order, or a miscompilation).
    """
    check_probe(flatbuffer, eager_probe(signatures, ctx), ctx, CHECK_TOLERANCE)


def check_probe(flatbuffer: Flatbuffer, probe: Probe, ctx: BuildContext, tolerance: float) -> None:
    """The converted model on `probe`'s inputs, every output by name against the eager one (relative to the
    output's scale, within `tolerance`)."""
    loaded = interpreter(flatbuffer)
    found = set(loaded.get_signature_list())
    if found != set(SIGNATURES):
        raise RgexportError(f"The converted model has signatures {sorted(found)}, expected {list(SIGNATURES)}")
    worst = {}
    for sig_name, (input_names, output_names) in probe.names.items():
        runner = loaded.get_signature_runner(sig_name)
        inputs_seen = set(runner.get_input_details())
        outputs_seen = set(runner.get_output_details())
        if inputs_seen != set(input_names) or outputs_seen != set(output_names):
            raise RgexportError(
                f"Signature {sig_name} has inputs {sorted(inputs_seen)} and outputs {sorted(outputs_seen)}, "
                f"expected {sorted(input_names)} and {sorted(output_names)}"
            )
        got = runner(**probe.inputs[sig_name])
        for name, want in probe.expected[sig_name].items():
            err = float(np.abs(got[name] - want).max()) / max(1.0, float(np.abs(want).max()))
            worst[f"{sig_name}.{name}"] = err
            if not err <= tolerance:
                raise RgexportError(
                    f"LiteRT signature {sig_name} output {name} differs from eager torch by {err:.3g} "
                    f"(relative; allowed {tolerance}) at position {probe.window + 3}: the conversion "
                    "miscompiled the graph or the output name does not hold the tensor it names"
                )
    ctx.facts["conversion_check"] = {
        "position": probe.window + 3,
        "max_relative_error": max(worst.values()),
        "tolerance": tolerance,
        "outputs_checked": len(worst),
    }
