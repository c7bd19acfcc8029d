"""Reductions fused with their pointwise neighbours, against eager, through the
Triton (interpreter) and CPU code generators: forward and backward."""
import glob
import math
import os

import pytest
import torch
import torch.nn.functional as F

import kitsune
from kitsune.report.stats import GLOBAL_STATS
from kitsune.tuning.launch import override_launch_choices


@pytest.fixture(params=["cpu", "triton", "triton-looped", "triton-split"])
def backend(request, monkeypatch, tmp_path):
    name = request.param
    # a cache of its own, so a test sees the kernels it generated (another variant
    # may have generated the same source already)
    monkeypatch.setenv("KITSUNE_CACHE_DIR", str(tmp_path))
    monkeypatch.setenv("KITSUNE_BACKEND", name.split("-")[0])
    choices = {}
    if name == "triton-looped":  # rows longer than 8 elements walk in chunks of 8
        choices = dict(persistent_max=8)
    if name == "triton-split":  # column reductions split in parts of 32 rows, short rows in chunks of 8
        choices = dict(split_min_elements=1, split_min_programs=1000, split_max=8, outer_tile=64,
                       split_xblock=16, row_split_min_elements=1, row_split_max=8, looped_rblock=8)
    with override_launch_choices(**choices):
        kitsune.reset_fusion_stats()
        yield name


def _fused(min_groups=1):
    stats = kitsune.get_fusion_stats()
    assert stats["fallbacks"] == [], stats["fallbacks"]
    assert stats["num_fused"] >= min_groups, stats
    words = ("sum", "amax", "amin", "prod", "any", "all", "mean", "var")
    reductions = [g for g in stats["groups"] if any(w in n for n in g[1] for w in words)]
    assert reductions, f"no reduction was fused: {stats['groups']}"
    return stats


def _special(x):
    """Sprinkle NaN, ±inf and -0.0 into x (float tensors)."""
    flat = x.view(-1)
    if flat.numel() > 8:
        flat[1] = math.nan
        flat[5] = math.inf
        flat[7] = -math.inf
        flat[3] = -0.0
    return x


REDUCTIONS = {
    "sum": lambda x, d, k: (x * 2).sum(d, keepdim=k) + 1,
    "mean": lambda x, d, k: (x + 1).mean(d, keepdim=k) * 3,
    "amax": lambda x, d, k: (x - 1).amax(d, keepdim=k) * 2,
    "amin": lambda x, d, k: (x * 3).amin(d, keepdim=k) - 1,
    "prod": lambda x, d, k: (x * 0.5 + 1).prod(d[0] if isinstance(d, tuple) else d, keepdim=k) - 1,
    "var": lambda x, d, k: (x * 2).var(d, keepdim=k, correction=1) + 1,
    "std0": lambda x, d, k: (x * 2).std(d, keepdim=k, correction=0) + 1,
    "logsumexp": lambda x, d, k: torch.logsumexp(x * 2, d, keepdim=k) - 1,
}


@pytest.mark.parametrize("name", sorted(REDUCTIONS))
@pytest.mark.parametrize("dims,keepdim", [(-1, False), (1, True), (0, False), ((0, 2), True)])
def test_float_reductions(backend, name, dims, keepdim):
    if name == "prod" and isinstance(dims, tuple):
        pytest.skip("prod takes one dim")
    f = REDUCTIONS[name]
    x = torch.randn(5, 12, 7)
    if name not in ("prod",):
        x = _special(x)
    compiled = torch.compile(lambda t: f(t, dims, keepdim), backend="kitsune")
    torch.testing.assert_close(compiled(x), f(x, dims, keepdim), equal_nan=True, rtol=2e-5, atol=2e-5)
    _fused()


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16, torch.float64])
def test_low_and_high_precision_sum_and_max(backend, dtype):
    def f(x):
        return (x * 1.5).sum(-1) + x.amax(-1) - (x + 1).mean(-1)

    x = torch.randn(6, 40, dtype=dtype)
    torch.testing.assert_close(torch.compile(f, backend="kitsune")(x), f(x))
    _fused()


@pytest.mark.parametrize("dtype", [torch.int32, torch.int64])
def test_integer_reductions_wrap_and_promote(backend, dtype):
    def f(x):
        return (x * 3).sum(-1), (x + 1).amax(-1), (x - 2).amin(0), (x | 1).prod(-1)

    info = torch.iinfo(dtype)
    x = torch.randint(-50, 50, (4, 9), dtype=dtype)
    x[0, 0] = info.max  # x * 3 wraps around, as in eager
    outs = torch.compile(f, backend="kitsune")(x)
    for got, want in zip(outs, f(x)):
        assert got.dtype == want.dtype
        torch.testing.assert_close(got, want)
    _fused()


def test_any_all(backend):
    def f(x):
        return (x > 0.5).any(-1), (x > -2).all(1), (x != x).any(0)

    x = torch.randn(5, 11)
    x[2] = -3.0
    x[0, 3] = math.nan
    outs = torch.compile(f, backend="kitsune")(x)
    for got, want in zip(outs, f(x)):
        torch.testing.assert_close(got, want)
    _fused()


@pytest.mark.parametrize("dims", [-1, 0, (0, 1)])
def test_bool_amax_amin_with_pointwise_neighbours(backend, dims):
    # max of bools is any and min is all; their identities are False and True
    def f(b, c):
        return (b.amax(dims) | c.amin(dims)).logical_not(), (b & c).amin(dims) ^ b.amax(dims)

    for _ in range(3):
        b, c = torch.rand(6, 13) > 0.5, torch.rand(6, 13) > 0.1
        torch._dynamo.reset()
        outs = torch.compile(f, backend="kitsune")(b, c)
        for got, want in zip(outs, f(b, c)):
            torch.testing.assert_close(got, want)
    _fused()


@pytest.mark.parametrize("dim", [0, -1])
def test_zero_dim_tensor_reduced_over_its_dim(backend, dim):
    # a 0-dim tensor's dim 0 (or -1) is the tensor itself
    def f(x):
        return x.sum(dim, keepdim=True) * 2, (x * 3).amax(dim) - 1, (x + 1).mean(dim, keepdim=False)

    for value in (1.5, -0.0, math.nan, math.inf):
        x = torch.tensor(value)
        torch._dynamo.reset()
        outs = torch.compile(f, backend="kitsune")(x)
        for got, want in zip(outs, f(x)):
            torch.testing.assert_close(got, want, equal_nan=True)
            assert got.shape == want.shape and got.dtype == want.dtype
    stats = kitsune.get_fusion_stats()
    assert stats["fallbacks"] == [], stats["fallbacks"]


def test_non_contiguous_and_transposed_inputs(backend):
    def f(x, y):
        return torch.softmax(x.t() * 2 + y, -1)

    x = torch.randn(13, 6)
    y = torch.randn(6, 26)[:, ::2]
    torch.testing.assert_close(torch.compile(f, backend="kitsune")(x, y), f(x, y))
    _fused()


def test_softmax_with_fully_masked_rows(backend):
    def f(x, mask):
        return torch.softmax(x.masked_fill(mask, -math.inf) * 0.125, -1)

    x = torch.randn(6, 20)
    mask = torch.rand(6, 20) > 0.7
    mask[2] = True  # a fully masked row is all NaN in eager
    torch.testing.assert_close(torch.compile(f, backend="kitsune")(x, mask), f(x, mask), equal_nan=True)
    _fused()


def _grads(f, *args):
    out = f(*args)
    weight = torch.randn_like(out)
    return out, torch.autograd.grad((out * weight).sum(), [a for a in args if a.requires_grad])


def _check_fwd_bwd(f, *args, dtype=torch.float32, **tol):
    args_c = [a.detach().clone().requires_grad_(a.requires_grad) for a in args]
    args_e = [a.detach().clone().requires_grad_(a.requires_grad) for a in args]
    torch.manual_seed(1)
    out_c, grads_c = _grads(torch.compile(f, backend="kitsune"), *args_c)
    torch.manual_seed(1)
    out_e, grads_e = _grads(f, *args_e)
    torch.testing.assert_close(out_c, out_e, **tol)
    for gc, ge in zip(grads_c, grads_e):
        torch.testing.assert_close(gc, ge, **tol)


COMPOSITES = {  # name -> (function, which of x, w, b it uses)
    "softmax": (lambda x: torch.softmax(x * 0.125, -1), 1),
    "log_softmax": (lambda x: torch.log_softmax(x, -1) * 2, 1),
    "layer_norm_gelu": (lambda x, w, b: F.gelu(F.layer_norm(x, x.shape[-1:], w, b)), 3),
    "rms_norm_silu": (lambda x, w: F.silu(x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + 1e-6) * w), 2),
}


@pytest.mark.parametrize("name", sorted(COMPOSITES))
def test_composites_forward_backward(backend, name):
    f, nargs = COMPOSITES[name]
    torch.manual_seed(0)
    x = torch.randn(4, 3, 24, requires_grad=True)
    w = torch.randn(24, requires_grad=True)
    b = torch.randn(24, requires_grad=True)
    _check_fwd_bwd(f, *(x, w, b)[:nargs], rtol=1e-4, atol=1e-5)
    _fused(2)  # forward and backward


def test_layer_norm_bf16_matches_eager_accuracy(backend):
    torch.manual_seed(0)
    x = torch.randn(8, 64, dtype=torch.bfloat16)
    w = torch.randn(64, dtype=torch.bfloat16)
    b = torch.randn(64, dtype=torch.bfloat16)

    def f(x, w, b):
        return F.layer_norm(x, (64,), w, b)

    got = torch.compile(f, backend="kitsune")(x, w, b).double()
    want = f(x, w, b).double()
    exact = f(x.double(), w.double(), b.double())
    # no worse than eager's own bf16 error against a float64 run
    assert (got - exact).abs().max() <= (want - exact).abs().max() * 1.5 + 1e-2
    _fused()


def test_cross_entropy_forward_backward(backend):
    torch.manual_seed(0)
    logits = torch.randn(8, 30, requires_grad=True)
    target = torch.randint(0, 30, (8,))
    target[3] = -100

    def f(x, t):
        return F.cross_entropy(x, t, ignore_index=-100, label_smoothing=0.1)

    _check_fwd_bwd(lambda x: f(x, target), logits, rtol=1e-5, atol=1e-6)
    _fused()


def _kernels_fusing(op_name):
    return [g for g in kitsune.get_fusion_stats()["groups"] if any(op_name in n for n in g[1])]


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_cross_entropy_forward_is_one_row_kernel(backend, dtype):
    """log_softmax, the target pick (gather) and the ignore mask fuse into one
    row kernel: the logits are read once and no [rows, classes] tensor is written."""
    torch.manual_seed(0)
    logits = _special(torch.randn(16, 50)).to(dtype)
    target = torch.randint(0, 50, (16,))
    target[2] = 7  # a NaN row: the loss is NaN, as in eager
    target[4] = -100

    def f(x, t):
        return F.cross_entropy(x, t)

    got = torch.compile(f, backend="kitsune")(logits, target)
    torch.testing.assert_close(got, f(logits, target), equal_nan=True)
    finite = torch.randn(16, 50, dtype=dtype)
    torch._dynamo.reset()
    kitsune.reset_fusion_stats()
    torch.testing.assert_close(torch.compile(f, backend="kitsune")(finite, target), f(finite, target))
    row_kernels = _kernels_fusing("gather")
    assert len(row_kernels) == 1 and any("amax" in n for n in row_kernels[0][1]), row_kernels


@pytest.mark.parametrize("dim", [0, 1, -1])
def test_gather_one_per_row_and_scatter(backend, dim):
    x = torch.randn(6, 9)
    x[1, 2] = -math.inf
    x[3, 4] = math.nan
    size = list(x.shape)
    size[dim] = 1
    index = torch.randint(0, x.shape[dim], size)

    def f(x, i):
        soft = torch.softmax(x * 2, dim)
        picked = torch.gather(soft, dim, i)
        marked = torch.scatter(torch.zeros_like(x), dim, i, -1.0) + soft
        moved = torch.scatter(x * 3, dim, i, picked * 5)
        return picked, marked, moved

    got = torch.compile(f, backend="kitsune")(x, index)
    for g, e in zip(got, f(x, index)):
        torch.testing.assert_close(g, e, equal_nan=True)
    assert _kernels_fusing("gather") and _kernels_fusing("scatter")


@pytest.mark.parametrize("dim", [0, 1, 2])
def test_gather_reads_the_target_of_a_strided_input(backend, dim):
    """The pick is one read per row at the target (load_at): through a permuted
    3-d input, along each dim, with -inf/NaN around it and bf16 logits."""
    torch.manual_seed(dim)
    x = torch.randn(5, 7, 6, dtype=torch.bfloat16).permute(2, 0, 1)  # [6, 5, 7], not contiguous
    x[0, 0, 0] = -math.inf
    x[1, 2, 3] = math.nan
    size = list(x.shape)
    size[dim] = 1
    index = torch.randint(0, x.shape[dim], size)

    def f(x, i):
        logp = torch.log_softmax(x.float(), dim)
        return torch.gather(logp, dim, i) * -1, torch.gather(x, dim, i).float() + 1

    got = torch.compile(f, backend="kitsune")(x, index)
    for g, e in zip(got, f(x, index)):
        torch.testing.assert_close(g, e, equal_nan=True)
    assert _kernels_fusing("gather")


def test_gather_out_of_range_raises_like_eager(backend):
    """An index out of range is eager's error: the C kernel flags it and the
    group's ops rerun through PyTorch to raise it; a Triton kernel checks it
    with a device assert, which Triton's interpreter does not run (there the
    position is clamped into the row, so no read leaves the tensor)."""
    def f(x, i):
        return torch.gather(torch.softmax(x, 1), 1, i) * 2

    x = torch.randn(4, 8)
    index = torch.tensor([[1], [9], [0], [7]])
    compiled = torch.compile(f, backend="kitsune")
    good = index.clamp(max=7)
    torch.testing.assert_close(compiled(x, good), f(x, good))
    assert _kernels_fusing("gather")
    if backend == "cpu":
        with pytest.raises(RuntimeError, match="index 9 is out of bounds for dimension 1 with size 8"):
            compiled(x, index)
    else:
        (call,) = [c for r in GLOBAL_STATS.graphs for c in r.kernel_calls.values()]
        assert "check_index(" in call.kernel.source


def test_long_rows(backend):
    def f(x):
        return torch.softmax(x, -1) * 2 + x.sum(-1, keepdim=True)

    x = torch.randn(2, 5000)
    torch.testing.assert_close(torch.compile(f, backend="kitsune")(x), f(x), rtol=1e-4, atol=1e-4)
    _fused()


def test_rows_of_seventy_thousand(backend):
    """Rows longer than any block (70001 elements, odd): the Triton kernel
    walks them in chunks (online softmax), the C kernel in one simd loop."""
    if backend in ("triton-looped", "triton-split"):
        pytest.skip("8-element chunks over 70001 elements are too slow in the interpreter (150 s); 'triton' "
                    "loops too, and test_long_rows splits long rows")

    def f(x):
        return torch.softmax(x * 2, -1), torch.logsumexp(x, -1), (x - x.mean(-1, keepdim=True)).amax(-1)

    x = _special(torch.randn(4, 70001))
    x[2, 9] = math.nan
    got = torch.compile(f, backend="kitsune", dynamic=False)(x)
    for a, b in zip(got, f(x)):
        torch.testing.assert_close(a, b, equal_nan=True, rtol=1e-4, atol=1e-6)
    _fused()


def test_empty_reduction_runs_through_pytorch(backend):
    def f(x):
        return (x * 2).sum(-1) + 1

    x = torch.randn(3, 0)
    torch.testing.assert_close(torch.compile(f, backend="kitsune")(x), f(x))


def test_reduction_fusion_can_be_disabled():
    config = kitsune.FusionConfig(enable_reduction=False)
    kitsune.reset_fusion_stats()
    f = kitsune.optimize(lambda x: torch.softmax(x * 2, -1), config)
    x = torch.randn(4, 10)
    torch.testing.assert_close(f(x), torch.softmax(x * 2, -1))
    stats = kitsune.get_fusion_stats()
    assert not any("amax" in " ".join(g[1]) for g in stats["groups"])


def _outer_kernels() -> list[str]:
    """Sources of the outer-layout reduction kernels generated so far."""
    root = os.environ["KITSUNE_CACHE_DIR"]
    found = []
    for sub in ("cpu", "triton"):
        for path in glob.glob(os.path.join(root, sub, "*")):
            if path.endswith((".c", ".py")):
                text = open(path).read()
                found += [text] if "outer layout" in text else []
    return found


COLUMN = {
    # bias gradient with its prologue, written out as well (a full-shape output)
    "sum": lambda g, x: (lambda h: (h, h.sum(0)))(g * torch.sigmoid(x) * 2),
    "mean_keepdim": lambda g, x: (g + x).mean(0, keepdim=True) * 3,
    "amax_nan": lambda g, x: (g * x).amax(0),
    "amin": lambda g, x: (g - x).amin(0) + 1,
    "var_two_stages": lambda g, x: (g * 2 + x).var(0),
    "softmax_over_columns": lambda g, x: torch.softmax(g * x, 0),
    "prod": lambda g, x: (g * 0.01 + 1).prod(0),
    "any": lambda g, x: (g > 2.5).any(0),
}


@pytest.mark.parametrize("name", sorted(COLUMN))
@pytest.mark.parametrize("shape", [(150, 70), (9, 20, 6)])
def test_column_reductions_use_the_outer_layout(backend, name, shape):
    """Reductions over a leading dim (bias and norm-weight gradients): adjacent
    rows are adjacent in memory, so the kernel reduces a tile of rows at a
    time (contiguous loads). Rows that do not fill the last tile, NaN, ±inf,
    several stages (the variance) and full-shape outputs."""
    f = COLUMN[name]
    g, x = torch.randn(*shape), torch.randn(*shape)
    if name != "prod":
        g = _special(g)
    before = len(_outer_kernels())
    got = torch.compile(f, backend="kitsune", dynamic=False)(g, x)
    want = f(g, x)
    for a, b in zip(got if isinstance(got, tuple) else (got,), want if isinstance(want, tuple) else (want,)):
        torch.testing.assert_close(a, b, equal_nan=True)
    _fused()
    assert len(_outer_kernels()) > before, "no outer-layout kernel was generated"
    if backend == "triton-split" and shape == (150, 70) and name in ("sum", "mean_keepdim", "amax_nan", "amin"):
        # one stage of sums/extremes: the rows are split over programs, a finish kernel combines
        assert any("split in 3 parts of 64" in source and "_finish(" in source for source in _outer_kernels())


def test_long_column_sum_is_as_accurate_as_eager(backend):
    """A column of 3000 float32 values summed one at a time loses bits; the
    outer kernels compensate long float sums (Kahan), so their error against
    a float64 sum is no worse than eager's, and inf/NaN still propagate as in
    eager (the compensation alone would turn +inf into NaN)."""
    g = torch.randn(3000, 24) + 3
    g[5, 3] = math.inf
    g[7, 4] = math.nan
    g[9, 6], g[11, 6] = math.inf, -math.inf
    g[13, 8] = -math.inf
    f = lambda t: (t * 1.5).sum(0)
    got, want = torch.compile(f, backend="kitsune", dynamic=False)(g), f(g)
    torch.testing.assert_close(got, want, equal_nan=True)
    exact = f(g.double())
    finite = torch.isfinite(exact)
    assert torch.equal(torch.isfinite(got), finite) and torch.equal(got[~finite].isnan(), want[~finite].isnan())
    ours, eagers = (got.double() - exact)[finite].abs().max(), (want.double() - exact)[finite].abs().max()
    assert ours <= 1.5 * eagers + 1e-6, (ours, eagers)
    _fused()


def test_bias_gradient_fuses_in_the_backward(backend):
    """Linear's bias gradient is a column sum of the output gradient; with the
    activation's backward in front of it, it is one outer-layout kernel."""
    lin = torch.nn.Linear(16, 40)
    x = torch.randn(96, 16)

    def f(x):
        return torch.nn.functional.gelu(lin(x)).sum()

    f(x).backward()
    want = lin.bias.grad.clone(), lin.weight.grad.clone()
    lin.zero_grad()
    before = len(_outer_kernels())
    torch.compile(f, backend="kitsune", dynamic=False)(x).backward()
    torch.testing.assert_close(lin.bias.grad, want[0])
    torch.testing.assert_close(lin.weight.grad, want[1])
    assert len(_outer_kernels()) > before, "the bias gradient did not use an outer-layout kernel"


WHOLE = {
    "mse": lambda a, b: ((a - b) ** 2).mean(),
    "amax_nan": lambda a, b: (a * b).amax(),
    "sum_keepdim": lambda a, b: (a + b).sum((0, 1), keepdim=True) * 2,
    "var_two_stages": lambda a, b: (a + b).var(),
}


@pytest.mark.parametrize("name", sorted(WHOLE))
def test_whole_tensor_reductions_are_split(backend, name):
    """A reduction of a large tensor to one value: Triton splits it over many
    programs that write partial results and a finish kernel combines them
    (a reduction that cannot be split, the variance waiting for its mean,
    runs through PyTorch, with the reason); the C backend splits each pass
    over the row between its threads, in blocks."""
    gen = torch.Generator().manual_seed(0)
    # "triton-split" splits any size in parts of 8 elements: 150000 of them took ~55 s a case in the
    # interpreter; 2000 elements still take hundreds of parts and the finish kernel (the variance stays
    # large: refused at that size, a short one would run as one looped row)
    shape = (40, 50) if backend == "triton-split" and name != "var_two_stages" else (300, 500)
    a, b = torch.randn(*shape, generator=gen), torch.randn(*shape, generator=gen)
    if name == "amax_nan":
        a[7, 9] = math.nan
    f = WHOLE[name]
    got = torch.compile(f, backend="kitsune", dynamic=False)(a, b)
    want = f(a, b)
    # a sum of 150000 terms rounds by its order (eager's and the split kernel's differ):
    # within 1e-5 of eager, and no further from float64 than twice eager's error
    torch.testing.assert_close(got, want, equal_nan=True, rtol=1e-5, atol=1e-5)
    exact = f(a.double(), b.double())
    if not exact.isnan().any():
        assert ((got.double() - exact).abs() <= 2 * (want.double() - exact).abs() + 1e-6 * exact.abs()).all()
    stats = kitsune.get_fusion_stats()
    fused = backend == "cpu" or name != "var_two_stages"
    if fused:
        assert stats["fallbacks"] == []
    else:  # refused by the Triton backend: it runs through PyTorch, reported with the reason
        assert [why for _, why in stats["fallbacks"]] == [
            f"1 row(s) of {a.numel()} elements and the reduction cannot be split (several stages, or a per-element "
            "output needs it)"], stats["fallbacks"]
    reduced = any(w in n for g in stats["groups"] for n in g[1] for w in ("mean", "amax", "sum", "var"))
    assert reduced == fused, stats["groups"]
    if fused and backend != "cpu":  # the parts and their finish: two kernels, counted as such
        assert stats["kernels_after"] == 2, stats


ARG_REDUCTIONS = {
    "argmax_last": lambda x: (x * 2).argmax(-1),
    "argmin_first_keepdim": lambda x: (x - 1).argmin(0, keepdim=True),
    "argmax_flat": lambda x: (x + 1).argmax(),
    "argmax_middle": lambda x: torch.argmax(x * x, 1),
    "argmin_with_its_value": lambda x: (lambda y: (y.argmin(-1), y.amin(-1)))(x * 3),
}


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.int32])
@pytest.mark.parametrize("name", sorted(ARG_REDUCTIONS))
def test_argmax_argmin(backend, name, dtype):
    """argmax/argmin fuse as two reductions of one row (the NaN-propagating
    extreme, then its first position): ties give the first index, a NaN
    anywhere in the row gives the first NaN's index, as in eager."""
    f = ARG_REDUCTIONS[name]
    x = (torch.randn(6, 50, 7) * 3).to(dtype)
    if dtype.is_floating_point:
        x[1, 3, 2] = math.nan        # a NaN row (argmax and argmin both point at it)
        x[2] = 1.0                   # ties everywhere
        x[3, 5, 1] = math.inf
        x[4, 7, :] = -math.inf
    else:
        x[2] = 4                     # ties
    got = torch.compile(f, backend="kitsune", dynamic=False)(x)
    want = f(x)
    for a, b in zip(got if isinstance(got, tuple) else (got,), want if isinstance(want, tuple) else (want,)):
        assert a.dtype == b.dtype and a.shape == b.shape
        torch.testing.assert_close(a, b, equal_nan=True, rtol=0, atol=0)
    stats = kitsune.get_fusion_stats()
    assert stats["fallbacks"] == [] and stats["num_fused"] >= 1, stats


@pytest.mark.parametrize("backend", ["cpu", "triton"])
def test_row_result_read_along_the_rows_is_not_its_own_row(monkeypatch, backend):
    """`A * x.sum(1)` broadcasts the row sums along A's last dim: element (i, j) needs
    row j's sum, which a kernel over x's rows does not have (it gave row i's when A
    and x were square). The sums and the product are then separate kernels."""
    monkeypatch.setenv("KITSUNE_BACKEND", backend)
    torch._dynamo.reset()
    a, x = torch.randn(5, 5), torch.randn(5, 5)

    def f(a, x):
        return a * x.sum(1), a * x.sum(1, keepdim=True), (a * x.amax(1)).sum(1)
    for got, want in zip(torch.compile(f, backend="kitsune")(a, x), f(a, x)):
        torch.testing.assert_close(got, want)
