"""The fused LM-head loss rewrite (kitsune.capture.lm_head): a captured
`linear -> (views, casts) -> cross_entropy` runs as the chunked
`kitsune::linear_cross_entropy`, with eager's loss and gradients, no [N, V]
tensor in the forward graph and a lower peak memory; everything it does not
understand stays as it was, with the reason recorded."""
from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from kitsune.capture import lm_head
from kitsune.capture.lm_head import fuse_lm_head_loss
from kitsune.record import default_sink
from kitsune.report.analysis import finalize

V, H = 1000, 8


class TinyLM(nn.Module):
    def __init__(self, vocab=V, width=H, bias=True):
        super().__init__()
        self.embed = nn.Embedding(vocab, width)
        self.head = nn.Linear(width, vocab, bias=bias)

    def forward(self, tokens):
        return self.head(torch.tanh(self.embed(tokens)))


def _model_and_batch(seed=0, batch=(2, 16), vocab=V):
    torch.manual_seed(seed)
    model = TinyLM(vocab)
    tokens = torch.randint(0, vocab, batch)
    labels = torch.randint(0, vocab, batch)
    labels[0, :3] = -100
    return model, tokens, labels


def _rewritten(fn, *args):
    """fn compiled with a backend that only runs the rewrite on the Dynamo graph (no AOTAutograd)."""
    rewrites, graphs = [], []

    def backend(gm, example_inputs):
        rewrites.extend(fuse_lm_head_loss(gm))
        graphs.append(gm)
        return gm.forward
    torch._dynamo.reset()
    return torch.compile(fn, backend=backend)(*args), rewrites, graphs


def _grads_match(loss, ref, params, **tol):
    torch.testing.assert_close(loss, ref, **tol)
    for got, want in zip(torch.autograd.grad(loss, params), torch.autograd.grad(ref, params)):
        torch.testing.assert_close(got, want, **tol)


def _view_loss(model):
    return lambda x, y: F.cross_entropy(model(x).view(-1, V), y.view(-1))


def _shifted_loss(model):
    def loss(x, y):  # HF's causal-LM loss: shift, contiguous, float, smoothing, sum
        logits = model(x)[..., :-1, :].contiguous().float()
        return F.cross_entropy(logits.view(-1, logits.size(-1)), y[..., 1:].contiguous().view(-1),
                               ignore_index=-100, label_smoothing=0.1, reduction="sum")
    return loss


def _reshape_tuple_loss(model):
    return lambda x, y: F.cross_entropy(torch.reshape(model(x), (x.numel(), -1)), y.flatten(), label_smoothing=0.3)


@pytest.mark.parametrize("make_loss", [_view_loss, _shifted_loss, _reshape_tuple_loss])
def test_rewrite_keeps_loss_and_gradients(monkeypatch, make_loss):
    monkeypatch.setattr(lm_head, "MIN_LOGITS", 0)
    model, tokens, labels = _model_and_batch()
    loss, rewrites, (gm,) = _rewritten(make_loss(model), tokens, labels)
    assert [r.applied for r in rewrites] == [True], rewrites
    assert rewrites[0].pattern == "softmax_cross_entropy" and rewrites[0].ops == ("linear", "cross_entropy")
    targets = {n.target for n in gm.graph.nodes}
    assert F.linear not in targets and F.cross_entropy not in targets
    _grads_match(loss, make_loss(model)(tokens, labels), list(model.parameters()))


def _returned_too(model):
    def fn(x, y):  # HF's models return the logits with the loss
        logits = model(x)
        return F.cross_entropy(logits.float().view(-1, V), y.view(-1), label_smoothing=0.1), logits * 2
    return fn


def test_logits_used_elsewhere_are_still_computed(monkeypatch):
    monkeypatch.setattr(lm_head, "MIN_LOGITS", 0)
    monkeypatch.setattr(lm_head, "REWRITE_SHARED_LOGITS", True)
    model, tokens, labels = _model_and_batch()
    (loss, logits), rewrites, (gm,) = _rewritten(_returned_too(model), tokens, labels)
    assert [r.applied for r in rewrites] == [True] and "still computed for mul" in rewrites[0].choice
    assert F.linear in {n.target for n in gm.graph.nodes}
    ref_loss, ref_logits = _returned_too(model)(tokens, labels)
    torch.testing.assert_close(logits, ref_logits)
    params = list(model.parameters())  # the gradient of both outputs: through the op and the linear
    got = torch.autograd.grad(loss + logits.square().mean(), params)
    for g, want in zip(got, torch.autograd.grad(ref_loss + ref_logits.square().mean(), params)):
        torch.testing.assert_close(g, want)


def test_logits_used_elsewhere_stay_by_default(monkeypatch):
    monkeypatch.setattr(lm_head, "MIN_LOGITS", 0)
    model, tokens, labels = _model_and_batch()
    _, rewrites, _ = _rewritten(_returned_too(model), tokens, labels)
    assert [r.applied for r in rewrites] == [False] and "also used by mul" in rewrites[0].reason


def _declined_cases():
    def weighted(m):
        return lambda x, y: F.cross_entropy(m(x).view(-1, V), y.view(-1), weight=torch.ones(V))
    return [
        (lambda m: lambda x, y: F.cross_entropy(m(x).view(-1, V), y.view(-1), reduction="none"), "reduction", True),
        (weighted, "weight", True),
        (lambda m: lambda x, y: F.cross_entropy((m(x) / 2).view(-1, V), y.view(-1)), "not a view", True),
        (lambda m: lambda x, y: F.cross_entropy(m(x)[..., :-1].reshape(-1, V - 1), y.view(-1).clamp(0, V - 2)),
         "vocabulary dim", True),
        (_view_loss, "too small", False),
    ]


@pytest.mark.parametrize("make_loss, reason, small_ok", _declined_cases())
def test_declined_graphs_stay_as_they_are(monkeypatch, make_loss, reason, small_ok):
    if small_ok:
        monkeypatch.setattr(lm_head, "MIN_LOGITS", 0)
    model, tokens, labels = _model_and_batch()
    out, rewrites, (gm,) = _rewritten(make_loss(model), tokens, labels)
    assert len(rewrites) == 1 and not rewrites[0].applied and reason in rewrites[0].reason, rewrites
    assert F.cross_entropy in {n.target for n in gm.graph.nodes}
    torch.testing.assert_close(out, make_loss(model)(tokens, labels))


def test_no_linear_no_record():
    _, rewrites, _ = _rewritten(lambda z, y: F.cross_entropy(z * 2, y), torch.randn(8, 5), torch.randint(0, 5, (8,)))
    assert rewrites == []


def _compile_kitsune(fn, **options):
    torch._dynamo.reset()
    default_sink().reset()
    return torch.compile(fn, backend="kitsune", options=options or None)


def test_kitsune_training_step_matches_eager_without_logits(monkeypatch):
    monkeypatch.setattr(lm_head, "MIN_LOGITS", 0)
    model, tokens, labels = _model_and_batch()
    loss = _compile_kitsune(_shifted_loss(model))(tokens, labels)
    _grads_match(loss, _shifted_loss(model)(tokens, labels), list(model.parameters()))
    forward = default_sink().records()[0]
    assert forward.name == "forward"
    logits_numel = tokens.numel() * V
    sizes = [n.meta["val"].numel() for n in forward.graph.nodes if isinstance(n.meta.get("val"), torch.Tensor)]
    assert max(sizes) < logits_numel  # the largest tensor is the weight (or its gradient), not the logits
    assert any("linear_cross_entropy" in str(n.target) for n in forward.graph.nodes)
    finalize(forward)
    applied = [o for o in forward.opportunities if o.pattern == "softmax_cross_entropy" and o.status == "applied"]
    assert applied


def test_pattern_disabled_leaves_the_loss(monkeypatch):
    monkeypatch.setattr(lm_head, "MIN_LOGITS", 0)
    model, tokens, labels = _model_and_batch()
    loss = _compile_kitsune(_view_loss(model), enabled_patterns=["elementwise_chain"])(tokens, labels)
    torch.testing.assert_close(loss, _view_loss(model)(tokens, labels))
    graph = default_sink().records()[0].graph
    assert not any("linear_cross_entropy" in str(n.target) for n in graph.nodes)


def test_autocast_and_dynamic_batch(monkeypatch):
    monkeypatch.setattr(lm_head, "MIN_LOGITS", 0)
    model, _, _ = _model_and_batch()

    def fn(x, y):
        with torch.autocast("cpu", dtype=torch.bfloat16):
            return _view_loss(model)(x, y)
    seen = []
    compiled = torch.compile(fn, dynamic=True, backend=_spying_backend(seen))
    for batch in [(2, 16), (3, 12)]:
        _, tokens, labels = _model_and_batch(seed=batch[0], batch=batch)
        loss = compiled(tokens, labels)
        assert loss.dtype == torch.float32
        _grads_match(loss, fn(tokens, labels), list(model.parameters()), rtol=1.6e-2, atol=1e-2)
    assert seen and all(r.applied for r in seen)


def _spying_backend(seen):
    """AOTAutograd over the rewritten Dynamo graph, the aten graphs run as they are;
    the rewrites go to `seen`."""
    from kitsune.capture.dynamo import aot_backend
    inner = aot_backend(lambda gm, example_inputs, kind: gm, lm_head_loss=False)

    def backend(gm, example_inputs, **kwargs):
        seen.extend(fuse_lm_head_loss(gm))
        return inner(gm, example_inputs, **kwargs)
    return backend


def _tiny_gpt2():
    try:
        from transformers import GPT2Config, GPT2LMHeadModel
    except ImportError as error:  # transformers missing, or unimportable (a broken torchvision)
        pytest.skip(f"transformers' GPT-2 cannot be imported: {error}")
    torch.manual_seed(0)
    config = GPT2Config(vocab_size=V, n_positions=16, n_embd=16, n_layer=1, n_head=2,
                        resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0)
    model = GPT2LMHeadModel(config)
    model.loss_type = "ForCausalLM"  # else transformers' warning_once breaks the graph before the loss
    return model


@pytest.mark.parametrize("with_logits", [False, True])
def test_hf_gpt2_loss(monkeypatch, with_logits):
    monkeypatch.setattr(lm_head, "MIN_LOGITS", 0)
    model = _tiny_gpt2()
    tokens = torch.randint(0, V, (2, 8))
    labels = tokens.clone()
    labels[0, :2] = -100

    def fn(x, y):
        out = model(input_ids=x, labels=y)
        return (out.loss, out.logits) if with_logits else out.loss
    out, seen, _ = _rewritten(fn, tokens, labels)
    ref = fn(tokens, labels)
    torch.testing.assert_close(out, ref)
    loss, ref_loss = (out[0], ref[0]) if with_logits else (out, ref)
    _grads_match(loss, ref_loss, [p for p in model.parameters()])
    assert [r.applied for r in seen] == [not with_logits], seen


def _peak_bytes(step) -> int:
    """The most CPU memory held at once during `step()` beyond what was held before, from
    the profiler's allocation events in time order."""
    from torch.profiler import ProfilerActivity, profile
    with profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
        step()
    events = [e for e in prof.profiler.kineto_results.events() if e.name() == "[memory]"]
    held = peak = 0
    for event in sorted(events, key=lambda e: e.start_ns()):
        held += event.nbytes()
        peak = max(peak, held)
    return peak


def test_training_step_peak_memory_below_eager():
    vocab = 8192  # 128 tokens: 4 MB of float32 logits, their log-softmax and gradient in eager
    torch.manual_seed(0)
    model = nn.Sequential(nn.Embedding(vocab, 32), nn.LayerNorm(32), nn.Linear(32, vocab))
    tokens, labels = torch.randint(0, vocab, (2, 64)), torch.randint(0, vocab, (2, 64))

    def loss_fn(x, y):
        return F.cross_entropy(model(x).view(-1, vocab), y.view(-1))
    compiled = _compile_kitsune(loss_fn)

    def step(fn):
        def run():
            fn(tokens, labels).backward()
        return run
    step(compiled)()  # compile first, and the gradients exist in both measured steps
    step(loss_fn)()
    eager, kitsune = _peak_bytes(step(loss_fn)), _peak_bytes(step(compiled))
    print(f"peak memory above the step's start: eager {eager} B, kitsune {kitsune} B")
    assert kitsune < eager / 2, (eager, kitsune)


def test_gpu_logits_below_the_measured_floor_stay_eagers():
    """The H100 measurement: 2048 x 50257 logits made the step slower than eager's, 8192 x 50257 faster."""
    assert lm_head.too_small(2048 * 50257, "cuda") is not None
    assert lm_head.too_small(8192 * 50257, "cuda") is None
    assert lm_head.too_small(2048 * 50257, "cpu") is None and lm_head.too_small(1000, "cpu") is not None
