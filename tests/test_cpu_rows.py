"""CPU row kernels: values the last loop would recompute at a cost (softmax's
exp) are kept in a row buffer by the loop before it, and division by a row
value is a multiply by its reciprocal where that is as good as dividing."""
import glob
import math
import os

import pytest
import torch

import kitsune


@pytest.fixture(autouse=True)
def _cpu(monkeypatch):
    monkeypatch.setenv("KITSUNE_BACKEND", "cpu")
    kitsune.reset_fusion_stats()


def _compile_and_read(f, *args):
    """f compiled by Kitsune, its result and the source of the C kernel it built."""
    root = os.path.join(os.environ["KITSUNE_CACHE_DIR"], "cpu")
    before = set(glob.glob(os.path.join(root, "*.c")))
    out = torch.compile(f, backend="kitsune", dynamic=False)(*args)
    stats = kitsune.get_fusion_stats()
    assert stats["fallbacks"] == [] and stats["num_fused"] >= 1, stats
    new = sorted(set(glob.glob(os.path.join(root, "*.c"))) - before)
    return out, "".join(open(p).read() for p in new)


def test_softmax_keeps_exp_and_multiplies_by_the_reciprocal():
    x = torch.randn(64, 256)
    out, source = _compile_and_read(lambda t: torch.softmax(t * 0.125, -1), x)
    torch.testing.assert_close(out, torch.softmax(x * 0.125, -1))
    kernel = source[source.index("rows x 256 reduced"):]
    assert kernel.count("expf(") == 1, kernel  # exp once, in the sum's loop
    assert "kept" in kernel and "_inv_ok ?" in kernel, kernel


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64, torch.bfloat16, torch.float16])
def test_softmax_and_log_softmax_with_specials(dtype):
    """Masked rows (all -inf: NaN), a NaN, +inf, several outputs from one kernel."""
    def f(x):
        return torch.softmax(x * 2, -1), torch.log_softmax(x, -1), torch.exp(x) / torch.exp(x).sum(-1, keepdim=True)

    x = torch.randn(9, 50, dtype=dtype)
    x[1] = -math.inf
    x[2, 3] = math.nan
    x[3, 7] = math.inf
    x[4, :10] = -math.inf
    got = torch.compile(f, backend="kitsune", dynamic=False)(x)
    for g, e in zip(got, f(x)):
        torch.testing.assert_close(g, e, equal_nan=True)


def test_division_by_row_values_at_the_edges_of_the_reciprocal():
    """Row sums of 0, ±inf, NaN, subnormal, tiny and huge: the reciprocal would
    overflow or lose precision, so those rows divide."""
    def f(x):
        return x / x.sum(-1, keepdim=True), x / x.amax(-1, keepdim=True)

    def row(*head, fill=0.0):
        return list(head) + [fill] * (32 - len(head))

    rows = [
        row(1.0, -1.0),                  # sum 0
        row(),                           # 0 / 0
        row(1.0, math.inf, 2.0),         # inf
        row(1.0, math.nan, 2.0),         # NaN
        row(fill=1e-45),                 # subnormal sum, 1 / sum overflows
        row(fill=1e-41),                 # sum 3.2e-40: 1 / sum overflows
        row(3e38, 1e-3),                 # 1 / sum and 1 / max subnormal
        row(1e38, 1e37, 1e-30),          # 1 / sum just below the smallest normal
        row(-1.5, 2.5, 3.0, fill=0.25),  # ordinary
    ]
    x = torch.tensor(rows)
    got = torch.compile(f, backend="kitsune", dynamic=False)(x)
    for g, e in zip(got, f(x)):
        torch.testing.assert_close(g, e, equal_nan=True)
    xd = torch.tensor([[1e-310, 2e-310], [1.7e308, 1e-300], [3.0, 5.0]], dtype=torch.float64).repeat(1, 8)
    got = torch.compile(f, backend="kitsune", dynamic=False)(xd)
    for g, e in zip(got, f(xd)):
        torch.testing.assert_close(g, e, equal_nan=True)


@pytest.mark.parametrize("cols", [20000, 40000])
def test_long_rows_keep_only_what_fits(cols):
    """A buffer of 20000 floats (80 KiB) fits the per-thread budget; 40000 do not
    (recomputed instead): both right."""
    x = torch.randn(8, cols)  # enough rows not to split them
    x[1, 5] = math.nan
    out, source = _compile_and_read(lambda t: torch.softmax(t, -1), x)
    torch.testing.assert_close(out, torch.softmax(x, -1), equal_nan=True)
    kernel = source[source.index(f"rows x {cols} reduced"):]
    assert ("kept" in kernel) == (cols * 4 <= 128 << 10)


def test_cheap_values_are_recomputed():
    """x - max - log(sum) needs nothing costly per element: no buffer."""
    x = torch.randn(16, 128)
    out, source = _compile_and_read(lambda t: torch.log_softmax(t, -1), x)
    torch.testing.assert_close(out, torch.log_softmax(x, -1))
    assert "kept" not in source[source.index("rows x 128 reduced"):]
