"""Matrix chains are re-associated to the order with the fewest FLOPs where
that saves a quarter of them, on the aten graphs AOTAutograd hands over
(kitsune.capture.chains), and the results stay within matmul tolerances."""
import pytest
import torch
import torch.nn.functional as F

from kitsune.capture.chains import _cheapest_order, reassociate_matmul_chains
from kitsune.capture.dynamo import aot_backend
from kitsune.report.analysis import finalize
from kitsune.report.explain import explain_records
from kitsune.report.stats import GLOBAL_STATS

aten = torch.ops.aten


def _rewritten(fn, *args, dynamic=False, mark=None):
    """fn's result through Dynamo + AOTAutograd with only the chain pass run on
    each aten graph; and {graph name: (rewrites, the call nodes of the graph after it)}."""
    seen = {}

    def compile_graph(gm, example_inputs, name):
        rewrites = reassociate_matmul_chains(gm)
        seen[name] = (rewrites, [n for n in gm.graph.nodes if n.op == "call_function"])
        return gm
    for index, dims in (mark or {}).items():
        torch._dynamo.mark_dynamic(args[index], dims)
    out = torch.compile(fn, backend=aot_backend(compile_graph), dynamic=dynamic)(*args)
    return out, seen


def _kitsune(fn, *args, dynamic=False):
    """fn's result through torch.compile(backend="kitsune"), and the rewrites recorded."""
    before = len(GLOBAL_STATS.records())
    out = torch.compile(fn, backend="kitsune", dynamic=dynamic)(*args)
    return out, [r for record in GLOBAL_STATS.records()[before:] for r in record.rewrites]


def _close(out, fn, *args, rtol=1e-4):
    """out against fn run in float64, tolerances scaled to the result's size."""
    reference = fn(*(a.double() for a in args))
    scale = max(reference.abs().max().item(), 1.0)
    torch.testing.assert_close(out.double(), reference, rtol=rtol, atol=rtol * scale)


def _counts(nodes):
    ops = (("mm", aten.mm.default), ("bmm", aten.bmm.default))
    return {name: sum(n.target is op for n in nodes) for name, op in ops}


# -- the order ------------------------------------------------------------------------------


def test_the_dynamic_program_finds_the_textbook_order():
    # CLRS 15.2: 30x35, 35x15, 15x5, 5x10, 10x20, 20x25 -> ((A1(A2A3))((A4A5)A6)), 15125 multiply-adds
    assert _cheapest_order([30, 35, 15, 5, 10, 20, 25]) == ((0, (1, 2)), ((3, 4), 5))
    assert _cheapest_order([64, 64, 64, 1]) == (0, (1, 2))           # a vector last: from the right
    assert _cheapest_order([1, 64, 64, 64]) == ((0, 1), 2)           # a row vector first: from the left
    assert _cheapest_order([3, 4]) == 0
    with pytest.raises(ValueError, match="dims must"):
        _cheapest_order([7])


def test_a_matrix_times_a_vector_is_reassociated():
    A, B, v = torch.randn(48, 40), torch.randn(40, 32), torch.randn(32)
    out, seen = _rewritten(lambda A, B, v: (A @ B) @ v, A, B, v)
    _close(out, lambda A, B, v: (A @ B) @ v, A, B, v)
    (rewrite,), targets = seen["inference"]
    assert rewrite.applied and rewrite.pattern == "matrix_chain" and rewrite.ops == ("matmul", "matmul")
    assert "(A@B)@v to A@(B@v)" in rewrite.choice and "FLOP" in rewrite.choice, rewrite.choice
    assert set(rewrite.nodes) == {n.name for n in targets}  # the nodes it made, all the graph computes
    assert _counts(targets)["mm"] == 1  # B@v as the one mm (a column); A@(Bv) as mul + sum


def test_square_matrices_keep_the_order_written():
    A, B, C = (torch.randn(16, 16) for _ in range(3))
    out, seen = _rewritten(lambda A, B, C: (A @ B) @ C, A, B, C)
    (rewrite,), targets = seen["inference"]
    assert not rewrite.applied and "saves less than 25%" in rewrite.reason, rewrite
    assert rewrite.choice == "kept (A@B)@C"
    assert _counts(targets)["mm"] == 2
    torch.testing.assert_close(out, (A @ B) @ C)  # untouched: eager's order, eager's rounding


def test_a_saving_below_the_threshold_is_declined():
    # (A@B)@C: 2*(16*16*12 + 16*12*16) = 12288, A@(B@C): 2*(16*12*16 + 16*16*16) = 14336: the
    # written order is the cheapest; 16x16, 16x16, 16x13: 16384 vs 15360, 6 % saved: declined too
    _, seen = _rewritten(lambda A, B, C: A @ B @ C, torch.randn(16, 16), torch.randn(16, 16), torch.randn(16, 13))
    (rewrite,), _ = seen["inference"]
    assert not rewrite.applied and "saves less than" in rewrite.reason


@pytest.mark.parametrize("count", [2, 3, 4])
def test_chains_of_two_to_four_matrices_compiled_by_kitsune(count):
    """A square chain times a thin matrix: every product from the right is cheapest."""
    torch.manual_seed(count)
    mats = [torch.randn(24, 24) for _ in range(count - 1)] + [torch.randn(24, 3)]

    def chain(*ms):
        out = ms[0]
        for m in ms[1:]:
            out = out @ m
        return out
    before = len(GLOBAL_STATS.records())
    out, rewrites = _kitsune(chain, *mats)
    _close(out, chain, *mats)
    if count == 2:
        assert rewrites == []  # one product is no chain
        return
    (rewrite,) = rewrites
    assert rewrite.applied and len(rewrite.ops) == count - 1, rewrite
    assert rewrite.choice.split(" to ")[1].startswith("A@(B@" if count == 3 else "A@(B@(C@D))")
    # explain() sees one chain, applied (the products it made are no second, missed chain)
    (record,) = GLOBAL_STATS.records()[before:]
    finalize(record)
    chains = [o for o in record.opportunities if o.pattern == "matrix_chain"]
    assert [(o.status, o.choice) for o in chains] == [("applied", rewrite.choice)], chains
    assert f"matrix_chain: {' → '.join(['matmul'] * (count - 1))} → re-associated" in explain_records([record])


def test_square_matrices_times_a_vector_compiled_by_kitsune():
    """A@(B@v) with A and B square: the inner product stays an mm (see chains._emit)."""
    A, B, v = torch.randn(32, 32), torch.randn(32, 32), torch.randn(32)
    out, rewrites = _kitsune(lambda A, B, v: (A @ B) @ v, A, B, v)
    _close(out, lambda A, B, v: (A @ B) @ v, A, B, v)
    assert [r.applied for r in rewrites] == [True]


def test_a_row_vector_on_the_left_through_squeeze_and_unsqueeze():
    v, A, B = torch.randn(32), torch.randn(32, 32), torch.randn(32, 4)

    def fn(v, A, B):
        return v @ (A @ B)  # written from the right; (v@A)@B is cheaper
    out, seen = _rewritten(fn, v, A, B)
    _close(out, fn, v, A, B)
    (rewrite,), _ = seen["inference"]
    assert rewrite.applied and "to (A@B)@C" in rewrite.choice, rewrite


def test_batched_chains_of_bmm_through_matmul_views():
    A, B, C = torch.randn(3, 20, 24), torch.randn(3, 24, 28), torch.randn(3, 28, 2)

    def fn(A, B, C):
        return torch.matmul(torch.matmul(A, B), C)
    out, seen = _rewritten(fn, A, B, C)
    _close(out, fn, A, B, C)
    (rewrite,), targets = seen["inference"]
    assert rewrite.applied and _counts(targets)["bmm"] == 2, rewrite
    assert set(rewrite.nodes) == {n.name for n in targets if n.target is aten.bmm.default}  # the views stay
    out, rewrites = _kitsune(fn, A, B, C)
    _close(out, fn, A, B, C)
    assert [r.applied for r in rewrites] == [True]


def test_a_3d_input_through_2d_weights():
    """x @ W1 @ W2 with a 3-D x: mm over the flattened rows, views between the mms."""
    x, W1, W2 = torch.randn(2, 5, 32), torch.randn(32, 32), torch.randn(32, 2)
    fn = lambda x, W1, W2: x @ W1 @ W2  # noqa: E731
    out, seen = _rewritten(fn, x, W1, W2)
    _close(out, fn, x, W1, W2)
    (rewrite,), _ = seen["inference"]
    assert rewrite.applied and "to A@(B@C)" in rewrite.choice


def test_transposed_operands_and_addmm_at_the_end():
    """linear(x @ W1, W2, b) in bf16 keeps its addmm (kitsune.capture.dynamo): the bias is
    added to the product whichever order computed it. The weights are read transposed."""
    torch.manual_seed(0)
    x, W1 = torch.randn(64, 48), torch.randn(48, 48)
    W2, b = torch.randn(2, 48), torch.randn(2)
    fn = lambda x, W1, W2, b: F.linear(x @ W1, W2, b)  # noqa: E731
    args = [t.bfloat16() for t in (x, W1, W2, b)]
    out, seen = _rewritten(fn, *args)
    (rewrite,), targets = seen["inference"]
    assert rewrite.applied and aten.addmm.default in [n.target for n in targets], (rewrite, targets)
    assert out.dtype == torch.bfloat16
    _close(out, fn, *args, rtol=3e-2)


def test_bf16_error_against_float64_like_eager():
    torch.manual_seed(1)
    A, B, v = (torch.randn(*s).bfloat16() for s in ((64, 64), (64, 64), (64, 4)))
    fn = lambda A, B, v: (A @ B) @ v  # noqa: E731
    out, seen = _rewritten(fn, A, B, v)
    assert seen["inference"][0][0].applied and out.dtype == torch.bfloat16
    reference = fn(A.double(), B.double(), v.double())
    ours, eager = (out.double() - reference).abs().max(), (fn(A, B, v).double() - reference).abs().max()
    scale = reference.abs().max()
    assert ours <= 3e-2 * scale and ours <= 4 * eager + 1e-3 * scale, (ours, eager, scale)


def test_an_intermediate_used_twice_is_left_alone():
    A, B, C = torch.randn(32, 32), torch.randn(32, 32), torch.randn(32, 2)

    def fn(A, B, C):
        P = A @ B
        return P @ C, P.sum()
    out, seen = _rewritten(fn, A, B, C)
    (rewrite,), targets = seen["inference"]
    assert not rewrite.applied and "product mm is read elsewhere too" in rewrite.reason, rewrite
    assert _counts(targets)["mm"] == 2
    torch.testing.assert_close(out, fn(A, B, C))


def test_an_intermediate_read_twice_by_its_consumer_is_no_link():
    """P @ P reads P twice: expanded, the chain would compute A@B twice."""
    A, B = torch.randn(16, 16), torch.randn(16, 2)

    def fn(A, B):
        P = A @ torch.cat([B] * 8, dim=1)
        return P @ P
    out, seen = _rewritten(fn, A, B)
    (rewrite,), targets = seen["inference"]
    assert not rewrite.applied and "read twice" in rewrite.reason and _counts(targets)["mm"] == 2, rewrite
    torch.testing.assert_close(out, fn(A, B))


def test_integer_chains_keep_their_order():
    A, B = torch.randint(-3, 3, (32, 32)), torch.randint(-3, 3, (32, 32))
    v = torch.randint(-3, 3, (32, 2))
    out, seen = _rewritten(lambda A, B, v: (A @ B) @ v, A, B, v)
    (rewrite,), _ = seen["inference"]
    assert not rewrite.applied and "torch.int64" in rewrite.reason
    assert torch.equal(out, (A @ B) @ v)


def test_training_graphs_and_their_gradients():
    """The forward saves x @ W1 for the backward (a second user: no chain); the
    backward's x.T @ (g @ W2.T) (W1's gradient) is re-associated. Gradients equal eager's."""
    torch.manual_seed(2)
    x = torch.randn(32, 32)
    W1, W2 = torch.randn(32, 32, requires_grad=True), torch.randn(32, 2, requires_grad=True)
    fn = lambda x, W1, W2: (x @ W1 @ W2).square().sum()  # noqa: E731
    loss, seen = _rewritten(fn, x, W1, W2)
    grads = torch.autograd.grad(loss, (W1, W2))
    expected = torch.autograd.grad(fn(x, W1, W2), (W1, W2))
    for got, want in zip(grads, expected):
        torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-3)
    forward, _ = seen["forward"]
    assert [r.applied for r in forward] == [False] and "saved for the backward" in forward[0].reason
    backward, _ = seen["backward"]
    assert any(r.applied for r in backward), backward

    torch._dynamo.reset()
    loss, _ = _kitsune(fn, x, W1, W2)
    for got, want in zip(torch.autograd.grad(loss, (W1, W2)), expected):
        torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-3)


def test_dynamic_sizes_reassociate_where_the_saving_holds_for_every_size():
    fn = lambda A, B, v: (A @ B) @ v  # noqa: E731
    A, B, v = torch.randn(24, 20), torch.randn(20, 16), torch.randn(16)
    out, seen = _rewritten(fn, A, B, v, dynamic=True)
    (rewrite,), _ = seen["inference"]
    assert rewrite.applied and "at the sizes seen" in rewrite.choice, rewrite
    _close(out, fn, A, B, v)
    out, rewrites = _kitsune(fn, A, B, v, dynamic=True)
    assert [r.applied for r in rewrites] == [True]
    _close(out, fn, A, B, v)
    A2, B2, v2 = torch.randn(9, 7), torch.randn(7, 5), torch.randn(5)
    _close(torch.compile(fn, backend="kitsune", dynamic=True)(A2, B2, v2), fn, A2, B2, v2)


def test_dynamic_sizes_where_the_order_depends_on_them_are_left_alone():
    """Every size a symbol: A@(B@C) is cheaper only while C stays narrower than B."""
    fn = lambda A, B, C: (A @ B) @ C  # noqa: E731
    A, B, C = torch.randn(24, 24), torch.randn(24, 24), torch.randn(24, 3)
    out, seen = _rewritten(fn, A, B, C, dynamic=True)
    (rewrite,), targets = seen["inference"]
    assert not rewrite.applied and "may cost more for other values" in rewrite.reason, rewrite
    _close(out, fn, A, B, C)


def test_a_dynamic_batch_with_static_weights():
    fn = lambda x, W1, W2: x @ W1 @ W2  # noqa: E731
    x, W1, W2 = torch.randn(40, 32), torch.randn(32, 32), torch.randn(32, 2)
    out, seen = _rewritten(fn, x, W1, W2, mark={0: 0})
    (rewrite,), _ = seen["inference"]
    assert rewrite.applied, rewrite
    _close(out, fn, x, W1, W2)


def test_empty_inner_dimension_and_nan():
    fn = lambda A, B, v: (A @ B) @ v  # noqa: E731
    A, B, v = torch.randn(8, 0), torch.randn(0, 8), torch.randn(8, 2)
    out, seen = _rewritten(fn, A, B, v)
    assert seen["inference"][0][0].applied  # A@(B@v) multiplies nothing at all
    torch.testing.assert_close(out, torch.zeros(8, 2))
    torch._dynamo.reset()
    A, B, v = torch.randn(16, 16), torch.randn(16, 16), torch.randn(16, 2)
    A[3, 5] = float("nan")
    out, seen = _rewritten(fn, A, B, v)
    assert seen["inference"][0][0].applied
    assert torch.equal(out.isnan(), fn(A, B, v).isnan())  # row 3 only


def test_a_graph_without_chains_is_untouched():
    gm = torch.fx.symbolic_trace(lambda x: x + 1)
    code = gm.code
    assert reassociate_matmul_chains(gm) == [] and gm.code == code
    with pytest.raises(TypeError, match="gm must be"):
        reassociate_matmul_chains(lambda x: x)
