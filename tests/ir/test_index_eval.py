"""Index values at concrete positions (`evaluate`) and the equality check the
reduction lowering uses to tell whether a row result is read at its own row."""
from kitsune.ir.index import Index, delinearize, evaluate, same_on


def test_evaluate_digits():
    x = Index.var()
    i, j = delinearize(x, [3, 5])
    assert [evaluate(i, v) for v in range(15)] == [v // 5 for v in range(15)]
    assert [evaluate(j, v) for v in range(15)] == [v % 5 for v in range(15)]


def test_same_on_tells_rows_from_positions():
    x = Index.var()
    row = x.floordiv(4)
    assert same_on(row, row.mod(4), 16)        # written differently, the same values below 16
    assert not same_on(row, x.mod(4), 16)      # the position in the row is another row's index
    assert not same_on(row, row.mod(4), 10_000)  # beyond 16 the two differ, on the sampled points too
