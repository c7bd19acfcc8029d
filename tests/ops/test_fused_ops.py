"""kitsune.ops' custom ops (kitsune::fused_linear, layer_norm, rms_norm,
softmax_cross_entropy, fused_chain): opcheck, results and gradients against the
PyTorch functions they stand for, the generated kernels behind them, their fallback,
and the op list (`kitsune.ops.fused`) against FusionEngine.fuse and the unfused ops."""
import logging

import pytest
import torch
import torch.nn.functional as F
from torch.library import opcheck

import kitsune.ops as kops
from kitsune.fusion import FusionEngine
from kitsune.fusion.engine import FusedOperations
from kitsune.ops import generated
from kitsune.ops.fused_ops import (fused_chain_op, fused_linear_op, fused_linear_preactivation_op, layer_norm_op,
                                   rms_norm_op, softmax_cross_entropy_op)
from kitsune.runtime.fused_call import FusedGroupCall

DTYPES = [torch.float32, torch.bfloat16, torch.float16]


def leaf(*shape, dtype=torch.float32):
    return torch.randn(*shape, dtype=dtype).requires_grad_()


def check_against(fn, reference, tensors, dtype):
    """Outputs and gradients of fn(*tensors) against reference(*copies)."""
    copies = [t.detach().clone().requires_grad_(t.requires_grad) for t in tensors]
    out, expected = fn(*tensors), reference(*copies)
    torch.testing.assert_close(out, expected, **tolerance(dtype))
    grad = torch.randn_like(out)
    out.backward(grad)
    expected.backward(grad)
    for t, c in zip(tensors, copies):
        if t.requires_grad:
            torch.testing.assert_close(t.grad, c.grad, **tolerance(dtype))


def tolerance(dtype):
    # 16-bit: the generated kernels compute in float32 and round once; eager rounds per op
    return {torch.bfloat16: dict(atol=3e-2, rtol=3e-2), torch.float16: dict(atol=4e-3, rtol=4e-3)}.get(dtype, {})


OPCHECK_CASES = {
    "fused_linear": lambda: (fused_linear_op, (leaf(2, 3, 8), leaf(5, 8), leaf(5), "gelu")),
    "fused_linear_preactivation": lambda: (fused_linear_preactivation_op, (leaf(2, 3, 8), leaf(5, 8), leaf(5),
                                                                           "silu")),
    "fused_linear_no_bias": lambda: (fused_linear_op, (leaf(4, 8), leaf(5, 8), None, "none")),
    "layer_norm": lambda: (layer_norm_op, (leaf(3, 8), [8], leaf(8), leaf(8), 1e-5, "relu")),
    "rms_norm": lambda: (rms_norm_op, (leaf(3, 2, 8), [2, 8], leaf(2, 8), None, "silu")),
    "softmax_cross_entropy": lambda: (softmax_cross_entropy_op,
                                      (leaf(6, 5), torch.tensor([0, 4, -100, 2, 1, 3]), None, -100, 0.1, "mean")),
    "fused_chain": lambda: (fused_chain_op, ([leaf(3, 8), leaf(8)], "add:i1;mul:2.0;gelu:approximate=tanh")),
}


@pytest.mark.parametrize("case", OPCHECK_CASES)
def test_opcheck(case):
    op, args = OPCHECK_CASES[case]()
    opcheck(op, args)


# every activation in float32, one in each 16-bit dtype (each case compiles its own kernels)
@pytest.mark.parametrize("dtype, activation", [(torch.float32, a) for a in (None, "relu", "gelu", "gelu_tanh", "silu")]
                         + [(torch.bfloat16, "gelu"), (torch.float16, "silu")])
def test_fused_linear_matches_linear_and_activation(dtype, activation):
    act = {None: lambda y: y, "relu": F.relu, "gelu": F.gelu, "silu": F.silu,
           "gelu_tanh": lambda y: F.gelu(y, approximate="tanh")}[activation]
    check_against(lambda x, w, b: kops.fused_linear(x, w, b, activation),
                  lambda x, w, b: act(F.linear(x, w, b)), [leaf(2, 3, 16, dtype=dtype), leaf(8, 16, dtype=dtype),
                                                           leaf(8, dtype=dtype)], dtype)


@pytest.mark.parametrize("dtype", DTYPES)
def test_layer_norm_and_rms_norm_match_pytorch(dtype):
    x, w, b = leaf(4, 3, 16, dtype=dtype), leaf(16, dtype=dtype), leaf(16, dtype=dtype)
    check_against(lambda x, w, b: kops.layer_norm(x, 16, w, b, activation="gelu"),
                  lambda x, w, b: F.gelu(F.layer_norm(x, (16,), w, b)), [x, w, b], dtype)
    check_against(lambda x, w: kops.rms_norm(x, [16], w, eps=1e-6),
                  lambda x, w: F.rms_norm(x, (16,), w, 1e-6), [leaf(4, 3, 16, dtype=dtype), leaf(16, dtype=dtype)],
                  dtype)


@pytest.mark.parametrize("dtype, reduction", [(torch.float32, "mean"), (torch.float32, "sum"),
                                              (torch.float32, "none"), (torch.bfloat16, "mean")])
def test_softmax_cross_entropy_matches_pytorch(reduction, dtype):
    target = torch.randint(0, 7, (9,))
    target[3] = -1
    weight = torch.rand(7, dtype=dtype)
    check_against(lambda z: kops.softmax_cross_entropy(z, target, weight, ignore_index=-1, label_smoothing=0.2,
                                                       reduction=reduction),
                  lambda z: F.cross_entropy(z, target, weight, ignore_index=-1, label_smoothing=0.2,
                                            reduction=reduction), [leaf(9, 7, dtype=dtype)], dtype)


def test_ops_run_generated_kernels_once_per_structure():
    generated.KERNEL_CACHE.clear()
    x, w, b = leaf(4, 16), leaf(8, 16), leaf(8)
    kops.fused_linear(x, w, b, "gelu").sum().backward()
    kops.fused_linear(torch.randn(4, 16), w, b, "gelu")
    assert generated.KERNEL_CACHE.compiles == 2  # forward and backward, once each
    for entry in generated.KERNEL_CACHE.entries.values():
        assert entry is not generated._REFERENCE
        assert any(isinstance(node.target, FusedGroupCall) for node in entry.graph.nodes)
    kops.fused_linear(torch.randn(5, 16), w, b, "gelu")
    assert generated.KERNEL_CACHE.compiles == 3  # a new shape is a new structure


def test_ever_new_shapes_stop_compiling(monkeypatch):
    generated.KERNEL_CACHE.clear()
    monkeypatch.setattr(generated, "MAX_SHAPES", 2)
    w = torch.randn(4, 8)
    for rows in (1, 2, 3, 4):
        x = torch.randn(rows, 8)
        torch.testing.assert_close(kops.fused_linear(x, w, None, "relu"), F.relu(F.linear(x, w)))
    assert generated.KERNEL_CACHE.compiles == 2
    kops.fused_linear(torch.randn(1, 8), w, None, "relu")  # a compiled shape still runs its kernel
    assert generated.KERNEL_CACHE.compiles == 2
    generated.KERNEL_CACHE.clear()


def test_a_failed_compile_runs_the_reference_and_says_why(monkeypatch, caplog):
    generated.KERNEL_CACHE.clear()

    def broken(*args, **kwargs):
        raise RuntimeError("no compiler today")
    monkeypatch.setattr(generated, "_trace_and_compile", broken)
    x, w = torch.randn(3, 8), torch.randn(4, 8)
    with caplog.at_level(logging.WARNING, logger="kitsune"):
        out = kops.fused_linear(x, w, None, "relu")
    torch.testing.assert_close(out, F.relu(F.linear(x, w)))
    assert "no compiler today" in caplog.text
    generated.KERNEL_CACHE.clear()


def test_triton_kernels_through_the_interpreter(monkeypatch):
    monkeypatch.setenv("KITSUNE_BACKEND", "triton")
    check_against(lambda x, w, b: kops.layer_norm(x, 8, w, b, activation="relu"),
                  lambda x, w, b: F.relu(F.layer_norm(x, (8,), w, b)), [leaf(3, 8), leaf(8), leaf(8)],
                  torch.float32)
    keys = [k for k in generated.KERNEL_CACHE.entries if k[3] == "triton"]
    assert keys and all(generated.KERNEL_CACHE.entries[k] is not generated._REFERENCE for k in keys)


def test_zero_size_and_non_contiguous_inputs():
    x = torch.randn(16, 6).t()  # [6, 16], not contiguous
    w = torch.randn(16, 16)[:, ::2].t()  # [8, 16] strided
    torch.testing.assert_close(kops.fused_linear(x, w, None, "silu"), F.silu(F.linear(x, w)))
    empty = torch.randn(0, 16)
    assert kops.fused_linear(empty, w, None, "gelu").shape == (0, 8)
    assert kops.layer_norm(torch.randn(0, 3, 8), 8).shape == (0, 3, 8)


def test_bad_arguments_name_the_argument():
    x, w = torch.randn(2, 4), torch.randn(3, 4)
    with pytest.raises(ValueError, match="activation"):
        kops.fused_linear(x, w, None, "swish")
    with pytest.raises(ValueError, match="reduction"):
        kops.softmax_cross_entropy(x, torch.tensor([0, 1]), reduction="avg")
    with pytest.raises(ValueError, match="label_smoothing"):
        kops.softmax_cross_entropy(x, torch.tensor([0, 1]), label_smoothing=1.5)
    with pytest.raises(TypeError, match="target"):
        kops.softmax_cross_entropy(x, torch.tensor([0.0, 1.0]))
    with pytest.raises(ValueError, match="unknown operation"):
        fused_chain_op([x], "frobnicate")
    with pytest.raises(ValueError, match="out of range"):
        fused_chain_op([x], "add:i1")
    with pytest.raises(ValueError, match="operations\\[1\\]"):
        kops.fused([x, w.t()], ["matmul", "frobnicate"])
    with pytest.raises(ValueError, match="inputs"):
        kops.fused([x], ["add"])


def test_fused_list_agrees_with_fusion_engine_and_unfused_ops():
    x, w, b = leaf(4, 8), torch.randn(8, 6), torch.randn(6)
    out = kops.fused([x, w, b], ["matmul", "add", "relu"])
    unfused = torch.relu(x @ w + b)
    engine = FusionEngine().fuse([("matmul", w), ("add", b), ("relu",)])
    torch.testing.assert_close(out, unfused)
    torch.testing.assert_close(engine(x.detach()), unfused)
    out.sum().backward()
    expected = torch.autograd.grad(torch.relu(x @ w + b).sum(), x)[0]
    torch.testing.assert_close(x.grad, expected)
    scalars = kops.fused([x.detach()], [("mul", 2.0), ("add", 1.0), ("leaky_relu", 0.2), "tanh"])
    torch.testing.assert_close(scalars, torch.tanh(F.leaky_relu(x.detach() * 2 + 1, 0.2)))


def test_dropout_in_the_op_list_respects_eval():
    module = FusedOperations([("mul", 2.0), ("dropout", 0.5)])
    x = torch.ones(64, 64)
    assert (module(x) == 0).any()
    module.eval()
    torch.testing.assert_close(module(x), x * 2)
    torch.testing.assert_close(kops.fused([x], [("mul", 2.0), ("dropout", 0.5)], training=False), x * 2)
    dropped = kops.fused([x], [("mul", 2.0), ("dropout", 0.5)])
    assert set(dropped.unique().tolist()) <= {0.0, 4.0} and (dropped == 0).any()
