"""Shared optimizer state: the state leaves that are the same for every network of a population.

Under ``vmap``, a ``lax.cond`` whose predicate is batched becomes a ``select``
that evaluates both branches every step. The periodic wrappers
(:func:`~quotient_opt.rebalance`, :func:`~quotient_opt.teleport`,
:func:`~quotient_opt.revive_dead_units`) branch on ``state.count % every == 0``,
which is the same for every network. So the state leaves that are identical
across networks -- found by a dataflow analysis of ``tx.init`` and
``tx.update``'s jaxprs: leaves that depend on neither the params nor the
gradients, such as step counters, schedule values, a fixed PRNG key -- are
kept *unbatched* (``in_axes=None``/``out_axes=None``) by
:func:`~quotient_opt.train_population`, once for all networks, and those
branches stay real branches.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from typing import Any

import jax
import optax

from quotient_opt.training._deps import depends
from quotient_opt.training._fit import apply_step, prepare

PyTree = Any

#: The name of the network axis of the population's vmapped optimizer update. A
#: transformation may use collectives over it: ``revive_dead_units(...,
#: axis_name=POPULATION_AXIS)`` revives only the networks that need it, gathered.
POPULATION_AXIS = "population"


def shared_state_leaves(
    tx: optax.GradientTransformation,
    params: PyTree,
    loss_fn: Callable[[PyTree], jax.Array] | None = None,
    *,
    extra_args: Mapping[str, Any] | None = None,
) -> tuple[bool, ...]:
    """Which leaves of ``tx``'s state are the same for every network of a population.

    A leaf is shared when neither ``tx.init`` nor any number of ``tx.update``
    steps makes it depend on the parameters or the gradients (step counters,
    schedule values, a fixed PRNG key). Found by a conservative dataflow
    analysis of the two jaxprs, iterated to a fixed point.

    Args:
      tx: the optimizer.
      params: one network's parameters (arrays or ``jax.ShapeDtypeStruct``).
      loss_fn: the loss (passed to ``tx.update`` as ``value_fn``).
      extra_args: further extra args of ``tx.update`` (shared by all networks).

    Returns:
      One flag per leaf of ``jax.tree.leaves(tx.init(params))``.
    """
    txe, extra = prepare(tx, loss_fn, dict(extra_args or {}))
    n_p = len(jax.tree.leaves(params))
    init_jaxpr = jax.make_jaxpr(txe.init)(params)
    state = jax.eval_shape(txe.init, params)
    tainted = depends(init_jaxpr, [True] * n_p)

    def update_state(grads, state, params):
        return apply_step(txe, grads, state, params, extra)[1]

    upd_jaxpr = jax.make_jaxpr(update_state, axis_env=[(POPULATION_AXIS, 1)])(
        params, state, params)
    while True:
        out = depends(upd_jaxpr, [True] * n_p + tainted + [True] * n_p)
        new = [a or b for a, b in zip(tainted, out)]
        if new == tainted:
            return tuple(not t for t in tainted)
        tainted = new


def state_axes(state_shape: PyTree, shared: tuple[bool, ...]) -> PyTree:
    leaves, treedef = jax.tree.flatten(state_shape)
    return treedef.unflatten([None if s else 0 for s in shared])
