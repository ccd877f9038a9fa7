"""Horizontal projection: removing the component of an update along the rescaling orbit.

At parameters :math:`\\theta` the rescaling orbit's tangent space (the
*vertical* space) is the image of :math:`J`, the derivative of the group
action in the per-window log-scales (:meth:`~quotient_opt.Symmetry.tangent`).
The Euclidean-orthogonal projection of an update :math:`v` onto its
complement (the *horizontal* space) is

.. math::

    v_h = v - J a, \\qquad (J^\\top J)\\, a = J^\\top v .

The gradient of a rescaling-invariant loss is already horizontal
(:math:`J^\\top \\nabla L = 0`); after momentum or Adam's per-coordinate
preconditioning the update is not, and this restores it. For a horizontal
step the per-unit *balance*
:math:`\\|w_\\text{in}\\|^2 + b^2 - \\|w_\\text{out}\\|^2` is conserved to
first order, since :math:`(J^\\top v)_u` is half its derivative along
:math:`v`.

The Gram matrix :math:`J^\\top J` never needs to be formed from
:math:`J`: over the windows (units after pooling) of the rescalable layers it
is a grounded, weighted graph Laplacian,

.. math::

    (J^\\top J)_{uu} = \\|\\text{in}_u\\|^2 + \\|\\text{out}_u\\|^2, \\qquad
    (J^\\top J)_{uw} = -\\sum_{\\text{pieces } p \\text{ of } w} W[u, p]^2

for a unit :math:`u` of one layer feeding unit :math:`w` of the next through
the kernel :math:`W` (inputs, outputs, biases and units of non-rescalable
layers act as the ground). It is diagonally dominant, so conjugate gradients
on the Jacobi-scaled system :math:`D^{-1/2} J^\\top J D^{-1/2}` converge in a
few iterations. One pass over the parameters gives :math:`J^\\top v`, the
diagonal and the couplings; one more applies :math:`v - J a`. The CG
iterations touch only the small hidden-to-hidden coupling matrices. The same
solve gives the Newton steps of
:func:`~quotient_opt.canonical_log_scales`, whose Hessian is
:math:`4 J^\\top J`.

Numerics: dead units (all incoming and outgoing parameters zero) make
:math:`J^\\top J` singular. The solve uses the regularized matrix
:math:`(1 + \\epsilon) D - C + \\text{tiny}` (``D`` its diagonal, ``C`` the
couplings, ``tiny`` the smallest normal number of the compute dtype), which is
strictly diagonally dominant, hence positive definite, and leaves dead units
untouched (their :math:`J^\\top v` is zero). The regularization shifts the
result by a relative :math:`O(\\epsilon)`. The solve runs in at least float32
(bfloat16/float16 inputs are upcast and the result cast back). A non-finite
update (NaN gradient) is passed through unprojected, so the projection never
spreads a NaN to other entries.

The projection is equivariant under permutations. It is not equivariant
under rescalings (the Euclidean metric is not rescaling-invariant), but the
horizontal space of covectors is: if :math:`J^\\top v = 0` at :math:`\\theta`,
then :math:`g \\cdot v` (transformed like a gradient) is horizontal at
:math:`g \\cdot \\theta`.

References:
  Neyshabur, Salakhutdinov, Srebro. *Path-SGD: Path-Normalized Optimization in
  Deep Neural Networks*, 2015. https://arxiv.org/abs/1506.02617

  Kunin, Sagastuy-Brena, Ganguli, Yamins, Tanaka. *Neural Mechanics: Symmetry
  and Broken Conservation Laws in Deep Learning Dynamics*, 2020.
  https://arxiv.org/abs/2012.04728

  Du, Hu, Lee. *Algorithmic Regularization in Learning Deep Homogeneous
  Models: Layers are Automatically Balanced*, 2018.
  https://arxiv.org/abs/1806.00900
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import jax
import jax.numpy as jnp
import optax

from quotient_opt.symmetry import _kinds
from quotient_opt.symmetry._gram import (
    Structure,
    cg,
    couplings,
    gram_solve,
    product_window_sums,
    structure,
    tangent,
    window_sums,
)
from quotient_opt.symmetry._paths import leaves_by_path, map_with_path
from quotient_opt.symmetry._spec import Symmetry, solve_dtype
from quotient_opt import _validate as validate
from quotient_opt.transforms._common import stateless_with_params
from quotient_opt.transforms._order import PROJECTION, mark

PyTree = Any


def _vertical_coefficients(
    st: Structure,
    params: PyTree,
    v: PyTree,
    eps: jax.typing.ArrayLike | None,
    tol: jax.typing.ArrayLike | None,
    max_iter: jax.typing.ArrayLike,
) -> tuple[list[jax.Array], Any]:
    """Solves ``(J^T J) a = J^T v`` (regularized, Jacobi-scaled CG); returns ``(a, dtype)``."""
    dtype = solve_dtype(params)
    finfo = jnp.finfo(dtype)
    eps = finfo.eps if eps is None else jnp.asarray(eps, dtype)
    tol = 10 * finfo.eps if tol is None else jnp.asarray(tol, dtype)
    th = {p: x.astype(dtype) for p, x in leaves_by_path(params).items()}
    vv = {p: x.astype(dtype) for p, x in leaves_by_path(v).items()}
    sq = {p: jnp.square(x) for p, x in th.items()}
    b = product_window_sums(st, th.__getitem__, vv.__getitem__, lambda w: w, dtype)
    diag = window_sums(st, sq.__getitem__, lambda w: w * w, dtype)
    return gram_solve(diag, couplings(st, sq), b, eps, tol, max_iter), dtype


def horizontal_component(
    sym: Symmetry,
    params: PyTree,
    v: PyTree,
    *,
    eps: jax.typing.ArrayLike | None = None,
    tol: jax.typing.ArrayLike | None = None,
    max_iter: jax.typing.ArrayLike = 64,
) -> PyTree:
    """The horizontal part :math:`v - J (J^\\top J)^{-1} J^\\top v` of ``v`` at ``params``.

    Args:
      sym: the network's :class:`~quotient_opt.Symmetry`.
      params: the point :math:`\\theta` where the orbit's tangent is taken.
      v: a params-shaped pytree (an update or gradient).
      eps: relative diagonal regularization of the Gram matrix (default: the
        machine epsilon of the compute dtype).
      tol: CG stops when the Jacobi-scaled residual is below ``tol`` times the
        scaled right-hand side (default: 10 machine epsilons).
      max_iter: cap on CG iterations.

    Returns:
      ``v`` minus its vertical component, same structure and dtypes as ``v``.
    """
    st = structure(sym)
    facs = _kinds.continuous(sym)
    if facs and _overlap(st, facs):
        return _joint_horizontal(sym, st, facs, params, v, eps, tol, max_iter)
    if st.windows:
        a, dtype = _vertical_coefficients(st, params, v, eps, tol, max_iter)
        ja = tangent(st, params, a, dtype)
        v = jax.tree.map(lambda x, y: (x.astype(dtype) - y.astype(dtype)).astype(x.dtype), v, ja)
    if facs:
        v = _radial_horizontal(sym, facs, params, v, eps)
    return v


def _overlap(st: Structure, facs: tuple[Any, ...]) -> bool:
    """Whether a factor moves a leaf that a rescalable unit group also moves."""
    moved = {r.path for rs in st.refs for r in rs}
    return any(r.path in moved for f in facs for r in f.refs)


def _subtract(v: PyTree, ja: dict, dtype: Any) -> PyTree:
    return map_with_path(
        lambda p, x: (x.astype(dtype) - ja[p].astype(dtype)).astype(x.dtype) if p in ja else x, v)


def _radial_horizontal(sym: Symmetry, facs: tuple[Any, ...], params: PyTree, v: PyTree,
                       eps: jax.typing.ArrayLike | None) -> PyTree:
    """Factors on entries no unit group moves: their Gram matrices are diagonal (each
    block's squared norm), so the projection is one division per block."""
    dtype = solve_dtype(params)
    finfo = jnp.finfo(dtype)
    eps = finfo.eps if eps is None else jnp.asarray(eps, dtype)
    vv = {p: x.astype(dtype) for p, x in leaves_by_path(v).items()}
    b = _kinds.cotangent(sym, params, vv, factors=facs, dtype=dtype)
    diag = _kinds.gram_diagonal(sym, params, factors=facs, dtype=dtype)
    a = [bi / ((1 + eps) * di + finfo.tiny) for bi, di in zip(b, diag)]
    a = [jnp.where(jnp.isfinite(ai), ai, 0.0) for ai in a]
    return _subtract(v, _kinds.tangent(sym, params, a, factors=facs, dtype=dtype), dtype)


def _joint_horizontal(sym: Symmetry, st: Structure, facs: tuple[Any, ...], params: PyTree,
                      v: PyTree, eps: jax.typing.ArrayLike | None,
                      tol: jax.typing.ArrayLike | None, max_iter: jax.typing.ArrayLike) -> PyTree:
    """The general case, for any kinds: Jacobi-scaled CG on the joint Gram system
    :math:`J^\top J a = J^\top v` over the unit groups' and the factors' algebras,
    with :math:`J^\top J` applied matrix-free (one tangent and one cotangent per
    iteration)."""
    dtype = solve_dtype(params)
    finfo = jnp.finfo(dtype)
    eps = finfo.eps if eps is None else jnp.asarray(eps, dtype)
    tol = 10 * finfo.eps if tol is None else jnp.asarray(tol, dtype)
    th = {p: x.astype(dtype) for p, x in leaves_by_path(params).items()}
    n = len(st.windows)

    def jt(w: dict) -> list[jax.Array]:
        full = {p: w.get(p, jnp.zeros_like(x)) for p, x in th.items()}
        unit = product_window_sums(st, th.__getitem__, full.__getitem__, lambda x: x,
                                   dtype) if n else []
        return list(unit) + list(_kinds.cotangent(sym, params, full, factors=facs, dtype=dtype))

    def j(a: list[jax.Array]) -> dict:
        out = dict(_kinds.tangent(sym, params, a[n:], factors=facs, dtype=dtype))
        if n:
            unit = leaves_by_path(tangent(st, params, a[:n], dtype))
            for p, t in unit.items():
                out[p] = out[p] + t if p in out else t
        return out

    sq = {p: jnp.square(x) for p, x in th.items()}
    diag = list(window_sums(st, sq.__getitem__, lambda w: w * w, dtype) if n else [])
    diag += list(_kinds.gram_diagonal(sym, params, factors=facs, dtype=dtype))
    reg = [eps * dg + finfo.tiny for dg in diag]
    d = [jnp.sqrt(dg + r) for dg, r in zip(diag, reg)]

    def matvec(x: list[jax.Array]) -> list[jax.Array]:
        a = [xi / di for xi, di in zip(x, d)]
        y = jt(j(a))
        return [(yi + ri * ai) / di for yi, ri, ai, di in zip(y, reg, a, d)]

    vv = {p: x.astype(dtype) for p, x in leaves_by_path(v).items()}
    b = [bi / di for bi, di in zip(jt(vv), d)]
    x = cg(matvec, b, tol, jnp.asarray(max_iter))
    a = [xi / di for xi, di in zip(x, d)]
    finite = jnp.all(jnp.asarray([jnp.all(jnp.isfinite(ai)) for ai in a]))
    a = [jnp.where(finite, ai, 0.0) for ai in a]
    return _subtract(v, j(a), dtype)


def project_horizontal(
    sym: Symmetry,
    *,
    eps: jax.typing.ArrayLike | None = None,
    tol: jax.typing.ArrayLike | None = None,
    max_iter: jax.typing.ArrayLike = 64,
    kinds: Sequence[str] | None = None,
) -> optax.GradientTransformationExtraArgs:
    """Projects updates onto the horizontal space of the symmetry orbits.

    .. math::

        u \\leftarrow u - J a, \\qquad (J^\\top J)\\, a = J^\\top u,

    with :math:`J` the infinitesimal rescaling action at the current
    parameters (:meth:`~quotient_opt.Symmetry.tangent`). After this, an
    update changes no unit's balance
    :math:`\\|w_\\text{in}\\|^2 + b^2 - \\|w_\\text{out}\\|^2` to first order.
    Chain it after the optimizer, e.g.
    ``optax.chain(optax.adam(1e-3), qo.project_horizontal(sym))`` (the
    learning rate and sign commute with the linear projection).

    .. warning::
       Before a preconditioner (``optax.chain(qo.project_horizontal(sym),
       optax.adam(...))``) it does nothing: the raw gradient of an invariant
       loss is already horizontal (:math:`J^\\top \\nabla L = 0`), and the
       preconditioner's output, which is not, is never projected.

    The Gram system is solved by Jacobi-preconditioned conjugate gradients on
    its explicit graph-Laplacian form (diagonal: each window's squared
    entries; couplings: minus the squared kernel entries joining two
    windows), in a
    ``lax.while_loop`` that stops at ``tol`` or ``max_iter``. Groups without a
    rescaling symmetry contribute nothing; leaves the symmetry does not touch
    pass through unchanged. Dead units are guarded by the ``eps``
    regularization and never produce NaN.

    Args:
      sym: the network's :class:`~quotient_opt.Symmetry`.
      eps: relative diagonal regularization (default: machine epsilon of the
        compute dtype, which is at least float32).
      tol: relative tolerance of the scaled CG residual (default: 10 machine
        epsilons).
      max_iter: cap on CG iterations.
      kinds: project along these families only (``'units'`` for the unit groups,
        ``'norm_scale'``, ...; default: all).

    Returns:
      An ``optax.GradientTransformationExtraArgs`` with an empty state; its
      ``update`` requires ``params``.

    References:
      Neyshabur, Salakhutdinov, Srebro. *Path-SGD*, 2015.
      https://arxiv.org/abs/1506.02617

      Kunin et al. *Neural Mechanics: Symmetry and Broken Conservation Laws in
      Deep Learning Dynamics*, 2020. https://arxiv.org/abs/2012.04728
    """
    validate.symmetry(sym)
    sym = _kinds.only(sym, kinds)
    validate.number("max_iter", max_iter, minimum=1)
    validate.number("eps", eps)
    validate.number("tol", tol)

    def project(sub: Symmetry, updates: PyTree, params: PyTree) -> PyTree:
        return horizontal_component(sub, params, updates, eps=eps, tol=tol, max_iter=max_iter)

    return mark(stateless_with_params(sym, "project_horizontal", project),
                "qo.project_horizontal", PROJECTION)
