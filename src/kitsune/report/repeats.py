"""Repetition in compile records, so that the HTML report shows a model's
repeated layers once: GPT-2's twelve identical blocks produce twelve copies of
each kernel, of each pattern opportunity and of each reason not to fuse.

- `kernel_classes`: the fused groups of all records, grouped by kernel
  structure (`KernelSpec.structure_key()`, else the op names and shapes).
- `tandem_repeats`: runs of an identical block in a sequence (the drawn graph).
- `reason_template`: a reason with its node names replaced by their ops, so
  that "add_7: mm_3 is opaque" and "add_19: mm_9 is opaque" count as one reason.
- `plain_number`: a size or an estimate as a Python number, also when it is
  symbolic (SymInt/SymFloat, sympy), without adding a shape guard.

Nothing here changes a record; everything tolerates missing pieces.
"""
from __future__ import annotations

import numbers
import re
from dataclasses import dataclass, field

import torch

from kitsune.planner.units import tensor_vals


def plain_number(value):
    """`value` as an int or float, or None when it has no concrete value.

    Symbolic sizes give the size seen when the graph was compiled (their hint):
    reading a hint adds no guard, unlike int() or float() on a SymInt."""
    if isinstance(value, bool):
        return int(value)
    if isinstance(value, (int, float)):
        return value
    if isinstance(value, (torch.SymInt, torch.SymFloat, torch.SymBool)):
        node = getattr(value, "node", None)
        hint = getattr(node, "hint", None) if node is not None else None
        return None if hint is None or hint is value else plain_number(hint)
    if type(value).__module__.startswith("sympy"):
        if not getattr(value, "is_number", False):
            return None
        return int(value) if getattr(value, "is_Integer", False) else float(value)
    if isinstance(value, numbers.Number):
        return float(value)
    if isinstance(value, str):
        try:
            return float(value)
        except ValueError:
            return None
    return None


# -- kernels of the same structure -------------------------------------------------

@dataclass(frozen=True)
class KernelInstance:
    record: object
    graph_index: int     # which record, for node ids in the drawing
    kernel: str
    names: tuple         # the graph nodes it fuses
    backend: str


@dataclass
class KernelClass:
    """Kernels that generate the same code up to their name (same ops, shapes, dtypes)."""
    key: tuple
    status: str                                   # "fused" or "fallback"
    instances: list = field(default_factory=list)

    @property
    def first(self) -> KernelInstance:
        return self.instances[0]


def kernel_status(record, kernel) -> tuple[str, str | None]:
    """("fused", None), or ("fallback", why) for a kernel that runs its ops through PyTorch."""
    call = record.kernel_calls.get(kernel)
    if call is not None and getattr(call, "kernel", 1) is None and getattr(call, "failure", None):
        return "fallback", call.failure
    return "fused", None


def structure_of(record, kernel, names) -> tuple:
    """What makes two kernels the same: the spec's structure hash when the record kept
    the kernel's call, else its nodes' op names and output shapes."""
    call = record.kernel_calls.get(kernel)
    spec = getattr(call, "spec", None)
    if spec is not None and hasattr(spec, "structure_key"):
        try:
            return ("spec", spec.structure_key())
        except Exception:  # noqa: BLE001 - fall back to the ops below
            pass
    nodes = {n.name: n for n in record.graph.nodes} if record.graph is not None else {}
    return ("ops",) + tuple(node_signature(nodes[n]) if n in nodes else n for n in names)


def node_signature(node) -> tuple:
    """A node's op, shapes and dtypes: equal for the same node of two identical layers."""
    target = node.target if node.op == "call_function" else node.op
    name = getattr(target, "__name__", None) or str(target)
    vals = tuple((tuple(str(s) for s in v.shape), str(v.dtype)) for v in tensor_vals(node))
    return (node.op, name, vals)


def kernel_classes(records) -> list[KernelClass]:
    """Every fused group of `records`, grouped by graph name, status and structure,
    in order of first appearance."""
    classes: dict = {}
    for index, record in enumerate(records):
        for kernel, names, backend in record.groups:
            status, _ = kernel_status(record, kernel)
            key = (record.name, str(backend), status, structure_of(record, kernel, names))
            cls = classes.setdefault(key, KernelClass(key, status))
            cls.instances.append(KernelInstance(record, index, kernel, tuple(names), str(backend)))
    return list(classes.values())


# -- repeated blocks in a sequence ----------------------------------------------------

def tandem_repeats(items, min_period: int = 4, max_period: int = 2000,
                   max_items: int = 50000) -> list[tuple[int, int, int]]:
    """Non-overlapping runs of one block (of min_period to max_period items) repeated
    back to back in `items` (hashable): [(start, period, count)], count >= 2, sorted by
    start. Greedy: the run that saves the most items when drawn once is taken first,
    then the rest on either side."""
    ids: dict = {}
    codes = torch.tensor([ids.setdefault(item, len(ids)) for item in items], dtype=torch.int64)
    if len(codes) > max_items:  # every period is tried: a huge graph is drawn as it is
        return []
    found: list = []
    _find_repeats(codes, 0, len(codes), (min_period, max_period), found)
    return sorted(found)


def _find_repeats(codes, lo: int, hi: int, periods: tuple, found: list) -> None:
    best = _best_repeat(codes, lo, hi, periods)
    if best is None:
        return
    start, period, count = best
    found.append(best)
    _find_repeats(codes, lo, start, periods, found)
    _find_repeats(codes, start + period * count, hi, periods, found)


def _best_repeat(codes, lo: int, hi: int, periods: tuple):
    """The (start, period, count) in codes[lo:hi] that hides the most items (period * (count - 1)).

    For a period p, a run of r positions i with codes[i] == codes[i + p] is a block of
    p repeated r // p + 1 times; each period is one vectorised comparison."""
    best, saved = None, 0
    for period in range(periods[0], min(periods[1], (hi - lo) // 2) + 1):
        equal = codes[lo:hi - period] == codes[lo + period:hi]
        breaks = torch.nonzero(~equal).flatten()
        edges = torch.cat([torch.tensor([-1]), breaks, torch.tensor([len(equal)])])
        runs = edges[1:] - edges[:-1] - 1
        longest = int(runs.max())
        if period * (longest // period) > saved:
            where = int(torch.argmax(runs))  # the first longest run
            best, saved = (lo + int(edges[where]) + 1, period, longest // period + 1), period * (longest // period)
    return best


# -- reasons with node names --------------------------------------------------------

_WORD = re.compile(r"[A-Za-z_][A-Za-z0-9_]*")
_NUMBERED = re.compile(r"_\d+$")


def reason_template(reason, names: dict) -> str:
    """`reason` with each node name in it replaced by its unnumbered name ("add_7:
    mm_3 is opaque" reads "add: mm is opaque"): the same reason of twelve layers
    reads the same. names: node name -> that name (`unnumbered_names(record)`)."""
    text = str(reason)
    if not names:
        return text
    return _WORD.sub(lambda m: names.get(m.group(0), m.group(0)), text)


def unnumbered_names(record) -> dict:
    """node name -> the name without its numbering (add_7 -> add, primals_3 -> primals):
    what the node is, and the same in every layer."""
    if record.graph is None:
        return {}
    return {node.name: _NUMBERED.sub("", node.name) or node.name for node in record.graph.nodes}


def aggregate(items, key) -> list[tuple[object, list]]:
    """[(key, [items with that key])], keys in order of first appearance."""
    groups: dict = {}
    for item in items:
        groups.setdefault(key(item), []).append(item)
    return list(groups.items())
