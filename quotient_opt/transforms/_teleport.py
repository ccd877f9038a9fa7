"""Symmetry teleportation over positive rescalings.

Every ``every`` steps, before the inner step, the parameters are moved along
their rescaling orbit (the function is unchanged) to a point where the loss
gradient is larger, by a few steps of normalized gradient ascent on the
log-scales:

.. math::

   F(s) = \\lVert \\nabla L(e^{s}\\cdot\\theta_0) \\rVert^2, \\qquad
   s \\leftarrow \\Pi_{[s_0 - B,\\, s_0 + B]}\\Big(s + \\eta\\,
   \\frac{\\nabla_s F}{\\lVert \\nabla_s F \\rVert}\\Big),

where :math:`\\nabla L(\\theta_0)` is the gradient the wrapper receives (so
it must come first in a chain, fed the raw gradient of the invariant loss).
Since :math:`L` is invariant, :math:`\\nabla L(e^s\\cdot\\theta)
= e^{-s}\\cdot\\nabla L(\\theta)`: :math:`F` needs no further backward pass
(each ascent step is one pass over the parameters), and it is convex in
:math:`s` and unbounded (shrinking a unit's incoming weights inflates their gradient):
the ascent is normalized (each step moves the log-scales by exactly
``learning_rate`` in Euclidean norm, or not at all where the gradient of
:math:`F` vanishes or is not finite) and the log-scales are clipped to
``±max_log_scale`` around the start, so it cannot blow up.

By default the ascent starts from the canonical (minimal-energy) point of the
orbit, so the teleported point depends only on the orbit (up to the
permutation). With ``from_canonical=False`` it starts from the current
parameters, as in the paper, and is not equivariant.

Like :func:`~quotient_opt.rebalance`, the wrapper holds the element reached
in its state: the inner optimizer works at the teleported point, the
gradient (``updates``, which should be the gradient of the invariant loss)
and the inner state are carried there, and the inner step is returned in the
user's coordinates, so the parameters never jump (``move_params=True``
moves them instead). From the canonical start the method is exactly
equivariant: from :math:`g\\cdot\\theta` the run is :math:`g` times the
run from :math:`\\theta`.

References:
  Zhao, Dehmamy, Walters, Yu. *Symmetry Teleportation for Accelerated
  Optimization*, NeurIPS 2022. https://arxiv.org/abs/2205.10637
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import optax

from quotient_opt.symmetry._canonical import solve_dtype
from quotient_opt.symmetry._spec import LogScales, Symmetry
from quotient_opt import _validate as validate
from quotient_opt.symmetry import _kinds
from quotient_opt.transforms._orbit import Move, act, canonical_move, orbit_wrapper
from quotient_opt.transforms._order import READS_GRADIENT
from quotient_opt.transforms._transport import Laws, register_wrapper_state

PyTree = Any


@register_wrapper_state
class TeleportState(NamedTuple):
    """State of :func:`teleport`.

    Attributes:
      count: steps taken (int32).
      log_scales: the element held: the inner optimizer works at
        ``e^{log_scales} · params``.
      inner_state: the inner optimizer's state, in those coordinates.
      factors: the element held of every factor of the symmetry
        (:attr:`~quotient_opt.Symmetry.factors`), applied after ``log_scales``.
    """

    count: jax.Array
    log_scales: LogScales
    inner_state: optax.OptState
    factors: tuple[jax.Array, ...] = ()


def teleport_log_scales(
    sym: Symmetry,
    params: PyTree,
    value_fn: Callable[[PyTree], jax.Array] | None = None,
    *,
    grads: PyTree | None = None,
    steps: int = 10,
    learning_rate: jax.typing.ArrayLike = 0.1,
    max_log_scale: jax.typing.ArrayLike = 2.0,
    from_canonical: bool = True,
    tol: jax.typing.ArrayLike | None = None,
    max_iter: int = 50,
) -> LogScales:
    """Log-scales :math:`s` that (locally) increase :math:`\\lVert\\nabla L(e^s\\cdot\\theta)\\rVert^2`.

    For an invariant loss the gradient moves as a covector,
    :math:`\\nabla L(e^{s}\\cdot\\theta) = e^{-s}\\cdot\\nabla L(\\theta)`, so the
    objective needs one gradient only:
    :math:`F(s) = \\lVert e^{-s}\\cdot\\nabla L(\\theta)\\rVert^2`, and each
    ascent step costs one pass over the parameters (no further backward
    passes through the model). The unit groups' rescalings only; the
    :func:`teleport` wrapper ascends over the factors' algebras too
    (:func:`teleport_element`).

    Args:
      sym: the symmetry.
      params: parameters.
      value_fn: the loss, ``value_fn(params) -> scalar`` (used for its
        gradient at ``params`` when ``grads`` is not given).
      grads: the gradient of the (invariant) loss at ``params``.
      steps: ascent steps.
      learning_rate: Euclidean length of each (normalized) ascent step.
      max_log_scale: bound on each log-scale relative to the start.
      from_canonical: start from the canonical point of the orbit.
      tol: canonicalization tolerance.
      max_iter: canonicalization iteration cap.

    Returns:
      One log-scale array per group, relative to ``params``.

    Raises:
      ValueError: if neither ``value_fn`` nor ``grads`` is given.
    """
    units = _kinds.only(sym, [_kinds.UNITS]) if sym.factors else sym
    return teleport_element(units, params, value_fn, grads=grads, steps=steps,
                            learning_rate=learning_rate, max_log_scale=max_log_scale,
                            from_canonical=from_canonical, tol=tol, max_iter=max_iter
                            ).log_scales


def teleport_element(
    sym: Symmetry,
    params: PyTree,
    value_fn: Callable[[PyTree], jax.Array] | None = None,
    *,
    grads: PyTree | None = None,
    steps: int = 10,
    learning_rate: jax.typing.ArrayLike = 0.1,
    max_log_scale: jax.typing.ArrayLike = 2.0,
    from_canonical: bool = True,
    tol: jax.typing.ArrayLike | None = None,
    max_iter: int = 50,
) -> Move:
    """:func:`teleport_log_scales` over every continuous kind of ``sym`` at once.

    The ascent runs on the unit groups' log-scales :math:`s` and on the Lie-algebra
    coordinates :math:`a_f` of every continuous factor
    (:meth:`~quotient_opt.symmetry.Kind.exp`; for
    :class:`~quotient_opt.symmetry.NormScale`, each block's log-scale):
    :math:`F(s, a) = \\lVert (e^{s}, f_0 e^{a})\\cdot_{-1}\\nabla L(\\theta)\\rVert^2`,
    each step normalized over all coordinates together and each coordinate clipped
    to ``±max_log_scale`` around the start. Discrete factors (sign flips) take their
    section (``from_canonical``) or stay. Since a scale-invariant block's gradient
    grows as its norm shrinks, the ascent shrinks such blocks, raising their
    effective learning rate, up to the bound.

    Args:
      sym: the symmetry.
      params: parameters.
      value_fn: the loss (used for its gradient when ``grads`` is not given).
      grads: the gradient of the (invariant) loss at ``params``.
      steps: ascent steps.
      learning_rate: Euclidean length of each (normalized) ascent step.
      max_log_scale: bound on each coordinate relative to the start.
      from_canonical: start from the canonical point of the orbit (the unit
        groups' minimal-energy point, then every factor's section).
      tol: canonicalization tolerance.
      max_iter: canonicalization iteration cap.

    Returns:
      A :class:`~quotient_opt.transforms._orbit.Move`: the unit groups' log-scales
      and every factor's element, relative to ``params``.

    Raises:
      ValueError: if neither ``value_fn`` nor ``grads`` is given.
    """
    if grads is None:
        if value_fn is None:
            raise ValueError("teleport_log_scales: pass grads= or value_fn=")
        grads = jax.grad(value_fn)(params)
    dt = solve_dtype(params)
    if from_canonical:
        s0, f0 = canonical_move(sym, params, tol=tol, max_iter=max_iter)
    else:
        s0 = sym.zero_log_scales(dt)
        f0 = _kinds.identity(sym, dt)
    flows = [i for i, f in enumerate(sym.factors)
             if _kinds.kind_of(f).continuous and _kinds.kind_of(f).dim(f) > 0]
    a0 = tuple(jnp.zeros((_kinds.kind_of(sym.factors[i]).dim(sym.factors[i]),), dt)
               for i in flows)
    mask = tuple(jnp.full((g.windows,), g.rescalable, bool) for g in sym.groups)
    g = jax.tree.map(lambda x: x.astype(dt), grads)

    def factor_elements(a: tuple[jax.Array, ...]) -> tuple[jax.Array, ...]:
        out = list(f0)
        for i, ai in zip(flows, a):
            f = sym.factors[i]
            out[i] = _kinds.kind_of(f).compose(f, f0[i], _kinds.kind_of(f).exp(f, ai))
        return tuple(out)

    def objective(x):
        s, a = x
        moved = act(sym, g, Move(s, factor_elements(a)), power=-1)
        return sum(jnp.sum(jnp.square(x)) for x in jax.tree.leaves(moved))

    def body(_, x):
        ds, da = jax.grad(objective)(x)
        ds = tuple(jnp.where(m, d, 0) for d, m in zip(ds, mask))
        n = jnp.sqrt(sum(jnp.sum(jnp.square(d)) for d in (*ds, *da)))
        ok = jnp.isfinite(n) & (n > 0)
        step = jnp.where(ok, learning_rate / jnp.where(ok, n, 1), 0)

        def move(v, dv, start):
            return jnp.clip(v + jnp.where(ok, step * dv, 0), start - max_log_scale,
                            start + max_log_scale)

        s, a = x
        return (tuple(move(v, dv, st) for v, dv, st in zip(s, ds, s0)),
                tuple(move(v, dv, st) for v, dv, st in zip(a, da, a0)))

    s, a = jax.lax.fori_loop(0, steps, body, (s0, a0))
    return Move(s, factor_elements(a))


def teleport(
    inner: optax.GradientTransformation,
    sym: Symmetry,
    *,
    every: int = 10,
    steps: int = 10,
    learning_rate: jax.typing.ArrayLike = 0.1,
    max_log_scale: jax.typing.ArrayLike = 2.0,
    from_canonical: bool = True,
    tol: jax.typing.ArrayLike | None = None,
    max_iter: int = 50,
    move_params: bool = False,
    laws: Laws | None = None,
) -> optax.GradientTransformationExtraArgs:
    """Wraps ``inner`` with symmetry teleportation every ``every`` steps.

    ``update(updates, state, params, **extra_args)``, with ``updates`` the
    gradient of the invariant loss: on steps with ``count % every == 0`` (the
    first included) the parameters are moved along their rescaling orbit by
    ``steps`` normalized ascent steps on the squared gradient norm (module
    docstring; no extra backward pass), the gradient and
    the inner state are transported there, and the inner step is taken there
    and returned in the user's coordinates (no jump; see
    :func:`~quotient_opt.rebalance`). The ascent runs over every continuous kind
    of ``sym`` together (:func:`teleport_element`: the unit groups' log-scales and,
    e.g., each scale-invariant block's), from the section of every kind.

    .. warning::
       With ``move_params=True`` the update holds the teleport's jump: chain
       nothing after it that rescales or clips updates.

    Args:
      inner: any Optax transformation.
      sym: the network's :class:`~quotient_opt.Symmetry`.
      every: teleport period in steps (>= 1).
      steps: ascent steps per teleport.
      learning_rate: length of each ascent step in log-scale space.
      max_log_scale: bound ``B`` on each log-scale around the start point
        (the canonical point by default).
      from_canonical: start the ascent from the canonical point of the orbit
        (equivariant; default) or from the current parameters (the paper's
        choice).
      tol: canonicalization tolerance.
      max_iter: canonicalization iteration cap.
      move_params: move the parameters themselves (the update holds the jump).
      laws: transport laws overriding the registry, ``{field: power}``.

    Returns:
      An ``optax.GradientTransformationExtraArgs``.

    Raises:
      ValueError: bad ``every``/``steps`` at construction; params not matching
        ``sym`` at ``init``; missing ``params`` at ``update``.

    References:
      Zhao et al. 2022, https://arxiv.org/abs/2205.10637
    """
    validate.number("every", every, minimum=1)
    validate.number("steps", steps)
    return orbit_wrapper(
        inner, sym, "teleport", TeleportState,
        lambda sub, here, updates, state: teleport_element(
            sub, here, grads=act(sub, updates, Move(state.log_scales, state.factors), -1),
            steps=steps,
            learning_rate=learning_rate, max_log_scale=max_log_scale,
            from_canonical=from_canonical, tol=tol, max_iter=max_iter),
        every=every, move_params=move_params, laws=laws, roles=(READS_GRADIENT,))
