"""KernelSpec -> Triton source text.

One program instance handles XBLOCK consecutive iterations of the flat
variable `x`. Every scalar primitive of `kitsune.ir.scalar` maps to one line
here; float16/bfloat16 values live in float32 registers (the numerics
contract) and are rounded only by `cast` and by the final store.
"""
from __future__ import annotations

import math

import torch

from kitsune.codegen.kernel import KernelError, KernelSpec
from kitsune.ir.index import render
from kitsune.ir.scalar import Value

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


def compute_dtype(dtype: torch.dtype) -> torch.dtype:
    return torch.float32 if dtype in _LOW else dtype


def literal(value, dtype: torch.dtype) -> str:
    """A constant of `dtype`'s compute type as a Triton expression."""
    cdt = compute_dtype(dtype)
    if cdt == torch.bool:
        return f"tl.full([], {int(bool(value))}, tl.int1)"
    if cdt.is_floating_point:
        if math.isnan(value):
            text = 'float("nan")'
        elif math.isinf(value):
            text = 'float("inf")' if value > 0 else 'float("-inf")'
        else:
            text = repr(float(value))
        return f"tl.full([], {text}, {TL_DTYPE[cdt]})"
    return f"tl.full([], {int(value)}, {TL_DTYPE[cdt]})"


def emit_triton(spec: KernelSpec, fn_name: str) -> str:
    """Source of a module defining the @triton.jit kernel `fn_name`."""
    wide = spec.max_offset() >= 2**31 - 2**16
    names: dict[Value, str] = {}
    inputs = [i.name for i in spec.inputs]
    body: list[str] = []
    for v in spec.values():
        names[v] = f"v{len(names)}"
        body.append(f"{names[v]} = {_expr(v, names, inputs)}")
    for out in spec.outputs:
        value = names[out.value]
        if not _is_block(out.value):
            value = f"tl.broadcast_to({value}, [XBLOCK])"
        if out.value.dtype != out.dtype:
            raise KernelError(f"{spec.name}: output {out.name} stores {out.value.dtype} into {out.dtype}")
        if out.dtype == torch.bfloat16:
            value = f"round_bf16({value})"
        body.append(f"tl.store({out.name} + ({render(out.index, 'x')}), "
                    f"{value}.to({TL_DTYPE[out.dtype]}), xmask)")
    params = ", ".join([i.name for i in spec.inputs] + [o.name for o in spec.outputs] + ["numel"])
    pid = "tl.program_id(0).to(tl.int64)" if wide else "tl.program_id(0)"
    header = "\n".join(f"# {line}" for line in (spec.description or spec.name).splitlines())
    lines = [
        "import triton",
        "import triton.language as tl",
        "from kitsune.codegen.triton.libm import libm, round_bf16",
        "",
        header,
        "@triton.jit",
        f"def {fn_name}({params}, XBLOCK: tl.constexpr):",
        f"    x = {pid} * XBLOCK + tl.arange(0, XBLOCK)",
        "    xmask = x < numel",
    ]
    lines += [f"    {line}" for line in body]
    return "\n".join(lines) + "\n"


def _is_block(v: Value) -> bool:
    """Whether v varies with x (otherwise it is a scalar in the kernel)."""
    if v.op == "load":
        return not v.attr[1].is_const
    return any(_is_block(a) for a in v.args)


def _expr(v: Value, names: dict, inputs: list[str]) -> str:
    a = [names[arg] for arg in v.args]
    op, dtype = v.op, v.dtype
    cdt = compute_dtype(dtype)
    if op == "load":
        slot, index = v.attr
        ptr, idx = inputs[slot], render(index, "x")
        text = f"tl.load({ptr} + ({idx}))" if index.is_const else f"tl.load({ptr} + ({idx}), xmask)"
        if dtype == torch.bool:
            return f"({text} != 0)"
        return f"{text}.to(tl.float32)" if dtype in _LOW else text
    if op == "const":
        return literal(v.attr, dtype)
    if op == "cast":
        src = v.args[0].dtype
        if dtype == torch.bool:
            return f"({a[0]} != 0)"
        if dtype == torch.bfloat16:
            return f"round_bf16({a[0]}.to(tl.float32))"
        if dtype == torch.float16:
            return f"{a[0]}.to(tl.float16).to(tl.float32)"
        if src == torch.bool:
            return f"{a[0]}.to({TL_DTYPE[dtype]})"
        return f"{a[0]}.to({TL_DTYPE[dtype]})"
    if op in _BINARY:
        return f"{a[0]} {_BINARY[op]} {a[1]}"
    if op == "truediv":
        return f"libm.div_rn({a[0]}, {a[1]})" if cdt == torch.float32 else f"{a[0]} / {a[1]}"
    if op == "truncdiv":
        return f"{a[0]} // {a[1]}"
    if op == "fmod":
        return f"libm.fmod({a[0]}, {a[1]})" if cdt.is_floating_point else f"{a[0]} % {a[1]}"
    if op == "neg":
        return f"-{a[0]}"
    if op == "abs":
        return f"tl.abs({a[0]})"
    if op in ("maximum", "minimum"):
        cmp = ">" if op == "maximum" else "<"
        if cdt.is_floating_point:
            return f"tl.where(({a[0]} {cmp} {a[1]}) | ({a[0]} != {a[0]}), {a[0]}, {a[1]})"
        return f"tl.where({a[0]} {cmp} {a[1]}, {a[0]}, {a[1]})"
    if op == "sigmoid":
        return f"tl.sigmoid({a[0]})" if cdt == torch.float32 else f"1.0 / (1.0 + libm.exp(-{a[0]}))"
    if op in _FAST and cdt == torch.float32:
        return f"tl.{op}({a[0]})"
    if op in _LIBM:
        return f"libm.{_LIBM[op]}({', '.join(a)})"
    if op == "isnan":
        return f"{a[0]} != {a[0]}"
    if op == "where":
        return f"tl.where({a[0]}, {a[1]}, {a[2]})"
    if op == "bitwise_not":
        return f"{a[0]} == 0" if dtype == torch.bool else f"~{a[0]}"
    if op in ("lshift", "rshift"):
        bits = _BITS.get(dtype)
        if bits is None:
            raise KernelError(f"shift of {dtype} is not supported")
        out_of_range = f"(({a[1]} < 0) | ({a[1]} >= {bits}))"
        if op == "lshift":
            return f"tl.where({out_of_range}, 0, {a[0]} << tl.where({out_of_range}, 0, {a[1]}))"
        return f"{a[0]} >> tl.where({out_of_range}, {bits - 1}, {a[1]})"
    raise KernelError(f"no Triton translation for primitive {op!r}")
