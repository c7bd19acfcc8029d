"""A fused kernel as text for the HTML report: its generated source (the one
function of a CPU library that is this kernel's), or, where the backend keeps
no source, its `KernelSpec` written out as SSA."""
from __future__ import annotations


def kernel_source(call) -> str:
    """Generated source of a FusedGroupCall's kernel (or a rendering of its spec)."""
    kernel = getattr(call, "kernel", None)
    source = None
    if kernel is not None:
        try:
            source = kernel.source
        except Exception:  # noqa: BLE001 - a missing cache file must not break the report
            source = None
    if source:
        return _extract_function(source, call.spec)
    head = f"# {call.spec.name}: no generated source"
    if getattr(call, "failure", None):
        head += f" (runs through PyTorch: {call.failure})"
    elif kernel is not None:
        head += f" ({type(kernel).__name__} backend has no source text)"
    return head + "\n" + spec_text(call.spec)


def _extract_function(source: str, spec) -> str:
    """The CPU backend compiles a graph's kernels as one library: keep this kernel's function."""
    try:
        from kitsune.codegen.cpu import kernel_name
        name = kernel_name(spec)
    except Exception:  # noqa: BLE001
        return source
    lines = source.splitlines()
    starts = [i for i, line in enumerate(lines) if name + "(" in line and not line.startswith((" ", "\t"))]
    if len(lines) < 80 or not starts:
        return source
    start = starts[0]
    while start > 0 and lines[start - 1].lstrip().startswith(("//", "/*", "*")):
        start -= 1  # its header comment
    end = next((i for i in range(starts[0], len(lines)) if lines[i].startswith("}")), len(lines) - 1)
    return "\n".join(lines[start:end + 1]) + "\n\n/* (one function of the graph's library; the file holds all) */"


def spec_text(spec) -> str:
    """A KernelSpec as SSA text: what the kernel computes per element."""
    try:
        from kitsune.ir.scalar import walk
    except Exception:  # noqa: BLE001
        return repr(spec)
    names, lines = {}, []
    lines.append(f"# numel={spec.numel} inputs={[ (i.name, str(i.dtype)) for i in spec.inputs]}")
    for v in walk([o.value for o in spec.outputs]):
        name = f"t{len(names)}"
        names[v] = name
        args = ", ".join(names.get(a, "?") for a in v.args)
        if v.op == "load":
            text = f"load(in{v.attr[0]})"
        elif v.op == "load_at":
            text = f"load_at(in{v.attr[0]}, {args})"
        elif v.op == "const":
            text = f"const({v.attr!r})"
        elif v.attr is not None:
            text = f"{v.op}[{v.attr}]({args})"
        else:
            text = f"{v.op}({args})"
        lines.append(f"{name} = {text}  # {str(v.dtype).replace('torch.', '')}")
    for o in spec.outputs:
        lines.append(f"{o.name} <- {names.get(o.value, '?')}")
    return "\n".join(lines)
