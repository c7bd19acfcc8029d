"""Planner decisions on small hand-built graphs."""
import torch
from torch.fx.experimental.proxy_tensor import make_fx

from kitsune.capture.dynamo import decomposition_table
from kitsune.config import FusionConfig
from kitsune.planner.pointwise import group_outputs, plan_pointwise


def _plan(fn, *inputs, **config):
    gm = make_fx(fn, decomposition_table=decomposition_table(), tracing_mode="fake")(*inputs)
    return plan_pointwise(gm.graph, FusionConfig(**config))


def test_chain_is_one_group_with_one_output():
    plan = _plan(lambda x, y: ((x + y) * 2).relu().exp(), torch.randn(4, 8), torch.randn(8))
    assert len(plan.groups) == 1
    group = plan.groups[0]
    assert [n.name for n in group.nodes] == ["add", "mul", "relu", "exp"]
    assert [n.name for n in group_outputs(group)] == ["exp"]


def test_values_needed_outside_become_outputs():
    plan = _plan(lambda x: ((a := x.sin()) * 2, a.cumsum(0)), torch.randn(4, 8))
    (group,) = plan.groups
    assert {n.name for n in group_outputs(group)} == {"sin", "mul"}


def test_no_cycle_through_an_unfused_op():
    # b needs cumsum(a), which needs a: a and b in one kernel would be a cycle.
    plan = _plan(lambda x: (a := x.sin()) * a.cumsum(0).cos(), torch.randn(4, 8))
    for group in plan.groups:
        names = {n.name for n in group.nodes}
        assert not {"sin", "mul"} <= names
    assert any("cycle" in d.reason for d in plan.decisions if not d.fused)


def test_max_fusion_size_splits_and_says_why():
    def f(x):
        for _ in range(5):
            x = x.sin()
        return x

    plan = _plan(f, torch.randn(8), max_fusion_size=2)
    assert all(len(g.nodes) <= 2 for g in plan.groups)
    assert any("max_fusion_size=2" in d.reason for d in plan.decisions if not d.fused)


def test_broadcast_producer_is_recomputed_only_when_internal():
    # s has 8 elements, the chain 4x8: s fuses in (recomputed per element) only
    # because nothing outside needs it.
    plan = _plan(lambda x, b: x * b.sigmoid() + 1, torch.randn(4, 8), torch.randn(8))
    assert len(plan.groups) == 1 and len(plan.groups[0].nodes) == 3
    plan = _plan(lambda x, b: (x * (s := b.sigmoid()) + 1, s), torch.randn(4, 8), torch.randn(8))
    assert all(len({n.name for n in g.nodes} & {"sigmoid", "mul"}) < 2 for g in plan.groups)
    assert any("iteration sizes differ" in d.reason for d in plan.decisions if not d.fused)


def test_every_node_gets_a_decision():
    plan = _plan(lambda x: (x.sin() @ x.t()).relu() + 1, torch.randn(4, 4))
    decided = {name for d in plan.decisions for name in d.nodes for name in name.split(" → ")}
    assert {"sin", "mm", "relu", "add"} <= decided
    assert any(d.nodes == ("mm",) and "runs through PyTorch" in d.reason for d in plan.decisions)


def test_disabled_elementwise_fuses_nothing():
    plan = _plan(lambda x: x.sin().cos(), torch.randn(4), enable_elementwise=False)
    assert plan.groups == []
    assert all(d.reason == "elementwise fusion disabled" for d in plan.decisions)
