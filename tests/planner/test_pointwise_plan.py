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


def test_sibling_column_sums_share_one_kernel():
    """A backward pass's bias/weight gradients: column sums over the same rows,
    unrelated to each other, are one kernel (side by side)."""
    def f(g, h, w):
        return g.sum(0), (h * w).sum(0), (h.relu() * 2).amax(0)

    g, h, w = torch.randn(64, 16), torch.randn(64, 16), torch.randn(16)
    plan = _plan(f, g, h, w)
    (group,) = plan.groups
    assert {n.name for n in group_outputs(group)} == {"sum_1", "sum_2", "amax"}


def test_siblings_stay_apart_when_a_path_links_them_or_a_full_tensor_is_written():
    def f(a, b, w):
        s = a.sum(0)                        # feeds the matmul that the second sum needs
        t = (b * (s @ w)).sum(0)
        full = (b * 3).exp()                # a full-size output: not merged side by side
        return t, full, full.sum(0), (a * 2).sum(0, keepdim=True).sum(1)

    a, b, w = torch.randn(32, 8), torch.randn(32, 8), torch.randn(8, 8)
    plan = _plan(f, a, b, w)
    groups = [{n.name for n in g.nodes} for g in plan.groups]
    assert not any({"sum_1", "sum_2"} <= names for names in groups), groups
    assert any("cycle" in d.reason for d in plan.decisions if not d.fused)
    assert not any("exp" in names and "sum_1" in names for names in groups), groups


def test_merged_sums_compute_what_eager_does():
    import kitsune

    def f(g, h, w):
        return g.sum(0), (h * w).sum(0), (h.relu() * 2).amax(0)

    g, h, w = torch.randn(64, 16), torch.randn(64, 16), torch.randn(16)
    g[3, 2] = float("nan")
    h[5, 1] = float("-inf")
    kitsune.reset_fusion_stats()
    got = torch.compile(f, backend="kitsune")(g, h, w)
    for a, b in zip(got, f(g, h, w)):
        torch.testing.assert_close(a, b, equal_nan=True)
    assert kitsune.get_fusion_stats()["num_fused"] == 1
