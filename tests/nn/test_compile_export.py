"""kitsune.nn layers in a model under torch.export and torch.compile (backend
"kitsune", and one tiny Inductor compile: Inductor compiles are slow on CI's two
cores): the custom ops stay whole nodes, and the results are eager's."""
import pytest
import torch
from torch import nn

import kitsune.nn as knn


class Small(nn.Module):
    def __init__(self):
        super().__init__()
        self.conv = knn.FusedConvBN(nn.Conv2d(2, 4, 3, padding=1), nn.BatchNorm2d(4), activation="relu")
        self.linear = knn.FusedLinear(4 * 3 * 3, 16, activation="gelu")
        self.norm = knn.FusedRMSNorm(16, activation="silu")
        self.attention = knn.FusedAttention(16, 4, num_kv_heads=2, causal=True)
        self.chain = knn.FusedElementwise().mul(0.5).add(1.0).dropout(0.1)
        self.head = knn.FusedLayerNorm(16)
        self.loss = knn.FusedSoftmaxCrossEntropy(label_smoothing=0.1)

    def forward(self, images, target):
        x = self.conv(images).flatten(1).unflatten(0, (2, -1))  # [2, 3, 36]
        x = self.chain(self.attention(self.norm(self.linear(x))))
        return self.loss(self.head(x).flatten(0, 1), target)


def inputs():
    return torch.randn(6, 2, 3, 3), torch.randint(0, 16, (6,))


def kitsune_ops(graph) -> set:
    return {str(n.target).split(".")[1] for n in graph.nodes
            if n.op == "call_function" and str(n.target).startswith("kitsune.")}


def test_torch_export_keeps_the_custom_ops():
    model = Small().eval()
    args = inputs()
    exported = torch.export.export(model, args)
    found = kitsune_ops(exported.graph)
    assert found >= {"rms_norm", "fused_chain", "layer_norm", "softmax_cross_entropy"}, found
    assert found & {"fused_linear", "fused_linear_preactivation"}, found  # the latter where weights need grads
    torch.testing.assert_close(exported.module()(*args), model(*args))


def test_torch_compile_with_kitsune_forward_and_backward():
    torch.manual_seed(0)
    model = Small().eval()  # eval: no dropout, so that both runs compute the same
    args = inputs()
    expected = model(*args)
    expected.backward()
    grads = [p.grad.clone() for p in model.parameters()]
    model.zero_grad()
    compiled = torch.compile(model, backend="kitsune")
    out = compiled(*args)
    out.backward()
    torch.testing.assert_close(out, expected)
    for p, g in zip(model.parameters(), grads):
        torch.testing.assert_close(p.grad, g)


@pytest.mark.slow
def test_torch_compile_with_inductor():
    """One tiny model (Inductor takes seconds per graph on two cores): the ops run as
    opaque calls inside Inductor's graph."""
    model = nn.Sequential(knn.FusedLinear(8, 8, activation="silu"), knn.FusedLayerNorm(8, activation="relu"))
    x = torch.randn(4, 8, requires_grad=True)
    expected = model(x)
    compiled = torch.compile(model, backend="inductor", fullgraph=True)
    out = compiled(x)
    torch.testing.assert_close(out, expected)
    grad = torch.autograd.grad(out.sum(), x)[0]
    torch.testing.assert_close(grad, torch.autograd.grad(expected.sum(), x)[0])
