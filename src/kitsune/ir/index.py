"""Integer index expressions over a kernel's flat iteration variable.

A fused kernel iterates over one flat variable `x` in [0, numel). Each tensor
access is an `Index`: a constant plus a sum of terms `coef * ((base // div) % mod)`,
where `base` is `x` itself or, when no simpler form exists, a nested `Index`.
Views (permute, expand, slice, reshape, ...) are folded into these
expressions, never copied. The constructors simplify eagerly, so a contiguous
access collapses to plain `x` and the backends can emit vector loads.

All values are non-negative (torch strides and offsets are), so C and Python
floor division agree. Coefficients, divisors and moduli are ints, or sympy
expressions of a graph's symbolic sizes (`kitsune.sizes`): a
simplification that needs a fact about them (a divisibility, a bound) is made
only where the fact holds for every size.
"""
from __future__ import annotations

import math
from dataclasses import dataclass

from kitsune.sizes import as_size, divides, known, size_key, size_text


@dataclass(frozen=True)
class Term:
    coef: int
    base: "Index | None"  # None means the iteration variable x
    div: int = 1
    mod: int | None = None  # None: no modulo


@dataclass(frozen=True)
class Index:
    const: int = 0
    terms: tuple[Term, ...] = ()

    # -- construction -------------------------------------------------
    @staticmethod
    def var() -> "Index":
        return Index(0, (Term(1, None),))

    @staticmethod
    def constant(c: int) -> "Index":
        return Index(as_size(c), ())

    @property
    def is_const(self) -> bool:
        return not self.terms

    def __add__(self, other: "Index | int") -> "Index":
        other = other if isinstance(other, Index) else Index.constant(other)
        return _normalize(self.const + other.const, self.terms + other.terms)

    def __mul__(self, c: int) -> "Index":
        c = as_size(c)
        if c == 0:
            return Index.constant(0)
        return _normalize(self.const * c, tuple(Term(t.coef * c, t.base, t.div, t.mod) for t in self.terms))

    def floordiv(self, d: int) -> "Index":
        d = as_size(d)
        if d == 1:
            return self
        if self.is_const:
            return Index.constant(self.const // d)
        if self.const == 0 and len(self.terms) == 1:
            t = self.terms[0]
            if divides(d, t.coef):
                return Index(0, (Term(as_size(t.coef // d), t.base, t.div, t.mod),))
            if divides(t.coef, d):
                q = as_size(d // t.coef)
                if t.mod is None:
                    return Index(0, (Term(1, t.base, as_size(t.div * q), None),))
                if divides(q, t.mod):
                    return _term_index(Term(1, t.base, as_size(t.div * q), as_size(t.mod // q)))
                if known(q >= t.mod):  # coef*(.. % mod) < d
                    return Index.constant(0)
        if known(0 <= self.const) and known(self.upper_bound() < d):
            return Index.constant(0)
        return Index(0, (Term(1, self, d, None),))

    def mod(self, m: int) -> "Index":
        m = as_size(m)
        if m == 1:
            return Index.constant(0)
        if self.is_const:
            return Index.constant(as_size(self.const % m))
        if known(0 <= self.const) and known(self.upper_bound() < m):
            return self
        if self.const == 0 and len(self.terms) == 1:
            t = self.terms[0]
            if divides(t.coef, m):
                q = as_size(m // t.coef)
                new_mod = q if t.mod is None else (q if divides(q, t.mod) else None)
                if new_mod is not None:
                    return _term_index(Term(t.coef, t.base, t.div, new_mod))
        # Terms whose coefficient is a multiple of m contribute nothing.
        kept = tuple(t for t in self.terms if not divides(m, t.coef))
        if len(kept) != len(self.terms):
            return Index(self.const, kept).mod(m)
        return Index(0, (Term(1, self, 1, m),))

    def upper_bound(self) -> float:
        """An upper bound of the value, assuming x is unbounded."""
        total = self.const
        for t in self.terms:
            if t.mod is None or not known(t.coef >= 0):
                return math.inf
            total += t.coef * (t.mod - 1)
        return total

    def is_var(self) -> bool:
        return self.const == 0 and self.terms == (Term(1, None),)

    def __str__(self) -> str:
        return render(self, "x")


def evaluate(index: Index, x: int) -> int:
    """The index's value at iteration x (sizes at their hints)."""
    from kitsune.sizes import hint
    total = int(hint(index.const))
    for t in index.terms:
        base = x if t.base is None else evaluate(t.base, x)
        v = base // int(hint(t.div))
        if t.mod is not None:
            v %= int(hint(t.mod))
        total += int(hint(t.coef)) * v
    return total


def same_on(a: Index, b: Index, numel: int, samples: int = 4096) -> bool:
    """Whether a and b take the same value at every x < numel: all of them when
    there are at most `samples`, else `samples` points spread over the range
    (the first and last rows among them) — a check, not a proof, there."""
    if a == b:
        return True
    if numel <= samples:
        points = range(numel)
    else:
        step = max(1, numel // samples)
        points = list(range(0, min(numel, 256))) + list(range(256, numel, step)) + \
            list(range(max(0, numel - 256), numel))
    return all(evaluate(a, x) == evaluate(b, x) for x in points)


def _term_index(t: Term) -> Index:
    return Index(0, (t,))


def _normalize(const: int, terms: tuple[Term, ...]) -> Index:
    """Drop zero terms and merge adjacent digits of one base into one term:
    c*((b//d) % m) + c*m*((b//(d*m)) % m2) == c*((b//d) % (m*m2))."""
    terms = [t for t in terms if t.coef != 0 and t.mod != 1]
    merged = True
    while merged:
        merged = False
        for i, a in enumerate(terms):
            for j, b in enumerate(terms):
                if i == j or a.base != b.base or a.mod is None:
                    continue
                if b.div == as_size(a.div * a.mod) and b.coef == as_size(a.coef * a.mod):
                    mod = None if b.mod is None else as_size(a.mod * b.mod)
                    terms[i] = Term(a.coef, a.base, a.div, mod)
                    del terms[j]
                    merged = True
                    break
            if merged:
                break
    terms.sort(key=lambda t: (size_key(t.div), size_key(t.coef), repr(t.base)))
    return Index(const, tuple(terms))


def within(index: Index, numel: int) -> Index:
    """`index` for x in [0, numel): digits of x that cannot reach their
    modulus lose it (x // R % 1024 is x // R when numel = 1024 * R), and
    digits that are always 0 vanish. Two spellings of one access (one
    through a keepdim view, one not) then become the same load."""
    terms = []
    for t in index.terms:
        if t.base is None:
            top = as_size((numel - 1) // t.div)
            if top == 0:
                continue
            if t.mod is not None and known(top < t.mod):
                t = Term(t.coef, None, t.div, None)
        terms.append(t)
    return _normalize(index.const, tuple(terms))


def delinearize(flat: Index, shape) -> list[Index]:
    """Row-major digits of `flat` in `shape`; the leading digit needs no modulo
    because flat < numel."""
    shape = list(shape)
    if 0 in shape:
        return [Index.constant(0) for _ in shape]
    out = []
    stride = 1
    for i in reversed(range(len(shape))):
        digit = flat.floordiv(stride)
        out.append(digit if i == 0 else digit.mod(shape[i]))
        stride = as_size(stride * shape[i])
    return out[::-1]


def linearize(indices, shape) -> Index:
    total = Index.constant(0)
    stride = 1
    for idx, size in zip(reversed(list(indices)), reversed(list(shape))):
        total = total + idx * stride
        stride = as_size(stride * size)
    return total


def strided(indices, strides, offset: int = 0) -> Index:
    total = Index.constant(offset)
    for idx, st in zip(indices, strides):
        total = total + idx * st
    return total


def render(index: Index, var: str, floordiv: str = "//") -> str:
    """Source text for backends with Python-like operators (`//` swapped for C's `/`)."""
    parts = []
    for t in index.terms:
        base = var if t.base is None else f"({render(t.base, var, floordiv)})"
        s = base if t.div == 1 else f"{base} {floordiv} {size_text(t.div)}"
        if t.mod is not None:
            s = f"{s} % {size_text(t.mod)}" if t.div == 1 else f"({s}) % {size_text(t.mod)}"
        if t.coef != 1:
            coef = size_text(t.coef)
            s = f"({s}) * {coef}" if t.mod is not None or t.div != 1 else f"{s} * {coef}"
        parts.append(s)
    if index.const != 0 or not parts:
        parts.append(size_text(index.const))
    return " + ".join(parts)


def render_rows(index: Index, R: int, var: str, floordiv: str = "//") -> str:
    """Like `render`, in a row kernel where x = row * R + r and the names `row`
    and `r` are in scope: a digit of x that lies within one row becomes a digit
    of r, one above the row a digit of row. No division is left per element
    for the common cases (a weight read at x % R, a per-row value at x // R)."""
    parts = []
    for t in index.terms:
        digit = _row_digit(t, R)
        if digit == "r":
            s = "r" if t.div == 1 else f"(r {floordiv} {size_text(t.div)})"
            if as_size(t.div * t.mod) != R:
                s = f"{s} % {size_text(t.mod)}"
        elif digit == "row":
            q = as_size(t.div // R)
            s = "row" if q == 1 else f"(row {floordiv} {size_text(q)})"
            if t.mod is not None:
                s = f"{s} % {size_text(t.mod)}"
        else:
            parts.append(render(Index(0, (t,)), var, floordiv))
            continue
        if t.coef != 1:
            s = f"({s}) * {size_text(t.coef)}"
        parts.append(s)
    if index.const != 0 or not parts:
        parts.append(size_text(index.const))
    return " + ".join(parts)


def _row_digit(t: Term, R: int) -> str | None:
    """Where x = row * R + r, "r" if the term is a digit of r, "row" if a digit of
    row, None if it needs x itself (or is not a digit of x)."""
    if t.base is None and t.mod is not None and divides(t.div * t.mod, R):
        return "r"
    if t.base is None and divides(R, t.div):
        return "row"
    return None


def divides_x_in_rows(index: Index, R: int) -> bool:
    """Whether `render_rows(index, R, ...)` still divides (or takes a modulo of)
    x itself: a term on x with a division or modulo that is neither a digit of r
    nor of row."""
    return any(t.base is None and (t.mod is not None or t.div != 1) and _row_digit(t, R) is None
               for t in index.terms)


def render_in_kernel(index: Index, var: str, rows: int | None, floordiv: str = "//") -> str:
    """`render` in a pointwise kernel (rows None), `render_rows` in a row
    kernel of `rows` = R reduced elements."""
    return render(index, var, floordiv) if rows is None else render_rows(index, rows, var, floordiv)
