"""The numpy MIL interpreter against coremltools' own numpy implementations, op by op.

Each case builds one op twice with coremltools' MIL builder: on constants, where coremltools' value
inference computes the reference; and on function inputs, in one ML program that is converted, saved and
run by the interpreter. Dequantisation ops are checked against coremltools' `decompress` functions and
`decompress_weights`; a whole fp32 Griffin step against eager PyTorch.
"""

from __future__ import annotations

from typing import Any

import numpy as np
import pytest

ct = pytest.importorskip("coremltools")

from coremltools.converters.mil.mil import Builder as mb  # noqa: E402
from coremltools.converters.mil.mil import Function, Program, types  # noqa: E402

from rgexport.backends.coreml.mil_interpreter import OPS, MILError  # noqa: E402
from rgexport.backends.coreml.mil_interpreter import Program as MILProgram  # noqa: E402

# Every op type coremltools 9 emits for Griffin (decode and prefill, any recipe); each needs a case below.
GRIFFIN_OPS = {
    "abs", "add", "cast", "clip", "concat", "cos", "exp", "expand_dims", "floor", "gather", "greater_equal",
    "linear", "pad", "matmul", "mul", "read_state", "reduce_mean", "reduce_sum", "reshape", "rsqrt", "select",
    "sigmoid", "sin", "slice_by_index", "slice_update", "softmax", "sqrt", "stack", "sub", "tanh", "transpose",
    "write_state", "constexpr_blockwise_shift_scale", "constexpr_lut_to_dense",
    "quantize", "dequantize",  # recipe w8a8: coremltools' activation quantize/dequantize pairs
}

rng = np.random.default_rng(0)
X = rng.normal(size=(2, 3, 8)).astype(np.float32)
Y = rng.normal(size=(2, 3, 8)).astype(np.float32)
POS = np.abs(X) + 0.1
W = rng.normal(size=(5, 8)).astype(np.float32)
B = rng.normal(size=(5,)).astype(np.float32)
IDX = np.array([[3, 0], [7, 7]], np.int32)
ROWS = IDX % 5
BIG = np.array([2047.0, 2049.0, 4097.5, -3.25, 65519.0, 1.0 + 2.0**-12], np.float32)
H16 = (rng.normal(size=(2, 3, 8)) * 4).astype(np.float16)
G16 = (rng.normal(size=(2, 3, 8)) * 4).astype(np.float16)
W16 = rng.normal(size=(5, 8)).astype(np.float16)
# Enough fp16 values that dividing in fp32 instead of fp16 changes some quantised results (~2 % of them).
Q16 = (rng.normal(size=(64, 64)) * 4).astype(np.float16)
TIES = np.array([0.25, 0.75, -0.25, -1.25, 63.25, -64.25, 70.0, -70.0], np.float32)  # x / 0.5: halves, clipping

# name -> (builder over named inputs, inputs, bound). The bound is derived from the op, never from one host:
# - 0: bit for bit, where both sides provably run the same arithmetic (integer ops, copies, casts, gathers,
#   compares, one IEEE-rounded +,-,*,/ or sqrt per element, fp16 results rounded once).
# - an int: ulps of the result. Transcendentals run numpy's kernels on both sides, and numpy picks the kernel
#   by CPU features and memory layout (AVX2, AVX512_SKX, AVX512_SPR's fp16 SVML, or scalar libm): two
#   results each within numpy's documented error of the true value (NP_ULPS) differ by up to twice it.
# - SUM: a sum of k terms in an unknown order (the reduction order follows the layout and the BLAS
#   kernel the CPU selects): |error| <= 2 k eps sum|terms| (SUMS).
# sigmoid, silu and softmax: exp's bound, plus the roundings of the arithmetic around it, on each side.
SUM = "sum"
# numpy's maximum float32 errors (numpy/_core/tests/data/umath-validation-set-*.csv, column ulperror), and
# for float16 against float32-then-rounded (test_umath_accuracy: <= 1 ulp, SVML fp16 on AVX512_SPR: exp
# 1.27, tanh 3.00).
NP_ULPS = {"exp": 3, "log": 4, "sin": 2, "cos": 2, "tanh": 2, "power": 4}
NP_F16_ULPS = {"exp": 2, "tanh": 3}
# SUM cases: terms per output element (inner dimension, + 1 for a bias) and sum|terms| per output element.
_A = np.abs
SUMS = {
    "reduce_sum": (16, lambda: _A(X).sum(axis=(0, 2))),
    "reduce_mean": (8, lambda: _A(X).mean(axis=-1, keepdims=True)),
    "linear": (9, lambda: _A(X) @ _A(W).T + _A(B)),
    "linear_no_bias": (8, lambda: _A(X) @ _A(W).T),
    "matmul": (8, lambda: _A(X) @ _A(Y).transpose(0, 2, 1)),
    "matmul_tx": (3, lambda: _A(X).transpose(0, 2, 1) @ _A(Y)),
    "linear_fp16": (8, lambda: _A(H16).astype(np.float32) @ _A(W16).astype(np.float32).T),
    "reduce_mean_fp16": (8, lambda: _A(H16).astype(np.float32).mean(axis=-1, keepdims=True)),
}
CASES = {
    "abs": (lambda x, **_: mb.abs(x=x), {"x": X}, 0),
    "add": (lambda x, y, **_: mb.add(x=x, y=y), {"x": X, "y": Y}, 0),
    "add_broadcast": (lambda x, **_: mb.add(x=x, y=np.float32(2.5)), {"x": X}, 0),
    "sub": (lambda x, y, **_: mb.sub(x=x, y=y), {"x": X, "y": Y}, 0),
    "mul": (lambda x, y, **_: mb.mul(x=x, y=y), {"x": X, "y": Y}, 0),
    "real_div": (lambda x, y, **_: mb.real_div(x=x, y=y), {"x": X, "y": Y}, 0),
    "exp": (lambda x, **_: mb.exp(x=x), {"x": X}, 2 * NP_ULPS["exp"]),
    "sqrt": (lambda p, **_: mb.sqrt(x=p), {"p": POS}, 0),
    "rsqrt": (lambda p, **_: mb.rsqrt(x=p, epsilon=1e-3), {"p": POS}, 0),
    "floor": (lambda b, **_: mb.floor(x=b), {"b": BIG}, 0),
    "sin": (lambda b, **_: mb.sin(x=b), {"b": BIG}, 2 * NP_ULPS["sin"]),
    "cos": (lambda b, **_: mb.cos(x=b), {"b": BIG}, 2 * NP_ULPS["cos"]),
    "tanh": (lambda x, **_: mb.tanh(x=x), {"x": X}, 2 * NP_ULPS["tanh"]),
    "sigmoid": (lambda x, **_: mb.sigmoid(x=x), {"x": X}, 2 * (NP_ULPS["exp"] + 1)),
    "clip": (lambda x, **_: mb.clip(x=x, alpha=-0.5, beta=0.75), {"x": X}, 0),
    "greater_equal": (lambda x, y, **_: mb.cast(x=mb.greater_equal(x=x, y=y), dtype="fp32"),
                      {"x": X, "y": Y}, 0),
    "select": (lambda x, y, **_: mb.select(cond=mb.greater_equal(x=x, y=0.0), a=x, b=y), {"x": X, "y": Y}, 0),
    "cast_fp16": (lambda b, **_: mb.cast(x=b, dtype="fp16"), {"b": BIG}, 0),
    "cast_int32": (lambda b, **_: mb.cast(x=b, dtype="int32"), {"b": BIG}, 0),
    "cast_int16": (lambda i, **_: mb.cast(x=i, dtype="int16"), {"i": IDX}, 0),
    "cast_int_to_fp32": (lambda i, **_: mb.cast(x=i, dtype="fp32"), {"i": IDX}, 0),
    "reduce_mean": (lambda x, **_: mb.reduce_mean(x=x, axes=[-1], keep_dims=True), {"x": X}, SUM),
    "reduce_sum": (lambda x, **_: mb.reduce_sum(x=x, axes=[0, 2], keep_dims=False), {"x": X}, SUM),
    "softmax": (lambda x, **_: mb.softmax(x=x, axis=1), {"x": X}, 2 * (NP_ULPS["exp"] + 3)),
    "linear": (lambda x, **_: mb.linear(x=x, weight=W, bias=B), {"x": X}, SUM),
    "linear_no_bias": (lambda x, **_: mb.linear(x=x, weight=W), {"x": X}, SUM),
    "matmul": (lambda x, y, **_: mb.matmul(x=x, y=y, transpose_y=True), {"x": X, "y": Y}, SUM),
    "matmul_tx": (lambda x, y, **_: mb.matmul(x=x, y=y, transpose_x=True), {"x": X, "y": Y}, SUM),
    "concat": (lambda x, y, **_: mb.concat(values=[x, y, x], axis=-2), {"x": X, "y": Y}, 0),
    "stack": (lambda x, y, **_: mb.stack(values=[x, y], axis=1), {"x": X, "y": Y}, 0),
    # The RG-LRU's scan shifts along the chunk with constant pads (zeros, and ones for the products).
    "pad": (lambda x, **_: mb.pad(x=x, pad=[2, 0, 0, 0], constant_val=1.0), {"x": X}, 0),
    "pad_all_dims": (lambda x, **_: mb.pad(x=x, pad=[1, 0, 0, 2, 3, 1]), {"x": X}, 0),
    "pad_replicate": (lambda x, **_: mb.pad(x=x, pad=[1, 2], mode="replicate"), {"x": X}, 0),
    "pad_reflect": (lambda x, **_: mb.pad(x=x, pad=[2, 1], mode="reflect"), {"x": X}, 0),
    "transpose": (lambda x, **_: mb.transpose(x=x, perm=[2, 0, 1]), {"x": X}, 0),
    "reshape": (lambda x, **_: mb.reshape(x=x, shape=[2, -1, 4]), {"x": X}, 0),
    "reshape_zero": (lambda x, **_: mb.reshape(x=x, shape=[1, 0, -1, 0]), {"x": X}, 0),
    "expand_dims": (lambda x, **_: mb.expand_dims(x=x, axes=[0, -1]), {"x": X}, 0),
    "gather": (lambda x, i, **_: mb.gather(x=x, indices=i, axis=2), {"x": X, "i": IDX}, 0),
    "gather_rows": (lambda w, r, **_: mb.gather(x=w, indices=mb.cast(x=r, dtype="int16"), axis=0),
                    {"w": W, "r": ROWS}, 0),
    "slice_by_index": (lambda x, **_: mb.slice_by_index(x=x, begin=[0, 1, 1], end=[2, 3, 7], stride=[1, 1, 2]),
                       {"x": X}, 0),
    "slice_by_index_masks": (lambda x, **_: mb.slice_by_index(
        x=x, begin=[1, -2, 0], end=[0, 0, -1], begin_mask=[False, False, True], end_mask=[True, True, False],
        squeeze_mask=[True, False, False]), {"x": X}, 0),
    "slice_by_index_squeeze": (lambda x, **_: mb.slice_by_index(
        x=x, begin=[0, 2, 0], end=[1, 3, 8], squeeze_mask=[False, True, False]), {"x": X}, 0),
    "slice_update": (lambda x, y, **_: mb.slice_update(
        x=x, update=mb.slice_by_index(x=y, begin=[0, 0, 0], end=[2, 1, 8]), begin=[0, 1, 0], end=[2, 2, 8]),
        {"x": X, "y": Y}, 0),
    "slice_update_masks": (lambda x, y, **_: mb.slice_update(
        x=x, update=mb.slice_by_index(x=y, begin=[0, 0, 0], end=[1, 3, 4]), begin=[1, 0, 4], end=[2, 0, 8],
        end_mask=[False, True, False]), {"x": X, "y": Y}, 0),
    # Implemented beyond what Griffin emits today; each still checked.
    "pow": (lambda p, y, **_: mb.pow(x=p, y=y), {"p": POS, "y": Y}, 2 * NP_ULPS["power"]),
    "floor_div": (lambda x, y, **_: mb.floor_div(x=x, y=y), {"x": X, "y": Y}, 0),
    "maximum": (lambda x, y, **_: mb.maximum(x=x, y=y), {"x": X, "y": Y}, 0),
    "minimum": (lambda x, y, **_: mb.minimum(x=x, y=y), {"x": X, "y": Y}, 0),
    "equal": (lambda x, **_: mb.cast(x=mb.equal(x=mb.floor(x=x), y=0.0), dtype="fp32"), {"x": X}, 0),
    "not_equal": (lambda x, **_: mb.cast(x=mb.not_equal(x=mb.floor(x=x), y=0.0), dtype="fp32"), {"x": X}, 0),
    "less": (lambda x, y, **_: mb.cast(x=mb.less(x=x, y=y), dtype="fp32"), {"x": X, "y": Y}, 0),
    "less_equal": (lambda x, y, **_: mb.cast(x=mb.less_equal(x=x, y=y), dtype="fp32"), {"x": X, "y": Y}, 0),
    "greater": (lambda x, y, **_: mb.cast(x=mb.greater(x=x, y=y), dtype="fp32"), {"x": X, "y": Y}, 0),
    "logical_and": (lambda x, y, **_: mb.cast(x=mb.logical_and(x=mb.greater(x=x, y=0.0), y=mb.greater(x=y, y=0.0)),
                                              dtype="fp32"), {"x": X, "y": Y}, 0),
    "logical_or": (lambda x, y, **_: mb.cast(x=mb.logical_or(x=mb.greater(x=x, y=0.0), y=mb.greater(x=y, y=0.0)),
                                             dtype="fp32"), {"x": X, "y": Y}, 0),
    "logical_xor": (lambda x, y, **_: mb.cast(x=mb.logical_xor(x=mb.greater(x=x, y=0.0), y=mb.greater(x=y, y=0.0)),
                                              dtype="fp32"), {"x": X, "y": Y}, 0),
    "logical_not": (lambda x, **_: mb.cast(x=mb.logical_not(x=mb.greater(x=x, y=0.0)), dtype="fp32"), {"x": X}, 0),
    "ceil": (lambda b, **_: mb.ceil(x=b), {"b": BIG}, 0),
    "square": (lambda x, **_: mb.square(x=x), {"x": X}, 0),
    "sign": (lambda x, **_: mb.sign(x=x), {"x": X}, 0),
    "inverse": (lambda p, **_: mb.inverse(x=p), {"p": POS}, 0),
    "log": (lambda p, **_: mb.log(x=p), {"p": POS}, 2 * NP_ULPS["log"]),
    "relu": (lambda x, **_: mb.relu(x=x), {"x": X}, 0),
    "silu": (lambda x, **_: mb.silu(x=x), {"x": X}, 2 * (NP_ULPS["exp"] + 1)),
    "reduce_max": (lambda x, **_: mb.reduce_max(x=x, axes=[1]), {"x": X}, 0),
    "reduce_min": (lambda x, **_: mb.reduce_min(x=x, axes=[-1], keep_dims=True), {"x": X}, 0),
    "reduce_prod": (lambda x, **_: mb.reduce_prod(x=x, axes=[0]), {"x": X}, 0),
    "slice_by_size": (lambda x, **_: mb.slice_by_size(x=x, begin=[1, 1, 3], size=[1, -1, 4]), {"x": X}, 0),
    "squeeze": (lambda x, **_: mb.squeeze(x=mb.expand_dims(x=x, axes=[1]), axes=[1]), {"x": X}, 0),
    "identity": (lambda x, **_: mb.identity(x=x), {"x": X}, 0),
    # fp16: the result of each op is rounded once to fp16, as numpy's fp16 arithmetic does.
    "add_fp16": (lambda h, g, **_: mb.add(x=h, y=g), {"h": H16, "g": G16}, 0),
    "mul_fp16": (lambda h, g, **_: mb.mul(x=h, y=g), {"h": H16, "g": G16}, 0),
    "exp_fp16": (lambda h, **_: mb.exp(x=mb.mul(x=h, y=np.float16(0.25))), {"h": H16}, NP_F16_ULPS["exp"]),
    "tanh_fp16": (lambda h, **_: mb.tanh(x=h), {"h": H16}, NP_F16_ULPS["tanh"]),
    "sigmoid_fp16": (lambda h, **_: mb.sigmoid(x=h), {"h": H16}, NP_F16_ULPS["exp"] + 1),
    "softmax_fp16": (lambda h, **_: mb.softmax(x=h, axis=-1), {"h": H16}, 1),
    "linear_fp16": (lambda h, **_: mb.linear(x=h, weight=W16), {"h": H16}, SUM),
    "reduce_mean_fp16": (lambda h, **_: mb.reduce_mean(x=h, axes=[-1], keep_dims=True), {"h": H16}, SUM),
    "cast_fp16_to_fp32": (lambda h, **_: mb.cast(x=h, dtype="fp32"), {"h": H16}, 0),
    # iOS 17 quantize (int8 out, cast to fp32 to compare): scales that clip (|X| / 0.02 > 127), ties,
    # a zero point, a per-channel scale along an axis, and fp16 (the division rounds to fp16 first).
    "quantize": (lambda x, **_: mb.cast(x=mb.quantize(input=x, scale=np.float32(0.02), output_dtype="int8"),
                                        dtype="fp32"), {"x": X}, 0),
    "quantize_ties": (lambda t, **_: mb.cast(x=mb.quantize(input=t, scale=np.float32(0.5), output_dtype="int8"),
                                             dtype="fp32"), {"t": TIES}, 0),
    "quantize_uint8_axis": (lambda x, **_: mb.cast(x=mb.quantize(
        input=x, scale=np.array([0.01, 0.02, 0.05], np.float32), zero_point=np.array([128, 120, 3], np.uint8),
        axis=1, output_dtype="uint8"), dtype="fp32"), {"x": X}, 0),
    "quantize_fp16": (lambda q16, **_: mb.cast(x=mb.quantize(input=q16, scale=np.float16(0.0371),
                                                             output_dtype="int8"), dtype="fp32"), {"q16": Q16}, 0),
    "dequantize": (lambda x, **_: mb.dequantize(input=mb.quantize(input=x, scale=np.float32(0.02),
                                                                  output_dtype="int8"), scale=np.float32(0.02)),
                   {"x": X}, 0),
    "dequantize_uint8_axis": (lambda x, **_: mb.dequantize(
        input=mb.quantize(input=x, scale=np.array([0.01, 0.02, 0.05], np.float32),
                          zero_point=np.array([128, 120, 3], np.uint8), axis=1, output_dtype="uint8"),
        scale=np.array([0.01, 0.02, 0.05], np.float32), zero_point=np.array([128, 120, 3], np.uint8), axis=1),
        {"x": X}, 0),
    "dequantize_fp16": (lambda q16, **_: mb.dequantize(
        input=mb.quantize(input=q16, scale=np.float16(0.0371), output_dtype="int8"), scale=np.float16(0.0371)),
        {"q16": Q16}, 0),
}


def _torch_softmax_fp16(h, **_):
    import torch

    return torch.softmax(torch.from_numpy(h).float(), dim=-1).half().numpy()


# Cases where coremltools' value inference rounds inside the op and the reference is torch, computing in
# float32 and rounding once: coremltools' fp16 softmax rounds x - max to fp16 first (an absolute error
# of up to 2^-8 for |x| near 8), which moves small probabilities by up to 5 fp16 ulps.
def _torch_silu(x, **_):
    import torch

    return torch.nn.functional.silu(torch.from_numpy(x)).numpy()


def _coremltools_dequantize(case: str) -> Any:
    """coremltools' own dequantisation (`dequantize_by_scale_and_zp`, what `dequantize` materialises to)
    of the quantize case's value inference: dequantize has no value inference of its own."""
    def reference(**inputs):
        from coremltools.optimize import _utils as optimize_utils

        build = CASES[case.removeprefix("de")][0]
        quantized = _reference(lambda **v: build(**v).op.inputs["x"], inputs)  # under the cast: the quantize
        (op,) = [o for o in _quantize_ops(CASES[case][0], inputs) if o.op_type == "dequantize"]
        axis = None if op.axis is None else int(op.axis.val)
        zero_point = None if op.zero_point is None else op.zero_point.val
        return optimize_utils.dequantize_by_scale_and_zp(quantized, op.scale.val, zero_point, axis)
    return reference


def _quantize_ops(build, inputs):
    ops = []

    @mb.program(input_specs=[], opset_version=ct.target.iOS18)
    def prog():
        var = build(**{k: mb.const(val=v) for k, v in inputs.items()})
        ops.extend(var.op.enclosing_block.operations)
        return mb.identity(x=np.float32(0))

    return ops


TORCH_REFERENCES = {"softmax_fp16": _torch_softmax_fp16, "silu": _torch_silu}  # silu: no value inference
TORCH_REFERENCES |= {c: _coremltools_dequantize(c) for c in ("dequantize", "dequantize_uint8_axis",
                                                            "dequantize_fp16")}


def _reference(build, inputs):
    """coremltools' value inference of the op on constant inputs."""
    out = []

    @mb.program(input_specs=[], opset_version=ct.target.iOS18)
    def prog():
        var = build(**{k: mb.const(val=v) for k, v in inputs.items()})
        out.append(var.val)
        return mb.identity(x=np.float32(0))

    assert out[0] is not None, "coremltools has no value inference for this case"
    return np.asarray(out[0])


def _save(function: Function, path) -> MILProgram:
    prog = Program()
    prog.add_function("main", function)
    model = ct.convert(prog, convert_to="mlprogram", minimum_deployment_target=ct.target.iOS18,
                       compute_precision=ct.precision.FLOAT32, pass_pipeline=ct.PassPipeline.EMPTY,
                       skip_model_load=True)
    model.save(str(path))
    return MILProgram.load(path)


@pytest.fixture(scope="module")
def cases_program(tmp_path_factory):
    """All cases in one ML program, inputs named after the arrays they take."""
    arrays = {}
    for _, inputs, _ in CASES.values():
        for k, v in inputs.items():
            assert k not in arrays or arrays[k] is v, k
            arrays[k] = v
    dtype = {np.float32: types.fp32, np.float16: types.fp16, np.int32: types.int32}
    placeholders = {k: mb.placeholder(shape=v.shape, dtype=dtype[v.dtype.type]) for k, v in arrays.items()}
    with Function(placeholders, opset_version=ct.target.iOS18) as f:
        outs = []
        for name, (build, inputs, _) in CASES.items():
            outs.append(mb.identity(x=build(**{k: f.inputs[k] for k in inputs}), name=name))
        f.set_outputs(outs)
    program = _save(f, tmp_path_factory.mktemp("mil") / "cases.mlpackage")
    return program, program.run("main", arrays)


def test_every_implemented_op_has_a_case():
    assert set(OPS) <= {name for c in CASES for name in OPS if c == name or c.startswith(name + "_")} | {
        "constexpr_blockwise_shift_scale", "constexpr_lut_to_dense"}


def test_every_griffin_op_has_a_case():
    covered = {op for op in GRIFFIN_OPS if any(c == op or c.startswith(op + "_") for c in CASES)}
    covered |= {"read_state", "write_state", "constexpr_blockwise_shift_scale", "constexpr_lut_to_dense"}
    assert covered == GRIFFIN_OPS, GRIFFIN_OPS - covered
    assert GRIFFIN_OPS <= set(OPS) | {"read_state", "write_state"}


@pytest.mark.parametrize("name", sorted(CASES))
def test_op_matches_coremltools_value_inference(cases_program, name):
    build, inputs, ulps = CASES[name]
    _, outputs = cases_program
    ref = TORCH_REFERENCES[name](**inputs) if name in TORCH_REFERENCES else _reference(build, inputs)
    got = outputs[name]
    assert got.shape == ref.shape
    if ref.dtype == np.float16:
        # The interpreter holds fp16 values in float32; they must be fp16 values.
        assert np.array_equal(got.astype(np.float16).astype(np.float32), got)
    err = np.abs(got - ref.astype(np.float32))
    if ulps == SUM:
        # Each side within k eps sum|terms| of the exact sum, plus the rounding of the result.
        terms, magnitude = SUMS[name]
        ulp = np.spacing(np.abs(ref).astype(ref.dtype)).astype(np.float32)
        bound = 2 * terms * np.finfo(ref.dtype).eps * magnitude() + ulp
        assert np.all(err <= bound), (name, (err / bound).max())
    elif ulps == 0:
        np.testing.assert_array_equal(got, ref.astype(got.dtype))
    else:
        ulp = np.spacing(np.abs(ref).astype(ref.dtype)).astype(np.float32)
        assert np.all(err <= ulps * ulp), (name, (err / ulp).max())


def test_fp16_rounds_every_op_result(cases_program):
    """1 + 2^-12 is not an fp16 number: an fp16 program must lose it, an fp32 one must keep it."""
    _, outputs = cases_program
    assert outputs["cast_fp16"][-1] == 1.0
    assert outputs["floor"][-1] == 1.0 and outputs["cast_int32"][2] == 4097  # fp32: 4097.5 kept
    assert outputs["cast_fp16"][1] == 2048.0  # 2049 is not representable in fp16 (what the islands avoid)


def test_state_persists_in_fp16(tmp_path):
    placeholders = {
        "x": mb.placeholder(shape=(2, 3), dtype=types.fp16),
        "acc": mb.state_tensor_placeholder(shape=(2, 3), dtype=types.fp16),
    }
    with Function(placeholders, opset_version=ct.target.iOS18) as f:
        value = mb.read_state(input=f.inputs["acc"])
        new = mb.add(x=value, y=f.inputs["x"])
        mb.coreml_update_state(state=f.inputs["acc"], value=new)
        f.set_outputs([mb.mul(x=new, y=np.float16(2.0), name="out")])
    program = _save(f, tmp_path / "state.mlpackage")
    assert {"read_state", "write_state"} <= program.op_types()
    state = program.new_state("main")
    assert state["acc"].dtype == np.float16
    x = np.full((2, 3), 0.1, np.float16)
    expected = np.zeros((2, 3), np.float16)
    for _ in range(3):
        out = program.run("main", {"x": x}, state)
        expected = expected + x  # numpy fp16: one rounding per step
        np.testing.assert_array_equal(state["acc"], expected)
        np.testing.assert_array_equal(out["out"], (expected * np.float16(2)).astype(np.float32))
    with pytest.raises(MILError, match="state 'acc' was not given"):
        program.run("main", {"x": x}, {})


def test_unknown_op_fails_loudly(tmp_path):
    assert "erf" not in OPS
    with Function({"x": mb.placeholder(shape=(4,))}, opset_version=ct.target.iOS18) as f:
        f.set_outputs([mb.erf(x=f.inputs["x"], name="y")])
    program = _save(f, tmp_path / "erf.mlpackage")
    with pytest.raises(MILError, match="'erf'.*not implemented"):
        program.run("main", {"x": np.zeros(4, np.float32)})


def test_wrong_input_shape_is_refused(cases_program):
    program, _ = cases_program
    with pytest.raises(MILError, match="has shape"):
        program.run("main", {"x": np.zeros((1, 3, 8), np.float32)})


# Dequantisation --------------------------------------------------------------------------------
def _constexpr_program(tmp_path, make):
    """A program whose output is a linear layer over a constexpr weight (so the weight is used)."""
    with Function({"x": mb.placeholder(shape=(1, 64), dtype=types.fp16)}, opset_version=ct.target.iOS18) as f:
        weight = make()
        f.set_outputs([mb.linear(x=f.inputs["x"], weight=weight, name="y")])
    program = _save(f, tmp_path / "constexpr.mlpackage")
    (value,) = [v for k, v in program.functions["main"].consts.items() if v.shape == weight.shape]
    return program, value


def test_blockwise_shift_scale_matches_coremltools(tmp_path):
    from coremltools.converters.mil.mil.ops.defs.iOS18.compression import constexpr_blockwise_shift_scale

    int4 = types.nptype_from_builtin(types.int4)
    data = rng.integers(-8, 8, size=(32, 64)).astype(int4)
    scale = rng.uniform(0.01, 0.1, size=(32, 2)).astype(np.float16)
    offset = rng.integers(-2, 2, size=(32, 2)).astype(int4)
    _, got = _constexpr_program(tmp_path, lambda: mb.constexpr_blockwise_shift_scale(
        data=data, scale=scale, offset=offset))
    ref = constexpr_blockwise_shift_scale.decompress(data.astype(np.int8), scale, offset.astype(np.int8))
    assert ref.dtype == np.float16
    np.testing.assert_array_equal(got, ref.astype(np.float32))


@pytest.mark.parametrize("vector", [1, 2])
def test_lut_to_dense_matches_coremltools(tmp_path, vector):
    from coremltools.optimize import _utils as optimize_utils

    uint4 = types.nptype_from_builtin(types.uint4)
    rows = 32 // vector
    indices = rng.integers(0, 16, size=(rows, 64)).astype(uint4)
    lut = rng.normal(size=(2, 1, 16, vector)).astype(np.float16)  # one table per 16 (or 8) rows
    kwargs = {"vector_axis": np.int32(0)} if vector > 1 else {}
    _, got = _constexpr_program(tmp_path, lambda: mb.constexpr_lut_to_dense(indices=indices, lut=lut, **kwargs))
    ref = optimize_utils.lut_to_dense(indices.astype(np.uint8), lut, kwargs.get("vector_axis"))
    np.testing.assert_array_equal(got, ref.astype(np.float32))


@pytest.mark.parametrize("recipe", ["w8", "w4", "palette4"])
def test_compressed_weights_match_decompress_weights(tmp_path, recipe):
    """Each recipe's compression of a layer runs exactly as coremltools' decompress_weights says."""
    from coremltools.optimize import coreml as cto

    from rgexport.backends.coreml.recipes import _compression_config

    weight = rng.normal(size=(64, 64)).astype(np.float32)
    weight[5] = 0.0  # an all-zero row, like the embedding's padding row

    @mb.program(input_specs=[mb.TensorSpec(shape=(1, 64))], opset_version=ct.target.iOS18)
    def prog(x):
        return mb.linear(x=x, weight=weight, name="y")

    model = ct.convert(prog, convert_to="mlprogram", minimum_deployment_target=ct.target.iOS18,
                       skip_model_load=True)
    with np.errstate(invalid="ignore"):
        compressed = (cto.palettize_weights if recipe == "palette4" else cto.linear_quantize_weights)(
            model, _compression_config(recipe))
    path, dense_path = tmp_path / "c.mlpackage", tmp_path / "d.mlpackage"
    compressed.save(str(path))
    cto.decompress_weights(compressed).save(str(dense_path))
    program, dense = MILProgram.load(path), MILProgram.load(dense_path)
    assert any(t.startswith("constexpr_") for t in program.op_types("main"))
    x = {"x": rng.normal(size=(1, 64)).astype(np.float32)}
    np.testing.assert_array_equal(program.run("main", x)["y"], dense.run("main", x)["y"])


# A whole Griffin step --------------------------------------------------------------------------
def test_fp32_griffin_decode_matches_eager(small_model, small_tokens, tmp_path):
    """fp32 program: the interpreter reproduces eager PyTorch to float32 rounding.

    Tolerance 5e-5: 32 steps of ~600 fp32 ops whose roundings (1.2e-7 relative) add up to ~1e-5 on
    logits of magnitude ~8; a real semantic slip is larger (exact instead of tanh GELU: 2.7e-4).
    """
    import torch

    from rgexport.backends.coreml.export import _graphs
    from rgexport.graphs import input_name, output_name
    from rgexport.model import identifier

    model = small_model.requires_grad_(False)
    specs = model.state_spec(1)
    module, example = _graphs(model, 8, "float32")["decode"]
    traced = torch.jit.trace(module, example, check_trace=False)
    mlmodel = ct.convert(
        traced,
        inputs=[ct.TensorType(name="token", shape=(1,), dtype=np.int32),
                ct.TensorType(name="position", shape=(1,), dtype=np.int32)]
        + [ct.TensorType(name=identifier(input_name(s)), shape=s.shape, dtype=np.float32) for s in specs],
        outputs=[ct.TensorType(name="logits", dtype=np.float32)]
        + [ct.TensorType(name=identifier(output_name(s)), dtype=np.float32) for s in specs],
        minimum_deployment_target=ct.target.iOS18, compute_precision=ct.precision.FLOAT32,
        skip_model_load=True,
    )
    mlmodel.save(str(tmp_path / "fp32.mlpackage"))
    program = MILProgram.load(tmp_path / "fp32.mlpackage")
    assert program.op_types() <= GRIFFIN_OPS
    tokens = small_tokens[0, :32]
    ref = model.score(tokens[None], chunk=1)[0].numpy()
    state = {identifier(input_name(s)): np.zeros(s.shape, np.float32) for s in specs}
    for i, t in enumerate(tokens.tolist()):
        out = program.run("main", {"token": np.array([t], np.int32), "position": np.array([i], np.int32), **state})
        state = {identifier(input_name(s)): out[identifier(output_name(s))] for s in specs}
        assert np.abs(out["logits"][0] - ref[i]).max() < 5e-5, i


def test_fp16_rounding_of_large_values_is_numpy_s():
    """Large fp16 results are rounded through PyTorch's conversion (faster on the K/V windows an fp16 program
    rewrites every step); it must give numpy's values bit for bit: ties to even, subnormals, overflow to inf."""
    from rgexport.backends.coreml.mil_interpreter import _TORCH_ROUNDING_MIN, TensorType, _round

    rng = np.random.default_rng(0)
    for scale in (1e-9, 1e-6, 1.0, 100.0, 7e4):
        a = (rng.standard_normal(_TORCH_ROUNDING_MIN + 5) * scale).astype(np.float32)
        a[:6] = [np.nan, np.inf, -np.inf, 65520.0, 65519.0, 2.0**-25]  # 65520 rounds to inf, 2^-25 to 0 (tie)
        want = a.astype(np.float16).astype(np.float32)
        assert np.array_equal(_round(a, TensorType(np.float16, ())), want, equal_nan=True), scale
