"""Quotient optimizers: SGD and Adam on the quotient by unit rescalings and permutations.

Both are :func:`~quotient_opt.rebalance` (every step by default) around the
Optax optimizer followed by :func:`~quotient_opt.project_horizontal`:

.. math::

   \\theta^\\star = e^{s}\\cdot\\theta = \\mathrm{canon}(\\theta), \\qquad
   u = e^{-s}\\cdot\\Big(-\\eta\\, P_{\\theta^\\star}\\,
       \\mathrm{opt}\\big(e^{-s}\\cdot\\nabla L(\\theta)\\big)\\Big),

where :math:`P_{\\theta}` removes the component along the rescaling orbit
(:math:`J(J^\\top J)^{-1}J^\\top`), so the step moves across orbits only and
keeps every unit's balance :math:`\\lVert w_{in}\\rVert^2 + b^2 -
\\lVert w_{out}\\rVert^2` to first order, and :math:`u` is the step pulled
back to the user's coordinates (the parameters never jump).

Which sense of equivariance (tested in ``tests/test_equivariance.py``,
measured by ``python -m benchmarks.equivariance``):

* ``quotient_sgd``, ``quotient_adam``, ``rebalance(any elementwise optimizer)``
  and ``teleport(..., from_canonical=True)`` are **exactly equivariant**:
  the inner optimizer runs at the canonical point, which for
  :math:`g\\cdot\\theta` is :math:`\\pi\\cdot\\mathrm{canon}(\\theta)`
  (:math:`\\pi` the permutation part of :math:`g`), and the step is pulled
  back by the element held, so the runs satisfy
  :math:`\\theta'_t = g\\cdot\\theta_t`. With ``move_params=True`` the
  parameters themselves move to the canonical point and the runs are equal
  after canonicalization only (:math:`\\theta'_t = \\pi\\cdot\\theta_t`
  for :math:`t \\ge 1`).
* ``path_sgd`` / ``scale_by_path_norm`` (and ``project_horizontal`` chained
  after them) are **exactly equivariant** too, because the path-norm metric
  transforms with the group.
* Plain ``optax.sgd``/``optax.adam`` are permutation-equivariant only: their
  step at :math:`g\\cdot\\theta` is not :math:`g` applied to their step at
  :math:`\\theta` (a gradient scales by :math:`1/c` where the parameter
  scales by :math:`c`; Adam's normalization removes scale altogether).

References:
  Stock et al. *Equi-normalization of Neural Networks*, 2019.
  https://arxiv.org/abs/1902.10416

  Neyshabur, Salakhutdinov, Srebro. *Path-SGD*, 2015.
  https://arxiv.org/abs/1506.02617

  Kingma, Ba. *Adam*, 2014. https://arxiv.org/abs/1412.6980
"""

from __future__ import annotations

import jax
import optax

from quotient_opt.transforms._order import JUMP, KNOWN, mark
from quotient_opt.transforms._rebalance import rebalance
from quotient_opt.symmetry._spec import Symmetry

#: The laws of ``optax.scale_by_adam``'s state (first moment -1, second moment -2).
ADAM_LAWS = {(optax.ScaleByAdamState, "mu"): -1, (optax.ScaleByAdamState, "nu"): -2}
#: The law of ``optax.trace``'s state fed by raw gradients.
MOMENTUM_LAWS = {(optax.TraceState, "trace"): -1}


def _alias(label: str, parts: list, sym: Symmetry, *, move_params: bool,
           **kwargs) -> optax.GradientTransformationExtraArgs:
    """``rebalance`` around the chain of ``parts`` (an order known to be right: not
    checked), marked with the alias's name."""
    inner = mark(optax.chain(*parts), f"the inner chain of qo.{label}", KNOWN)
    tx = rebalance(inner, sym, move_params=move_params, **kwargs)
    label = f"qo.{label}(move_params=True)" if move_params else f"qo.{label}"
    return mark(tx, label, *((JUMP,) if move_params else ()))


def _projection(sym: Symmetry) -> list[optax.GradientTransformation]:
    try:
        from quotient_opt.transforms._projection import project_horizontal
    except ImportError:  # pragma: no cover - projection module absent
        return []
    return [project_horizontal(sym)]


def quotient_sgd(
    learning_rate: optax.ScalarOrSchedule,
    sym: Symmetry,
    *,
    momentum: float | None = None,
    nesterov: bool = False,
    every: int = 1,
    project: bool = True,
    tol: jax.typing.ArrayLike | None = None,
    max_iter: int = 50,
    move_params: bool = False,
) -> optax.GradientTransformationExtraArgs:
    """SGD (optionally with momentum) on the canonical section of the rescaling orbits.

    ``rebalance(chain(optax.sgd(learning_rate, momentum, nesterov),
    project_horizontal(sym)), sym, every=every)``. The momentum buffer is
    transported as a covector at each rebalance. For plain SGD the gradient of
    an invariant loss is already horizontal, so the projection only matters
    with momentum. Exactly equivariant: from :math:`g\\cdot\\theta` the run
    is :math:`g` times the run from :math:`\\theta` (with ``move_params=True``,
    equal after canonicalization only).

    Args:
      learning_rate: scalar or Optax schedule.
      sym: the network's :class:`~quotient_opt.Symmetry`.
      momentum: heavy-ball decay, or ``None``.
      nesterov: Nesterov momentum.
      every: rebalance period (>= 1).
      project: chain :func:`~quotient_opt.project_horizontal` after the step.
      tol: canonicalization tolerance.
      max_iter: canonicalization iteration cap.
      move_params: move the parameters to the canonical point (see
        :func:`~quotient_opt.rebalance`; default: hold the element, no jump).

    Returns:
      An ``optax.GradientTransformationExtraArgs``; ``update`` needs ``params``.

    References:
      Stock et al. 2019, https://arxiv.org/abs/1902.10416
    """
    parts = [optax.sgd(learning_rate, momentum=momentum, nesterov=nesterov)]
    if project:
        parts += _projection(sym)
    # the law of the momentum it builds (a trace of raw gradients), stated: nothing to probe
    return _alias("quotient_sgd", parts, sym, every=every, tol=tol, max_iter=max_iter,
                  move_params=move_params, laws=MOMENTUM_LAWS)


def quotient_adam(
    learning_rate: optax.ScalarOrSchedule,
    sym: Symmetry,
    *,
    b1: jax.typing.ArrayLike = 0.9,
    b2: jax.typing.ArrayLike = 0.999,
    eps: jax.typing.ArrayLike = 1e-8,
    every: int = 1,
    project: bool = True,
    tol: jax.typing.ArrayLike | None = None,
    max_iter: int = 50,
    move_params: bool = False,
) -> optax.GradientTransformationExtraArgs:
    """Adam on the canonical section of the rescaling orbits, with horizontal steps.

    ``rebalance(chain(optax.scale_by_adam(b1, b2, eps), project_horizontal(sym),
    optax.scale_by_learning_rate(learning_rate)), sym, every=every)``. Adam's
    moments are transported at each rebalance (``mu`` like a gradient, ``nu``
    like a squared gradient). Adam's preconditioned step is not horizontal;
    the projection removes its useless component along the orbit. Exactly
    equivariant: from :math:`g\\cdot\\theta` the run is :math:`g` times the
    run from :math:`\\theta` (with ``move_params=True``, equal after
    canonicalization only).

    Args:
      learning_rate: scalar or Optax schedule.
      sym: the network's :class:`~quotient_opt.Symmetry`.
      b1: decay of the first moment.
      b2: decay of the second moment.
      eps: Adam's denominator epsilon.
      every: rebalance period (>= 1).
      project: chain :func:`~quotient_opt.project_horizontal`.
      tol: canonicalization tolerance.
      max_iter: canonicalization iteration cap.
      move_params: move the parameters to the canonical point (see
        :func:`~quotient_opt.rebalance`; default: hold the element, no jump).

    Returns:
      An ``optax.GradientTransformationExtraArgs``; ``update`` needs ``params``.

    References:
      Kingma, Ba 2014, https://arxiv.org/abs/1412.6980;
      Stock et al. 2019, https://arxiv.org/abs/1902.10416
    """
    parts = [optax.scale_by_adam(b1=b1, b2=b2, eps=eps)]
    if project:
        parts += _projection(sym)
    parts.append(optax.scale_by_learning_rate(learning_rate))
    # the laws of the Adam it builds, stated (nothing to probe; under
    # optax.inject_hyperparams b1 and b2 are traced and could not be measured)
    return _alias("quotient_adam", parts, sym, every=every, tol=tol, max_iter=max_iter,
                  move_params=move_params, laws=ADAM_LAWS)
