"""The Gram matrix :math:`J^\\top J` of the infinitesimal rescaling action, and its solve.

Under the rescaling by per-window log-scales :math:`s`, a parameter entry
:math:`\\theta_e` is multiplied by :math:`\\exp(n_e^\\top s)` where
:math:`n_e = \\sum_r p_r\\, \\mathbb 1_{u_r(e)}` sums, over the refs
:math:`r` (:class:`~quotient_opt.AxisRef`) that hold the entry, the ref's
power :math:`p_r` at the window :math:`u_r(e)` the entry belongs to. So

.. math::

    J a = \\theta \\odot (n^\\top a), \\qquad
    (J^\\top v)_u = \\sum_r p_r \\sum_{e:\\, u_r(e) = u} \\theta_e v_e, \\qquad
    J^\\top J = \\sum_e \\theta_e^2\\, n_e n_e^\\top .

Over the windows of the rescalable groups :math:`J^\\top J` is a weighted
graph Laplacian: its diagonal sums :math:`p_r^2 \\theta_e^2` over each
window's entries, and two refs of one leaf on different axes couple their
windows by :math:`p_a p_b \\sum \\theta_e^2` (minus the squared kernel
entries between a layer and the next). It is weakly diagonally dominant
(:math:`2|p_a p_b| \\le p_a^2 + p_b^2`), so Jacobi-scaled conjugate gradients
converge in a few iterations and touch only the small coupling matrices.
Used by the horizontal projection and by the Newton steps of the
canonicalization (whose Hessian is :math:`4 J^\\top J`).

Everything is read through the per-unit views of the spec, so dense,
convolution, flattened and
residual layouts need nothing special here.
"""

from __future__ import annotations

import dataclasses
import functools
from collections.abc import Callable
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp

from quotient_opt.symmetry import _views as views
from quotient_opt.symmetry._paths import Path, map_with_path
from quotient_opt.symmetry._spec import AxisRef, Symmetry

PyTree = Any


@dataclasses.dataclass(frozen=True)
class Coupling:
    """Two refs of one leaf, on different axes, of rescalable groups ``a`` and ``b``."""

    path: Path
    a: int  # index into Structure.groups
    ref_a: AxisRef
    b: int
    ref_b: AxisRef


@dataclasses.dataclass(frozen=True)
class Structure:
    """The rescalable part of a :class:`~quotient_opt.Symmetry`, read once.

    Attributes:
      index: for each rescalable group, its index in ``sym.groups``.
      windows: windows per rescalable group.
      pieces: pieces per rescalable group.
      refs: per rescalable group, its refs with a nonzero power.
      couplings: the coupled ref pairs.
      colors: a coloring of the rescalable groups such that no two groups of
        one color are coupled (``None`` for a group coupled to itself).
    """

    index: tuple[int, ...]
    windows: tuple[int, ...]
    pieces: tuple[int, ...]
    refs: tuple[tuple[AxisRef, ...], ...]
    couplings: tuple[Coupling, ...]
    colors: tuple[int | None, ...]

    def count(self, gi: int, ref: AxisRef) -> int:
        return self.windows[gi] * self.pieces[gi] if ref.level == "unit" else self.windows[gi]

    @property
    def num_colors(self) -> int:
        return 1 + max((c for c in self.colors if c is not None), default=-1)


@functools.lru_cache(maxsize=256)
def structure(sym: Symmetry) -> Structure:
    """The :class:`Structure` of ``sym`` (cached: symmetries are hashable)."""
    index = tuple(i for i, g in enumerate(sym.groups) if g.rescalable)
    refs = tuple(tuple(r for r in sym.groups[i].refs if r.power != 0) for i in index)
    by_leaf: dict[Path, list[tuple[int, AxisRef]]] = {}
    for gi, rs in enumerate(refs):
        for r in rs:
            by_leaf.setdefault(r.path, []).append((gi, r))
    couplings = []
    for path, entries in by_leaf.items():
        for i, (ga, ra) in enumerate(entries):
            for gb, rb in entries[i + 1 :]:
                if ra.axis != rb.axis:
                    couplings.append(Coupling(path, ga, ra, gb, rb))
    # greedy coloring of the coupling graph (a chain gets two colors)
    adj: dict[int, set[int]] = {i: set() for i in range(len(index))}
    for c in couplings:
        adj[c.a].add(c.b)
        adj[c.b].add(c.a)
    colors: list[int | None] = [None] * len(index)
    for gi in range(len(index)):
        if gi in adj[gi]:
            continue
        used = {colors[j] for j in adj[gi]}
        colors[gi] = next(c for c in range(len(index) + 1) if c not in used)
    return Structure(
        index=index,
        windows=tuple(sym.groups[i].windows for i in index),
        pieces=tuple(sym.groups[i].pieces for i in index),
        refs=refs,
        couplings=tuple(couplings),
        colors=tuple(colors),
    )


def _to_windows(v: jax.Array, st: Structure, gi: int, ref: AxisRef) -> jax.Array:
    if ref.level == "unit" and st.pieces[gi] > 1:
        return v.reshape(st.windows[gi], st.pieces[gi]).sum(-1)
    return v


def window_sums(
    st: Structure,
    leaf: Callable[[Path], jax.Array],
    weight: Callable[[int], float],
    dtype: Any,
) -> list[jax.Array]:
    """Per rescalable group and window: ``sum_r weight(p_r) * (sum of leaf(path) over the window)``."""
    out = []
    for gi, rs in enumerate(st.refs):
        total = jnp.zeros((st.windows[gi],), dtype)
        for r in rs:
            w = weight(r.power)
            if w:
                total = total + w * _to_windows(
                    views.sums(leaf(r.path), r, st.count(gi, r)), st, gi, r)
        out.append(total)
    return out


def product_window_sums(
    st: Structure,
    x: Callable[[Path], jax.Array],
    y: Callable[[Path], jax.Array],
    weight: Callable[[int], float],
    dtype: Any,
) -> list[jax.Array]:
    """Per rescalable group and window: ``sum_r weight(p_r) * (sum of x(path) * y(path)
    over the window)``, each a reduction of its own: a leaf read by two refs (a kernel
    between two layers) is read twice rather than having the product written out,
    which XLA would otherwise do to share it between the two reductions (a write the
    size of the kernel costs several reads on CPU)."""
    out = []
    seen: set[Path] = set()
    for gi, rs in enumerate(st.refs):
        total = jnp.zeros((st.windows[gi],), dtype)
        for r in rs:
            w = weight(r.power)
            if w:
                xr = x(r.path)
                if r.path in seen:  # keeps this reduction's product from being shared
                    xr = jax.lax.optimization_barrier(xr)
                seen.add(r.path)
                total = total + w * _to_windows(
                    views.product_sums(xr, y(r.path), r, st.count(gi, r)), st, gi, r)
        out.append(total)
    return out


def _pair_window_sums(st: Structure, c: Coupling, sq: jax.Array) -> jax.Array:
    """``S[u, w]``: the sum of ``sq`` over the entries of window ``u`` of group ``c.a`` and
    window ``w`` of group ``c.b``."""
    s = views.pair_sums(sq, c.ref_a, st.count(c.a, c.ref_a), c.ref_b, st.count(c.b, c.ref_b))
    if c.ref_a.level == "unit" and st.pieces[c.a] > 1:
        s = s.reshape(st.windows[c.a], st.pieces[c.a], -1).sum(1)
    if c.ref_b.level == "unit" and st.pieces[c.b] > 1:
        s = s.reshape(s.shape[0], st.windows[c.b], st.pieces[c.b]).sum(-1)
    return s


class Block(NamedTuple):
    """An off-diagonal Gram block :math:`\\mathrm{diag}(l)\\, M\\, \\mathrm{diag}(r)`
    between the windows of rescalable groups ``a`` (rows) and ``b`` (columns).

    The diagonal scalings stay vectors: rescaling the parameters, regularizing or
    Jacobi-scaling the system changes ``left``/``right`` only, never the matrix, so a
    solve reads the (kernel-sized) matrix once per product and never writes a copy.

    Attributes:
      a: row group (index into :attr:`Structure.windows`).
      b: column group.
      matrix: ``(windows_a, windows_b)``.
      left: row scaling (``None``: ones).
      right: column scaling (``None``: ones).
    """

    a: int
    b: int
    matrix: jax.Array
    left: jax.Array | None = None
    right: jax.Array | None = None

    def times(self, x: jax.Array) -> jax.Array:
        """``B @ x`` for ``x`` over the windows of group ``b``."""
        y = self.matrix @ (x if self.right is None else self.right * x)
        return y if self.left is None else self.left * y

    def transpose_times(self, x: jax.Array) -> jax.Array:
        """``B^T @ x`` for ``x`` over the windows of group ``a``."""
        y = (x if self.left is None else self.left * x) @ self.matrix
        return y if self.right is None else self.right * y

    def scaled(self, left: jax.Array, right: jax.Array) -> "Block":
        """``diag(left) · B · diag(right)``, without touching the matrix."""
        return self._replace(left=left if self.left is None else self.left * left,
                             right=right if self.right is None else self.right * right)

    def dense(self) -> jax.Array:
        """The block as a matrix (for tests and small problems)."""
        m = self.matrix
        m = m if self.left is None else self.left[:, None] * m
        return m if self.right is None else m * self.right[None, :]


def couplings(st: Structure, sq: dict[Path, jax.Array]) -> list[Block]:
    """Off-diagonal Gram blocks: ``B[u, w] = p_a p_b`` times the sum of the squared
    entries shared by window ``u`` of group ``a`` and window ``w`` of group ``b``."""
    out = []
    for c in st.couplings:
        m = _pair_window_sums(st, c, sq[c.path])
        sign = c.ref_a.power * c.ref_b.power  # in the row scaling: the matrix is not rewritten
        out.append(Block(c.a, c.b, m, None if sign == 1 else jnp.full(m.shape[:1], sign, m.dtype)))
    return out


class ScaledSquares(NamedTuple):
    """Window sums of the squared parameters at ``exp(s)·θ`` (:func:`squares_model`).

    Attributes:
      total: the sum of all squares of the leaves the groups touch.
      ins: per rescalable group and window, ``sum_r max(p_r, 0)`` times its squares.
      outs: the same with ``max(-p_r, 0)``.
      diag: the same with ``p_r^2`` (the Gram diagonal).
      coupled: the Gram couplings ``p_a p_b S_ab`` in the order of ``st.couplings``, as
        :class:`Block` s over the unscaled pair sums (the rescaling only in their
        ``left``/``right`` vectors).
    """

    total: jax.Array
    ins: list[jax.Array]
    outs: list[jax.Array]
    diag: list[jax.Array]
    coupled: list[Block]


def squares_model(
    st: Structure, shapes: dict[Path, tuple[int, ...]], sq: dict[Path, jax.Array], dtype: Any
) -> Callable[[tuple[jax.Array, ...]], ScaledSquares] | None:
    """Window sums of the squares at any log-scales ``s``, from one pass over ``sq`` at 0.

    A leaf held by one ref scales its window sums by :math:`e^{2 p s_u}`; a
    leaf held by two refs on different axes (a kernel between two layers)
    scales its pair sums :math:`S_{uw}` by :math:`e^{2 p_a s_u + 2 p_b
    s_w}`. So after one pass over the parameters, the sums at any ``s`` cost
    only vector operations and two matrix-vector products with each coupling
    matrix (which is never rewritten), instead of a pass over every parameter. ``None`` when some leaf does not
    have this form (more refs on one leaf, or units not filling their axis).
    """
    by_leaf: dict[Path, list[tuple[int, AxisRef]]] = {}
    for gi, rs in enumerate(st.refs):
        for r in rs:
            by_leaf.setdefault(r.path, []).append((gi, r))

    def fills(gi: int, r: AxisRef) -> bool:
        return r.offset == 0 and r.outer * st.count(gi, r) * r.inner == shapes[r.path][r.axis]

    pair_of = {c.path: k for k, c in enumerate(st.couplings)}
    singles, pairs = [], []
    for path, entries in by_leaf.items():
        if not all(fills(gi, r) for gi, r in entries):
            return None
        if len(entries) == 1:
            (gi, r), = entries
            singles.append((gi, r.power, _to_windows(views.sums(sq[path], r, st.count(gi, r)),
                                                     st, gi, r)))
        elif len(entries) == 2 and path in pair_of:
            c = st.couplings[pair_of[path]]
            pairs.append((pair_of[path], c, _pair_window_sums(st, c, sq[path])))
        else:
            return None
    pairs.sort(key=lambda t: t[0])  # the order of st.couplings
    rest = sum((jnp.sum(x) for p, x in sq.items() if p not in by_leaf), jnp.zeros((), dtype))

    def at(s: tuple[jax.Array, ...]) -> ScaledSquares:
        zeros = [jnp.zeros((w,), dtype) for w in st.windows]
        ins, outs, diag = list(zeros), list(zeros), list(zeros)
        total = rest

        def add(gi: int, p: int, v: jax.Array) -> None:
            ins[gi] = ins[gi] + max(p, 0) * v
            outs[gi] = outs[gi] + max(-p, 0) * v
            diag[gi] = diag[gi] + (p * p) * v

        for gi, p, v in singles:
            v = v * jnp.exp(2 * p * s[gi])
            add(gi, p, v)
            total = total + jnp.sum(v)
        coupled = []
        for _, c, m in pairs:
            pa, pb = c.ref_a.power, c.ref_b.power
            # m scaled by e_a e_b^T, read twice (row and column sums), never rewritten
            ea, eb = jnp.exp(2 * pa * s[c.a]), jnp.exp(2 * pb * s[c.b])
            rows, cols = ea * (m @ eb), eb * (ea @ m)
            add(c.a, pa, rows)
            add(c.b, pb, cols)
            total = total + jnp.sum(rows)
            coupled.append(Block(c.a, c.b, m, (pa * pb) * ea, eb))
        return ScaledSquares(total, ins, outs, diag, coupled)

    return at


def tangent(st: Structure, theta: PyTree, a: list[jax.Array], dtype: Any) -> PyTree:
    """``J a``: every entry times ``sum_r p_r a[window_r(entry)]``."""
    mult: dict[Path, list[tuple[AxisRef, int, jax.Array]]] = {}
    for gi, (ai, rs) in enumerate(zip(a, st.refs)):
        for r in rs:
            v = r.power * ai
            if r.level == "unit" and st.pieces[gi] > 1:
                v = jnp.repeat(v, st.pieces[gi])
            mult.setdefault(r.path, []).append((r, st.count(gi, r), v))

    def one(path: Path, x: jax.Array) -> jax.Array:
        if path not in mult:
            return jnp.zeros_like(x)
        m = 0.0
        for r, count, v in mult[path]:
            full = views.expand(v.astype(dtype), r, count, x.shape[r.axis], fill=0)
            m = m + views.broadcast_along(full, x.ndim, r.axis)
        return (x.astype(dtype) * m).astype(x.dtype)

    return map_with_path(one, theta)


# --------------------------------------------------------------------------- solve


def cg(matvec, b: list[jax.Array], tol: jax.Array, max_iter: jax.Array) -> list[jax.Array]:
    """Conjugate gradients for an SPD operator on a list of vectors (jit-safe loop)."""

    def dot(x, y):
        return sum(jnp.vdot(u, v) for u, v in zip(x, y))

    def axpy(alpha, x, y):
        return [alpha * u + v for u, v in zip(x, y)]

    bb = dot(b, b)
    tiny = jnp.finfo(bb.dtype).tiny
    stop = (tol**2) * bb

    def cond(c):
        i, _, _, _, rr = c
        return (i < max_iter) & (rr > stop) & (rr > tiny)

    def body(c):
        i, x, r, p, rr = c
        ap = matvec(p)
        pap = dot(p, ap)
        alpha = jnp.where(pap > tiny, rr / jnp.where(pap > tiny, pap, 1.0), 0.0)
        x = axpy(alpha, p, x)
        r = axpy(-alpha, ap, r)
        rr_new = dot(r, r)
        beta = jnp.where(rr > tiny, rr_new / jnp.where(rr > tiny, rr, 1.0), 0.0)
        p = axpy(beta, p, r)
        return i + 1, x, r, p, rr_new

    x0 = [jnp.zeros_like(u) for u in b]
    init = (jnp.zeros([], jnp.int32), x0, b, b, bb)
    _, x, _, _, _ = jax.lax.while_loop(cond, body, init)
    return x


def gram_solve(
    diag: list[jax.Array],
    coupled: list[Block],
    b: list[jax.Array],
    eps: jax.Array,
    tol: jax.Array,
    max_iter: jax.Array,
) -> list[jax.Array]:
    """Solves ``((1 + eps) D + C + tiny) a = b`` by Jacobi-scaled CG.

    ``D`` is the Gram diagonal (one vector per rescalable group), ``C`` the
    symmetric couplings from :func:`couplings` (each :class:`Block` stands for
    itself and its transpose). The Jacobi scaling goes into the blocks' vectors,
    so each CG iteration reads each coupling matrix twice (one product each way)
    and writes nothing of its size. A non-finite solution is replaced by zeros.
    """
    tiny = jnp.finfo(diag[0].dtype).tiny
    # d^2 = (1 + eps) D + tiny: strictly diagonally dominant, so positive definite.
    inv = [jax.lax.rsqrt((1 + eps) * dg + tiny) for dg in diag]
    scaled = [blk.scaled(inv[blk.a], inv[blk.b]) for blk in coupled]

    def matvec(x: list[jax.Array]) -> list[jax.Array]:
        y = list(x)
        for blk in scaled:
            y[blk.a] = y[blk.a] + blk.times(x[blk.b])
            y[blk.b] = y[blk.b] + blk.transpose_times(x[blk.a])
        return y

    bhat = [bi * di for bi, di in zip(b, inv)]
    x = cg(matvec, bhat, tol, jnp.asarray(max_iter))
    a = [xi * di for xi, di in zip(x, inv)]
    finite = jnp.all(jnp.asarray([jnp.all(jnp.isfinite(ai)) for ai in a]))
    return [jnp.where(finite, ai, 0.0) for ai in a]
