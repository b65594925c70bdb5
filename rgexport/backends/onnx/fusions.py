"""Graph fusions for ONNX Runtime, written as onnxscript rewrite rules over the exporter's IR.

The model writes RMSNorm and tanh-GELU as their formulas (rgexport/model/layers.py says why), and the
exporter keeps them as 6 and 9 elementwise nodes. Neither ONNX Runtime's own graph optimisers nor
onnxscript's ORT fusions recognise these forms (they look for `Pow(x, 2)` and `Pow(x, 3)`; ours are
products), so a decode step ran 23 chains of tiny kernels. At the shipped model's size a decode step is
dominated by per-node overhead, not by arithmetic: notes/onnx.md has the measurements.

Each rule matches one exact form and checks its constants, so anything else is left as it was:
- RMSNorm `x * Reciprocal(Sqrt(ReduceMean(x * x, [-1]) + eps)) * w` -> `SimplifiedLayerNormalization`
  (ONNX Runtime's RMSNorm, in the default domain; float32 arithmetic, `stash_type` 1).
- tanh-GELU `(x * 0.5) * (Tanh((x + x * 0.044715 * x * x) * sqrt(2/pi)) + 1)` -> ONNX `Gelu` (opset 20)
  with `approximate="tanh"`.
onnxscript's rewriter carries the replaced nodes' metadata (the exporter's module hierarchy) to the new
node, so the fp16 recipe still finds which nodes belong to RMSNorm and keeps them in float32.
"""

from __future__ import annotations

import math
from typing import Any

_SQRT_2_OVER_PI = math.sqrt(2.0 / math.pi)


def _rules() -> Any:
    from onnxscript.rewriter import _ir_utils, pattern

    def scalar(value: Any) -> float | None:
        v = _ir_utils.get_singleton_value(value)
        return float(v) if isinstance(v, (float, int)) else None

    class RMSNormFusion(pattern.RewriteRuleClassBase):
        def pattern(self, op, x, eps, w):
            mean_square = op.ReduceMean(op.Mul(x, x), [-1], keepdims=1, noop_with_empty_axes=0)
            return op.Mul(op.Mul(x, op.Reciprocal(op.Sqrt(op.Add(mean_square, eps)))), w)

        def check(self, op, x, eps, w, **_):
            result = pattern.MatchResult()
            if scalar(eps) is None:
                return result.fail("epsilon is not a constant scalar", eps)
            return result

        def rewrite(self, op, x, eps, w):
            return op.SimplifiedLayerNormalization(x, w, axis=-1, epsilon=scalar(eps), stash_type=1)

    class GeluTanhFusion(pattern.RewriteRuleClassBase):
        def pattern(self, op, x, half, cubic, slope, one):
            inner = op.Add(x, op.Mul(op.Mul(op.Mul(x, cubic), x), x))
            return op.Mul(op.Mul(x, half), op.Add(op.Tanh(op.Mul(inner, slope)), one))

        def check(self, op, x, half, cubic, slope, one, **_):
            result = pattern.MatchResult()
            for value, want in ((half, 0.5), (cubic, 0.044715), (slope, _SQRT_2_OVER_PI), (one, 1.0)):
                got = scalar(value)
                if got is None or abs(got - want) > 1e-6 * abs(want):
                    return result.fail(f"constant {got} is not tanh-GELU's {want}", value)
            return result

        def rewrite(self, op, x, **_):
            return op.Gelu(x, approximate="tanh")

    return {"SimplifiedLayerNormalization": pattern.RewriteRuleSet([RMSNormFusion.rule()]),
            "Gelu": pattern.RewriteRuleSet([GeluTanhFusion.rule()])}


def fuse_for_ort(model: Any, opset: int) -> dict[str, int]:
    """Applies the fusions to an `onnx_ir.Model` in place -> {fused op: count}.

    `Gelu` is an ONNX op from opset 20 on: below that, GELU stays unfused. Constants the fused chains
    read are left unused and removed with their nodes.
    """
    import onnx_ir as ir

    rules = _rules()
    if opset < 20:
        del rules["Gelu"]
    counts = {name: r.apply_to_model(model) for name, r in rules.items()}
    if any(counts.values()):
        ir.passes.common.RemoveUnusedNodesPass()(model)
    return counts
