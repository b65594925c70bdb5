"""Calibrated static int8 (recipe `w8a8`) for the ExecuTorch backend: XNNPACK PT2E, real calibration inputs.

- `node_group`: every op of a captured (`torch.export(...).module()`) StatefulModel graph placed in a group
  (`mlp.3`, `rglru.0`, `attention.2`, `positions`, ...) from its `nn_module_stack` and from dataflow
  (`positions`: ops computed from the position input and constants alone: masks, rotary angles, resets,
  ring-buffer slots).
- `quantize_static_pt2e`: XNNPACKQuantizer with static int8 activations and int8 per-channel weights,
  restricted by a node filter to the chosen group kinds; the prepared graph is calibrated on real
  (tokens, position, state) samples by writing each sample's state into the graph's state buffers before
  calling it; then `convert_pt2e` and the buffers zeroed (their values become the program's initial state).
- `qdq_by_group`: quantize/dequantize nodes per group of a converted graph (facts and tests).

What `w8a8` quantises was decided by a per-group sensitivity study on the shipped model (`SENSITIVITY`,
notes/executorch.md): one kind static int8 at a time, everything else float32, 512 held-out tokens.
"""

from __future__ import annotations

import collections
import re
from collections.abc import Callable, Iterable, Sequence
from typing import Any

import torch
from torch import nn

from rgexport.calibrate import Sample
from rgexport.errors import RgexportError
from rgexport.model import Griffin, TensorSpec

# Group kinds. Linear kinds carry weights; the others are elementwise work the quantizer also annotates
# (add, mul, cat) when asked to.
LINEAR_KINDS = ("mlp", "recurrent_proj", "attention_proj", "head")
KINDS = (*LINEAR_KINDS, "gating", "rglru", "conv1d", "attention", "rope", "norm", "residual", "embed",
         "softcap", "positions", "state")

# The w8a8 decision (see SENSITIVITY and notes/executorch.md): static int8 for these kinds, dynamic int8
# activations for the tied head (static int8 logits cost as much as every other linear together).
W8A8_KINDS = ("mlp", "recurrent_proj", "attention_proj")
W8A8_DYNAMIC_KINDS = ("head",)
W8A8_OBSERVER = "histogram"
W8A8_FLOAT_KINDS = {
    "gating": "gelu(y) * x in the recurrent block and gelu(gate) * up in the MLP: elementwise, no weights",
    "rglru": "the RG-LRU recurrence, its gates' bias adds and its state (the gates' bmm has no XNNPACK "
             "quantizer pattern)",
    "conv1d": "the Conv1D and its state",
    "attention": "scores, -30000 mask, softmax, the K/V cache blend",
    "rope": "rotary embedding",
    "norm": "RMSNorms",
    "residual": "the residual stream",
    "embed": "the embedding gather and its scale",
    "softcap": "the logits' soft-cap",
    "positions": "position arithmetic (masks, rotary angles, resets, ring-buffer slots)",
    "state": "reading and writing the state buffers",
}

# Sensitivity of the shipped tiny model (rgexport/assets/tiny): the converted PT2E graphs run in eager torch
# (what XNNPACK computes, notes/executorch.md) over 512 held-out tokens, prefill chunk 32 then decode, against
# eager fp32: (top-1 agreement, perplexity ratio, mean KL). One kind static int8 (all blocks), the rest
# float32; HistogramObserver ranges over 256 decode + 48 prefill samples of the calibration text.
SENSITIVITY: dict[str, tuple[float, float, float]] = {
    "recurrent_proj": (0.9825, 1.0041, 1.9e-3), "attention_proj": (0.9941, 0.9995, 7e-5),
    "head (static: int8 logits)": (0.9786, 1.0066, 4.4e-3),
    "attention (scores, -30000 mask, softmax, cache blend)": (0.8694, 1.0897, 0.079),
    "rglru (recurrence, gate bias adds)": (0.9825, 0.9999, 2.2e-3), "conv1d": (0.9903, 1.0019, 2.7e-4),
    "norm": (0.9708, 1.0001, 4.7e-3),
    "all linears static": (0.9630, 1.0114, 8.2e-3),
    "w8a8 (linears static, head dynamic)": (0.9669, 1.0031, 3.6e-3),
}

_BLOCK = re.compile(r"(?:^|\.)blocks\.(\d+)(?:\.(.*))?$")
_POSITION_SOURCES = {"aten.arange.default", "aten.ones.default", "aten.zeros.default", "aten.full.default"}


def _op(node: torch.fx.Node) -> str:
    return str(node.target)


def _module_path(node: torch.fx.Node) -> str:
    stack = node.meta.get("nn_module_stack") or {}
    return list(stack.values())[-1][0] if stack else ""


def _kind_in_block(inner: str, op: str) -> str:
    parts = inner.split(".")
    first = parts[0]
    if first in ("temporal_pre_norm", "channel_pre_norm"):
        return "norm"
    if first == "mlp_block":
        return "mlp" if "linear" in op else "gating"
    if first == "recurrent_block":
        if len(parts) == 1:
            return "gating"
        if parts[1] in ("linear_x", "linear_y", "linear_out"):
            return "recurrent_proj"
        return "conv1d" if parts[1] == "conv_1d" else "rglru"
    if first == "attention_block":
        if len(parts) > 1 and parts[1].startswith("proj_"):
            return "attention_proj"
        return "rope" if len(parts) > 1 and parts[1] == "rope" else "attention"
    raise RgexportError(f"Cannot place the {op} op of module block.{inner} in an op group")


def node_groups(gm: torch.fx.GraphModule, position_input: int = 1) -> dict[torch.fx.Node, str]:
    """The group of every call_function node of a captured StatefulModel graph, in graph order.

    Groups: `<kind>.<block>` inside a residual block (`mlp.3`, `rglru.0`, `attention.2`, `norm.1`,
    `residual.4`, ...), `norm.final`, `embed` and `softcap` / `head` around the blocks, `state` for the
    reads and writes of the state buffers (StatefulModel's own ops), and `positions` for ops that read only
    the position input and constants.
    """
    placeholders = [n for n in gm.graph.nodes if n.op == "placeholder"]
    if len(placeholders) <= position_input:
        raise RgexportError(f"The graph has {len(placeholders)} inputs; expected (tokens, position)")
    buffers = {name for name, _ in gm.named_buffers()}
    params = {name for name, _ in gm.named_parameters()} | buffers
    position_only = {placeholders[position_input]}
    for n in gm.graph.nodes:  # scalars the quantizer turned into attributes count as constants
        if n.op == "get_attr" and str(n.target) not in params:
            position_only.add(n)
    groups: dict[torch.fx.Node, str] = {}
    seen_head = False
    for n in gm.graph.nodes:
        if n.op != "call_function":
            continue
        op = _op(n)
        inputs = n.all_input_nodes
        if all(i in position_only for i in inputs) and (inputs or op in _POSITION_SOURCES):
            position_only.add(n)
            groups[n] = "positions"
            continue
        path = _module_path(n)
        match = _BLOCK.search(path)
        if match is not None:
            inner = match.group(2) or ""
            groups[n] = ("residual" if inner == "" else _kind_in_block(inner, op)) + f".{match.group(1)}"
        elif path.endswith("final_norm"):
            groups[n] = "norm.final"
        elif any(i.op == "get_attr" and str(i.target) in buffers for i in inputs):
            groups[n] = "state"  # the model's own buffers are read in blocks: here, the state buffers
        elif "linear" in op and not seen_head and any(g != "positions" for g in groups.values()):
            groups[n] = "head"  # the tied output projection: F.linear on the embedding, outside any module
            seen_head = True
        else:
            groups[n] = "softcap" if seen_head else "embed"
    return groups


def kind(group: str) -> str:
    return group.split(".")[0]


def check_kinds(kinds: Iterable[str]) -> tuple[str, ...]:
    kinds = tuple(kinds)
    unknown = sorted(set(kinds) - set(KINDS))
    if unknown:
        raise RgexportError(f"Unknown op group kinds {unknown}; expected some of {list(KINDS)}")
    return kinds


def static_int8_config(observer: str = "histogram") -> Any:
    """XNNPACK's symmetric static config: int8 activations (per tensor), int8 per-channel weights.

    observer: "histogram" (the config's own HistogramObserver, which searches a clipping range) or
    "minmax" (the full observed range).
    """
    import dataclasses

    from executorch.backends.xnnpack.quantizer.xnnpack_quantizer import get_symmetric_quantization_config

    config = get_symmetric_quantization_config(is_per_channel=True, is_dynamic=False)
    if observer == "histogram":
        return config
    if observer != "minmax":
        raise RgexportError(f"Activation observer {observer!r}, expected one of ['histogram', 'minmax']")
    from torchao.quantization.pt2e import MinMaxObserver

    act = dataclasses.replace(config.input_activation,
                              observer_or_fake_quant_ctr=MinMaxObserver.with_args(eps=2**-12))
    return dataclasses.replace(config, input_activation=act, output_activation=act)


def set_state_(module: nn.Module, specs: Sequence[TensorSpec], state: dict[str, torch.Tensor] | None) -> None:
    """Writes `state` (by state name; None: zeros) into the module's state buffers (`TensorSpec.identifier`)."""
    buffers = dict(module.named_buffers())
    missing = [s.identifier for s in specs if s.identifier not in buffers]
    if missing:
        raise RgexportError(f"The captured graph has no state buffers {missing}; cannot calibrate it on real states")
    with torch.no_grad():
        for s in specs:
            buf = buffers[s.identifier]
            if state is None:
                buf.zero_()
            else:
                buf.copy_(state[s.name].to(buf.dtype).reshape(buf.shape))


def calibrate_(prepared: nn.Module, specs: Sequence[TensorSpec], samples: Sequence[Sample]) -> None:
    """Runs the prepared (observed) graph over `samples`, each from its own real state, then zeroes it."""
    if not samples:
        raise RgexportError("No calibration samples: the calibration text is shorter than one call")
    with torch.no_grad():
        for sample in samples:
            set_state_(prepared, specs, sample.state)
            prepared(sample.tokens.to(torch.int32), sample.position.to(torch.int32))
    set_state_(prepared, specs, None)


def filtered_xnnpack_quantizer(plan: Sequence[tuple[Any, Callable[[torch.fx.Node], bool]]]) -> Any:
    """XNNPACKQuantizer that applies each (config, wanted) of `plan` to the ops `wanted` accepts, in order,
    and quantises no other op.

    executorch 1.5.1's `cat` annotator ignores the filter (`set_filter_function`, and with it the module
    type/name filters): every aten.cat of the graph gets static int8, here the Conv1D's concatenation of
    its state with the new input, the K/V cache with the new key, the rotary halves and the mask. This
    quantizer drops the annotations of unwanted ops before the annotations are propagated.
    """
    from executorch.backends.xnnpack.quantizer.xnnpack_quantizer import XNNPACKQuantizer
    from executorch.backends.xnnpack.quantizer.xnnpack_quantizer_utils import propagate_annotation
    from torchao.quantization.pt2e.quantizer.quantizer import Q_ANNOTATION_KEY

    class _Filtered(XNNPACKQuantizer):
        def annotate(self, model: torch.fx.GraphModule) -> torch.fx.GraphModule:
            for config, wanted in plan:
                self._annotate_all_patterns(model, config, wanted)
            for node in model.graph.nodes:
                if node.op == "call_function" and not any(wanted(node) for _, wanted in plan):
                    node.meta.pop(Q_ANNOTATION_KEY, None)
            propagate_annotation(model)
            return model

    return _Filtered()


def capture(module: nn.Module, inputs: tuple[torch.Tensor, ...]) -> torch.fx.GraphModule:
    """The graph PT2E quantises: `torch.export(strict=False).module()`, buffers under their own names."""
    return torch.export.export(module, inputs, strict=False).module()


def quantize_static_pt2e(
    module: nn.Module, inputs: tuple[torch.Tensor, ...], specs: Sequence[TensorSpec], samples: Sequence[Sample],
    kinds: Iterable[str] = W8A8_KINDS, observer: str = W8A8_OBSERVER, dynamic_kinds: Iterable[str] = (),
) -> tuple[torch.fx.GraphModule, dict[str, Any]]:
    """Captures `module` (or takes a `capture`d graph, which is consumed), quantises the ops of `kinds` to
    static int8 and the linears of `dynamic_kinds` to dynamic int8 activations (XNNPACK PT2E; int8
    per-channel weights for both), calibrates on `samples` and converts. Returns the converted graph
    (state zeroed) and facts about it.
    """
    from torchao.quantization.pt2e.quantize_pt2e import convert_pt2e, prepare_pt2e

    kinds = check_kinds(kinds)
    graph = module if isinstance(module, torch.fx.GraphModule) else capture(module, inputs)
    groups = node_groups(graph)
    by_name = {n.name: g for n, g in groups.items()}
    dynamic = set(check_kinds(dynamic_kinds))
    if dynamic & set(kinds):
        raise RgexportError(f"Op kinds {sorted(dynamic & set(kinds))} cannot be both static and dynamic")

    def of_kinds(chosen: set[str]) -> Callable[[torch.fx.Node], bool]:
        return lambda node: node.name in by_name and kind(by_name[node.name]) in chosen

    from executorch.backends.xnnpack.quantizer.xnnpack_quantizer import get_symmetric_quantization_config

    wanted = of_kinds(set(kinds))
    dynamic_config = get_symmetric_quantization_config(is_per_channel=True, is_dynamic=True)
    quantizer = filtered_xnnpack_quantizer([(static_int8_config(observer), wanted),
                                            (dynamic_config, of_kinds(dynamic))])
    prepared = prepare_pt2e(graph, quantizer)
    calibrate_(prepared, specs, samples)
    converted = convert_pt2e(prepared)
    set_state_(converted, specs, None)
    positions = sorted(int(s.position.reshape(-1)[0]) for s in samples)
    facts = {
        "calibration_samples": len(samples),
        "positions": [positions[0], positions[-1]],
        "static_ops": sum(1 for n in groups if wanted(n)),
        "dynamic_ops": sum(1 for n in groups if kind(groups[n]) in dynamic and "linear" in _op(n)),
        "qdq_nodes_by_kind": qdq_by_kind(converted),
        "integer_ops_by_kind": integer_ops(converted),
        "observer": observer,
    }
    return converted, facts


_DATA_MOVEMENT = {torch.ops.aten.reshape.default, torch.ops.aten.view.default, torch.ops.aten.slice.Tensor,
                  torch.ops.aten.transpose.int, torch.ops.aten.permute.default, torch.ops.aten.squeeze.dim,
                  torch.ops.aten.flatten.using_ints, torch.ops.aten.select.int, torch.ops.aten.unsqueeze.default}
_QDQ = ("quantize_per_tensor", "dequantize_per_tensor", "quantize_per_channel", "dequantize_per_channel")


def is_qdq(node: torch.fx.Node) -> bool:
    return node.op == "call_function" and any(q in _op(node) for q in _QDQ)


def _is_plumbing(node: torch.fx.Node) -> bool:
    """Quantize/dequantize nodes, and the per-call scale computation of dynamic quantisation."""
    if node.op != "call_function":
        return False
    if is_qdq(node) or "choose_qparams" in _op(node):
        return True
    return "getitem" in _op(node) and any(_is_plumbing(i) for i in node.all_input_nodes)


def qdq_groups(gm: torch.fx.GraphModule) -> dict[torch.fx.Node, set[str]]:
    """For each quantize/dequantize node of a converted graph, the groups of the ops it sits between
    (the op that produced its input and the ops that read its output, through other Q/DQ nodes and through
    the reshapes and slices that inherit a quantised tensor's parameters)."""
    groups = node_groups(gm)
    out: dict[torch.fx.Node, set[str]] = {}
    for n in gm.graph.nodes:
        if not is_qdq(n):
            continue
        touched: set[str] = set()
        stack = [*n.all_input_nodes, *n.users]
        seen = {n}
        while stack:
            m = stack.pop()
            if m in seen:
                continue
            seen.add(m)
            if _is_plumbing(m) or m.target in _DATA_MOVEMENT:
                stack.extend([*m.all_input_nodes, *m.users])
            elif m in groups and groups[m] != "positions":
                touched.add(groups[m])
        out[n] = touched
    return out


def integer_ops(gm: torch.fx.GraphModule) -> dict[str, int]:
    """Compute ops of a converted graph that XNNPACK runs on int8 (every input dequantized or a constant,
    every output quantized), counted per group kind: what the partitioner fuses into a quantized kernel.
    Reshapes and slices that inherit their input's quantisation (`propagate_annotation`) are left out."""
    groups = node_groups(gm)
    counts: collections.Counter[str] = collections.Counter()
    for n, group in groups.items():
        if _is_plumbing(n) or not n.users or n.target in _DATA_MOVEMENT:
            continue
        inputs = n.all_input_nodes
        reads_int8 = any(is_qdq(i) for i in inputs) and all(
            (is_qdq(i) and "dequantize" in _op(i)) or i.op == "get_attr" for i in inputs)
        if reads_int8 and all(is_qdq(u) and "dequantize" not in _op(u) for u in n.users):
            counts[kind(group)] += 1
    return dict(sorted(counts.items()))


def qdq_by_kind(gm: torch.fx.GraphModule) -> dict[str, int]:
    """Quantize/dequantize nodes per group kind they touch (a node between two kinds counts for both)."""
    counts: collections.Counter[str] = collections.Counter()
    for touched in qdq_groups(gm).values():
        for k in {kind(g) for g in touched}:
            counts[k] += 1
    return dict(sorted(counts.items()))


W8A8_NOTE = (
    "w8a8: static int8 activations and int8 per-channel weights on the MLP, recurrent-block and attention "
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
