"""Normalization scale invariance: the weights feeding a normalization, as a group kind.

A normalization divides by a statistic of its input that scales with it:
BatchNorm by each channel's standard deviation over the batch (and space),
LayerNorm and RMSNorm by each sample's over the features, GroupNorm over each
group of channels. Whatever produces that input can be multiplied by
:math:`c > 0` per normalized *block* (a channel, the whole feature vector, a
group of channels) without changing the function:

.. math::

    L(c_b W_b) = L(W_b) \\quad\\text{up to } O(\\epsilon/\\sigma^2),

with :math:`\\epsilon` the normalization's stabilizer. So the gradient is
orthogonal to each block :math:`W_b`, and :math:`\\|W_b\\|` only sets the
effective learning rate of the block (:math:`\\propto 1/\\|W_b\\|^2`). AdamP
and SGDP (Heo et al., 2021) remove the radial component of each step
(:func:`~quotient_opt.project_horizontal` does, for the blocks found here);
AdamH-style training keeps each block on its sphere
(:func:`~quotient_opt.rebalance`).

The record :class:`NormScale` lists the producing entries (unit-level
:class:`~quotient_opt.AxisRef` with ``power=1``: kernel columns, and the
biases added before the normalization) of a unit group's ``units``, split into
``blocks`` consecutive blocks of ``units // blocks`` units. An element is one
log-scale per block; the Lie algebra has the same coordinates, with tangent
:math:`J a = a_b W_b` (radial) and :math:`J^\\top v = \\langle W_b, v_b\\rangle`.
The section puts every block at norm ``radius``.

Inference (:func:`~quotient_opt.infer_symmetry`) tests, for every traced unit
group, the producing entries (kernels with each subset of the biases; a bias
added after the normalization, its :math:`\\beta`, is not scale-invariant)
scaled jointly, then per block from the finest blocking down; the first that
leaves the function unchanged at random parameters and inputs is kept. It is
an exact test of an exact (to :math:`\\epsilon`) invariance, not a cosine
threshold.

References:
  Heo, Chun, Oh, Han, Yun, Kim, Uh, Ha. *AdamP: Slowing Down the Slowdown for
  Momentum Optimizers on Scale-invariant Weights*, ICLR 2021.
  https://arxiv.org/abs/2006.08217

  Ioffe, Szegedy. *Batch Normalization*, 2015. https://arxiv.org/abs/1502.03167

  Ba, Kiros, Hinton. *Layer Normalization*, 2016. https://arxiv.org/abs/1607.06450
"""

from __future__ import annotations

import dataclasses
import itertools
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from quotient_opt.symmetry import _views as views
from quotient_opt.symmetry._paths import path_str
from quotient_opt.symmetry._kinds import Kind, Leaves, register_kind
from quotient_opt.symmetry._spec import AxisRef, UnitGroup

__all__ = ["NormScale"]

#: the kind's registry name
NAME = "norm_scale"


@dataclasses.dataclass(frozen=True)
class NormScale:
    """The entries feeding a normalization: one positive scale per block leaves the function.

    Attributes:
      name: the unit group's name (the producing layers).
      units: the group's units (the normalized features).
      blocks: normalized blocks (``units``: per unit, as BatchNorm; ``1``: the whole
        vector, as LayerNorm/RMSNorm; else GroupNorm groups), of ``units // blocks``
        consecutive units each.
      refs: the scaled entries (unit-level, ``power=1``).
      radius: the norm of every block at the section.
      kind: the registry name, ``'norm_scale'``.
    """

    name: str
    units: int
    blocks: int
    refs: tuple[AxisRef, ...]
    radius: float = 1.0
    kind: str = NAME

    @property
    def per_block(self) -> int:
        return self.units // self.blocks

    def describe(self) -> str:
        what = ("per unit" if self.blocks == self.units else
                "one scale for all" if self.blocks == 1 else
                f"per block of {self.per_block} units")
        lines = [f"{self.name}: scale-invariant, {self.units} units normalized {what} "
                 f"({self.blocks} block(s))"]
        lines += [f"    {r.describe()}" for r in self.refs]
        return "\n".join(lines)


def _layers(refs: tuple[AxisRef, ...]) -> str:
    """The layers owning some kernels (their paths without the leaf name), ``'+'``-joined."""
    return "+".join(dict.fromkeys(path_str(r.path[:-1]) for r in refs if len(r.path) > 1))


def _unit_vector(rec: NormScale, block_values: jax.Array) -> jax.Array:
    return jnp.repeat(block_values, rec.per_block, total_repeat_length=rec.units)


def _block_sums(rec: NormScale, per_unit: jax.Array) -> jax.Array:
    return per_unit.reshape(rec.blocks, rec.per_block).sum(axis=1)


class NormScaleKind(Kind):
    """The group :math:`(\\mathbb{R}_{>0})^{\\text{blocks}}` acting radially on each block."""

    def dim(self, rec: NormScale) -> int:
        return rec.blocks

    def identity(self, rec: NormScale, dtype: Any) -> jax.Array:
        return jnp.zeros((rec.blocks,), dtype)

    def sample(self, rec: NormScale, rng: np.random.Generator, bound: float, dtype: Any
               ) -> jax.Array:
        return jnp.asarray(rng.uniform(-bound, bound, rec.blocks), dtype)

    def compose(self, rec: NormScale, first: jax.Array, second: jax.Array) -> jax.Array:
        return first + second

    def inverse(self, rec: NormScale, h: jax.Array) -> jax.Array:
        return -h

    def act(self, rec: NormScale, leaves: Leaves, h: jax.Array, power: int) -> Leaves:
        factor = jnp.exp(power * _unit_vector(rec, h))
        return {r.path: views.scale(leaves[r.path], r, rec.units, factor) for r in rec.refs}

    def tangent(self, rec: NormScale, leaves: Leaves, a: jax.Array) -> Leaves:
        au = _unit_vector(rec, a)
        out: Leaves = {}
        for r in rec.refs:
            t = views.scale(leaves[r.path], r, rec.units, au)
            out[r.path] = out[r.path] + t if r.path in out else t
        return out

    def cotangent(self, rec: NormScale, leaves: Leaves, v: Leaves) -> jax.Array:
        total = 0.0
        for r in rec.refs:
            x = leaves[r.path]
            total = total + views.sums(x * v[r.path].astype(x.dtype), r, rec.units)
        return _block_sums(rec, total)

    def gram_diagonal(self, rec: NormScale, leaves: Leaves) -> jax.Array:
        return _block_sums(rec, sum(views.sums(jnp.square(leaves[r.path]), r, rec.units)
                                    for r in rec.refs))

    def section(self, rec: NormScale, leaves: Leaves) -> jax.Array:
        sq = self.gram_diagonal(rec, leaves)
        ok = sq > 0
        return jnp.where(ok, jnp.log(rec.radius) - 0.5 * jnp.log(jnp.where(ok, sq, 1.0)), 0.0)

    def candidates(self, grp: UnitGroup, shapes: dict) -> list[NormScale]:
        # each producing kernel alone with or without its own layer's bias (a residual
        # stream merges several normalized branches), then every kernel together with
        # subsets of the biases (a stream normalized as a whole, as by a pre-LN reader;
        # a bias added after the normalization, its beta, is not invariant)
        kernels = tuple(r for r in grp.incoming if r.role != "bias")
        biases = tuple(r for r in grp.incoming if r.role == "bias")
        if not kernels:
            return []
        sets = []
        if len(kernels) > 1:
            for k in kernels:
                own = tuple(b for b in biases if b.path[:-1] == k.path[:-1])
                sets += [(k, *own), (k,)] if own else [(k,)]
        if len(biases) <= 4:
            subsets = [sub for n in range(len(biases), -1, -1)
                       for sub in itertools.combinations(biases, n)]
        else:
            subsets = [biases, ()] + [(b,) for b in biases]
        sets += [kernels + sub for sub in subsets]
        return [NormScale(_layers(refs) or grp.name, grp.units, 1,
                          tuple(dataclasses.replace(r, power=1) for r in refs))
                for refs in sets]

    def refinements(self, rec: NormScale) -> list[NormScale]:
        """Finer blockings of a whole-vector invariance, finest first."""
        divs = [d for d in range(rec.units, 1, -1) if rec.units % d == 0]
        return [dataclasses.replace(rec, blocks=d) for d in divs]

    def regroup(self, grp: UnitGroup, recs: list[NormScale]) -> UnitGroup | None:
        return reanchor(grp, recs)

    def check_tolerance(self, tol: float) -> float:
        # exact up to the normalization's stabilizer: eps / variance, ~1e-5 relative
        return max(tol, _EPS_TOL)

    def describe(self, rec: NormScale) -> str:
        return rec.describe()


#: relative change of the output a normalization's stabilizer may cause in the check
_EPS_TOL = 1e-3


def reanchor(grp: UnitGroup, recs: list[NormScale]) -> UnitGroup | None:
    """The compensated rescaling a normalization leaves to its gain and shift.

    Behind a normalization :math:`\\gamma \\hat z + \\beta` followed by a
    positively homogeneous activation, :math:`(\\gamma, \\beta) \\times c` and the
    reading kernel's rows :math:`\\times 1/c` keep the function; the producing
    entries (``recs``', scale-invariant anyway) are left alone (``power=0``).
    ``None`` when the group keeps its own rescaling or has no gain or shift.
    Inference verifies the result numerically before it replaces ``grp``.
    """
    if grp.rescalable or not grp.outgoing:
        return None
    pre = {(r.path, r.axis) for rec in recs for r in rec.refs}
    after = [r for r in grp.refs if r.level == "unit" and (r.path, r.axis) not in pre
             and (r.role == "scale" or (r.role == "bias" and r.power > 0))]
    if not after:
        return None
    refs = tuple(dataclasses.replace(r, power=0) if (r.path, r.axis) in pre else
                 dataclasses.replace(r, power=1) if r in after else r for r in grp.refs)
    note = ("the normalization keeps the producing weights' scale from reaching the units; "
            "the rescaling moves its gain and shift instead")
    return dataclasses.replace(grp, refs=refs, rescalable=True, notes=(note,))


register_kind(NAME, NormScaleKind())
