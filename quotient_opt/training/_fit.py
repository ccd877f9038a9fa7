"""A full-batch training loop in one ``lax.scan``, for the example tasks, tests and benchmarks."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import jax
import optax

PyTree = Any


def fit(
    tx: optax.GradientTransformation,
    params: PyTree,
    loss: Callable[[PyTree], jax.Array],
    steps: int,
    *,
    state: optax.OptState | None = None,
    **extra_args: Any,
) -> tuple[PyTree, optax.OptState, jax.Array]:
    """Runs ``steps`` full-batch steps of ``tx`` on ``loss`` inside one ``lax.scan``.

    Each step computes ``loss`` and its gradient at the current params and
    applies ``tx.update(grads, state, params, value_fn=loss, **extra_args)``
    (``value_fn`` is the Optax line-search convention, used by
    :func:`~quotient_opt.teleport` and :func:`~quotient_opt.revive_dead_units`;
    a ``value_fn`` in ``extra_args`` overrides it, and transformations without
    extra-args support ignore both). Not jitted itself, so it composes with
    ``jax.jit`` and ``jax.vmap`` (over seeds, say).

    Args:
      tx: any Optax transformation.
      params: initial parameters.
      loss: ``params -> scalar`` (the whole data set closed over).
      steps: number of steps (a Python int).
      state: initial optimizer state (default ``tx.init(params)``), to resume.
      **extra_args: further extra args for ``tx.update``.

    Returns:
      ``(params, state, losses)``: final params and state, and the loss before
      each step (shape ``(steps,)``).
    """
    tx = optax.with_extra_args_support(tx)
    extra_args = {"value_fn": loss, **extra_args}
    state = tx.init(params) if state is None else state

    def step(carry, _):
        p, s = carry
        value, grads = jax.value_and_grad(loss)(p)
        updates, s = tx.update(grads, s, p, **extra_args)
        return (optax.apply_updates(p, updates), s), value

    (params, state), losses = jax.lax.scan(step, (params, state), None, length=steps)
    return params, state, losses
