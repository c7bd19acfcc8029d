"""Kitsune never crashes the user's model: every failure of a kernel (to lower, to build,
to launch, to fit the inputs it gets) runs that group's original ops through PyTorch,
gives eager's result, and says why in the log and in the stats."""
from __future__ import annotations

import logging

import pytest
import torch
from torch.fx.experimental.proxy_tensor import make_fx

import kitsune
import kitsune.compiler
from kitsune.codegen.kernel import KernelError
from kitsune.compiler import compile_graph
from kitsune.report.stats import FusionStats
from kitsune.runtime import fused_call
from kitsune.runtime.fused_call import FusedGroupCall


@pytest.fixture(params=["cpu", "triton"])
def kernel_backend(request, monkeypatch):
    monkeypatch.setenv("KITSUNE_BACKEND", request.param)
    kitsune.reset_fusion_stats()
    yield request.param
    kitsune.reset_fusion_stats()


def f(x, y):
    return torch.sigmoid(x * 2 + y) * y - torch.tanh(x).sum(-1, keepdim=True)


def _inputs():
    torch.manual_seed(0)
    return torch.randn(4, 6), torch.randn(4, 6)


def _compiled(fn=f):
    return torch.compile(fn, backend="kitsune", dynamic=False)


def _calls(gm) -> list[FusedGroupCall]:
    return [n.target for n in gm.graph.nodes if n.op == "call_function" and isinstance(n.target, FusedGroupCall)]


def _compile_fx(fn, *inputs, stats=None):
    """An aten graph of fn compiled by Kitsune's pipeline directly, with its stats object."""
    stats = stats if stats is not None else FusionStats()
    gm = make_fx(fn, tracing_mode="fake")(*inputs)
    return compile_graph(gm, list(inputs), "forward", stats=stats), stats


def _warnings(caplog, text):
    return [r for r in caplog.records if r.name == "kitsune" and r.levelno >= logging.WARNING and text in r.getMessage()]


# --------------------------------------------------------------------------- (a) build failure

@pytest.mark.parametrize("error", [RuntimeError("compiler exploded"), KernelError("unsupported construct")])
def test_build_failure_runs_unfused_logs_and_records(kernel_backend, monkeypatch, caplog, error):
    monkeypatch.setattr(kitsune.compiler, "build_kernels", lambda backend, specs: [error for _ in specs])
    x, y = _inputs()
    with caplog.at_level(logging.WARNING, logger="kitsune"):
        out = _compiled()(x, y)
    torch.testing.assert_close(out, f(x, y))
    stats = kitsune.get_fusion_stats()
    assert stats["num_fused"] == 0 and stats["groups"] == []
    assert stats["fallbacks"], stats
    for what, reason in stats["fallbacks"]:
        assert "kernel build failed" in reason and str(error) in reason, reason
        assert what  # names the group's nodes
    assert _warnings(caplog, "kernel build failed"), caplog.text
    assert stats["kernels_after"] == stats["kernels_before"]


def test_build_failure_of_one_group_keeps_the_others(kernel_backend, monkeypatch):
    real = kitsune.compiler.build_kernels

    def first_fails(backend, specs):
        built = real(backend, specs)
        return [RuntimeError("only the first") if i == 0 else k for i, k in enumerate(built)]

    def g(x, y):  # two groups: a reduction's row values cannot broadcast back into x*y's group
        a = torch.exp(x) * y
        b = torch.relu(x.t()).amax(0) + 1
        return a, b

    monkeypatch.setattr(kitsune.compiler, "build_kernels", first_fails)
    x, y = _inputs()
    torch.testing.assert_close(_compiled(g)(x, y), g(x, y))
    stats = kitsune.get_fusion_stats()
    assert len(stats["fallbacks"]) == 1 and "only the first" in stats["fallbacks"][0][1]
    assert stats["num_fused"] >= 1


# --------------------------------------------------------------------------- (b) launch failure

def _raising_kernels(monkeypatch, message="launch went wrong"):
    launches = []

    def kernel(inputs, outputs):
        launches.append(len(inputs))
        raise RuntimeError(message)

    monkeypatch.setattr(kitsune.compiler, "build_kernels", lambda backend, specs: [kernel for _ in specs])
    return launches


def test_launch_failure_falls_back_and_warns_once(kernel_backend, monkeypatch, caplog):
    launches = _raising_kernels(monkeypatch)
    x, y = _inputs()
    compiled = _compiled()
    with caplog.at_level(logging.WARNING, logger="kitsune"):
        first = compiled(x, y)
        tried = len(launches)
        second = compiled(x + 1, y)
    torch.testing.assert_close(first, f(x, y))
    torch.testing.assert_close(second, f(x + 1, y))
    assert tried >= 1
    assert len(launches) == tried  # a kernel that failed once is not launched again
    warnings = _warnings(caplog, "kernel launch failed: RuntimeError: launch went wrong")
    assert len(warnings) == tried, caplog.text  # one warning per failed kernel, not per call


def test_launch_failure_with_invalid_inputs_raises_eagers_error():
    """When the inputs themselves are wrong, the user gets PyTorch's own error, not Kitsune's."""
    x, y = _inputs()
    compiled, _ = _compile_fx(lambda a, b: (torch.exp(a) * b + 1,), x, y)
    (call,) = _calls(compiled)

    def kernel(inputs, outputs):
        raise RuntimeError("kernel error")

    call.attach(kernel)
    with pytest.raises(RuntimeError, match="size of tensor"):
        call(torch.randn(4, 6), torch.randn(3, 6))


def test_launch_failure_on_direct_call(caplog):
    x, y = _inputs()
    compiled, _ = _compile_fx(lambda a, b: (torch.exp(a) * b + 1,), x, y)
    (call,) = _calls(compiled)

    def kernel(inputs, outputs):
        raise ValueError("bad launch")

    call.attach(kernel)
    with caplog.at_level(logging.WARNING, logger="kitsune"):
        (out,) = compiled(x, y)
    torch.testing.assert_close(out, torch.exp(x) * y + 1)
    assert call.kernel is None and "bad launch" in call.failure
    assert _warnings(caplog, "bad launch")


# --------------------------------------------------------------------------- (c) other strides

def test_transposed_input_through_torch_compile(kernel_backend):
    """dynamic=False: Dynamo guards on strides and may recompile; either way, eager's result."""
    x, y = _inputs()
    compiled = _compiled()
    torch.testing.assert_close(compiled(x, y), f(x, y))
    xt = torch.randn(6, 4).t()          # same shape, column-major
    ys = torch.randn(4, 12)[:, ::2]      # same shape, every other column
    torch.testing.assert_close(compiled(xt, ys), f(xt, ys))
    torch.testing.assert_close(compiled(x, ys), f(x, ys))
    assert kitsune.get_fusion_stats()["num_fused"] >= 1


def test_non_contiguous_gradient_through_backward(kernel_backend):
    """The backward graph is compiled for the tangent layout AOTAutograd guesses; a gradient
    that arrives transposed still gives eager's gradients."""
    x, y = _inputs()
    xc, yc = x.clone().requires_grad_(), y.clone().requires_grad_()
    xe, ye = x.clone().requires_grad_(), y.clone().requires_grad_()
    grad = torch.randn(6, 4).t()
    _compiled()(xc, yc).backward(grad)
    f(xe, ye).backward(grad)
    torch.testing.assert_close(xc.grad, xe.grad)
    torch.testing.assert_close(yc.grad, ye.grad)
    assert kitsune.get_fusion_stats()["graphs"] == 2


@pytest.mark.parametrize("backend", ["cpu", "triton"])
def test_fused_call_with_other_strides_runs_unfused(backend, monkeypatch):
    monkeypatch.setenv("KITSUNE_BACKEND", backend)
    x, y = _inputs()

    def g(a, b):
        return (torch.sigmoid(a * 2 + b) * b,)

    compiled, _ = _compile_fx(g, x, y)
    (call,) = _calls(compiled)
    launches = []
    real = call.kernel
    call.attach(lambda inputs, outputs: (launches.append(1), real(inputs, outputs)))

    torch.testing.assert_close(call(x, y)[0], g(x, y)[0])
    assert len(launches) == 1  # the expected layout takes the kernel

    for a, b in [(torch.randn(6, 4).t(), y), (x, torch.randn(4, 12)[:, ::2]),
                 (torch.randn(6, 4).t(), torch.randn(1, 6).expand(4, 6))]:
        (out,) = call(a, b)
        torch.testing.assert_close(out, g(a, b)[0])
        assert out.stride() == g(a, b)[0].stride()  # eager's layout for these inputs
    assert len(launches) == 1  # every other layout ran the original ops
    assert call.kernel is not None  # and the kernel stays on


# --------------------------------------------------------------------------- (d) KITSUNE_DEBUG

def test_debug_mode_catches_a_wrong_kernel(kernel_backend, monkeypatch, caplog):
    real_build = kitsune.compiler.build_kernels

    def wrong_kernels(backend, specs):
        def broken(kernel):
            def run(inputs, outputs):
                kernel(inputs, outputs)
                outputs[0].add_(0.5)  # a codegen bug
            return run
        return [broken(k) if not isinstance(k, BaseException) else k for k in real_build(backend, specs)]

    monkeypatch.setattr(kitsune.compiler, "build_kernels", wrong_kernels)
    monkeypatch.setattr(fused_call, "_DEBUG", True)
    x, y = _inputs()
    with caplog.at_level(logging.WARNING, logger="kitsune"):
        out = _compiled()(x, y)
    torch.testing.assert_close(out, f(x, y))  # debug mode returns eager's values
    errors = [r for r in caplog.records if r.levelno == logging.ERROR and "KITSUNE_DEBUG" in r.getMessage()]
    assert errors, caplog.text
    assert "differs from eager" in errors[0].getMessage()


def test_debug_mode_is_quiet_for_correct_kernels(kernel_backend, monkeypatch, caplog):
    monkeypatch.setattr(fused_call, "_DEBUG", True)
    x, y = _inputs()
    with caplog.at_level(logging.WARNING, logger="kitsune"):
        torch.testing.assert_close(_compiled()(x, y), f(x, y))
    assert kitsune.get_fusion_stats()["num_fused"] >= 1
    assert not [r for r in caplog.records if r.levelno >= logging.ERROR], caplog.text


# --------------------------------------------------------------------------- (e) lowering / graph failure

def test_lowering_failure_is_recorded_as_fallback(kernel_backend, monkeypatch, caplog):
    def lower_group(group, name):
        raise NotImplementedError("no index for this view")

    monkeypatch.setattr(kitsune.compiler, "lower_group", lower_group)
    x, y = _inputs()
    with caplog.at_level(logging.WARNING, logger="kitsune"):
        out = _compiled()(x, y)
    torch.testing.assert_close(out, f(x, y))
    stats = kitsune.get_fusion_stats()
    assert stats["num_fused"] == 0
    assert stats["fallbacks"] and all("lowering failed: no index for this view" in r for _, r in stats["fallbacks"])
    assert _warnings(caplog, "cannot lower")


def test_planner_failure_runs_the_whole_graph_unfused(kernel_backend, monkeypatch, caplog):
    def plan_graph(gm, config, graph_name):
        raise RuntimeError("planner bug")

    monkeypatch.setattr(kitsune.compiler, "plan_graph", plan_graph)
    x, y = _inputs()
    with caplog.at_level(logging.WARNING, logger="kitsune"):
        out = _compiled()(x, y)
    torch.testing.assert_close(out, f(x, y))
    stats = kitsune.get_fusion_stats()
    assert stats["num_fused"] == 0
    assert stats["fallbacks"] == [("inference", "RuntimeError: planner bug")]  # no grad: one graph
    assert _warnings(caplog, "planner bug")


# --------------------------------------------------------------------------- run-time fallbacks in the stats

def _spy(call):
    launches = []
    real = call.kernel
    call.attach(lambda inputs, outputs: (launches.append(1), real(inputs, outputs)))
    return launches


def test_launch_failure_is_counted_in_stats(kernel_backend, monkeypatch):
    _raising_kernels(monkeypatch, "no device")
    x, y = _inputs()
    compiled = _compiled()
    for _ in range(3):
        torch.testing.assert_close(compiled(x, y), f(x, y))
    stats = kitsune.get_fusion_stats()
    assert stats["num_fused"] >= 1
    runtime = stats["runtime_fallbacks"]
    assert {name for name, _, _ in runtime} == {name for name, _, _ in stats["groups"]}
    for name, reason, calls in runtime:
        assert reason == "kernel launch failed: RuntimeError: no device"
        assert calls == 3  # the failing call and every later one ran the original ops
    assert stats["fallbacks"] == []  # compile-time fallbacks: none


def test_stride_mismatch_is_counted_and_the_kernel_stays_on():
    x, y = _inputs()
    compiled, stats = _compile_fx(lambda a, b: (torch.sigmoid(a * 2 + b) * b,), x, y)
    (call,) = _calls(compiled)
    launches = _spy(call)
    xt = torch.randn(6, 4).t()
    for _ in range(2):
        torch.testing.assert_close(compiled(xt, y)[0], torch.sigmoid(xt * 2 + y) * y)
    torch.testing.assert_close(compiled(x, y)[0], torch.sigmoid(x * 2 + y) * y)
    assert launches == [1]  # only the call with the compiled layout took the kernel
    assert stats.as_dict()["runtime_fallbacks"] == [
        (call.spec.name, "input 0 has strides (1, 4) (compiled for (6, 1))", 2)]


def test_fast_path_does_no_fallback_work(kernel_backend, monkeypatch):
    """Calls with the compiled layout neither inspect the layout nor count anything."""
    x, y = _inputs()
    compiled, stats = _compile_fx(lambda a, b: (torch.exp(a) * b + 1,), x, y)
    (call,) = _calls(compiled)

    def forbidden(*args):
        raise AssertionError("slow-path work on the fast path")

    monkeypatch.setattr(call, "_layout_mismatch", forbidden)
    monkeypatch.setattr(call, "_count", forbidden)
    monkeypatch.setattr(call, "_unfused", forbidden)
    for _ in range(3):
        torch.testing.assert_close(compiled(x, y)[0], torch.exp(x) * y + 1)
    assert call.runtime_fallbacks == {} and stats.as_dict()["runtime_fallbacks"] == []


def test_size_one_dims_may_have_any_stride():
    """Strides of size-1 dims address nothing: such inputs still take the kernel, uncounted."""
    x = torch.randn(1, 6)
    compiled, stats = _compile_fx(lambda a: (torch.exp(a) + a,), x)
    (call,) = _calls(compiled)
    launches = _spy(call)
    odd = torch.randn(6, 1).t()  # shape (1, 6), strides (1, 1)
    assert odd.stride() != x.stride()
    torch.testing.assert_close(compiled(odd)[0], torch.exp(odd) + odd)
    assert launches == [1]
    assert stats.as_dict()["runtime_fallbacks"] == []


def test_other_shape_runs_unfused_and_is_counted():
    """Shapes are Dynamo's to guard (a graph is compiled for static shapes); the slow path,
    taken for other strides, checks them too, so that eager decides."""
    x = torch.randn(4, 6)
    compiled, stats = _compile_fx(lambda a: (torch.exp(a) + a,), x)
    (call,) = _calls(compiled)
    launches = _spy(call)
    narrow = torch.randn(4, 3)
    torch.testing.assert_close(call(narrow)[0], torch.exp(narrow) + narrow)
    assert launches == []
    assert stats.as_dict()["runtime_fallbacks"] == [(call.spec.name, "input 0 has shape (4, 3) (compiled for (4, 6))", 1)]


def test_profiling_decision_is_not_a_runtime_fallback():
    """A kernel switched off by a measurement (FusionEngine(profile=True)) is a decision,
    recorded in `fallbacks` at compile time, not counted per call."""
    x, y = _inputs()
    compiled, stats = _compile_fx(lambda a, b: (torch.exp(a) * b + 1,), x, y)
    (call,) = _calls(compiled)
    call.kernel, call.failure = None, "measured 0.90x faster than unfused < min_fusion_benefit=1.1"
    torch.testing.assert_close(compiled(x, y)[0], torch.exp(x) * y + 1)
    assert stats.as_dict()["runtime_fallbacks"] == []


def test_debug_mismatch_is_counted(monkeypatch):
    monkeypatch.setattr(fused_call, "_DEBUG", True)
    x, y = _inputs()
    compiled, stats = _compile_fx(lambda a, b: (torch.exp(a) * b + 1,), x, y)
    (call,) = _calls(compiled)
    real = call.kernel

    def wrong(inputs, outputs):
        real(inputs, outputs)
        outputs[0].mul_(2)

    call.attach(wrong)
    torch.testing.assert_close(compiled(x, y)[0], torch.exp(x) * y + 1)
    assert stats.as_dict()["runtime_fallbacks"] == [(call.spec.name, "KITSUNE_DEBUG: output 0 differs from eager", 1)]


def test_engine_stats_report_runtime_fallbacks(monkeypatch):
    from kitsune.fusion import FusionEngine
    _raising_kernels(monkeypatch, "launch refused")
    engine = FusionEngine()
    x, y = _inputs()
    torch.testing.assert_close(engine.fuse(f)(x, y), f(x, y))
    runtime = engine.get_fusion_stats()["runtime_fallbacks"]
    assert runtime and all(r == "kernel launch failed: RuntimeError: launch refused" and n == 1
                           for _, r, n in runtime)
