"""FusionEngine(profile=True): measured fuse-or-not decisions, cached on disk."""
import json
import os
import subprocess
import sys
import textwrap

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
    (measured,) = run(FusionEngine(profile=True, config=FusionConfig(min_fusion_benefit=1e6)), 96).measured.values()
    assert not measured["cached"]


def test_a_config_asking_for_min_fusion_benefit_measures_without_profile(monkeypatch, tmp_path):
    monkeypatch.setenv("KITSUNE_BACKEND", "reference")
    monkeypatch.setenv("KITSUNE_CACHE_DIR", str(tmp_path))
    engine = FusionEngine(config=FusionConfig(min_fusion_benefit=1e6))  # no profile=True
    assert engine.profile
    record = run(engine, 64)
    assert record.measured and record.groups == []
    assert not FusionEngine().profile  # the default benefit alone does not time anything
