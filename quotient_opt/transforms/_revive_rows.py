"""Unit rows of a revivable unit group: the views the detection, the split and the polish share.

A unit group's *producing* refs (incoming weights, bias, gains) hold one row
per unit; its *reading* refs (outgoing weights) one row per window. The
helpers here gather those rows into ``(units, entries)`` blocks and write
them back, and say which groups a split can revive at all.
"""

from __future__ import annotations

from typing import Any

import jax
import jax.numpy as jnp

from quotient_opt.symmetry import _views as views
from quotient_opt.symmetry._paths import Path, leaves_by_path, map_with_path
from quotient_opt.symmetry._spec import AxisRef, UnitGroup

PyTree = Any
Specs = tuple[AxisRef, ...]


def _rows(tree: PyTree, specs: Specs, n: int) -> list[jax.Array]:
    """The ``(n, e)`` blocks holding unit ``i``'s entries in row ``i``, one per ref
    (replicated: rows of differently sharded leaves are concatenated and indexed)."""
    leaves = leaves_by_path(tree)
    return [views.replicated(views.rows(leaves[r.path], r, n)) for r in specs]


def _write_rows(tree: PyTree, specs: Specs, n: int, blocks: list[jax.Array]) -> PyTree:
    """Inverse of :func:`_rows`: writes the blocks back into their leaves."""
    table: dict[Path, list[tuple[AxisRef, jax.Array]]] = {}
    for r, b in zip(specs, blocks):
        table.setdefault(r.path, []).append((r, b))

    def put(path: Path, leaf: jax.Array) -> jax.Array:
        new = leaf
        for r, b in table.get(path, ()):
            new = views.write_rows(new, r, n, b)
        return views.sharded_like(new, leaf)

    return map_with_path(put, tree)


def _sizes(blocks: list[jax.Array]) -> list[int]:
    return [b.shape[1] for b in blocks]


def _split_cols(v: jax.Array, sizes: list[int]) -> list[jax.Array]:
    out, i = [], 0
    for s in sizes:
        out.append(v[..., i : i + s])
        i += s
    return out


def _set_row(tree: PyTree, specs: Specs, n: int, row: jax.Array, vec: jax.Array,
             do: jax.Array) -> PyTree:
    """``tree`` with unit ``row``'s entries (concatenated over ``specs``) set to ``vec`` if ``do``."""
    blocks = _rows(tree, specs, n)
    hit = (jnp.arange(n) == row)[:, None] & do
    parts = _split_cols(vec, _sizes(blocks))
    new = [jnp.where(hit, p[None, :].astype(b.dtype), b) for b, p in zip(blocks, parts)]
    return _write_rows(tree, specs, n, new)


def _producing(grp: UnitGroup) -> Specs:
    """The unit-level refs that make a unit (weights, bias, gains): copied by a split."""
    return tuple(r for r in grp.refs if r.level == "unit" and r.power >= 0)


def _reading(grp: UnitGroup) -> Specs:
    """The refs that read a unit (outgoing weights): halved by a split."""
    return tuple(r for r in grp.refs if r.power < 0)


def _revivable(grp: UnitGroup) -> bool:
    """Whether a split is exactly function-preserving where the unit is silent.

    Max-pool pieces: a piece that never wins contributes nothing. Elementwise
    units: only behind a positively homogeneous activation (a zero gradient
    then means a zero output, unlike a saturated ``tanh``) whose every reader
    is a weight that can be halved, which is what makes the group rescalable.
    """
    if grp.pieces > 1:
        return grp.pieces_permutable
    return grp.rescalable and grp.permutable and bool(_reading(grp))


def _bias_column(grp: UnitGroup, tree: PyTree) -> int | None:
    """Index of the bias entry in a unit's concatenated producing vector."""
    spec = grp.bias
    specs = _producing(grp)
    if spec is None or spec not in specs:
        return None
    blocks = _rows(tree, specs, grp.units)
    return sum(b.shape[1] for b in blocks[: specs.index(spec)])


def _incoming_dim(grp: UnitGroup, tree: PyTree) -> int:
    return sum(b.shape[1] for b in _rows(tree, _producing(grp), grp.units))
