"""Every scalar primitive is in every backend's table, and every table renders it.

`kitsune.ir.scalar.PRIMITIVES` is the one list of primitives; each backend has
one table of them (`TRITON_OPS`, `C_OPS`, the reference's `TORCH_OPS`) plus a
documented few it evaluates elsewhere (the kernel emitters' reductions, the
reference's leaves). A primitive added to the IR without a rendering in some
backend, or a table row for a primitive that no longer exists, fails here
rather than in a generated kernel.
"""
from __future__ import annotations

import ast

import pytest
import torch

from kitsune.codegen import reference
from kitsune.codegen.cpu import ops as c_ops
from kitsune.codegen.triton import ops as triton_ops
from kitsune.ir import scalar
from kitsune.ir.index import Index

TABLES = {
    "triton": (triton_ops.TRITON_OPS, triton_ops.KERNEL_PRIMITIVES),
    "c": (c_ops.C_OPS, c_ops.KERNEL_PRIMITIVES),
    "reference": (reference.TORCH_OPS, reference.SPECIAL_PRIMITIVES),
}

# which operand dtypes each primitive is defined on (see PRIMITIVES' comments)
FLOAT_ONLY = {"truediv", "pow", "exp", "exp2", "expm1", "log", "log1p", "log2", "sqrt", "rsqrt", "tanh",
              "sigmoid", "erf", "erfc", "erfinv", "sin", "cos", "atan2", "hypot", "floor", "ceil", "trunc",
              "round", "isnan"}
INT_ONLY = {"truncdiv", "lshift", "rshift", "bitwise_and", "bitwise_or", "bitwise_xor", "bitwise_not"}
BOOL_RESULT = {"eq", "ne", "lt", "le", "gt", "ge", "isnan"}
DTYPES = (torch.float32, torch.bfloat16, torch.float64, torch.int32, torch.int64)


@pytest.mark.parametrize("backend", sorted(TABLES))
def test_every_primitive_has_one_rendering(backend):
    table, elsewhere = TABLES[backend]
    covered = set(table) | set(elsewhere)
    missing = sorted(set(scalar.PRIMITIVES) - covered)
    unknown = sorted(covered - set(scalar.PRIMITIVES))
    assert not missing, f"{backend}: primitives without a rendering: {missing}"
    assert not unknown, f"{backend}: table entries that are not primitives: {unknown}"
    both = sorted(set(table) & set(elsewhere))
    assert not both, f"{backend}: primitives both in the table and rendered elsewhere: {both}"


def _applies(op: str, dtype: torch.dtype) -> bool:
    if op in FLOAT_ONLY:
        return dtype.is_floating_point
    if op in INT_ONLY:
        return not dtype.is_floating_point
    return True


def _cases():
    for op in sorted(scalar.PRIMITIVES):
        if op == "reduce":
            continue  # rendered by the kernel emitters (KERNEL_PRIMITIVES), not as an expression
        for dtype in DTYPES:
            if _applies(op, dtype):
                yield op, dtype


def _value(op: str, dtype: torch.dtype) -> scalar.Value:
    """op on operands of `dtype`: loads from inputs 0, 1, 2 (a bool condition for `where`)."""
    x = Index.var()
    if op == "load":
        return scalar.load(1, x * 2 + 3, dtype)
    if op == "load_at":
        return scalar.load_at(2, x, scalar.load(0, x, torch.int64), dtype)
    if op == "load_where":
        offset = scalar.cast(scalar.load(0, x, torch.int32), torch.int64) * 7
        return scalar.load_where(2, x * 3, 700, offset, scalar.load(1, x, torch.bool), dtype)
    if op == "check_index":
        return scalar.check_index(scalar.load(0, x, torch.int64), 50, scalar.load(1, x, torch.bool))
    if op == "const":
        return scalar.const(-3, dtype)
    if op == "index":
        return scalar.coordinate(x.mod(64))
    if op == "cast":
        source = torch.int32 if dtype.is_floating_point else torch.float32
        return scalar.Value("cast", (scalar.load(0, x, source),), dtype)
    args = [scalar.load(k, x, dtype) for k in range(scalar.PRIMITIVES[op])]
    if op == "where":
        args[0] = scalar.load(0, x, torch.bool)
    return scalar.Value(op, tuple(args), torch.bool if op in BOOL_RESULT else dtype)


OPERANDS = ["va", "vb", "vc"]


@pytest.mark.parametrize("op,dtype", list(_cases()))
def test_triton_renders(op, dtype):
    v = _value(op, dtype)
    text = triton_ops.TRITON_OPS[op](v, OPERANDS[:len(v.args)], triton_ops.Context(["in0", "in1", "in2"], rows=64))
    ast.parse(text, mode="eval")  # Triton source is Python
    assert all(name in text for name in OPERANDS[:len(v.args)]), text


@pytest.mark.parametrize("op,dtype", list(_cases()))
def test_c_renders(op, dtype):
    v = _value(op, dtype)
    text = c_ops.C_OPS[op](v, OPERANDS[:len(v.args)], c_ops.Context(["in0", "in1", "in2"], rows=64))
    assert text.count("(") == text.count(")"), text
    assert all(name in text for name in OPERANDS[:len(v.args)]), text


@pytest.mark.parametrize("op,dtype", [(op, dtype) for op, dtype in _cases() if op in reference.TORCH_OPS])
def test_reference_evaluates(op, dtype):
    v = _value(op, dtype)
    operands = [torch.tensor([1, 2, 3]).to(a.dtype) for a in v.args]
    result = reference.TORCH_OPS[op](*operands)
    assert result.shape == (3,)
    assert result.dtype == (torch.bool if op in BOOL_RESULT else dtype)
