"""Dynamic shapes: symbolic sizes flow through planning, lowering and both code
generators, so one compiled graph (and one kernel per group) serves every size.

Each test checks three things against eager on fresh inputs: the results (and
gradients), that every group of the dynamic graph fused, and how many graphs
Kitsune was asked to compile (Dynamo compiles a static graph first, then one
dynamic graph for every later size; Kitsune must not add guards that force
more)."""
from __future__ import annotations

import json

import pytest
import torch
import torch.nn.functional as F

import kitsune


class Block(torch.nn.Module):
    """LayerNorm → Linear → GELU → residual → a softmax over the features."""

    def __init__(self, dim=16):
        super().__init__()
        self.norm = torch.nn.LayerNorm(dim)
        self.fc = torch.nn.Linear(dim, dim)

    def forward(self, x):
        h = x + F.gelu(self.fc(self.norm(x)))
        return torch.softmax(h * 0.5, dim=-1) + h


class Scores(torch.nn.Module):
    """Attention-like scores: a softmax over the sequence (a row of symbolic length),
    with a bias broadcast over the batch."""

    def forward(self, q, k, bias):
        s = q @ k.transpose(-1, -2)
        return torch.softmax(s * 0.25 + bias, dim=-1)


@pytest.fixture(params=["cpu", "triton"])
def backend(request, monkeypatch):
    monkeypatch.setenv("KITSUNE_BACKEND", request.param)
    kitsune.reset_fusion_stats()
    yield request.param


def _compile(model, **kwargs):
    """torch.compile with backend="kitsune"; the records of the graphs it compiles."""
    from kitsune.report.stats import GLOBAL_STATS

    kitsune.reset_fusion_stats()
    return torch.compile(model, backend="kitsune", **kwargs), GLOBAL_STATS


def _assert_all_fused(record):
    assert record.groups, f"{record.name}: nothing fused; decisions: {record.decisions}"
    assert not record.fallbacks, record.fallbacks
    refused = [d for d in record.decisions if not d.fused and "symbolic" in d.reason]
    assert not refused, refused


def test_twelve_batch_sizes_compile_twice_and_fuse(backend):
    torch.manual_seed(0)
    model = Block()
    compiled, sink = _compile(model)
    sizes = [8, 5, 17, 3, 12, 9, 31, 2, 6, 23, 11, 40][: 12 if backend == "cpu" else 5]
    with torch.no_grad():
        for b in sizes:
            x = torch.randn(b, 7, 16)
            torch.testing.assert_close(compiled(x), model(x))
    assert len(sink.graphs) <= 2, [r.name for r in sink.graphs]
    _assert_all_fused(sink.graphs[-1])
    assert kitsune.get_fusion_stats()["runtime_fallbacks"] == []


def test_mark_dynamic_sequence_forward_and_backward(backend):
    torch.manual_seed(1)
    model = Block()
    compiled, sink = _compile(model)
    for seq in (6, 9, 4):
        x = torch.randn(3, seq, 16)
        xc, xe = x.clone().requires_grad_(), x.clone().requires_grad_()
        torch._dynamo.mark_dynamic(xc, 1)
        out, expected = compiled(xc), model(xe)
        torch.testing.assert_close(out, expected)
        weights = torch.randn_like(expected)
        grads = torch.autograd.grad((out * weights).sum(), [xc, *model.parameters()])
        grads_e = torch.autograd.grad((expected * weights).sum(), [xe, *model.parameters()])
        for got, want in zip(grads, grads_e):
            torch.testing.assert_close(got, want)
    assert [r.name for r in sink.graphs] == ["forward", "backward"]
    for record in sink.graphs:
        _assert_all_fused(record)


def test_a_row_of_symbolic_length(backend):
    """softmax over the sequence: the row length is a kernel argument."""
    torch.manual_seed(2)
    compiled, sink = _compile(Scores(), dynamic=True)
    with torch.no_grad():
        for seq in (5, 12, 3):
            q, k = torch.randn(2, seq, 8), torch.randn(2, seq, 8)
            bias = torch.randn(seq, seq)
            bias[0, :2] = float("-inf")
            torch.testing.assert_close(compiled(q, k, bias), Scores()(q, k, bias))
    assert len(sink.graphs) == 1
    _assert_all_fused(sink.graphs[0])


def test_non_contiguous_and_empty_inputs_fall_back_or_match(backend):
    torch.manual_seed(3)
    f = lambda x, y: torch.sigmoid(x) * y + 1  # noqa: E731
    compiled, sink = _compile(f, dynamic=True)
    for shape in ((4, 6), (7, 3), (0, 5)):
        x, y = torch.randn(shape), torch.randn(shape[-1])
        torch.testing.assert_close(compiled(x, y), f(x, y))
    x = torch.randn(6, 10)[:, ::2]  # another layout than the one compiled for
    y = torch.randn(5)
    torch.testing.assert_close(compiled(x, y), f(x, y))
    special = torch.tensor([[float("nan"), float("inf"), -float("inf")]] * 2)
    torch.testing.assert_close(compiled(special, torch.ones(3)), f(special, torch.ones(3)), equal_nan=True)


def _shape_guards(backend, fn, *args):
    """Dynamo's guards on sizes and strides of the program's inputs."""
    import torch._dynamo as dynamo

    dynamo.reset()
    found = []

    def export(guards):
        for guard in guards:
            found.extend(code for code in (guard.code_list or ()) if "size()" in code or "stride()" in code)

    dynamo.optimize(backend, guard_export_fn=export, dynamic=True)(fn)(*args)
    return sorted(set(found))


def test_kitsune_adds_no_shape_guard():
    torch.manual_seed(4)
    model = Block()
    x = torch.randn(8, 5, 16)

    def program(x):
        return model(x).sum(-1)

    assert _shape_guards("kitsune", program, x) == _shape_guards("aot_eager", program, x)
    assert _shape_guards("kitsune", program, x)  # the comparison saw the size guards of both


def test_reports_work_after_a_dynamic_compile(tmp_path):
    from kitsune.fusion import FusionEngine

    engine = FusionEngine()
    compiled = engine.fuse(Block(), dynamic=True)
    with torch.no_grad():
        for b in (4, 6):
            compiled(torch.randn(b, 3, 16))
    stats = engine.get_fusion_stats()
    assert stats["num_fused"] >= 1
    json.dumps(stats)
    assert "kitsune_" in engine.explanation(verbose=True)
    path = engine.report(tmp_path / "report.html")
    assert "kitsune_" in path.read_text()
    assert kitsune.get_fusion_stats()["num_fused"] >= 1
    json.dumps(kitsune.get_fusion_stats())



def test_symbolic_sizes_as_numbers(backend):
    """x / x.numel() and a mean over a symbolic length: the size is a kernel argument."""
    def f(x):
        return (x / x.numel()).exp() * 2 + x.mean(-1, keepdim=True) * x + x.var(0)

    compiled, sink = _compile(f, dynamic=True)
    for n in (5, 9, 13):
        x = torch.randn(n, 7)
        torch.testing.assert_close(compiled(x), f(x))
    _assert_all_fused(sink.graphs[0])
