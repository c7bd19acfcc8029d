"""Host time per call: eager vs Inductor vs Kitsune on work whose kernels take next to nothing.

    python3 benchmarks/bench_host.py                       # CUDA if present, else the CPU
    python3 benchmarks/bench_host.py --device cpu --quick  # does it run?
    python3 benchmarks/bench_host.py --profile             # and a cProfile of each backend

Cases (tiny, so that a call's time is Python, guards, autograd and launches):

    block_step      forward + backward of a LayerNorm -> Linear -> GELU -> Linear
                    block of width 16 (hidden 32) on 8 tokens, float32, gradients
                    set to None before each step
    pointwise_call  relu(a * 2 + b) on 1024 float32 elements, forward only
    graph50         50 pointwise groups (sigmoid(x * 1.5 + b) - 0.25) on 1x1 float32
                    tensors, each followed by a torch.mm with a 1x1 weight (an op
                    Kitsune leaves to PyTorch), forward only: ~50 kernels and 50
                    matmuls per call, so the time is the compiled graph's host time

Method:

* Each backend (eager, `torch.compile(backend="inductor")`,
  `torch.compile(backend="kitsune")`, `dynamic=False`) is compiled and called
  20 times before timing (compilation, and Kitsune's CUDA-graph recordings).
* Time: interleaved rounds (`common.interleaved_rounds`): each round makes
  `--calls` back-to-back calls of every backend in turn, synchronising the
  device before and after the round; a round's figure is its wall time /
  calls. Over `--rounds` rounds, the figure reported is the best round (host
  noise only ever adds time), with the median beside it. Interleaving makes
  drift of the host hit all backends alike.
* On CUDA the kernels are a few microseconds each, so the time is the host's
  (the device runs behind it); on the CPU it includes the tiny kernels.
* `--profile` prints a cProfile of 500 calls per backend, by own time.

Output: µs per call, a markdown table last (best round, median, Kitsune's
speed-up = other / Kitsune, > 1: Kitsune faster), `--json PATH` with every
round and the environment. This benchmark folds in the old
`host_overhead.py` (tiny block) and the per-call pointwise host time quoted
in RESULTS.md for 2026-11-25.
"""
from __future__ import annotations

import argparse
import cProfile
import pstats
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

import common  # noqa: E402

common.use_private_caches()

import torch  # noqa: E402

CASES = ("block_step", "pointwise_call", "graph50")


def block_step_case(device):
    """(module to compile, wrapper: compiled fn -> step of no arguments)."""
    from bench_reductions import Block
    torch.manual_seed(0)
    block = Block(16, 32).to(device)
    x = torch.randn(8, 16, device=device, requires_grad=True)
    grad = torch.randn(8, 16, device=device)

    def make(fn):
        def step():
            for p in block.parameters():
                p.grad = None
            x.grad = None
            fn(x).backward(grad)
        return step
    return block, make


def pointwise_call_case(device):
    a = torch.randn(1024, device=device)
    b = torch.randn(1024, device=device)

    def add_relu(x, y):
        return torch.relu(x * 2 + y)

    def make(fn):
        return lambda: fn(a, b)
    return add_relu, make


def graph50_case(device):
    torch.manual_seed(0)
    x = torch.randn(1, 1, device=device)
    w = torch.randn(1, 1, device=device) * 0.5
    b = torch.randn(1, 1, device=device)

    def chain(x, w, b):
        for _ in range(50):
            x = torch.cumsum(torch.sigmoid(x * 1.5 + b) - 0.25, 0) * w  # a group, then a scan left to PyTorch
        return x

    def make(fn):
        return lambda: fn(x, w, b)
    return chain, make


def run_case(name, device, backends, rounds, calls, profile, cuda_graphs=True) -> dict:
    target, make = {"block_step": block_step_case, "pointwise_call": pointwise_call_case,
                    "graph50": graph50_case}[name](device)
    steps = {}
    for backend in backends:
        options = {"cuda_graphs": False} if backend == "kitsune" and not cuda_graphs else None
        fn = target if backend == "eager" else torch.compile(target, backend=backend, dynamic=False,
                                                             options=options)
        steps[backend] = make(fn)
        for _ in range(20):  # compilation, then warm-up (and CUDA-graph recordings)
            steps[backend]()
    common.synchronize(device)
    timings = common.interleaved_rounds(steps, device, rounds, calls, warmup_calls=0)
    result = {}
    print(f"{name}:")
    for backend, timing in timings.items():
        result[backend] = dict(best_us=timing.min_ms * 1e3, median_us=timing.median_ms * 1e3,
                               timing_ms=timing.as_dict())
        print(f"  {backend:9s} {timing.min_ms * 1e3:8.1f} us/call best round, {timing.median_ms * 1e3:8.1f} median")
    if profile:
        for backend, step in steps.items():
            print(f"==== {name} / {backend}: cProfile of 500 calls, by own time")
            profiler = cProfile.Profile()
            profiler.runcall(lambda: [step() for _ in range(500)])
            pstats.Stats(profiler).sort_stats("tottime").print_stats(18)
    return result


def table(results: dict) -> str:
    headers = ["case", "eager us", "inductor us", "kitsune us", "vs eager", "vs inductor",
               "median us eager / inductor / kitsune"]
    lines = []
    for name, res in results["cases"].items():
        best = {b: res.get(b, {}).get("best_us") for b in common.BACKENDS}
        cells = [name] + [f"{best[b]:.1f}" if best[b] else "n/a" for b in common.BACKENDS]
        cells += [common.speedup_cell(best["eager"], best["kitsune"]),
                  common.speedup_cell(best["inductor"], best["kitsune"])]
        medians = [res.get(b, {}).get("median_us") for b in common.BACKENDS]
        cells.append(" / ".join(f"{m:.1f}" if m else "n/a" for m in medians))
        lines.append(cells)
    return common.markdown_table(headers, lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    common.add_standard_arguments(parser)
    parser.add_argument("--cases", default=",".join(CASES), help="comma-separated (default: %(default)s)")
    parser.add_argument("--rounds", type=int, default=None, help="interleaved rounds (default 15; quick 3)")
    parser.add_argument("--calls", type=int, default=None, help="calls per round (default 100; quick 10)")
    parser.add_argument("--profile", action="store_true", help="print a cProfile of 500 calls per backend")
    parser.add_argument("--no-cuda-graphs", action="store_true",
                        help="Kitsune without its CUDA graphs (each kernel launched from the host, as Inductor's)")
    args = parser.parse_args()
    device = torch.device(args.device)
    common.check_device(device)
    backends = common.parse_backends(args.backends)
    cases = [c for c in args.cases.split(",") if c]
    if any(c not in CASES for c in cases):
        raise SystemExit(f"--cases: choose from {','.join(CASES)}")
    common.disable_compile_caches()
    import kitsune  # noqa: F401  (registers the backend)
    common.ensure_kitsune_backend()
    env = common.environment(device)
    print(env)
    results = {"benchmark": "host", "environment": env, "cases": {}}
    for name in cases:
        results["cases"][name] = run_case(name, device, backends, args.rounds or (3 if args.quick else 15),
                                          args.calls or (10 if args.quick else 100), args.profile,
                                          cuda_graphs=not args.no_cuda_graphs)
    print()
    print(f"{env['device_name']}, torch {env['torch']}, triton {env['triton']}, {env['date'][:10]}; host time, "
          f"us per call, best of interleaved rounds; vs = other / kitsune (> 1: kitsune faster)")
    print()
    print(table(results))
    common.write_json(args.json, results)


if __name__ == "__main__":
    main()
