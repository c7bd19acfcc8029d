"""The pattern language and its one matcher (tinygrad's `UPat`/`PatternMatcher` is the model).

Patterns (`kitsune.planner.patterns`) are values built from these pieces, and
one engine (`match_shape`, `match_pattern`) walks them over a `UnitGraph`:

- `UnitPat` says which user operations (`kitsune.planner.units.Unit`) a step
  accepts: categories, names, "every node pointwise", the form of a binary
  op's operands, a user pattern's op name; ``a | b`` accepts either.
- `Step` is one step of a shape: its `UnitPat`, whether it is optional, how
  often it may repeat, and how the unit must sit in the match (the only unit
  that fits, feeds only the match, reads only the previous unit, applies only
  right after a unit of some name).
- `PointwiseRegion` and `DequantChain` are structural steps: a connected
  region of pointwise units, and the cast/scale chain that turns an integer
  tensor into a matmul operand.
- `Shape` is a sequence of steps in dataflow order with the step that starts a
  match (its anchor); steps before the anchor are matched walking back through
  producers, steps after it through consumers (depth first, first match wins).
"""
from __future__ import annotations

from dataclasses import dataclass
from enum import Enum
from typing import Iterable

import torch
from torch import fx

from kitsune.sizes import known, numel_of
from kitsune.planner.units import OpCategory, Unit, UnitGraph, tensor_vals


# -- which units a step accepts -------------------------------------------------------

class Operands(str, Enum):
    """The form of a binary unit's two operands (its last aten node's first two arguments)."""
    ANY = "any"
    TENSORS = "two full-size tensors"        # at least two tensors of more than one element
    TENSOR_SCALAR = "a tensor and a scalar"  # one of each (a one-element tensor counts as a scalar)


def _operand_form(unit: Unit) -> tuple[int, int]:
    """(tensor operands with more than one element, scalar operands) of a one-op binary unit."""
    node = unit.kernels[-1] if unit.kernels else None
    if node is None:
        return 0, 0
    tensors = scalars = 0
    for a in list(node.args)[:2]:
        if isinstance(a, fx.Node):
            vals = tensor_vals(a)
            if vals and known(numel_of(vals[0]) > 1):
                tensors += 1
            else:
                scalars += 1
        elif isinstance(a, (int, float, bool)):
            scalars += 1
    return tensors, scalars


@dataclass(frozen=True)
class UnitPat:
    """The units a step accepts: every field that is set must hold.

    categories:   the unit's `OpCategory` is one of these
    names:        the unit's name is one of these
    pointwise:    every aten node of the unit is pointwise (an activation, a cast, arithmetic, ...)
    operands:     the form of a binary unit's operands
    forward_only: not a backward operation (its name does not end in ``_backward``)
    op:           a `FusionPattern` op name, canonical, wildcards allowed (`Unit.matches`)
    """
    categories: frozenset | None = None
    names: frozenset | None = None
    pointwise: bool = False
    operands: Operands = Operands.ANY
    forward_only: bool = False
    op: str | None = None

    def accepts(self, unit: Unit) -> bool:
        if self.categories is not None and unit.category not in self.categories:
            return False
        if self.names is not None and unit.name not in self.names:
            return False
        if self.pointwise and not unit.pointwise:
            return False
        if self.forward_only and unit.name.endswith("_backward"):
            return False
        if self.operands is Operands.TENSORS and _operand_form(unit)[0] < 2:
            return False
        if self.operands is Operands.TENSOR_SCALAR and _operand_form(unit) != (1, 1):
            return False
        return self.op is None or unit.matches(self.op)

    def __or__(self, other) -> AnyOf:
        return AnyOf((self, other))


@dataclass(frozen=True)
class AnyOf:
    """Accepts a unit that any of `pats` accepts."""
    pats: tuple

    def accepts(self, unit: Unit) -> bool:
        return any(p.accepts(unit) for p in self.pats)

    def __or__(self, other) -> AnyOf:
        return AnyOf(self.pats + (other,))


def unit(*categories: OpCategory, names: Iterable[str] | None = None, **fields) -> UnitPat:
    """``unit(OpCategory.NORM, names={"batch_norm"})``: a `UnitPat` in one line."""
    return UnitPat(categories=frozenset(categories) if categories else None,
                   names=frozenset(names) if names is not None else None, **fields)


# -- steps and shapes ------------------------------------------------------------------

@dataclass(frozen=True)
class Step:
    """One step of a shape: one unit (up to `repeat` in a row) that `pat` accepts.

    optional:            the step may match no unit
    repeat:              at most this many units, each consuming the previous one
    sole:                taken only when exactly one unit fits (no search among several)
    feeds_only_match:    (before the anchor) every consumer of the unit is already in the match:
                         a prologue that only feeds the pattern
    reads_only_previous: (after the anchor) the unit reads no unit but the previous one
    after:               the step applies only right after a unit with one of these names;
                         after any other unit it is skipped
    """
    pat: UnitPat | AnyOf
    optional: bool = False
    repeat: int = 1
    sole: bool = False
    feeds_only_match: bool = False
    reads_only_previous: bool = False
    after: frozenset | None = None

    def fits(self, ug: UnitGraph, candidate: Unit, chain: list[Unit]) -> bool:
        if candidate in chain or not self.pat.accepts(candidate):
            return False
        if self.feeds_only_match and not all(c in chain for c in ug.consumers(candidate)):
            return False
        return not self.reads_only_previous or ug.producers(candidate) == chain[-1:]


@dataclass(frozen=True)
class PointwiseRegion:
    """A whole match on its own: connected pointwise units holding at least
    `min_kernels` aten kernels. Two units joined only through a unit that is not
    pointwise (a norm, a matmul) are not connected: the residual adds of a
    transformer are connected, but a layer's work lies between them."""
    min_kernels: int = 2

    def regions(self, ug: UnitGraph) -> list[list[Unit]]:
        parent = {u.index: u.index for u in ug.units if u.pointwise}

        def find(i):
            while parent[i] != i:
                parent[i] = parent[parent[i]]
                i = parent[i]
            return i

        for u in ug.units:
            if u.index not in parent:
                continue
            for other in ug.consumers(u):
                if other.index in parent and not _detour(u, other):
                    parent[find(other.index)] = find(u.index)
        regions: dict[int, list[Unit]] = {}
        for u in ug.units:
            if u.index in parent:
                regions.setdefault(find(u.index), []).append(u)
        return [units for units in regions.values() if sum(len(u.kernels) for u in units) >= self.min_kernels]


def _detour(src: Unit, dst: Unit) -> bool:
    """Is there a path src → ... → dst through a unit that is neither pointwise nor a view?"""
    stack, seen = [(u, False) for u in src.users], set()
    while stack:
        u, outside = stack.pop()
        if u.index > dst.index or (u.index, outside) in seen:
            continue
        seen.add((u.index, outside))
        if u is dst:
            if outside:
                return True
            continue
        outside = outside or not (u.pointwise or u.category is OpCategory.VIEW)
        stack.extend((v, outside) for v in u.users)
    return False


_INT_DTYPES = (torch.int8, torch.uint8, torch.int16, torch.int32) + tuple(
    getattr(torch, name) for name in ("int4", "uint4") if hasattr(torch, name))


def _reads_integer_tensor(u: Unit, full_size: bool) -> bool:
    members = set(u.nodes)
    for node in u.kernels:
        for a in node.all_input_nodes:
            vals = tensor_vals(a) if a not in members else None
            if vals and vals[0].dtype in _INT_DTYPES and (not full_size or known(numel_of(vals[0]) > 1)):
                return True
    return False


@dataclass(frozen=True)
class DequantChain:
    """Before the unit it feeds: the pointwise or quant units (cast, scale, zero
    point) that turn an integer tensor into its operand, at most `max_units`;
    no unit when that unit reads an integer tensor itself. No match otherwise."""
    max_units: int = 5

    def before(self, ug: UnitGraph, consumer: Unit) -> list[Unit] | None:
        if _reads_integer_tensor(consumer, full_size=False):
            return []
        for start in ug.producers(consumer):
            chain, stack = [], [start]
            while stack:
                u = stack.pop()
                if not (u.pointwise or u.category is OpCategory.QUANT) or len(chain) >= self.max_units:
                    break
                chain.append(u)
                if _reads_integer_tensor(u, full_size=True):
                    return sorted(chain, key=lambda v: v.index)
                stack.extend(p for p in ug.producers(u) if p not in chain)
        return None


@dataclass(frozen=True)
class Shape:
    """One way a pattern appears: `steps` in dataflow order.

    anchor:    the step whose unit starts a match (a required single `Step`); steps
               before it are matched walking back through producers, nearest first,
               steps after it through consumers (a depth-first search)
    min_units: a match of fewer units does not count
    disjoint:  a unit in an earlier match of this shape starts no other match
    """
    steps: tuple
    anchor: int = 0
    min_units: int = 1
    disjoint: bool = True

    def __post_init__(self):
        if not self.steps or not 0 <= self.anchor < len(self.steps):
            raise ValueError(f"Shape.anchor {self.anchor} is not one of its {len(self.steps)} steps")
        anchor = self.steps[self.anchor]
        if self.anchor and not (isinstance(anchor, Step) and not anchor.optional and anchor.repeat == 1):
            raise ValueError(f"Shape.steps[{self.anchor}] is the anchor: it must be a required single Step")


def seq(*steps, **options) -> Shape:
    """A `Shape` from steps; a bare `UnitPat` is a required single step."""
    return Shape(tuple(s if isinstance(s, (Step, PointwiseRegion, DequantChain)) else Step(s) for s in steps),
                 **options)


def opt(pat, **options) -> Step:
    return Step(pat, optional=True, **options)


# -- the matcher ----------------------------------------------------------------------

def match_shape(ug: UnitGraph, shape: Shape) -> list[list[Unit]]:
    """Every match of `shape` in `ug`, starting from each unit in graph order."""
    if isinstance(shape.steps[0], PointwiseRegion):
        return shape.steps[0].regions(ug)
    found, used = [], set()
    for start in ug.units:
        if start.index in used:
            continue
        units = _match_at(ug, shape, start)
        if units and len(units) >= shape.min_units:
            found.append(units)
            if shape.disjoint:
                used.update(u.index for u in units)
    return found


def _match_at(ug: UnitGraph, shape: Shape, start: Unit) -> list[Unit] | None:
    if shape.anchor == 0:
        chain = _forward(ug, shape.steps, 0, 0, [start], [])
        return chain if chain and chain[0] is start else None
    if not shape.steps[shape.anchor].pat.accepts(start):
        return None
    chain = _backward(ug, shape.steps[:shape.anchor], start)
    if chain is None:
        return None
    return _forward(ug, shape.steps, shape.anchor + 1, 0, ug.consumers(start), chain)


def _backward(ug: UnitGraph, steps: tuple, anchor: Unit) -> list[Unit] | None:
    """The steps before the anchor, nearest first: no search, each takes its only
    (sole) or first fitting producer."""
    chain, frontier = [anchor], anchor
    for step in reversed(steps):
        if isinstance(step, DequantChain):
            units = step.before(ug, frontier)
            if units is None:
                return None
            chain = units + chain
            frontier = units[0] if units else frontier
            continue
        taken = 0
        while taken < step.repeat:
            fits = [p for p in ug.producers(frontier) if step.fits(ug, p, chain)]
            if not fits or (step.sole and len(fits) != 1):
                break
            chain.insert(0, fits[0])
            frontier, taken = fits[0], taken + 1
        if taken == 0 and not step.optional:
            return None
    return chain


def _forward(ug: UnitGraph, steps: tuple, i: int, count: int, candidates: list[Unit],
             chain: list[Unit]) -> list[Unit] | None:
    """Depth-first: step `i` has taken `count` units; `candidates` may come next."""
    if i == len(steps):
        return chain
    step = steps[i]
    if count == 0 and step.after is not None and not (chain and chain[-1].name in step.after):
        return _forward(ug, steps, i + 1, 0, candidates, chain)
    if count < step.repeat:
        fits = [u for u in candidates if step.fits(ug, u, chain)]
        for u in fits if not step.sole or len(fits) == 1 else []:
            found = _forward(ug, steps, i, count + 1, ug.consumers(u), chain + [u])
            if found is not None:
                return found
    if count > 0 or step.optional:
        return _forward(ug, steps, i + 1, 0, candidates, chain)
    return None


def match_pattern(ug: UnitGraph, pattern) -> list[list[Unit]]:
    """Every match of a `FusionPattern` (built-in or user), shape by shape."""
    return [units for shape in pattern.match_shapes() for units in match_shape(ug, shape)]
