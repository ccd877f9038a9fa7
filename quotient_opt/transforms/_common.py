"""Optax plumbing shared by the library's gradient transformations."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import jax
import numpy as np
import optax

from quotient_opt.symmetry._spec import Symmetry
from quotient_opt.transforms._order import check_chain, check_equivariant_inner
from quotient_opt.transforms._transport import Laws, check_transportable

PyTree = Any


def check_symmetry(sym: Any) -> None:
    """Raises ValueError unless ``sym`` is a :class:`~quotient_opt.Symmetry`."""
    if not isinstance(sym, Symmetry):
        raise ValueError(f"sym: expected a quotient_opt.Symmetry, got {type(sym).__name__}")


def check_every(every: Any, name: str = "every") -> None:
    """Raises ValueError for a concrete ``every < 1`` (traced values pass)."""
    if isinstance(every, (int, np.integer, float, np.floating)) and every < 1:
        raise ValueError(f"{name} must be >= 1, got {every}")


def check_params(params: PyTree, who: str) -> None:
    """Raises ValueError if ``update`` was called without ``params``."""
    if params is None:
        raise ValueError(f"{who}: params are required (pass params= to update)")


def stateless_with_params(
    sym: Symmetry, who: str, fn: Callable[[PyTree, PyTree], PyTree]
) -> optax.GradientTransformationExtraArgs:
    """A stateless transformation ``updates -> fn(updates, params)``.

    ``init`` validates the params against ``sym`` (ValueError naming the
    path); ``update`` requires ``params`` and ignores unknown extra args.
    """

    def init_fn(params: PyTree) -> optax.EmptyState:
        sym.validate(params)
        return optax.EmptyState()

    def update_fn(updates, state, params=None, **extra_args):
        del extra_args
        check_params(params, who)
        return fn(updates, params), state

    return optax.GradientTransformationExtraArgs(init_fn, update_fn)


def init_inner(inner: optax.GradientTransformation, params: PyTree, laws: Laws | None,
               *, strict: bool = True, who: str = "the wrapper",
               sym: Symmetry | None = None) -> PyTree:
    """``inner.init(params)``, refusing at once a state that cannot follow the orbit moves.

    The laws are measured on ``inner`` (:func:`~quotient_opt.measure_laws`, cached, so
    the moves at ``update`` reuse them); ``strict=False`` falls back to the registry
    for fields no measured power describes (see :func:`~quotient_opt.map_state`).
    The order of ``inner``'s chain is checked (:func:`~quotient_opt.check_chain`) and,
    given the ``sym`` of an equivariance claim, whether ``inner`` commutes with its
    permutations (a :class:`~quotient_opt.NotEquivariantWarning` if not).
    """
    state = inner.init(params)
    if jax.tree.leaves(params):  # (optax.tree.map_params initialises with a placeholder)
        check_chain(inner, params, where=f"the inner optimizer of {who}")  # warns first
        check_transportable(state, params, tx=inner, laws=laws, strict=strict)
        if sym is not None:
            check_equivariant_inner(inner, sym, params, who)
    return state
