"""Find the named fusion patterns in a captured aten graph (spec 01's `FusionDetector`).

    detector = FusionDetector()                     # every built-in pattern
    for opp in detector.detect(gm):                 # an aten fx.GraphModule / fx.Graph
        print(opp.pattern, opp.ops, opp.estimated_speedup, opp.bytes_saved)
    detector.detect(model, x)                       # capture model(x) first (Dynamo + AOTAutograd)

A thin layer over the planner: patterns and the one matcher live in
`kitsune.planner.patterns` / `kitsune.planner.match`, the user operations they
match in `kitsune.planner.units`, the estimates in `kitsune.planner.cost`. This
module adds the public class and the capture of a model or function.
"""
from __future__ import annotations

import itertools
from typing import Iterable

import torch
from torch import fx

from kitsune.planner.patterns import (BUILTIN_PATTERNS, SUPERSEDED_BY, FusionOpportunity,
                                      FusionPattern, detect, pattern_registry)
from kitsune.planner.units import UnitGraph

__all__ = ["FusionDetector", "FusionOpportunity", "FusionPattern", "BUILTIN_PATTERNS", "SUPERSEDED_BY",
           "capture_graphs"]


class FusionDetector:
    """Finds fusion opportunities: every built-in pattern plus `patterns`.

    FusionDetector(patterns=None, config=None)
      patterns: extra (user) FusionPatterns to look for.
      config:   a FusionConfig; its custom_patterns are looked for too.
    detect(graph) -> list[FusionOpportunity] for an aten fx.Graph / fx.GraphModule;
    detect(model_or_fn, *example_inputs) captures the call through Dynamo and
    AOTAutograd (forward graph, plus backward when an input requires grad)
    and detects in every captured graph. Capturing leaves every other compiled
    model in the process as it was (no `torch._dynamo.reset()`).
    """

    def __init__(self, patterns: Iterable[FusionPattern] | None = None, config=None):
        from kitsune.config import FusionConfig
        if config is not None and not isinstance(config, FusionConfig):
            raise TypeError(f"FusionDetector config must be a FusionConfig, got {type(config).__name__}")
        extra = list(patterns or [])
        for p in extra:
            if not isinstance(p, FusionPattern):
                raise TypeError(f"FusionDetector patterns must be FusionPatterns, got {type(p).__name__}")
        self.config = config
        custom = config.custom_patterns if config is not None else ()
        self.patterns: dict[str, FusionPattern] = pattern_registry(custom, extra)

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
        return detect(ug, self.patterns, graph_name)


_captures = itertools.count()


def _fresh_entry(fn):
    """A new function calling `fn`, with a code object of its own. Dynamo keeps its
    compiled code per code object: compiling this one adds nothing to the caches of
    `fn` (or of a model's `forward`, which it inlines), so capturing neither reuses
    nor disturbs what another `torch.compile` of the same model compiled, and
    everything it compiled goes away with the function."""
    def capture(*args):
        return fn(*args)
    capture.__code__ = capture.__code__.replace(co_name=f"kitsune_capture_{next(_captures)}")
    return capture


def _compile_and_run(fn, example_inputs, backend):
    return torch.compile(_fresh_entry(fn), backend=backend)(*example_inputs)


def capture_graphs(fn, *example_inputs, reductions: bool = True) -> list[tuple[str, fx.GraphModule]]:
    """The aten graphs Kitsune's compiler would receive for `fn(*example_inputs)`
    (forward, and backward when the output requires grad), without compiling them."""
    from kitsune.capture.dynamo import aot_backend

    graphs = []

    def keep(gm, inputs, kind):
        graphs.append((kind, gm))
        return gm

    try:
        out = _compile_and_run(fn, example_inputs, aot_backend(keep, reductions=reductions))
    except Exception:  # noqa: BLE001 - a decomposition that fails: capture without them
        if not reductions:
            raise
        graphs.clear()
        out = _compile_and_run(fn, example_inputs, aot_backend(keep, reductions=False))
    leaves = [t for t in (out if isinstance(out, (tuple, list)) else [out])
              if isinstance(t, torch.Tensor) and t.requires_grad]
    if leaves:  # gradients w.r.t. the graph's leaves: compiles the backward, leaves .grad alone
        loss = sum(t.float().sum() for t in leaves)
        torch.autograd.grad(loss, _autograd_leaves(loss), allow_unused=True)
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
