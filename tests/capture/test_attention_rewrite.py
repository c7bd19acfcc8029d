"""The attention rewrite (kitsune.capture.attention): hand-written attention in
its many forms, compiled with `backend="kitsune"`, runs as one
`kitsune.ops.attention` call with eager's outputs and gradients; forms it
cannot prove stay as they are, correct, with the reason recorded."""
from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F

from kitsune.capture.attention import fuse_attention
from kitsune.record import default_sink
from kitsune.report.analysis import finalize
from kitsune.report.explain import explain_records

B, H, L, D = 2, 4, 6, 8


def _qkv(*shape, dtype=torch.float32, heads_kv=None):
    shape = shape or (B, H, L, D)
    kv_shape = (*shape[:-3], heads_kv, *shape[-2:]) if heads_kv else shape
    q = torch.randn(shape, dtype=dtype)
    k, v = torch.randn(kv_shape, dtype=dtype), torch.randn(kv_shape, dtype=dtype)
    return [t.requires_grad_() for t in (q, k, v)]


def _compiled(fn, *args):
    """fn(*args) through backend="kitsune", and the attention rewrites it recorded."""
    torch._dynamo.reset()
    default_sink().reset()
    out = torch.compile(fn, backend="kitsune")(*args)
    records = default_sink().records()
    rewrites = [r for record in records for r in getattr(record, "rewrites", ()) if r.pattern == "attention"]
    return out, rewrites, records


def _same_as_eager(fn, args, grads=True, **tol):
    """Compiled output and gradients (of every input that requires them) equal eager's."""
    out, rewrites, _ = _compiled(fn, *args)
    ref = fn(*args)
    outs, refs = (out, ref) if isinstance(out, tuple) else ((out,), (ref,))
    for got, want in zip(outs, refs):
        torch.testing.assert_close(got, want, equal_nan=True, **tol)
    if grads:
        leaves = [a for a in args if isinstance(a, torch.Tensor) and a.requires_grad]
        cotangent = [torch.randn_like(o) for o in outs]
        got = torch.autograd.grad(outs, leaves, cotangent)
        want = torch.autograd.grad(refs, leaves, cotangent)
        for g, w in zip(got, want):
            torch.testing.assert_close(g, w, equal_nan=True, **tol)
    return rewrites, default_sink().records()  # with the backward graph's record


def _causal_keep(lq=L, lk=L):
    return torch.ones(lq, lk, dtype=torch.bool).tril()


def _padding_bias():
    bias = torch.zeros(B, 1, 1, L)
    bias[1, ..., -2:] = torch.finfo(torch.float32).min
    return bias


FORMS = {
    "transpose_mul": (lambda q, k, v: torch.softmax(q @ k.transpose(-1, -2) * 0.3, -1) @ v, "scale 0.3, mask none"),
    "div_sqrt_d": (lambda q, k, v: F.softmax(torch.matmul(q, k.transpose(-2, -1)) / math.sqrt(D), dim=-1).matmul(v),
                   f"scale {1 / math.sqrt(D):.6g}"),
    "scaled_q_and_k": (lambda q, k, v: ((q * 0.5) @ (k / 2).mT).softmax(-1) @ v, "scale 0.25"),
    "unscaled_permute": (lambda q, k, v: torch.softmax(q @ k.permute(0, 1, 3, 2), -1) @ v, "scale 1,"),
    "k_pretransposed": (lambda q, k, v: torch.softmax(q @ k.transpose(1, 2).permute(0, 2, 3, 1) * 0.2, -1) @ v,
                        "scale 0.2"),
    "bmm_3d": (lambda q, k, v: torch.bmm(torch.softmax(torch.bmm(q.flatten(0, 1), k.flatten(0, 1).transpose(1, 2)),
                                                       -1), v.flatten(0, 1)), "scale 1,"),
    "causal_masked_fill": (lambda q, k, v: torch.softmax(
        (q @ k.mT * 0.3).masked_fill(~_causal_keep(), float("-inf")), -1) @ v, "mask none, causal yes"),
    "causal_triu_finite": (lambda q, k, v: torch.softmax((q @ k.mT).masked_fill(
        torch.ones(L, L, dtype=torch.bool).triu(1), torch.finfo(q.dtype).min), -1) @ v, "mask none, causal yes"),
    "tril_masked_is_not_causal": (lambda q, k, v: torch.softmax((q @ k.mT).masked_fill(
        torch.ones(L, L, dtype=torch.bool).triu(), -1e9), -1) @ v, "bool finite fill -1e+09, causal no"),
    "causal_where_min": (lambda q, k, v: torch.softmax(torch.where(
        _causal_keep(), q @ k.mT, torch.finfo(torch.float32).min), -1) @ v, "causal yes"),
    "causal_with_bias": (lambda q, k, v: torch.softmax(torch.where(
        _causal_keep(), q @ k.mT + _padding_bias(), -1e30), -1) @ v, "additive + bool finite fill -1e+30, causal no"),
    "where_tensor_fill": (lambda q, k, v: torch.softmax(torch.where(
        _causal_keep(), q @ k.mT, torch.full([], torch.finfo(q.dtype).min, dtype=q.dtype)), -1) @ v,
        "mask none, causal yes"),
    "tensor_scale": (lambda q, k, v: torch.softmax(q @ k.mT / torch.full([], D ** 0.5, dtype=q.dtype), -1) @ v,
                     f"scale {1 / D ** 0.5:.6g}"),
    "where_fill_first": (lambda q, k, v: torch.softmax(torch.where(
        ~_causal_keep(), -1e4, q @ k.mT), -1) @ v, "bool finite fill -1e+04"),
    "mask_then_scale": (lambda q, k, v: torch.softmax(
        (q @ k.mT).masked_fill(~_causal_keep(), -1e9) / 4, -1) @ v, "scale 0.25, mask bool finite fill -2.5e+08"),
    "padding_bias": (lambda q, k, v: torch.softmax(q @ k.mT * 0.3 + _padding_bias(), -1) @ v, "mask additive"),
    "float_upcast": (lambda q, k, v: torch.softmax((q @ k.mT * 0.3).float(), -1).to(q.dtype) @ v, "mask none"),
    "softmax_dtype": (lambda q, k, v: (q @ k.mT).softmax(-1, torch.float64).to(q.dtype) @ v, "scale 1,"),
    "eval_dropout": (lambda q, k, v: F.dropout(torch.softmax(q @ k.mT, -1), 0.1, training=False) @ v, "dropout 0)"),
}


@pytest.mark.parametrize("form", list(FORMS))
def test_form_is_rewritten_with_eager_values_and_gradients(form):
    fn, text = FORMS[form]
    rewrites, _ = _same_as_eager(fn, _qkv())
    assert [r.applied for r in rewrites] == [True], rewrites
    assert text in rewrites[0].choice, rewrites[0].choice


def test_learned_biases_and_mask_together():
    torch.manual_seed(0)
    q, k, v = _qkv()
    alibi = torch.randn(1, H, L, L, requires_grad=True)  # a learned position bias: its gradient is checked too
    padding = torch.randn(B, 1, 1, L, requires_grad=True)

    def fn(q, k, v, alibi, padding):
        s = torch.matmul(q, k.transpose(-1, -2)) * 0.3 + alibi
        s = (s + padding).masked_fill(~_causal_keep(), float("-inf"))
        return torch.softmax(s, dim=-1) @ v
    rewrites, _ = _same_as_eager(fn, (q, k, v, alibi, padding))
    assert [r.applied for r in rewrites] == [True]
    assert "mask additive + bool fill -inf" in rewrites[0].choice


def _repeat_kv(x, n):  # transformers' repeat_kv
    b, h, length, d = x.shape
    return x[:, :, None, :, :].expand(b, h, n, length, d).reshape(b, h * n, length, d)


@pytest.mark.parametrize("repeat", ["repeat_kv", "repeat_interleave"])
def test_grouped_query_attention_passes_unrepeated_kv(repeat):
    q, k, v = _qkv(heads_kv=1 if repeat == "repeat_kv" else 2)
    groups = H // k.shape[1]

    def fn(q, k, v):
        if repeat == "repeat_kv":
            k, v = _repeat_kv(k, groups), _repeat_kv(v, groups)
        else:
            k, v = k.repeat_interleave(groups, dim=1), v.repeat_interleave(groups, 1)
        return torch.softmax(q @ k.transpose(2, 3) * 0.3, -1) @ v
    rewrites, _ = _same_as_eager(fn, (q, k, v))
    assert [r.applied for r in rewrites] == [True] and f"GQA {groups}x" in rewrites[0].choice


def test_tiled_heads_are_not_taken_for_groups():
    """k repeated as whole blocks of heads (head h reads h % Hkv) is not attention()'s
    grouping: the rewrite passes the repeated k and v."""
    q, k, v = _qkv(heads_kv=2)

    def fn(q, k, v):
        k, v = k.repeat(1, 2, 1, 1), v[:, None].expand(B, 2, 2, L, D).reshape(B, H, L, D)
        return torch.softmax(q @ k.mT, -1) @ v
    rewrites, _ = _same_as_eager(fn, (q, k, v))
    assert [r.applied for r in rewrites] == [True] and "GQA 1x" in rewrites[0].choice


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_low_precision_with_upcast_softmax(dtype):
    q, k, v = _qkv(dtype=dtype)
    bias = torch.randn(B, 1, 1, L, dtype=dtype)

    def fn(q, k, v):
        s = q @ k.mT * 0.35 + bias
        return F.softmax(s, dim=-1, dtype=torch.float32).to(q.dtype) @ v
    rewrites, _ = _same_as_eager(fn, (q, k, v), atol=2e-2, rtol=2e-2)
    assert [r.applied for r in rewrites] == [True]


def test_training_dropout_is_passed_to_attention():
    q, k, v = _qkv()

    def fn(q, k, v):
        return F.dropout(torch.softmax(q @ k.mT, -1), p=0.5, training=True) @ v
    out, rewrites, _ = _compiled(fn, q, k, v)
    assert [r.applied for r in rewrites] == [True] and "dropout 0.5)" in rewrites[0].choice
    without = torch.softmax(q @ k.mT, -1) @ v
    assert out.shape == without.shape and torch.isfinite(out).all() and not torch.allclose(out, without)
    assert all(torch.isfinite(g).all() for g in torch.autograd.grad(out.sum(), (q, k, v)))


def test_fully_masked_rows_with_a_finite_fill_average_v():
    q, k, v = _qkv()
    keep = torch.rand(B, 1, L, L) > 0.4
    keep[:, :, 2] = False  # row 2 sees no key: eager gives the plain average of v

    def fn(q, k, v, keep):
        return torch.softmax((q @ k.mT).masked_fill(~keep, torch.finfo(q.dtype).min), -1) @ v
    rewrites, _ = _same_as_eager(fn, (q, k, v, keep))
    assert [r.applied for r in rewrites] == [True]


def test_fully_masked_rows_with_minus_inf_give_nan_like_eager():
    q, k, v = _qkv()
    keep = torch.rand(B, 1, L, L) > 0.4
    keep[:, :, 2] = False

    def fn(q, k, v, keep):
        return torch.softmax((q @ k.mT).masked_fill(~keep, float("-inf")), -1) @ v
    _same_as_eager(fn, (q, k, v, keep), grads=False)


NOT_MATCHED = {
    "softmax_other_dim": (lambda q, k, v: torch.softmax(q @ k.mT, -2) @ v, "softmax over dim -2"),
    "mask_after_softmax": (lambda q, k, v: torch.softmax(q @ k.mT, -1).masked_fill(~_causal_keep(), 0.0) @ v,
                           "after the softmax"),
    "data_dependent_scale": (lambda q, k, v: torch.softmax(q @ k.mT * q.abs().mean(), -1) @ v,
                             "not a constant number"),
    "probabilities_returned": (lambda q, k, v: (lambda p: (p @ v, p))(torch.softmax(q @ k.mT, -1)),
                               "also used by output"),
    "scores_reused": (lambda q, k, v: (lambda s: torch.softmax(s, -1) @ v + s.sum(-1, keepdim=True))(q @ k.mT),
                      "also used by"),
}


@pytest.mark.parametrize("form", list(NOT_MATCHED))
def test_form_left_alone_is_correct_and_says_why(form):
    fn, reason = NOT_MATCHED[form]
    rewrites, records = _same_as_eager(fn, _qkv())
    assert [r.applied for r in rewrites] == [False] and reason in rewrites[0].reason, rewrites
    for record in records:
        finalize(record)
    declined = [o for r in records for o in r.opportunities if o.pattern == "attention" and o.rewrite]
    assert declined and all(o.status == "not applied" and reason in o.reason for o in declined)


def test_explain_reports_the_attention_as_applied_with_its_form():
    q, k, v = _qkv()
    out, _, records = _compiled(FORMS["causal_masked_fill"][0], q, k, v)
    out.sum().backward()
    for record in records:
        finalize(record)
    found = [o for r in records for o in r.opportunities if o.pattern == "attention"]
    assert [(o.status, o.rewrite) for o in found] == [("applied", True)]  # the SDPA it became is the same place
    form = "scale 0.3, mask none, causal yes (top-left), GQA 1x, dropout 0"
    assert form in found[0].choice
    text = explain_records(records)
    assert form in text and "attention: matmul → softmax → matmul" in text


def test_sdpa_call_is_reported_as_pytorchs_fused_kernel():
    q, k, v = _qkv()
    rewrites, records = _same_as_eager(lambda q, k, v: F.scaled_dot_product_attention(q, k, v), (q, k, v))
    assert rewrites == []  # left as it is: it already is one fused ATen op
    for record in records:
        finalize(record)
    found = [o for r in records for o in r.opportunities if o.pattern == "attention"]
    assert [o.status for o in found] == ["applied"] and "fused attention kernel" in found[0].choice
    ops = [str(n.target) for r in records for n in r.graph.nodes]
    assert any("_scaled_dot_product_flash_attention_for_cpu_backward" in op for op in ops)
    assert not any("bmm" in op or "softmax" in op for op in ops)


def test_graph_holds_one_attention_call_and_no_softmax():
    graphs = []

    def backend(gm, example_inputs):
        fuse_attention(gm)
        graphs.append(gm)
        return gm.forward
    q, k, v = _qkv()
    fn = FORMS["padding_bias"][0]
    torch.testing.assert_close(torch.compile(fn, backend=backend)(q, k, v), fn(q, k, v))
    names = [getattr(n.target, "__name__", str(n.target)) for n in graphs[0].graph.nodes if n.op != "placeholder"]
    assert names.count("attention") == 1 and "softmax" not in names and "matmul" not in names, names


def test_3d_attention_runs_as_4d_fused_attention():
    """torch.bmm attention ([B, L, D]) reaches SDPA's fused kernel through [B, 1, L, D] views."""
    q, k, v = (t.detach().flatten(0, 1).requires_grad_() for t in _qkv())
    keep = torch.rand(B * H, L, L) > 0.3
    keep[..., 0] = True

    bias = torch.randn(L, L)  # a bias that needs a gradient takes SDPA's math path

    def fn(q, k, v, keep, bias):
        s = torch.bmm(q, k.transpose(1, 2)) * 0.3 + bias
        return torch.bmm(torch.softmax(s.masked_fill(~keep, float("-inf")), -1), v)
    rewrites, records = _same_as_eager(fn, (q, k, v, keep, bias))
    assert [r.applied for r in rewrites] == [True], rewrites
    ops = [str(n.target) for r in records for n in r.graph.nodes]
    assert any("_scaled_dot_product_flash_attention_for_cpu" in op for op in ops) and not any("bmm" in op for op in ops)


def _hf_models():
    transformers = pytest.importorskip("transformers")
    transformers.logging.set_verbosity_error()
    eager = {"attn_implementation": "eager"}
    return {
        "gpt2": lambda: transformers.GPT2LMHeadModel(transformers.GPT2Config(
            n_layer=1, n_embd=32, n_head=4, vocab_size=64, n_positions=16, resid_pdrop=0.0, embd_pdrop=0.0,
            attn_pdrop=0.0, **eager)),
        "bert": lambda: transformers.BertForMaskedLM(transformers.BertConfig(
            num_hidden_layers=1, hidden_size=32, num_attention_heads=4, intermediate_size=64, vocab_size=64,
            max_position_embeddings=16, hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0, **eager)),
        "llama": lambda: transformers.LlamaForCausalLM(transformers.LlamaConfig(
            num_hidden_layers=1, hidden_size=32, num_attention_heads=4, num_key_value_heads=1,
            intermediate_size=64, vocab_size=64, max_position_embeddings=16, **eager)),
        "t5": lambda: transformers.T5ForConditionalGeneration(transformers.T5Config(
            num_layers=1, num_decoder_layers=1, d_model=32, d_kv=8, num_heads=4, d_ff=64, vocab_size=64,
            dropout_rate=0.0, **eager)),
    }


# model -> (attentions matched, a text every match's choice has)
HF_EXPECTED = {"gpt2": (1, "mask additive"), "bert": (1, "mask additive"), "llama": (1, "GQA 4x"),
               "t5": (3, "scale 1, mask additive")}


@pytest.mark.parametrize("name", list(HF_EXPECTED))
def test_hf_model_attention_is_matched_with_eager_outputs_and_gradients(name):
    torch.manual_seed(0)
    model = _hf_models()[name]().train()  # dropout probabilities are 0: eager's and Kitsune's runs agree
    assert model.config._attn_implementation == "eager"
    tokens = torch.randint(1, 64, (2, 7))
    mask = torch.ones_like(tokens)
    mask[1, 5:] = 0  # padding: a key-padding mask
    extra = {"decoder_input_ids": tokens[:, :5]} if name == "t5" else {}

    def step(model):
        logits = model(tokens, attention_mask=mask, **extra).logits
        grads = torch.autograd.grad((logits * torch.linspace(-1, 1, logits.shape[-1])).sum(),
                                    [p for p in model.parameters() if p.requires_grad], allow_unused=True)
        return logits, grads
    want_logits, want_grads = step(model)
    compiled = torch.compile(model, backend="kitsune")
    default_sink().reset()
    got_logits, got_grads = step(compiled)
    torch.testing.assert_close(got_logits, want_logits, rtol=1e-4, atol=1e-4)
    for got, want in zip(got_grads, want_grads):
        if want is not None:
            torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-4)
    rewrites = [r for record in default_sink().records() for r in getattr(record, "rewrites", ())
                if r.pattern == "attention"]
    count, text = HF_EXPECTED[name]
    assert [r.applied for r in rewrites] == [True] * count, rewrites
    assert all(text in r.choice for r in rewrites), [r.choice for r in rewrites]


def test_torchvision_vit_keeps_sdpa_whole():
    """torchvision's ViT attends through nn.MultiheadAttention, which Dynamo keeps as one
    `F.multi_head_attention_forward` call; AOTAutograd turns it into SDPA's fused CPU kernel
    (forward and backward), which Kitsune leaves whole: nothing to rewrite, eager's values."""
    from kitsune._compat import import_torchvision
    try:
        torchvision = import_torchvision()
    except ImportError:
        pytest.skip("torchvision is not installed")
    torch.manual_seed(0)
    model = torchvision.models.VisionTransformer(image_size=32, patch_size=16, num_layers=2, num_heads=2,
                                                 hidden_dim=16, mlp_dim=32, num_classes=5, dropout=0.0,
                                                 attention_dropout=0.0)
    images = torch.randn(2, 3, 32, 32)
    params = list(model.parameters())
    want = model(images)
    want_grads = torch.autograd.grad(want.sum(), params)
    default_sink().reset()
    got = torch.compile(model, backend="kitsune")(images)
    got_grads = torch.autograd.grad(got.sum(), params)
    torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-4)
    for g, w in zip(got_grads, want_grads):
        torch.testing.assert_close(g, w, rtol=1e-4, atol=1e-4)
    targets = [str(n.target) for record in default_sink().records() if record.graph is not None
               for n in record.graph.nodes]
    assert sum("_scaled_dot_product_flash_attention_for_cpu.default" in t for t in targets) == 2
    assert sum("_scaled_dot_product_flash_attention_for_cpu_backward" in t for t in targets) == 2
    assert not any("aten.bmm" in t or "_softmax" in t for t in targets)


# SDPBackend value -> the ATen op eager's SDPA runs for it (torch.nn.attention.SDPBackend)
_FUSED_SDPA = {1: "_scaled_dot_product_flash_attention", 2: "_scaled_dot_product_efficient_attention",
               3: "_scaled_dot_product_cudnn_attention"}


@pytest.mark.skipif(not torch.cuda.is_available(), reason="SDPA's GPU kernels")
@pytest.mark.parametrize("dtype,masked", [(torch.bfloat16, False), (torch.bfloat16, True), (torch.float32, True)])
def test_sdpa_in_a_training_graph_runs_eagers_fused_kernel_on_the_gpu(dtype, masked):
    """Issue 16 item 3: the aten graphs AOTAutograd traces on fake tensors hold the fused
    kernel eager's SDPA picks for these tensors (not the math path), forward and backward."""
    from kitsune.capture.dynamo import aot_backend
    q, k, v = (torch.randn(2, 4, 128, 64, device="cuda", dtype=dtype, requires_grad=True) for _ in range(3))
    mask = None
    if masked:  # BERT's key-padding mask: [B, 1, 1, L] expanded to [B, 1, L, L]
        mask = torch.zeros(2, 1, 1, 128, device="cuda", dtype=dtype)
        mask[1, ..., 100:] = torch.finfo(dtype).min
        mask = mask.expand(2, 1, 128, 128)
    choice = int(torch._fused_sdp_choice(q, k, v, attn_mask=mask))
    if choice not in _FUSED_SDPA:
        pytest.skip(f"eager SDPA itself takes backend {choice} here")
    graphs = {}

    def keep(gm, example_inputs, kind):
        graphs[kind] = [str(n.target) for n in gm.graph.nodes]
        return gm
    fn = lambda q, k, v, mask: F.scaled_dot_product_attention(q, k, v, attn_mask=mask)  # noqa: E731
    torch.compile(fn, backend=aot_backend(keep))(q, k, v, mask).float().sum().backward()
    op = _FUSED_SDPA[choice]
    assert any(op in t and "backward" not in t for t in graphs["forward"]), graphs["forward"]
    assert any(f"{op}_backward" in t for t in graphs["backward"]), graphs["backward"]
    assert not any("bmm" in t for t in graphs["forward"] + graphs["backward"])


@pytest.mark.parametrize("shape", ["no_keys", "no_batch", "strided"])
def test_zero_size_and_non_contiguous_operands(shape):
    if shape == "strided":  # q, k, v as heads-transposed views of [B, L, H, D] projections
        q, k, v = (torch.randn(B, L, H, D).transpose(1, 2).requires_grad_() for _ in range(3))
    else:
        q, k, v = _qkv(*((B, H, L, D) if shape == "no_keys" else (0, H, L, D)))
        if shape == "no_keys":
            k, v = (t.detach()[:, :, :0].requires_grad_() for t in (k, v))
    rewrites, _ = _same_as_eager(FORMS["padding_bias" if shape == "strided" else "transpose_mul"][0], (q, k, v))
    assert [r.applied for r in rewrites] == [True], rewrites


def test_explain_lists_the_measured_attention_kernel_choices(monkeypatch):
    """The GPU's choice between the flash kernel and SDPA, with both times, reaches explain() (the
    choice itself is made on a GPU: its table is filled by hand here)."""
    import kitsune
    from kitsune.ops import attention_dispatch
    q, k, v = _qkv()
    key = attention_dispatch.config_key(q, k, v, None, None, float("-inf"), False)
    monkeypatch.setitem(attention_dispatch._CHOICES, key, ("triton", 0.081, 0.092))
    torch._dynamo.reset()
    kitsune.reset_fusion_stats()
    torch.compile(lambda q, k, v: torch.softmax(q @ k.mT * 0.25, -1) @ v, backend="kitsune")(q, k, v)
    text = explain_records(default_sink().records())
    assert "Attention kernels (chosen by measurement" in text
    assert f"{attention_dispatch.describe(key)}: Kitsune's flash kernel (kernel 0.081 ms, SDPA 0.092 ms)" in text
