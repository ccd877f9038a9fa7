"""Optax plumbing shared by the library's gradient transformations."""

from __future__ import annotations

import warnings
from collections.abc import Callable
from typing import Any

import jax
import optax

from quotient_opt import _validate as validate
from quotient_opt.symmetry._paths import path_str, paths_str
from quotient_opt.symmetry._spec import Symmetry, masked_paths
from quotient_opt.transforms._order import check_chain, check_equivariant_inner
from quotient_opt.transforms._transport import Laws, check_transportable

PyTree = Any


def on_subtree(sym: Symmetry, params: PyTree, who: str, *, warn: bool = False) -> Symmetry:
    """``sym.restrict(params)``: the groups that are symmetries of the (sub)tree given.

    Under ``optax.masked`` / ``optax.multi_transform`` the transformation sees
    a subtree (:meth:`~quotient_opt.Symmetry.restrict` says which groups stay
    exact); with ``warn`` (at ``init``) a warning names the groups lost.
    """
    sub = sym.restrict(params)
    if warn and sub is not sym:
        lost = [g.name for g in sym.groups if g not in sub.groups]
        if lost:
            warnings.warn(
                f"{who}: on the subtree it is given (optax.masked / optax.multi_transform, "
                f"masking out {paths_str(sub.masked)}), "
                f"{len(lost)} of {len(sym.groups)} symmetry group(s) are no symmetry of that "
                f"subtree alone and lose their moves: {', '.join(lost)}; "
                "print(sym.restrict(params)) says why",
                stacklevel=3,
            )
    return sub


def whole_tree(params: PyTree, who: str) -> None:
    """Raises ValueError if ``params`` is a subtree masked by Optax (for computations that
    read every layer, like the path norm; ``None`` leaves are an equinox model's non-array
    fields, which the traced forward computation does not read either)."""
    holes = masked_paths(params, none=False)
    if holes and jax.tree.leaves(params):
        raise ValueError(
            f"{who}: needs the whole params tree (the path norm of a weight multiplies the "
            "weights of every layer), but it was given a subtree masking out "
            f"'{path_str(holes[0])}' (optax.masked / optax.multi_transform); chain it outside, "
            f"e.g. optax.chain(qo.{who}(sym), optax.multi_transform(...))"
        )


def stateless_with_params(
    sym: Symmetry, who: str, fn: Callable[[Symmetry, PyTree, PyTree], PyTree], *,
    needs_whole_tree: bool = False,
) -> optax.GradientTransformationExtraArgs:
    """A stateless transformation ``updates -> fn(sym_on_the_tree, updates, params)``.

    ``init`` validates the params against ``sym`` (ValueError naming the
    path) and restricts it to a masked subtree (:func:`on_subtree`), or with
    ``needs_whole_tree`` refuses one; ``update`` requires ``params`` and
    ignores unknown extra args.
    """

    def init_fn(params: PyTree) -> optax.EmptyState:
        if needs_whole_tree:
            whole_tree(params, who)
        on_subtree(sym, params, who, warn=True)
        return optax.EmptyState()

    def update_fn(updates, state, params=None, **extra_args):
        del extra_args
        validate.params_given(params, who)
        if needs_whole_tree:
            whole_tree(params, who)
        return fn(on_subtree(sym, params, who), updates, params), state

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
