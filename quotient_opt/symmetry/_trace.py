"""Symmetry inference by tracing: follow the unit axes of every weight through the jaxpr.

The forward computation ``apply_fn(params, x)`` is traced to a jaxpr and
interpreted abstractly. Every ``dot_general`` or ``conv_general_dilated``
whose one operand is a parameter leaf (the kernel) and whose other operand
depends on the input starts a *unit group*: the kernel's output-feature axis.
The analysis then follows, for every intermediate value, which of its axes
hold which group's units (a *label*: group and unit index per position), and
whether the value scales with the units (degree 1: ``c · z``) or is invariant
(degree 0: a mask ``z > 0``). Parameters met along the way get their roles:
a leaf added to a labelled value is a bias (scales like it), a leaf
multiplied with it is a per-unit gain (permuted only), a kernel contracting
a labelled axis reads the units (scales by ``1/c``).

Rules, each sound on its own (what cannot be shown safe gets fewer
symmetries, never a wrong one):

* positively homogeneous elementwise operations keep the degree: ``max(z,
  0)`` (ReLU), ``min``, ``abs``, ``neg``, multiplication by constants,
  ``select`` on sign tests (leaky ReLU); any other elementwise operation
  (``tanh``, ``exp``, powers, ``+ 1``) keeps the permutation symmetry but
  *taints* the groups of a degree-1 input: they lose the rescaling;
* a max (or min) over the pieces of a reshaped feature axis makes a maxout /
  max-pool group (its pieces share a scale and may be permuted);
* pooling over space (``reduce_window``), reductions over other axes,
  reshapes (flatten), transposes, broadcasts, concatenations, slices and
  padding of other axes keep the labels; a sum or max over the feature axis
  is permutation-invariant and taints the rescaling;
* adding two labelled values (a residual connection) merges their groups:
  one permutation and one scale shared by every writer and reader of the
  stream;
* anything else that touches a labelled value (a contraction with data, as
  in attention; normalizations by non-parameter statistics; unknown
  primitives; control flow) removes that group's symmetries, and a labelled
  value reaching an output removes them too (outputs are fixed).

Finally a leaf axis used in several places must be transformed the same way
by all of them, or its groups lose their symmetry. The result is then
checked numerically by :func:`~quotient_opt.infer_symmetry`.

References:
  Martens, Grosse. *Optimizing Neural Networks with Kronecker-factored
  Approximate Curvature*, 2015 (kfac-jax's graph matcher finds layers in
  jaxprs). https://arxiv.org/abs/1503.05671
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Callable, Sequence
from typing import Any

import numpy as np

from quotient_opt.symmetry._paths import Path, path_str
from quotient_opt.symmetry._spec import AxisRef, UnitGroup

PyTree = Any

# --------------------------------------------------------------------------- abstract values


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


@dataclasses.dataclass(frozen=True)
class Opaque:
    """A value computed from parameters in a way the analysis does not follow."""

    shape: tuple[int, ...]
    leaves: frozenset[int]


Info = Data | Param | Opaque


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


ELEMENTWISE_UNARY_DEG = {"neg", "abs", "copy", "copy_p", "reduce_precision", "real", "conj"}
ELEMENTWISE_OTHER = {
    "exp", "exp2", "log", "log1p", "expm1", "tanh", "logistic", "sin", "cos", "tan", "asin",
    "acos", "atan", "sinh", "cosh", "asinh", "acosh", "atanh", "sqrt", "rsqrt", "cbrt", "erf",
    "erfc", "erf_inv", "lgamma", "digamma", "integer_pow", "pow", "square", "floor", "ceil",
    "round", "is_finite", "nextafter", "atan2", "rem", "not", "and", "or", "xor", "imag",
    "clamp", "population_count", "clz", "shift_left", "shift_right_arithmetic",
    "shift_right_logical", "sign", "bessel_i0e", "bessel_i1e", "igamma", "igammac",
    "random_gamma_grad", "polygamma", "zeta", "regularized_incomplete_beta",
}
COMPARISONS = {"gt", "ge", "lt", "le", "eq", "ne"}
ADDITIVE = {"add", "sub", "add_any", "max", "min"}
CALLS = {
    "pjit", "jit", "closed_call", "core_call", "custom_jvp_call", "custom_vjp_call",
    "custom_vjp_call_jaxpr", "checkpoint", "remat", "remat2", "custom_lin",
}
LAYOUT_PASS = {"copy", "copy_p", "optimization_barrier"}


def _where(eqn: Any) -> str:
    try:
        from jax._src import source_info_util

        src = source_info_util.summarize(eqn.source_info)
    except Exception:  # noqa: BLE001 - best effort
        src = ""
    name = eqn.primitive.name
    if "name" in eqn.params and isinstance(eqn.params["name"], str):
        name = f"{name} '{eqn.params['name']}'"
    return f"{name} at {src}" if src else name


def _sub_jaxpr(eqn: Any) -> tuple[Any, list[Any]] | None:
    """``(jaxpr, consts)`` of a call-like equation, or ``None``."""
    for key in ("jaxpr", "call_jaxpr", "fun_jaxpr"):
        j = eqn.params.get(key)
        if j is None:
            continue
        if hasattr(j, "jaxpr") and hasattr(j, "consts"):
            return j.jaxpr, list(j.consts)
        if hasattr(j, "eqns"):
            return j, []
    return None


def _is_literal(v: Any) -> bool:
    return type(v).__name__ == "Literal"


def _live_eqns(jaxpr: Any) -> list[Any]:
    """Equations whose outputs reach the jaxpr's outputs (effect-free dead code removed)."""
    used = {id(v) for v in jaxpr.outvars if not _is_literal(v)}
    live = []
    for eqn in reversed(jaxpr.eqns):
        if any(id(v) in used for v in eqn.outvars) or eqn.effects:
            live.append(eqn)
            used.update(id(v) for v in eqn.invars if not _is_literal(v))
    return live[::-1]


# --------------------------------------------------------------------------- the analysis


class Analysis:
    """Abstract interpretation of a jaxpr for unit groups (see the module docstring)."""

    def __init__(self, leaf_paths: Sequence[Path], leaf_shapes: Sequence[tuple[int, ...]]):
        self.paths = list(leaf_paths)
        self.shapes = list(leaf_shapes)
        self.groups: list[_Group] = []
        self.parent: list[int] = []
        # (leaf, axis) -> list of uses: None (read without a label) or per-position arrays
        self.uses: dict[tuple[int, int], list[Any]] = {}
        self.opaque: dict[int, str] = {}

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
                _embed(lab.gid, start, size, -1), _embed(lab.uid, start, size, -1),
                _embed(lab.lvl, start, size, 0), _embed(power, start, size, 0), role,
            ))

    # ------------------------------------------------------------ running

    def run(self, jaxpr: Any, env_in: list[Info], consts: list[Any]) -> list[Info]:
        env: dict[int, Info] = {}
        for v, info in zip(jaxpr.invars, env_in):
            env[id(v)] = info
        for v, c in zip(jaxpr.constvars, consts):
            env[id(v)] = _const_info(c)

        def read(v: Any) -> Info:
            if _is_literal(v):
                val = np.asarray(v.val)
                return Data(tuple(val.shape), value=float(val) if val.size == 1 else None, dyn=False)
            return env[id(v)]

        for eqn in _live_eqns(jaxpr):
            ins = [read(v) for v in eqn.invars]
            outs = self.eqn(eqn, ins)
            for v, info in zip(eqn.outvars, outs):
                env[id(v)] = info
        return [read(v) for v in jaxpr.outvars]

    def flush(self, info: Info, where: str) -> Info:
        """A value carrying parameter factors used other than in a product with units:
        the factors are read without units."""
        if isinstance(info, Data) and info.factors:
            for p in info.factors:
                self.use(p, {}, where)
            return dataclasses.replace(info, factors=())
        return info

    def eqn(self, eqn: Any, ins: list[Info]) -> list[Info]:
        name = eqn.primitive.name
        if name != "mul" and name not in CALLS:
            ins = [self.flush(i, _where(eqn)) for i in ins]
        out_shapes = [tuple(getattr(v.aval, "shape", ())) for v in eqn.outvars]
        where = _where(eqn)
        if name in CALLS:
            sub = _sub_jaxpr(eqn)
            if sub is not None:
                call_name = eqn.params.get("name")
                if isinstance(call_name, str):
                    for info in ins:
                        if isinstance(info, Data):
                            for lab in info.labs:
                                for g in self.gids(lab):
                                    self.groups[g].acts.add(call_name)
                return self.run(sub[0], ins, sub[1])
        handler = getattr(self, "op_" + name, None)
        if handler is not None:
            return handler(eqn, ins, out_shapes, where)
        if name in ELEMENTWISE_OTHER or name in COMPARISONS or name in ADDITIVE or (
            name in ELEMENTWISE_UNARY_DEG
        ) or name == "mul" or name == "div" or name == "select_n":
            return [self.elementwise(name, eqn, ins, out_shapes[0], where)]
        return self.unknown(ins, out_shapes, f"unsupported operation {where}")

    def unknown(self, ins: list[Info], out_shapes: list[tuple[int, ...]], reason: str) -> list[Info]:
        """An operation the analysis does not follow: its unit inputs lose their symmetries."""
        for info in ins:
            self.poison(info, reason)
        if any(isinstance(i, Data) and i.dyn for i in ins):
            taint = frozenset().union(*(i.taint for i in ins if isinstance(i, Data)))
            return [Data(s, taint=taint) for s in out_shapes]
        leaves = _leaves(ins)
        if leaves:
            return [Opaque(s, leaves) for s in out_shapes]
        return [Data(s, dyn=False) for s in out_shapes]

    # ------------------------------------------------------------ elementwise

    def elementwise(self, name: str, eqn: Any, ins: list[Info], shape: tuple[int, ...],
                    where: str) -> Info:
        data = [i for i in ins if isinstance(i, Data)]
        params = [i for i in ins if isinstance(i, Param)]
        opaque = [i for i in ins if isinstance(i, Opaque)]
        taint = frozenset().union(*(d.taint for d in data)) if data else frozenset()
        dyn = any(d.dyn for d in data)
        if not any(d.labs for d in data):
            return self.plain_elementwise(name, ins, shape, where, taint, dyn)
        if name == "select_n":
            pred, cases = ins[0], ins[1:]
        else:
            pred, cases = None, ins
        labelled = [c for c in cases if isinstance(c, Data) and c.labs]
        if not labelled:  # only the predicate has units: the selection depends on them
            return self.plain_elementwise(name, ins, shape, where, taint, dyn) if not isinstance(
                pred, Data) else self._select_on_units(pred, cases, shape, where, taint)
        base = self.merge_labels(labelled, where)
        if isinstance(pred, Data) and pred.labs:
            base = self.merge_labels([Data(shape, base)] + [pred], where, check_deg=False)
            if any(int(v) != 0 for lb in pred.labs for v in np.unique(lb.deg)):
                self.taint({g for lb in pred.labs for g in self.gids(lb)},
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
                    for g in {g for lb in base for g in self.gids(lb)}:
                        self.kill(g, f"{where}: masked by values that vary along the units",
                                  scale=False)
                    continue
                self.poison(Data(shape, base), f"{where}: combined with unlabelled values that "
                                                "vary along the units")
                return Data(shape, taint=taint)
        if opaque or any(isinstance(p, Param) for p in ([pred] if pred is not None else [])):
            for o in opaque + [p for p in [pred] if isinstance(p, Param)]:
                self.poison(o, f"parameter used in {where}")
            self.poison(Data(shape, base), f"{where}: combined with a derived parameter")
            return Data(shape, taint=taint)
        groups = {g for lb in base for g in self.gids(lb)}
        deg1 = {g for lb in base for g in self.gids_with_deg(lb, 1)}
        degs = {int(v) for lb in base for v in np.unique(lb.deg)}
        zero = lambda lb: np.zeros_like(lb.deg)  # noqa: E731
        if name in ADDITIVE or name == "select_n":
            plain = [c for c in cases if isinstance(c, Data) and not c.labs and not c.zero]
            if plain and deg1:
                self.taint(deg1, f"{where}: adds or compares a constant or a per-sample value")
            if len(degs) > 1:
                self.taint(groups, f"{where}: combines scaled and invariant values")
            for p in params:
                self.param_on_labels(p, base, lambda lb: lb.deg, "bias", where, additive=True)
            if name in ("max", "min"):
                kind = "relu" if any(isinstance(c, Data) and c.zero for c in cases) else name
                for g in groups:
                    self.groups[g].acts.add(kind)
            return Data(shape, base, taint)
        if name == "mul":
            if len(labelled) > 1 and all(
                any(int(v) for lb in c.labs for v in np.unique(lb.deg)) for c in labelled
            ):
                self.taint(groups, f"{where}: multiplies two scaled values")
            for p in params + [f for d in data if not d.labs for f in d.factors]:
                self.param_on_labels(p, base, zero, "scale", where, additive=False)
            return Data(shape, base, taint)
        if name == "div":
            num, den = ins
            if isinstance(den, Data) and den.labs and any(
                int(v) for lb in den.labs for v in np.unique(lb.deg)
            ):
                self.taint(groups, f"{where}: divides by a scaled value")
            if isinstance(den, Param):
                self.param_on_labels(den, base, zero, "scale", where, additive=False)
            if isinstance(num, Param):
                self.poison(num, f"parameter used in {where}")
                self.poison(Data(shape, base), f"{where}: divides a parameter by unit values")
            return Data(shape, base, taint)
        for p in params:
            self.poison(p, f"parameter used in {where}")
        if name in ELEMENTWISE_UNARY_DEG or (name == "integer_pow" and eqn.params.get("y") == 1):
            return Data(shape, base, taint)
        if name == "convert_element_type":
            new = eqn.params.get("new_dtype")
            if new is not None and not np.issubdtype(np.dtype(new), np.floating):
                self.taint(deg1, f"{where}: converts to a non-float type")
            return Data(shape, base, taint)
        invariant = tuple(lb.replace(deg=np.zeros_like(lb.deg)) for lb in base)
        if name in COMPARISONS:
            others = [c for c in cases if not (isinstance(c, Data) and c.labs)]
            if any(not (isinstance(o, Data) and o.zero) for o in others) or len(degs) > 1:
                self.taint(deg1, f"{where}: compares with a nonzero threshold")
            return Data(shape, invariant, taint)
        if name == "sign":
            return Data(shape, invariant, taint)
        # any other elementwise function: permutation-equivariant, not homogeneous
        if deg1:
            self.taint(deg1, f"{where} is not positively homogeneous")
            for g in deg1:
                self.groups[g].acts.add(name)
        return Data(shape, base, taint | frozenset(deg1))

    def _select_on_units(self, pred: Data, cases: list[Info], shape, where, taint) -> Info:
        for c in cases:
            if not isinstance(c, Data) or not all(c.const_along(a) for lb in pred.labs
                                                  for a in lb.axes):
                self.poison(pred, f"{where}: selects between values by unit")
                return Data(shape, taint=taint)
        return Data(shape, tuple(lb.replace(deg=np.zeros_like(lb.deg)) for lb in pred.labs), taint)

    def plain_elementwise(self, name: str, ins: list[Info], shape: tuple[int, ...], where: str,
                          taint: frozenset[int], dyn: bool) -> Info:
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
                self.use(p, {}, where)
            if opaque or name not in ("add", "sub", "mul", "div", "max", "min", "select_n"):
                for info in params + opaque:
                    self.poison(info, f"parameter used in {where}")
            return Data(shape, taint=taint)
        if params or opaque:
            if (len(params) == 1 and not opaque and name in ("mul", "neg", "convert_element_type")
                    and all(d.value is not None for d in data)):
                return dataclasses.replace(params[0], shape=shape)
            return Opaque(shape, _leaves(ins))
        value = None
        if name in ("neg", "convert_element_type", "copy") and data and data[0].value is not None:
            value = -data[0].value if name == "neg" else data[0].value
        const_axes = frozenset(a for a in range(len(shape)) if all(d.const_along(a) for d in data))
        return Data(shape, const_axes=const_axes, value=value, dyn=False)

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

    def param_on_labels(self, p: Param, labs: tuple[Lab, ...], power: Callable[[Lab], np.ndarray],
                        role: str, where: str, *, additive: bool) -> None:
        """A parameter combined elementwise with labelled data: one entry per unit, or shared."""
        entries: dict[int, tuple[Lab, np.ndarray, str]] = {}
        for lb in labs:
            for a in lb.axes:
                if p.axes[a] is not None and p.shape[a] == lb.gid.shape[lb.axes.index(a)]:
                    if len(lb.axes) == 1:
                        entries[a] = (lb, power(lb), role)
                    else:
                        self.poison(Data(p.shape, (lb,)), f"{where}: a parameter meets a split "
                                                          "feature axis")
                elif additive:
                    self.taint(self.gids_with_deg(lb, 1),
                               f"{where}: adds a value shared by all units")
        self.use(p, entries, where)

    # ------------------------------------------------------------ layout

    def op_convert_element_type(self, eqn, ins, out_shapes, where):
        return [self.elementwise("convert_element_type", eqn, ins, out_shapes[0], where)]

    def op_transpose(self, eqn, ins, out_shapes, where):
        perm = tuple(eqn.params["permutation"])
        (x,) = ins
        inv = {old: new for new, old in enumerate(perm)}
        if isinstance(x, Param):
            return [Param(out_shapes[0], x.leaf, tuple(x.axes[o] for o in perm),
                          tuple(x.starts[o] for o in perm))]
        if isinstance(x, Opaque):
            return [Opaque(out_shapes[0], x.leaves)]
        labs = tuple(self._remap(lb, inv) for lb in x.labs)
        return [Data(out_shapes[0], labs, x.taint, frozenset(inv[a] for a in x.const_axes),
                     x.value)]

    def _remap(self, lab: Lab, mapping: dict[int, int]) -> Lab:
        """Renames a label's axes; keeps its arrays in increasing new-axis order."""
        new_axes = [mapping[a] for a in lab.axes]
        order = np.argsort(new_axes)
        return lab.replace(
            axes=tuple(sorted(new_axes)),
            gid=np.transpose(lab.gid, order), uid=np.transpose(lab.uid, order),
            lvl=np.transpose(lab.lvl, order), deg=np.transpose(lab.deg, order),
        )

    def op_broadcast_in_dim(self, eqn, ins, out_shapes, where):
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
                self.poison(Data(x.shape, (lb,)), f"{where}: a single unit broadcast to many")
                continue
            labs.append(self._remap(lb, {a: dims[a] for a in lb.axes}))
        return [Data(shape, tuple(labs), x.taint, frozenset(const), x.value)]

    def op_squeeze(self, eqn, ins, out_shapes, where):
        x = ins[0]
        dims = set(eqn.params["dimensions"])
        keep = [a for a in range(len(x.shape)) if a not in dims]
        mapping = {a: i for i, a in enumerate(keep)}
        if isinstance(x, Param):
            return [Param(out_shapes[0], x.leaf, tuple(x.axes[a] for a in keep),
                          tuple(x.starts[a] for a in keep))]
        if isinstance(x, Opaque):
            return [Opaque(out_shapes[0], x.leaves)]
        labs = []
        for lb in x.labs:
            if set(lb.axes) & dims:
                self.poison(Data(x.shape, (lb,)), f"{where}: squeezes a unit axis")
                continue
            labs.append(self._remap(lb, mapping))
        return [Data(out_shapes[0], tuple(labs), x.taint,
                     frozenset(mapping[a] for a in x.const_axes if a in mapping), x.value)]

    def op_expand_dims(self, eqn, ins, out_shapes, where):  # pragma: no cover - lowered to reshape
        return self.op_reshape(eqn, ins, out_shapes, where)

    def op_reshape(self, eqn, ins, out_shapes, where):
        x = ins[0]
        shape = out_shapes[0]
        if eqn.params.get("dimensions") not in (None, ()):
            return self.unknown(ins, out_shapes, f"{where}: reshape with dimensions")
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
            new = _reshape_label(lb, x.shape, shape)
            if new is None:
                self.poison(Data(x.shape, (lb,)), f"{where}: reshape mixes unit axes")
            else:
                labs.append(new)
        const = frozenset(i for i, s in enumerate(shape) if s == 1)
        return [Data(shape, tuple(labs), x.taint, const)]

    def op_concatenate(self, eqn, ins, out_shapes, where):
        dim = eqn.params["dimension"]
        shape = out_shapes[0]
        if any(isinstance(i, (Param, Opaque)) for i in ins):
            return self.unknown(ins, out_shapes, f"{where}: concatenates parameters")
        # along other axes, labels must agree (merge); along dim, labels concatenate
        others = [
            Data(i.shape, tuple(lb for lb in i.labs if dim not in lb.axes)) for i in ins
            if any(dim not in lb.axes for lb in i.labs)
        ]
        merged = list(self.merge_labels(others, where)) if others else []
        pieces = []
        for i in ins:
            lb = i.lab_on(dim)
            if lb is not None and len(lb.axes) != 1:
                self.poison(i, f"{where}: concatenates a split feature axis")
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

    def op_slice(self, eqn, ins, out_shapes, where):
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
        return [self._cut(x, sl, out_shapes[0], where)]

    def _cut(self, x: Data, sl: tuple[slice, ...], shape: tuple[int, ...], where: str) -> Data:
        """Keeps the positions ``sl`` of ``x``; a group cut in part loses its symmetries."""
        labs = []
        for lb in x.labs:
            sub = tuple(sl[a] for a in lb.axes)
            cut = lb.replace(gid=lb.gid[sub], uid=lb.uid[sub], lvl=lb.lvl[sub], deg=lb.deg[sub])
            kept = set(zip(cut.gid.ravel().tolist(), cut.uid.ravel().tolist()))
            full = set(zip(lb.gid.ravel().tolist(), lb.uid.ravel().tolist()))
            for g, u in full - kept:
                if g >= 0 and any(gg == g for gg, _ in kept):
                    self.kill(int(g), f"{where}: keeps only some units of the group")
            if np.any(cut.gid >= 0):
                labs.append(cut)
        return Data(shape, tuple(labs), x.taint, x.const_axes)

    def op_dynamic_slice(self, eqn, ins, out_shapes, where):
        x = ins[0]
        shape = out_shapes[0]
        if isinstance(x, Data) and all(x.shape[a] == shape[a] for lb in x.labs for a in lb.axes):
            for i in ins[1:]:
                self.poison(i, f"parameter used in {where}")
            taint = x.taint.union(*(i.taint for i in ins[1:] if isinstance(i, Data)))
            return [Data(shape, x.labs, taint)]
        return self.unknown(ins, out_shapes, f"unsupported operation {where}")

    def op_pad(self, eqn, ins, out_shapes, where):
        x, pad = ins
        config = eqn.params["padding_config"]
        if not isinstance(x, Data) or not isinstance(pad, Data) or pad.labs:
            return self.unknown(ins, out_shapes, f"unsupported operation {where}")
        labelled_axes = {a for lb in x.labs for a in lb.axes}
        if any(config[a] != (0, 0, 0) for a in labelled_axes):
            return self.unknown(ins, out_shapes, f"{where}: pads a unit axis")
        if not pad.zero:
            self.taint({g for lb in x.labs for g in self.gids_with_deg(lb, 1)},
                       f"{where}: pads with a nonzero value")
        return [Data(out_shapes[0], x.labs, x.taint | pad.taint)]

    def op_rev(self, eqn, ins, out_shapes, where):
        x = ins[0]
        if not isinstance(x, Data):
            return self.unknown(ins, out_shapes, f"unsupported operation {where}")
        dims = set(eqn.params["dimensions"])
        labs = []
        for lb in x.labs:
            flip = tuple(k for k, a in enumerate(lb.axes) if a in dims)
            labs.append(lb.replace(gid=np.flip(lb.gid, flip), uid=np.flip(lb.uid, flip),
                                   lvl=np.flip(lb.lvl, flip), deg=np.flip(lb.deg, flip))
                        if flip else lb)
        return [Data(out_shapes[0], tuple(labs), x.taint, x.const_axes)]

    # ------------------------------------------------------------ reductions

    def _reduce(self, eqn, ins, out_shapes, where, kind: str):
        x = ins[0]
        axes = tuple(eqn.params["axes"])
        shape = out_shapes[0]
        if not isinstance(x, Data):
            return self.unknown(ins, out_shapes, f"unsupported operation {where}")
        keep = [a for a in range(len(x.shape)) if a not in axes]
        mapping = {a: i for i, a in enumerate(keep)}
        labs = []
        taint = set(x.taint)
        for lb in x.labs:
            hit = [a for a in lb.axes if a in axes]
            if not hit:
                labs.append(self._remap(lb, mapping))
                continue
            if kind in ("max", "min") and len(lb.axes) == 2 and len(hit) == 1:
                new = self._pieces(lb, hit[0], where)
                if new is not None:
                    labs.append(self._remap(new, mapping))
                    continue
            if len(hit) != len(lb.axes):
                self.poison(Data(x.shape, (lb,)), f"{where}: reduces part of a split feature axis")
                continue
            if kind in ("max", "min") and self._one_window(lb, where):
                taint |= self.gids_with_deg(lb, 1)
                continue
            if kind in ("sum", "max", "min"):
                deg1 = self.gids_with_deg(lb, 1)
                self.taint(deg1, f"{where}: sums or maxes over the units")
                taint |= deg1
            else:
                self.poison(Data(x.shape, (lb,)), f"{where}: reduces over the units")
        if kind == "prod":
            deg1 = {g for lb in x.labs for g in self.gids_with_deg(lb, 1)}
            self.taint(deg1, f"{where}: product is not homogeneous")
        const = frozenset(mapping[a] for a in x.const_axes if a in mapping)
        return [Data(shape, tuple(labs), frozenset(taint), const)]

    def _pieces(self, lab: Lab, piece_axis: int, where: str) -> Lab | None:
        """A max over the pieces of windows: ``(W, k)`` units ``w * k + j`` -> window ``w``."""
        k_pos = lab.axes.index(piece_axis)
        gid = np.moveaxis(lab.gid, k_pos, -1)
        uid = np.moveaxis(lab.uid, k_pos, -1)
        lvl = np.moveaxis(lab.lvl, k_pos, -1)
        deg = np.moveaxis(lab.deg, k_pos, -1)
        windows, k = uid.shape
        groups = self.gids(lab)
        if len(groups) != 1 or np.any(gid < 0) or np.any(lvl != 0) or k_pos != 1:
            return None
        (g,) = groups
        grp = self.groups[g]
        if not np.array_equal(uid, np.arange(windows * k).reshape(windows, k)) or grp.n != windows * k:
            return None
        if grp.pieces not in (1, k):
            self.kill(g, f"{where}: two different max-pool windows")
            return None
        grp.pieces = k
        grp.acts.add("max")
        if np.any(deg != deg[:, :1]):
            self.taint({g}, f"{where}: pieces of one window scale differently")
        other = [a for a in lab.axes if a != piece_axis]
        return Lab(tuple(other), gid[:, 0], np.arange(windows), np.ones(windows, int), deg[:, 0])

    def _one_window(self, lab: Lab, where: str) -> bool:
        """A max over all units of one group: a single window of ``n`` pieces.

        Its scale has no axis left to follow, so the rescaling goes; the pieces
        may still be permuted.
        """
        groups = self.gids(lab)
        if len(groups) != 1 or len(lab.axes) != 1 or np.any(lab.gid < 0) or np.any(lab.lvl):
            return False
        (g,) = groups
        grp = self.groups[g]
        n = lab.uid.size
        if grp.n != n or not np.array_equal(np.sort(lab.uid), np.arange(n)) or (
            grp.pieces not in (1, n)
        ):
            return False
        grp.pieces = n
        grp.acts.add("max")
        self.taint({g}, f"{where}: a max over all units leaves no axis to carry their scale")
        return True

    def op_reduce_sum(self, eqn, ins, out_shapes, where):
        return self._reduce(eqn, ins, out_shapes, where, "sum")

    def op_reduce_max(self, eqn, ins, out_shapes, where):
        return self._reduce(eqn, ins, out_shapes, where, "max")

    def op_reduce_min(self, eqn, ins, out_shapes, where):
        return self._reduce(eqn, ins, out_shapes, where, "min")

    def op_reduce_prod(self, eqn, ins, out_shapes, where):
        return self._reduce(eqn, ins, out_shapes, where, "prod")

    def op_argmax(self, eqn, ins, out_shapes, where):
        return self._reduce(eqn, ins, out_shapes, where, "arg")

    def op_argmin(self, eqn, ins, out_shapes, where):
        return self._reduce(eqn, ins, out_shapes, where, "arg")

    def _window(self, eqn, ins, out_shapes, where):
        x = ins[0]
        if not isinstance(x, Data):
            return self.unknown(ins, out_shapes, f"unsupported operation {where}")
        dims = eqn.params["window_dimensions"]
        strides = eqn.params["window_strides"]
        padding = eqn.params["padding"]
        dil = eqn.params.get("base_dilation", (1,) * len(dims))
        wdil = eqn.params.get("window_dilation", (1,) * len(dims))
        for lb in x.labs:
            for a in lb.axes:
                if (dims[a], strides[a], tuple(padding[a]), dil[a], wdil[a]) != (1, 1, (0, 0), 1, 1):
                    return self.unknown(ins, out_shapes, f"{where}: pools over a unit axis")
        return [Data(out_shapes[0], x.labs, x.taint)]

    op_reduce_window_max = _window
    op_reduce_window_min = _window
    op_reduce_window_sum = _window

    def op_cumsum(self, eqn, ins, out_shapes, where):
        x = ins[0]
        if isinstance(x, Data) and all(eqn.params["axis"] not in lb.axes for lb in x.labs):
            return [Data(out_shapes[0], x.labs, x.taint)]
        return self.unknown(ins, out_shapes, f"unsupported operation {where}")

    # ------------------------------------------------------------ contractions

    def op_dot_general(self, eqn, ins, out_shapes, where):
        (lc, rc), (lb_, rb) = eqn.params["dimension_numbers"]
        lhs, rhs = ins
        shape = out_shapes[0]
        if isinstance(lhs, Data) and isinstance(rhs, Param):
            return [self._contract(lhs, rhs, tuple(lc), tuple(rc), tuple(lb_), tuple(rb), shape,
                                   where, data_first=True)]
        if isinstance(rhs, Data) and isinstance(lhs, Param):
            return [self._contract(rhs, lhs, tuple(rc), tuple(lc), tuple(rb), tuple(lb_), shape,
                                   where, data_first=False)]
        if isinstance(lhs, Param) and isinstance(rhs, Param):
            return [Opaque(shape, frozenset({lhs.leaf, rhs.leaf}))]
        if not any(isinstance(i, Data) and i.dyn for i in ins):
            return [Opaque(shape, _leaves(ins))] if _leaves(ins) else [Data(shape, dyn=False)]
        return self.unknown(ins, out_shapes, f"{where}: contracts units with data")

    def _producing(self, k: Param, axis: int) -> Lab | None:
        """A new unit group on value axis ``axis`` of kernel ``k`` (its output features)."""
        if k.axes[axis] is None:
            return None
        n = k.shape[axis]
        path = self.paths[k.leaf]
        gid = self.new_group(n, path_str(path[:-1]) if len(path) > 1 else path_str(path))
        return Lab((0,), np.full(n, gid), np.arange(n), np.zeros(n, int), np.ones(n, int))

    def _reading(self, x: Data, x_axis: int, k: Param, k_axis: int, where: str,
                 entries: dict[int, tuple[Lab, np.ndarray, str]]) -> None:
        """Kernel axis ``k_axis`` contracts data axis ``x_axis``: it reads the units there."""
        lab = x.lab_on(x_axis)
        if lab is None:
            return
        if len(lab.axes) != 1:
            self.poison(Data(x.shape, (lab,)), f"{where}: contracts a split feature axis")
        elif k.axes[k_axis] is None or k.shape[k_axis] != x.shape[x_axis]:
            self.taint(self.gids_with_deg(lab, 1), f"{where}: sums the units with one weight")
        else:
            entries[k_axis] = (lab, -lab.deg, "kernel")

    def _contract(self, x: Data, k: Param, xc, kc, xb, kb, shape, where, *, data_first: bool
                  ) -> Data:
        """``x`` (data) contracted with kernel ``k`` (a parameter view) by ``dot_general``."""
        entries: dict[int, tuple[Lab, np.ndarray, str]] = {}
        for xa, ka in zip(xc, kc):
            self._reading(x, xa, k, ka, where, entries)
        for xa in xb:
            lab = x.lab_on(xa)
            if lab is not None:
                self.poison(Data(x.shape, (lab,)), f"{where}: a unit axis is a batch axis")
        kfree = [a for a in range(len(k.shape)) if a not in kc and a not in kb]
        xfree = [a for a in range(len(x.shape)) if a not in xc and a not in xb]
        new = self._producing(k, kfree[0]) if len(kfree) == 1 else None
        if new is not None:
            entries[kfree[0]] = (new, np.ones(new.uid.size, int), "kernel")
        self.use(k, entries, where)
        # output axes: batch dims, then lhs free, then rhs free
        nb = len(xb)
        if data_first:
            x_pos = {a: nb + i for i, a in enumerate(xfree)}
            k_pos = {a: nb + len(xfree) + i for i, a in enumerate(kfree)}
        else:
            k_pos = {a: nb + i for i, a in enumerate(kfree)}
            x_pos = {a: nb + len(kfree) + i for i, a in enumerate(xfree)}
        labs = [self._remap(lb, x_pos) for lb in x.labs if all(a in x_pos for a in lb.axes)]
        if new is not None:
            labs.append(new.replace(axes=(k_pos[kfree[0]],)))
        return Data(shape, tuple(labs), x.taint)

    def op_conv_general_dilated(self, eqn, ins, out_shapes, where):
        lhs, rhs = ins
        shape = out_shapes[0]
        p = eqn.params
        if not (isinstance(lhs, Data) and isinstance(rhs, Param)):
            if not any(isinstance(i, Data) and i.dyn for i in ins):
                return [Opaque(shape, _leaves(ins))] if _leaves(ins) else [Data(shape, dyn=False)]
            return self.unknown(ins, out_shapes, f"{where}: convolution without a parameter kernel")
        if p.get("feature_group_count", 1) != 1 or p.get("batch_group_count", 1) != 1:
            return self.unknown(ins, out_shapes, f"{where}: grouped convolution")
        dn = p["dimension_numbers"]
        lhs_spec, rhs_spec, out_spec = dn.lhs_spec, dn.rhs_spec, dn.out_spec
        entries: dict[int, tuple[Lab, np.ndarray, str]] = {}
        for lab in lhs.labs:
            if lab.axes != (lhs_spec[1],):
                self.poison(Data(lhs.shape, (lab,)), f"{where}: units on a spatial axis")
        self._reading(lhs, lhs_spec[1], rhs, rhs_spec[1], where, entries)
        new = self._producing(rhs, rhs_spec[0])
        labs = []
        if new is not None:
            entries[rhs_spec[0]] = (new, np.ones(new.uid.size, int), "kernel")
            labs.append(new.replace(axes=(out_spec[1],)))
        self.use(rhs, entries, where)
        return [Data(shape, tuple(labs), lhs.taint)]

    # ------------------------------------------------------------ control flow

    def _control(self, eqn, ins, out_shapes, where):
        return self.unknown(ins, out_shapes, f"{where}: control flow is not followed")

    op_while = _control
    op_scan = _control
    op_cond = _control

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


# --------------------------------------------------------------------------- helpers


def _leaves(ins: Sequence[Info]) -> frozenset[int]:
    out: set[int] = set()
    for i in ins:
        if isinstance(i, Param):
            out.add(i.leaf)
        elif isinstance(i, Opaque):
            out |= i.leaves
    return frozenset(out)


def _const_info(c: Any) -> Data:
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


def _embed(a: np.ndarray, start: int, size: int, fill: Any) -> np.ndarray:
    out = np.full(size, fill, dtype=np.asarray(a).dtype if np.asarray(a).dtype != bool else int)
    a = np.asarray(a).ravel()
    out[start : start + a.size] = a
    return out


def _reshape_label(lab: Lab, old: tuple[int, ...], new: tuple[int, ...]) -> Lab | None:
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
