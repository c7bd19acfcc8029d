"""Every row of the op table (`kitsune.ir.ops.POINTWISE_OPS`) against eager PyTorch,
through each code generator ("triton": generated Triton kernels in Triton's
interpreter; "cpu": generated C kernels).

How one test works (one test = one op case x one dtype x one backend):

* Inputs come from value pools with the awkward values: NaN, +-Inf, -0.0, 0,
  subnormals, large values, integer extremes (wrap-around), shift amounts past
  the bit width, zero float divisors.
* Every case is applied to several input layouts in ONE traced graph: all value
  combinations through broadcasting, (3,1,5) with (4,5), transposed, sliced,
  expanded (stride 0), zero-size and 0-dim inputs. Each layout is an independent
  fusion group, so one `make_fx` trace + one `compile_graph` call checks all of
  them (a torch.compile per case would cost ~10x more; CI has 2 cores).
* A single op is never fused ("single operation: nothing to fuse"), so the first
  tensor argument goes through `aten.clone` first (the identity row of the
  table, which keeps -0.0/NaN/Inf and integer bits intact). Every test asserts
  that each op node really ran in a generated kernel, so nothing passes
  silently through PyTorch.
"""
from __future__ import annotations

import importlib
import logging
import math
from dataclasses import dataclass, field
from typing import Any, Callable

import pytest
import torch
from torch import fx
from torch._subclasses.fake_tensor import FakeTensorMode
from torch.fx.passes.fake_tensor_prop import FakeTensorProp

import kitsune
from kitsune.compiler import compile_graph
from kitsune.ir.ops import POINTWISE_OPS
from kitsune.report.stats import GLOBAL_STATS
from kitsune.runtime.fused_call import FusedGroupCall

aten = torch.ops.aten
prims = torch.ops.prims

# NaN/Inf/overflow inputs are the point here; numpy (behind Triton's interpreter) warns about them.
pytestmark = pytest.mark.filterwarnings("ignore:.*encountered in:RuntimeWarning")

NAN, INF = math.nan, math.inf
DTYPES = [torch.bool, torch.int32, torch.int64, torch.float16, torch.bfloat16, torch.float32, torch.float64]
FLOATS = (torch.float16, torch.bfloat16, torch.float32, torch.float64)
INTS = (torch.int32, torch.int64)


def _dt(dtype) -> str:
    return str(dtype).replace("torch.", "")


# -- backends -------------------------------------------------------------------

def _available(name: str) -> bool:
    module = importlib.import_module(f"kitsune.codegen.{name}")
    return hasattr(module, "compile_kernel") or hasattr(module, "compile_kernels")


@pytest.fixture(params=["triton", "cpu"])
def backend(request, monkeypatch):
    if not _available(request.param):
        pytest.skip(f"{request.param} backend not built yet")
    monkeypatch.setenv("KITSUNE_BACKEND", request.param)
    kitsune.reset_fusion_stats()
    yield request.param


# -- value pools ----------------------------------------------------------------

I32_MIN, I32_MAX = -2**31, 2**31 - 1
I64_MIN, I64_MAX = -2**63, 2**63 - 1

FLOAT_POOL = [NAN, INF, -INF, -0.0, 0.0, 1.0, -1.0, 0.5, -2.5, 1.5, 0.3, -0.75, 1e-6, -1e-40,
              1e4, -7e4, 3.0, 100.5, 1e30, 2.0, -88.75]
INT_POOL = {
    torch.int32: [0, 1, -1, 2, -3, 7, -9, 100, -100, 12345, 46341, -46341, 65536, I32_MAX, I32_MIN,
                  I32_MAX - 1, I32_MIN + 1, 1000000],
    torch.int64: [0, 1, -1, 2, -3, 7, -9, 100, -100, 12345, 3037000500, -3037000500, 2**32, I64_MAX, I64_MIN,
                  I64_MAX - 1, I64_MIN + 1, 10**12],
}
# Integer divisors: no 0 (eager raises, GPUs are undefined; see the zero-division
# test) and no -1 (MIN / -1 overflows: a hardware trap on x86).
INT_DIVISORS = {
    torch.int32: [1, 2, -2, 3, -3, 7, -9, 100, 12345, 65536, I32_MAX, I32_MIN, -128],
    torch.int64: [1, 2, -2, 3, -3, 7, -9, 100, 12345, 2**32, I64_MAX, I64_MIN, -128],
}
SHIFTS = [0, 1, 3, 7, 8, 15, 16, 31, 32, 33, 63, 64, 65, -1, -8]
BOUNDS = {"float": [NAN, -INF, -1.0, -0.0, 0.5, 2.0, INF], torch.int32: [I32_MIN, -3, 0, 7, I32_MAX],
          torch.int64: [I64_MIN, -3, 0, 7, I64_MAX], torch.bool: [False, True]}


_SAMPLING_FOR = None  # the backend samples are being made for (see make_samples)


def pool(role: str, dtype: torch.dtype) -> list:
    role = role.rstrip("0")
    if role == "c":                      # conditions and masks: always bool
        return [False, True, True]
    if dtype == torch.bool:
        return [False, True]
    if role == "b":
        return BOUNDS["float" if dtype.is_floating_point else dtype]
    if dtype.is_floating_point:
        if role == "d":
            # No subnormal divisors: eager's own vectorised fmod/remainder return NaN for
            # them (torch.fmod(torch.full((16,), 5.), torch.full((16,), 1e-40)) is NaN,
            # the 2-element call gives 4.2e-41), so eager is not a reference there.
            return [v for v in FLOAT_POOL if v == 0 or not math.isfinite(v) or abs(v) >= 1e-30]
        if dtype == torch.bfloat16 and _SAMPLING_FOR == "triton":
            # Triton's interpreter (numpy underneath) widens bfloat16 subnormals
            # wrongly when loading them (9.2e-41 -> -0.0, 1.0e-39 -> 4.4e-39); a
            # GPU does not. Kitsune's kernels are not at fault: keep them out.
            return [v for v in FLOAT_POOL if v == 0 or not math.isfinite(v) or abs(v) >= 1.18e-38]
        return FLOAT_POOL
    if role == "d":
        return INT_DIVISORS[dtype]
    if role == "s":
        return SHIFTS
    if role == "e":                      # integer exponents: eager rejects negative ones
        return [0, 1, 2, 3, 5, 31, 62]
    return INT_POOL[dtype]


def role_dtype(role: str, dtype: torch.dtype) -> torch.dtype:
    return torch.bool if role.rstrip("0") == "c" else dtype


def fill(role: str, dtype: torch.dtype, shape, offset: int) -> torch.Tensor:
    values = pool(role, dtype)
    n = math.prod(shape)
    data = [values[(offset + i) % len(values)] for i in range(n)]
    return torch.tensor(data, dtype=role_dtype(role, dtype)).reshape(shape)


# -- layouts: how the k tensor arguments of a case are shaped ----------------------

def _outer(roles, dtype):
    """Every combination of pool values: argument j varies along dim j (broadcasting).

    The first argument is expanded to the full result shape (a stride-0 view):
    the `clone` that every variant reads must have the kernel's iteration size
    to be shared by several consumers."""
    dims = [r for r in roles if not r.endswith("0")]
    sizes = [len(pool(r, dtype)) for r in dims]
    out, j = [], 0
    for r in roles:
        if r.endswith("0"):
            out.append(fill(r, dtype, (), 3))
            continue
        values = torch.tensor(pool(r, dtype), dtype=role_dtype(r, dtype))
        out.append(values.reshape((sizes[j],) + (1,) * (len(dims) - 1 - j)))
        j += 1
    out[0] = out[0].expand(sizes) if out[0].dim() else out[0]
    return out


_OUTER: dict = {}


def _outer_cached(roles, dtype, same_shape=False):
    """`_outer` for probing eager support (shared, never handed to a compiled graph)."""
    key = (roles, dtype, same_shape)
    if key not in _OUTER:
        tensors = _outer(roles, dtype)
        tensors = _OUTER[key] = list(torch.broadcast_tensors(*tensors)) if same_shape else tensors
        _FAKES[id(tensors)] = [_FAKE_MODE.from_tensor(t) for t in tensors]
    return _OUTER[key]


def _shaped(*shapes):
    """Argument j (not counting always-0-dim roles) is made by shapes[j](role, dtype, offset, k)."""
    def make(roles, dtype):
        k = sum(not r.endswith("0") for r in roles)
        out, j = [], 0
        for i, r in enumerate(roles):
            if r.endswith("0"):
                out.append(fill(r, dtype, (), 5 * i + 1))
            else:
                out.append(shapes[j](r, dtype, 5 * i + 2, k))
                j += 1
        return out
    return make


def _contig(shape):
    return lambda r, d, o, k: fill(r, d, shape, o)


def _strided_first(r, d, o, k):
    if k == 1:
        # (5, 3, 4) strides (2, 0, 10): sliced, expanded (stride 0) and transposed at once
        return fill(r, d, (4, 1, 10), o)[:, :, ::2].expand(4, 3, 5).transpose(0, 2)
    # (3, 1, 5) strides (1, 3, 3): permuted, broadcast against the next argument
    return fill(r, d, (5, 1, 3), o).permute(2, 1, 0)


def _sliced_transposed(r, d, o, k):
    return fill(r, d, (5, 8), o)[:, ::2].t()  # (4, 5) strides (2, 8)


def _expanded(r, d, o, k):
    return fill(r, d, (5,), o).expand(4, 5)   # (4, 5) strides (0, 1)


def _scalar(r, d, o, k):
    return fill(r, d, (), o)


# name -> (test part, maker). "values": every combination of pool values, the
# arguments contiguous and broadcast against each other; "strided": transposed,
# sliced, expanded and (3,1,5)-with-(4,5) broadcast inputs; "empty": zero-size.
LAYOUTS: dict[str, tuple] = {
    "values": ("values", _outer),
    "strided": ("layouts", _shaped(_strided_first, _sliced_transposed, _expanded)),
    "empty": ("layouts", _shaped(_contig((0, 5)), _contig((5,)), _contig((1, 5)))),
    "0dim": ("0dim", _shaped(_scalar, _scalar, _scalar)),
    "0dim_mix": ("0dim", _shaped(_contig((4, 5)), _scalar, _scalar)),
}
PARTS = ("values", "layouts", "0dim")


# -- the cases ------------------------------------------------------------------------

@dataclass
class Case:
    id: str
    op: Any                                 # the table row under test (must appear in the graph)
    roles: tuple                            # tensor arguments: x/y values, d divisor, s shift, e exponent,
                                            # b clamp bound, c bool condition; suffix 0 = always 0-dim
    build: Callable                         # build(variant, *tensors) -> tensor
    variants: list = field(default_factory=lambda: [None])
    dtypes: tuple = tuple(DTYPES)
    loose: bool = False                     # libm function: see TOLERANCE
    same_shape: bool = False                # prims do not broadcast: inputs are expanded first


def _alpha(op):
    return lambda v, a, b: op(a, b) if v is None else op(a, b, alpha=v)


SCALARS = [3, -2.5, INF, -0.0]
DIV_SCALARS = [3, -2, 2.5, -0.75, 0.0, -0.0]
CMP_SCALARS = [0, 2.5, NAN, -INF]

CASES: list[Case] = [
    Case("add.Tensor", aten.add.Tensor, ("x", "y"), _alpha(aten.add.Tensor), [None, 2, -0.5]),
    Case("add.Scalar", aten.add.Scalar, ("x",), lambda v, a: aten.add.Scalar(a, v), SCALARS),
    Case("sub.Tensor", aten.sub.Tensor, ("x", "y"), _alpha(aten.sub.Tensor), [None, 3, 1.5]),
    Case("sub.Scalar", aten.sub.Scalar, ("x",), lambda v, a: aten.sub.Scalar(a, v), SCALARS),
    Case("rsub.Tensor", aten.rsub.Tensor, ("x", "y"), _alpha(aten.rsub.Tensor), [None, -2]),
    Case("rsub.Scalar", aten.rsub.Scalar, ("x",), lambda v, a: aten.rsub.Scalar(a, v), SCALARS),
    Case("mul.Tensor", aten.mul.Tensor, ("x", "y"), lambda v, a, b: aten.mul.Tensor(a, b)),
    Case("mul.Scalar", aten.mul.Scalar, ("x",), lambda v, a: aten.mul.Scalar(a, v), SCALARS),
    Case("div.Tensor", aten.div.Tensor, ("x", "y"), lambda v, a, b: aten.div.Tensor(a, b)),
    Case("div.Scalar", aten.div.Scalar, ("x",), lambda v, a: aten.div.Scalar(a, v), [3, -0.0, 0, 0.1]),
    Case("div.Tensor_mode", aten.div.Tensor_mode, ("x", "d"),
         lambda v, a, b: aten.div.Tensor_mode(a, b, rounding_mode=v), ["trunc", "floor"]),
    Case("div.Scalar_mode", aten.div.Scalar_mode, ("x",),
         lambda v, a: aten.div.Scalar_mode(a, v[1], rounding_mode=v[0]),
         [("floor", -2), ("trunc", 3), ("floor", 2.5), ("trunc", -0.75), ("floor", 0.0), ("trunc", -0.0)]),
    # (bool: eager's prims.div returns float32 where its meta function says bool; graphs never hold it)
    Case("prims.div", prims.div.default, ("x", "d"), lambda v, a, b: prims.div.default(a, b), same_shape=True,
         dtypes=INTS + FLOATS),
    Case("floor_divide", aten.floor_divide.default, ("x", "d"), lambda v, a, b: aten.floor_divide.default(a, b)),
    Case("floor_divide.Scalar", aten.floor_divide.Scalar, ("x",),
         lambda v, a: aten.floor_divide.Scalar(a, v), DIV_SCALARS),
    Case("remainder.Tensor", aten.remainder.Tensor, ("x", "d"), lambda v, a, b: aten.remainder.Tensor(a, b)),
    Case("remainder.Scalar", aten.remainder.Scalar, ("x",), lambda v, a: aten.remainder.Scalar(a, v), DIV_SCALARS),
    Case("fmod.Tensor", aten.fmod.Tensor, ("x", "d"), lambda v, a, b: aten.fmod.Tensor(a, b)),
    Case("fmod.Scalar", aten.fmod.Scalar, ("x",), lambda v, a: aten.fmod.Scalar(a, v), DIV_SCALARS),
    Case("neg", aten.neg.default, ("x",), lambda v, a: aten.neg.default(a)),
    Case("abs", aten.abs.default, ("x",), lambda v, a: aten.abs.default(a)),
    Case("sign", aten.sign.default, ("x",), lambda v, a: aten.sign.default(a)),
    Case("sgn", aten.sgn.default, ("x",), lambda v, a: aten.sgn.default(a)),
    Case("pow.Tensor_Scalar", aten.pow.Tensor_Scalar, ("x",), lambda v, a: aten.pow.Tensor_Scalar(a, v),
         [2, 3, 0.5, -0.5, -1, -2, 0, 1, 2.5, -3, 5, 1 / 3], loose=True),
    Case("pow.Tensor_Tensor", aten.pow.Tensor_Tensor, ("x", "e"),
         lambda v, a, b: aten.pow.Tensor_Tensor(a, b), loose=True),
    Case("pow.Scalar", aten.pow.Scalar, ("e",), lambda v, a: aten.pow.Scalar(v, a), [2.5, -1.5, 0.0, 10, 2],
         loose=True),
    *[Case(name, getattr(aten, name).default, ("x",), lambda v, a, _op=getattr(aten, name).default: _op(a),
           loose=True)
      for name in ("exp", "exp2", "expm1", "log", "log1p", "log2", "log10", "sqrt", "rsqrt", "sigmoid", "tanh",
                   "erf", "erfc", "erfinv", "sin", "cos")],
    Case("reciprocal", aten.reciprocal.default, ("x",), lambda v, a: aten.reciprocal.default(a)),
    Case("atan2", aten.atan2.default, ("x", "y"), lambda v, a, b: aten.atan2.default(a, b), loose=True),
    Case("hypot", aten.hypot.default, ("x", "y"), lambda v, a, b: aten.hypot.default(a, b), loose=True),
    *[Case(name, getattr(aten, name).default, ("x",), lambda v, a, _op=getattr(aten, name).default: _op(a))
      for name in ("floor", "ceil", "trunc", "round", "frac", "relu", "isnan", "isinf", "logical_not",
                   "bitwise_not", "clone", "lift_fresh_copy")],
    Case("maximum", aten.maximum.default, ("x", "y"), lambda v, a, b: aten.maximum.default(a, b)),
    Case("minimum", aten.minimum.default, ("x", "y"), lambda v, a, b: aten.minimum.default(a, b)),
    Case("clamp", aten.clamp.default, ("x",), lambda v, a: aten.clamp.default(a, *v),
         [(-1.5, 2.5), (None, 0), (1, None), (2, -1), (NAN, None), (-INF, INF)]),
    Case("clamp.Tensor", aten.clamp.Tensor, ("x", "b", "b"),
         lambda v, a, lo, hi: aten.clamp.Tensor(a, lo if v != "max" else None, hi if v != "min" else None),
         ["both", "min", "max"]),
    Case("clamp_min", aten.clamp_min.default, ("x",), lambda v, a: aten.clamp_min.default(a, v), [0.5, -2, NAN]),
    Case("clamp_min.Tensor", aten.clamp_min.Tensor, ("x", "b"), lambda v, a, b: aten.clamp_min.Tensor(a, b)),
    Case("clamp_max", aten.clamp_max.default, ("x",), lambda v, a: aten.clamp_max.default(a, v), [-1, 2.5, NAN]),
    Case("clamp_max.Tensor", aten.clamp_max.Tensor, ("x", "b"), lambda v, a, b: aten.clamp_max.Tensor(a, b)),
    Case("nan_to_num", aten.nan_to_num.default, ("x",), lambda v, a: aten.nan_to_num.default(a, *v),
         [(), (1.0, 100.0, -100.0), (-0.0, None, None), (NAN, INF, None)]),
    Case("where.self", aten.where.self, ("c", "x", "y"), lambda v, c, a, b: aten.where.self(c, a, b)),
    Case("where.ScalarSelf", aten.where.ScalarSelf, ("c", "y"), lambda v, c, b: aten.where.ScalarSelf(c, v, b),
         [7, -0.0, True]),
    Case("where.ScalarOther", aten.where.ScalarOther, ("c", "x"),
         lambda v, c, a: aten.where.ScalarOther(c, a, v), [NAN, -3, False]),
    Case("where.Scalar", aten.where.Scalar, ("c",), lambda v, c: aten.where.Scalar(c, *v),
         [(3, -4), (1.5, -0.0), (True, False), (NAN, INF)], dtypes=(torch.bool,)),
    Case("masked_fill.Scalar", aten.masked_fill.Scalar, ("x", "c"),
         lambda v, a, m: aten.masked_fill.Scalar(a, m, v), [-1.5, 7, NAN, True]),
    Case("masked_fill.Tensor", aten.masked_fill.Tensor, ("x", "c", "y0"),
         lambda v, a, m, f: aten.masked_fill.Tensor(a, m, f)),
    *[Case(f"{name}.Tensor", getattr(aten, name).Tensor, ("x", "y"),
           lambda v, a, b, _op=getattr(aten, name).Tensor: _op(a, b))
      for name in ("eq", "ne", "lt", "le", "gt", "ge", "bitwise_and", "bitwise_or", "bitwise_xor")],
    *[Case(f"{name}.Scalar", getattr(aten, name).Scalar, ("x",),
           lambda v, a, _op=getattr(aten, name).Scalar: _op(a, v), CMP_SCALARS)
      for name in ("eq", "ne", "lt", "le", "gt", "ge")],
    *[Case(f"{name}.Scalar", getattr(aten, name).Scalar, ("x",),
           lambda v, a, _op=getattr(aten, name).Scalar: _op(a, v), [5, -1, 0, True])
      for name in ("bitwise_and", "bitwise_or", "bitwise_xor")],
    *[Case(name, getattr(aten, name).default, ("x", "y"), lambda v, a, b, _op=getattr(aten, name).default: _op(a, b))
      for name in ("logical_and", "logical_or", "logical_xor")],
    *[Case(f"{name}.Tensor", getattr(aten, name).Tensor, ("x", "s"),
           lambda v, a, b, _op=getattr(aten, name).Tensor: _op(a, b))
      for name in ("bitwise_left_shift", "bitwise_right_shift", "__lshift__", "__rshift__")],
    *[Case(f"{name}.{overload}", getattr(getattr(aten, name), overload), ("x",),
           lambda v, a, _op=getattr(getattr(aten, name), overload): _op(a, v), [3, 0, 31, 33, 64, -1])
      for name, overload in (("bitwise_left_shift", "Tensor_Scalar"), ("bitwise_right_shift", "Tensor_Scalar"),
                             ("__lshift__", "Scalar"), ("__rshift__", "Scalar"))],
    Case("copy", aten.copy.default, ("x", "y"), lambda v, a, b: aten.copy.default(a, b)),
    # (value, dtype): only the input's shape and strides matter
    Case("full_like", aten.full_like.default, ("x",),
         lambda v, a: aten.full_like.default(a, v[0], dtype=v[1]),
         [(2.5, None), (-0.0, None), (NAN, None), (-INF, None), (7, None), (True, None), (-3.5, torch.float64),
          (5, torch.int32), (0.5, torch.bool)]),
]

# Rows checked by dedicated tests below (conversions, fills, scatter).
SEPARATELY_TESTED = {prims.convert_element_type.default, aten._to_copy.default, aten.full.default,
                     aten.scalar_tensor.default, aten.scatter.value, aten.scatter.src,
                     # the ops that move elements: tests/codegen/test_indexing.py
                     *(op for op, row in POINTWISE_OPS.items() if row.compute == "indexing")}

# Rows that must not be generated for some dtypes; the planner refuses them with a reason.
def expected_refusal(case: Case, out_dtype: torch.dtype) -> str | None:
    if case.op in (aten.pow.Tensor_Tensor, aten.pow.Scalar) and not out_dtype.is_floating_point:
        return "integer"
    return None


# Tolerances. Integers and bools are always compared exactly (assert_close does
# that for them). Floats use assert_close's defaults, except for `loose` cases
# (libm functions): the C backend calls the platform libm (glibc, ~1-4 ulp),
# eager PyTorch uses its own vectorised implementations (Sleef), and Triton on a
# GPU uses libdevice; none is correctly rounded, so float32 results may differ
# by a few ulp, more than the default rtol=1.3e-6 (~10 ulp) allows near
# catastrophic points (e.g. pow with large exponents, erfinv near +-1, log10 computed as
# log(x) * (1/ln 10) with one extra rounding). float16/bfloat16 are computed in
# float32 and rounded once, so one float32 ulp can flip the final rounding: one
# ulp of the narrow type, which the default rtol already covers.
TOLERANCE = {torch.float32: dict(rtol=1e-5, atol=1e-5), torch.float64: dict(rtol=1e-9, atol=1e-12)}

# Ops whose sign of a zero result is unspecified in eager (std::max/min of -0.0
# and 0.0 depends on argument order and on the vectorised vs scalar path).
SIGNED_ZERO_UNSPECIFIED = {aten.maximum.default, aten.minimum.default, aten.clamp.default, aten.clamp.Tensor,
                           aten.clamp_min.default, aten.clamp_min.Tensor, aten.clamp_max.default,
                           aten.clamp_max.Tensor, aten.relu.default}


# -- samples -----------------------------------------------------------------------------
#
# A Sample is one layout of one case for one dtype: its input tensors and the
# variants applied to them. All variants of a sample read the same `clone` of
# the first input, so they form ONE fusion group (one kernel with an output per
# variant): Triton's interpreter costs ~20 ms per launch whatever the kernel
# does, so launches are what this file economises. "values" applies every
# variant; the other layouts apply the first one.

@dataclass
class Sample:
    case: Case
    dtype: torch.dtype
    layout: str
    part: str
    variants: list
    tensors: list

    def label(self, variant) -> str:
        return f"{self.case.id}[{_dt(self.dtype)}, {self.layout}, variant={variant!r}]"


def _eager_ok(case: Case, variant, tensors, fake=True) -> bool:
    """Eager runs it, and so do PyTorch's meta functions (which capture needs:
    eager accepts `bool << 3`, the meta function of __lshift__ does not)."""
    try:
        case.build(variant, aten.clone.default(tensors[0]), *tensors[1:])
    except (RuntimeError, TypeError, ValueError, NotImplementedError):
        return False
    if not fake:
        return True
    try:
        with _FAKE_MODE:
            fakes = _FAKES.get(id(tensors)) or [_FAKE_MODE.from_tensor(t) for t in tensors]
            case.build(variant, aten.clone.default(fakes[0]), *fakes[1:])
        return True
    except (RuntimeError, TypeError, ValueError, NotImplementedError):
        return False


_FAKE_MODE = FakeTensorMode()
_FAKES: dict = {}  # id(list of tensors in _OUTER) -> their fake tensors


class _QuietMetaFailures(logging.Filter):
    """FakeTensorMode logs a traceback for each meta function that raises; the probe expects some."""

    def filter(self, record):
        return "failed while attempting to run meta" not in record.getMessage()


logging.getLogger("torch._subclasses.fake_tensor").addFilter(_QuietMetaFailures())


_SUPPORTED: dict = {}


def supported_variants(case: Case, dtype: torch.dtype) -> list:
    """The variants eager PyTorch accepts for `dtype` ("every dtype it supports")."""
    key = (case.id, dtype)
    if key not in _SUPPORTED:
        tensors = _outer_cached(case.roles, dtype, case.same_shape) if dtype in case.dtypes else None
        _SUPPORTED[key] = [v for v in case.variants if tensors is not None and _eager_ok(case, v, tensors)]
    return _SUPPORTED[key]


_SAMPLES: dict = {}


def make_samples(case: Case, dtype: torch.dtype, backend: str) -> list[Sample]:
    global _SAMPLING_FOR
    key = (case.id, dtype, backend)
    if key not in _SAMPLES:
        _SAMPLING_FOR = backend
        try:
            _SAMPLES[key] = _make_samples(case, dtype)
        finally:
            _SAMPLING_FOR = None
    return _SAMPLES[key]


def _make_samples(case: Case, dtype: torch.dtype) -> list[Sample]:
    variants = supported_variants(case, dtype)
    samples = []
    for layout, (part, make) in LAYOUTS.items():
        if layout == "0dim_mix" and sum(not r.endswith("0") for r in case.roles) < 2:
            continue  # same as "0dim" for one tensor argument
        tensors = make(case.roles, dtype)
        if case.same_shape:
            tensors = list(torch.broadcast_tensors(*tensors))
        # (the meta functions were probed by supported_variants; they do not depend on the layout)
        chosen = [v for v in (variants if part == "values" else variants[:1]) if _eager_ok(case, v, tensors, False)]
        if part == "values":  # constants -0.0 get a kernel (and a test) of their own
            neg0 = [v for v in chosen if _has_negative_zero(v)]
            chosen = [v for v in chosen if v not in neg0]
            if neg0:
                samples.append(Sample(case, dtype, layout, "neg0_const", neg0, make(case.roles, dtype)))
        if chosen:
            samples.append(Sample(case, dtype, layout, part, chosen, tensors))
    return samples


def _has_negative_zero(variant) -> bool:
    items = variant if isinstance(variant, tuple) else (variant,)
    return any(isinstance(x, float) and x == 0 and math.copysign(1, x) < 0 for x in items)


def program_of(samples: list[Sample]):
    """One function computing every variant of every sample from clone(first input)."""
    def program(*flat):
        outs, pos = [], 0
        for s in samples:
            args = list(flat[pos:pos + len(s.tensors)])
            pos += len(s.tensors)
            args[0] = aten.clone.default(args[0])  # a second op: a lone op is never fused
            outs.extend(s.case.build(v, *args) for v in s.variants)
        return tuple(outs)
    return program


# -- one compiled graph per (backend, dtype, chunk of cases) -------------------------------
#
# Samples are independent fusion groups of that graph: a kernel that fails
# affects only its own sample (Kitsune falls back per group), and each test
# below checks only its own samples. One trace and one compile (one C compiler
# run for the cpu backend) serve many tests.

CHUNK = 16
CONFIG = kitsune.FusionConfig(max_fusion_size=64)  # every variant of a sample in one kernel


@dataclass(repr=False)
class Outcome:
    label: str
    node: str                        # the op's node in the traced graph
    target: Any
    want: torch.Tensor
    got: Any                         # tensor, or the exception the compiled graph raised
    fused: bool
    failure: str | None              # why its group ran through PyTorch instead
    refusals: list
    stats: dict                      # kitsune.get_fusion_stats() right after compiling the batch
    meta: Any = None                 # the node's fake tensor: shape, strides and dtype Kitsune promises
    inputs: list = None              # the sample's input tensors (for failure messages)
    variant: Any = None


_BATCHES: dict = {}


def outcomes(backend: str, dtype: torch.dtype, chunk: int) -> dict:
    key = (backend, dtype, chunk)
    if key not in _BATCHES:
        _BATCHES[key] = _run_batch(backend, dtype, CASES[chunk * CHUNK:(chunk + 1) * CHUNK])
    return _BATCHES[key]


def trace(program, flat):
    """The aten graph of `program`, each op call recorded as itself (make_fx would
    decompose e.g. where.ScalarSelf into where.self), with fake-tensor metadata
    as capture records it. Returns the GraphModule and its output nodes."""
    graph = fx.Graph()
    tracer = fx.proxy.GraphAppendingTracer(graph)
    outs = program(*[fx.Proxy(graph.placeholder(f"in{i}"), tracer) for i in range(len(flat))])
    graph.output(tuple(o.node for o in outs))
    gm = fx.GraphModule(torch.nn.Module(), graph)
    FakeTensorProp(gm, FakeTensorMode()).propagate(*flat)
    return gm, [o.node for o in outs]


def run_program(program, flat, labels, inputs=None, variants=None) -> dict:
    """Eager vs Kitsune for every output of `program(*flat)`: {label: Outcome}."""
    want = program(*flat)
    gm, out_nodes = trace(program, flat)
    kitsune.reset_fusion_stats()
    compiled = compile_graph(gm, flat, config=CONFIG)
    stats = kitsune.get_fusion_stats()
    record = GLOBAL_STATS.graphs[-1]
    try:
        got = compiled(*flat)
    except Exception as error:  # noqa: BLE001 - reported by every test of the batch
        got = [error] * len(want)
    group_of = {name: spec for spec, nodes, _ in record.groups for name in nodes}
    failures = {name: reason for label, reason in record.fallbacks for name in label.split(" → ")}
    for node in compiled.graph.nodes:  # kernels that failed at launch ran the group through PyTorch
        call = node.target
        if isinstance(call, FusedGroupCall) and call.failure:
            failures.update({n: call.failure for n, spec in group_of.items() if spec == call.spec.name})
    inputs = inputs or [None] * len(labels)
    variants = variants or [None] * len(labels)
    assert len(labels) == len(out_nodes) == len(want) == len(inputs) == len(variants)
    return {label: Outcome(label, node.name, node.target, w, g, node.name in group_of, failures.get(node.name),
                           [d.reason for d in record.decisions if not d.fused and node.name in d.nodes], stats,
                           node.meta.get("val"), ins, variant)
            for label, node, w, g, ins, variant in zip(labels, out_nodes, want, got, inputs, variants)}


def _run_batch(backend: str, dtype: torch.dtype, cases: list[Case]) -> dict:
    samples = [s for case in cases for s in make_samples(case, dtype, backend)]
    flat = [t for s in samples for t in s.tensors]
    return run_program(program_of(samples), flat,
                       labels=[s.label(v) for s in samples for v in s.variants],
                       inputs=[s.tensors for s in samples for v in s.variants],
                       variants=[v for s in samples for v in s.variants])


def _where(mask, got, want, inputs) -> str:
    """The first position of `mask`, with the inputs that produced it."""
    i = tuple(mask.nonzero()[0].tolist())
    args = []
    for t in inputs or ():
        try:
            args.append(t.broadcast_to(want.shape)[i].item())
        except RuntimeError:
            args.append("?")
    return f"at {list(i)}: got {got[i].item()!r}, eager {want[i].item()!r}, inputs {args}"


def assert_same(got, want, label, op=None, loose=False, meta=None, inputs=None, reference=None):
    if isinstance(got, BaseException):
        raise AssertionError(f"{label}: the compiled graph raised {type(got).__name__}: {got}") from got
    assert isinstance(got, torch.Tensor), f"{label}: got {type(got).__name__}"
    assert got.dtype == want.dtype, f"{label}: dtype {got.dtype} != eager {want.dtype}"
    assert got.shape == want.shape, f"{label}: shape {tuple(got.shape)} != eager {tuple(want.shape)}"
    tol = TOLERANCE.get(want.dtype, {}) if loose else {}
    try:
        torch.testing.assert_close(got, want, equal_nan=True, **tol)
    except AssertionError as error:
        if want.dtype.is_floating_point:
            g, w = got.double(), want.double()
            rtol, atol = (tol["rtol"], tol["atol"]) if tol else torch.testing._comparison.default_tolerances(want)
            bad = ~torch.isclose(g, w, rtol=rtol, atol=atol, equal_nan=True)
            if reference is not None:
                # float16/bfloat16: Kitsune computes each op in float32 and rounds once; eager
                # sometimes rounds an intermediate (b * alpha, the quotient before trunc, a
                # Python scalar converted to the tensor's dtype). A result at least as close to
                # the float64 result as eager's is not an error.
                r = reference()
                bad &= ~((g == r) | ((g - r).abs() <= (w - r).abs()))
                if not bad.any():
                    return _check_layout_and_zeros(got, want, label, op, meta, inputs)
        else:
            bad = got != want
        detail = _where(bad, got, want, inputs) if bad.any() else str(error).splitlines()[0]
        raise AssertionError(f"{label}: {int(bad.sum())} of {want.numel()} differ; first {detail}") from None
    _check_layout_and_zeros(got, want, label, op, meta, inputs)


def _check_layout_and_zeros(got, want, label, op, meta, inputs):
    if meta is not None and got.numel() > 1:
        # Kitsune allocates outputs with the strides of the graph's metadata (PyTorch's
        # meta functions, which for a few ops, e.g. floor_divide, differ from eager CPU).
        assert got.stride() == meta.stride(), f"{label}: strides {got.stride()} != graph's {meta.stride()}"
    if want.dtype.is_floating_point and op not in SIGNED_ZERO_UNSPECIFIED:
        bad = (want == 0) & (got == 0) & (torch.signbit(want) != torch.signbit(got))
        if bad.any():
            raise AssertionError(f"{label}: sign of zero differs in {int(bad.sum())} elements; first "
                                 f"{_where(bad, got, want, inputs)}")


def check_generated(o: Outcome, op):
    """`o` is op's result, computed by a generated kernel, equal to eager's."""
    assert o.target is op, f"{o.label}: traced as {o.target}, not {op}"
    assert o.failure is None, f"{o.label}: ran through PyTorch: {o.failure}"
    assert o.fused, f"{o.label}: not fused: {o.refusals}"
    assert o.stats["num_fused"] >= 1
    assert not [f for f in o.stats["fallbacks"] if o.node in f[0].split(" → ")]
    assert_same(o.got, o.want, o.label, op, False, o.meta, o.inputs)


def _collect_errors(check, items) -> None:
    """Run check(item) for each item; fail with every message, not just the first."""
    errors = []
    for item in items:
        try:
            check(item)
        except AssertionError as error:
            errors.append(str(error).split("\n")[0])
    if errors:
        # The messages say everything; a traceback would add nothing (and ~0.1 s per test).
        pytest.fail("\n".join(errors), pytrace=False)


def check_outcome(case: Case, o: Outcome):
    assert o.target is case.op, f"{o.label}: traced as {o.target}, not {case.op}"
    assert o.failure is None, f"{o.label}: ran through PyTorch: {o.failure}"
    refusal = expected_refusal(case, o.want.dtype)
    if refusal:
        assert any(refusal in r for r in o.refusals), f"{o.label}: expected a refusal, got {o.refusals}"
    else:
        assert o.fused, f"{o.label}: not fused: {o.refusals}"
        assert o.stats["num_fused"] >= 1
    # (fallbacks of other samples of the batch are their own tests' business)
    assert not [f for f in o.stats["fallbacks"] if o.node in f[0].split(" → ")]
    assert_same(o.got, o.want, o.label, case.op, case.loose, o.meta, o.inputs, _float64_reference(case, o))


def _float64_reference(case: Case, o: Outcome):
    """For float16/bfloat16 results of float16/bfloat16 inputs: the op computed in float64."""
    if o.want.dtype not in (torch.float16, torch.bfloat16):
        return None
    if not all(t.dtype in (torch.float16, torch.bfloat16, torch.bool) for t in o.inputs):
        return None

    def reference():
        wide = [t.double() if t.dtype.is_floating_point else t for t in o.inputs]
        return case.build(o.variant, aten.clone.default(wide[0]), *wide[1:]).double()
    return reference


def _params():
    params = []
    for index, case in enumerate(CASES):
        for dtype in DTYPES:
            variants = supported_variants(case, dtype)
            if variants:
                parts = PARTS + (("neg0_const",) if any(map(_has_negative_zero, variants)) else ())
                params += [pytest.param(case, dtype, part, index // CHUNK, id=f"{case.id}-{_dt(dtype)}-{part}")
                           for part in parts]
    return params


@pytest.mark.parametrize(("case", "dtype", "part", "chunk"), _params())
def test_op_matches_eager(backend, case, dtype, part, chunk):
    results = outcomes(backend, dtype, chunk)
    labels = [s.label(v) for s in make_samples(case, dtype, backend) if s.part == part for v in s.variants]
    assert labels, "no samples"
    _collect_errors(lambda label: check_outcome(case, results[label]), labels)


def test_every_table_row_has_a_case():
    covered = {c.op for c in CASES} | SEPARATELY_TESTED
    missing = [str(op) for op in POINTWISE_OPS if op not in covered]
    assert not missing, f"op table rows without a test case: {missing}"


def test_every_case_covers_some_dtype():
    for case in CASES:
        assert any(supported_variants(case, d) for d in DTYPES), case.id


# -- conversions: _to_copy, convert_element_type and copy, every dtype to every dtype ------

# Rounding and overflow cases for conversions between float types (ties of
# bfloat16 and float16 rounding, values just past their max, float64-only range).
CONVERSION_EXTRA = [1e300, -1e300, 1e-310, 65519.0, 65520.0, -65520.0, 0.1, 1.00390625, 1.01171875,
                    1.0039062500000002, 3.4028235e38, 3.5e38, 2.0**31 - 0.5, -2.0**31, 2.0**24 + 1]
CONVERSIONS = {  # (op name, the table row): build(x, dst_dtype, dst_like)
    "_to_copy": (aten._to_copy.default, lambda x, d, like: aten._to_copy.default(aten.clone.default(x), dtype=d)),
    "convert_element_type": (prims.convert_element_type.default,
                             lambda x, d, like: prims.convert_element_type.default(aten.clone.default(x), d)),
    "copy": (aten.copy.default, lambda x, d, like: aten.copy.default(aten.clone.default(like), x)),
}


def _conversion_values(src: torch.dtype, dst: torch.dtype, backend: str) -> torch.Tensor:
    global _SAMPLING_FOR
    _SAMPLING_FOR = backend
    try:
        values = pool("x", src) + (CONVERSION_EXTRA if src.is_floating_point else [])
    finally:
        _SAMPLING_FOR = None
    x = torch.tensor(values, dtype=torch.float64 if src.is_floating_point else src).to(src)
    if src.is_floating_point and not (dst.is_floating_point or dst == torch.bool):
        # float -> integer is undefined behaviour in C (and eager) for NaN, inf and out of range
        limit = float(torch.iinfo(dst).max)
        x = x[torch.isfinite(x) & (x.double().abs() < limit)]
    return x


def _conversion_samples(backend, src):
    """(label, op name, dst, part, tensors) for every conversion from src."""
    samples = []
    for dst in DTYPES:
        x = _conversion_values(src, dst, backend)
        n = len(x)
        layouts = {
            "values": x,
            "strided": torch.cat([x, x.flip(0)]).reshape(2, n).t(),   # (n, 2) strides (1, n)
            "0dim": x[len(x) // 2].clone(),
        }
        for name, t in layouts.items():
            like = torch.zeros(t.shape, dtype=dst)
            for op_name in CONVERSIONS:
                part = "0dim" if name == "0dim" else "values"
                samples.append((f"{op_name}[{_dt(src)} -> {_dt(dst)}, {name}]", op_name, dst, part, [t, like]))
    return samples


_CONVERSION_RESULTS: dict = {}


def conversion_outcomes(backend: str, src: torch.dtype) -> dict:
    if (backend, src) not in _CONVERSION_RESULTS:
        samples = _conversion_samples(backend, src)

        def program(*flat):
            return tuple(CONVERSIONS[op_name][1](flat[2 * i], dst, flat[2 * i + 1])
                         for i, (_, op_name, dst, _, _) in enumerate(samples))
        flat = [t for *_, tensors in samples for t in tensors]
        _CONVERSION_RESULTS[backend, src] = run_program(program, flat, [s[0] for s in samples],
                                                        inputs=[s[4][:1] for s in samples])
    return _CONVERSION_RESULTS[backend, src]


@pytest.mark.parametrize("part", ["values", "0dim"])
@pytest.mark.parametrize("dst", DTYPES, ids=_dt)
@pytest.mark.parametrize("src", DTYPES, ids=_dt)
def test_conversion_matches_eager(backend, src, dst, part):
    results = conversion_outcomes(backend, src)
    mine = [(label, op_name) for label, op_name, d, p, _ in _conversion_samples(backend, src)
            if d == dst and p == part]
    assert mine
    _collect_errors(lambda item: check_generated(results[item[0]], CONVERSIONS[item[1]][0]), mine)


# -- fills: full and scalar_tensor (no tensor inputs at all) ---------------------------------

FILL_VALUES = {"float": [NAN, INF, -INF, 2.5, 0.1, 1e30, -7e4, 0.0], "int": [7, -1, 2.5, -2.5, 0],
               torch.bool: [True, False, 2.5, 0.0]}
FILL_SHAPES = {"values": ([3, 4], [0, 2]), "0dim": ([],), "neg0_const": ([3, 4],)}


def _fill_samples():
    samples = []
    for dtype in DTYPES:
        if dtype.is_floating_point:
            values = FILL_VALUES["float"]
        elif dtype == torch.bool:
            values = FILL_VALUES[torch.bool]
        else:
            info = torch.iinfo(dtype)
            values = FILL_VALUES["int"] + [info.max, info.min]
        for part, shapes in FILL_SHAPES.items():
            for value in ([-0.0] if part == "neg0_const" else values):
                for shape in shapes:
                    try:
                        aten.full.default(shape, value, dtype=dtype)
                    except RuntimeError:
                        continue  # e.g. 1e30 does not fit float16: eager refuses it too
                    samples.append(("full", dtype, part, shape, value))
                if part != "values":
                    samples.append(("scalar_tensor", dtype, part, [], value))
    return samples


FILL_OPS = {"full": aten.full.default, "scalar_tensor": aten.scalar_tensor.default}
_FILL_RESULTS: dict = {}


def fill_outcomes(backend: str) -> dict:
    if backend not in _FILL_RESULTS:
        samples = _fill_samples()

        def program(x):  # x only gives access to the tracer: the fills have no tensor inputs
            outs = []
            for op, dtype, _, shape, value in samples:
                args = (shape, value) if op == "full" else (value,)
                if isinstance(x, fx.Proxy):  # tracing: record the call (a real call would just run)
                    made = x.tracer.create_proxy("call_function", FILL_OPS[op], args, {"dtype": dtype})
                else:
                    made = FILL_OPS[op](*args, dtype=dtype)
                outs.append(aten.clone.default(made))  # a second op: fill + clone is one kernel
            return tuple(outs)
        labels = [f"{op}[{_dt(d)}, shape={shape}, value={v!r}]" for op, d, _, shape, v in samples]
        _FILL_RESULTS[backend] = (samples, labels, run_program(program, [torch.zeros(1)], labels))
    return _FILL_RESULTS[backend]


@pytest.mark.parametrize("part", list(FILL_SHAPES))
@pytest.mark.parametrize("dtype", DTYPES, ids=_dt)
@pytest.mark.parametrize("op", list(FILL_OPS))
def test_fill_matches_eager(backend, op, dtype, part):
    if op == "scalar_tensor" and part == "values":
        pytest.skip("scalar_tensor is always 0-dim")
    if part == "neg0_const" and not dtype.is_floating_point:
        pytest.skip("-0.0 is a float")
    samples, labels, results = fill_outcomes(backend)
    mine = [label for label, (o, d, p, _, _) in zip(labels, samples) if o == op and d == dtype and p == part]
    assert mine

    # each output is clone(fill): the pair must be one generated kernel writing eager's values
    _collect_errors(lambda label: check_generated(results[label], aten.clone.default), mine)


# -- scatter: the table fuses one position per row (index.shape[dim] == 1) ---------------------

SCATTER_VALUES = [2.5, -0.0, NAN, -INF, 7, True, -2.5]
SCATTER_OPS = {"scatter.value": aten.scatter.value, "scatter.src": aten.scatter.src}


def _scatter_samples(dtype, backend):
    """(label, op name, part, build, tensors): every dim of a (4, 5) input, a transposed one and
    a 3-d one; awkward pool values in self and src, every Python value eager accepts."""
    global _SAMPLING_FOR
    _SAMPLING_FOR = backend
    try:
        x = fill("x", dtype, (4, 5), 0)
        layouts = [("dim=1", x, 1, torch.tensor([[4], [0], [2], [3]])),
                   ("dim=0", x, 0, torch.tensor([[3, 0, 1, 2, 3]])),
                   ("dim=-1 transposed", fill("x", dtype, (5, 4), 3).t(), -1, torch.tensor([[1], [4], [4], [0]])),
                   ("dim=1 3d", fill("x", dtype, (2, 3, 4), 5), 1, torch.tensor([[[2, 0, 1, 2]], [[0, 0, 1, 1]]]))]
        samples = []
        for name, self_, dim, index in layouts:
            src = fill("x", dtype, tuple(index.shape), 7)
            for value in SCATTER_VALUES:
                try:
                    aten.scatter.value(self_, dim, index, value)
                except RuntimeError:
                    continue  # e.g. NaN into an integer tensor: eager refuses it too
                part = "neg0_const" if _has_negative_zero(value) else "values"
                samples.append((f"scatter.value[{_dt(dtype)}, {name}, value={value!r}]", "scatter.value", part,
                                lambda x, i, s, dim=dim, value=value: aten.scatter.value(x, dim, i, value),
                                [self_, index, src]))
            samples.append((f"scatter.src[{_dt(dtype)}, {name}]", "scatter.src", "values",
                            lambda x, i, s, dim=dim: aten.scatter.src(x, dim, i, s), [self_, index, src]))
    finally:
        _SAMPLING_FOR = None
    return samples


_SCATTER_RESULTS: dict = {}


def scatter_outcomes(backend: str, dtype: torch.dtype) -> tuple[list, dict]:
    if (backend, dtype) not in _SCATTER_RESULTS:
        samples = _scatter_samples(dtype, backend)

        def program(*flat):
            return tuple(build(aten.clone.default(flat[3 * k]), flat[3 * k + 1], flat[3 * k + 2])
                         for k, (_, _, _, build, _) in enumerate(samples))
        flat = [t for *_, tensors in samples for t in tensors]
        _SCATTER_RESULTS[backend, dtype] = samples, run_program(program, flat, [s[0] for s in samples],
                                                                inputs=[s[4] for s in samples])
    return _SCATTER_RESULTS[backend, dtype]


@pytest.mark.parametrize("part", ["values", "neg0_const"])
@pytest.mark.parametrize("dtype", DTYPES, ids=_dt)
@pytest.mark.parametrize("op", list(SCATTER_OPS))
def test_scatter_matches_eager(backend, op, dtype, part):
    if part == "neg0_const" and (op == "scatter.src" or not dtype.is_floating_point):
        pytest.skip("-0.0 is a float value of scatter.value")
    samples, results = scatter_outcomes(backend, dtype)
    mine = [label for label, o, p, _, _ in samples if o == op and p == part]
    assert mine
    _collect_errors(lambda label: check_generated(results[label], SCATTER_OPS[op]), mine)


# -- integer division by zero: eager raises, so must the compiled graph ----------------------

INT_DIVISION = {
    "div_trunc": lambda a, b: aten.div.Tensor_mode(a, b, rounding_mode="trunc"),
    "div_floor": lambda a, b: aten.div.Tensor_mode(a, b, rounding_mode="floor"),
    "floor_divide": lambda a, b: aten.floor_divide.default(a, b),
    "remainder": lambda a, b: aten.remainder.Tensor(a, b),
    "fmod": lambda a, b: aten.fmod.Tensor(a, b),
}
INT_DIVISION_BY_SCALAR_ZERO = {
    "div_trunc.Scalar": lambda a: aten.div.Scalar_mode(a, 0, rounding_mode="trunc"),
    "div_floor.Scalar": lambda a: aten.div.Scalar_mode(a, 0, rounding_mode="floor"),
    "floor_divide.Scalar": lambda a: aten.floor_divide.Scalar(a, 0),
    "remainder.Scalar": lambda a: aten.remainder.Scalar(a, 0),
    "fmod.Scalar": lambda a: aten.fmod.Scalar(a, 0),
}


@pytest.fixture
def cpu_backend(monkeypatch):
    # GPUs have no integer division trap (the result is undefined), so this is the
    # C backend's contract only; the triton cases never divide integers by zero.
    if not _available("cpu"):
        pytest.skip("cpu backend not built yet")
    monkeypatch.setenv("KITSUNE_BACKEND", "cpu")
    kitsune.reset_fusion_stats()


def _compiled_with_kernels(program, flat):
    gm, _ = trace(program, flat)
    kitsune.reset_fusion_stats()
    compiled = compile_graph(gm, flat, config=CONFIG)
    stats = kitsune.get_fusion_stats()
    assert stats["num_fused"] >= 1 and stats["fallbacks"] == [], stats
    calls = [n.target for n in compiled.graph.nodes if isinstance(n.target, FusedGroupCall)]
    return compiled, calls


@pytest.mark.parametrize("dtype", INTS, ids=_dt)
def test_integer_division_by_zero_raises(cpu_backend, dtype):
    names = list(INT_DIVISION)
    a = torch.tensor(INT_POOL[dtype], dtype=dtype)
    safe = torch.tensor([INT_DIVISORS[dtype][i % len(INT_DIVISORS[dtype])] for i in range(len(a))], dtype=dtype)

    def program(a, *divisors):
        return tuple(INT_DIVISION[name](aten.clone.default(a), b) for name, b in zip(names, divisors))
    compiled, calls = _compiled_with_kernels(program, [a] + [safe] * len(names))
    assert len(calls) == len(names)
    for i, name in enumerate(names):
        divisors = [safe] * len(names)
        divisors[i] = safe.clone()
        divisors[i][3] = 0
        with pytest.raises(RuntimeError, match="ZeroDivisionError"):
            program(a, *divisors)  # eager
        with pytest.raises(RuntimeError, match="ZeroDivisionError"):
            compiled(a, *divisors)
    # the kernels stay in use after the error and compute the right thing
    got, want = compiled(a, *[safe] * len(names)), program(a, *[safe] * len(names))
    for name, g, w in zip(names, got, want):
        torch.testing.assert_close(g, w, rtol=0, atol=0, msg=lambda m: f"{name}: {m}")
    assert all(call.kernel is not None and call.failure is None for call in calls)


@pytest.mark.parametrize("name", list(INT_DIVISION_BY_SCALAR_ZERO))
def test_integer_division_by_scalar_zero_raises(cpu_backend, name):
    a = torch.tensor(INT_POOL[torch.int32], dtype=torch.int32)

    def program(a):
        return (INT_DIVISION_BY_SCALAR_ZERO[name](aten.clone.default(a)),)
    with pytest.raises(RuntimeError, match="ZeroDivisionError"):
        program(a)
    compiled, calls = _compiled_with_kernels(program, [a])
    assert len(calls) == 1
    with pytest.raises(RuntimeError, match="ZeroDivisionError"):
        compiled(a)
