"""PCA of optimization trajectories, and its random-walk null baseline."""

from __future__ import annotations

import functools
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp

from quotient_opt.landscape._common import PyTree, check_floating, check_stacked, flatten_stacked


class PCAResult(NamedTuple):
    """Principal components of a trajectory.

    Attributes:
      components: the first ``k`` principal directions as a stacked params
        pytree (leading axis ``k``, unit norm over all leaves together);
        ``None`` for :func:`random_walk_pca`.
      explained_variance_ratio: ``(k,)``, each component's share of the total
        variance of the trajectory (over all components, so the first ``k``
        sum to at most 1).
      projections: ``(T, k)`` coordinates of the centered trajectory on the
        components (the curve to plot).
    """

    components: PyTree | None
    explained_variance_ratio: jax.Array
    projections: jax.Array


def _orient(u: jax.Array, vt: jax.Array | None) -> tuple[jax.Array, jax.Array | None]:
    """Fixes SVD signs: each projection moves forward (last minus first point >= 0)."""
    sign = jnp.where(u[-1] - u[0] < 0, -1.0, 1.0).astype(u.dtype)
    return u * sign, (None if vt is None else vt * sign[:, None])


def trajectory_pca(history: PyTree, *, k: int | None = None) -> PCAResult:
    """PCA of a trajectory of parameters (leading axis = time).

    With the centered trajectory :math:`X = [\\theta_t - \\bar\\theta]_{t=1}^{T}`
    (a :math:`T \\times n` matrix) and its thin SVD :math:`X = U S V^\\top`,
    the components are the rows of :math:`V^\\top`, the projections
    :math:`U S`, and the ratios :math:`s_i^2 / \\sum_j s_j^2`. Signs are
    fixed so that every projection ends above where it starts.

    A low-dimensional-looking PCA is not evidence of structure by itself: a
    random walk in high dimension puts :math:`6/\\pi^2 \\approx 61\\%` of its
    variance on the first component and :math:`6/(\\pi^2 i^2)` on the
    :math:`i`-th. Compare with :func:`random_walk_pca` (same ``T`` and
    ``n``) before reading meaning into the ratios; the projections of a
    random walk on its components are near-cosines
    :math:`\\cos(\\pi i t / T)` (Lissajous figures in 2-D plots).

    Args:
      history: a stacked params pytree, every leaf with the same leading
        axis ``T >= 2`` (e.g. the per-step params from a ``lax.scan``).
      k: number of components kept (default and maximum ``min(T, n)``).

    Returns:
      :class:`PCAResult`.

    Raises:
      ValueError: naming a leaf that is not floating-point, is a scalar, or
        whose leading axis differs from the others'; for ``T < 2``; for a
        ``k`` below 1.

    References:
      Lipton. *Stuck in a What? Adventures in Weight Space*, 2016.
      https://arxiv.org/abs/1602.07320

      Antognini, Sohl-Dickstein. *PCA of high dimensional random walks with
      comparison to neural network training*, 2018.
      https://arxiv.org/abs/1806.08805
    """
    check_floating(history, "history")
    t = check_stacked(history, "history", min_length=2)
    x = flatten_stacked(history)
    x = x.astype(jnp.promote_types(x.dtype, jnp.float32))
    n = x.shape[1]
    kk = _check_k(k, min(t, n))
    u, vt, ratio = _pca(x, kk)
    leaves, treedef = jax.tree.flatten(history)
    comps, i = [], 0
    for leaf in leaves:
        size = leaf[0].size
        comps.append(vt[:, i : i + size].reshape((kk,) + leaf.shape[1:]).astype(leaf.dtype))
        i += size
    return PCAResult(jax.tree.unflatten(treedef, comps), ratio, u)


@functools.partial(jax.jit, static_argnums=1)
def _pca(x: jax.Array, k: int) -> tuple[jax.Array, jax.Array, jax.Array]:
    xc = x - jnp.mean(x, axis=0, keepdims=True)
    u, s, vt = jnp.linalg.svd(xc, full_matrices=False)
    u, vt = _orient(u[:, :k] * s[:k], vt[:k])
    return u, vt, _ratios(s**2)[:k]


def _check_k(k: int | None, kmax: int) -> int:
    if k is None:
        return kmax
    if int(k) != k or k < 1:
        raise ValueError(f"k must be a positive integer or None, got {k}")
    return min(int(k), kmax)


def _ratios(var: jax.Array) -> jax.Array:
    total = jnp.sum(var)
    return var / jnp.where(total > 0, total, 1.0)


def random_walk_pca(
    steps: int,
    dim: int | None,
    key: jax.Array | None = None,
    *,
    k: int | None = None,
    dtype: Any = jnp.float32,
) -> PCAResult:
    """The null baseline for :func:`trajectory_pca`: PCA of a Gaussian random walk.

    The walk :math:`x_t = \\sum_{s \\le t} \\xi_s`, :math:`\\xi_s \\sim
    \\mathcal{N}(0, I_{\\text{dim}})`, has ``steps`` points. PCA only needs the
    :math:`T \\times T` Gram matrix of the centered walk, so memory is
    :math:`O(T^2 + T \\cdot \\text{chunk})`, whatever ``dim``. With
    ``dim=None`` the Gram matrix is replaced by its limit as
    :math:`\\text{dim} \\to \\infty`, :math:`C \\min(s, t) C` with
    :math:`C = I - \\mathbf{1}\\mathbf{1}^\\top / T`: deterministic, no
    ``key`` needed. As :math:`T \\to \\infty` too, the ratios tend to
    :math:`6 / (\\pi^2 i^2)` (first: 0.608).

    Args:
      steps: number of points ``T >= 2`` (match the trajectory's).
      dim: dimension (match the number of parameters), or ``None`` for the
        infinite-dimensional limit.
      key: PRNG key (required when ``dim`` is given).
      k: number of components kept (default ``min(T, dim)``).
      dtype: float dtype of the computation.

    Returns:
      :class:`PCAResult` with ``components=None``.

    References:
      Antognini, Sohl-Dickstein. *PCA of high dimensional random walks with
      comparison to neural network training*, 2018.
      https://arxiv.org/abs/1806.08805
    """
    if int(steps) != steps or steps < 2:
        raise ValueError(f"steps must be an integer >= 2, got {steps}")
    steps = int(steps)
    dtype = jnp.promote_types(dtype, jnp.float32)
    if dim is None:
        kk = _check_k(k, steps)
        return _random_walk(steps, None, None, kk, dtype)
    if int(dim) != dim or dim < 1:
        raise ValueError(f"dim must be a positive integer or None, got {dim}")
    if key is None:
        raise ValueError("random_walk_pca: a key is needed when dim is given")
    kk = _check_k(k, min(steps, int(dim)))
    return _random_walk(steps, int(dim), key, kk, dtype)


@functools.partial(jax.jit, static_argnums=(0, 1, 3, 4))
def _random_walk(
    steps: int, dim: int | None, key: jax.Array | None, kk: int, dtype: Any
) -> PCAResult:
    idx = jnp.arange(1, steps + 1, dtype=dtype)
    c = jnp.eye(steps, dtype=dtype) - 1.0 / steps
    if dim is None:
        gram = c @ jnp.minimum(idx[:, None], idx[None, :]) @ c
    else:
        chunk = max(1, min(dim, (1 << 22) // steps))
        nchunks = -(-dim // chunk)

        def add(g, kc):
            w = jnp.cumsum(jax.random.normal(kc, (steps, chunk), dtype), axis=0)
            w = w - jnp.mean(w, axis=0, keepdims=True)
            return g + w @ w.T, None

        keys = jax.random.split(key, nchunks)
        gram = jax.lax.scan(add, jnp.zeros((steps, steps), dtype), keys[:-1])[0]
        last = dim - chunk * (nchunks - 1)
        w = jnp.cumsum(jax.random.normal(keys[-1], (steps, last), dtype), axis=0)
        w = w - jnp.mean(w, axis=0, keepdims=True)
        gram = gram + w @ w.T
    var, vec = jnp.linalg.eigh(0.5 * (gram + gram.T))
    var, vec = jnp.maximum(var[::-1], 0.0), vec[:, ::-1]
    proj, _ = _orient(vec[:, :kk] * jnp.sqrt(var[:kk]), None)
    return PCAResult(None, _ratios(var)[:kk], proj)
