"""GPU check of the ops that move elements (cat, pad, scatter, arange, embedding,
index, index_select, gather): generated Triton kernels against eager on CUDA,
and an out-of-range position raising (a device assert, in a child process:
it leaves the CUDA context unusable, as eager's own assert does).

    python3 benchmarks/probes/indexing_gpu_check.py      # exits 1 on a mismatch

Prints one line per case: ok / MISMATCH, and the groups that fused.
"""
from __future__ import annotations

import subprocess
import sys

import torch
import torch.nn.functional as F

from kitsune.backend import make_backend
from kitsune.config import FusionConfig
from kitsune.record import default_sink

aten = torch.ops.aten


def rotary(q, cos, sin):
    half = q.shape[-1] // 2
    return q * cos + torch.cat((-q[..., half:], q[..., :half]), -1) * sin


def cases(device):
    def r(*shape, dtype=torch.float32):
        return torch.randn(*shape, device=device).to(dtype)

    ids = torch.randint(0, 1000, (8, 128), device=device)
    wte, wpe = r(1000, 64, dtype=torch.bfloat16), r(128, 64, dtype=torch.bfloat16)
    return {
        "cat": (lambda a, b: torch.cat([a * 2, b + 1, a.relu()], 1) * 3, (r(64, 40), r(64, 24))),
        "rotary_bf16": (rotary, (r(8, 16, 128, 64, dtype=torch.bfloat16), r(128, 64), r(128, 64))),
        "pad": (lambda a: F.pad(a * 2, (1, 2, 0, 3), value=1.5) + 1, (r(33, 65),)),
        "slice_scatter": (lambda a, b: aten.slice_scatter(a * 2, b + 1, 1, 1, 7, 2) * 2, (r(300, 8), r(300, 3))),
        "embed": (lambda i: (F.embedding(i, wte) + F.embedding(torch.arange(i.shape[1], device=device), wpe)) * 2,
                  (ids,)),
        "index": (lambda x, i: x[:, i] * 2 + 1, (r(64, 100, 5), torch.randint(-100, 100, (7, 3), device=device))),
        "index_select": (lambda x, i: torch.index_select(x, 0, i) * 2, (r(100, 33), torch.randint(0, 100, (50,),
                                                                                                    device=device))),
        "cross_entropy": (lambda x, t: F.cross_entropy(x * 1.5, t), (r(256, 1000), torch.randint(0, 1000, (256,),
                                                                                                    device=device))),
    }


def out_of_range_child() -> None:
    """Runs in a child: an embedding with an id past the table must fail."""
    fn = torch.compile(lambda i, w: F.embedding(i, w) * 2, backend=make_backend(FusionConfig(min_tensor_size=0)))
    w = torch.randn(10, 4, device="cuda")
    fn(torch.tensor([[1, 2]], device="cuda"), w)
    fn(torch.tensor([[1, 100]], device="cuda"), w)
    torch.cuda.synchronize()
    print("NO ERROR")


def main() -> int:
    if len(sys.argv) > 1 and sys.argv[1] == "--child":
        out_of_range_child()
        return 0
    backend = make_backend(FusionConfig(min_tensor_size=0))
    failures = 0
    for name, (fn, args) in cases("cuda").items():
        torch._dynamo.reset()
        default_sink().reset()
        got, want = torch.compile(fn, backend=backend, dynamic=False)(*args), fn(*args)
        try:
            torch.testing.assert_close(got, want, equal_nan=True, atol=2e-2, rtol=2e-2)
            verdict = "ok"
        except AssertionError as error:
            verdict, failures = f"MISMATCH {str(error).splitlines()[2:4]}", failures + 1
        groups = [names for record in default_sink().records() for _, names, _ in record.groups]
        print(f"{name:14s} {verdict} {groups}")
    child = subprocess.run([sys.executable, __file__, "--child"], capture_output=True, text=True, timeout=300)
    raised = child.returncode != 0 and "NO ERROR" not in child.stdout
    print("out of range:", "raises" if raised else "DID NOT RAISE", (child.stderr.strip().splitlines() or [""])[-1])
    failures += not raised
    return 1 if failures else 0


if __name__ == "__main__":
    sys.exit(main())
