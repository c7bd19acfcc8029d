"""explain() returns its text (print(engine.explain()) prints it once, no None), and
stats before anything was compiled say so instead of claiming 100 % efficiency."""
import io

import pytest
import torch

import kitsune
from kitsune.fusion import FusionEngine


@pytest.fixture(autouse=True)
def reference_backend(monkeypatch):
    monkeypatch.setenv("KITSUNE_BACKEND", "reference")


def _f(x):
    return torch.relu(x) * 2 + 1


@pytest.fixture
def engine():
    engine = FusionEngine()
    x = torch.randn(4, 8)
    torch.testing.assert_close(engine.fuse(_f)(x), _f(x))
    return engine


def test_explain_returns_the_text_and_prints_nothing(engine, capsys):
    text = engine.explain()
    assert capsys.readouterr().out == ""
    assert isinstance(text, str) and text.startswith("Kitsune fusion report: 1 graph(s)")
    print(engine.explain())
    out = capsys.readouterr().out
    assert out == text + "\n" and "None" not in out
    assert repr(text) == text  # an interactive session shows the report, not a quoted string
    assert engine.explanation() == text


def test_explain_writes_to_a_file_when_given_one(engine):
    out = io.StringIO()
    text = engine.explain(file=out, verbose=True)
    assert out.getvalue() == text + "\n"


def test_stats_before_anything_compiled_are_honest():
    engine = FusionEngine()
    stats = engine.get_fusion_stats()
    assert (stats["graphs"], stats["num_fused"], stats["efficiency"]) == (0, 0, 0.0)
    assert "nothing compiled yet" in engine.explain()
    kitsune.reset_fusion_stats()
    stats = kitsune.get_fusion_stats()
    assert (stats["graphs"], stats["num_fused"], stats["efficiency"]) == (0, 0, 0.0)
    assert f"{stats['efficiency']:.2%}" == "0.00%"  # spec 01's print line works


def test_stats_after_compiling_report_the_efficiency(engine):
    stats = engine.get_fusion_stats()
    assert stats["graphs"] == 1 and stats["num_fused"] == 1 and stats["efficiency"] == 1.0
