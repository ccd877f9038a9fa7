"""Per-unit views of parameter leaves, written once for every transformation.

An :class:`~quotient_opt.AxisRef` says where the units of a group sit along
one axis of one leaf. The axis (size ``L``) is read as ``outer`` blocks of
``L / outer`` positions; in every block the group's ``count`` units occupy
the positions ``[offset, offset + count * inner)``, unit ``u`` owning the
``inner`` consecutive positions starting at ``offset + u * inner``. This
covers a plain axis (a dense or conv kernel: ``outer = inner = 1``), a
flattened ``(H, W, C)`` feature map read by a dense layer (channels
interleaved: ``outer = H * W``), a flattened ``(C, H, W)`` one (channel
blocks: ``inner = H * W``) and a concatenation of several groups along one
axis (``offset``).

Every function here reads or writes those positions with reshapes, slices
and one small gather; nothing else in the library indexes parameter leaves
by unit, so a new layout or layer kind needs a change here only.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

import jax
import jax.numpy as jnp

if TYPE_CHECKING:  # pragma: no cover
    from quotient_opt.symmetry._spec import AxisRef


def explicit_sharding(x: Any) -> Any:
    """The sharding in ``x``'s type if some axis is sharded on an ``Explicit`` mesh, else
    ``None`` (unsharded, ``Auto`` meshes and single devices: the type carries no sharding)."""
    typeof = getattr(jax, "typeof", None)  # jax >= 0.6
    sharding = getattr(typeof(x), "sharding", None) if typeof is not None else None
    spec = getattr(sharding, "spec", None)
    return sharding if spec is not None and any(spec) else None


def replicated(x: jax.Array) -> jax.Array:
    """``x`` unsharded where its type is sharded on an ``Explicit`` mesh (else ``x`` itself).

    Per-unit vectors and matrices (the sums below, a unit's rows) are
    small: kept replicated, they combine with each other and broadcast
    against any leaf's sharding without a sharding-type error.
    """
    sharding = explicit_sharding(x)
    if sharding is None:
        return x
    return jax.sharding.reshard(
        x, jax.sharding.NamedSharding(sharding.mesh, jax.sharding.PartitionSpec()))


def sharded_like(x: jax.Array, leaf: jax.Array) -> jax.Array:
    """``x`` resharded to ``leaf``'s ``Explicit`` sharding (``x`` itself if ``leaf`` has none)."""
    sharding = explicit_sharding(leaf)
    if sharding is None or explicit_sharding(x) == sharding:
        return x
    return jax.sharding.reshard(x, sharding)


def block(length: int, ref: AxisRef) -> int:
    """Positions per outer block of an axis of ``length`` positions."""
    return length // ref.outer


def is_plain(length: int, ref: AxisRef, count: int) -> bool:
    """Whether the units fill the whole axis in order (no reshape needed)."""
    return ref.outer == 1 and ref.offset == 0 and ref.inner == 1 and count == length


def broadcast_along(v: jax.Array, ndim: int, axis: int) -> jax.Array:
    """Reshapes a vector so it broadcasts along ``axis`` of an ``ndim``-array."""
    shape = [1] * ndim
    shape[axis] = v.shape[0]
    return v.reshape(shape)


def _segment(xm: jax.Array, ref: AxisRef, count: int) -> jax.Array:
    """``xm`` (unit axis first) -> ``(outer, count, inner, *rest)``."""
    length, rest = xm.shape[0], xm.shape[1:]
    b = block(length, ref)
    seg = xm.reshape(ref.outer, b, *rest)[:, ref.offset : ref.offset + count * ref.inner]
    return seg.reshape(ref.outer, count, ref.inner, *rest)


def rows(x: jax.Array, ref: AxisRef, count: int) -> jax.Array:
    """The ``(count, m)`` matrix whose row ``u`` holds every entry of unit ``u`` in ``x``."""
    xm = jnp.moveaxis(x, ref.axis, 0)
    if is_plain(xm.shape[0], ref, count):
        return xm.reshape(count, -1)
    return jnp.moveaxis(_segment(xm, ref, count), 1, 0).reshape(count, -1)


def write_rows(x: jax.Array, ref: AxisRef, count: int, new_rows: jax.Array) -> jax.Array:
    """Inverse of :func:`rows`: ``x`` with unit ``u``'s entries replaced by ``new_rows[u]``."""
    xm = jnp.moveaxis(x, ref.axis, 0)
    length, rest = xm.shape[0], xm.shape[1:]
    new_rows = new_rows.astype(x.dtype)
    if is_plain(length, ref, count):
        out = new_rows.reshape(xm.shape)
    else:
        seg = jnp.moveaxis(new_rows.reshape(count, ref.outer, ref.inner, *rest), 0, 1)
        b = block(length, ref)
        full = xm.reshape(ref.outer, b, *rest)
        full = full.at[:, ref.offset : ref.offset + count * ref.inner].set(
            seg.reshape(ref.outer, count * ref.inner, *rest)
        )
        out = full.reshape(xm.shape)
    return jnp.moveaxis(out, 0, ref.axis)


def sums(x: jax.Array, ref: AxisRef, count: int) -> jax.Array:
    """Per unit: the sum of its entries of ``x`` (over every other axis and position)."""
    v = replicated(jnp.sum(x, axis=tuple(a for a in range(x.ndim) if a != ref.axis)))
    if is_plain(v.shape[0], ref, count):
        return v
    return _segment(v, ref, count).sum(axis=(0, 2))


def product_sums(x: jax.Array, y: jax.Array, ref: AxisRef, count: int) -> jax.Array:
    """Per unit: the sum of ``x * y`` over its entries (over every other axis and position)."""
    v = replicated(jnp.sum(x * y, axis=tuple(a for a in range(x.ndim) if a != ref.axis)))
    if is_plain(v.shape[0], ref, count):
        return v
    return _segment(v, ref, count).sum(axis=(0, 2))


def pair_sums(
    x: jax.Array, ref_a: AxisRef, count_a: int, ref_b: AxisRef, count_b: int
) -> jax.Array:
    """``S[u, w]``: the sum of the entries of ``x`` that belong to unit ``u`` of ``ref_a``
    and unit ``w`` of ``ref_b`` (two different axes of one leaf)."""
    other = tuple(a for a in range(x.ndim) if a not in (ref_a.axis, ref_b.axis))
    m = replicated(jnp.sum(x, axis=other))
    if ref_a.axis > ref_b.axis:
        m = m.T
    if not is_plain(m.shape[0], ref_a, count_a):
        m = _segment(m, ref_a, count_a).sum(axis=(0, 2))
    if not is_plain(m.shape[1], ref_b, count_b):
        m = _segment(m.T, ref_b, count_b).sum(axis=(0, 2)).T
    return m


def expand(v: jax.Array, ref: AxisRef, count: int, length: int, fill: Any = 1) -> jax.Array:
    """A length-``length`` vector with ``v[u]`` at unit ``u``'s positions, ``fill`` elsewhere."""
    if is_plain(length, ref, count):
        return v
    b = block(length, ref)
    full = jnp.full((ref.outer, b), fill, v.dtype)
    vals = jnp.repeat(v, ref.inner)
    full = full.at[:, ref.offset : ref.offset + count * ref.inner].set(vals[None, :])
    return full.reshape(length)


def gather_index(perm: jax.Array, ref: AxisRef, count: int, length: int) -> jax.Array:
    """Index along the axis that moves unit ``perm[u]``'s entries to unit ``u``'s positions."""
    if is_plain(length, ref, count):
        return perm
    b = block(length, ref)
    inner = jnp.arange(ref.inner, dtype=perm.dtype)
    within = ref.offset + (perm[:, None] * ref.inner + inner).reshape(-1).astype(perm.dtype)
    base = jnp.arange(length, dtype=perm.dtype).reshape(ref.outer, b)
    starts = (jnp.arange(ref.outer, dtype=perm.dtype) * b)[:, None]
    base = base.at[:, ref.offset : ref.offset + count * ref.inner].set(starts + within[None, :])
    return base.reshape(length)


def permute(x: jax.Array, ref: AxisRef, count: int, perm: jax.Array) -> jax.Array:
    """``x`` with unit ``u``'s entries taken from unit ``perm[u]``."""
    idx = gather_index(perm, ref, count, x.shape[ref.axis])
    return jnp.take(x, idx, axis=ref.axis)


def scale(x: jax.Array, ref: AxisRef, count: int, factor: jax.Array) -> jax.Array:
    """``x`` with unit ``u``'s entries multiplied by ``factor[u]`` (in ``x``'s dtype)."""
    m = expand(factor, ref, count, x.shape[ref.axis])
    return x * broadcast_along(m, x.ndim, ref.axis).astype(x.dtype)
