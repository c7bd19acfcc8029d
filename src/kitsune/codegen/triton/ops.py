"""The Triton backend's table of scalar primitives: `TRITON_OPS`.

One entry per primitive of `kitsune.ir.scalar.PRIMITIVES` renders one `Value`
as a Triton expression, given the texts of its operands and a `Context` (the
kernel's input pointers, the index variable, the mask, the row length), as
Inductor's `TritonOverrides` and tinygrad's `code_for_op` do. The emitter
(`kitsune.codegen.triton.emit`) names values and lays out the kernel; what a
primitive means in Triton is written here, once.

float16/bfloat16 values live in float32 registers (the numerics contract of
`kitsune.ir.scalar`): a load upcasts them, and only `cast` (and the kernel's
final store) rounds.
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

TL_DTYPE = {
    torch.float16: "tl.float16", torch.bfloat16: "tl.bfloat16", torch.float32: "tl.float32",
    torch.float64: "tl.float64", torch.int32: "tl.int32", torch.int64: "tl.int64", torch.bool: "tl.int1",
}
_LOW = (torch.float16, torch.bfloat16)
_BITS = {torch.int32: 32, torch.int64: 64}

_BINARY = {"add": "+", "sub": "-", "mul": "*", "eq": "==", "ne": "!=", "lt": "<", "le": "<=",
           "gt": ">", "ge": ">=", "bitwise_and": "&", "bitwise_or": "|", "bitwise_xor": "^"}
_LIBM = {"exp": "exp", "exp2": "exp2", "expm1": "expm1", "log": "log", "log1p": "log1p", "log2": "log2",
         "sqrt": "sqrt", "rsqrt": "rsqrt", "tanh": "tanh", "erf": "erf", "erfc": "erfc", "erfinv": "erfinv",
         "sin": "sin", "cos": "cos", "atan2": "atan2", "hypot": "hypot", "pow": "pow", "floor": "floor",
         "ceil": "ceil", "trunc": "trunc", "round": "rint"}

# float32 functions Triton computes with the GPU's fast hardware paths (as
# Inductor does); libdevice serves everything else and all of float64.
_FAST = {"exp", "exp2"}

# Primitives the kernel emitter renders itself rather than through this table,
# and where: a reduction is an accumulator walked over the row (its identity,
# combine and finish are in `kitsune.codegen.triton.emit`), not an expression.
KERNEL_PRIMITIVES = {"reduce": "kitsune.codegen.triton.emit's reduction kernels"}


def compute_dtype(dtype: torch.dtype) -> torch.dtype:
    return torch.float32 if dtype in _LOW else dtype


def literal(value, dtype: torch.dtype) -> str:
    """A constant of `dtype`'s compute type as a Triton expression (a symbolic
    size: from the kernel's size arguments)."""
    cdt = compute_dtype(dtype)
    if is_symbolic(value):
        return f"tl.full([], {size_text(value)}, {TL_DTYPE[cdt]})"
    if cdt == torch.bool:
        return f"tl.full([], {int(bool(value))}, tl.int1)"
    if cdt.is_floating_point:
        if math.isnan(value):
            text = 'float("nan")'
        elif math.isinf(value):
            text = 'float("inf")' if value > 0 else 'float("-inf")'
        elif value == 0 and math.copysign(1.0, value) < 0:
            # Triton makes every constant equal to 0 a +0.0: -0.0 is the sign bit alone
            bits, int_type = (-2**31, "tl.int32") if cdt == torch.float32 else (-2**63, "tl.int64")
            return f"tl.full([], {bits}, {int_type}).to({TL_DTYPE[cdt]}, bitcast=True)"
        else:
            text = repr(float(value))
        return f"tl.full([], {text}, {TL_DTYPE[cdt]})"
    return f"tl.full([], {int(value)}, {TL_DTYPE[cdt]})"


@dataclass(frozen=True)
class Context:
    """Where a Value is rendered: `inputs` names the input pointers by slot,
    `var` is the flat index variable (`x`, or `xrow` for a value that is one
    per row), `mask` the mask of its loads (None: none needed), `rows` the row
    length R of a row kernel (None in a flat pointwise kernel)."""

    inputs: list[str]
    var: str = "x"
    mask: str | None = "xmask"
    rows: int | None = None


Renderer = Callable[[Value, list, Context], str]


def _loaded(text: str, dtype: torch.dtype) -> str:
    """A loaded element in its compute type: bools as comparisons, float16 and bfloat16 upcast."""
    if dtype == torch.bool:
        return f"({text} != 0)"
    return f"{text}.to(tl.float32)" if dtype in _LOW else text


def _load(v: Value, a: list, ctx: Context) -> str:
    slot, index = v.attr
    ptr, idx = ctx.inputs[slot], render_in_kernel(index, ctx.var, ctx.rows)
    mask = ctx.mask
    text = f"tl.load({ptr} + ({idx}))" if index.is_const or mask is None else f"tl.load({ptr} + ({idx}), {mask})"
    return _loaded(text, v.dtype)


def _load_at(v: Value, a: list, ctx: Context) -> str:
    # one read per row at x = xrow + position (a gather); nothing is read
    # where the position is outside the row
    slot, index = v.attr
    at = f"(xrow + {a[0]})"
    inside = f"({a[0]} >= 0) & ({a[0]} < {ctx.rows})"
    mask = inside if ctx.mask is None else f"{ctx.mask} & {inside}"
    return _loaded(f"tl.load({ctx.inputs[slot]} + ({render(index, at)}), {mask}, other=0)", v.dtype)


def _load_where(v: Value, a: list, ctx: Context) -> str:
    # a read at index + offset where the mask holds (cat, pad, embedding): the
    # masked-off lanes read nothing, whatever address they would have had
    slot, index, _ = v.attr
    offset, live = v.args
    address = f"{ctx.inputs[slot]} + ({render_in_kernel(index, ctx.var, ctx.rows)})"
    if not (offset.op == "const" and offset.attr == 0):
        address += f" + {a[0]}"
    masks = [m for m in (ctx.mask, None if live.op == "const" and live.attr else a[1]) if m is not None]
    if not masks:
        return _loaded(f"tl.load({address})", v.dtype)
    if index.is_const and offset.op == "const":
        # one element read where a block mask holds (a one-element piece of a cat):
        # Triton takes a block mask only with a block of pointers
        address += f" + 0 * {ctx.var}"
    return _loaded(f"tl.load({address}, {' & '.join(masks)}, other=0)", v.dtype)


def _check_index(v: Value, a: list, ctx: Context) -> str:
    # a device assert (the kernel is compiled with debug on, as Inductor's are)
    # and a position clamped to 0, so that no read leaves the tensor
    bound = size_text(v.attr) if is_symbolic(v.attr) else str(int(v.attr))
    return f"check_index({a[0]}, {bound}, {a[1]})"


def _cast(v: Value, a: list, ctx: Context) -> str:
    dtype = v.dtype
    if dtype == torch.bool:
        return f"({a[0]} != 0)"
    if dtype == torch.bfloat16:
        return f"round_bf16({a[0]}.to(tl.float32))"
    if dtype == torch.float16:
        return f"{a[0]}.to(tl.float16).to(tl.float32)"
    return f"{a[0]}.to({TL_DTYPE[dtype]})"


def _infix(symbol: str) -> Renderer:
    return lambda v, a, ctx: f"{a[0]} {symbol} {a[1]}"


def _truediv(v: Value, a: list, ctx: Context) -> str:
    return f"libm.div_rn({a[0]}, {a[1]})" if compute_dtype(v.dtype) == torch.float32 else f"{a[0]} / {a[1]}"


def _fmod(v: Value, a: list, ctx: Context) -> str:
    return f"libm.fmod({a[0]}, {a[1]})" if v.dtype.is_floating_point else f"{a[0]} % {a[1]}"


def _neg(v: Value, a: list, ctx: Context) -> str:
    # Triton's unary minus is 0 - x, which gives +0.0 for x = +0.0; eager gives -0.0
    return f"({a[0]} * -1.0)" if v.dtype.is_floating_point else f"-{a[0]}"


def _extremum(cmp: str) -> Renderer:
    def render_extremum(v: Value, a: list, ctx: Context) -> str:
        if v.dtype.is_floating_point:
            # NaN propagates: a NaN first operand is picked by `!=`, a NaN
            # second one because every comparison with it is false
            return f"tl.where(({a[0]} {cmp} {a[1]}) | ({a[0]} != {a[0]}), {a[0]}, {a[1]})"
        return f"tl.where({a[0]} {cmp} {a[1]}, {a[0]}, {a[1]})"
    return render_extremum


def _sigmoid(v: Value, a: list, ctx: Context) -> str:
    return f"tl.sigmoid({a[0]})" if compute_dtype(v.dtype) == torch.float32 else f"1.0 / (1.0 + libm.exp(-{a[0]}))"


def _libm(op: str) -> Renderer:
    """libdevice's function for `op`; the fast hardware path for float32 `_FAST` ones."""
    def render_libm(v: Value, a: list, ctx: Context) -> str:
        if op in _FAST and compute_dtype(v.dtype) == torch.float32:
            return f"tl.{op}({a[0]})"
        return f"libm.{_LIBM[op]}({', '.join(a)})"
    return render_libm


def _bitwise_not(v: Value, a: list, ctx: Context) -> str:
    return f"{a[0]} == 0" if v.dtype == torch.bool else f"~{a[0]}"


def _shift(v: Value, a: list, ctx: Context) -> str:
    # a shift by the bit width or more gives 0 (left) or the sign fill (right),
    # as eager does; in Triton, as in C, such a shift is undefined
    bits = _BITS.get(v.dtype)
    if bits is None:
        raise KernelError(f"shift of {v.dtype} is not supported")
    out_of_range = f"(({a[1]} < 0) | ({a[1]} >= {bits}))"
    if v.op == "lshift":
        return f"tl.where({out_of_range}, 0, {a[0]} << tl.where({out_of_range}, 0, {a[1]}))"
    return f"{a[0]} >> tl.where({out_of_range}, {bits - 1}, {a[1]})"


TRITON_OPS: dict[str, Renderer] = {
    # leaves
    "load": _load,
    "load_at": _load_at,
    "load_where": _load_where,
    "check_index": _check_index,
    "const": lambda v, a, ctx: literal(v.attr, v.dtype),
    "index": lambda v, a, ctx: f"({render_in_kernel(v.attr, ctx.var, ctx.rows)}).to(tl.int64)",
    "cast": _cast,
    # arithmetic
    **{op: _infix(symbol) for op, symbol in _BINARY.items()},
    "truediv": _truediv,
    "truncdiv": _infix("//"),
    "fmod": _fmod,
    "neg": _neg,
    "abs": lambda v, a, ctx: f"tl.abs({a[0]})",
    "maximum": _extremum(">"),
    "minimum": _extremum("<"),
    "sigmoid": _sigmoid,
    **{op: _libm(op) for op in _LIBM},
    "isnan": lambda v, a, ctx: f"{a[0]} != {a[0]}",
    "where": lambda v, a, ctx: f"tl.where({a[0]}, {a[1]}, {a[2]})",
    "bitwise_not": _bitwise_not,
    "lshift": _shift,
    "rshift": _shift,
}
