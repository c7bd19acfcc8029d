"""kitsune.lazy() against eager PyTorch and torch.compile (Inductor), side by side.

(a) a hand-written AdamW step over GPT-2-small-sized parameters: steady state and first call;
(b) the 5-op pointwise chain at 64M elements (--quick: 1M), with GB/s (bytes read + written);
(c) recording overhead per op on tiny tensors: eager, an empty pass-through
    TorchDispatchMode, and a lazy region that records (min_tensor_size=0).

    python benchmarks/bench_lazy.py [--quick] [--device cpu|cuda] [--threads N]
Numbers on a loaded machine are indicative only.
"""
from __future__ import annotations

import argparse
import math
import statistics
import sys
import time

import torch
from torch.utils._python_dispatch import TorchDispatchMode

import kitsune

GPT2_SMALL = [(50257, 768), (1024, 768)] + [s for _ in range(12) for s in
              [(768,), (768,), (2304, 768), (2304,), (768, 768), (768,), (768,), (768,),
               (3072, 768), (3072,), (768, 3072), (768,)]] + [(768,), (768,)]


def sync(device):
    if device.type == "cuda":
        torch.cuda.synchronize()


def timed(fn, device, repeat: int) -> float:
    """Median seconds per call (robust to a loaded machine)."""
    times = []
    for _ in range(repeat):
        sync(device)
        start = time.perf_counter()
        fn()
        sync(device)
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def adamw(params, grads, ms, vs, step, lr=1e-3, b1=0.9, b2=0.999, eps=1e-8, wd=0.01):
    bc1, bc2 = 1 - b1 ** step, 1 - b2 ** step
    for p, g, m, v in zip(params, grads, ms, vs):
        p.mul_(1 - lr * wd)
        m.lerp_(g, 1 - b1)
        v.mul_(b2).addcmul_(g, g, value=1 - b2)
        denom = (v.sqrt() / math.sqrt(bc2)).add_(eps)
        p.addcdiv_(m, denom, value=-lr / bc1)


def bench_adamw(device, quick: bool) -> None:
    shapes = GPT2_SMALL[:20] if quick else GPT2_SMALL[:200]
    if quick:
        shapes = [tuple(max(1, n // 16) for n in s) for s in shapes]
    state = [[torch.randn(s, device=device) for s in shapes] for _ in range(2)] + \
        [[torch.zeros(s, device=device) for s in shapes] for _ in range(2)]
    step = [0]

    def eager():
        step[0] += 1
        adamw(*state, step[0])

    @kitsune.lazy
    def lazy():
        step[0] += 1
        adamw(*state, step[0])

    compiled_fn = torch.compile(adamw)

    def inductor():
        step[0] += 1
        compiled_fn(*state, step[0])

    repeat = 5 if quick else 20
    print(f"(a) AdamW over {len(shapes)} tensors, {sum(math.prod(s) for s in shapes) / 1e6:.1f}M elements")
    for name, fn in (("eager", eager), ("kitsune.lazy", lazy), ("inductor", inductor)):
        first = timed(fn, device, 1)
        fn()
        steady = timed(fn, device, repeat)
        print(f"    {name:14s} first call {first * 1e3:9.1f} ms   steady {steady * 1e3:8.2f} ms/step")


def chain(x, y):
    return ((x * y + 1.0).sigmoid() * 2.0 - y).relu()


def bench_chain(device, quick: bool) -> None:
    n = (1 << 20) if quick else (64 << 20)
    x, y = torch.randn(n, device=device), torch.randn(n, device=device)
    moved = 3 * n * 4  # two reads and a write, float32

    @kitsune.lazy
    def lazy():
        return chain(x, y)

    compiled_fn = torch.compile(chain)
    repeat = 5 if quick else 20
    print(f"(b) 5-op pointwise chain, {n / 1e6:.0f}M elements (GB/s counts 2 reads + 1 write)")
    for name, fn in (("eager", lambda: chain(x, y)), ("kitsune.lazy", lazy), ("inductor", lambda: compiled_fn(x, y))):
        fn()
        seconds = timed(fn, device, repeat)
        print(f"    {name:14s} {seconds * 1e3:8.2f} ms   {moved / seconds / 1e9:7.1f} GB/s")


class PassThrough(TorchDispatchMode):
    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        return func(*args, **(kwargs or {}))


def bench_overhead(quick: bool) -> None:
    """Per-op cost of each variant: the least CPU time of this thread (`time.thread_time`: time
    the shared machine gives to other processes is not counted) over interleaved runs, and the
    Python and C function calls per op (`sys.setprofile`: exact, whatever the load)."""
    a, b = torch.randn(16), torch.randn(16)
    ops = 2000 if quick else 20000

    def loop():
        x = a
        for _ in range(ops // 4):
            x = ((x + b) * b - a).abs()
        return x

    def in_mode():
        with PassThrough():
            return loop()

    def recorded():
        with kitsune.lazy(min_tensor_size=0, max_pending_ops=ops + 1):
            return loop()

    def tiny():
        with kitsune.lazy():
            return loop()

    variants = {"eager": loop, "pass-through mode": in_mode, "lazy, recorded": recorded, "lazy, below min size": tiny}
    best = {name: math.inf for name in variants}
    for fn in variants.values():
        fn()
    for _ in range(10):  # interleaved: a load change hits every variant alike
        for name, fn in variants.items():
            start = time.thread_time()
            fn()
            best[name] = min(best[name], time.thread_time() - start)
    print("(c) per-op cost on 16-element CPU tensors (recording includes the flush at the end);"
          " least thread CPU time of interleaved runs, and function calls per op")
    base = best["pass-through mode"]
    for name, fn in variants.items():
        print(f"    {name:22s} {best[name] / ops * 1e6:7.1f} us/op   ({best[name] / base:.2f}x pass-through)"
              f"   {calls_per_op(fn, ops):5.1f} calls/op")


def calls_per_op(fn, ops: int) -> float:
    """Python and C function calls `fn` makes, per op (a noise-free proxy of its cost)."""
    count = [0]

    def profile(frame, event, arg):
        if event == "call" or event == "c_call":
            count[0] += 1

    sys.setprofile(profile)
    try:
        fn()
    finally:
        sys.setprofile(None)
    return count[0] / ops


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="small sizes, few repeats")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--threads", type=int, default=0,
                        help="torch.set_num_threads (on a small shared CPU, 1 avoids oversubscription)")
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    device = torch.device(args.device)
    print(f"torch {torch.__version__} on {device}")
    bench_overhead(args.quick)
    bench_chain(device, args.quick)
    bench_adamw(device, args.quick)
    print("lazy stats:", kitsune.lazy_stats())


if __name__ == "__main__":
    main()
