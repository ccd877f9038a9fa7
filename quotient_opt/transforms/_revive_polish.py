"""Window Newton steps ("polish") on the pieces of a max-pool window after a split.

With the partition of the data among a window's pieces fixed, a squared
error is quadratic in the pieces, so a Newton step is the least-squares fit
of every piece on the points it wins; repeated, it alternates partition and
fit (alternating minimization for max-affine regression).
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp

from quotient_opt.symmetry._spec import UnitGroup
from quotient_opt.transforms._revive_rows import (
    _incoming_dim,
    _producing,
    _rows,
    _sizes,
    _split_cols,
    _write_rows,
)

PyTree = Any

#: Largest window (pieces x incoming parameters) polished with a dense Hessian.
_MAX_POLISH_SIZE = 256


def _polish_window(
    grp: UnitGroup,
    params: PyTree,
    window: jax.Array,
    value_fn: Callable[[PyTree], jax.Array],
    steps: int,
    min_decrease: float = 1.0,
) -> PyTree:
    """Newton steps on the pieces of one window, each kept only if it lowers the loss.

    With the partition of the data among the pieces fixed, a squared error is
    quadratic in the window's pieces, so each step is the least-squares fit of
    every piece on the points it wins; repeating it alternates partition and
    fit (alternating minimization for max-affine regression).

    The Hessian is block-diagonal over the pieces: each point's window output
    is its winning piece alone, so for a loss that sums over points no second
    derivative couples two pieces. Its ``k`` diagonal blocks come from ``dim``
    Hessian-vector products (each tangent moves column ``c`` of every piece at
    once) instead of the ``k * dim`` of a dense Hessian, linearized once with
    the gradient. For a loss that couples points the blocks are an
    approximation, and the step is kept only if it lowers the loss anyway.
    """
    n, k = grp.units, grp.pieces
    V = jnp.concatenate(_rows(params, _producing(grp), n), axis=1)
    dim = V.shape[1]
    first = window * k

    def with_window(Z: jax.Array) -> PyTree:
        full = jax.lax.dynamic_update_slice(V, Z.reshape(k, dim), (first, 0))
        blocks = _split_cols(full, _sizes(_rows(params, _producing(grp), n)))
        return _write_rows(params, _producing(grp), n, blocks)

    def loss(Z: jax.Array) -> jax.Array:
        return value_fn(with_window(Z))

    def step(_: Any, carry: tuple[jax.Array, jax.Array, jax.Array]) -> tuple[jax.Array, ...]:
        Z, l, going = carry
        # Reverse over reverse (H is symmetric, so its vjp is the hvp): under vmap
        # the forward-over-reverse products measured 10-20x slower here.
        g, hvp = jax.vjp(jax.grad(loss), Z)
        cols = jax.vmap(lambda t: hvp(t)[0])(jnp.tile(jnp.eye(dim, dtype=Z.dtype), (1, k)))
        H = cols.reshape(dim, k, dim).transpose(1, 2, 0)  # (k, dim, dim): H[j] = block j
        # Pseudo-inverse: a dead piece leaves H singular, and in float32 a
        # damped solve of a nearly singular H is unreliable.
        w, Q = jnp.linalg.eigh((H + H.transpose(0, 2, 1)) / 2)
        cut = k * dim * jnp.finfo(Z.dtype).eps * jnp.max(jnp.abs(w))
        inv = jnp.where(w > cut, 1 / jnp.where(w > cut, w, 1), 0)
        gb = g.reshape(k, dim, 1)
        dz = -(Q @ (inv[..., None] * (Q.transpose(0, 2, 1) @ gb))).reshape(-1)
        Zn = Z + jnp.where(jnp.isfinite(dz), dz, 0)
        ln = loss(Zn)
        better = going & (ln < min_decrease * l)
        return jnp.where(better, Zn, Z), jnp.where(better, ln, l), better

    Z0 = jax.lax.dynamic_slice(V, (first, 0), (k, dim)).reshape(-1)
    # Stop at the first step that does not lower the loss (a fixed point).
    # Unrolled on purpose: under vmap, the same body inside a lax.while_loop or
    # fori_loop (jax 0.10) computed wrong steps for some batch members.
    carry = (Z0, loss(Z0), jnp.asarray(True))
    for i in range(steps):
        carry = step(i, carry)
    return with_window(carry[0])


def _polishable(grp: UnitGroup, params: PyTree) -> bool:
    """Whether ``grp`` is a max-pool group small enough for dense window Newton steps."""
    return grp.pieces > 1 and grp.pieces * _incoming_dim(grp, params) <= _MAX_POLISH_SIZE


def _polish_all(
    groups: list[UnitGroup], params: PyTree, value_fn: Callable[[PyTree], jax.Array],
    newton_steps: int,
) -> PyTree:
    """:func:`_polish_window` on every window of ``groups``, each step kept only if it at
    least halves the loss."""
    for grp in groups:
        params = jax.lax.fori_loop(
            0, grp.windows,
            lambda w, q, grp=grp: _polish_window(grp, q, w, value_fn, newton_steps, 0.5),
            params,
        )
    return params
