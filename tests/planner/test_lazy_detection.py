"""Pattern detection runs at compile time only when the plan needs it; otherwise the
first read of the stats, explain() or the report runs it, with the same results."""
import pytest
import torch

import kitsune.planner.detect as detect
from kitsune.config import FusionConfig
from kitsune.fusion import FusionEngine, FusionPattern
from kitsune.planner.detect import needs_detection


@pytest.fixture(autouse=True)
def reference_backend(monkeypatch):
    monkeypatch.setenv("KITSUNE_BACKEND", "reference")


@pytest.fixture
def detections(monkeypatch):
    calls = []
    real = detect.detect_patterns

    def counting(graph, config, graph_name):
        calls.append(graph_name)
        return real(graph, config, graph_name)

    monkeypatch.setattr(detect, "detect_patterns", counting)
    monkeypatch.setattr("kitsune.compiler.detect_patterns", counting)
    monkeypatch.setattr("kitsune.planner.steer.detect_patterns", counting)
    return calls


def _mm_relu_scale(a, w):
    return torch.relu(a @ w) * 2


def _run(engine):
    a, w = torch.randn(4, 8), torch.randn(8, 8)
    torch.testing.assert_close(engine.fuse(_mm_relu_scale)(a, w), _mm_relu_scale(a, w))


def test_needs_detection_only_for_steering_configs():
    assert not needs_detection(FusionConfig())
    assert not needs_detection(FusionConfig(enabled_patterns=["elementwise_chain", "softmax"]))
    assert needs_detection(FusionConfig(enabled_patterns=["softmax"]))
    assert needs_detection(FusionConfig(custom_patterns=[FusionPattern("mine", ["mul", "add"])]))


def test_detection_waits_for_the_stats(detections):
    engine = FusionEngine()
    _run(engine)
    assert detections == []
    stats = engine.get_fusion_stats()
    assert detections == ["inference"]
    assert stats["patterns"]["linear_activation"]["detected"] == 1
    engine.explanation()
    assert detections == ["inference"]  # once per graph


def test_custom_patterns_detect_at_compile_time(detections):
    engine = FusionEngine(config=FusionConfig(custom_patterns=[FusionPattern("mine", ["relu", "mul"])]))
    _run(engine)
    assert detections == ["inference"]


def test_lazy_and_eager_detection_report_the_same(monkeypatch):
    lazy = FusionEngine()
    _run(lazy)
    monkeypatch.setattr("kitsune.planner.needs_detection", lambda config: True)
    monkeypatch.setattr("kitsune.compiler.needs_detection", lambda config: True)
    torch._dynamo.reset()
    eager = FusionEngine()
    _run(eager)
    assert eager.records[0].pending_detection is None and lazy.records[0].pending_detection is not None
    first, second = lazy.get_fusion_stats(), eager.get_fusion_stats()
    for key in ("efficiency", "patterns", "groups", "bytes_before", "bytes_after", "estimated_speedup"):
        assert first[key] == second[key], key
    def strip(text):  # the first line and the phase line hold compile times
        return [line for line in text.splitlines()[1:] if not line.startswith("Compile time by phase")]
    assert strip(lazy.explanation()) == strip(eager.explanation())


def test_record_keeps_the_planned_graph_when_nothing_fuses():
    engine = FusionEngine()
    a, w = torch.randn(4, 8), torch.randn(8, 8)
    engine.fuse(lambda a, w: a @ w)(a, w)
    (record,) = engine.records
    targets = {n.target for n in record.graph.nodes if n.op == "call_function"}
    assert targets == {torch.ops.aten.mm.default}  # not the torch.mm the runtime calls
    assert [o.pattern for o in record.opportunities] == []
