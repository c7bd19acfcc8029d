"""Attention benchmark (issue 16): hand-written eager attention, SDPA, Inductor
(torch.compile of the hand-written form), Kitsune's flash kernel and Kitsune's
`attention()` (kernel or SDPA, chosen by measurement), forward and forward +
backward, in one process.

    python3 benchmarks/bench_attention.py                 # CUDA: the issue's shapes, bf16
    python3 benchmarks/bench_attention.py --quick         # CUDA: two small shapes
    python3 benchmarks/bench_attention.py --cases hand,d128 --backends sdpa,kitsune --json out.json
    python3 benchmarks/bench_attention.py --device cpu --quick   # does it run? (Triton's interpreter, tiny)
    python3 benchmarks/bench_attention.py --list          # the cases, nothing run
    python3 benchmarks/bench_attention.py --sweep --cases d64,d128   # Kitsune's kernel over tile configurations

Cases (bf16; batch x heads x tokens x head dim):

    hand     8 x 16 x 1024 x 64, the issue's hand-written `softmax(q @ k.T * 0.125, -1) @ v`
    pad      the same with a key-padding bool mask [8, 1, 1, 1024] (a quarter of the keys masked)
    d64 / d128   head dim 64 / 128, tokens 1k / 4k / 8k with batch x heads 128 / 64 / 32
                 (8 / 4 / 2 batches of 16 heads), causal and not

Method: every implementation is checked against SDPA first (max abs error printed;
a wrong one is not timed); times are medians of `triton.testing.do_bench`
(CUDA, after its warm-up), perf_counter medians on the CPU. TFLOP/s counts
4 * B * H * Lq * Lk * D for the forward (halved when causal) and 2.5 times that for
the backward (FlashAttention's convention), so fwd+bwd is 3.5 times the forward.
"""
from __future__ import annotations

import argparse
import json
import math
import os
import statistics
import sys
import time

BACKENDS = ("eager", "sdpa", "inductor", "kitsune", "kitsune_auto")
# (BLOCK_M, BLOCK_N, num_warps, num_stages) of the forward; (kv_m, kv_n, q_m, q_n, warps, stages) of the backward
SWEEP_FWD = ("128,64,4,3", "128,64,8,3", "128,32,8,2", "128,128,8,2", "64,64,4,3", "64,32,4,2", "128,64,4,2")
SWEEP_BWD = ("32,64,64,32,4,2", "32,64,64,32,8,2", "64,64,64,64,8,2", "32,128,128,32,8,2", "16,64,64,16,4,3",
             "32,32,32,32,4,2")


def parse_args(argv=None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--device", choices=("cuda", "cpu"), default=None, help="default: cuda when available")
    parser.add_argument("--quick", action="store_true", help="two small shapes (tiny ones on the CPU)")
    parser.add_argument("--cases", default="hand,pad,d64,d128", help="comma list of hand, pad, d64, d128")
    parser.add_argument("--backends", default=",".join(BACKENDS), help=f"comma list of {', '.join(BACKENDS)}")
    parser.add_argument("--no-backward", action="store_true", help="forward only")
    parser.add_argument("--json", default=None, help="write every number to this file")
    parser.add_argument("--list", action="store_true", help="print the cases and exit")
    parser.add_argument("--sweep", action="store_true",
                        help="time Kitsune's kernel under every tile configuration of SWEEP_FWD / SWEEP_BWD "
                             "(through KITSUNE_FLASH_FWD / KITSUNE_FLASH_BWD) instead of the backends")
    args = parser.parse_args(argv)
    unknown = set(args.backends.split(",")) - set(BACKENDS)
    if unknown:
        parser.error(f"unknown backends {sorted(unknown)}")
    return args


def cases(names: list[str], quick: bool, device: str) -> list[dict]:
    """(name, B, H, L, D, causal, padding mask) of every case asked for."""
    if device == "cpu":
        return [dict(name="tiny", b=1, h=2, l=64, d=64, causal=causal, pad=False) for causal in (False, True)]
    found = []
    if "hand" in names:
        found.append(dict(name="hand", b=8, h=16, l=1024, d=64, causal=False, pad=False))
    if "pad" in names:
        found.append(dict(name="pad", b=8, h=16, l=1024, d=64, causal=False, pad=True))
    for d in (64, 128):
        if f"d{d}" not in names:
            continue
        for l, b in ((1024, 8), (4096, 4), (8192, 2)):
            for causal in (False, True):
                found.append(dict(name=f"d{d}", b=b, h=16, l=l, d=d, causal=causal, pad=False))
    if quick:
        found = [c for c in found if c["l"] <= 1024][:2] or found[:2]
    return found


def flops(case: dict) -> float:
    work = 4.0 * case["b"] * case["h"] * case["l"] * case["l"] * case["d"]
    return work / 2 if case["causal"] else work


def implementations(case: dict, scale: float, mask, backends: list[str]) -> dict:
    import torch
    import torch.nn.functional as F
    from kitsune.ops.attention import attention
    from kitsune.ops.flash_attention import flash_attention
    causal = case["causal"]

    def eager(q, k, v):
        s = q @ k.transpose(-1, -2) * scale
        if causal:
            s = s.masked_fill(torch.ones(s.shape[-2:], dtype=torch.bool, device=s.device).triu(1), float("-inf"))
        if mask is not None:
            s = s.masked_fill(~mask, float("-inf"))
        return torch.softmax(s, -1) @ v

    table = {
        "eager": eager,
        "sdpa": lambda q, k, v: F.scaled_dot_product_attention(q, k, v, attn_mask=mask, is_causal=causal, scale=scale),
        "inductor": torch.compile(eager, backend="inductor", dynamic=False) if "inductor" in backends else None,
        "kitsune": lambda q, k, v: flash_attention(q, k, v, mask=mask, scale=scale, causal=causal),
        "kitsune_auto": lambda q, k, v: attention(q, k, v, mask=mask, scale=scale, causal=causal),
    }
    return {name: table[name] for name in backends}


def timer(device: str):
    if device == "cuda":
        import triton.testing
        return lambda fn: triton.testing.do_bench(fn, warmup=25, rep=100, return_mode="median")

    def cpu_median(fn, repeats=3):
        fn()
        times = []
        for _ in range(repeats):
            start = time.perf_counter()
            fn()
            times.append((time.perf_counter() - start) * 1e3)
        return statistics.median(times)
    return cpu_median


def run_case(case: dict, backends: list[str], device: str, backward: bool) -> list[dict]:
    import torch
    dtype = torch.bfloat16 if device == "cuda" else torch.float32
    shape = (case["b"], case["h"], case["l"], case["d"])
    q, k, v = (torch.randn(shape, device=device, dtype=dtype) for _ in range(3))
    mask = None
    if case["pad"]:
        mask = torch.ones(case["b"], 1, 1, case["l"], dtype=torch.bool, device=device)
        mask[..., -case["l"] // 4:] = False
    scale = 1.0 / math.sqrt(case["d"])
    fns = implementations(case, scale, mask, backends)
    want = torch.nn.functional.scaled_dot_product_attention(q, k, v, attn_mask=mask, is_causal=case["causal"],
                                                            scale=scale)
    measure = timer(device)
    rows = []
    for name, fn in fns.items():
        row = dict(case=case["name"], b=case["b"], h=case["h"], l=case["l"], d=case["d"], causal=case["causal"],
                   pad=case["pad"], backend=name)
        try:
            out = fn(q, k, v)
            row["max_err"] = (out.float() - want.float()).abs().max().item()
            if not row["max_err"] < 0.05:
                row["error"] = "wrong result, not timed"
                rows.append(report(row))
                continue
            row["fwd_ms"] = measure(lambda: fn(q, k, v))
            row["fwd_tflops"] = flops(case) / row["fwd_ms"] / 1e9
            if backward:
                row["fwd_bwd_ms"] = time_backward(fn, q, k, v, measure)
                row["fwd_bwd_tflops"] = 3.5 * flops(case) / row["fwd_bwd_ms"] / 1e9
        except Exception as error:  # noqa: BLE001 - one failing backend does not stop the table
            row["error"] = f"{type(error).__name__}: {str(error)[:200]}"
        rows.append(report(row))
        if device == "cuda":
            torch.cuda.empty_cache()
    return rows


def sweep_case(case: dict, device: str, backward: bool) -> list[dict]:
    """Kitsune's kernel alone under each forward (then backward) tile configuration."""
    rows = []
    settings = [("KITSUNE_FLASH_FWD", c) for c in SWEEP_FWD] + ([("KITSUNE_FLASH_BWD", c) for c in SWEEP_BWD]
                                                             if backward else [])
    for variable, config in settings:
        os.environ[variable] = config
        try:
            row = run_case(case, ["kitsune"], device, backward=variable == "KITSUNE_FLASH_BWD")[0]
        finally:
            del os.environ[variable]
        row["config"] = f"{variable}={config}"
        print(f"      {row['config']}", flush=True)
        rows.append(row)
    return rows


def time_backward(fn, q, k, v, measure) -> float:
    import torch
    leaves = [t.detach().requires_grad_() for t in (q, k, v)]
    grad = torch.randn_like(fn(*leaves))

    def step():
        torch.autograd.grad(fn(*leaves), leaves, grad)
    return measure(step)


def report(row: dict) -> dict:
    shape = f"{row['b']}x{row['h']}x{row['l']}x{row['d']}{' causal' if row['causal'] else ''}{' pad' if row['pad'] else ''}"
    if "error" in row:
        print(f"{row['case']:5} {shape:28} {row['backend']:13} {row['error']}", flush=True)
        return row
    bwd = f"{row['fwd_bwd_ms']:9.3f} ms {row['fwd_bwd_tflops']:6.1f} TF/s" if "fwd_bwd_ms" in row else ""
    err = f"  err {row['max_err']:.2e}"
    print(f"{row['case']:5} {shape:28} {row['backend']:13} fwd {row['fwd_ms']:8.3f} ms {row['fwd_tflops']:6.1f} TF/s"
          f"   fwd+bwd {bwd}{err}", flush=True)
    return row


def main(argv=None) -> int:
    args = parse_args(argv)
    device = args.device or ("cuda" if _cuda_available() else "cpu")
    if device == "cpu":
        os.environ.setdefault("TRITON_INTERPRET", "1")  # before Triton is imported: the kernels run interpreted
    chosen = cases(args.cases.split(","), args.quick, device)
    if args.list:
        for case in chosen:
            print(case)
        return 0
    sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "src"))
    backends = args.backends.split(",")
    if device == "cpu":
        backends = [b for b in backends if b != "inductor"]  # Inductor's CPU build is not what this measures
    rows = []
    for case in chosen:
        if args.sweep:
            rows += sweep_case(case, device, backward=not args.no_backward)
        else:
            rows += run_case(case, backends, device, backward=not args.no_backward)
    if args.json:
        with open(args.json, "w") as handle:
            json.dump(dict(device=device, rows=rows), handle, indent=1)
    return 0


def _cuda_available() -> bool:
    import torch
    return torch.cuda.is_available()


if __name__ == "__main__":
    sys.exit(main())
