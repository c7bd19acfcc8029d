"""Inference batch norm (kitsune.capture.fold): folded into the convolution
before it in inference graphs, decomposed into a pointwise chain that fuses
with its neighbours everywhere else; folded weights follow in-place updates."""
from __future__ import annotations

import pytest
import torch
from torch import nn

from kitsune.capture.fold import ConvBnFold
from kitsune.config import FusionConfig
from kitsune.record import default_sink
from kitsune.report.analysis import finalize

BATCH_NORM = "_native_batch_norm_legit_no_training"


def _randomise(model: nn.Module) -> nn.Module:
    """Running statistics and affine parameters away from their identity defaults."""
    for m in model.modules():
        if isinstance(m, nn.modules.batchnorm._BatchNorm):
            m.running_mean.normal_()
            m.running_var.uniform_(0.5, 2.0)
            if m.affine:
                m.weight.data.uniform_(0.5, 1.5)
                m.bias.data.normal_()
    return model


def _block() -> nn.Module:
    torch.manual_seed(0)
    return _randomise(nn.Sequential(nn.Conv2d(3, 8, 3, padding=1), nn.BatchNorm2d(8), nn.ReLU(),
                                    nn.Conv2d(8, 6, 1, bias=False), nn.BatchNorm2d(6, affine=False))).eval()


def _compiled(model, config=None):
    torch._dynamo.reset()
    default_sink().reset()
    from kitsune.backend import make_backend
    return torch.compile(model, backend=make_backend(config))


def _records():
    return default_sink().records()


def _has(names, op: str) -> bool:
    return any(name == op or name.startswith(op + "_") for name in names)


def _targets(record) -> list[str]:
    return [str(n.target) for n in record.graph.nodes if n.op == "call_function"]


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("channels_last", [False, True])
def test_folded_block_matches_eager(monkeypatch, dtype, channels_last):
    monkeypatch.setenv("KITSUNE_BACKEND", "cpu")
    fmt = torch.channels_last if channels_last else torch.contiguous_format
    block = _block().to(dtype=dtype, memory_format=fmt)
    x = torch.randn(2, 3, 9, 7, dtype=dtype).to(memory_format=fmt)
    x[0, 0, 0, :3] = torch.tensor([float("nan"), float("inf"), -float("inf")])
    with torch.no_grad():
        got, want = _compiled(block)(x), block(x)
    tol = dict(atol=3e-2, rtol=3e-2) if dtype == torch.bfloat16 else {}
    torch.testing.assert_close(got, want, equal_nan=True, **tol)
    assert got.stride() == want.stride()
    (record,) = _records()
    finalize(record)
    assert not any(BATCH_NORM in t for t in _targets(record))
    folded = [o for o in record.opportunities if o.pattern == "conv_bn_activation" and o.status == "applied"]
    assert len(folded) == 2 and all("folded" in o.choice for o in folded)
    # conv, its bias + ReLU, conv (+ its bias where that is added in float32 after a bf16 conv)
    assert record.kernels_after == (3 if dtype == torch.float32 else 4) < record.kernels_before == 5


def test_bf16_folding_error_is_no_worse_than_eager():
    """Folding rounds one bf16 weight instead of a bf16 activation: against a float64
    model the folded bf16 model's error is at most 1.5x eager bf16's."""
    torch.manual_seed(1)
    layers = []
    for cin, cout in ((3, 16), (16, 16), (16, 16), (16, 8)):
        layers += [nn.Conv2d(cin, cout, 3, padding=1), nn.BatchNorm2d(cout), nn.ReLU()]
    model = _randomise(nn.Sequential(*layers)).eval()
    x = torch.randn(4, 3, 12, 12)
    with torch.no_grad():
        reference = model.double()(x.double())
        low = model.to(torch.bfloat16)
        eager = low(x.bfloat16()).double()
        folded = _compiled(low)(x.bfloat16()).double()
    def error(y):
        return ((y - reference).norm() / reference.norm()).item()
    assert sum(r.applied for r in _records()[0].rewrites) == 4
    assert error(folded) <= 1.5 * error(eager), (error(folded), error(eager))


def test_in_place_updates_are_seen():
    block = _block()
    compiled = _compiled(block)
    x = torch.randn(2, 3, 6, 6)
    with torch.no_grad():
        torch.testing.assert_close(compiled(x), block(x))
        block[1].running_var.mul_(3.0)                 # a running statistic
        torch.testing.assert_close(compiled(x), block(x))
        block[0].weight.mul_(-0.5)                     # the convolution's weight
        torch.testing.assert_close(compiled(x), block(x))
        block[4].running_mean.add_(1.0)                # the norm without affine parameters
        torch.testing.assert_close(compiled(x), block(x))
        block.load_state_dict(_block().state_dict())   # everything at once, in place
        block[1].bias.fill_(2.0)
        torch.testing.assert_close(compiled(x), block(x))


def test_fold_recomputes_only_on_change_and_in_place():
    torch.manual_seed(2)
    weight, bias = torch.randn(4, 2, 3, 3), torch.randn(4)
    gamma, beta, mean, var = torch.rand(4) + 0.5, torch.randn(4), torch.randn(4), torch.rand(4) + 0.5
    fold = ConvBnFold(1e-5, torch.float32)
    tensors = (weight, bias, gamma, beta, mean, var)
    w1, b1 = fold.folded(*tensors)
    scale = gamma / torch.sqrt(var + 1e-5)
    torch.testing.assert_close(w1, weight * scale.view(-1, 1, 1, 1))
    torch.testing.assert_close(b1, (bias - mean) * scale + beta)
    fold.folded(*tensors)
    assert fold.refolds == 1
    var.add_(1.0)
    w2, _ = fold.folded(*tensors)
    assert fold.refolds == 2 and w2.data_ptr() == w1.data_ptr()  # recomputed where it was
    torch.testing.assert_close(w2, weight * (gamma / torch.sqrt(var + 1e-5)).view(-1, 1, 1, 1))
    fold.folded(weight.clone(), *tensors[1:])  # another tensor with the same version: recomputed
    assert fold.refolds == 3


@pytest.mark.parametrize("shape", [(8, 1, 3, 3), (8, 4, 3, 3), (6, 3, 1, 1)])
@pytest.mark.parametrize("channels_last", [False, True])
def test_folded_weight_keeps_the_source_weights_strides(shape, channels_last):
    # The graph's fake value of the folded weight has the source weight's strides, and so
    # must the real one: a depthwise [C, 1, k, k] channels-last weight multiplied by a
    # per-channel scale came out contiguous, and cuDNN ran a 6x slower depthwise kernel.
    weight = torch.randn(shape)
    if channels_last:
        weight = weight.to(memory_format=torch.channels_last)
    mean, var = torch.randn(shape[0]), torch.rand(shape[0]) + 0.5
    folded, _ = ConvBnFold(1e-5, torch.float32).folded(weight, None, None, None, mean, var)
    assert folded.stride() == weight.stride()
    torch.testing.assert_close(folded, weight * torch.rsqrt(var + 1e-5).view(-1, 1, 1, 1))


@pytest.mark.parametrize("conv", [
    lambda: nn.Conv1d(4, 6, 3, stride=2),
    lambda: nn.Conv2d(4, 8, 3, groups=4, dilation=2, padding=2),   # depthwise-style, dilated
    lambda: nn.Conv3d(4, 4, 1),
])
def test_conv_kinds_fold(conv):
    torch.manual_seed(3)
    c = conv()
    dims = c.weight.dim() - 2
    bn = {1: nn.BatchNorm1d, 2: nn.BatchNorm2d, 3: nn.BatchNorm3d}[dims](c.out_channels)
    model = _randomise(nn.Sequential(c, bn, nn.Hardswish())).eval()
    x = torch.randn((2, 4) + (7,) * dims)
    with torch.no_grad():
        torch.testing.assert_close(_compiled(model)(x), model(x))
    assert sum(r.applied for r in _records()[0].rewrites) == 1


class _TwoReaders(nn.Module):
    def __init__(self):
        super().__init__()
        self.conv, self.bn = nn.Conv2d(3, 4, 3), nn.BatchNorm2d(4)

    def forward(self, x):
        y = self.conv(x)
        return torch.relu(self.bn(y)) + y


def test_fold_declined_when_the_convolution_has_other_readers():
    model = _randomise(_TwoReaders()).eval()
    x = torch.randn(2, 3, 8, 8)
    with torch.no_grad():
        torch.testing.assert_close(_compiled(model)(x), model(x))
    (record,) = _records()
    (rewrite,) = record.rewrites
    assert not rewrite.applied and "more than the batch norm" in rewrite.reason
    assert not any(BATCH_NORM in t for t in _targets(record))  # decomposed instead
    assert any(_has(names, "rsqrt") and _has(names, "relu") for _, names, _ in record.groups)


def test_with_gradients_the_norm_is_decomposed_and_fused():
    """Eval mode with autograd on (fine-tuning a frozen-BN model): nothing folds
    (the fold has no gradient); the norm fuses with its ReLU and grads match."""
    block, reference = _block(), _block()
    x = torch.randn(2, 3, 9, 7)
    out, want = _compiled(block)(x), reference(x)
    torch.testing.assert_close(out, want)
    out.square().sum().backward()
    want.square().sum().backward()
    torch.testing.assert_close(block[0].weight.grad, reference[0].weight.grad, rtol=1e-4, atol=1e-4)
    torch.testing.assert_close(block[1].weight.grad, reference[1].weight.grad, rtol=1e-4, atol=1e-4)
    forward = next(r for r in _records() if r.name == "forward")
    assert not forward.rewrites
    assert any(_has(names, "rsqrt") and _has(names, "relu") for _, names, _ in forward.groups)


def test_folding_can_be_switched_off():
    config = FusionConfig(enabled_patterns=frozenset({"norm_activation", "binary_activation"}))
    block = _block()
    x = torch.randn(2, 3, 5, 5)
    with torch.no_grad():
        torch.testing.assert_close(_compiled(block, config)(x), block(x))
    (record,) = _records()
    assert not record.rewrites and not any(BATCH_NORM in t for t in _targets(record))


def test_training_batch_norm_is_unchanged(monkeypatch):
    monkeypatch.setenv("KITSUNE_BACKEND", "cpu")
    block, reference = _block().train(), _block().train()
    x = torch.randn(2, 3, 9, 7)
    out = _compiled(block)(x)
    want = reference(x)
    torch.testing.assert_close(out, want, rtol=1e-4, atol=1e-4)
    out.square().sum().backward()
    want.square().sum().backward()
    torch.testing.assert_close(block[0].weight.grad, reference[0].weight.grad, rtol=1e-4, atol=1e-4)
    torch.testing.assert_close(block[1].running_mean, reference[1].running_mean)


def test_explain_says_what_was_folded():
    from kitsune.report.explain import explain_records
    block = _block()
    with torch.no_grad():
        _compiled(block)(torch.randn(1, 3, 5, 5))
    text = explain_records(_records())
    assert "Applied as" in text
    assert "conv_bn_activation: conv → batch_norm → folded into the convolution's weights (bias added in the kernel" \
        in text  # the first: its ReLU adds the bias
    assert "conv_bn_activation: conv → batch_norm → folded into the convolution's weights and bias" in text


@pytest.mark.parametrize("name", ["resnet18", "mobilenet_v3_small"])
def test_torchvision_convnets_in_eval(name):
    from kitsune._compat import import_torchvision
    try:
        tv = import_torchvision()
    except ImportError as error:
        pytest.skip(str(error))
    torch.manual_seed(4)
    model = _randomise(getattr(tv.models, name)(num_classes=10)).eval()
    x = torch.randn(1, 3, 32, 32)
    with torch.no_grad():
        got, want = _compiled(model)(x), model(x)
    torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-4)
    records = _records()
    assert records and not any(BATCH_NORM in t for r in records for t in _targets(r))
    folds = sum(rw.applied for r in records for rw in r.rewrites)
    expected = sum(isinstance(m, nn.BatchNorm2d) for m in model.modules())
    assert folds == expected  # every norm follows a convolution that only it reads
