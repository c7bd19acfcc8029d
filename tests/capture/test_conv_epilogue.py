"""Convolution + bias (+ residual) + ReLU as cuDNN's fused call
(kitsune.capture.conv_epilogue): the match, the measured choice and the
rewritten graph's meaning, checked on the CPU with the fused ops' definition
standing in for cuDNN (their speed and cuDNN's own numerics are a GPU matter:
benchmarks/probes/fold_gpu_check.py)."""
from __future__ import annotations

import torch
from torch import fx, nn

from kitsune.capture.conv_epilogue import fuse_conv_relu
from kitsune.capture.dynamo import aot_backend
from kitsune.capture.fold import fold_conv_batch_norm, decompose_batch_norm

aten = torch.ops.aten


def _reference(op):
    """What cuDNN's fused calls compute: relu(conv(x, w) + b) and relu(conv(x, w) + alpha * z + b)."""
    if op is aten.cudnn_convolution_relu.default:
        return lambda x, w, b, s, p, d, g: torch.relu(torch.conv2d(x, w, b, s, p, d, g))
    return lambda x, w, z, alpha, b, s, p, d, g: torch.relu(torch.conv2d(x, w, b, s, p, d, g) + alpha * z)


class _Block(nn.Module):
    def __init__(self):
        super().__init__()
        self.c1, self.b1 = nn.Conv2d(4, 4, 3, padding=1, bias=False), nn.BatchNorm2d(4)
        self.c2, self.b2 = nn.Conv2d(4, 4, 1, bias=False), nn.BatchNorm2d(4)
        self.c3 = nn.Conv2d(4, 4, 3, padding=1)  # its own bias, no norm

    def forward(self, x):
        y = torch.relu(self.b1(self.c1(x)))
        y = torch.relu(self.b2(self.c2(y)) + x)     # the residual block's last convolution
        return torch.relu(self.c3(y))


def _inference_graph(model, x, calls=None) -> fx.GraphModule:
    """The aten inference graph of `model`; `calls` receives the real arguments it was called with."""
    captured = []

    def keep(gm, example_inputs, kind):
        captured.append((gm, kind))

        def run(*args):
            if calls is not None:
                calls.append(list(args))
            return gm(*args)
        return run
    with torch.no_grad():
        torch.compile(model, backend=aot_backend(keep))(x)
    (gm, kind), = captured
    assert kind == "inference"
    return gm


def test_matches_measures_and_keeps_the_meaning():
    torch.manual_seed(0)
    model = _Block().eval()
    for bn in (model.b1, model.b2):
        bn.running_mean.normal_()
        bn.running_var.uniform_(0.5, 2.0)
    x = torch.randn(2, 4, 8, 8)
    calls = []
    gm = _inference_graph(model, x, calls)
    rewrites, _ = fold_conv_batch_norm(gm)
    measured = []
    count = fuse_conv_relu(gm, rewrites, measure=lambda conv, z: measured.append(z is not None) or (1.0, 2.0),
                           devices=("cpu",))
    decompose_batch_norm(gm)
    assert count == 3 and sorted(measured) == [False, False, True]
    targets = [n.target for n in gm.graph.nodes if n.op == "call_function"]
    assert targets.count(aten.cudnn_convolution_relu.default) == 2
    assert targets.count(aten.cudnn_convolution_add_relu.default) == 1
    assert aten.relu.default not in targets
    assert all("cuDNN fused" in rw.choice for rw in rewrites if rw.applied)
    assert sum("folded" in rw.choice for rw in rewrites) == 2
    for node in gm.graph.nodes:
        if node.op == "call_function" and "cudnn" in str(node.target):
            node.target = _reference(node.target)
    gm.recompile()
    with torch.no_grad():
        (got,) = gm(*calls[0])
        torch.testing.assert_close(got, model(x), rtol=1e-5, atol=1e-5)


def test_slower_fused_call_is_declined():
    torch.manual_seed(1)
    model = _Block().eval()
    gm = _inference_graph(model, torch.randn(1, 4, 6, 6))
    rewrites, _ = fold_conv_batch_norm(gm)
    assert fuse_conv_relu(gm, rewrites, measure=lambda conv, z: (2.0, 1.0), devices=("cpu",)) == 0
    assert not any("cudnn" in str(n.target) for n in gm.graph.nodes)
    declined = [rw for rw in rewrites if not rw.applied]
    assert len(declined) == 1 and "measured" in declined[0].reason  # the unfolded c3 → relu


def test_cpu_graphs_are_left_alone():
    model = _Block().eval()
    gm = _inference_graph(model, torch.randn(1, 4, 6, 6))
    rewrites, _ = fold_conv_batch_norm(gm)
    assert fuse_conv_relu(gm, rewrites, measure=lambda conv, z: (1.0, 2.0)) == 0


def test_grouped_convolutions_keep_the_plain_call():
    # A depthwise convolution's fused cuDNN call ran in a slow direct kernel (MobileNetV3 on
    # an H100): declined before measuring, with the reason recorded.
    torch.manual_seed(2)
    model = nn.Sequential(nn.Conv2d(4, 4, 3, padding=1, groups=4, bias=False), nn.BatchNorm2d(4), nn.ReLU(),
                          nn.Conv2d(4, 8, 1, bias=False), nn.BatchNorm2d(8), nn.ReLU()).eval()
    gm = _inference_graph(model, torch.randn(1, 4, 6, 6))
    rewrites, _ = fold_conv_batch_norm(gm)
    measured = []
    count = fuse_conv_relu(gm, rewrites, measure=lambda conv, z: measured.append(conv.args[8]) or (1.0, 2.0),
                           devices=("cpu",))
    assert count == 1 and measured == [1]  # only the 1x1 convolution was measured and fused
    targets = [n.target for n in gm.graph.nodes if n.op == "call_function"]
    assert targets.count(aten.cudnn_convolution_relu.default) == 1
    choices = sorted(rw.choice for rw in rewrites)  # the depthwise one: folded, bias and ReLU after it
    assert len(choices) == 2 and "cuDNN" not in choices[0] and "cuDNN" in choices[1], choices

