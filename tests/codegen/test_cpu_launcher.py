"""The CPU launcher extension (kitsune.codegen.cpu.launcher) and the ctypes path it
replaces: both run a kernel on views at any offset, and a graph compiled without
the extension (no Python headers, or PyTorch's data-pointer helper missing) still
computes eager's values."""
from __future__ import annotations

import pytest
import torch
from torch.fx.experimental.proxy_tensor import make_fx

import kitsune.codegen.cpu as cpu
from kitsune import _compat
from kitsune.codegen.cpu import launcher as launcher_module
from kitsune.compiler import compile_graph
from kitsune.report.stats import FusionStats
from kitsune.runtime.fused_call import FusedGroupCall


@pytest.fixture(autouse=True)
def cpu_kernels(monkeypatch):
    monkeypatch.setenv("KITSUNE_BACKEND", "cpu")


def f(a, b):
    return (torch.sigmoid(a * 1.5 + b) - 0.25,)


def _kernel(*inputs):
    gm = make_fx(f, tracing_mode="fake")(*inputs)
    compiled = compile_graph(gm, list(inputs), "inference", stats=FusionStats())
    (call,) = [n.target for n in compiled.graph.nodes if isinstance(n.target, FusedGroupCall)]
    return compiled, call.kernel


def test_direct_launch_reads_views_at_an_offset():
    a, b = torch.randn(3, 4), torch.randn(3, 4)
    _, kernel = _kernel(a, b)
    direct = kernel.direct_launch()
    assert direct is not None and direct.numel == 12
    big_a, big_b = torch.randn(5, 4), torch.randn(6, 4)
    va, vb = big_a[2:], big_b[3:]  # contiguous views at an offset
    out = torch.empty(3, 4)
    tensors = [va, vb, out] if direct.takes_tensors else [t.data_ptr() for t in (va, vb, out)]
    assert direct.call(*direct.prefix, *tensors, direct.numel, 1) == 0
    torch.testing.assert_close(out, f(va, vb)[0])


def test_tensor_data_ptr_helper_and_its_fallback(monkeypatch):
    assert isinstance(_compat.tensor_data_ptr_address(), int)
    from torch._C._dynamo import guards
    monkeypatch.delattr(guards, "_torchinductor_pyobject_tensor_data_ptr")
    assert _compat.tensor_data_ptr_address() is None


@pytest.mark.parametrize("path", ["data_ptr ints", "ctypes"])
def test_graph_without_the_extension_matches_eager(monkeypatch, path):
    if path == "ctypes":
        monkeypatch.setattr(cpu, "cpu_launcher", lambda: None)
    else:
        module = launcher_module._load(launcher_module._build())
        monkeypatch.setattr(cpu, "cpu_launcher", lambda: launcher_module.Launcher(module, takes_tensors=False))
    a, b = torch.randn(3, 4), torch.randn(3, 4)
    compiled, kernel = _kernel(a, b)
    assert kernel.direct_launch().takes_tensors is False
    torch.testing.assert_close(compiled(a, b), f(a, b))
    assert (kernel.direct_launch().call is kernel.fn) == (path == "ctypes")


def test_small_kernels_have_no_parallel_region_large_ones_keep_it():
    a = torch.randn(8, 8)
    _, small = _kernel(a, a)
    source = small.source
    name = cpu.kernel_name(small.spec)
    body = source[source.index(f"int {name}("):source.index(f"int {name}_entry(")]
    assert "omp parallel" not in body and "#pragma omp simd" in body
    big = torch.randn(256, 256)
    _, large = _kernel(big, big)
    source = large.source
    name = cpu.kernel_name(large.spec)
    assert "omp parallel for" in source[source.index(f"int {name}("):source.index(f"int {name}_entry(")]
