"""torch.compile(..., backend="kitsune") on whole functions and modules, against eager."""
import importlib
import os

import pytest
import torch
import torch.nn.functional as F

import kitsune
from kitsune.demo import MLPBlock


def _available(name):
    if name == "reference":
        return True
    module = importlib.import_module(f"kitsune.codegen.{name}")
    return hasattr(module, "compile_kernel") or hasattr(module, "compile_kernels")


@pytest.fixture(params=["cpu", "triton", "reference"])
def kernel_backend(request, monkeypatch):
    if not _available(request.param):
        pytest.skip(f"{request.param} backend not built yet")
    monkeypatch.setenv("KITSUNE_BACKEND", request.param)
    torch._dynamo.reset()
    kitsune.reset_fusion_stats()
    yield request.param
    torch._dynamo.reset()


def _check_fused():
    stats = kitsune.get_fusion_stats()
    assert stats["num_fused"] >= 1, stats
    assert stats["fallbacks"] == [], stats["fallbacks"]
    assert stats["kernels_after"] < stats["kernels_before"]
    return stats


def test_entry_point_is_registered():
    from importlib.metadata import entry_points
    names = [ep.name for ep in entry_points(group="torch_dynamo_backends")]
    assert "kitsune" in names


def test_mlp_block_forward_and_backward(kernel_backend):
    torch.manual_seed(0)
    block = MLPBlock(dim=16, hidden=32)
    x = torch.randn(6, 16)
    compiled = torch.compile(block, backend="kitsune")
    xc, xe = x.clone().requires_grad_(), x.clone().requires_grad_()
    out = compiled(xc)
    expected = block(xe)
    torch.testing.assert_close(out, expected)
    grads_c = torch.autograd.grad(out.square().sum(), [xc, *block.parameters()])
    grads_e = torch.autograd.grad(expected.square().sum(), [xe, *block.parameters()])
    for gc, ge in zip(grads_c, grads_e):
        torch.testing.assert_close(gc, ge)
    stats = _check_fused()
    assert stats["graphs"] == 2  # forward and backward


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_activations_decompose_and_fuse(kernel_backend, dtype):
    def f(x, y):
        a = F.silu(x) + F.hardswish(y)
        b = F.softplus(a) * F.elu(x) - F.leaky_relu(y, 0.2)
        return torch.tanh(b) + F.gelu(a, approximate="tanh")

    x = torch.randn(5, 7, dtype=dtype)
    y = torch.randn(5, 7, dtype=dtype)
    torch.testing.assert_close(torch.compile(f, backend="kitsune")(x, y), f(x, y))
    _check_fused()


def test_inplace_ops_and_input_mutation(kernel_backend):
    def f(x, y):
        x.mul_(2).add_(1)
        z = y.clone()
        z.sub_(x).relu_()
        return z * 3

    x, y = torch.randn(4, 6), torch.randn(4, 6)
    xe, ye = x.clone(), y.clone()
    out = torch.compile(f, backend="kitsune")(x, y)
    expected = f(xe, ye)
    torch.testing.assert_close(out, expected)
    torch.testing.assert_close(x, xe)  # the input mutation happened exactly as in eager
    _check_fused()


def test_views_and_output_strides(kernel_backend):
    def f(x, y):
        a = (x.t() * 2 + y).relu()          # transposed input
        b = a.reshape(-1, 2)[:, 1] - 0.5    # reshape + slice of a computed value
        return a, b.unsqueeze(0).expand(3, -1) * 1.5, x[:, ::2].sigmoid() + 1

    x, y = torch.randn(8, 6), torch.randn(6, 8)
    outs = torch.compile(f, backend="kitsune")(x, y)
    for got, want in zip(outs, f(x, y)):
        torch.testing.assert_close(got, want)
        assert got.stride() == want.stride() and got.dtype == want.dtype
    _check_fused()


def test_transposed_output_keeps_eager_layout(kernel_backend):
    def f(x):
        return (x.t() + 1).exp() * 2

    x = torch.randn(5, 9)
    got, want = torch.compile(f, backend="kitsune")(x), f(x)
    torch.testing.assert_close(got, want)
    assert got.stride() == want.stride()


def test_dynamic_shapes_fall_back_without_crash(kernel_backend):
    def f(x):
        return (x + 1).relu() * 2

    compiled = torch.compile(f, backend="kitsune", dynamic=True)
    for n in (3, 5, 9):
        x = torch.randn(n, 4)
        torch.testing.assert_close(compiled(x), f(x))


def test_repeated_calls_with_fresh_inputs(kernel_backend):
    def f(x, b):
        return torch.where(x > 0, x * b, -x) + torch.nan_to_num(x.log())

    compiled = torch.compile(f, backend="kitsune")
    for _ in range(3):
        x, b = torch.randn(3, 8), torch.randn(8)
        x[0, 0] = float("nan")
        torch.testing.assert_close(compiled(x, b), f(x, b), equal_nan=True)


def test_optimize_with_config(kernel_backend):
    def f(x):
        for _ in range(6):
            x = (x * 1.1 + 0.1).tanh()
        return x

    config = kitsune.FusionConfig(max_fusion_size=4)
    x = torch.randn(10)
    torch.testing.assert_close(kitsune.optimize(f, config)(x), f(x))
    stats = kitsune.get_fusion_stats()
    assert stats["num_fused"] >= 3  # 12 user ops, at most 4 per kernel
    assert all(len(nodes) <= 4 for _, nodes, _ in stats["groups"])  # one aten node per user op here
    from kitsune.report.stats import GLOBAL_STATS
    refusals = [d.reason for g in GLOBAL_STATS.graphs for d in g.decisions if not d.fused]
    assert any("max_fusion_size=4" in r for r in refusals)


def test_bad_config_is_rejected():
    with pytest.raises(ValueError, match="max_fusion_size"):
        kitsune.FusionConfig(max_fusion_size=0)
    with pytest.raises(TypeError, match="config"):
        kitsune.optimize(lambda x: x, config={"max_fusion_size": 4})


def test_batch_norm_eval_and_train_do_not_crash(kernel_backend):
    m = torch.nn.Sequential(torch.nn.Conv2d(3, 4, 3), torch.nn.BatchNorm2d(4), torch.nn.ReLU())
    x = torch.randn(2, 3, 8, 8)
    for mode in (m.eval, m.train):
        mode()
        torch._dynamo.reset()
        torch.testing.assert_close(torch.compile(m, backend="kitsune")(x), m(x))


def test_structure_key_is_stable_across_processes():
    import subprocess
    import sys
    code = ("import torch\nfrom kitsune.codegen.kernel import KernelSpec, KernelInput, KernelOutput\n"
            "from kitsune.ir.scalar import load, call\nfrom kitsune.ir.index import Index\n"
            "v = call('exp', load(0, Index.var(), torch.float32))\n"
            "print(KernelSpec('k', 8, (KernelInput('in0', torch.float32),),"
            " (KernelOutput('out0', torch.float32, Index.var(), v),)).structure_key())")
    keys = {subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
            for _ in range(2)}
    assert len(keys) == 1, keys
