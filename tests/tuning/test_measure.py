"""Measured fuse-or-not decisions (kitsune.tuning.measure), cached on disk."""
import io
import json
import os
import subprocess
import sys
import textwrap

import pytest
import torch

from kitsune.fusion import FusionConfig, FusionEngine


def f(a):
    return torch.sigmoid(a * 2) * a + 1


def run(engine, n):
    x = torch.randn(n)
    fused = engine.fuse(f)
    for _ in range(2):  # the first call measures, the second runs what was decided
        torch.testing.assert_close(fused(x), f(x))
    (record,) = engine.records
    return record


def test_group_below_min_fusion_benefit_runs_unfused(monkeypatch, tmp_path):
    monkeypatch.setenv("KITSUNE_BACKEND", "reference")
    monkeypatch.setenv("KITSUNE_CACHE_DIR", str(tmp_path))
    engine = FusionEngine(profile=True, config=FusionConfig(min_fusion_benefit=1e6))
    record = run(engine, 64)
    (measured,) = record.measured.values()
    assert measured["fused_s"] > 0 and measured["unfused_s"] > 0 and not measured["cached"]
    assert record.groups == [] and engine.get_fusion_stats()["num_fused"] == 0
    assert engine.get_fusion_stats()["kernels_after"] == engine.get_fusion_stats()["kernels_before"]
    assert any("min_fusion_benefit" in why for _, why in record.fallbacks)
    assert engine.get_fusion_stats()["profiled"] is True
    assert "measured" in engine.explanation() or "min_fusion_benefit" in engine.explanation()


def test_without_profile_nothing_is_timed(monkeypatch, tmp_path):
    monkeypatch.setenv("KITSUNE_BACKEND", "reference")
    monkeypatch.setenv("KITSUNE_CACHE_DIR", str(tmp_path))
    record = run(FusionEngine(config=FusionConfig(min_tensor_size=0)), 64)
    assert record.measured == {} and len(record.groups) == 1


SCRIPT = textwrap.dedent("""
    import json, sys, torch
    from kitsune.fusion import FusionConfig, FusionEngine
    engine = FusionEngine(profile=True, config=FusionConfig(min_fusion_benefit=1e6))
    fused = engine.fuse(lambda a: torch.sigmoid(a * 2) * a + 1)
    fused(torch.randn(int(sys.argv[1])))
    print(json.dumps([m["cached"] for r in engine.records for m in r.measured.values()]))
""")


def test_decision_survives_a_process_restart_and_a_new_shape_redecides(monkeypatch, tmp_path):
    cache = tmp_path / "cache"
    monkeypatch.setenv("KITSUNE_BACKEND", "reference")
    monkeypatch.setenv("KITSUNE_CACHE_DIR", str(cache))
    engine = FusionEngine(profile=True, config=FusionConfig(min_fusion_benefit=1e6))
    (measured,) = run(engine, 64).measured.values()
    assert not measured["cached"] and (cache / "decisions" / f"{measured['key']}.json").exists()
    script = tmp_path / "again.py"
    script.write_text(SCRIPT)
    env = dict(os.environ, KITSUNE_BACKEND="reference", KITSUNE_CACHE_DIR=str(cache))
    same = subprocess.run([sys.executable, str(script), "64"], capture_output=True, text=True, env=env, timeout=300)
    assert json.loads(same.stdout.strip().splitlines()[-1]) == [True], same.stderr[-2000:]
    # a new shape is a new decision, in this process
    torch._dynamo.reset()
    first_key = measured["key"]
    (measured,) = run(FusionEngine(profile=True, config=FusionConfig(min_fusion_benefit=1e6)), 96).measured.values()
    assert not measured["cached"] and measured["key"] != first_key
    assert sorted(p.stem for p in (cache / "decisions").glob("*.json")) == sorted([first_key, measured["key"]])
    # and a new dtype too
    torch._dynamo.reset()
    engine = FusionEngine(profile=True, config=FusionConfig(min_fusion_benefit=1e6))
    engine.fuse(f)(torch.randn(64, dtype=torch.float64))
    (measured,) = engine.records[0].measured.values()
    assert not measured["cached"] and measured["key"] != first_key


def test_a_config_asking_for_min_fusion_benefit_measures_without_profile(monkeypatch, tmp_path):
    monkeypatch.setenv("KITSUNE_BACKEND", "reference")
    monkeypatch.setenv("KITSUNE_CACHE_DIR", str(tmp_path))
    engine = FusionEngine(config=FusionConfig(min_fusion_benefit=1e6))  # no profile=True
    assert engine.profile
    record = run(engine, 64)
    assert record.measured and record.groups == []
    assert not FusionEngine().profile  # the default benefit alone does not time anything


def _fixed_times(monkeypatch, fused_s, unfused_s):
    """Every fused kernel takes fused_s, its unfused ops unfused_s."""
    from kitsune.tuning import measure
    from kitsune.runtime.fused_call import FusedGroupCall
    monkeypatch.setattr(measure, "_time", lambda fn, args, device: fused_s if isinstance(fn, FusedGroupCall)
                        else unfused_s)


def test_stats_hold_the_measured_speedup_of_every_group(monkeypatch, tmp_path):
    monkeypatch.setenv("KITSUNE_BACKEND", "reference")
    monkeypatch.setenv("KITSUNE_CACHE_DIR", str(tmp_path / "fast"))
    _fixed_times(monkeypatch, 1e-3, 4e-3)
    engine = FusionEngine(profile=True)
    (kernel,) = [k for k, _, _ in run(engine, 64).groups]
    stats = engine.get_fusion_stats()
    assert stats["measured"] == [{"kernel": kernel, "graph": "inference", "fused_s": 1e-3, "unfused_s": 4e-3,
                                  "speedup": 4.0, "kept": True, "cached": False}]
    (group,) = stats["group_details"]
    assert group["kernel"] == kernel and group["measured_speedup"] == 4.0
    assert "1 kept, 0 run unfused" in engine.explanation() and "(4.00x)" in engine.explanation()

    # slower than min_fusion_benefit asks: run unfused, still listed with its measurement
    torch._dynamo.reset()
    monkeypatch.setenv("KITSUNE_CACHE_DIR", str(tmp_path / "slow"))
    _fixed_times(monkeypatch, 1e-3, 1.5e-3)
    engine = FusionEngine(config=FusionConfig(min_fusion_benefit=2.0))
    run(engine, 64)
    stats = engine.get_fusion_stats()
    (measured,) = stats["measured"]
    assert measured["speedup"] == 1.5 and measured["kept"] is False
    assert stats["num_fused"] == 0 and stats["group_details"] == []
    (fallback,) = stats["fallbacks"]
    assert "measured 1.50x faster than unfused < min_fusion_benefit=2.0" in fallback[1]
    assert "0 kept, 1 run unfused" in engine.explanation() and "(1.00x)" in engine.explanation()
    # without profiling, group details carry no measurement
    torch._dynamo.reset()
    engine = FusionEngine()
    run(engine, 64)
    assert engine.get_fusion_stats()["measured"] == []
    assert engine.get_fusion_stats()["group_details"][0]["measured_speedup"] is None


def _nine_groups(a, w):
    for _ in range(9):  # each matmul runs through PyTorch: nine separate fused groups
        a = (a.sin() * 2) @ w
    return a


class _Terminal(io.StringIO):
    def isatty(self):
        return True


@pytest.mark.parametrize("terminal", [True, False])
def test_profiling_many_groups_shows_progress_on_a_terminal(monkeypatch, tmp_path, terminal):
    monkeypatch.setenv("KITSUNE_BACKEND", "reference")
    monkeypatch.setenv("KITSUNE_CACHE_DIR", str(tmp_path))
    engine = FusionEngine(profile=True)
    fused = engine.fuse(_nine_groups)
    a, w = torch.randn(4, 4), torch.randn(4, 4)
    err = _Terminal() if terminal else io.StringIO()
    monkeypatch.setattr(sys, "stderr", err)
    out = fused(a, w)
    monkeypatch.undo()
    torch.testing.assert_close(out, _nine_groups(a, w))
    (record,) = engine.records
    assert len(record.measured) == 9
    if terminal:
        steps = err.getvalue().split("\r")
        assert [s.strip() for s in steps if s] == [f"kitsune: timing fused kernels {i}/9" for i in range(1, 10)]
        assert err.getvalue().endswith("9/9\n")
    else:
        assert "timing fused kernels" not in err.getvalue()
