"""What every code generator needs to know about a reduction kernel, computed once.

A reduction `KernelSpec` splits its flat variable x into a row x // R and a
position r = x % R along the R reduced elements. Both emitters (Triton and C)
generate the same structure from it: the values constant along r (row values)
are computed once per row; the reductions are computed stage by stage (a
reduction that needs another's result, like the variance the mean, is one
stage later, and needs its own pass over the row); per-element outputs are
stored by the last pass, or by the first one if they need no reduction
("early"); row outputs are stored once per row. `ReductionSchedule.of(spec)`
is that analysis; the emitters only decide how to lay it out in their code.
"""
from __future__ import annotations

import functools
from dataclasses import dataclass
from typing import TYPE_CHECKING

from kitsune.ir.index import Index
from kitsune.ir.scalar import opmath_dtype

if TYPE_CHECKING:  # kernel.py re-exports this module's helpers
    from kitsune.codegen.kernel import KernelSpec

__all__ = ["ReductionSchedule", "is_row_index", "opmath_dtype", "outer_layout", "reduction_stage", "row_values"]

# opmath_dtype (kitsune.ir.scalar): the dtype a value is computed in, float32 for
# float16/bfloat16 (the numerics contract); re-exported for the emitters.


def is_row_index(index: Index, reduction: int) -> bool:
    """Does `index` depend on x only through the row x // reduction?"""
    for t in index.terms:
        if t.base is None:
            if t.div % reduction:
                return False
        elif not is_row_index(t.base, reduction):
            return False
    return True


def row_values(spec: "KernelSpec") -> set:
    """The Values of a reduction kernel that are constant along r (one per row)."""
    rows: set = set()
    for v in spec.values():
        if v.op in ("load", "index"):
            if is_row_index(v.attr[1] if v.op == "load" else v.attr, spec.reduction):
                rows.add(v)
        elif v.op == "load_where":
            if is_row_index(v.attr[1], spec.reduction) and all(a in rows for a in v.args):
                rows.add(v)
        elif v.op in ("const", "reduce") or all(a in rows for a in v.args):
            rows.add(v)
    return rows


def reduction_stage(spec: "KernelSpec") -> dict:
    """Value -> how many reductions lie on its longest path from the loads."""
    stage: dict = {}
    for v in spec.values():
        s = max((stage[a] for a in v.args), default=0)
        stage[v] = s + 1 if v.op == "reduce" else s
    return stage


def _contiguous_along(index: Index, reduction: int) -> str | None:
    """'r' if consecutive positions along the row are adjacent in memory,
    'row' if consecutive rows are (x = row * R + r), else None."""
    for t in index.terms:
        if t.base is None and t.coef == 1:
            if t.div == 1:
                return "r"
            if t.div == reduction:
                return "row"
    return None


def outer_layout(spec: "KernelSpec") -> bool:
    """Is this an outer (column) reduction: do the kernel's per-element
    accesses walk memory across rows rather than along them? A bias gradient
    (a [N, C] tensor summed over N) reads x = c * N + n at n * C + c: rows (the
    columns c) are adjacent, the reduced positions n are C apart. Such
    kernels are generated with the loops the other way round (a tile of
    adjacent rows, reduced together), so that every load is contiguous."""
    if not spec.reduction:
        return False
    return ReductionSchedule.of(spec).outer


def _outer_layout(spec: "KernelSpec", rows: frozenset) -> bool:
    weight = {"r": 0, "row": 0}
    accesses = [(v.attr[1], v.dtype) for v in spec.values() if v.op == "load" and v not in rows]
    accesses += [(o.index, o.dtype) for o in spec.outputs
                 if o.value not in rows or not is_row_index(o.index, spec.reduction)]
    for index, dtype in accesses:
        along = _contiguous_along(index, spec.reduction)
        if along:
            weight[along] += dtype.itemsize
    return weight["row"] > weight["r"]


@dataclass(frozen=True, eq=False)
class ReductionSchedule:
    """The analysis of one reduction kernel that both emitters lay out.

    Outputs keep the spec's order within each list. A row value stored at an
    index that walks the row too (a broadcast row value written at full shape)
    is a full output, stored by the element loop."""

    values: tuple            # spec.values(): every Value, operands first
    row: frozenset           # Values constant along r (one per row)
    stage: dict              # Value -> reductions on its longest path from the loads
    reductions: tuple        # the `reduce` Values, in `values` order
    max_stage: int           # the number of passes over a row that reduce
    row_outputs: tuple       # outputs of one value per row, stored per row
    full_outputs: tuple      # every other output (per element)
    early_outputs: tuple     # full outputs that need no reduction (empty without reductions):
                             # a looped kernel stores them in its first pass
    outer: bool              # outer (column) layout, see `outer_layout`

    @staticmethod
    def of(spec: "KernelSpec") -> "ReductionSchedule":
        """The schedule of a reduction spec (cached per spec)."""
        return _schedule(spec)

    @property
    def late_outputs(self) -> tuple:
        """The full outputs stored by the last pass of a looped kernel."""
        return tuple(o for o in self.full_outputs if o not in self.early_outputs)

    def reductions_of_stage(self, s: int) -> list:
        """The reductions computed by pass s (1-based)."""
        return [v for v in self.reductions if self.stage[v] == s]

    def row_stage_values(self, s: int) -> list:
        """The row values (reductions excluded) computable once stage s is done."""
        return [v for v in self.values if v in self.row and v.op != "reduce" and self.stage[v] == s]


@functools.lru_cache(maxsize=256)
def _schedule(spec: "KernelSpec") -> ReductionSchedule:
    R = spec.reduction
    values = tuple(spec.values())
    row = frozenset(row_values(spec))
    stage = reduction_stage(spec)
    reductions = tuple(v for v in values if v.op == "reduce")
    max_stage = max((stage[v] for v in reductions), default=0)
    row_outputs = tuple(o for o in spec.outputs if o.value in row and is_row_index(o.index, R))
    full_outputs = tuple(o for o in spec.outputs if o not in row_outputs)
    early = tuple(o for o in full_outputs if stage[o.value] == 0) if max_stage else ()
    return ReductionSchedule(values=values, row=row, stage=stage, reductions=reductions, max_stage=max_stage,
                             row_outputs=row_outputs, full_outputs=full_outputs, early_outputs=early,
                             outer=_outer_layout(spec, row))
