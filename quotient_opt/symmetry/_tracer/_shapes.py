"""Tracer rules of shape operations: transpose, broadcast, reshape, concatenate, slice, pad.

Reshapes (flatten), transposes, broadcasts, concatenations, slices and padding of
other axes keep the labels; a reshape re-reads the block of axes a label lives in
(a flattened feature map); a concatenation along the unit axis concatenates the
labels; a slice keeping only some units of a group removes its symmetries.
"""

from __future__ import annotations

from typing import Any

import numpy as np

from quotient_opt import _jaxpr
from quotient_opt.symmetry._tracer._analysis import Analysis
from quotient_opt.symmetry._tracer._registry import builtin
from quotient_opt.symmetry._tracer._values import (
    Data,
    Info,
    Lab,
    Opaque,
    Param,
    remap,
    reshape_label,
)
from quotient_opt.symmetry._tracer._values import out_shapes as shapes_of


@builtin("transpose")
def transpose(an: Analysis, eqn: Any, ins: list[Info]) -> list[Info]:
    out_shapes, where = shapes_of(eqn), _jaxpr.where(eqn)
    perm = tuple(eqn.params["permutation"])
    (x,) = ins
    inv = {old: new for new, old in enumerate(perm)}
    if isinstance(x, Param):
        return [x.pick(out_shapes[0], perm)]
    if isinstance(x, Opaque):
        return [Opaque(out_shapes[0], x.leaves)]
    labs = tuple(remap(lb, inv) for lb in x.labs)
    return [Data(out_shapes[0], labs, x.taint, frozenset(inv[a] for a in x.const_axes),
                 x.value)]


@builtin("broadcast_in_dim")
def broadcast_in_dim(an: Analysis, eqn: Any, ins: list[Info]) -> list[Info]:
    out_shapes, where = shapes_of(eqn), _jaxpr.where(eqn)
    x = ins[0]
    shape = out_shapes[0]
    dims = tuple(eqn.params["broadcast_dimensions"])
    if isinstance(x, Param):
        axes: list[int | None] = [None] * len(shape)
        starts = [0] * len(shape)
        for i, d in enumerate(dims):
            if x.shape[i] == shape[d]:
                axes[d], starts[d] = x.axes[i], x.starts[i]
        return [Param(shape, x.leaf, tuple(axes), tuple(starts))]
    if isinstance(x, Opaque):
        return [Opaque(shape, x.leaves)]
    const = set(range(len(shape))) - set(dims)
    const |= {dims[a] for a in x.const_axes}
    const |= {d for i, d in enumerate(dims) if x.shape[i] == 1 and shape[d] > 1}
    labs = []
    for lb in x.labs:
        if any(x.shape[a] == 1 and shape[dims[a]] > 1 for a in lb.axes):
            an.poison(Data(x.shape, (lb,)), f"{where}: a single unit broadcast to many")
            continue
        labs.append(remap(lb, {a: dims[a] for a in lb.axes}))
    return [Data(shape, tuple(labs), x.taint, frozenset(const), x.value)]


@builtin("squeeze")
def squeeze(an: Analysis, eqn: Any, ins: list[Info]) -> list[Info]:
    out_shapes, where = shapes_of(eqn), _jaxpr.where(eqn)
    x = ins[0]
    dims = set(eqn.params["dimensions"])
    keep = [a for a in range(len(x.shape)) if a not in dims]
    mapping = {a: i for i, a in enumerate(keep)}
    if isinstance(x, Param):
        return [x.pick(out_shapes[0], keep)]
    if isinstance(x, Opaque):
        return [Opaque(out_shapes[0], x.leaves)]
    labs = []
    for lb in x.labs:
        if set(lb.axes) & dims:
            an.poison(Data(x.shape, (lb,)), f"{where}: squeezes a unit axis")
            continue
        labs.append(remap(lb, mapping))
    return [Data(out_shapes[0], tuple(labs), x.taint,
                 frozenset(mapping[a] for a in x.const_axes if a in mapping), x.value)]


@builtin("reshape", "expand_dims")
def reshape(an: Analysis, eqn: Any, ins: list[Info]) -> list[Info]:
    out_shapes, where = shapes_of(eqn), _jaxpr.where(eqn)
    x = ins[0]
    shape = out_shapes[0]
    if eqn.params.get("dimensions") not in (None, ()):
        return an.unknown(ins, out_shapes, f"{where}: reshape with dimensions")
    if isinstance(x, Param):
        k = len(shape) - len(x.shape)
        if k >= 0 and tuple(shape[k:]) == tuple(x.shape) and all(s == 1 for s in shape[:k]):
            # leading axes added (a bias reshaped to broadcast): right-aligned
            return [Param(shape, x.leaf, (None,) * k + x.axes, (0,) * k + x.starts)]
        old = [(a, s) for a, s in zip(range(len(x.shape)), x.shape) if s != 1]
        new = [i for i, s in enumerate(shape) if s != 1]
        if [s for _, s in old] == [shape[i] for i in new]:
            axes: list[int | None] = [None] * len(shape)
            starts = [0] * len(shape)
            for (a, _), i in zip(old, new):
                axes[i], starts[i] = x.axes[a], x.starts[a]
            return [Param(shape, x.leaf, tuple(axes), tuple(starts))]
        return [Opaque(shape, frozenset({x.leaf}))]
    if isinstance(x, Opaque):
        return [Opaque(shape, x.leaves)]
    if x.value is not None:
        return [Data(shape, (), x.taint, frozenset(range(len(shape))), x.value)]
    labs = []
    for lb in x.labs:
        new = reshape_label(lb, x.shape, shape)
        if new is None:
            an.poison(Data(x.shape, (lb,)), f"{where}: reshape mixes unit axes")
        else:
            labs.append(new)
    const = frozenset(i for i, s in enumerate(shape) if s == 1)
    return [Data(shape, tuple(labs), x.taint, const)]


@builtin("concatenate")
def concatenate(an: Analysis, eqn: Any, ins: list[Info]) -> list[Info]:
    out_shapes, where = shapes_of(eqn), _jaxpr.where(eqn)
    dim = eqn.params["dimension"]
    shape = out_shapes[0]
    if any(isinstance(i, (Param, Opaque)) for i in ins):
        return an.unknown(ins, out_shapes, f"{where}: concatenates parameters")
    # along other axes, labels must agree (merge); along dim, labels concatenate
    others = [
        Data(i.shape, tuple(lb for lb in i.labs if dim not in lb.axes)) for i in ins
        if any(dim not in lb.axes for lb in i.labs)
    ]
    merged = list(an.merge_labels(others, where)) if others else []
    pieces = []
    for i in ins:
        lb = i.lab_on(dim)
        if lb is not None and len(lb.axes) != 1:
            an.poison(i, f"{where}: concatenates a split feature axis")
            lb = None
        n = i.shape[dim]
        if lb is None:
            pieces.append((np.full(n, -1), np.full(n, -1), np.zeros(n, int), np.zeros(n, int)))
        else:
            pieces.append((lb.gid, lb.uid, lb.lvl, lb.deg))
    if any(p[0].max(initial=-1) >= 0 for p in pieces):
        cat = [np.concatenate([p[k] for p in pieces]) for k in range(4)]
        merged.append(Lab((dim,), *cat))
    taint = frozenset().union(*(i.taint for i in ins))
    return [Data(shape, tuple(merged), taint)]


@builtin("slice")
def slice_rule(an: Analysis, eqn: Any, ins: list[Info]) -> list[Info]:
    out_shapes, where = shapes_of(eqn), _jaxpr.where(eqn)
    x = ins[0]
    starts = eqn.params["start_indices"]
    limits = eqn.params["limit_indices"]
    strides = eqn.params.get("strides") or (1,) * len(starts)
    if isinstance(x, Param):
        if any(s != 1 for a, s in enumerate(strides) if x.axes[a] is not None):
            return [Opaque(out_shapes[0], frozenset({x.leaf}))]
        return [Param(out_shapes[0], x.leaf, x.axes,
                      tuple(st + s for st, s in zip(x.starts, starts)))]
    if isinstance(x, Opaque):
        return [Opaque(out_shapes[0], x.leaves)]
    sl = tuple(slice(s, lim, st) for s, lim, st in zip(starts, limits, strides))
    return [_cut(an, x, sl, out_shapes[0], where)]


def _cut(an: Analysis, x: Data, sl: tuple[slice, ...], shape: tuple[int, ...], where: str) -> Data:
    """Keeps the positions ``sl`` of ``x``; a group cut in part loses its symmetries."""
    labs = []
    for lb in x.labs:
        sub = tuple(sl[a] for a in lb.axes)
        cut = lb.replace(gid=lb.gid[sub], uid=lb.uid[sub], lvl=lb.lvl[sub], deg=lb.deg[sub])
        kept = set(zip(cut.gid.ravel().tolist(), cut.uid.ravel().tolist()))
        full = set(zip(lb.gid.ravel().tolist(), lb.uid.ravel().tolist()))
        for g, u in full - kept:
            if g >= 0 and any(gg == g for gg, _ in kept):
                an.kill(int(g), f"{where}: keeps only some units of the group")
        if np.any(cut.gid >= 0):
            labs.append(cut)
    return Data(shape, tuple(labs), x.taint, x.const_axes)


@builtin("dynamic_slice")
def dynamic_slice(an: Analysis, eqn: Any, ins: list[Info]) -> list[Info]:
    out_shapes, where = shapes_of(eqn), _jaxpr.where(eqn)
    x = ins[0]
    shape = out_shapes[0]
    if isinstance(x, Data) and all(x.shape[a] == shape[a] for lb in x.labs for a in lb.axes):
        for i in ins[1:]:
            an.poison(i, f"parameter used in {where}")
        taint = x.taint.union(*(i.taint for i in ins[1:] if isinstance(i, Data)))
        return [Data(shape, x.labs, taint)]
    return an.unknown(ins, out_shapes, f"unsupported operation {where}")


@builtin("pad")
def pad(an: Analysis, eqn: Any, ins: list[Info]) -> list[Info]:
    out_shapes, where = shapes_of(eqn), _jaxpr.where(eqn)
    x, pad = ins
    config = eqn.params["padding_config"]
    if not isinstance(x, Data) or not isinstance(pad, Data) or pad.labs:
        return an.unknown(ins, out_shapes, f"unsupported operation {where}")
    labelled_axes = {a for lb in x.labs for a in lb.axes}
    if any(config[a] != (0, 0, 0) for a in labelled_axes):
        return an.unknown(ins, out_shapes, f"{where}: pads a unit axis")
    if not pad.zero:
        an.taint({g for lb in x.labs for g in an.gids_with_deg(lb, 1)},
                 f"{where}: pads with a nonzero value")
    return [Data(out_shapes[0], x.labs, x.taint | pad.taint)]


@builtin("rev")
def rev(an: Analysis, eqn: Any, ins: list[Info]) -> list[Info]:
    out_shapes, where = shapes_of(eqn), _jaxpr.where(eqn)
    x = ins[0]
    if not isinstance(x, Data):
        return an.unknown(ins, out_shapes, f"unsupported operation {where}")
    dims = set(eqn.params["dimensions"])
    labs = []
    for lb in x.labs:
        flip = tuple(k for k, a in enumerate(lb.axes) if a in dims)
        labs.append(lb.replace(gid=np.flip(lb.gid, flip), uid=np.flip(lb.uid, flip),
                               lvl=np.flip(lb.lvl, flip), deg=np.flip(lb.deg, flip))
                    if flip else lb)
    return [Data(out_shapes[0], tuple(labs), x.taint, x.const_axes)]
