"""Graph rewrites that replace a named pattern by a different computation
(a convolution with folded batch-norm weights, a re-associated matrix chain,
a chunked linear + cross-entropy), and the record each one leaves.

A rewrite is not a fusion group: what runs instead is another aten/custom op
sequence, so the planner never sees the pattern. Each rewrite pass returns a
`Rewrite` per place it looked at (applied or not, with the reason), and the
compiler turns them into the pattern's `FusionOpportunity` with status
"applied" and the choice made, so `explain()` says what happened.

Rewrites of the graph Dynamo hands over (before AOTAutograd) are collected in
`collecting()` and attached to the records of the aten graphs compiled from it.
"""
from __future__ import annotations

import contextlib
import contextvars
import dataclasses
import logging
from dataclasses import dataclass

import torch
from torch import fx

# the meta of the user op a node implements (kitsune.planner.units groups nodes by it)
USER_OP_META = ("source_fn_stack", "original_aten", "seq_nr", "nn_module_stack", "stack_trace", "from_node")


@dataclass
class Rewrite:
    """One place a rewrite pass looked at.

    pattern:  the built-in pattern name it serves ("conv_bn_activation", "matrix_chain",
              "softmax_cross_entropy", "linear_activation")
    ops:      the user operations it covers, e.g. ("conv", "batch_norm")
    nodes:    names of the graph nodes it covers
    choice:   what runs instead (for reports), e.g. "folded into the convolution's weights"
    applied:  False where the pass declined; `reason` says why
    """

    pattern: str
    ops: tuple
    nodes: tuple
    choice: str = ""
    applied: bool = True
    reason: str = ""
    seconds: float | None = None  # measured time of the choice, where one was measured


log = logging.getLogger("kitsune")


def rewrite_sites(gm: fx.GraphModule, is_site, match, replace, what: str) -> list[Rewrite]:
    """The loop of a rewrite of the graph Dynamo hands the backend (kitsune.capture.lm_head,
    kitsune.capture.attention): for each node `is_site(node)`, `match(node)` gives None (not such a
    place after all) or (Rewrite, plan or None); a plan is carried out by `replace(graph, node, plan)`,
    which may return the node it made (named in the record: the aten ops made of it say so). A match
    or a replacement that fails leaves that place as it was, the failure in its record."""
    rewrites = []
    for node in list(gm.graph.nodes):
        if getattr(node, "_erased", False) or not is_site(node):
            continue
        try:
            found = match(node)
        except Exception as error:  # noqa: BLE001 - an odd graph: leave it as it is
            log.debug("%s at %s not analysed: %s: %s", what, node.name, type(error).__name__, error)
            continue
        if found is None:
            continue
        rewrite, plan = found
        if plan is not None:
            try:
                made = replace(gm.graph, node, plan)
                if isinstance(made, fx.Node):
                    rewrite.nodes = (*rewrite.nodes, made.name)
            except Exception as error:  # noqa: BLE001 - never break the user's graph
                rewrite = dataclasses.replace(rewrite, applied=False,
                                              reason=f"rewrite failed: {type(error).__name__}: {error}")
        if not rewrite.applied:
            log.debug("%s at %s not rewritten: %s", what, node.name, rewrite.reason)
        rewrites.append(rewrite)
    if any(r.applied for r in rewrites):
        gm.graph.lint()
        gm.recompile()
    return rewrites


def example_value(node):
    """The example value Dynamo recorded for a node (a fake tensor), or None."""
    if not isinstance(node, fx.Node):
        return None
    value = node.meta.get("example_value", node.meta.get("val"))
    return value if isinstance(value, torch.Tensor) else None


def inherit_source(node: fx.Node, source: fx.Node) -> None:
    """`source`'s place in the user's code, for the aten nodes AOTAutograd makes of `node` (reports,
    kernel counts and measured baselines read `source_fn_stack`)."""
    for key in ("stack_trace", "nn_module_stack"):
        if key in source.meta:
            node.meta.setdefault(key, source.meta[key])
    node.meta.setdefault("source_fn_stack", [(node.name, node.target)])


_PENDING: contextvars.ContextVar = contextvars.ContextVar("kitsune_pending_rewrites", default=None)


@contextlib.contextmanager
def collecting():
    """Collect the rewrites made on a Dynamo graph while its aten graphs compile."""
    token = _PENDING.set([])
    try:
        yield _PENDING.get()
    finally:
        _PENDING.reset(token)


def note(rewrites) -> None:
    """Add `rewrites` (made before AOTAutograd) to the collection, if one is open."""
    pending = _PENDING.get()
    if pending is not None:
        pending.extend(rewrites)


def take() -> list:
    """The rewrites collected so far, handed to one record (the first aten graph compiled)."""
    pending = _PENDING.get()
    if not pending:
        return []
    out = list(pending)
    pending.clear()
    return out


class NodeBuilder:
    """Inserts aten calls before `anchor`, each with the user-op meta of `source`
    (where given) and its `val` computed on the inputs' fake values (or `val=`);
    `undo()` takes the inserted nodes out again, newest first."""

    def __init__(self, graph: fx.Graph, anchor: fx.Node, source: fx.Node | None = None):
        self.graph, self.anchor, self.made = graph, anchor, []
        self.inherited = {k: source.meta[k] for k in USER_OP_META if k in source.meta} if source is not None else {}
        self.fake_mode = _fake_mode_of(source if source is not None else anchor)

    def __call__(self, target, *args, val=None, **kwargs) -> fx.Node:
        with self.graph.inserting_before(self.anchor):
            node = self.graph.call_function(target, args, kwargs)
        self.made.append(node)
        node.meta.update(self.inherited)
        if val is None:
            fake = fx.node.map_arg((args, kwargs), lambda n: n.meta["val"])
            with self.fake_mode:
                val = target(*fake[0], **fake[1])
        node.meta["val"] = val
        return node

    def undo(self) -> None:
        for node in reversed(self.made):
            self.graph.erase_node(node)
        self.made.clear()


def _fake_mode_of(node: fx.Node):
    from kitsune._compat import detect_fake_mode
    vals = [a.meta.get("val") for a in node.all_input_nodes]
    mode = detect_fake_mode([v for v in vals if isinstance(v, torch.Tensor)])
    mode = getattr(mode, "fake_mode", mode)  # the compat fallback names a fake tensor, which knows its mode
    return mode if mode is not None else contextlib.nullcontext()
