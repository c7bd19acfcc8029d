"""Where a dynamic-shape GPT-2 loses to the static one on a GPU: the CUDA
kernels of one forward (bf16, 8x512), static vs `dynamic=True`, by total time.

    python3 benchmarks/probes/profile_dynamic_gpu.py
"""
from __future__ import annotations

import sys
from pathlib import Path

import torch
from torch.profiler import ProfilerActivity, profile

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
import bench_dynamic  # noqa: E402


def kernels(fn, ids, label: str) -> None:
    with torch.no_grad():
        for _ in range(3):
            fn(ids)
        torch.cuda.synchronize()
        with profile(activities=[ProfilerActivity.CUDA]) as prof:
            for _ in range(5):
                fn(ids)
            torch.cuda.synchronize()
    rows = sorted(((e.key, e.device_time_total / 5, e.count // 5) for e in prof.key_averages()
                   if e.device_time_total > 0), key=lambda r: -r[1])
    total = sum(r[1] for r in rows)
    print(f"== {label}: {total / 1000:.3f} ms of kernels per forward")
    for key, us, count in rows[:14]:
        print(f"  {us:9.1f} us  x{count:<4d} {key[:110]}")


def main() -> None:
    device = torch.device("cuda")
    model, batch, _, vocab = bench_dynamic.build(device)
    ids = torch.randint(0, vocab, (batch, 512), device=device)
    for dynamic in (False, True):
        torch._dynamo.reset()
        fn = torch.compile(model, backend="kitsune", dynamic=dynamic)
        if dynamic:
            fn(torch.randint(0, vocab, (batch, 300), device=device))  # a second length
        kernels(fn, ids, "dynamic" if dynamic else "static")


if __name__ == "__main__":
    main()
