"""Rebalancing: run any Optax optimizer on the canonical section of the rescaling orbits.

On every ``every``-th step (the first included) the parameters are moved to
the minimal-energy point of their orbit (:func:`~quotient_opt.canonicalize`),
which computes the same function, and the inner optimizer's step is taken
there, with the gradient and the inner state carried along:

.. math::

   \\theta^\\star = e^{s^\\star}\\cdot\\theta, \\qquad
   \\nabla L(\\theta^\\star) = e^{-s^\\star}\\cdot\\nabla L(\\theta), \\qquad
   u = \\mathrm{inner}(\\nabla L(\\theta^\\star), \\theta^\\star), \\qquad
   \\theta_{+} = \\theta^\\star + u,

and the returned update is :math:`\\theta_+ - \\theta`. First moments are
transported like gradients (power -1), second moments like squared gradients
(power -2), see :func:`quotient_opt.transport_state`.

Equivariance: the canonical point of :math:`g\\cdot\\theta` is
:math:`\\pi\\cdot\\theta^\\star` where :math:`\\pi` is the permutation part of
:math:`g` (the minimum is unique, up to dead units). With any
permutation-equivariant inner optimizer (every elementwise Optax optimizer)
the runs from :math:`\\theta` and :math:`g\\cdot\\theta` are then related by
:math:`\\pi` alone from the first step on: the final parameters are equal after
canonicalization (this is an optimizer on a canonical section of the quotient
by rescaling, not an equivariant one in the sense
:math:`\\theta'_T = g\\cdot\\theta_T`).

Floating point: the returned update is a difference (Optax's convention), so
a step that moves parameters by a large factor rounds at the old scale. The
first step from badly balanced parameters (log-scales of ±3, say) then
perturbs the run by 10-20x the rounding of the parameters themselves, which
Adam-type inner optimizers can amplify. Starting from
``qo.canonicalize(sym, params)[0]`` avoids that jump (``benchmarks/equivariance.py``,
column ``canon_start``).

References:
  Stock, Graham, Gribonval, Jégou. *Equi-normalization of Neural Networks*,
  ICLR 2019. https://arxiv.org/abs/1902.10416

  Neyshabur, Salakhutdinov, Srebro. *Path-SGD*, 2015.
  https://arxiv.org/abs/1506.02617
"""

from __future__ import annotations

from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import optax

from quotient_opt.symmetry._canonical import canonical_log_scales, rescale
from quotient_opt.transforms._transport import map_param_like
from quotient_opt.symmetry._spec import LogScales, Symmetry
from quotient_opt.transforms._common import check_every, check_params

PyTree = Any


class RebalanceState(NamedTuple):
    """State of :func:`rebalance`.

    Attributes:
      count: steps taken (int32).
      inner_state: the inner optimizer's state, in the coordinates of the
        parameters it last saw.
    """

    count: jax.Array
    inner_state: optax.OptState


def transport(sym: Symmetry, state: PyTree, params: PyTree, s: LogScales) -> PyTree:
    """Moves an inner state along ``params → exp(s)·params`` (gather-free).

    Same as :func:`quotient_opt.transport_state` for a pure rescaling.
    """
    return map_param_like(
        lambda kind, t: rescale(sym, t, s, power=-1 if kind == "first" else -2), state, params
    )


def step_on_orbit(
    inner: optax.GradientTransformationExtraArgs,
    sym: Symmetry,
    updates: PyTree,
    inner_state: PyTree,
    params: PyTree,
    s: LogScales,
    extra_args: dict,
) -> tuple[PyTree, PyTree]:
    """Moves to ``exp(s)·params`` (gradient and state along) and takes the inner step there.

    Returns ``(updates relative to params, new inner state)``.
    """
    moved = rescale(sym, params, s)
    grads = rescale(sym, updates, s, power=-1)
    inner_state = transport(sym, inner_state, params, s)
    u, inner_state = inner.update(grads, inner_state, moved, **extra_args)
    out = jax.tree.map(
        lambda m, du, p: None if p is None else ((m + du) - p).astype(p.dtype), moved, u, params
    )
    return out, inner_state


def rebalance(
    inner: optax.GradientTransformation,
    sym: Symmetry,
    *,
    every: int = 1,
    tol: jax.typing.ArrayLike | None = None,
    max_iter: int = 50,
) -> optax.GradientTransformationExtraArgs:
    """Wraps ``inner`` so that every ``every`` steps it steps from the canonical point.

    On steps with ``count % every == 0`` (the first included) the parameters are
    moved to the minimal-energy point of their rescaling orbit (solved to
    ``tol``), the gradient is transported as a covector and the inner state
    with :func:`~quotient_opt.transport_state` rules, and the inner
    step is taken there; the returned update is
    :math:`(\\theta^\\star + u) - \\theta`. On other steps it is the inner
    step unchanged. See the module docstring for the maths and for which
    sense of equivariance this gives (equal after canonicalization).

    Args:
      inner: any Optax transformation (e.g. ``optax.adam(1e-3)``).
      sym: the network's :class:`~quotient_opt.Symmetry`.
      every: rebalance period in steps (>= 1).
      tol: balance tolerance of the canonicalization (default ``10 · eps``).
      max_iter: iteration cap of the canonicalization.

    Returns:
      An ``optax.GradientTransformationExtraArgs``; ``update`` needs ``params``.

    Raises:
      ValueError: ``every < 1`` at construction; at ``init``, params that do
        not match ``sym`` (naming the path); at ``update``, missing params.

    References:
      Stock et al. 2019, https://arxiv.org/abs/1902.10416
    """
    check_every(every)
    inner = optax.with_extra_args_support(inner)

    def init_fn(params: PyTree) -> RebalanceState:
        sym.validate(params)
        return RebalanceState(jnp.zeros([], jnp.int32), inner.init(params))

    def update_fn(updates, state, params=None, **extra_args):
        check_params(params, "rebalance")
        sym.validate(params)
        # off-steps run the solver for zero iterations (log-scales stay 0):
        # branchless, and cheap under vmap (a batched lax.cond would run both).
        do = state.count % every == 0
        iters = jnp.where(do, max_iter, 0)
        s = canonical_log_scales(sym, params, tol=tol, max_iter=iters)[0]
        out, inner_state = step_on_orbit(
            inner, sym, updates, state.inner_state, params, s, extra_args
        )
        return out, RebalanceState(optax.safe_increment(state.count), inner_state)

    return optax.GradientTransformationExtraArgs(init_fn, update_fn)
