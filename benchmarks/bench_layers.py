"""kitsune.nn's fused layers against their unfused PyTorch equivalents, side by side,
in eager mode and under torch.compile (Inductor): median milliseconds per step and
the unfused / fused ratio (above 1: the fused layer is faster).

A step is forward + backward (a training step's share of the layer) except for
FusedConvBN, which folds only in eval() and is timed as inference. Issue 17's target:
each layer >= 1.0x its unfused equivalent under torch.compile with Inductor.

    python benchmarks/bench_layers.py [--device cuda|cpu] [--quick] [--dtype bf16|fp16|fp32]
        [--layers linear_gelu,...] [--json PATH]

--quick uses tiny shapes and few repeats (checks that the script runs; the numbers
mean nothing). Numbers on a loaded machine are indicative only.
"""
from __future__ import annotations

import argparse
import copy
import sys
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import environment, markdown_table, synchronize, time_ms, write_json  # noqa: E402

import kitsune.nn as knn  # noqa: E402

DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}


class Unfused(nn.Module):
    """`activation(module(x))`: the unfused equivalent of a layer with an activation."""

    def __init__(self, module, activation):
        super().__init__()
        self.module, self.activation = module, activation

    def forward(self, *args):
        return self.activation(self.module(*args))


class UnfusedAttention(nn.Module):
    """FusedAttention's computation with F.scaled_dot_product_attention (same parameters)."""

    def __init__(self, fused):
        super().__init__()
        self.fused = copy.deepcopy(fused)

    def forward(self, x):
        f, (b, t, e) = self.fused, x.shape
        q = f.q_proj(x).view(b, t, f.num_heads, f.head_dim).transpose(1, 2)
        k = f.k_proj(x).view(b, t, f.num_kv_heads, f.head_dim).transpose(1, 2)
        v = f.v_proj(x).view(b, t, f.num_kv_heads, f.head_dim).transpose(1, 2)
        out = F.scaled_dot_product_attention(q, k, v, is_causal=f.causal, enable_gqa=f.num_kv_heads != f.num_heads)
        return f.out_proj(out.transpose(1, 2).reshape(b, t, e))


class UnfusedLinearCE(nn.Module):
    def __init__(self, fused):
        super().__init__()
        self.linear = nn.Linear(fused.in_features, fused.out_features, bias=fused.bias is not None)
        self.linear.load_state_dict(fused.state_dict())

    def forward(self, hidden, target):
        return F.cross_entropy(self.linear(hidden).flatten(0, -2).float(), target.flatten())


def cases(quick: bool, device, dtype) -> dict:
    """name -> (fused module, unfused module, inputs, training)."""
    s = 16 if quick else 1
    rows, width, vocab = 8192 // s, 4096 // s, 32000 // s
    factory = dict(device=device, dtype=dtype)

    def x(*shape, grad=True):
        return torch.randn(*shape, **factory).requires_grad_(grad)

    built = {}
    linear = knn.FusedLinear(width // 4, width, activation="gelu", **factory)
    plain = nn.Linear(width // 4, width, **factory)
    plain.load_state_dict(linear.state_dict())
    built["linear_gelu"] = (linear, Unfused(plain, nn.GELU()), (x(rows, width // 4),), True)
    norm = knn.FusedLayerNorm(width, activation="gelu", **factory)
    built["layer_norm_gelu"] = (norm, Unfused(nn.LayerNorm(width, **factory), nn.GELU()), (x(rows, width),), True)
    rms = knn.FusedRMSNorm(width, eps=1e-6, **factory)
    built["rms_norm"] = (rms, nn.RMSNorm(width, eps=1e-6, **factory), (x(rows, width),), True)
    target = torch.randint(0, vocab, (rows // 4,), device=device)
    built["softmax_cross_entropy"] = (knn.FusedSoftmaxCrossEntropy(), nn.CrossEntropyLoss(),
                                      (x(rows // 4, vocab), target), True)
    head = knn.FusedLinearCrossEntropy(width // 4, vocab, **factory)
    built["linear_cross_entropy"] = (head, UnfusedLinearCE(head).to(**factory), (x(rows, width // 4), torch.randint(
        0, vocab, (rows,), device=device)), True)
    attention = knn.FusedAttention(1024 // s, 16 // min(s, 4), num_kv_heads=4 // min(s, 4), causal=True, **factory)
    built["attention_gqa"] = (attention, UnfusedAttention(attention), (x(8 // min(s, 4), 1024 // s, 1024 // s),),
                              True)
    conv, bn = nn.Conv2d(64, 64, 3, padding=1, **factory), nn.BatchNorm2d(64, **factory)
    conv_bn = knn.FusedConvBN.from_modules(conv, bn, activation="relu").eval()
    built["conv_bn_relu_eval"] = (conv_bn, nn.Sequential(conv, bn, nn.ReLU()).eval(),
                                  (x(32 // s, 64, 56 // s, 56 // s, grad=False),), False)
    chain = knn.FusedElementwise().add(1.0).mul(2.0).sub(0.5).relu().gelu(approximate="tanh")
    built["elementwise_chain"] = (chain, lambda t: F.gelu(F.relu((t + 1.0) * 2.0 - 0.5), approximate="tanh"),
                                  (x(rows * width // 4,),), True)
    return built


def step_fn(module, inputs, training: bool):
    """One step: forward (+ backward of the sum when training)."""
    if not training:
        def infer():
            with torch.no_grad():
                module(*inputs)
        return infer

    def train():
        out = module(*inputs)
        out.float().sum().backward()
    return train


def measure(name, fused, unfused, inputs, training, device, repeats, compile_modes) -> list:
    row = [name]
    for mode in compile_modes:
        times = {}
        for label, module in (("unfused", unfused), ("fused", fused)):
            run = module if mode == "eager" else torch.compile(module, backend="inductor")
            try:
                times[label] = time_ms(step_fn(run, inputs, training), device, repeats).median_ms
            except Exception as error:  # noqa: BLE001 - one failing case must not stop the table
                print(f"{name} {label} {mode}: {type(error).__name__}: {error}", file=sys.stderr)
                times[label] = None
        row += [_ms(times["unfused"]), _ms(times["fused"]), _ratio(times["unfused"], times["fused"])]
    return row


def _ms(value):
    return "FAIL" if value is None else f"{value:.3f}"


def _ratio(unfused, fused):
    return "n/a" if unfused is None or fused is None else f"{unfused / fused:.2f}x"


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--device", choices=["cuda", "cpu"], default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--dtype", choices=sorted(DTYPES), default=None,
                        help="default: bf16 on CUDA, fp32 on the CPU")
    parser.add_argument("--quick", action="store_true", help="tiny shapes, few repeats: checks that it runs")
    parser.add_argument("--layers", default="", help="comma-separated case names (default: all)")
    parser.add_argument("--no-compile", action="store_true", help="eager only (no Inductor columns)")
    parser.add_argument("--json", metavar="PATH", help="write the table to this JSON file")
    args = parser.parse_args(argv)
    device = torch.device(args.device)
    dtype = DTYPES[args.dtype] if args.dtype else (torch.bfloat16 if device.type == "cuda" else torch.float32)
    repeats = 3 if args.quick else (50 if device.type == "cuda" else 10)
    modes = ["eager"] if args.no_compile else ["eager", "inductor"]
    torch.manual_seed(0)
    built = cases(args.quick, device, dtype)
    wanted = [n for n in args.layers.split(",") if n] or list(built)
    unknown = sorted(set(wanted) - set(built))
    if unknown:
        raise SystemExit(f"--layers: unknown case(s) {unknown}; choose from {','.join(built)}")
    headers = ["layer"] + [f"{m} {c}" for m in modes for c in ("unfused ms", "fused ms", "ratio")]
    rows = []
    for name in wanted:
        rows.append(measure(name, *built[name], device, repeats, modes))
        synchronize(device)
        print(" | ".join(rows[-1]), file=sys.stderr)
    print(f"device {device}, dtype {dtype}, {'quick' if args.quick else 'full'} sizes; ratio = unfused / fused")
    print(markdown_table(headers, rows))
    write_json(args.json, {"environment": environment(device), "dtype": str(dtype), "headers": headers,
                           "rows": rows})


if __name__ == "__main__":
    main()
