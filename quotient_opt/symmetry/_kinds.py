"""Group families: the protocol every kind of symmetry factor implements, and its registry.

A :class:`~quotient_opt.Symmetry` holds its unit groups (permutations of units
times compensated positive scales, :class:`~quotient_opt.UnitGroup`) and, in
``Symmetry.factors``, records of other *kinds*: normalization scale
invariance (:class:`~quotient_opt.symmetry.NormScale`), sign flips of odd
activations (:class:`~quotient_opt.symmetry.SignFlip`), or a kind a user
registers. A record is plain data (frozen, hashable); what its group *does*
is the kind's: a :class:`Kind` registered under the record's ``kind`` name.

A kind implements, for one record acting on the leaves it names
(``leaves``: a dict from path to array):

* the group: :meth:`Kind.identity`, :meth:`Kind.sample`, :meth:`Kind.compose`,
  :meth:`Kind.inverse` (elements are arrays, so they are pytrees and can be
  jitted and vmapped);
* the action :meth:`Kind.act` (``power`` says how the tree transforms:
  ``1`` parameters, ``-1`` gradients and first moments, ``-2`` second moments);
* the Lie algebra on the parameters, for continuous kinds (:attr:`Kind.dim`
  coordinates): :meth:`Kind.tangent` :math:`J a` and :meth:`Kind.cotangent`
  :math:`J^\\top v` (adjoint of each other);
* a *section* :meth:`Kind.section`: the canonical representative of an orbit
  (idempotent, and the same for every point of an orbit);
* :meth:`Kind.candidates`: the records inference should test on a traced unit
  group (each is verified numerically before it is kept).

The module-level functions (:func:`act`, :func:`tangent`, ...) run the
protocol over every record of a symmetry, so a transformation is written once
for every kind.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence
from typing import TYPE_CHECKING, Any

import jax
import jax.numpy as jnp
import numpy as np

from quotient_opt.symmetry._paths import Path, leaves_by_path, map_with_path

if TYPE_CHECKING:  # pragma: no cover
    from quotient_opt.symmetry._spec import Symmetry, UnitGroup

PyTree = Any
Leaves = dict[Path, jax.Array]

__all__ = ["Kind", "KINDS", "kind_of", "register_kind"]


class Kind:
    """The protocol of a group family (subclass it and :func:`register_kind` it).

    Every method receives the record (``rec``) it acts for; records carry
    ``refs`` (the :class:`~quotient_opt.AxisRef` they act on) and ``kind``
    (the registry name).
    """

    #: whether the group is a Lie group with an algebra on the params (``dim > 0``)
    continuous: bool = True
    #: whether :meth:`act` is linear in the leaves (scalings, sign flips, permutations,
    #: GL), so that a displacement moves by ``act(u, h, power=1)``; an affine kind
    #: (a translation) sets ``False`` and the wrappers pull steps back as differences
    linear: bool = True

    def dim(self, rec: Any) -> int:
        """Number of Lie-algebra coordinates (0 for a discrete kind)."""
        raise NotImplementedError

    def identity(self, rec: Any, dtype: Any) -> jax.Array:
        raise NotImplementedError

    def sample(self, rec: Any, rng: np.random.Generator, bound: float, dtype: Any) -> jax.Array:
        """A random element (drawn with numpy: no compilation)."""
        raise NotImplementedError

    def compose(self, rec: Any, first: jax.Array, second: jax.Array) -> jax.Array:
        """``h`` with ``act(act(θ, first), second) == act(θ, h)``."""
        raise NotImplementedError

    def inverse(self, rec: Any, h: jax.Array) -> jax.Array:
        raise NotImplementedError

    def act(self, rec: Any, leaves: Leaves, h: jax.Array, power: int) -> Leaves:
        """The record's leaves after ``h`` (only those it changes)."""
        raise NotImplementedError

    def moves(self, rec: Any, power: int) -> bool:
        """Whether :meth:`act` with this ``power`` is the exact law of a statistic of that
        power (an optimizer-state field: ``-1`` first moments, ``-2`` second moments,
        ``0`` scale-free statistics), so that a wrapper may carry such a field along the
        kind's moves. ``False`` makes the wrappers refuse the field, naming it."""
        return True

    def exp(self, rec: Any, a: jax.Array) -> jax.Array:
        """The element :math:`\\exp(a)` of the algebra element ``a`` (continuous kinds).

        The default is for kinds whose elements are their algebra coordinates
        (log-scales: ``compose`` adds them)."""
        return a

    def tangent(self, rec: Any, leaves: Leaves, a: jax.Array) -> Leaves:
        """:math:`J a`: the parameter change of the algebra element ``a`` (its leaves)."""
        return {}

    def cotangent(self, rec: Any, leaves: Leaves, v: Leaves) -> jax.Array:
        """:math:`J^\\top v`: ``(dim,)``."""
        return jnp.zeros((0,))

    def gram_diagonal(self, rec: Any, leaves: Leaves) -> jax.Array:
        """The diagonal of :math:`J^\\top J` (a preconditioner), ``(dim,)``."""
        return jnp.zeros((0,))

    def section(self, rec: Any, leaves: Leaves) -> jax.Array:
        """The element taking ``leaves`` to the canonical point of their orbit."""
        raise NotImplementedError

    def candidates(self, grp: UnitGroup, shapes: dict[Path, tuple[int, ...]]) -> list[Any]:
        """Records to test on a traced unit group, finest first (inference keeps each
        that holds and shares no entry with one kept before)."""
        return []

    def refinements(self, rec: Any) -> list[Any]:
        """Finer records to try once ``rec`` holds (the first that holds replaces it)."""
        return []

    def regroup(self, grp: UnitGroup, recs: list[Any]) -> UnitGroup | None:
        """A replacement for the unit group ``grp`` now that ``recs`` hold on it (e.g. a
        rescaling moved to where the factor leaves it), or ``None``; inference keeps it
        only if its rescaling passes the numerical check."""
        return None

    def check_tolerance(self, tol: float) -> float:
        """The tolerance of the numerical check, given the exact symmetries' ``tol``."""
        return tol

    def describe(self, rec: Any) -> str:
        raise NotImplementedError


#: the registered kinds, by name
KINDS: dict[str, Kind] = {}


def register_kind(name: str, kind: Kind) -> Kind:
    """Registers a group family under ``name`` (the ``kind`` field of its records).

    Args:
      name: the kind's name.
      kind: an instance of a :class:`Kind` subclass.

    Returns:
      ``kind``.
    """
    if not isinstance(kind, Kind):
        raise TypeError(f"kind: expected a quotient_opt.symmetry.Kind, got {type(kind).__name__}")
    KINDS[name] = kind
    return kind


def kind_of(rec: Any) -> Kind:
    """The registered kind of a factor record."""
    try:
        return KINDS[rec.kind]
    except KeyError:
        raise ValueError(f"factor '{getattr(rec, 'name', rec)}': no kind '{rec.kind}' is "
                         f"registered (known: {', '.join(sorted(KINDS))})") from None


#: the name of the unit groups' own family (permutations × compensated scales) in ``only``
UNITS = "units"


def only(sym: Symmetry, kinds: Sequence[str] | None) -> Symmetry:
    """The symmetry restricted to some group families.

    E.g. ``qo.rebalance(adam, qo.symmetry.only(sym, ["units"]))`` balances the unit
    groups and leaves the normalization's scale-invariant weights where they are.

    Args:
      sym: a :class:`~quotient_opt.Symmetry`.
      kinds: the families to keep: factor kind names (``"norm_scale"``,
        ``"sign_flip"``, a registered kind's name) and ``"units"`` for the unit
        groups; ``None`` keeps all.

    Returns:
      ``sym`` with the other families' groups and factors removed.

    Raises:
      ValueError: an unknown family name.
    """
    if kinds is None:
        return sym
    unknown = set(kinds) - set(KINDS) - {UNITS}
    if unknown:
        raise ValueError(f"kinds: unknown {sorted(unknown)} (known: "
                         f"{', '.join(sorted(set(KINDS) | {UNITS}))})")
    return dataclasses.replace(sym, groups=sym.groups if UNITS in kinds else (),
                               factors=tuple(f for f in sym.factors if f.kind in kinds))


# --------------------------------------------------------------------------- over a symmetry


def _leaves(rec: Any, tree: Leaves) -> Leaves:
    return {r.path: tree[r.path] for r in rec.refs}


def _write(tree: PyTree, changed: Leaves) -> PyTree:
    return map_with_path(lambda p, x: changed.get(p, x), tree)


def identity(sym: Symmetry, dtype: Any = jnp.float32) -> tuple[jax.Array, ...]:
    """The identity element of every factor."""
    return tuple(kind_of(f).identity(f, dtype) for f in sym.factors)


def sample(sym: Symmetry, rng: np.random.Generator, bound: float = 1.0,
           dtype: Any = jnp.float32) -> tuple[jax.Array, ...]:
    """A random element of every factor."""
    return tuple(kind_of(f).sample(f, rng, bound, dtype) for f in sym.factors)


def compose(sym: Symmetry, first: Sequence[jax.Array], second: Sequence[jax.Array]
            ) -> tuple[jax.Array, ...]:
    return tuple(kind_of(f).compose(f, a, b) for f, a, b in zip(sym.factors, first, second))


def inverse(sym: Symmetry, h: Sequence[jax.Array]) -> tuple[jax.Array, ...]:
    return tuple(kind_of(f).inverse(f, a) for f, a in zip(sym.factors, h))


def act(sym: Symmetry, params: PyTree, h: Sequence[jax.Array], *, power: int = 1,
        factors: Sequence[Any] | None = None) -> PyTree:
    """``params`` after every factor's element (factors act on disjoint entries or commute)."""
    factors = sym.factors if factors is None else tuple(factors)
    leaves = leaves_by_path(params)
    changed: Leaves = {}
    for f, e in zip(factors, h):
        cur = {p: changed.get(p, leaves[p]) for p in (r.path for r in f.refs)}
        changed.update(kind_of(f).act(f, cur, e, power))
    return _write(params, changed)


def continuous(sym: Symmetry) -> tuple[Any, ...]:
    """The factors with a Lie algebra on the parameters."""
    return tuple(f for f in sym.factors if kind_of(f).continuous and kind_of(f).dim(f) > 0)


def discrete(sym: Symmetry) -> tuple[Any, ...]:
    """The factors without a Lie algebra (finite groups: sign flips)."""
    return tuple(f for f in sym.factors if not kind_of(f).continuous)


def tangent(sym: Symmetry, params: PyTree, a: Sequence[jax.Array], *,
            factors: Sequence[Any] | None = None, dtype: Any = None) -> Leaves:
    """:math:`\\sum_f J_f a_f` by path (the leaves some factor moves)."""
    factors = continuous(sym) if factors is None else tuple(factors)
    leaves = leaves_by_path(params)
    out: Leaves = {}
    for f, af in zip(factors, a):
        lv = {p: (x if dtype is None else x.astype(dtype)) for p, x in _leaves(f, leaves).items()}
        for p, t in kind_of(f).tangent(f, lv, af).items():
            out[p] = out[p] + t if p in out else t
    return out


def cotangent(sym: Symmetry, params: PyTree, v: Leaves, *, factors: Sequence[Any] | None = None,
              dtype: Any = None) -> tuple[jax.Array, ...]:
    """:math:`J_f^\\top v` of every continuous factor."""
    factors = continuous(sym) if factors is None else tuple(factors)
    leaves = leaves_by_path(params)
    out = []
    for f in factors:
        lv = {p: (x if dtype is None else x.astype(dtype)) for p, x in _leaves(f, leaves).items()}
        vv = {p: v[p] for p in lv if p in v}
        out.append(kind_of(f).cotangent(f, lv, vv))
    return tuple(out)


def gram_diagonal(sym: Symmetry, params: PyTree, *, factors: Sequence[Any] | None = None,
                  dtype: Any = None) -> tuple[jax.Array, ...]:
    """The diagonal of :math:`J_f^\top J_f` of every continuous factor (a preconditioner;
    for :class:`~quotient_opt.symmetry.NormScale`, each block's squared norm)."""
    factors = continuous(sym) if factors is None else tuple(factors)
    leaves = leaves_by_path(params)
    out = []
    for f in factors:
        lv = {p: (x if dtype is None else x.astype(dtype)) for p, x in _leaves(f, leaves).items()}
        out.append(kind_of(f).gram_diagonal(f, lv))
    return tuple(out)


def section(sym: Symmetry, params: PyTree, *, factors: Sequence[Any] | None = None
            ) -> tuple[jax.Array, ...]:
    """The element taking ``params`` to every factor's canonical representative."""
    factors = sym.factors if factors is None else tuple(factors)
    leaves = leaves_by_path(params)
    return tuple(kind_of(f).section(f, _leaves(f, leaves)) for f in factors)


def by_factor(sym: Symmetry, params: PyTree, *parts: tuple[Sequence[Any], Sequence[jax.Array]]
              ) -> tuple[jax.Array, ...]:
    """One element per factor of ``sym``, in order, from ``(factors, elements)`` parts
    (the identity for a factor no part names)."""
    from quotient_opt.symmetry._spec import solve_dtype

    got = {id(r): e for recs, els in parts for r, e in zip(recs, els)}
    dt = solve_dtype(params)
    return tuple(got[id(r)] if id(r) in got else kind_of(r).identity(r, dt) for r in sym.factors)


def sections(sym: Symmetry, params: PyTree, *, factors: Sequence[Any] | None = None
             ) -> tuple[tuple[jax.Array, ...], PyTree]:
    """Every factor's section taken in order (each at the point the ones before reached):
    ``(elements, params moved by them)``."""
    factors = sym.factors if factors is None else tuple(factors)
    out = []
    for f in factors:
        e = section(sym, params, factors=(f,))
        params = act(sym, params, e, factors=(f,))
        out.append(e[0])
    return tuple(out), params


def canonical(sym: Symmetry, params: PyTree, *, factors: Sequence[Any] | None = None) -> PyTree:
    """``params`` moved to the section of every factor (applied in order)."""
    return sections(sym, params, factors=factors)[1]


def exp(sym: Symmetry, a: Sequence[jax.Array], *, factors: Sequence[Any] | None = None
        ) -> tuple[jax.Array, ...]:
    """The elements :math:`\\exp(a_f)` of the continuous factors' algebra elements."""
    factors = continuous(sym) if factors is None else tuple(factors)
    return tuple(kind_of(f).exp(f, af) for f, af in zip(factors, a))


def refuse_unmoved(sym: Symmetry, fields: Sequence[tuple[str, int]], who: str) -> None:
    """Raises ValueError naming the first state field (``(where, power)``, as
    :func:`~quotient_opt.check_transportable` lists them) that some factor of ``sym``
    has no exact law for (:meth:`Kind.moves`)."""
    for where, power in fields:
        for f in sym.factors:
            if not kind_of(f).moves(f, power):
                raise ValueError(
                    f"{who}: {where} is a statistic of power {power}, which the {f.kind} "
                    f"factor '{f.name}' has no exact law for, so it cannot follow that "
                    "factor's moves; use an inner optimizer without it, or restrict the "
                    f"symmetry (qo.symmetry.only(sym, kinds=[...]) without '{f.kind}')")
