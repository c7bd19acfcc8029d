# Unmaintained probe: the first slice of issue 3's reductions (softmax, layer_norm+GELU, RMSNorm,
# cross-entropy) timed with triton.testing.do_bench, warm compiles. Run on an H100, 2026-11-25;
# result in RESULTS.md ("Reductions (issue 3, first slice)"). Superseded by bench_reductions.py.
"""Quick probe of fused reductions on a GPU (issue 3 cases): eager, Inductor and
Kitsune medians with triton.testing.do_bench, share of the measured copy rate
(one read + one write; cross-entropy: the logits read once), first-call
seconds. Not the full issue-3 benchmark: Inductor's compile times here are not
cold.  Run: python3 benchmarks/probes/probe_reductions.py
"""
import os, tempfile
os.environ.setdefault("KITSUNE_CACHE_DIR", tempfile.mkdtemp())
import time, torch, torch.nn.functional as F, kitsune
from triton.testing import do_bench
torch.manual_seed(0)
src = torch.empty(1 << 28, dtype=torch.uint8, device="cuda"); dst = torch.empty_like(src)
copy = 2 * src.numel() / do_bench(lambda: dst.copy_(src), return_mode="median") / 1e6
print(f"copy {copy:.0f} GB/s")
def softmax(x): return torch.softmax(x * 0.125, -1)
def ln_gelu(x, w, b): return F.gelu(F.layer_norm(x, (x.shape[-1],), w, b))
def rms(x, w): return (x.float() * torch.rsqrt(x.float().pow(2).mean(-1, keepdim=True) + 1e-6)).to(x.dtype) * w
def ce(x, t): return F.cross_entropy(x, t)
M, N = 16384, 4096
x = torch.randn(M, N, device="cuda", dtype=torch.bfloat16); w = torch.randn(N, device="cuda", dtype=torch.bfloat16); b = torch.randn_like(w)
logits = torch.randn(8192, 32000, device="cuda", dtype=torch.bfloat16); t = torch.randint(0, 32000, (8192,), device="cuda")
cases = [("softmax", softmax, (x,), 2 * x.numel() * 2), ("ln_gelu", ln_gelu, (x, w, b), 2 * x.numel() * 2),
         ("rmsnorm", rms, (x, w), 2 * x.numel() * 2), ("cross_entropy", ce, (logits, t), logits.numel() * 2)]
for name, f, args, nbytes in cases:
    row = [name]
    ref = f(*args)
    for be in ("eager", "inductor", "kitsune"):
        torch._dynamo.reset(); kitsune.reset_fusion_stats()
        fn = f if be == "eager" else torch.compile(f, backend=be)
        t0 = time.perf_counter(); out = fn(*args); torch.cuda.synchronize(); ct = time.perf_counter() - t0
        try:
            torch.testing.assert_close(out.float(), ref.float(), atol=2e-2, rtol=2e-2)
            ok = "ok"
        except AssertionError as e:
            ok = "MISMATCH " + str(e).splitlines()[2]
        ms = do_bench(lambda: fn(*args), return_mode="median")
        extra = ""
        if be == "kitsune":
            st = kitsune.get_fusion_stats(); extra = f" fused={st['num_fused']} k {st['kernels_before']}->{st['kernels_after']} fb={st['fallbacks']}"
        row.append(f"{be} {ms:.3f} ms ({nbytes/ms/1e6/copy*100:.0f}% copy, compile {ct:.2f}s, {ok}){extra}")
    print(" | ".join(row))
