"""The model zoo: eager vs Inductor vs Kitsune on fourteen small real models (CPU, one thread).

    python3 benchmarks/bench_zoo.py                          # the whole zoo (minutes)
    python3 benchmarks/bench_zoo.py --quick --models gpt2    # does it run?
    python3 benchmarks/bench_zoo.py --channels-last --models resnet18,efficientnet_b0
    python3 benchmarks/bench_zoo.py --json zoo.json

Models (random weights, built from configs: nothing is downloaded):

    torchvision   resnet18, mobilenet_v3_small, efficientnet_b0  (1x3x64x64 or 96x96,
                  10 classes)
    timm          convnext_atto (64x64), vit_tiny and deit_tiny (patch 16, 64x64, 4 blocks)
    transformers  gpt2, bert, distilbert, llama (GQA: 4 query heads, 2 key/value heads),
                  qwen2, t5 (encoder + decoder), clip_text, whisper (encoder + decoder):
                  2 layers, hidden 64, 4 heads, vocabulary 1000, batch 2, 32 tokens

A model whose package is missing (`pip install kitsune-fusion[bench]` brings timm and
torchvision) is skipped with the reason printed. `--channels-last` puts the convnets
and their input in channels-last memory format.

Method:

* CPU (`--device cuda` runs the same zoo on a GPU), `torch.set_num_threads(1)`,
  float32, `model.eval()`, every call under `torch.no_grad()`. Eager, `torch.compile(backend="inductor")` and
  `torch.compile(backend="kitsune")` (both `dynamic=False`) run side by side in
  one process, with PyTorch's compile caches off and private on-disk caches
  (`common.use_private_caches`, `disable_compile_caches`); Dynamo is reset
  before each model.
* Compile time: wall time of each backend's first call (Dynamo, AOTAutograd and
  the backend, plus one run).
* Correctness: Kitsune's and Inductor's outputs against eager's
  (`torch.testing.assert_close`, float32 defaults); the largest absolute
  difference is printed either way.
* Time: interleaved rounds (`common.interleaved_rounds`): each round makes
  `--calls` calls of every backend in turn; the figure is the median round's
  time per forward. Interleaving makes drift of a shared, noisy host hit every
  backend alike; the spread is in the JSON.
* Kitsune's own account, from the GraphRecords it wrote while compiling the
  model (`kitsune.report.stats.GLOBAL_STATS`): kernels per forward after fusion
  (`kernels_after` summed over the model's graphs) and eager's estimate
  (`kernels_before`); fallbacks (groups planned and then run through PyTorch,
  with the reason) and the planner's refusals (merges and nodes it declined,
  except the by-design "nothing to fuse"), reasons with node names and numbers
  normalised so that equal reasons count together; the aten ops left unfused
  (compute nodes of the planned graph in no fused group), by op; the `prims.*`
  nodes among them, and how many of those are still `prims.*` in the graph that
  runs once `capture.restore.restored_copy` rewrote them.
* Inductor's kernels per forward: the calls in the `call` function of the
  output code Inductor generated for the model (`run_and_get_code` around its
  first call): its generated C++ (or Triton) kernels plus the extern kernels
  and aten/mkldnn ops it calls (mm, convolutions, attention).

Output: one block per model as it runs, then a markdown table (ms per forward,
eager / Kitsune and Inductor / Kitsune, > 1: Kitsune faster, with geometric
means; kernels per forward; compile seconds; max error), then the refusal
reasons and unfused ops summed over the zoo; `--json PATH` holds all of it with
the environment.
"""
from __future__ import annotations

import argparse
import math
import re
import sys
import time
from collections import Counter
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

import common  # noqa: E402

common.use_private_caches()

import torch  # noqa: E402

TOKENS, BATCH, VOCAB = 32, 2, 1000


# --------------------------------------------------------------------------- packages

def import_torchvision():
    """torchvision, or raise ImportError (kitsune._compat: the CUDA wheel on a CPU torch)."""
    from kitsune._compat import import_torchvision as load
    return load()


def import_timm():
    import_torchvision()  # timm imports torchvision
    import timm
    return timm


# --------------------------------------------------------------------------- models

class FirstOutput(torch.nn.Module):
    """A Hugging Face model that returns its first output as a tensor (logits or
    last hidden state), called with keyword inputs."""

    def __init__(self, model):
        super().__init__()
        self.model = model

    def forward(self, **inputs):
        return self.model(**inputs)[0]


def _image(size: int) -> torch.Tensor:
    return torch.randn(1, 3, size, size)


def _tokens(batch: int = BATCH, length: int = TOKENS) -> torch.Tensor:
    return torch.randint(0, VOCAB, (batch, length))


def _torchvision_model(name: str, size: int):
    tv = import_torchvision()
    return getattr(tv.models, name)(weights=None, num_classes=10), {"x": _image(size)}


def _timm_model(name: str, **kwargs):
    timm = import_timm()
    return timm.create_model(name, pretrained=False, num_classes=10, img_size=64, **kwargs), {"x": _image(64)}


def _convnext():
    timm = import_timm()
    return timm.create_model("convnext_atto", pretrained=False, num_classes=10), {"x": _image(32)}


def _hf(config_name: str, model_name: str, inputs_fn, **config):
    import transformers
    cfg = getattr(transformers, config_name)(**config)
    cfg._attn_implementation = "sdpa"
    return FirstOutput(getattr(transformers, model_name)(cfg)), inputs_fn()


def _ids():
    return {"input_ids": _tokens()}


def _ids_mask():
    return {"input_ids": _tokens(), "attention_mask": torch.ones(BATCH, TOKENS, dtype=torch.long)}


def _encoder_decoder():
    return {"input_ids": _tokens(), "decoder_input_ids": _tokens(length=TOKENS // 4)}


def _whisper_inputs():
    return {"input_features": torch.randn(BATCH, 80, 2 * TOKENS), "decoder_input_ids": _tokens(length=TOKENS // 4)}


_DECODER = dict(vocab_size=VOCAB, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=128, use_cache=False)

# name: (package, kind, builder -> (module, keyword inputs))
MODELS = {
    "resnet18": ("torchvision", "conv", lambda: _torchvision_model("resnet18", 32)),
    "mobilenet_v3_small": ("torchvision", "conv", lambda: _torchvision_model("mobilenet_v3_small", 64)),
    "efficientnet_b0": ("torchvision", "conv", lambda: _torchvision_model("efficientnet_b0", 32)),
    "convnext_atto": ("timm", "conv", _convnext),
    "vit_tiny": ("timm", "transformer", lambda: _timm_model("vit_tiny_patch16_224", depth=4)),
    "deit_tiny": ("timm", "transformer", lambda: _timm_model("deit_tiny_patch16_224", depth=4)),
    "gpt2": ("transformers", "transformer", lambda: _hf(
        "GPT2Config", "GPT2LMHeadModel", _ids, vocab_size=VOCAB, n_embd=64, n_layer=2, n_head=4, bos_token_id=1, eos_token_id=2,
        n_positions=128, use_cache=False)),
    "bert": ("transformers", "transformer", lambda: _hf(
        "BertConfig", "BertModel", _ids_mask, vocab_size=VOCAB, hidden_size=64, num_hidden_layers=2,
        num_attention_heads=4, intermediate_size=256, max_position_embeddings=128)),
    "distilbert": ("transformers", "transformer", lambda: _hf(
        "DistilBertConfig", "DistilBertModel", _ids_mask, vocab_size=VOCAB, dim=64, n_layers=2, n_heads=4,
        hidden_dim=256, max_position_embeddings=128)),
    "llama": ("transformers", "transformer", lambda: _hf("LlamaConfig", "LlamaForCausalLM", _ids, **_DECODER)),
    "qwen2": ("transformers", "transformer", lambda: _hf("Qwen2Config", "Qwen2ForCausalLM", _ids, **_DECODER)),
    "t5": ("transformers", "transformer", lambda: _hf(
        "T5Config", "T5Model", _encoder_decoder, vocab_size=VOCAB, d_model=64, d_kv=16, d_ff=128, num_layers=2,
        num_decoder_layers=2, num_heads=4, use_cache=False)),
    "clip_text": ("transformers", "transformer", lambda: _hf(
        "CLIPTextConfig", "CLIPTextModel", _ids, vocab_size=VOCAB, hidden_size=64, intermediate_size=128,
        num_hidden_layers=2, num_attention_heads=4, max_position_embeddings=TOKENS)),
    "whisper": ("transformers", "transformer", lambda: _hf(
        "WhisperConfig", "WhisperModel", _whisper_inputs, vocab_size=VOCAB, d_model=64, encoder_layers=2,
        decoder_layers=2, encoder_attention_heads=4, decoder_attention_heads=4, encoder_ffn_dim=128,
        decoder_ffn_dim=128, num_mel_bins=80, max_source_positions=TOKENS, max_target_positions=64,
        use_cache=False, pad_token_id=0, bos_token_id=1, eos_token_id=2, decoder_start_token_id=1)),
}


def build(name: str, channels_last: bool):
    """(module in eval mode, keyword inputs), or (None, reason) when its package is missing."""
    package, kind, builder = MODELS[name]
    torch.manual_seed(0)
    try:
        model, inputs = builder()
    except ImportError as error:
        return None, f"{package} is not installed or does not import ({error}); pip install kitsune-fusion[bench]"
    model.eval()
    if channels_last and kind == "conv":
        model = model.to(memory_format=torch.channels_last)
        inputs = {k: v.contiguous(memory_format=torch.channels_last) for k, v in inputs.items()}
    return model, inputs


# --------------------------------------------------------------------------- Kitsune's account

_NUMBERED = re.compile(r"\b([A-Za-z_]+?)_\d+\b")
_NUMBER = re.compile(r"\b\d+(\.\d+)?\b")


def normalise(reason: str) -> str:
    """A reason with node names (mul_12 -> mul: the op) and numbers (8 -> N) made
    generic, so that one cause counts once per occurrence, not once per spelling."""
    return _NUMBER.sub("N", _NUMBERED.sub(r"\1", reason))[:160]


def op_name(target) -> str:
    """aten.mm.default -> aten.mm; a Python function by its name."""
    text = str(target)
    parts = text.split(".")
    return ".".join(parts[:2]) if len(parts) == 3 and parts[0] in ("aten", "prims") else \
        getattr(target, "__name__", text)


def kitsune_account(records) -> dict:
    """What Kitsune's GraphRecords say about one model's graphs (see the module docstring)."""
    from kitsune.ir.eager_count import _launches
    from kitsune.planner.plan import BY_DESIGN

    refusals, fallbacks, unfused, prims_unfused = Counter(), Counter(), Counter(), 0
    prims_after_restore = 0
    for record in records:
        fallbacks.update(normalise(why) for _, why in record.fallbacks)
        fallback_reasons = {why for _, why in record.fallbacks}
        refusals.update(normalise(d.reason) for d in record.decisions
                        if not d.fused and not any(mark in d.reason for mark in BY_DESIGN)
                        and d.reason not in fallback_reasons)
        if record.graph is None:
            continue
        fused = {name for _, names, _ in record.groups for name in names}
        left = [n for n in record.graph.nodes if _launches(n) and n.name not in fused]
        unfused.update(op_name(n.target) for n in left)
        prims_unfused += sum(op_name(n.target).startswith("prims.") for n in left)
        prims_after_restore += _prims_after_restore(record.graph, fused)
    return dict(graphs=len(records), kernels_after=sum(r.kernels_after for r in records),
                kernels_before=sum(r.kernels_before for r in records),
                fused_groups=sum(len(r.groups) for r in records),
                compile_seconds=round(sum(r.compile_seconds for r in records), 3),
                fallbacks=dict(fallbacks.most_common()), refusals=dict(refusals.most_common()),
                unfused_ops=dict(unfused.most_common()), prims_unfused=prims_unfused,
                prims_after_restore=prims_after_restore)


def _prims_after_restore(graph, fused: set) -> int | None:
    """`prims.*` nodes outside fused groups that stay prims once the graph is restored
    the way the compiler restores the graph it runs (None if that cannot be redone here)."""
    import copy

    from kitsune.capture.restore import is_prim, restored_copy
    try:
        restored = restored_copy(torch.fx.GraphModule(torch.nn.Module(), copy.deepcopy(graph)))
    except Exception:  # noqa: BLE001 - e.g. a graph reading module attributes
        return None
    return sum(is_prim(n) and n.name not in fused for n in restored.graph.nodes)


# --------------------------------------------------------------------------- Inductor's account

_CALL = re.compile(r"\b(cpp_fused_\w+|triton_\w+\.run|extern_kernels\.\w+|torch\.ops\.\w+\.\w+(?:\.\w+)?|aten\.\w+(?:\.\w+)?)\(")
_NOT_KERNELS = ("empty", "empty_strided", "as_strided", "reinterpret_tensor", "alloc_from_pool")


def inductor_kernel_count(codes: list[str]) -> int | None:
    """Kernel calls in the `call` functions of Inductor's output code."""
    count, found = 0, False
    for code in codes:
        body = code.split("def call(", 1)
        if len(body) < 2:
            continue
        found = True
        body = body[1].split("\ndef ", 1)[0].split("\nclass ", 1)[0]
        for match in _CALL.finditer(body):
            if not any(match.group(1).split(".")[-1].startswith(skip) or f".{skip}" in match.group(1)
                       for skip in _NOT_KERNELS):
                count += 1
    return count if found else None


# --------------------------------------------------------------------------- one model

def first_call(name: str, fn, inputs: dict):
    """(seconds, output, output code or None) of the first call; Inductor's code captured."""
    t0 = time.perf_counter()
    if name == "inductor":
        from torch._inductor.utils import run_and_get_code
        out, codes = run_and_get_code(lambda: fn(**inputs))
    else:
        out, codes = fn(**inputs), None
    return time.perf_counter() - t0, out, codes


def max_error(out: torch.Tensor, ref: torch.Tensor) -> float:
    return (out.double() - ref.double()).abs().max().item()


def run_model(name: str, args, backends: list[str]) -> dict:
    """Compile, check and time one model on every backend; its result dict."""
    import kitsune
    from kitsune.report.stats import GLOBAL_STATS

    model, inputs = build(name, args.channels_last)
    if model is None:
        print(f"{name}: skipped: {inputs}")
        return {"skipped": inputs}
    model = model.to(args.device)
    inputs = {k: v.to(args.device) for k, v in inputs.items()}
    common.cold_start()
    kitsune.reset_fusion_stats()
    result = {"compile_s": {}, "max_error": {}, "correct": {}}
    fns = {}
    with torch.no_grad():
        reference = model(**inputs)
        for backend in backends:
            fn = model if backend == "eager" else torch.compile(model, backend=backend, dynamic=False)
            seconds, out, codes = first_call(backend, fn, inputs)
            if backend != "eager":
                result["compile_s"][backend] = round(seconds, 3)
                result["max_error"][backend] = max_error(out, reference)
                result["correct"][backend] = _close(out, reference)
            if codes is not None:
                result["inductor_kernels"] = inductor_kernel_count(codes)
            fns[backend] = (lambda f: lambda: f(**inputs))(fn)
        if "kitsune" in backends:
            result["kitsune"] = kitsune_account(GLOBAL_STATS.records())
        timings = common.interleaved_rounds(fns, args.device, args.rounds, args.calls, warmup_calls=3)
    result["ms"] = {b: t.median_ms for b, t in timings.items()}
    result["timing_ms"] = {b: t.as_dict() for b, t in timings.items()}
    print_model(name, result)
    return result


def _close(out, reference) -> str:
    try:
        torch.testing.assert_close(out, reference)
        return "ok"
    except AssertionError as error:
        return "FAIL: " + str(error).splitlines()[0]


def print_model(name: str, result: dict) -> None:
    ms = " ".join(f"{b} {v:.2f}" for b, v in result["ms"].items())
    compile_s = " ".join(f"{b} {v:.1f}" for b, v in result["compile_s"].items())
    print(f"{name}: ms/forward {ms}; compile s {compile_s}; "
          f"max error {result['max_error']}; {result['correct']}")
    ks = result.get("kitsune")
    if ks:
        print(f"  kitsune: {ks['graphs']} graph(s), kernels/forward {ks['kernels_after']} "
              f"(eager ~{ks['kernels_before']}, inductor {result.get('inductor_kernels')}), "
              f"{ks['fused_groups']} fused groups, prims unfused {ks['prims_unfused']} "
              f"(after restore {ks['prims_after_restore']})")
        for title, key in (("fallbacks", "fallbacks"), ("refusals", "refusals"), ("unfused ops", "unfused_ops")):
            items = list(ks[key].items())[:8]
            if items:
                print(f"  {title}: " + "; ".join(f"{n}x {why}" for why, n in items))


# --------------------------------------------------------------------------- report

def geomean(values) -> float | None:
    values = [v for v in values if v]
    return math.exp(sum(map(math.log, values)) / len(values)) if values else None


def table(results: dict) -> str:
    headers = ["model", "eager ms", "inductor ms", "kitsune ms", "eager/kit", "ind/kit",
               "kernels kit", "kernels ind", "eager ~", "compile s ind / kit", "max err kit", "check kit"]
    rows, ratios = [], {"eager": [], "inductor": []}
    for name, res in results.items():
        if "skipped" in res:
            rows.append([name] + ["n/a"] * (len(headers) - 2) + ["skipped"])
            continue
        ms, ks = res["ms"], res.get("kitsune") or {}
        for other in ratios:
            if ms.get(other) and ms.get("kitsune"):
                ratios[other].append(ms[other] / ms["kitsune"])
        compile_s = res["compile_s"]
        rows.append([name, *(f"{ms[b]:.2f}" if b in ms else "n/a" for b in common.BACKENDS),
                     common.speedup_cell(ms.get("eager"), ms.get("kitsune")),
                     common.speedup_cell(ms.get("inductor"), ms.get("kitsune")),
                     str(ks.get("kernels_after", "n/a")), str(res.get("inductor_kernels", "n/a")),
                     str(ks.get("kernels_before", "n/a")),
                     f"{compile_s.get('inductor', 0):.1f} / {compile_s.get('kitsune', 0):.1f}",
                     f"{res['max_error'].get('kitsune', float('nan')):.1e}",
                     (res["correct"].get("kitsune") or "n/a")[:4]])
    for column, other in ((4, "eager"), (5, "inductor")):
        row = [f"geomean {other}/kitsune ({len(ratios[other])} models)"] + [""] * (len(headers) - 1)
        mean = geomean(ratios[other])
        row[column] = f"{mean:.2f}x" if mean else "n/a"
        rows.append(row)
    return common.markdown_table(headers, rows)


def zoo_summary(results: dict, top: int = 15) -> str:
    """Refusal/fallback reasons and unfused ops summed over the zoo, commonest first."""
    totals = {key: Counter() for key in ("refusals", "fallbacks", "unfused_ops")}
    for res in results.values():
        for key, counter in totals.items():
            counter.update((res.get("kitsune") or {}).get(key, {}))
    lines = []
    for key, counter in totals.items():
        lines.append(f"\n{key} over the zoo (top {top} of {len(counter)}, count):")
        lines += [f"  {n:5d}  {what}" for what, n in counter.most_common(top)]
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    common.add_standard_arguments(parser)
    parser.set_defaults(device="cpu")
    parser.add_argument("--models", default=",".join(MODELS), help="comma-separated (default: all)")
    parser.add_argument("--channels-last", action="store_true", help="convnets and their inputs in channels-last")
    parser.add_argument("--rounds", type=int, default=None, help="interleaved rounds (default 15; quick 3)")
    parser.add_argument("--calls", type=int, default=None, help="calls per round (default 10; quick 2)")
    args = parser.parse_args()
    args.device = torch.device(args.device)
    common.check_device(args.device)
    args.rounds = args.rounds or (3 if args.quick else 15)
    args.calls = args.calls or (2 if args.quick else 10)
    names = [m for m in args.models.split(",") if m]
    if unknown := [m for m in names if m not in MODELS]:
        raise SystemExit(f"--models: unknown {unknown}; choose from {','.join(MODELS)}")
    backends = common.parse_backends(args.backends)
    torch.set_num_threads(1)
    try:  # before transformers, which imports torchvision where it is installed
        import_torchvision()
    except ImportError:
        pass
    common.disable_compile_caches()
    import kitsune  # noqa: F401  (registers the backend)
    common.ensure_kitsune_backend()
    env = common.environment(args.device)
    print(env)
    results = {}
    for name in names:
        try:
            results[name] = run_model(name, args, backends)
        except Exception as error:  # noqa: BLE001 - one broken model must not lose the others
            print(f"{name}: FAILED: {type(error).__name__}: {error}")
            results[name] = {"skipped": f"failed: {type(error).__name__}: {error}"}
    print()
    print(f"{env['device_name']}, torch {env['torch']}, {torch.get_num_threads()} thread(s), float32, {env['date'][:10]}"
          f"{', channels-last convnets' if args.channels_last else ''}; median of {args.rounds} interleaved "
          f"rounds of {args.calls} calls; x/kit = x time / Kitsune time (> 1: Kitsune faster)")
    print()
    print(table(results))
    print(zoo_summary(results))
    common.write_json(args.json, {"benchmark": "zoo", "environment": env, "channels_last": args.channels_last,
                                  "models": results})


if __name__ == "__main__":
    main()
