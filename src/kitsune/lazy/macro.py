"""Decompositions traced once, replayed after.

PyTorch's reference decompositions (`torch._refs`: lerp, addcmul, addcdiv, ...)
spend milliseconds in Python per call on type checks and promotion; an
optimizer step calls them for every parameter. The first call of a composite op
with given argument layouts runs the decomposition and notes the aten calls it
makes (`Trace`), each argument named as: an argument of the composite (tensors,
and Python floats passed through unchanged, found by identity), the result of
an earlier call, or a constant. Later calls with the same layouts replay those
calls straight into the region. A float of the composite that the decomposition
did not pass through (it computed a constant from it, `1 - weight`) must have
the value it had when traced, else the decomposition runs again.

A float crosses the dispatcher as a new Python object (C++ holds a double), so
a float the decomposition passes through (addcdiv's `value`, given to `mul`)
cannot be found by identity. When a float argument changes, the decomposition
is traced again and the two traces are compared (`generalize`): where they
differ only by a float that equals that argument in both (with two different
values), the step takes the argument from then on; anything else keeps the
newer trace as it is. So an optimizer step whose `value` changes every step
traces its addcdiv twice, not at every call. This is done only for composites
whose decomposition has no Python branch on the float's value
(`kitsune.lazy.ops.FLOATS_PASSED_THROUGH`): two values on one side of such a
branch would otherwise generalize to values on the other.
"""
from __future__ import annotations

import torch

ARG, RESULT = "\0a", "\0r"


class NotReplayable(Exception):
    """The decomposition did something a replay cannot repeat."""


def flat_arguments(args, kwargs) -> list:
    """The composite's arguments in one list (lists flattened), for naming by position."""
    flat = []
    for a in (*args, *kwargs.values()):
        if type(a) in (list, tuple):
            flat.extend(a)
        else:
            flat.append(a)
    return flat


class Trace:
    """The aten calls one decomposition made (see the module docstring)."""

    def __init__(self, args, kwargs):
        flat = flat_arguments(args, kwargs)
        self.names = {id(a): (ARG, i) for i, a in enumerate(flat)
                      if isinstance(a, torch.Tensor) or type(a) is float}
        self.floats = {i: a for i, a in enumerate(flat) if type(a) is float}
        self.used: set = set()
        self.steps: list = []
        self.keep: list = [flat]  # the objects named by id stay alive while tracing
        self.busy = False
        self.broken: str | None = None

    def note(self, func, args, kwargs, out) -> None:
        """One call of the decomposition; one a replay could not repeat marks the trace
        broken (the decomposition itself goes on: raising here would abort it)."""
        if self.broken is not None:
            return
        if not isinstance(out, torch.Tensor):  # (a call with several results is not replayed)
            self.broken = f"{func} returned {type(out).__name__}"
            return
        try:
            template = (tuple(self._name(a) for a in args),
                        tuple((k, self._name(v)) for k, v in kwargs.items()))
        except NotReplayable as why:
            self.broken = str(why)
            return
        self.names[id(out)] = (RESULT, len(self.steps))
        self.keep.append(out)
        self.steps.append((func, template))

    def _name(self, value):
        if isinstance(value, torch.Tensor) or type(value) is float:
            name = self.names.get(id(value))
            if name is not None:
                if name[0] == ARG:
                    self.used.add(name[1])
                return name
            if isinstance(value, torch.Tensor):
                raise NotReplayable("a tensor from outside the decomposition")
            return value
        if type(value) in (list, tuple):
            return tuple(self._name(v) for v in value)
        return value

    def finish(self, result) -> "Recipe":
        if self.broken is not None:
            raise NotReplayable(self.broken)
        several = isinstance(result, (tuple, list))
        names = [self.names.get(id(r)) if isinstance(r, torch.Tensor) else None
                 for r in (result if several else (result,))]
        if any(name is None for name in names):
            raise NotReplayable("a result is not one of the calls' results")
        name = tuple(names) if several else names[0]
        derived = {i: v for i, v in self.floats.items() if i not in self.used}
        return Recipe(tuple(self.steps), name, derived, self.floats)


class Recipe:
    """A traced decomposition, replayed with `replay(dispatch, args, kwargs)`."""

    def __init__(self, steps: tuple, result, derived: dict, floats: dict):
        self.steps = steps
        self.result = result
        self.derived = derived  # position -> float value the trace depends on
        self.floats = floats    # position -> every float argument's value when traced

    def matches(self, flat: list) -> bool:
        return all(flat[i] == v and flat[i].hex() == v.hex() for i, v in self.derived.items())

    def replay(self, dispatch, flat: list):
        # no closures here: a recursive one would keep `results` (placeholders) alive in
        # a reference cycle, and the flush would take dead intermediates for live values
        results: list = []
        for func, (args, kwargs) in self.steps:
            results.append(dispatch(func, tuple(_value(a, flat, results) for a in args),
                                    {k: _value(v, flat, results) for k, v in kwargs}))
        value = _value(self.result, flat, results)
        return tuple(value) if type(value) is list else value


def _value(template, flat: list, results: list):
    if type(template) is tuple:
        if template and template[0] == ARG:
            return flat[template[1]]
        if template and template[0] == RESULT:
            return results[template[1]]
        return [_value(v, flat, results) for v in template]
    return template


def generalize(old: Recipe, new: Recipe) -> Recipe:
    """`new` (a trace made because a float of `old` changed) with every float that follows
    a float argument in both traces named as that argument; `new` itself where the traces
    differ otherwise (see the module docstring)."""
    try:
        steps = tuple((f, _unify(t, u, old.floats, new.floats)) for (f, t), (g, u) in
                      _pairs(old.steps, new.steps))
    except NotReplayable:
        return new
    if old.result != new.result:
        return new
    used: set = set()
    _names(steps, used)
    derived = {i: v for i, v in new.floats.items() if i not in used}
    return Recipe(steps, new.result, derived, new.floats)


def _pairs(old: tuple, new: tuple):
    if len(old) != len(new):
        raise NotReplayable("another number of calls")
    for a, b in zip(old, new):
        if a[0] is not b[0]:
            raise NotReplayable("other calls")
        yield a, b


def _unify(a, b, old_floats: dict, new_floats: dict):
    """One template of both traces: equal parts kept, a float that differs named as the
    one float argument that had the old value before and has the new value now."""
    if type(a) is tuple and a and a[0] == ARG and type(b) is float:  # named in an earlier merge
        value = new_floats.get(a[1])
        if value is not None and value.hex() == b.hex():
            return a
        raise NotReplayable("a float no longer follows its argument")
    if type(a) is float and type(b) is float:
        if a.hex() == b.hex():
            return a
        found = [i for i, v in old_floats.items() if v.hex() == a.hex() and i in new_floats
                 and new_floats[i].hex() == b.hex()]
        if len(found) != 1:
            raise NotReplayable("a float changed with no argument to follow")
        return (ARG, found[0])
    if type(a) is tuple and type(b) is tuple and len(a) == len(b) and not (a and a[0] in (ARG, RESULT)):
        return tuple(_unify(x, y, old_floats, new_floats) for x, y in zip(a, b))
    if type(a) is type(b) and a == b:
        return a
    raise NotReplayable("the traces differ")


def _names(template, used: set) -> None:
    """The float and tensor arguments a template names, into `used`."""
    if type(template) is tuple:
        if template and template[0] == ARG:
            used.add(template[1])
        elif not (template and template[0] == RESULT):
            for t in template:
                _names(t, used)
