"""Index expressions: simplification and exact values against PyTorch's own strided indexing."""
import pytest
import torch
from hypothesis import given, settings, strategies as st

from kitsune.codegen.reference import evaluate_index
from kitsune.ir.index import Index, delinearize, linearize, strided


def test_contiguous_access_collapses_to_x():
    digits = delinearize(Index.var(), [4, 3, 5])
    assert strided(digits, [15, 5, 1]).is_var()


def test_reshape_of_contiguous_collapses():
    digits = delinearize(Index.var(), [4, 3, 5])
    merged = delinearize(linearize(digits, [4, 3, 5]), [12, 5])
    assert strided(merged, [5, 1]).is_var()


def test_broadcast_dims_vanish():
    digits = delinearize(Index.var(), [4, 8])
    assert str(strided(digits, [0, 1])) == "x % 8"


@settings(max_examples=60, deadline=None)
@given(shape=st.lists(st.integers(1, 5), min_size=1, max_size=4), data=st.data())
def test_permuted_strided_index_matches_torch(shape, data):
    """Element offsets of a permuted, sliced, broadcast view equal what as_strided reads."""
    perm = data.draw(st.permutations(range(len(shape))))
    base = torch.arange(10_000)
    strides = [data.draw(st.integers(0, 7)) for _ in shape]
    offset = data.draw(st.integers(0, 9))
    view = base.as_strided(shape, strides, offset)
    permuted_shape = [shape[p] for p in perm]
    digits = delinearize(Index.var(), permuted_shape)
    idx = [None] * len(shape)
    for k, p in enumerate(perm):
        idx[p] = digits[k]
    index = strided(idx, strides, offset)
    x = torch.arange(view.numel())
    expected = view.permute(*perm).reshape(-1)
    torch.testing.assert_close(base[evaluate_index(index, x)], expected)


@pytest.mark.parametrize("src,dst", [([2, 3, 4], [6, 4]), ([6, 4], [2, 12]), ([24], [2, 3, 4]), ([4, 6], [3, 8])])
def test_reshape_digits_match_torch(src, dst):
    x = torch.arange(24)
    idx_dst = delinearize(Index.var(), dst)
    idx_src = delinearize(linearize(idx_dst, dst), src)
    flat = linearize(idx_src, src)
    torch.testing.assert_close(evaluate_index(flat, x), x)
    expected = torch.arange(24).reshape(src)
    got = torch.stack([evaluate_index(i, x) for i in idx_src])
    torch.testing.assert_close(expected[tuple(got)], x)


def test_render_rows_agrees_with_render_on_every_position():
    from kitsune.ir.index import Index, delinearize, render, render_rows, strided

    R = 12
    x = Index.var()
    cases = [x, x.mod(R), x.floordiv(R), x.floordiv(3).mod(4), x.floordiv(24).mod(5),
             strided(delinearize(x, [5, 3, 4]), [1, 20, 5], offset=7), x.mod(6) * 2 + x.floordiv(R) * 9,
             x.floordiv(5).mod(7)]  # a digit that straddles rows keeps x
    for index in cases:
        general, by_rows = render(index, "x"), render_rows(index, R, "x")
        for row in range(5):
            for r in range(R):
                env = {"x": row * R + r, "row": row, "r": r}
                assert eval(by_rows, {}, env) == eval(general, {}, env), (str(index), by_rows)
