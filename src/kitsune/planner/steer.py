"""Named patterns steering the planner's groups.

`apply_patterns(gm, plan, config, graph_name)` runs after the generic rules
(`policy.plan_pointwise`), and only when the plan depends on patterns
(`detect.needs_detection`):

1. detects every pattern in the graph and keeps the units and opportunities
   on the plan (the report reads them);
2. each custom `FusionPattern` with a replacement rewrites the graph (one call
   instead of the ops it matched); the graph is then planned and detected again;
3. ``FusionConfig.enabled_patterns`` without ``elementwise_chain`` (the
   generic rule) restricts the groups to the operations of enabled patterns;
4. each custom `FusionPattern` found in the graph steers grouping: its
   operations are put in one group (together with the groups they were already
   in, or alone when that union is illegal; a user pattern may exceed
   ``max_fusion_size`` by its own operations), or it is refused, with the
   reason recorded as a `Decision` and logged at DEBUG.

Legality is the planner's own (`legality.can_merge`: iteration space, cycles,
size; `legality.groups_acyclic`: the groups still order as a DAG). This
function never raises: if anything goes wrong the plan is returned unchanged.
"""
from __future__ import annotations

import dataclasses
import logging

from torch import fx

from kitsune.ir.graph import is_compute, view_root
from kitsune.planner.detect import detect_patterns, is_kernel
from kitsune.planner.legality import can_merge, groups_acyclic
from kitsune.planner.plan import Decision, FusionGroup
from kitsune.planner.policy import node_refusal, plan_pointwise

log = logging.getLogger("kitsune")


def apply_patterns(gm: fx.GraphModule, plan, config, graph_name: str):
    try:
        plan.units, plan.opportunities = detect_patterns(gm.graph, config, graph_name)
        replaced = _apply_replacements(gm, plan.opportunities, config)
        if replaced:  # the graph changed: plan and detect again
            plan = plan_pointwise(gm.graph, config)
            plan.units, plan.opportunities = detect_patterns(gm.graph, config, graph_name)
            plan.opportunities += replaced
            plan.replaced = True
    except Exception as error:  # noqa: BLE001 - reporting must never break compilation
        log.warning("pattern detection failed on the %s graph: %s: %s", graph_name,
                    type(error).__name__, error)
        plan.units, plan.opportunities = None, None
        return plan
    try:
        position = {n: i for i, n in enumerate(gm.graph.nodes)}
        plan = _restrict_to_enabled(plan, plan.opportunities, config, position)
        for opp in plan.opportunities:
            if opp.custom and config.pattern_enabled(opp.pattern):
                _steer(plan, opp, config, position)
    except Exception as error:  # noqa: BLE001
        log.warning("user patterns not applied to the %s graph: %s: %s", graph_name,
                    type(error).__name__, error)
    return plan


# -- helpers ----------------------------------------------------------------------

def _group(nodes, position):
    return FusionGroup(sorted(nodes, key=position.__getitem__))


def _check(nodes, config, position) -> str | None:
    group = _group(nodes, position)
    return can_merge(group, group, config, position)


def _components(nodes: set) -> list[set]:
    parent = {n: n for n in nodes}

    def find(n):
        while parent[n] is not n:
            parent[n] = parent[parent[n]]
            n = parent[n]
        return n

    for n in nodes:
        for a in n.all_input_nodes:
            root = view_root(a)
            if root in parent:
                parent[find(root)] = find(n)
    comps: dict = {}
    for n in nodes:
        comps.setdefault(find(n), set()).add(n)
    return list(comps.values())


def _replace_decisions(plan, old_groups, new_decisions):
    old = {tuple(n.name for n in g.nodes) for g in old_groups}
    plan.decisions = [d for d in plan.decisions if not (d.fused and tuple(d.nodes) in old)] + new_decisions


def _blocker(node, config) -> str | None:
    if not is_compute(node):
        return "runs through PyTorch (no tensor result Kitsune can generate)"
    return node_refusal(node, config)


# -- enabled_patterns ---------------------------------------------------------------

def _restrict_to_enabled(plan, opportunities, config, position):
    if config.enabled_patterns is None or "elementwise_chain" in config.enabled_patterns:
        return plan
    allowed = set()
    for opp in opportunities:
        if config.pattern_enabled(opp.pattern):
            allowed.update(n for n in opp.fx_nodes if is_kernel(n))
    groups, decisions, changed = [], [], []
    for group in plan.groups:
        keep = {n for n in group.nodes if n in allowed}
        if len(keep) == len(group.nodes):
            groups.append(group)
            continue
        changed.append(group)
        dropped = [n.name for n in group.nodes if n not in keep]
        decisions.append(Decision(tuple(dropped), False,
                                          "not part of an enabled pattern (elementwise_chain is not in "
                                          "FusionConfig.enabled_patterns)"))
        for comp in _components(keep):
            names = tuple(n.name for n in sorted(comp, key=position.__getitem__))
            if len(comp) < 2:
                continue
            reason = _check(comp, config, position)
            if reason:
                decisions.append(Decision(names, False, reason))
                continue
            groups.append(_group(comp, position))
            decisions.append(Decision(names, True, f"enabled pattern ops: {len(comp)} ops"))
    if not changed:
        return plan
    graph_nodes = sorted(position, key=position.__getitem__)
    if not groups_acyclic(graph_nodes, groups):
        decisions = [Decision(tuple(n.name for g in changed for n in g.nodes), False,
                                      "restricting to enabled patterns would order kernels in a cycle")]
        groups = [g for g in groups if g in plan.groups]
    plan.groups = sorted(groups, key=lambda g: position[g.nodes[0]])
    _replace_decisions(plan, changed, decisions)
    return plan


# -- custom patterns ----------------------------------------------------------------

def _refuse(plan, opp, names, reason):
    log.debug("pattern %r (%s) refused on %s: %s", opp.pattern, opp.describe(), ", ".join(names), reason)
    plan.decisions.append(Decision(tuple(names), False, f"pattern {opp.pattern!r}: {reason}"))
    opp.reason = reason


def _steer(plan, opp, config, position) -> None:
    members = [n for n in opp.fx_nodes if is_kernel(n)]
    names = [n.name for n in members]
    if len(members) < 2 and not any(len(g.nodes) > 1 and members[0] in g.nodes for g in plan.groups):
        if members:
            _refuse(plan, opp, names, "a single operation: nothing to fuse")
        return
    if any(set(members) <= set(g.nodes) for g in plan.groups):
        return  # the planner fused it already
    in_group = {n for g in plan.groups for n in g.nodes}
    for n in members:
        if n not in in_group:
            reason = _blocker(n, config)
            if reason:
                _refuse(plan, opp, names, f"{n.name}: {reason}")
                return
    touched = [g for g in plan.groups if set(g.nodes) & set(members)]
    others = [g for g in plan.groups if g not in touched]
    own = len(_group(members, position).user_ops())
    relaxed = dataclasses.replace(config, max_fusion_size=max(config.max_fusion_size, own))
    union = set(members).union(*[set(g.nodes) for g in touched])
    candidates = []
    if not _check(union, relaxed, position):
        candidates.append([_group(union, position)])
    alone_reason = _check(set(members), relaxed, position)
    if not alone_reason:
        rest = []
        for g in touched:
            for comp in _components(set(g.nodes) - set(members)):
                if len(comp) > 1 and not _check(comp, config, position):
                    rest.append(_group(comp, position))
        candidates.append([_group(members, position)] + rest)
    graph_nodes = sorted(position, key=position.__getitem__)
    for new in candidates:
        groups = others + new
        if groups_acyclic(graph_nodes, groups):
            plan.groups = sorted(groups, key=lambda g: position[g.nodes[0]])
            _replace_decisions(plan, touched, [])
            for g in new:
                plan.decisions.append(Decision(tuple(n.name for n in g.nodes), True,
                                                       f"pattern {opp.pattern!r} ({opp.describe()})"
                                                       if set(members) <= set(g.nodes) else
                                                       "rest of a group split by a user pattern"))
            log.debug("pattern %r steers %s into one kernel", opp.pattern, ", ".join(names))
            return
    _refuse(plan, opp, names, alone_reason or "its kernels would depend on each other in a cycle")


# -- replacement callables -------------------------------------------------------------

class ReplacementCall:
    """Runs a user pattern's replacement instead of the ops it matched.

    Called with the matched ops' tensor inputs (in the order the ops first read
    them). A result with another shape or dtype than the ops', or an exception,
    runs the original ops instead (logged once). With KITSUNE_DEBUG=1 every call
    also runs the original ops and compares (torch.testing.assert_close)."""

    def __init__(self, pattern, original: fx.GraphModule, expected):
        self.pattern = pattern
        self.original = original
        self.expected = (tuple(expected.shape), expected.dtype)
        self.failure: str | None = None
        self.__name__ = f"kitsune_replacement_{pattern.name}".replace("-", "_").replace(".", "_")
        self.__module__ = __name__

    def _fail(self, reason, inputs):
        if self.failure is None:
            log.warning("replacement of pattern %r runs the original ops: %s", self.pattern.name, reason)
        self.failure = reason
        return self.original(*inputs)[0]

    def __call__(self, *inputs):
        import os

        import torch
        if self.failure is not None:
            return self.original(*inputs)[0]
        try:
            result = self.pattern.replacement(*inputs)
        except Exception as error:  # noqa: BLE001 - never crash the user's model
            return self._fail(f"{type(error).__name__}: {error}", inputs)
        if not isinstance(result, torch.Tensor) or (tuple(result.shape), result.dtype) != self.expected:
            got = (tuple(result.shape), result.dtype) if isinstance(result, torch.Tensor) else type(result).__name__
            return self._fail(f"returned {got}, expected {self.expected}", inputs)
        if os.environ.get("KITSUNE_DEBUG", "") not in ("", "0"):
            reference = self.original(*inputs)[0]
            try:
                torch.testing.assert_close(result, reference)
            except AssertionError as error:
                return self._fail(f"differs from the ops it replaces: {error}", inputs)
        return result


def _apply_replacements(gm: fx.GraphModule, opportunities, config) -> list:
    """Rewrite the graph: each match of a pattern with a replacement becomes one call."""
    from kitsune.ir.graph import group_fallback

    done = []
    for opp in opportunities:
        pattern = (dict((p.name, p) for p in config.custom_patterns)).get(opp.pattern)
        if pattern is None or pattern.replacement is None or not config.pattern_enabled(opp.pattern):
            continue
        members = list(opp.fx_nodes)
        member_set = set(members)
        outputs = [n for n in members if any(u not in member_set for u in n.users)]
        kernels = [n for n in members if is_kernel(n)]
        if len(outputs) != 1 or not is_compute(outputs[0]) or not kernels:
            log.debug("pattern %r not replaced on %s: it needs one result used outside the pattern, "
                      "found %d", opp.pattern, opp.describe(), len(outputs))
            continue
        inputs = []
        for n in members:
            for a in n.all_input_nodes:
                if a not in member_set and a not in inputs:
                    inputs.append(a)
        out = outputs[0]
        original = group_fallback(inputs, [out], members)
        call = ReplacementCall(pattern, original, out.meta["val"])
        with gm.graph.inserting_before(out):
            node = gm.graph.call_function(call, tuple(inputs))
        node.meta = {k: v for k, v in out.meta.items() if k not in ("source_fn_stack", "original_aten", "seq_nr",
                                                                     "nn_module_stack")}
        out.replace_all_uses_with(node)
        for n in reversed(members):
            if not n.users:
                gm.graph.erase_node(n)
        opp.status, opp.reason, opp.kernels = "applied", "", (call.__name__,)
        opp.fx_nodes, opp.replaced_by = [node], call
        log.info("pattern %r replaced %s by %s", pattern.name, opp.describe(), call.__name__)
        done.append(opp)
    if done:
        gm.graph.lint()
        gm.recompile()
    return done
