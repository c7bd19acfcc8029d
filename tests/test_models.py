"""Whole models through `backend="kitsune"`: a small GPT-2 and a small BERT
from `transformers` configs (random weights, built here, nothing downloaded)
give eager's logits, loss and the gradients of a training step.

Both backends run: the generated C and the generated Triton (interpreter).
Each test also checks that Kitsune fused something in the forward and the
backward graphs, so a silent fall back to PyTorch fails the test."""
from __future__ import annotations

import pytest
import torch

import kitsune
from kitsune.report.stats import GLOBAL_STATS

transformers = pytest.importorskip("transformers")
transformers.logging.set_verbosity_error()


def _gpt2():
    cfg = transformers.GPT2Config(n_layer=2, n_embd=32, n_head=4, vocab_size=96, n_positions=32,
                                  resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0,
                                  bos_token_id=0, eos_token_id=0)
    return transformers.GPT2LMHeadModel(cfg)


def _bert():
    cfg = transformers.BertConfig(num_hidden_layers=2, hidden_size=32, num_attention_heads=4,
                                  intermediate_size=64, vocab_size=96, max_position_embeddings=32,
                                  hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0, pad_token_id=0)
    return transformers.BertForMaskedLM(cfg)


@pytest.fixture(params=["cpu", "triton"])
def backend(request, monkeypatch):
    if request.param == "triton":
        pytest.importorskip("triton")
        monkeypatch.setenv("KITSUNE_BACKEND", "triton")
    torch._dynamo.reset()
    GLOBAL_STATS.reset()
    yield request.param
    torch._dynamo.reset()


def _fused_kinds():
    return {record.name for record in GLOBAL_STATS.records() if record.groups}


@pytest.mark.parametrize("build", [_gpt2, _bert], ids=["gpt2", "bert"])
def test_model_logits_and_training_step_match_eager(build, backend):
    torch.manual_seed(0)
    model = build()
    tokens = torch.randint(1, 96, (2, 12))
    mask = torch.ones_like(tokens)
    mask[1, 9:] = 0  # padding: masked attention rows

    model.eval()
    with torch.no_grad():
        expected = model(tokens, attention_mask=mask).logits
        compiled = torch.compile(model, backend="kitsune")
        got = compiled(tokens, attention_mask=mask).logits
    torch.testing.assert_close(got, expected, rtol=1e-4, atol=1e-4)

    model.train()
    labels = tokens.clone()
    model.zero_grad()
    loss = model(tokens, attention_mask=mask, labels=labels).loss
    loss.backward()
    expected_grads = {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}
    model.zero_grad()
    torch._dynamo.reset()
    compiled = torch.compile(model, backend="kitsune")
    got_loss = compiled(tokens, attention_mask=mask, labels=labels).loss
    got_loss.backward()
    torch.testing.assert_close(got_loss, loss, rtol=1e-5, atol=1e-5)
    assert expected_grads, "the eager training step produced no gradients"
    for name, param in model.named_parameters():
        if name in expected_grads:
            torch.testing.assert_close(param.grad, expected_grads[name], rtol=1e-3, atol=1e-5,
                                       msg=lambda m, name=name: f"gradient of {name}: {m}")

    kinds = _fused_kinds()
    assert {"inference", "forward", "backward"} <= kinds, f"graphs with fused kernels: {kinds}"


@pytest.mark.parametrize("build", [_gpt2, _bert], ids=["gpt2", "bert"])
def test_model_at_new_sizes_fuses_as_at_the_first(build, monkeypatch):
    """A second batch size and sequence length: Dynamo compiles one dynamic graph,
    which fuses as many groups as the first (static) one and serves every later size."""
    monkeypatch.setenv("KITSUNE_BACKEND", "cpu")
    GLOBAL_STATS.reset()
    torch.manual_seed(1)
    model = build().eval()
    compiled = torch.compile(model, backend="kitsune")
    with torch.no_grad():
        for batch, seq in ((2, 12), (3, 9), (5, 17), (4, 5)):  # (Dynamo specialises a size of 1)
            tokens = torch.randint(1, 96, (batch, seq))
            mask = torch.ones_like(tokens)
            mask[0, seq - 2:] = 0
            torch.testing.assert_close(compiled(tokens, attention_mask=mask).logits,
                                       model(tokens, attention_mask=mask).logits, rtol=1e-4, atol=1e-4)
    records = GLOBAL_STATS.records()
    assert [r.name for r in records] == ["inference", "inference"], [r.name for r in records]
    static, dynamic = records
    assert len(dynamic.groups) >= len(static.groups) > 0
    assert not dynamic.fallbacks and not static.fallbacks
    assert kitsune.get_fusion_stats()["runtime_fallbacks"] == []
