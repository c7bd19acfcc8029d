"""Attention keeps eager's kernel choice (kitsune.capture.attention).

The routing applies to CUDA graphs only; the custom ops themselves are
plain PyTorch and are tested here on the CPU: values and gradients against
`F.scaled_dot_product_attention`, torch.library's own consistency checks,
and the routing pass on a graph whose example values are fake CUDA tensors."""
import pytest
import torch
import torch.nn.functional as F
from torch import fx
from torch._subclasses.fake_tensor import FakeTensorMode

import kitsune.capture.attention as attention


def _inputs(dtype=torch.float32, mask="float", requires_grad=True):
    q, k, v = (torch.randn(2, 3, 7, 16, dtype=dtype, requires_grad=requires_grad) for _ in range(3))
    if mask == "float":
        m = torch.randn(2, 1, 7, 7, dtype=dtype)
        m[0, 0, :, 3] = float("-inf")  # a masked key
    elif mask == "bool":
        m = torch.rand(2, 1, 1, 7) > 0.3
        m[..., 0] = True
    else:
        m = None
    return q, k, v, m


@pytest.mark.parametrize("mask", ["float", "bool", None])
@pytest.mark.parametrize("is_causal,scale", [(False, None), (True, None), (False, 0.3)])
def test_sdpa_op_matches_eager_values_and_gradients(mask, is_causal, scale):
    if is_causal and mask is not None:
        pytest.skip("SDPA takes a mask or is_causal, not both")
    q, k, v, m = _inputs(mask=mask)
    grad = torch.randn(2, 3, 7, 16)
    got = torch.ops.kitsune.sdpa(q, k, v, m, is_causal, scale)
    got_grads = torch.autograd.grad(got, (q, k, v), grad)
    want = F.scaled_dot_product_attention(q, k, v, attn_mask=m, is_causal=is_causal, scale=scale)
    want_grads = torch.autograd.grad(want, (q, k, v), grad)
    torch.testing.assert_close(got, want)
    for g, w in zip(got_grads, want_grads):
        torch.testing.assert_close(g, w)


def test_sdpa_ops_pass_torch_library_checks():
    q, k, v, m = _inputs()
    torch.library.opcheck(torch.ops.kitsune.sdpa.default, (q, k, v, m, False, None))
    grad = torch.randn(2, 3, 7, 16)
    # (opcheck's other tests run the kernel under a mode that cannot see through
    # torch.func's wrapped tensors; its fake implementation is what the compiled
    # test below traces with)
    torch.library.opcheck(torch.ops.kitsune.sdpa_backward.default,
                          (grad, q.detach(), k.detach(), v.detach(), m, False, None),
                          test_utils=("test_autograd_registration",))


def test_empty_and_non_contiguous_inputs():
    q = torch.randn(2, 7, 3, 16).transpose(1, 2)  # a head-split view, as models make
    out = torch.ops.kitsune.sdpa(q, q, q, None, False, None)
    torch.testing.assert_close(out, F.scaled_dot_product_attention(q, q, q))
    empty = torch.randn(0, 3, 7, 16)
    assert torch.ops.kitsune.sdpa(empty, empty, empty, None, False, None).shape == (0, 3, 7, 16)


def _graph(device_of_example, **kwargs):
    g = fx.Graph()
    q, k, v, m = (g.placeholder(n) for n in "qkvm")
    out = g.call_function(F.scaled_dot_product_attention, (q, k, v), {"attn_mask": m, **kwargs})
    g.output(out)
    gm = fx.GraphModule(torch.nn.Module(), g)
    with FakeTensorMode():
        example = torch.empty(2, 3, 7, 16, device=device_of_example)
        mask = torch.empty(2, 1, 7, 7, device=device_of_example)
    out.meta["example_value"] = example
    m.meta["example_value"] = mask
    return gm


def test_route_attention_points_cuda_calls_at_the_custom_op():
    gm = _graph("cuda", is_causal=False)
    assert attention.route_attention(gm) == 1
    (call,) = [n for n in gm.graph.nodes if n.op == "call_function"]
    assert call.target is torch.ops.kitsune.sdpa.default
    q, k, v, m = _inputs(requires_grad=False)
    torch.testing.assert_close(gm(q, k, v, m), F.scaled_dot_product_attention(q, k, v, attn_mask=m))


@pytest.mark.parametrize("case", ["cpu", "dropout", "gqa"])
def test_route_attention_leaves_other_calls(case):
    kwargs = {"dropout": {"dropout_p": 0.1}, "gqa": {"enable_gqa": True}}.get(case, {})
    gm = _graph("cpu" if case == "cpu" else "cuda", **kwargs)
    assert attention.route_attention(gm) == 0
    (call,) = [n for n in gm.graph.nodes if n.op == "call_function"]
    assert call.target is F.scaled_dot_product_attention


@pytest.mark.parametrize("mask", ["float", None])
def test_sdpa_op_through_the_kitsune_backend_forward_and_backward(mask):
    """What a routed graph does: AOTAutograd traces the op and its backward with
    their fake implementations, then the compiled graphs run the real ones."""
    import kitsune  # noqa: F401

    def f(q, k, v, m):
        return (torch.ops.kitsune.sdpa(q, k, v, m, False, None) * 2).sum(-1)

    def eager(q, k, v, m):
        return (F.scaled_dot_product_attention(q, k, v, attn_mask=m) * 2).sum(-1)

    compiled = torch.compile(f, backend="kitsune", dynamic=False)
    for _ in range(2):  # fresh inputs each call
        q, k, v, m = _inputs(mask=mask)
        grad = torch.randn(2, 3, 7)
        got = compiled(q, k, v, m)
        got_grads = torch.autograd.grad(got, (q, k, v), grad)
        want = eager(q, k, v, m)
        torch.testing.assert_close(got, want)
        for g, w in zip(got_grads, torch.autograd.grad(want, (q, k, v), grad)):
            torch.testing.assert_close(g, w)
