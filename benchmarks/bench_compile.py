"""Compile time, cold and warm, Kitsune beside Inductor, with the phase breakdown (issue 19).

    python3 benchmarks/bench_compile.py --quick                  # CPU, tiny models (a minute or two)
    python3 benchmarks/bench_compile.py --quick --models mlp     # does it run?
    python3 benchmarks/bench_compile.py --device cuda            # GPT-2 small, BERT-base, ResNet-50, Llama-style
    python3 benchmarks/bench_compile.py --device cuda --train --models gpt2   # a training step
    python3 benchmarks/bench_compile.py --json compile.json

Method: every measurement is a fresh Python process (`--child`), so that nothing of an
earlier compile stays in memory. "cold": the process gets new, empty cache directories
(KITSUNE_CACHE_DIR, TORCHINDUCTOR_CACHE_DIR, TRITON_CACHE_DIR); "warm": a second process
with the same directories, as a user's second run (Kitsune loads the compiled graphs from
its graph cache; Inductor uses its FX graph and AOTAutograd caches, on by default).
Each process builds the model (random weights, from configs: nothing is downloaded),
then times its first call under `torch.compile(backend=...)` ("first call": Dynamo,
AOTAutograd, the backend and one run), after one eager call so that lazy
initialisation is not charged to the compiler.

Phases:
* Kitsune: `get_fusion_stats()["compile_phases"]`: "capture" (Dynamo + AOTAutograd),
  then its own ("rewrite", "cache_load", "plan", "lower", "build", "cache_store",
  "assemble", "other": "own" is their sum), and first-call work ("measure", "cuda_graph").
* Inductor: `torch._dynamo.utils.compilation_time_metrics`: "own" is `compile_fx_inner`
  (everything Inductor does with an aten graph; on a warm start, which loads the
  compiled graph before it, the load: `PyCodeCache.load_by_key_path`), with "lowering"
  (`GraphLowering.run`), "codegen" (`GraphLowering.codegen`, kernel builds it waits
  for included), "load" and "backend" (`OutputGraph.call_user_compiler`: AOTAutograd
  and Inductor, or their caches); "capture" is the first call less "own".

Output: one line per (model, backend, cold/warm) as it runs, then a markdown table
(first call and own time, cold and warm, with Kitsune / Inductor ratios); `--json PATH`
keeps every number and the environment.
"""
from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

CACHE_VARS = ("KITSUNE_CACHE_DIR", "TORCHINDUCTOR_CACHE_DIR", "TRITON_CACHE_DIR")
KITSUNE_OWN = ("rewrite", "cache_load", "plan", "lower", "build", "cache_store", "assemble", "other")
INDUCTOR_PHASES = {"lowering": "GraphLowering.run", "codegen": "GraphLowering.codegen",
                   "load": "PyCodeCache.load_by_key_path"}
QUICK_MODELS = ["mlp", "gpt2", "bert", "llama"]
FULL_MODELS = ["gpt2", "bert", "resnet50", "llama"]


# --------------------------------------------------------------------------- models (child side)

def build_model(name: str, quick: bool, device, dtype):
    """(module, positional inputs) with random weights."""
    import torch

    torch.manual_seed(0)
    batch, tokens = (2, 32) if quick else (8, 512)
    if name == "mlp":
        width = 64 if quick else 1024
        layers = []
        for _ in range(6):
            layers += [torch.nn.LayerNorm(width), torch.nn.Linear(width, width), torch.nn.GELU()]
        return torch.nn.Sequential(*layers), (torch.randn(batch * tokens, width),)
    if name == "resnet50":
        import torchvision
        model = torchvision.models.resnet50(num_classes=10 if quick else 1000)
        size = 64 if quick else 224
        return model, (torch.randn(2 if quick else 32, 3, size, size),)
    import transformers
    vocab = 1000 if quick else 50257
    small = dict(hidden=64, layers=2, heads=4, ffn=128) if quick else dict(hidden=768, layers=12, heads=12, ffn=3072)
    ids = torch.randint(0, vocab, (batch, tokens))
    if name == "gpt2":
        cfg = transformers.GPT2Config(vocab_size=vocab, n_embd=small["hidden"], n_layer=small["layers"],
                                      n_head=small["heads"], n_positions=max(tokens, 128), use_cache=False,
                                      bos_token_id=1, eos_token_id=2)
        return _first_output(transformers.GPT2LMHeadModel(cfg)), (ids,)
    if name == "bert":
        cfg = transformers.BertConfig(vocab_size=vocab, hidden_size=small["hidden"], num_hidden_layers=small["layers"],
                                      num_attention_heads=small["heads"], intermediate_size=small["ffn"],
                                      max_position_embeddings=max(tokens, 128))
        return _first_output(transformers.BertModel(cfg)), (ids,)
    if name == "llama":
        cfg = transformers.LlamaConfig(vocab_size=vocab, hidden_size=small["hidden"], intermediate_size=small["ffn"],
                                       num_hidden_layers=small["layers"], num_attention_heads=small["heads"],
                                       num_key_value_heads=max(1, small["heads"] // 2),
                                       max_position_embeddings=max(tokens, 128), use_cache=False)
        return _first_output(transformers.LlamaForCausalLM(cfg)), (ids,)
    raise ValueError(f"unknown model {name!r}")


def _first_output(model):
    import torch

    class FirstOutput(torch.nn.Module):
        def __init__(self, inner):
            super().__init__()
            self.inner = inner

        def forward(self, *args):
            out = self.inner(*args)
            return out[0] if isinstance(out, tuple) else next(iter(out.values()))
    return FirstOutput(model)


def child(args) -> dict:
    """One measurement in this process: the first call's time and the phases."""
    import torch

    device = torch.device(args.device)
    dtype = torch.bfloat16 if device.type == "cuda" and not args.train else torch.float32
    if device.type == "cpu":
        torch.set_num_threads(1)
    model, inputs = build_model(args.model, args.quick, device, dtype)
    model = model.to(device)
    if dtype != torch.float32:
        model = model.to(dtype)
    inputs = tuple(t.to(device, dtype) if t.is_floating_point() else t.to(device) for t in inputs)
    model.train(args.train)

    def step(fn):
        if args.train:
            fn(*inputs).float().sum().backward()
        else:
            with torch.no_grad():
                fn(*inputs)
        if device.type == "cuda":
            torch.cuda.synchronize()
    step(model)  # lazy initialisation (cuBLAS, allocator) is not the compiler's
    if args.backend == "kitsune":
        import kitsune
        kitsune.reset_fusion_stats()
    compiled = torch.compile(model, backend=args.backend)
    start = time.perf_counter()
    step(compiled)
    first_call = time.perf_counter() - start
    return {"first_call_s": first_call, **(_kitsune_phases() if args.backend == "kitsune" else
                                           _inductor_phases(first_call))}


def _kitsune_phases() -> dict:
    import kitsune
    stats = kitsune.get_fusion_stats()
    phases = stats["compile_phases"]
    return {"own_s": sum(phases.get(p, 0.0) for p in KITSUNE_OWN), "capture_s": phases.get("capture", 0.0),
            "phases": phases, "graphs": stats["graphs"], "graphs_from_cache": stats.get("graphs_from_cache"),
            "kernel_builds": stats.get("kernel_builds"), "num_fused": stats["num_fused"]}


def _inductor_phases(first_call: float) -> dict:
    from torch._dynamo.utils import compilation_time_metrics as metrics

    def total(name):
        return float(sum(metrics.get(name) or ()))
    phases = {name: round(total(metric), 4) for name, metric in INDUCTOR_PHASES.items()}
    # a warm start loads the compiled graph before compile_fx_inner: its own time is the load
    own = total("compile_fx_inner") or phases["load"]
    phases["backend"] = round(total("OutputGraph.call_user_compiler"), 4)  # AOTAutograd + Inductor
    return {"own_s": own, "capture_s": max(0.0, first_call - own), "phases": phases}


# --------------------------------------------------------------------------- driver (parent side)

def run_child(model: str, backend: str, caches: Path, args) -> dict:
    env = dict(os.environ, **{var: str(caches / var.split("_")[0].lower()) for var in CACHE_VARS})
    command = [sys.executable, __file__, "--child", "--model", model, "--backend", backend, "--device", args.device]
    command += ["--quick"] * args.quick + ["--train"] * args.train
    proc = subprocess.run(command, env=env, capture_output=True, text=True, timeout=args.timeout)
    if proc.returncode != 0:
        return {"error": proc.stderr.strip().splitlines()[-1] if proc.stderr.strip() else f"exit {proc.returncode}"}
    return json.loads(proc.stdout.strip().splitlines()[-1])


def measure(model: str, args) -> dict:
    result = {}
    for backend in args.backends:
        caches = Path(tempfile.mkdtemp(prefix=f"kitsune-bench-compile-{backend}-"))
        try:
            for temperature in ("cold", "warm"):
                r = result.setdefault(backend, {})[temperature] = run_child(model, backend, caches, args)
                print(f"{model} {backend} {temperature}: " + (f"error: {r['error']}" if "error" in r else
                      f"first call {r['first_call_s']:.2f} s, own {r['own_s']:.3f} s, "
                      f"capture {r['capture_s']:.2f} s, phases {r['phases']}"), flush=True)
        finally:
            shutil.rmtree(caches, ignore_errors=True)
    return result


def _cell(result: dict, backend: str, temperature: str, key: str) -> str:
    r = result.get(backend, {}).get(temperature, {})
    return f"{r[key]:.2f}" if key in r else "-"


def _ratio(result: dict, temperature: str, key: str) -> str:
    k = result.get("kitsune", {}).get(temperature, {})
    i = result.get("inductor", {}).get(temperature, {})
    return f"{k[key] / i[key]:.2f}" if key in k and i.get(key) else "-"


def table(results: dict) -> str:
    headers = ["model", "cold first call s (kit / ind)", "cold own s (kit / ind)", "own ratio",
               "warm first call s (kit / ind)", "warm own s (kit / ind)", "warm first-call ratio"]
    rows = []
    for model, result in results.items():
        def pair(temperature, key):
            return f"{_cell(result, 'kitsune', temperature, key)} / {_cell(result, 'inductor', temperature, key)}"
        rows.append([model, pair("cold", "first_call_s"), pair("cold", "own_s"), _ratio(result, "cold", "own_s"),
                     pair("warm", "first_call_s"), pair("warm", "own_s"), _ratio(result, "warm", "first_call_s")])
    lines = ["| " + " | ".join(headers) + " |", "|" + "---|" * len(headers)]
    return "\n".join(lines + ["| " + " | ".join(row) + " |" for row in rows])


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--quick", action="store_true", help="tiny models (CPU-sized)")
    parser.add_argument("--train", action="store_true", help="a training step instead of inference")
    parser.add_argument("--models", default=None, help="comma-separated; default: " + ",".join(FULL_MODELS))
    parser.add_argument("--backends", default="kitsune,inductor")
    parser.add_argument("--timeout", type=float, default=1800.0, help="seconds per process")
    parser.add_argument("--json", default=None)
    parser.add_argument("--child", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--model", default=None, help=argparse.SUPPRESS)
    parser.add_argument("--backend", default=None, help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.child:
        print(json.dumps(child(args)))
        return
    args.backends = [b.strip() for b in args.backends.split(",") if b.strip()]
    models = args.models.split(",") if args.models else (QUICK_MODELS if args.quick else FULL_MODELS)
    results = {model: measure(model, args) for model in models}
    print()
    print(table(results))
    if args.json:
        import torch
        payload = {"results": results, "device": args.device, "quick": args.quick, "train": args.train,
                   "torch": torch.__version__, "when": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime())}
        Path(args.json).write_text(json.dumps(payload, indent=1))


if __name__ == "__main__":
    main()
