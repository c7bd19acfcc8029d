"""The op table: for each supported aten op, its kind and its scalar formula.

This is the one place where an op's semantics is written. The planner reads
`kind`; the lowering (`kitsune.codegen.lower`) calls `formula` with the op's
arguments as scalar `Value`s (already converted to the op's compute dtype, see
`compute`) and Python scalars as they appear in the graph. Backends only know
the primitives of `kitsune.ir.scalar`. Anything not in this table is opaque and
runs through PyTorch.

Adding an op = one row here + one row in tests/ir/test_op_table.py.
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from enum import Enum
from typing import Callable

import torch

from kitsune.ir.scalar import Value, call, cast, const, opmath_dtype, where
from kitsune.sizes import is_symbolic, shape_of

aten = torch.ops.aten
prims = torch.ops.prims


class OpKind(str, Enum):
    POINTWISE = "pointwise"
    VIEW = "view"
    REDUCTION = "reduction"
    MATMUL = "matmul"
    CONV = "conv"
    OPAQUE = "opaque"


class NotFusible(Exception):
    """Raised by a formula or check when this use of the op cannot be generated."""


@dataclass(frozen=True)
class OpDef:
    kind: OpKind
    formula: Callable[..., Value] | None = None
    # How tensor arguments are converted before the formula sees them:
    #   "out":     to the result dtype (arithmetic; ints become floats for float math)
    #   "promote": to the promoted dtype of the inputs (comparisons)
    #   "bool":    to bool (logical ops)
    #   "keep":    unchanged
    #   "fill":    no tensor args; the formula gets dtype=<result dtype>
    # Conversions (convert_element_type, _to_copy, clone, copy) are identity
    # formulas under "out": converting to the result dtype *is* their meaning.
    compute: str = "out"
    keep_args: tuple[int, ...] = ()  # positional tensor args passed unconverted (conditions, masks)
    check: Callable[..., str | None] | None = None  # (node) -> reason it cannot fuse, or None
    # Position of an int `dim` argument: the formula then also gets `_coord`,
    # the element's coordinate along that dim (an int64 Value), for scatter.
    coordinate: int | None = None
    # The formula also gets `out=<the node's fake tensor>` (result dtype and
    # device): for ops whose eager semantics depend on more than the compute
    # dtype, or that make constants of the result type from Python scalars.
    wants_out: bool = False
    # compute="indexing": the op moves elements (cat, pad, embedding, ...); its
    # lowering is in `kitsune.codegen.indexing`, not a formula. `indexed`: the
    # positions of tensor args read at positions that are values (an embedding's
    # table): they must come from memory, not from the same kernel.
    indexed: tuple[int, ...] = ()


# -- formulas shared by several rows ------------------------------------------

def _is_float(v: Value) -> bool:
    return v.dtype.is_floating_point


def _values(a, b) -> tuple[Value, Value]:
    """Both operands as Values: a Python number becomes a constant of the other's dtype."""
    if not isinstance(a, Value):
        a = const(a, b.dtype)
    if not isinstance(b, Value):
        b = const(b, a.dtype)
    return a, b


def _floor_divide(a, b) -> Value:
    a, b = _values(a, b)
    if _is_float(a):
        # Eager's div_floor_floating: exact for every representable quotient.
        mod = call("fmod", a, b)
        div = (a - mod) / b
        div = where(_ne(mod, 0) & _ne(b < 0, mod < 0), div - 1, div)
        floordiv = call("floor", div)
        floordiv = where(div - floordiv > 0.5, floordiv + 1, floordiv)
        floordiv = where(_eq(div, 0), _copysign_zero(a / b), floordiv)
        return where(_eq(b, 0), a / b, floordiv)
    q = call("truncdiv", a, b)
    r = call("fmod", a, b)
    return where(_ne(r, 0) & _ne(r < 0, b < 0), q - 1, q)


def _copysign_zero(v: Value) -> Value:
    # 0.0 with the sign of v, as eager's c10::copysign(0, v) for zero quotients.
    # (`v < 0` misses v = -0.0; 1 / v is -inf there.)
    return where(1 / v < 0, const(-0.0, v.dtype), const(0.0, v.dtype))


def _remainder(a, b) -> Value:
    a, b = _values(a, b)
    r = call("fmod", a, b)
    return where(_ne(r, 0) & _ne(r < 0, b < 0), r + b, r)


def _div_mode(a, b, rounding_mode=None) -> Value:
    a, b = _values(a, b)
    if rounding_mode is None:
        return a / b
    if rounding_mode == "trunc":
        return call("trunc", a / b) if _is_float(a) else call("truncdiv", a, b)
    if rounding_mode == "floor":
        return _floor_divide(a, b)
    raise NotFusible(f"unknown rounding_mode {rounding_mode!r}")


def _pow_scalar_exponent(a: Value, exponent, *, out) -> Value:
    if _is_float(a):
        special = {2: lambda: a * a, 3: lambda: a * a * a, 1: lambda: a, 0: lambda: const(1, a.dtype),
                   0.5: lambda: call("sqrt", a), -0.5: lambda: call("rsqrt", a),
                   -1: lambda: 1 / a, -2: lambda: 1 / (a * a)}
        if out.dtype == torch.float16 and out.device.type == "cpu":
            # Eager's CPU kernel computes float16 with std::pow whatever the exponent
            # (sqrt/rsqrt are used for the other float types, and on CUDA): pow(-inf, 0.5)
            # is inf and pow(-0.0, 0.5) is 0.0, where sqrt gives NaN and -0.0. The other
            # shortcuts are exact for float16 inputs computed in float32: they agree with pow.
            del special[0.5], special[-0.5]
        if exponent in special and not isinstance(exponent, bool):
            return special[exponent]()
        return call("pow", a, const(exponent, a.dtype))
    if not (isinstance(exponent, int) and exponent >= 0):
        raise NotFusible("integer pow needs a non-negative integer exponent")
    result, base, e = const(1, a.dtype), a, exponent
    while e:  # square-and-multiply, unrolled at compile time
        if e & 1:
            result = base if result.op == "const" and result.attr == 1 else result * base
        e >>= 1
        if e:
            base = base * base
    return result


def _check_pow_tensor_scalar(node) -> str | None:
    exponent = node.args[1]
    if not node.meta["val"].dtype.is_floating_point and not (isinstance(exponent, int) and exponent >= 0):
        return "integer pow with a negative or non-integer exponent"
    return None


def _check_float_out(node) -> str | None:
    return None if node.meta["val"].dtype.is_floating_point else "integer operands (eager uses exact integer code)"


def _clamp(a: Value, lo=None, hi=None) -> Value:
    # Floats: eager keeps the input on ties (clamp(-0.0, min=0.0) is -0.0) and
    # a NaN bound gives NaN; maximum/minimum would return the bound on ties.
    if lo is not None:
        a = _bound(a, lo, "lt") if _is_float(a) else call("maximum", a, lo)
    if hi is not None:
        a = _bound(a, hi, "gt") if _is_float(a) else call("minimum", a, hi)
    return a


def _bound(a: Value, bound, beyond: str) -> Value:
    b = bound if isinstance(bound, Value) else const(bound, a.dtype)
    return where(call(beyond, a, b) | call("isnan", b), b, a)


def _nan_to_num(a: Value, nan=0.0, posinf=None, neginf=None, *, out) -> Value:
    if not _is_float(a):
        return a
    # The default limits are the result dtype's (float16: +-65504), not those of
    # the float32 that float16 computes in. Every test looks at the input, so a
    # replacement is never replaced again (nan=inf stays inf).
    info = torch.finfo(out.dtype)
    nan = 0.0 if nan is None else nan
    posinf = info.max if posinf is None else posinf
    neginf = info.min if neginf is None else neginf
    return where(_ne(a, a), const(nan, a.dtype),
                 where(_eq(a, math.inf), const(posinf, a.dtype),
                       where(_eq(a, -math.inf), const(neginf, a.dtype), a)))


def _sign(a: Value) -> Value:
    # Eager computes (0 < a) - (a < 0): sign(NaN) is 0 and sign(-0.0) is +0.0.
    if a.dtype == torch.bool:
        return a
    return where(a > 0, const(1, a.dtype), where(a < 0, const(-1, a.dtype), const(0, a.dtype)))


def _where(cond: Value, a, b, *, out) -> Value:
    # Python-scalar branches (where.Scalar has two) become constants of the
    # compute dtype, which the lowering has converted tensor branches to.
    dtype = opmath_dtype(out.dtype)
    return where(cond, a if isinstance(a, Value) else const(a, dtype),
                 b if isinstance(b, Value) else const(b, dtype))


def _shift_check(node) -> str | None:
    return None if node.meta["val"].dtype in (torch.int32, torch.int64) else "shifts are generated for int32/int64"


def _check_same_device(node) -> str | None:
    device = node.kwargs.get("device")
    if device is not None and torch.device(device) != node.args[0].meta["val"].device:
        return "copy to another device"
    return None


def _identity(a, *_, **__) -> Value:
    return a


def _eq(a, b): return call("eq", a, b)
def _ne(a, b): return call("ne", a, b)


def _unary(prim: str):
    return lambda a: call(prim, a)


def _binary(prim: str):
    return lambda a, b: call(prim, a, b)


# -- the table ------------------------------------------------------------------

P = OpKind.POINTWISE
POINTWISE_OPS: dict = {}


def _row(ops, formula, compute="out", check=None, keep_args=(), coordinate=None, wants_out=False, indexed=()):
    for op in ops:
        POINTWISE_OPS[op] = OpDef(P, formula, compute, keep_args, check, coordinate, wants_out=wants_out,
                                  indexed=indexed)


_row([aten.add.Tensor, aten.add.Scalar], lambda a, b, alpha=1: a + (b if alpha == 1 else b * alpha))
_row([aten.sub.Tensor, aten.sub.Scalar], lambda a, b, alpha=1: a - (b if alpha == 1 else b * alpha))
_row([aten.rsub.Tensor, aten.rsub.Scalar], lambda a, b, alpha=1: b - (a if alpha == 1 else a * alpha))
_row([aten.mul.Tensor, aten.mul.Scalar], lambda a, b: a * b)
_row([aten.div.Tensor, aten.div.Scalar], lambda a, b: a / b)
_row([aten.div.Tensor_mode, aten.div.Scalar_mode], _div_mode)
# prims.div: true division for floats, C (truncating) division for integers
_row([prims.div.default], lambda a, b: a / b if _is_float(a) else call("truncdiv", a, b))
_row([aten.floor_divide.default, aten.floor_divide.Scalar], _floor_divide)
_row([aten.remainder.Tensor, aten.remainder.Scalar], _remainder)
_row([aten.fmod.Tensor, aten.fmod.Scalar], _binary("fmod"))
_row([aten.neg.default], lambda a: -a)
_row([aten.abs.default], lambda a: call("abs", a) if a.dtype != torch.bool else a)
_row([aten.sign.default, aten.sgn.default], _sign)
_row([aten.pow.Tensor_Scalar], _pow_scalar_exponent, check=_check_pow_tensor_scalar, wants_out=True)
_row([aten.pow.Tensor_Tensor], _binary("pow"), check=_check_float_out)
_row([aten.pow.Scalar], lambda base, e: call("pow", const(base, e.dtype), e), check=_check_float_out)
for _name in ("exp", "exp2", "expm1", "log", "log1p", "log2", "sqrt", "rsqrt", "sigmoid", "tanh",
              "erf", "erfc", "erfinv", "sin", "cos"):
    _row([getattr(aten, _name).default], _unary(_name))
_row([aten.log10.default], lambda a: call("log", a) * (1 / math.log(10)))
_row([aten.reciprocal.default], lambda a: 1 / a)
_row([aten.atan2.default], _binary("atan2"))
_row([aten.hypot.default], _binary("hypot"))
for _name in ("floor", "ceil", "trunc", "round"):
    _row([getattr(aten, _name).default], lambda a, _p=_name: call(_p, a) if _is_float(a) else a)
_row([aten.frac.default], lambda a: a - call("trunc", a))
_row([aten.relu.default], lambda a: _clamp(a, lo=0))
_row([aten.maximum.default], _binary("maximum"))
_row([aten.minimum.default], _binary("minimum"))
_row([aten.clamp.default, aten.clamp.Tensor], _clamp)
_row([aten.clamp_min.default, aten.clamp_min.Tensor], lambda a, lo: _clamp(a, lo=lo))
_row([aten.clamp_max.default, aten.clamp_max.Tensor], lambda a, hi: _clamp(a, hi=hi))
_row([aten.nan_to_num.default], _nan_to_num, wants_out=True)
_row([aten.where.self, aten.where.ScalarSelf, aten.where.ScalarOther, aten.where.Scalar], _where,
     keep_args=(0,), wants_out=True)
_row([aten.masked_fill.Scalar, aten.masked_fill.Tensor], lambda a, mask, v: where(mask, v, a), keep_args=(1,))
_row([aten.eq.Tensor, aten.eq.Scalar], _eq, compute="promote")
_row([aten.ne.Tensor, aten.ne.Scalar], _ne, compute="promote")
for _name in ("lt", "le", "gt", "ge"):
    _row([getattr(aten, _name).Tensor, getattr(aten, _name).Scalar], _binary(_name), compute="promote")
_row([aten.isnan.default], _unary("isnan"), compute="keep")
_row([aten.isinf.default], lambda a: call("eq", call("abs", a), const(math.inf, a.dtype)) if _is_float(a)
     else const(False, torch.bool), compute="keep")
_row([aten.logical_not.default], lambda a: ~a, compute="bool")
_row([aten.logical_and.default], lambda a, b: a & b, compute="bool")
_row([aten.logical_or.default], lambda a, b: a | b, compute="bool")
_row([aten.logical_xor.default], lambda a, b: a ^ b, compute="bool")
_row([aten.bitwise_and.Tensor, aten.bitwise_and.Scalar], lambda a, b: a & b)
_row([aten.bitwise_or.Tensor, aten.bitwise_or.Scalar], lambda a, b: a | b)
_row([aten.bitwise_xor.Tensor, aten.bitwise_xor.Scalar], lambda a, b: a ^ b)
_row([aten.bitwise_not.default], lambda a: ~a)
_row([aten.bitwise_left_shift.Tensor, aten.bitwise_left_shift.Tensor_Scalar, aten.__lshift__.Scalar,
      aten.__lshift__.Tensor], _binary("lshift"), check=_shift_check)
_row([aten.bitwise_right_shift.Tensor, aten.bitwise_right_shift.Tensor_Scalar, aten.__rshift__.Scalar,
      aten.__rshift__.Tensor], _binary("rshift"), check=_shift_check)
# conversions and copies: the argument arrives converted to the result dtype
_row([prims.convert_element_type.default, aten.clone.default, aten.lift_fresh_copy.default], _identity)
_row([aten._to_copy.default], _identity, check=_check_same_device)
_row([aten.copy.default], lambda dst, src, non_blocking=False: src)
_row([aten.full.default], lambda size, value, dtype, **_: const(value, dtype), compute="fill")
_row([aten.scalar_tensor.default], lambda value, dtype, **_: const(value, dtype), compute="fill")
_row([aten.full_like.default], lambda a, value, dtype, **_: const(value, dtype), compute="fill",
     check=_check_same_device)



def _one_per_row(node, index, dim) -> str | None:
    """gather/scatter fuse when `index` picks one position along `dim` per row."""
    src = node.args[0].meta["val"]
    idx = index.meta["val"] if hasattr(index, "meta") else None
    if idx is None or idx.dim() != src.dim():
        return "index of another rank"
    dim = dim + src.dim() if dim < 0 else dim
    idx_shape, src_shape = shape_of(idx), shape_of(src)
    if idx_shape[dim] != 1 or any(idx_shape[d] != src_shape[d] for d in range(src.dim()) if d != dim):
        return "index with more than one position per row (runs through PyTorch)"
    return None


def _check_scatter(node) -> str | None:
    if node.kwargs.get("reduce") is not None:
        return "scatter with reduce"
    _, dim, index, src = node.args[:4]
    if hasattr(src, "meta") and shape_of(src.meta["val"]) != shape_of(index.meta["val"]):
        return "scatter source of another shape than the index"
    return _one_per_row(node, index, dim)


def _scatter(a: Value, dim, index: Value, src, _coord: Value) -> Value:
    # out[.., r, ..] = src where r == index[.., 0, ..], else self. An index out
    # of range matches no r: the row is left as it was (eager raises).
    return where(call("eq", _coord, cast(index, torch.int64)), src, a)


_row([aten.scatter.value, aten.scatter.src], _scatter, keep_args=(2,), check=_check_scatter, coordinate=1)

# -- ops that move elements (lowered by kitsune.codegen.indexing) --------------

def _val(node) -> torch.Tensor:
    return node.meta["val"]


def norm_dim(dim: int, ndim: int) -> int:
    """A dim argument as eager reads it: negative counts from the end."""
    return dim + ndim if dim < 0 else dim


def arange_arguments(node: "fx.Node") -> tuple:
    """(start, end, step) of an arange node, as eager reads its overloads."""
    if node.target is aten.arange.default:
        return 0, node.args[0], 1
    if node.target is aten.arange.start:
        return node.args[0], node.args[1], 1
    return node.args[0], node.args[1], (node.args[2] if len(node.args) > 2 else node.kwargs.get("step", 1))


def arange_blocker(node: "fx.Node") -> str | None:
    """Why an arange is not generated: a start or step that is no whole number,
    or values beyond what the result dtype holds exactly."""
    start, end, step = arange_arguments(node)
    if any(is_symbolic(v) or not isinstance(v, (int, float)) for v in (start, step)):
        return "arange with a symbolic start or step"
    if any(isinstance(v, float) and not v.is_integer() for v in (start, step)):
        return "arange of fractions (eager's accumulation is not reproduced)"
    dtype = _val(node).dtype
    if dtype.is_floating_point:
        n = shape_of(_val(node))[0]
        if is_symbolic(n):
            return "floating-point arange of a symbolic length"
        largest = max(abs(start), abs(start + step * max(n - 1, 0)))
        if largest > 2 / torch.finfo(dtype).eps:
            return "arange values beyond the exact integers of its dtype"
    return None


def index_blocker(node: "fx.Node") -> str | None:
    """index.Tensor fuses with integer index tensors (bool masks pick a
    data-dependent number of elements)."""
    indices = node.args[1]
    tensors = [t for t in indices if t is not None]
    if not tensors:
        return "index without index tensors"
    for t in tensors:
        if not hasattr(t, "meta") or _val(t) is None:
            return "index with a non-tensor index"
        if _val(t).dtype not in (torch.int32, torch.int64):
            return f"index with {_val(t).dtype} indices (a mask picks a data-dependent count)"
    return None


def embedding_blocker(node: "fx.Node") -> str | None:
    if _val(node.args[0]).dim() != 2:
        return "embedding table of another rank than 2"
    if _val(node.args[1]).dtype not in (torch.int32, torch.int64):
        return "embedding indices of another dtype than int32/int64"
    return None


def index_select_blocker(node: "fx.Node") -> str | None:
    index = _val(node.args[2])
    if index.dtype not in (torch.int32, torch.int64) or index.dim() > 1:
        return "index_select index of another dtype or rank"
    return None


def cat_blocker(node: "fx.Node") -> str | None:
    pieces = node.args[0]
    if len(pieces) > 32:
        return f"cat of {len(pieces)} tensors (a select per piece per element)"
    return None


def pad_blocker(node: "fx.Node") -> str | None:
    if any(is_symbolic(p) for p in node.args[1]):
        return "pad by a symbolic amount"
    return None


def scatter_blocker(node: "fx.Node") -> str | None:
    args = list(node.args[2:]) + list(node.kwargs.values())
    if any(hasattr(a, "meta") or is_symbolic(a) for a in args if a is not None):
        return f"{op_name(node.target)} at a symbolic position"
    out = _val(node)
    dim = norm_dim(node.args[2] if len(node.args) > 2 else node.kwargs.get("dim", 0), out.dim())
    if is_symbolic(shape_of(out)[dim]):
        return f"{op_name(node.target)} along a symbolic dimension"
    if _val(node.args[1]).dtype != out.dtype:
        return "scatter of another dtype"
    return None


_row([aten.cat.default], None, compute="indexing", check=cat_blocker)
_row([aten.constant_pad_nd.default], None, compute="indexing", check=pad_blocker)
_row([aten.slice_scatter.default, aten.select_scatter.default], None, compute="indexing", check=scatter_blocker)
_row([aten.arange.default, aten.arange.start, aten.arange.start_step], None, compute="indexing",
     check=arange_blocker)
_row([aten.embedding.default], None, compute="indexing", check=embedding_blocker, indexed=(0,))
_row([aten.index.Tensor], None, compute="indexing", check=index_blocker, indexed=(0,))
_row([aten.index_select.default], None, compute="indexing", check=index_select_blocker, indexed=(0,))


VIEW_OPS = {
    aten.view.default, aten._unsafe_view.default, aten.reshape.default, aten.expand.default,
    aten.permute.default, aten.transpose.int, aten.t.default, aten.unsqueeze.default,
    aten.squeeze.dim, aten.squeeze.dims, aten.squeeze.default, aten.slice.Tensor, aten.select.int,
    aten.alias.default, prims.broadcast_in_dim.default,
}


@dataclass(frozen=True)
class ReductionDef:
    """A reduction over some dims of its first argument.

    `combine` names the scalar reduction primitive (`kitsune.ir.scalar.REDUCTIONS`);
    `mean` divides the sum by the number of reduced elements afterwards."""
    combine: str
    mean: bool = False
    check: Callable[..., str | None] | None = None  # (node) -> reason it cannot fuse, or None


def _check_gather(node) -> str | None:
    if not node.meta["val"].dtype.is_floating_point:
        return "gather of integers (runs through PyTorch)"
    return _one_per_row(node, node.args[2], node.args[1])


def _check_arg_reduction(node) -> str | None:
    dtype = node.args[0].meta["val"].dtype
    if dtype == torch.bool or dtype.is_complex:
        return f"{op_name(node.target)} of {dtype} (runs through PyTorch)"
    return None


# aten reductions as the decompositions leave them (softmax, log_softmax,
# layer/group/batch norm, var/std, logsumexp all decompose into these).
REDUCTION_OPS: dict = {
    aten.sum.dim_IntList: ReductionDef("sum"), aten.sum.default: ReductionDef("sum"),
    aten.mean.dim: ReductionDef("sum", mean=True), aten.mean.default: ReductionDef("sum", mean=True),
    aten.amax.default: ReductionDef("max"), aten.amin.default: ReductionDef("min"),
    aten.prod.dim_int: ReductionDef("prod"), aten.prod.default: ReductionDef("prod"),
    aten.any.dim: ReductionDef("any"), aten.any.dims: ReductionDef("any"), aten.any.default: ReductionDef("any"),
    aten.all.dim: ReductionDef("all"), aten.all.default: ReductionDef("all"),
    # what the var_mean / layer_norm decompositions produce
    prims.sum.default: ReductionDef("sum"), prims.var.default: ReductionDef("var"),
    # one element per row (cross-entropy's target logit): a masked sum along
    # the row, so it fuses with the row's other reductions
    aten.gather.default: ReductionDef("gather", check=_check_gather),
    # the first position of the (NaN-propagating) maximum / minimum: two
    # reductions of the same row (see GroupLowering._apply_reduction)
    aten.argmax.default: ReductionDef("argmax", check=_check_arg_reduction),
    aten.argmin.default: ReductionDef("argmin", check=_check_arg_reduction),
}


def reduction_signature(node) -> tuple[list[int], bool]:
    """(normalised reduced dims, keepdim) of a reduction node; an empty dim list means all dims."""
    ndim = node.args[0].meta["val"].dim()
    target = node.target
    args = list(node.args[1:])
    dims = None
    keepdim = bool(node.kwargs.get("keepdim", False))
    if target in (aten.sum.default, aten.mean.default, aten.prod.default, aten.any.default, aten.all.default):
        dims = []
    elif target in (prims.sum.default, prims.var.default):
        dims, keepdim = list(args[0]), False
    elif target is aten.gather.default:
        dims, keepdim = [args[0]], True
    elif target in (aten.prod.dim_int, aten.any.dim, aten.all.dim):
        dims = [args[0]] if args else []
        keepdim = bool(args[1]) if len(args) > 1 else keepdim
    else:
        dims = args[0] if args else node.kwargs.get("dim", [])
        dims = [dims] if isinstance(dims, int) else list(dims or [])
        keepdim = bool(args[1]) if len(args) > 1 else keepdim
    if not dims or ndim == 0:  # a 0-dim tensor's dim 0 (or -1) is the tensor itself: one element
        dims = list(range(ndim))
    return sorted({d + ndim if d < 0 else d for d in dims}), keepdim


def op_kind(target) -> OpKind:
    if target in POINTWISE_OPS:
        return OpKind.POINTWISE
    if target in REDUCTION_OPS:
        return OpKind.REDUCTION
    if target in VIEW_OPS:
        return OpKind.VIEW
    return OpKind.OPAQUE


def op_name(target) -> str:
    return str(getattr(target, "__name__", target)).replace(".default", "")
