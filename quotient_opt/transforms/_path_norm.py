"""Path-SGD: gradients divided by the path-norm's per-weight curvature.

For a network of affine layers behind ReLU (or max-pool) units, the squared
:math:`\\ell_2` path-norm sums, over every input-to-output path, the product of
the squared weights on the path (a bias is an edge from a constant unit, so
paths may also start at a bias). Path-SGD divides each weight's gradient by

.. math::

    \\gamma(w) = \\frac{\\partial \\phi}{\\partial (w^2)}
      = \\sum_{\\text{paths } P \\ni w} \\; \\prod_{e \\in P,\\, e \\neq w} e^2 ,

the sum over the paths through :math:`w` of the product of the *other*
squared weights. One forward and one backward pass through the squared linear
skeleton give all of them at once:

.. math::

    f_0 = \\mathbf 1, \\quad f_l = (W_l^{\\odot 2})^\\top \\bar f_{l-1} + b_l^{\\odot 2},
    \\qquad
    g_L = \\mathbf 1, \\quad \\bar g_{l} = W_{l+1}^{\\odot 2}\\, g_{l+1},

    \\gamma(W_l[i, j]) = \\bar f_{l-1, i}\\, g_{l, j}, \\qquad
    \\gamma(b_l[j]) = g_{l, j},

where for a max-pool layer a window's forward value :math:`\\bar f` is the sum
over its pieces and each piece's backward value :math:`g` is its window's
:math:`\\bar g` (for elementwise activations the bars are no-ops).

Under a rescaling of a unit by :math:`c > 0`, every path through an incoming
weight also crosses an outgoing weight (scaled by :math:`1/c`), so
:math:`\\gamma' = \\gamma / c^2` for a weight scaled by :math:`c`, while its
gradient becomes :math:`\\partial L / c`; the step
:math:`\\Delta w' = c\\, \\Delta w` therefore moves with the parameters: Path-SGD
is exactly rescaling- (and permutation-) equivariant, momentum included.

References:
  Neyshabur, Salakhutdinov, Srebro. *Path-SGD: Path-Normalized Optimization in
  Deep Neural Networks*, 2015. https://arxiv.org/abs/1506.02617

  Neyshabur, Tomioka, Srebro. *Norm-Based Capacity Control in Neural
  Networks*, 2015. https://arxiv.org/abs/1503.00036
"""

from __future__ import annotations

from typing import Any

import jax
import jax.numpy as jnp
import optax

from quotient_opt.symmetry._program import Program
from quotient_opt.symmetry._spec import Symmetry
from quotient_opt import _validate as validate
from quotient_opt.transforms._common import stateless_with_params
from quotient_opt.transforms._order import PATH_NORM, mark

PyTree = Any


def path_norm_curvature(sym: Symmetry, params: PyTree) -> PyTree:
    """The per-weight path sums :math:`\\gamma` of every parameter.

    :math:`\\gamma = \\partial \\phi / \\partial (\\theta^{\\odot 2})`, with :math:`\\phi`
    the squared path norm, computed by one forward and one backward pass of
    the model's squared skeleton (:class:`~quotient_opt.symmetry.Program`):
    dense, convolution, pooling, flatten and residual layers alike. A leaf
    that lies on no path gets ones (it passes through unchanged).

    Args:
      sym: a :class:`~quotient_opt.Symmetry` from :func:`~quotient_opt.infer_symmetry`
        (it carries the traced forward computation).
      params: parameters.

    Returns:
      A params-shaped pytree of :math:`\\gamma` in at least float32. It
      transforms like a second moment: ``gamma(g·θ) = sym.act(gamma(θ), g, power=-2)``.
      Non-finite parameters count as zero weights, so :math:`\\gamma` stays finite.

    Raises:
      ValueError: if ``sym`` has no forward computation (a hand-written spec).
    """
    program = _program(sym)
    dtype = jnp.promote_types(jnp.result_type(*jax.tree.leaves(params)), jnp.float32)
    # a non-finite parameter (a NaN that reached it) counts as a zero weight: it would
    # otherwise enter every path sum it lies on, and the next step every parameter
    sq = jax.tree.map(
        lambda x: jnp.where(jnp.isfinite(x), jnp.square(jnp.asarray(x, dtype)), 0), params)
    gamma = jax.grad(program.path_norm)(sq)
    return jax.tree.map(lambda gm: jnp.where(jnp.any(gm != 0), gm, jnp.ones_like(gm)), gamma)


def _program(sym: Symmetry) -> Program:
    if sym.program is None:
        raise ValueError(
            "sym: the path norm needs the model's forward computation; build the symmetry "
            "with qo.infer_symmetry(model, example_input) (a hand-written spec has none)"
        )
    return sym.program


def scale_by_path_norm(
    sym: Symmetry,
    *,
    eps: jax.typing.ArrayLike = 1e-12,
) -> optax.GradientTransformationExtraArgs:
    """Divides each weight's update by its path-norm curvature (Path-SGD's preconditioner).

    .. math::

        u_w \\leftarrow \\frac{u_w}{\\max(\\gamma(w), \\epsilon)}, \\qquad
        \\gamma(w) = \\sum_{\\text{paths } P \\ni w} \\prod_{e \\in P,\\, e \\ne w} e^2,

    computed at the current parameters by one forward and one backward pass of
    the model's squared skeleton (every parameter squared, activations as the
    identity, maxima as sums, on an all-ones input); for max-pool layers
    the pieces of a window share its paths. Handles flax ``(in, out)`` and
    equinox ``(out, in)`` kernels, convolutions and pooling alike. A leaf on
    no input-to-output path passes through unchanged.

    With an invariant loss, the resulting step is exactly equivariant under
    unit rescalings and permutations (:math:`\\gamma' = \\gamma / c^2` for a
    weight scaled by :math:`c`). The ``max(·, eps)`` guard only matters where
    :math:`\\gamma < \\epsilon`: :math:`\\gamma = 0` means every path through the
    weight has another zero weight, where an exact gradient is zero too. The
    division runs in at least float32 and the result is cast back.

    Non-finite input stays where it is: a NaN or infinite update entry is divided
    like any other (it stays non-finite, in its entry only), and a parameter it
    made non-finite counts as a zero weight in the path sums, so one NaN gradient
    entry never spreads to other parameters (tested: after three steps of
    ``path_sgd`` only that entry is NaN; without the guard every parameter was).
    To skip whole steps instead, wrap the chain in ``optax.apply_if_finite``.

    Args:
      sym: the network's :class:`~quotient_opt.Symmetry`.
      eps: floor of :math:`\\gamma`.

    Returns:
      An ``optax.GradientTransformationExtraArgs``; ``update`` requires
      ``params``.

    References:
      Neyshabur, Salakhutdinov, Srebro. *Path-SGD: Path-Normalized
      Optimization in Deep Neural Networks*, 2015.
      https://arxiv.org/abs/1506.02617
    """
    validate.symmetry(sym)
    program = _program(sym)
    program.check_path_norm()
    validate.number("eps", eps, strict=True)

    def scale(_: Symmetry, updates: PyTree, params: PyTree) -> PyTree:
        gamma = path_norm_curvature(sym, params)

        def one(u: jax.Array, gm: jax.Array) -> jax.Array:
            floor = jnp.asarray(eps, gm.dtype)
            return (u.astype(gm.dtype) / jnp.maximum(gm, floor)).astype(u.dtype)

        return jax.tree.map(one, updates, gamma)

    return mark(stateless_with_params(sym, "scale_by_path_norm", scale, needs_whole_tree=True),
                "qo.scale_by_path_norm", PATH_NORM)


def path_sgd(
    learning_rate: optax.ScalarOrSchedule,
    sym: Symmetry,
    *,
    momentum: float | None = None,
    eps: jax.typing.ArrayLike = 1e-12,
) -> optax.GradientTransformationExtraArgs:
    """Path-SGD: SGD (optionally with heavy-ball momentum) on path-normalized gradients.

    .. math::

        m_t = \\beta m_{t-1} + \\frac{\\nabla_w L}{\\gamma(w)}, \\qquad
        w \\leftarrow w - \\eta\\, m_t ,

    ``optax.chain(scale_by_path_norm(sym, eps=eps), optax.trace(momentum),
    optax.scale_by_learning_rate(learning_rate))``. Exactly equivariant under
    unit rescalings and permutations: the momentum buffer is a sum of
    path-normalized gradients, which all transform like the parameters.

    Args:
      learning_rate: a scalar or an Optax schedule.
      sym: the network's :class:`~quotient_opt.Symmetry`.
      momentum: heavy-ball decay :math:`\\beta`, or ``None`` for none.
      eps: floor of :math:`\\gamma` (see :func:`scale_by_path_norm`).

    Returns:
      An ``optax.GradientTransformationExtraArgs``.

    References:
      Neyshabur, Salakhutdinov, Srebro. *Path-SGD: Path-Normalized
      Optimization in Deep Neural Networks*, 2015.
      https://arxiv.org/abs/1506.02617
    """
    parts = [scale_by_path_norm(sym, eps=eps)]
    if momentum is not None:
        parts.append(optax.trace(decay=momentum))
    parts.append(optax.scale_by_learning_rate(learning_rate))
    return optax.chain(*parts)
