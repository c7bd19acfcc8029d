"""Measured fuse-or-not decisions (kitsune.tuning.measure), cached on disk."""
import io
import json
import operator
import os
import subprocess
import sys
import textwrap

import pytest
import torch

import kitsune
from kitsune.backend import make_backend
from kitsune.fusion import FusionConfig, FusionEngine
from kitsune.runtime.fused_call import FusedGroupCall
from kitsune.tuning import measure


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
    monkeypatch.setattr(measure, "_time", lambda fn, args, device: fused_s if isinstance(fn, FusedGroupCall)
                        else unfused_s)


def test_stats_hold_the_measured_speedup_of_every_group(monkeypatch, tmp_path):
    monkeypatch.setenv("KITSUNE_BACKEND", "reference")
    monkeypatch.setenv("KITSUNE_CACHE_DIR", str(tmp_path / "fast"))
    _fixed_times(monkeypatch, 1e-3, 4e-3)
    engine = FusionEngine(profile=True)
    (kernel,) = [k for k, _, _ in run(engine, 64).groups]
    stats = engine.get_fusion_stats()
    (entry,) = stats["measured"]
    assert isinstance(entry.pop("device"), str) and isinstance(entry.pop("when"), str)
    assert stats["measured"] == [{"kernel": kernel, "graph": "inference", "fused_s": 1e-3, "unfused_s": 4e-3,
                                  "speedup": 4.0, "kept": True, "cached": False, "decision": "fused",
                                  "spread": 0.0, "baseline": "user ops"}]
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


# -- every entry point, the user's ops as the baseline, rounds, the cache -------------------------



class _Norm(torch.nn.Module):
    def __init__(self):
        super().__init__()
        self.ln = torch.nn.LayerNorm(32)

    def forward(self, x):
        h = self.ln(x)  # Dynamo names this node "h"; its source is "layer_norm"
        return h * 2


def _measured(records):
    return [(r, name, m) for r in records for name, m in r.measured.items()]


@pytest.mark.parametrize("entry", ["optimize", "make_backend"])
def test_a_config_threshold_measures_on_every_entry_point(monkeypatch, tmp_path, entry):
    from kitsune.report.stats import GLOBAL_STATS
    monkeypatch.setenv("KITSUNE_CACHE_DIR", str(tmp_path))
    torch._dynamo.reset()
    kitsune.reset_fusion_stats()
    config = FusionConfig(min_fusion_benefit=1e6)
    fused = kitsune.optimize(f, config) if entry == "optimize" else torch.compile(f, backend=make_backend(config))
    x = torch.randn(64)
    for _ in range(2):
        torch.testing.assert_close(fused(x), f(x))
    ((record, name, m),) = _measured(GLOBAL_STATS.records())
    assert m["decision"] == "unfused" and m["baseline"] == "user ops" and not m["cached"]
    assert record.groups == [] and record.kernel_calls[name].kernel is None
    assert any("< min_fusion_benefit=1000000.0" in why for _, why in record.fallbacks)
    stats = kitsune.get_fusion_stats()
    assert stats["num_fused"] == 0 and stats["measured"][0]["kept"] is False
    # the default threshold alone measures nothing
    torch._dynamo.reset()
    kitsune.reset_fusion_stats()
    kitsune.optimize(f)(x)
    assert _measured(GLOBAL_STATS.records()) == [] and kitsune.get_fusion_stats()["num_fused"] == 1


def _baselines(monkeypatch):
    """Every (unfused callable, its arguments, fused call, its arguments) that is measured."""
    seen = []
    real = measure.measure_pair

    def spy(fused, fused_args, unfused, unfused_args, device, threshold, **options):
        seen.append((unfused, list(unfused_args), fused, list(fused_args)))
        return real(fused, fused_args, unfused, unfused_args, device, threshold, **options)
    monkeypatch.setattr(measure, "measure_pair", spy)
    return seen


def test_a_layer_norm_is_measured_against_the_users_layer_norm(monkeypatch, tmp_path):
    monkeypatch.setenv("KITSUNE_CACHE_DIR", str(tmp_path))
    seen = _baselines(monkeypatch)
    model = _Norm()
    with torch.no_grad():
        model.ln.weight.uniform_(0.5, 2.0)
        model.ln.bias.uniform_(-1.0, 1.0)
    engine = FusionEngine(profile=True)
    x = torch.randn(8, 32)
    with torch.no_grad():
        torch.testing.assert_close(engine.fuse(model)(x), model(x))
    ((_, _, m),) = _measured(engine.records)
    assert m["baseline"] == "user ops" and "baseline_why" not in m
    ((unfused, args, fused, fused_args),) = seen
    assert not isinstance(unfused, FusedGroupCall) and unfused is not fused.fallback
    # the baseline is F.layer_norm itself (no decomposition), fed the right weight and bias
    targets = [n.target for n in unfused.graph.nodes if n.op == "call_function"]
    assert targets == [torch.nn.functional.layer_norm, operator.mul]
    with torch.no_grad():
        torch.testing.assert_close(unfused(*args)[-1], model(x))
    assert "baseline user ops" in engine.explanation()


def test_a_backward_graph_is_measured_against_its_decomposed_ops(monkeypatch, tmp_path):
    monkeypatch.setenv("KITSUNE_CACHE_DIR", str(tmp_path))
    engine = FusionEngine(profile=True)
    x = torch.randn(8, 32, requires_grad=True)
    fused = engine.fuse(lambda a: torch.sigmoid(a * 2) * a + 1)
    fused(x).sum().backward()
    fused(x).sum().backward()
    kinds = {r.name: m for r, _, m in _measured(engine.records)}
    assert kinds["forward"]["baseline"] == "user ops"
    assert kinds["backward"]["baseline"] == "decomposed ops"
    assert "backward graph" in kinds["backward"]["baseline_why"]
    torch.testing.assert_close(x.grad, 2 * torch.func.grad(lambda a: (torch.sigmoid(a * 2) * a + 1).sum())(x))


def test_a_noisy_measurement_is_undecided_keeps_the_fusion_and_is_not_cached(monkeypatch, tmp_path):
    monkeypatch.setenv("KITSUNE_CACHE_DIR", str(tmp_path))
    unfused_calls = []

    def noisy(fn, args, device):  # the unfused ops take 1 ms in one round, 3 ms in the next
        if isinstance(fn, FusedGroupCall):
            return 1e-3
        unfused_calls.append(1)
        return 3e-3 if (len(unfused_calls) - 1) // measure.ROUND_SAMPLES % 2 else 1e-3
    monkeypatch.setattr(measure, "_time", noisy)
    engine = FusionEngine(config=FusionConfig(min_fusion_benefit=1.5))
    record = run(engine, 64)
    (m,) = record.measured.values()
    assert m["decision"] == "undecided" and m["spread"] > measure.TOLERANCE and not m["cached"]
    assert len(m["rounds"]) == measure.MAX_ROUNDS
    assert len(record.groups) == 1 and record.kernel_calls[record.groups[0][0]].kernel is not None
    assert not list((tmp_path / "decisions").glob("*.json"))
    assert "1 undecided" in engine.explanation()


def test_a_cached_decision_keeps_its_measurement(monkeypatch, tmp_path):
    monkeypatch.setenv("KITSUNE_CACHE_DIR", str(tmp_path))
    _fixed_times(monkeypatch, 1e-3, 1.2e-3)
    run(FusionEngine(config=FusionConfig(min_fusion_benefit=2.0)), 64)
    torch._dynamo.reset()
    engine = FusionEngine(config=FusionConfig(min_fusion_benefit=2.0))
    record = run(engine, 64)
    (m,) = record.measured.values()
    assert m["cached"] and m["decision"] == "unfused" and m["baseline"] == "user ops"
    assert m["rounds"] == [[1e-3, 1.2e-3]] * measure.MIN_ROUNDS and m["spread"] == 0.0
    assert m["device"].startswith("cpu") and m["when"]
    (fallback,) = engine.get_fusion_stats()["fallbacks"]
    assert f"cached decision measured {m['when']} on {m['device']}" in fallback[1]
    assert engine.get_fusion_stats()["measured"][0]["cached"] is True and "1 cached" in engine.explanation()
    # rounds that agreed decide another threshold too
    torch._dynamo.reset()
    (m,) = run(FusionEngine(config=FusionConfig(min_fusion_benefit=1.2)), 64).measured.values()
    assert m["cached"] and m["decision"] == "fused"


def test_a_cached_measurement_that_cannot_decide_a_new_threshold_is_not_reused(monkeypatch):
    monkeypatch.delenv("KITSUNE_REMEASURE", raising=False)
    m = dict(measure.summary([[1.0, 3.0], [1.0, 4.0], [1.0, 5.0]]), when=measure._now())
    assert measure._reusable(m, 2.0) and not measure._reusable(m, 4.5)
    assert not measure._reusable({"fused_s": 1.0}, 2.0)  # written by an older Kitsune


def test_remeasure_env_and_an_old_run_unfused_decision_measure_again(monkeypatch, tmp_path):
    monkeypatch.setenv("KITSUNE_CACHE_DIR", str(tmp_path))
    _fixed_times(monkeypatch, 1e-3, 1.2e-3)
    (m,) = run(FusionEngine(config=FusionConfig(min_fusion_benefit=2.0)), 64).measured.values()
    path = tmp_path / "decisions" / f"{m['key']}.json"
    torch._dynamo.reset()
    monkeypatch.setenv("KITSUNE_REMEASURE", "1")
    (m,) = run(FusionEngine(config=FusionConfig(min_fusion_benefit=2.0)), 64).measured.values()
    assert not m["cached"]
    monkeypatch.delenv("KITSUNE_REMEASURE")
    stored = json.loads(path.read_text())
    path.write_text(json.dumps(dict(stored, when="2020-01-01T00:00:00+00:00")))
    torch._dynamo.reset()
    (m,) = run(FusionEngine(config=FusionConfig(min_fusion_benefit=2.0)), 64).measured.values()
    assert not m["cached"] and json.loads(path.read_text())["when"] != "2020-01-01T00:00:00+00:00"


def test_verdict_decides_on_agreeing_rounds_or_one_side_of_the_threshold():
    agree = measure.summary([[1.0, 2.0], [1.0, 2.02], [1.0, 1.98]])
    assert agree["speedup"] == 2.0 and agree["spread"] <= measure.TOLERANCE
    assert measure.verdict(agree, 1.5) == "fused" and measure.verdict(agree, 2.5) == "unfused"
    spread = measure.summary([[9.0, 1.0], [1.0, 1.5], [1.0, 3.0]])  # speed-ups 0.11, 1.5, 3.0
    assert spread["low"] < 0.2 and spread["high"] == 3.0 and spread["spread"] > measure.TOLERANCE
    assert measure.verdict(spread, 4.0) == "unfused" and measure.verdict(spread, 1.2) is None
    above = measure.summary([[1.0, 3.0], [1.0, 4.0], [1.0, 5.0]])
    assert measure.verdict(above, 2.0) == "fused" and measure.verdict(above, 4.5) is None


def test_measuring_is_asked_by_profile_or_a_threshold():
    assert not measure.measuring(FusionConfig())
    assert measure.measuring(FusionConfig(), profile=True)
    assert measure.measuring(FusionConfig(min_fusion_benefit=1.0))


def test_a_cuda_graph_runner_records_what_the_measurement_decided(monkeypatch, tmp_path):
    """CUDA graphs need a GPU: a stand-in runner checks that it wraps the measuring
    function (not the bare graph), so the measurement runs on the first call and the
    recording, on the third, runs the kernel the measurement switched off unfused."""
    from kitsune.runtime import cuda_graphs

    monkeypatch.setenv("KITSUNE_CACHE_DIR", str(tmp_path))
    runners = []

    class Runner:
        def __init__(self, fn, name, training=False, copy_out=(), **hooks):
            self.fn, self.calls, self.recorded = fn, 0, None
            runners.append(self)

        def __call__(self, *args):
            self.calls += 1
            if self.calls == cuda_graphs.WARMUP_CALLS + 1:  # what CudaGraphRunner records
                graph = self.fn.__wrapped__
                self.recorded = [n.target.kernel for n in graph.graph.nodes
                                 if isinstance(n.target, FusedGroupCall)]
            return self.fn(*args)

    monkeypatch.setattr(cuda_graphs, "CudaGraphRunner", Runner)
    monkeypatch.setattr(cuda_graphs, "cuda_graph_blocker", lambda *a, **k: None)
    torch._dynamo.reset()
    fused = kitsune.optimize(f, FusionConfig(min_fusion_benefit=1e6, cuda_graphs=True))
    x = torch.randn(64)
    with torch.no_grad():
        for _ in range(4):
            torch.testing.assert_close(fused(x), f(x))
    (runner,) = runners
    assert callable(runner.fn) and isinstance(runner.fn.__wrapped__, torch.fx.GraphModule)
    assert runner.recorded == [None]  # switched off by the first call's measurement
