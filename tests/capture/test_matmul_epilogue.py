"""Linear + ReLU/GELU as cuBLASLt's epilogue (kitsune.capture.matmul_epilogue):
the match, the refusals and the measured choice, on the CPU with ATen's CPU
`_addmm_activation` (addmm + relu/gelu) standing in for cuBLASLt."""
from __future__ import annotations

import pytest
import torch
from torch import nn

from kitsune.capture.dynamo import aot_backend
from kitsune.capture.matmul_epilogue import fuse_addmm_activation

aten = torch.ops.aten


@pytest.fixture(autouse=True)
def _addmm_whole(monkeypatch):
    """Keep a float CPU addmm whole (the capture splits it into mm + add on the CPU),
    as it arrives on CUDA."""
    monkeypatch.setattr("kitsune.capture.dynamo._TORCH_ADDMM", None)


def _inference_graph(model, x, calls):
    captured = []

    def keep(gm, example_inputs, kind):
        captured.append(gm)

        def run(*args):
            calls.append(list(args))
            return gm(*args)
        return run
    with torch.no_grad():
        torch.compile(model, backend=aot_backend(keep))(x)
    (gm,) = captured
    return gm


@pytest.mark.parametrize("act, dtype, applied", [
    (nn.ReLU(), torch.float32, True),
    (nn.GELU(), torch.bfloat16, True),
    (nn.GELU(approximate="tanh"), torch.float16, True),
    (nn.GELU(), torch.float32, False),      # the tanh approximation is not float32-exact
    (nn.SiLU(), torch.bfloat16, None),      # no such epilogue: not even looked at
])
def test_linear_activation_epilogue(act, dtype, applied):
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(16, 32), act, nn.Linear(32, 8)).to(dtype)
    x = torch.randn(6, 16, dtype=dtype)
    calls, rewrites = [], []
    gm = _inference_graph(model, x, calls)
    count = fuse_addmm_activation(gm, rewrites, measure=lambda node, gelu: (1.0, 2.0), devices=("cpu",))
    targets = [n.target for n in gm.graph.nodes if n.op == "call_function"]
    if applied is None:
        assert count == 0 and not rewrites
        return
    assert count == int(applied) and len(rewrites) == 1 and rewrites[0].applied == applied
    assert (aten._addmm_activation.default in targets) == applied
    if applied:
        assert "cuBLASLt" in rewrites[0].choice and rewrites[0].ops[0] == "linear"
        assert not any(str(t) in ("aten.relu.default", "aten.erf.default", "aten.tanh.default") for t in targets)
    else:
        assert "tanh approximation" in rewrites[0].reason
    with torch.no_grad():
        (got,) = gm(*calls[0])
        want = model(x)
    tol = {} if dtype == torch.float32 else dict(rtol=2e-2, atol=2e-2)
    torch.testing.assert_close(got, want, **tol)


def test_slower_epilogue_is_declined_and_two_gelus_are_not_one():
    torch.manual_seed(1)
    model = nn.Sequential(nn.Linear(8, 8), nn.ReLU()).to(torch.bfloat16)
    calls, rewrites = [], []
    gm = _inference_graph(model, torch.randn(3, 8, dtype=torch.bfloat16), calls)
    assert fuse_addmm_activation(gm, rewrites, measure=lambda node, gelu: (2.0, 1.0), devices=("cpu",)) == 0
    assert not rewrites[0].applied and "measured" in rewrites[0].reason
    double = nn.Sequential(nn.Linear(8, 8), nn.GELU(), nn.GELU()).to(torch.bfloat16)
    calls, rewrites = [], []
    gm = _inference_graph(double, torch.randn(3, 8, dtype=torch.bfloat16), calls)
    assert fuse_addmm_activation(gm, rewrites, measure=lambda node, gelu: (1.0, 2.0), devices=("cpu",)) == 0


def test_cpu_graphs_are_left_alone():
    calls, rewrites = [], []
    gm = _inference_graph(nn.Sequential(nn.Linear(8, 8), nn.ReLU()), torch.randn(3, 8), calls)
    assert fuse_addmm_activation(gm, rewrites, measure=lambda node, gelu: (1.0, 2.0)) == 0
