"""Tracing the decode and prefill functions for coremltools, and the float32 islands of fp16 programs."""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from typing import Any

from rgexport.graphs import StatefulModel
from rgexport.model import Griffin

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

# Graphs -----------------------------------------------------------------------------------------
def _graphs(model: Griffin, chunk: int, state_dtype: str, last_only: bool = False) -> dict[str, tuple[Any, tuple]]:
    """The torch modules to trace, with example inputs: {function: (module, example inputs)}. `last_only`:
    prefill returns the chunk's last logits alone."""
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
            logits, new = self.model.forward(tokens.to(torch.long), position, named,
                                             last_only and not self.decode)
            return (logits[:, 0] if self.decode else logits, *[new[s.name] for s in specs])

    position = torch.zeros(1, dtype=torch.int32)
    token, tokens = torch.zeros(1, dtype=torch.int32), torch.zeros(1, chunk, dtype=torch.int32)
    if state_dtype == "float16":
        return {
            "decode": (StatefulDecode(model, assign_slices=True, state_dtype=torch.float16).eval(),
                       (token, position)),
            "prefill": (StatefulModel(model, assign_slices=True, state_dtype=torch.float16,
                                      prefill_last_only=last_only).eval(),
                        (tokens, position)),
        }
    zeros = tuple(torch.zeros(s.shape) for s in specs)
    return {
        "decode": (FunctionalStep(decode=True).eval(), (token, position, *zeros)),
        "prefill": (FunctionalStep(decode=False).eval(), (tokens, position, *zeros)),
    }

# A stand-in for a streamed build -------------------------------------------------------------------
STREAMED_MIN_ELEMENTS = 2048  # coremltools' weight_threshold: smaller weights are never compressed


def placeholder_model(stream: Any) -> tuple[Griffin, set[str]]:
    """The model of `stream` for tracing without its float weights: every parameter of rank 2 or more above
    `STREAMED_MIN_ELEMENTS` is zeros from `calloc` (numpy's `zeros`: a large one is fresh zero pages that
    nothing writes, so it takes no memory; the trace's matmuls and coremltools' frontend, which compares it
    with the state dict, only read it, and reading an untouched page maps the kernel's zero page; a stride-0
    view did the same until the trace's matmul made a contiguous copy, 2.6 GB for 2B's tied table), the rest
    (norms, biases, RoPE) real. Returns it with the
    stand-ins' MIL const names ("model." + parameter name), which `recipes.StreamedWeights` fills from the
    stream during conversion."""
    import numpy as np
    import torch
    from torch import nn

    from rgexport.streaming import _meta_griffin

    model = _meta_griffin(stream.config)
    def parts() -> Any:  # one at a time: each is replaced by its stand-in before the next is read
        yield "embedder", stream.embedder()
        for i in range(len(stream.config.block_types)):
            yield f"blocks.{i}", stream.block(i)
        yield "final_norm", stream.final_norm()

    def stand_in(part: nn.Module, prefix: str) -> None:  # a function: no name outlives the real tensors
        for name, p in list(part.named_parameters()):
            if p.dim() >= 2 and p.numel() > STREAMED_MIN_ELEMENTS:
                module_name, _, attr = name.rpartition(".")
                owner = part.get_submodule(module_name) if module_name else part
                zeros = torch.from_numpy(np.zeros(p.shape, dtype=torch.empty((), dtype=p.dtype).numpy().dtype))
                setattr(owner, attr, nn.Parameter(zeros, requires_grad=False))
                names.add(f"model.{prefix}.{name}")

    names: set[str] = set()
    for prefix, part in parts():
        stand_in(part, prefix)
        if prefix == "embedder":
            model.embedder = part
        elif prefix == "final_norm":
            model.final_norm = part
        else:
            model.blocks[int(prefix.split(".")[1])] = part
        del part
    return model.eval().requires_grad_(False), names

# Writing the package ---------------------------------------------------------------------------------
def _allclose_in_slices(a: Any, b: Any, rtol: float = 1e-05, atol: float = 1e-08, equal_nan: bool = False) -> bool:
    """`np.allclose`, a slice of 2^22 elements at a time: the same answer, without float64 copies of both."""
    import numpy as np

    a, b = np.asarray(a), np.asarray(b)
    if a.shape != b.shape or a.size <= 1 << 22:
        return bool(np.allclose(a, b, rtol=rtol, atol=atol, equal_nan=equal_nan))
    fa, fb, step = a.reshape(-1), b.reshape(-1), 1 << 22
    return all(np.allclose(fa[i:i + step], fb[i:i + step], rtol=rtol, atol=atol, equal_nan=equal_nan)
               for i in range(0, fa.size, step))


@contextlib.contextmanager
def deduplication_in_slices() -> Any:
    """coremltools' `const_deduplication` (which `save_multifunction` runs to share weights between the
    functions) compares two candidate consts with `np.allclose`, which makes float64 temporaries of both:
    for the int4 data of a 0.89 B model's 256000-row table that was 18.7 GB at once (coremltools 9.0,
    measured). Inside this block the pass compares them in slices, with the same result."""
    import importlib

    import numpy as np

    # the module (its package re-exports the pass class under the same name)
    module = importlib.import_module("coremltools.converters.mil.mil.passes.defs.cleanup.const_deduplication")

    class _Numpy:
        allclose = staticmethod(_allclose_in_slices)

        def __getattr__(self, name: str) -> Any:
            return getattr(np, name)

    module.np = _Numpy()
    try:
        yield
    finally:
        module.np = np


@contextlib.contextmanager
def validated_once() -> Iterator[dict[str, int]]:
    """coremltools' conversion with its program check once per pass pipeline, not after every pass (9.0).

    `PassPipelineManager.apply_pipeline` walks the whole program with `Program.validate` before a pipeline and
    after each of its passes (some ninety in the default one): at RecurrentGemma-2B, 25 s of a 156 s lowering
    (py-spy, notes/perf.md). Here the check before a pipeline runs as before and the checks after its passes
    become one after the last pass (with the essential-scope check if any pass asked for it, as the ones after
    `dead_code_elimination` do). The package is the same (tests/test_backend_coreml.py). Yields {"checks": the
    checks made after a pipeline, "deferred": the per-pass checks they stand for}."""
    from coremltools.converters.mil.mil.passes.pass_pipeline import PassPipelineManager
    from coremltools.converters.mil.mil.program import Program

    counts = {"checks": 0, "deferred": 0}
    apply, validate = PassPipelineManager.apply_pipeline, Program.validate

    def apply_checking_once(prog: Any, pass_pipeline: Any) -> None:
        validate(prog)  # what the pipeline gets, checked before it as coremltools does
        asked: list[bool] = []

        def deferred(self: Any, check_essential_scope: Any = False) -> None:
            if self is not prog:
                validate(self, check_essential_scope=check_essential_scope)
            else:
                asked.append(bool(check_essential_scope))

        Program.validate = deferred
        try:
            apply(prog, pass_pipeline)
        finally:
            Program.validate = validate
        validate(prog, check_essential_scope=any(asked))
        counts["checks"] += 1
        counts["deferred"] += max(0, len(asked) - 1)  # less the check before the pipeline, made above

    PassPipelineManager.apply_pipeline = staticmethod(apply_checking_once)
    try:
        yield counts
    finally:
        PassPipelineManager.apply_pipeline = staticmethod(apply)


def save_multifunction_in_memory(models: dict[str, Any], out: Any, default: str) -> None:
    """`coremltools.utils.save_multifunction` without the round trip through disk: the converted programs
    (`{function name: MLModel}`, each with its "main" function) become the functions of one program, consts
    equal across functions share a blob (the same deduplication, compared in slices), and the package is
    written once. save_multifunction saves each model, reads both back and deduplicates those copies: for a
    2B int4 package that held both functions' int4 data as int8 arrays beside the build's own (7.6 GiB).
    The steps are save_multifunction's own (coremltools 9.0), on the programs in hand."""
    import coremltools as ct
    from coremltools import proto
    from coremltools.converters.mil.converter import mil_convert
    from coremltools.converters.mil.mil import Program
    from coremltools.converters.mil.mil.passes.pass_registry import PASS_REGISTRY

    program, functions, version = Program(), [], 0
    for name, model in models.items():
        program.add_function(name, model._mil_program.functions["main"])
        spec = model.get_spec()
        version = max(version, spec.specificationVersion)
        d = spec.description
        functions.append(proto.Model_pb2.FunctionDescription(
            name=name, input=d.input, output=d.output, state=d.state,
            predictedFeatureName=d.predictedFeatureName, predictedProbabilitiesName=d.predictedProbabilitiesName))
    with deduplication_in_slices():
        PASS_REGISTRY["common::const_deduplication"]._deduplicate_const_across_functions(program)
    program.default_function_name = default
    program.skip_all_passes = True
    program.export_as_multifunction = True
    model = mil_convert(program, convert_to="mlprogram", convert_from="milinternal",
                       specification_version=max(version, ct.target.iOS18.value),
                       compute_units=ct.ComputeUnit.CPU_ONLY, skip_model_load=True,
                       model_description=proto.Model_pb2.ModelDescription(functions=functions,
                                                                          defaultFunctionName=default))
    model.save(str(out))

# Float32 islands --------------------------------------------------------------------------------
def fp32_islands(block: Any) -> dict[str, set[Any]]:
    """Ops of a MIL function (before fp16 casting) that must compute in float32, by reason.

    "position": ops computing only from the `position` input and constants.
    "rg_lru": elementwise ops on a path into an RG-LRU state write (or `new_state__*rg_lru` output).
    "rms_norm": each RMSNorm's mean of squares, up to its rsqrt: mul(x, x) -> reduce_mean -> add eps ->
    rsqrt. In fp16, x * x overflows (65504) once |x| passes 256, and trained Gemma-family residual streams
    do (a 2B checkpoint folder's reach 457): the rsqrt is then 0 and the block's input with it.
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
    return {"position": position, "rg_lru": rg_lru, "rms_norm": _mean_of_squares(block)}


def _mean_of_squares(block: Any) -> set[Any]:
    """Ops of each `reduce_mean(mul(x, x))` and the chain after it (add eps, rsqrt) up to the rsqrt."""
    ops: set[Any] = set()
    for op in block.operations:
        if op.op_type != "reduce_mean" or op.x.op is None:
            continue
        square = op.x.op
        if square.op_type != "mul" or square.x is not square.y:
            continue
        chain, var = [square, op], op.outputs[0]
        while len(var.child_ops) == 1 and var.child_ops[0].op_type in ("add", "rsqrt", "sqrt", "real_div"):
            nxt = var.child_ops[0]
            chain.append(nxt)
            var = nxt.outputs[0]
            if nxt.op_type in ("rsqrt", "sqrt"):
                break
        if chain[-1].op_type in ("rsqrt", "sqrt"):
            ops.update(chain)
    return ops

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
