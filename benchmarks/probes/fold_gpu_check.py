# Unmaintained probe (issue 15): conv+BN folding on the GPU under CUDA-graph replay (in-place
# updates seen), the bf16 error rule, and the top GPU kernels of ResNet-50 / GPT-2 small for
# eager / Inductor / Kitsune.   python3 benchmarks/probes/fold_gpu_check.py [resnet50,mobilenet,gpt2]
import sys
import time

import torch
from torch import nn

import kitsune  # noqa: F401
from kitsune.record import default_sink


def randomise(model):
    for m in model.modules():
        if isinstance(m, nn.modules.batchnorm._BatchNorm):
            m.running_mean.normal_(0, 0.1)
            m.running_var.uniform_(0.5, 2.0)
            m.weight.data.uniform_(0.5, 1.5)
            m.bias.data.normal_(0, 0.1)
    return model


def check_replay():
    torch.manual_seed(0)
    net = randomise(nn.Sequential(nn.Conv2d(16, 32, 3, padding=1), nn.BatchNorm2d(32), nn.ReLU(),
                                  nn.Conv2d(32, 32, 3, padding=1), nn.BatchNorm2d(32))).cuda().eval()
    net = net.to(memory_format=torch.channels_last)
    x = torch.randn(8, 16, 32, 32, device="cuda").to(memory_format=torch.channels_last)
    default_sink().reset()
    c = torch.compile(net, backend="kitsune")
    with torch.no_grad():
        for i in range(6):
            torch.testing.assert_close(c(x), net(x), rtol=5e-3, atol=5e-3)  # TF32 convolutions
        net[1].running_var.mul_(2.0)
        net[3].weight.mul_(-1.0)
        for i in range(3):
            torch.testing.assert_close(c(x), net(x), rtol=5e-3, atol=5e-3)  # TF32 convolutions
    rec = default_sink().records()[-1]
    print("replay check ok: cuda_graph", rec.cuda_graph, "rewrites", sum(r.applied for r in rec.rewrites))


def check_bf16_rule():
    torch.manual_seed(1)
    layers = []
    for cin, cout in ((3, 64), (64, 64), (64, 64), (64, 32)):
        layers += [nn.Conv2d(cin, cout, 3, padding=1), nn.BatchNorm2d(cout), nn.ReLU()]
    model = randomise(nn.Sequential(*layers)).cuda().eval()
    x = torch.randn(16, 3, 32, 32, device="cuda")
    with torch.no_grad():
        ref = model.double()(x.double())
        low = model.to(torch.bfloat16)
        eager = low(x.bfloat16()).double()
        torch._dynamo.reset()
        folded = torch.compile(low, backend="kitsune")(x.bfloat16()).double()
    err = lambda y: ((y - ref).norm() / ref.norm()).item()  # noqa: E731
    print(f"bf16 rule: eager err {err(eager):.3e}, folded err {err(folded):.3e}, ratio {err(folded) / err(eager):.2f}")


def median_ms(fn, x, reps=30):
    times = []
    for _ in range(reps):
        s, e = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        s.record()
        fn(x)
        e.record()
        e.synchronize()
        times.append(s.elapsed_time(e))
    return sorted(times)[len(times) // 2]


def profile(name, model, x, backends=("eager", "inductor", "kitsune")):
    with torch.no_grad():
        want = model(x)
        want = (want.logits if hasattr(want, "logits") else want).float()
    for backend in backends:
        torch._dynamo.reset()
        default_sink().reset()
        start = time.perf_counter()
        fn = model if backend == "eager" else torch.compile(model, backend=backend)
        with torch.no_grad():
            for _ in range(4):
                fn(x)
            torch.cuda.synchronize()
            compile_s = time.perf_counter() - start
            ms = median_ms(fn, x)
            with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CUDA]) as prof:
                for _ in range(5):
                    fn(x)
                torch.cuda.synchronize()
        with torch.no_grad():
            got = fn(x)
            got = (got.logits if hasattr(got, "logits") else got).float()
        diff = ((got - want).abs().max() / want.abs().max()).item()
        print(f"==== {name} / {backend}: {ms:.3f} ms (first calls {compile_s:.1f} s), max diff / max {diff:.2e}")
        if backend == "kitsune":
            from kitsune.report.explain import explain_records
            text = explain_records(default_sink().records())
            print("\n".join(line for line in text.splitlines()[:40]))
        print(prof.key_averages().table(sort_by="self_cuda_time_total", row_limit=12, max_name_column_width=80))


def main():
    which = sys.argv[1].split(",") if len(sys.argv) > 1 else ["resnet50", "gpt2"]
    check_replay()
    check_bf16_rule()
    if "resnet50" in which:
        try:
            from kitsune._compat import import_torchvision
            tv = import_torchvision()
            model = randomise(tv.models.resnet50()).cuda().eval().to(memory_format=torch.channels_last)
            x = torch.randn(64, 3, 224, 224, device="cuda").to(memory_format=torch.channels_last)
            profile("resnet50 fp32 b64 channels-last", model, x)
        except ImportError as error:
            print("no torchvision:", error)
    if "mobilenet" in which:  # 0.50x Inductor on the H100 on 2026-12-07: where do its kernels lose?
        from kitsune._compat import import_torchvision
        tv = import_torchvision()
        model = randomise(tv.models.mobilenet_v3_large()).cuda().eval().to(memory_format=torch.channels_last)
        x = torch.randn(128, 3, 224, 224, device="cuda").to(memory_format=torch.channels_last)
        profile("mobilenet_v3_large fp32 b128 channels-last", model, x)
    if "gpt2" in which:
        import transformers
        model = transformers.GPT2LMHeadModel(transformers.GPT2Config(
            attn_pdrop=0.0, embd_pdrop=0.0, resid_pdrop=0.0)).cuda().to(torch.bfloat16).eval()
        profile("gpt2 bf16 8x512", model, torch.randint(0, 50257, (8, 512), device="cuda"))


if __name__ == "__main__":
    main()
