"""Plumbing shared by the wrappers that move along symmetry orbits (rebalance, teleport).

Such a wrapper keeps a group element in its state: log-scales :math:`s` of the
unit groups and an element :math:`f` of every other factor
(:attr:`~quotient_opt.Symmetry.factors`: normalization scale invariance, sign
flips, a registered kind), so that the inner optimizer works at
:math:`\\theta_{in} = (e^{s}, f)\\cdot\\theta` (the canonical point, or a
teleported one) while the user's parameters :math:`\\theta` stay where they
are. Each step it may move further along the orbit by :math:`h`
(:math:`s \\leftarrow s + h_s`, :math:`f \\leftarrow f\\,h_f`), carries the
inner state along (:func:`~quotient_opt.map_state`, by each field's law; a field
some factor's kind has no law for is refused at ``init``,
:meth:`~quotient_opt.symmetry.Kind.moves`), gives the inner optimizer the
gradient in its coordinates, :math:`g^{-1}\\cdot\\nabla L(\\theta)` (the
action with power ``-1``), and returns its step pulled back to the user's
coordinates:

.. math::

   u = g^{-1}\\cdot \\mathrm{inner}\\big(g\\cdot_{-1}\\nabla L(\\theta),\\ g\\cdot\\theta\\big),
   \\qquad g = (e^{s}, f).

The update is a multiplication, not a difference: it never contains a jump,
whatever is chained after it sees a small step, and from :math:`g\\cdot\\theta`
the run is exactly :math:`g` applied to the run from :math:`\\theta` whenever
the inner coordinates depend on the orbit only (the canonical point does).

With ``move_params=True`` the wrapper instead moves the parameters themselves
(the element is absorbed into them each step): the returned update is
:math:`(h\\cdot\\theta + u) - \\theta`, a jump that must reach the
parameters unchanged, so nothing that rescales or clips updates may follow.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import optax

from quotient_opt.symmetry import _kinds
from quotient_opt.symmetry._canonical import canonical_elements
from quotient_opt.symmetry._spec import LogScales, Symmetry, solve_dtype
from quotient_opt import _validate as validate
from quotient_opt.transforms._common import init_inner, on_subtree
from quotient_opt.transforms._order import JUMP, mark
from quotient_opt.transforms._transport import Laws, check_transportable, map_state

PyTree = Any


class Move(NamedTuple):
    """An element of the orbit wrappers' group: unit-group log-scales and factor elements."""

    log_scales: LogScales
    factors: tuple[jax.Array, ...]


def identity(sym: Symmetry, params: PyTree) -> Move:
    """The identity, in the solve dtype of ``params``."""
    dt = solve_dtype(params)
    return Move(sym.zero_log_scales(dt), _kinds.identity(sym, dt))


def act(sym: Symmetry, tree: PyTree, g: Move, power: int = 1) -> PyTree:
    """``tree`` moved by ``g`` (``power`` as in :meth:`~quotient_opt.Symmetry.act`)."""
    out = sym.rescale(tree, g.log_scales, power=power)
    return _kinds.act(sym, out, g.factors, power=power) if sym.factors else out


def pull_back(sym: Symmetry, u: PyTree, g: Move, theta: PyTree) -> PyTree:
    """A step ``u`` taken at ``theta = g · params``, in the coordinates of ``params``:
    ``g⁻¹ · u`` when every kind acts linearly; with an affine kind
    (:attr:`~quotient_opt.symmetry.Kind.linear` false) the factors' part is pulled
    back as the difference ``f⁻¹ · (theta + u) - f⁻¹ · theta``."""
    if sym.factors:
        inv = _kinds.inverse(sym, g.factors)
        if all(_kinds.kind_of(f).linear for f in sym.factors):
            u = _kinds.act(sym, u, inv)
        else:
            u = jax.tree.map(jnp.subtract,
                             _kinds.act(sym, jax.tree.map(jnp.add, theta, u), inv),
                             _kinds.act(sym, theta, inv))
    return sym.rescale(u, g.log_scales, power=-1)


def compose(sym: Symmetry, first: Move, second: Move) -> Move:
    return Move(tuple(a + b for a, b in zip(first.log_scales, second.log_scales)),
                _kinds.compose(sym, first.factors, second.factors))


def canonical_move(sym: Symmetry, here: PyTree, *, tol: jax.typing.ArrayLike | None,
                   max_iter: int, rounds: int = 1) -> Move:
    """The move to the section of ``here``'s orbit: the unit groups' minimal-energy point
    and the continuous factors' sections, alternated for up to ``rounds`` rounds
    (:func:`~quotient_opt.symmetry._canonical.canonical_elements`), then every discrete
    factor's section."""
    s, f, q = canonical_elements(sym, here, tol=tol, max_iter=max_iter, rounds=rounds)
    fd, _ = _kinds.sections(sym, q, factors=_kinds.discrete(sym))
    return Move(s, _kinds.by_factor(sym, here, (_kinds.continuous(sym), f),
                                    (_kinds.discrete(sym), fd)))


def transport(sym: Symmetry, state: PyTree, params: PyTree, h: Move,
              laws: Laws | None, tx: optax.GradientTransformation) -> PyTree:
    """Moves the state of ``tx`` along ``h`` (each field by its measured law, gather-free)."""
    return map_state(lambda p, t: act(sym, t, h, p), state, params, tx=tx, laws=laws)


def periodic_move(
    every: int,
    count: jax.Array,
    find: Callable[[], Move],
    sym: Symmetry,
    inner_state: PyTree,
    params: PyTree,
    laws: Laws | None,
    tx: optax.GradientTransformation,
) -> tuple[Move, PyTree]:
    """On steps with ``count % every == 0``: the move ``h = find()`` and the inner state
    carried along it; on other steps: no move, state unchanged.

    A ``lax.cond`` on the step count: a real branch when the count is the same
    for every run of a population (``qo.train_population`` keeps it
    unbatched), so off-steps cost nothing (``find`` computes whatever it needs
    inside the branch); under a plain ``vmap`` of a batched count it becomes a
    select and both branches run.
    """

    def move(st: PyTree) -> tuple[Move, PyTree]:
        h = find()
        return h, transport(sym, st, params, h, laws, tx)

    def stay(st: PyTree) -> tuple[Move, PyTree]:
        return identity(sym, params), st

    return jax.lax.cond(count % every == 0, move, stay, inner_state)


def orbit_step(
    inner: optax.GradientTransformationExtraArgs,
    sym: Symmetry,
    updates: PyTree,
    inner_state: PyTree,
    params: PyTree,
    g: Move,
    h: Move,
    extra_args: dict,
    *,
    move_params: bool,
) -> tuple[PyTree, PyTree, Move]:
    """One wrapped step: move by ``h``, step in the inner coordinates, pull back.

    Args:
      inner: the inner optimizer.
      sym: the symmetry.
      updates: the gradient at ``params``.
      inner_state: the inner state, already carried along ``h``
        (:func:`periodic_move`), in the coordinates ``(g h) · params``.
      params: the user's parameters.
      g: the element held so far.
      h: the move made now (the identity: none).
      extra_args: passed on to ``inner.update``.
      move_params: return the jump in the update instead of holding it.

    Returns:
      ``(update in the user's coordinates, new inner state, new element)``.
    """
    g_new = compose(sym, g, h)
    theta = act(sym, params, g_new)
    grads = act(sym, updates, g_new, power=-1)
    u, inner_state = inner.update(grads, inner_state, theta, **extra_args)
    if move_params:
        out = jax.tree.map(
            lambda t, du, p: None if p is None else ((t + du) - p).astype(p.dtype), theta, u,
            params)
        return out, inner_state, identity(sym, params)
    out = jax.tree.map(lambda du, p: du.astype(p.dtype), pull_back(sym, u, g_new, theta), params)
    return out, inner_state, g_new


def orbit_wrapper(
    inner: optax.GradientTransformation,
    sym: Symmetry,
    who: str,
    state_type: Callable[..., Any],
    find: Callable[[Symmetry, PyTree, PyTree, Any], Move],
    *,
    every: int,
    move_params: bool,
    laws: Laws | None,
    roles: tuple[str, ...] = (),
) -> optax.GradientTransformationExtraArgs:
    """A wrapper holding a group element: every ``every`` steps it moves on by ``h =
    find(sym, here, updates, state)`` (``here = g · params``, computed inside the periodic
    branch only; ``sym`` restricted to the tree given, :func:`on_subtree`), then steps
    from ``(g h) · params`` and pulls back (:func:`orbit_step`).

    ``state_type(count, log_scales, inner_state, factors)`` builds the wrapper's state;
    the result is marked (:mod:`~quotient_opt.transforms._order`) with ``roles``, and as
    a jump with ``move_params``.
    """
    inner = optax.with_extra_args_support(inner)

    def init_fn(params: PyTree) -> Any:
        sub = on_subtree(sym, params, who, warn=True)
        state = init_inner(inner, params, laws, who=f"qo.{who}", sym=sub)
        if sub.factors and jax.tree.leaves(params):
            _kinds.refuse_unmoved(sub, check_transportable(state, params, tx=inner, laws=laws),
                                  f"qo.{who}")
        g = identity(sub, params)
        return state_type(jnp.zeros([], jnp.int32), g.log_scales, state, g.factors)

    def update_fn(updates, state, params=None, **extra_args):
        validate.params_given(params, who)
        sub = on_subtree(sym, params, who)
        g = Move(state.log_scales, state.factors)
        h, inner_state = periodic_move(
            every, state.count,
            lambda: find(sub, act(sub, params, g), updates, state), sub,
            state.inner_state, params, laws, inner)
        out, inner_state, g = orbit_step(
            inner, sub, updates, inner_state, params, g, h, extra_args,
            move_params=move_params)
        return out, state_type(optax.safe_increment(state.count), g.log_scales, inner_state,
                               g.factors)

    label = f"qo.{who}(move_params=True)" if move_params else f"qo.{who}"
    return mark(optax.GradientTransformationExtraArgs(init_fn, update_fn), label,
                *roles, *((JUMP,) if move_params else ()))
