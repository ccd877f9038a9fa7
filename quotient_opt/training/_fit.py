"""A full-batch training loop in one ``lax.scan``, for the example tasks, tests and benchmarks."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import jax
import optax

from quotient_opt.transforms._order import check_chain

PyTree = Any


def prepare(
    tx: optax.GradientTransformation,
    loss: Callable[[PyTree], jax.Array],
    extra_args: dict[str, Any],
) -> tuple[optax.GradientTransformationExtraArgs, dict[str, Any]]:
    """``tx`` with extra-args support and the extra args of every update.

    ``value_fn=loss`` (the Optax line-search convention) unless ``extra_args``
    already holds a ``value_fn``.
    """
    return optax.with_extra_args_support(tx), {"value_fn": loss, **extra_args}


def apply_step(
    tx: optax.GradientTransformationExtraArgs,
    grads: PyTree,
    state: optax.OptState,
    params: PyTree,
    extra_args: dict[str, Any],
) -> tuple[PyTree, optax.OptState]:
    """One optimizer step from given gradients: ``tx.update`` then ``optax.apply_updates``."""
    updates, state = tx.update(grads, state, params, **extra_args)
    return optax.apply_updates(params, updates), state


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
    ``jax.jit`` and ``jax.vmap`` (over seeds, say). For many independent
    networks at once see :func:`~quotient_opt.train_population`.

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
    check_chain(tx, params, where="the transformation given to qo.fit")  # warns, once
    tx, extra_args = prepare(tx, loss, extra_args)
    state = tx.init(params) if state is None else state

    def step(carry, _):
        p, s = carry
        value, grads = jax.value_and_grad(loss)(p)
        return apply_step(tx, grads, s, p, extra_args), value

    (params, state), losses = jax.lax.scan(step, (params, state), None, length=steps)
    return params, state, losses
