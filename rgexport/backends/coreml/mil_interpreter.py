"""A small, exact numpy interpreter of Core ML ML programs (MIL), to validate .mlpackage files on Linux.

coremltools converts on Linux but `MLModel.predict` needs macOS, so rgexport executes the program itself:
the protobuf spec is parsed from the package, constants and weights are read with coremltools' own value
loader (`milproto.load._load_value`, which reads `weight.bin` through coremltools' blob reader), and each
op runs with the semantics of the MIL op reference (coremltools' `mil.ops.defs`). An op type without an
implementation here raises `MILError` naming it: nothing is skipped or approximated silently.

Numerics, chosen to model a device that stores tensors in the program's dtypes:
- Float values are held as float32 arrays whose values are exactly representable in their declared
  dtype. Each op computes in float32 (exact on fp16 inputs) and its result is rounded once to the dtype
  the program declares for that output, so an fp16 program is fp16 at every op boundary and an fp32 op
  is plain IEEE float32. Sums inside one op (matmul, linear, reductions, softmax) accumulate in float32.
  Real hardware may accumulate fp16 in other orders; that difference is below one fp16 rounding per op.
- State (`read_state`/`write_state`) is stored in its declared dtype (fp16 for Core ML states).
- Shapes and dtypes of every result are checked against the program's declarations.
- Activation quantisation (iOS 17 `quantize`/`dequantize`, recipe w8a8) follows coremltools' definitions
  (`quantize_by_scale_and_zp`, `dequantize_by_scale_and_zp`): input / scale rounded to the source dtype,
  then to the nearest integer (ties to even), plus the zero point, clipped to int8/uint8; dequantize is
  (q - zero_point) * scale rounded once to the scale's dtype.
- `run(..., observe=fn)` reports every input and op result as it is computed (activation calibration).
- Large compressed weights (`constexpr_blockwise_shift_scale` above `COMPRESSED_MIN_ELEMENTS`, e.g. every
  int4 weight of a 2B model) stay compressed (`CompressedWeight`): `gather` dequantises the rows it takes,
  `linear` a slice of rows at a time, to the same fp16 values the dense path holds, and multiplies in
  PyTorch's fp16 GEMM, or its float32 GEMM from 8 rows of x on (float32 sums of exact products, one rounding:
  the same result up to the order of the sums); any other
  op gets the dense array. Weights stored once in weight.bin are read once for all functions.

Usage: `program = Program.load(path)`; `state = program.new_state("decode")`;
`outputs = program.run("decode", {"tokens": ..., "position": ...}, state)`.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any

import numpy as np

from rgexport.errors import RgexportError


class MILError(RgexportError):
    """The program cannot be interpreted: an unknown op, a shape or dtype that contradicts the program."""


# MIL dtype names (as in `cast(dtype=...)`) to numpy.
_DTYPES: dict[str, Any] = {
    "fp16": np.float16, "fp32": np.float32, "fp64": np.float64,
    "int8": np.int8, "uint8": np.uint8, "int16": np.int16, "uint16": np.uint16,
    "int32": np.int32, "uint32": np.uint32, "int64": np.int64, "bool": np.bool_,
}


@dataclasses.dataclass(frozen=True)
class TensorType:
    """Declared dtype (numpy) and shape (None for a symbolic dimension) of a value."""

    dtype: Any
    shape: tuple[int | None, ...]
    is_state: bool = False

    @property
    def is_float(self) -> bool:
        return np.issubdtype(self.dtype, np.floating)


@dataclasses.dataclass
class Op:
    type: str
    name: str
    inputs: dict[str, Any]  # parameter -> ("var", name) | ("val", value) | list of those for tuple inputs
    outputs: list[tuple[str, TensorType]]


@dataclasses.dataclass
class Function:
    name: str
    inputs: dict[str, TensorType]
    ops: list[Op]
    outputs: list[str]
    consts: dict[str, np.ndarray]  # const and constexpr_* results, computed once at load
    constexpr_types: set[str] = dataclasses.field(default_factory=set)  # evaluated at load, not per call
    var_types: dict[str, TensorType] = dataclasses.field(default_factory=dict)  # every named value's type

    @property
    def states(self) -> dict[str, TensorType]:
        return {k: t for k, t in self.inputs.items() if t.is_state}


_TORCH_ROUNDING_MIN = 1 << 14  # elements


def _round(value: Any, t: TensorType) -> np.ndarray:
    """The value as held in the interpreter: floats as float32 carrying `t.dtype`'s precision."""
    a = np.asarray(value)
    if t.is_float:
        if t.dtype == np.float16:
            if a.size >= _TORCH_ROUNDING_MIN and a.dtype in (np.float32, np.float64):
                # PyTorch's conversion (F16C where the CPU has it): the same round-to-nearest-even as numpy's,
                # about 10x faster on the K/V windows an fp16 program rewrites every step.
                import torch

                return torch.from_numpy(np.ascontiguousarray(a)).to(torch.float16).to(torch.float32).numpy()
            return a.astype(np.float16).astype(np.float32)
        return a.astype(np.float32)
    return a.astype(t.dtype, copy=False)  # weight data shared by functions stays one array


def _tensor_type(value_type: Any) -> TensorType:
    """A proto ValueType (tensor or state) -> TensorType."""
    from coremltools.converters.mil.mil import types

    kind = value_type.WhichOneof("type")
    if kind == "stateType":
        inner = _tensor_type(value_type.stateType.wrappedType)
        return dataclasses.replace(inner, is_state=True)
    if kind != "tensorType":
        raise MILError(f"Unsupported MIL value type {kind!r} (only tensors and states are implemented)")
    tt = value_type.tensorType
    builtin = types.PROTO_TO_BUILTIN_TYPE[tt.dataType]
    if builtin == types.str:
        return TensorType(np.str_, ())
    dtype = np.dtype(types.nptype_from_builtin(builtin)).type
    shape = tuple(d.constant.size if d.WhichOneof("dimension") == "constant" else None for d in tt.dimensions)
    return TensorType(dtype, shape)


COMPRESSED_MIN_ELEMENTS = 1 << 22  # 4M elements: 16 MiB of float32, more than any shipped-model weight
# Elements dequantised at once by CompressedWeight.linear. Its three passes over a slice (int to float32, times
# the scale, to fp16) and the GEMM each read the last one's output: at 1M elements (a 4 MB float32 + 2 MB fp16
# pair) that stays in cache, at 4M (24 MB) it went to memory and back between passes. 2B-width weights
# streamed once, 2 threads: 2.2 Gw/s at 4M, 4.8-5.8 at 1M and 2M, 3.5-4.5 at 256K-512K (per-call overhead).
_ROWS_PER_SLICE = 1 << 20
# From this many rows of x on, linear multiplies in float32 on the fp16 weights' values rather than in PyTorch's
# fp16 GEMM, which has no fast CPU kernel for more than a row or two: a [410, 2560] slice at 32 rows, 1254 us
# in fp16 against 517 us for the copy to float32 and a float32 GEMM; at 8 rows 348 / 261, at 4 156 / 213.
_FLOAT32_GEMM_ROWS = 8


_SCRATCH: dict[Any, Any] = {}


def _scratch(elements: int, dtype: Any) -> Any:
    """A flat torch buffer of at least `elements` of `dtype`, the same one for every call (grown when needed):
    `CompressedWeight.linear`'s dequantised slices. The interpreter runs one op at a time."""
    import torch

    buf = _SCRATCH.get(dtype)
    if buf is None or buf.numel() < elements:
        buf = _SCRATCH[dtype] = torch.empty(elements, dtype=dtype)
    return buf[:elements]


class CompressedWeight:
    """The result of a `constexpr_blockwise_shift_scale` kept as its data, scale and offset (2B's int4 weights
    would take 10.7 GB as float32). `rows(a, b)` gives rows a..b as the dense path holds them: the float32
    product rounded to `dtype` (fp16). Rows must be whole blocks' worth of the first axis."""

    def __init__(self, data: np.ndarray, scale: np.ndarray, offset: np.ndarray | None, dtype: Any):
        self.data, self.scale, self.offset, self.out_dtype = data, np.asarray(scale), offset, dtype
        self.shape, self.ndim, self.dtype = tuple(data.shape), data.ndim, np.dtype(np.float32)
        self.size = int(data.size)
        self.row_block = data.shape[0] // self.scale.shape[0]
        self.rows_per_slice = max(self.row_block, _ROWS_PER_SLICE // max(1, self.size // max(1, data.shape[0]))
                                  // self.row_block * self.row_block)

    def rows(self, start: int, stop: int) -> np.ndarray:
        b = self.row_block
        if start % b or (stop % b and stop != self.shape[0]):
            raise MILError(f"rows {start}:{stop} split a block of {b} rows")
        offset = None if self.offset is None else self.offset[start // b:-(-stop // b)]
        value = _blockwise_shift_scale(self.data[start:stop], self.scale[start // b:-(-stop // b)], offset)
        return _round(value, TensorType(self.out_dtype, ()))

    def slices(self) -> Any:
        for start in range(0, self.shape[0], self.rows_per_slice):
            yield start, min(self.shape[0], start + self.rows_per_slice)

    def take_rows(self, idx: np.ndarray) -> np.ndarray:
        """Rows `idx` (any shape of indices): the dequantised rows only."""
        flat = idx.reshape(-1)
        out = np.empty((flat.size, *self.shape[1:]), dtype=np.float32)
        for i, row in enumerate(flat):
            start = int(row) // self.row_block * self.row_block
            out[i] = self.rows(start, start + self.row_block)[int(row) - start]
        return out.reshape(*idx.shape, *self.shape[1:])

    def linear(self, x: np.ndarray, bias: np.ndarray | None) -> np.ndarray:
        """`linear(x, self, bias)` of an fp16 program in PyTorch's fp16 GEMM (from `_FLOAT32_GEMM_ROWS` rows
        of x on, its float32 GEMM on the same fp16 values), a slice of output channels at a time: the weight
        rows dequantised in fp16 (int data times fp16 scale is exact in float32, so one rounding, as `rows`),
        products summed in float32 and the result rounded once to fp16, as the dense path computes it up to
        the order of the sums (numpy's float32 dequantisation and GEMM would take about 40 s per token for a
        2B model here; this takes about 1 s)."""
        import torch

        if self.out_dtype != np.float16 or self.ndim != 2 or self.offset is not None:
            return _linear(x, np.asarray(self), bias)
        half = torch.float16
        wide = x.size // max(1, self.shape[1]) >= _FLOAT32_GEMM_ROWS
        gemm = torch.float32 if wide else half  # the operands' values are fp16's either way
        xt = torch.from_numpy(np.ascontiguousarray(x, dtype=np.float32)).to(half).to(gemm)
        b = None if bias is None else torch.from_numpy(np.ascontiguousarray(bias, dtype=np.float32)).to(half).to(gemm)
        rb, cb = self.row_block, self.shape[1] // self.scale.shape[1]
        out = []
        # Two buffers shared by every call (`_scratch`), not temporaries: glibc keeps freed blocks of this size
        # in its heap (3 GB over one 2B prefill), and once large blocks are mmapped
        # (`memory.map_large_allocations`) a fresh buffer per call page-faults its 24 MB in again every time.
        # The whole scale array is not converted per call either (the head's is 20M values). 2B, every
        # compressed linear once: 2.41 -> 1.36 s.
        rows = min(self.rows_per_slice, self.shape[0])
        w32 = _scratch(rows * self.shape[1], torch.float32).view(rows, self.shape[1])
        w16 = _scratch(rows * self.shape[1], half).view(rows, self.shape[1])
        with torch.no_grad():
            for start, stop in self.slices():
                n = stop - start
                scale = torch.from_numpy(np.asarray(self.scale[start // rb:-(-stop // rb)], dtype=np.float32))
                s = scale.repeat_interleave(rb, 0)[:n] if rb > 1 else scale
                w = w32[:n]
                w.copy_(torch.from_numpy(self.data[start:stop]))  # int -> float32
                w.view(n, -1, cb).mul_(s[:, :, None])  # the product is exact in float32 ...
                w16[:n].copy_(w)  # ... and rounded once to fp16
                if wide:
                    w.copy_(w16[:n])  # the fp16 values, exact in float32
                out.append(torch.nn.functional.linear(xt, w if wide else w16[:n],
                                                      None if b is None else b[start:stop]))
        return torch.cat(out, -1).to(half).float().numpy()  # one rounding of each float32 sum

    def __array__(self, dtype: Any = None, copy: Any = None) -> np.ndarray:
        dense = np.concatenate([self.rows(a, b) for a, b in self.slices()]) if self.shape[0] else self.rows(0, 0)
        return dense if dtype is None else dense.astype(dtype)


# Op implementations -------------------------------------------------------------------------------
# Each takes the op's inputs as keyword arguments (numpy arrays, lists of them for tuple inputs, or
# None where an optional input is absent) and returns the result (or a tuple for several outputs).
OPS: dict[str, Callable[..., Any]] = {}


def op(*names: str) -> Callable[[Callable[..., Any]], Callable[..., Any]]:
    def register(fn: Callable[..., Any]) -> Callable[..., Any]:
        for n in names:
            OPS[n] = fn
        return fn

    return register


def _scalar(v: Any, default: Any = None) -> Any:
    return default if v is None else np.asarray(v).item()


def _ints(v: Any) -> list[int]:
    return [int(i) for i in np.asarray(v).reshape(-1)]


def _bools(v: Any, n: int) -> list[bool]:
    return [False] * n if v is None else [bool(b) for b in np.asarray(v).reshape(-1)]


def _binary(fn: Callable[[Any, Any], Any]) -> Callable[..., Any]:
    return lambda x, y: fn(x, y)


for _name, _fn in {
    "add": np.add, "sub": np.subtract, "mul": np.multiply, "real_div": np.divide, "pow": np.power,
    "maximum": np.maximum, "minimum": np.minimum, "equal": np.equal, "not_equal": np.not_equal,
    "less": np.less, "less_equal": np.less_equal, "greater": np.greater, "greater_equal": np.greater_equal,
    "logical_and": np.logical_and, "logical_or": np.logical_or, "logical_xor": np.logical_xor,
}.items():
    OPS[_name] = _binary(_fn)


@op("floor_div")
def _floor_div(x, y):
    return np.floor_divide(x, y)


for _name, _fn in {
    "abs": np.abs, "exp": np.exp, "floor": np.floor, "ceil": np.ceil, "sqrt": np.sqrt, "sin": np.sin,
    "cos": np.cos, "tanh": np.tanh, "square": np.square, "sign": np.sign, "logical_not": np.logical_not,
}.items():
    OPS[_name] = (lambda f: lambda x: f(x))(_fn)


@op("rsqrt")
def _rsqrt(x, epsilon=None):
    return 1.0 / np.sqrt(x + np.float32(_scalar(epsilon, 1e-12)))


@op("inverse")
def _inverse(x, epsilon=None):
    return 1.0 / (x + np.float32(_scalar(epsilon, 1e-4)))


@op("log")
def _log(x, epsilon=None):
    return np.log(x + np.float32(_scalar(epsilon, 1e-45)))


@op("sigmoid")
def _sigmoid(x):
    return 1.0 / (1.0 + np.exp(-x))


@op("relu")
def _relu(x):
    return np.maximum(x, 0)


@op("silu")
def _silu(x):
    return x / (1.0 + np.exp(-x))


@op("clip")
def _clip(x, alpha, beta):
    return np.minimum(np.maximum(x, alpha), beta)


@op("softmax")
def _softmax(x, axis=None):
    axis = _scalar(axis, -1)
    e = np.exp(x - np.max(x, axis=axis, keepdims=True))
    return e / np.sum(e, axis=axis, keepdims=True)


def _reduction(fn: Callable[..., Any]) -> Callable[..., Any]:
    def run(x, axes=None, keep_dims=None):
        ax = None if axes is None else tuple(_ints(axes))
        return fn(x, axis=ax, keepdims=bool(_scalar(keep_dims, False)))

    return run


for _name, _fn in {"reduce_sum": np.sum, "reduce_mean": np.mean, "reduce_max": np.max,
                   "reduce_min": np.min, "reduce_prod": np.prod}.items():
    OPS[_name] = _reduction(_fn)


@op("cast")
def _cast(x, dtype):
    name = _scalar(dtype)
    if name not in _DTYPES:
        raise MILError(f"cast to unknown dtype {name!r}; expected one of {sorted(_DTYPES)}")
    return np.asarray(x).astype(_DTYPES[name])


@op("identity")
def _identity(x):
    return x


@op("select")
def _select(cond, a, b):
    return np.where(cond, a, b)


@op("linear")
def _linear(x, weight, bias=None):
    if isinstance(weight, CompressedWeight):  # a slice of output channels at a time
        return weight.linear(x, bias)
    y = np.matmul(x, weight.T)
    return y if bias is None else y + bias


@op("matmul")
def _matmul(x, y, transpose_x=None, transpose_y=None):
    if _scalar(transpose_x, False):
        x = np.swapaxes(x, -1, -2)
    if _scalar(transpose_y, False):
        y = np.swapaxes(y, -1, -2)
    return np.matmul(x, y)


@op("concat")
def _concat(values, axis, interleave=None):
    if _scalar(interleave, False):
        raise MILError("concat with interleave=True is not implemented")
    return np.concatenate(values, axis=_scalar(axis))


@op("pad")
def _pad(x, pad, mode=None, constant_val=None):
    """`pad` holds (before, after) pairs for the last len(pad) / 2 dimensions, outermost first."""
    x = np.asarray(x)
    amounts = _ints(pad)
    if len(amounts) % 2 or len(amounts) > 2 * x.ndim:
        raise MILError(f"pad amounts {amounts} do not fit a tensor of rank {x.ndim}")
    widths = [(0, 0)] * (x.ndim - len(amounts) // 2) + list(zip(amounts[::2], amounts[1::2]))
    kind = _scalar(mode, "constant")
    if kind == "constant":
        return np.pad(x, widths, mode="constant", constant_values=np.asarray(_scalar(constant_val, 0.0), x.dtype))
    if kind in ("reflect", "replicate"):
        return np.pad(x, widths, mode="reflect" if kind == "reflect" else "edge")
    raise MILError(f"pad mode {kind!r} is not implemented; expected constant, reflect or replicate")


@op("stack")
def _stack(values, axis):
    return np.stack(values, axis=_scalar(axis))


@op("transpose")
def _transpose(x, perm):
    return np.transpose(x, _ints(perm))


@op("reshape")
def _reshape(x, shape):
    """iOS 17 semantics: a 0 copies the input dimension aligned from the right (1 when out of range)."""
    target = _ints(shape)
    rank = np.ndim(x)
    for i, s in enumerate(target):
        if s == 0:
            j = rank - (len(target) - i)
            target[i] = x.shape[j] if j >= 0 else 1
    return np.reshape(x, target)


@op("expand_dims")
def _expand_dims(x, axes):
    out_rank = np.ndim(x) + len(_ints(axes))
    for a in sorted(a + out_rank if a < 0 else a for a in _ints(axes)):
        x = np.expand_dims(x, a)
    return x


@op("squeeze")
def _squeeze(x, axes=None):
    if axes is None:
        return np.squeeze(x)
    return np.squeeze(x, axis=tuple(_ints(axes)))


def _index_slices(shape, begin, end, stride, begin_mask, end_mask, squeeze_mask):
    """Python slicing per axis, as the MIL slice_by_index reference defines it."""
    rank = len(shape)
    begin, end = _ints(begin), _ints(end)
    stride = [1] * rank if stride is None else _ints(stride)
    bm, em, sm = _bools(begin_mask, rank), _bools(end_mask, rank), _bools(squeeze_mask, rank)
    slices = []
    for i in range(rank):
        if sm[i]:
            b = begin[i] + shape[i] if begin[i] < 0 else begin[i]
            slices.append(slice(b, b + 1, 1))
        else:
            slices.append(slice(None if bm[i] else begin[i], None if em[i] else end[i], stride[i]))
    return tuple(slices), [i for i in range(rank) if sm[i]]


@op("slice_by_index")
def _slice_by_index(x, begin, end, stride=None, begin_mask=None, end_mask=None, squeeze_mask=None):
    slices, squeeze = _index_slices(x.shape, begin, end, stride, begin_mask, end_mask, squeeze_mask)
    out = x[slices]
    return np.squeeze(out, axis=tuple(squeeze)) if squeeze else out


@op("slice_by_size")
def _slice_by_size(x, begin, size):
    slices = []
    for b, s, d in zip(_ints(begin), _ints(size), x.shape):
        b = b + d if b < 0 else b
        slices.append(slice(b, d if s == -1 else b + s))
    return x[tuple(slices)]


@op("slice_update")
def _slice_update(x, update, begin, end, stride=None, begin_mask=None, end_mask=None, squeeze_mask=None):
    slices, _ = _index_slices(x.shape, begin, end, stride, begin_mask, end_mask, squeeze_mask)
    out = np.array(x, copy=True)
    target = out[slices]
    if int(np.prod(target.shape)) != int(np.size(update)):
        raise MILError(f"slice_update: update of shape {np.shape(update)} for a slice of shape {target.shape}")
    out[slices] = np.reshape(update, target.shape)
    return out


@op("gather")
def _gather(x, indices, axis=None, batch_dims=None, validate_indices=None):
    axis = _scalar(axis, 0)
    if _scalar(batch_dims, 0) != 0:
        raise MILError("gather with batch_dims != 0 is not implemented")
    axis = axis + np.ndim(x) if axis < 0 else axis
    idx = np.asarray(indices).astype(np.int64)
    n = x.shape[axis]
    # iOS 17+: negative indices are out of bounds; out-of-bounds behaviour is undefined on device.
    if idx.size and (idx.min() < 0 or idx.max() >= n):
        raise MILError(f"gather index out of range [0, {n}): min {idx.min()}, max {idx.max()}")
    if isinstance(x, CompressedWeight) and axis == 0:
        return x.take_rows(idx)
    return np.take(np.asarray(x), idx, axis=axis)


@op("constexpr_blockwise_shift_scale")
def _blockwise_shift_scale(data, scale, offset=None):
    """output = scale * (data - offset), scale and offset repeated over blocks of data.shape / scale.shape."""
    data = np.asarray(data).astype(np.float32)
    for axis, (d, s) in enumerate(zip(data.shape, np.shape(scale))):
        if d % s:
            raise MILError(f"constexpr_blockwise_shift_scale: axis {axis} of size {d} is not divisible into {s}")
        if d // s > 1:
            scale = np.repeat(scale, d // s, axis)
            if offset is not None:
                offset = np.repeat(offset, d // s, axis)
    if offset is not None:
        data = data - offset
    return scale * data


@op("constexpr_lut_to_dense")
def _lut_to_dense(indices, lut, vector_axis=None):
    """iOS 18: lut [*blocks, palettes, vector]; each block of indices looks up its own table."""
    indices = np.asarray(indices).astype(np.int64)
    rank = indices.ndim
    lut = np.asarray(lut)
    if lut.ndim != rank + 2:
        raise MILError(f"constexpr_lut_to_dense: lut rank {lut.ndim} for indices of rank {rank}")
    vector = lut.shape[-1]
    # Table coordinates of every element: its index divided by the block size on each axis.
    grids = np.meshgrid(*[np.arange(d) // (d // lut.shape[a]) for a, d in enumerate(indices.shape)],
                        indexing="ij")
    values = lut[(*grids, indices)]  # [*indices.shape, vector]
    if vector == 1:
        return values[..., 0]
    axis = _scalar(vector_axis)
    axis = axis + rank if axis < 0 else axis
    values = np.moveaxis(values, -1, axis + 1)  # the vector follows its index along vector_axis
    shape = list(indices.shape)
    shape[axis] *= vector
    return values.reshape(shape)


def _per_axis(param: Any, rank: int, axis: Any) -> np.ndarray:
    """A scalar or a vector along `axis` (iOS 17 quantize/dequantize), shaped to broadcast over rank."""
    param = np.asarray(param)
    if param.ndim == 0:
        return param
    axis = _scalar(axis)
    if axis is None:
        raise MILError("quantize/dequantize: a vector scale or zero_point needs an axis")
    axis = axis + rank if axis < 0 else axis
    shape = [1] * rank
    shape[axis] = param.size
    return param.reshape(shape)


@op("quantize")
def _quantize(input, scale, output_dtype, zero_point=None, axis=None, input_dtype=np.float32):
    """iOS 17: clip(round(input / scale) + zero_point) in int8/uint8; round half to even (np.around), as
    coremltools' definition (`quantize_by_scale_and_zp`). The division is rounded to the source dtype
    first (an fp16 program divides in fp16), then rounded to an integer."""
    dtype = _DTYPES.get(_scalar(output_dtype))
    if dtype not in (np.int8, np.uint8):
        raise MILError(f"quantize to {_scalar(output_dtype)!r}; expected int8 or uint8")
    rank = np.ndim(input)
    q = (np.asarray(input, np.float32) / _per_axis(scale, rank, axis).astype(np.float32)).astype(input_dtype)
    q = np.around(q).astype(np.float32)
    if zero_point is not None:
        q = q + _per_axis(zero_point, rank, axis).astype(np.float32)
    info = np.iinfo(dtype)
    return np.clip(q, info.min, info.max).astype(dtype)


@op("dequantize")
def _dequantize(input, scale, zero_point=None, axis=None):
    """iOS 17: scale * (input - zero_point), computed in float32, rounded once to the scale's dtype."""
    rank = np.ndim(input)
    x = np.asarray(input).astype(np.float32)
    if zero_point is not None:
        x = x - _per_axis(zero_point, rank, axis).astype(np.float32)
    return x * _per_axis(scale, rank, axis).astype(np.float32)


# Programs ----------------------------------------------------------------------------------------
class Program:
    """The functions of one ML program, with their constants loaded."""

    def __init__(self, spec: Any, weights_dir: str | Path | None):
        from coremltools.converters.mil.frontend.milproto.load import TranscriptionContext, _load_value

        if spec.WhichOneof("Type") != "mlProgram":
            raise MILError(f"Not an ML program: the model is a {spec.WhichOneof('Type')!r}")
        self.spec = spec
        context = TranscriptionContext(str(weights_dir) if weights_dir else "")

        blobs: dict[tuple[str, int], Any] = {}  # functions share weight.bin's blobs: each is read once
        compressed: dict[int, CompressedWeight] = {}  # by id of the data array

        def load_value(v: Any) -> Any:
            key = None
            if v.WhichOneof("value") == "blobFileValue":
                key = (v.blobFileValue.fileName, int(v.blobFileValue.offset))
                if key in blobs:
                    return blobs[key]
            value = _load_value(context, v)
            value = value if isinstance(value, str) else np.asarray(value)
            if key is not None:
                blobs[key] = value
            return value

        def constexpr(op_: Op, consts: dict[str, Any]) -> dict[str, Any]:
            """A large blockwise-quantised weight stays compressed (one object for every function)."""
            if op_.type == "constexpr_blockwise_shift_scale":
                args = {p: (consts.get(b[0][1]) if b[0][0] == "var" else b[0][1]) for p, b in op_.inputs.items()}
                data = args.get("data")
                if data is not None and data.size >= COMPRESSED_MIN_ELEMENTS and all(
                        v is not None for p, v in args.items() if p != "offset"):
                    seen = compressed.get(id(data))
                    if seen is None or not np.array_equal(seen.scale, args["scale"]):
                        seen = CompressedWeight(data, args["scale"], args.get("offset"), op_.outputs[0][1].dtype)
                        compressed[id(data)] = seen
                    return {op_.outputs[0][0]: seen}
            return self._execute(op_, consts, {})

        self.functions: dict[str, Function] = {}
        for fname, fspec in spec.mlProgram.functions.items():
            block = fspec.block_specializations[fspec.opset]
            inputs = {i.name: _tensor_type(i.type) for i in fspec.inputs}
            ops: list[Op] = []
            consts: dict[str, np.ndarray] = {}
            var_types: dict[str, TensorType] = dict(inputs)
            constexpr_types: set[str] = set()
            for o in block.operations:
                if o.blocks:
                    raise MILError(f"op {o.type} has nested blocks (control flow is not implemented)")
                args: dict[str, Any] = {}
                for param, arg in o.inputs.items():
                    bound = [("var", b.name) if b.WhichOneof("binding") == "name" else ("val", load_value(b.value))
                             for b in arg.arguments]
                    args[param] = bound
                outputs = [(out.name, _tensor_type(out.type)) for out in o.outputs]
                var_types.update(outputs)
                name = load_value(o.attributes["name"]) if "name" in o.attributes else o.type
                if o.type == "const":
                    value = load_value(o.attributes["val"])
                    consts[outputs[0][0]] = value if isinstance(value, str) else _round(value, outputs[0][1])
                    continue
                op_ = Op(o.type, str(name), args, outputs)
                if o.type.startswith("constexpr_"):
                    # Constant-only: evaluated once here, as Core ML decompresses at load time.
                    consts.update(constexpr(op_, consts))
                    constexpr_types.add(o.type)
                    continue
                ops.append(op_)
            self.functions[fname] = Function(fname, inputs, ops, list(block.outputs), consts, constexpr_types,
                                             var_types)

    @classmethod
    def load(cls, path: str | Path) -> Program:
        """Reads an .mlpackage (or an .mlmodel without external weights)."""
        import coremltools as ct
        from coremltools.models.utils import _try_get_weights_dir_path

        path = str(path)
        spec = ct.utils.load_spec(path)
        return cls(spec, _try_get_weights_dir_path(path))

    @property
    def default_function(self) -> str:
        name = self.spec.description.defaultFunctionName
        return name or next(iter(self.functions))

    def op_types(self, function: str | None = None) -> set[str]:
        """Op types of one function (or all), constexpr_* included; const excluded."""
        fns = [self.functions[function]] if function else self.functions.values()
        return {o.type for f in fns for o in f.ops} | {t for f in fns for t in f.constexpr_types}

    def new_state(self, function: str | None = None) -> dict[str, np.ndarray]:
        """Zeroed state tensors of a function, in their declared dtypes (shared by functions alike)."""
        f = self.functions[function or self.default_function]
        return {k: np.zeros(t.shape, t.dtype) for k, t in f.states.items()}

    def run(
        self, function: str | None, inputs: Mapping[str, Any], state: dict[str, np.ndarray] | None = None,
        observe: Callable[[str, np.ndarray], None] | None = None,
    ) -> dict[str, np.ndarray]:
        """Runs one function. `state` is updated in place by write_state. Returns outputs by name.

        observe: called with (name, value) for every input and every op result as it is computed
        (activation calibration records ranges with it)."""
        f = self.functions[function or self.default_function]
        env: dict[str, Any] = dict(f.consts)
        state = {} if state is None else state
        for name, t in f.inputs.items():
            if t.is_state:
                if name not in state:
                    raise MILError(f"{f.name}: state {name!r} was not given")
                continue
            if name not in inputs:
                raise MILError(f"{f.name}: input {name!r} was not given; expected {sorted(f.inputs)}")
            value = np.asarray(inputs[name])
            if value.shape != t.shape:
                raise MILError(f"{f.name}: input {name!r} has shape {value.shape}, expected {t.shape}")
            env[name] = _round(value, t)
            if observe is not None:
                observe(name, env[name])
        for o in f.ops:
            results = self._execute(o, env, state, f)
            env.update(results)
            if observe is not None:
                for name, value in results.items():
                    observe(name, value)
        return {k: np.asarray(env[k]) for k in f.outputs}

    def _execute(self, o: Op, env: dict[str, Any], state: dict[str, np.ndarray],
                 f: Function | None = None) -> dict[str, Any]:
        def resolve(binding: tuple[str, Any]) -> Any:
            kind, v = binding
            if kind == "val":
                return v
            try:
                return env[v]
            except KeyError:
                raise MILError(f"{o.type} {o.name!r}: unknown variable {v!r}") from None

        if o.type == "read_state":
            name = o.inputs["input"][0][1]
            return {o.outputs[0][0]: _round(state[name], o.outputs[0][1])}
        if o.type == "write_state":
            name, data = o.inputs["input"][0][1], resolve(o.inputs["data"][0])
            t = f.inputs[name] if f else None
            if t is None or np.shape(data) != t.shape:
                raise MILError(f"write_state {name!r}: data of shape {np.shape(data)} for state {t}")
            state[name][...] = np.asarray(data).astype(t.dtype)
            return {}
        fn = OPS.get(o.type)
        if fn is None:
            raise MILError(f"MIL op {o.type!r} ({o.name}) is not implemented by rgexport's interpreter; "
                           f"implemented: {sorted(OPS)}")
        tuple_inputs = {"values"}  # concat, stack: a variadic tuple of tensors
        kwargs = {p: [resolve(b) for b in bs] if p in tuple_inputs else resolve(bs[0])
                  for p, bs in o.inputs.items()}
        if o.type not in ("linear", "gather"):  # the ops that read a CompressedWeight a slice at a time
            kwargs = {p: np.asarray(v) if isinstance(v, CompressedWeight) else v for p, v in kwargs.items()}
        if o.type == "quantize":  # divides in its source dtype (fp16 in an fp16 program)
            source = o.inputs["input"][0]
            t = f.var_types.get(source[1]) if f is not None and source[0] == "var" else None
            kwargs["input_dtype"] = t.dtype if t is not None and t.is_float else np.float32
        try:
            result = fn(**kwargs)
        except MILError:
            raise
        except Exception as e:  # an argument this implementation does not know is an error, not a skip
            raise MILError(f"{o.type} {o.name!r} failed: {type(e).__name__}: {e}") from e
        results = result if isinstance(result, tuple) else (result,)
        if len(results) != len(o.outputs):
            raise MILError(f"{o.type} {o.name!r}: {len(results)} results for {len(o.outputs)} outputs")
        out = {}
        for (name, t), value in zip(o.outputs, results):
            value = _round(value, t)
            if len(t.shape) != value.ndim or any(d is not None and d != s for d, s in zip(t.shape, value.shape)):
                raise MILError(f"{o.type} {o.name!r}: result of shape {value.shape}, program declares {t.shape}")
            out[name] = value
        return out
