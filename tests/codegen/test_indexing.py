"""The ops that move elements (`kitsune.codegen.indexing`): cat, constant_pad_nd,
slice_scatter, select_scatter, arange, embedding, index.Tensor, index_select.

Each test compiles a small function with `torch.compile(backend=kitsune)` on
both code generators (generated C; generated Triton in Triton's interpreter),
checks the result against eager with fresh random inputs (NaN/Inf included,
non-contiguous inputs, several dtypes) and asserts that the op really ran in a
generated kernel. Out-of-range positions raise eager's own error (the C
kernels flag them; on a GPU a device assert does, which Triton's interpreter
does not run, so those cases are C only).
"""
from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F

import kitsune
from kitsune.backend import make_backend
from kitsune.config import FusionConfig
from kitsune.record import default_sink

aten = torch.ops.aten


@pytest.fixture(params=["cpu", "triton"])
def backend(request, monkeypatch):
    monkeypatch.setenv("KITSUNE_BACKEND", request.param)
    kitsune.reset_fusion_stats()
    torch._dynamo.reset()
    default_sink().reset()
    return request.param


def _fused_ops() -> list[list[str]]:
    return [names for record in default_sink().records() for _, names, _ in record.groups]


def _run(fn, *args, ops=(), **close):
    """Compile `fn`, compare with eager, and check that every node named in `ops`
    is in a generated kernel; returns the fused groups."""
    compiled = torch.compile(fn, backend=make_backend(FusionConfig(min_tensor_size=0)), dynamic=False)
    got, want = compiled(*args), fn(*args)
    torch.testing.assert_close(got, want, equal_nan=True, **close)
    groups = _fused_ops()
    fused = {name for names in groups for name in names}
    for op in ops:
        assert any(name == op or name.startswith(f"{op}_") for name in fused), (op, groups)
    return groups


def _special(*shape, dtype=torch.float32):
    """Random values with NaN, +-Inf and -0.0 mixed in."""
    x = torch.randn(*shape).to(dtype)
    flat = x.view(-1)
    for k, v in enumerate((math.nan, math.inf, -math.inf, -0.0)):
        if flat.numel() > k * 3:
            flat[k * 3] = v
    return x


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.int64, torch.bool])
def test_cat_of_several_producers_is_one_kernel(backend, dtype):
    if dtype == torch.bool:
        a, b = torch.rand(3, 4) > 0.5, torch.rand(5, 3) > 0.5
        fn = lambda a, b: torch.cat([a & a, ~b.t(), a], 1) | a[:, :1]  # noqa: E731
    else:
        a = _special(3, 4, dtype=dtype) if dtype.is_floating_point else torch.randint(-9, 9, (3, 4))
        b = (torch.randn(5, 3) * 4).to(dtype)
        fn = lambda a, b: torch.cat([a * 2, b.t() + 1, a.abs()], 1) * 3  # noqa: E731
    groups = _run(fn, a, b, ops=("cat",))
    assert len(groups) == 1


def test_cat_promotes_and_skips_legacy_empty_pieces(backend):
    a, b = torch.randn(2, 3), torch.randint(0, 5, (4, 3))
    _run(lambda a, b, e: torch.cat([a * 2, b + 1, e], 0) - 1, a, b, torch.empty(0), ops=("cat",))


def test_cat_along_the_first_dim_of_a_non_contiguous_input(backend):
    x = torch.randn(6, 4).t()  # (4, 6), strides (1, 4)
    _run(lambda x, y: torch.cat([x.exp(), y * y], 0).sum(-1), x, torch.randn(2, 6), ops=("cat",))


@pytest.mark.parametrize("where", ["reduced", "kept"])
def test_cat_and_pad_inside_a_reduction(backend, where):
    """The pieces are read per element of the reduced row (a cat along the
    reduced dim) or per row (a cat along a kept dim)."""
    a, b = _special(4, 6), torch.randn(4, 3)
    if where == "reduced":
        fn = lambda a, b: torch.softmax(torch.cat([a * 2, b], -1), -1) + F.pad(b, (0, 6)).sum(-1, True)  # noqa: E731
    else:
        fn = lambda a, b: torch.cat([a, torch.cat([b, -b], 1) * 3], 0).exp().sum(-1) * 2  # noqa: E731
    _run(fn, a, b, ops=("cat",))


def test_stack_is_a_cat_of_unsqueezed_pieces(backend):
    groups = _run(lambda a, b: torch.stack([a * 2, b.exp()], 1).relu(), _special(3, 4), torch.randn(3, 4),
                  ops=("cat",))
    assert len(groups) == 1


@pytest.mark.parametrize("form", ["llama", "neox"])
def test_rotary_embedding_is_one_kernel(backend, form):
    def rotate_half(x):
        half = x.shape[-1] // 2
        return torch.cat((-x[..., half:], x[..., :half]), dim=-1)

    def rotary(q, cos, sin):
        if form == "neox":  # rotate the first 8 of 12 channels, pass the rest through
            rot, passed = q[..., :8], q[..., 8:]
            return torch.cat((rot * cos + rotate_half(rot) * sin, passed), dim=-1)
        return q * cos + rotate_half(q) * sin

    width = 8
    q = _special(2, 3, 5, 12 if form == "neox" else width)
    positions = torch.arange(5, dtype=torch.float32)[:, None] * torch.rand(width // 2)
    angles = torch.cat((positions, positions), -1)
    groups = _run(rotary, q, angles.cos(), angles.sin(), ops=("cat",))
    assert len(groups) == 1


def test_rotary_embedding_gradients_match_eager(backend):
    def rotary(q, cos, sin):
        return (q * cos + torch.cat((-q[..., 4:], q[..., :4]), -1) * sin).square().sum()

    q = torch.randn(2, 5, 8, requires_grad=True)
    cos, sin = torch.randn(5, 8), torch.randn(5, 8)
    compiled = torch.compile(rotary, backend=make_backend(FusionConfig(min_tensor_size=0)))
    (got,) = torch.autograd.grad(compiled(q, cos, sin), q)
    (want,) = torch.autograd.grad(rotary(q, cos, sin), q)
    torch.testing.assert_close(got, want)


@pytest.mark.parametrize("pad, value", [((1, 2, 0, 3), 1.5), ((-1, 2), 0.0), ((2, 2, 1, 1, 1, 0), -math.inf)])
def test_constant_pad_nd(backend, pad, value):
    _run(lambda x: F.pad(x * 2, pad, value=value) + 1, _special(2, 3, 4), ops=("constant_pad_nd",))


def test_constant_pad_of_an_integer_tensor(backend):
    _run(lambda x: F.pad(x + 1, (1, 1), value=7) * 2, torch.randint(-5, 5, (3, 4)), ops=("constant_pad_nd",))


@pytest.mark.parametrize("start, end, step", [(1, 7, 2), (None, None, 1), (-3, None, 1), (2, 3, 3)])
def test_slice_scatter(backend, start, end, step):
    base, length = _special(3, 8), len(range(8)[slice(start, end, step)])
    _run(lambda a, b: aten.slice_scatter(a * 2, b + 1, 1, start, end, step) * 2, base, torch.randn(3, length),
         ops=("slice_scatter",))


def test_select_scatter(backend):
    _run(lambda a, b: aten.select_scatter(a * 2, b.exp(), 0, -1) + 1, _special(4, 5), torch.randn(5))


@pytest.mark.parametrize("dtype", [torch.int64, torch.int32, torch.float32, torch.bfloat16])
def test_arange_is_index_arithmetic(backend, dtype):
    def fn(x):
        positions = torch.arange(2, 2 + 3 * x.shape[-1], 3, dtype=dtype)
        return (positions * 2 + x.to(dtype)) * 1

    _run(fn, (torch.randn(3, 8) * 5), ops=("arange",))


def test_position_ids_and_token_embeddings(backend):
    wte, wpe = _special(50, 8), torch.randn(16, 8)

    def embed(ids):
        positions = torch.arange(ids.shape[1])
        return F.embedding(ids, wte) + F.embedding(positions, wpe)[None]

    groups = _run(embed, torch.randint(0, 50, (2, 6)), ops=("embedding", "embedding_1", "arange"))
    assert len(groups) == 1


@pytest.mark.parametrize("case", ["rows", "negative", "middle", "apart", "broadcast"])
def test_advanced_indexing(backend, case):
    x = _special(6, 4, 5)
    i, j = torch.tensor([0, -1, 3]), torch.tensor([[1], [4]])
    fns = {
        "rows": (lambda x, i, j: x[i] * 2, (x, torch.tensor([5, 0, 2]), j)),
        "negative": (lambda x, i, j: x[i] * 2, (x, i, j)),
        "middle": (lambda x, i, j: x[:, i] + 1, (x, torch.tensor([[0, 3], [1, 1]]), j)),
        "apart": (lambda x, i, j: x[i, :, j] * 2, (x, i, j)),  # non-adjacent: broadcast dims first
        "broadcast": (lambda x, i, j: x[j, i[:2]] - 1, (x, i, j)),
    }
    fn, args = fns[case]
    _run(fn, *args, ops=("index",))


def test_index_select_of_a_transposed_tensor(backend):
    x = _special(5, 6).t()
    _run(lambda x, i: torch.index_select(x, 1, i) * 2 + 1, x, torch.tensor([4, 0, 0, 2]), ops=("index_select",))


def test_indexing_an_empty_selection(backend):
    _run(lambda w, i: F.embedding(i, w) * 2, torch.randn(10, 4), torch.empty(0, 3, dtype=torch.int64))


def test_a_tensor_computed_in_the_group_is_not_read_at_computed_positions(backend):
    """x * 2 indexed by i: the product is written by its own kernel first."""
    groups = _run(lambda x, i: (x * 2)[i] + 1, torch.randn(6, 4), torch.tensor([0, 3]), ops=("index",))
    assert not any("mul" in names and "index" in names for names in groups)


CASES_OUT_OF_RANGE = {
    "embedding": (lambda w, i: F.embedding(i, w) * 2, lambda bad: (torch.randn(10, 4), torch.tensor([[1, bad]]))),
    "index": (lambda x, i: x[i] * 2 + 1, lambda bad: (torch.randn(6, 4), torch.tensor([0, bad]))),
    "index_select": (lambda x, i: torch.index_select(x, 0, i) * 2 + 1,
                     lambda bad: (torch.randn(6, 4), torch.tensor([0, bad]))),
    "gather": (lambda x, t: (torch.log_softmax(x, -1).gather(-1, t[:, None]) * 2).sum(),
               lambda bad: (torch.randn(3, 10), torch.tensor([1, bad, 2]))),
}


@pytest.mark.parametrize("op", sorted(CASES_OUT_OF_RANGE))
@pytest.mark.parametrize("bad", [100, -11])
def test_a_position_out_of_range_raises_like_eager(monkeypatch, op, bad):
    monkeypatch.setenv("KITSUNE_BACKEND", "cpu")
    torch._dynamo.reset()
    default_sink().reset()
    fn, make = CASES_OUT_OF_RANGE[op]
    with pytest.raises((IndexError, RuntimeError)) as eager:
        fn(*make(bad))
    compiled = torch.compile(fn, backend=make_backend(FusionConfig(min_tensor_size=0)), dynamic=False)
    good = make(1)
    torch.testing.assert_close(compiled(*good), fn(*good))  # compiles and runs in range
    assert any(op in names for names in _fused_ops())
    with pytest.raises(eager.type, match=str(eager.value).split(" is ")[0].replace("(", r"\(")):
        compiled(*make(bad))


def test_triton_kernels_check_positions_with_a_device_assert(backend):
    if backend != "triton":
        pytest.skip("the Triton source")
    from kitsune.codegen.triton import compile_kernel  # noqa: F401 - the backend is importable
    _run(lambda w, i: F.embedding(i, w) * 2, torch.randn(10, 4), torch.tensor([[1, 9]]))
    record = default_sink().records()[0]
    (call,) = record.kernel_calls.values()
    source = call.kernel.source
    assert "check_index(" in source and "from kitsune.codegen.triton.libm import check_index" in source


def test_cat_with_a_one_element_piece_reads_it_under_the_block_mask(backend):
    # Llama's position shift: cat([a - 1, b]) reads the one element of `a` at a fixed
    # index where the position is 0. Triton refuses a block mask on a single pointer,
    # so the read must be a block of pointers (the kernel ran unfused on an H100).
    def fn(a, b):
        return (torch.cat([a - 1, b]) * 2).ne(3), torch.cat([b, a * 3]) + 1
    a, b = torch.randint(-5, 5, (1,)), torch.randint(-5, 5, (31,))
    _run(fn, a, b, ops=("cat",))
    assert kitsune.get_fusion_stats()["runtime_fallbacks"] == []
