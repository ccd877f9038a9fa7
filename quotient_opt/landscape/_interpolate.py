"""Loss along the straight line between two parameter vectors."""

from __future__ import annotations

from collections.abc import Callable
from typing import NamedTuple

import jax
import jax.numpy as jnp

from quotient_opt.landscape._common import PyTree, check_floating, check_same_tree
from quotient_opt.landscape._neb import check_loss_fn


class InterpolationResult(NamedTuple):
    """Loss along a line.

    Attributes:
      alphas: ``(points,)`` positions, 0 at ``a`` and 1 at ``b``.
      losses: ``(points,)`` loss at :math:`(1 - \\alpha) a + \\alpha b`.
    """

    alphas: jax.Array
    losses: jax.Array


def interpolate(
    loss_fn: Callable[[PyTree], jax.Array],
    a: PyTree,
    b: PyTree,
    *,
    points: int = 51,
    span: tuple[float, float] = (0.0, 1.0),
) -> InterpolationResult:
    """Loss along the straight line from ``a`` to ``b`` (vmapped over the points).

    .. math::

       \\ell(\\alpha) = L\\big((1 - \\alpha)\\,a + \\alpha\\,b\\big),
       \\qquad \\alpha \\in [\\alpha_0, \\alpha_1] \\text{ (``span``)}.

    A straight line is the crudest path: between two minima of a network it
    usually crosses a barrier that a curved path avoids (compare with
    :func:`neb`), and between a point and a symmetric copy of it (same
    function, other point of the orbit) it usually crosses one too.
    Extending ``span`` past ``[0, 1]`` shows the loss beyond the endpoints.

    Args:
      loss_fn: ``params -> scalar`` (jittable, vmappable).
      a: start (``alpha = 0``).
      b: end (``alpha = 1``), same structure and leaf shapes as ``a``.
      points: number of evenly spaced ``alpha`` values, at least 2.
      span: first and last ``alpha``.

    Returns:
      :class:`InterpolationResult`.

    Raises:
      ValueError: if ``a`` and ``b`` differ in structure or a leaf's shape
        (naming the leaf), a leaf is not floating-point, ``loss_fn`` does not
        return a scalar, or ``points < 2``.

    References:
      Goodfellow, Vinyals, Saxe. *Qualitatively characterizing neural
      network optimization problems*, 2014. https://arxiv.org/abs/1412.6544
    """
    if int(points) != points or points < 2:
        raise ValueError(f"points must be an integer >= 2, got {points}")
    check_same_tree(a, b)
    check_floating(a, "a")
    check_floating(b, "b")
    check_loss_fn(loss_fn, a)
    lo, hi = span
    return _interpolate(loss_fn, a, b, int(points), lo, hi)


def _interpolate(loss_fn, a, b, points, lo, hi):
    @jax.jit
    def run(a: PyTree, b: PyTree, lo: jax.Array, hi: jax.Array) -> InterpolationResult:
        dtype = jnp.promote_types(jnp.result_type(*jax.tree.leaves(a)), jnp.float32)
        alphas = jnp.linspace(jnp.asarray(lo, dtype), jnp.asarray(hi, dtype), points)

        def at(alpha: jax.Array) -> jax.Array:
            p = jax.tree.map(lambda x, y: (x + alpha * (y - x)).astype(x.dtype), a, b)
            return loss_fn(p)

        return InterpolationResult(alphas, jax.vmap(at)(alphas))

    return run(a, b, lo, hi)
