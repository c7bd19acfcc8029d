# Unmaintained probe (issue 15 item 6): kitsune.ops.linear_cross_entropy on a GPU against eager's
# F.cross_entropy(F.linear(...)) in bf16: loss and gradients (error of each against float64, side by
# side), forward+backward time, and the extra memory of the loss beyond its inputs and gradients,
# as a share of the bf16 logits tensor.   python3 benchmarks/probes/lm_head_gpu_check.py [N H V ...]
import sys

import torch
import torch.nn.functional as F

from kitsune.ops import linear_cross_entropy


def step(fn, hidden, weight, target):
    h = hidden.detach().requires_grad_()
    w = weight.detach().requires_grad_()
    loss = fn(h, w, target)
    loss.backward()
    return loss.detach(), h.grad, w.grad


def eager(h, w, target):
    return F.cross_entropy(F.linear(h, w).float(), target, ignore_index=-100)


def fused(h, w, target):
    return linear_cross_entropy(h, w, None, target, ignore_index=-100, dtype=torch.float32)


def peak_extra_mib(fn, hidden, weight, target) -> float:
    """Peak memory during one step beyond its inputs and the gradients it leaves."""
    torch.cuda.synchronize()
    torch.cuda.reset_peak_memory_stats()
    base = torch.cuda.memory_allocated()
    loss, gh, gw = step(fn, hidden, weight, target)
    torch.cuda.synchronize()
    grads = gh.numel() * gh.element_size() + gw.numel() * gw.element_size()
    return (torch.cuda.max_memory_allocated() - base - grads) / 2 ** 20


def time_ms(fn, hidden, weight, target, repeats=10) -> float:
    for _ in range(2):
        step(fn, hidden, weight, target)
    start, stop = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    times = []
    for _ in range(repeats):
        start.record()
        step(fn, hidden, weight, target)
        stop.record()
        stop.synchronize()
        times.append(start.elapsed_time(stop))
    return sorted(times)[len(times) // 2]


def errors(got, ref):
    return [((g.double() - r).norm() / r.norm()).item() for g, r in zip(got, ref)]


def main(rows, width, vocab):
    torch.manual_seed(0)
    hidden = torch.randn(rows, width, device="cuda", dtype=torch.bfloat16)
    weight = (torch.randn(vocab, width, device="cuda") * width ** -0.5).bfloat16()
    target = torch.randint(0, vocab, (rows,), device="cuda")
    target[::7] = -100
    ref = step(lambda h, w, t: F.cross_entropy(F.linear(h, w), t, ignore_index=-100),
               hidden.double(), weight.double(), target)
    err_eager = errors(step(eager, hidden, weight, target), ref)
    err_fused = errors(step(fused, hidden, weight, target), ref)
    logits_mib = rows * vocab * 2 / 2 ** 20
    print(f"N={rows} H={width} V={vocab}: bf16 logits {logits_mib:.0f} MiB")
    print("  error vs float64 (loss, grad hidden, grad weight): eager "
          + ", ".join(f"{e:.2e}" for e in err_eager) + " | kitsune " + ", ".join(f"{e:.2e}" for e in err_fused))
    for name, fn in (("eager", eager), ("kitsune", fused)):
        extra = peak_extra_mib(fn, hidden, weight, target)
        print(f"  {name:8s} fwd+bwd {time_ms(fn, hidden, weight, target):8.2f} ms   extra memory {extra:8.0f} MiB "
              f"({extra / logits_mib:.1%} of the logits)")


if __name__ == "__main__":
    sizes = [int(a) for a in sys.argv[1:]] or [8192, 768, 50257, 8192, 2048, 128256]
    for i in range(0, len(sizes), 3):
        main(*sizes[i:i + 3])
