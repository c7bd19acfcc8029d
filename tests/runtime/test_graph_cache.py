"""The compiled-graph cache (issue 19): a warm start loads plan, kernels and measured
decisions instead of compiling; the key changes with version, config and device; a bad
entry is ignored; identical blocks are built once; parallel C builds equal serial ones;
processes share the cache safely."""
import json
import logging
import os
import shutil
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from torch.fx.experimental.proxy_tensor import make_fx

import kitsune
from kitsune.codegen import backends
from kitsune.compiler import compile_graph
from kitsune.config import FusionConfig
from kitsune.report.stats import FusionStats
from kitsune.runtime import graph_cache

OWN = ("rewrite", "cache_load", "plan", "lower", "build", "cache_store", "assemble", "other")


def f(x, w, b):
    return F.gelu(F.layer_norm(x, (x.shape[-1],)) * w + b).sum(-1)


def _inputs():
    return torch.randn(8, 16), torch.randn(16), torch.randn(16)


def _compile(config=None, inputs=None):
    """A fresh aten graph of f compiled by the pipeline: (compiled, its record)."""
    inputs = inputs or _inputs()
    gm = make_fx(f, tracing_mode="fake")(*inputs)
    sink = FusionStats()
    compiled = compile_graph(gm, list(inputs), "forward", config=config, stats=sink)
    (record,) = sink.records()
    return compiled, record


@pytest.fixture
def cache_dir(tmp_path, monkeypatch):
    monkeypatch.setenv("KITSUNE_CACHE_DIR", str(tmp_path))
    monkeypatch.setenv("KITSUNE_BACKEND", "cpu")
    monkeypatch.setenv("KITSUNE_GRAPH_CACHE", "1")  # tests/conftest.py turns it off for the others
    return tmp_path


def test_a_second_compile_loads_the_graph_and_says_the_same(cache_dir):
    inputs = _inputs()
    cold_fn, cold = _compile(inputs=inputs)
    warm_fn, warm = _compile(inputs=inputs)
    assert not cold.from_cache and warm.from_cache and warm.cache_key == cold.cache_key
    assert cold.groups and warm.groups == cold.groups and warm.fallbacks == cold.fallbacks
    assert warm.decisions == cold.decisions and warm.kernels_after == cold.kernels_after
    assert warm.kernel_builds == 0 and {"plan", "lower", "build"}.isdisjoint(warm.phases)
    for record in (cold, warm):  # the phases still add up to the compile time
        assert sum(record.phases.get(p, 0.0) for p in OWN) == pytest.approx(record.compile_seconds, abs=1e-9)
    x = torch.randn(8, 16)  # fresh inputs: the kernels, not the first call's values
    torch.testing.assert_close(warm_fn(x, *inputs[1:]), f(x, *inputs[1:]))
    torch.testing.assert_close(warm_fn(x, *inputs[1:]), cold_fn(x, *inputs[1:]))
    assert [o.pattern for o in warm.opportunities] == [o.pattern for o in cold.opportunities]  # the report


@pytest.mark.parametrize("change", ["version", "source", "torch", "config", "device", "shape", "switched off"])
def test_the_key_changes_with_what_the_compile_depends_on(cache_dir, monkeypatch, change):
    _compile()
    config = None
    inputs = None
    if change == "version":
        monkeypatch.setattr(kitsune, "__version__", kitsune.__version__ + ".post1")
    elif change == "source":  # an edited checkout: same version, other code
        monkeypatch.setattr(graph_cache, "source_hash", lambda: "edited")
    elif change == "torch":
        monkeypatch.setattr(torch, "__version__", "0.0.1")
    elif change == "config":
        config = FusionConfig(max_fusion_size=3)
    elif change == "device":
        monkeypatch.setattr(graph_cache, "_cpu_model", lambda: "another processor")
    elif change == "shape":
        inputs = (torch.randn(4, 16), torch.randn(16), torch.randn(16))
    else:
        monkeypatch.setenv("KITSUNE_GRAPH_CACHE", "0")
    _, record = _compile(config, inputs)
    assert not record.from_cache and record.groups
    if change == "switched off":
        assert record.cache_key is None and len(list((cache_dir / "graphs").glob("*.pkl"))) == 1
    # the config field does the same as the environment variable
    assert graph_cache.enabled(FusionConfig(graph_cache=False)) is False


def test_scalar_values_are_pickled_without_their_process_salted_hash():
    from kitsune.ir.index import Index
    from kitsune.ir.scalar import load

    value = load(0, Index.var(), torch.float32) * 2.0 + 1.0
    fresh = hash(value)
    object.__setattr__(value, "_hash", fresh + 1)  # as another process's string hashes would give
    loaded = graph_cache.loads(graph_cache.dumps({"v": value}))["v"]
    assert hash(loaded) == fresh and loaded == load(0, Index.var(), torch.float32) * 2.0 + 1.0


def test_a_corrupt_entry_is_ignored_with_a_logged_reason(cache_dir, caplog):
    _, cold = _compile()
    (entry,) = (cache_dir / "graphs").glob("*.pkl")
    entry.write_bytes(b"not a pickle")
    with caplog.at_level(logging.WARNING, logger="kitsune"):
        fn, record = _compile()
    assert not record.from_cache and record.groups == cold.groups
    assert "ignoring compiled-graph cache entry" in caplog.text
    x, w, b = _inputs()
    torch.testing.assert_close(fn(x, w, b), f(x, w, b))
    # a kernel library gone from the cache: the entry does not fit, the graph compiles
    for library in (cache_dir / "cpu").glob("kitsune_*.so"):
        library.unlink()
    with caplog.at_level(logging.WARNING, logger="kitsune"):
        fn, record = _compile()
    assert not record.from_cache and record.groups == cold.groups and "cached compile not used" in caplog.text
    torch.testing.assert_close(fn(x, w, b), f(x, w, b))


def test_a_failed_build_is_not_cached(cache_dir, monkeypatch):
    monkeypatch.setattr(kitsune.compiler, "build_kernels", lambda backend, specs: [RuntimeError("once")] * len(specs))
    _, failed = _compile()
    assert not failed.groups and failed.cache_key is None
    monkeypatch.undo()
    monkeypatch.setenv("KITSUNE_CACHE_DIR", str(cache_dir))
    monkeypatch.setenv("KITSUNE_BACKEND", "cpu")
    _, record = _compile()
    assert not record.from_cache and record.groups


class _Blocks(torch.nn.Module):
    """`n` identical residual blocks: layer norm, linear, GELU."""

    def __init__(self, n: int, width: int = 16):
        super().__init__()
        self.norms = torch.nn.ModuleList(torch.nn.LayerNorm(width) for _ in range(n))
        self.linears = torch.nn.ModuleList(torch.nn.Linear(width, width) for _ in range(n))

    def forward(self, x):
        for norm, linear in zip(self.norms, self.linears):
            x = x + F.gelu(linear(norm(x)))
        return x


def test_identical_blocks_are_generated_and_built_once(cache_dir, monkeypatch):
    from kitsune.codegen import cpu

    builds, fused = {}, {}
    for n in (2, 6):  # block k's residual add fuses with block k+1's norm: 2 blocks have every kind
        monkeypatch.setattr(cpu, "_EMITTED", {})  # as in a fresh process
        torch._dynamo.reset()
        kitsune.reset_fusion_stats()
        model = _Blocks(n).eval()
        x = torch.randn(4, 16)
        with torch.no_grad():
            torch.testing.assert_close(torch.compile(model, backend="kitsune")(x), model(x))
        stats = kitsune.get_fusion_stats()
        builds[n], fused[n] = stats["kernel_builds"], stats["num_fused"]
    assert fused[6] == fused[2] + 4 > 4
    # one library per model (a compiler run each) and each distinct kernel generated once
    assert builds[6] == builds[2] > 0


def _specs(count: int):
    from kitsune.codegen.kernel import KernelInput, KernelOutput, KernelSpec
    from kitsune.ir.index import Index
    from kitsune.ir.scalar import load

    specs = []
    for k in range(count):
        a = load(0, Index.var(), torch.float32)
        specs.append(KernelSpec(f"k{k}", 64, (KernelInput("in0", torch.float32),),
                                (KernelOutput("out0", torch.float32, Index.var(), a * float(k + 2) + 1.0),)))
    return specs + specs[:2]  # repeats of a kernel share its function


def test_parallel_builds_give_the_serial_builds_kernels(cache_dir):
    from kitsune.codegen.cpu import compile_kernels, kernel_name

    specs = _specs(9)
    serial = compile_kernels(specs, workers=1)
    parallel = compile_kernels(specs, workers=3)
    assert len({k.source_path for k in serial}) == 1 and len({k.source_path for k in parallel}) == 2
    x = torch.randn(64)
    for spec, one, other in zip(specs, serial, parallel):
        assert not isinstance(one, BaseException) and not isinstance(other, BaseException)
        name = kernel_name(spec)
        assert _function(one.source, name) == _function(other.source, name)
        out_one, out_other = torch.empty(64), torch.empty(64)
        one([x], [out_one])
        other([x], [out_other])
        torch.testing.assert_close(out_one, out_other, rtol=0, atol=0)
        torch.testing.assert_close(out_one, x * float(int(spec.name[1:]) + 2) + 1.0)


def _function(source: str, name: str) -> str:
    start = source.index(f"int {name}(")
    return source[start:source.index("\n}\n", start)]


def test_measured_decisions_are_cached_with_the_graph_and_bounded_by_a_budget(cache_dir, monkeypatch):
    from kitsune.tuning import measure

    monkeypatch.setattr(measure, "_time", lambda fn, args, device: 1e-3 if getattr(fn, "spec", None) else 1.5e-3)
    config = FusionConfig(min_fusion_benefit=2.0)
    for expect_cached in (False, True):
        fn, record = _compile(config)
        x, w, b = _inputs()
        torch.testing.assert_close(fn(x, w, b), f(x, w, b))  # the first call measures (cold)
        assert record.measured_from_cache is expect_cached and record.measured
        assert all(m["decision"] == "unfused" for m in record.measured.values()) and not record.groups
        assert ("measure" in record.phases) is not expect_cached
    monkeypatch.setenv("KITSUNE_REMEASURE", "1")
    fn, record = _compile(FusionConfig(min_fusion_benefit=2.0, measure_budget_s=0.0))
    fn(*_inputs())
    assert not record.measured and record.measure_skipped == len(record.groups) > 0  # nothing timed
    stats = FusionStats()
    stats.record(record)
    assert stats.as_dict()["measure_skipped"] == record.measure_skipped
    assert stats.as_dict()["measure_budget_s"] == 0.0


# One process of the warm-start tests: compiles f's aten graph (the pipeline after
# Dynamo and AOTAutograd: what a warm start skips), writes its output and stats.
_SCRIPT = textwrap.dedent("""
    import json, sys
    import torch
    import torch.nn.functional as F
    from torch.fx.experimental.proxy_tensor import make_fx
    from kitsune.compiler import compile_graph
    from kitsune.report.stats import FusionStats

    def f(x, w, b):
        return F.gelu(F.layer_norm(x, (16,)) * w + b).sum(-1), torch.softmax(x * 2.0, -1)

    torch.manual_seed(0)
    inputs = [torch.randn(8, 16), torch.randn(16), torch.randn(16)]
    sink = FusionStats()
    compiled = compile_graph(make_fx(f, tracing_mode="fake")(*inputs), inputs, "forward", stats=sink)
    out = compiled(*inputs)
    torch.testing.assert_close(out, f(*inputs))
    torch.save(out, sys.argv[1])
    s = sink.as_dict()
    print(json.dumps({k: s[k] for k in ("graphs", "graphs_from_cache", "kernel_builds", "num_fused", "groups",
                                        "fallbacks", "compile_phases")}))
""")


def test_warm_start_in_another_process_builds_nothing_and_processes_share_the_cache(tmp_path):
    from kitsune.cache import cache_dir as kitsune_cache_dir
    from kitsune.codegen.cpu.toolchain import toolchain

    toolchain()  # probed once here (its record shared) rather than in each process
    (tmp_path / "cache" / "cpu").mkdir(parents=True)
    for record in kitsune_cache_dir("cpu").glob("toolchain-*.json"):
        shutil.copy(record, tmp_path / "cache" / "cpu")
    env = dict(os.environ, KITSUNE_CACHE_DIR=str(tmp_path / "cache"), KITSUNE_BACKEND="cpu",
               PYTHONPATH=os.pathsep.join([str(Path(kitsune.__file__).parents[1]), os.environ.get("PYTHONPATH", "")]))
    env["KITSUNE_GRAPH_CACHE"] = "1"

    def start(name):
        return subprocess.Popen([sys.executable, "-c", _SCRIPT, str(tmp_path / name)], env=env,
                                stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)

    def finish(proc):
        out, err = proc.communicate(timeout=300)
        assert proc.returncode == 0, err[-3000:]
        return json.loads(out.strip().splitlines()[-1])

    first, second = start("a.pt"), start("b.pt")  # two cold processes at once
    cold = [finish(first), finish(second)]
    warm = finish(start("c.pt"))
    assert cold[0]["num_fused"] > 0 and cold[0]["graphs_from_cache"] + cold[1]["graphs_from_cache"] <= 1
    assert warm["graphs_from_cache"] == warm["graphs"] == 1 and warm["kernel_builds"] == 0
    assert {"plan", "lower", "build"}.isdisjoint(warm["compile_phases"])
    assert warm["groups"] == cold[0]["groups"] and warm["fallbacks"] == cold[0]["fallbacks"]
    outputs = [torch.load(tmp_path / name) for name in ("a.pt", "b.pt", "c.pt")]
    for out in outputs[1:]:
        for got, want in zip(out, outputs[0]):
            torch.testing.assert_close(got, want, rtol=0, atol=0)


def test_triton_precompile_warms_each_distinct_launch_once_under_async_compile(monkeypatch):
    """The CUDA path, with Triton's compile stood in for (CI has no GPU): repeats of a
    kernel share a launch, failed builds are skipped, the warm-ups run inside the mode."""
    import contextlib

    from kitsune import _compat
    from kitsune.codegen import triton as kt

    specs = _specs(2)  # k0, k1, then k0 and k1 again
    kernels = [kt.compile_kernel(spec) for spec in specs]
    events = []
    for kernel in kernels[:2]:
        monkeypatch.setattr(kernel.fn, "warmup", lambda *args, name=kernel.spec.name, **kw: events.append(
            (name, args[-1], kw["grid"])), raising=False)

    @contextlib.contextmanager
    def mode(pool):
        events.append("enter")
        yield
        events.append("exit")
    monkeypatch.setattr(kt, "INTERPRETED", False)
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "current_device", lambda: 0)
    monkeypatch.setattr(kt, "_placeholders", lambda kernel, device: [])
    monkeypatch.setattr(_compat, "triton_async_compile_mode", lambda: mode)
    before = backends.build_counts()["compiled"]
    kt.precompile(kernels + [RuntimeError("a failed build")])
    assert events[0] == "enter" and events[-1] == "exit"
    assert sorted(events[1:-1]) == [("k0", 64, kernels[0].grid), ("k1", 64, kernels[1].grid)]
    assert backends.build_counts()["compiled"] == before + 2
