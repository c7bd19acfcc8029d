"""Batch norm with frozen statistics (eval mode) decomposes into its pointwise
chain (`capture.dynamo._batch_norm_inference`) and fuses with what follows a
convolution: the normalisation and the ReLU are one generated kernel."""
from __future__ import annotations

import pytest
import torch
from torch import nn

from kitsune.record import default_sink


def _block() -> nn.Module:
    torch.manual_seed(0)
    block = nn.Sequential(nn.Conv2d(3, 8, 3, padding=1), nn.BatchNorm2d(8), nn.ReLU(),
                          nn.Conv2d(8, 6, 1), nn.BatchNorm2d(6, affine=False))
    for bn in (block[1], block[4]):
        bn.running_mean.normal_()
        bn.running_var.uniform_(0.5, 2.0)
    block[1].weight.data.normal_()
    block[1].bias.data.normal_()
    return block.eval()


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("channels_last", [False, True])
def test_eval_batch_norm_fuses_with_its_relu(monkeypatch, dtype, channels_last):
    monkeypatch.setenv("KITSUNE_BACKEND", "cpu")
    torch._dynamo.reset()
    default_sink().reset()
    fmt = torch.channels_last if channels_last else torch.contiguous_format
    block = _block().to(dtype=dtype, memory_format=fmt)
    x = torch.randn(2, 3, 9, 7, dtype=dtype).to(memory_format=fmt)
    x[0, 0, 0, :3] = torch.tensor([float("nan"), float("inf"), -float("inf")])
    with torch.no_grad():
        got, want = torch.compile(block, backend="kitsune")(x), block(x)
    tol = dict(atol=2e-2, rtol=2e-2) if dtype == torch.bfloat16 else {}
    torch.testing.assert_close(got, want, equal_nan=True, **tol)
    groups = [names for record in default_sink().records() for _, names, _ in record.groups]
    assert any("relu" in names and "rsqrt" in names for names in groups), groups
    assert len(groups) == 2  # one kernel after each convolution


def test_training_batch_norm_is_unchanged(monkeypatch):
    monkeypatch.setenv("KITSUNE_BACKEND", "cpu")
    torch._dynamo.reset()
    block, reference = _block().train(), _block().train()
    x = torch.randn(2, 3, 9, 7)
    out = torch.compile(block, backend="kitsune")(x)
    want = reference(x)
    torch.testing.assert_close(out, want, rtol=1e-4, atol=1e-4)
    out.square().sum().backward()
    want.square().sum().backward()
    torch.testing.assert_close(block[0].weight.grad, reference[0].weight.grad, rtol=1e-4, atol=1e-4)
    torch.testing.assert_close(block[1].running_mean, reference[1].running_mean)
