"""`kernels_before` counts the kernels eager PyTorch launches (kitsune.ir.eager_count),
checked against what torch.profiler sees eager PyTorch dispatch on the same model."""
import pytest
import torch
import torch.nn.functional as F
from torch import nn
from torch.fx.experimental.proxy_tensor import make_fx
from torch.profiler import ProfilerActivity, profile

from kitsune.fusion import FusionEngine
from kitsune.ir.eager_count import eager_kernel_count

# profiler events that launch no kernel: views, allocations
_FREE = {"aten::t", "aten::transpose", "aten::view", "aten::expand", "aten::as_strided", "aten::reshape",
         "aten::permute", "aten::unsqueeze", "aten::squeeze", "aten::select", "aten::slice", "aten::alias",
         "aten::detach", "aten::_unsafe_view", "aten::_reshape_alias", "aten::empty", "aten::empty_like",
         "aten::empty_strided", "aten::resolve_conj", "aten::resolve_neg", "aten::split", "aten::split_with_sizes",
         "aten::unbind", "aten::chunk"}


def profiled_kernels(fn) -> int:
    """aten ops eager dispatches from the user's code (top level) or from an autograd
    node's backward formula, views and allocations aside: what those ops call inside is
    their own business (layer_norm's empty/view calls). Gradient accumulation into
    `.grad` is left out: it happens outside the compiled graphs."""
    with profile(activities=[ProfilerActivity.CPU]) as prof:
        fn()
    count = 0
    for event in prof.events():
        parent = event.cpu_parent
        if not event.name.startswith("aten::") or event.name in _FREE:
            continue
        if parent is not None and (parent.name.startswith("aten::") or "AccumulateGrad" in parent.name):
            continue
        count += 1
    return count


class NormMLP(nn.Module):
    def __init__(self, act):
        super().__init__()
        self.norm, self.fc, self.act = nn.LayerNorm(16), nn.Linear(16, 32), act

    def forward(self, x):
        return self.act(self.fc(self.norm(x)))


@pytest.mark.parametrize("act, forward, backward", [
    # layer_norm, linear (addmm), gelu | gelu_backward, mm, mm, sum (bias), native_layer_norm_backward
    (nn.GELU(), 3, 5),
    # relu's backward mask is computed in the forward graph (the partitioner moves it
    # there): counted once, in the backward, where eager computes threshold_backward
    (nn.ReLU(), 3, 5),
])
def test_counts_match_the_profiler_forward_and_backward(act, forward, backward):
    torch.manual_seed(0)
    model, x = NormMLP(act), torch.randn(8, 16)
    engine = FusionEngine()
    out = engine.fuse(model)(x)
    out.backward(torch.ones_like(out))
    counts = {r.name: r.kernels_before for r in engine.records}
    assert counts == {"forward": forward, "backward": backward}

    model.zero_grad(set_to_none=True)
    out = model(x)
    assert profiled_kernels(lambda: model(x)) == forward
    grad = torch.ones_like(out)
    assert profiled_kernels(lambda: out.backward(grad)) == backward
    # the captured aten graphs hold many more ops than that
    assert {r.name: r.aten_ops > r.kernels_before for r in engine.records} == {"forward": True, "backward": True}
    assert engine.get_fusion_stats()["kernels_before"] == forward + backward


def test_inference_counts_each_call_of_a_decomposed_op():
    def f(x, w, target):
        h = F.layer_norm(F.layer_norm(x, (16,)) * 2, (16,))  # two layer_norms: two kernels
        return F.cross_entropy(h @ w, target)                 # log_softmax + nll_loss: two kernels

    x, w, target = torch.randn(8, 16), torch.randn(16, 4), torch.randint(0, 4, (8,))
    engine = FusionEngine()
    with torch.no_grad():
        torch.testing.assert_close(engine.fuse(f)(x, w, target), f(x, w, target))
    (record,) = engine.records
    assert record.name == "inference"
    assert record.kernels_before == 6  # layer_norm, mul, layer_norm, mm, log_softmax, nll_loss


def test_a_graph_without_provenance_counts_one_kernel_per_op():
    gm = make_fx(lambda x: (x * 2).relu().view(-1).sum())(torch.randn(4, 4))
    assert eager_kernel_count(gm.graph) == 3  # mul, relu, sum; the view is free


def test_split_launches_nothing():
    def f(x):
        a, b, c = x.split(4, dim=1)
        return a * b + c

    x = torch.randn(4, 12)
    engine = FusionEngine()
    with torch.no_grad():
        torch.testing.assert_close(engine.fuse(f)(x), f(x))
    (record,) = engine.records
    assert record.kernels_before == profiled_kernels(lambda: f(x)) == 2  # mul, add
    assert (record.aten_ops, record.kernels_after) == (2, 1)  # the split's getitems are no kernels


def test_unreadable_metadata_gives_the_captured_count(monkeypatch):
    import kitsune.ir.eager_count as eager_count

    gm = make_fx(lambda x: (x * 2).relu().view(-1).sum())(torch.randn(4, 4))

    def broken(node):
        raise KeyError("source_fn_stack")

    monkeypatch.setattr(eager_count, "_call_key", broken)
    assert eager_kernel_count(gm.graph) == eager_count.captured_kernel_count(gm.graph) == 3
