"""Tracer rules of reductions: sums and maxes over axes, pooling windows, argmax, cumsum.

A max (or min) over the pieces of a reshaped feature axis makes a maxout / max-pool
group (its pieces share a scale and may be permuted); a max over all units of one
group is a single window. Pooling over space (``reduce_window``) and reductions over
other axes keep the labels; a sum or max over the feature axis is
permutation-invariant and taints the rescaling.
"""

from __future__ import annotations

import functools
from typing import Any

import numpy as np

from quotient_opt import _jaxpr
from quotient_opt.symmetry._tracer._analysis import Analysis
from quotient_opt.symmetry._tracer._registry import builtin
from quotient_opt.symmetry._tracer._values import (
    Data,
    Info,
    Lab,
    remap,
)
from quotient_opt.symmetry._tracer._values import out_shapes as shapes_of


def _reduce(an: Analysis, eqn: Any, ins: list[Info], kind: str) -> list[Info]:
    out_shapes, where = shapes_of(eqn), _jaxpr.where(eqn)
    x = ins[0]
    axes = tuple(eqn.params["axes"])
    shape = out_shapes[0]
    if not isinstance(x, Data):
        return an.unknown(ins, out_shapes, f"unsupported operation {where}")
    keep = [a for a in range(len(x.shape)) if a not in axes]
    mapping = {a: i for i, a in enumerate(keep)}
    labs = []
    taint = set(x.taint)
    for lb in x.labs:
        hit = [a for a in lb.axes if a in axes]
        if not hit:
            labs.append(remap(lb, mapping))
            continue
        if kind in ("max", "min") and len(lb.axes) == 2 and len(hit) == 1:
            new = _pieces(an, lb, hit[0], where)
            if new is not None:
                labs.append(remap(new, mapping))
                continue
        if len(hit) != len(lb.axes):
            an.poison(Data(x.shape, (lb,)), f"{where}: reduces part of a split feature axis")
            continue
        if kind in ("max", "min") and _one_window(an, lb, where):
            taint |= an.gids_with_deg(lb, 1)
            continue
        if kind in ("sum", "max", "min"):
            deg1 = an.gids_with_deg(lb, 1)
            an.taint(deg1, f"{where}: sums or maxes over the units")
            taint |= deg1
        else:
            an.poison(Data(x.shape, (lb,)), f"{where}: reduces over the units")
    if kind == "prod":
        deg1 = {g for lb in x.labs for g in an.gids_with_deg(lb, 1)}
        an.taint(deg1, f"{where}: product is not homogeneous")
    const = frozenset(mapping[a] for a in x.const_axes if a in mapping)
    return [Data(shape, tuple(labs), frozenset(taint), const)]


def _pieces(an: Analysis, lab: Lab, piece_axis: int, where: str) -> Lab | None:
    """A max over the pieces of windows: ``(W, k)`` units ``w * k + j`` -> window ``w``."""
    k_pos = lab.axes.index(piece_axis)
    gid = np.moveaxis(lab.gid, k_pos, -1)
    uid = np.moveaxis(lab.uid, k_pos, -1)
    lvl = np.moveaxis(lab.lvl, k_pos, -1)
    deg = np.moveaxis(lab.deg, k_pos, -1)
    windows, k = uid.shape
    groups = an.gids(lab)
    if len(groups) != 1 or np.any(gid < 0) or np.any(lvl != 0) or k_pos != 1:
        return None
    (g,) = groups
    grp = an.groups[g]
    if not np.array_equal(uid, np.arange(windows * k).reshape(windows, k)) or grp.n != windows * k:
        return None
    if grp.pieces not in (1, k):
        an.kill(g, f"{where}: two different max-pool windows")
        return None
    grp.pieces = k
    grp.acts.add("max")
    if np.any(deg != deg[:, :1]):
        an.taint({g}, f"{where}: pieces of one window scale differently")
    other = [a for a in lab.axes if a != piece_axis]
    return Lab(tuple(other), gid[:, 0], np.arange(windows), np.ones(windows, int), deg[:, 0])


def _one_window(an: Analysis, lab: Lab, where: str) -> bool:
    """A max over all units of one group: a single window of ``n`` pieces.

    Its scale has no axis left to follow, so the rescaling goes; the pieces
    may still be permuted.
    """
    groups = an.gids(lab)
    if len(groups) != 1 or len(lab.axes) != 1 or np.any(lab.gid < 0) or np.any(lab.lvl):
        return False
    (g,) = groups
    grp = an.groups[g]
    n = lab.uid.size
    if grp.n != n or not np.array_equal(np.sort(lab.uid), np.arange(n)) or (
        grp.pieces not in (1, n)
    ):
        return False
    grp.pieces = n
    grp.acts.add("max")
    an.taint({g}, f"{where}: a max over all units leaves no axis to carry their scale")
    return True


for _name, _kind in (("reduce_sum", "sum"), ("reduce_max", "max"), ("reduce_min", "min"),
                     ("reduce_prod", "prod"), ("argmax", "arg"), ("argmin", "arg")):
    builtin(_name)(functools.partial(_reduce, kind=_kind))


@builtin("reduce_window_max", "reduce_window_min", "reduce_window_sum")
def _window(an: Analysis, eqn: Any, ins: list[Info]) -> list[Info]:
    out_shapes, where = shapes_of(eqn), _jaxpr.where(eqn)
    x = ins[0]
    if not isinstance(x, Data):
        return an.unknown(ins, out_shapes, f"unsupported operation {where}")
    dims = eqn.params["window_dimensions"]
    strides = eqn.params["window_strides"]
    padding = eqn.params["padding"]
    dil = eqn.params.get("base_dilation", (1,) * len(dims))
    wdil = eqn.params.get("window_dilation", (1,) * len(dims))
    for lb in x.labs:
        for a in lb.axes:
            if (dims[a], strides[a], tuple(padding[a]), dil[a], wdil[a]) != (1, 1, (0, 0), 1, 1):
                return an.unknown(ins, out_shapes, f"{where}: pools over a unit axis")
    return [Data(out_shapes[0], x.labs, x.taint)]


@builtin("cumsum")
def cumsum(an: Analysis, eqn: Any, ins: list[Info]) -> list[Info]:
    out_shapes, where = shapes_of(eqn), _jaxpr.where(eqn)
    x = ins[0]
    if isinstance(x, Data) and all(eqn.params["axis"] not in lb.axes for lb in x.labs):
        return [Data(out_shapes[0], x.labs, x.taint)]
    return an.unknown(ins, out_shapes, f"unsupported operation {where}")
