"""The abstract values of symmetry tracing: labels, data, parameter views.

A value of the traced computation is a :class:`Data` (it depends on the input,
or is a constant), a :class:`Param` (a view of one parameter leaf, followed
through transposes, reshapes, broadcasts and slices) or an :class:`Opaque`
(computed from parameters in a way the analysis does not follow). A
:class:`Lab` says which unit group and unit each position of some axes of a
:class:`Data` holds, and how the value scales with the units.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Sequence
from typing import Any

import numpy as np

@dataclasses.dataclass(frozen=True)
class Lab:
    """A label: which group/unit each position of some axes of a value belongs to.

    ``gid``/``uid`` are -1 where a position belongs to no group. ``lvl`` is 0
    for unit-level, 1 for window-level positions; ``deg`` 1 where the value
    scales with the unit, 0 where it is invariant.
    """

    axes: tuple[int, ...]
    gid: np.ndarray
    uid: np.ndarray
    lvl: np.ndarray
    deg: np.ndarray

    def replace(self, **kw: Any) -> Lab:
        return dataclasses.replace(self, **kw)


@dataclasses.dataclass(frozen=True)
class Data:
    """A value that depends on the input (or a constant, with no labels)."""

    shape: tuple[int, ...]
    labs: tuple[Lab, ...] = ()
    taint: frozenset[int] = frozenset()
    const_axes: frozenset[int] = frozenset()
    value: float | None = None  # known scalar value (literals), broadcast everywhere
    dyn: bool = True  # depends on the input (False: a constant)
    # parameters multiplied into this value along axes where the rest is constant
    # (a normalization's gain times its per-sample statistic), not yet placed
    factors: tuple[Param, ...] = ()

    def const_along(self, axis: int) -> bool:
        if self.value is not None or axis >= len(self.shape):
            return True
        return self.shape[axis] == 1 or axis in self.const_axes

    def lab_on(self, axis: int) -> Lab | None:
        return next((lb for lb in self.labs if axis in lb.axes), None)

    @property
    def zero(self) -> bool:
        return self.value == 0


@dataclasses.dataclass(frozen=True)
class Param:
    """A view of one parameter leaf: value axis ``i`` is leaf axis ``axes[i]``
    (``None``: a broadcast axis), starting at leaf position ``starts[i]``."""

    shape: tuple[int, ...]
    leaf: int
    axes: tuple[int | None, ...]
    starts: tuple[int, ...]

    def pick(self, shape: tuple[int, ...], order: Sequence[int]) -> Param:
        """The view whose axis ``i`` is this view's axis ``order[i]`` (a transpose or a
        squeeze)."""
        return Param(shape, self.leaf, tuple(self.axes[o] for o in order),
                     tuple(self.starts[o] for o in order))


@dataclasses.dataclass(frozen=True)
class Opaque:
    """A value computed from parameters in a way the analysis does not follow."""

    shape: tuple[int, ...]
    leaves: frozenset[int]


Info = Data | Param | Opaque


def out_shapes(eqn: Any) -> list[tuple[int, ...]]:
    """The shapes of ``eqn``'s outputs."""
    return [tuple(getattr(v.aval, "shape", ())) for v in eqn.outvars]


def remap(lab: Lab, mapping: dict[int, int]) -> Lab:
    """Renames a label's axes; keeps its arrays in increasing new-axis order."""
    new_axes = [mapping[a] for a in lab.axes]
    order = np.argsort(new_axes)
    return lab.replace(
        axes=tuple(sorted(new_axes)),
        gid=np.transpose(lab.gid, order), uid=np.transpose(lab.uid, order),
        lvl=np.transpose(lab.lvl, order), deg=np.transpose(lab.deg, order),
    )


def literal_info(v: Any) -> Data:
    """A literal operand: a constant, with its value when it is a scalar."""
    val = np.asarray(v.val)
    return Data(tuple(val.shape), value=float(val) if val.size == 1 else None, dyn=False)


def leaves_of(ins: Sequence[Info]) -> frozenset[int]:
    out: set[int] = set()
    for i in ins:
        if isinstance(i, Param):
            out.add(i.leaf)
        elif isinstance(i, Opaque):
            out |= i.leaves
    return frozenset(out)


def const_info(c: Any) -> Data:
    a = np.asarray(c) if not hasattr(c, "shape") else c
    shape = tuple(np.shape(a))
    value = None
    try:
        arr = np.asarray(a)
        if arr.size and np.all(arr == arr.ravel()[0]):
            value = float(arr.ravel()[0])
    except Exception:  # noqa: BLE001 - abstract or non-numeric constant
        pass
    return Data(shape, value=value, dyn=False)


def embed(a: np.ndarray, start: int, size: int, fill: Any) -> np.ndarray:
    out = np.full(size, fill, dtype=np.asarray(a).dtype if np.asarray(a).dtype != bool else int)
    a = np.asarray(a).ravel()
    out[start : start + a.size] = a
    return out


def reshape_label(lab: Lab, old: tuple[int, ...], new: tuple[int, ...]) -> Lab | None:
    """A label through ``reshape(old -> new)``: the block of axes it lives in is re-read."""
    cin = np.cumprod((1,) + tuple(old))
    cout = np.cumprod((1,) + tuple(new))
    lo, hi = min(lab.axes), max(lab.axes) + 1
    # enclosing block: boundaries where the cumulative products agree
    starts = [i for i in range(lo + 1) if cin[i] in cout]
    ends = [i for i in range(hi, len(old) + 1) if cin[i] in cout]
    if not starts or not ends:
        return None
    i0, i1 = max(starts), min(ends)
    o0 = int(np.where(cout == cin[i0])[0].min())
    o1 = int(np.where(cout == cin[i1])[0].max())
    block_old = tuple(old[i0:i1])
    block_new = tuple(new[o0:o1])
    if math.prod(block_old) != math.prod(block_new):
        return None

    def full(arr: np.ndarray, fill: int) -> np.ndarray:
        shape = [1] * len(block_old)
        for k, a in enumerate(lab.axes):
            shape[a - i0] = arr.shape[k]
        return np.broadcast_to(arr.reshape(shape), block_old).reshape(block_new)

    gid, uid, lvl, deg = (full(x, f) for x, f in ((lab.gid, -1), (lab.uid, -1), (lab.lvl, 0),
                                                  (lab.deg, 0)))
    relevant = [k for k in range(len(block_new))
                if any(np.any(np.diff(x, axis=k) != 0) for x in (gid, uid, lvl, deg))]
    if not relevant:
        relevant = [max(range(len(block_new)), key=lambda k: block_new[k])] if block_new else []
    idx = tuple(slice(None) if k in relevant else 0 for k in range(len(block_new)))
    return Lab(tuple(o0 + k for k in relevant), gid[idx], uid[idx], lvl[idx], deg[idx])
