"""FusionEngine: construction, fuse() on every accepted form, user patterns that
steer or are refused, enabled_patterns, stats and logging."""
import logging

import pytest
import torch
import torch.nn.functional as F
from torch import fx, nn
from torch.fx.experimental.proxy_tensor import make_fx

import kitsune
from kitsune.fusion import FusionConfig, FusionEngine, FusionPattern


@pytest.fixture(autouse=True)
def reference_backend(monkeypatch):
    monkeypatch.setenv("KITSUNE_BACKEND", "reference")


def kernels(engine):
    """{kernel name: set of node names} of everything the engine fused."""
    return {k: set(nodes) for rec in engine.records for k, nodes, _ in rec.groups}


def opportunities(engine, pattern=None):
    return [o for rec in engine.records for o in rec.opportunities if pattern is None or o.pattern == pattern]


def test_constructor_validates():
    FusionEngine(enable_fusion=True)
    FusionEngine(config=FusionConfig(max_fusion_size=4))
    FusionEngine(profile=True)
    with pytest.raises(TypeError, match="enable_fusion"):
        FusionEngine(enable_fusion="yes")
    with pytest.raises(TypeError, match="profile"):
        FusionEngine(profile=1)
    with pytest.raises(TypeError, match="config"):
        FusionEngine(config={"max_fusion_size": 4})


def test_fuse_module_matches_eager_and_fills_stats():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(8, 16), nn.GELU(), nn.Linear(16, 8))
    x = torch.randn(4, 8)
    engine = FusionEngine()
    kitsune.reset_fusion_stats()
    with torch.no_grad():
        out = engine.fuse(model)(x)
        torch.testing.assert_close(out, model(x))
    stats = engine.get_fusion_stats()
    # on the CPU a Linear is mm + add: the first one's bias joins the GELU kernel,
    # the second's add is a kernel of its own; the mms run through PyTorch
    assert stats["num_fused"] == 2 and stats["graphs"] == 1
    # eager: addmm, gelu, addmm; Kitsune: mm, bias + gelu, mm, bias (one more: CPU addmm is split)
    assert (stats["kernels_before"], stats["kernels_after"]) == (3, 4)
    assert 0.0 <= stats["efficiency"] <= 1.0
    assert stats["patterns"]["linear_activation"]["detected"] == 1
    assert stats["patterns"]["linear_activation"]["applied"] == 1  # library matmul + one epilogue kernel
    assert stats["bytes_after"] <= stats["bytes_before"] and stats["compile_seconds"] >= 0
    first, second = stats["group_details"]
    assert first["ops"] == ["linear", "gelu"] and first["fused_seconds"] <= first["unfused_seconds"]
    assert second["ops"] == ["linear"]
    # the process-wide stats saw the same compile
    assert kitsune.get_fusion_stats()["num_fused"] == 2
    engine.reset_stats()
    assert engine.get_fusion_stats()["num_fused"] == 0


def test_fuse_function_and_backward():
    engine = FusionEngine()
    x = torch.randn(4, 8, requires_grad=True)
    f = engine.fuse(lambda a: torch.sigmoid(a * 2 + 1) * a)
    f(x).sum().backward()
    expected = torch.autograd.grad((torch.sigmoid(x * 2 + 1) * x).sum(), x)[0]
    torch.testing.assert_close(x.grad, expected)
    assert {r.name for r in engine.records} == {"forward", "backward"}
    assert engine.get_fusion_stats()["num_fused"] >= 2


def test_fuse_list_of_operations():
    w, b = torch.randn(8, 16), torch.randn(16)
    engine = FusionEngine()
    layer = engine.fuse([("matmul", w), ("add", b), "relu", ("mul", 0.5)])
    assert isinstance(layer, nn.Module)
    x = torch.randn(4, 8)
    torch.testing.assert_close(layer(x), F.relu(x @ w + b) * 0.5)
    assert layer.op0_arg0 is w  # tensors are kept as buffers
    (names,) = kernels(engine).values()
    assert len(names) == 3  # add, relu, mul in one kernel; mm through PyTorch
    softmax = FusionEngine().fuse([("softmax", {"dim": 0})])
    torch.testing.assert_close(softmax(x), torch.softmax(x, 0))
    with pytest.raises(ValueError, match=r"operations\[1\].*'frobnicate'"):
        engine.fuse([("relu",), ("frobnicate",)])
    with pytest.raises(ValueError, match="empty"):
        engine.fuse([])
    with pytest.raises(TypeError, match=r"operations\[0\]"):
        engine.fuse([(3,)])


def test_fuse_aten_graph_module_compiles_now():
    gm = make_fx(lambda a, b: torch.relu(a + b) * 3, tracing_mode="fake")(torch.randn(4), torch.randn(4))
    engine = FusionEngine()
    fused = engine.fuse(gm)
    assert isinstance(fused, fx.GraphModule) and engine.get_fusion_stats()["num_fused"] == 1
    a, b = torch.randn(4), torch.randn(4)
    (out,) = fused(a, b) if isinstance(fused(a, b), (tuple, list)) else (fused(a, b),)
    torch.testing.assert_close(out, torch.relu(a + b) * 3)
    with pytest.raises(TypeError, match="fuse"):
        engine.fuse(42)


def test_register_pattern_validates():
    engine = FusionEngine()
    pattern = engine.register_pattern(FusionPattern(name="mine", ops=["add", "relu"]))
    assert engine.patterns["mine"] is pattern and engine.config.custom_patterns == (pattern,)
    with pytest.raises(ValueError, match="already"):
        engine.register_pattern(FusionPattern(name="mine", ops=["mul"]))
    with pytest.raises(ValueError, match="already"):
        engine.register_pattern(FusionPattern(name="softmax", ops=["softmax"]))
    with pytest.raises(TypeError):
        engine.register_pattern(["add", "relu"])
    with pytest.raises(ValueError, match="ops"):
        engine.register_pattern(FusionPattern(name="nothing", ops=[]))


def _chain(a, b):
    return torch.exp(torch.sigmoid((a + b) * 2))


def test_user_pattern_steers_a_fusion():
    x, y = torch.randn(4, 8), torch.randn(4, 8)
    config = FusionConfig(max_fusion_size=2)
    plain = FusionEngine(config=config)
    plain.fuse(_chain)(x, y)
    assert not any({"mul", "sigmoid"} <= names for names in kernels(plain).values())

    engine = FusionEngine(config=config)
    engine.register_pattern(FusionPattern(name="scaled_gate", ops=["mul", "sigmoid", "exp"]))
    out = engine.fuse(_chain)(x, y)
    torch.testing.assert_close(out, _chain(x, y))
    assert {"mul", "sigmoid", "exp"} in kernels(engine).values()
    (opp,) = opportunities(engine, "scaled_gate")
    assert opp.status == "applied" and opp.custom
    assert engine.get_fusion_stats()["patterns"]["scaled_gate"]["applied"] == 1


def test_user_pattern_refused_with_reason(caplog):
    engine = FusionEngine()
    engine.register_pattern(FusionPattern(name="mm_relu", ops=["matmul", "relu"], fusion_type="matmul"))
    x, w = torch.randn(4, 8), torch.randn(8, 8)
    with caplog.at_level(logging.DEBUG, logger="kitsune"):
        torch.testing.assert_close(engine.fuse(lambda a, b: torch.relu(a @ b))(x, w), torch.relu(x @ w))
    (opp,) = opportunities(engine, "mm_relu")
    assert opp.status == "not applied"
    assert "mm" in opp.reason and "opaque" in opp.reason
    decisions = [d for rec in engine.records for d in rec.decisions if "mm_relu" in d.reason]
    assert decisions and not decisions[0].fused
    assert any("mm_relu" in r.getMessage() and r.levelno == logging.DEBUG for r in caplog.records)


def test_enabled_patterns_restrict_fusion():
    f = lambda a, b: torch.relu(a + b) * 3  # noqa: E731
    x, y = torch.randn(4, 8), torch.randn(4, 8)
    everything = FusionEngine()
    everything.fuse(f)(x, y)
    assert list(kernels(everything).values()) == [{"add", "relu", "mul"}]
    only = FusionEngine(config=FusionConfig(enabled_patterns=["binary_activation"]))
    torch.testing.assert_close(only.fuse(f)(x, y), f(x, y))
    assert list(kernels(only).values()) == [{"add", "relu"}]
    nothing = FusionEngine(config=FusionConfig(enabled_patterns=["softmax"]))
    nothing.fuse(f)(x, y)
    assert kernels(nothing) == {}
    (opp,) = opportunities(nothing, "binary_activation")
    assert opp.status == "disabled"


def test_enable_fusion_false_detects_but_fuses_nothing():
    engine = FusionEngine(enable_fusion=False)
    x = torch.randn(4, 8)
    torch.testing.assert_close(engine.fuse(lambda a: torch.relu(a * 2))(x), torch.relu(x * 2))
    stats = engine.get_fusion_stats()
    assert stats["num_fused"] == 0
    assert stats["patterns"]["scalar_activation"] == {"detected": 1, "applied": 0, "partial": 0,
                                                      "not_applied": 1, "disabled": 0}
    assert stats["efficiency"] == 0.0


def test_applied_fusion_logged_at_info(caplog):
    engine = FusionEngine()
    with caplog.at_level(logging.INFO, logger="kitsune"):
        engine.fuse(lambda a, b: torch.relu(a - b))(torch.randn(4), torch.randn(4))
    messages = [r.getMessage() for r in caplog.records if r.levelno == logging.INFO]
    assert any("binary_activation applied" in m for m in messages), messages


def _gate_model(a, b):
    return (torch.sigmoid(a * b) + a).relu()


def _engine_with_replacement(fn):
    engine = FusionEngine()
    engine.register_pattern(FusionPattern(name="gate", ops=["mul", "sigmoid", "add"], replacement=fn))
    return engine


def test_replacement_callable_runs_instead_of_the_ops():
    calls = []

    def gate(a, b):
        calls.append((a.shape, b.shape))
        return torch.sigmoid(a * b) + a

    engine = _engine_with_replacement(gate)
    x, y = torch.randn(8), torch.randn(8)
    torch.testing.assert_close(engine.fuse(_gate_model)(x, y), _gate_model(x, y))
    assert calls == [(x.shape, y.shape)]
    (record,) = engine.records
    targets = [getattr(n.target, "__name__", "") for n in record.graph.nodes if n.op == "call_function"]
    assert "kitsune_replacement_gate" in targets and "sigmoid" not in " ".join(targets)
    (opp,) = opportunities(engine, "gate")
    assert opp.status == "applied" and opp.kernels == ("kitsune_replacement_gate",)


def test_bad_replacement_falls_back_to_the_original_ops(caplog, monkeypatch):
    engine = _engine_with_replacement(lambda a, b: torch.zeros(3))
    x, y = torch.randn(8), torch.randn(8)
    with caplog.at_level(logging.WARNING, logger="kitsune"):
        torch.testing.assert_close(engine.fuse(_gate_model)(x, y), _gate_model(x, y))
    assert any("replacement of pattern 'gate'" in r.getMessage() for r in caplog.records)
    assert engine.get_fusion_stats()["patterns"]["gate"]["not_applied"] == 1
    # a replacement computing something else is only caught when checking (KITSUNE_DEBUG=1)
    monkeypatch.setenv("KITSUNE_DEBUG", "1")
    torch._dynamo.reset()
    engine = _engine_with_replacement(lambda a, b: torch.sigmoid(a * b) - a)
    torch.testing.assert_close(engine.fuse(_gate_model)(x, y), _gate_model(x, y))
    (opp,) = opportunities(engine, "gate")
    engine.get_fusion_stats()
    assert opp.status == "not applied" and "differs" in opp.reason


LOG_SCRIPT = """
import torch, kitsune
from kitsune.fusion import FusionEngine, FusionPattern
engine = FusionEngine()
engine.register_pattern(FusionPattern(name="mm_relu", ops=["matmul", "relu"], fusion_type="matmul"))
f = engine.fuse(lambda a, w: torch.relu(a @ w) - a)
a, w = torch.randn(4, 4), torch.randn(4, 4)
torch.testing.assert_close(f(a, w), torch.relu(a @ w) - a)
"""


@pytest.mark.parametrize("level", ["", "info", "debug"])
def test_kitsune_log_env_turns_logging_on(tmp_path, level):
    import os
    import subprocess
    import sys
    env = dict(os.environ, KITSUNE_BACKEND="reference", KITSUNE_CACHE_DIR=str(tmp_path), KITSUNE_LOG=level)
    result = subprocess.run([sys.executable, "-c", LOG_SCRIPT], capture_output=True, text=True, env=env,
                            timeout=300)
    assert result.returncode == 0, result.stderr[-2000:]
    # KITSUNE_LOG's own handler (no logging configured): "kitsune LEVEL: message"
    lines = [line for line in result.stderr.splitlines() if line.startswith(("kitsune INFO:", "kitsune DEBUG:"))]
    applied = [line for line in lines if line.startswith("kitsune INFO:") and
               "pattern elementwise_chain applied" in line]
    refused = [line for line in lines if line.startswith("kitsune DEBUG:") and "pattern 'mm_relu'" in line
               and "refused" in line]
    assert not any("kitsune: kitsune:" in line or ": kitsune:" in line for line in result.stderr.splitlines())
    if level == "":
        assert lines == []
    elif level == "info":
        assert applied and not refused and not any(line.startswith("kitsune DEBUG") for line in lines)
    else:
        assert applied and refused and "opaque" in refused[0]
