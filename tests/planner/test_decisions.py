"""Every fuse-or-not answer lands in the plan with its reason, and legality does
not depend on policy."""
import pytest
import torch
from torch.fx.experimental.proxy_tensor import make_fx

import kitsune.compiler
from kitsune.capture.dynamo import decomposition_table
from kitsune.compiler import compile_graph
from kitsune.config import FusionConfig
from kitsune.planner import admit, plan_graph
from kitsune.planner.legality import can_merge, node_blocker
from kitsune.planner.plan import FusionGroup
from kitsune.planner.policy import plan_pointwise
from kitsune.report.stats import FusionStats


def _gm(fn, *inputs):
    return make_fx(fn, decomposition_table=decomposition_table(), tracing_mode="fake")(*inputs)


def _chain(x):
    return (x * 2 + 1).relu()


def _refusals(plan_or_record):
    return {d.nodes: d.reason for d in plan_or_record.decisions if not d.fused}


@pytest.mark.parametrize("config,reason", [
    (FusionConfig(cpu_fusion=False), "fusion disabled for cpu in FusionConfig"),
    (FusionConfig(min_tensor_size=1000), "32 elements < min_tensor_size"),
])
def test_group_policy_refusals_are_decisions_and_fallbacks(config, reason):
    plan = plan_graph(_gm(_chain, torch.randn(4, 8)), config)
    assert plan.groups == []
    assert _refusals(plan) == {("mul", "add", "relu"): reason}
    assert not [d for d in plan.decisions if d.fused]  # the refusal replaced the "fused" answer
    assert plan.fallbacks == [("mul → add → relu", reason)]


def test_single_operation_is_refused_with_its_reason():
    plan = plan_graph(_gm(lambda x: x.exp(), torch.randn(4, 8)), FusionConfig())
    assert plan.groups == [] and _refusals(plan) == {("exp",): "single operation: nothing to fuse"}


def test_enable_switch_is_a_node_refusal():
    plan = plan_graph(_gm(_chain, torch.randn(4, 8)), FusionConfig(enable_elementwise=False))
    assert set(_refusals(plan).values()) == {"elementwise fusion disabled"}


def test_backend_refusal_takes_the_group_out_of_the_plan():
    plan = plan_graph(_gm(_chain, torch.randn(4, 8)), FusionConfig())
    (group,) = plan.groups
    assert admit(plan, group, "spec", lambda spec: None) is None and plan.groups == [group]
    assert admit(plan, group, "spec", lambda spec: f"{spec}: too few rows") == "spec: too few rows"
    assert plan.groups == [] and _refusals(plan) == {("mul", "add", "relu"): "spec: too few rows"}
    # a planned refusal, not a failure, but the group runs through PyTorch: reported with its reason
    assert plan.fallbacks == [("mul → add → relu", "spec: too few rows")]


class _Backend:
    """A backend as the compiler sees it (kitsune.codegen.backends.Backend)."""
    name = "reference"

    def __init__(self, refusal=None, build_error=None):
        self._refusal, self._error = refusal, build_error

    def refusal(self, spec):
        return self._refusal

    def build(self, specs):
        assert self._refusal is None, "refused groups are not built"
        return [self._error for _ in specs]


def _compile(monkeypatch, backend, x):
    monkeypatch.setattr(kitsune.compiler, "backend_for", lambda device: backend)
    stats = FusionStats()
    compiled = compile_graph(_gm(_chain, x), [x], "forward", stats=stats)
    torch.testing.assert_close(compiled(x), _chain(x))
    (record,) = stats.records()
    assert record.groups == []
    return record


def test_compiler_asks_the_backend_and_records_its_refusal(monkeypatch):
    record = _compile(monkeypatch, _Backend(refusal="refused by the backend"), torch.randn(4, 8))
    # a planned refusal, not a failure, but the group runs through PyTorch: reported with its reason
    assert record.fallbacks == [("mul → add → relu", "refused by the backend")]
    assert _refusals(record)[("mul", "add", "relu")] == "refused by the backend"


def test_lowering_and_build_failures_are_decisions(monkeypatch):
    x = torch.randn(4, 8)
    record = _compile(monkeypatch, _Backend(build_error=RuntimeError("no")), x)
    assert _refusals(record) == {("mul", "add", "relu"): "reference kernel build failed: RuntimeError: no"}
    assert record.fallbacks == [("mul → add → relu", "reference kernel build failed: RuntimeError: no")]

    def lower_group(group, name):
        raise NotImplementedError("no index")

    monkeypatch.setattr(kitsune.compiler, "lower_group", lower_group)
    record = _compile(monkeypatch, _Backend(), x)
    assert _refusals(record) == {("mul", "add", "relu"): "lowering failed: no index"}
    assert record.fallbacks == [("mul → add → relu", "lowering failed: no index")]


def _groups(plan):
    return [tuple(n.name for n in g.nodes) for g in plan.groups]


def test_legality_does_not_depend_on_policy():
    def f(x, y):
        a = torch.sigmoid(x * 2 + y)
        return a * y - torch.tanh(x).sum(-1, keepdim=True), a.cumsum(0)

    gm = _gm(f, torch.randn(4, 6), torch.randn(4, 6))
    policies = [FusionConfig(), FusionConfig(cpu_fusion=False, gpu_fusion=False, min_tensor_size=10 ** 9),
                FusionConfig(enable_elementwise=False, enable_reduction=False)]
    nodes = [n for n in gm.graph.nodes if n.op == "call_function"]
    position = {n: i for i, n in enumerate(gm.graph.nodes)}
    for a in nodes:
        for b in nodes:
            answers = {can_merge(FusionGroup([a]), FusionGroup([b]), config, position) for config in policies}
            assert len(answers) == 1, (a, b, answers)
    assert {node_blocker(n) for n in nodes if n.target == torch.ops.aten.cumsum.default} != {None}
    # the device switch and min_tensor_size act on whole groups, after the groups are formed
    assert _groups(plan_pointwise(gm.graph, policies[1])) == _groups(plan_pointwise(gm.graph, policies[0]))
