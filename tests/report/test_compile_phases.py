"""Compile time by phase (issue 19 item 1): present, adding up to the total, and
PyTorch's capture told apart from Kitsune's own time."""
import pytest
import torch
import torch.nn.functional as F

import kitsune
from kitsune.compiler import compile_graph
from kitsune.record import default_sink
from kitsune.report.explain import explain_records
from kitsune.report.stats import FusionStats

OWN = ("rewrite", "cache_load", "plan", "lower", "build", "cache_store", "assemble", "other")
COLD = ("rewrite", "plan", "lower", "build", "assemble", "other")  # in every cold compile


def _step(x, w):
    return F.gelu(x @ w * 0.5).sum(-1)


@pytest.mark.parametrize("graph_cache", ["0", "1"])
def test_phases_add_up_to_the_compile_time_and_capture_is_separate(graph_cache, monkeypatch, tmp_path):
    monkeypatch.setenv("KITSUNE_GRAPH_CACHE", graph_cache)
    monkeypatch.setenv("KITSUNE_CACHE_DIR", str(tmp_path))
    torch._dynamo.reset()
    kitsune.reset_fusion_stats()
    compiled = torch.compile(_step, backend="kitsune")
    x = torch.randn(16, 8, requires_grad=True)
    compiled(x, torch.randn(8, 4)).sum().backward()
    records = default_sink().records()
    assert [r.name for r in records] == ["forward", "backward"]
    for record in records:
        assert set(COLD) <= set(record.phases) and ("cache_load" in record.phases) is (graph_cache == "1")
        own = sum(record.phases.get(name, 0.0) for name in OWN)
        assert own == pytest.approx(record.compile_seconds, rel=1e-6, abs=1e-9)
        assert all(seconds >= 0 for seconds in record.phases.values())
    # Dynamo + AOTAutograd went to the first graph of the capture; the backward, compiled
    # at the first backward, is outside it
    assert records[0].phases["capture"] > 0 and "capture" not in records[1].phases
    stats = kitsune.get_fusion_stats()
    assert list(stats["compile_phases"])[0] == "capture"
    assert sum(stats["compile_phases"].get(name, 0.0) for name in OWN) == \
        pytest.approx(stats["compile_seconds"], abs=0.01)
    text = explain_records(records)
    assert "Compile time by phase (s): Kitsune rewrite" in text and "Dynamo + AOTAutograd" in text
    if graph_cache == "1":  # a warm start: loaded, not planned or built, and still adding up
        torch._dynamo.reset()
        kitsune.reset_fusion_stats()
        torch.compile(_step, backend="kitsune")(x, torch.randn(8, 4)).sum().backward()
        for record in default_sink().records():
            assert record.from_cache and {"plan", "lower", "build"}.isdisjoint(record.phases)
            assert sum(record.phases.get(name, 0.0) for name in OWN) == \
                pytest.approx(record.compile_seconds, rel=1e-6, abs=1e-9)
        assert kitsune.get_fusion_stats()["graphs_from_cache"] == 2
        assert "2 of 2 graph(s) loaded from the compiled-graph cache" in explain_records(default_sink().records())


def test_a_graph_compiled_directly_has_no_capture_phase():
    gm = torch.fx.symbolic_trace(lambda a: torch.relu(a + 1.0) * 2.0)
    sink = FusionStats()
    fn = compile_graph(gm, [torch.randn(10)], "graph", stats=sink)
    a = torch.randn(10)
    torch.testing.assert_close(fn(a), torch.relu(a + 1.0) * 2.0)
    (record,) = sink.records()
    assert "capture" not in record.phases and set(COLD) <= set(record.phases)
