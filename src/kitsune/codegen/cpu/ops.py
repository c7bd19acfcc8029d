"""The CPU backend's table of scalar primitives: `C_OPS`.

One entry per primitive of `kitsune.ir.scalar.PRIMITIVES` renders one `Value`
as a C expression, given the texts of its operands and a `Context` (the
kernel's input arrays, the index variable, the row length), as Inductor's
`CppOverrides` and tinygrad's `code_for_op` do. The emitter
(`kitsune.codegen.cpu.emit`) names values and lays out the loops; what a
primitive means in C is written here, once.

Numerics follow `kitsune.ir.scalar`: float16/bfloat16 computed in float,
integer arithmetic wraps (`-fwrapv`), integer division by zero sets the
kernel's error flag `kitsune_err` (bit 1), and so does a position out of
range (bit 2); the launcher raises, and the group's ops rerun through PyTorch
to give eager's own error. The `kitsune_*` helpers named here are defined in
`kitsune.codegen.cpu.emit`'s PRELUDE and FLOAT_ERF.
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Callable

import torch

from kitsune.codegen.kernel import KernelError
from kitsune.ir.index import render, render_in_kernel
from kitsune.ir.scalar import Value
from kitsune.sizes import is_symbolic, size_text

STORAGE = {
    torch.float16: "_Float16", torch.bfloat16: "uint16_t", torch.float32: "float", torch.float64: "double",
    torch.int32: "int32_t", torch.int64: "int64_t", torch.bool: "bool",
}
COMPUTE = {
    torch.float16: "float", torch.bfloat16: "float", torch.float32: "float", torch.float64: "double",
    torch.int32: "int32_t", torch.int64: "int64_t", torch.bool: "bool",
}
_BITS = {torch.int32: 32, torch.int64: 64}
_UNSIGNED = {torch.int32: "uint32_t", torch.int64: "uint64_t"}

# C math function (double name; the float one adds "f") per primitive.
_LIBM = {"exp": "exp", "exp2": "exp2", "expm1": "expm1", "log": "log", "log1p": "log1p", "log2": "log2",
         "sqrt": "sqrt", "tanh": "tanh", "erf": "erf", "erfc": "erfc", "sin": "sin", "cos": "cos",
         "atan2": "atan2", "hypot": "hypot", "pow": "pow", "floor": "floor", "ceil": "ceil",
         "trunc": "trunc", "round": "nearbyint", "fmod": "fmod"}
_BINARY = {"add": "+", "sub": "-", "mul": "*", "truediv": "/", "eq": "==", "ne": "!=", "lt": "<",
           "le": "<=", "gt": ">", "ge": ">=", "bitwise_and": "&", "bitwise_or": "|", "bitwise_xor": "^"}

# Primitives the kernel emitter renders itself rather than through this table,
# and where: a reduction is an accumulator walked over the row (its identity,
# combine and finish are in `kitsune.codegen.cpu.emit`), not an expression.
KERNEL_PRIMITIVES = {"reduce": "kitsune.codegen.cpu.emit's reduction kernels"}


def _f(dtype: torch.dtype) -> str:
    """C math suffix for the compute type."""
    return "" if dtype == torch.float64 else "f"


def literal(value, dtype: torch.dtype) -> str:
    """A constant of `dtype`'s compute type as C (a symbolic size: from the
    kernel's size arguments)."""
    ctype = COMPUTE[dtype]
    if is_symbolic(value):
        return f"(({ctype}){size_text(value)})"
    if dtype == torch.bool:
        return "true" if value else "false"
    if dtype.is_floating_point:
        if math.isnan(value):
            return f"(({ctype})NAN)"
        if math.isinf(value):
            return f"(({ctype})INFINITY)" if value > 0 else f"(-({ctype})INFINITY)"
        return f"(({ctype}){float(value).hex()})"  # exact; the cast rounds like torch.full
    bits = _BITS[dtype]
    return f"(({ctype})UINT{bits}_C({int(value) & ((1 << bits) - 1):#x}))"


@dataclass(frozen=True)
class Context:
    """Where a Value is rendered: `inputs` names the input arrays by slot, `var`
    is the flat index variable (`x`, or `xrow` for a value that is one per row),
    `rows` the row length R of a row loop (None in a flat loop)."""

    inputs: list[str]
    var: str = "x"
    rows: int | None = None


Renderer = Callable[[Value, list, Context], str]


def _load(v: Value, a: list, ctx: Context) -> str:
    slot, index = v.attr
    ref = f"{ctx.inputs[slot]}[{render_in_kernel(index, ctx.var, ctx.rows, floordiv='/')}]"
    if v.dtype == torch.bfloat16:
        return f"kitsune_bf16_to_f32({ref})"
    return f"(float){ref}" if v.dtype == torch.float16 else ref


def _load_at(v: Value, a: list, ctx: Context) -> str:
    # one read per row at x = xrow + position (a gather); 0 outside the row
    slot, index = v.attr
    ctype = COMPUTE[v.dtype]
    ref = f"{ctx.inputs[slot]}[{render(index, f'(xrow + {a[0]})', floordiv='/')}]"
    if v.dtype == torch.bfloat16:
        ref = f"kitsune_bf16_to_f32({ref})"
    elif v.dtype == torch.float16:
        ref = f"(float){ref}"
    return f"(({a[0]} >= 0 && {a[0]} < {ctx.rows}) ? ({ctype}){ref} : ({ctype})0)"


def _load_where(v: Value, a: list, ctx: Context) -> str:
    # a read at index + offset where the mask holds (cat, pad, embedding);
    # nothing is read where it does not
    slot, index, _ = v.attr
    offset, live = v.args
    at = render_in_kernel(index, ctx.var, ctx.rows, floordiv="/")
    if not (offset.op == "const" and offset.attr == 0):
        at = f"{at} + {a[0]}"
    ref = f"{ctx.inputs[slot]}[{at}]"
    if v.dtype == torch.bfloat16:
        ref = f"kitsune_bf16_to_f32({ref})"
    ctype = COMPUTE[v.dtype]
    if live.op == "const" and live.attr:
        return f"(({ctype}){ref})"
    return f"({a[1]} ? ({ctype}){ref} : ({ctype})0)"


def _check_index(v: Value, a: list, ctx: Context) -> str:
    # a live position out of range sets error bit 2 (eager raises "index out of
    # range"; the launcher raises and the group's ops rerun through PyTorch to
    # give eager's own error); the position becomes 0 so that no read leaves the tensor
    bound = size_text(v.attr) if is_symbolic(v.attr) else str(int(v.attr))
    return (f"(({a[0]} >= 0 && {a[0]} < (int64_t){bound}) ? {a[0]} "
            f": ({a[1]} ? (kitsune_err |= 2, (int64_t)0) : (int64_t)0))")


def _cast(v: Value, a: list, ctx: Context) -> str:
    dtype = v.dtype
    if dtype == torch.bool:
        return f"({a[0]} != 0)"
    if dtype == torch.bfloat16:
        return f"kitsune_round_bf16((float){a[0]})"
    if dtype == torch.float16:
        return f"(float)(_Float16)(float){a[0]}"
    return f"({COMPUTE[dtype]}){a[0]}"


def _binary(op: str) -> Renderer:
    symbol = _BINARY[op]

    def render_binary(v: Value, a: list, ctx: Context) -> str:
        if v.dtype == torch.bool and op in ("bitwise_and", "bitwise_or", "bitwise_xor"):
            return f"(bool)({a[0]} {symbol} {a[1]})"
        return f"({a[0]} {symbol} {a[1]})"
    return render_binary


def _libm(op: str) -> Renderer:
    def render_libm(v: Value, a: list, ctx: Context) -> str:
        if not v.dtype.is_floating_point:
            raise KernelError(f"{op} on {v.dtype} has no C translation")
        return f"{_LIBM[op]}{_f(v.dtype)}({', '.join(a)})"
    return render_libm


def _integer_division(op: str) -> Renderer:
    """truncdiv and fmod: C's / and % on integers, guarded; C's fmod on floats."""
    def render_division(v: Value, a: list, ctx: Context) -> str:
        dtype, ctype = v.dtype, COMPUTE[v.dtype]
        if dtype.is_floating_point:
            if op == "fmod":
                return _libm(op)(v, a, ctx)
            raise KernelError(f"no C translation for primitive {op!r}")
        # C traps on x / 0 and INT_MIN / -1; eager raises on the first, and
        # the second wraps to INT_MIN (quotient) / 0 (remainder).
        quotient = f"(-{a[0]})" if op == "truncdiv" else f"({ctype})0"
        c_op = "/" if op == "truncdiv" else "%"
        return (f"({a[1]} == 0 ? (kitsune_err = 1, ({ctype})0) : {a[1]} == -1 ? {quotient} "
                f": ({a[0]} {c_op} {a[1]}))")
    return render_division


def _abs(v: Value, a: list, ctx: Context) -> str:
    return f"fabs{_f(v.dtype)}({a[0]})" if v.dtype.is_floating_point else f"({a[0]} < 0 ? -{a[0]} : {a[0]})"


def _extremum(cmp: str) -> Renderer:
    def render_extremum(v: Value, a: list, ctx: Context) -> str:
        if v.dtype.is_floating_point:
            # NaN propagates: a NaN first operand is picked by `!=`, a NaN
            # second one because every comparison with it is false
            return f"((({a[0]} {cmp} {a[1]}) | ({a[0]} != {a[0]})) ? {a[0]} : {a[1]})"
        return f"({a[0]} {cmp} {a[1]} ? {a[0]} : {a[1]})"
    return render_extremum


def _erf(v: Value, a: list, ctx: Context) -> str:
    # float: eager's own vectorised erf (FLOAT_ERF), not glibc's erff
    return f"kitsune_erff({a[0]})" if COMPUTE[v.dtype] == "float" else _libm("erf")(v, a, ctx)


def _shift(v: Value, a: list, ctx: Context) -> str:
    # a shift by the bit width or more gives 0 (left) or the sign fill (right),
    # as eager does; in C such a shift is undefined, and so is a left shift of
    # a negative signed value (hence the unsigned one)
    dtype, ctype = v.dtype, COMPUTE[v.dtype]
    bits = _BITS.get(dtype)
    if bits is None:
        raise KernelError(f"shift of {dtype} is not supported")
    out_of_range = f"({a[1]} < 0 || {a[1]} >= {bits})"
    if v.op == "lshift":
        return f"({out_of_range} ? ({ctype})0 : ({ctype})(({_UNSIGNED[dtype]}){a[0]} << {a[1]}))"
    return f"({a[0]} >> ({out_of_range} ? {bits - 1} : {a[1]}))"


C_OPS: dict[str, Renderer] = {
    # leaves
    "load": _load,
    "load_at": _load_at,
    "load_where": _load_where,
    "check_index": _check_index,
    "const": lambda v, a, ctx: literal(v.attr, v.dtype),
    "index": lambda v, a, ctx: f"(int64_t)({render_in_kernel(v.attr, ctx.var, ctx.rows, floordiv='/')})",
    "cast": _cast,
    # arithmetic
    **{op: _binary(op) for op in _BINARY},
    "truncdiv": _integer_division("truncdiv"),
    "fmod": _integer_division("fmod"),
    "neg": lambda v, a, ctx: f"(-{a[0]})",
    "abs": _abs,
    "maximum": _extremum(">"),
    "minimum": _extremum("<"),
    "sigmoid": lambda v, a, ctx: f"(({COMPUTE[v.dtype]})1 / (({COMPUTE[v.dtype]})1 + exp{_f(v.dtype)}(-{a[0]})))",
    "rsqrt": lambda v, a, ctx: f"(({COMPUTE[v.dtype]})1 / sqrt{_f(v.dtype)}({a[0]}))",
    "erfinv": lambda v, a, ctx: f"kitsune_erfinv{_f(v.dtype)}({a[0]})",
    **{op: _libm(op) for op in _LIBM if op != "fmod"},
    "erf": _erf,
    "isnan": lambda v, a, ctx: f"({a[0]} != {a[0]})",
    "where": lambda v, a, ctx: f"({a[0]} ? {a[1]} : {a[2]})",
    "bitwise_not": lambda v, a, ctx: f"(!{a[0]})" if v.dtype == torch.bool else f"(~{a[0]})",
    "lshift": _shift,
    "rshift": _shift,
}
