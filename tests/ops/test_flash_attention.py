"""Kitsune's flash-attention kernels (kitsune.ops.flash_attention) through Triton's
interpreter on CPU tensors (tests/conftest.py sets TRITON_INTERPRET=1): forward and
backward against the float64 formula, on tiny shapes (the interpreter is slow)."""
import math

import pytest
import torch

from kitsune.ops import attention_dispatch
from kitsune.ops.attention import attention
from kitsune.ops.flash_attention import (flash_attention, flash_attention_backward_op, flash_attention_op,
                                         unsupported)

# the interpreter computes with numpy, which warns on the -inf and overflow arithmetic the kernels mean
pytestmark = pytest.mark.filterwarnings("ignore:(overflow|invalid value|divide by zero) encountered:RuntimeWarning")


def formula(q, k, v, bias=None, mask=None, mask_fill=float("-inf"), scale=None, causal=False):
    """The docstring's formula in the inputs' dtype (float32 softmax for 16-bit): eager's numerics."""
    scale = 1.0 / math.sqrt(q.shape[-1]) if scale is None else scale
    if q.dim() >= 4 and k.shape[-3] != q.shape[-3]:
        group = q.shape[-3] // k.shape[-3]
        k, v = k.repeat_interleave(group, -3), v.repeat_interleave(group, -3)
    compute = torch.float32 if q.dtype in (torch.float16, torch.bfloat16) else q.dtype
    s = torch.matmul(q, k.transpose(-1, -2)).to(compute) * scale
    if bias is not None:
        s = s + bias.to(compute)
    if causal:
        s = s.masked_fill(torch.ones(s.shape[-2:], dtype=torch.bool).triu(1), float("-inf"))
    if mask is not None:
        s = s.masked_fill(~mask, mask_fill)
    return torch.matmul(torch.softmax(s, -1).to(v.dtype), v)


def leaves(*tensors, dtype=None):
    return [None if t is None else t.detach().to(dtype or t.dtype).requires_grad_(t.is_floating_point())
            for t in tensors]


def run_both(q, k, v, bias=None, mask=None, mask_fill=float("-inf"), causal=False, dtype=torch.float32):
    """(kernel's out and grads, float64 formula's, eager-in-dtype formula's), grads of q, k, v (and bias)."""
    grad = torch.randn(*q.shape[:-1], v.shape[-1])
    results = []
    for fn, as_dtype in ((flash_attention, dtype), (formula, torch.float64), (formula, dtype)):
        tq, tk, tv, tb = leaves(q, k, v, bias, dtype=as_dtype)
        out = fn(tq, tk, tv, bias=tb, mask=mask, mask_fill=mask_fill, causal=causal)
        wanted = [t for t in (tq, tk, tv, tb) if t is not None]
        grads = torch.autograd.grad(out, wanted, grad.to(out.dtype))
        results.append([out.double(), *(g.double() for g in grads)])
    return results


def assert_matches(results, dtype=torch.float32):
    kernel, exact, eager = results
    for name, got, want, low in zip(("out", "dq", "dk", "dv", "dbias"), kernel, exact, eager):
        if dtype == torch.float32:
            torch.testing.assert_close(got, want, atol=2e-5, rtol=2e-5, equal_nan=True, msg=name)
            continue
        # 16-bit: no worse than 3x eager's own 16-bit error against float64 (plus rounding of the result)
        eps = torch.finfo(dtype).eps
        allowed = 3 * (low - want).abs().nan_to_num().max().item() + eps * want.abs().nan_to_num().max().item()
        error = (got - want).abs().nan_to_num().max().item()
        assert error <= allowed, f"{name}: error {error:.3g} against float64, allowed {allowed:.3g}"


def qkv(b, hq, hkv, lq, lk, d, dv=None):
    return torch.randn(b, hq, lq, d), torch.randn(b, hkv, lk, d), torch.randn(b, hkv, lk, dv or d)


@pytest.mark.parametrize("lq,lk,d,group", [(1, 1, 32, 1), (5, 17, 32, 2), (17, 5, 80, 1), (17, 17, 32, 4)])
@pytest.mark.parametrize("causal", [False, True])
def test_forward_backward_float32(lq, lk, d, group, causal):
    q, k, v = qkv(1, 4 if group == 4 else 2, (4 if group == 4 else 2) // group, lq, lk, d)
    assert_matches(run_both(q, k, v, causal=causal))


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_forward_backward_16bit(dtype):
    q, k, v = qkv(1, 2, 1, 17, 17, 32)
    assert_matches(run_both(q, k, v, causal=True, dtype=dtype), dtype)


def test_value_head_dim_differs():
    q, k, v = qkv(1, 2, 2, 5, 17, 32, dv=48)
    assert_matches(run_both(q, k, v))


@pytest.mark.parametrize("bias_shape", [(1, 1, 1, 17), (1, 2, 5, 17), (17,)])
def test_learned_bias(bias_shape):
    q, k, v = qkv(1, 2, 2, 5, 17, 32)
    assert_matches(run_both(q, k, v, bias=torch.randn(bias_shape)))


def test_bias_with_causal_and_mask():
    q, k, v = qkv(1, 2, 1, 17, 17, 32)
    mask = torch.rand(1, 1, 17, 17) < 0.8
    mask[..., 0] = True  # no row fully masked: eager's backward then makes every key's dk NaN (see the kernel's notes)
    assert_matches(run_both(q, k, v, bias=torch.randn(1, 2, 17, 17), mask=mask, causal=True))


@pytest.mark.parametrize("fill", [float("-inf"), torch.finfo(torch.float32).min, -1e4])
def test_bool_mask_key_padding(fill):
    q, k, v = qkv(2, 2, 2, 5, 17, 32)
    mask = torch.ones(2, 1, 1, 17, dtype=torch.bool)
    mask[0, ..., 11:] = False
    assert_matches(run_both(q, k, v, mask=mask, mask_fill=fill))


def test_fully_masked_rows_nan_with_inf_fill():
    q, k, v = qkv(1, 2, 2, 5, 5, 32)
    mask = torch.ones(1, 1, 5, 5, dtype=torch.bool)
    mask[..., 2, :] = False
    out = flash_attention(q, k, v, mask=mask)
    assert out[..., 2, :].isnan().all() and not out[..., [0, 1, 3, 4], :].isnan().any()
    torch.testing.assert_close(out, formula(q, k, v, mask=mask), equal_nan=True)


@pytest.mark.parametrize("causal", [False, True])
def test_fully_masked_rows_uniform_with_finite_fill(causal):
    q, k, v = qkv(1, 2, 2, 5, 17, 32)
    mask = torch.rand(1, 2, 5, 17) < 0.7
    mask[..., 1, :] = False
    fill = torch.finfo(torch.float32).min
    results = run_both(q, k, v, mask=mask, mask_fill=fill, causal=causal)
    torch.testing.assert_close(results[0][0][..., 1, :], v.double().mean(-2), atol=1e-5, rtol=1e-5)
    assert_matches(results)


def test_non_contiguous_inputs():
    b, l, h, d = 1, 17, 2, 32
    q, k, v = (torch.randn(b, l, h, d).transpose(1, 2) for _ in range(3))
    assert not q.is_contiguous()
    assert_matches(run_both(q, k, v, causal=True))


def test_three_dimensional_inputs():
    q, k, v = torch.randn(2, 5, 32), torch.randn(2, 17, 32), torch.randn(2, 17, 32)
    assert_matches(run_both(q, k, v, bias=torch.randn(2, 5, 17)))


@pytest.mark.parametrize("shape", [(0, 2, 5, 5, 32), (1, 2, 0, 5, 32), (1, 2, 5, 0, 32)])
def test_zero_size(shape):
    b, h, lq, lk, d = shape
    q, k, v = qkv(b, h, h, lq, lk, d)
    q, k, v = leaves(q, k, v)
    out = flash_attention(q, k, v)
    want = formula(q, k, v)
    torch.testing.assert_close(out, want)
    grads = torch.autograd.grad(out.sum(), (q, k, v), allow_unused=True)
    want_grads = torch.autograd.grad(want.sum(), (q, k, v), allow_unused=True)
    for got, expected in zip(grads, want_grads):
        torch.testing.assert_close(got, torch.zeros_like(q) if expected is None else expected)


def test_opcheck():
    q, k, v = leaves(*qkv(1, 2, 1, 5, 17, 32))
    bias = torch.randn(1, 1, 1, 17, requires_grad=True)
    mask = torch.rand(1, 2, 5, 17) < 0.8
    torch.library.opcheck(flash_attention_op, (q, k, v, bias, mask, -1e4, 0.2, True, 0.0, None))


def test_fake_shapes():
    from torch._subclasses.fake_tensor import FakeTensorMode
    with FakeTensorMode():
        q, k, v = torch.randn(2, 8, 7, 64), torch.randn(2, 2, 9, 64), torch.randn(2, 2, 9, 40)
        bias = torch.randn(2, 1, 1, 9)
        out, stats = flash_attention_op(q, k, v, bias, None, float("-inf"), 0.125, False, 0.0, None)
        grads = flash_attention_backward_op(out, q, k, v, bias, None, out, stats, float("-inf"), 0.125, False,
                                            0.0, None, True)
    assert out.shape == (2, 8, 7, 40) and stats.shape == (2, 8, 7, 2) and stats.dtype == torch.float32
    assert [g.shape for g in grads] == [q.shape, k.shape, v.shape, bias.shape]


def test_bad_arguments_raise():
    q, k, v = qkv(1, 2, 2, 5, 5, 32)
    with pytest.raises(TypeError, match="mask"):
        flash_attention(q, k, v, mask=torch.ones(5, 5))
    with pytest.raises(ValueError, match="bias"):
        flash_attention(q, k, v, bias=torch.ones(3, 5))
    with pytest.raises(ValueError, match="bias"):
        flash_attention(q, k, v, bias=torch.ones(2, 2, 5, 5))
    with pytest.raises(ValueError, match="heads"):
        flash_attention(q, *qkv(1, 2, 3, 5, 5, 32)[1:])


def test_unsupported_calls_have_reasons():
    q, k, v = qkv(1, 2, 2, 5, 5, 32)
    assert unsupported(q, k, v, None, None, 0.0) is None
    assert unsupported(q, k, v, None, None, 0.1) is None
    assert "head dim" in unsupported(*qkv(1, 2, 2, 5, 5, 512), None, None, 0.0)
    assert "dtype" in unsupported(q.double(), k.double(), v.double(), None, None, 0.0)
    assert "enlarges" in unsupported(q, k, v, torch.randn(3, 1, 1, 5), None, 0.0)
    assert "batch" in unsupported(q, k.expand(2, -1, -1, -1), v.expand(2, -1, -1, -1), None, None, 0.0)


def test_attention_dispatch_forced(monkeypatch):
    """KITSUNE_ATTENTION=triton sends attention() to the kernel (one custom-op node), sdpa to the reference,
    and unsupported calls to the reference; CPU tensors are never measured."""
    from torch.fx.experimental.proxy_tensor import make_fx
    q, k, v = qkv(1, 4, 2, 5, 5, 32)
    mask = torch.rand(1, 1, 5, 5) < 0.8

    def graph_ops(**kw):
        graph = make_fx(lambda q, k, v: attention(q, k, v, mask=mask, mask_fill=-1e4, **kw))(q, k, v)
        return {str(node.target) for node in graph.graph.nodes if node.op == "call_function"}

    monkeypatch.setenv("KITSUNE_ATTENTION", "triton")
    assert "kitsune.flash_attention.default" in graph_ops()
    assert "kitsune.flash_attention.default" in graph_ops(dropout_p=0.5)
    assert "kitsune.flash_attention.default" not in graph_ops(scale=0.1, bias=torch.ones(5, 5, dtype=torch.float64))
    torch.testing.assert_close(attention(q, k, v, mask=mask, mask_fill=-1e4, causal=True),
                               formula(q, k, v, mask=mask, mask_fill=-1e4, causal=True), atol=2e-5, rtol=2e-5)
    monkeypatch.setenv("KITSUNE_ATTENTION", "sdpa")
    assert "kitsune.flash_attention.default" not in graph_ops()
    monkeypatch.setenv("KITSUNE_ATTENTION", "fastest")
    with pytest.raises(ValueError, match="KITSUNE_ATTENTION"):
        attention(q, k, v)
    monkeypatch.setenv("KITSUNE_ATTENTION", "auto")
    assert "kitsune.flash_attention.default" not in graph_ops()
    assert attention_dispatch.attention_choices() == {}  # nothing measured on the CPU


def test_config_key_separates_layouts_and_flags():
    q, k, v = qkv(1, 2, 2, 5, 5, 32)
    key = attention_dispatch.config_key(q, k, v, None, None, float("-inf"), False)
    transposed = q.transpose(1, 2).contiguous().transpose(1, 2)
    assert attention_dispatch.config_key(transposed, k, v, None, None, float("-inf"), False) != key
    assert attention_dispatch.config_key(q, k, v, None, None, float("-inf"), True) != key
    padding, full = torch.randn(1, 1, 1, 5), torch.randn(1, 2, 5, 5)
    assert (attention_dispatch.config_key(q, k, v, padding, None, float("-inf"), False)
            != attention_dispatch.config_key(q, k, v, full, None, float("-inf"), False))
    assert attention_dispatch.config_key(q, k, v, None, None, float("-inf"), False) == key


def test_dropout_reproduces_and_matches_its_mask():
    """The kernel's dropout: the same seed drops the same probabilities (forward and backward), about
    dropout_p of them; read back with v = identity, they make the formula give the kernel's output and grads."""
    p, lq, lk = 0.4, 5, 17
    q, k, v = qkv(1, 2, 1, lq, lk, 32)
    seed = torch.tensor([1234])
    eye = torch.eye(lk).expand(1, 1, lk, lk)
    probs = flash_attention(q, k, eye, dropout_p=p, seed=seed)
    keep = probs != 0
    assert 0.25 < 1 - keep.double().mean().item() < 0.55  # about p of 170 draws dropped (4 sigma)
    torch.testing.assert_close(probs, flash_attention(q, k, eye, dropout_p=p, seed=seed), rtol=0, atol=0)
    assert not torch.equal(keep, flash_attention(q, k, eye, dropout_p=p, seed=torch.tensor([99])) != 0)
    tq, tk, tv = leaves(q, k, v)
    out = flash_attention(tq, tk, tv, dropout_p=p, seed=seed)
    grad = torch.randn_like(out)
    grads = torch.autograd.grad(out, (tq, tk, tv), grad)
    rq, rk, rv = leaves(q, k, v, dtype=torch.float64)
    scores = torch.matmul(rq, rk.repeat_interleave(2, 1).transpose(-1, -2)) / math.sqrt(32)
    want = torch.matmul(torch.softmax(scores, -1) * keep / (1 - p), rv.repeat_interleave(2, 1))
    want_grads = torch.autograd.grad(want, (rq, rk, rv), grad.double())
    torch.testing.assert_close(out.double(), want, atol=2e-5, rtol=2e-5)
    for got, expected in zip(grads, want_grads):
        torch.testing.assert_close(got.double(), expected, atol=2e-5, rtol=2e-5)


def test_measurement_runs_outside_tracing():
    """What the dispatch measures under AOTAutograd's fake tracing runs on real tensors and is not traced."""
    from torch._subclasses.fake_tensor import FakeTensor
    from torch.fx.experimental.proxy_tensor import make_fx
    seen = []

    def traced(x):
        with attention_dispatch.real_tensors():
            seen.append(torch.ones(3) * 2)
        return x + 1

    graph = make_fx(traced, tracing_mode="fake")(torch.randn(4))
    assert not isinstance(seen[0], FakeTensor) and torch.equal(seen[0], torch.full((3,), 2.0))
    assert [str(n.target) for n in graph.graph.nodes if n.op == "call_function"] == ["aten.add.Tensor"]


@pytest.mark.parametrize("kernel_ms,choice", [(0.5, "triton"), (0.99, "sdpa")])
def test_measured_choice_under_fake_tracing(monkeypatch, caplog, kernel_ms, choice):
    """The measurement (timer stubbed: tests never time) runs the kernel and the reference, forward and
    backward, on real tensors even while AOT-style fake tracing is on, picks by MIN_GAIN and logs both times."""
    import logging
    import kitsune.capture.timing as timing
    from torch.fx.experimental.proxy_tensor import make_fx
    from kitsune.ops.attention import _reference
    times = iter([1.0, kernel_ms])

    def fake_time_ms(fn, repeats=5):
        fn()  # what would be timed runs once
        return next(times)

    monkeypatch.setattr(timing, "time_ms", fake_time_ms)
    results = []

    def traced(q, k, v, bias):
        key = attention_dispatch.config_key(q, k, v, bias, None, float("-inf"), True)
        results.append(attention_dispatch._measure(key, q, k, v, bias, None, float("-inf"), 0.25, True, 0.0,
                                                   _reference))
        return q * 2

    q, k, v = leaves(*qkv(1, 2, 1, 5, 17, 32))
    bias = torch.randn(1, 1, 1, 17, requires_grad=True)
    with caplog.at_level(logging.INFO, logger="kitsune"):
        graph = make_fx(traced, tracing_mode="fake")(q, k, v, bias)
    assert results == [(choice, kernel_ms, 1.0)]
    assert f"{choice} (kitsune {kernel_ms:.3f} ms" in caplog.text
    assert [str(n.target) for n in graph.graph.nodes if n.op == "call_function"] == ["aten.mul.Tensor"]


def test_a_kernel_that_disagrees_with_the_reference_is_not_chosen(monkeypatch, caplog):
    """Faster but wrong (a kernel miscompiled for some GPU): the measurement compares the two results
    and keeps the reference, with a warning."""
    import logging
    import kitsune.capture.timing as timing
    import importlib
    from kitsune.ops.attention import _reference
    flash_module = importlib.import_module("kitsune.ops.flash_attention")  # kitsune.ops.<name> is the function
    times = iter([1.0, 0.1])
    monkeypatch.setattr(timing, "time_ms", lambda fn, repeats=5: (fn(), next(times))[1])
    right = flash_module.flash_attention
    monkeypatch.setattr(flash_module, "flash_attention", lambda *a, **kw: right(*a, **kw) * 1.5)
    q, k, v = qkv(1, 2, 1, 5, 17, 32)
    key = attention_dispatch.config_key(q, k, v, None, None, float("-inf"), False)
    with caplog.at_level(logging.WARNING, logger="kitsune"):
        choice = attention_dispatch._measure(key, q, k, v, None, None, float("-inf"), 0.25, False, 0.0, _reference)
    assert choice == ("sdpa", 0.1, 1.0) and "differs from the reference" in caplog.text


def test_aot_autograd_traces_one_node_each_way(monkeypatch):
    """Under AOTAutograd (fake tensors), attention() with the kernel chosen is one forward node and one
    backward node, and the compiled function's gradients are the formula's."""
    from functorch.compile import aot_function, make_boxed_func
    monkeypatch.setenv("KITSUNE_ATTENTION", "triton")
    graphs = []

    def keep(graph, _inputs):
        graphs.append({str(n.target) for n in graph.graph.nodes if n.op == "call_function"})
        return make_boxed_func(graph.forward)

    bias = torch.randn(1, 1, 1, 17)
    compiled = aot_function(lambda q, k, v, b: attention(q, k, v, bias=b, causal=True), fw_compiler=keep,
                            bw_compiler=keep)
    q, k, v = leaves(*qkv(1, 4, 2, 5, 17, 32))
    out = compiled(q, k, v, bias)
    grads = torch.autograd.grad(out.sum(), (q, k, v))
    rq, rk, rv = leaves(q, k, v, dtype=torch.float64)
    want = formula(rq, rk, rv, bias=bias.double(), causal=True)
    want_grads = torch.autograd.grad(want.sum(), (rq, rk, rv))
    assert "kitsune.flash_attention.default" in graphs[0]
    assert "kitsune.flash_attention_backward.default" in graphs[1]
    torch.testing.assert_close(out.double(), want, atol=2e-5, rtol=2e-5)
    for got, expected in zip(grads, want_grads):
        torch.testing.assert_close(got.double(), expected, atol=2e-5, rtol=2e-5)
