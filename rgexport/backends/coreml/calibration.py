"""Calibrated W8A8 (recipe `w8a8`) for the Core ML backend: int8 weights and int8 activations.

coremltools 9.0 quantises activations with `coremltools.optimize.coreml.linear_quantize_activations`
(the `optimize.coreml.experimental` entry point is a deprecated alias of it): it gathers per-tensor
min/max ranges by running the model with `MLModel.predict` (`experimental/_model_debugger.py`), then
applies two graph passes, `compression::insert_prefix_quantize_dequantize_pair` (a quantize/dequantize
pair before the input(s) of every `linear`, `conv`, pool and two-input `add`) and
`compression::insert_suffix_quantize_dequantize_pair` (after such an op's result), and
`common::dequantize_quantize_pair_elimination`. Two things keep that function from working here:

- `predict` needs macOS: on Linux it raises "Model prediction is only supported on macOS version 10.13
  or later." (coremltools/models/model.py, in `MLModel.predict`), and its model debugger passes no
  `MLState`, so it could not run a stateful program on macOS either.
- Its range recording keeps only the last sample: `ModelDebugger.record_intermediate_output` (and
  `_update_tensor_range`) assign the sample's min/max before taking min/max with the stored value, so
  the stored range is always the latest sample's.

- Its suffix pass cannot quantise a float32 op (the fp32 islands of rgexport's fp16 programs): it takes
  the range through `get_min_and_max_values`, which returns float16, so the scale is fp16 and the
  quantize op is refused ("the named input `scale` must have the same data type as the named input
  `input`. However, scale has dtype fp16 whereas input has dtype fp32"; passes/defs/
  optimize_activation_quantization.py:246, optimize/_utils.py:856). The islands stay float anyway.

So rgexport gathers the ranges itself, by running each function of the converted program in its own MIL
interpreter (`mil_interpreter.Program.run(observe=...)`) over real (tokens, position, state) samples
captured from the fp32 model along calibration text (`rgexport.calibrate.capture_samples`: past the
attention window too), keeping the min and max of every tensor over all samples, widens the ranges
around each concat as coremltools does (`_adjust_concat_surrounding_activation_stats`), and hands them
to coremltools' own passes above, restricted by op name to the groups `W8A8_GROUPS` (an
`OptimizationConfig` with one `op_name_configs` entry per chosen op).

Which ops the passes touch is decided per group (`op_groups`), from the TorchScript module scope that
coremltools records on each op at conversion (`ScopeSource.TORCHSCRIPT_MODULE_NAME`).
"""

from __future__ import annotations

import collections
from collections.abc import Iterable, Sequence
from typing import Any

import numpy as np

from rgexport.errors import RgexportError
from rgexport.graphs import input_name
from rgexport.model import TensorSpec, identifier

# Groups of the ops coremltools' activation passes can quantise (`linear` and two-input `add`).
LINEAR_GROUPS = ("mlp", "recurrent_proj", "attention_proj", "head")
ADD_GROUPS = ("residual", "gelu", "rope", "attention_mask", "attention_out", "ring_write", "conv1d", "rglru",
              "positions", "norm", "other")

# The w8a8 decision (measured: notes/coreml.md, `SENSITIVITY`): int8 activations around every linear
# layer (the ops that carry the weights and that the Neural Engine runs as int8 x int8); the adds stay float.
W8A8_GROUPS = ("mlp", "recurrent_proj", "attention_proj", "head")
FLOAT_GROUPS = {
    "attention_mask": "scores + (-30000 x mask): the mask sets the range, so the int8 step is ~236 and the "
                      "scores are wiped out (alone: top-1 86.9%, perplexity x1.088, KL 0.079)",
    "residual": "the residual stream: no weights, and alone it costs as much as all the MLP linears "
                "(KL 0.0019, top-1 97.3%)",
    "gelu": "x + 0.044715 x^3 inside tanh-GELU: no weights (alone KL 0.0004, perplexity x1.001)",
    "rglru": "the RG-LRU recurrence h = a h + x and its multiplier: a float32 island, which coremltools 9.0's "
             "suffix pass cannot quantise (it makes an fp16 scale for an fp32 tensor: ValueError)",
    "conv1d": "the Conv1D sums over its state: a float32 island (same ValueError)",
    "positions": "position arithmetic (float32 island: masks, rotary angles, slots): not activations",
    "attention_out": "the sum of attention over the cache and over the chunk (probabilities x values): no "
                     "weights",
    "ring_write": "the one-hot blend writing keys/values into the state: no weights (alone harmless, KL 1.4e-4)",
    "rope": "the rotary embedding's x cos + rot(x) sin: no weights (alone harmless, KL 1.3e-4)",
    "norm": "RMSNorm (its adds have a constant operand: nothing to quantise)",
    "other": "adds outside the blocks (none in Griffin's fp16 graphs today)",
}
# Sensitivity of the shipped tiny model: one group with int8 activations (plus int8 weights everywhere, as
# recipe w8), 512 held-out tokens, one prefill chunk of 32 then decode, against eager fp32:
# (top-1 agreement, perplexity ratio, mean KL, max abs logit error). Calibration: 256 decode + 48 prefill
# samples from 4 x 384 calibration tokens, min/max over all samples.
SENSITIVITY: dict[str, tuple[float, float, float, float]] = {
    "int8 weights only (recipe w8)": (0.9922, 0.9990, 1.3e-4, 0.158),
    "mlp": (0.9746, 0.9971, 2.2e-3, 0.657),
    "recurrent_proj": (0.9766, 1.0004, 2.1e-3, 1.901),
    "attention_proj": (0.9883, 0.9996, 2.0e-4, 0.179),
    "head": (0.9844, 0.9996, 6.2e-4, 0.228),
    "residual": (0.9727, 0.9992, 1.9e-3, 0.573),
    "gelu": (0.9961, 1.0010, 4.4e-4, 0.278),
    "rope": (0.9922, 0.9989, 1.3e-4, 0.162),
    "attention_mask": (0.8691, 1.0880, 7.9e-2, 4.305),
    "ring_write": (0.9902, 0.9990, 1.4e-4, 0.155),
    "w8a8 (mlp + recurrent_proj + attention_proj + head)": (0.9492, 0.9961, 4.5e-3, 2.290),
}
W8A8_NOTE = ("Core ML w8a8: int8 weights, and int8 activations (quantize/dequantize pairs from coremltools' "
             "activation passes) around the MLP, recurrent-block and attention projections and the tied head, "
             "with ranges calibrated by rgexport's MIL interpreter on real decode/prefill samples; the attention "
             "scores and mask, the RG-LRU recurrence, the Conv1D, the state writes, the residual stream and the "
             "other elementwise ops stay float (fp16, with the float32 islands).")
MAX_SAMPLES = {"decode": 256, "prefill": 64}


def _scope(op: Any) -> list[str]:
    from coremltools.converters.mil.mil.scope import ScopeSource

    return list(op.scopes.get(ScopeSource.TORCHSCRIPT_MODULE_NAME, []))


def _is_float32(op: Any) -> bool:
    from coremltools.converters.mil.mil import types

    return op.outputs[0].dtype == types.fp32


def classify(op: Any) -> str | None:
    """The group of a `linear` or `add` op of a converted (pymil) program, from its module scope; None
    for other op types."""
    from coremltools.converters.mil.mil import types

    scope = _scope(op)
    path = set(scope[:-1])  # the last entry names the value, not a module
    if op.op_type == "linear":
        if "mlp_block" in path:
            return "mlp"
        if "recurrent_block" in path:
            return "recurrent_proj"
        if "attention_block" in path:
            return "attention_proj"
        return "head"
    if op.op_type != "add" or not types.is_float(op.outputs[0].dtype):
        return None  # integer adds (token positions) are not activations
    if "rg_lru" in path:
        return "rglru"
    if "conv_1d" in path:
        return "conv1d"
    if path & {"temporal_pre_norm", "channel_pre_norm", "final_norm"}:
        return "norm"
    if "rope" in path:
        return "rope"
    if _is_float32(op):
        return "positions"  # the other float32 island: ops computed from the position input
    if "mlp_block" in path or "recurrent_block" in path:
        return "gelu"
    if "ring_buffer" in path:
        return "ring_write"
    if "attention_block" in path:
        return "attention_mask" if scope[-1].startswith("scores") else "attention_out"
    if len(scope) == 2 and scope[0].isdigit():  # a block's own scope: x = x + block(x)
        return "residual"
    return "other"


def op_groups(mlmodel: Any) -> dict[str, str]:
    """{op name: group} for every `linear` and `add` of a freshly converted model (scopes are lost once
    a model is saved, so this runs on `ct.convert`'s result)."""
    groups = {}
    for f in mlmodel._mil_program.functions.values():
        for op in f.operations:
            group = classify(op)
            if group is not None:
                groups[op.name] = group
    # Without scopes every linear would look like the head: refuse rather than quantise the wrong ops.
    if "mlp" not in groups.values():
        raise RgexportError("The converted program's linear ops carry no TorchScript module scopes (no MLP "
                            "found), so the w8a8 groups cannot be told apart")
    return groups


# Calibration ---------------------------------------------------------------------------------------
def calibration_samples(model: Any, sequences: Sequence[Sequence[int]], chunk: int) -> dict[str, list[Any]]:
    """Real inputs of both functions: `rgexport.calibrate.Sample`s along the fp32 trajectory."""
    from rgexport.calibrate import capture_samples

    out = {}
    for fn, t in (("decode", 1), ("prefill", chunk)):
        samples = capture_samples(model, [list(s) for s in sequences], chunk=t, max_samples=MAX_SAMPLES[fn])
        if not samples:
            raise RgexportError(f"The calibration sequences ({[len(s) for s in sequences]} tokens) give no "
                                f"{fn} sample: each needs at least {t} tokens")
        out[fn] = samples
    return out


def activation_ranges(program: Any, function: str,
                      feeds: Iterable[tuple[dict[str, np.ndarray], dict[str, np.ndarray]]]
                      ) -> dict[str, dict[str, float]]:
    """coremltools' `activation_stats` ({tensor: {"rmin", "rmax"}}) of one function of `program` (a
    `mil_interpreter.Program`): the min and max of every float tensor over all `feeds`, each (inputs,
    Core ML states by name: an empty dict for a program without states)."""
    lo: dict[str, float] = {}
    hi: dict[str, float] = {}

    def observe(name: str, value: np.ndarray) -> None:
        if value.size and np.issubdtype(value.dtype, np.floating):
            a, b = float(value.min()), float(value.max())
            lo[name] = min(a, lo.get(name, a))
            hi[name] = max(b, hi.get(name, b))

    n = 0
    for inputs, states in feeds:
        state = program.new_state(function)
        for name, value in states.items():
            state[name][...] = np.asarray(value).reshape(state[name].shape)
        program.run(function, inputs, state, observe=observe)
        n += 1
    if not n:
        raise RgexportError(f"No calibration samples for function {function}")
    stats: dict[str, dict[str, float]] = collections.defaultdict(dict)
    for name in lo:
        stats[name] = {"rmin": lo[name], "rmax": hi[name]}
    _widen_around_concats(program.functions[function], stats)
    return stats


def _widen_around_concats(function: Any, stats: dict[str, dict[str, float]]) -> None:
    """Inputs and output of each concat share one range, as coremltools' calibration makes them."""
    from coremltools.optimize.coreml.experimental._post_training_quantization import (
        _adjust_concat_surrounding_activation_stats,
    )

    groups = [[b[1] for b in o.inputs["values"] if b[0] == "var"] + [o.outputs[0][0]]
              for o in function.ops if o.type == "concat"]
    _adjust_concat_surrounding_activation_stats(groups, stats)


# Quantisation --------------------------------------------------------------------------------------
def quantize_activations(mlmodel: Any, op_names: Sequence[str], stats: dict[str, dict[str, float]]) -> Any:
    """coremltools' activation passes (prefix and suffix quantize/dequantize pairs, then the pair
    elimination) with `stats`, on the ops named in `op_names` only: int8, symmetric, per tensor."""
    from coremltools import _SPECIFICATION_VERSION_IOS_17
    from coremltools.converters.mil.frontend.milproto import load as milproto_load
    from coremltools.converters.mil.mil.passes.graph_pass import PassOption
    from coremltools.converters.mil.mil.passes.pass_registry import PASS_REGISTRY
    from coremltools.models.utils import _apply_graph_pass
    from coremltools.optimize import coreml as cto

    op_config = cto.OpLinearQuantizerConfig(mode="linear_symmetric", dtype="int8")
    config = cto.OptimizationConfig(op_name_configs={name: op_config for name in op_names})
    passes = []
    for name in ("compression::insert_prefix_quantize_dequantize_pair",
                 "compression::insert_suffix_quantize_dequantize_pair"):
        graph_pass = PASS_REGISTRY[name]
        graph_pass.set_options([PassOption("config", config)])
        graph_pass.set_options([PassOption("activation_stats", dict(stats))])
        passes.append(graph_pass)
    passes.append(PASS_REGISTRY["common::dequantize_quantize_pair_elimination"])
    return _apply_graph_pass(mlmodel, passes, spec_version=_SPECIFICATION_VERSION_IOS_17,
                             pymil_load_func=milproto_load.load, skip_model_load=True)


def quantized_op_counts(program: Any, function: str) -> dict[str, int]:
    """{op type: count} of the ops reading a dequantize result in one function of a mil_interpreter
    Program, plus the quantize/dequantize counts themselves."""
    f = program.functions[function]
    produced_by = {name: o.type for o in f.ops for name, _ in o.outputs}
    counts: collections.Counter[str] = collections.Counter()
    for o in f.ops:
        if o.type in ("quantize", "dequantize"):
            counts[o.type] += 1
        elif any(b[0] == "var" and produced_by.get(b[1]) == "dequantize" for bs in o.inputs.values() for b in bs):
            counts[f"{o.type} (int8 input)"] += 1
    return dict(sorted(counts.items()))


# w8a8: calibrated int8 activations ----------------------------------------------------------------
def _calibration_feeds(samples: list[Any], fn: str, specs: list[TensorSpec], stateful: bool):
    """(inputs, Core ML states) of `fn` for each captured sample, named as the program names them."""
    for sample in samples:
        tokens = sample.tokens.numpy().astype(np.int32)
        inputs = {"token" if fn == "decode" else "tokens": tokens.reshape(-1) if fn == "decode" else tokens,
                  "position": sample.position.numpy().astype(np.int32).reshape(1)}
        state = {s.name: sample.state[s.name].numpy().astype(np.float32) for s in specs}
        if stateful:
            yield inputs, {s.identifier: state[s.name] for s in specs}
        else:
            yield {**inputs, **{identifier(input_name(s)): state[s.name] for s in specs}}, {}
