"""kitsune.ops.linear_cross_entropy: the chunked LM-head loss against eager
`F.cross_entropy(F.linear(...))` — the loss and every gradient, with ignored
rows, label smoothing, both reductions, rows that do not fill the last chunk,
no rows, every row ignored; the custom op's registrations (opcheck), autocast,
and the aten graphs AOTAutograd makes of it (one op node forward, muls backward)."""
from __future__ import annotations

import importlib

import pytest
import torch
import torch.nn.functional as F

from kitsune.ops import linear_cross_entropy
from kitsune.ops.linear_cross_entropy import MAX_CHUNK_ROWS, chunk_rows, linear_cross_entropy_op

lce = importlib.import_module("kitsune.ops.linear_cross_entropy")  # the module; kitsune.ops.<name> is the function

N, H, V = 37, 16, 64  # 37 rows: chunks of 16 (Liger's rule), the last one partial


@pytest.fixture(autouse=True)
def _small_chunks(monkeypatch):
    """Chunks by Liger's rule alone, so that these small shapes take several chunks."""
    monkeypatch.setattr(lce, "MIN_CHUNK_LOGITS", 0)


def _inputs(dtype, bias=True, rows=N, ignored=True, seed=0):
    g = torch.Generator().manual_seed(seed)
    hidden = torch.randn(rows, H, generator=g).to(dtype).requires_grad_()
    weight = (torch.randn(V, H, generator=g) / H ** 0.5).to(dtype).requires_grad_()
    b = torch.randn(V, generator=g).to(dtype).requires_grad_() if bias else None
    target = torch.randint(0, V, (rows,), generator=g)
    if ignored:
        target[::5] = -100
    return hidden, weight, b, target


def _loss_and_grads(fn, hidden, weight, bias, target, **kwargs):
    loss = fn(hidden, weight, bias, target, **kwargs)
    wrt = [hidden, weight] + ([bias] if bias is not None else [])
    return loss, torch.autograd.grad(loss, wrt)


def _eager(hidden, weight, bias, target, **kwargs):
    return F.cross_entropy(F.linear(hidden, weight, bias), target, **kwargs)


def _check(hidden, weight, bias, target, **kwargs):
    loss, grads = _loss_and_grads(linear_cross_entropy, hidden, weight, bias, target, **kwargs)
    ref_loss, ref_grads = _loss_and_grads(_eager, hidden, weight, bias, target, **kwargs)
    assert loss.dtype == ref_loss.dtype
    tol = {} if hidden.dtype != torch.bfloat16 else dict(rtol=1.6e-2, atol=2e-2)
    torch.testing.assert_close(loss, ref_loss, equal_nan=True, **tol)
    for got, want in zip(grads, ref_grads):
        assert got.dtype == want.dtype and got.shape == want.shape
        scale = {} if not tol else dict(rtol=1.6e-2, atol=2e-2 * max(want.abs().max().item(), 1e-3))
        torch.testing.assert_close(got, want, equal_nan=True, **scale)


def test_chunk_rows(monkeypatch):
    rows = chunk_rows(N, V, H)
    assert rows == 16 and N % rows != 0  # the shapes below take partial chunks
    assert chunk_rows(0, V, H) == 1 and chunk_rows(1, 10 ** 6, 8) == 1
    monkeypatch.setattr(lce, "MIN_CHUNK_LOGITS", 1 << 19)  # the default floor: chunks of >= 2 MB of logits
    assert chunk_rows(512, 8192, 64) == 64 and chunk_rows(8192, 50257, 768) == 128
    assert chunk_rows(1, 10 ** 6, 8) == 1 and chunk_rows(10 ** 7, 8, 4096) == MAX_CHUNK_ROWS
    assert all(chunk_rows(n, 50257, 768) & (chunk_rows(n, 50257, 768) - 1) == 0 for n in (1, 100, 8192))


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("reduction", ["mean", "sum"])
@pytest.mark.parametrize("label_smoothing", [0.0, 0.1])
@pytest.mark.parametrize("bias", [True, False])
def test_matches_eager(dtype, reduction, label_smoothing, bias):
    _check(*_inputs(dtype, bias), reduction=reduction, label_smoothing=label_smoothing)


def test_matches_eager_float64_many_small_chunks(monkeypatch):
    monkeypatch.setattr(lce, "MAX_CHUNK_ROWS", 3)  # 13 chunks, the last of one row
    hidden, weight, bias, target = _inputs(torch.float64)
    target = torch.where(target < 0, 7, target)  # ignore class 7 instead of -100
    _check(hidden, weight, bias, target, label_smoothing=0.25, ignore_index=7)
    _check(hidden, weight, bias, target, ignore_index=7, reduction="sum")


def test_non_contiguous_hidden_and_weight():
    hidden, weight, bias, target = _inputs(torch.float32)
    hidden_t = hidden.detach().t().contiguous().t().requires_grad_()  # column-major rows
    weight_t = weight.detach().t().contiguous().t().requires_grad_()
    assert not hidden_t.is_contiguous() and not weight_t.is_contiguous()
    _check(hidden_t, weight_t, bias, target, label_smoothing=0.1)


@pytest.mark.parametrize("reduction", ["mean", "sum"])
@pytest.mark.parametrize("label_smoothing", [0.0, 0.2])
def test_no_rows_and_every_row_ignored(reduction, label_smoothing):
    _check(*_inputs(torch.float32, rows=0), reduction=reduction, label_smoothing=label_smoothing)
    hidden, weight, bias, target = _inputs(torch.float32)
    _check(hidden, weight, bias, torch.full_like(target, -100), reduction=reduction,
           label_smoothing=label_smoothing)
    loss = linear_cross_entropy(hidden, weight, bias, torch.full_like(target, -100), reduction=reduction)
    assert loss.isnan().item() == (reduction == "mean")  # eager's 0/0


def test_no_grad_computes_the_loss_only():
    hidden, weight, bias, target = _inputs(torch.float32)
    with torch.no_grad():
        loss = linear_cross_entropy(hidden, weight, bias, target, label_smoothing=0.1)
        _, grad_hidden, grad_weight, _ = linear_cross_entropy_op(hidden, weight, bias, target, -100, 0.1,
                                                                 "mean", False)
    assert loss.grad_fn is None and grad_hidden.numel() == 0 and grad_weight.numel() == 0
    torch.testing.assert_close(loss, _eager(hidden, weight, bias, target, label_smoothing=0.1))


def test_autocast_casts_like_linear():
    hidden, weight, bias, target = _inputs(torch.float32)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        loss, grads = _loss_and_grads(linear_cross_entropy, hidden, weight, bias, target)
        ref_loss, ref_grads = _loss_and_grads(_eager, hidden, weight, bias, target)
    assert loss.dtype == ref_loss.dtype == torch.float32
    torch.testing.assert_close(loss, ref_loss, rtol=1.6e-2, atol=1e-2)
    for got, want in zip(grads, ref_grads):
        assert got.dtype == want.dtype == torch.float32
        torch.testing.assert_close(got, want, rtol=1.6e-2, atol=2e-2 * want.abs().max().item())


def test_opcheck():
    hidden, weight, bias, target = _inputs(torch.float32)
    torch.library.opcheck(linear_cross_entropy_op, (hidden, weight, bias, target, -100, 0.1, "mean", True))
    hidden, weight = hidden.detach(), weight.detach()
    torch.library.opcheck(linear_cross_entropy_op, (hidden, weight, None, target, -100, 0.0, "sum", False))


def test_one_op_node_forward_and_muls_backward():
    from functorch.compile import aot_function, make_boxed_compiler
    graphs = {}

    def keep(name):
        def compiler(gm, example_inputs):
            graphs[name] = gm
            return gm
        return make_boxed_compiler(compiler)

    hidden, weight, bias, target = _inputs(torch.float32)
    fn = aot_function(lambda h, w, b, t: linear_cross_entropy(h, w, b, t, label_smoothing=0.1),
                      fw_compiler=keep("forward"), bw_compiler=keep("backward"))
    loss = fn(hidden, weight, bias, target)
    grads = torch.autograd.grad(loss, [hidden, weight, bias])
    ref_loss, ref_grads = _loss_and_grads(_eager, hidden, weight, bias, target, label_smoothing=0.1)
    torch.testing.assert_close(loss, ref_loss)
    for got, want in zip(grads, ref_grads):
        torch.testing.assert_close(got, want)
    forward = [n.target for n in graphs["forward"].graph.nodes if n.op == "call_function"]
    assert forward.count(torch.ops.kitsune.linear_cross_entropy.default) == 1
    assert not any(getattr(t, "__name__", "").startswith(("mm", "addmm", "_log_softmax")) for t in forward)
    backward = {n.target for n in graphs["backward"].graph.nodes if n.op == "call_function"}
    assert backward == {torch.ops.aten.mul.Tensor}


@pytest.mark.parametrize("change, error", [
    (dict(hidden=torch.zeros(2, 3, H)), ValueError),
    (dict(weight=torch.zeros(V, H + 1)), ValueError),
    (dict(bias=torch.zeros(V + 1)), ValueError),
    (dict(target=torch.zeros(N, dtype=torch.float32)), TypeError),
    (dict(target=torch.zeros(N + 1, dtype=torch.long)), ValueError),
    (dict(reduction="none"), ValueError),
    (dict(label_smoothing=1.5), ValueError),
    (dict(ignore_index=1.0), TypeError),
])
def test_bad_arguments_name_the_argument(change, error):
    hidden, weight, bias, target = (t.detach() if t is not None else None for t in _inputs(torch.float32))
    kwargs = dict(hidden=hidden, weight=weight, bias=bias, target=target)
    kwargs.update(change)
    name = next(iter(change))
    with pytest.raises(error, match=name):
        linear_cross_entropy(**kwargs)


def test_under_torch_compile_fullgraph():
    hidden, weight, _, target = _inputs(torch.float32)
    fn = lambda h, w, t: linear_cross_entropy(h, w, None, t, label_smoothing=0.1)  # noqa: E731
    loss, grads = _loss_and_grads(lambda h, w, b, t: torch.compile(fn, backend="aot_eager", fullgraph=True)(h, w, t),
                                  hidden, weight, None, target)
    ref_loss, ref_grads = _loss_and_grads(_eager, hidden, weight, None, target, label_smoothing=0.1)
    torch.testing.assert_close(loss, ref_loss)
    for got, want in zip(grads, ref_grads):
        torch.testing.assert_close(got, want)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("bias", [True, False])
def test_padded_vocabulary_matches_eager(monkeypatch, dtype, bias):
    """The GPU path (vocabulary padded to 16 bytes for aligned GEMMs) run on the CPU: 61 classes,
    padded to 64 (float32) or 64 (bfloat16); label smoothing reads the real class count."""
    monkeypatch.setattr(lce, "PAD_VOCAB_DEVICES", ("cpu",))
    hidden, weight, b, target = _inputs(dtype, bias)
    weight = weight.detach()[:61].clone().requires_grad_()
    b = b.detach()[:61].clone().requires_grad_() if bias else None
    target = torch.where(target >= 61, target - 61, target)
    _check(hidden, weight, b, target, label_smoothing=0.1)
    padded, _ = lce._padded_vocabulary(weight.detach(), None)
    assert padded.shape[0] == 64 and padded[61:].abs().sum() == 0


def test_gpu_chunks_take_at_least_the_gpu_floor(monkeypatch):
    monkeypatch.setattr(lce, "MIN_CHUNK_LOGITS", 1 << 19)
    assert chunk_rows(8192, 50257, 768) == 128 and chunk_rows(8192, 50257, 768, gpu=True) == lce.MIN_CHUNK_ROWS_GPU
    assert chunk_rows(100, 50257, 768, gpu=True) == 128  # every row in one chunk (a power of two)
