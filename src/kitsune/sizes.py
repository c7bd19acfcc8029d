"""Sizes that may be symbolic, without ever adding a guard.

A graph captured with dynamic shapes (`dynamic=True`, `mark_dynamic`, or
Dynamo's automatic dynamic shapes) carries fake tensors whose sizes and
strides are `SymInt`s. Comparing or converting a `SymInt` (`==`, `<`,
`int()`) asks the `ShapeEnv` for its value and records a guard: the graph
would then be specialised to the sizes seen, and Dynamo would recompile for
the next size. Kitsune never does that. It reads each size as a plain `int`
or as the sympy expression behind the `SymInt` (`s0`, `768*s1`), and computes
with those: sympy arithmetic is exact, and a comparison that sympy cannot
decide for every value of the symbols is answered "not known" (`known`), so
every decision that depends on it takes its conservative branch.

Symbols are sizes of at least 2 (Dynamo specialises sizes 0 and 1), integer
and positive, as the `ShapeEnv` creates them. The code generators pass each
free symbol of a kernel as an integer argument (`size_text` renders an
expression in C and Python syntax); `hint` gives the size seen when the graph
was captured, for heuristics only (block sizes), never for correctness.
"""
from __future__ import annotations

import contextlib
import contextvars

import sympy
import torch

Size = "int | sympy.Expr"

_HINTS: contextvars.ContextVar[dict] = contextvars.ContextVar("kitsune_size_hints", default={})


def as_size(value):
    """An int, or the sympy expression of a symbolic size (never guards)."""
    if isinstance(value, int):
        return value
    if isinstance(getattr(value, "meta", None), dict) and "val" in value.meta:  # an FX node of a size
        value = value.meta["val"]
    if isinstance(value, torch.SymInt):
        node = value.node
        expr = getattr(node, "expr", None)
        if expr is None:  # a constant SymInt
            return int(node.maybe_as_int())
        if isinstance(expr, sympy.Integer) or getattr(expr, "is_Integer", False):
            return int(expr)
        _remember_hint(node)
        return expr
    if isinstance(value, sympy.Basic):
        return int(value) if value.is_Integer else value
    return int(value)


def _remember_hint(node) -> None:
    """Hints come from the ShapeEnv of the sizes being read (its live table of
    the values seen, {symbol: value})."""
    shape_env = getattr(node, "shape_env", None)
    values = getattr(shape_env, "backed_var_to_val", None)
    if values is None:  # torch before 2.13
        values = getattr(shape_env, "var_to_val", None)
    if values is not None and _HINTS.get() is not values:
        _HINTS.set(values)


def shape_of(val: torch.Tensor) -> tuple:
    return tuple(as_size(s) for s in val.shape)


def strides_of(val: torch.Tensor) -> tuple:
    return tuple(as_size(s) for s in val.stride())


def numel_of(val: torch.Tensor):
    return product(shape_of(val))


def max_offset(val: torch.Tensor):
    """The largest element offset into a tensor of val's layout (an int, or sympy)."""
    return sum(((n - 1) * st for n, st in zip(shape_of(val), strides_of(val))), 0)


def product(sizes):
    total = 1
    for s in sizes:
        total = total * s
    return as_size(total) if isinstance(total, sympy.Basic) else total


def is_dense(val: torch.Tensor) -> bool:
    """`val.is_contiguous()` decided on the sizes' expressions (no guard): true
    where the strides are the row-major ones for every size (dims of size 1
    may have any stride)."""
    expected = 1
    for size, stride in reversed(list(zip(shape_of(val), strides_of(val)))):
        if size != 1 and stride != expected:
            return False
        expected = as_size(expected * size)
    return True


def is_symbolic(value) -> bool:
    return isinstance(value, sympy.Basic) and not value.is_Integer


def known(condition) -> bool:
    """True only where `condition` holds for every value of its symbols."""
    if isinstance(condition, (bool, int)):
        return bool(condition)
    try:
        return bool(condition)
    except TypeError:  # a sympy relation it cannot decide
        return False


def divides(d, n) -> bool:
    """Does d divide n for every value of the symbols?"""
    remainder = n % d
    return known(remainder == 0)


def size_key(value):
    """A sort key that orders ints as before and symbolic sizes after them."""
    return (0, value, "") if isinstance(value, int) else (1, 0, str(value))


def free_symbols(*values) -> set:
    found = set()
    for v in values:
        if isinstance(v, sympy.Basic):
            found |= v.free_symbols
    return found


_ALLOWED = (sympy.Symbol, sympy.Integer, sympy.Add, sympy.Mul, sympy.Pow)


def renderable(value) -> bool:
    """Can `size_text` write it: sums and products of symbols and integers
    (what sizes and strides of dynamic shapes are, short of views that divide)."""
    if not isinstance(value, sympy.Basic):
        return True
    for node in sympy.preorder_traversal(value):
        if not isinstance(node, _ALLOWED):
            return False
        if isinstance(node, sympy.Pow) and not (node.exp.is_Integer and node.exp > 0):
            return False
    return True


def size_text(value) -> str:
    """Source text of a size in C and Python syntax (symbols by name)."""
    if isinstance(value, int):
        return str(value)
    if isinstance(value, sympy.Integer):
        return str(int(value))
    if isinstance(value, sympy.Symbol):
        return value.name
    if isinstance(value, sympy.Add):
        return "(" + " + ".join(size_text(a) for a in value.args) + ")"
    if isinstance(value, sympy.Mul):
        return "(" + " * ".join(size_text(a) for a in value.args) + ")"
    if isinstance(value, sympy.Pow) and value.exp.is_Integer and value.exp > 0:
        return "(" + " * ".join([size_text(value.base)] * int(value.exp)) + ")"
    raise ValueError(f"size {value} has no source form")


def hint(value) -> int:
    """The value a size had when its graph was captured (heuristics only)."""
    if isinstance(value, int):
        return value
    hints = _HINTS.get()
    try:
        return int(value.xreplace({s: hints.get(s, 64) for s in value.free_symbols}))
    except (TypeError, ValueError):
        return 64


def evaluate(value, bindings: dict) -> int:
    """A size's value for symbols bound to ints ({symbol name: value})."""
    if isinstance(value, int):
        return value
    return int(value.xreplace({s: bindings[s.name] for s in value.free_symbols}))


def compile_sizes(values, names: tuple[str, ...]):
    """A Python function of the symbols' values (in `names` order) returning
    `values` (a nested tuple of sizes) as ints: run once per call, so it is
    generated source, not sympy."""
    def text(v):
        if isinstance(v, (tuple, list)):
            inner = ", ".join(text(x) for x in v)
            return f"({inner},)" if v else "()"
        return size_text(v)
    source = f"lambda {', '.join(names) or '*_'}: {text(values)}"
    return eval(source, {"__builtins__": {}})  # noqa: S307 - our own rendering of sympy sums and products


@contextlib.contextmanager
def hints_from(values):
    """Size hints from the fake tensors (or SymInts) in `values`, for the block
    (and none from an earlier graph after it)."""
    token = _HINTS.set({})
    try:
        for v in values:
            sizes = (*v.shape, *v.stride()) if isinstance(v, torch.Tensor) else (v,)
            for s in sizes:
                if isinstance(s, torch.SymInt):
                    _remember_hint(s.node)
        yield
    finally:
        _HINTS.reset(token)


__all__ = ["as_size", "compile_sizes", "divides", "evaluate", "free_symbols", "hint", "hints_from",
           "is_symbolic", "known", "numel_of", "product", "renderable", "shape_of", "size_key", "size_text",
           "strides_of"]

