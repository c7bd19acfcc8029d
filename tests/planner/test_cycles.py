"""Cycles through unfused ops (issue 14, point 1): partition around them instead
of giving up (`kitsune.planner.split.split_for_cycles`)."""
import torch
from torch.fx.experimental.proxy_tensor import make_fx

import kitsune
from kitsune.capture.dynamo import decomposition_table
from kitsune.config import FusionConfig
from kitsune.planner.pointwise import plan_pointwise
from kitsune.report.stats import GLOBAL_STATS

CYCLE = "would form a cycle"


def _plan(fn, *inputs, **config):
    gm = make_fx(fn, decomposition_table=decomposition_table(), tracing_mode="fake")(*inputs)
    return plan_pointwise(gm.graph, FusionConfig(**config))


def _names(plan):
    return [{n.name for n in g.nodes} for g in plan.groups]


def _split_case(x, y, w):
    # one group computes a, b (read by the matmul) and what reads a; the product with the
    # matmul's result cannot join that group (b -> mm -> mul), but it can join a's side
    a, b = x.sin(), y.cos()
    m = b @ w
    return a + b, a.exp() * m + a.tanh()


def _inputs():
    torch.manual_seed(0)
    return torch.randn(8, 8), torch.randn(8, 8), torch.randn(8, 8)


def test_group_is_split_where_the_cycle_runs():
    plan = _plan(_split_case, *_inputs())
    assert not [d for d in plan.decisions if not d.fused and CYCLE in d.reason]
    assert any("split so that no cycle forms" in d.reason for d in plan.decisions)
    # cos feeds the matmul and stays apart (a lone op); everything else is one kernel
    assert _names(plan) == [{"sin", "add", "exp", "tanh", "mul", "add_1"}]


def test_split_group_computes_what_eager_does():
    kitsune.reset_fusion_stats()
    got = kitsune.optimize(_split_case)(*_inputs())
    for a, b in zip(got, _split_case(*_inputs())):
        torch.testing.assert_close(a, b)
    decisions = [d for record in GLOBAL_STATS.records() for d in record.decisions]
    assert not [d for d in decisions if not d.fused and CYCLE in d.reason]


def test_residual_add_fused_with_its_other_producer_is_no_refusal():
    # r reads the norm's input h and the matmul the norm feeds: it cannot join h's group,
    # it joins the matmul's epilogue; no partition does better, and the plan says so
    def f(x, w, b):
        h = x * 2
        n = torch.nn.functional.layer_norm(h, (8,))
        r = h + ((n @ w) + b)
        return r.relu()

    plan = _plan(f, torch.randn(4, 8), torch.randn(8, 8), torch.randn(8), max_fusion_size=32)
    assert not [d for d in plan.decisions if not d.fused and CYCLE in d.reason]
    assert any("instead:" in d.reason and "so no kernel holds both" in d.reason for d in plan.decisions if not d.fused)
    assert any({"add_1", "relu"} <= names for names in _names(plan))


def test_no_split_without_a_gain():
    # the product reads only what the cycle runs through: nothing to split off, the refusal stands
    def f(x, w):
        a = x.sin()
        return a * (a @ w)

    plan = _plan(f, torch.randn(8, 8), torch.randn(8, 8))
    assert [d for d in plan.decisions if not d.fused and CYCLE in d.reason]
    assert not plan.groups


def _through_another_group(x, y, z, m):
    # a SiLU backward: group A = {t, both, other} reads s; the reduction's group
    # {s, total, ...} reads A's `other`. No path of nodes leaves a group and comes back,
    # but A and the reduction group read each other: they cannot be ordered
    s = torch.sigmoid(m)
    t = x + y
    a = t.view(16, 32)
    both = a * s
    other = a * z
    total = other.sum(1, keepdim=True)
    return t * 2, both, total * (s * (1 - s))


def _group_inputs():
    return torch.randn(2, 8, 32), torch.randn(2, 8, 32), torch.randn(16, 32), torch.randn(16, 1)


def test_groups_never_read_each_other():
    from kitsune.planner.legality import groups_acyclic
    gm = make_fx(_through_another_group, decomposition_table=decomposition_table(),
                 tracing_mode="fake")(*_group_inputs())
    plan = plan_pointwise(gm.graph, FusionConfig())
    assert plan.groups and groups_acyclic(list(gm.graph.nodes), plan.groups), _names(plan)


def test_groups_reading_each_other_compile_and_match_eager():
    torch._dynamo.reset()
    GLOBAL_STATS.reset()
    inputs = _group_inputs()
    got = torch.compile(_through_another_group, backend="kitsune")(*inputs)
    torch.testing.assert_close(got, _through_another_group(*inputs))
    stats = kitsune.get_fusion_stats()
    assert stats["fallbacks"] == [] and stats["num_fused"] >= 2, stats["fallbacks"]
