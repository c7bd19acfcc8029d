"""The backend-neutral description of one fused kernel.

The planner's groups are lowered (by `kitsune.codegen.lower`) into a
`KernelSpec`: which tensors are read, which are written, and for each output
the scalar expression (`kitsune.ir.scalar.Value`) of its element at flat
iteration index `x`. Backends (`codegen/triton`, `codegen/cpu`) turn a spec
into source text and a callable; they never look at the FX graph.
"""
from __future__ import annotations

import hashlib
from dataclasses import dataclass, replace

import torch

from kitsune.ir.index import Index, Term
from kitsune.ir.scalar import Value, walk
from kitsune.sizes import as_size, evaluate, hint, is_symbolic

# the reduction analysis lives in codegen/schedule.py; these names stay importable from here
from kitsune.codegen.schedule import is_row_index, outer_layout, reduction_stage, row_values  # noqa: F401


@dataclass(frozen=True)
class KernelInput:
    name: str            # parameter name in generated source, e.g. "in0"
    dtype: torch.dtype   # storage dtype of the tensor passed at run time


@dataclass(frozen=True)
class KernelOutput:
    name: str            # parameter name, e.g. "out0"
    dtype: torch.dtype   # storage dtype; the value is converted to it on store
    index: Index         # element offset (in elements) written at iteration x
    value: Value


@dataclass(frozen=True)
class KernelSpec:
    """A pointwise kernel: for x in range(numel): out_k[index_k(x)] = value_k(x).

    `load` Values carry attr (slot, Index): read inputs[slot] at that element
    offset (`load_where`: plus a computed offset, where a mask holds). Tensors are passed with their storage offset already applied (a
    data pointer), so offsets are relative to element 0 of the tensor.
    """

    name: str
    numel: int
    inputs: tuple[KernelInput, ...]
    outputs: tuple[KernelOutput, ...]
    description: str = ""  # the graph nodes fused, for the header comment
    # Reduction kernels: the flat variable x splits into a row x // reduction
    # and a position r = x % reduction along the reduced elements; `reduce`
    # Values collapse r. 0 for pointwise kernels.
    reduction: int = 0
    # Symbolic sizes (dynamic shapes): the names of the symbols that numel,
    # reduction and the indices are expressions of (sympy, `kitsune.sizes`),
    # each an integer argument of the kernel after numel, in this order.
    sizes: tuple[str, ...] = ()

    @property
    def rows(self) -> int:
        return as_size(self.numel // self.reduction) if self.reduction else self.numel

    def wide_index(self) -> bool:
        """Does the kernel need 64-bit indexing? A symbolic kernel is narrow while
        the sizes seen leave a wide margin (8x); its launcher checks each call's
        sizes and runs the group unfused beyond them (`index_limit`)."""
        if self.sizes:
            return self.max_offset() >= INDEX_MARGIN
        return self.max_offset() >= INDEX_LIMIT

    def values(self) -> list[Value]:
        return walk([o.value for o in self.outputs])

    def max_offset(self) -> int:
        """Largest element offset touched: decides 32- vs 64-bit indexing (for
        symbolic sizes, at the sizes seen when the graph was captured)."""
        numel = hint(self.numel)
        bounds = [numel]
        for v in self.values():
            if v.op in ("load", "load_at"):
                bounds.append(_bound(v.attr[1], numel))
            elif v.op == "load_where":  # the offset stays inside the input (its extent)
                bounds.append(_bound(v.attr[1], numel) + hint(v.attr[2]))
        bounds += [_bound(o.index, numel) for o in self.outputs]
        return max(bounds)

    def structure_key(self) -> str:
        """Hash of everything that changes the generated code (the name does not).
        Kept on the spec: naming, the source's function name and the CPU library
        all ask for it, and it walks every Value."""
        key = self.__dict__.get("_structure_key")
        if key is None:
            text = repr((self.numel, self.reduction, self.inputs,
                         [(o.name, o.dtype, o.index) for o in self.outputs], _structure(self.values()))
                        + ((self.sizes,) if self.sizes else ()))
            key = hashlib.sha256(text.encode()).hexdigest()[:24]
            object.__setattr__(self, "_structure_key", key)  # a cache, not a field: equality ignores it
        return key


def _structure(values) -> list:
    """Values as (op, dtype, attr, operand positions): stable across processes
    (Python's hash() of strings is salted per process, so it cannot key a disk cache)."""
    position = {v: i for i, v in enumerate(values)}
    return [(v.op, v.dtype, _attr_repr(v.attr), tuple(position[a] for a in v.args)) for v in values]


def _attr_repr(attr):
    return repr(attr)


def bind_sizes(spec: KernelSpec, sizes: tuple) -> KernelSpec:
    """`spec` with its symbolic sizes bound to ints (`sizes`, in `spec.sizes`
    order): the kernel one size class stands for, as a static spec (for the
    reference interpreter and for tests)."""
    if not spec.sizes:
        return spec
    table = {name: value for name, value in zip(spec.sizes, sizes)}

    def size(v):
        return evaluate(v, table) if v is not None else None

    def index(i: Index) -> Index:
        return Index(size(i.const), tuple(Term(size(t.coef), None if t.base is None else index(t.base),
                                               size(t.div), size(t.mod)) for t in i.terms))

    memo: dict = {}
    for v in spec.values():
        attr = v.attr
        if v.op in ("load", "load_at"):
            attr = (attr[0], index(attr[1]))
        elif v.op == "load_where":
            attr = (attr[0], index(attr[1]), size(attr[2]))
        elif v.op == "check_index":
            attr = size(attr)
        elif v.op == "index":
            attr = index(attr)
        elif v.op == "const" and is_symbolic(attr):
            attr = size(attr)
        memo[v] = Value(v.op, tuple(memo[a] for a in v.args), v.dtype, attr)
    outputs = tuple(replace(o, index=index(o.index), value=memo[o.value]) for o in spec.outputs)
    return replace(spec, numel=size(spec.numel), reduction=size(spec.reduction), outputs=outputs, sizes=())


INDEX_LIMIT = 2**31 - 2**16  # offsets from here on need 64-bit indexing
INDEX_MARGIN = 2**28       # a symbolic kernel is narrow below this at the sizes seen


def _bound(index: Index, numel: int) -> int:
    """Upper bound of index over x in [0, numel) (symbolic sizes at their hints)."""
    total = hint(index.const)
    for t in index.terms:
        base_max = numel - 1 if t.base is None else _bound(t.base, numel)
        digit = base_max // hint(t.div)
        if t.mod is not None:
            digit = min(digit, hint(t.mod) - 1)
        total += max(hint(t.coef) * digit, 0)
    return total


# ops through which a relative error of an operand reaches the result at most
# unchanged in size (as a branch of `where`, not as its condition)
_WELL_CONDITIONED = {"mul", "truediv", "neg", "abs", "cast", "where", "sqrt", "rsqrt"}


def reaches_only_low_precision(spec: KernelSpec, value: Value) -> bool:
    """Does every use of `value` reach an output stored as bfloat16/float16
    through well-conditioned ops only (products, quotients, casts, selection)?
    Then a relative error far below the output's rounding (2^-9 for bf16,
    2^-12 for fp16) stays invisible: backends may compute `value` with a
    cheaper approximation. A sum, a difference or a reduction on the way
    could cancel and magnify the error, so any of them says no."""
    users: dict = {}
    for v in spec.values():
        for position, a in enumerate(v.args):
            users.setdefault(a, []).append((v, position))
    stored = {}
    for out in spec.outputs:
        stored.setdefault(out.value, []).append(out.dtype)
    low = (torch.float16, torch.bfloat16)
    stack, seen = [value], set()
    while stack:
        v = stack.pop()
        if v in seen:
            continue
        seen.add(v)
        if any(dtype not in low for dtype in stored.get(v, ())):
            return False
        for user, position in users.get(v, ()):
            if user.op not in _WELL_CONDITIONED or (user.op == "where" and position == 0):
                return False
            if user.op == "cast" and not user.dtype.is_floating_point:
                return False
            stack.append(user)
    return any(v in stored for v in seen)


class KernelError(RuntimeError):
    """Raised by a backend when a kernel cannot be generated, built or launched."""
