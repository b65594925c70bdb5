"""Core ML backend: a multifunction ML program (.mlpackage, iOS 18) with `decode` and `prefill` functions.

Stages: export traces the step model twice with TorchScript (one token; one prefill chunk) -> lower
converts each with coremltools (fp16 compute with float32 islands, see below) and compresses its weights
per recipe -> write merges the two programs into one multifunction package whose functions share their
weights and their state.

State, two ways (option `state_dtype`):
- "float16": Core ML states (`ct.StateType`), kept inside the program; Core ML only stores states in
  fp16, so the RG-LRU hidden state and the K/V window are held in fp16 between calls.
- "float32": functional state, passed in and out as float32 tensors (`state_*` -> `new_state_*`).
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
The Neural Engine computes in fp16 only, so Core ML runs the islands on CPU or GPU whatever the option
`compute_units` (recorded in the manifest, applied when loading on macOS) asks for.

Weights: fp16 (default), or compressed with coremltools.optimize.coreml (int8 per channel, int4 per block
of 32, 4-bit k-means palettes). An all-zero row (an embedding padding row kept at zero) gets a zero scale
from coremltools' quantiser, which divides 0/0 and casts the NaN to int (a platform-dependent value):
`_zero_scale_to_one` rewrites such blocks as scale 1 over zero data; for palettes,
`_zero_row_in_palette` gives the row an exact 0 entry. Either way the row dequantises to exact zeros.

Recipe `w8a8` (calibrated): int8 weights as recipe int8, then int8 activations around every linear layer,
inserted by coremltools' own activation passes with ranges that rgexport's MIL interpreter measures on real
(tokens, position, state) samples (coremltools' calibration needs `predict`, i.e. macOS, and passes no
state; rgexport/backends/coreml_calibration.py has the details and the per-group decision).

Running on Linux: `predict()` needs macOS, so `load` returns a runner backed by rgexport's MIL
interpreter (`mil_interpreter`); on macOS it uses `MLModel.predict` with `make_state()`.
"""

from __future__ import annotations

import collections
import platform
import shutil
import tempfile
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np

from rgexport.backends.base import Backend, BuildContext, Recipe, Runner, standard_io_contract
from rgexport.calibrate import sample_facts
from rgexport.errors import RgexportError
from rgexport.graphs import StatefulModel, buffer_name
from rgexport.model import Griffin, TensorSpec

STATE_DTYPES = ("float16", "float32")
DEFAULT_STATE_DTYPE = "float16"
COMPUTE_UNITS = ("ALL", "CPU_ONLY", "CPU_AND_GPU", "CPU_AND_NE")  # ct.ComputeUnit, used when loading
ARTIFACT_FILE = "model.mlpackage"
FUNCTIONS = ("decode", "prefill")

# Ops that only move, combine or apply elementwise arithmetic: the RG-LRU island grows through them.
_ELEMENTWISE = frozenset({
    "add", "sub", "mul", "real_div", "exp", "sqrt", "rsqrt", "clip", "abs", "maximum", "minimum",
    "slice_by_index", "slice_update", "expand_dims", "squeeze", "reshape", "concat", "stack", "cast",
})


def state_input_name(spec: TensorSpec) -> str:
    """Core ML feature names cannot hold dots: state.blocks.0.rg_lru -> state_blocks_0_rg_lru."""
    return f"state_{buffer_name(spec)}"


def state_output_name(spec: TensorSpec) -> str:
    return f"new_state_{buffer_name(spec)}"


# Graphs -----------------------------------------------------------------------------------------
def _graphs(model: Griffin, chunk: int, state_dtype: str) -> dict[str, tuple[Any, tuple]]:
    """The torch modules to trace, with example inputs: {function: (module, example inputs)}."""
    import torch
    from torch import nn

    specs = model.state_spec(1)

    class StatefulDecode(StatefulModel):
        """token [1], position [1] -> logits [1, v]; state in fp16 buffers (Core ML states)."""

        def forward(self, token: torch.Tensor, position: torch.Tensor) -> torch.Tensor:
            return super().forward(token[:, None], position)[:, 0]

    class FunctionalStep(nn.Module):
        """tokens [1, t] (or token [1]), position [1], *state -> logits, *new_state (float32 state I/O)."""

        def __init__(self, decode: bool):
            super().__init__()
            self.model, self.decode = model, decode

        def forward(self, tokens: torch.Tensor, position: torch.Tensor, *state: torch.Tensor):
            if self.decode:
                tokens = tokens[:, None]
            named = {s.name: t for s, t in zip(specs, state)}
            logits, new = self.model.forward(tokens.to(torch.long), position, named)
            return (logits[:, 0] if self.decode else logits, *[new[s.name] for s in specs])

    position = torch.zeros(1, dtype=torch.int32)
    token, tokens = torch.zeros(1, dtype=torch.int32), torch.zeros(1, chunk, dtype=torch.int32)
    if state_dtype == "float16":
        return {
            "decode": (StatefulDecode(model, assign_slices=True, state_dtype=torch.float16).eval(),
                       (token, position)),
            "prefill": (StatefulModel(model, assign_slices=True, state_dtype=torch.float16).eval(),
                        (tokens, position)),
        }
    zeros = tuple(torch.zeros(s.shape) for s in specs)
    return {
        "decode": (FunctionalStep(decode=True).eval(), (token, position, *zeros)),
        "prefill": (FunctionalStep(decode=False).eval(), (tokens, position, *zeros)),
    }


# Float32 islands --------------------------------------------------------------------------------
def fp32_islands(block: Any) -> dict[str, set[Any]]:
    """Ops of a MIL function (before fp16 casting) that must compute in float32, by reason.

    "position": ops computing only from the `position` input and constants.
    "rg_lru": elementwise ops on a path into an RG-LRU state write (or `new_state_*rg_lru` output).
    """
    position_var = block.inputs.get("position")
    position: set[Any] = set()
    for op in block.operations:
        if op.op_type == "const":
            continue
        variables = [v for vs in op.inputs.values() for v in (vs if isinstance(vs, (list, tuple)) else [vs])]
        dynamic = [v for v in variables if v.val is None]
        if dynamic and all(v is position_var or (v.op is not None and v.op in position) for v in dynamic):
            position.add(op)

    seeds = []
    for op in block.operations:
        if op.op_type == "coreml_update_state" and "rg_lru" in op.state.name:
            seeds.append(op.value)
    seeds += [v for v in block.outputs if "rg_lru" in v.name]
    rg_lru: set[Any] = set()
    stack = list(seeds)
    while stack:
        var = stack.pop()
        op = var.op
        if op is None or op in rg_lru or op in position or op.op_type not in _ELEMENTWISE:
            continue
        rg_lru.add(op)
        for vs in op.inputs.values():
            for v in vs if isinstance(vs, (list, tuple)) else [vs]:
                if v.val is None:
                    stack.append(v)
    return {"position": position, "rg_lru": rg_lru}


class _IslandSelector:
    """op_selector for `FP16ComputePrecision`: True (cast to fp16) for every op outside the islands."""

    def __init__(self) -> None:
        self._islands: dict[int, set[int]] = {}
        self.counts: dict[str, int] = {}

    def __call__(self, op: Any) -> bool:
        block = op.enclosing_block
        key = id(block)
        if key not in self._islands:
            islands = fp32_islands(block)
            self.counts = {k: len(v) for k, v in islands.items()}
            self._islands[key] = {id(o) for ops in islands.values() for o in ops}
        return id(op) not in self._islands[key]


# Weight compression -----------------------------------------------------------------------------
def _compression_config(recipe: str) -> Any:
    from coremltools.optimize import coreml as cto

    if recipe == "int8":
        op = cto.OpLinearQuantizerConfig(mode="linear_symmetric", dtype="int8", granularity="per_channel")
    elif recipe == "int4":
        op = cto.OpLinearQuantizerConfig(
            mode="linear_symmetric", dtype="int4", granularity="per_block", block_size=32
        )
    elif recipe == "palette4":
        op = cto.OpPalettizerConfig(mode="kmeans", nbits=4, granularity="per_grouped_channel", group_size=16)
    else:
        return None
    return cto.OptimizationConfig(global_config=op)


def _compress(mlmodel: Any, recipe: str) -> Any:
    import warnings

    from coremltools.optimize import coreml as cto

    config = _compression_config(recipe)
    if config is None:
        return mlmodel
    zero_rows = _zero_rows(mlmodel)
    with warnings.catch_warnings():
        # coremltools' quantiser divides an all-zero block by its zero scale (0/0) and casts the NaN to
        # int; `_zero_scale_to_one` makes those blocks exact zeros again.
        warnings.filterwarnings("ignore", message="invalid value encountered in (divide|cast)")
        if recipe == "palette4":
            compressed = cto.palettize_weights(mlmodel, config)
        else:
            compressed = cto.linear_quantize_weights(mlmodel, config)
    if recipe == "palette4":
        return _replace_constexpr_ops(compressed, "constexpr_lut_to_dense",
                                      lambda op: _zero_row_in_palette(op, zero_rows))
    return _replace_constexpr_ops(compressed, "constexpr_blockwise_shift_scale", _zero_scale_to_one)


def _zero_rows(mlmodel: Any) -> dict[str, np.ndarray]:
    """All-zero rows of the 2-D float weights (an embedding's padding row), by const op name."""
    out = {}
    for f in mlmodel._mil_program.functions.values():
        for op in f.operations:
            value = op.outputs[0].val if op.op_type == "const" else None
            if isinstance(value, np.ndarray) and value.ndim == 2 and np.issubdtype(value.dtype, np.floating):
                zero = ~value.any(axis=1)
                if zero.any():
                    out[op.name] = zero
    return out


def _block_mask(block_values: np.ndarray, shape: tuple[int, ...]) -> np.ndarray:
    """Repeats a per-block array over the blocks of a tensor of `shape`."""
    for axis, (d, s) in enumerate(zip(shape, block_values.shape)):
        block_values = np.repeat(block_values, d // s, axis)
    return block_values


def _zero_scale_to_one(op: Any) -> dict[str, Any] | None:
    """Blocks with scale 0 (all-zero weights) -> scale 1 over zero data: still exact zeros, no 0 scale.

    A zero scale dequantises to zeros, but the quantised data under it is whatever NaN cast to int gave,
    and any runtime or tool that divides by the scale gets NaN.
    """
    zero = op.scale.val == 0
    if not zero.any():
        return None
    data = op.data.val.copy()  # a copy keeps coremltools' int4 dtype marker
    data[_block_mask(zero, data.shape)] = 0
    new = {"data": data, "scale": np.where(zero, np.ones_like(op.scale.val), op.scale.val)}
    if op.offset is not None:
        new["offset"] = op.offset.val
    return new


def _zero_row_in_palette(op: Any, zero_rows: dict[str, np.ndarray]) -> dict[str, Any] | None:
    """An all-zero row of a palettised weight -> exact zeros: the entry nearest 0 of each of its tables is
    set to 0 and the row points at it. Other weights on that entry move by less than the entry itself,
    a fraction of their own quantisation error (k-means puts an entry near the row's zeros)."""
    zero = zero_rows.get(op.name.removesuffix("_palettized"))
    lut = np.array(op.lut.val)
    if zero is None or lut.shape[-1] != 1:
        return None
    indices = op.indices.val.copy()  # keeps the uint4 dtype marker
    rows_per_table = indices.shape[0] // lut.shape[0]
    cols_per_table = indices.shape[1] // lut.shape[1]
    for row in np.flatnonzero(zero):
        for t1 in range(lut.shape[1]):
            table = lut[row // rows_per_table, t1, :, 0]
            k = int(np.argmin(np.abs(table)))
            table[k] = 0.0
            indices[row, t1 * cols_per_table:(t1 + 1) * cols_per_table] = k
    return {"indices": indices, "lut": lut.astype(op.lut.val.dtype)}


def _replace_constexpr_ops(mlmodel: Any, op_type: str, rewrite: Any) -> Any:
    """Rebuilds each `op_type` op for which `rewrite(op)` returns new inputs; the model as is if none."""
    from coremltools.converters.mil.mil import Builder as mb
    from coremltools.converters.mil.mil.passes.graph_pass import AbstractGraphPass
    from coremltools.models.utils import _apply_graph_pass

    def targets(prog: Any) -> list[tuple[Any, Any, dict[str, Any]]]:
        found = []
        for f in prog.functions.values():
            for op in list(f.operations):
                new = rewrite(op) if op.op_type == op_type else None
                if new is not None:
                    found.append((f, op, new))
        return found

    if not targets(mlmodel._mil_program):
        return mlmodel  # nothing to rewrite: skip the spec -> program -> spec round trip

    class Rewrite(AbstractGraphPass):
        def apply(self, prog: Any) -> None:
            for f, op, new in targets(prog):
                with f:
                    var = getattr(mb, op_type)(**new, before_op=op, name=op.name + "_exact_zeros")
                f.replace_uses_of_var_after_op(anchor_op=op, old_var=op.outputs[0], new_var=var,
                                               force_replace=True)
                f.remove_ops([op])

    return _apply_graph_pass(mlmodel, Rewrite(), skip_model_load=True)


# w8a8: calibrated int8 activations ----------------------------------------------------------------
def _calibration_feeds(samples: list[Any], fn: str, specs: list[TensorSpec], stateful: bool):
    """(inputs, Core ML states) of `fn` for each captured sample, named as the program names them."""
    for sample in samples:
        tokens = sample.tokens.numpy().astype(np.int32)
        inputs = {"token" if fn == "decode" else "tokens": tokens.reshape(-1) if fn == "decode" else tokens,
                  "position": sample.position.numpy().astype(np.int32).reshape(1)}
        state = {s.name: sample.state[s.name].numpy().astype(np.float32) for s in specs}
        if stateful:
            yield inputs, {buffer_name(s): state[s.name] for s in specs}
        else:
            yield {**inputs, **{state_input_name(s): state[s.name] for s in specs}}, {}


def _w8a8(mlmodel: Any, fn: str, samples: list[Any], specs: list[TensorSpec], stateful: bool,
          ctx: BuildContext) -> Any:
    """int8 weights (as recipe int8), then int8 activations around the ops of W8A8_GROUPS: ranges from the
    interpreter running the weight-quantised program on the samples, pairs inserted by coremltools."""
    from rgexport.backends.coreml import calibration as cal
    from rgexport.backends.coreml.mil_interpreter import Program

    groups = cal.op_groups(mlmodel)  # before any save: the module scopes live on the converted program
    chosen = [name for name, group in groups.items() if group in cal.W8A8_GROUPS]
    mlmodel = _compress(mlmodel, "int8")
    start = time.perf_counter()
    program = Program(mlmodel.get_spec(), mlmodel.weights_dir)
    stats = cal.activation_ranges(program, "main", _calibration_feeds(samples, fn, specs, stateful))
    calibrate_s = time.perf_counter() - start
    names = {o.name for o in program.functions["main"].ops}
    missing = [n for n in chosen if n not in names]
    if missing:
        raise RgexportError(f"Core ML {fn}: ops {missing[:3]} lost their names in weight compression")
    quantized = cal.quantize_activations(mlmodel, chosen, stats)
    counts = cal.quantized_op_counts(Program(quantized.get_spec(), quantized.weights_dir), "main")
    if not counts.get("quantize"):
        raise RgexportError(f"Core ML {fn}: coremltools inserted no quantize op for w8a8")
    facts = ctx.facts.setdefault("coreml_w8a8", {})
    facts.setdefault("groups_int8", list(cal.W8A8_GROUPS))
    facts.setdefault("groups_float", dict(cal.FLOAT_GROUPS))
    facts.setdefault("functions", {})[fn] = {
        "ops_by_group": dict(sorted(collections.Counter(groups.values()).items())),
        "ops_int8": len(chosen),
        "program_ops": counts,
        "calibration_seconds": round(calibrate_s, 2),
    }
    return quantized


# Backend ----------------------------------------------------------------------------------------
class CoreMLBackend(Backend):
    name = "coreml"
    extra = "coreml"
    artifact_suffix = ".mlpackage"
    packages = ("coremltools", "torch")
    options = {
        "state_dtype": '"float16" (default) or "float32": how the state is held (module docstring)',
        "compute_units": '"ALL" (default), "CPU_ONLY", "CPU_AND_GPU" or "CPU_AND_NE", used when loading',
    }
    recipes = {
        "fp16": Recipe("fp16", "fp16 weights and compute; positions and the RG-LRU in float32"),
        "int8": Recipe("int8", "int8 weights per output channel (linear_quantize_weights), fp16 compute",
                       quantized=True),
        "int4": Recipe("int4", "int4 weights in blocks of 32 input channels (iOS 18), fp16 compute",
                       quantized=True),
        "palette4": Recipe("palette4", "4-bit k-means palettised weights, a 16-entry table per 16 output "
                           "channels, fp16 compute", quantized=True),
        "w8a8": Recipe(
            "w8a8",
            "int8 weights per output channel and int8 activations (quantize/dequantize pairs, symmetric, per "
            "tensor) around every linear layer, for the Neural Engine; ranges calibrated by running the "
            "program on (tokens, position, state) samples captured from the fp32 model over calibration "
            "text. Float (fp16, with the float32 islands): the attention scores and mask, the RG-LRU "
            "recurrence, the Conv1D, the state writes, the residual stream and the rest of the "
            "elementwise ops, chosen by a per-group sensitivity study on the shipped model",
            quantized=True, calibrated=True),
    }
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

    def export(self, prepared: Griffin, ctx: BuildContext) -> dict[str, Any]:
        """Traces decode and prefill (TorchScript: the route whose state writes coremltools maps to states)."""
        import torch

        self.require("coremltools")
        model = prepared.eval().requires_grad_(False)
        traced = {}
        with torch.no_grad():
            for fn, (module, example) in _graphs(model, ctx.prefill_chunk, self.state_dtype(ctx)).items():
                traced[fn] = (torch.jit.trace(module, example, check_trace=False), example)
        # A calibrated recipe runs the model itself over the calibration text in `lower`.
        return {"traced": traced, "specs": model.state_spec(1), "model": model}

    def lower(self, exported: dict[str, Any], ctx: BuildContext) -> dict[str, Any]:
        ct = self.require("coremltools")
        if ctx.recipe == "palette4":
            self.require("sklearn")  # coremltools' k-means (kmeans1d, its other option, is not installed)
        specs: list[TensorSpec] = exported["specs"]
        stateful = self.state_dtype(ctx) == "float16"
        lowered, seconds, islands = {}, {}, {}
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
                                       name=buffer_name(s)) for s in specs]
            else:
                inputs += [ct.TensorType(name=state_input_name(s), shape=s.shape, dtype=np.float32)
                           for s in specs]
                outputs += [ct.TensorType(name=state_output_name(s), dtype=np.float32) for s in specs]
            selector = _IslandSelector()
            start = time.perf_counter()
            mlmodel = ct.convert(
                traced,
                inputs=inputs,
                outputs=outputs,
                states=states,
                minimum_deployment_target=ct.target.iOS18,
                compute_precision=ct.transform.FP16ComputePrecision(op_selector=selector),
                skip_model_load=True,
            )
            if samples is not None:
                mlmodel = _w8a8(mlmodel, fn, samples[fn], specs, stateful, ctx)
            else:
                mlmodel = _compress(mlmodel, ctx.recipe)
            seconds[fn] = round(time.perf_counter() - start, 2)
            islands[fn] = selector.counts
            if not selector.counts.get("position") or (
                any(s.kind == "rg_lru" for s in specs) and not selector.counts.get("rg_lru")
            ):
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
        }
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
        ct = self.require("coremltools")
        out = Path(ctx.work_dir) / ARTIFACT_FILE
        if out.exists():
            shutil.rmtree(out)
        with tempfile.TemporaryDirectory(dir=ctx.work_dir, prefix=".coreml-") as tmp:
            desc = ct.utils.MultiFunctionDescriptor()
            for fn, mlmodel in lowered.items():
                path = str(Path(tmp) / f"{fn}.mlpackage")
                mlmodel.save(path)
                desc.add_function(path, src_function_name="main", target_function_name=fn)
            desc.default_function_name = "decode"
            ct.utils.save_multifunction(desc, str(out))
        return [out]

    def io_contract(self, ctx: BuildContext) -> dict[str, Any]:
        from rgexport.model import state_spec

        specs = state_spec(ctx.config, 1)
        stateful = self.state_dtype(ctx) == "float16"
        contract = standard_io_contract(
            ctx.config, ctx.prefill_chunk, specs, "internal" if stateful else "io",
            state_dtype="float16" if stateful else "float32",
        )
        # Core ML feature names: dots are not allowed, so the state names use underscores.
        by_name = {s.name: s for s in specs}
        for t in contract["state"]["tensors"]:
            s = by_name[t["name"]]
            if stateful:
                t["coreml_state"] = buffer_name(s)
            else:
                t["input"], t["output"] = state_input_name(s), state_output_name(s)
        if not stateful:
            for method in contract["methods"].values():
                for io in method["inputs"] + method["outputs"]:
                    for s in specs:
                        if io["name"] == f"state.{s.name}":
                            io["name"] = state_input_name(s)
                        elif io["name"] == f"new_state.{s.name}":
                            io["name"] = state_output_name(s)
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

    def load(self, artifact_dir: Path, manifest: dict[str, Any], *, threads: int | None = None) -> Runner:
        """`threads` is accepted and unused: Core ML exposes no CPU thread count."""
        self.require("coremltools")
        path = Path(artifact_dir) / manifest["artifact"]["file"]
        io = manifest["io"]
        chunk = int(io["prefill_chunk"])
        specs = _specs_from_contract(io)
        stateful = io["state"]["placement"] == "internal"
        if platform.system() == "Darwin":
            facts = manifest.get("backend_facts", manifest.get("facts", {})).get("coreml", {})
            return CoreMLRunner(path, specs, chunk, stateful, facts.get("compute_units", "ALL"))
        return InterpreterRunner(path, specs, chunk, stateful)


def _specs_from_contract(io: dict[str, Any]) -> list[TensorSpec]:
    import torch

    return [TensorSpec(t["name"], tuple(t["shape"]), torch.float32, t["kind"]) for t in io["state"]["tensors"]]


# Runners ----------------------------------------------------------------------------------------
class _StepRunner(Runner):
    """Shared input building and state handling; subclasses run one function."""

    def __init__(self, specs: list[TensorSpec], chunk: int, stateful: bool):
        self.specs = specs
        self.prefill_chunk = chunk
        self.stateful = stateful
        self.io_state: dict[str, np.ndarray] = {}

    def _run(self, function: str, inputs: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        raise NotImplementedError

    def _call(self, function: str, token_name: str, tokens: np.ndarray, position: int) -> np.ndarray:
        inputs = {token_name: tokens, "position": np.array([position], np.int32)}
        if not self.stateful:
            inputs.update({state_input_name(s): self.io_state[s.name] for s in self.specs})
        out = self._run(function, inputs)
        if not self.stateful:
            self.io_state = {s.name: np.asarray(out[state_output_name(s)], np.float32) for s in self.specs}
        return np.asarray(out["logits"], np.float32)

    def reset(self) -> None:
        self.io_state = {s.name: np.zeros(s.shape, np.float32) for s in self.specs}

    def load_state(self, state: dict[str, np.ndarray]) -> None:
        """Replaces the state (by state name, any float dtype); kept in the program's storage dtype."""
        self.io_state = {s.name: np.asarray(state[s.name], np.float32).reshape(s.shape) for s in self.specs}

    def decode(self, token: int, position: int) -> np.ndarray:
        return self._call("decode", "token", np.array([token], np.int32), position)[0]

    def prefill(self, tokens: Sequence[int], position: int) -> np.ndarray:
        if len(tokens) != self.prefill_chunk:
            raise RgexportError(f"prefill takes exactly {self.prefill_chunk} tokens, got {len(tokens)}")
        return self._call("prefill", "tokens", np.asarray(tokens, np.int32)[None], position)[0]


class InterpreterRunner(_StepRunner):
    """Runs the ML program in rgexport's numpy MIL interpreter (Linux, or anywhere)."""

    stand_in = "rgexport's numpy MIL interpreter, not Core ML: its speed says nothing about a device"

    def __init__(self, path: Path, specs: list[TensorSpec], chunk: int, stateful: bool):
        from rgexport.backends.coreml.mil_interpreter import Program

        super().__init__(specs, chunk, stateful)
        self.program = Program.load(path)
        missing = set(FUNCTIONS) - set(self.program.functions)
        if missing:
            raise RgexportError(f"{path} lacks functions {sorted(missing)}; has {sorted(self.program.functions)}")
        self.reset()

    def reset(self) -> None:
        super().reset()
        self.states = self.program.new_state("decode")

    def load_state(self, state: dict[str, np.ndarray]) -> None:
        super().load_state(state)
        for s in self.specs if self.stateful else ():
            self.states[buffer_name(s)][...] = np.asarray(state[s.name]).reshape(s.shape)

    def _run(self, function: str, inputs: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        return self.program.run(function, inputs, self.states)

    def state(self) -> dict[str, np.ndarray]:
        if not self.stateful:
            return {k: v.copy() for k, v in self.io_state.items()}
        return {s.name: self.states[buffer_name(s)].astype(np.float32) for s in self.specs}


class CoreMLRunner(_StepRunner):
    """Runs the package with Core ML itself (macOS 15+): one MLState shared by both functions."""

    def __init__(self, path: Path, specs: list[TensorSpec], chunk: int, stateful: bool, compute_units: str = "ALL"):
        import coremltools as ct

        super().__init__(specs, chunk, stateful)
        units = getattr(ct.ComputeUnit, compute_units)
        self.models = {fn: ct.models.MLModel(str(path), function_name=fn, compute_units=units) for fn in FUNCTIONS}
        self.reset()

    def reset(self) -> None:
        super().reset()
        self.ml_state = self.models["decode"].make_state() if self.stateful else None

    def load_state(self, state: dict[str, np.ndarray]) -> None:
        super().load_state(state)
        for s in self.specs if self.stateful else ():
            self.ml_state.write_state(buffer_name(s), np.asarray(state[s.name], np.float16).reshape(s.shape))

    def _run(self, function: str, inputs: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        if self.stateful:
            return self.models[function].predict(inputs, state=self.ml_state)
        return self.models[function].predict(inputs)

    def state(self) -> dict[str, np.ndarray] | None:
        if not self.stateful:
            return {k: v.copy() for k, v in self.io_state.items()}
        if not hasattr(self.ml_state, "read_state"):
            return None
        return {s.name: np.asarray(self.ml_state.read_state(buffer_name(s)), np.float32) for s in self.specs}
