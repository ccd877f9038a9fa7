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
solve (``_gram_solve``) gives the Newton steps of
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

import dataclasses
from typing import Any

import jax
import jax.numpy as jnp
import optax

from quotient_opt._symmetry import (
    Path,
    Symmetry,
    broadcast_along,
    leaves_by_path,
    map_with_path,
    solve_dtype,
)
from quotient_opt._transform import check_every, check_symmetry, stateless_with_params

PyTree = Any


# --------------------------------------------------------------------------- structure


@dataclasses.dataclass(frozen=True)
class _Coupling:
    """A kernel carrying the outputs of window group ``a`` into the units of group ``b``."""

    path: Path
    a: int  # index (into the rescalable groups) of the feeding group
    a_axis: int  # kernel axis indexing group a's windows
    b: int  # index of the fed group
    b_axis: int  # kernel axis indexing group b's units (windows x pieces)


@dataclasses.dataclass(frozen=True)
class _Structure:
    """The rescalable part of a :class:`Symmetry`, read once at construction."""

    windows: tuple[int, ...]
    pieces: tuple[int, ...]
    incoming: tuple[tuple[tuple[Path, int], ...], ...]
    outgoing: tuple[tuple[tuple[Path, int], ...], ...]
    couplings: tuple[_Coupling, ...]


def _structure(sym: Symmetry) -> _Structure:
    groups = [g for g in sym.groups if g.rescalable]
    couplings = []
    for a, ga in enumerate(groups):
        for path, a_axis in ga.outgoing:
            for b, gb in enumerate(groups):
                for pb, b_axis in gb.incoming:
                    if pb == path:
                        couplings.append(_Coupling(path, a, a_axis, b, b_axis))
    return _Structure(
        windows=tuple(g.windows for g in groups),
        pieces=tuple(g.pieces for g in groups),
        incoming=tuple(g.incoming for g in groups),
        outgoing=tuple(g.outgoing for g in groups),
        couplings=tuple(couplings),
    )


def _sum_except(x: jax.Array, axis: int) -> jax.Array:
    """Sums over every axis but ``axis``."""
    return jnp.sum(x, axis=tuple(i for i in range(x.ndim) if i != axis))


def _window_sums(st: _Structure, fn, sign_out: float) -> list[jax.Array]:
    """Per window: ``sum_in fn(path)`` (pieces summed) ``+ sign_out * sum_out fn(path)``."""
    out = []
    for w, k, inc, outg in zip(st.windows, st.pieces, st.incoming, st.outgoing):
        s = 0.0
        for path, axis in inc:
            s = s + _sum_except(fn(path), axis).reshape(w, k).sum(-1)
        for path, axis in outg:
            s = s + sign_out * _sum_except(fn(path), axis)
        out.append(jnp.broadcast_to(jnp.asarray(s), (w,)))
    return out


def _tangent(st: _Structure, theta: PyTree, a: list[jax.Array], dtype: Any) -> PyTree:
    """``J a``: incoming parameters times their window's ``a``, outgoing times ``-a``."""
    mult: dict[Path, list[tuple[int, jax.Array]]] = {}
    for ai, k, inc, outg in zip(a, st.pieces, st.incoming, st.outgoing):
        for path, axis in inc:
            mult.setdefault(path, []).append((axis, jnp.repeat(ai, k)))
        for path, axis in outg:
            mult.setdefault(path, []).append((axis, -ai))

    def one(path: Path, x: jax.Array) -> jax.Array:
        if path not in mult:
            return jnp.zeros_like(x)
        m = sum(broadcast_along(v, x.ndim, axis) for axis, v in mult[path])
        return (x.astype(dtype) * m).astype(x.dtype)

    return map_with_path(one, theta)


# --------------------------------------------------------------------------- solve


def _cg(matvec, b: list[jax.Array], tol: jax.Array, max_iter: jax.Array) -> list[jax.Array]:
    """Conjugate gradients for an SPD operator on a list of vectors (jit-safe loop)."""

    def dot(x, y):
        return sum(jnp.vdot(u, v) for u, v in zip(x, y))

    def axpy(alpha, x, y):
        return [alpha * u + v for u, v in zip(x, y)]

    bb = dot(b, b)
    tiny = jnp.finfo(bb.dtype).tiny
    stop = (tol**2) * bb

    def cond(c):
        i, _, _, _, rr = c
        return (i < max_iter) & (rr > stop) & (rr > tiny)

    def body(c):
        i, x, r, p, rr = c
        ap = matvec(p)
        pap = dot(p, ap)
        alpha = jnp.where(pap > tiny, rr / jnp.where(pap > tiny, pap, 1.0), 0.0)
        x = axpy(alpha, p, x)
        r = axpy(-alpha, ap, r)
        rr_new = dot(r, r)
        beta = jnp.where(rr > tiny, rr_new / jnp.where(rr > tiny, rr, 1.0), 0.0)
        p = axpy(beta, p, r)
        return i + 1, x, r, p, rr_new

    x0 = [jnp.zeros_like(u) for u in b]
    init = (jnp.zeros([], jnp.int32), x0, b, b, bb)
    _, x, _, _, _ = jax.lax.while_loop(cond, body, init)
    return x


def _couplings(st: _Structure, sq: dict[Path, jax.Array]) -> list[tuple[int, int, jax.Array]]:
    """Off-diagonal Gram blocks ``(a, b, S)`` with ``S[u, w] = sum_pieces W[u, (w, p)]^2``.

    ``sq`` maps each kernel path to its squared entries; ``(J^T J)_{uw} = -S[u, w]``.
    """
    out = []
    for c in st.couplings:
        s = jnp.moveaxis(sq[c.path], c.a_axis, 0)  # (W_a, W_b * k_b)
        s = s.reshape(st.windows[c.a], st.windows[c.b], st.pieces[c.b]).sum(-1)
        out.append((c.a, c.b, s))
    return out


def _gram_solve(
    diag: list[jax.Array],
    couplings: list[tuple[int, int, jax.Array]],
    b: list[jax.Array],
    eps: jax.Array,
    tol: jax.Array,
    max_iter: jax.Array,
) -> list[jax.Array]:
    """Solves ``((1 + eps) D - C + tiny) a = b`` by Jacobi-scaled CG.

    ``D`` is the Gram diagonal (one vector per rescalable group), ``C`` the
    symmetric couplings from :func:`_couplings`. Only the small coupling
    matrices are touched. A non-finite solution is replaced by zeros.
    """
    tiny = jnp.finfo(diag[0].dtype).tiny
    # d^2 = (1 + eps) D + tiny: strictly diagonally dominant, so positive definite.
    d = [jnp.sqrt((1 + eps) * dg + tiny) for dg in diag]
    coup = [(ia, ib, s / (d[ia][:, None] * d[ib][None, :])) for ia, ib, s in couplings]

    def matvec(x: list[jax.Array]) -> list[jax.Array]:
        y = list(x)
        for ia, ib, s in coup:
            y[ia] = y[ia] - s @ x[ib]
            y[ib] = y[ib] - x[ia] @ s
        return y

    bhat = [bi / di for bi, di in zip(b, d)]
    x = _cg(matvec, bhat, tol, jnp.asarray(max_iter))
    a = [xi / di for xi, di in zip(x, d)]
    finite = jnp.all(jnp.asarray([jnp.all(jnp.isfinite(ai)) for ai in a]))
    return [jnp.where(finite, ai, 0.0) for ai in a]


def _vertical_coefficients(
    st: _Structure,
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

    b = _window_sums(st, lambda p: th[p] * vv[p], -1.0)
    diag = _window_sums(st, lambda p: sq[p], 1.0)
    return _gram_solve(diag, _couplings(st, sq), b, eps, tol, max_iter), dtype


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
    st = _structure(sym)
    if not st.windows:
        return v
    a, dtype = _vertical_coefficients(st, params, v, eps, tol, max_iter)
    ja = _tangent(st, params, a, dtype)
    return jax.tree.map(lambda x, y: (x.astype(dtype) - y.astype(dtype)).astype(x.dtype), v, ja)


def project_horizontal(
    sym: Symmetry,
    *,
    eps: jax.typing.ArrayLike | None = None,
    tol: jax.typing.ArrayLike | None = None,
    max_iter: jax.typing.ArrayLike = 64,
) -> optax.GradientTransformationExtraArgs:
    """Projects updates onto the horizontal space of the rescaling orbit.

    .. math::

        u \\leftarrow u - J a, \\qquad (J^\\top J)\\, a = J^\\top u,

    with :math:`J` the infinitesimal rescaling action at the current
    parameters (:meth:`~quotient_opt.Symmetry.tangent`). After this, an
    update changes no unit's balance
    :math:`\\|w_\\text{in}\\|^2 + b^2 - \\|w_\\text{out}\\|^2` to first order.
    Chain it after the optimizer, e.g.
    ``optax.chain(optax.adam(1e-3), qo.project_horizontal(sym))`` (the
    learning rate and sign commute with the linear projection).

    The Gram system is solved by Jacobi-preconditioned conjugate gradients on
    its explicit graph-Laplacian form (see the module docstring), in a
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

    Returns:
      An ``optax.GradientTransformationExtraArgs`` with an empty state; its
      ``update`` requires ``params``.

    References:
      Neyshabur, Salakhutdinov, Srebro. *Path-SGD*, 2015.
      https://arxiv.org/abs/1506.02617

      Kunin et al. *Neural Mechanics: Symmetry and Broken Conservation Laws in
      Deep Learning Dynamics*, 2020. https://arxiv.org/abs/2012.04728
    """
    check_symmetry(sym)
    check_every(max_iter, "max_iter")
    for name, val in (("eps", eps), ("tol", tol)):
        if isinstance(val, (int, float)) and not val >= 0:
            raise ValueError(f"{name} must be >= 0, got {val}")

    def project(updates: PyTree, params: PyTree) -> PyTree:
        return horizontal_component(sym, params, updates, eps=eps, tol=tol, max_iter=max_iter)

    return stateless_with_params(sym, "project_horizontal", project)
