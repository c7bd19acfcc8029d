"""Never silent: what does not fuse is in the stats and explain() with its reason, and a
graph that fuses nothing is logged at INFO once (kitsune.compiler, planner.plan)."""
import logging

import pytest
import torch

import kitsune
from kitsune.backend import make_backend
from kitsune.codegen.backends import CpuBackend
from kitsune.config import FusionConfig
from kitsune.planner.plan import Decision, FusionPlan
from kitsune.report.explain import explain_records
from kitsune.report.stats import GLOBAL_STATS


def _chain(x):
    return torch.relu(x * 2 + 1).sum(-1)


def _run(fn, config, *inputs, caplog=None):
    kitsune.reset_fusion_stats()
    with caplog.at_level(logging.INFO, logger="kitsune"):
        out = torch.compile(fn, backend=make_backend(config))(*inputs)
        if out.requires_grad:
            out.backward()
    stats = kitsune.get_fusion_stats()
    nothing = [r.getMessage() for r in caplog.records if "nothing fused" in r.getMessage()]
    return stats, nothing, explain_records(GLOBAL_STATS.records())


def test_a_graph_of_refused_nodes_is_reported_whole(caplog):
    config = FusionConfig(enable_elementwise=False, enable_reduction=False)
    stats, logged, text = _run(_chain, config, torch.randn(4, 8), caplog=caplog)
    assert stats["num_fused"] == 0
    (entry,) = stats["fallbacks"]
    assert entry[0] == "whole graph" and entry[1].startswith("nothing fused: elementwise fusion disabled (×")
    assert logged == [f"inference graph: nothing fused, it runs through PyTorch: {entry[1][15:]}"]
    assert "nothing fused: elementwise fusion disabled" in text


def test_refused_groups_are_reported_each_and_the_graph_once(caplog):
    x = torch.randn(4, 8, requires_grad=True)
    stats, logged, text = _run(lambda t: _chain(t).sum(), FusionConfig(cpu_fusion=False), x, caplog=caplog)
    assert stats["num_fused"] == 0 and stats["fallbacks"]
    assert {why for _, why in stats["fallbacks"]} == {"fusion disabled for cpu in FusionConfig"}
    assert len(logged) == 2 and all("fusion disabled for cpu" in line for line in logged)  # forward, backward
    assert "fusion disabled for cpu in FusionConfig" in text


def test_a_backend_refusal_is_a_fallback_with_its_reason(monkeypatch, caplog):
    monkeypatch.setattr(CpuBackend, "refusal", lambda self, spec: "too few rows (test)")
    stats, logged, text = _run(_chain, FusionConfig(), torch.randn(4, 8), caplog=caplog)
    assert stats["num_fused"] == 0
    assert [why for _, why in stats["fallbacks"]] == ["too few rows (test)"]
    assert len(logged) == 1 and "too few rows (test)" in logged[0] and "too few rows (test)" in text


def test_a_graph_with_nothing_to_fuse_is_not_reported(caplog):
    stats, logged, _ = _run(lambda a, b: a @ b, FusionConfig(), torch.randn(4, 8), torch.randn(8, 3),
                            caplog=caplog)
    assert stats["fallbacks"] == [] and logged == []


def test_a_fused_graph_is_not_reported_as_unfused(caplog):
    stats, logged, _ = _run(_chain, FusionConfig(), torch.randn(4, 8), caplog=caplog)
    assert stats["num_fused"] >= 1 and stats["fallbacks"] == [] and logged == []


@pytest.mark.parametrize("reasons, expected", [
    (["single operation: nothing to fuse", "mm is matmul (runs through PyTorch)"], None),
    (["dtype torch.complex64 not generated"] * 2 + ["no tensor metadata"],
     "dtype torch.complex64 not generated (×2); no tensor metadata"),
    (["a", "b", "b", "c", "c", "c", "d"], "c (×3); b (×2); a; 1 other reason(s)"),
])
def test_why_nothing_fused_ranks_the_refusals(reasons, expected):
    plan = FusionPlan(decisions=[Decision((f"n{i}",), False, r) for i, r in enumerate(reasons)])
    plan.decisions.append(Decision(("m",), True, "pointwise chain of 2 ops"))
    plan.decisions.append(Decision(("x → y", "z"), False, "reductions over different iteration spaces"))
    assert plan.why_nothing_fused() == expected


def test_why_nothing_fused_prefers_the_refused_groups():
    plan = FusionPlan(decisions=[Decision(("a", "b"), False, "reductions over different iteration spaces")],
                      fallbacks=[("c → d", "fusion disabled for cpu in FusionConfig")])
    assert plan.why_nothing_fused() == "fusion disabled for cpu in FusionConfig"
