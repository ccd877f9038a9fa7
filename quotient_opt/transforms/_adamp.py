"""AdamP and SGDP on the exact scale-invariant groups, and decoupled decay on them.

Weights feeding a normalization are scale-invariant
(:class:`~quotient_opt.symmetry.NormScale`): the loss depends on each block
:math:`W_b` through :math:`W_b / \\|W_b\\|` only, the gradient is orthogonal
to :math:`W_b`, and a step's radial component only grows :math:`\\|W_b\\|`,
which shrinks the block's effective learning rate
:math:`\\propto 1/\\|W_b\\|^2`. Momentum makes the step radial; AdamP and SGDP
(Heo et al., 2021) project the radial component out of each step of a weight
their cosine test deems scale-invariant, and scale its weight decay by
``wd_ratio``. Here the invariant blocks come from the traced model, so there
is no test to pass:

.. math::

   u_b \\leftarrow u_b - \\langle u_b, \\hat w_b \\rangle\\, \\hat w_b ,
   \\qquad \\hat w_b = W_b / \\|W_b\\| ,

(:func:`~quotient_opt.project_horizontal` restricted to the ``norm_scale``
kind), then decay :math:`\\lambda\\, r\\, W` on invariant entries and
:math:`\\lambda W` elsewhere (:func:`add_decayed_weights`).

References:
  Heo, Chun, Oh, Han, Yun, Kim, Uh, Ha. *AdamP: Slowing Down the Slowdown for
  Momentum Optimizers on Scale-invariant Weights*, ICLR 2021.
  https://arxiv.org/abs/2006.08217

  Loshchilov, Hutter. *Decoupled Weight Decay Regularization*, ICLR 2019.
  https://arxiv.org/abs/1711.05101
"""

from __future__ import annotations

from typing import Any

import jax
import jax.numpy as jnp
import optax

from quotient_opt import _validate as validate
from quotient_opt.symmetry._norm_scale import NAME as NORM_SCALE
from quotient_opt.symmetry._paths import map_with_path
from quotient_opt.symmetry._spec import Symmetry
from quotient_opt.symmetry import _views as views
from quotient_opt.transforms._common import stateless_with_params
from quotient_opt.transforms._projection import project_horizontal

PyTree = Any

__all__ = ["adamp", "add_decayed_weights", "normalized_mask", "sgdp"]



def _entry_masks(sym: Symmetry, params: PyTree) -> dict:
    """Per leaf a float mask: 1 on the entries of a normalized block, else 0."""
    out: dict = {}
    for f in sym.factors:
        if f.kind != NORM_SCALE:
            continue
        for r in f.refs:
            shape = dict(sym.shapes)[r.path]
            m = views.expand(jnp.ones((f.units,)), r, f.units, shape[r.axis], fill=0)
            m = jnp.broadcast_to(views.broadcast_along(m, len(shape), r.axis), shape)
            out[r.path] = jnp.maximum(out[r.path], m) if r.path in out else m
    return out


def normalized_mask(sym: Symmetry, params: PyTree) -> PyTree:
    """Which leaves hold scale-invariant blocks (feed a normalization), as a bool pytree.

    For ``optax.masked`` and ``optax.multi_transform``: e.g. no weight decay on the
    invariant weights, ``optax.masked(optax.add_decayed_weights(wd),
    jax.tree.map(lambda m: not m, qo.normalized_mask(sym, params)))``.

    Args:
      sym: the model's :class:`~quotient_opt.Symmetry`.
      params: the parameters (their structure).

    Returns:
      A pytree like ``params`` of Python bools: ``True`` on a leaf any
      :class:`~quotient_opt.symmetry.NormScale` factor scales.
    """
    validate.symmetry(sym)
    sym.validate(params)
    paths = {r.path for f in sym.factors if f.kind == NORM_SCALE for r in f.refs}
    return map_with_path(lambda p, x: p in paths, params)


def add_decayed_weights(
    weight_decay: jax.typing.ArrayLike,
    sym: Symmetry,
    *,
    normalized_ratio: jax.typing.ArrayLike = 0.1,
) -> optax.GradientTransformationExtraArgs:
    """``optax.add_decayed_weights`` with its own ratio on the scale-invariant entries.

    .. math::

       u \\leftarrow u + \\lambda\\, (r\\, m + (1 - m)) \\odot \\theta ,

    with :math:`m` 1 on the entries of a normalized block (those of
    :func:`normalized_mask`, entry by entry: a conv bias before a BatchNorm is
    one, a bias after it is not) and :math:`r` ``normalized_ratio`` (AdamP's
    ``wd_ratio``; ``0`` decays only the other weights, ``1`` is plain decay).
    On an invariant block decay only shrinks :math:`\\|W_b\\|`, raising its
    effective learning rate.

    Args:
      weight_decay: :math:`\\lambda`.
      sym: the model's :class:`~quotient_opt.Symmetry`.
      normalized_ratio: :math:`r`.

    Returns:
      An ``optax.GradientTransformationExtraArgs``; ``update`` needs ``params``.
    """
    validate.symmetry(sym)
    validate.number("weight_decay", weight_decay)
    validate.number("normalized_ratio", normalized_ratio)

    def decay(sub: Symmetry, updates: PyTree, params: PyTree) -> PyTree:
        masks = _entry_masks(sub, params)

        def one(path, u, p):
            if u is None or p is None:
                return u
            coef = jnp.asarray(weight_decay, jnp.result_type(p))
            if path in masks:
                m = masks[path].astype(coef.dtype)
                coef = coef * (normalized_ratio * m + (1 - m))
            return (u + coef * p).astype(u.dtype)

        return map_with_path(one, updates, params)

    return stateless_with_params(sym, "qo.add_decayed_weights", decay)


def _finish(parts: list, sym: Symmetry, learning_rate: optax.ScalarOrSchedule,
            weight_decay: jax.typing.ArrayLike, wd_ratio: jax.typing.ArrayLike
            ) -> optax.GradientTransformationExtraArgs:
    """``parts``, then the decoupled decay (unless zero), then the learning rate."""
    if not (isinstance(weight_decay, (int, float)) and weight_decay == 0):
        parts = [*parts, add_decayed_weights(weight_decay, sym, normalized_ratio=wd_ratio)]
    return optax.chain(*parts, optax.scale_by_learning_rate(learning_rate))


def adamp(
    learning_rate: optax.ScalarOrSchedule,
    sym: Symmetry,
    *,
    b1: jax.typing.ArrayLike = 0.9,
    b2: jax.typing.ArrayLike = 0.999,
    eps: jax.typing.ArrayLike = 1e-8,
    weight_decay: jax.typing.ArrayLike = 0.0,
    wd_ratio: jax.typing.ArrayLike = 0.1,
) -> optax.GradientTransformationExtraArgs:
    """AdamP on the traced scale-invariant blocks.

    ``optax.chain(optax.scale_by_adam(b1, b2, eps), qo.project_horizontal(sym,
    kinds=('norm_scale',)), qo.add_decayed_weights(weight_decay, sym,
    normalized_ratio=wd_ratio), optax.scale_by_learning_rate(learning_rate))``:
    Adam's step with its radial component removed on every block that feeds a
    normalization, and decoupled decay (``wd_ratio`` on those blocks). Equal to
    AdamP with its cosine test always passing on exactly these blocks (and
    never elsewhere).

    Args:
      learning_rate: scalar or Optax schedule.
      sym: the model's :class:`~quotient_opt.Symmetry` (from
        :func:`~quotient_opt.infer_symmetry`).
      b1: decay of the first moment.
      b2: decay of the second moment.
      eps: Adam's denominator epsilon.
      weight_decay: decoupled weight decay :math:`\\lambda`.
      wd_ratio: its factor on the scale-invariant entries.

    Returns:
      An ``optax.GradientTransformationExtraArgs``; ``update`` needs ``params``.

    References:
      Heo et al., ICLR 2021. https://arxiv.org/abs/2006.08217
    """
    parts = [optax.scale_by_adam(b1=b1, b2=b2, eps=eps),
             project_horizontal(sym, kinds=(NORM_SCALE,))]
    return _finish(parts, sym, learning_rate, weight_decay, wd_ratio)


def sgdp(
    learning_rate: optax.ScalarOrSchedule,
    sym: Symmetry,
    *,
    momentum: float | None = 0.9,
    nesterov: bool = False,
    weight_decay: jax.typing.ArrayLike = 0.0,
    wd_ratio: jax.typing.ArrayLike = 0.1,
) -> optax.GradientTransformationExtraArgs:
    """SGDP on the traced scale-invariant blocks: momentum SGD with radial steps removed.

    ``optax.chain(optax.trace(momentum, nesterov), qo.project_horizontal(sym,
    kinds=('norm_scale',)), qo.add_decayed_weights(...),
    optax.scale_by_learning_rate(learning_rate))``.

    Args:
      learning_rate: scalar or Optax schedule.
      sym: the model's :class:`~quotient_opt.Symmetry`.
      momentum: heavy-ball decay (``None``: plain SGD, whose step on an invariant
        block is already tangent).
      nesterov: Nesterov momentum.
      weight_decay: decoupled weight decay.
      wd_ratio: its factor on the scale-invariant entries.

    Returns:
      An ``optax.GradientTransformationExtraArgs``; ``update`` needs ``params``.

    References:
      Heo et al., ICLR 2021. https://arxiv.org/abs/2006.08217
    """
    parts = []
    if momentum is not None:
        parts.append(optax.trace(decay=momentum, nesterov=nesterov))
    parts.append(project_horizontal(sym, kinds=(NORM_SCALE,)))
    return _finish(parts, sym, learning_rate, weight_decay, wd_ratio)
