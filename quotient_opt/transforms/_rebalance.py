"""Rebalancing: run any Optax optimizer on the canonical section of the rescaling orbits.

The wrapper holds log-scales :math:`s` in its state, and the inner optimizer
works at :math:`\\theta_{in} = e^{s}\\cdot\\theta`. On every ``every``-th
step (the first included) :math:`s` moves on to the minimal-energy point of
the orbit (:func:`~quotient_opt.canonicalize`): :math:`h = s^\\star(\\theta_{in})`,
:math:`s \\leftarrow s + h`, and the inner state moves along with each
field's law (:func:`~quotient_opt.map_state`). The inner step is taken there,
with the gradient carried over, and returned in the user's coordinates:

.. math::

   \\theta^\\star = e^{s}\\cdot\\theta, \\qquad
   u^\\star = \\mathrm{inner}\\big(e^{-s}\\cdot\\nabla L(\\theta),\\ \\theta^\\star\\big), \\qquad
   u = e^{-s}\\cdot u^\\star .

The user's parameters never jump (the update is a small step, safe to chain
with clipping, schedules, ``MultiSteps``), and the method is **exactly
equivariant**: the canonical point of :math:`g\\cdot\\theta` is
:math:`\\pi\\cdot\\theta^\\star` (:math:`\\pi` the permutation part of
:math:`g`; the minimum is unique up to dead units), so with any
permutation-equivariant inner optimizer (every elementwise Optax optimizer)
the inner runs from :math:`\\theta` and :math:`g\\cdot\\theta` agree up to
:math:`\\pi`, and the user's runs satisfy :math:`\\theta'_t = g\\cdot\\theta_t`.

**Other kinds.** The element held includes one of every factor of the
symmetry (:attr:`~quotient_opt.Symmetry.factors`), and the move goes to every
kind's section too: each scale-invariant block (:class:`~quotient_opt.symmetry.NormScale`)
at norm 1, so the inner optimizer steps on the sphere of every block with a constant
effective learning rate (the AdamH recipe, without a jump of the parameters), and
each odd unit (:class:`~quotient_opt.symmetry.SignFlip`) with a non-negative bias.
Where a unit group's rescaling and a block share a leaf, one move is one round of
the joint section's block coordinate descent
(:func:`~quotient_opt.symmetry._canonical.canonical_elements`): balance, then
normalize; the held element tracks the joint point as training goes (measured on
the zoo's BatchNorm and LayerNorm nets: bounded log-scales over 300 steps), and the
run stays exactly equivariant under the unit groups' elements. A state field a
kind has no exact law for is refused at ``init`` (:meth:`~quotient_opt.symmetry.Kind.moves`).

``move_params=True`` gives the older behaviour: the parameters themselves
move to the canonical point (the update holds that jump, so nothing that
rescales or clips updates may follow); the runs are then equal after
canonicalization only.

References:
  Stock, Graham, Gribonval, Jégou. *Equi-normalization of Neural Networks*,
  ICLR 2019. https://arxiv.org/abs/1902.10416

  Neyshabur, Salakhutdinov, Srebro. *Path-SGD*, 2015.
  https://arxiv.org/abs/1506.02617
"""

from __future__ import annotations

from typing import Any, NamedTuple

import jax
import optax

from quotient_opt.symmetry._spec import LogScales, Symmetry
from quotient_opt import _validate as validate
from quotient_opt.transforms._orbit import canonical_move, orbit_wrapper
from quotient_opt.transforms._transport import Laws, register_wrapper_state

PyTree = Any


@register_wrapper_state
class RebalanceState(NamedTuple):
    """State of :func:`rebalance`.

    Attributes:
      count: steps taken (int32).
      log_scales: the element held: the inner optimizer works at
        ``e^{log_scales} · params`` (one array per group).
      inner_state: the inner optimizer's state, in those coordinates.
      factors: the element held of every factor of the symmetry
        (:attr:`~quotient_opt.Symmetry.factors`, e.g. the log-scale of each
        scale-invariant block), applied after ``log_scales``.
    """

    count: jax.Array
    log_scales: LogScales
    inner_state: optax.OptState
    factors: tuple[jax.Array, ...] = ()


def rebalance(
    inner: optax.GradientTransformation,
    sym: Symmetry,
    *,
    every: int = 1,
    tol: jax.typing.ArrayLike | None = None,
    max_iter: int = 50,
    move_params: bool = False,
    laws: Laws | None = None,
) -> optax.GradientTransformationExtraArgs:
    """Wraps ``inner`` so that it steps from the canonical (minimal-energy) point of the orbit.

    On steps with ``count % every == 0`` (the first included) the held
    element moves on to the minimal-energy point of the current orbit (solved
    to ``tol``) and the inner state follows each field's law; the inner step is
    taken there, with the gradient carried over, and returned in the user's
    coordinates, :math:`u = e^{-s}\\cdot u^\\star`. Exactly
    equivariant: from :math:`g\\cdot\\theta` the run is :math:`g` times the run
    from :math:`\\theta`.

    .. warning::
       With ``move_params=True`` the update holds a jump to the canonical
       point: chain nothing after it that rescales or clips updates
       (``clip_by_global_norm``, ``MultiSteps``, a learning-rate scale), or
       the parameters land off the orbit and the function changes. With the
       default (``False``) any chain order is safe.

    Args:
      inner: any Optax transformation whose state can follow a rescaling
        (checked at ``init``, see :func:`~quotient_opt.check_transportable`).
      sym: the network's :class:`~quotient_opt.Symmetry`.
      every: rebalance period in steps (>= 1). The solve runs under a
        ``lax.cond`` on the step count: off-steps skip it, also in a
        population trained by :func:`~quotient_opt.train_population`, which
        keeps the count unbatched (under a plain ``vmap`` of a batched count
        both branches run).
      tol: balance tolerance of the canonicalization (default ``10 · eps``).
      max_iter: iteration cap of the canonicalization.
      move_params: move the parameters themselves to the canonical point
        (the update holds the jump) instead of holding the element.
      laws: transport laws overriding the registry, ``{field: power}``.

    Returns:
      An ``optax.GradientTransformationExtraArgs``; ``update`` needs ``params``.

    Raises:
      ValueError: ``every < 1`` at construction; at ``init``, params that do
        not match ``sym`` or an inner state field that cannot be transported
        (naming it); at ``update``, missing params.

    References:
      Stock et al. 2019, https://arxiv.org/abs/1902.10416
    """
    validate.number("every", every, minimum=1)

    return orbit_wrapper(
        inner, sym, "rebalance", RebalanceState,
        lambda sub, here, updates, state: canonical_move(sub, here, tol=tol, max_iter=max_iter),
                         every=every, move_params=move_params, laws=laws)
