"""Plumbing shared by the wrappers that move along rescaling orbits (rebalance, teleport).

Such a wrapper keeps a group element in its state: log-scales :math:`s`, so
that the inner optimizer works at :math:`\\theta_{in} = e^{s}\\cdot\\theta`
(the canonical point, or a teleported one) while the user's parameters
:math:`\\theta` stay where they are. Each step it may move further along the
orbit by :math:`h` (:math:`s \\leftarrow s + h`), carries the inner state
along (:func:`~quotient_opt.map_state`, by each field's law), gives the
inner optimizer the gradient in its coordinates,
:math:`e^{-s}\\cdot\\nabla L(\\theta)`, and returns its step pulled back to the
user's coordinates:

.. math::

   u = e^{-s}\\cdot \\mathrm{inner}\\big(e^{-s}\\cdot\\nabla L(\\theta),\\ e^{s}\\cdot\\theta\\big).

The update is a multiplication, not a difference: it never contains a jump,
whatever is chained after it sees a small step, and from :math:`g\\cdot\\theta`
the run is exactly :math:`g` applied to the run from :math:`\\theta` whenever
the inner coordinates depend on the orbit only (the canonical point does).

With ``move_params=True`` the wrapper instead moves the parameters themselves
(:math:`s` is absorbed into them each step): the returned update is
:math:`(e^{h}\\cdot\\theta + u) - \\theta`, a jump that must reach the
parameters unchanged, so nothing that rescales or clips updates may follow.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp
import optax

from quotient_opt.symmetry._spec import LogScales, Symmetry, solve_dtype
from quotient_opt import _validate as validate
from quotient_opt.transforms._common import init_inner, on_subtree
from quotient_opt.transforms._order import JUMP, mark
from quotient_opt.transforms._transport import Laws, map_state

PyTree = Any


def zero_log_scales(sym: Symmetry, params: PyTree) -> LogScales:
    """The identity element's log-scales, in the solve dtype of ``params``."""
    return sym.zero_log_scales(solve_dtype(params))


def transport(sym: Symmetry, state: PyTree, params: PyTree, h: LogScales,
              laws: Laws | None, tx: optax.GradientTransformation) -> PyTree:
    """Moves the state of ``tx`` along the rescaling ``h`` (each field by its measured law,
    gather-free)."""
    return map_state(lambda p, t: sym.rescale(t, h, power=p), state, params, tx=tx, laws=laws)


def periodic_move(
    every: int,
    count: jax.Array,
    find: Callable[[], LogScales],
    sym: Symmetry,
    inner_state: PyTree,
    params: PyTree,
    laws: Laws | None,
    tx: optax.GradientTransformation,
) -> tuple[LogScales, PyTree]:
    """On steps with ``count % every == 0``: the move ``h = find()`` and the inner state
    carried along it; on other steps: no move, state unchanged.

    A ``lax.cond`` on the step count: a real branch when the count is the same
    for every run of a population (``qo.train_population`` keeps it
    unbatched), so off-steps cost nothing (``find`` computes whatever it needs
    inside the branch); under a plain ``vmap`` of a batched count it becomes a
    select and both branches run.
    """

    def move(st: PyTree) -> tuple[LogScales, PyTree]:
        h = find()
        return h, transport(sym, st, params, h, laws, tx)

    def stay(st: PyTree) -> tuple[LogScales, PyTree]:
        return zero_log_scales(sym, params), st

    return jax.lax.cond(count % every == 0, move, stay, inner_state)


def orbit_step(
    inner: optax.GradientTransformationExtraArgs,
    sym: Symmetry,
    updates: PyTree,
    inner_state: PyTree,
    params: PyTree,
    s: LogScales,
    h: LogScales,
    extra_args: dict,
    *,
    move_params: bool,
) -> tuple[PyTree, PyTree, LogScales]:
    """One wrapped step: move by ``h``, step in the inner coordinates, pull back.

    Args:
      inner: the inner optimizer.
      sym: the symmetry.
      updates: the gradient at ``params``.
      inner_state: the inner state, already carried along ``h``
        (:func:`periodic_move`), in the coordinates ``e^{s + h} · params``.
      params: the user's parameters.
      s: the element held so far.
      h: the move made now (zeros: none).
      extra_args: passed on to ``inner.update``.
      move_params: return the jump in the update instead of holding it.

    Returns:
      ``(update in the user's coordinates, new inner state, new s)``.
    """
    s_new = tuple(a + b for a, b in zip(s, h))
    theta = sym.rescale(params, s_new)
    grads = sym.rescale(updates, s_new, power=-1)
    u, inner_state = inner.update(grads, inner_state, theta, **extra_args)
    if move_params:
        out = jax.tree.map(
            lambda t, du, p: None if p is None else ((t + du) - p).astype(p.dtype), theta, u,
            params)
        return out, inner_state, tuple(jnp.zeros_like(a) for a in s_new)
    out = jax.tree.map(lambda du, p: du.astype(p.dtype), sym.rescale(u, s_new, power=-1), params)
    return out, inner_state, s_new


def orbit_wrapper(
    inner: optax.GradientTransformation,
    sym: Symmetry,
    who: str,
    state_type: Callable[..., Any],
    find: Callable[[Symmetry, PyTree, PyTree, Any], LogScales],
    *,
    every: int,
    move_params: bool,
    laws: Laws | None,
    roles: tuple[str, ...] = (),
) -> optax.GradientTransformationExtraArgs:
    """A wrapper holding a rescaling: every ``every`` steps it moves on by ``h = find(sym,
    here, updates, state)`` (``here = e^s · params``, computed inside the periodic branch
    only; ``sym`` restricted to the tree given, :func:`on_subtree`), then steps from
    ``e^{s + h} · params`` and pulls back (:func:`orbit_step`).

    ``state_type(count, log_scales, inner_state)`` builds the wrapper's state; the
    result is marked (:mod:`~quotient_opt.transforms._order`) with ``roles``, and as a
    jump with ``move_params``.
    """
    inner = optax.with_extra_args_support(inner)

    def init_fn(params: PyTree) -> Any:
        sub = on_subtree(sym, params, who, warn=True)
        return state_type(jnp.zeros([], jnp.int32), zero_log_scales(sub, params),
                          init_inner(inner, params, laws, who=f"qo.{who}", sym=sub))

    def update_fn(updates, state, params=None, **extra_args):
        validate.params_given(params, who)
        sub = on_subtree(sym, params, who)
        h, inner_state = periodic_move(
            every, state.count,
            lambda: find(sub, sub.rescale(params, state.log_scales), updates, state), sub,
            state.inner_state, params, laws, inner)
        out, inner_state, s = orbit_step(
            inner, sub, updates, inner_state, params, state.log_scales, h, extra_args,
            move_params=move_params)
        return out, state_type(optax.safe_increment(state.count), s, inner_state)

    label = f"qo.{who}(move_params=True)" if move_params else f"qo.{who}"
    return mark(optax.GradientTransformationExtraArgs(init_fn, update_fn), label,
                *roles, *((JUMP,) if move_params else ()))
