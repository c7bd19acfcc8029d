"""The compiled-graph pass that puts a matmul and its epilogue kernel into one
measured choice (cuBLAS + kernel, or the generated Triton matmul with the
epilogue fused): through Triton's interpreter on the CPU, with a fake timer."""
import pytest
import torch
import torch.nn.functional as F
from torch.fx.experimental.proxy_tensor import make_fx

from kitsune.capture.dynamo import decomposition_table
from kitsune.compiler import _compile
from kitsune.config import FusionConfig
from kitsune.record import GraphRecord
from kitsune.runtime import fused_matmul as fused_matmul_module
from kitsune.runtime.matmul_fusion import FusedMatmulCall, fuse_matmul_epilogues


@pytest.fixture(autouse=True)
def _triton(monkeypatch, tmp_path):
    monkeypatch.setenv("KITSUNE_CACHE_DIR", str(tmp_path))
    monkeypatch.setenv("KITSUNE_BACKEND", "triton")
    monkeypatch.setattr(fused_matmul_module, "_CHOICES", {})


def _compiled(fn, *inputs):
    gm = make_fx(fn, decomposition_table=decomposition_table(True))(*inputs)
    record = GraphRecord("inference", 0, 0)
    return _compile(gm, FusionConfig(max_fusion_size=64), record), record


def _fake_timer(fused_wins: bool):
    calls = []

    def timer(fn):
        fn()
        calls.append(1)
        return 1.0 if len(calls) == 1 else (0.5 if fused_wins else 2.0)  # the unfused path is timed first
    return timer


def _first(result):
    return result[0] if isinstance(result, (tuple, list)) else result


def _fused_calls(gm):
    return [n.target for n in gm.graph.nodes if isinstance(n.target, FusedMatmulCall)]


@pytest.mark.parametrize("fused_wins", [True, False])
def test_linear_gelu_becomes_one_measured_call(fused_wins):
    x, w, bias = torch.randn(33, 16, dtype=torch.bfloat16), torch.randn(7, 16, dtype=torch.bfloat16), \
        torch.randn(7, dtype=torch.bfloat16)

    def fn(x, w, bias):
        return F.gelu(F.linear(x, w, bias), approximate="tanh") * 2

    gm, record = _compiled(fn, x, w, bias)
    assert fuse_matmul_epilogues(gm, record, devices=("cpu",), timer=_fake_timer(fused_wins)) == 1
    assert not any(n.target in (torch.ops.aten.addmm.default, torch.ops.aten.mm.default) for n in gm.graph.nodes)
    (call,) = _fused_calls(gm)
    for _ in range(2):
        torch.testing.assert_close(_first(gm(x, w, bias)), fn(x, w, bias), rtol=1.6e-2, atol=3e-2)
    assert call.runner.choice.fused == fused_wins
    (rewrite,) = record.rewrites
    assert rewrite.pattern == "linear_activation"
    assert rewrite.choice.startswith("Triton matmul + epilogue" if fused_wins else "cuBLAS + kernel")


def test_swiglu_two_products_share_one_call():
    x = torch.randn(7, 33)
    w1, w2 = torch.randn(33, 16), torch.randn(33, 16)

    def fn(x, w1, w2):
        return F.silu(x @ w1) * (x @ w2)

    gm, record = _compiled(fn, x, w1, w2)
    assert fuse_matmul_epilogues(gm, record, devices=("cpu",), timer=_fake_timer(True)) == 1
    (call,) = _fused_calls(gm)
    assert len(call.epi.products) == 2
    torch.testing.assert_close(_first(gm(x, w1, w2)), fn(x, w1, w2), rtol=1e-4, atol=1e-4)


def test_a_product_read_elsewhere_too_stays():
    x, w, r = torch.randn(7, 33), torch.randn(33, 16), torch.randn(7, 16)

    def fn(x, w, r):
        p = x @ w
        return torch.relu(p + r) * 2, p

    gm, record = _compiled(fn, x, w, r)
    assert fuse_matmul_epilogues(gm, record, devices=("cpu",), timer=_fake_timer(True)) == 0


def test_the_cpu_is_left_alone():
    x, w, r = torch.randn(7, 33), torch.randn(33, 16), torch.randn(7, 16)
    gm, record = _compiled(lambda x, w, r: torch.relu(x @ w + r) * 2, x, w, r)
    assert fuse_matmul_epilogues(gm, record) == 0  # devices=("cuda",)


def test_inputs_in_other_strides_run_the_group_call():
    """The epilogue kernel was generated for its inputs' compiled strides: other
    strides go through cuBLAS + the group's own call (which checks them)."""
    x, w, r = torch.randn(7, 33), torch.randn(33, 16), torch.randn(7, 16)
    fn = (lambda x, w, r: torch.relu(x @ w + r) * 2)
    gm, record = _compiled(fn, x, w, r)
    assert fuse_matmul_epilogues(gm, record, devices=("cpu",), timer=_fake_timer(True)) == 1
    r_t = torch.randn(16, 7).t()
    torch.testing.assert_close(_first(gm(x, w, r_t)), fn(x, w, r_t))
    assert _fused_calls(gm)[0].runner.choice is None  # never measured: not the compiled layout
