"""Sign flips of odd activations: a discrete group kind.

Behind an odd activation, :math:`\\sigma(-z) = -\\sigma(z)` (tanh, sin, odd
polynomials, the identity), negating a unit's incoming weights and bias and
its outgoing weights keeps the function: the group
:math:`\\{\\pm 1\\}^{\\text{units}}` (the symmetric-activation case of the
symmetry-breaking notes). It has no Lie algebra (nothing to project or
teleport along), but it splits every orbit into :math:`2^n` copies, so the
distance between two networks, their alignment and their canonical form have to
quotient it out. The section makes each unit's bias non-negative (its summed
incoming weights where it has no bias).

Inference tests, on every traced group of single-piece units that are not
ReLU-like, whether random sign patterns keep the function (oddness checked
numerically, as positive homogeneity is).
"""

from __future__ import annotations

import dataclasses
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from quotient_opt.symmetry import _views as views
from quotient_opt.symmetry._paths import path_str
from quotient_opt.symmetry._kinds import Kind, Leaves, register_kind
from quotient_opt.symmetry._spec import AxisRef, UnitGroup

__all__ = ["SignFlip"]

_NOT_ODD = ("relu", "max")


@dataclasses.dataclass(frozen=True)
class SignFlip:
    """Negating a unit's producing and reading entries together keeps the function.

    Attributes:
      name: the unit group's name.
      units: number of units.
      refs: the negated entries (``power`` ±1) and those only along for the
        description (``power`` 0: untouched).
      kind: the registry name, ``'sign_flip'``.
    """

    name: str
    units: int
    refs: tuple[AxisRef, ...]
    kind: str = "sign_flip"

    def describe(self) -> str:
        lines = [f"{self.name}: sign flips of {self.units} odd units"]
        lines += [f"    {path_str(r.path)}:{r.axis} ×±1 ({r.role}, {r.level}s)" for r in self.refs
                  if r.power]
        return "\n".join(lines)


class SignFlipKind(Kind):
    """The group :math:`\\{\\pm1\\}^n`; elements are float arrays of signs."""

    continuous = False

    def dim(self, rec: SignFlip) -> int:
        return 0

    def identity(self, rec: SignFlip, dtype: Any) -> jax.Array:
        return jnp.ones((rec.units,), dtype)

    def sample(self, rec: SignFlip, rng: np.random.Generator, bound: float, dtype: Any
               ) -> jax.Array:
        return jnp.asarray(rng.choice([-1.0, 1.0], rec.units), dtype)

    def compose(self, rec: SignFlip, first: jax.Array, second: jax.Array) -> jax.Array:
        return first * second

    def inverse(self, rec: SignFlip, h: jax.Array) -> jax.Array:
        return h

    def act(self, rec: SignFlip, leaves: Leaves, h: jax.Array, power: int) -> Leaves:
        out: Leaves = {}
        for r in rec.refs:
            if r.power % 2 and power % 2:
                out[r.path] = views.scale(out.get(r.path, leaves[r.path]), r, rec.units, h)
        return out

    def moves(self, rec: SignFlip, power: int) -> bool:
        # a flip multiplies a statistic by (-1)^k for its degree k in the gradients; a
        # scale-free statistic (power 0: normalized updates, m/sqrt(v)) may be odd or even
        return power != 0

    def section(self, rec: SignFlip, leaves: Leaves) -> jax.Array:
        bias = [r for r in rec.refs if r.role == "bias" and r.power > 0]
        pivots = bias or [r for r in rec.refs if r.power > 0]
        piv = sum(views.sums(leaves[r.path], r, rec.units) for r in pivots)
        return jnp.where(piv < 0, -1.0, 1.0).astype(piv.dtype)

    def candidates(self, grp: UnitGroup, shapes: dict) -> list[SignFlip]:
        if grp.pieces != 1 or any(a in grp.activation for a in _NOT_ODD):
            return []
        refs = tuple(r for r in grp.refs if r.power != 0)
        if not any(r.power > 0 for r in refs) or not any(r.power < 0 for r in refs):
            return []
        return [SignFlip(grp.name, grp.units, refs)]

    def describe(self, rec: SignFlip) -> str:
        return rec.describe()


register_kind("sign_flip", SignFlipKind())
