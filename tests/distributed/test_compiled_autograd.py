"""Compiled Autograd (`torch._dynamo.config.compiled_autograd`, what DDP's
"python_reducer" mode runs on): the backward that the autograd engine traces is
a graph with symbolic sizes as inputs, which Kitsune compiles like any other."""
import torch

import kitsune
from dist_workers import Block

DIM, HIDDEN = 32, 64


def _train_step(model, x):
    model.zero_grad()
    loss = model(x).square().mean()
    loss.backward()
    return loss


def test_compiled_autograd_backward_matches_eager():
    kitsune.reset_fusion_stats()
    torch.manual_seed(0)
    model = Block(DIM, HIDDEN)
    x = torch.randn(2, 8, DIM)
    with torch._dynamo.config.patch(compiled_autograd=True):
        loss = torch.compile(_train_step, backend="kitsune")(model, x)
    grads = {name: p.grad.clone() for name, p in model.named_parameters()}
    expected = _train_step(model, x)
    torch.testing.assert_close(loss, expected)
    torch.testing.assert_close(grads, {name: p.grad for name, p in model.named_parameters()})
    stats = kitsune.get_fusion_stats()
    assert stats["graphs"] >= 2 and stats["num_fused"] > 0, stats  # the forward and the traced backward


def test_dynamic_compiled_autograd_backward_fuses_every_group():
    kitsune.reset_fusion_stats()
    torch.manual_seed(0)
    model = Block(DIM, HIDDEN)
    x = torch.randn(2, 8, DIM)
    loss = torch.compile(model, backend="kitsune")(x).square().mean()  # the mean's backward: numel as a SymInt
    with torch._dynamo.config.patch(compiled_autograd=True):
        torch.compile(lambda loss: loss.backward(), backend="kitsune", dynamic=True)(loss)
    stats = kitsune.get_fusion_stats()
    assert stats["graphs"] == 2 and stats["fallbacks"] == [], stats
