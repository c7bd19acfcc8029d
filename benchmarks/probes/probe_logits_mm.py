# Unmaintained probe: the language-model head's matmul with GPT-2's odd vocabulary (50257), which
# cuBLAS call gets the fast kernel and what layout Inductor returns. Run on an H200, 2026-12-02;
# result in benchmarks/results/probe_logits_mm_h200_2026-12-02.log and RESULTS.md ("Row kernels,
# gathers and host path on an H200", second session).
"""The language-model head's matmul with an odd vocabulary (GPT-2: 50257) on
the GPU: which way of calling cuBLAS gets its fast kernel, what each costs,
and what layout Inductor returns.

    python3 benchmarks/probes/probe_logits_mm.py      # CUDA only
"""
import torch
import triton


def bench(fn):
    return triton.testing.do_bench(fn, warmup=25, rep=200, return_mode="median")


def main():
    torch.manual_seed(0)
    m, k, n = 4096, 768, 50257
    a = torch.randn(m, k, device="cuda", dtype=torch.bfloat16)
    w = torch.randn(n, k, device="cuda", dtype=torch.bfloat16)  # nn.Linear / tied embedding layout
    b = w.t()                                                   # the graph's permute(w): [k, n], strides (1, k)
    ref = torch.mm(a.float(), b.float())
    from kitsune.runtime import matmul

    def padded_out():
        out = torch.empty(m, -(-n // 8) * 8, device="cuda", dtype=torch.bfloat16)
        return torch.mm(a, b, out=out[:, :n])

    def padded_out_contiguous():
        return padded_out().contiguous()

    variants = {
        "mm (eager)": lambda: torch.mm(a, b),
        "aligned_mm (pad weight + contiguous copy)": lambda: matmul.aligned_mm(a, b),
        "mm into padded rows (view)": padded_out,
        "mm into padded rows + contiguous": padded_out_contiguous,
        "copy of the logits alone": lambda: torch.empty(m, n, device="cuda", dtype=torch.bfloat16).copy_(
            torch.empty(m, n + 7, device="cuda", dtype=torch.bfloat16)[:, :n]),
    }
    for name, fn in variants.items():
        out = fn()
        err = (out.float() - ref).abs().max().item() if out.shape == ref.shape else float("nan")
        print(f"{name:45s} {bench(fn) * 1e3:8.1f} us  stride {out.stride()}  max err {err:.3f}")
    compiled = torch.compile(lambda x, y: torch.mm(x, y.t()), dynamic=False)
    out = compiled(a, w)
    print(f"{'inductor mm':45s} {bench(lambda: compiled(a, w)) * 1e3:8.1f} us  stride {out.stride()}")
    lin = torch.nn.Linear(k, n, bias=False, device="cuda", dtype=torch.bfloat16)
    f = torch.compile(lambda x: lin(x).view(8, 512, n), dynamic=False)
    out = f(a)
    print(f"{'inductor linear -> [8, 512, n] output':45s} {bench(lambda: f(a)) * 1e3:8.1f} us  stride {out.stride()}")


if __name__ == "__main__":
    main()
