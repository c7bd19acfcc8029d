"""Changing shapes: GPT-2 inference over 16 sequence lengths, eager vs Inductor vs Kitsune.

    python3 benchmarks/bench_dynamic.py                       # CUDA if present, else the CPU
    python3 benchmarks/bench_dynamic.py --device cpu --quick  # does it run?

Model: GPT-2 small (`transformers.GPT2LMHeadModel`, random weights) in bfloat16,
batch 8, on CUDA; on the CPU a tiny GPT-2 (2 layers, width 64) in float32,
batch 2, at an eighth of the sequence lengths. Inference (`torch.no_grad`).

Method:

* Sweep: each compiler (`torch.compile(model, backend=...)` with Dynamo's
  default `dynamic=None`: the first size compiles a static graph, a second
  size a dynamic one) is called once at each of 16 sequence lengths between
  64 and 512, starting at 128 then 334. The figure is the wall time of the
  whole sweep, compiles included, with fresh Dynamo state, and the number of
  graphs Dynamo compiled (`torch._dynamo.utils.counters`).
* Steady state, after the sweep: the time per call at 128, 334 and 512 tokens
  (`common.time_ms`: median of repeated calls after a warm-up).
* Static shapes: Kitsune compiled with `dynamic=False`, one graph per size,
  timed at the same three sizes: what a dynamic graph should match.

Output: a markdown table last, `--json PATH` with every figure and the environment.
"""
from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
import common  # noqa: E402

LENGTHS = [128, 334, 64, 96, 160, 192, 224, 256, 288, 352, 384, 416, 448, 480, 500, 512]
STEADY = [128, 334, 512]


def build(device: torch.device):
    from transformers import GPT2Config, GPT2LMHeadModel

    torch.manual_seed(0)
    if device.type == "cuda":
        config, dtype, batch, scale = GPT2Config(), torch.bfloat16, 8, 1
    else:
        config = GPT2Config(n_layer=2, n_embd=64, n_head=4, vocab_size=512, n_positions=512,
                            bos_token_id=0, eos_token_id=0)
        dtype, batch, scale = torch.float32, 2, 8
    model = GPT2LMHeadModel(config).to(device=device, dtype=dtype).eval()
    return model, batch, scale, config.vocab_size


def _graphs() -> int:
    from torch._dynamo.utils import counters
    return int(counters["stats"]["unique_graphs"])


def sweep(model, backend: str, lengths, batch: int, vocab: int, device) -> dict:
    torch._dynamo.reset()
    compiled = torch.compile(model, backend=backend)
    before = _graphs()
    start = time.perf_counter()
    with torch.no_grad():
        for n in lengths:
            compiled(torch.randint(0, vocab, (batch, n), device=device))
        common.synchronize(device)
    total = time.perf_counter() - start
    return {"sweep_s": total, "graphs": _graphs() - before, "fn": compiled}


def steady(fn, lengths, batch: int, vocab: int, device, repeats: int) -> dict:
    times = {}
    with torch.no_grad():
        for n in lengths:
            ids = torch.randint(0, vocab, (batch, n), device=device)
            times[n] = common.time_ms(lambda: fn(ids), device, repeats).median_ms
    return times


def static_kitsune(model, lengths, batch: int, vocab: int, device, repeats: int) -> dict:
    times = {}
    for n in lengths:
        torch._dynamo.reset()
        fn = torch.compile(model, backend="kitsune", dynamic=False)
        times.update(steady(fn, [n], batch, vocab, device, repeats))
    return times


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--quick", action="store_true", help="4 lengths, few repeats: does it run?")
    parser.add_argument("--backends", default="eager,inductor,kitsune")
    parser.add_argument("--json", help="write every figure here")
    args = parser.parse_args(argv)
    device = torch.device(args.device)
    common.ensure_kitsune_backend()
    model, batch, scale, vocab = build(device)
    lengths = [max(8, n // scale) for n in (LENGTHS[:4] if args.quick else LENGTHS)]
    points = [max(8, n // scale) for n in STEADY]
    repeats = 5 if args.quick else 30
    results = {}
    for backend in args.backends.split(","):
        if backend == "eager":
            results["eager"] = {"steady_ms": steady(model, points, batch, vocab, device, repeats)}
            continue
        run = sweep(model, backend, lengths, batch, vocab, device)
        run["steady_ms"] = steady(run.pop("fn"), points, batch, vocab, device, repeats)
        results[backend] = run
        print(f"{backend}: sweep {run['sweep_s']:.1f} s, {run['graphs']} graph(s), "
              f"steady {run['steady_ms']}", flush=True)
    if "kitsune" in results:
        results["kitsune_static"] = {"steady_ms": static_kitsune(model, points, batch, vocab, device, repeats)}
    headers = ["backend", "sweep (s)", "graphs", *[f"{n} tokens (ms)" for n in points]]
    rows = [[name, f"{r['sweep_s']:.1f}" if "sweep_s" in r else "", str(r.get("graphs", "")),
             *[f"{r['steady_ms'][n]:.3f}" for n in points]] for name, r in results.items()]
    if args.json:
        common.write_json(args.json, {"environment": common.environment(device), "lengths": lengths,
                                      "batch": batch, "results": results})
    print(common.markdown_table(headers, rows))


if __name__ == "__main__":
    main()
