"""CUDA graph replay of inference graphs (kitsune.runtime.cuda_graphs).

The recording itself needs a GPU; without one, a stand-in for
torch.cuda.CUDAGraph re-runs the function on the recording's own input
buffers and writes into the recorded outputs, exactly what a replay does,
so the runner's bookkeeping (which inputs are copied in, fresh outputs,
moved weights) is tested everywhere."""
import contextlib

import pytest
import torch
from torch import fx

from kitsune.runtime import cuda_graphs
from kitsune.runtime.cuda_graphs import CudaGraphRunner, cuda_graph_blocker


class _Recorder:
    runner = None  # the CudaGraphRunner being tested

    def __init__(self):
        self.replays = 0

    def replay(self):
        runner = _Recorder.runner
        self.replays += 1
        for out, new in zip(runner._outputs, runner.fn(*runner._static_inputs)):
            out.copy_(new)


@pytest.fixture
def fake_cuda(monkeypatch):
    monkeypatch.setattr(torch.cuda, "CUDAGraph", _Recorder)
    monkeypatch.setattr(torch.cuda, "graph", lambda g: contextlib.nullcontext())
    monkeypatch.setattr(torch.cuda, "synchronize", lambda device=None: None)


def _runner(fn):
    _Recorder.runner = CudaGraphRunner(fn, "test graph")
    return _Recorder.runner


def test_replay_copies_moving_inputs_reads_weights_in_place_and_returns_fresh_outputs(fake_cuda):
    weight = torch.randn(4)

    def fn(x, w):
        return (x * w + 1,)

    runner = _runner(fn)
    results = []
    for _ in range(cuda_graphs.WARMUP_CALLS + 3):
        x = torch.randn(4)
        out = runner(x, weight)
        torch.testing.assert_close(out[0], x * weight + 1)
        results.append((out[0].clone(), out[0]))
    assert runner.graph is not None and runner.graph.replays >= 3, runner.disabled
    assert runner._copied == (0,)  # x moved between calls, the weight did not
    for kept, out in results:
        assert torch.equal(kept, out), "an earlier result was overwritten by a later replay"
    with torch.no_grad():
        weight.mul_(3)  # in place: the next replay sees it
    x = torch.randn(4)
    torch.testing.assert_close(runner(x, weight)[0], x * weight + 1)
    moved = torch.randn(4)  # another weight tensor: runs normally, still right
    replays = runner.graph.replays
    torch.testing.assert_close(runner(x, moved)[0], x * moved + 1)
    assert runner.graph.replays == replays


def test_recording_failure_runs_the_graph_normally(fake_cuda, caplog):
    calls = []

    def fn(x):
        calls.append(1)
        if len(calls) == cuda_graphs.WARMUP_CALLS + 1:
            raise RuntimeError("operation not permitted when stream is capturing")
        return (x + 1,)

    runner = CudaGraphRunner(fn, "test graph")
    with caplog.at_level("INFO", logger="kitsune"):
        for _ in range(cuda_graphs.WARMUP_CALLS + 2):
            x = torch.randn(3)
            torch.testing.assert_close(runner(x)[0], x + 1)
    assert runner.disabled and "recording failed" in runner.disabled
    assert "without CUDA graphs" in caplog.text


def test_blockers():
    gm = fx.symbolic_trace(lambda x: x + 1)
    assert "CUDA" in cuda_graph_blocker(gm, [torch.randn(2)])
    g = fx.Graph()
    x = g.placeholder("x")
    g.output(g.call_function(torch.ops.aten.bernoulli.p, (x, 0.5)))
    meta = torch.empty(2, device="meta")
    assert cuda_graph_blocker(fx.GraphModule(torch.nn.Module(), g), [meta]) is not None


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
def test_compiled_model_replays_on_gpu():
    import kitsune

    lin = torch.nn.Linear(64, 64).cuda()

    def f(x):
        return torch.softmax(lin(x) * 2, -1)

    compiled = torch.compile(f, backend="kitsune")
    with torch.no_grad():
        outs = []
        for _ in range(5):
            x = torch.randn(8, 64, device="cuda")
            out = compiled(x)
            torch.testing.assert_close(out, f(x))
            outs.append((out.clone(), out))
        for kept, out in outs:
            assert torch.equal(kept, out)
    assert any(r.cuda_graph for r in kitsune.report.stats.GLOBAL_STATS.records())


def test_replay_only_where_launch_time_outweighs_copying_outputs():
    from kitsune.runtime.cuda_graphs import replay_cost_blocker

    def traced(fn, *shapes):
        gm = fx.symbolic_trace(fn)
        from torch.fx.passes.shape_prop import ShapeProp
        ShapeProp(gm).propagate(*[torch.empty(s) for s in shapes])
        for node in gm.graph.nodes:  # ShapeProp fills tensor_meta; the blocker reads "val"
            if "tensor_meta" in node.meta:
                tm = node.meta["tensor_meta"]
                node.meta["val"] = torch.empty(tm.shape, dtype=tm.dtype, device="meta")
        return gm

    one_big = traced(lambda x: torch.softmax(x, -1), (4096, 4096))
    assert "cost more" in replay_cost_blocker(one_big, one_big)

    def many_small(x):
        for _ in range(40):
            x = torch.tanh(x) * 2
        return x
    chain = traced(many_small, (64, 64))
    assert replay_cost_blocker(chain, chain) is None
