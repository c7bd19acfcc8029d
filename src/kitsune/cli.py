"""Command line.

    python -m kitsune demo [--device cpu|cuda]
    python -m kitsune explain path/to/script.py:target [--inputs NAME] [--backward] [--profile] [--report out.html]
    python -m kitsune report  path/to/script.py:target [-o report.html] [--inputs NAME] [--backward] [--profile]

`target` names something in the script (loaded without running its
``if __name__ == "__main__"`` block):

- an ``nn.Module`` instance or a function: called with the script's example
  inputs, ``example_inputs`` by default (``--inputs NAME`` picks another name);
  a tensor, a tuple/list of arguments, or a function returning one;
- an ``nn.Module`` class with a no-argument constructor: instantiated, then as above;
- a function without required parameters returning ``(model_or_function, inputs)``
  (or just a model, with inputs found as above).

The target is compiled with a `FusionEngine`, run once (and, with
``--backward``, its outputs summed and back-propagated so the backward graph
is compiled too), then explained.
"""
from __future__ import annotations

import argparse
import inspect
import runpy
import sys
from pathlib import Path


class TargetError(ValueError):
    pass


def load_target(spec: str, inputs_name: str | None = None):
    """'path.py:name' -> (callable, args tuple, kwargs dict)."""
    import torch
    from torch import nn

    if ":" not in spec:
        raise TargetError(f"expected path/to/script.py:name, got {spec!r}")
    path, _, name = spec.rpartition(":")
    if not Path(path).is_file():
        raise TargetError(f"no such script: {path}")
    sys.path.insert(0, str(Path(path).resolve().parent))
    try:
        scope = runpy.run_path(path, run_name="__kitsune_explain__")
    finally:
        sys.path.pop(0)
    obj = scope
    for part in name.split("."):
        if isinstance(obj, dict):
            if part not in obj:
                raise TargetError(f"{path} defines no {part!r} (names: {sorted(k for k in obj if not k.startswith('_'))[:20]})")
            obj = obj[part]
        else:
            obj = getattr(obj, part)

    def required_params(fn) -> int:
        try:
            sig = inspect.signature(fn)
        except (TypeError, ValueError):
            return 1
        return sum(1 for p in sig.parameters.values()
                   if p.default is p.empty and p.kind in (p.POSITIONAL_ONLY, p.POSITIONAL_OR_KEYWORD))

    inputs = None
    if isinstance(obj, type) and issubclass(obj, nn.Module):
        obj = obj()
    elif not isinstance(obj, nn.Module) and callable(obj) and required_params(obj) == 0:
        result = obj()
        if isinstance(result, tuple) and len(result) == 2 and callable(result[0]):
            obj, inputs = result
        elif callable(result):
            obj = result
        else:
            raise TargetError(f"{name}() returned {type(result).__name__}: expected (model_or_function, inputs) "
                              f"or a model")
    if not callable(obj):
        raise TargetError(f"{name} is a {type(obj).__name__}, not a module or function")
    if inputs is None:
        key = inputs_name or "example_inputs"
        if key not in scope:
            raise TargetError(f"{path} has no {key!r}: define example_inputs (a tensor, a tuple of arguments or a "
                              f"function returning them), pass --inputs NAME, or make {name} a function returning "
                              f"(model, inputs)")
        inputs = scope[key]
        if callable(inputs) and not isinstance(inputs, torch.Tensor):
            inputs = inputs()
    if isinstance(inputs, dict):
        return obj, (), inputs
    if isinstance(inputs, torch.Tensor) or not isinstance(inputs, (tuple, list)):
        inputs = (inputs,)
    return obj, tuple(inputs), {}


def run_explain(spec: str, inputs_name=None, backward=False, report=None, verbose=False, fusion=True,
                out=None, profile=False) -> int:
    import torch

    from kitsune.fusion import FusionEngine

    out = out or sys.stdout
    try:
        target, args, kwargs = load_target(spec, inputs_name)
    except TargetError as error:
        print(f"kitsune explain: {error}", file=sys.stderr)
        return 2
    engine = FusionEngine(enable_fusion=fusion, profile=profile)
    # Static shapes: the explanation is of these inputs. (Dynamo's automatic dynamic shapes
    # remember earlier compiles of the same file and function in this process, and Kitsune
    # does not fuse dynamic shapes.)
    fused = engine.fuse(target, dynamic=False)
    with torch.set_grad_enabled(backward):
        result = fused(*args, **kwargs)
        if backward:
            leaves = [t for t in (result if isinstance(result, (tuple, list)) else [result])
                      if isinstance(t, torch.Tensor) and t.requires_grad]
            if leaves:
                sum(t.float().sum() for t in leaves).backward()
            else:
                print("kitsune explain: --backward: no output requires grad", file=sys.stderr)
    print(engine.explanation(verbose=verbose), file=out)
    if report:
        path = engine.report(report, title=f"Kitsune fusion report: {spec}")
        print(f"\nHTML report: {path}", file=out)
    return 0


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(prog="kitsune", description="Kitsune kernel-fusion compiler for PyTorch")
    sub = parser.add_subparsers(dest="command", required=True)
    demo = sub.add_parser("demo", help="compile a small transformer-style block and compare with eager")
    demo.add_argument("--device", choices=["cpu", "cuda"], default=None)
    for command, text in (("explain", "compile a model or function from a script and explain its fusions"),
                          ("report", "compile a model or function from a script and write the HTML report")):
        p = sub.add_parser(command, help=text, description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
        p.add_argument("target", help="path/to/script.py:name")
        p.add_argument("--inputs", default=None, help="name of the example inputs in the script "
                                                      "(default: example_inputs)")
        p.add_argument("--backward", action="store_true", help="also compile and explain the backward graph")
        p.add_argument("--verbose", "-v", action="store_true", help="list every group and opportunity")
        p.add_argument("--no-fusion", action="store_true", help="detect patterns only; fuse nothing")
        p.add_argument("--profile", action="store_true", help="time each fused kernel against its unfused ops "
                                                             "on the first inputs; keep only those faster by "
                                                             "min_fusion_benefit (measured gains)")
        if command == "explain":
            p.add_argument("--report", default=None, metavar="HTML", help="also write the HTML report")
        else:
            p.add_argument("-o", "--output", default="kitsune-report.html", help="HTML file to write")
    args = parser.parse_args(argv)
    if args.command == "demo":
        from kitsune.demo import main as demo_main
        return demo_main(args.device)
    report = args.report if args.command == "explain" else args.output
    return run_explain(args.target, args.inputs, args.backward, report, args.verbose, not args.no_fusion,
                       profile=args.profile)


if __name__ == "__main__":
    sys.exit(main())
