"""CUDA graph replay of compiled graphs (kitsune.runtime.cuda_graphs).

The recording itself needs a GPU; without one, a stand-in for
torch.cuda.CUDAGraph re-runs the function on the recording's own input
buffers (and, for inputs read in place, on the caller's tensors at the same
address) and writes into the recorded outputs, exactly what a replay does,
so the runner's bookkeeping (which inputs are copied in, fresh or in-place
outputs, moved weights, outputs still alive) is tested everywhere."""
import contextlib

import pytest
import torch
from torch import fx

from kitsune.runtime import cuda_graphs
from kitsune.runtime.cuda_graphs import CudaGraphRunner, cuda_graph_blocker

_current_args = {}  # runner -> the arguments of the call in progress


class _Recorder:
    runner = None  # the CudaGraphRunner being recorded

    def __init__(self):
        self.replays = 0
        self.runner = _Recorder.runner

    def replay(self):
        runner = self.runner
        self.replays += 1
        args = _current_args[runner]
        inputs = [a if isinstance(s, cuda_graphs._InPlace) else s for a, s in zip(args, runner._static_inputs)]
        outputs = runner._outputs
        new = runner.fn(*inputs)
        for out, value in zip(outputs if isinstance(outputs, (list, tuple)) else [outputs],
                              new if isinstance(new, (list, tuple)) else [new]):
            if isinstance(out, torch.Tensor):
                out.copy_(value)


@pytest.fixture
def fake_cuda(monkeypatch):
    call = CudaGraphRunner.__call__
    record = CudaGraphRunner._record

    def calling(self, *args):
        _current_args[self] = args
        try:
            return call(self, *args)
        finally:
            _current_args.pop(self, None)

    def recording(self, args, copied):
        _Recorder.runner = self
        if self not in recorded:
            recorded.append(self)
        return record(self, args, copied)

    monkeypatch.setattr(CudaGraphRunner, "__call__", calling)
    monkeypatch.setattr(CudaGraphRunner, "_record", recording)
    monkeypatch.setattr(torch.cuda, "CUDAGraph", _Recorder)
    monkeypatch.setattr(torch.cuda, "graph", lambda g, **kw: contextlib.nullcontext())
    monkeypatch.setattr(torch.cuda, "synchronize", lambda device=None: None)
    recorded = []
    return recorded  # every runner that recorded, in order


def _runner(fn, training=False):
    return CudaGraphRunner(fn, "test graph", training=training)


def test_replay_copies_moving_inputs_reads_weights_in_place_and_returns_fresh_outputs(fake_cuda):
    weight = torch.randn(4)

    def fn(x, w):
        return (x * w + 1,)

    runner = _runner(fn)
    results, xs = [], []
    for _ in range(cuda_graphs.WARMUP_CALLS + 3):
        x = torch.randn(4)
        xs.append(x)  # kept: each at its own address, as moving inputs are
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

    runner = _runner(fn)
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


def test_training_outputs_are_handed_out_in_place_and_replayed_only_once_free(fake_cuda, caplog):
    weight = torch.randn(8)

    def fn(x, w):
        h = x * w
        return (h.exp(), h.sum(), w, w[:4])  # activation, a loss, an input, a view of a weight

    runner = _runner(fn, training=True)
    warm = [torch.randn(8) for _ in range(cuda_graphs.WARMUP_CALLS + 1)]  # kept: each at its own address
    for x in warm:
        runner(x, weight)
    assert runner.graph is not None and runner._copied == (0,), runner.disabled
    losses = []
    for _ in range(4):
        x = torch.randn(8)
        act, loss, w_out, w_view = runner(x, weight)
        torch.testing.assert_close(act, (x * weight).exp())
        torch.testing.assert_close(loss, (x * weight).sum())
        assert w_out is weight and torch.equal(w_view, weight[:4])
        assert act.data_ptr() == runner._outputs[0].data_ptr()  # in place, not copied
        losses.append((loss, loss.item()))  # kept: a one-element output is copied out
        del act
    assert runner.replays == 5 and runner.live_output_calls == 0 and runner.rerecords == 0
    for kept, value in losses:
        assert kept.item() == value

    kept_act = runner(torch.randn(8), weight)[0]  # kept alive across the next call
    snapshot = kept_act.clone()
    with caplog.at_level("INFO", logger="kitsune"):
        x = torch.randn(8)
        act = runner(x, weight)[0]
    torch.testing.assert_close(act, (x * weight).exp())
    assert torch.equal(kept_act, snapshot), "a replay overwrote an output that was still alive"
    assert runner.replays == 6 and runner.live_output_calls == 1
    assert "still alive" in caplog.text
    del kept_act, act
    runner(torch.randn(8), weight)
    assert runner.replays == 7


def test_inputs_that_stop_moving_are_re_recorded_to_be_read_in_place(fake_cuda):
    """A backward's saved activations move until the forward replays, then stay on
    the forward recording's memory: the backward is recorded again to read them in
    place. A tensor made afresh at every call that happens to land at one address
    (a zero gradient) stays copied in."""
    forward = _runner(lambda x: (x.exp(),), training=True)
    backward = _runner(lambda act, grad, fresh: (act * grad + fresh,), training=True)
    grad = torch.randn(16)
    fresh = torch.zeros(16)  # same address at every call, but not a recording's memory
    for step in range(cuda_graphs.WARMUP_CALLS + 5):
        x = torch.randn(16)
        (act,) = forward(x)
        if step < 3:  # moving while the backward records
            fresh = torch.zeros(16)
        torch.testing.assert_close(backward(act, grad, fresh)[0], x.exp() * grad + fresh)
        del act
    assert forward.replays >= 4 and forward._copied == (0,)
    assert backward.rerecords == 1 and 0 not in backward._copied  # the activation is read in place
    assert 2 in backward._copied


def _on_cpu_as_if_cuda(monkeypatch):
    """Let compile_graph wrap CPU graphs in CudaGraphRunner (with the stand-in recorder)."""
    blocker = cuda_graph_blocker

    def cpu_blocker(gm, example_inputs, compiled=None, training=False):
        fake = [torch.empty(t.shape, device="meta") if isinstance(t, torch.Tensor) else t for t in example_inputs]
        reason = blocker(gm, fake, compiled, training)
        return None if reason is not None and ("CUDA" in reason or " on cpu" in reason) else reason
    monkeypatch.setattr(cuda_graphs, "cuda_graph_blocker", cpu_blocker)


@pytest.mark.parametrize("grads", ["set_to_none", "zeroed", "kept"])
def test_training_steps_replay_forward_and_backward_and_train_as_eager(fake_cuda, monkeypatch, grads):
    import copy

    import kitsune
    from kitsune.report.stats import GLOBAL_STATS

    _on_cpu_as_if_cuda(monkeypatch)
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.LayerNorm(32), torch.nn.Linear(32, 64), torch.nn.GELU(),
                                torch.nn.Linear(64, 32))
    reference = copy.deepcopy(model)
    kitsune.reset_fusion_stats()
    compiled = torch.compile(model, backend="kitsune", dynamic=False)
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    ref_opt = torch.optim.SGD(reference.parameters(), lr=0.1)
    for step in range(8):
        x = torch.randn(16, 32)
        x.requires_grad_(True)
        x_ref = x.detach().clone().requires_grad_(True)
        losses = []
        kept = [(p.grad, p.grad.clone()) for p in model.parameters() if p.grad is not None] if grads == "kept" else []
        for m, o, inp in ((compiled, opt, x), (reference, ref_opt, x_ref)):
            o.zero_grad(set_to_none=grads != "zeroed")
            loss = m(inp).square().mean()
            loss.backward()
            o.step()
            losses.append(loss.detach())
        torch.testing.assert_close(*losses)
        torch.testing.assert_close(x.grad, x_ref.grad)
        for p, q in zip(model.parameters(), reference.parameters()):
            torch.testing.assert_close(p, q)
            torch.testing.assert_close(p.grad, q.grad)
        for grad, snapshot in kept:
            assert torch.equal(grad, snapshot), "a replay overwrote a gradient the user kept"
    assert {r.name for r in GLOBAL_STATS.records() if r.cuda_graph} == {"forward", "backward"}
    forward, backward = fake_cuda
    assert forward.training and backward.training
    assert forward.replays >= 4
    if grads == "kept":  # while the last replay's gradients are kept, the backward runs normally
        assert backward.live_output_calls >= 3
    else:  # zero_grad drops the gradients, or they are added into .grad: every step replays
        assert backward.replays >= 4 and backward.live_output_calls == 0


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
def test_training_steps_replay_on_gpu():
    import copy

    import kitsune
    from kitsune.report.stats import GLOBAL_STATS

    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.LayerNorm(256), torch.nn.Linear(256, 1024), torch.nn.GELU(),
                                torch.nn.Linear(1024, 256)).cuda()
    reference = copy.deepcopy(model)
    kitsune.reset_fusion_stats()
    compiled = torch.compile(model, backend="kitsune", dynamic=False)
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    ref_opt = torch.optim.SGD(reference.parameters(), lr=0.1)
    kept = []
    for step in range(8):
        x = torch.randn(64, 256, device="cuda")
        for m, o in ((compiled, opt), (reference, ref_opt)):
            o.zero_grad()
            loss = m(x).square().mean()
            loss.backward()
            o.step()
            kept.append(loss.detach())
        torch.testing.assert_close(kept[-2], kept[-1])
        for p, q in zip(model.parameters(), reference.parameters()):
            torch.testing.assert_close(p.grad, q.grad)
            torch.testing.assert_close(p, q)
    assert {r.name for r in GLOBAL_STATS.records() if r.cuda_graph} == {"forward", "backward"}


def test_gpt2_training_replays_every_graph_and_matches_eager(fake_cuda, monkeypatch):
    """GPT-2 compiles to two graphs each way (the loss after a graph break): the
    backward reads the forward's saved activations in place once the forward
    replays, and no recording pins another's outputs (a view of an input kept
    by the loss graph's recording once stopped the model's forward replays)."""
    import copy

    transformers = pytest.importorskip("transformers")
    _on_cpu_as_if_cuda(monkeypatch)
    torch.manual_seed(0)
    config = transformers.GPT2Config(n_layer=2, n_embd=64, n_head=4, vocab_size=500, n_positions=64,
                                     attn_pdrop=0.0, embd_pdrop=0.0, resid_pdrop=0.0)
    model = transformers.GPT2LMHeadModel(config)
    reference = copy.deepcopy(model)
    compiled = torch.compile(model, backend="kitsune", dynamic=False)
    opt = torch.optim.SGD(model.parameters(), lr=1e-2)
    ref_opt = torch.optim.SGD(reference.parameters(), lr=1e-2)
    replays = None
    tokens = torch.randint(0, 500, (2, 32))  # the same batch: the loss graph reads the labels in place
    for step in range(12):
        losses = []
        for m, o in ((compiled, opt), (reference, ref_opt)):
            o.zero_grad()
            loss = m(tokens, labels=tokens).loss
            loss.backward()
            o.step()
            losses.append(loss.detach())
        torch.testing.assert_close(*losses)
        for p, q in zip(model.parameters(), reference.parameters()):
            torch.testing.assert_close(p.grad, q.grad, rtol=1e-4, atol=1e-5)
        if step == 8:
            replays = [r.replays for r in fake_cuda]
    assert len(fake_cuda) == 4, [r.name for r in fake_cuda]
    assert all(r.replays - before == 3 for r, before in zip(fake_cuda, replays)), \
        [(r.name, r.replays, r.rerecords, r.live_output_calls) for r in fake_cuda]


def test_a_loop_that_keeps_the_models_output_bound_still_replays(fake_cuda, monkeypatch):
    """`out = model(x)` keeps the last step's output alive while the model runs
    again: the model's own outputs are copied out (only the saved activations
    are handed out in place), so every step replays."""
    import copy

    _on_cpu_as_if_cuda(monkeypatch)
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(32, 64), torch.nn.GELU(), torch.nn.Linear(64, 32))
    reference = copy.deepcopy(model)
    compiled = torch.compile(model, backend="kitsune", dynamic=False)
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    ref_opt = torch.optim.SGD(reference.parameters(), lr=0.1)
    out = ref_out = None
    kept = []
    for step in range(8):
        x = torch.randn(16, 32)
        for m, o in ((compiled, opt), (reference, ref_opt)):
            o.zero_grad()
            result = m(x)
            result.square().mean().backward()
            o.step()
            if m is compiled:
                out = result
            else:
                ref_out = result
        torch.testing.assert_close(out, ref_out)
        kept.append((out, out.detach().clone()))
    for value, snapshot in kept:
        assert torch.equal(value, snapshot), "a replay overwrote an output the user kept"
    forward, backward = fake_cuda
    assert forward.copy_out == {0}  # the model's output; the rest are saved activations
    assert forward.live_output_calls == 0 and forward.replays >= 5
    assert backward.live_output_calls == 0 and backward.replays >= 5


@pytest.mark.parametrize("pattern", ["accumulate", "retain_graph", "eval_between"])
def test_training_patterns_stay_eager_exact(fake_cuda, monkeypatch, pattern):
    """Gradient accumulation (two forwards alive before one backward), a second
    backward through a retained graph, and no_grad evaluation between steps:
    whatever replays or runs normally, every result is eager's."""
    import copy

    _on_cpu_as_if_cuda(monkeypatch)
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.LayerNorm(32), torch.nn.Linear(32, 64), torch.nn.GELU(),
                                torch.nn.Linear(64, 32))
    reference = copy.deepcopy(model)
    compiled = torch.compile(model, backend="kitsune", dynamic=False)
    opt = torch.optim.SGD(model.parameters(), lr=0.05)
    ref_opt = torch.optim.SGD(reference.parameters(), lr=0.05)
    for step in range(7):
        xs = [torch.randn(16, 32) for _ in range(2)]
        for m, o in ((compiled, opt), (reference, ref_opt)):
            o.zero_grad()
            if pattern == "accumulate":
                losses = [m(x).square().mean() for x in xs]  # both forwards' activations alive
                sum(losses).backward()
            elif pattern == "retain_graph":
                loss = m(xs[0]).square().mean()
                loss.backward(retain_graph=True)
                loss.backward()  # the gradients of the first backward are still in .grad
            else:
                m(xs[0]).square().mean().backward()
                with torch.no_grad():
                    evaluated = m(xs[1])
                if m is compiled:
                    got = evaluated
                else:
                    torch.testing.assert_close(got, evaluated)
            o.step()
        for p, q in zip(model.parameters(), reference.parameters()):
            torch.testing.assert_close(p.grad, q.grad)
            torch.testing.assert_close(p, q)
    assert any(r.replays for r in fake_cuda)


def test_a_freed_runner_forgets_its_recording_memory(fake_cuda):
    import gc

    runner = _runner(lambda x: (x.exp(),), training=True)
    xs = [torch.randn(16) for _ in range(cuda_graphs.WARMUP_CALLS + 1)]
    for x in xs:
        runner(x)
    registered = [ref.cdata for ref, _ in runner._watch]
    assert registered and all(c in cuda_graphs._RECORDING_MEMORY for c in registered)
    fake_cuda.clear()
    _Recorder.runner = None  # the stand-in's own reference
    del runner
    gc.collect()
    assert not any(c in cuda_graphs._RECORDING_MEMORY for c in registered)


def test_memory_short_after_recording_lets_the_recording_go(fake_cuda, monkeypatch, caplog):
    gib = 2**30
    monkeypatch.setattr(torch.cuda, "mem_get_info", lambda device=None: (2 * gib, 80 * gib))
    monkeypatch.setattr(torch.cuda, "memory_reserved", lambda device=None: 10 * gib)
    monkeypatch.setattr(torch.cuda, "memory_allocated", lambda device=None: 9 * gib)
    cuda = torch.device("cuda")
    assert "3.0 of 80 GiB" in cuda_graphs._memory_short(cuda)  # 2 free + 1 cached < 8 (10 %)
    monkeypatch.setattr(torch.cuda, "mem_get_info", lambda device=None: (20 * gib, 80 * gib))
    assert cuda_graphs._memory_short(cuda) is None
    assert cuda_graphs._memory_short(torch.device("cpu")) is None

    monkeypatch.setattr(cuda_graphs, "_memory_short", lambda device: "short of memory")
    runner = _runner(lambda x: (x.exp(),), training=True)
    with caplog.at_level("INFO", logger="kitsune"):
        for _ in range(cuda_graphs.WARMUP_CALLS + 3):
            x = torch.randn(16)
            torch.testing.assert_close(runner(x)[0], x.exp())
    assert runner.disabled == "short of memory" and runner.graph is None and runner.replays == 0
    assert "short of memory" in caplog.text


def test_size_keyed_runner_keeps_one_recording_per_size_and_drops_the_oldest(monkeypatch):
    from kitsune.runtime import cuda_graphs

    made, dropped = [], []

    class Recorder:  # stands in for CudaGraphRunner (recording needs a GPU)
        def __init__(self, fn, name, training=False, copy_out=(), before_replay=(), restride=None, on_record=None):
            self.fn, self.name, self.replays = fn, name, 0
            made.append(name)

        def __call__(self, *args):
            return self.fn(*args)

        def _drop(self):
            dropped.append(self.name)

    monkeypatch.setattr(cuda_graphs, "CudaGraphRunner", Recorder)
    runner = cuda_graphs.SizeKeyedRunner(lambda s, x: x * s, "inference graph", limit=2)
    x = torch.ones(3)
    for s in (4, 5, 4, 6, 5):
        torch.testing.assert_close(runner(s, x), x * s)
    assert made == ["inference graph at sizes (4,)", "inference graph at sizes (5,)",
                    "inference graph at sizes (6,)", "inference graph at sizes (5,)"]
    assert dropped == ["inference graph at sizes (5,)", "inference graph at sizes (4,)"]
    assert list(runner.runners) == [(6,), (5,)] and runner.dropped == 2


@pytest.mark.parametrize("gpu_ms, records", [(40.0, False), (3.0, True)])
def test_a_gpu_bound_training_graph_is_not_recorded(fake_cuda, monkeypatch, caplog, gpu_ms, records):
    # The last warm-up call is timed: 2 ms of launches against `gpu_ms` of GPU work.
    # GPU-bound (40 ms): the recording would only hold memory, so none is made and every
    # call runs normally; launch-bound (3 ms): recorded and replayed as before.
    timed = []

    def time_call(fn, args):
        timed.append(len(args))
        return fn(*args), 2e-3, gpu_ms * 1e-3

    monkeypatch.setattr(cuda_graphs, "_time_call", time_call)
    weight = torch.randn(8)
    runner = _runner(lambda x, w: ((x * w).exp(), (x * w).sum()), training=True)
    with caplog.at_level("INFO", logger="kitsune"):
        for _ in range(cuda_graphs.WARMUP_CALLS + 3):
            x = torch.randn(8)
            act, loss = runner(x, weight)
            torch.testing.assert_close(act, (x * weight).exp())
            del act
    assert timed == [2], "only the last warm-up call is timed"
    assert (runner.graph is not None) == records and (runner.replays == 3) == records
    assert (runner.disabled is not None and "GPU-bound" in runner.disabled) != records
    assert ("GPU-bound" in caplog.text) != records


def test_inference_graphs_are_not_timed(fake_cuda, monkeypatch):
    monkeypatch.setattr(cuda_graphs, "_time_call", lambda fn, args: pytest.fail("timed an inference graph"))
    runner = _runner(lambda x: (x * 2,))  # graphs return a tuple
    for _ in range(cuda_graphs.WARMUP_CALLS + 2):
        runner(torch.randn(4))
    assert runner.replays == 2 and runner.disabled is None
