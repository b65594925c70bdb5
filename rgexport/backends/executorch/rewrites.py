"""Edge-graph rewrites that let XNNPACK take more of decode and prefill (ExecuTorch path only).

XNNPACK's partitioner refuses some ops that Griffin's graphs are full of, and every refused op that sits
between delegated ones splits the delegate: the shipped model's decode ran as 24 XNNPACK calls with 113
portable-kernel ops between them. These passes run on each compute method's edge program before
partitioning (`to_edge_transform_and_lower(transform_passes=...)`) and rewrite those ops into forms
XNNPACK accepts, computing the same values:

- `fold_constants`: ops whose inputs are all weights or literals are computed once at export
  (softplus(a_param) in the RG-LRU: gt/exp/log1p/where; the Conv1D taps `w[k]`; `scale + 1` of the norms;
  the aranges). Dequantisation of quantised weights is never folded (it would store them as float32).
- `mean_as_4d`: RMSNorm's mean over the last dim of a rank-3 tensor becomes a mean over the two innermost
  dims of a rank-4 view: XNNPACK's mean is a global average pool over rank-4 inputs only.
- `select_as_slice`: `x[:, i]` (the unrolled RG-LRU) becomes a slice and a reshape.
- `unsqueeze_as_view`: unsqueeze on a non-trailing dim (XNNPACK's limit) becomes a reshape.
- `trivial_as_view`: an alias, a cat of one tensor and a sum over size-1 dims (decode's `stack` of one step, the
  ring-buffer blend's one-token sum) become reshapes.

The model code (`rgexport.model`) stays as it is: the other backends are validated against it.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch

REWRITES = ("fold_constants", "mean_as_4d", "select_as_slice", "unsqueeze_as_view", "trivial_as_view")


def _edge_ops() -> Any:
    from executorch.exir.dialects._ops import ops as exir_ops

    return exir_ops.edge


def _val(arg: Any) -> torch.Tensor:
    """The fake tensor behind an ExportPass argument."""
    return arg.to_tensor() if hasattr(arg, "to_tensor") else arg


def _name(target: Any) -> str:
    """'add.Tensor' for aten.add.Tensor in any dialect (edge, aten, or a bare overload like scalar_tensor)."""
    return ".".join(getattr(target, "__name__", str(target)).split(".")[-2:])


# Ops worth computing once when every input is constant: elementwise maths, comparisons, selection, casts
# and shape ops (the causal mask's `full` too: at most chunk x chunk values). Anything else, dequantisation
# above all, is left where it is.
FOLDABLE = frozenset({
    "add.Tensor", "add.Scalar", "sub.Tensor", "sub.Scalar", "mul.Tensor", "mul.Scalar", "div.Tensor",
    "neg.default", "exp.default", "log.default", "log1p.default", "sqrt.default", "rsqrt.default",
    "reciprocal.default", "pow.Tensor_Scalar", "gt.Scalar", "ge.Scalar", "lt.Scalar", "le.Scalar",
    "ge.Tensor", "eq.Scalar", "where.self", "clamp.default", "sigmoid.default", "tanh.default",
    "sin.default", "cos.default", "floor.default", "scalar_tensor.default", "full.default",
    "arange.start_step", "select_copy.int", "slice_copy.Tensor", "unsqueeze_copy.default",
    "squeeze_copy.dims", "view_copy.default", "expand_copy.default", "permute_copy.default",
    "alias_copy.default", "tril.default", "_to_dim_order_copy.default",
})


def fold_constants_pass() -> Any:
    """ExecuTorch's `constant_prop_pass`, restricted to `FOLDABLE`, as an ExportedProgram pass."""
    from executorch.exir.pass_base import ExportedProgramPassBase, ExportedProgramPassResult
    from executorch.exir.passes.constant_prop_pass import constant_prop_pass

    class FoldConstants(ExportedProgramPassBase):
        def call(self, exported_program: Any) -> Any:
            skip = {n.target for n in exported_program.graph.nodes
                    if n.op == "call_function" and _name(n.target) not in FOLDABLE}
            before = len(exported_program.graph.nodes)
            program = constant_prop_pass(exported_program, custom_skip_targets=skip)
            return ExportedProgramPassResult(program, len(program.graph.nodes) != before)

    return FoldConstants()


def reshape_rewrites_pass(enabled: Sequence[str]) -> Any:
    """One ExportPass doing the enabled reshape-style rewrites (mean_as_4d, select_as_slice,
    unsqueeze_as_view, trivial_as_view); ExportPass re-traces, so every new node carries its metadata."""
    from executorch.exir.pass_base import ExportPass

    e = _edge_ops().aten
    enabled = set(enabled)

    class ReshapeRewrites(ExportPass):
        def _view(self, x: Any, shape: Sequence[int], meta: Any) -> Any:
            return super().call_operator(e.view_copy.default, (x, list(shape)), {}, meta)

        def call_operator(self, op, args, kwargs, meta):  # ExportPass.call_operator, untyped there
            if op == e.mean.dim and "mean_as_4d" in enabled and not kwargs.get("dtype"):
                x = _val(args[0])
                rank = x.dim()
                dims = [d % rank for d in args[1]] if rank and args[1] is not None else []  # None: all dims
                if 1 <= rank < 4 and dims == [rank - 1] and x.dtype == torch.float32:
                    shape = list(x.shape)
                    as_4d = self._view(args[0], [1] * (3 - rank) + shape[:-1] + [1, shape[-1]], meta)
                    mean = super().call_operator(e.mean.dim, (as_4d, [2, 3], True), {}, meta)
                    keepdim = len(args) > 2 and bool(args[2])
                    return self._view(mean, shape[:-1] + ([1] if keepdim else []), meta)
            if op == e.select_copy.int and "select_as_slice" in enabled:
                x = _val(args[0])
                if x.dtype == torch.float32:
                    dim = args[1] % x.dim()
                    index = args[2] % x.shape[dim]
                    part = super().call_operator(e.slice_copy.Tensor, (args[0], dim, index, index + 1, 1), {}, meta)
                    shape = list(x.shape)
                    del shape[dim]
                    return self._view(part, shape, meta)
            if op == e.unsqueeze_copy.default and "unsqueeze_as_view" in enabled:
                x = _val(args[0])
                if x.dtype == torch.float32:
                    shape = list(x.shape)
                    shape.insert(args[1] % (x.dim() + 1), 1)
                    return self._view(args[0], shape, meta)
            if "trivial_as_view" in enabled:
                if op == e.alias_copy.default and _val(args[0]).dtype == torch.float32:
                    return self._view(args[0], list(_val(args[0]).shape), meta)
                if op == e.cat.default and len(args[0]) == 1 and _val(args[0][0]).dtype == torch.float32:
                    return self._view(args[0][0], list(_val(args[0][0]).shape), meta)
                if op == e.sum.dim_IntList and not kwargs.get("dtype"):
                    x = _val(args[0])
                    dims = [d % x.dim() for d in (args[1] or [])]
                    if x.dtype == torch.float32 and dims and all(x.shape[d] == 1 for d in dims):
                        keepdim = len(args) > 2 and bool(args[2])
                        shape = [1 if d in dims else s for d, s in enumerate(x.shape) if keepdim or d not in dims]
                        return self._view(args[0], shape, meta)
            return super().call_operator(op, args, kwargs, meta)

    return ReshapeRewrites()


def edge_passes(rewrites: Sequence[str] = REWRITES) -> list[Any]:
    """The transform passes for one compute method, in order: folding first, so that a selection from a
    weight becomes a constant rather than a slice."""
    unknown = sorted(set(rewrites) - set(REWRITES))
    if unknown:
        from rgexport.errors import RgexportError

        raise RgexportError(f"unknown ExecuTorch rewrites {unknown}; expected some of {list(REWRITES)}")
    passes: list[Any] = []
    if "fold_constants" in rewrites:
        passes.append(fold_constants_pass())
    reshapes = [r for r in rewrites if r != "fold_constants"]
    if reshapes:
        passes.append(reshape_rewrites_pass(reshapes))
    return passes
