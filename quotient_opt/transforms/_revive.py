"""Reviving dead units and max-pool pieces by splitting an exchangeable sibling.

A hidden unit that is inactive on every training point (a ReLU below zero, a
max-pool piece that never wins its window) receives exactly zero gradient, and
so does every weight setting of it that stays inactive: the set of parameters
computing the network's function contains a whole flat region around it, and
gradient methods cannot leave it. This is the MaxPool stall: one piece wins on
every point, the other is dead, and the network computes the best single plane.

:func:`revive_dead_units` detects such units from the gradient alone and moves
each to a point of (or next to) the same function's fibre where it receives
gradient, by *splitting* a live sibling that the symmetry says is
exchangeable with it:

* **Elementwise units (ReLU, ...)**: the dead unit ``p`` becomes a copy of a live
  unit ``d`` of the same layer and the outgoing weights of both are halved,

  .. math::
      w^{in}_p \\leftarrow w^{in}_d, \\qquad
      w^{out}_p,\\ w^{out}_d \\leftarrow \\tfrac12\\, w^{out}_d,

  which is exactly function-preserving on every input where ``p`` was inactive
  (the dead unit contributed nothing there).

* **Max-pool pieces**: the dead piece ``p`` becomes the live piece ``d`` of the
  same window plus a hinge whose kink runs through ``d``'s data,

  .. math::
      (w_p, b_p) \\leftarrow (w_d, b_d) + \\varepsilon\\,(u, -u^\\top m),
      \\qquad \\max(z_d, z_p) = z_d + \\varepsilon\\,\\mathrm{relu}(u^\\top(x - m)),

  where ``m`` is the curvature-weighted centroid of the inputs on which ``d``
  wins (read off one Hessian column of the loss, no data needed) and ``u`` a
  random direction. With ``value_fn`` (the loss, as in Optax's line searches)
  ``num_candidates`` directions are tried, the loss along each ray
  :math:`\\varepsilon \\mapsto L` is fitted by a quadratic (exact for a squared
  error) and the split goes to the best minimizer; it is applied only if it
  lowers the loss. Then ``newton_steps`` Newton steps on the window's pieces
  (exact least squares of each piece on the points it wins, for a squared
  error: alternating minimization for max-affine regression) finish the
  placement, each kept only if it lowers the loss, and the window's stale
  momentum is dropped. Without ``value_fn`` the split is ``d`` plus a random
  perturbation of relative size ``perturbation``.

Detection: unit ``(w, j)`` is *dead* when the gradient of all its incoming
parameters is exactly zero. With ``value_fn``, a max-pool piece is also
*starved* (treated as dead at a check) when it wins less than ``min_support``
of its window's data, read off the loss curvature along its bias: a piece
that wins one point can fit it exactly, and its gradient then vanishes
without being exactly zero. A dead unit is revived after ``patience`` consecutive dead
steps if a sibling (same window for pieces, same layer for units) is alive.
Exact zeros are what a unit that is inactive on every point gets, and what a
live unit essentially never gets; a network that fits the data exactly has no
live donor and is left alone. One unit per unit group is revived per step, the
one dead longest. Its first moments (incoming and, for units, outgoing) are
reset to zero and its second moments copied from the donor; every unit whose
incoming weights a polish moved loses its momentum too.

References:
  Liu, Wang, Wu, Liu. *Splitting Steepest Descent for Growing Neural
  Architectures*, 2019. https://arxiv.org/abs/1910.02366

  Chen, Goodfellow, Shlens. *Net2Net: Accelerating Learning via Knowledge
  Transfer*, 2015. https://arxiv.org/abs/1511.05641

  Lu, Shin, Su, Karniadakis. *Dying ReLU and Initialization: Theory and
  Numerical Examples*, 2019. https://arxiv.org/abs/1903.06733

  Ghosh, Pananjady, Guntuboyina, Ramchandran. *Max-Affine Regression: Provable,
  Tractable, and Near-Optimal Statistical Estimation*, 2019.
  https://arxiv.org/abs/1906.09255
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import optax

from quotient_opt.transforms._transport import Laws, map_state
from quotient_opt import _validate as validate
from quotient_opt.transforms._common import init_inner, on_subtree
from quotient_opt.transforms._order import JUMP, mark
from quotient_opt.symmetry import _views as views
from quotient_opt.symmetry._paths import Path, leaves_by_path, map_with_path
from quotient_opt.symmetry._spec import AxisRef, Symmetry, UnitGroup

PyTree = Any
Specs = tuple[AxisRef, ...]

#: Largest window (pieces x incoming parameters) polished with a dense Hessian.
_MAX_POLISH_SIZE = 256


class ReviveDeadUnitsState(NamedTuple):
    """State of :func:`revive_dead_units`.

    Attributes:
      count: number of updates so far (int32).
      dead_steps: per unit group, consecutive steps each unit has had an exactly
        zero incoming gradient (int32, ``windows * pieces``).
      revivals: number of units revived so far (int32).
      attempts: number of checks at which some unit was due (dead for
        ``patience`` steps, or starved); a due unit's split is applied only
        where a sibling is alive and, with ``value_fn``, the loss drops (int32).
      key: PRNG key of the perturbations.
      inner_state: the inner optimizer's state.
    """

    count: jax.Array
    dead_steps: tuple[jax.Array, ...]
    revivals: jax.Array
    attempts: jax.Array
    key: jax.Array
    inner_state: optax.OptState


# --------------------------------------------------------------------------- unit rows


def _rows(tree: PyTree, specs: Specs, n: int) -> list[jax.Array]:
    """The ``(n, e)`` blocks holding unit ``i``'s entries in row ``i``, one per ref
    (replicated: rows of differently sharded leaves are concatenated and indexed)."""
    leaves = leaves_by_path(tree)
    return [views.replicated(views.rows(leaves[r.path], r, n)) for r in specs]


def _write_rows(tree: PyTree, specs: Specs, n: int, blocks: list[jax.Array]) -> PyTree:
    """Inverse of :func:`_rows`: writes the blocks back into their leaves."""
    table: dict[Path, list[tuple[AxisRef, jax.Array]]] = {}
    for r, b in zip(specs, blocks):
        table.setdefault(r.path, []).append((r, b))

    def put(path: Path, leaf: jax.Array) -> jax.Array:
        new = leaf
        for r, b in table.get(path, ()):
            new = views.write_rows(new, r, n, b)
        return views.sharded_like(new, leaf)

    return map_with_path(put, tree)


def _sizes(blocks: list[jax.Array]) -> list[int]:
    return [b.shape[1] for b in blocks]


def _split_cols(v: jax.Array, sizes: list[int]) -> list[jax.Array]:
    out, i = [], 0
    for s in sizes:
        out.append(v[..., i : i + s])
        i += s
    return out


def _set_row(tree: PyTree, specs: Specs, n: int, row: jax.Array, vec: jax.Array,
             do: jax.Array) -> PyTree:
    """``tree`` with unit ``row``'s entries (concatenated over ``specs``) set to ``vec`` if ``do``."""
    blocks = _rows(tree, specs, n)
    hit = (jnp.arange(n) == row)[:, None] & do
    parts = _split_cols(vec, _sizes(blocks))
    new = [jnp.where(hit, p[None, :].astype(b.dtype), b) for b, p in zip(blocks, parts)]
    return _write_rows(tree, specs, n, new)


def _producing(grp: UnitGroup) -> Specs:
    """The unit-level refs that make a unit (weights, bias, gains): copied by a split."""
    return tuple(r for r in grp.refs if r.level == "unit" and r.power >= 0)


def _reading(grp: UnitGroup) -> Specs:
    """The refs that read a unit (outgoing weights): halved by a split."""
    return tuple(r for r in grp.refs if r.power < 0)


def _revivable(grp: UnitGroup) -> bool:
    """Whether a split is exactly function-preserving where the unit is silent.

    Max-pool pieces: a piece that never wins contributes nothing. Elementwise
    units: only behind a positively homogeneous activation (a zero gradient
    then means a zero output, unlike a saturated ``tanh``) whose every reader
    is a weight that can be halved, which is what makes the group rescalable.
    """
    if grp.pieces > 1:
        return grp.pieces_permutable
    return grp.rescalable and grp.permutable and bool(_reading(grp))


def _bias_column(grp: UnitGroup, tree: PyTree) -> int | None:
    """Index of the bias entry in a unit's concatenated producing vector."""
    spec = grp.bias
    specs = _producing(grp)
    if spec is None or spec not in specs:
        return None
    blocks = _rows(tree, specs, grp.units)
    return sum(b.shape[1] for b in blocks[: specs.index(spec)])


def _incoming_dim(grp: UnitGroup, tree: PyTree) -> int:
    return sum(b.shape[1] for b in _rows(tree, _producing(grp), grp.units))


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


def _support_share(
    sym: Symmetry, grp: UnitGroup, params: PyTree, value_fn: Callable[[PyTree], jax.Array]
) -> jax.Array:
    """Each piece's share of its window's data, read off the loss curvature along its bias.

    With the partition fixed, :math:`\\partial^2 L / \\partial b_j^2 = \\sum_{i \\in S_j} h_i`
    sums the output curvature over the points ``S_j`` that piece ``j`` wins
    (``2/N`` per point for a mean squared error): one second directional
    derivative per piece, no data needed. It is taken forward-over-forward
    (two nested ``jvp``): the same product forward-over-reverse gave some
    networks' points to the wrong piece inside a population's compiled
    ``lax.scan`` (measured: 811 of 1024 converged maxout networks then looked
    starved at every check), while the nested ``jvp`` matched the product
    compiled alone there, and costs less. Returns ones where the layer has no bias.
    """
    spec = grp.bias
    n, k = grp.units, grp.pieces
    if spec is None:
        return jnp.ones((n,))
    zeros = jax.tree.map(jnp.zeros_like, params)
    dtype = jnp.result_type(*jax.tree.leaves(params))

    def curvature(u: jax.Array) -> jax.Array:
        e = _set_row(zeros, (spec,), n, u, jnp.ones((1,)), jnp.asarray(True))

        def slope(t: jax.Array) -> jax.Array:
            moved = jax.tree.map(lambda a, b: a + (t * b).astype(a.dtype), params, e)
            return jax.jvp(value_fn, (moved,), (e,))[1]

        return jax.jvp(slope, (jnp.zeros((), dtype),), (jnp.ones((), dtype),))[1]

    c = jnp.maximum(jax.vmap(curvature)(jnp.arange(n)), 0).reshape(-1, k)
    total = c.sum(axis=1, keepdims=True)
    return (c / jnp.where(total > 0, total, 1)).reshape(-1)


def _serve_due(
    axis_name: str,
    due: jax.Array,
    fn: Callable[..., PyTree],
    args: tuple[Any, ...],
    idle: PyTree,
) -> PyTree:
    """``fn(*args)`` where ``due``, else ``idle``, costing about as many calls as due networks.

    Called under ``vmap(..., axis_name=axis_name)`` over a population. The
    networks that are due are gathered (``all_gather``: unbatched, so the
    work below is done once, not once per network) into the smallest of a few
    fixed sizes (8, 64, 512, ..., or the whole population) that holds them
    all, ``fn`` runs on them under an inner ``vmap``, and each network takes
    its own result back. A ``lax.switch`` on the (unbatched) number of due
    networks picks the size, so a check where 3 of 1024 networks are due
    costs 8 calls of ``fn``, not 1024; every due network is still served at
    this check.
    """
    flags = jax.lax.all_gather(due, axis_name)
    nets = flags.shape[0]
    sizes = [s for s in (8, 64, 512, 4096) if 2 * s <= nets]

    def gathered(size: int) -> Callable[[tuple[Any, ...]], PyTree]:
        def run(args: tuple[Any, ...]) -> PyTree:
            order = jnp.argsort(~flags, stable=True)[:size]  # the due networks first
            picked = jax.tree.map(lambda a: a[order], jax.lax.all_gather(args, axis_name))
            out = jax.vmap(fn)(*picked)
            hit = (order == jax.lax.axis_index(axis_name)) & flags[order]
            slot = jnp.argmax(hit)
            return jax.tree.map(lambda o, i: jnp.where(hit.any(), o[slot], i), out, idle)

        return run

    branches = [lambda args: idle, *(gathered(s) for s in sizes), lambda args: fn(*args)]
    count = flags.sum()
    index = jnp.where(count == 0, 0, 1 + jnp.searchsorted(jnp.asarray(sizes, count.dtype), count))
    return jax.lax.switch(index, branches, args)


def _polishable(grp: UnitGroup, params: PyTree) -> bool:
    """Whether ``grp`` is a max-pool group small enough for dense window Newton steps."""
    return grp.pieces > 1 and grp.pieces * _incoming_dim(grp, params) <= _MAX_POLISH_SIZE


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


# --------------------------------------------------------------------------- the wrapper


def revive_dead_units(
    inner: optax.GradientTransformation,
    sym: Symmetry,
    *,
    patience: jax.typing.ArrayLike = 10,
    every: int = 50,
    perturbation: jax.typing.ArrayLike = 0.05,
    num_candidates: int = 8,
    line_search: bool = True,
    newton_steps: int = 10,
    polish_every: int | None = None,
    min_support: float = 0.05,
    seed: jax.typing.ArrayLike = 0,
    laws: Laws | None = None,
    axis_name: str | None = None,
) -> optax.GradientTransformationExtraArgs:
    """Wraps an optimizer so that dead units and max-pool pieces are split back to life.

    .. warning::
       A split is a move of the parameters that keeps the function but is not
       a group element, so it travels in the returned update as a jump
       (``θ' + inner step − θ``): make this wrapper the **outermost**
       transformation, applied to the parameters unchanged. Anything chained
       after it that rescales or clips updates (``clip_by_global_norm``,
       ``scale_by_learning_rate``, ``MultiSteps`` around it) distorts the
       split and changes the function. Put clipping and schedules *inside*,
       in ``inner``.

    Each step, a unit whose incoming gradient is exactly zero counts one more
    dead step (a unit with any nonzero incoming gradient is reset to zero).
    When some unit has been dead for ``patience`` steps and a sibling is alive
    (same window for max-pool pieces, same layer for elementwise units), the
    longest-dead unit ``p`` of each unit group is replaced by a split of a live
    sibling ``d``:

    .. math::
        \\text{units:}\\quad w^{in}_p = w^{in}_d,\\ \\ w^{out}_p = w^{out}_d
        \\leftarrow w^{out}_d / 2 \\qquad
        \\text{pieces:}\\quad \\theta_p = \\theta_d + \\varepsilon\\,(u, -u^\\top m),

    (``u`` a random direction, ``m`` the curvature-weighted centroid of the
    inputs ``d`` wins on, :math:`\\varepsilon` placed by a line search on
    ``value_fn``), the inner optimizer's statistics of ``p`` are reset
    to zero, and the returned update is

    .. math::
        \\Delta = \\theta' + \\mathrm{inner}(g, \\theta') - \\theta,

    where :math:`\\theta'` are the moved parameters, so that
    ``optax.apply_updates(params, updates)`` lands on the inner step taken from
    the moved point. The unit split is exactly function-preserving on all data
    (``p`` was inactive on it); the piece split changes the function by at most
    :math:`\\varepsilon\\,\\max_i |u^\\top(x_i - m)|` and, with ``value_fn`` and
    ``line_search``, is applied only when it lowers the loss.

    Extra args: ``value_fn`` (optional) ``params -> scalar loss``, the Optax
    line-search convention; needed only to place max-pool splits on the data.
    Unknown extra args are passed on to ``inner``.

    The update path has no host callbacks and no data-dependent shapes; it is
    jit-, ``lax.scan``- and ``vmap``-safe. The candidate search runs under a
    ``lax.cond`` on "some unit is due", so un-batched runs pay for it only on
    revival steps (under ``vmap`` that cond becomes a select, and every network
    pays for a revival at every check, about 50 Adam steps each for a small
    max-pool window: with the default ``every=50``, measured 1.95x Adam under
    ``jax.vmap(qo.fit)``; see ``axis_name`` for populations, 1.12x).

    Args:
      inner: the optimizer to wrap (e.g. ``optax.adam(0.02)``).
      sym: the network's :class:`~quotient_opt.Symmetry`.
      patience: consecutive zero-gradient steps before a unit is revived.
      every: look for due units only every ``every`` steps (the count is the
        same for every run of a ``vmap`` over seeds, so this ``lax.cond`` stays
        a real branch there, as long as ``init`` runs inside the ``vmap``, and
        the search costs ``1/every`` per step). No check runs before step
        ``patience - 1``, when no unit can be due yet.
      perturbation: relative size :math:`\\varepsilon / \\|\\theta_d\\|` of the
        piece split (the first trial step of the line search).
      num_candidates: random split directions tried per revival (``value_fn``).
      line_search: move pieces to the best point along the best direction (and
        only if the loss drops) instead of to the fixed trial step.
      newton_steps: with ``value_fn``, Newton steps on the revived window's
        pieces after a max-pool split (each kept only if it lowers the loss;
        skipped for windows of more than 256 parameters, where the dense
        Hessian would be costly). ``0`` disables.
      polish_every: with ``value_fn``, also run the ``newton_steps`` window
        Newton steps on *every* max-pool window every ``polish_every`` steps,
        each kept only if it at least halves the loss (the momentum of a moved
        window is dropped). Adam converges only linearly on a max-affine fit
        whose partition is already right, and at an exact fit its loss spikes
        as its second moment decays; the exact least-squares step finishes
        the first and resets the second. ``None`` (default) polishes only
        after a revival.
      min_support: with ``value_fn``, a max-pool piece that wins less than
        this share of its window's data (measured by the loss curvature along
        its bias, at each check) is *starved* and revived like a dead one,
        the split applied only if it lowers the loss. A piece that wins a
        single point can fit it exactly, and its gradient then vanishes
        without being exactly zero. ``0`` disables.
      seed: seed of the PRNG key kept in the state (may be a traced integer, so
        ``vmap`` over seeds gives independent perturbations).
      axis_name: the name of a ``vmap`` axis over a population of networks
        (``qo.training.POPULATION_AXIS`` under :func:`~quotient_opt.train_population`).
        Under ``vmap`` the branch "some unit is due" is batched, so it becomes a
        select and every network pays for a revival at every check. With
        ``axis_name``, the networks that are due are gathered (``all_gather``)
        into the smallest of a few fixed sizes (8, 64, 512, 4096, or the whole
        population) that holds them, revived there once, and handed back: a
        check costs about as much as its due networks, and nothing when none
        is due. Every due network is still served at that check, so the
        result is the one of the network trained alone. ``value_fn`` should
        then be the same function for every network (the data shared, as in
        :func:`~quotient_opt.train_population`); a ``value_fn`` that closes
        over per-network values stays correct but pays per network again.
      laws: state laws overriding the registry (see :func:`~quotient_opt.map_state`):
        the statistics of a revived unit are reset by them (fields moving like
        the gradient to zero, the others copied from the donor).

    Returns:
      An ``optax.GradientTransformationExtraArgs``.

    Raises:
      ValueError: for a bad configuration, or (at ``init``) params that do not
        match ``sym``, naming the parameter path.

    References:
      Liu, Wang, Wu, Liu. *Splitting Steepest Descent for Growing Neural
      Architectures*, 2019. https://arxiv.org/abs/1910.02366

      Chen, Goodfellow, Shlens. *Net2Net: Accelerating Learning via Knowledge
      Transfer*, 2015. https://arxiv.org/abs/1511.05641
    """
    validate.symmetry(sym)
    every = validate.integer("every", every)
    newton_steps = validate.integer("newton_steps", newton_steps, minimum=0)
    polish_every = validate.integer("polish_every", polish_every, none_ok=True)
    num_candidates = validate.integer("num_candidates", num_candidates)
    if not 0 <= min_support < 1:
        raise ValueError(f"min_support must be in [0, 1), got {min_support!r}")
    validate.number("patience", patience)
    validate.number("perturbation", perturbation)
    inner = optax.with_extra_args_support(inner)
    def revivable(params: PyTree, warn: bool = False) -> tuple[Symmetry, tuple[UnitGroup, ...]]:
        on_tree = on_subtree(sym, params, "revive_dead_units", warn=warn)
        return on_tree, tuple(g for g in on_tree.groups if _revivable(g))

    def init_fn(params: PyTree) -> ReviveDeadUnitsState:
        _, groups = revivable(params, warn=True)
        return ReviveDeadUnitsState(
            count=jnp.zeros([], jnp.int32),
            dead_steps=tuple(jnp.zeros((g.units,), jnp.int32) for g in groups),
            revivals=jnp.zeros([], jnp.int32),
            attempts=jnp.zeros([], jnp.int32),
            key=jax.random.PRNGKey(jnp.asarray(seed, jnp.uint32)),
            inner_state=init_inner(inner, params, laws, strict=False, who="qo.revive_dead_units"),
        )

    def update_fn(
        updates: PyTree,
        state: ReviveDeadUnitsState,
        params: PyTree | None = None,
        *,
        value_fn: Callable[[PyTree], jax.Array] | None = None,
        **extra_args: Any,
    ) -> tuple[PyTree, ReviveDeadUnitsState]:
        validate.params_given(params, "revive_dead_units")
        sym_t, groups = revivable(params)
        alive, dead = [], []
        for grp, steps in zip(groups, state.dead_steps):
            g = jnp.concatenate(_rows(updates, _producing(grp), grp.units), axis=1)
            live = jnp.any(g != 0, axis=1)
            alive.append(live)
            dead.append(jnp.where(live, 0, steps + 1).astype(jnp.int32))
        key, sub = jax.random.split(state.key)
        keys = jax.random.split(sub, max(len(groups), 1))

        def revive(
            params: PyTree, dead: list[jax.Array], alive: list[jax.Array], keys: jax.Array
        ) -> tuple[PyTree, tuple[jax.Array, ...]]:
            out = []
            for i, grp in enumerate(groups):
                params, p, d, do = _revive_group(
                    sym_t, grp, params, dead[i], alive[i], keys[i], value_fn,
                    jnp.asarray(patience), jnp.asarray(perturbation), num_candidates,
                    line_search, newton_steps,
                )
                out.append(jnp.stack([p, d, do]).astype(jnp.int32))
            return params, tuple(out)

        def skip(params: PyTree, dead: Any = None) -> tuple[PyTree, tuple[jax.Array, ...]]:
            return params, tuple(jnp.zeros((3,), jnp.int32) for _ in groups)

        def maybe(params: PyTree) -> tuple[PyTree, tuple[jax.Array, ...]]:
            due_dead = list(dead)
            if value_fn is not None and min_support > 0:
                # Starved pieces (winning almost no data) count as dead; their
                # split is applied only if it lowers the loss.
                for i, grp in enumerate(groups):
                    if grp.pieces > 1:
                        share = _support_share(sym_t, grp, params, value_fn)
                        starved = (share < min_support) & (state.count >= patience)
                        due_dead[i] = jnp.where(starved, jnp.maximum(dead[i], patience),
                                                dead[i]).astype(jnp.int32)
            due = jnp.asarray(False)
            for d in due_dead:
                due = due | jnp.any(d >= patience)
            if axis_name is not None:  # only the due networks of the population pay
                out = _serve_due(axis_name, due, revive, (params, due_dead, alive, keys),
                                 skip(params))
            else:
                out = jax.lax.cond(due, lambda *a: revive(*a, alive, keys), skip, params,
                                   due_dead)
            return *out, due

        def no_check(params: PyTree) -> tuple[PyTree, tuple[jax.Array, ...], jax.Array]:
            return *skip(params), jnp.asarray(False)

        # No unit can be due before step patience - 1 (dead steps count from 0).
        check = (state.count % every == 0) & (state.count + 1 >= patience)
        moved, picks, attempted = jax.lax.cond(check, maybe, no_check, params)
        polished = [g for g in groups if _polishable(g, params)]
        if value_fn is not None and polish_every is not None and newton_steps > 0 and polished:

            def polish_all(p: PyTree) -> PyTree:
                for grp in polished:
                    p = jax.lax.fori_loop(
                        0, grp.windows,
                        lambda w, q, grp=grp: _polish_window(grp, q, w, value_fn, newton_steps, 0.5),
                        p,
                    )
                return p

            due_polish = (state.count > 0) & (state.count % polish_every == 0)
            moved = jax.lax.cond(due_polish, polish_all, lambda p: p, moved)

        def reset(power: int, tree: PyTree) -> PyTree:
            # A revived unit starts with no momentum (fields moving like the
            # gradient, power -1) and its donor's other statistics (a clone
            # inherits the scale of its gradients); every other unit whose
            # incoming parameters were moved (a polished window) loses its
            # now stale momentum.
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

        inner_state = map_state(reset, state.inner_state, params, tx=inner, laws=laws,
                                strict=False)
        if value_fn is not None:
            extra_args = {**extra_args, "value_fn": value_fn}
        inner_updates, inner_state = inner.update(updates, inner_state, moved, **extra_args)
        new_updates = jax.tree.map(
            lambda m, u, p: ((m + u) - p).astype(p.dtype), moved, inner_updates, params
        )
        n_moved = sum(pk[2] for pk in picks) if groups else 0
        dead = tuple(
            jnp.where((jnp.arange(g.units) == pk[0]) & (pk[2] > 0), 0, d)
            for g, pk, d in zip(groups, picks, dead)
        )
        return new_updates, ReviveDeadUnitsState(
            count=optax.safe_increment(state.count),
            dead_steps=dead,
            revivals=(state.revivals + n_moved).astype(jnp.int32),
            attempts=(state.attempts + attempted).astype(jnp.int32),
            key=key,
            inner_state=inner_state,
        )

    return mark(optax.GradientTransformationExtraArgs(init_fn, update_fn),
                "qo.revive_dead_units", JUMP)  # a split is a jump: nothing may follow it
