"""Attention recognised by what it computes, rewritten into `kitsune.ops.attention`.

Works on the graph Dynamo hands the backend (torch-level ops, before
AOTAutograd), like the LM-head rewrite (kitsune.capture.lm_head). From every
matmul whose first operand comes from a softmax it walks back:

    out = matmul(p, v)                      # torch.matmul, @, torch.bmm, .matmul
    p   = dropout(casts(softmax(s, -1)))    # dropout only if training and p > 0
    s   = casts/scale/bias/mask chain of    # * c, / c (c a constant number), + bias
          matmul(q*c, kᵀ*c)                 # masked_fill(m, x), where(m, s, x)

and, where every step is proven to be the function `attention()` defines,
replaces the whole chain by one call

    attention(q, k, v, bias=, mask=, mask_fill=, scale=, dropout_p=)

kᵀ may be a transpose/.mT/permute of the last two dims of k (then k itself is
passed) or anything else (then `kᵀ.transpose(-2, -1)` is passed: a view). k and
v repeated for grouped-query attention (HF's `repeat_kv`: `x[:, :, None]
.expand(b, h, n, l, d).reshape(b, h * n, l, d)`, or `repeat_interleave(n,
dim=1)`) are passed un-repeated, so nothing is copied. Several additive biases
are summed into one; several boolean masks with the same fill are and-ed into
one (masked_fill(m, x) keeps where ~m; where(m, s, x) keeps where m).

What it refuses, leaving the graph as it is and saying why in the `Rewrite`
record: a softmax over another dim, anything between the softmax and the
second matmul other than casts and dropout (a mask after the softmax), a scale
that is a tensor (depends on data), a scale after the bias or mask (it would
scale them too), a bias after a bool mask, scores or probabilities used
elsewhere (an attention-weights output), shapes or dtypes that do not agree.
A mask that is the only one, with no bias, a fill of -inf (or a finite one
at or below -1e9, which exp() turns into the same 0), and is the square lower
triangle of a bool `torch.ones(L, L)` (`.tril()` kept, or `.triu(1)` masked,
possibly through `~`) becomes `causal=True`; every other causal mask (HF's,
merged with padding; `arange` comparisons) stays a bool mask. On the CPU the rewrite
always applies (no timing): `attention()` runs SDPA's fused CPU kernel, which
never materialises the scores.
"""
from __future__ import annotations

import contextlib
import inspect
import logging
import math
import operator

import torch
import torch.nn.functional as F
from torch import fx

from kitsune.capture.rewrites import Rewrite, example_value, inherit_source, rewrite_sites
from kitsune.ops.attention import attention

log = logging.getLogger("kitsune")

PATTERN = "attention"
OPS = ("matmul", "softmax", "matmul")
CHOICE = "kitsune.ops.attention"
MAX_CHAIN = 12  # steps between the two matmuls looked through

_FLOATS = (torch.float16, torch.bfloat16, torch.float32, torch.float64)


def _sig(fn):
    return inspect.signature(fn)


# kind -> call signature (the arguments are bound by name whatever way the call was written)
_SIGNATURES = {
    "matmul": _sig(lambda input, other: None),
    "mul": _sig(lambda input, other: None),
    "div": _sig(lambda input, other, rounding_mode=None: None),
    "add": _sig(lambda input, other, alpha=1: None),
    "softmax": _sig(lambda input, dim=None, _stacklevel=3, dtype=None: None),  # F.softmax
    "torch_softmax": _sig(lambda input, dim, dtype=None: None),  # torch.softmax, Tensor.softmax
    "masked_fill": _sig(lambda input, mask, value: None),
    "where": _sig(lambda condition, input, other: None),
    "where_method": _sig(lambda input, condition, other: None),
    "dropout": _sig(lambda input, p=0.5, training=True, inplace=False: None),
    "torch_dropout": _sig(lambda input, p, train: None),
    "transpose": _sig(lambda input, dim0, dim1: None),
    "permute": _sig(lambda input, *dims: None),
    "repeat_interleave": _sig(lambda input, repeats, dim=None, output_size=None: None),
    "expand": _sig(lambda input, *size: None),
    "reshape": _sig(lambda input, *shape: None),
    "unsqueeze": _sig(lambda input, dim: None),
    "getitem": _sig(lambda input, index: None),
    "cast": _sig(lambda input, *args, **kwargs: None),
}

_FUNCTIONS = {
    torch.matmul: "matmul", operator.matmul: "matmul", torch.bmm: "matmul",
    operator.mul: "mul", torch.mul: "mul", operator.truediv: "div", torch.div: "div", torch.true_divide: "div",
    operator.add: "add", torch.add: "add",
    F.softmax: "softmax", torch.softmax: "torch_softmax",
    torch.masked_fill: "masked_fill", torch.where: "where",
    F.dropout: "dropout", torch.dropout: "torch_dropout",
    torch.transpose: "transpose", torch.permute: "permute", torch.repeat_interleave: "repeat_interleave",
    torch.reshape: "reshape", torch.unsqueeze: "unsqueeze", operator.getitem: "getitem",
}
_METHODS = {
    "matmul": "matmul", "bmm": "matmul", "__matmul__": "matmul", "mul": "mul", "__mul__": "mul",
    "div": "div", "__truediv__": "div", "true_divide": "div", "add": "add", "__add__": "add",
    "softmax": "torch_softmax", "masked_fill": "masked_fill", "where": "where_method",
    "transpose": "transpose", "permute": "permute", "repeat_interleave": "repeat_interleave",
    "expand": "expand", "reshape": "reshape", "view": "reshape", "unsqueeze": "unsqueeze",
    "float": "cast", "to": "cast", "type": "cast", "half": "cast", "bfloat16": "cast", "double": "cast",
    "contiguous": "cast",
}


class Refused(Exception):
    """The form cannot be proven to be `attention()`; the message says why."""


def _call(node):
    """(kind, bound arguments) of a call the rewrite understands; (None, {}) otherwise."""
    if not isinstance(node, fx.Node):
        return None, {}
    if node.op == "call_function" and node.target is getattr and node.args[1:] == ("mT",):
        return "mT", {"input": node.args[0]}
    if node.op == "call_function":
        kind = _FUNCTIONS.get(node.target)
    elif node.op == "call_method":
        kind = _METHODS.get(node.target)
    else:
        kind = None
    if kind is None:
        return None, {}
    try:
        bound = _SIGNATURES[kind].bind(*node.args, **node.kwargs)
    except TypeError:
        return None, {}
    bound.apply_defaults()
    args = dict(bound.arguments)
    if kind == "where_method":
        kind = "where"
    elif kind == "torch_softmax":
        kind = "softmax"
    elif kind == "torch_dropout":
        kind, args["training"] = "dropout", args.pop("train")
    return kind, args


def _number(x) -> bool:
    return isinstance(x, (int, float)) and not isinstance(x, bool)


def fuse_attention(gm: fx.GraphModule) -> list[Rewrite]:
    """Rewrite every attention of `gm` (a Dynamo graph) into `kitsune.ops.attention`,
    in place; one Rewrite per softmax-fed matmul looked at, applied or not (with the reason)."""
    return rewrite_sites(gm, lambda node: _call(node)[0] == "matmul", _match, _replace, "attention")


def _declined(nodes, reason) -> Rewrite:
    return Rewrite(pattern=PATTERN, ops=OPS, nodes=tuple(nodes), choice=CHOICE, applied=False, reason=reason)


def _match(pv: fx.Node):
    """(Rewrite, plan or None) for a matmul whose first operand comes from a softmax;
    None when it does not (an ordinary matmul)."""
    _, args = _call(pv)
    post, softmax = _back_to_softmax(args["input"])
    if softmax is None:
        return None
    plan = {"post": post, "softmax": softmax, "v": args["other"], "v_in": args["other"], "out": pv}
    names = [softmax.name, *(n.name for n in reversed(post)), pv.name]
    try:
        plan["dropout_p"] = _post_steps(post)
        scores = _softmax_input(softmax)
        chain, qk = _scores_chain(scores)
        names = [qk.name, *(n.name for n in reversed(chain))] + names
        plan.update(_read_chain(chain), chain=chain, qk=qk)
        plan["causal"] = _causal(plan, example_value(qk))
        plan.update(_operands(qk, plan))
        _check_users(plan)
        _check_shapes(plan)
    except Refused as why:
        return _declined(names, str(why)), None
    return Rewrite(pattern=PATTERN, ops=OPS, nodes=tuple(names), choice=_choice_text(plan)), plan


def _back_to_softmax(node):
    """(the nodes from the matmul's first operand back to a softmax, nearest first; the
    softmax) following first operands; (.., None) if no softmax is that near."""
    post, shape = [], getattr(example_value(node), "shape", None)
    while isinstance(node, fx.Node) and len(post) <= 4:
        kind, args = _call(node)
        if kind == "softmax":
            return post, node
        # only steps on the probabilities themselves (elementwise: same shape; no matmul)
        if kind == "matmul" or example_value(node) is None or not _same(tuple(example_value(node).shape), tuple(shape)):
            return post, None
        post.append(node)
        node = args.get("input") if kind else (node.args[0] if node.args else None)
    return post, None


def _post_steps(post) -> float:
    """The dropout probability of the steps between softmax and matmul (casts and dropout
    only, each a float tensor of the probabilities' shape)."""
    dropout_p = 0.0
    for node in post:
        kind, args = _call(node)
        if kind == "cast":
            _check_cast(node)
        elif kind == "dropout":
            p, training = args["p"], args["training"]
            if not _number(p) or not isinstance(training, bool) or args["inplace"] is True:
                raise Refused(f"{node.name}: dropout whose p or training is not a constant")
            if training and p > 0:
                if dropout_p:
                    raise Refused("two dropouts of the probabilities")
                dropout_p = float(p)
        else:
            raise Refused(f"{node.name} ({node.target}) between the softmax and the matmul with v "
                          "(a mask or op after the softmax)")
    return dropout_p


def _check_cast(node) -> None:
    before, after = example_value(node.args[0]), example_value(node)
    if before is None or after is None or not _same(tuple(after.shape), tuple(before.shape)) \
            or after.dtype not in _FLOATS \
            or before.dtype not in _FLOATS or after.device != before.device:
        raise Refused(f"{node.name}: .{node.target}() is not a float cast of the same tensor")


def _softmax_input(softmax):
    _, args = _call(softmax)
    value, scores = example_value(softmax), args["input"]
    if value is None or example_value(scores) is None or value.dim() < 2:
        raise Refused("softmax without example values")
    dim = args["dim"]
    if not isinstance(dim, int) or dim % value.dim() != value.dim() - 1:
        raise Refused(f"softmax over dim {dim}, not the last")
    if args["dtype"] is not None and args["dtype"] not in _FLOATS:
        raise Refused(f"softmax with dtype {args['dtype']}")
    return scores


def _scores_chain(node):
    """(the nodes from the softmax's input back to the q @ kᵀ matmul, nearest first; the matmul)."""
    chain = []
    while len(chain) <= MAX_CHAIN:
        kind, args = _call(node)
        if kind == "matmul":
            return chain, node
        if kind is None:
            name = getattr(node, "name", node)
            raise Refused(f"{name} ({getattr(node, 'target', '?')}) between the first matmul and the softmax")
        chain.append(node)
        node = _scores_operand(node, kind, args)
    raise Refused("no q @ kᵀ matmul within the steps before the softmax")


def _scores_operand(node, kind, args):
    """The operand of a step of the scores chain that carries the scores."""
    if kind in ("cast", "masked_fill"):
        return args["input"]
    if kind == "where":
        inputs = [a for a in (args["input"], args["other"]) if isinstance(a, fx.Node) and _leads_to_matmul(a)]
        if len(inputs) != 1:
            raise Refused(f"{node.name}: where() whose scores operand is not clear")
        return inputs[0]
    if kind in ("mul", "div", "add"):
        inputs = [a for a in (args["input"], args["other"]) if isinstance(a, fx.Node) and _leads_to_matmul(a)]
        if not inputs:
            raise Refused(f"{node.name}: no operand comes from the q @ kᵀ matmul")
        return inputs[0]
    raise Refused(f"{node.name} ({kind}) between the first matmul and the softmax")


def _leads_to_matmul(node, depth: int = MAX_CHAIN) -> bool:
    """Whether following score-like steps from `node` reaches a matmul."""
    for _ in range(depth):
        kind, args = _call(node)
        if kind == "matmul":
            return True
        if kind in ("cast", "masked_fill"):
            node = args["input"]
        elif kind in ("mul", "div", "add", "where"):
            nodes = [a for a in (args.get("input"), args.get("other")) if isinstance(a, fx.Node)]
            return any(_leads_to_matmul(n, depth - 1) for n in nodes)
        else:
            return False
    return False


def _read_chain(chain) -> dict:
    """scale, biases, masks and fill of the steps from q @ kᵀ to the softmax, in the order
    `attention()` applies them: scale, then additive biases, then bool masks."""
    scale, biases, masks, fills, stage = 1.0, [], [], [], 0  # stage: 0 scaling, 1 biases, 2 masks
    for node in reversed(chain):
        kind, args = _call(node)
        scores = _scores_operand(node, kind, args)
        other = args.get("other") if args.get("input") is scores else args.get("input")
        if kind == "cast":
            _check_cast(node)
        elif kind in ("mul", "div"):
            other = _constant_scalar(other)
            if not _number(other) or (kind == "div" and (args["input"] is not scores or args["rounding_mode"])):
                raise Refused(f"{node.name}: the scores are scaled by {_describe(other)} (not a constant number)")
            if other == 0 or not math.isfinite(other):
                raise Refused(f"{node.name}: a scale of {other}")
            factor = other if kind == "mul" else 1.0 / other
            if biases or (stage and factor < 0):
                raise Refused(f"{node.name}: a scale after the bias or mask (it would scale them too)")
            scale *= factor
            fills = [fill * factor for fill in fills]  # a scale after a mask scales its fill
        elif kind == "add":
            bias = example_value(other)
            if bias is None or not bias.is_floating_point() or args["alpha"] != 1:
                raise Refused(f"{node.name}: adds {_describe(other)} to the scores (not a float tensor)")
            if stage == 2:
                raise Refused(f"{node.name}: a bias added after a bool mask")
            biases.append(other)
            stage = 1
        else:  # masked_fill or where
            masks.append(_bool_mask(node, kind, args, scores, fills))
            stage = 2
    if len(set(fills)) > 1:
        raise Refused(f"bool masks with different fill values {sorted(set(fills))}")
    return {"scale": scale, "biases": biases, "masks": masks, "fill": fills[0] if fills else float("-inf")}


def _bool_mask(node, kind, args, scores, fills):
    """(mask node, whether to invert it so that True keeps) of a masked_fill or where step;
    appends its fill value to `fills`."""
    if kind == "masked_fill":
        mask, fill, invert = args["mask"], args["value"], True
    else:
        mask = args["condition"]
        keeps_where_true = args["input"] is scores
        fill, invert = (args["other"], False) if keeps_where_true else (args["input"], True)
    if example_value(mask) is None or example_value(mask).dtype != torch.bool:
        raise Refused(f"{node.name}: the mask is not a bool tensor")
    fill = _constant_scalar(fill)
    if not _number(fill):
        raise Refused(f"{node.name}: the fill value is {_describe(fill)}, not a constant number")
    fill = float(fill)
    if math.isnan(fill) or fill == float("inf"):
        raise Refused(f"{node.name}: fills {fill}")
    dtype = example_value(node).dtype
    if dtype in (torch.float16, torch.bfloat16):  # the value eager stores (-1e9 in fp16 is -inf)
        fill = float(torch.tensor(fill, dtype=dtype))
    fills.append(fill)
    return mask, invert


def _constant_scalar(x):
    """A scale or fill value given as a 0-dim float constant made in the graph (GPT-2/GPT-J's
    `torch.full([], finfo.min)` or `/ torch.full([], d ** 0.5)`, `torch.tensor(value)`) as
    its number; `x` otherwise."""
    if not isinstance(x, fx.Node) or x.op != "call_function" or example_value(x) is None or example_value(x).dim() != 0:
        return x
    if x.target is torch.full and len(x.args) == 2 and tuple(x.args[0]) == () and _number(x.args[1]):
        number = x.args[1]
    elif x.target is torch.tensor and len(x.args) == 1 and _number(x.args[0]):
        number = x.args[0]
    else:
        return x
    dtype = example_value(x).dtype
    return float(torch.tensor(number, dtype=dtype)) if dtype in _FLOATS else x  # the value the tensor holds


def _causal(plan, scores) -> bool:
    """Whether the only mask is the square lower triangle `ones(L, L, dtype=bool).tril()` (kept)
    or `.triu(1)` (masked) and nothing else is added: then it is `causal=True` (top-left),
    which lets the kernels skip the masked tiles; removes it from plan["masks"]."""
    if len(plan["masks"]) != 1 or plan["biases"] or scores is None or scores.dim() < 2:
        return False
    fill = plan["fill"]
    # a fill this far below any score gives exp() == 0 as -inf does: no row is fully masked
    if fill != float("-inf") and fill > -1e9:
        return False
    node, invert = plan["masks"][0]
    dead = [node]
    while isinstance(node, fx.Node) and (node.target in (operator.invert, torch.logical_not, "logical_not",
                                                         "__invert__", "bitwise_not")) and len(node.args) == 1:
        node, invert = node.args[0], not invert
        dead.append(node)
    kind, diagonal = _triangle(node)
    if (kind, diagonal) not in (("tril", 0), ("triu", 1)) or (kind == "tril") == invert:
        return False
    lq, lk = scores.shape[-2], scores.shape[-1]
    mask = example_value(node)
    if not (_same(lq, lk) and mask.dim() == 2 and _same(tuple(mask.shape), (lq, lk))):
        return False
    plan["masks"], plan["fill"] = [], float("-inf")
    plan["causal_dead"] = [*dead, node.args[0] if node.args else node]  # the mask's nodes, if unused after
    return True


def _triangle(node):
    """("tril" or "triu", diagonal) for a triangle of a bool `torch.ones`; (None, None) otherwise."""
    if not isinstance(node, fx.Node):
        return None, None
    name = node.target if node.op == "call_method" else getattr(node.target, "__name__", "")
    if node.op not in ("call_method", "call_function") or name not in ("tril", "triu") or \
            node.target not in ("tril", "triu", torch.tril, torch.triu):
        return None, None
    bound = _sig(lambda input, diagonal=0: None).bind(*node.args, **node.kwargs)
    bound.apply_defaults()
    ones = bound.arguments["input"]
    if not (isinstance(ones, fx.Node) and ones.op == "call_function" and ones.target is torch.ones
            and example_value(ones) is not None and example_value(ones).dtype == torch.bool):
        return None, None
    diagonal = bound.arguments["diagonal"]
    return (name, diagonal) if isinstance(diagonal, int) else (None, None)


def _describe(x) -> str:
    if isinstance(x, fx.Node):
        return f"a tensor ({x.name})" if example_value(x) is not None else x.name
    return repr(x)


def _unscaled(node):
    """(node without constant multiplications/divisions, their product)."""
    factor, walked = 1.0, []
    while True:
        kind, args = _call(node)
        if kind == "mul" and (_number(args["other"]) or _number(args["input"])):
            number, source = (args["other"], args["input"]) if _number(args["other"]) else \
                (args["input"], args["other"])
            factor *= number
        elif kind == "div" and _number(args["other"]) and args["other"] != 0 and not args["rounding_mode"]:
            factor, source = factor / args["other"], args["input"]
        else:
            return node, factor, walked
        walked.append(node)
        node = source


def _last_two_swapped(kind, args, node) -> bool:
    value = example_value(node)
    if value is None or value.dim() < 2:
        return False
    n = value.dim()
    if kind == "mT":
        return True
    if kind == "transpose":
        dims = (args["dim0"], args["dim1"])
        return all(isinstance(d, int) for d in dims) and sorted(d % n for d in dims) == [n - 2, n - 1]
    if kind == "permute":
        dims = args["dims"][0] if len(args["dims"]) == 1 and isinstance(args["dims"][0], (tuple, list)) \
            else args["dims"]
        if len(dims) != n or not all(isinstance(d, int) for d in dims):
            return False
        return [d % n for d in dims] == [*range(n - 2), n - 1, n - 2]
    return False


def _key(kt):
    """(node, whether it is still kᵀ (a transpose must be added), constant factor, nodes walked)
    for the second operand of q @ kᵀ."""
    node, flip, factor, walked = kt, True, 1.0, []
    while True:
        node, scaled, more = _unscaled(node)
        factor, walked = factor * scaled, walked + more
        kind, args = _call(node)
        if kind not in ("transpose", "mT", "permute") or not _last_two_swapped(kind, args, node):
            return node, flip, factor, walked
        walked.append(node)
        node, flip = args["input"], not flip


def _ungrouped(node):
    """(k or v before a grouped-query repeat of its heads, the repeat factor, the repeat's
    nodes); (node, 1, []) when it is not such a repeat. Only repeats where query head h
    reads key/value head h // n (attention()'s grouping) qualify."""
    out = example_value(node)
    kind, args = _call(node)
    if out is None or out.dim() < 4:
        return node, 1, []
    if kind == "repeat_interleave":
        source, repeats, dim = args["input"], args["repeats"], args["dim"]
        src = example_value(source)
        if isinstance(repeats, int) and isinstance(dim, int) and src is not None and src.dim() == out.dim() \
                and dim % out.dim() == out.dim() - 3 and _same(src.shape[-3] * repeats, out.shape[-3]):
            return source, repeats, [node]
        return node, 1, []
    expand = args.get("input") if kind == "reshape" else None
    e_kind, e_args = _call(expand)
    unsqueezed = e_args.get("input") if e_kind == "expand" else None
    u_kind, u_args = _call(unsqueezed)
    if u_kind not in ("unsqueeze", "getitem") or not _inserts_dim(u_kind, u_args, unsqueezed, out.dim() - 2):
        return node, 1, []
    source = u_args["input"]
    src, grouped = example_value(source), example_value(expand)
    if src is None or grouped is None or src.dim() != out.dim():
        return node, 1, []
    h, n = src.shape[-3], grouped.shape[-3]
    lead, tail = tuple(src.shape[:-3]), tuple(src.shape[-2:])
    if not (_same(tuple(grouped.shape), lead + (h, n) + tail) and _same(tuple(out.shape), lead + (h * n,) + tail)):
        return node, 1, []
    return source, int(n), [node, expand, unsqueezed]


def _inserts_dim(kind, args, node, position) -> bool:
    """Whether an unsqueeze or a `[:, :, None]` index inserts one dim at `position`
    (counted in its output) and does nothing else."""
    out = example_value(node)
    if out is None:
        return False
    if kind == "unsqueeze":
        return isinstance(args["dim"], int) and args["dim"] % out.dim() == position
    index = args["index"] if isinstance(args["index"], tuple) else (args["index"],)
    full = slice(None, None, None)
    if index.count(None) != 1 or index.count(Ellipsis) > 1 or \
            not all(i is None or i is Ellipsis or i == full for i in index):
        return False
    at = index.index(None)
    if Ellipsis in index and index.index(Ellipsis) < at:
        at = out.dim() - (len(index) - at)
    return at == position


def _same(a, b) -> bool:
    """Equality of sizes or shapes that adds no guard (symbolic sizes: only when known)."""
    from torch.fx.experimental.symbolic_shapes import statically_known_true
    if isinstance(a, tuple) or isinstance(b, tuple):
        return len(a) == len(b) and all(_same(x, y) for x, y in zip(a, b))
    return bool(statically_known_true(a == b))


def _operands(qk, plan) -> dict:
    """q, k, v as attention() takes them (k un-transposed, k/v un-repeated), the total scale."""
    _, args = _call(qk)
    q, q_factor, q_walked = _unscaled(args["input"])
    k, k_flip, k_factor, k_walked = _key(args["other"])
    v, walked = plan["v"], q_walked + k_walked
    groups = 1
    if not k_flip:
        k_source, k_groups, k_repeat = _ungrouped(k)
        v_source, v_groups, v_repeat = _ungrouped(v)
        if k_groups == v_groups > 1:
            k, v, groups, walked = k_source, v_source, k_groups, walked + k_repeat + v_repeat
    return {"q": q, "k": k, "k_flip": k_flip, "v": v, "groups": groups, "maybe_dead": walked,
            "scale": plan["scale"] * q_factor * k_factor, "kt": args["other"], "q_in": args["input"]}


def _check_users(plan) -> None:
    """The scores, probabilities and every step between them feed only the next step."""
    steps = [plan["qk"], *reversed(plan["chain"]), plan["softmax"], *reversed(plan["post"]), plan["out"]]
    for node, nxt in zip(steps, steps[1:]):
        others = [u.name for u in node.users if u is not nxt]
        if others:
            raise Refused(f"{node.name} (an intermediate result of the attention) is also used by {', '.join(others)}")


def _check_shapes(plan) -> None:
    """Shapes, ranks and dtypes agree with attention()'s meaning (on the repeated k/v the
    graph used)."""
    q, kt, v, out, s = (example_value(plan[key]) for key in ("q_in", "kt", "v_in", "out", "qk"))
    if any(t is None for t in (q, kt, v, out, s)):
        raise Refused("an operand without an example value")
    if not (q.dim() == kt.dim() == v.dim() >= 3):
        raise Refused(f"q, kᵀ, v of ranks {q.dim()}, {kt.dim()}, {v.dim()} (attention takes equal ranks >= 3)")
    if not (_same(tuple(q.shape[:-2]), tuple(kt.shape[:-2])) and _same(tuple(q.shape[:-2]), tuple(v.shape[:-2]))):
        raise Refused(f"batch/head dims of q {tuple(q.shape)}, kᵀ {tuple(kt.shape)}, v {tuple(v.shape)} "
                      "differ (a broadcasting matmul)")
    if not (_same(kt.shape[-2], q.shape[-1]) and _same(v.shape[-2], kt.shape[-1])):
        raise Refused("the matmuls' inner dims do not agree")
    if q.dtype not in _FLOATS or not (q.dtype == kt.dtype == v.dtype == out.dtype):
        raise Refused(f"dtypes q {q.dtype}, k {kt.dtype}, v {v.dtype}, output {out.dtype} differ")
    scores = tuple(s.shape)
    for node in (*plan["chain"], plan["softmax"], *plan["post"]):
        if example_value(node) is None or not _same(tuple(example_value(node).shape), scores):
            raise Refused(f"{node.name} changes the scores' shape")
    for extra in (*plan["biases"], *(m for m, _ in plan["masks"])):
        shape = tuple(example_value(extra).shape)
        if len(shape) > len(scores) or not all(_same(a, 1) or _same(a, b) for a, b in
                                               zip(reversed(shape), reversed(scores))):
            raise Refused(f"{extra.name} of shape {shape} does not broadcast to the scores {scores}")
    if plan["dropout_p"] and q.device.type == "meta":
        raise Refused("dropout on meta tensors")


def _mask_kind(plan) -> str:
    kinds = ["additive"] if plan["biases"] else []
    if plan["masks"]:
        fill = plan["fill"]
        kinds.append("bool fill -inf" if fill == float("-inf") else f"bool finite fill {fill:.3g}")
    return " + ".join(kinds) or "none"


def _choice_text(plan) -> str:
    return (f"{CHOICE} (scale {plan['scale']:.6g}, mask {_mask_kind(plan)}, "
            f"causal {'yes (top-left)' if plan['causal'] else 'no'}, "
            f"GQA {plan['groups']}x, dropout {plan['dropout_p']:g})")


def _replace(graph: fx.Graph, pv: fx.Node, plan) -> fx.Node:
    """Insert the attention call before `pv` (the matmul with v), hand it pv's users, erase
    the chain, and erase what only the chain used (transposes, scales, repeats of k/v)."""
    first_new = pv.prev
    # [B, L, D] operands (torch.bmm) as [B, 1, L, D]: SDPA's fused kernels take 4-D only
    heads = example_value(plan["q_in"]).dim() == 3
    with graph.inserting_before(pv):
        def four_d(node):
            if heads and node is not None and example_value(node) is not None and example_value(node).dim() == 3:
                return graph.call_method("unsqueeze", (node, 1))
            return node
        k = graph.call_method("transpose", (plan["k"], -2, -1)) if plan["k_flip"] else plan["k"]
        bias = None
        for term in plan["biases"]:
            bias = four_d(term) if bias is None else graph.call_function(operator.add, (bias, four_d(term)))
        mask = None
        for node, invert in plan["masks"]:
            keep = graph.call_function(torch.logical_not, (four_d(node),)) if invert else four_d(node)
            mask = keep if mask is None else graph.call_function(operator.and_, (mask, keep))
        q, v = four_d(plan["q"]), four_d(plan["v"])
        k = graph.call_method("unsqueeze", (k, 1)) if heads else k
        made = out = graph.call_function(attention, (q, k, v), {
            "bias": bias, "mask": mask, "mask_fill": plan["fill"], "scale": plan["scale"],
            "causal": plan["causal"], "dropout_p": plan["dropout_p"]})
        if heads:
            out = graph.call_method("squeeze", (made, 1))
    made.meta["example_value"] = example_value(pv).unsqueeze(1) if heads else example_value(pv)
    node = first_new.next
    while node is not pv:  # the nodes just inserted: example values and the user's source
        _set_example_value(node)
        inherit_source(node, pv)
        node = node.next
    pv.replace_all_uses_with(out)
    graph.erase_node(pv)
    for node in (*plan["post"], plan["softmax"], *plan["chain"], plan["qk"], *plan["maybe_dead"],
                 *plan.get("causal_dead", ())):
        if not getattr(node, "_erased", False) and not node.users and node.op in ("call_function", "call_method"):
            graph.erase_node(node)
    return made


def _set_example_value(node: fx.Node) -> None:
    """The example value of an inserted node, computed on its inputs' fake values."""
    from kitsune._compat import detect_fake_mode
    if "example_value" in node.meta:
        return
    args, kwargs = fx.node.map_arg((node.args, node.kwargs), example_value)
    values = [v for v in node.all_input_nodes if example_value(v) is not None]
    mode = detect_fake_mode([example_value(v) for v in values])
    mode = getattr(mode, "fake_mode", mode)
    try:
        with mode if mode is not None else contextlib.nullcontext():
            if node.op == "call_method":
                node.meta["example_value"] = getattr(args[0], node.target)(*args[1:], **kwargs)
            elif node.target is not attention:
                node.meta["example_value"] = node.target(*args, **kwargs)
    except Exception as error:  # noqa: BLE001 - an example value is a convenience for later passes
        log.debug("no example value for %s: %s", node.name, error)
