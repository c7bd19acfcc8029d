"""Correctness sweep: many small real models through `torch.compile(backend="kitsune")`.

    PYTHONPATH=$PWD/src:/root/.cache/kitsune-bench-site python3 benchmarks/probes/sweep_models.py
    ... sweep_models.py --backend triton --only t5,gpt_neox     # Triton through the interpreter
    ... sweep_models.py --only vit --modes infer,train,dynamic,fp16,bf16,channels_last -v

Every model is built from a tiny config with random weights (nothing is downloaded)
and checked against eager PyTorch:

* infer: outputs under `torch.no_grad()` in eval mode;
* train: one training step in train mode (dropout off, BatchNorm in training mode):
  the loss, the output and every parameter's gradient;
* dynamic: the compiled inference model called with a second, different input size;
* channels_last / fp16 / bf16 (where the model allows): inference on that input kind.

Comparison: the largest difference relative to the reference's largest magnitude
(`--tol`, scaled up for half precision), so deep models with large activations are
judged on their scale. Kitsune's own account (`kitsune.get_fusion_stats()`) is read
after each model: runtime fallbacks and planner fallbacks whose reason looks like an
error (exception names, "failed", ...) fail the model too; warnings logged by the
"kitsune" logger are shown with `-v`.

`--backend triton` sets KITSUNE_BACKEND=triton and TRITON_INTERPRET=1 (Triton kernels
run by the interpreter on the CPU: use the tiny models, it is slow).
One line per model and mode: PASS / FAIL (what) / ERROR (exception) / SKIP (why);
then a summary.
"""
from __future__ import annotations

import argparse
import copy
import logging
import os
import re
import sys
import time
import traceback
import warnings


def _parse():
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--backend", choices=("cpu", "triton"), default="cpu")
    p.add_argument("--only", default="", help="comma-separated model names")
    p.add_argument("--modes", default="infer,train,dynamic",
                   help="comma-separated: infer,train,dynamic,channels_last,fp16,bf16")
    p.add_argument("--tol", type=float, default=2e-4, help="relative tolerance for float32")
    p.add_argument("--list", action="store_true")
    p.add_argument("-v", "--verbose", action="store_true")
    return p.parse_args()


ARGS = _parse() if __name__ == "__main__" else None
if ARGS is not None and ARGS.backend == "triton":
    os.environ["KITSUNE_BACKEND"] = "triton"
    os.environ["TRITON_INTERPRET"] = "1"

import torch  # noqa: E402
import torch.nn as nn  # noqa: E402

import kitsune  # noqa: E402

VOCAB, BATCH, TOKENS = 128, 2, 8


# --------------------------------------------------------------------------- builders

class FirstOutput(nn.Module):
    """A Hugging Face model called with keyword inputs, returning its first output."""

    def __init__(self, model):
        super().__init__()
        self.model = model

    def forward(self, **inputs):
        out = self.model(**inputs)
        return out[0] if isinstance(out, (tuple, list)) or hasattr(out, "to_tuple") else out


def _ids(batch=BATCH, length=TOKENS, mask=False):
    inputs = {"input_ids": torch.randint(1, VOCAB, (batch, length))}
    if mask:
        m = torch.ones(batch, length, dtype=torch.long)
        m[0, -2:] = 0
        inputs["attention_mask"] = m
    return inputs


def _seq2seq(batch=BATCH, length=TOKENS):
    return {"input_ids": torch.randint(1, VOCAB, (batch, length)),
            "decoder_input_ids": torch.randint(1, VOCAB, (batch, max(2, length // 2)))}


def _image(batch=BATCH, size=32, channels=3):
    return {"x": torch.randn(batch, channels, size, size)}


def _pixels(batch=BATCH, size=32, channels=3):
    return {"pixel_values": torch.randn(batch, channels, size, size)}


_COMMON = dict(hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0)
_TINY = dict(vocab_size=VOCAB, hidden_size=32, num_hidden_layers=2, num_attention_heads=4,
             intermediate_size=64, max_position_embeddings=64)
_DEC = dict(_TINY, num_key_value_heads=2, use_cache=False)


def hf(config_name, model_name, inputs, image=False, attention="sdpa", **config):
    """A builder: (module, inputs(batch, size) -> dict, kind)."""
    def build():
        import transformers
        cfg = getattr(transformers, config_name)(**config)
        cfg._attn_implementation = attention
        return FirstOutput(getattr(transformers, model_name)(cfg)), inputs, ("image" if image else "text")
    return build


def tv(name, size=32, **kwargs):
    def build():
        from kitsune._compat import import_torchvision
        models = import_torchvision().models
        model = getattr(models, name)(weights=None, num_classes=10, **kwargs)
        return model, (lambda batch=BATCH, size_=None: _image(batch, size_ or size)), "image"
    return build


def timm_model(name, size=32, **kwargs):
    def build():
        from kitsune._compat import import_torchvision
        import_torchvision()
        import timm
        model = timm.create_model(name, pretrained=False, num_classes=10, **kwargs)
        return model, (lambda batch=BATCH, size_=None: _image(batch, size_ or size)), "image"
    return build


def _text(mask=False):
    return lambda batch=BATCH, size=None: _ids(batch, size or TOKENS, mask)


def _s2s(batch=BATCH, size=None):
    return _seq2seq(batch, size or TOKENS)


def _pix(size):
    return lambda batch=BATCH, size_=None: _pixels(batch, size_ or size)


def _audio(batch=BATCH, size=None):
    return {"input_values": torch.randn(batch, 400 + 80 * ((size or TOKENS) - TOKENS))}


def _whisper(batch=BATCH, size=None):
    return {"input_features": torch.randn(batch, 16, 32),
            "decoder_input_ids": torch.randint(1, VOCAB, (batch, size or TOKENS // 2))}


class KnnModel(nn.Module):
    """kitsune.nn layers and a quantized Linear inside one compiled model."""

    def __init__(self):
        super().__init__()
        import kitsune.nn as knn
        self.norm = knn.FusedRMSNorm(32) if hasattr(knn, "FusedRMSNorm") else nn.LayerNorm(32)
        self.up = knn.FusedLinear(32, 64, activation="gelu")
        self.down = nn.Linear(64, 32)
        self.head = nn.Linear(32, 10)

    def forward(self, x):
        h = x + self.down(self.up(self.norm(x)))
        return self.head(torch.relu(h))


def knn_builder():
    return KnnModel(), (lambda batch=BATCH, size=None: {"x": torch.randn(batch, size or TOKENS, 32)}), "text"


class QuantModel(nn.Module):
    def __init__(self):
        super().__init__()
        self.a = nn.Linear(64, 128)
        self.b = nn.Linear(128, 32)

    def forward(self, x):
        return self.b(torch.nn.functional.silu(self.a(x))).softmax(-1)


def quant_builder():
    model = QuantModel()
    kitsune.quantize(model)
    return model, (lambda batch=BATCH, size=None: {"x": torch.randn(batch, size or TOKENS, 64)}), "quant"


MODELS = {
    # transformers: encoders
    "bert": hf("BertConfig", "BertModel", _text(True), **_TINY, **_COMMON),
    "distilbert": hf("DistilBertConfig", "DistilBertModel", _text(True), vocab_size=VOCAB, dim=32, n_layers=2,
                     n_heads=4, hidden_dim=64, max_position_embeddings=64, dropout=0.0, attention_dropout=0.0),
    "roberta": hf("RobertaConfig", "RobertaModel", _text(True), **_TINY, **_COMMON),
    "albert": hf("AlbertConfig", "AlbertModel", _text(True), embedding_size=16, **_TINY, **_COMMON),
    "deberta_v2": hf("DebertaV2Config", "DebertaV2Model", _text(True), attention="eager", **_TINY, **_COMMON),
    "electra": hf("ElectraConfig", "ElectraModel", _text(True), embedding_size=16, **_TINY, **_COMMON),
    # decoders
    "gpt2": hf("GPT2Config", "GPT2LMHeadModel", _text(), vocab_size=VOCAB, n_embd=32, n_layer=2, n_head=4,
               n_positions=64, resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0, use_cache=False),
    "mistral": hf("MistralConfig", "MistralForCausalLM", _text(), **_DEC, sliding_window=4),
    "llama": hf("LlamaConfig", "LlamaForCausalLM", _text(True), **_DEC),
    "phi": hf("PhiConfig", "PhiForCausalLM", _text(), **_DEC, resid_pdrop=0.0, embd_pdrop=0.0,
              partial_rotary_factor=0.5),
    "phi3": hf("Phi3Config", "Phi3ForCausalLM", _text(), **_DEC, pad_token_id=0),
    "falcon": hf("FalconConfig", "FalconForCausalLM", _text(), vocab_size=VOCAB, hidden_size=32, num_hidden_layers=2,
                 num_attention_heads=4, use_cache=False, hidden_dropout=0.0, attention_dropout=0.0),
    "gpt_neox": hf("GPTNeoXConfig", "GPTNeoXForCausalLM", _text(), **_TINY, use_cache=False,
                   hidden_dropout=0.0, attention_dropout=0.0, rotary_pct=0.5),
    "opt": hf("OPTConfig", "OPTForCausalLM", _text(True), vocab_size=VOCAB, hidden_size=32, num_hidden_layers=2,
              ffn_dim=64, num_attention_heads=4, max_position_embeddings=64, word_embed_proj_dim=32,
              dropout=0.0, attention_dropout=0.0, use_cache=False),
    "bloom": hf("BloomConfig", "BloomForCausalLM", _text(True), attention="eager", vocab_size=VOCAB, hidden_size=32, n_layer=2, n_head=4,
                hidden_dropout=0.0, attention_dropout=0.0, use_cache=False),
    "qwen2": hf("Qwen2Config", "Qwen2ForCausalLM", _text(), **_DEC),
    "qwen2_moe": hf("Qwen2MoeConfig", "Qwen2MoeForCausalLM", _text(), **_DEC, moe_intermediate_size=32,
                    shared_expert_intermediate_size=32, num_experts=4, num_experts_per_tok=2),
    "gemma": hf("GemmaConfig", "GemmaForCausalLM", _text(), **_DEC, head_dim=8),
    "gemma2": hf("Gemma2Config", "Gemma2ForCausalLM", _text(), **_DEC, head_dim=8, sliding_window=4),
    # encoder-decoder
    "t5": hf("T5Config", "T5Model", _s2s, vocab_size=VOCAB, d_model=32, d_kv=8, d_ff=64, num_layers=2,
             num_heads=4, dropout_rate=0.0, use_cache=False),
    "bart": hf("BartConfig", "BartModel", _s2s, vocab_size=VOCAB, d_model=32, encoder_layers=1, decoder_layers=1,
               encoder_attention_heads=4, decoder_attention_heads=4, encoder_ffn_dim=64, decoder_ffn_dim=64,
               max_position_embeddings=64, dropout=0.0, attention_dropout=0.0, use_cache=False),
    "whisper": hf("WhisperConfig", "WhisperModel", _whisper, vocab_size=VOCAB, d_model=32, encoder_layers=1,
                  decoder_layers=1, encoder_attention_heads=4, decoder_attention_heads=4, encoder_ffn_dim=64,
                  decoder_ffn_dim=64, num_mel_bins=16, max_source_positions=16, max_target_positions=32,
                  dropout=0.0, attention_dropout=0.0, use_cache=False),
    # vision / multimodal
    "clip_text": hf("CLIPTextConfig", "CLIPTextModel", _text(), vocab_size=VOCAB, hidden_size=32,
                    intermediate_size=64, num_hidden_layers=2, num_attention_heads=4, max_position_embeddings=64),
    "clip_vision": hf("CLIPVisionConfig", "CLIPVisionModel", _pix(32), image=True, hidden_size=32,
                      intermediate_size=64, num_hidden_layers=2, num_attention_heads=4, image_size=32, patch_size=8),
    "vit": hf("ViTConfig", "ViTModel", _pix(32), image=True, **{**_TINY, "vocab_size": None}, image_size=32,
              patch_size=8, **_COMMON),
    "swin": hf("SwinConfig", "SwinModel", _pix(32), image=True, image_size=32, patch_size=2, embed_dim=16,
               depths=[1, 1], num_heads=[2, 2], window_size=4, hidden_dropout_prob=0.0,
               attention_probs_dropout_prob=0.0, drop_path_rate=0.0),
    "convnext_hf": hf("ConvNextConfig", "ConvNextModel", _pix(32), image=True, hidden_sizes=[8, 16],
                      depths=[1, 1], num_stages=2),
    "segformer": hf("SegformerConfig", "SegformerForSemanticSegmentation", _pix(32), image=True, num_encoder_blocks=2,
                    depths=[1, 1], sr_ratios=[2, 1], hidden_sizes=[8, 16], num_attention_heads=[1, 2],
                    patch_sizes=[7, 3], strides=[4, 2], mlp_ratios=[2, 2], decoder_hidden_size=16, num_labels=3,
                    hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0, classifier_dropout_prob=0.0,
                    drop_path_rate=0.0),
    "wav2vec2": hf("Wav2Vec2Config", "Wav2Vec2Model", _audio, vocab_size=VOCAB, hidden_size=32, num_hidden_layers=2,
                   num_attention_heads=4, intermediate_size=64, conv_dim=(16, 16), conv_stride=(5, 4),
                   conv_kernel=(10, 4), num_conv_pos_embeddings=16, num_conv_pos_embedding_groups=4,
                   hidden_dropout=0.0, attention_dropout=0.0, activation_dropout=0.0, feat_proj_dropout=0.0,
                   layerdrop=0.0, mask_time_prob=0.0, do_stable_layer_norm=False, feat_extract_norm="group"),
    # torchvision
    "resnet18": tv("resnet18"),
    "resnext": tv("resnext50_32x4d"),
    "densenet121": tv("densenet121"),
    "inception_v3": tv("inception_v3", size=75, aux_logits=False, init_weights=False),
    "shufflenet_v2": tv("shufflenet_v2_x0_5"),
    "regnet": tv("regnet_y_400mf", size=64),
    "squeezenet": tv("squeezenet1_1", size=64),
    "swin_t": tv("swin_t"),
    "convnext_tiny": tv("convnext_tiny"),
    "efficientnet_b0": tv("efficientnet_b0", size=64),  # training BatchNorm over 2x1x1 values is ill-conditioned
    "mnasnet": tv("mnasnet0_5"),
    "mobilenet_v3": tv("mobilenet_v3_small"),
    # timm
    "timm_vit": timm_model("vit_tiny_patch16_224", img_size=32, patch_size=8, depth=2),
    "timm_convnext": timm_model("convnext_atto"),
    "timm_resnet": timm_model("resnet10t"),
    "timm_efficientformer": timm_model("efficientformerv2_s0", img_size=64, size=64),
    # kitsune's own layers
    "kitsune_nn": knn_builder,
    "kitsune_quantize": quant_builder,
}

# models whose inputs have no sequence/image size to vary (dynamic mode varies the batch)
IMAGE_MODES = ("channels_last",)


# --------------------------------------------------------------------------- checks

BUG_WORDS = re.compile(r"Error|error|failed|Traceback|exception|Exception|list index|not subscriptable|"
                       r"unexpected|assert", re.S)


class LogCatcher(logging.Handler):
    def __init__(self):
        super().__init__(logging.WARNING)
        self.messages = []

    def emit(self, record):
        self.messages.append(record.getMessage())


def _tensors(value):
    if isinstance(value, torch.Tensor):
        return [value]
    if isinstance(value, dict):
        return [t for v in value.values() for t in _tensors(v)]
    if isinstance(value, (tuple, list)):
        return [t for v in value for t in _tensors(v)]
    if hasattr(value, "to_tuple"):
        return _tensors(value.to_tuple())
    return []


def rel_error(actual, expected, floor=0.0) -> float:
    if actual.shape != expected.shape:
        return float("inf")
    if actual.numel() == 0:
        return 0.0
    a, e = actual.detach().double(), expected.detach().double()
    nan = torch.isnan(a) != torch.isnan(e)
    if nan.any():
        return float("inf")
    finite = ~torch.isnan(e)
    scale = max(e[finite].abs().max().item() if finite.any() else 1.0, floor)
    return (a[finite] - e[finite]).abs().max().item() / max(scale, 1e-6) if finite.any() else 0.0


def judge(got, want, exact, tol, floor=0.0):
    """None if `got` (Kitsune) matches `want` (eager, same dtype), else what is wrong.
    With `exact` (eager in float64) a larger difference passes when Kitsune is as
    close to float64 as eager is (ill-conditioned models: BatchNorm over few values)."""
    direct = rel_error(got, want, floor)
    if direct <= tol:
        return None
    if exact is not None:
        mine, theirs = rel_error(got, exact, floor), rel_error(want, exact, floor)
        if mine <= 3 * theirs + tol:
            return None
        return f"rel err {direct:.2e} (float64: kitsune {mine:.2e}, eager {theirs:.2e})"
    return f"rel err {direct:.2e}"


def compare(actual, expected, tol, what, exact=None):
    got, want = _tensors(actual), _tensors(expected)
    exact = _tensors(exact) if exact is not None else [None] * len(want)
    if len(got) != len(want):
        return [f"{what}: {len(got)} outputs, eager {len(want)}"]
    bad = [(judge(g, w, x, tol), i) for i, (g, w, x) in enumerate(zip(got, want, exact)) if w.is_floating_point()]
    return [f"{what}[{i}] {why}" for why, i in bad if why][:3]


def _double(model, inputs):
    """(model in float64, its inputs in float64), or (None, None) if it has no float64 form."""
    try:
        return copy.deepcopy(model).double(), {k: v.double() if v.is_floating_point() else v
                                               for k, v in inputs.items()}
    except Exception:  # noqa: BLE001
        return None, None


def _no_dropout(model):
    for m in model.modules():
        if isinstance(m, nn.Dropout) or type(m).__name__ in ("Dropout", "StochasticDepth", "DropPath"):
            if hasattr(m, "p"):
                m.p = 0.0
            if hasattr(m, "drop_prob"):
                m.drop_prob = 0.0
    return model


def _cast(inputs, dtype=None, channels_last=False):
    out = {}
    for k, v in inputs.items():
        if v.is_floating_point():
            if dtype is not None:
                v = v.to(dtype)
            if channels_last and v.dim() == 4:
                v = v.contiguous(memory_format=torch.channels_last)
        out[k] = v
    return out


def run_infer(model, inputs_fn, kind, mode, tol):
    model = model.eval()
    dtype = {"fp16": torch.float16, "bf16": torch.bfloat16}.get(mode)
    if dtype is not None:
        if kind == "quant":
            return "SKIP", "quantized model"
        model = model.to(dtype)
        tol = 2e-2 if dtype == torch.float16 else 5e-2
    if mode == "channels_last":
        if kind != "image":
            return "SKIP", "no image input"
        model = model.to(memory_format=torch.channels_last)
    compiled = torch.compile(model, backend="kitsune")
    calls = [inputs_fn()]
    if mode == "dynamic":
        calls.append(_dynamic_inputs(inputs_fn, kind))
        calls.append(_dynamic_inputs(inputs_fn, kind, batch=True))
    problems = []
    exact_model = None
    for n, inputs in enumerate(calls):
        inputs = _cast(inputs, dtype, mode == "channels_last")
        if n == 0:
            exact_model, _ = _double(model, inputs)
        with torch.no_grad():
            want = model(**inputs)
            got = compiled(**inputs)
            try:
                exact = exact_model(**_double(nn.Identity(), inputs)[1]) if exact_model is not None else None
            except RuntimeError:  # an op without float64 (grouped_mm)
                exact = exact_model = None
        problems += compare(got, want, tol, f"call{n}", exact)
    return ("FAIL", "; ".join(problems)) if problems else ("PASS", "")


def _dynamic_inputs(inputs_fn, kind, batch=False):
    if batch:
        return inputs_fn(batch=BATCH + 1)
    if kind == "image":
        try:
            return inputs_fn(BATCH, 64)
        except TypeError:
            return inputs_fn(BATCH)
    return inputs_fn(BATCH, TOKENS + 4)


def run_train(model, inputs_fn, kind, tol):
    if kind == "quant":
        return "SKIP", "quantized weights are not trained"
    model = _no_dropout(model.train())
    reference = copy.deepcopy(model)
    inputs = inputs_fn()
    exact_model, exact_inputs = _double(model, inputs)
    compiled = torch.compile(model, backend="kitsune")
    torch.manual_seed(1)
    want = reference(**inputs)
    torch.manual_seed(1)
    got = compiled(**inputs)
    exact = None
    if exact_model is not None:
        torch.manual_seed(1)
        try:
            exact = exact_model(**exact_inputs)
        except RuntimeError:  # an op without float64 (grouped_mm)
            exact_model = None
    problems = compare(got, want, tol, "output", exact)
    weights = [torch.randn_like(t) for t in _tensors(want) if t.is_floating_point()]
    for outputs in (want, got, exact):
        if outputs is not None:
            sum((t * w.to(t.dtype)).sum() for t, w in zip(_tensors(outputs), weights)
                if t.is_floating_point()).backward()
    ref_params = dict(reference.named_parameters())
    exact_params = dict(exact_model.named_parameters()) if exact_model is not None else {}
    exact_buffers = dict(exact_model.named_buffers()) if exact_model is not None else {}
    grad_tol = tol * 10
    # a gradient that is zero but for rounding (a BatchNorm's bias followed by a
    # convolution and another BatchNorm) is judged on the model's gradient scale
    floor = 1e-3 * max((q.grad.abs().max().item() for q in ref_params.values() if q.grad is not None), default=0)
    bad = []
    for name, p in model.named_parameters():
        q = ref_params[name]
        if q.grad is None and p.grad is None:
            continue
        if (q.grad is None) != (p.grad is None):
            bad.append(f"{name}: grad None mismatch")
            continue
        x = exact_params[name].grad if name in exact_params else None
        why = judge(p.grad, q.grad, x, grad_tol, floor)
        if why:
            bad.append(f"{name} grad {why}")
    for name, buf in model.named_buffers():  # BatchNorm running stats
        ref = dict(reference.named_buffers())[name]
        why = judge(buf, ref, exact_buffers.get(name), tol) if buf.is_floating_point() else None
        if why:
            bad.append(f"buffer {name} {why}")
    problems += bad[:4]
    if len(bad) > 4:
        problems.append(f"... {len(bad)} bad grads")
    return ("FAIL", "; ".join(problems)) if problems else ("PASS", "")


def kitsune_problems():
    stats = kitsune.get_fusion_stats()
    problems = []
    for kernel, reason, calls in [tuple(r) if isinstance(r, (tuple, list)) else (r, "", 0)
                                  for r in stats["runtime_fallbacks"]]:
        problems.append(f"runtime fallback {kernel}: {reason} x{calls}")
    for where, reason in stats["fallbacks"]:
        if BUG_WORDS.search(str(reason)):
            problems.append(f"fallback {str(where)[:60]}: {str(reason)[:200]}")
    return problems, stats


def run_one(name, mode, tol, verbose):
    torch._dynamo.reset()
    kitsune.reset_fusion_stats()
    torch.manual_seed(0)
    catcher = LogCatcher()
    logging.getLogger("kitsune").addHandler(catcher)
    start = time.time()
    try:
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            model, inputs_fn, kind = MODELS[name]()
            if mode == "train":
                verdict, why = run_train(model, inputs_fn, kind, tol)
            else:
                verdict, why = run_infer(model, inputs_fn, kind, mode, tol)
    except ImportError as error:
        verdict, why = "SKIP", f"ImportError: {error}"
    except Exception as error:  # noqa: BLE001 - a sweep reports every failure
        verdict, why = "ERROR", f"{type(error).__name__}: {str(error)[:300]}"
        if verbose:
            traceback.print_exc()
        caught = []
    finally:
        logging.getLogger("kitsune").removeHandler(catcher)
    if verdict in ("PASS", "FAIL"):
        problems, stats = kitsune_problems()
        if problems:
            verdict = "FAIL" if verdict == "PASS" else verdict
            why = "; ".join(filter(None, [why] + problems[:4]))
    kitsune_warnings = [str(w.message) for w in caught if "kitsune" in str(w.filename)] + catcher.messages
    seconds = time.time() - start
    print(f"{name:22s} {mode:14s} {verdict:5s} {seconds:6.1f}s  {why[:600]}", flush=True)
    if verbose:
        for message in dict.fromkeys(kitsune_warnings):
            print(f"    warning: {message[:300]}")
        if verdict in ("PASS", "FAIL"):
            stats = kitsune.get_fusion_stats()
            for where, reason in stats["fallbacks"][:12]:
                print(f"    fallback {str(where)[:60]}: {str(reason)[:160]}")
    return verdict, why


def main():
    args = ARGS
    if args.list:
        print("\n".join(MODELS))
        return 0
    torch.set_num_threads(1)
    try:  # before transformers, which imports torchvision where it is installed
        from kitsune._compat import import_torchvision
        import_torchvision()
    except ImportError:
        pass
    names = [n for n in args.only.split(",") if n] or list(MODELS)
    unknown = [n for n in names if n not in MODELS]
    if unknown:
        sys.exit(f"--only: unknown model(s) {unknown}; --list shows them")
    modes = [m for m in args.modes.split(",") if m]
    results = {}
    for name in names:
        for mode in modes:
            results[(name, mode)] = run_one(name, mode, args.tol, args.verbose)
    counts = {}
    for verdict, _ in results.values():
        counts[verdict] = counts.get(verdict, 0) + 1
    print(f"\nsummary ({args.backend}): " + ", ".join(f"{k} {v}" for k, v in sorted(counts.items())))
    for (name, mode), (verdict, why) in results.items():
        if verdict in ("FAIL", "ERROR"):
            print(f"  {verdict} {name} {mode}: {why[:300]}")
    return 1 if any(v in ("FAIL", "ERROR") for v, _ in results.values()) else 0


if __name__ == "__main__":
    sys.exit(main())
