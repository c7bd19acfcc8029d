"""Legality: can a set of nodes form one generated kernel?

The questions here have one right answer whatever the policy (as Inductor's
`can_fuse` is apart from its `score_fusion`); each returns None when the
answer is yes, else the reason it is no. They follow from node kinds and
iteration sizes, never from op names:

- a node can be generated at all (`node_blocker`: op kind, dtype, device,
  static shape, an empty reduction);
- every value a group writes has the group's iteration size (numel);
  members whose values never leave the group may have any size: they are
  computed at the index that reads them (broadcast, or read through a
  slice or select);
- a group with reductions has one *frame*: the shape S they reduce and the
  dims D they reduce over. Its kernel runs over rows (the kept dims of S)
  and, in each row, over the R reduced elements; every value it writes is
  either of shape S (one per element) or one per row;
- a group holds at most `max_fusion_size` user operations;
- a tensor read at computed positions (an embedding's table) is not computed
  in the group (`indexed_refusal`);
- merging never creates a cycle (a path that leaves the group and comes back),
  and a set of groups must still order as a DAG (`groups_acyclic`).
"""
from __future__ import annotations

import math

from torch import fx

from kitsune.config import FusionConfig
from kitsune.ir.graph import is_view, meta, numel, pointwise_blocker, view_root
from kitsune.sizes import hint, shape_of
from kitsune.ir.ops import POINTWISE_OPS, REDUCTION_OPS
from kitsune.planner.plan import FusionGroup, frame_shapes, frames_of, has_external_use, node_frame, outputs_of


def node_blocker(node: fx.Node) -> str | None:
    """Why `node` cannot be part of any generated kernel, or None."""
    blocker = pointwise_blocker(node)
    if blocker or node.target not in REDUCTION_OPS:
        return blocker
    shape, _ = node_frame(node)
    if math.prod(shape) == 0:
        return "empty reduction (runs through PyTorch)"
    # a few long rows (a whole-tensor sum) are split between programs or threads
    # by the backends; those a backend cannot run are refused at admission
    return None


def inside_group(node: fx.Node, members: set) -> bool:
    """Members, and views whose chain starts at a member (folded into indexing)."""
    return node in members or (is_view(node) and view_root(node) in members)


def group_outputs(group: FusionGroup) -> list[fx.Node]:
    return outputs_of(group.nodes)


def creates_cycle(union: set, position: dict, group_of: dict | None = None) -> bool:
    """Is there a path from the union that leaves it and comes back?

    `group_of` (node -> its group, the groups formed so far) makes the other groups
    single units: a path that reaches one member of a group leaves from all of them
    (group A reads B's first member and B's last reads A: no path of nodes from A
    back to A, yet the two kernels cannot be ordered)."""
    last = max(position[n] for n in union)
    inside, stack = set(union), list(union)
    while stack:  # views of members are folded into the kernel's indexing
        n = stack.pop()
        for u in n.users:
            if is_view(u) and u.args[0] is n and u not in inside:
                inside.add(u)
                stack.append(u)
    frontier = [u for n in inside for u in n.users if u not in inside]
    seen = set()
    while frontier:
        n = frontier.pop()
        if n in seen or position.get(n, last + 1) > last:
            continue
        seen.add(n)
        group = group_of.get(n) if group_of is not None else None
        for m in group.nodes if group is not None else (n,):
            for u in m.users:
                if u in union:
                    return True
                frontier.append(u)
    return False


def iteration_space_refusal(union: set) -> str | None:
    """Why the members of `union` cannot share one iteration space, or None.

    A pointwise kernel iterates over its outputs, so those must all have one
    size; members that stay inside are computed at the index that reads them,
    whatever their own size (a smaller one broadcast, a larger one read
    through a slice or select)."""
    frames = frames_of(union)
    if len(frames) > 1:
        return "reductions over different iteration spaces (shape or dims)"
    if frames:
        full, kept, keep = frame_shapes(next(iter(frames)))
        for n in union:
            if has_external_use(n, union) and shape_of(meta(n)) not in (full, kept, keep):
                return (f"{n.name} has shape {shape_of(meta(n))}, neither the reduced shape {full} "
                        f"nor one value per row")
        return None
    outputs = sorted((n for n in union if has_external_use(n, union)), key=lambda n: n.name)
    if not outputs:
        return None
    size = max((numel(n) for n in outputs), key=hint)
    for n in outputs:
        if numel(n) != size:
            return f"iteration sizes differ ({numel(n)} vs {size}) and {n.name} is needed outside"
    return None


# What `merge_refusal` says stopped a merge (the planner repairs each differently:
# `recompute` for SIZES, `split` for LIMIT and CYCLE); JOINED: a CYCLE whose node
# `recompute` for SIZES, `split` for LIMIT and CYCLE); JOINED: a CYCLE whose node
# fused in a group all the same, or split around (nothing left to repair).
LIMIT, SIZES, CYCLE, INDEXED, JOINED = "limit", "sizes", "cycle", "indexed", "joined"


def merge_refusal(a: FusionGroup, b: FusionGroup, config: FusionConfig, position: dict,
                  limit: int | None = None, group_of: dict | None = None) -> tuple[str, str] | None:
    """None if a and b may form one kernel, else (LIMIT | SIZES | CYCLE | INDEXED, the reason).
    `limit`: the operations allowed (default `config.max_fusion_size`); `group_of`: the
    groups formed so far, each a unit for the cycle check (`creates_cycle`)."""
    union = set(a.nodes) | set(b.nodes)
    limit = config.max_fusion_size if limit is None else limit
    ops = len(a.user_ops() | b.user_ops())
    if ops > limit:
        return LIMIT, f"would hold {ops} operations > max_fusion_size={config.max_fusion_size}"
    reason = iteration_space_refusal(union)
    if reason:
        return SIZES, reason
    if creates_cycle(union, position, group_of):
        return CYCLE, "a path through an unfused op would form a cycle"
    reason = indexed_refusal(union)
    return (INDEXED, reason) if reason else None


def can_merge(a: FusionGroup, b: FusionGroup, config: FusionConfig, position: dict) -> str | None:
    """None if a and b may form one kernel, else the reason they may not."""
    refusal = merge_refusal(a, b, config, position)
    return refusal[1] if refusal else None


def indexed_refusal(union: set) -> str | None:
    """A tensor read at positions that are values (an embedding's table, the
    source of x[i]) must come from memory: a value computed in the kernel has
    no address to read at another element's position."""
    for n in union:
        opdef = POINTWISE_OPS.get(n.target)
        for k in opdef.indexed if opdef is not None else ():
            if k < len(n.args) and inside_group(n.args[k], union):
                return f"{n.name} reads {n.args[k].name} at computed positions: it must come from memory"
    return None


def groups_acyclic(graph_nodes, groups) -> bool:
    """Do the groups (plus every other node alone) still form a DAG?"""
    owner = {n: ("g", i) for i, g in enumerate(groups) for n in g.nodes}

    def unit(n):
        if n in owner:
            return owner[n]
        root = view_root(n)
        return owner.get(root, n) if root is not n else n

    deps: dict = {}
    for n in graph_nodes:
        u = unit(n)
        deps.setdefault(u, set())
        deps[u].update(v for v in map(unit, n.all_input_nodes) if v != u)
    users: dict = {u: [] for u in deps}
    pending = {u: len(d) for u, d in deps.items()}
    for u, d in deps.items():
        for v in d:
            users.setdefault(v, []).append(u)
    ready = [u for u, k in pending.items() if k == 0]
    seen = 0
    while ready:
        u = ready.pop()
        seen += 1
        for w in users.get(u, []):
            pending[w] -= 1
            if pending[w] == 0:
                ready.append(w)
    return seen == len(deps)
