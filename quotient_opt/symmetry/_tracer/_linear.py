"""Tracer rules of contractions: ``dot_general`` and ``conv_general_dilated``.

A contraction whose one operand is a parameter leaf (the kernel) and whose other
operand depends on the input starts a *unit group*: the kernel's output-feature
axis. A kernel contracting a labelled axis reads the units (scales by ``1/c``); a
contraction of units with data (attention) removes their symmetries.
"""

from __future__ import annotations

from typing import Any

import numpy as np

from quotient_opt import _jaxpr
from quotient_opt.symmetry._paths import path_str
from quotient_opt.symmetry._tracer._analysis import Analysis
from quotient_opt.symmetry._tracer._registry import builtin
from quotient_opt.symmetry._tracer._values import (
    Data,
    Info,
    Lab,
    Opaque,
    Param,
    leaves_of,
    remap,
)
from quotient_opt.symmetry._tracer._values import out_shapes as shapes_of


@builtin("dot_general")
def dot_general(an: Analysis, eqn: Any, ins: list[Info]) -> list[Info]:
    """Data contracted with a kernel: a dense layer (reads units, starts a group)."""
    out_shapes, where = shapes_of(eqn), _jaxpr.where(eqn)
    (lc, rc), (lb_, rb) = eqn.params["dimension_numbers"]
    lhs, rhs = ins
    shape = out_shapes[0]
    if isinstance(lhs, Data) and isinstance(rhs, Param):
        return [_contract(an, lhs, rhs, tuple(lc), tuple(rc), tuple(lb_), tuple(rb), shape,
                          where, data_first=True)]
    if isinstance(rhs, Data) and isinstance(lhs, Param):
        return [_contract(an, rhs, lhs, tuple(rc), tuple(lc), tuple(rb), tuple(lb_), shape,
                          where, data_first=False)]
    if isinstance(lhs, Param) and isinstance(rhs, Param):
        return [Opaque(shape, frozenset({lhs.leaf, rhs.leaf}))]
    if not any(isinstance(i, Data) and i.dyn for i in ins):
        return [Opaque(shape, leaves_of(ins))] if leaves_of(ins) else [Data(shape, dyn=False)]
    return an.unknown(ins, out_shapes, f"{where}: contracts units with data")


def _producing(an: Analysis, k: Param, axis: int) -> Lab | None:
    """A new unit group on value axis ``axis`` of kernel ``k`` (its output features)."""
    if k.axes[axis] is None:
        return None
    n = k.shape[axis]
    path = an.paths[k.leaf]
    gid = an.new_group(n, path_str(path[:-1]) if len(path) > 1 else path_str(path))
    return Lab((0,), np.full(n, gid), np.arange(n), np.zeros(n, int), np.ones(n, int))


def _reading(an: Analysis, x: Data, x_axis: int, k: Param, k_axis: int, where: str,
             entries: dict[int, tuple[Lab, np.ndarray, str]]) -> None:
    """Kernel axis ``k_axis`` contracts data axis ``x_axis``: it reads the units there."""
    lab = x.lab_on(x_axis)
    if lab is None:
        return
    if len(lab.axes) != 1:
        an.poison(Data(x.shape, (lab,)), f"{where}: contracts a split feature axis")
    elif k.axes[k_axis] is None or k.shape[k_axis] != x.shape[x_axis]:
        an.taint(an.gids_with_deg(lab, 1), f"{where}: sums the units with one weight")
    else:
        entries[k_axis] = (lab, -lab.deg, "kernel")


def _contract(an: Analysis, x: Data, k: Param, xc, kc, xb, kb, shape, where, *, data_first: bool
              ) -> Data:
    """``x`` (data) contracted with kernel ``k`` (a parameter view) by ``dot_general``."""
    entries: dict[int, tuple[Lab, np.ndarray, str]] = {}
    for xa, ka in zip(xc, kc):
        _reading(an, x, xa, k, ka, where, entries)
    for xa in xb:
        lab = x.lab_on(xa)
        if lab is not None:
            an.poison(Data(x.shape, (lab,)), f"{where}: a unit axis is a batch axis")
    kfree = [a for a in range(len(k.shape)) if a not in kc and a not in kb]
    xfree = [a for a in range(len(x.shape)) if a not in xc and a not in xb]
    new = _producing(an, k, kfree[0]) if len(kfree) == 1 else None
    if new is not None:
        entries[kfree[0]] = (new, np.ones(new.uid.size, int), "kernel")
    an.use(k, entries, where)
    # output axes: batch dims, then lhs free, then rhs free
    nb = len(xb)
    if data_first:
        x_pos = {a: nb + i for i, a in enumerate(xfree)}
        k_pos = {a: nb + len(xfree) + i for i, a in enumerate(kfree)}
    else:
        k_pos = {a: nb + i for i, a in enumerate(kfree)}
        x_pos = {a: nb + len(kfree) + i for i, a in enumerate(xfree)}
    labs = [remap(lb, x_pos) for lb in x.labs if all(a in x_pos for a in lb.axes)]
    if new is not None:
        labs.append(new.replace(axes=(k_pos[kfree[0]],)))
    return Data(shape, tuple(labs), x.taint)


@builtin("conv_general_dilated")
def conv_general_dilated(an: Analysis, eqn: Any, ins: list[Info]) -> list[Info]:
    """A convolution of data with a kernel: units on the feature axes only."""
    out_shapes, where = shapes_of(eqn), _jaxpr.where(eqn)
    lhs, rhs = ins
    shape = out_shapes[0]
    p = eqn.params
    if not (isinstance(lhs, Data) and isinstance(rhs, Param)):
        if not any(isinstance(i, Data) and i.dyn for i in ins):
            return [Opaque(shape, leaves_of(ins))] if leaves_of(ins) else [Data(shape, dyn=False)]
        return an.unknown(ins, out_shapes, f"{where}: convolution without a parameter kernel")
    if p.get("feature_group_count", 1) != 1 or p.get("batch_group_count", 1) != 1:
        return an.unknown(ins, out_shapes, f"{where}: grouped convolution")
    dn = p["dimension_numbers"]
    lhs_spec, rhs_spec, out_spec = dn.lhs_spec, dn.rhs_spec, dn.out_spec
    entries: dict[int, tuple[Lab, np.ndarray, str]] = {}
    for lab in lhs.labs:
        if lab.axes != (lhs_spec[1],):
            an.poison(Data(lhs.shape, (lab,)), f"{where}: units on a spatial axis")
    _reading(an, lhs, lhs_spec[1], rhs, rhs_spec[1], where, entries)
    new = _producing(an, rhs, rhs_spec[0])
    labs = []
    if new is not None:
        entries[rhs_spec[0]] = (new, np.ones(new.uid.size, int), "kernel")
        labs.append(new.replace(axes=(out_spec[1],)))
    an.use(rhs, entries, where)
    return [Data(shape, tuple(labs), lhs.taint)]
