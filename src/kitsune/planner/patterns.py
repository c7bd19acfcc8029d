"""Fusion patterns: the named shapes of work that fuse well, built-in and user-defined, as data.

A `FusionPattern` names a sequence of *user operations* as they appear in a
model (``linear``, ``relu``, ``layer_norm``, ``softmax``, ``add``, ...), not the
aten primitives they decompose into (`kitsune.planner.units` recognises each
operation of a captured graph, so one pattern matches whatever decomposition
reached the compiler). Op names are those of `kitsune.planner.vocabulary`; an
op name ending in ``?`` is optional (``"dropout?"``: dropout is absent from
inference graphs because it is the identity there).

The twelve built-in patterns (`BUILTIN_PATTERNS`) are written below in the
language of `kitsune.planner.match`; a user's ``FusionPattern(ops=[...])``
compiles to the same data (one step per op). `detect` runs every pattern over
a unit graph through the one matcher, drops a match that a more specific
pattern covers (`SUPERSEDED_BY`), and returns `FusionOpportunity`s with
roofline estimates (`kitsune.planner.cost`) against eager PyTorch. Whether an
opportunity was *applied* is decided by the planner and the code generators
(see `kitsune.report.analysis`).
"""
from __future__ import annotations

import re
from dataclasses import dataclass, field
from typing import Callable, Iterable

from kitsune.planner.cost import eager_estimate, kernel_estimate
from kitsune.planner.match import (DequantChain, Operands, PointwiseRegion, Shape, Step, UnitPat,
                                   match_pattern, opt, seq, unit)
from kitsune.planner.units import OpCategory, Unit, UnitGraph, is_kernel
from kitsune.planner.vocabulary import canonical_op, known_ops

FUSION_TYPES = ("elementwise", "reduction", "matmul", "conv", "attention", "quantized", "custom")

_NAME_RE = re.compile(r"^[A-Za-z_][A-Za-z0-9_\-.]*$")


# -- FusionPattern --------------------------------------------------------------------

@dataclass(frozen=True)
class FusionPattern:
    """A named sequence of operations that should run as one kernel.

    name:         unique identifier (letters, digits, ``_``, ``-``, ``.``).
    ops:          the user operations in dataflow order, each consuming the
                  previous one's result; at least one required op. A trailing
                  ``?`` makes an op optional.
    fusion_type:  one of `FUSION_TYPES`; describes the kernel kind, used in
                  reports and to tell the user which generator would serve it.
    replacement:  optional callable run instead of the matched ops, with their tensor
                  inputs in the order the ops first read them; it must return one
                  tensor of the ops' result shape and dtype (else, or if it raises,
                  the original ops run, logged). KITSUNE_DEBUG=1 checks every call
                  against the original ops. The match must have one result used
                  outside it. Without a replacement, the pattern steers grouping.
    description:  free text for reports.
    shapes:       the `Shape`s to match; by default one step per op of `ops`
                  (built-in patterns say more than a list of op names can).

    Invalid patterns raise at construction: an empty ``ops`` or an unknown op
    name is a ``ValueError`` naming ``ops``; wrong types are ``TypeError``.
    """

    name: str
    ops: tuple = ()
    fusion_type: str = "elementwise"
    replacement: Callable | None = None
    description: str = ""
    builtin: bool = field(default=False, compare=False, repr=False)
    shapes: tuple = field(default=(), compare=False, repr=False)

    def __post_init__(self):
        if not isinstance(self.name, str) or not self.name:
            raise TypeError(f"FusionPattern.name must be a non-empty str, got {self.name!r}")
        if not _NAME_RE.match(self.name):
            raise ValueError(f"FusionPattern.name {self.name!r} may only hold letters, digits, '_', '-' and '.'")
        object.__setattr__(self, "ops", self._checked_ops())
        if self.fusion_type not in FUSION_TYPES:
            raise ValueError(f"FusionPattern.fusion_type must be one of {FUSION_TYPES}, got {self.fusion_type!r}")
        if self.replacement is not None and not callable(self.replacement):
            raise TypeError(f"FusionPattern.replacement must be callable, got {type(self.replacement).__name__}")
        if not isinstance(self.description, str):
            raise TypeError("FusionPattern.description must be a str")
        if not all(isinstance(s, Shape) for s in self.shapes):
            raise TypeError("FusionPattern.shapes must hold Shapes")

    def _checked_ops(self) -> tuple:
        ops = self.ops
        if isinstance(ops, str) or not hasattr(ops, "__iter__"):
            raise TypeError(f"FusionPattern.ops must be a list of op names, got {type(ops).__name__} {ops!r}")
        ops = tuple(ops)
        if not ops:
            raise ValueError(f"FusionPattern.ops of {self.name!r} is empty: a pattern needs at least one op")
        known = known_ops()
        for i, op in enumerate(ops):
            if not isinstance(op, str):
                raise TypeError(f"FusionPattern.ops[{i}] must be a str, got {type(op).__name__} {op!r}")
            base = op[:-1] if op.endswith("?") else op
            if base.strip().lower() not in known:
                close = sorted(k for k in known if k.startswith(base[:3].lower()))[:6]
                hint = f" (did you mean one of {close}?)" if close else ""
                raise ValueError(f"FusionPattern.ops[{i}] of {self.name!r}: unknown op {op!r}{hint}")
        if all(op.endswith("?") for op in ops):
            raise ValueError(f"FusionPattern.ops of {self.name!r} are all optional: at least one op must be required")
        return ops

    def steps(self) -> list[tuple[str, bool]]:
        """[(canonical op name, optional)] in order."""
        return [(canonical_op(op[:-1]), True) if op.endswith("?") else (canonical_op(op), False) for op in self.ops]

    def match_shapes(self) -> tuple:
        """What the matcher looks for: `shapes`, or `ops` as one chain of steps."""
        if self.shapes:
            return self.shapes
        return (Shape(tuple(Step(UnitPat(op=op), optional=optional) for op, optional in self.steps())),)


# -- the built-in patterns, as data ---------------------------------------------------

POINTWISE = UnitPat(pointwise=True)
ACTIVATION = unit(OpCategory.ACTIVATION)
MATMUL = unit(OpCategory.MATMUL)
BIAS_ADD = unit(OpCategory.BINARY, names={"add", "sub"})
SOFTMAX = unit(OpCategory.SOFTMAX, names={"softmax", "_softmax", "_safe_softmax"})
LOG_SOFTMAX = unit(OpCategory.SOFTMAX, names={"log_softmax", "_log_softmax"})
NLL = unit(names={"nll_loss", "nll_loss_forward", "nll_loss2d_forward", "gather"})
NLL_REDUCTION = unit(OpCategory.POINTWISE, OpCategory.BINARY, OpCategory.REDUCTION)

_SOFTMAX_WITH_PROLOGUE = Shape((
    Step(POINTWISE, optional=True, repeat=3, sole=True, feeds_only_match=True),  # scale, mask
    Step(unit(OpCategory.SOFTMAX, forward_only=True)),
    Step(POINTWISE, optional=True, sole=True, reads_only_previous=True),
), anchor=1, disjoint=False)

_CROSS_ENTROPY = seq(
    LOG_SOFTMAX | SOFTMAX,
    Step(unit(names={"log"}, pointwise=True), after=SOFTMAX.names),                 # softmax → log
    NLL,
    opt(NLL_REDUCTION, repeat=4, sole=True, after=frozenset({"gather"})),           # a decomposed nll's reduction
    disjoint=False)

_ATTENTION = seq(MATMUL, opt(POINTWISE, repeat=3), SOFTMAX, opt(unit(OpCategory.DROPOUT) | POINTWISE), MATMUL)


def _builtin(name, ops, fusion_type, description, *shapes):
    return FusionPattern(name=name, ops=ops, fusion_type=fusion_type, description=description, builtin=True,
                         shapes=shapes)


BUILTIN_PATTERNS: dict[str, FusionPattern] = {p.name: p for p in [
    _builtin("elementwise_chain", ["elementwise", "elementwise"], "elementwise",
             "connected pointwise operations (arithmetic, activations, casts, broadcasts) as one kernel",
             seq(PointwiseRegion(min_kernels=2))),
    _builtin("binary_activation", ["add", "activation"], "elementwise",
             "tensor-tensor add/sub/mul/div followed by an activation",
             seq(unit(OpCategory.BINARY, operands=Operands.TENSORS), ACTIVATION)),
    _builtin("scalar_activation", ["mul", "activation"], "elementwise",
             "tensor-scalar arithmetic followed by an activation",
             seq(unit(OpCategory.BINARY, operands=Operands.TENSOR_SCALAR), ACTIVATION)),
    _builtin("norm_activation", ["layer_norm", "activation"], "reduction",
             "layer/group/RMS/batch norm followed by an activation",
             seq(unit(OpCategory.NORM), ACTIVATION)),
    _builtin("softmax", ["elementwise?", "softmax", "elementwise?"], "reduction",
             "softmax or log_softmax with its pointwise prologue (scale, mask) and epilogue",
             _SOFTMAX_WITH_PROLOGUE),
    _builtin("softmax_cross_entropy", ["log_softmax", "nll_loss"], "reduction",
             "log_softmax (or softmax + log) feeding nll_loss: cross entropy without the probabilities in memory",
             seq(unit(names={"cross_entropy"}), disjoint=False), _CROSS_ENTROPY),
    _builtin("linear_activation", ["linear", "add?", "activation"], "matmul",
             "matmul + bias + activation: the activation as the matmul's epilogue",
             seq(MATMUL, opt(BIAS_ADD), ACTIVATION)),
    _builtin("conv_bn_activation", ["conv", "batch_norm?", "activation?"], "conv",
             "convolution + batch norm (folded) + activation",
             seq(unit(OpCategory.CONV), opt(unit(OpCategory.NORM, names={"batch_norm", "instance_norm"})),
                 opt(ACTIVATION), min_units=2)),
    _builtin("attention", ["matmul", "elementwise?", "softmax", "matmul"], "attention",
             "matmul -> scale -> optional mask -> softmax -> matmul (or scaled_dot_product_attention)",
             seq(unit(OpCategory.ATTENTION), disjoint=False), _ATTENTION),
    _builtin("matrix_chain", ["matmul", "matmul"], "matmul",
             "a matmul whose result feeds another matmul",
             seq(MATMUL, MATMUL)),
    _builtin("quantized_matmul", ["dequantize", "matmul"], "quantized",
             "matmul with a weight dequantized from an integer tensor (cast, scale, zero point)",
             seq(DequantChain(), MATMUL, anchor=1, disjoint=False)),
    _builtin("quantized_matmul_activation", ["dequantize", "matmul", "activation"], "quantized",
             "quantized matmul + optional bias + activation",
             seq(DequantChain(), MATMUL, opt(BIAS_ADD), ACTIVATION, anchor=1, disjoint=False)),
]}

BUILTIN_NAMES = frozenset(BUILTIN_PATTERNS)

# pattern -> more specific patterns that replace it when they cover all of its units
SUPERSEDED_BY = {
    "elementwise_chain": {"binary_activation", "scalar_activation"},
    "norm_activation": {"conv_bn_activation"},
    "linear_activation": {"quantized_matmul_activation"},
    "binary_activation": {"linear_activation", "quantized_matmul_activation"},
    "scalar_activation": {"quantized_matmul_activation"},
    "softmax": {"attention", "softmax_cross_entropy"},
    "quantized_matmul": {"quantized_matmul_activation"},  # with an activation it is only the latter
}


# -- opportunities --------------------------------------------------------------------

@dataclass
class FusionOpportunity:
    """One place in a graph where a pattern applies.

    pattern:            pattern name (built-in or user)
    nodes:              names of the graph nodes it covers, in graph order
    ops:                the user operations matched, in order (e.g. ("linear", "gelu"))
    estimated_speedup:  eager time / fused time under the roofline model (>= 0)
    bytes_saved:        memory traffic removed vs eager: intermediates neither written nor read back
    fusion_type:        the pattern's kernel kind (elementwise, reduction, matmul, ...)
    graph:              the graph it was found in ("forward", "backward", "inference", ...)
    status:             "detected" until compiled; then "applied" (one Kitsune kernel holds all of
                        its operations), "partial" (some fused), "not applied" or "disabled"
    reason:             why it is not (fully) applied
    kernels:            names of the Kitsune kernels holding its nodes
    """

    pattern: str
    nodes: tuple
    ops: tuple
    estimated_speedup: float
    bytes_saved: int
    fusion_type: str = "elementwise"
    graph: str = ""
    status: str = "detected"
    reason: str = ""
    kernels: tuple = ()
    custom: bool = False
    eager_kernels: int = 0
    eager_seconds: float = 0.0
    fused_seconds: float = 0.0
    fx_nodes: list = field(default_factory=list, repr=False, compare=False)
    replaced_by: object = field(default=None, repr=False, compare=False)  # a user pattern's ReplacementCall
    choice: str = ""    # a rewrite's: what runs instead (kitsune.capture.rewrites), e.g. "folded into ..."
    rewrite: bool = False  # made from a Rewrite, not detected: its status is the rewrite's

    @property
    def memory_savings(self) -> int:
        """Spec 03's name for `bytes_saved`."""
        return self.bytes_saved

    @property
    def node_ids(self) -> tuple:
        """Spec 03's name for `nodes`."""
        return self.nodes

    @property
    def applied(self) -> bool:
        return self.status == "applied"

    def compute_nodes(self) -> list:
        return [n for n in self.fx_nodes if is_kernel(n)]

    def describe(self) -> str:
        return " → ".join(self.ops)

    def as_dict(self) -> dict:
        return {"pattern": self.pattern, "graph": self.graph, "ops": list(self.ops), "nodes": list(self.nodes),
                "estimated_speedup": round(self.estimated_speedup, 3), "bytes_saved": self.bytes_saved,
                "fusion_type": self.fusion_type, "status": self.status, "reason": self.reason,
                "kernels": list(self.kernels), "custom": self.custom, "choice": self.choice}


def pattern_registry(custom: Iterable[FusionPattern] = (), extra: Iterable[FusionPattern] = ()) -> dict:
    """name -> FusionPattern: every built-in, then `custom` (a FusionConfig's), then
    the patterns of `extra` whose names `custom` does not use. A user pattern may
    not take a built-in pattern's name (ValueError)."""
    custom = list(custom)
    names = {p.name for p in custom}
    patterns: dict[str, FusionPattern] = dict(BUILTIN_PATTERNS)
    for p in custom + [p for p in extra if p.name not in names]:
        if p.name in BUILTIN_PATTERNS:
            raise ValueError(f"pattern name {p.name!r} is a built-in pattern")
        patterns[p.name] = p
    return patterns


def detect(ug: UnitGraph, patterns: dict | None = None, graph_name: str = "") -> list[FusionOpportunity]:
    """Every match of `patterns` (name -> FusionPattern; default: the built-ins) in
    `ug`, pattern by pattern, with the matches a more specific pattern covers dropped."""
    patterns = BUILTIN_PATTERNS if patterns is None else patterns
    found = [(name, units) for name, pattern in patterns.items() for units in match_pattern(ug, pattern)]
    return [_opportunity(ug, patterns[name], units, graph_name) for name, units in _drop_superseded(found)]


def _drop_superseded(found: list) -> list:
    keep = []
    for name, units in found:
        covered = {u.index for u in units}
        better = SUPERSEDED_BY.get(name, set())
        if any(other in better and covered <= {u.index for u in other_units} for other, other_units in found):
            continue
        keep.append((name, units))
    return keep


def _opportunity(ug: UnitGraph, pattern: FusionPattern, units: list[Unit], graph_name: str) -> FusionOpportunity:
    units = sorted(units, key=lambda u: u.index)
    members = set()
    for u in units:
        members.update(u.nodes)
    for a in units:  # views between matched units belong to the fused kernel's indexing
        for b in units:
            if a is not b:
                for v in ug.views_between(a, b):
                    members.update(v.nodes)
    order = {n: i for i, n in enumerate(ug.graph.nodes)}
    nodes = sorted(members, key=order.__getitem__)
    eager = eager_estimate(units)
    fused = kernel_estimate(nodes)
    speedup = eager.seconds / fused.seconds if fused.seconds > 0 else 1.0
    return FusionOpportunity(
        pattern=pattern.name, nodes=tuple(n.name for n in nodes), ops=tuple(u.name for u in units),
        estimated_speedup=speedup, bytes_saved=max(0, eager.bytes - fused.bytes),
        fusion_type=pattern.fusion_type, graph=graph_name, custom=not pattern.builtin,
        eager_kernels=eager.launches, eager_seconds=eager.seconds, fused_seconds=fused.seconds,
        fx_nodes=nodes)
