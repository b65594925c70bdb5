"""ExecuTorch: one `.pte` program with decode, prefill, reset and read_state over shared state buffers.

Stages (each a method below, called in this order by the build pipeline):
1. quantize: wrap the model in a `StatefulModel` and apply the recipe in place (torchao `quantize_` for 8da4w;
   the XNNPACK PT2E quantizer for int8 and a8w8, which works on captured graphs, one per method). The
   calibrated recipe a8w8 first captures real (tokens, position, state) samples along the fp32 model's
   trajectory over `ctx.calibration_tokens`, one set per method (`executorch_calibration`).
2. export: `torch.export(strict=False)` of decode (tokens [1, 1]) and prefill (tokens [1, chunk]), plus
   two small state methods, `reset` (zeroes the state) and `read_state` (returns it).
3. lower: `to_edge_transform_and_lower` with the XNNPACK partitioner for decode and prefill, after the
   edge rewrites of `executorch_rewrites` (option `xnnpack_rewrites`, default all) that let XNNPACK take
   the ops it would refuse (RMSNorm's mean, the RG-LRU's selections, weight-only arithmetic), then
   `to_executorch` with `share_mutable_buffers=True`, which places every state buffer once, in its own
   memory arena (mem_id 2) that all four methods address at the same offsets.
4. write: `model.pte`.

ExecuTorch facts this relies on (measured with executorch 1.5.1, see notes/executorch.md):
- Without `share_mutable_buffers`, each method plans its own copy of the state among its activations:
  decode after a prefill then ignores the chunk (logits off by 4 on the test model).
- Buffers marked by `InitializedMutableBufferPass` are (re)initialised from the program *when their
  method is loaded*, shared or not. The runner therefore loads every method before the first call; a
  method loaded later would silently zero the state of a sequence in progress.
- `Program.load_method` caches methods, so loading again does not reset: `reset` does that explicitly.
"""

from __future__ import annotations

import collections
import contextlib
import dataclasses
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from rgexport.backends.base import Backend, BuildContext, Recipe, Runner, standard_io_contract, tensor_io
from rgexport.errors import RgexportError
from rgexport.graphs import StatefulModel, buffer_name
from rgexport.model import Griffin, TensorSpec

ARTIFACT_FILE = "model.pte"
GROUP_SIZE = 32  # 8da4w weight group: must divide the in-features of every quantised linear
STATE_METHODS = ("reset", "read_state")

# Initial state data is stored per method that carries it, and copied in when that method loads. The
# compute methods carry it, so whichever of them a runtime loads first starts from zeros.
_INITIALISED_METHODS = ("decode", "prefill")


class _StateMethods(nn.Module):
    """Only the state buffers, under the same names as in `StatefulModel`, for `reset` and `read_state`.

    Exported from a weightless module so that these methods carry no copy of the weights; ExecuTorch
    matches shared buffers across methods by their fully qualified names.
    """

    def __init__(self, specs: list[TensorSpec]):
        super().__init__()
        self.specs = specs
        for s in specs:
            self.register_buffer(buffer_name(s), torch.zeros(s.shape, dtype=s.dtype))

    def reset(self) -> None:
        for s in self.specs:
            getattr(self, buffer_name(s)).zero_()

    def read_state(self) -> tuple[torch.Tensor, ...]:
        return tuple(getattr(self, buffer_name(s)).clone() for s in self.specs)


def _tie_head_as_linear_(model: Griffin) -> nn.Linear:
    """Routes the tied output projection through an nn.Linear sharing the embedding table.

    Griffin computes logits with F.linear on the embedding parameter, which torchao's `quantize_` cannot
    see. Here (in place, like all quantisation) `embedder.decode` becomes a call of a real nn.Linear over
    the same tensor; quantising it then replaces the head's weight only, and the gather keeps the table.
    """
    embedder = model.embedder
    head = nn.Linear(model.config.width, model.config.vocab_size, bias=False)
    head.weight = embedder.input_embedding
    embedder.head = head
    embedder.decode = lambda x: embedder.head(x)  # an instance attribute shadows Embedder.decode
    return head


@contextlib.contextmanager
def _forward_as(module: nn.Module, method: Any) -> Iterator[nn.Module]:
    """Temporarily makes `method` the module's forward, so torch.export captures it."""
    module.forward = method  # type: ignore[method-assign]
    try:
        yield module
    finally:
        del module.forward


@dataclasses.dataclass
class _Prepared:
    """What `quantize` hands to `export`: one module per compute method, and the state spec."""

    modules: dict[str, nn.Module]  # decode, prefill (the same StatefulModel unless PT2E split them)
    inputs: dict[str, tuple[torch.Tensor, ...]]
    specs: list[TensorSpec]


def _example_inputs(chunk: int) -> dict[str, tuple[torch.Tensor, ...]]:
    position = torch.zeros(1, dtype=torch.int32)
    return {
        "decode": (torch.zeros(1, 1, dtype=torch.int32), position),
        "prefill": (torch.zeros(1, chunk, dtype=torch.int32), position),
    }


def _zero_buffers_(module: nn.Module, specs: list[TensorSpec]) -> None:
    """Zeroes the state buffers: their values at export become the program's initial state."""
    names = {buffer_name(s) for s in specs}
    with torch.no_grad():
        for name, buf in module.named_buffers():
            if name in names:
                buf.zero_()


def _op_name(node: torch.fx.Node) -> str:
    target = node.target
    name = getattr(target, "__name__", str(target))
    return name.removesuffix(".default")


def _delegation(edge: Any, method: str) -> dict[str, Any]:
    """Counts the XNNPACK delegates (one call each per step), the operators inside them and those left to
    ExecuTorch's portable kernels."""
    import operator

    gm = edge.exported_program(method).graph_module
    delegated = partitions = 0
    outside: collections.Counter[str] = collections.Counter()
    for node in gm.graph.nodes:
        if node.op != "call_function" or node.target is operator.getitem:
            continue
        if _op_name(node) == "executorch_call_delegate":
            partitions += 1
            lowered = getattr(gm, node.args[0].target)
            delegated += sum(1 for n in lowered.original_module.graph.nodes
                             if n.op == "call_function" and n.target is not operator.getitem)
        else:
            outside[_op_name(node)] += 1
    return {"partitions": partitions, "delegated_ops": delegated, "non_delegated_ops": sum(outside.values()),
            "non_delegated": dict(sorted(outside.items()))}


A8W8_NOTE = (
    "a8w8: static int8 activations and int8 per-channel weights on the MLP, recurrent-block and attention "
    "projection linears, calibrated ({observer} observer) on {decode} decode and {prefill} prefill inputs "
    "captured along the fp32 model's trajectory over the calibration text (positions 0 to {last}, past the "
    "attention window); the tied head has int8 weights and dynamic int8 activations (static int8 logits "
    "doubled the mean KL). Kept float32 after a per-group sensitivity study on the shipped model "
    "(notes/executorch.md): the RG-LRU recurrence and its state, Conv1D, attention scores/mask/softmax (the "
    "-30000 mask add wipes out int8 scores: top-1 87%), norms, residuals and gating products."
)
CALIBRATION_SAMPLES = 256  # per method, spread evenly over positions (decode has 4x3 windows of steps)


def calibration_samples(model: Griffin, sequences: list[list[int]], chunk: int,
                        max_samples: int = CALIBRATION_SAMPLES) -> dict[str, list[Any]]:
    """Real (tokens, position, state) inputs for decode and for prefill, from the fp32 model's own
    trajectory over `sequences` (`rgexport.calibrate.capture_samples`)."""
    from rgexport.calibrate import capture_samples

    if max(len(s) for s in sequences) < chunk:
        raise RgexportError(f"calibration sequences are shorter than one prefill chunk ({chunk} tokens)")
    return {"decode": capture_samples(model, sequences, chunk=1, max_samples=max_samples),
            "prefill": capture_samples(model, sequences, chunk=chunk, max_samples=max_samples)}


class ExecuTorchBackend(Backend):
    """ExecuTorch with the XNNPACK delegate; state lives in the program as shared mutable buffers."""

    name = "executorch"
    extra = "executorch"
    artifact_suffix = ".pte"
    packages = ("executorch", "torch", "torchao")
    options = {
        "delegate": '"xnnpack" (the only one supported)',
        "quantized_gather": "8da4w: the embedding gather reads the head's int8 rows (embedding_byte) instead of "
        "a float32 table (default false)",
        "activation_observer": 'a8w8: "histogram" (default) or "minmax"',
        "xnnpack_rewrites": "edge rewrites that let XNNPACK take more of the graph (default: all of "
        "executorch_rewrites.REWRITES)",
    }
    default_recipe = "fp32"
    recipes = {
        "fp32": Recipe("fp32", "float32 weights and activations, XNNPACK delegate"),
        "8da4w": Recipe(
            "8da4w", f"int8 dynamic activations, int4 weights in groups of {GROUP_SIZE} (torchao) on every "
            "linear layer, int8 per-channel on the tied output head; embedding gather and RG-LRU stay float32",
            quantized=True,
        ),
        "int8": Recipe(
            "int8", "int8 dynamic activations, int8 per-channel weights (XNNPACK PT2E quantizer) on every "
            "linear op, the tied output head included; RG-LRU and state stay float32", quantized=True,
        ),
        "a8w8": Recipe(
            "a8w8", "int8 static activations calibrated on real decode/prefill inputs and int8 per-channel "
            "weights (XNNPACK PT2E quantizer) on the MLP, recurrent-block and attention projection linears; "
            "the tied head int8 weights with dynamic int8 activations; float32: the RG-LRU recurrence and "
            "gates, Conv1D, attention scores/mask/softmax, norms, residuals, gating products and the state",
            quantized=True, calibrated=True,
        ),
    }

    # 1. Quantise -----------------------------------------------------------------------------------
    def quantize(self, model: Griffin, ctx: BuildContext) -> _Prepared:
        """A StatefulModel over `model`, quantised in place (the pipeline passes a copy where it must)."""
        self.check_recipe(ctx.recipe)
        if self.recipes[ctx.recipe].calibrated:
            ctx.calibration_sequences()  # before any work: a calibrated recipe without text cannot be built
        delegate = ctx.options.get("delegate", "xnnpack")
        if delegate != "xnnpack":
            raise RgexportError(f"ExecuTorch delegate {delegate!r} is not supported; expected one of ['xnnpack']")
        self.require("executorch")
        stateful = StatefulModel(model).eval()
        stateful.requires_grad_(False)
        inputs = _example_inputs(ctx.prefill_chunk)
        modules: dict[str, nn.Module] = {"decode": stateful, "prefill": stateful}
        if ctx.recipe == "8da4w":
            self._quantize_8da4w(stateful, ctx)
        elif ctx.recipe == "int8":
            modules = {m: self._quantize_int8_pt2e(stateful, inputs[m]) for m in inputs}
        elif ctx.recipe == "a8w8":
            modules = self._quantize_a8w8_pt2e(stateful, inputs, ctx)
        return _Prepared(modules, inputs, stateful.specs)

    def _quantize_8da4w(self, stateful: StatefulModel, ctx: BuildContext) -> None:
        self.require("torchao")
        from torchao.quantization import Int8DynamicActivationIntxWeightConfig, quantize_
        from torchao.quantization.granularity import PerAxis, PerGroup

        model = stateful.model
        head = _tie_head_as_linear_(model)
        linears = {n: m for n, m in model.named_modules() if isinstance(m, nn.Linear) and m is not head}
        skipped = sorted(n for n, m in linears.items() if m.in_features % GROUP_SIZE)
        # Only the nn.Linear layers: the RG-LRU's block-diagonal gates (bmm), the recurrence and the
        # embedding gather stay float32.
        quantize_(
            model,
            Int8DynamicActivationIntxWeightConfig(weight_dtype=torch.int4, weight_granularity=PerGroup(GROUP_SIZE)),
            filter_fn=lambda m, fqn: m is not head and isinstance(m, nn.Linear) and m.in_features % GROUP_SIZE == 0,
        )
        # The tied output head in int8 per channel: as large as all other linears together in small
        # models; int8 costs no top-1 agreement where int4 does (notes/executorch.md).
        quantize_(
            model,
            Int8DynamicActivationIntxWeightConfig(weight_dtype=torch.int8, weight_granularity=PerAxis(0)),
            filter_fn=lambda m, fqn: m is head,
        )
        if ctx.options.get("quantized_gather", False):
            # Opt-in (option quantized_gather): the embedding gather reads the head's int8 rows through
            # ExecuTorch's quantized `embedding_byte` (as its llama export does) instead of keeping the float32
            # table, the largest tensor in the program (2.6 GB of about 4.3 GB at RecurrentGemma-2B,
            # notes/perf.md). Same int8 values and per-row scales as the head, so the gather adds no error the
            # head does not have. The op's kernels live in executorch.kernels.quantized: the manifest lists the
            # op under backend_facts.quantized_ops and `load` imports them. Opt-in until measured at 2B.
            import executorch.exir.passes._quant_patterns_and_replacements  # registers the op
            import executorch.kernels.quantized  # noqa: F401 - its kernels, for validation in this process

            weight = head.weight
            if bool((weight.zero_point != 0).any()):
                raise RgexportError("8da4w: the int8 head has non-zero zero points; the quantized gather expects "
                                    "symmetric rows")
            embedder = model.embedder
            # Own copies: a buffer aliasing the head parameter's inner tensor is not something torch.export keeps.
            embedder.register_buffer("embedding_int8", weight.qdata.detach().clone())
            embedder.register_buffer("embedding_scales", weight.scale.detach().reshape(-1).clone())
            del embedder.input_embedding  # the float32 table: the head holds its own int8 weight now

            def encode(tokens: torch.Tensor) -> torch.Tensor:
                rows = torch.ops.quantized_decomposed.embedding_byte.dtype(
                    embedder.embedding_int8, embedder.embedding_scales, None, -128, 127, tokens, dtype=torch.float32)
                return rows * embedder.scale

            embedder.encode = encode  # an instance attribute shadows Embedder.encode
            ctx.facts["quantized_ops"] = ["quantized_decomposed::embedding_byte.dtype"]
            ctx.notes.append("8da4w: the embedding gather reads the head's int8 table (embedding_byte); a runtime "
                             "must link ExecuTorch's quantized kernels (Python: import executorch.kernels.quantized).")
        if skipped:
            ctx.notes.append(
                f"8da4w left {len(skipped)} linear layers in float32 because their in-features are not a "
                f"multiple of the group size {GROUP_SIZE}: {skipped}."
            )

    def _quantize_int8_pt2e(self, stateful: StatefulModel, inputs: tuple[torch.Tensor, ...]) -> nn.Module:
        """PT2E works on a captured graph, so each method gets its own quantised copy."""
        self.require("torchao")
        from executorch.backends.xnnpack.quantizer.xnnpack_quantizer import (
            XNNPACKQuantizer,
            get_symmetric_quantization_config,
        )
        from torchao.quantization.pt2e.quantize_pt2e import convert_pt2e, prepare_pt2e

        quantizer = XNNPACKQuantizer()
        quantizer.set_global(get_symmetric_quantization_config(is_per_channel=True, is_dynamic=True))
        graph = torch.export.export(stateful, inputs, strict=False).module()
        prepared = prepare_pt2e(graph, quantizer)
        with torch.no_grad():
            prepared(*inputs)  # dynamic activations: one pass sets the weight observers
        converted = convert_pt2e(prepared)
        _zero_buffers_(converted, stateful.specs)  # the calibration pass wrote to the state
        return converted

    def _quantize_a8w8_pt2e(self, stateful: StatefulModel, inputs: dict[str, tuple[torch.Tensor, ...]],
                            ctx: BuildContext) -> dict[str, nn.Module]:
        """Static int8 on the linear ops of each method's graph, calibrated on that method's own samples
        (decode: one token; prefill: one chunk) captured from the fp32 model before anything is quantised."""
        self.require("torchao")
        from rgexport.backends.executorch import calibration as ec

        samples = calibration_samples(stateful.model, ctx.calibration_sequences(), ctx.prefill_chunk)
        observer = ctx.options.get("activation_observer", ec.A8W8_OBSERVER)
        modules, facts = {}, {}
        for method in ("decode", "prefill"):
            modules[method], facts[method] = ec.quantize_static_pt2e(
                stateful, inputs[method], stateful.specs, samples[method], ec.A8W8_KINDS, observer=observer,
                dynamic_kinds=ec.A8W8_DYNAMIC_KINDS)
            facts[method]["positions_past_window"] = sum(
                int(s.position.reshape(-1)[0]) >= ctx.config.attention_window_size for s in samples[method])
        _zero_buffers_(stateful, stateful.specs)
        ctx.facts["a8w8"] = {
            "calibration_tokens": sum(len(t) for t in ctx.calibration_sequences()),
            "static_kinds": list(ec.A8W8_KINDS),
            "dynamic_kinds": list(ec.A8W8_DYNAMIC_KINDS),
            "float_kinds": dict(ec.A8W8_FLOAT_KINDS),
            "sensitivity": {k: list(v) for k, v in ec.SENSITIVITY.items()},
            **facts,
        }
        ctx.notes.append(A8W8_NOTE.format(
            decode=facts["decode"]["calibration_samples"], prefill=facts["prefill"]["calibration_samples"],
            last=max(f["positions"][1] for f in facts.values()), observer=observer))
        return modules

    # 2. Export -------------------------------------------------------------------------------------
    def export(self, prepared: _Prepared, ctx: BuildContext) -> dict[str, Any]:
        """ExportedPrograms by method name: decode, prefill, reset, read_state."""
        programs = {}
        with torch.no_grad():
            for method, module in prepared.modules.items():
                programs[method] = torch.export.export(module, prepared.inputs[method], strict=False)
            state = _StateMethods(prepared.specs)
            for method in STATE_METHODS:
                with _forward_as(state, getattr(state, method)) as m:
                    programs[method] = torch.export.export(m, (), strict=False)
        return programs

    # 3. Lower --------------------------------------------------------------------------------------
    def lower(self, exported: dict[str, Any], ctx: BuildContext) -> Any:
        """XNNPACK-lowers decode and prefill; plans the state once for all methods."""
        self.require("executorch")
        from executorch.backends.xnnpack.partition.xnnpack_partitioner import XnnpackPartitioner
        from executorch.exir import ExecutorchBackendConfig, to_edge_transform_and_lower
        from executorch.exir.passes import MemoryPlanningPass
        from executorch.exir.passes.init_mutable_pass import InitializedMutableBufferPass

        from rgexport.backends.executorch import rewrites as executorch_rewrites

        names = [buffer_name(s) for s in self.state_specs(ctx)]
        rewrites = list(ctx.options.get("xnnpack_rewrites", executorch_rewrites.REWRITES))
        executorch_rewrites.edge_passes(rewrites)  # refuses an unknown name before the slow work
        # One set of pass objects per compute method, as for InitializedMutableBufferPass.
        edge = to_edge_transform_and_lower(
            exported,
            partitioner={m: [XnnpackPartitioner()] for m in ("decode", "prefill")},
            transform_passes={m: [*executorch_rewrites.edge_passes(rewrites), InitializedMutableBufferPass(names)]
                              for m in _INITIALISED_METHODS},
        )
        delegation = {m: _delegation(edge, m) for m in ("decode", "prefill")}
        ctx.facts["xnnpack_rewrites"] = rewrites
        program = edge.to_executorch(ExecutorchBackendConfig(
            memory_planning_pass=MemoryPlanningPass(share_mutable_buffers=True),
            emit_mutable_buffer_names=True,
        ))
        self._record_facts(program, delegation, ctx)
        return program

    def _record_facts(self, program: Any, delegation: dict[str, Any], ctx: BuildContext) -> None:
        planned = planned_memory(program.executorch_program)
        ctx.facts["planned_memory_bytes"] = planned
        ctx.facts["delegation"] = delegation
        outside = collections.Counter()
        for d in delegation.values():
            outside.update(d["non_delegated"])
        ctx.notes.append(
            "XNNPACK runs {} of {} decode ops in {} delegate calls and {} of {} prefill ops in {}; left to "
            "portable kernels (both methods): {}.".format(
                delegation["decode"]["delegated_ops"],
                delegation["decode"]["delegated_ops"] + delegation["decode"]["non_delegated_ops"],
                delegation["decode"]["partitions"],
                delegation["prefill"]["delegated_ops"],
                delegation["prefill"]["delegated_ops"] + delegation["prefill"]["non_delegated_ops"],
                delegation["prefill"]["partitions"],
                ", ".join(f"{op} x{n}" for op, n in sorted(outside.items())),
            )
        )
        ctx.notes.append(
            f"State ({planned['decode']['state']} bytes) is planned once and shared by all methods; "
            "the runtime loads every method up front because loading a method re-initialises the state."
        )

    # 4. Write --------------------------------------------------------------------------------------
    def write(self, lowered: Any, ctx: BuildContext) -> list[Path]:
        path = Path(ctx.work_dir) / ARTIFACT_FILE
        path.parent.mkdir(parents=True, exist_ok=True)
        with open(path, "wb") as f:
            lowered.write_to_file(f)
        return [path]

    # Contract and runtime ----------------------------------------------------------------------------
    @staticmethod
    def state_specs(ctx: BuildContext) -> list[TensorSpec]:
        from rgexport.model import state_spec

        return state_spec(ctx.config, 1)

    def io_contract(self, ctx: BuildContext) -> dict[str, Any]:
        specs = self.state_specs(ctx)
        contract = standard_io_contract(ctx.config, ctx.prefill_chunk, specs, placement="internal")
        methods = contract["methods"]
        # decode is the prefill graph with a chunk of one: tokens [1, 1] in, logits [1, 1, v] out.
        methods["decode"]["inputs"][0] = tensor_io("tokens", [1, 1], "int32")
        methods["decode"]["outputs"][0] = tensor_io("logits", [1, 1, ctx.config.vocab_size], "float32")
        methods["reset"] = {"inputs": [], "outputs": []}
        methods["read_state"] = {"inputs": [], "outputs": [tensor_io(s.name, s.shape, "float32") for s in specs]}
        contract["new_sequence"] += (
            " `reset` zeroes the state; `read_state` returns it in `state.tensors` order. Load every method "
            "before running any: loading a method re-initialises the shared state."
        )
        return contract

    def check_artifact(self, artifact_dir: Path, manifest: dict[str, Any]) -> Path:
        """The flatbuffer's file identifier, then a load of the program and its methods in a child process:
        ExecuTorch's Python bindings abort the process on some corrupt files (a log line that is not UTF-8)."""
        from rgexport.safety import check_magic, probe_in_child

        path = super().check_artifact(artifact_dir, manifest)
        check_magic(path, b"ET12", 4, "an ExecuTorch program (.pte)")
        quantized = "1" if manifest.get("backend_facts", {}).get("quantized_ops") else "0"
        probe_in_child(["-c", _PROBE, str(path), quantized], path, "ExecuTorch's runtime")
        return path

    def load(self, artifact_dir: Path, manifest: dict[str, Any], *, threads: int | None = None) -> Runner:
        """A runner on ExecuTorch's Python runtime.

        `threads` resizes XNNPACK's thread pool, which belongs to the process (all loaded programs) and
        defaults to the number of cores; `torch.set_num_threads` does not reach it.
        """
        self.require("executorch")
        if threads is not None:
            from executorch.extension.pybindings import portable_lib

            portable_lib._unsafe_reset_threadpool(int(threads))  # experimental API in 1.5.1
        if manifest.get("backend_facts", {}).get("quantized_ops"):
            # Registers quantized_decomposed kernels (8da4w's quantized gather) with the Python runtime.
            self.require("executorch.kernels.quantized")
        path = Path(artifact_dir) / manifest["artifact"]["file"]
        names = [t["name"] for t in manifest["io"]["state"]["tensors"]]
        return ExecuTorchRunner(path, int(manifest["io"]["prefill_chunk"]), names)


# Loads a .pte and every method (what ExecuTorchRunner does) in a child process: python -c _PROBE PATH Q.
_PROBE = """import sys
if sys.argv[2] == "1":
    import executorch.kernels.quantized
from executorch.runtime import Runtime
program = Runtime.get().load_program(sys.argv[1])
for name in sorted(program.method_names):
    program.load_method(name)
"""


def planned_memory(program: Any) -> dict[str, dict[str, int]]:
    """Non-constant (memory-planned) bytes per method of a serialised-schema Program.

    mem_id 1 holds activations and I/O; with shared mutable buffers, mem_id 2 holds the state (the same
    arena for every method). mem_id 0 is reserved and always 0.
    """
    out = {}
    for plan in program.execution_plan:
        sizes = list(plan.non_const_buffer_sizes)
        out[plan.name] = {
            "activations": int(sizes[1]) if len(sizes) > 1 else 0,
            "state": int(sizes[2]) if len(sizes) > 2 else 0,
        }
    return out


class ExecuTorchRunner(Runner):
    """Runs a `.pte` from this backend in ExecuTorch's Python runtime (`executorch.runtime`)."""

    def __init__(self, path: Path, prefill_chunk: int, state_names: Sequence[str]):
        from executorch.runtime import Runtime

        self.path = Path(path)
        self.prefill_chunk = prefill_chunk
        self.state_names = list(state_names)
        self._program = Runtime.get().load_program(self.path)
        missing = sorted({"decode", "prefill", *STATE_METHODS} - self._program.method_names)
        if missing:
            raise RgexportError(f"{self.path} lacks methods {missing}; rebuild it with this version of rgexport")
        # Load everything now: loading a method later would re-initialise the shared state mid-sequence.
        self._methods = {m: self._program.load_method(m) for m in ("decode", "prefill", *STATE_METHODS)}
        self._memory: dict[str, int] | None = None

    def reset(self) -> None:
        self._methods["reset"].execute([])

    def decode(self, token: int, position: int) -> np.ndarray:
        tokens = torch.tensor([[token]], dtype=torch.int32)
        out = self._methods["decode"].execute([tokens, torch.tensor([position], dtype=torch.int32)])
        return out[0][0, 0].numpy()

    def prefill(self, tokens: Sequence[int], position: int) -> np.ndarray:
        if len(tokens) != self.prefill_chunk:
            raise RgexportError(f"prefill takes exactly {self.prefill_chunk} tokens, got {len(tokens)}")
        chunk = torch.tensor([list(tokens)], dtype=torch.int32)
        out = self._methods["prefill"].execute([chunk, torch.tensor([position], dtype=torch.int32)])
        return out[0][0].numpy()

    def state(self) -> dict[str, np.ndarray]:
        values = self._methods["read_state"].execute([])
        return {n: v.numpy().astype(np.float32) for n, v in zip(self.state_names, values, strict=True)}

    def memory(self) -> dict[str, int]:
        """Planned bytes read from the program (the Python runtime reports no allocation figures).

        `activations` is the largest method's arena (host methods share one in the Python runtime);
        `state` is the shared state arena.
        """
        if self._memory is None:
            from executorch.exir._serialize._program import deserialize_pte_binary

            planned = planned_memory(deserialize_pte_binary(self.path.read_bytes()).program)
            self._memory = {
                "activations": max(p["activations"] for p in planned.values()),
                "state": max(p["state"] for p in planned.values()),
            }
        return dict(self._memory)
