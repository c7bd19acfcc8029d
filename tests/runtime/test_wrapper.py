"""The generated wrapper (kitsune.runtime.wrapper): a compiled graph runs as one
generated function that launches CPU kernels directly, and keeps every
behaviour of the per-group calls: eager's values, fallbacks on other layouts
and failed launches (counted), KITSUNE_DEBUG, kernel changes after compiling."""
from __future__ import annotations

import re

import pytest
import torch
from torch.fx.experimental.proxy_tensor import make_fx

from kitsune.codegen.cpu import CpuKernel, DirectLaunch
from kitsune.compiler import compile_graph
from kitsune.report.stats import FusionStats
from kitsune.runtime import fused_call
from kitsune.runtime.compiled_graph import CompiledGraph
from kitsune.runtime.fused_call import FusedGroupCall


@pytest.fixture(autouse=True)
def cpu_kernels(monkeypatch):
    monkeypatch.setenv("KITSUNE_BACKEND", "cpu")


def _compile(fn, *inputs):
    stats = FusionStats()
    gm = make_fx(fn, tracing_mode="fake")(*inputs)
    compiled = compile_graph(gm, list(inputs), "inference", stats=stats)
    assert isinstance(compiled, CompiledGraph)
    return compiled, stats


def _calls(compiled) -> list[FusedGroupCall]:
    return [n.target for n in compiled.graph.nodes if isinstance(n.target, FusedGroupCall)]


def _source(compiled) -> str:
    return type(compiled).flat.kitsune_source


def chain(a, b):
    """Groups separated by ops left to PyTorch (cumsum), a view between them, two outputs."""
    x = torch.sigmoid(a * 1.5 + b) - 0.25
    y = torch.cumsum(x, 0)
    z = torch.exp(y.t()) * b.t() + 1          # a view of an opaque op's output, read by a group
    w = torch.cumsum(z, 1)
    return torch.tanh(w) + x.t(), (w * 2).sum(0)


def test_groups_opaque_ops_views_and_outputs_match_eager(monkeypatch):
    a, b = torch.randn(5, 5), torch.randn(5, 5)
    compiled, stats = _compile(chain, a, b)
    assert len(_calls(compiled)) >= 3
    torch.testing.assert_close(compiled(a, b), chain(a, b))
    source = _source(compiled)
    assert source.count("if _launch") == len(_calls(compiled)), source  # every group launched directly
    assert not re.search(r"= _g\d+\(", source), source                 # none through its FusedGroupCall

    def forbidden(self, *args):
        raise AssertionError("a FusedGroupCall on the fast path")

    monkeypatch.setattr(FusedGroupCall, "__call__", forbidden)
    a2, b2 = torch.randn(5, 5), torch.randn(5, 5)
    torch.testing.assert_close(compiled(a2, b2), chain(a2, b2))
    torch.testing.assert_close(compiled.forward(a2, b2), chain(a2, b2))  # what capture hands AOTAutograd
    assert stats.as_dict()["runtime_fallbacks"] == []


def shared(a):
    y = a - a.amax(1, keepdim=True)   # a reduction read by cumsum and by the last group
    return (torch.cumsum(y, 1) * y + 1,)


def test_other_input_strides_fall_back_and_later_kernels_read_the_compiled_layout():
    a = torch.randn(4, 6)
    compiled, stats = _compile(shared, a)
    assert len(_calls(compiled)) == 2
    torch.testing.assert_close(compiled(a), shared(a))
    assert re.search(r"if _launch\w*\([^)]*g0_0, g1_0,", _source(compiled)), _source(compiled)  # y unchecked
    at = torch.randn(6, 4).t()  # the first group falls back; the second reads its output unchecked
    torch.testing.assert_close(compiled(at), shared(at))
    first = _calls(compiled)[0]
    runtime = stats.as_dict()["runtime_fallbacks"]
    assert runtime == [(first.spec.name, "input 0 has strides (1, 4) (compiled for (6, 1))", 1)]
    assert first.kernel is not None  # the kernel stays on for inputs of the compiled layout


def test_call_in_layout_gives_compiled_strides():
    a = torch.randn(4, 6)
    compiled, _ = _compile(lambda x: (torch.exp(x) + 1,), a)
    (call,) = _calls(compiled)
    at = torch.randn(6, 4).t()
    (eager_layout,) = call(at)
    (compiled_layout,) = call.call_in_layout(at)
    assert eager_layout.stride() == (1, 4) and compiled_layout.stride() == (6, 1)
    torch.testing.assert_close(compiled_layout, torch.exp(at) + 1)


class _FailingKernel(CpuKernel):
    """A real kernel whose direct launch reports a failure and whose launcher raises."""

    def __init__(self, kernel):
        self.__dict__.update(kernel.__dict__)

    def direct_launch(self):
        return DirectLaunch(lambda *args: 1, (), False, self.spec.numel)

    def __call__(self, inputs, outputs, sizes=()):
        raise RuntimeError("launch refused")


def test_failed_direct_launch_falls_back_counts_and_switches_the_kernel_off():
    a = torch.randn(4, 6)
    compiled, stats = _compile(lambda x: (torch.exp(x) * 2,), a)
    (call,) = _calls(compiled)
    call.attach(_FailingKernel(call.kernel))
    for _ in range(2):
        torch.testing.assert_close(compiled(a)[0], torch.exp(a) * 2)
    assert call.kernel is None and "launch refused" in call.failure
    assert "if _launch" not in _source(compiled)  # written again without the kernel
    assert stats.as_dict()["runtime_fallbacks"] == [
        (call.spec.name, "kernel launch failed: RuntimeError: launch refused", 2)]


def test_kernel_error_gives_eagers_error():
    """An integer division by zero: the kernel's status sends the call to the original ops."""
    a = torch.arange(6, dtype=torch.int64).reshape(2, 3)
    compiled, _ = _compile(lambda x, y: (torch.div(x * 2, y, rounding_mode="floor") + 1,), a, a + 1)
    torch.testing.assert_close(compiled(a, a + 1)[0], torch.div(a * 2, a + 1, rounding_mode="floor") + 1)
    assert "if _launch" in _source(compiled)
    with pytest.raises(RuntimeError, match="ZeroDivisionError"):
        compiled(a, a)


def test_kernel_attached_after_the_first_call_is_used():
    a = torch.randn(4, 6)
    compiled, _ = _compile(lambda x: (torch.exp(x) + x,), a)
    compiled(a)
    (call,) = _calls(compiled)
    real, launches = call.kernel, []
    call.attach(lambda inputs, outputs: (launches.append(1), real(inputs, outputs)))
    torch.testing.assert_close(compiled(a)[0], torch.exp(a) + a)
    assert launches == [1]


def test_debug_mode_set_after_compiling_checks_every_group(monkeypatch):
    a = torch.randn(4, 6)
    compiled, stats = _compile(lambda x: (torch.exp(x) + x,), a)
    compiled(a)
    (call,) = _calls(compiled)
    checked = []
    real_check = call._check
    monkeypatch.setattr(call, "_check", lambda *args: (checked.append(1), real_check(*args))[1])
    monkeypatch.setattr(fused_call, "_DEBUG", True)
    torch.testing.assert_close(compiled(a)[0], torch.exp(a) + a)
    assert checked == [1]


def test_recompiled_graph_writes_its_code_again():
    a = torch.randn(4, 6)
    compiled, _ = _compile(lambda x: (torch.cumsum(torch.exp(x) * 2, 0) * 3 + 1,), a)
    compiled(a)
    (cumsum,) = [n for n in compiled.graph.nodes if "cumsum" in str(n.target)]
    cumsum.args = (cumsum.args[0], 1)
    compiled.recompile()
    torch.testing.assert_close(compiled(a)[0], torch.cumsum(torch.exp(a) * 2, 1) * 3 + 1)


def test_size_one_dims_are_not_compared():
    x = torch.randn(1, 6, 4)
    compiled, stats = _compile(lambda a: (torch.cumsum(torch.exp(a) * 2, 2) + a,), x)
    compiled(x)
    assert "_pick" in _source(compiled) or ".stride()[" in _source(compiled), _source(compiled)
    odd = torch.randn(4, 6, 1).permute(2, 1, 0)  # shape (1, 6, 4), strides (1, 1, 6)
    odd = odd.contiguous().as_strided((1, 6, 4), (7, 4, 1))  # row-major but another size-1 stride
    assert odd.stride() != x.stride()
    torch.testing.assert_close(compiled(odd)[0], torch.cumsum(torch.exp(odd) * 2, 2) + odd)
    assert stats.as_dict()["runtime_fallbacks"] == []
