# Unmaintained probe: PyTorch-profiler tables of the LayerNorm->Linear->GELU->Linear block's
# fwd+bwd (top CUDA kernels; --host: top host-side ops of a tiny block) for eager, Inductor and
# Kitsune. Run on an H200, 2026-12-02; results in benchmarks/results/block_profile_h200_2026-12-02{,c}.log,
# block_host_profile_h200_2026-12-02.log and RESULTS.md (2026-12-02 H200 sessions). The maintained
# figures (wall and GPU-busy time) come from bench_reductions.py --cases block_fwd_bwd.
"""Where the LayerNorm->Linear->GELU->Linear block's fwd+bwd spends GPU time (CUDA only):
top CUDA kernels, eager / inductor / kitsune.

    python3 benchmarks/probes/profile_block_gpu.py
    python3 benchmarks/probes/profile_block_gpu.py --host   # a tiny block: top host-side ops and CUDA API calls
"""
import sys, torch
sys.path.insert(0, __import__("os").path.dirname(__import__("os").path.dirname(__file__)))
from bench_reductions import block_case
import kitsune
host = "--host" in sys.argv
if host:
    from bench_reductions import Block
    torch.manual_seed(0)
    block = Block(16, 32).cuda()
    x = torch.randn(8, 16, device="cuda", requires_grad=True)
    grad = torch.randn(8, 16, device="cuda")

    def make(fn):
        def step():
            for p in block.parameters():
                p.grad = None
            x.grad = None
            fn(x).backward(grad)
        return step
else:
    block, make = block_case(torch.device("cuda"), torch.bfloat16, True)
for be in ["eager", "inductor", "kitsune"]:
    torch._dynamo.reset()
    fn = block if be == "eager" else torch.compile(block, backend=be, dynamic=False)
    step = make(fn)
    for _ in range(5): step()
    torch.cuda.synchronize()
    with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CUDA, torch.profiler.ProfilerActivity.CPU]) as p:
        for _ in range(5): step()
        torch.cuda.synchronize()
    print(f"==== {be}")
    print(p.key_averages().table(sort_by="self_cpu_time_total" if host else "cuda_time_total",
                                 row_limit=30 if host else 14, max_name_column_width=70))
