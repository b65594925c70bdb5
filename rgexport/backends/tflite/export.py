"""Conversion with litert-torch: named signatures over the step model, and checks of the converted flatbuffer."""

from __future__ import annotations

import collections
import dataclasses

import numpy as np
import torch
from torch import nn

from rgexport.backends.base import BuildContext
from rgexport.errors import RgexportError
from rgexport.graphs import DecodeIO, PrefillIO, input_name, output_name
from rgexport.model import Griffin, identifier

Dataset = dict[str, list[dict[str, np.ndarray]]]  # signature -> samples, each {LiteRT input name: array}

SIGNATURES = ("decode", "prefill")

ARTIFACT_FILE = "model.tflite"

# The build-time check compares the float flatbuffer with eager torch, relative to the output's scale.
# fp32 conversion measured 3e-6..8e-6 on logits; a swapped name or a miscompiled mask is off by ~1.
CHECK_TOLERANCE = 1e-4

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

def _signatures(model: Griffin, chunk: int) -> dict[str, _NamedSignature]:
    return {"decode": _NamedSignature(DecodeIO(model)).eval(),
            "prefill": _NamedSignature(PrefillIO(model, chunk)).eval()}

@dataclasses.dataclass
class TFLiteExport:
    """What `export` returns for a calibrated recipe: the float flatbuffer and the representative
    dataset `lower` calibrates with (other recipes get the flatbuffer bytes alone)."""

    flatbuffer: bytes
    calibration: Dataset

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
