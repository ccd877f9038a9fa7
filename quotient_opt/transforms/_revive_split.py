"""The split: a dead unit or max-pool piece becomes a copy of a live sibling.

Elementwise units copy a live unit of the same layer and halve both outgoing
rows (exactly function-preserving where the dead unit was silent); max-pool
pieces copy a live piece of the same window plus a hinge through its data,
placed by a line search on ``value_fn`` and finished by window Newton steps
(:mod:`quotient_opt.transforms._revive_polish`). After a split the revived
unit's optimizer statistics are reset (:func:`_reset_statistics`).
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp

from quotient_opt.symmetry._spec import Symmetry, UnitGroup
from quotient_opt.transforms._revive_polish import _polish_window, _polishable
from quotient_opt.transforms._revive_rows import (
    _bias_column,
    _producing,
    _reading,
    _rows,
    _set_row,
    _write_rows,
)

PyTree = Any


def _masked_pick(key: jax.Array, mask: jax.Array, score: jax.Array | None = None) -> jax.Array:
    """Index of the masked entry with the largest ``score``, ties broken at random."""
    noise = jax.random.uniform(key, mask.shape)
    s = noise if score is None else score.astype(jnp.float32) + noise
    return jnp.argmax(jnp.where(mask, s, -jnp.inf))


# --------------------------------------------------------------------------- the split


def _piece_split(
    sym: Symmetry,
    grp: UnitGroup,
    params: PyTree,
    p: jax.Array,
    alive: jax.Array,
    key: jax.Array,
    value_fn: Callable[[PyTree], jax.Array] | None,
    perturbation: jax.Array,
    num_candidates: int,
    line_search: bool,
) -> tuple[jax.Array, jax.Array, jax.Array]:
    """New incoming vector for dead piece ``p``, its donor, and whether to apply it."""
    n, k = grp.units, grp.pieces
    V = jnp.concatenate(_rows(params, _producing(grp), n), axis=1)
    dim = V.shape[1]
    dtype = V.dtype
    window = p // k
    donors = alive & (jnp.arange(n) // k == window) & (jnp.arange(n) != p)
    bias = _bias_column(grp, params)
    kmask = jnp.ones((dim,), bool) if bias is None else jnp.arange(dim) != bias
    kd, kc = jax.random.split(key)

    if value_fn is None:
        d = _masked_pick(kd, donors)
        xi = jax.random.normal(kc, (dim,), dtype)
        a = perturbation * jnp.linalg.norm(V[d])
        return V[d] + a * xi / jnp.linalg.norm(xi), d, jnp.asarray(True)

    def loss_with(z: jax.Array) -> jax.Array:
        return value_fn(_set_row(params, _producing(grp), n, p, z, jnp.asarray(True)))

    # Curvature-weighted centroid of the inputs each piece of the window wins on:
    # with p a copy of piece j raised by delta, d/db grad_z L = sum_i h_i [x_i, 1].
    def centroid(j: jax.Array) -> jax.Array:
        if bias is None:
            return jnp.zeros((dim,), dtype)
        e = (jnp.arange(dim) == bias).astype(dtype)
        delta = 1e-3 * (jnp.linalg.norm(V[j]) + jnp.finfo(dtype).tiny)
        col = jax.jvp(jax.grad(loss_with), (V[j] + delta * e,), (e,))[1]
        s = col[bias]
        ok = s > 0
        return jnp.where(kmask & ok, col / jnp.where(ok, s, 1), 0)

    first = window * k
    cents = jax.vmap(centroid)(first + jnp.arange(k))  # (k, dim)

    keys = jax.random.split(kc, num_candidates)

    def candidate(key_m: jax.Array) -> tuple[jax.Array, ...]:
        k1, k2 = jax.random.split(key_m)
        d = _masked_pick(k1, donors)
        u = jnp.where(kmask, jax.random.normal(k2, (dim,), dtype), 0)
        u = u / jnp.linalg.norm(u)
        m = cents[d - first]
        step = u if bias is None else u.at[bias].set(-jnp.dot(u, m))
        a = perturbation * jnp.linalg.norm(V[d])
        return d, step * a, jnp.stack([loss_with(V[d] + step * a),
                                       loss_with(V[d] + 2 * step * a)])

    donor, steps, vals = jax.vmap(candidate)(keys)  # (M,), (M, dim), (M, 2)
    base = V[donor]
    l0 = value_fn(params)
    if not line_search:
        best = jnp.argmin(vals[:, 0])
        return base[best] + steps[best], donor[best], jnp.asarray(True)
    # L(t a) = L0 + beta t + gamma t^2 along each ray (exact for squared error).
    d1, d2 = vals[:, 0] - l0, vals[:, 1] - l0
    gamma = (d2 - 2 * d1) / 2
    beta = (4 * d1 - d2) / 2
    t_star = jnp.where(gamma > 0, -beta / (2 * jnp.where(gamma > 0, gamma, 1)), 2.0)
    t_star = jnp.clip(t_star, 1.0, 50.0)
    pred = l0 + beta * t_star + gamma * t_star**2
    pred = jnp.where(beta < 0, pred, jnp.inf)
    best = jnp.argmin(pred)
    z_star = base[best] + t_star[best] * steps[best]
    l_star = loss_with(z_star)
    # Fall back to the best measured point if the quadratic model was off.
    flat = jnp.argmin(vals.reshape(-1))
    z_meas = base[flat // 2] + (1 + flat % 2) * steps[flat // 2]
    l_meas = vals.reshape(-1)[flat]
    use_star = l_star <= l_meas
    z = jnp.where(use_star, z_star, z_meas)
    d = jnp.where(use_star, donor[best], donor[flat // 2])
    improved = jnp.where(use_star, l_star, l_meas) < l0
    return z, d, improved


def _revive_group(
    sym: Symmetry,
    grp: UnitGroup,
    params: PyTree,
    dead: jax.Array,
    alive: jax.Array,
    key: jax.Array,
    value_fn: Callable[[PyTree], jax.Array] | None,
    patience: jax.Array,
    perturbation: jax.Array,
    num_candidates: int,
    line_search: bool,
    newton_steps: int,
) -> tuple[PyTree, jax.Array, jax.Array, jax.Array]:
    """Revives at most one unit of ``grp``: new params, revived unit, its donor, whether done."""
    n, k, W = grp.units, grp.pieces, grp.windows
    if k > 1:
        sibling_alive = jnp.repeat(alive.reshape(W, k).any(axis=1), k)
    else:
        sibling_alive = jnp.full((n,), alive.sum() > 0)
    eligible = (dead >= patience) & sibling_alive
    kp, kd, ks = jax.random.split(key, 3)
    p = _masked_pick(kp, eligible, dead)
    do = eligible.any()
    if k > 1:
        z, d, ok = _piece_split(sym, grp, params, p, alive, ks, value_fn, perturbation,
                             num_candidates, line_search)
        do = do & ok
        new = _set_row(params, _producing(grp), n, p, z, do)
        if value_fn is not None and newton_steps > 0 and _polishable(grp, params):
            polished = _polish_window(grp, new, p // k, value_fn, newton_steps)
            new = jax.tree.map(lambda a, b: jnp.where(do, a, b), polished, new)
        return new, p, d, do
    # Elementwise units: copy a live unit, halve both outgoing rows.
    d = _masked_pick(kd, alive & (jnp.arange(n) != p))
    V = jnp.concatenate(_rows(params, _producing(grp), n), axis=1)
    new = _set_row(params, _producing(grp), n, p, V[d], do)
    O = jnp.concatenate(_rows(new, _reading(grp), W), axis=1)
    half = O[d] / 2
    new = _set_row(new, _reading(grp), W, d, half, do)
    new = _set_row(new, _reading(grp), W, p, half, do)
    return new, p, d, do


def _reset_statistics(
    groups: tuple[UnitGroup, ...],
    picks: tuple[jax.Array, ...],
    params: PyTree,
    moved: PyTree,
    power: int,
    tree: PyTree,
) -> PyTree:
    """One optimizer-state field ``tree`` (moving with ``power``) after the splits ``picks``.

    A revived unit starts with no momentum (fields moving like the gradient,
    power -1) and its donor's other statistics (a clone inherits the scale of
    its gradients); every other unit whose incoming parameters were moved (a
    polished window) loses its now stale momentum.
    """
    kind = "first" if power == -1 else "other"
    for grp, (p, d, do) in zip(groups, picks):
        specs = [(_producing(grp), grp.units)]
        if grp.pieces == 1:
            specs.append((_reading(grp), grp.windows))
        for sp, n in specs:
            if not sp:
                continue
            rows = jnp.concatenate(_rows(tree, sp, n), axis=1)
            val = jnp.zeros_like(rows[d]) if kind == "first" else rows[d]
            tree = _set_row(tree, sp, n, p, val, do.astype(bool))
        if kind == "first":
            before = jnp.concatenate(_rows(params, _producing(grp), grp.units), axis=1)
            after = jnp.concatenate(_rows(moved, _producing(grp), grp.units), axis=1)
            hit = jnp.any(before != after, axis=1)[:, None]
            tree = _write_rows(
                tree, _producing(grp), grp.units,
                [jnp.where(hit, 0, b) for b in _rows(tree, _producing(grp), grp.units)],
            )
    return tree
