"""Tracer rules of elementwise operations: activations, arithmetic, comparisons, selects.

Positively homogeneous operations keep the degree of their operands: ``max(z,
0)`` (ReLU), ``min``, ``abs``, ``neg``, multiplication by constants, ``select``
on sign tests (leaky ReLU); any other elementwise operation (``tanh``,
``exp``, powers, ``+ 1``) keeps the permutation symmetry but *taints* the
groups of a degree-1 operand: they lose the rescaling. Adding two labelled
values (a residual connection) merges their groups. A parameter added to a
labelled value is a bias (scales like it), one multiplied with it a per-unit
gain (permuted only).
"""

from __future__ import annotations

import dataclasses
import functools
from collections.abc import Callable
from typing import Any

import numpy as np

from quotient_opt import _jaxpr
from quotient_opt._jaxpr import COMPARISONS
from quotient_opt.symmetry._tracer._analysis import Analysis
from quotient_opt.symmetry._tracer._registry import SHORTHANDS, builtin
from quotient_opt.symmetry._tracer._values import (
    Data,
    Info,
    Lab,
    Opaque,
    Param,
    leaves_of,
    out_shapes,
)

#: the kind of a user primitive registered as ``'homogeneous'``
HOMOGENEOUS = "<homogeneous>"
#: the kind of a user primitive registered as ``'elementwise'``
EQUIVARIANT = "<elementwise>"

#: elementwise and positively homogeneous of degree 1
ELEMENTWISE_UNARY_DEG = {"neg", "abs", "copy", "reduce_precision", "real", "conj"}
#: elementwise, not homogeneous
ELEMENTWISE_OTHER = {
    "exp", "exp2", "log", "log1p", "expm1", "tanh", "logistic", "sin", "cos", "tan", "asin",
    "acos", "atan", "sinh", "cosh", "asinh", "acosh", "atanh", "sqrt", "rsqrt", "cbrt", "erf",
    "erfc", "erf_inv", "lgamma", "digamma", "integer_pow", "pow", "square", "floor", "ceil",
    "round", "is_finite", "nextafter", "atan2", "rem", "not", "and", "or", "xor", "imag",
    "clamp", "population_count", "clz", "shift_left", "shift_right_arithmetic",
    "shift_right_logical", "sign", "bessel_i0e", "bessel_i1e", "igamma", "igammac",
    "random_gamma_grad", "polygamma", "zeta", "regularized_incomplete_beta",
}
#: additive (a bias, a residual, a max of two values)
ADDITIVE = {"add", "sub", "add_any", "max", "min"}


def elementwise(an: Analysis, eqn: Any, ins: list[Info], kind: str) -> list[Info]:
    """An elementwise operation of kind ``kind`` (a primitive name, or :data:`HOMOGENEOUS` or
    :data:`EQUIVARIANT`), with numpy-style broadcasting of its operands."""
    return [_elementwise(an, kind, eqn, ins, out_shapes(eqn)[0], _jaxpr.where(eqn))]


def _elementwise(an: Analysis, name: str, eqn: Any, ins: list[Info], shape: tuple[int, ...],
                 where: str) -> Info:
    """The result of an elementwise operation of kind ``name`` (see :func:`elementwise`)."""
    data = [i for i in ins if isinstance(i, Data)]
    params = [i for i in ins if isinstance(i, Param)]
    opaque = [i for i in ins if isinstance(i, Opaque)]
    taint = frozenset().union(*(d.taint for d in data)) if data else frozenset()
    dyn = any(d.dyn for d in data)
    if not any(d.labs for d in data):
        return _plain_elementwise(an, name, ins, shape, where, taint, dyn)
    if name == "select_n":
        pred, cases = ins[0], ins[1:]
    else:
        pred, cases = None, ins
    labelled = [c for c in cases if isinstance(c, Data) and c.labs]
    if not labelled:  # only the predicate has units: the selection depends on them
        return _plain_elementwise(an, name, ins, shape, where, taint, dyn) if not isinstance(
            pred, Data) else _select_on_units(an, pred, cases, shape, where, taint)
    base = an.merge_labels(labelled, where)
    if isinstance(pred, Data) and pred.labs:
        base = an.merge_labels([Data(shape, base)] + [pred], where, check_deg=False)
        if any(int(v) != 0 for lb in pred.labs for v in np.unique(lb.deg)):
            an.taint({g for lb in pred.labs for g in an.gids(lb)},
                     f"{where}: selects on a scale-dependent condition")
    lab_axes = {a for lb in base for a in lb.axes}
    for d in data:
        if not d.labs and not all(
            d.const_along(a) or (name == "mul" and any(f.axes[a] is not None
                                                       for f in d.factors))
            for a in lab_axes
        ):
            if name == "select_n" and d is pred:
                # a fixed mask per position (train-mode dropout): positively homogeneous,
                # so rescalings survive; it is not permuted with the units
                for g in {g for lb in base for g in an.gids(lb)}:
                    an.kill(g, f"{where}: masked by values that vary along the units",
                            scale=False)
                continue
            an.poison(Data(shape, base), f"{where}: combined with unlabelled values that "
                                         "vary along the units")
            return Data(shape, taint=taint)
    if opaque or any(isinstance(p, Param) for p in ([pred] if pred is not None else [])):
        for o in opaque + [p for p in [pred] if isinstance(p, Param)]:
            an.poison(o, f"parameter used in {where}")
        an.poison(Data(shape, base), f"{where}: combined with a derived parameter")
        return Data(shape, taint=taint)
    groups = {g for lb in base for g in an.gids(lb)}
    deg1 = {g for lb in base for g in an.gids_with_deg(lb, 1)}
    degs = {int(v) for lb in base for v in np.unique(lb.deg)}
    zero = lambda lb: np.zeros_like(lb.deg)  # noqa: E731
    if name in ADDITIVE or name == "select_n":
        plain = [c for c in cases if isinstance(c, Data) and not c.labs and not c.zero]
        if plain and deg1:
            an.taint(deg1, f"{where}: adds or compares a constant or a per-sample value")
        if len(degs) > 1:
            an.taint(groups, f"{where}: combines scaled and invariant values")
        for p in params:
            _param_on_labels(an, p, base, lambda lb: lb.deg, "bias", where, additive=True)
        if name in ("max", "min"):
            kind = "relu" if any(isinstance(c, Data) and c.zero for c in cases) else name
            for g in groups:
                an.groups[g].acts.add(kind)
        return Data(shape, base, taint)
    if name == "mul":
        if len(labelled) > 1 and all(
            any(int(v) for lb in c.labs for v in np.unique(lb.deg)) for c in labelled
        ):
            an.taint(groups, f"{where}: multiplies two scaled values")
        for p in params + [f for d in data if not d.labs for f in d.factors]:
            _param_on_labels(an, p, base, zero, "scale", where, additive=False)
        return Data(shape, base, taint)
    if name == "div":
        num, den = ins
        if isinstance(den, Data) and den.labs and any(
            int(v) for lb in den.labs for v in np.unique(lb.deg)
        ):
            an.taint(groups, f"{where}: divides by a scaled value")
        if isinstance(den, Param):
            _param_on_labels(an, den, base, zero, "scale", where, additive=False)
        if isinstance(num, Param):
            an.poison(num, f"parameter used in {where}")
            an.poison(Data(shape, base), f"{where}: divides a parameter by unit values")
        return Data(shape, base, taint)
    for p in params:
        an.poison(p, f"parameter used in {where}")
    if name == HOMOGENEOUS:  # a user's activation: named in print(sym)
        for g in groups:
            an.groups[g].acts.add(eqn.primitive.name)
    if name in ELEMENTWISE_UNARY_DEG or name == HOMOGENEOUS or (
            name == "integer_pow" and eqn.params.get("y") == 1):
        return Data(shape, base, taint)
    if name == "convert_element_type":
        new = eqn.params.get("new_dtype")
        if new is not None and not np.issubdtype(np.dtype(new), np.floating):
            an.taint(deg1, f"{where}: converts to a non-float type")
        return Data(shape, base, taint)
    invariant = tuple(lb.replace(deg=np.zeros_like(lb.deg)) for lb in base)
    if name in COMPARISONS:
        others = [c for c in cases if not (isinstance(c, Data) and c.labs)]
        if any(not (isinstance(o, Data) and o.zero) for o in others) or len(degs) > 1:
            an.taint(deg1, f"{where}: compares with a nonzero threshold")
        return Data(shape, invariant, taint)
    if name == "sign":
        return Data(shape, invariant, taint)
    # any other elementwise function: permutation-equivariant, not homogeneous
    if deg1:
        an.taint(deg1, f"{where} is not positively homogeneous")
        for g in deg1:
            an.groups[g].acts.add(eqn.primitive.name)
    return Data(shape, base, taint | frozenset(deg1))

def _select_on_units(an: Analysis, pred: Data, cases: list[Info], shape, where, taint) -> Info:
    """A select whose predicate only has units: the result is invariant (a mask)."""
    for c in cases:
        if not isinstance(c, Data) or not all(c.const_along(a) for lb in pred.labs
                                              for a in lb.axes):
            an.poison(pred, f"{where}: selects between values by unit")
            return Data(shape, taint=taint)
    return Data(shape, tuple(lb.replace(deg=np.zeros_like(lb.deg)) for lb in pred.labs), taint)

def _plain_elementwise(an: Analysis, name: str, ins: list[Info], shape: tuple[int, ...],
                       where: str, taint: frozenset[int], dyn: bool) -> Info:
    """Elementwise operation on values without units."""
    data = [i for i in ins if isinstance(i, Data)]
    params = [i for i in ins if isinstance(i, Param)]
    opaque = [i for i in ins if isinstance(i, Opaque)]
    if dyn and name == "mul" and len(params) == 1 and not opaque:
        p = params[0]
        varies = [a for a in range(len(shape)) if p.axes[a] is not None and p.shape[a] > 1]
        if all(d.const_along(a) for d in data for a in varies):
            factors = tuple(f for d in data for f in d.factors) + (p,)
            const = frozenset(a for a in range(len(shape))
                              if all(d.const_along(a) for d in data) and a not in varies)
            return Data(shape, taint=taint, const_axes=const, factors=factors)
    if dyn:
        for p in params:  # a parameter read along unlabelled data axes
            an.use(p, {}, where)
        if opaque or name not in ("add", "sub", "mul", "div", "max", "min", "select_n"):
            for info in params + opaque:
                an.poison(info, f"parameter used in {where}")
        return Data(shape, taint=taint)
    if params or opaque:
        if (len(params) == 1 and not opaque and name in ("mul", "neg", "convert_element_type")
                and all(d.value is not None for d in data)):
            return dataclasses.replace(params[0], shape=shape)
        return Opaque(shape, leaves_of(ins))
    value = None
    if name in ("neg", "convert_element_type", "copy") and data and data[0].value is not None:
        value = -data[0].value if name == "neg" else data[0].value
    const_axes = frozenset(a for a in range(len(shape)) if all(d.const_along(a) for d in data))
    return Data(shape, const_axes=const_axes, value=value, dyn=False)

def _param_on_labels(an: Analysis, p: Param, labs: tuple[Lab, ...],
                     power: Callable[[Lab], np.ndarray], role: str, where: str, *,
                     additive: bool) -> None:
    """A parameter combined elementwise with labelled data: one entry per unit, or shared."""
    entries: dict[int, tuple[Lab, np.ndarray, str]] = {}
    for lb in labs:
        for a in lb.axes:
            if p.axes[a] is not None and p.shape[a] == lb.gid.shape[lb.axes.index(a)]:
                if len(lb.axes) == 1:
                    entries[a] = (lb, power(lb), role)
                else:
                    an.poison(Data(p.shape, (lb,)), f"{where}: a parameter meets a split "
                                                    "feature axis")
            elif additive:
                an.taint(an.gids_with_deg(lb, 1),
                         f"{where}: adds a value shared by all units")
    an.use(p, entries, where)


for _name in (ELEMENTWISE_UNARY_DEG | ELEMENTWISE_OTHER | COMPARISONS | ADDITIVE
              | {"mul", "div", "select_n", "convert_element_type"}):
    builtin(_name)(functools.partial(elementwise, kind=_name))
SHORTHANDS["elementwise"] = functools.partial(elementwise, kind=EQUIVARIANT)
SHORTHANDS["homogeneous"] = functools.partial(elementwise, kind=HOMOGENEOUS)
