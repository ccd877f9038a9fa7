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

from quotient_opt import _validate as validate
from quotient_opt.symmetry._spec import Symmetry, UnitGroup
from quotient_opt.transforms._common import init_inner, on_subtree
from quotient_opt.transforms._order import JUMP, mark
from quotient_opt.transforms._revive_detect import _count_dead, _due
from quotient_opt.transforms._revive_detect import _support_share  # noqa: F401 (tests probe it)
from quotient_opt.transforms._revive_polish import _polish_all, _polishable
from quotient_opt.transforms._revive_polish import _polish_window  # noqa: F401 (tests probe it)
from quotient_opt.transforms._revive_rows import _revivable
from quotient_opt.transforms._revive_split import _reset_statistics, _revive_group
from quotient_opt.transforms._transport import Laws, map_state, register_wrapper_state

PyTree = Any


@register_wrapper_state
class ReviveDeadUnitsState(NamedTuple):
    """State of :func:`revive_dead_units`.

    Attributes:
      count: number of updates so far (int32).
      dead_steps: per unit group, consecutive steps each unit has had an exactly
        zero incoming gradient (int32, ``windows * pieces``).
      revivals: number of units revived so far (int32).
      attempts: number of checks at which some unit was due (dead for
        ``patience`` steps, or starved) and the network was served (see
        ``max_served``); a due unit's split is applied only where a sibling is
        alive and, with ``value_fn``, the loss drops (int32).
      key: PRNG key of the perturbations.
      inner_state: the inner optimizer's state.
    """

    count: jax.Array
    dead_steps: tuple[jax.Array, ...]
    revivals: jax.Array
    attempts: jax.Array
    key: jax.Array
    inner_state: optax.OptState


# --------------------------------------------------------------------------- populations


def _serving(axis_name: str, due: jax.Array, cap: int | None, turn: jax.Array) -> jax.Array:
    """Which due networks are served at this check: all of them, or with ``cap`` the first
    ``cap`` in a rotating order (starting ``turn * cap`` networks further at each check), so
    a network whose split keeps failing cannot hold a place from the others.

    Called under ``vmap(..., axis_name=axis_name)``; returns this network's flag."""
    if cap is None:
        return due
    flags = jax.lax.all_gather(due, axis_name)
    nets = flags.shape[0]
    if cap >= nets:
        return due
    me = jax.lax.axis_index(axis_name)
    place = (jnp.arange(nets) - turn * cap) % nets  # the rotating order
    ahead = jnp.sum(flags & (place < place[me]))  # due networks before this one
    return due & (ahead < cap)


def _serve_due(
    axis_name: str,
    due: jax.Array,
    fn: Callable[..., PyTree],
    args: tuple[Any, ...],
    idle: PyTree,
    cap: int | None = None,
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
    this check. With ``cap`` (at most that many due: :func:`_serving`), the
    largest size is ``cap``.
    """
    flags = jax.lax.all_gather(due, axis_name)
    nets = flags.shape[0]
    whole = cap is None or cap >= nets  # the largest size is the whole population
    if whole:
        sizes = [s for s in (8, 64, 512, 4096) if 2 * s <= nets]
    else:
        sizes = [s for s in (8, 64, 512, 4096) if s < cap] + [cap]

    def gathered(size: int) -> Callable[[tuple[Any, ...]], PyTree]:
        def run(args: tuple[Any, ...]) -> PyTree:
            order = jnp.argsort(~flags, stable=True)[:size]  # the due networks first
            picked = jax.tree.map(lambda a: a[order], jax.lax.all_gather(args, axis_name))
            out = jax.vmap(fn)(*picked)
            hit = (order == jax.lax.axis_index(axis_name)) & flags[order]
            slot = jnp.argmax(hit)
            return jax.tree.map(lambda o, i: jnp.where(hit.any(), o[slot], i), out, idle)

        return run

    branches = [lambda args: idle, *(gathered(s) for s in sizes)]
    if whole:
        branches.append(lambda args: fn(*args))
    count = flags.sum()
    index = jnp.where(count == 0, 0, 1 + jnp.searchsorted(jnp.asarray(sizes, count.dtype), count))
    return jax.lax.switch(index, branches, args)


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
    max_served: int | None = None,
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
      max_served: with ``axis_name``, serve at most this many due networks per check
        (the others stay due and are served at later checks, in a rotating order, so
        none waits forever behind a network whose split keeps failing): bounds the cost
        of a check, and of the burst at the first checks, to ``max_served`` revivals.
        ``None`` serves every due network at once.
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
    max_served = validate.integer("max_served", max_served, none_ok=True)
    if max_served is not None and axis_name is None:
        raise ValueError("max_served needs axis_name (the population's vmap axis): without "
                         "it every network pays for every revival under vmap anyway")
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
        alive, dead = _count_dead(groups, updates, state.dead_steps)
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
            due_dead, due = _due(sym_t, groups, params, dead, value_fn, min_support,
                                 state.count, patience)
            if axis_name is not None:  # only the due networks of the population pay
                due = _serving(axis_name, due, max_served, state.count // every)
                out = _serve_due(axis_name, due, revive, (params, due_dead, alive, keys),
                                 skip(params), cap=max_served)
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
            due_polish = (state.count > 0) & (state.count % polish_every == 0)
            moved = jax.lax.cond(
                due_polish, lambda p: _polish_all(polished, p, value_fn, newton_steps),
                lambda p: p, moved,
            )

        def reset(power: int, tree: PyTree) -> PyTree:
            return _reset_statistics(groups, picks, params, moved, power, tree)

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
