"""The Gram matrix :math:`J^\\top J` of the infinitesimal rescaling action, and its solve.

Over the windows (units after pooling) of the rescalable groups, :math:`J^\\top J`
is a grounded, weighted graph Laplacian: diagonal
:math:`\\|\\text{in}_u\\|^2 + \\|\\text{out}_u\\|^2`, couplings minus the squared
kernel entries joining two units. It is diagonally dominant, so Jacobi-scaled
conjugate gradients converge in a few iterations and touch only the small
coupling matrices. Used by the horizontal projection and by the Newton steps
of the canonicalization (whose Hessian is :math:`4 J^\\top J`).
"""

from __future__ import annotations

import dataclasses
from typing import Any

import jax
import jax.numpy as jnp

from quotient_opt.symmetry._spec import Path, Symmetry, broadcast_along, map_with_path

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
