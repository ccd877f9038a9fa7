"""Parameter paths: one spelling for the leaves of nnx states, equinox models and dicts.

A path is a tuple of names and indices, e.g. ``('layers', 0, 'kernel')``,
written ``'layers/0/kernel'`` in messages and hand-written specs.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any

import jax

Path = tuple[str | int, ...]
PyTree = Any


def normalize_path(key_path: Sequence[Any]) -> Path:
    """Turns a JAX key path into a tuple of plain names and indices.

    The trailing ``.value`` of a flax ``Variable`` is dropped, so an nnx
    ``State`` leaf reads ``('layers', 0, 'kernel')``.
    """
    out: list[str | int] = []
    for k in key_path:
        if isinstance(k, jax.tree_util.DictKey):
            out.append(k.key)
        elif isinstance(k, jax.tree_util.SequenceKey):
            out.append(k.idx)
        elif isinstance(k, jax.tree_util.GetAttrKey):
            out.append(k.name)
        elif isinstance(k, jax.tree_util.FlattenedIndexKey):
            out.append(k.key)
        else:  # pragma: no cover - exotic key types
            out.append(str(k))
    while out and out[-1] in ("value", "raw_value"):
        out.pop()
    return tuple(out)


def path_str(path: Path) -> str:
    """``('layers', 0, 'kernel')`` -> ``'layers/0/kernel'``."""
    return "/".join(str(p) for p in path)


def paths_str(paths: Sequence[Path], limit: int = 6) -> str:
    """``'a/b, c/d, ... (N in all)'``: the first ``limit`` paths, and how many there are."""
    shown = ", ".join(path_str(p) for p in paths[:limit])
    return shown if len(paths) <= limit else f"{shown}, ... ({len(paths)} in all)"


def parse_path(path: str | Sequence[str | int]) -> Path:
    """``'layers/0/kernel'`` -> ``('layers', 0, 'kernel')`` (digit-only parts become ints)."""
    if isinstance(path, str):
        return tuple(int(p) if p.isdigit() else p for p in path.strip("/").split("/"))
    return tuple(path)


def leaves_by_path(tree: PyTree) -> dict[Path, Any]:
    """Flat ``{path: leaf}`` view of a pytree (``None`` leaves skipped)."""
    flat, _ = jax.tree_util.tree_flatten_with_path(tree)
    return {normalize_path(p): leaf for p, leaf in flat}


def map_with_path(fn: Callable[[Path, Any], Any], tree: PyTree, *rest: PyTree) -> PyTree:
    """``jax.tree.map`` whose function also receives the normalized path."""
    return jax.tree_util.tree_map_with_path(
        lambda p, x, *r: fn(normalize_path(p), x, *r), tree, *rest
    )
