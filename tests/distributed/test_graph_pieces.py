"""The graph shapes DDPOptimizer hands a backend, in one process: a piece whose
inputs are all parameters (given as fake tensors, as DDPOptimizer compiles with
them), a piece that returns one of its inputs unchanged, and a piece that
returns nothing. Kitsune compiles each and runs it like the graph itself."""
import torch
from torch import fx
from torch._subclasses.fake_tensor import FakeTensorMode

import kitsune
from kitsune.backend import kitsune_backend


class ParameterPiece(torch.nn.Module):
    def forward(self, weight, bias):
        return weight, torch.tanh(torch.relu(weight * 2 + bias))


def test_piece_of_parameters_with_fake_example_inputs():
    kitsune.reset_fusion_stats()
    torch.manual_seed(0)
    weight, bias = torch.nn.Parameter(torch.randn(64, 64)), torch.nn.Parameter(torch.randn(64))
    with FakeTensorMode() as mode:
        fake = [mode.from_tensor(weight), mode.from_tensor(bias)]
    compiled = kitsune_backend(fx.symbolic_trace(ParameterPiece()), fake)

    passed, out = compiled(weight, bias)
    assert passed is weight
    grads = torch.autograd.grad(out.square().sum(), [weight, bias])
    expected = ParameterPiece()(weight, bias)[1]
    torch.testing.assert_close(out, expected)
    torch.testing.assert_close(grads, torch.autograd.grad(expected.square().sum(), [weight, bias]))
    stats = kitsune.get_fusion_stats()
    assert stats["num_fused"] >= 2 and stats["fallbacks"] == [], stats  # forward and backward


def test_piece_that_returns_nothing():
    kitsune.reset_fusion_stats()
    graph = fx.Graph()
    graph.placeholder("x")
    graph.output(())
    compiled = kitsune_backend(fx.GraphModule(torch.nn.Module(), graph), [torch.randn(3, requires_grad=True)])
    assert list(compiled(torch.randn(3, requires_grad=True))) == []
    stats = kitsune.get_fusion_stats()
    assert stats["graphs"] == 1 and stats["fallbacks"] == [], stats  # Kitsune compiled it
