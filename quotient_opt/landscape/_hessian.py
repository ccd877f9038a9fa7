"""Hessian spectra: exact (dense), extreme eigenvalues (Lanczos), densities (SLQ)."""

from __future__ import annotations

import functools
import warnings
from collections.abc import Callable
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
from matfree import decomp

from quotient_opt._lazy import require
from quotient_opt.landscape._common import (
    PyTree,
    check_floating,
    check_same_tree,
    check_stacked,
    flatten,
    flatten_stacked,
    hashable,
)
from quotient_opt.landscape._neb import check_loss_fn
from quotient_opt.landscape._smooth import _check_beta, with_smooth_relu

_METHODS = ("auto", "dense", "lanczos", "slq")
_WHICH = ("largest", "smallest", "both")


class HessianSpectrum(NamedTuple):
    """Eigenvalues of the Hessian (or of its restriction, see ``project_out``).

    Attributes:
      eigenvalues: ascending. ``dense``: all of them (or the ``k`` extremes
        asked for); ``lanczos``: the ``k`` extreme Ritz values asked for;
        ``slq``: the quadrature nodes (Ritz values of every probe).
      weights: ``slq`` only (else ``None``): quadrature weight of each node,
        summing to 1; ``sum(weights * f(eigenvalues))`` estimates
        :math:`\\operatorname{tr} f(H) / n`.
      grid: ``slq`` only: points where ``density`` is evaluated.
      density: ``slq`` only: the spectral density (integrates to 1 over the
        grid), the quadrature rule smoothed by a Gaussian of width ``sigma``.
    """

    eigenvalues: jax.Array
    weights: jax.Array | None = None
    grid: jax.Array | None = None
    density: jax.Array | None = None


def _rank_tol(s: jax.Array, shape: tuple[int, int]) -> jax.Array:
    return jnp.max(s, initial=0.0) * max(shape) * jnp.finfo(s.dtype).eps


def _flat_loss(loss_fn: Callable, beta: float | None, params: PyTree):
    if beta is not None:
        loss_fn = with_smooth_relu(loss_fn, beta)
    flat, unravel = flatten(params)
    return flat, unravel, lambda x: loss_fn(unravel(x))


def _hvp(f: Callable, flat: jax.Array) -> Callable[[jax.Array], jax.Array]:
    grad = jax.grad(f)
    return lambda v: jax.jvp(grad, (flat,), (v.astype(flat.dtype),))[1]


@functools.partial(jax.jit, static_argnames=("loss_fn", "beta"))
def _dense_hessian(loss_fn: Callable, beta: float | None, params: PyTree) -> jax.Array:
    flat, _, f = _flat_loss(loss_fn, beta, params)
    h = jax.hessian(f)(flat)
    return 0.5 * (h + h.T)


def _projector_matrix(project_out: Callable, params: PyTree) -> jax.Array:
    """``P`` (n, n) of a projector callable, symmetrized."""
    flat, unravel = flatten(params)
    proj = project_out(params)
    p = jax.vmap(lambda v: flatten(proj(unravel(v)))[0].astype(flat.dtype))(
        jnp.eye(flat.shape[0], dtype=flat.dtype)
    )
    return 0.5 * (p + p.T)


def _directions(out: Any, params: PyTree, n: int, dtype: Any) -> jax.Array:
    """``project_out``'s directions as an ``(m, n)`` matrix (ValueError naming a bad leaf)."""
    if isinstance(out, (jax.Array, np.ndarray)) and np.ndim(out) == 2 and np.shape(out)[1] == n:
        return jnp.asarray(out, dtype)
    m = check_stacked(out, "project_out(params)")
    check_same_tree(params, jax.tree.map(lambda x: x[0], out), ("params", "project_out(params)[i]"))
    return flatten_stacked(out).astype(dtype).reshape(m, n)


def _direction_basis(v: jax.Array) -> tuple[jax.Array, jax.Array, int]:
    """Orthonormal bases of ``span(v)`` (masked, ``(n, m)``) and of its complement.

    Returns ``(q, complement, rank)``; outside jit dependent directions are
    dropped, under jit they raise at run time.
    """
    m, n = v.shape
    if m >= n:
        raise ValueError(f"project_out: {m} directions to remove leave nothing of {n} parameters")
    u, s, _ = jnp.linalg.svd(v.T, full_matrices=True)
    mask = s > _rank_tol(s, v.shape)
    if isinstance(s, jax.core.Tracer):
        rank = m
        eqx = require("equinox", "hessian_spectrum(project_out=...) under jit (its run-time check)")
        u = eqx.error_if(
            u,
            jnp.logical_not(jnp.all(mask)),
            "project_out: the directions are linearly dependent; under jit they must be "
            "independent (call hessian_spectrum outside jit to drop dependent ones)",
        )
    else:
        rank = int(np.sum(np.asarray(mask)))
    return u[:, :m] * mask.astype(u.dtype), u[:, rank:], rank


@functools.partial(jax.jit, static_argnames=("loss_fn", "beta", "projector", "depth"))
def _krylov(
    loss_fn: Callable,
    beta: float | None,
    params: PyTree,
    starts: jax.Array,
    q: jax.Array | None,
    projector: Callable | None,
    depth: int,
) -> tuple[jax.Array, jax.Array, jax.Array]:
    """Lanczos from each row of ``starts`` on ``P H P``; see :func:`_lanczos_ritz`."""
    flat, unravel, f = _flat_loss(loss_fn, beta, params)
    hvp = _hvp(f, flat)
    if projector is not None:
        proj = projector(params)
        project = lambda v: flatten(proj(unravel(v)))[0].astype(flat.dtype)
    elif q is not None:
        project = lambda v: v - q @ (q.T @ v)
    else:
        project = lambda v: v
    matvec = lambda v: project(hvp(project(v)))
    return jax.lax.map(lambda v: _lanczos_ritz(matvec, project(v), depth), starts)


def _select(ev: jax.Array, k: int | None, which: str) -> jax.Array:
    if k is None:
        return ev
    k = min(k, ev.shape[0])
    if which == "largest":
        return ev[ev.shape[0] - k :]
    if which == "smallest":
        return ev[:k]
    if 2 * k >= ev.shape[0]:
        return ev
    return jnp.concatenate([ev[:k], ev[ev.shape[0] - k :]])


def hessian_spectrum(
    loss_fn: Callable[[PyTree], jax.Array],
    params: PyTree,
    *,
    k: int | None = None,
    which: str = "largest",
    method: str = "auto",
    smooth_relu: float | None = None,
    project_out: Callable[[PyTree], Any] | None = None,
    key: jax.Array | None = None,
    num_matvecs: int | None = None,
    num_probes: int = 16,
    grid_points: int = 1000,
    sigma: float | None = None,
    dense_max: int = 2048,
) -> HessianSpectrum:
    """Eigenvalues of the Hessian of ``loss_fn`` at ``params``, ascending.

    ``params`` is flattened with ``jax.flatten_util.ravel_pytree`` (``n``
    entries) and the Hessian is applied by forward-over-reverse
    differentiation, :math:`Hv = \\partial_t \\nabla L(\\theta + t v)|_{t=0}`.

    * ``dense``: ``jax.hessian`` of the flat loss, symmetrized
      :math:`(H + H^\\top)/2`, ``eigh``: every eigenvalue, exact to rounding
      (:math:`O(n)` Hessian-vector products, :math:`O(n^2)` memory, :math:`O(n^3)` time).
    * ``lanczos``: ``num_matvecs`` steps of Lanczos with full
      reorthogonalization (matfree's ``tridiag_sym``) from a random start;
      the extreme Ritz values converge first. A Krylov method sees each
      distinct eigenvalue once: it does not resolve multiplicities, so the
      ``k`` smallest of a Hessian with a zero eigenspace (a symmetric network
      at a minimum) are *not* ``k`` zeros; use ``dense`` to count them.
    * ``slq``: stochastic Lanczos quadrature: for each of ``num_probes``
      Gaussian probes :math:`v`, Lanczos gives a tridiagonal :math:`T` whose
      eigenpairs :math:`(\\theta_j, u_j)` make a Gauss quadrature
      :math:`v^\\top f(H) v / \\lVert v \\rVert^2 \\approx \\sum_j u_{j,1}^2 f(\\theta_j)`;
      averaged over probes it estimates :math:`\\operatorname{tr} f(H)/n`,
      and smoothed by a Gaussian kernel it is the spectral density

      .. math::

         \\phi(t) = \\frac{1}{P} \\sum_{p=1}^{P} \\sum_j u_{p,j,1}^2 \\,
                    \\mathcal{N}(t;\\, \\theta_{p,j}, \\sigma^2).

    * ``auto``: ``dense`` up to ``dense_max`` parameters, else ``lanczos``
      when ``k`` is given and ``slq`` otherwise.

    Everything runs in the dtype of ``params``: counting (numerically) zero
    eigenvalues needs float64 (at the exact sawtooth fit the zero modes sit
    at :math:`|\\lambda| \\le 3 \\cdot 10^{-16} \\lambda_{\\max}`, the next
    eigenvalue at :math:`5 \\cdot 10^{-11} \\lambda_{\\max}`). Compiled code
    is cached on ``loss_fn`` (and a projector ``project_out``), so repeated
    calls with the same function (a spectrum per checkpoint) do not recompile.

    Args:
      loss_fn: ``params -> scalar``, twice differentiable where evaluated
        (see ``smooth_relu``).
      params: where the Hessian is taken (any pytree of float arrays).
      k: number of extreme eigenvalues (``dense``/``lanczos``); ``None`` with
        ``dense`` returns all ``n``. Required for ``lanczos``.
      which: ``'largest'``, ``'smallest'`` or ``'both'`` (``k`` of each end).
      method: ``'auto'``, ``'dense'``, ``'lanczos'`` or ``'slq'``.
      smooth_relu: if given, :math:`\\beta`: every ReLU of ``loss_fn`` is
        replaced by :math:`\\mathrm{softplus}(\\beta x)/\\beta` (via
        :func:`with_smooth_relu`), as the sawtooth paper does for its Hessians.
        Note this breaks the rescaling symmetry (softplus is not positively
        homogeneous), so the orbit's zero modes become small positive ones.
      project_out: ``params -> D``, the directions to remove (e.g. the
        tangents of the symmetry orbit at ``params``): either a stacked
        params pytree (leading axis ``m``), a ``(m, n)`` array of flat
        directions, or a callable ``v -> P v`` projecting a params-shaped
        ``v`` onto the complement to keep (e.g. a horizontal projection).
        Directions need not be orthonormal; dependent ones are dropped
        (outside jit; under jit they must be independent). The spectrum is
        then that of :math:`P H P` restricted to the kept subspace:
        ``n - rank`` eigenvalues for ``dense``.
      key: PRNG key for the Lanczos start and the SLQ probes (default
        ``jax.random.key(0)``).
      num_matvecs: Krylov depth (``lanczos``: default
        ``min(n, max(4 k, k + 40))``; ``slq``: default ``min(n, 80)``).
      num_probes: SLQ probes.
      grid_points: SLQ density grid size.
      sigma: SLQ kernel width (default 1% of the node range).
      dense_max: largest ``n`` for which ``auto`` picks ``dense``.

    Returns:
      :class:`HessianSpectrum`.

    Raises:
      ValueError: for an unknown ``method``/``which``, a missing or
        non-positive ``k`` with ``lanczos``, a ``num_matvecs`` out of range, a
        non-float leaf or a non-scalar ``loss_fn`` (naming what is wrong), or
        ``project_out`` output that does not match ``params`` (naming the leaf).

    References:
      Lanczos. *An iteration method for the solution of the eigenvalue problem
      of linear differential and integral operators*, 1950.

      Pearlmutter. *Fast exact multiplication by the Hessian*, 1994
      (Hessian-vector products).

      Ubaru, Chen, Saad. *Fast estimation of tr(f(A)) via stochastic Lanczos
      quadrature*, 2017 (SIMAX 38(4)).

      Ghorbani, Krishnan, Xiao. *An Investigation into Neural Net
      Optimization via Hessian Eigenvalue Density*, 2019.
      https://arxiv.org/abs/1901.10159

      Krämer, Moreno-Muñoz, Roy, Hauberg. *Gradients of functions of large
      matrices*, 2024 (matfree). https://arxiv.org/abs/2405.17277
    """
    if method not in _METHODS:
        raise ValueError(f"method must be one of {_METHODS}, got {method!r}")
    if which not in _WHICH:
        raise ValueError(f"which must be one of {_WHICH}, got {which!r}")
    if k is not None and (int(k) != k or k < 1):
        raise ValueError(f"k must be a positive integer or None, got {k}")
    if int(num_probes) != num_probes or num_probes < 1:
        raise ValueError(f"num_probes must be a positive integer, got {num_probes}")
    if int(grid_points) != grid_points or grid_points < 2:
        raise ValueError(f"grid_points must be an integer >= 2, got {grid_points}")
    check_floating(params, "params")
    check_loss_fn(loss_fn, params)
    if smooth_relu is not None:
        _check_beta(smooth_relu)
    beta = None if smooth_relu is None else float(smooth_relu)
    loss_fn = hashable(loss_fn)
    flat, unravel = flatten(params)
    n, dtype = flat.shape[0], flat.dtype
    if method == "auto":
        method = "dense" if n <= dense_max else ("lanczos" if k is not None else "slq")
    if method == "lanczos" and k is None:
        raise ValueError("method='lanczos' needs k (how many extreme eigenvalues)")
    if key is None:
        key = jax.random.key(0)

    # What project_out keeps: a masked basis q of the removed span, or a projector.
    q = complement = projector = None
    dim = n
    if project_out is not None:
        out = project_out(params)
        if callable(out):
            projector = hashable(project_out)
            check_same_tree(
                params,
                jax.eval_shape(lambda v: out(unravel(v)), flat),
                ("params", "project_out(params)(v)"),
            )
        else:
            q, complement, rank = _direction_basis(_directions(out, params, n, dtype))
            dim = n - rank

    if method == "dense":
        h = _dense_hessian(loss_fn, beta, params)
        if projector is not None:
            w, u = jnp.linalg.eigh(_projector_matrix(projector, params))
            if isinstance(w, jax.core.Tracer):
                raise ValueError(
                    "project_out: a projector callable needs concrete values with "
                    "method='dense' (its rank sets the output size); call "
                    "hessian_spectrum outside jit, or return the removed directions instead"
                )
            complement = u[:, n - int(np.sum(np.asarray(w) > 0.5)) :]
        if complement is not None:
            h = complement.T @ h @ complement
            h = 0.5 * (h + h.T)
        return HessianSpectrum(_select(jnp.linalg.eigvalsh(h), k, which))

    if method == "lanczos":
        depth = num_matvecs if num_matvecs is not None else min(dim, max(4 * k, k + 40))
        _check_depth(depth, dim)
        start = jax.random.normal(key, (1, n), dtype)
        theta, _, valid = jax.tree.map(
            lambda x: x[0], _krylov(loss_fn, beta, params, start, q, projector, depth)
        )
        if not isinstance(valid, jax.core.Tracer):
            found = int(np.sum(np.asarray(valid)))
            need = k * (2 if which == "both" else 1)
            if found < min(need, depth):
                warnings.warn(
                    f"hessian_spectrum: the Krylov space became invariant after {found} "
                    f"Lanczos steps (the Hessian has only {found} distinct eigenvalues seen "
                    f"from the start vector), fewer than the {need} asked for; the rest of "
                    "the result repeats the innermost one found. Multiplicities need "
                    "method='dense'.",
                    stacklevel=2,
                )
        return HessianSpectrum(_select_valid(theta, valid, k, which))

    depth = num_matvecs if num_matvecs is not None else min(dim, 80)
    _check_depth(depth, dim)
    starts = jax.random.normal(key, (num_probes, n), dtype)
    nodes, weights, valid = _krylov(loss_fn, beta, params, starts, q, projector, depth)
    return _quadrature(nodes, weights, valid, grid_points, sigma)


@functools.partial(jax.jit, static_argnames=("grid_points",))
def _quadrature(
    nodes: jax.Array, weights: jax.Array, valid: jax.Array, grid_points: int, sigma: Any
) -> HessianSpectrum:
    """Pools the probes' Gauss rules and smooths them into a density."""
    # tail nodes of a deflated probe carry no weight; park them on a valid node
    first = jnp.take_along_axis(nodes, jnp.argmax(valid, axis=1)[:, None], axis=1)
    nodes = jnp.where(valid, nodes, first)
    nodes, weights = nodes.reshape(-1), weights.reshape(-1) / valid.shape[0]
    order = jnp.argsort(nodes)
    nodes, weights = nodes[order], weights[order]
    grid, density = _density(nodes, weights, grid_points, sigma)
    return HessianSpectrum(nodes, weights, grid, density)


def _check_depth(depth: int, dim: int) -> None:
    if int(depth) != depth or not 1 <= depth <= dim:
        raise ValueError(f"num_matvecs must be an integer in [1, {dim}], got {depth}")


def _lanczos_ritz(
    matvec: Callable[[jax.Array], jax.Array], v0: jax.Array, depth: int
) -> tuple[jax.Array, jax.Array, jax.Array]:
    """Lanczos (matfree, full reorthogonalization) with deflation at breakdown.

    When the Krylov space becomes invariant after ``s < depth`` steps (a
    Hessian with a multiple eigenvalue, e.g. the zero eigenspace of a
    symmetric network, has few distinct eigenvalues), the next off-diagonal
    entry is at rounding level and the basis vectors built from it are not
    orthogonal: the tail of the tridiagonal matrix is noise. The couplings
    from the first such entry on are cut, so the leading ``s x s`` block
    (whose Ritz values are exact eigenvalues) is kept and the tail is flagged.

    Returns:
      Ritz values (ascending), their Gauss weights (squared first entries of
      the eigenvectors; zero on the flagged tail), and a mask of the Ritz
      values of the leading block.
    """
    tridiag = decomp.tridiag_sym(depth, reortho="full", custom_vjp=False)
    _, t, *_ = tridiag(matvec, v0)
    d = jnp.diagonal(t)
    b = jnp.abs(jnp.diagonal(t, 1))
    scale = jnp.max(jnp.abs(t))
    tol = jnp.sqrt(jnp.finfo(t.dtype).eps) * scale
    idx = jnp.arange(depth)
    small = jnp.concatenate([b <= tol, jnp.ones((1,), bool)])
    size = jnp.argmax(small) + 1  # the leading block is t[:size, :size]
    inside = idx < size
    b = jnp.where(idx[:-1] < size - 1, b, 0.0)
    d = jnp.where(inside, d, d[0])
    t = jnp.diag(d) + jnp.diag(b, 1) + jnp.diag(b, -1)
    theta, u = jnp.linalg.eigh(t)
    valid = jnp.sum(jnp.where(inside[:, None], u**2, 0.0), axis=0) > 0.5
    weights = jnp.where(valid, u[0] ** 2, 0.0)
    return theta, weights, valid


def _select_valid(theta: jax.Array, valid: jax.Array, k: int, which: str) -> jax.Array:
    """Extreme Ritz values of the leading block; flagged tail values are never chosen.

    Where the leading block has fewer than ``k`` values on the side asked for
    (the caller warns), the innermost valid value is repeated.
    """
    lo = jnp.min(jnp.where(valid, theta, jnp.inf))
    hi = jnp.max(jnp.where(valid, theta, -jnp.inf))
    low_side = jnp.sort(jnp.where(valid, theta, hi))  # flagged values pushed to the top
    high_side = jnp.sort(jnp.where(valid, theta, lo))  # flagged values pushed to the bottom
    k = min(k, theta.shape[0])
    if which == "largest":
        return high_side[theta.shape[0] - k :]
    if which == "smallest":
        return low_side[:k]
    if 2 * k >= theta.shape[0]:
        return high_side
    return jnp.concatenate([low_side[:k], high_side[theta.shape[0] - k :]])


def _density(
    nodes: jax.Array, weights: jax.Array, grid_points: int, sigma: float | None
) -> tuple[jax.Array, jax.Array]:
    lo, hi = nodes[0], nodes[-1]
    span = hi - lo
    scale = jnp.maximum(jnp.maximum(jnp.abs(lo), jnp.abs(hi)), jnp.finfo(nodes.dtype).tiny)
    default = 0.01 * jnp.maximum(span, 1e-3 * scale)
    s = default if sigma is None else jnp.asarray(sigma, nodes.dtype)
    grid = jnp.linspace(lo - 5 * s, hi + 5 * s, grid_points)
    z = (grid[:, None] - nodes[None, :]) / s
    density = (weights[None, :] * jnp.exp(-0.5 * z**2)).sum(axis=1) / (s * jnp.sqrt(2 * jnp.pi))
    return grid, density
