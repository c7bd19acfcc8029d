"""The caches of the lazy recording path (kitsune.lazy.graph.STEPS, input slots,
kitsune.lazy.macro.generalize): each against eager PyTorch, and where a cached
decision must not be reused, that it is not. Reference backend (cheap)."""
import pytest
import torch
from torch.testing import assert_close

from kitsune.lazy import graph as lazy_graph
from kitsune.lazy import lazy, lazy_stats
from kitsune.lazy import region as lazy_region


def same(actual, expected):
    assert type(actual) is torch.Tensor, type(actual)
    assert actual.dtype == expected.dtype and actual.stride() == expected.stride()
    assert_close(actual, expected, equal_nan=True, rtol=1e-6, atol=1e-6)


def test_constants_of_equal_value_but_other_type_or_sign_are_other_graphs():
    x = torch.randn(8, 8)
    fns = [lambda t: t * 0.0, lambda t: t * -0.0, lambda t: t + 1, lambda t: t + 1.0, lambda t: t + True,
           lambda t: t.sum(dim=0), lambda t: t.sum(dim=1)]
    for _ in range(2):
        for fn in fns:
            with lazy(min_tensor_size=0):
                got = fn(x.clone())
            want = fn(x.clone())
            same(got, want)
            assert got.dtype == want.dtype and torch.equal(torch.signbit(got), torch.signbit(want))
    # t * 0.0 and t * -0.0 are one graph (the float is lifted into an input); the rest differ
    assert lazy_stats()["cache_misses"] == len(fns) - 1


def test_same_ops_on_other_layouts_dtypes_are_other_graphs():
    a = torch.randn(12, 10)
    for x in (a, a.t().contiguous().t(), a.double(), a[:, ::2], a.to(torch.int32)):
        for _ in range(2):
            with lazy(min_tensor_size=0):
                got = (x * 3 + x).abs()
            same(got, (x * 3 + x).abs())
    assert lazy_stats()["cache_misses"] == 5 and lazy_stats()["cache_hits"] == 5


def test_trie_cleared_while_recording_stays_correct(monkeypatch):
    monkeypatch.setattr(lazy_graph, "STEPS_LIMIT", 3)
    x, y = torch.randn(6, 5), torch.randn(6, 5)
    for _ in range(3):
        with lazy(min_tensor_size=0):
            got = ((x + y) * y - x).exp().sum(dim=0)
        same(got, ((x + y) * y - x).exp().sum(dim=0))
    assert len(lazy_graph.STEPS) <= 3


def test_input_layout_changed_in_place_between_reads():
    # an input slot remembers the layout seen first; an in-place metadata change of that
    # tensor (t_, resize_, as_strided_) is a write to a graph input: it flushes first
    for change in (lambda t: t.t_(), lambda t: t.resize_(4, 6), lambda t: t.as_strided_((6, 4), (1, 6))):
        b = torch.randn(6, 4)
        b0 = b.clone()
        with lazy(min_tensor_size=0):
            y = b * 2
            change(b)
            z = b + 1
        same(y, b0 * 2)
        change(b0)
        same(z, b0 + 1)


def test_refused_op_rolls_back_its_input_slots():
    x = torch.randn(9, 9)
    w = torch.randn(9, 9, requires_grad=True)
    u = torch.randn(9, 9)
    with lazy(min_tensor_size=0):
        a = x * 2                     # recorded; then `u` gets a slot and `w` refuses the op
        b = torch.addcmul(u, u, w)    # runs eagerly (requires_grad)
        c = u - a                     # `u` must get a fresh slot, with its own layout
        graph = a._region.graph
        assert len(graph.inputs) == len(graph.input_keys) == len(graph.input_refs) == len(graph.input_sizes)
    same(a, x * 2)
    same(c, u - x * 2)
    assert b.requires_grad
    assert_close(b, torch.addcmul(u, u, w))


def test_unsupported_result_dtype_runs_eagerly():
    x = torch.randn(64)
    with lazy(min_tensor_size=0):
        y = (x * 2).to(torch.complex64)   # complex results are not recorded
        z = y * 2
    assert lazy_stats()["ops_recorded"] == 1 and lazy_stats()["ops_eager"] == 2
    assert z.dtype == torch.complex64
    assert_close(z, (x * 2).to(torch.complex64) * 2)


def test_addcdiv_value_changing_every_call_is_traced_twice(monkeypatch):
    p, g = torch.randn(16, 16), torch.randn(16, 16)
    d = g.abs() + 1
    traces = []
    monkeypatch.setattr(lazy_region, "_RECIPES", {})  # (other tests traced these layouts)
    real = lazy_region.LazyRegion._trace
    monkeypatch.setattr(lazy_region.LazyRegion, "_trace",
                        lambda self, *a: traces.append(a[0]) or real(self, *a))
    want = p.clone()
    for step in range(1, 6):
        value = -0.01 / (1 - 0.9 ** step)
        with lazy(min_tensor_size=0):
            p.addcdiv_(g, d, value=value)
        want.addcdiv_(g, d, value=value)
        same(p, want)
    assert traces.count(torch.ops.aten.addcdiv.default) == 2
    stats = lazy_stats()
    assert stats["cache_misses"] <= 2 and stats["cache_hits"] >= 3


def test_derived_float_is_traced_again_each_change():
    # aten.lerp.Tensor is not in FLOATS_PASSED_THROUGH: its recipes are never generalized;
    # softplus computes from beta: every beta gives eager's values
    x = torch.randn(32, 8)
    for beta in (0.5, 0.7, 2.0, 0.5):
        with lazy(min_tensor_size=0):
            got = torch.nn.functional.softplus(x * 3, beta=beta, threshold=1.5)
        same(got, torch.nn.functional.softplus(x * 3, beta=beta, threshold=1.5))


def test_generalize_refuses_a_float_with_no_argument_to_follow():
    from kitsune.lazy import macro

    mul = torch.ops.aten.mul.Tensor
    old = macro.Recipe(((mul, (((macro.ARG, 0), 0.5), ())),), (macro.RESULT, 0), {1: 0.25}, {1: 0.25})
    new = macro.Recipe(((mul, (((macro.ARG, 0), 0.75), ())),), (macro.RESULT, 0), {1: 0.5}, {1: 0.5})
    assert macro.generalize(old, new) is new          # 0.5 -> 0.75 follows no argument
    old = macro.Recipe(((mul, (((macro.ARG, 0), 0.25), ())),), (macro.RESULT, 0), {1: 0.25}, {1: 0.25})
    merged = macro.generalize(old, new.__class__(((mul, (((macro.ARG, 0), 0.5), ())),), (macro.RESULT, 0),
                                                 {1: 0.5}, {1: 0.5}))
    assert merged.steps[0][1][0][1] == (macro.ARG, 1) and merged.derived == {}


def test_lerp_of_a_pending_tensor_does_not_flush():
    # lerp's decomposition makes its weight with start.new_full(): dtype and device only
    m, g = torch.randn(20, 30), torch.randn(20, 30)
    m0 = m.clone()
    with lazy(min_tensor_size=0):
        m.mul_(0.5)
        m.lerp_(g, 0.3)
        n = m.new_zeros((3,)) + 1      # a new tensor of a pending one: eager's dtype and values
    assert lazy_stats()["sync_reasons"] == {"region exit": 1}
    same(m, m0.mul(0.5).lerp(g, 0.3))
    same(n, torch.ones(3))


@pytest.mark.parametrize("positional", [True, False])
def test_placeholders_made_by_position_or_keyword(monkeypatch, positional):
    # the placeholder constructor's positional form is probed once per process; both forms
    # must give eager's shape, strides, storage offset and dtype
    assert lazy_region._POSITIONAL  # this torch takes them by position
    monkeypatch.setattr(lazy_region, "_POSITIONAL", positional)
    x = torch.randn(6, 8)
    want = (x.t() * 2)[1:, ::2]
    with lazy(min_tensor_size=0):
        y = (x.t() * 2)[1:, ::2]
        assert type(y).__name__ == "LazyTensor"
        assert (y.shape, y.stride(), y.storage_offset(), y.dtype) == \
            (want.shape, want.stride(), want.storage_offset(), want.dtype)
        z = y.double()
    same(y, want)
    same(z, want.double())


def test_plain_argument_path_refuses_a_read_input_that_now_needs_grad():
    # `w` gets an input slot while grad is off; read again with grad on, the op must run
    # eagerly (autograd records it) although the fast argument path knows the slot
    w = torch.randn(8, 8, requires_grad=True)
    x = torch.randn(8, 8)
    with lazy(min_tensor_size=0):
        with torch.no_grad():
            a = x * 2
            b = a + w
        c = a * 3 + w
    assert not b.requires_grad and c.requires_grad and c.grad_fn is not None
    c.sum().backward()
    assert_close(w.grad, torch.ones(8, 8))
    same(b, x * 2 + w.detach())
    same(c.detach(), x * 6 + w.detach())
