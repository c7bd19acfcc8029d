"""Scalar expressions: the vocabulary that op formulas are written in.

Every op in the op table (`kitsune.ir.ops`) describes its per-element work as a
formula over `Value`s. A `Value` is an immutable expression node: a primitive
name from `PRIMITIVES`, its arguments and the *logical* dtype of its result.
Each code generator (Triton, CPU) implements every primitive once; no op's
semantics is written twice.

Numerics contract that every backend follows:
- float16/bfloat16 values are computed in float32 registers ("opmath", as
  eager PyTorch does inside one kernel). Only `cast` to a low-precision dtype
  rounds, and so does storing to a low-precision output.
- integer arithmetic wraps around (two's complement), as eager does.
- `maximum`/`minimum` propagate NaN; `where` selects; comparisons give bool.
"""
from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any

import torch

FLOAT_DTYPES = (torch.float16, torch.bfloat16, torch.float32, torch.float64)
INT_DTYPES = (torch.int32, torch.int64)
SUPPORTED_DTYPES = FLOAT_DTYPES + INT_DTYPES + (torch.bool,)

# name -> number of Value arguments. `load`, `const` and `cast` carry an attr.
PRIMITIVES: dict[str, int] = {
    # leaves
    "load": 0,       # attr: (input slot: int, index: kitsune.ir.index.Index)
    # a gather's read, in a reduction kernel: the element `index` addresses at
    # position args[0] (an integer, one per row) of the row, i.e. at
    # x = row * R + position; 0 where the position is outside [0, R)
    "load_at": 1,    # attr: (input slot, index) as for load
    # a read at a computed place (cat, pad, embedding, index): the element at
    # index(x) + args[0] (an int64 offset, in elements) where args[1] (bool)
    # holds, 0 elsewhere (nothing is read there)
    "load_where": 2,  # attr: (input slot, index, extent: the input's largest offset + 1)
    "index": 0,      # attr: Index; its value as int64 (a coordinate, for gather/scatter)
    # args[0] (an int64 position) if 0 <= it < attr (a size), else 0; where
    # args[1] (bool: this element is live) holds, a position out of range is
    # an error, as eager's "index out of range" (C: the error flag; Triton: a
    # device assert)
    "check_index": 2,
    "const": 0,      # attr: Python bool/int/float (may be inf/nan)
    "cast": 1,       # convert to self.dtype; to float16/bfloat16 this rounds
    # arithmetic (operands and result share one dtype)
    "add": 2, "sub": 2, "mul": 2,
    "truediv": 2,    # floats only
    "truncdiv": 2,   # integers only: C division, rounds toward zero
    "fmod": 2,       # C fmod / C integer %: sign of the dividend
    "neg": 1, "abs": 1,
    "maximum": 2, "minimum": 2,  # NaN-propagating
    "pow": 2,        # floats only
    # float math (operand and result share one float dtype)
    "exp": 1, "exp2": 1, "expm1": 1, "log": 1, "log1p": 1, "log2": 1,
    "sqrt": 1, "rsqrt": 1, "tanh": 1, "sigmoid": 1,
    "erf": 1, "erfc": 1, "erfinv": 1, "sin": 1, "cos": 1,
    "atan2": 2, "hypot": 2,
    "floor": 1, "ceil": 1, "trunc": 1,
    "round": 1,      # half to even (rint / nearbyint)
    "isnan": 1,      # -> bool
    # comparisons (operands share a dtype, result bool)
    "eq": 2, "ne": 2, "lt": 2, "le": 2, "gt": 2, "ge": 2,
    # selection: where(cond: bool, a, b) with a, b and result of one dtype
    "where": 3,
    # bitwise on integers and bools (logical ops are these on bools)
    "bitwise_and": 2, "bitwise_or": 2, "bitwise_xor": 2, "bitwise_not": 1,
    "lshift": 2, "rshift": 2,  # integers; shift >= bit width: 0 / sign fill
    # reduction over the kernel's reduction variable r: attr is one of
    # REDUCTIONS. Its operand varies along r; its result is one value per row.
    "reduce": 1,
}

# sum/prod accumulate in the operand dtype (the lowering casts low-precision
# operands to float32 first, as eager does); max/min propagate NaN;
# any/all take and give bool.
REDUCTIONS = ("sum", "prod", "max", "min", "any", "all")


@dataclass(frozen=True, eq=True)
class Value:
    """One node of a scalar expression DAG (structural equality and hash)."""

    op: str
    args: tuple["Value", ...]
    dtype: torch.dtype
    attr: Any = None
    _hash: int = field(default=0, compare=False, repr=False)

    def __post_init__(self):
        if self.op not in PRIMITIVES:
            raise ValueError(f"unknown scalar primitive {self.op!r}")
        object.__setattr__(self, "_hash", hash((self.op, self.args, self.dtype, _attr_key(self.attr))))

    def __hash__(self):
        return self._hash

    def __ne__(self, other):
        return not self.__eq__(other)

    def __bool__(self):
        raise TypeError("a scalar Value has no truth value at compile time; use where()")

    def __eq__(self, other):
        # Structural equality (dict keys). Comparing with a number is a formula
        # bug: elementwise comparisons are call("eq"/"ne", ...).
        if not isinstance(other, Value):
            raise TypeError("Value == number is not elementwise; use call('eq'|'ne', a, b) in formulas")
        return (
            self._hash == other._hash
            and self.op == other.op
            and self.dtype == other.dtype
            and _attr_key(self.attr) == _attr_key(other.attr)
            and self.args == other.args
        )

    # Operators make formulas read like math; Python numbers become constants
    # of the other operand's dtype.
    def __add__(self, o): return call("add", self, o)
    def __radd__(self, o): return call("add", o, self)
    def __sub__(self, o): return call("sub", self, o)
    def __rsub__(self, o): return call("sub", o, self)
    def __mul__(self, o): return call("mul", self, o)
    def __rmul__(self, o): return call("mul", o, self)
    def __truediv__(self, o): return call("truediv", self, o)
    def __rtruediv__(self, o): return call("truediv", o, self)
    def __neg__(self): return call("neg", self)
    def __and__(self, o): return call("bitwise_and", self, o)
    def __or__(self, o): return call("bitwise_or", self, o)
    def __xor__(self, o): return call("bitwise_xor", self, o)
    def __invert__(self): return call("bitwise_not", self)
    def __lt__(self, o): return call("lt", self, o)
    def __le__(self, o): return call("le", self, o)
    def __gt__(self, o): return call("gt", self, o)
    def __ge__(self, o): return call("ge", self, o)

    @property
    def is_float(self) -> bool:
        return self.dtype.is_floating_point

    def to(self, dtype: torch.dtype) -> "Value":
        return cast(self, dtype)


def _attr_key(attr):
    # nan != nan, and 0.0 == -0.0: key constants by their repr and type.
    if isinstance(attr, float):
        return ("float", repr(attr))
    return (type(attr).__name__, attr) if isinstance(attr, (bool, int)) else attr


def opmath_dtype(dtype: torch.dtype) -> torch.dtype:
    """The dtype values of `dtype` are computed in: float32 for float16/bfloat16."""
    return torch.float32 if dtype in (torch.float16, torch.bfloat16) else dtype


def const(value, dtype: torch.dtype) -> Value:
    """A constant; `value` may be a symbolic size (a sympy expression, `kitsune.sizes`),
    which the code generators read from the kernel's size arguments."""
    if getattr(value, "free_symbols", None) and dtype != torch.bool:
        return Value("const", (), dtype, value)
    if dtype == torch.bool:
        value = bool(value)
    elif dtype.is_floating_point:
        value = float(value)
    else:
        if isinstance(value, float):
            if not math.isfinite(value):
                raise ValueError(f"non-finite constant {value} for integer dtype {dtype}")
            value = int(value)
        value = _wrap_int(int(value), dtype)
    return Value("const", (), dtype, value)


def _wrap_int(v: int, dtype: torch.dtype) -> int:
    bits = torch.iinfo(dtype).bits
    v &= (1 << bits) - 1
    return v - (1 << bits) if v >= 1 << (bits - 1) else v


def cast(v: Value, dtype: torch.dtype) -> Value:
    if v.dtype == dtype:
        return v
    if v.op == "const":
        return const(v.attr, dtype) if not (dtype.is_floating_point is False and isinstance(v.attr, float)
                                             and not math.isfinite(v.attr)) else Value("cast", (v,), dtype)
    return Value("cast", (v,), dtype)


_BOOL_RESULT = {"eq", "ne", "lt", "le", "gt", "ge", "isnan"}


_BOOL_ARITHMETIC = {"add": "bitwise_or", "mul": "bitwise_and"}


def call(op: str, *args) -> Value:
    """Build `op(*args)`; Python numbers take the dtype of the Value operands."""
    values = [a for a in args if isinstance(a, Value)]
    if not values:
        raise TypeError(f"{op}: at least one operand must be a Value")
    if op == "where":
        cond, a, b = args
        ref = a if isinstance(a, Value) else b
        a = a if isinstance(a, Value) else const(a, ref.dtype)
        b = b if isinstance(b, Value) else const(b, ref.dtype)
        if a.dtype != b.dtype:
            raise TypeError(f"where: branches differ in dtype ({a.dtype}, {b.dtype})")
        return Value("where", (cond, a, b), a.dtype)
    dtype = values[0].dtype
    operands = tuple(a if isinstance(a, Value) else const(a, dtype) for a in args)
    if any(a.dtype != dtype for a in operands):
        raise TypeError(f"{op}: operands differ in dtype {[a.dtype for a in operands]}")
    if len(operands) != PRIMITIVES[op]:
        raise TypeError(f"{op} takes {PRIMITIVES[op]} operands, got {len(operands)}")
    if dtype == torch.bool and op in _BOOL_ARITHMETIC:
        # eager's bool add/mul are or/and; a 1-bit integer add wraps (True + True
        # gave False in Triton 3.9's interpreter)
        op = _BOOL_ARITHMETIC[op]
    return Value(op, operands, torch.bool if op in _BOOL_RESULT else dtype)


def reduce(kind: str, v: Value) -> Value:
    if kind not in REDUCTIONS:
        raise ValueError(f"unknown reduction {kind!r}")
    return Value("reduce", (v,), v.dtype, kind)


def where(cond: Value, a, b) -> Value:
    return call("where", cond, a, b)


def load(slot: int, index, dtype: torch.dtype) -> Value:
    return Value("load", (), dtype, (slot, index))


def load_at(slot: int, index, position: Value, dtype: torch.dtype) -> Value:
    if position.dtype not in INT_DTYPES:
        raise TypeError(f"load_at: position must be an integer, got {position.dtype}")
    return Value("load_at", (position,), dtype, (slot, index))


def load_where(slot: int, index, extent, offset: Value | None = None, mask: Value | None = None,
               dtype: torch.dtype = torch.float32) -> Value:
    """The element at index + offset of input `slot` where `mask` holds, else 0."""
    offset = const(0, torch.int64) if offset is None else offset
    mask = const(True, torch.bool) if mask is None else mask
    if offset.dtype != torch.int64 or mask.dtype != torch.bool:
        raise TypeError(f"load_where: offset must be int64 and mask bool, got {offset.dtype}, {mask.dtype}")
    return Value("load_where", (offset, mask), dtype, (slot, index, extent))


def check_index(position: Value, bound, live: Value | None = None) -> Value:
    """`position` (int64), checked to lie in [0, bound) where `live` holds."""
    live = const(True, torch.bool) if live is None else live
    return Value("check_index", (cast(position, torch.int64), live), torch.int64, bound)


def coordinate(index) -> Value:
    """The int64 value of an index expression (e.g. the position along a row)."""
    if index.is_const:
        return const(index.const, torch.int64)
    return Value("index", (), torch.int64, index)


def walk(roots) -> list[Value]:
    """All Values reachable from `roots`, operands before users (a topological order)."""
    order: list[Value] = []
    seen: set[Value] = set()
    stack = [(r, False) for r in reversed(list(roots))]
    while stack:
        v, expanded = stack.pop()
        if expanded:
            order.append(v)
            continue
        if v in seen:
            continue
        seen.add(v)
        stack.append((v, True))
        stack.extend((a, False) for a in reversed(v.args) if a not in seen)
    return order
