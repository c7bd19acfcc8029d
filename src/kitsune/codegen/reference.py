"""A reference interpreter for `KernelSpec`s, written with PyTorch ops.

It evaluates every primitive over the whole iteration space at once. Slow and
memory-hungry, it exists to test the planner and the lowering independently
of the real code generators (`KITSUNE_BACKEND=reference`), and to document
what each primitive means in PyTorch terms.
"""
from __future__ import annotations

import torch

from kitsune.codegen.kernel import KernelSpec, bind_sizes
from kitsune.ir.index import Index
from kitsune.ir.scalar import walk

_OPMATH = {torch.float16: torch.float32, torch.bfloat16: torch.float32}

# The primitives evaluated elementwise by one PyTorch function of their
# operands (the reference's table, as TRITON_OPS and C_OPS are the backends').
TORCH_OPS = {
    "add": torch.add, "sub": torch.sub, "mul": torch.mul, "truediv": torch.div,
    "truncdiv": lambda a, b: torch.div(a, b, rounding_mode="trunc"), "fmod": torch.fmod,
    "neg": torch.neg, "abs": torch.abs, "maximum": torch.maximum, "minimum": torch.minimum,
    "pow": torch.pow, "exp": torch.exp, "exp2": torch.exp2, "expm1": torch.expm1, "log": torch.log,
    "log1p": torch.log1p, "log2": torch.log2, "sqrt": torch.sqrt, "rsqrt": torch.rsqrt, "tanh": torch.tanh,
    "sigmoid": torch.sigmoid, "erf": torch.erf, "erfc": torch.erfc, "erfinv": torch.erfinv,
    "sin": torch.sin, "cos": torch.cos, "atan2": torch.atan2, "hypot": torch.hypot,
    "floor": torch.floor, "ceil": torch.ceil, "trunc": torch.trunc, "round": torch.round,
    "isnan": torch.isnan, "eq": torch.eq, "ne": torch.ne, "lt": torch.lt, "le": torch.le,
    "gt": torch.gt, "ge": torch.ge, "where": torch.where, "bitwise_and": torch.bitwise_and,
    "bitwise_or": torch.bitwise_or, "bitwise_xor": torch.bitwise_xor,
    "bitwise_not": lambda a: torch.logical_not(a) if a.dtype == torch.bool else torch.bitwise_not(a),
    "lshift": torch.bitwise_left_shift, "rshift": torch.bitwise_right_shift,
}

# The primitives `run_reference` evaluates itself, not through TORCH_OPS, and
# why: each needs more than its operands' values.
SPECIAL_PRIMITIVES = {
    "load": "reads an input at the index its attr gives, over the whole iteration space",
    "load_at": "reads an input at a per-row position, 0 outside the row",
    "const": "a tensor of the attr's value",
    "index": "the attr's index expression evaluated at every x",
    "load_where": "reads an input at index + a computed offset where a mask holds, 0 elsewhere",
    "check_index": "a position, checked to lie in [0, size): out of range is an error where live",
    "reduce": "reduces over r: the flat values reshaped to (rows, R)",
    "cast": "rounds through the target dtype before its compute dtype",
}


def evaluate_index(index: Index, x: torch.Tensor) -> torch.Tensor:
    total = torch.full_like(x, index.const)
    for t in index.terms:
        base = x if t.base is None else evaluate_index(t.base, x)
        digit = base // t.div
        if t.mod is not None:
            digit = digit % t.mod
        total = total + digit * t.coef
    return total


def _reduce(kind: str, arg: torch.Tensor, spec: KernelSpec) -> torch.Tensor:
    """Reduce over r: x = row * R + r, so the flat values reshape to (rows, R)."""
    R = spec.reduction
    rows = arg.expand(spec.numel).reshape(-1, R) if spec.numel else arg.reshape(0, max(R, 1))
    fn = {"sum": lambda t: t.sum(1), "prod": lambda t: t.prod(1), "max": lambda t: t.amax(1),
          "min": lambda t: t.amin(1), "any": lambda t: t.any(1), "all": lambda t: t.all(1)}[kind]
    return fn(rows).repeat_interleave(R)


def _flat(t: torch.Tensor) -> torch.Tensor:
    """Every element of t's storage from its first element on, as a 1-d view."""
    return t.as_strided((t.untyped_storage().nbytes() // t.element_size() - t.storage_offset(),), (1,))


def run_reference(spec: KernelSpec, inputs, outputs) -> None:
    device = outputs[0].device if outputs else torch.device("cpu")
    x = torch.arange(spec.numel, dtype=torch.int64, device=device)
    values = {}
    for v in walk([o.value for o in spec.outputs]):
        dtype = _OPMATH.get(v.dtype, v.dtype)
        if v.op == "load":
            slot, index = v.attr
            flat = _flat(inputs[slot])
            values[v] = flat[evaluate_index(index, x)].to(dtype) if spec.numel else x.to(dtype)
        elif v.op == "load_at":
            slot, index = v.attr
            flat = _flat(inputs[slot])
            R = spec.reduction
            position = values[v.args[0]].to(torch.int64).expand(spec.numel)
            inside = (position >= 0) & (position < R)
            at = x - x % R + torch.where(inside, position, 0)
            picked = flat[evaluate_index(index, at)].to(dtype) if spec.numel else x.to(dtype)
            values[v] = torch.where(inside, picked, torch.zeros((), dtype=dtype, device=device))
        elif v.op == "load_where":
            slot, index, _ = v.attr
            flat = _flat(inputs[slot])
            live = values[v.args[1]].expand(spec.numel)
            at = torch.where(live, evaluate_index(index, x) + values[v.args[0]], 0)
            picked = flat[at].to(dtype) if spec.numel else x.to(dtype)
            values[v] = torch.where(live, picked, torch.zeros((), dtype=dtype, device=device))
        elif v.op == "check_index":
            position, live = values[v.args[0]], values[v.args[1]]
            inside = (position >= 0) & (position < v.attr)
            if bool((~inside & live).any()):
                raise IndexError("index out of range")
            values[v] = torch.where(inside, position, 0)
        elif v.op == "const":
            values[v] = torch.full((), v.attr, dtype=dtype, device=device)
        elif v.op == "index":
            values[v] = evaluate_index(v.attr, x)
        elif v.op == "reduce":
            values[v] = _reduce(v.attr, values[v.args[0]], spec).to(dtype)
        elif v.op == "cast":
            values[v] = values[v.args[0]].to(v.dtype).to(dtype)
        else:
            values[v] = TORCH_OPS[v.op](*(values[a] for a in v.args)).to(dtype)
    for out, tensor in zip(spec.outputs, outputs):
        if spec.numel == 0:
            continue
        flat = _flat(tensor)
        value = values[out.value].to(out.dtype)
        flat[evaluate_index(out.index, x)] = value.expand(spec.numel) if value.dim() == 0 else value


def compile_kernel(spec: KernelSpec):
    def kernel(inputs, outputs, sizes: tuple = ()):
        run_reference(bind_sizes(spec, sizes) if sizes else spec, inputs, outputs)
    return kernel
