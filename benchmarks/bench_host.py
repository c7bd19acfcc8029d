"""Host time per fwd+bwd step of a tiny LayerNorm-Linear-GELU-Linear block
(kernels negligible): eager vs Inductor vs Kitsune, interleaved rounds, best round.

    python3 benchmarks/host_overhead.py [--profile] [--cuda] [eager,inductor,kitsune]

--cuda runs the same tiny block on the GPU (its kernels take a few microseconds,
so a step's time is the host's: Python, dispatch and launches).
"""
import sys, time, torch, cProfile, pstats
sys.path.insert(0, __import__("os").path.dirname(__file__))
import bench_reductions as br
import kitsune
torch.manual_seed(0)
device = "cuda" if "--cuda" in sys.argv else "cpu"
block = br.Block(16, 32).to(device)
x = torch.randn(8, 16, device=device, requires_grad=True)
grad = torch.randn(8, 16, device=device)
sync = torch.cuda.synchronize if device == "cuda" else (lambda: None)
def make(fn):
    def step():
        for p in block.parameters(): p.grad = None
        x.grad = None
        out = fn(x); out.backward(grad)
    return step
steps = {}
for be in (next((a.split(",") for a in sys.argv[1:] if not a.startswith("-")), None) or ["eager", "inductor", "kitsune"]):
    torch._dynamo.reset()
    fn = block if be == "eager" else torch.compile(block, backend=be, dynamic=False)
    steps[be] = make(fn)
    for _ in range(20): steps[be]()
best = {be: float("inf") for be in steps}
for _ in range(15):  # interleaved rounds; the best round of each is its host time
    for be, step in steps.items():
        t = time.perf_counter()
        for _ in range(100): step()
        sync()
        best[be] = min(best[be], (time.perf_counter() - t) / 100 * 1e6)
for be in steps:
    print(be, f"{best[be]:.1f} us/step")
if "--profile" in sys.argv:
    for be, step in steps.items():
        print(f"==== {be}: cProfile of 500 steps, by own time")
        profile = cProfile.Profile()
        profile.runcall(lambda: [step() for _ in range(500)])
        pstats.Stats(profile).sort_stats("tottime").print_stats(18)
