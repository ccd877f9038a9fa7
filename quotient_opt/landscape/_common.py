"""Pytree checks and flattening shared by the landscape tools."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from jax.flatten_util import ravel_pytree

from quotient_opt.symmetry._spec import leaves_by_path, path_str

PyTree = Any


def _describe(tree: PyTree) -> str:
    paths = [path_str(p) for p in leaves_by_path(tree)]
    shown = ", ".join(paths[:8]) + (", ..." if len(paths) > 8 else "")
    return shown or "no leaves"


def check_same_tree(a: PyTree, b: PyTree, names: tuple[str, str] = ("a", "b")) -> None:
    """Raises ``ValueError`` naming the first path where ``a`` and ``b`` differ.

    Checks the tree structure, then every leaf's shape. Dtypes may differ
    (they are promoted where the trees are combined).
    """
    na, nb = names
    la, lb = leaves_by_path(a), leaves_by_path(b)
    if not la:
        raise ValueError(f"{na}: the pytree has no array leaves")
    for p in la:
        if p not in lb:
            raise ValueError(
                f"{nb}: no leaf at path '{path_str(p)}' (which {na} has; {nb} has: {_describe(b)})"
            )
    for p in lb:
        if p not in la:
            raise ValueError(
                f"{na}: no leaf at path '{path_str(p)}' (which {nb} has; {na} has: {_describe(a)})"
            )
    for p, x in la.items():
        sa, sb = tuple(np.shape(x)), tuple(np.shape(lb[p]))
        if sa != sb:
            raise ValueError(
                f"{nb}: leaf '{path_str(p)}' has shape {sb}, {na} has shape {sa} there"
            )
    if jax.tree.structure(a) != jax.tree.structure(b):
        raise ValueError(
            f"{na} and {nb}: same leaf paths and shapes but different pytree containers "
            f"({jax.tree.structure(a)} vs {jax.tree.structure(b)})"
        )


def check_floating(tree: PyTree, name: str) -> None:
    """Raises ``ValueError`` naming the first leaf that is not a floating-point array."""
    for p, x in leaves_by_path(tree).items():
        if not jnp.issubdtype(jnp.result_type(x), jnp.floating):
            raise ValueError(
                f"{name}: leaf '{path_str(p)}' has dtype {jnp.result_type(x)}; "
                "landscape tools need floating-point parameters"
            )


def check_stacked(tree: PyTree, name: str, *, min_length: int = 1) -> int:
    """Checks that every leaf of ``tree`` has the same leading (stack) axis; returns its length.

    Raises:
      ValueError: naming the first leaf that is a scalar or whose leading
        axis differs from the first leaf's.
    """
    leaves = leaves_by_path(tree)
    if not leaves:
        raise ValueError(f"{name}: the pytree has no array leaves")
    length = None
    first = None
    for p, x in leaves.items():
        shape = np.shape(x)
        if len(shape) == 0:
            raise ValueError(
                f"{name}: leaf '{path_str(p)}' is a scalar; a stacked pytree needs a "
                "leading axis on every leaf"
            )
        if length is None:
            length, first = shape[0], p
        elif shape[0] != length:
            raise ValueError(
                f"{name}: leaf '{path_str(p)}' has leading axis {shape[0]}, but leaf "
                f"'{path_str(first)}' has {length} (every leaf must be stacked along axis 0)"
            )
    if length < min_length:
        raise ValueError(f"{name}: needs at least {min_length} stacked entries, got {length}")
    return int(length)


def tree_dtype(tree: PyTree) -> Any:
    """The promoted floating dtype of the leaves (at least float32)."""
    leaves = jax.tree.leaves(tree)
    return jnp.promote_types(jnp.result_type(*leaves), jnp.float32)


def flatten(tree: PyTree) -> tuple[jax.Array, Any]:
    """``ravel_pytree``: a flat vector and the function mapping it back."""
    return ravel_pytree(tree)


def flatten_stacked(tree: PyTree) -> jax.Array:
    """A stacked pytree (leading axis ``T``) as a ``(T, n)`` matrix, rows in ``ravel_pytree`` order."""
    leaves = jax.tree.leaves(tree)
    t = leaves[0].shape[0]
    dtype = jnp.result_type(*leaves)
    return jnp.concatenate([jnp.reshape(x, (t, -1)).astype(dtype) for x in leaves], axis=1)


def hashable(fn: Callable | None) -> Callable | None:
    """``fn`` itself when hashable (compiled code is then reused across calls), else a wrapper."""
    if fn is None:
        return None
    try:
        hash(fn)
    except TypeError:  # e.g. an equinox Module holding arrays
        return lambda *args: fn(*args)
    return fn
