"""Whole models at full size: eager vs Inductor vs Kitsune, side by side in one process
(issue 15's targets are measured with it).

    python3 benchmarks/bench_models.py --json models.json                # every case (GPU: ~10 min)
    python3 benchmarks/bench_models.py --cases resnet50,gpt2_train_hf_1024
    python3 benchmarks/bench_models.py --tiny --device cpu --no-inductor  # does it run? (CPU, minutes)
    bash benchmarks/run_models_gpu.sh                                     # the device-machine command

Cases (random weights built from configs, nothing is downloaded; "inference" is
`model.eval()` under `torch.no_grad()`):

    linear_gelu         kernel: F.gelu(x @ W.T + b), exact GELU, bf16, x [16384, 4096],
                        W [4096, 4096] (an nn.Linear and F.gelu in a small nn.Module)
    resnet50            torchvision ResNet-50, fp32, batch 64, 224x224, channels-last
    mobilenet_v3_large  torchvision MobileNetV3-large, fp32, batch 128, 224x224, channels-last
    gpt2                GPT-2 small (GPT2LMHeadModel, default GPT2Config, dropout 0), bf16,
                        8 x 512 tokens; output: the logits
    llama               LlamaForCausalLM, 8 layers, hidden 2048, 16 heads, 4 key/value heads
                        (GQA), intermediate 5504, vocabulary 32000, bf16, 8 x 512; the logits
    bert                BERT-base (BertForMaskedLM, default BertConfig, dropout 0), bf16,
                        32 x 128 tokens; the MLM logits
    vit_b_16            torchvision ViT-B/16, bf16, batch 32, 224x224; the class logits
    gpt2_train_hf       GPT-2 small training step, 8 x 256 tokens: fp32 weights, bf16 autocast,
                        loss = HF's own `model(input_ids, labels=labels).loss` (it shifts the
                        labels and upcasts the logits to float32)
    gpt2_train_hf_1024  gpt2_train_hf at 8 x 1024 tokens (the peak-memory target)
    gpt2_train_ce_1024  the same step at 8 x 1024, loss = F.cross_entropy(logits.view(-1, V),
                        labels.view(-1)) from `model(input_ids).logits` (no shift)
    gpt2_train_ce       gpt2_train_ce_1024 at 8 x 256 tokens

They run in this order (the cheap kernel first, the case most worth losing to a
`--budget-s` last).

A training step is `zero_grad(set_to_none=True)`, the forward with its loss
(both inside the compiled module: an nn.Module wrapping the model and the
loss, so a backend can fuse the LM head into the loss), `loss.backward()`
and a plain SGD step (lr 1e-4, no momentum: no optimizer state), eager in
every backend. Each backend trains its own deep copy of the same initial
weights on the same tokens and labels.

Without torchvision (it is imported through `kitsune._compat.import_torchvision`,
which works around the CUDA wheel on a CPU torch), resnet50 falls back to
transformers' ResNetForImageClassification (the ResNet-50 config), vit_b_16 to
transformers' ViTModel (the B/16 config; its last hidden state), and
mobilenet_v3_large is skipped; the reason is printed either way. `--tiny`
shrinks every case (two-layer transformers of width 64, vocabulary 1000, 2 x
32 tokens; one-block-per-stage ResNet, MobileNetV3-large at width 0.25, 32x32
images, batch 2; a 256 x 128 linear) with the same dtypes, so the whole
benchmark runs on the CPU in a minute or two: a check that it runs; its
numbers mean nothing.

Method:

* One process; per case the backends run one after the other: eager,
  `torch.compile(m, dynamic=False)` (Inductor, default mode) and
  `torch.compile(m, backend="kitsune", dynamic=False)`. Before each backend
  `common.cold_start()`: `torch._dynamo.reset()`, Inductor's in-memory caches
  emptied and fresh, empty on-disk caches (PyTorch's compile caches are off),
  so "compile s" is the wall time of a cold first call (Dynamo, AOTAutograd,
  the backend, any measuring the backend does on the first inputs, one run).
  A throwaway compile per backend at start pays the one-time costs (imports,
  Inductor's compile workers). Every case builds its model and fresh random
  inputs (seeded) anew.
* Correctness, before timing and never silent: the first call's output (for a
  training step: the first step's loss and every parameter's gradient) is
  compared with eager's, computed once per case before any backend runs. The
  figure is the relative L2 error ||out - eager|| / ||eager|| (a training
  step: the larger of the loss's and that of all gradients together; the
  worst single parameter's is printed but not judged, since a tiny
  parameter's gradient in bf16 can differ by several percent), with
  the tolerance printed next to it: 2e-2 for bf16 outputs and bf16 autocast,
  1e-2 for fp32 on CUDA when cuDNN may use TF32 for convolutions (PyTorch's
  default), 1e-4 for fp32 otherwise; the largest absolute difference is
  printed too. A backend outside the tolerance is still timed, marked FAIL,
  and left out of the geometric mean.
* Time: `common.time_ms`: a warm-up (at least 5 calls, 8 for training steps,
  and 200 ms; Kitsune records its CUDA graphs in it; --tiny: 2 calls), then
  the median of `--repeats` calls, each between a CUDA event pair (on the
  CPU: `time.perf_counter` around each call, one thread).
* GPU busy time (CUDA): the kernels' own time per call (`common.gpu_busy_ms`:
  PyTorch's profiler, every kernel's and copy's device time summed, over up
  to 20 calls after the timed ones). Inductor's default mode launches every
  kernel from Python while Kitsune replays CUDA graphs, so where the host is
  slower than the kernels the wall time measures the host; the GPU busy time
  compares the kernels. Both ratios are reported (issue 15's GPT-2 and BERT
  figures match the GPU busy times of bench_reductions.py).
* Memory (CUDA): `torch.cuda.max_memory_allocated()` over the warm-up and
  timed calls, minus what was allocated just before the backend's first call
  (the model, its inputs, eager's reference results): "peak MiB above the
  model". It includes what a backend keeps between calls (CUDA-graph
  recordings are made in the warm-up, so their memory is counted while they
  are recorded) and, for training, the gradients. The first call's peak
  (compile-time measuring included) and the same figures from
  `max_memory_reserved()` are in the JSON.
* Kitsune's account after its first call (`kitsune.get_fusion_stats()`):
  kernels per call, fused groups, patterns detected/applied, fallbacks, and
  any warning it logged while the case ran.

Output: per case, a table with a line per backend (ms, vs Kitsune, GPU busy
ms, compile s, peak MiB, error vs eager and tolerance) and the case's elapsed
time; at the end a markdown table with a row per case and the geometric means
of Inductor time / Kitsune time (> 1: Kitsune faster; wall and GPU busy) over
the seven models of issue 15's table: resnet50, mobilenet_v3_large, gpt2, llama, bert, vit_b_16 and
gpt2_train_hf (the training step at 8 x 256). `--json PATH` is rewritten
after every case, so an interrupted run keeps what it measured.
"""
from __future__ import annotations

import argparse
import copy
import gc
import logging
import math
import sys
import time
import traceback
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

sys.path.insert(0, str(Path(__file__).resolve().parent))

import common  # noqa: E402

common.use_private_caches()

import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402

GEOMEAN_CASES = ("resnet50", "mobilenet_v3_large", "gpt2", "llama", "bert", "vit_b_16", "gpt2_train_hf")


class Skip(Exception):
    """A case that cannot run here (a package missing), with the reason."""


# --------------------------------------------------------------------------- models

@dataclass
class Built:
    """A case's module and inputs, ready on the device."""
    model: torch.nn.Module
    inputs: dict                      # keyword arguments of model(...)
    shape: str                        # what the inputs are, for the table
    source: str                       # which implementation (torchvision, transformers fallback)
    out_dtype: torch.dtype            # the output's dtype, for the tolerance
    training: bool = False


class FirstOutput(torch.nn.Module):
    """A Hugging Face model returning its first output as a tensor (the logits, or the
    last hidden state), so every case's module returns one tensor."""

    def __init__(self, model):
        super().__init__()
        self.model = model

    def forward(self, **inputs):
        return self.model(**inputs)[0]


class LinearGelu(torch.nn.Module):
    """The kernel case: an nn.Linear (bias) followed by the exact GELU."""

    def __init__(self, features_in: int, features_out: int):
        super().__init__()
        self.linear = torch.nn.Linear(features_in, features_out)

    def forward(self, x):
        return F.gelu(self.linear(x))


class LMLoss(torch.nn.Module):
    """A causal LM and its loss in one module, so the compiled graph holds both:
    "hf" is the model's own loss (`labels=`), "ce" is F.cross_entropy on its logits."""

    def __init__(self, model, variant: str):
        super().__init__()
        self.model, self.variant = model, variant

    def forward(self, input_ids, labels):
        if self.variant == "hf":
            return self.model(input_ids=input_ids, labels=labels).loss
        logits = self.model(input_ids=input_ids).logits
        return F.cross_entropy(logits.view(-1, logits.size(-1)), labels.view(-1))


def _generator(device) -> torch.Generator:
    return torch.Generator(device=device).manual_seed(0)


def _images(device, batch, size, dtype, channels_last=False) -> torch.Tensor:
    x = torch.randn(batch, 3, size, size, generator=_generator(device), device=device, dtype=dtype)
    return x.contiguous(memory_format=torch.channels_last) if channels_last else x


def _tokens(device, batch, length, vocab) -> torch.Tensor:
    return torch.randint(0, vocab, (batch, length), generator=_generator(device), device=device)


def _torchvision():
    """torchvision, or None and why not."""
    try:
        from kitsune._compat import import_torchvision
        return import_torchvision(), None
    except ImportError as error:
        return None, f"torchvision does not import ({error})"


def _transformers():
    try:
        import transformers
    except ImportError as error:
        raise Skip(f"transformers does not import ({error})") from error
    transformers.logging.set_verbosity_error()
    return transformers


def _on(model, device, dtype, channels_last=False):
    model = model.to(device=device, dtype=dtype).eval()
    return model.to(memory_format=torch.channels_last) if channels_last else model


def build_resnet50(device, tiny: bool) -> Built:
    batch, size = (2, 32) if tiny else (64, 224)
    tv, why_not = _torchvision()
    if tv is not None:
        from torchvision.models.resnet import Bottleneck, ResNet
        model = ResNet(Bottleneck, [1, 1, 1, 1], num_classes=10) if tiny else tv.models.resnet50(weights=None)
        source = "torchvision resnet50" + (" (tiny: one bottleneck per stage)" if tiny else "")
    else:
        transformers = _transformers()
        small = dict(embedding_size=16, hidden_sizes=[32, 64, 128, 256], depths=[1, 1, 1, 1]) if tiny else {}
        model = transformers.ResNetForImageClassification(transformers.ResNetConfig(num_labels=1000, **small))
        model = FirstOutput(model)
        source = f"transformers ResNetForImageClassification, ResNet-50 config ({why_not})"
    model = _on(model, device, torch.float32, channels_last=True)
    key = "x" if tv is not None else "pixel_values"
    return Built(model, {key: _images(device, batch, size, torch.float32, channels_last=True)},
                 f"{batch}x3x{size}x{size} fp32 channels-last", source, torch.float32)


def build_mobilenet(device, tiny: bool) -> Built:
    tv, why_not = _torchvision()
    if tv is None:
        raise Skip(f"{why_not}; no fallback for MobileNetV3-large")
    batch, size = (2, 32) if tiny else (128, 224)
    model = tv.models.mobilenet_v3_large(weights=None, **(dict(width_mult=0.25, num_classes=10) if tiny else {}))
    model = _on(model, device, torch.float32, channels_last=True)
    return Built(model, {"x": _images(device, batch, size, torch.float32, channels_last=True)},
                 f"{batch}x3x{size}x{size} fp32 channels-last",
                 "torchvision mobilenet_v3_large" + (" (tiny: width 0.25)" if tiny else ""), torch.float32)


TINY_GPT2 = dict(n_layer=2, n_embd=64, n_head=2, n_positions=128, vocab_size=1000)


def gpt2_config(tiny: bool):
    return _transformers().GPT2Config(attn_pdrop=0.0, embd_pdrop=0.0, resid_pdrop=0.0, use_cache=False,
                                      **(TINY_GPT2 if tiny else {}))


def build_gpt2(device, tiny: bool) -> Built:
    config = gpt2_config(tiny)
    batch, length = (2, 32) if tiny else (8, 512)
    model = _on(FirstOutput(_transformers().GPT2LMHeadModel(config)), device, torch.bfloat16)
    return Built(model, {"input_ids": _tokens(device, batch, length, config.vocab_size)},
                 f"{batch}x{length} tokens bf16", "transformers GPT2LMHeadModel", torch.bfloat16)


def build_llama(device, tiny: bool) -> Built:
    transformers = _transformers()
    size = dict(hidden_size=64, intermediate_size=172, num_hidden_layers=2, num_attention_heads=4,
                num_key_value_heads=2, vocab_size=1000, max_position_embeddings=128) if tiny else \
        dict(hidden_size=2048, intermediate_size=5504, num_hidden_layers=8, num_attention_heads=16,
             num_key_value_heads=4, vocab_size=32000, max_position_embeddings=2048)
    config = transformers.LlamaConfig(use_cache=False, **size)
    batch, length = (2, 32) if tiny else (8, 512)
    model = _on(FirstOutput(transformers.LlamaForCausalLM(config)), device, torch.bfloat16)
    return Built(model, {"input_ids": _tokens(device, batch, length, config.vocab_size)},
                 f"{batch}x{length} tokens bf16",
                 f"transformers LlamaForCausalLM, {config.num_hidden_layers} layers, hidden {config.hidden_size}, "
                 f"{config.num_attention_heads} heads / {config.num_key_value_heads} kv", torch.bfloat16)


def build_bert(device, tiny: bool) -> Built:
    transformers = _transformers()
    small = dict(num_hidden_layers=2, hidden_size=64, num_attention_heads=2, intermediate_size=128,
                 vocab_size=1000) if tiny else {}
    config = transformers.BertConfig(hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0, **small)
    batch, length = (2, 32) if tiny else (32, 128)
    model = _on(FirstOutput(transformers.BertForMaskedLM(config)), device, torch.bfloat16)
    return Built(model, {"input_ids": _tokens(device, batch, length, config.vocab_size)},
                 f"{batch}x{length} tokens bf16", "transformers BertForMaskedLM", torch.bfloat16)


def build_vit(device, tiny: bool) -> Built:
    batch, size = (2, 32) if tiny else (32, 224)
    tv, why_not = _torchvision()
    if tv is not None:
        from torchvision.models.vision_transformer import VisionTransformer
        model = VisionTransformer(image_size=32, patch_size=16, num_layers=2, num_heads=2, hidden_dim=64,
                                  mlp_dim=128, num_classes=10) if tiny else tv.models.vit_b_16(weights=None)
        source, key = "torchvision vit_b_16" + (" (tiny: 2 layers, width 64)" if tiny else ""), "x"
    else:
        transformers = _transformers()
        small = dict(image_size=32, hidden_size=64, num_hidden_layers=2, num_attention_heads=2,
                     intermediate_size=128) if tiny else {}
        model = FirstOutput(transformers.ViTModel(transformers.ViTConfig(**small), add_pooling_layer=False))
        source, key = f"transformers ViTModel, B/16 config, last hidden state ({why_not})", "pixel_values"
    model = _on(model, device, torch.bfloat16)
    return Built(model, {key: _images(device, batch, size, torch.bfloat16)}, f"{batch}x3x{size}x{size} bf16",
                 source, torch.bfloat16)


def build_linear_gelu(device, tiny: bool) -> Built:
    rows, features = (256, 128) if tiny else (16384, 4096)
    torch.manual_seed(0)
    model = _on(LinearGelu(features, features), device, torch.bfloat16)
    x = torch.randn(rows, features, generator=_generator(device), device=device, dtype=torch.bfloat16)
    return Built(model, {"x": x}, f"{rows}x{features} @ ({features}x{features})^T bf16",
                 "nn.Linear + F.gelu (exact)", torch.bfloat16)


def training_builder(variant: str, length: int):
    """A builder of the GPT-2 small training step with loss `variant` ("hf" or "ce") on
    8 x `length` tokens (tiny: 2 x 32, or 2 x 64 for the long variant)."""
    def build(device, tiny: bool) -> Built:
        config = gpt2_config(tiny)
        batch, tokens = (2, 32 if length <= 256 else 64) if tiny else (8, length)
        model = LMLoss(_transformers().GPT2LMHeadModel(config), variant).to(device)  # fp32 weights
        inputs = {"input_ids": _tokens(device, batch, tokens, config.vocab_size),
                  "labels": _tokens(device, batch, tokens, config.vocab_size).roll(1, 0)}
        loss = "HF labels= loss" if variant == "hf" else "F.cross_entropy(logits.view(-1, V), labels.view(-1))"
        return Built(model, inputs, f"{batch}x{tokens} tokens, bf16 autocast",
                     f"transformers GPT2LMHeadModel, {loss}, SGD step", torch.bfloat16, training=True)
    return build


@dataclass
class Case:
    build: Callable[[torch.device, bool], Built]
    kind: str          # "kernel", "inference" or "training"


CASES = {  # run in this order: the one most likely cut by a time budget comes last
    "linear_gelu": Case(build_linear_gelu, "kernel"),
    "resnet50": Case(build_resnet50, "inference"),
    "mobilenet_v3_large": Case(build_mobilenet, "inference"),
    "gpt2": Case(build_gpt2, "inference"),
    "llama": Case(build_llama, "inference"),
    "bert": Case(build_bert, "inference"),
    "vit_b_16": Case(build_vit, "inference"),
    "gpt2_train_hf": Case(training_builder("hf", 256), "training"),
    "gpt2_train_hf_1024": Case(training_builder("hf", 1024), "training"),
    "gpt2_train_ce_1024": Case(training_builder("ce", 1024), "training"),
    "gpt2_train_ce": Case(training_builder("ce", 256), "training"),
}


# --------------------------------------------------------------------------- checks

def tolerance(dtype: torch.dtype, device: torch.device) -> float:
    """Relative L2 error allowed against eager (see the module docstring)."""
    if dtype in (torch.bfloat16, torch.float16):
        return 2e-2
    if device.type == "cuda" and torch.backends.cudnn.allow_tf32:
        return 1e-2
    return 1e-4


def relative_l2(outs, refs) -> float:
    """||outs - refs|| / ||refs|| over all the tensors together, in float64 (NaN when a
    result has a NaN or Inf that the reference lacks)."""
    diff = total = 0.0
    for out, ref in zip(outs, refs):
        out64, ref64 = out.double(), ref.double()
        if not torch.isfinite(out64).eq(torch.isfinite(ref64)).all():
            return float("nan")
        diff += (out64 - ref64).pow(2).sum().item()
        total += ref64.pow(2).sum().item()
    return math.sqrt(diff) / max(math.sqrt(total), 1e-300)


def check(outs: dict, refs: dict, tol: float) -> dict:
    """Error of a backend's results against eager's. `outs` and `refs` map a group name
    ("output"; "loss" and "gradients" for a training step) to a list of tensors; each
    group's relative L2 error is taken over its tensors together, and the check passes
    when the largest of them is within `tol` (a NaN fails). Also the largest absolute
    difference and, for groups of several tensors, the worst single tensor's error."""
    result = dict(tol=tol, groups={})
    for group, ref in refs.items():
        out = outs[group]
        if [tuple(o.shape) for o in out] != [tuple(r.shape) for r in ref]:
            result["groups"][group] = dict(rel_l2=float("nan"), why="shapes differ from eager's")
            continue
        entry = dict(rel_l2=relative_l2(out, ref),
                     max_abs=max(((o.double() - r.double()).abs().max().item() for o, r in zip(out, ref)
                                  if r.numel()), default=0.0))
        if len(ref) > 1:
            entry["worst_tensor_rel_l2"] = max(relative_l2([o], [r]) for o, r in zip(out, ref))
        result["groups"][group] = entry
    errors = [g["rel_l2"] for g in result["groups"].values()]
    result["rel_l2"] = float("nan") if any(math.isnan(e) for e in errors) else max(errors, default=0.0)
    result["max_abs"] = max((g.get("max_abs", float("nan")) for g in result["groups"].values()), default=0.0)
    result["ok"] = bool(result["rel_l2"] <= tol)
    return result


# --------------------------------------------------------------------------- memory

def fresh_memory(device: torch.device) -> None:
    gc.collect()
    if device.type == "cuda":
        torch.cuda.synchronize(device)
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats(device)


class MemoryMeter:
    """Peak allocated and reserved memory above a baseline taken at construction (CUDA only;
    all figures None on the CPU)."""

    def __init__(self, device: torch.device):
        self.cuda = device.type == "cuda"
        self.device = device
        if self.cuda:
            self.allocated0 = torch.cuda.memory_allocated(device)
            self.reserved0 = torch.cuda.memory_reserved(device)

    def restart(self) -> None:
        if self.cuda:
            torch.cuda.synchronize(self.device)
            torch.cuda.reset_peak_memory_stats(self.device)

    def peaks_mib(self) -> dict:
        if not self.cuda:
            return dict(peak_mib=None, peak_reserved_mib=None)
        torch.cuda.synchronize(self.device)
        return dict(peak_mib=(torch.cuda.max_memory_allocated(self.device) - self.allocated0) / 2**20,
                    peak_reserved_mib=(torch.cuda.max_memory_reserved(self.device) - self.reserved0) / 2**20)


# --------------------------------------------------------------------------- one backend

def compiled(module: torch.nn.Module, backend: str):
    return module if backend == "eager" else torch.compile(module, backend=backend, dynamic=False)


def kitsune_account() -> dict:
    """What Kitsune says it did with the graphs it compiled since the last reset."""
    import kitsune
    try:
        stats = kitsune.get_fusion_stats()
    except Exception as error:  # noqa: BLE001 - the report must not lose the timing
        return {"error": f"{type(error).__name__}: {error}"}
    patterns = stats.get("patterns") or {}
    return dict(graphs=stats.get("graphs"), kernels_before=stats.get("kernels_before"),
                kernels_after=stats.get("kernels_after"), fused_groups=stats.get("num_fused"),
                patterns={name: dict(counts) for name, counts in patterns.items()},
                fallbacks=[str(f)[:300] for f in (stats.get("fallbacks") or [])][:40],
                runtime_fallbacks=[str(f)[:300] for f in (stats.get("runtime_fallbacks") or [])][:40])


def run_backend(backend: str, make_call, reference: dict, tol: float, args, warmup_calls: int) -> dict:
    """Compile (first call), check against eager, time and measure one backend.
    `make_call(backend)` returns (call, results): call() runs one call or step and
    returns its output; results(first output) gives the groups of tensors compared
    with `reference` (see `check`)."""
    import kitsune
    common.cold_start()
    kitsune.reset_fusion_stats()
    fresh_memory(args.device)
    warnings = common.WarningCollector()
    logging.getLogger("kitsune").addHandler(warnings)
    try:
        call, results = make_call(backend)
        meter = MemoryMeter(args.device)  # after make_call: a training step's own copy of the model is held
        meter.restart()
        seconds, first = common.cold_call(call, device=args.device)
        entry = dict(first_call_s=round(seconds, 3), first_call_peak=meter.peaks_mib())
        entry["check"] = check(results(first), reference, tol)
        del first
        if backend == "kitsune":
            entry["kitsune"] = kitsune_account()
        meter.restart()
        timing = common.time_ms(call, args.device, args.repeats, warmup_ms=0.0 if args.tiny else 200.0,
                                min_warmup_calls=2 if args.tiny else warmup_calls)
        entry.update(timing=timing.as_dict(), ms=timing.median_ms, **meter.peaks_mib())
        if args.device.type == "cuda":
            entry["gpu_busy_ms"] = gpu_busy(call, args.repeats)
    finally:
        logging.getLogger("kitsune").removeHandler(warnings)
    if warnings.messages:
        entry["kitsune_warnings"] = [m[:300] for m in warnings.messages[:20]]
    return entry


def gpu_busy(call, repeats: int) -> float | None:
    """`common.gpu_busy_ms` (the kernels' own time per call, from PyTorch's profiler), or
    None, with the reason printed, where the profiler fails."""
    try:
        return common.gpu_busy_ms(call, calls=max(5, min(20, repeats)))
    except Exception as error:  # noqa: BLE001 - the wall time stands without it
        print(f"  (no GPU busy time: {type(error).__name__}: {error})")
        return None


def inference_calls(built: Built):
    """(make_call, reference) of an inference or kernel case."""
    model, inputs = built.model, built.inputs

    def make_call(backend):
        fn = compiled(model, backend)

        def call():
            with torch.no_grad():
                return fn(**inputs)
        return call, lambda out: {"output": [out.detach().clone()]}

    with torch.no_grad():
        reference = {"output": [model(**inputs).detach().clone()]}
    return make_call, reference


def training_calls(built: Built, device: torch.device):
    """(make_call, reference) of a training case: each backend trains its own deep copy of
    the initial weights; the reference is eager's first-step loss and gradients."""
    base, inputs = built.model, built.inputs

    def make_call(backend):
        module = copy.deepcopy(base)
        fn = compiled(module, backend)
        optimizer = torch.optim.SGD(module.parameters(), lr=1e-4)

        def call():
            optimizer.zero_grad(set_to_none=True)
            with torch.autocast(device.type, dtype=torch.bfloat16):
                loss = fn(**inputs)
            loss.backward()
            optimizer.step()
            return loss.detach()

        def results(loss):  # read right after the first step, while its gradients are there
            return {"loss": [loss.float().reshape(1)],
                    "gradients": [p.grad.detach().float().clone() if p.grad is not None
                                  else torch.zeros_like(p, dtype=torch.float32) for p in module.parameters()]}
        return call, results

    call, results = make_call("eager")
    reference = results(call())
    del call, results
    return make_call, reference


# --------------------------------------------------------------------------- one case

def run_case(name: str, args, backends: list[str]) -> dict:
    """Build, check, time and measure one case on every backend; its result dict."""
    case = CASES[name]
    torch.manual_seed(0)
    built = case.build(args.device, args.tiny)
    print(f"\n== {name}: {built.shape}; {built.source}")
    result = dict(kind=case.kind, shape=built.shape, source=built.source, backends={})
    if built.training:
        make_call, reference = training_calls(built, args.device)
        tol, warmup_calls = tolerance(torch.bfloat16, args.device), 8
    else:
        make_call, reference = inference_calls(built)
        tol, warmup_calls = tolerance(built.out_dtype, args.device), 5
    for backend in backends:
        try:
            result["backends"][backend] = run_backend(backend, make_call, reference, tol, args, warmup_calls)
        except Exception as error:  # noqa: BLE001 - one backend failing must not lose the others
            print(f"  {backend}: FAILED: {type(error).__name__}: {error}")
            traceback.print_exc(limit=-4)
            result["backends"][backend] = dict(error=f"{type(error).__name__}: {str(error)[:500]}")
        fresh_memory(args.device)
    torch._dynamo.reset()
    print(case_table(result))
    return result


def _ms(entry: dict | None) -> float | None:
    return (entry or {}).get("ms")


def case_table(result: dict) -> str:
    """The per-case table: a line per backend."""
    entries = result["backends"]
    kit = _ms(entries.get("kitsune"))
    headers = ["backend", "ms", "iqr ms", "x/kitsune", "GPU busy ms", "compile s", "peak MiB", "rel err vs eager",
               "max abs err", ""]
    rows = []
    for backend, entry in entries.items():
        if "error" in entry:
            rows.append([backend] + ["n/a"] * 8 + [f"FAILED: {entry['error'][:120]}"])
            continue
        chk = entry["check"]
        rows.append([backend, f"{entry['ms']:.3f}", f"{entry['timing']['iqr_ms']:.3f}",
                     common.speedup_cell(entry["ms"], kit) if backend != "kitsune" else "-",
                     f"{entry['gpu_busy_ms']:.3f}" if entry.get("gpu_busy_ms") else "n/a",
                     f"{entry['first_call_s']:.1f}" if backend != "eager" else "-",
                     _mib(entry.get("peak_mib")), f"{chk['rel_l2']:.1e} (tol {chk['tol']:.0e})",
                     f"{chk['max_abs']:.1e}", "ok" if chk["ok"] else "FAIL: over tolerance"])
    lines = [common.markdown_table(headers, rows)]
    worst = {b: e["check"]["groups"]["gradients"].get("worst_tensor_rel_l2") for b, e in entries.items()
             if "gradients" in e.get("check", {}).get("groups", {})}
    if worst:  # printed, not judged: a tiny parameter's gradient can differ more in bf16
        lines.append("  rel err of the loss / all gradients / the worst single gradient vs eager: " + "; ".join(
            f"{b} {entries[b]['check']['groups']['loss']['rel_l2']:.1e} / "
            f"{entries[b]['check']['groups']['gradients']['rel_l2']:.1e} / {w:.1e}" for b, w in worst.items()))
    account = (entries.get("kitsune") or {}).get("kitsune")
    if account and "error" not in account:
        applied = {p: c.get("applied", 0) for p, c in account["patterns"].items() if c.get("detected")}
        lines.append(f"  kitsune: {account['graphs']} graph(s), {account['kernels_after']} kernels per call "
                     f"(eager ~{account['kernels_before']}), {account['fused_groups']} fused groups; patterns "
                     f"applied/detected: " + (", ".join(f"{p} {n}/{account['patterns'][p]['detected']}"
                                                        for p, n in applied.items()) or "none"))
        for what in ("fallbacks", "runtime_fallbacks"):
            if account[what]:
                lines.append(f"  kitsune {what} ({len(account[what])}): " + "; ".join(account[what][:3]))
    warned = (entries.get("kitsune") or {}).get("kitsune_warnings")
    if warned:
        lines.append(f"  kitsune warnings ({len(warned)}): " + " | ".join(w[:150] for w in warned[:3]))
    return "\n".join(lines)


def _mib(value) -> str:
    return f"{value:.0f}" if value is not None else "n/a"


# --------------------------------------------------------------------------- summary

def geomean(values) -> float | None:
    values = [v for v in values if v]
    return math.exp(sum(map(math.log, values)) / len(values)) if values else None


def kitsune_ratio(result: dict, other: str, key: str = "ms") -> float | None:
    """other's time / Kitsune's time (`key`: "ms", the median wall time, or "gpu_busy_ms"),
    when both ran and both passed their check."""
    entries = result.get("backends", {})
    a, k = entries.get(other) or {}, entries.get("kitsune") or {}
    if not (a.get(key) and k.get(key)) or not (a["check"]["ok"] and k["check"]["ok"]):
        return None
    return a[key] / k[key]


def _per_backend(entries: dict, fmt) -> str:
    return " / ".join(fmt(entries[b]) if b in entries and "error" not in entries[b] else "n/a"
                      for b in common.BACKENDS)


def summary_table(results: dict) -> str:
    """A row per case, then the geometric means over the issue's seven models."""
    headers = ["case", "inputs", "eager ms", "inductor ms", "kitsune ms", "ind/kit", "eager/kit",
               "GPU busy ms e / i / k", "ind/kit GPU busy", "peak MiB e / i / k", "compile s i / k", "check i / k"]
    rows = []
    for name, res in results.items():
        if "backends" not in res:
            rows.append([name, "skipped: " + res.get("skipped", "")[:50]] + ["n/a"] * (len(headers) - 2))
            continue
        entries = res["backends"]
        cells = [name, res["shape"][:34]] + [f"{_ms(entries.get(b)):.3f}" if _ms(entries.get(b)) else "n/a"
                                             for b in common.BACKENDS]
        cells += [_ratio_cell(kitsune_ratio(res, "inductor")), _ratio_cell(kitsune_ratio(res, "eager")),
                  _per_backend(entries, lambda e: f"{e['gpu_busy_ms']:.3f}" if e.get("gpu_busy_ms") else "n/a"),
                  _ratio_cell(kitsune_ratio(res, "inductor", "gpu_busy_ms")),
                  _per_backend(entries, lambda e: _mib(e.get("peak_mib"))),
                  " / ".join(f"{entries[b]['first_call_s']:.1f}" if "first_call_s" in entries.get(b, {})
                             else "n/a" for b in ("inductor", "kitsune")),
                  " / ".join(("ok" if entries[b]["check"]["ok"] else "FAIL") if "check" in entries.get(b, {})
                             else "n/a" for b in ("inductor", "kitsune"))]
        rows.append(cells)
    for key, column in (("ms", 5), ("gpu_busy_ms", 8)):
        ratios = [kitsune_ratio(results[n], "inductor", key) for n in GEOMEAN_CASES if n in results]
        counted = [r for r in ratios if r]
        row = [f"geomean ind/kit, {len(counted)} of the issue's 7 models ({'wall' if key == 'ms' else 'GPU busy'})"]
        row += [""] * (len(headers) - 1)
        row[column] = _ratio_cell(geomean(counted))
        rows.append(row)
    return common.markdown_table(headers, rows)


def _ratio_cell(ratio: float | None) -> str:
    return f"{ratio:.2f}x" if ratio else "n/a"


# --------------------------------------------------------------------------- main

def versions() -> dict:
    out = {}
    for package in ("transformers", "torchvision"):
        module = sys.modules.get(package)
        out[package] = getattr(module, "__version__", None) if module else None
    if out["torchvision"] is None:
        tv, why_not = _torchvision()
        out["torchvision"] = tv.__version__ if tv else why_not
    if out["transformers"] is None:
        try:
            out["transformers"] = _transformers().__version__
        except Skip as why:
            out["transformers"] = str(why)
    out["cudnn_allow_tf32"] = torch.backends.cudnn.allow_tf32
    out["matmul_allow_tf32"] = torch.backends.cuda.matmul.allow_tf32
    return out


def warm_backends(backends, device) -> None:
    """A throwaway compile per backend: imports, Inductor's compile workers."""
    x = torch.randn(64, 64, device=device)
    for backend in backends:
        if backend != "eager":
            torch.compile(lambda t: torch.softmax(t, -1) * 2, backend=backend)(x)
    torch._dynamo.reset()


def parse_arguments():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    common.add_standard_arguments(parser)
    parser.add_argument("--tiny", dest="quick", action="store_true",
                        help="tiny configs and batches (the same as --quick): a check that it runs, on the CPU "
                             "(minutes; its numbers mean nothing)")
    parser.add_argument("--cases", default=",".join(CASES), help="comma-separated (default: all): %(default)s")
    parser.add_argument("--repeats", type=int, default=None, help="timed calls per backend (default 50; tiny 3)")
    parser.add_argument("--no-inductor", action="store_true",
                        help="leave Inductor out (its compiles are the slow part)")
    parser.add_argument("--shared-logits", action="store_true",
                        help="rewrite an LM-head loss whose logits are also returned (HF models with labels): "
                             "kitsune.capture.lm_head.REWRITE_SHARED_LOGITS, off by default")
    parser.add_argument("--budget-s", type=float, default=None,
                        help="start no new case after this many seconds (the rest are reported as skipped)")
    args = parser.parse_args()
    args.device = torch.device(args.device)
    common.check_device(args.device)
    args.tiny = args.quick
    args.repeats = args.repeats or (3 if args.tiny else 50)
    if args.repeats < 1:
        raise SystemExit("--repeats: must be at least 1")
    args.names = [c for c in args.cases.split(",") if c]
    if unknown := [c for c in args.names if c not in CASES]:
        raise SystemExit(f"--cases: unknown {unknown}; choose from {','.join(CASES)}")
    backends = common.parse_backends(args.backends)
    args.backends = [b for b in backends if not (args.no_inductor and b == "inductor")]
    return args


def main() -> None:
    args = parse_arguments()
    start = time.perf_counter()
    if args.device.type == "cpu":
        torch.set_num_threads(1)  # the CPU run is a check that the script runs; one thread, as bench_zoo
    common.disable_compile_caches()
    logging.getLogger("kitsune").setLevel(logging.WARNING)
    import kitsune  # noqa: F401  (registers the backend)
    common.ensure_kitsune_backend()
    if args.shared_logits:
        from kitsune.capture import lm_head
        lm_head.REWRITE_SHARED_LOGITS = True
    env = dict(common.environment(args.device), **versions())
    print(" ".join(f"{k}={env[k]}" for k in ("device_name", "torch", "triton", "transformers", "torchvision",
                                             "cudnn_allow_tf32", "kitsune_file")))
    warm_backends(args.backends, args.device)
    payload = {"benchmark": "models", "environment": env, "backends": args.backends, "repeats": args.repeats,
               "tiny": args.tiny, "geomean_cases": list(GEOMEAN_CASES), "cases": {}}
    results = payload["cases"]
    for name in args.names:
        elapsed = time.perf_counter() - start
        if args.budget_s is not None and elapsed > args.budget_s:
            results[name] = {"skipped": f"time budget ({args.budget_s:.0f} s) spent"}
            print(f"\n== {name}: skipped: time budget spent ({elapsed:.0f} s)")
            continue
        case_start = time.perf_counter()
        try:
            results[name] = run_case(name, args, args.backends)
        except Skip as why:
            print(f"\n== {name}: skipped: {why}")
            results[name] = {"skipped": str(why)}
        except Exception as error:  # noqa: BLE001 - one broken case must not lose the others
            print(f"\n== {name}: FAILED: {type(error).__name__}: {error}")
            traceback.print_exc(limit=-4)
            results[name] = {"skipped": f"failed: {type(error).__name__}: {str(error)[:500]}"}
        fresh_memory(args.device)
        results[name]["elapsed_s"] = round(time.perf_counter() - case_start, 1)
        print(f"-- {name}: {results[name]['elapsed_s']:.0f} s (total {time.perf_counter() - start:.0f} s)")
        common.write_json(args.json, payload)
    print()
    print(f"{env['device_name']}, torch {env['torch']}, triton {env['triton']}, transformers {env['transformers']}, "
          f"{env['date'][:10]}{', TINY configs: numbers mean nothing' if args.tiny else ''}; median ms of "
          f"{args.repeats} calls; x/kitsune = x time / Kitsune time (> 1: Kitsune faster; n/a when a check "
          f"failed); peak MiB above the model")
    print()
    print(summary_table(results))
    print(f"total {time.perf_counter() - start:.0f} s")


if __name__ == "__main__":
    main()
