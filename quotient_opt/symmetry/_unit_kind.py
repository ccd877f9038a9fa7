"""The unit groups' own family as a registered kind: permutations × compensated scales.

A :class:`~quotient_opt.UnitGroup` is a record of this kind (``kind = "units"``):
its element is a :class:`~quotient_opt.GroupElement` (a permutation of windows,
one of the pieces inside each window, and a log-scale per window), acting on
every axis the group names, with each ref's ``power`` as its scale law. The
protocol here is that of one group alone; the transformations keep their fast
paths for the unit groups taken together (the graph-Laplacian projection of
:mod:`~quotient_opt.transforms._projection`, the joint minimal-energy solve of
:func:`~quotient_opt.canonical_log_scales`), which this protocol reproduces group by
group (tested: ``tests/test_kinds.py``).
"""

from __future__ import annotations

from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from quotient_opt.symmetry import _views as views
from quotient_opt.symmetry._kinds import UNITS, Kind, Leaves, register_kind
from quotient_opt.symmetry._spec import (
    GroupElement,
    UnitGroup,
    action_ops,
    apply_ops,
    compose_one,
    inverse_one,
)


def _element(grp: UnitGroup, wp: Any, pp: Any, ls: Any) -> GroupElement:
    return GroupElement(jnp.asarray(wp, jnp.int32), jnp.asarray(pp, jnp.int32), ls)


class UnitKind(Kind):
    """Permutations of a group's windows (and of the pieces in each) × a positive scale
    per window, compensated by the readers (``power < 0``)."""

    def dim(self, rec: UnitGroup) -> int:
        return rec.windows if rec.rescalable else 0

    def identity(self, rec: UnitGroup, dtype: Any) -> GroupElement:
        return _element(rec, np.arange(rec.windows),
                        np.tile(np.arange(rec.pieces), (rec.windows, 1)),
                        jnp.zeros((rec.windows,), dtype))

    def sample(self, rec: UnitGroup, rng: np.random.Generator, bound: float, dtype: Any
               ) -> GroupElement:
        wp = rng.permutation(rec.windows) if rec.permutable else np.arange(rec.windows)
        pp = np.stack([rng.permutation(rec.pieces) if rec.pieces_permutable
                       else np.arange(rec.pieces) for _ in range(rec.windows)])
        ls = rng.uniform(-bound, bound, rec.windows) if rec.rescalable else np.zeros(rec.windows)
        return _element(rec, wp, pp, jnp.asarray(ls, dtype))

    def compose(self, rec: UnitGroup, first: GroupElement, second: GroupElement) -> GroupElement:
        return compose_one(first, second)

    def inverse(self, rec: UnitGroup, h: GroupElement) -> GroupElement:
        return inverse_one(h)

    def act(self, rec: UnitGroup, leaves: Leaves, h: GroupElement, power: int) -> Leaves:
        ops = action_ops([(rec, h)], power)
        return {p: apply_ops(ops, p, x) for p, x in leaves.items() if p in ops}

    def exp(self, rec: UnitGroup, a: jax.Array) -> GroupElement:
        e = self.identity(rec, a.dtype)
        return e._replace(log_scale=a if rec.rescalable else jnp.zeros_like(a))

    def tangent(self, rec: UnitGroup, leaves: Leaves, a: jax.Array) -> Leaves:
        zero = jnp.zeros_like(a)
        return jax.jvp(lambda s: self.act(rec, leaves, self.exp(rec, s), 1), (zero,), (a,))[1]

    def cotangent(self, rec: UnitGroup, leaves: Leaves, v: Leaves) -> jax.Array:
        dt = next(iter(leaves.values())).dtype
        zero = jnp.zeros((rec.windows,), dt)
        out, vjp = jax.vjp(lambda s: self.act(rec, leaves, self.exp(rec, s), 1), zero)
        return vjp({p: v.get(p, jnp.zeros_like(x)) for p, x in out.items()})[0]

    def gram_diagonal(self, rec: UnitGroup, leaves: Leaves) -> jax.Array:
        dt = next(iter(leaves.values())).dtype
        out = jnp.zeros((rec.windows,), dt)
        if not rec.rescalable:
            return out
        for r in rec.refs:
            if r.power:
                sq = views.sums(jnp.square(leaves[r.path]), r, rec.count(r))
                if r.level == "unit":
                    sq = sq.reshape(rec.windows, rec.pieces).sum(axis=1)
                out = out + r.power ** 2 * sq
        return out

    def section(self, rec: UnitGroup, leaves: Leaves) -> GroupElement:
        """The group's own balance, the others held: each window's log-scale
        :math:`\\tfrac14 \\log(E_\\text{out}/E_\\text{in})` (exact for powers ±1; a window
        with no energy on a side keeps its scale). The minimal-energy point of all the
        groups together is :func:`~quotient_opt.canonical_log_scales`."""
        dt = next(iter(leaves.values())).dtype
        e_in = jnp.zeros((rec.windows,), dt)
        e_out = jnp.zeros((rec.windows,), dt)
        for r in rec.refs:
            if not r.power:
                continue
            sq = views.sums(jnp.square(leaves[r.path]), r, rec.count(r))
            if r.level == "unit":
                sq = sq.reshape(rec.windows, rec.pieces).sum(axis=1)
            if r.power > 0:
                e_in = e_in + sq
            else:
                e_out = e_out + sq
        ok = (e_in > 0) & (e_out > 0) & rec.rescalable
        ls = jnp.where(ok, 0.25 * (jnp.log(jnp.where(ok, e_out, 1.0))
                                   - jnp.log(jnp.where(ok, e_in, 1.0))), 0.0)
        return self.identity(rec, dt)._replace(log_scale=ls)

    def describe(self, rec: UnitGroup) -> str:
        return rec.describe()


register_kind(UNITS, UnitKind())
