"""The state of symmetry tracing: unit groups under construction and parameter uses.

:class:`Analysis` runs the tracer's rule table (``_registry.RULES``) over the
model's jaxpr with the library's interpreter (``quotient_opt._jaxpr``), and is
the ``ctx`` every rule receives: rules create, merge and downgrade unit groups
through it (:meth:`Analysis.new_group`, :meth:`~Analysis.union`,
:meth:`~Analysis.kill`, :meth:`~Analysis.taint`, :meth:`~Analysis.poison`) and
record how parameter leaves are read (:meth:`~Analysis.use`). At the end, a leaf
axis read in several places must be transformed alike by all of them
(:meth:`~Analysis.resolve_uses`), and :meth:`~Analysis.result` turns the groups
into :class:`~quotient_opt.UnitGroup` records.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence
from typing import Any

import numpy as np

from quotient_opt import _jaxpr
from quotient_opt.symmetry._paths import Path, path_str
from quotient_opt.symmetry._spec import AxisRef, UnitGroup
from quotient_opt.symmetry._tracer import _registry
from quotient_opt.symmetry._tracer._values import (
    Data,
    Info,
    Lab,
    Opaque,
    Param,
    const_info,
    embed,
    leaves_of,
    literal_info,
    out_shapes,
)


class _Group:
    """A unit group under construction."""

    def __init__(self, gid: int, n: int, name: str):
        self.gid = gid
        self.n = n
        self.name = name
        self.pieces = 1
        self.perm = True
        self.pieces_perm = True
        self.scale = True
        self.notes: list[str] = []
        self.acts: set[str] = set()


class Analysis:
    """Abstract interpretation of a jaxpr for unit groups (see the package docstring)."""

    def __init__(self, leaf_paths: Sequence[Path], leaf_shapes: Sequence[tuple[int, ...]]):
        self.paths = list(leaf_paths)
        self.shapes = list(leaf_shapes)
        self.groups: list[_Group] = []
        self.parent: list[int] = []
        # (leaf, axis) -> list of uses: None (read without a label) or per-position arrays
        self.uses: dict[tuple[int, int], list[Any]] = {}
        self.opaque: dict[int, str] = {}
        self.interpreter = _jaxpr.Interpreter(
            _registry.rules(), unsupported, literal=literal_info, const=const_info, ctx=self,
            call=_registry.HOOKS["call"], prepare=self._prepare, prune=True)

    # ------------------------------------------------------------ groups

    def find(self, g: int) -> int:
        while self.parent[g] != g:
            self.parent[g] = self.parent[self.parent[g]]
            g = self.parent[g]
        return g

    def new_group(self, n: int, name: str) -> int:
        gid = len(self.groups)
        self.groups.append(_Group(gid, n, name))
        self.parent.append(gid)
        return gid

    def union(self, a: int, b: int, why: str) -> int:
        a, b = self.find(a), self.find(b)
        if a == b:
            return a
        ga, gb = self.groups[a], self.groups[b]
        self.parent[b] = a
        if ga.n != gb.n:
            self.kill(a, why + f": groups of {ga.n} and {gb.n} units meet")
        if ga.pieces != gb.pieces:
            if 1 in (ga.pieces, gb.pieces):
                ga.pieces = max(ga.pieces, gb.pieces)
            else:
                self.kill(a, why + ": different max-pool windows meet")
        ga.perm &= gb.perm
        ga.pieces_perm &= gb.pieces_perm
        ga.scale &= gb.scale
        ga.notes += gb.notes
        ga.acts |= gb.acts
        ga.name = ga.name if gb.name in ga.name.split("+") else f"{ga.name}+{gb.name}"
        return a

    def kill(self, gid: int, reason: str, *, perm: bool = True, pieces: bool = True,
             scale: bool = True) -> None:
        g = self.groups[self.find(gid)]
        changed = (perm and g.perm) or (pieces and g.pieces_perm) or (scale and g.scale)
        g.perm &= not perm
        g.pieces_perm &= not pieces
        g.scale &= not scale
        if changed and reason not in g.notes:
            g.notes.append(reason)

    def gids(self, lab: Lab) -> set[int]:
        return {self.find(int(g)) for g in np.unique(lab.gid) if g >= 0}

    def poison(self, info: Info, reason: str) -> None:
        """Removes every symmetry of the groups labelled in ``info``; params become opaque."""
        if isinstance(info, Data):
            for lab in info.labs:
                for g in self.gids(lab):
                    self.kill(g, reason)
        elif isinstance(info, Param):
            self.opaque.setdefault(info.leaf, reason)
        elif isinstance(info, Opaque):
            for leaf in info.leaves:
                self.opaque.setdefault(leaf, reason)

    def taint(self, groups: frozenset[int] | set[int], reason: str) -> None:
        for g in groups:
            self.kill(g, reason, perm=False, pieces=False)

    # ------------------------------------------------------------ parameter uses

    def use(self, p: Param, entries: dict[int, tuple[Lab, np.ndarray, str]], reason: str) -> None:
        """Records how each axis of ``p``'s leaf is read here.

        ``entries`` maps a value axis of ``p`` to ``(label, power per position,
        role)`` (the single-axis label of the aligned data axis); every other
        axis of the leaf is read without units.
        """
        for i, leaf_axis in enumerate(p.axes):
            if leaf_axis is None:
                continue
            key = (p.leaf, leaf_axis)
            size = self.shapes[p.leaf][leaf_axis]
            entry = entries.get(i)
            if entry is None:
                self.uses.setdefault(key, []).append(None)
                continue
            lab, power, role = entry
            if len(lab.axes) != 1:
                for g in self.gids(lab):
                    self.kill(g, reason + ": a parameter meets a split feature axis")
                self.uses.setdefault(key, []).append(None)
                continue
            start = p.starts[i]
            self.uses.setdefault(key, []).append((
                embed(lab.gid, start, size, -1), embed(lab.uid, start, size, -1),
                embed(lab.lvl, start, size, 0), embed(power, start, size, 0), role,
            ))

    # ------------------------------------------------------------ running

    def run(self, jaxpr: Any, env_in: list[Info], consts: list[Any]) -> list[Info]:
        """The abstract values of ``jaxpr``'s outputs (its live equations are interpreted)."""
        return self.interpreter.run(jaxpr, consts, env_in)

    def rule(self, rule: Any) -> Any:
        """The rule function of a primitive name or of a shorthand (see
        :func:`~quotient_opt.symmetry.register_rule`), to delegate to from a rule."""
        return _registry.resolve(rule)

    def _prepare(self, eqn: Any, ins: list[Info]) -> list[Info]:
        # parameter factors are placed by a product with units; any other use reads them
        if _jaxpr.name_of(eqn) == "mul":
            return ins
        return [self.flush(i, _jaxpr.where(eqn)) for i in ins]

    def flush(self, info: Info, where: str) -> Info:
        """A value carrying parameter factors used other than in a product with units:
        the factors are read without units."""
        if isinstance(info, Data) and info.factors:
            for p in info.factors:
                self.use(p, {}, where)
            return dataclasses.replace(info, factors=())
        return info

    def unknown(self, ins: list[Info], out_shapes: list[tuple[int, ...]], reason: str) -> list[Info]:
        """An operation the analysis does not follow: its unit inputs lose their symmetries."""
        for info in ins:
            self.poison(info, reason)
        if any(isinstance(i, Data) and i.dyn for i in ins):
            taint = frozenset().union(*(i.taint for i in ins if isinstance(i, Data)))
            return [Data(s, taint=taint) for s in out_shapes]
        leaves = leaves_of(ins)
        if leaves:
            return [Opaque(s, leaves) for s in out_shapes]
        return [Data(s, dyn=False) for s in out_shapes]

    def gids_with_deg(self, lab: Lab, deg: int) -> set[int]:
        return {self.find(int(g)) for g, d in zip(lab.gid.ravel(), lab.deg.ravel())
                if g >= 0 and d == deg}

    def merge_labels(self, labelled: list[Data], where: str, *, check_deg: bool = True
                     ) -> tuple[Lab, ...]:
        """Unifies the labels of several values of the same shape, axis set by axis set."""
        base = list(labelled[0].labs)
        for d in labelled[1:]:
            for lb in d.labs:
                match = next((i for i, b in enumerate(base) if set(b.axes) & set(lb.axes)), None)
                if match is None:
                    base.append(lb)
                    continue
                b = base[match]
                if b.axes != lb.axes:
                    for g in self.gids(b) | self.gids(lb):
                        self.kill(g, f"{where}: units meet along different axes")
                    continue
                base[match] = self.unify(b, lb, where, check_deg=check_deg)
        return tuple(base)

    def unify(self, a: Lab, b: Lab, where: str, *, check_deg: bool = True) -> Lab:
        """Position-by-position merge of two labels of the same axes (a residual add)."""
        ga, gb = a.gid.ravel(), b.gid.ravel()
        ua, ub = a.uid.ravel(), b.uid.ravel()
        bad: set[int] = set()
        for i in range(ga.size):
            if ga[i] >= 0 and gb[i] >= 0:
                if ua[i] != ub[i] or a.lvl.ravel()[i] != b.lvl.ravel()[i]:
                    bad |= {self.find(int(ga[i])), self.find(int(gb[i]))}
                else:
                    self.union(int(ga[i]), int(gb[i]), f"{where} (residual)")
            elif ga[i] >= 0 or gb[i] >= 0:
                bad.add(self.find(int(max(ga[i], gb[i]))))
        for g in bad:
            self.kill(g, f"{where}: units combined out of order or with unlabelled features")
        if check_deg and np.any(a.deg != b.deg):
            self.taint(self.gids(a) | self.gids(b), f"{where}: combines scaled and invariant values")
        gid = np.where(a.gid >= 0, a.gid, b.gid)
        return a.replace(gid=gid, uid=np.where(a.gid >= 0, a.uid, b.uid),
                         lvl=np.where(a.gid >= 0, a.lvl, b.lvl), deg=np.maximum(a.deg, b.deg))

    # ------------------------------------------------------------ outputs and results

    def outputs(self, outs: list[Info]) -> None:
        for info in outs:
            if isinstance(info, Data):
                for lab in info.labs:
                    for g in self.gids(lab):
                        levels = {int(v) for gg, v in zip(lab.gid.ravel(), lab.lvl.ravel())
                                  if gg >= 0 and self.find(int(gg)) == g}
                        self.kill(g, "reaches the output (outputs are neither permuted nor "
                                     "rescaled)", pieces=0 in levels)
                self.taint(info.taint, "its scale reaches the output")
            else:
                self.poison(info, "a parameter is returned")

    def resolve_uses(self) -> None:
        """Leaf axes read in several places must be transformed alike by all of them."""
        for (leaf, axis), uses in self.uses.items():
            if leaf in self.opaque:
                for u in uses:
                    if u is not None:
                        for g in np.unique(u[0]):
                            if g >= 0:
                                self.kill(int(g), f"parameter '{path_str(self.paths[leaf])}' is "
                                                  f"also used by {self.opaque[leaf]}")
                continue
            labelled = [u for u in uses if u is not None]
            if not labelled:
                continue
            if any(u is None for u in uses):
                for u in labelled:
                    for g in np.unique(u[0]):
                        if g >= 0:
                            self.kill(int(g), f"parameter '{path_str(self.paths[leaf])}' axis "
                                              f"{axis} is also read without its units")
            first = labelled[0]
            for u in labelled[1:]:
                for i in range(first[0].size):
                    a, b = first[0][i], u[0][i]
                    if a >= 0 and b >= 0:
                        if first[1][i] != u[1][i] or first[2][i] != u[2][i]:
                            self.kill(int(a), "a weight is shared in inconsistent ways")
                            self.kill(int(b), "a weight is shared in inconsistent ways")
                            continue
                        self.union(int(a), int(b), "a weight is shared")
                        if first[3][i] != u[3][i]:
                            self.taint({self.find(int(a))}, "a weight is shared with different "
                                                            "scale laws")
                    elif a >= 0 or b >= 0:
                        self.kill(int(max(a, b)), "a weight is shared with and without its units")

    def result(self) -> tuple[list[UnitGroup], list[UnitGroup], dict[Path, tuple[int, ...]]]:
        """The unit groups: ``(with symmetry, without, leaf shapes)``."""
        self.resolve_uses()
        refs: dict[int, list[AxisRef]] = {}
        for (leaf, axis), uses in self.uses.items():
            u = next((u for u in uses if u is not None), None)
            if u is None:
                continue
            gid_arr, uid_arr, lvl_arr, pow_arr, role = u
            roots = {self.find(int(g)) for g in np.unique(gid_arr) if g >= 0}
            for g in roots:
                mask = np.array([gg >= 0 and self.find(int(gg)) == g for gg in gid_arr])
                lvls = set(lvl_arr[mask].tolist())
                pows = set(pow_arr[mask].tolist())
                if len(lvls) != 1 or len(pows) != 1:
                    self.kill(g, f"parameter '{path_str(self.paths[leaf])}' mixes levels or laws")
                    continue
                grp = self.groups[g]
                power = int(pows.pop())
                # with one piece per window, readers index windows
                lvl = "unit" if lvls.pop() == 0 and (grp.pieces > 1 or power >= 0) else "window"
                count = grp.n if lvl == "unit" else grp.n // grp.pieces
                layout = _layout(np.where(mask, uid_arr, -1), count)
                if layout is None:
                    self.kill(g, f"parameter '{path_str(self.paths[leaf])}' axis {axis}: unit "
                                 "layout not supported")
                    continue
                outer, offset, inner = layout
                refs.setdefault(g, []).append(AxisRef(
                    path=self.paths[leaf], axis=axis, power=power, level=lvl,
                    role=role, outer=outer, offset=offset, inner=inner))
        with_sym, without = [], []
        shapes: dict[Path, tuple[int, ...]] = {}
        for g in sorted({self.find(i) for i in range(len(self.groups))}):
            grp = self.groups[g]
            rs = tuple(refs.get(g, ()))
            if not rs:
                continue
            if grp.n % grp.pieces:
                self.kill(g, "units do not split into windows")
            act = "+".join(sorted(grp.acts)) if grp.acts else "identity"
            ug = UnitGroup(
                name=grp.name, windows=grp.n // grp.pieces, pieces=grp.pieces, refs=rs,
                permutable=grp.perm and grp.n > grp.pieces,
                pieces_permutable=grp.pieces_perm and grp.pieces > 1,
                rescalable=grp.scale, activation=act, notes=tuple(grp.notes),
            )
            for r in rs:
                shapes[r.path] = tuple(self.shapes[self.paths.index(r.path)])
            (with_sym if ug.symmetric else without).append(ug)
        return with_sym, without, shapes


def unsupported(an: Analysis, eqn: Any, ins: list[Info]) -> list[Info]:
    """The rule of a primitive without one: its unit inputs lose their symmetries."""
    return an.unknown(ins, out_shapes(eqn), f"unsupported operation {_jaxpr.where(eqn)}")


_registry.SHORTHANDS["unknown"] = unsupported


def _layout(uid: np.ndarray, count: int) -> tuple[int, int, int] | None:
    """``(outer, offset, inner)`` reproducing ``uid`` (unit id per position, -1 elsewhere)."""
    length = uid.size
    for outer in [d for d in range(1, length + 1) if length % d == 0]:
        blk = length // outer
        first = uid[:blk]
        pos = np.nonzero(first >= 0)[0]
        if pos.size == 0 or pos.size % count:
            continue
        offset, inner = int(pos[0]), pos.size // count
        expect = np.full(blk, -1)
        expect[offset : offset + count * inner] = np.repeat(np.arange(count), inner)
        if np.array_equal(np.tile(expect, outer), uid):
            return outer, offset, inner
    return None


def analyze(
    closed_jaxpr: Any,
    leaf_paths: Sequence[Path],
    leaf_shapes: Sequence[tuple[int, ...]],
    n_inputs: int,
) -> tuple[list[UnitGroup], list[UnitGroup], dict[Path, tuple[int, ...]]]:
    """Runs the analysis on ``closed_jaxpr``, whose first invars are the parameter leaves."""
    an = Analysis(leaf_paths, leaf_shapes)
    jaxpr = closed_jaxpr.jaxpr
    ins: list[Info] = []
    for i, v in enumerate(jaxpr.invars):
        shape = tuple(v.aval.shape)
        if i < len(leaf_paths):
            ins.append(Param(shape, i, tuple(range(len(shape))), (0,) * len(shape)))
        else:
            ins.append(Data(shape))
    outs = an.run(jaxpr, ins, list(closed_jaxpr.consts))
    an.outputs(outs)
    return an.result()
