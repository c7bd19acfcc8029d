"""Find the named fusion patterns in a captured aten graph.

    detector = FusionDetector()                     # every built-in pattern
    for opp in detector.detect(gm):                 # an aten fx.GraphModule / fx.Graph
        print(opp.pattern, opp.ops, opp.estimated_speedup, opp.bytes_saved)
    detector.detect(model, x)                       # capture model(x) first (Dynamo + AOTAutograd)

Matching works on user operations (`kitsune.fusion.units`), so a pattern is
found whatever decomposition reached the compiler: ``softmax`` as one
``_softmax`` node or as ``amax/sub/exp/sum/div``, ``linear`` as ``addmm`` or
``mm`` + ``add``, ``layer_norm`` whole or as ``var_mean``/``rsqrt``/...

Every `FusionOpportunity` carries an estimate (`kitsune.fusion.cost`) against
eager PyTorch: eager runs one kernel per user operation, the fused kernel
reads its inputs once and writes only what is needed outside. Whether an
opportunity was *applied* is decided by the planner and the code generators;
the compiler fills in `status` and `reason` (see `kitsune.report.analysis`).
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Callable, Iterable

import torch
from torch import fx

from kitsune.fusion import patterns as P
from kitsune.fusion.cost import eager_estimate, kernel_estimate
from kitsune.fusion.units import Unit, UnitGraph, is_kernel, target_name, tensor_vals


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
                "kernels": list(self.kernels), "custom": self.custom}


# -- unit predicates ------------------------------------------------------------------

def _is_activation(u: Unit) -> bool:
    return u.category == "activation"


def _operands(u: Unit) -> tuple[int, int]:
    """(tensor operands with more than one element, scalar operands) of a one-op binary unit."""
    node = u.kernels[-1] if u.kernels else None
    if node is None:
        return 0, 0
    tensors = scalars = 0
    for a in list(node.args)[:2]:
        if isinstance(a, fx.Node):
            vals = tensor_vals(a)
            if vals and vals[0].numel() > 1:
                tensors += 1
            else:
                scalars += 1
        elif isinstance(a, (int, float, bool)):
            scalars += 1
    return tensors, scalars


def _is_tensor_binary(u: Unit) -> bool:
    return u.category == "binary" and _operands(u)[0] >= 2


def _is_scalar_binary(u: Unit) -> bool:
    return u.category == "binary" and _operands(u) == (1, 1)


def _is_norm(u: Unit) -> bool:
    return u.category == "norm"


def _is_matmul(u: Unit) -> bool:
    return u.category == "matmul"


def _is_bias_add(u: Unit) -> bool:
    return u.category == "binary" and u.name in ("add", "sub")


def _is_conv(u: Unit) -> bool:
    return u.category == "conv"


def _is_batch_norm(u: Unit) -> bool:
    return u.category == "norm" and u.name in ("batch_norm", "instance_norm")


def _is_softmax(u: Unit) -> bool:
    return u.category == "softmax" and u.name in ("softmax", "_softmax", "_safe_softmax")


def _is_any_softmax(u: Unit) -> bool:
    return u.category == "softmax" and not u.name.endswith("_backward")


def _is_log_softmax(u: Unit) -> bool:
    return u.category == "softmax" and u.name in ("log_softmax", "_log_softmax")


def _is_nll(u: Unit) -> bool:
    return u.name in ("nll_loss", "nll_loss_forward", "nll_loss2d_forward", "gather")


def _is_log(u: Unit) -> bool:
    return u.pointwise and u.name == "log"


def _is_pointwise(u: Unit) -> bool:
    return u.pointwise


def _is_dropout_or_pointwise(u: Unit) -> bool:
    return u.pointwise or u.category == "dropout"


# -- sequence matching ----------------------------------------------------------------

Step = tuple  # (predicate(Unit) -> bool, optional: bool)


def match_sequence(ug: UnitGraph, steps: list, start: Unit) -> list[Unit] | None:
    """Units u0 → u1 → ... (each consuming the previous one, views skipped)
    satisfying `steps` from `start`; optional steps are taken when they match."""
    def go(i: int, candidates: list[Unit], chain: list[Unit]):
        if i == len(steps):
            return chain
        pred, optional = steps[i]
        for unit in candidates:
            if unit in chain or not pred(unit):
                continue
            found = go(i + 1, ug.consumers(unit), chain + [unit])
            if found is not None:
                return found
        if optional:
            return go(i + 1, candidates, chain)
        return None

    return go(0, [start], [])


def _sequence_matcher(steps: list, min_units: int = 1) -> Callable:
    def matcher(ug: UnitGraph) -> list[list[Unit]]:
        found, used = [], set()
        for unit in ug.units:
            if unit.index in used:
                continue
            chain = match_sequence(ug, steps, unit)
            if chain and chain[0] is unit and len(chain) >= min_units:
                found.append(chain)
                used.update(u.index for u in chain)
        return found
    return matcher


def _op_predicate(op: str) -> Callable[[Unit], bool]:
    return lambda unit: unit.matches(op)


def pattern_matcher(pattern: P.FusionPattern) -> Callable:
    """The matcher of a user pattern: its ops as a dataflow chain."""
    steps = [(_op_predicate(op), optional) for op, optional in pattern.steps()]
    return _sequence_matcher(steps)


# -- built-in matchers ----------------------------------------------------------------

def _elementwise_chains(ug: UnitGraph) -> list[list[Unit]]:
    """Connected components of pointwise units holding at least two aten kernels."""
    parent = {u.index: u.index for u in ug.units if u.pointwise}

    def find(i):
        while parent[i] != i:
            parent[i] = parent[parent[i]]
            i = parent[i]
        return i

    for unit in ug.units:
        if unit.index not in parent:
            continue
        for other in ug.consumers(unit):
            if other.index in parent and not _detour(ug, unit, other):
                parent[find(other.index)] = find(unit.index)
    comps: dict[int, list[Unit]] = {}
    for unit in ug.units:
        if unit.index in parent:
            comps.setdefault(find(unit.index), []).append(unit)
    return [units for units in comps.values() if sum(len(u.kernels) for u in units) >= 2]


def _detour(ug: UnitGraph, src: Unit, dst: Unit) -> bool:
    """Is there a path src → ... → dst through a unit that is not pointwise (a norm,
    a matmul)? Then src and dst cannot share a kernel: the residual adds of a
    transformer are connected, but a layer's work lies between them."""
    stack, seen = [(u, False) for u in src.users], set()
    while stack:
        unit, outside = stack.pop()
        if unit.index > dst.index or (unit.index, outside) in seen:
            continue
        seen.add((unit.index, outside))
        if unit is dst:
            if outside:
                return True
            continue
        outside = outside or not (unit.pointwise or unit.category == "view")
        stack.extend((u, outside) for u in unit.users)
    return False


def _softmax_matches(ug: UnitGraph) -> list[list[Unit]]:
    found = []
    for unit in ug.units:
        if not _is_any_softmax(unit):
            continue
        chain = [unit]
        frontier = unit
        for _ in range(3):  # pointwise prologue that only feeds the softmax (scale, mask)
            pre = [p for p in ug.producers(frontier)
                   if p.pointwise and all(c in chain for c in ug.consumers(p))]
            if len(pre) != 1:
                break
            chain.insert(0, pre[0])
            frontier = pre[0]
        post = [c for c in ug.consumers(unit) if c.pointwise and ug.producers(c) == [unit]]
        if len(post) == 1:
            chain.append(post[0])
        found.append(chain)
    return found


def _cross_entropy_matches(ug: UnitGraph) -> list[list[Unit]]:
    found = [[u] for u in ug.units if u.name == "cross_entropy"]
    for start in ug.units:
        if _is_log_softmax(start):
            chain = match_sequence(ug, [(_is_log_softmax, False), (_is_nll, False)], start)
        elif _is_softmax(start):
            chain = match_sequence(ug, [(_is_softmax, False), (_is_log, False), (_is_nll, False)], start)
        else:
            continue
        if not chain:
            continue
        tail = chain[-1]
        if tail.name == "gather":  # a decomposed nll_loss: follow its reduction chain
            for _ in range(4):
                nxt = [c for c in ug.consumers(tail) if c.category in ("pointwise", "binary", "reduction")]
                if len(nxt) != 1:
                    break
                tail = nxt[0]
                chain.append(tail)
        found.append(chain)
    return found


def _attention_matches(ug: UnitGraph) -> list[list[Unit]]:
    found = [[u] for u in ug.units if u.category == "attention"]
    steps = [(_is_matmul, False), (_is_pointwise, True), (_is_pointwise, True), (_is_pointwise, True),
             (_is_softmax, False), (_is_dropout_or_pointwise, True), (_is_matmul, False)]
    found += _sequence_matcher(steps)(ug)
    return found


_INT_DTYPES = (torch.int8, torch.uint8, torch.int16, torch.int32) + tuple(
    getattr(torch, name) for name in ("int4", "uint4") if hasattr(torch, name))


def _dequant_chain(ug: UnitGraph, mm: Unit) -> list[Unit] | None:
    """Pointwise units (cast, scale, zero point) turning an integer tensor into
    an operand of `mm`; [] when `mm` reads an integer tensor itself; None if neither."""
    members = set(mm.nodes)
    for node in mm.kernels:
        for a in node.all_input_nodes:
            if a in members:
                continue
            vals = tensor_vals(a)
            if vals and vals[0].dtype in _INT_DTYPES:
                return []
    for start in ug.producers(mm):
        chain, stack = [], [start]
        while stack:
            unit = stack.pop()
            if not (unit.pointwise or unit.category == "quant") or len(chain) > 4:
                break
            chain.append(unit)
            for node in unit.kernels:
                for a in node.all_input_nodes:
                    if a in set(unit.nodes):
                        continue
                    vals = tensor_vals(a)
                    if vals and vals[0].dtype in _INT_DTYPES and vals[0].numel() > 1:
                        return sorted(chain, key=lambda u: u.index)
            stack.extend(p for p in ug.producers(unit) if p not in chain)
    return None


def _quantized_matches(ug: UnitGraph, with_activation: bool) -> list[list[Unit]]:
    found = []
    for mm in ug.units:
        if not _is_matmul(mm):
            continue
        dequant = _dequant_chain(ug, mm)
        if dequant is None:
            continue
        tail = match_sequence(ug, [(_is_matmul, False), (_is_bias_add, True), (_is_activation, False)], mm)
        if with_activation:
            if tail:
                found.append(dequant + tail)
        elif not tail:
            found.append(dequant + [mm])
    return found


def _conv_bn_activation(ug: UnitGraph) -> list[list[Unit]]:
    matcher = _sequence_matcher([(_is_conv, False), (_is_batch_norm, True), (_is_activation, True)], min_units=2)
    return matcher(ug)


BUILTIN_MATCHERS: dict[str, Callable[[UnitGraph], list]] = {
    "elementwise_chain": _elementwise_chains,
    "binary_activation": _sequence_matcher([(_is_tensor_binary, False), (_is_activation, False)]),
    "scalar_activation": _sequence_matcher([(_is_scalar_binary, False), (_is_activation, False)]),
    "norm_activation": _sequence_matcher([(_is_norm, False), (_is_activation, False)]),
    "softmax": _softmax_matches,
    "softmax_cross_entropy": _cross_entropy_matches,
    "linear_activation": _sequence_matcher([(_is_matmul, False), (_is_bias_add, True), (_is_activation, False)]),
    "conv_bn_activation": _conv_bn_activation,
    "attention": _attention_matches,
    "matrix_chain": _sequence_matcher([(_is_matmul, False), (_is_matmul, False)]),
    "quantized_matmul": lambda ug: _quantized_matches(ug, with_activation=False),
    "quantized_matmul_activation": lambda ug: _quantized_matches(ug, with_activation=True),
}

# pattern -> more specific patterns that replace it when they cover all of its units
SUPERSEDED_BY = {
    "elementwise_chain": {"binary_activation", "scalar_activation"},
    "norm_activation": {"conv_bn_activation"},
    "linear_activation": {"quantized_matmul_activation"},
    "binary_activation": {"linear_activation", "quantized_matmul_activation"},
    "scalar_activation": {"quantized_matmul_activation"},
    "softmax": {"attention", "softmax_cross_entropy"},
}


class FusionDetector:
    """Finds fusion opportunities: every built-in pattern plus `patterns`.

    FusionDetector(patterns=None, config=None)
      patterns: extra (user) FusionPatterns to look for.
      config:   a FusionConfig; its custom_patterns are looked for too.
    detect(graph) -> list[FusionOpportunity] for an aten fx.Graph / fx.GraphModule;
    detect(model_or_fn, *example_inputs) captures the call through Dynamo and
    AOTAutograd (forward graph, plus backward when an input requires grad)
    and detects in every captured graph.
    """

    def __init__(self, patterns: Iterable[P.FusionPattern] | None = None, config=None):
        from kitsune.config import FusionConfig
        if config is not None and not isinstance(config, FusionConfig):
            raise TypeError(f"FusionDetector config must be a FusionConfig, got {type(config).__name__}")
        extra = list(patterns or [])
        for p in extra:
            if not isinstance(p, P.FusionPattern):
                raise TypeError(f"FusionDetector patterns must be FusionPatterns, got {type(p).__name__}")
        self.config = config
        custom = list(config.custom_patterns) if config is not None else []
        names = {p.name for p in custom}
        self.patterns: dict[str, P.FusionPattern] = dict(P.BUILTIN_PATTERNS)
        for p in custom + [p for p in extra if p.name not in names]:
            if p.name in P.BUILTIN_PATTERNS:
                raise ValueError(f"pattern name {p.name!r} is a built-in pattern")
            self.patterns[p.name] = p

    def detect(self, target, *example_inputs, graph_name: str = "") -> list[FusionOpportunity]:
        if isinstance(target, fx.GraphModule):
            target = target.graph
        if isinstance(target, fx.Graph):
            return self.detect_units(UnitGraph(target), graph_name)
        if callable(target):
            return [opp for name, gm in capture_graphs(target, *example_inputs)
                    for opp in self.detect(gm, graph_name=name)]
        raise TypeError(f"detect() takes an fx.Graph, fx.GraphModule, nn.Module or function, "
                        f"got {type(target).__name__}")

    def detect_units(self, ug: UnitGraph, graph_name: str = "") -> list[FusionOpportunity]:
        found: list[tuple[str, list[Unit]]] = []
        for name, pattern in self.patterns.items():
            matcher = BUILTIN_MATCHERS.get(name) if pattern.builtin else pattern_matcher(pattern)
            for units in matcher(ug):
                found.append((name, units))
        found = _drop_superseded(found)
        return [self._opportunity(ug, name, units, graph_name) for name, units in found]

    def _opportunity(self, ug: UnitGraph, name: str, units: list[Unit], graph_name: str) -> FusionOpportunity:
        pattern = self.patterns[name]
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
            pattern=name, nodes=tuple(n.name for n in nodes), ops=tuple(u.name for u in units),
            estimated_speedup=speedup, bytes_saved=max(0, eager.bytes - fused.bytes),
            fusion_type=pattern.fusion_type, graph=graph_name, custom=not pattern.builtin,
            eager_kernels=eager.launches, eager_seconds=eager.seconds, fused_seconds=fused.seconds,
            fx_nodes=nodes)


def _drop_superseded(found: list) -> list:
    keep = []
    for name, units in found:
        covered = {u.index for u in units}
        better = SUPERSEDED_BY.get(name, set())
        if any(other in better and covered <= {u.index for u in other_units} for other, other_units in found):
            continue
        keep.append((name, units))
    return keep


def capture_graphs(fn, *example_inputs, reductions: bool = True) -> list[tuple[str, fx.GraphModule]]:
    """The aten graphs Kitsune's compiler would receive for `fn(*example_inputs)`
    (forward, and backward when the output requires grad), without compiling them."""
    from kitsune.capture.dynamo import aot_backend

    graphs = []

    def keep(gm, inputs, kind):
        graphs.append((kind, gm))
        return gm

    torch._dynamo.reset()
    try:
        try:
            out = torch.compile(fn, backend=aot_backend(keep, reductions=reductions))(*example_inputs)
        except Exception:  # noqa: BLE001 - a decomposition that fails: capture without them
            if not reductions:
                raise
            graphs.clear()
            torch._dynamo.reset()
            out = torch.compile(fn, backend=aot_backend(keep, reductions=False))(*example_inputs)
        leaves = [t for t in (out if isinstance(out, (tuple, list)) else [out])
                  if isinstance(t, torch.Tensor) and t.requires_grad]
        if leaves:  # gradients w.r.t. the graph's leaves: compiles the backward, leaves .grad alone
            loss = sum(t.float().sum() for t in leaves)
            torch.autograd.grad(loss, _autograd_leaves(loss), allow_unused=True)
    finally:
        torch._dynamo.reset()
    return graphs


def _autograd_leaves(tensor) -> list:
    leaves, seen, stack = [], set(), [tensor.grad_fn]
    while stack:
        fn = stack.pop()
        if fn is None or fn in seen:
            continue
        seen.add(fn)
        variable = getattr(fn, "variable", None)
        if variable is not None:
            leaves.append(variable)
        stack.extend(next_fn for next_fn, _ in fn.next_functions)
    return leaves
