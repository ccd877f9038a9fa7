"""Canonical representatives of symmetry orbits: the minimal-energy point.

Under the positive rescalings of :class:`~quotient_opt.Symmetry` (per-window
log-scales :math:`s`), every parameter entry :math:`\\theta_e` is multiplied by
:math:`\\exp(n_e^\\top s)`, where :math:`n_e` has the power of every
:class:`~quotient_opt.AxisRef` holding the entry at the window it belongs to
(:math:`+1` where the entry produces the unit, :math:`-1` where it reads it). The squared norm along the orbit,

.. math::

   E(s) = \\lVert \\exp(s) \\cdot \\theta \\rVert^2
        = \\sum_e \\theta_e^2 \\, e^{2 n_e^\\top s},

is convex in :math:`s`, with gradient and Hessian

.. math::

   \\nabla E = 2\\,(\\mathrm{in} - \\mathrm{out}), \\qquad
   \\nabla^2 E = 4 \\sum_e \\theta_e'^2 \\, n_e n_e^\\top = 4 J^\\top J,

where :math:`\\mathrm{in}_w` (:math:`\\mathrm{out}_w`) is the energy of unit
:math:`w`'s incoming parameters, bias included (outgoing weights) at the
current point :math:`\\theta'`, and :math:`J` is the infinitesimal action
(:meth:`Symmetry.tangent`). The minimum is the *balanced* point
:math:`\\mathrm{in}_w = \\mathrm{out}_w` for every unit: the equinormalization
fixed point of ENorm. It is unique, so it is a canonical representative of
the rescaling orbit: ``canonicalize(g·θ)`` and ``canonicalize(θ)`` are the same
point up to the permutation part of ``g``. Sorting units then fixes the
permutation part too.

Solver: a ``lax.while_loop`` that carries, at the current log-scales, the
per-unit energies, :math:`E` and the Gram couplings, all from one pass over
the parameters (the squares are rescaled by broadcasting ``exp`` of the small
per-window vectors). While the relative balance residual
:math:`\\max_w |\\mathrm{in}_w - \\mathrm{out}_w| / (\\mathrm{in}_w + \\mathrm{out}_w)`
is above 1/2, an iteration is a coordinate sweep over one color of the
groups' coupling graph (groups of one color share no parameter, so their
units are independent given the others; a chain needs two colors; the
one-unit minimum is :math:`s_w \\mathrel{+}= \\tfrac14 \\log(\\mathrm{out}_w/\\mathrm{in}_w)`,
which absorbs large imbalances such as log-scales of ±20 in one step).
Below it, an iteration is a Newton step: the Hessian :math:`4 J^\\top J` is
the explicit graph-Laplacian Gram matrix of the horizontal projection
(diagonal :math:`\\mathrm{in}_w + \\mathrm{out}_w`, couplings the squared
kernel entries between adjacent groups), solved by Jacobi-scaled conjugate
gradients that touch only the small coupling matrices. The full step is
evaluated first (one pass, which also yields the next iteration's
quantities) and backtracked (Armijo) only if it fails to decrease :math:`E`.
The loop stops when the residual is below ``tol`` or has stalled at the
rounding floor (quadratic convergence; a partially converged balancing is
not equivariant). Near balance, as after one optimizer step from a balanced
point, this costs one pass plus one per Newton step (typically two).

Dead units: if all incoming parameters (or all outgoing weights) of a unit are
exactly zero, the infimum over its scale is at infinity. Such units are left
at log-scale 0 and their neighbours treat them as fixed, so the problem on
the remaining units is strictly convex and coercive (every live unit has a
non-zero path to the fixed inputs and outputs). The canonical point is then
unique only up to the scales of the dead units. Log-scales are also clipped to
``±max_log_scale`` (default :math:`0.4 \\log(\\text{float max})`) so that no
finite input can produce ``inf`` or ``NaN``.

References:
  Stock, Graham, Gribonval, Jégou. *Equi-normalization of Neural Networks*
  (ENorm), ICLR 2019. https://arxiv.org/abs/1902.10416

  Neyshabur, Salakhutdinov, Srebro. *Path-SGD: Path-Normalized Optimization in
  Deep Neural Networks*, 2015. https://arxiv.org/abs/1506.02617
"""

from __future__ import annotations

import functools
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np

from quotient_opt.symmetry import _kinds
from quotient_opt.symmetry import _views as views
from quotient_opt.symmetry._gram import (
    Block,
    couplings,
    gram_solve,
    squares_model,
    structure,
    window_sums,
)
from quotient_opt.symmetry._paths import Path, leaves_by_path
from quotient_opt.symmetry._spec import (
    Element,
    GroupElement,
    LogScales,
    OrbitElement,
    Symmetry,
    UnitGroup,
    solve_dtype,
)

PyTree = Any

# Relative balance residual above which the solver takes coordinate sweeps
# (exact per-unit minimization, robust to huge imbalances) instead of Newton.
_SWEEP_ABOVE = 0.5


# --------------------------------------------------------------------------- helpers


def rescale(sym: Symmetry, tree: PyTree, log_scales: LogScales, *, power: int = 1) -> PyTree:
    """Pure rescaling without the permutation gathers: ``sym.rescale(tree, s, power=power)``.

    ``power`` is ``1`` for parameters, ``-1`` for gradients and first
    moments, ``-2`` for second moments.
    """
    return sym.rescale(tree, log_scales, power=power)


def _squares(sym: Symmetry, params: PyTree, dtype: Any) -> dict[Path, jax.Array]:
    leaves = leaves_by_path(params)
    touched = {r.path for grp in sym.groups for r in grp.refs}
    return {p: jnp.square(jnp.asarray(leaves[p], dtype)) for p in touched}


def _group_sums(grp: UnitGroup, q: dict[Path, jax.Array], keep, dt: Any) -> jax.Array:
    """Per window of ``grp``: the sum of ``q`` over the entries of the refs ``keep`` selects."""
    total = jnp.zeros((grp.windows,), dt)
    for r in grp.refs:
        if not keep(r):
            continue
        v = views.sums(q[r.path], r, grp.count(r))
        if r.level == "unit" and grp.pieces > 1:
            v = v.reshape(grp.windows, grp.pieces).sum(-1)
        total = total + abs(r.power) * v
    return total


def unit_energies(sym: Symmetry, params: PyTree) -> tuple[LogScales, LogScales]:
    """Per-window energies ``(in, out)`` of every unit group.

    ``in_w`` is the sum of squares of unit ``w``'s producing parameters
    (incoming weights and bias, over all pieces of a max-pool window; refs
    with ``power > 0``), ``out_w`` of its outgoing weights (``power < 0``).

    Args:
      sym: the symmetry.
      params: parameters.

    Returns:
      ``(ins, outs)``: one ``(windows,)`` array per group each.
    """
    sym.validate(params)
    dt = solve_dtype(params)
    q = _squares(sym, params, dt)
    ins = tuple(_group_sums(g, q, lambda r: r.power > 0, dt) for g in sym.groups)
    outs = tuple(_group_sums(g, q, lambda r: r.power < 0, dt) for g in sym.groups)
    return ins, outs


def unit_balance(sym: Symmetry, params: PyTree) -> LogScales:
    """Per-window balance :math:`\\lVert w_{in}\\rVert^2 + b^2 - \\lVert w_{out}\\rVert^2`.

    It is :math:`\\tfrac12 \\nabla_s E`, zero at the canonical point, and
    conserved by gradient flow on a rescaling-invariant loss (the gradient is
    horizontal: :math:`J^\\top \\nabla L = 0`).

    Args:
      sym: the symmetry.
      params: parameters.

    Returns:
      One ``(windows,)`` array per group.
    """
    ins, outs = unit_energies(sym, params)
    return tuple(i - o for i, o in zip(ins, outs))


# --------------------------------------------------------------------------- solver


class CanonicalInfo(NamedTuple):
    """Diagnostics of :func:`canonical_log_scales`.

    Attributes:
      residual: final :math:`\\max_w |\\mathrm{in}_w - \\mathrm{out}_w| / (\\mathrm{in}_w + \\mathrm{out}_w)`
        over live units.
      iterations: iterations taken (int32).
      energy: final :math:`\\lVert \\theta' \\rVert^2` over the rescaled leaves.
    """

    residual: jax.Array
    iterations: jax.Array
    energy: jax.Array


def default_tol(dtype: Any) -> float:
    """Default balance tolerance: ``10 · eps`` of the solve dtype (1.2e-6 / 2.2e-15).

    Where rounding keeps the residual above it (wide layers in float32), the
    solver stops once a Newton iteration no longer halves a residual that is
    already below ``1000 · tol``.
    """
    return float(10 * jnp.finfo(dtype).eps)


@functools.partial(jax.jit, static_argnames=("sym",))
def canonical_log_scales(
    sym: Symmetry,
    params: PyTree,
    *,
    tol: jax.typing.ArrayLike | None = None,
    max_iter: int = 50,
    max_log_scale: float | None = None,
    cg_iter: int = 50,
    init: LogScales | None = None,
) -> tuple[LogScales, CanonicalInfo]:
    """Log-scales :math:`s^\\star = \\arg\\min_s \\lVert \\exp(s)\\cdot\\theta \\rVert^2`.

    :math:`\\lVert \\exp(s)\\cdot\\theta \\rVert^2` is convex in :math:`s`; its
    minimum is the balanced point (every unit's incoming energy equals its
    outgoing energy). Solved by coordinate sweeps while far from balance
    (exact one-unit minima), then damped Newton steps on the explicit Gram
    matrix (Jacobi-scaled CG), to ``tol``. After one pass over the
    parameters, the iterations work on per-window sums and the small
    coupling matrices only (where every leaf is held by one ref, or by two on
    different axes, as in dense, convolutional and residual networks; otherwise
    each iteration rescales the squares once). jit-, vmap- and scan-safe;
    compiled once per symmetry and input shapes (``sym`` is static), so eager
    calls do not recompile the solver loop.

    Args:
      sym: the symmetry.
      params: parameters.
      tol: stop when the relative balance residual is below this, or stalls
        below ``1000 · tol`` (default: ``10 · eps`` of the solve dtype).
      max_iter: iteration cap (one sweep or one Newton step per iteration).
      max_log_scale: bound on ``|s|`` (default ``0.4 · log(finfo.max)``).
      cg_iter: conjugate-gradient iterations cap per Newton step (the
        CG works on the small coupling matrices only).
      init: log-scales to start from (a warm start, e.g. the element a
        wrapper holds; default zeros). The result is still the minimizer
        for ``params`` itself, and dead units keep their ``init`` value.

    Returns:
      ``(log_scales, info)``: one ``(windows,)`` array per group (zeros on
      groups without a rescaling symmetry, or ``init``'s values) and
      :class:`CanonicalInfo`.
    """
    sym.validate(params)
    dt = solve_dtype(params)
    tol = default_tol(dt) if tol is None else tol
    bound = 0.4 * float(np.log(jnp.finfo(dt).max)) if max_log_scale is None else max_log_scale
    st = structure(sym)
    zero_all = tuple(jnp.zeros((grp.windows,), dt) for grp in sym.groups)
    if init is not None:
        if len(init) != len(sym.groups) or any(
            jnp.shape(x) != (g.windows,) for x, g in zip(init, sym.groups)
        ):
            raise ValueError(
                "init: expected one (windows,) array per group, shapes "
                f"{[(g.windows,) for g in sym.groups]}, got {[jnp.shape(x) for x in init]}"
            )
        zero_all = tuple(jnp.asarray(x, dt) for x in init)
    if not st.index:
        info = CanonicalInfo(jnp.zeros((), dt), jnp.zeros((), jnp.int32), jnp.zeros((), dt))
        return zero_all, info
    q0 = _squares(sym, params, dt)
    tiny = jnp.finfo(dt).tiny
    eps = jnp.finfo(dt).eps
    zero = tuple(jnp.zeros((w,), dt) for w in st.windows)
    ncolors = max(st.num_colors, 1)

    def energies(q):
        ins = window_sums(st, q.__getitem__, lambda p: max(p, 0), dt)
        outs = window_sums(st, q.__getitem__, lambda p: max(-p, 0), dt)
        diag = window_sums(st, q.__getitem__, lambda p: p * p, dt)
        return ins, outs, diag

    model = squares_model(st, dict(sym.shapes), q0, dt)
    if model is not None:
        at0 = model(zero)
        ins0, outs0 = at0.ins, at0.outs
    else:
        ins0, outs0, _ = energies(q0)
    # live units: non-zero energy on both sides (dead units stay at scale 0)
    live = tuple((i > tiny) & (o > tiny) for i, o in zip(ins0, outs0))
    live_f = [lv.astype(dt) for lv in live]

    def scaled_q(s):
        """Squares at ``exp(s)·θ``: small exps broadcast, no full-size exp."""
        out = dict(q0)
        for gi, rs in enumerate(st.refs):
            for r in rs:
                v = s[gi] if r.level == "window" or st.pieces[gi] == 1 else jnp.repeat(
                    s[gi], st.pieces[gi])
                out[r.path] = views.scale(out[r.path], r, st.count(gi, r),
                                          jnp.exp((2 * r.power) * v))
        return out

    def residual(ins, outs):
        r = jnp.zeros((), dt)
        for i, o, lv in zip(ins, outs, live):
            rr = jnp.where(lv, jnp.abs(i - o) / jnp.where(lv, i + o, 1), 0)
            r = jnp.maximum(r, jnp.max(rr, initial=0))
        return r

    def stats(s):
        """Energy, per-unit sums, couplings and residual at ``s``: from the squares
        model where the spec allows one (no pass over the parameters), else one pass."""
        if model is not None:
            m = model(s)
            e, ins, outs, diag = m.total, m.ins, m.outs, m.diag
            # the loop carries the blocks' scalings only; the matrices are fixed
            coup = [(blk.left * live_f[blk.a], blk.right * live_f[blk.b]) for blk in m.coupled]
        else:
            q = scaled_q(s)
            ins, outs, diag = energies(q)
            coup = [blk.scaled(live_f[blk.a], live_f[blk.b]).dense() for blk in couplings(st, q)]
            e = sum(jnp.sum(x) for x in q.values())
        return (e, tuple(ins), tuple(outs), tuple(diag), coup), residual(ins, outs)

    fixed = None if model is None else at0.coupled

    def blocks(coup) -> list:
        if fixed is None:
            return [Block(c.a, c.b, m) for c, m in zip(st.couplings, coup)]
        return [blk._replace(left=lr[0], right=lr[1]) for blk, lr in zip(fixed, coup)]

    def clip(s):
        return tuple(jnp.clip(x, -bound, bound) for x in s)

    def dot(a, b):
        return sum(jnp.vdot(x, y) for x, y in zip(a, b))

    def direction(st_s, res, it):
        """A coordinate sweep over one color while far from balance, else a Newton step."""
        _, ins, outs, diag, coup = st_s
        far = res > _SWEEP_ABOVE
        color = it % ncolors
        sweep = tuple(
            jnp.where(
                lv & (c == color),
                0.25 * (jnp.log(jnp.where(lv, o, 1)) - jnp.log(jnp.where(lv, i, 1))),
                0,
            ) if c is not None else jnp.zeros_like(i)
            for i, o, lv, c in zip(ins, outs, live, st.colors)
        )
        # Newton: (4 J^T J) d = -grad E = 2 (out - in), J^T J the explicit Gram
        # matrix (diagonal sum p^2 q, couplings p_a p_b q).
        rhs = [jnp.where(lv, 0.5 * (o - i), 0) for i, o, lv in zip(ins, outs, live)]
        dg = [jnp.where(lv, d, 0) for d, lv in zip(diag, live)]
        cg_tol = jnp.minimum(0.1, jnp.sqrt(res))
        newton = gram_solve(dg, blocks(coup), rhs, eps, cg_tol, jnp.where(far, 0, cg_iter))
        newton = [jnp.where(lv, x, 0) for x, lv in zip(newton, live)]
        d = tuple(jnp.where(far, u, v) for u, v in zip(sweep, newton))
        # a safe step: at most 4 in any log-scale for Newton
        dmax = jnp.max(jnp.stack([jnp.max(jnp.abs(x), initial=0) for x in d]))
        lim = jnp.where(far, 1, jnp.minimum(1, 4 / jnp.maximum(dmax, tiny)))
        return tuple(x * lim for x in d)

    def cond(c):
        s, st_s, res, prev, it = c
        stalled = (res <= 1e3 * tol) & (res > 0.5 * prev)
        return (it < max_iter) & (res > tol) & ~stalled

    def body(c):
        s, st_s, res, _, it = c
        e0, ins, outs = st_s[0], st_s[1], st_s[2]
        d = direction(st_s, res, it)
        slope = dot(tuple(2 * (i - o) for i, o in zip(ins, outs)), d)
        ok_dir = (slope < 0) & jnp.isfinite(slope)
        d = tuple(jnp.where(ok_dir, x, 0) for x in d)
        # full step first; backtrack (Armijo) only if it does not decrease E.
        # slack: E is summed in rounding, so a step at the floor may not show.
        slack = 64 * eps * e0

        def ls_cond(lc):
            t, k, new, _ = lc
            bad = ~(new[0][0] <= e0 + 1e-4 * t * slope + slack)
            return (k < 30) & (bad | ~jnp.isfinite(new[0][0]))

        def ls_body(lc):
            t, k, _, _ = lc
            t = 0.5 * t
            trial = clip(tuple(a + t * b_ for a, b_ in zip(s, d)))
            return t, k + 1, stats(trial), trial

        s1 = clip(tuple(a + b_ for a, b_ in zip(s, d)))
        one = jnp.ones((), dt)
        t, k, new, s_new = jax.lax.while_loop(
            ls_cond, ls_body, (one, jnp.zeros((), jnp.int32), stats(s1), s1)
        )
        keep = k < 30
        s_new = tuple(jnp.where(keep, a, b_) for a, b_ in zip(s_new, s))
        new = jax.tree.map(lambda a, b_: jnp.where(keep, a, b_), new, (st_s, res))
        return s_new, new[0], new[1], res, it + 1

    start = clip(tuple(zero_all[gi] for gi in st.index))
    st0, res0 = stats(start)
    inf = jnp.asarray(jnp.inf, dt)
    s, st_s, res, _, it = jax.lax.while_loop(
        cond, body, (start, st0, res0, inf, jnp.zeros((), jnp.int32))
    )
    s = tuple(jnp.where(jnp.isfinite(x) & lv, x, x0) for x, lv, x0 in zip(s, live, start))
    out = list(zero_all)
    for gi, x in zip(st.index, s):
        out[gi] = x
    return tuple(out), CanonicalInfo(res, it, st_s[0])


def sort_permutation(sym: Symmetry, params: PyTree) -> Element:
    """The permutation that sorts each group's units by a deterministic key.

    Windows are sorted by their incoming energy (sum of squares of the
    parameters producing them, weights and bias, over their pieces), pieces
    inside a window by their own incoming energy. Both keys are unchanged by
    permutations of the other groups, so each group is sorted independently.
    Apply it after rescaling canonicalization so that the key is scale-free.
    Ties (e.g. several dead units) are broken by index, so only the tied
    units' order is arbitrary.

    Args:
      sym: the symmetry.
      params: parameters (canonicalized first, for a scale-free key).

    Returns:
      The sorting element (zero log-scales).
    """
    dt = solve_dtype(params)
    q = _squares(sym, params, dt)
    out = []
    for grp in sym.groups:
        unit_refs = [r for r in grp.refs if r.level == "unit" and r.power > 0] or [
            r for r in grp.refs if r.level == "unit"]
        per_unit = jnp.zeros((grp.units,), dt)
        for r in unit_refs:
            per_unit = per_unit + views.sums(q[r.path], r, grp.units)
        if not unit_refs:  # window-level refs only: sort windows by their entries
            for r in grp.refs:
                per_unit = per_unit + jnp.repeat(views.sums(q[r.path], r, grp.windows),
                                                 grp.pieces)
        per_unit = per_unit.reshape(grp.windows, grp.pieces)
        pp = jnp.arange(grp.pieces, dtype=jnp.int32)[None, :].repeat(grp.windows, 0)
        if grp.pieces > 1 and grp.pieces_permutable:
            pp = jnp.argsort(per_unit, axis=1, stable=True).astype(jnp.int32)
        wp = jnp.arange(grp.windows, dtype=jnp.int32)
        if grp.permutable:
            wp = jnp.argsort(per_unit.sum(axis=1), stable=True).astype(jnp.int32)
        out.append(GroupElement(wp, pp[wp], jnp.zeros((grp.windows,), dt)))
    return tuple(out)

def canonical_elements(
    sym: Symmetry,
    params: PyTree,
    *,
    tol: jax.typing.ArrayLike | None = None,
    max_iter: int = 50,
    rounds: int = 100,
    round_tol: jax.typing.ArrayLike | None = None,
) -> tuple[LogScales, tuple[jax.Array, ...], PyTree]:
    """The joint section of the unit groups' rescalings and the continuous factors.

    Where the factors share no leaf with the unit groups' rescalings this is the
    minimal-energy point of the unit groups (:func:`canonical_log_scales`), then every
    continuous factor's section. Where they do (BatchNorm → ReLU → conv → BatchNorm: a
    group's readers are the next normalization's scale-invariant kernel) the two
    sections fight, and the canonical point is the one that is balanced *and* has
    every scale-invariant block at its radius :math:`r_b`: the minimum of the convex

    .. math::

       \\Phi(s, t) = \\lVert (e^{s}, e^{t})\\cdot\\theta\\rVert^2 - \\sum_b r_b^2\\, 2 t_b

    (its stationarity in :math:`s` is the balance, in :math:`t_b` the block's norm
    :math:`r_b`), reached by exact block coordinate descent: balance, then
    normalize, repeated until a round moves no block by more than ``round_tol``
    (linear convergence; measured on the zoo's BatchNorm and LayerNorm nets: a factor
    about 2 per round, 30–40 rounds from a random point to float64 rounding).

    Args:
      sym: the symmetry.
      params: parameters.
      tol: balance tolerance of each unit solve (:func:`canonical_log_scales`).
      max_iter: iteration cap of each unit solve.
      rounds: cap on the rounds (``1``: balance, then the sections, once).
      round_tol: stop when no block moves by more than this in log-scale (default
        ``10 · eps`` of the solve dtype).

    Returns:
      ``(log_scales, elements, point)``: the unit groups' log-scales and the element of
      every continuous factor (:func:`~quotient_opt.symmetry._kinds.continuous` order),
      relative to ``params``, and the point they reach.
    """
    cont = _kinds.continuous(sym)
    round_tol = default_tol(solve_dtype(params)) if round_tol is None else round_tol

    def one(q):
        s = canonical_log_scales(sym, q, tol=tol, max_iter=max_iter)[0]
        f, q = _kinds.sections(sym, sym.rescale(q, s), factors=cont)
        return s, f, q

    s, f, q = one(params)
    if not cont or rounds <= 1:
        return s, f, q

    def going(c):  # the last round's move is carried beside the totals
        *_, k, last = c
        moved = jnp.max(jnp.stack([jnp.max(jnp.abs(x), initial=0) for x in last]))
        return (k < rounds) & (moved > round_tol)

    def round_(c):
        s, f, q, k, _ = c
        ds, df, q = one(q)
        f = tuple(_kinds.kind_of(r).compose(r, a, b) for r, a, b in zip(cont, f, df))
        return tuple(a + b for a, b in zip(s, ds)), f, q, k + 1, df

    s, f, q, _, _ = jax.lax.while_loop(going, round_, (s, f, q, jnp.ones((), jnp.int32), f))
    return s, f, q


def canonicalize(
    sym: Symmetry,
    params: PyTree,
    *,
    tol: jax.typing.ArrayLike | None = None,
    max_iter: int = 50,
    permutations: bool = False,
    max_log_scale: float | None = None,
    factors: bool = False,
) -> tuple[PyTree, Element | OrbitElement]:
    """The canonical representative of ``params``' orbit and the element reaching it.

    Rescaling: the minimal-energy (balanced, "equinormalized") point
    :math:`\\theta^\\star = \\exp(s^\\star)\\cdot\\theta`,
    :math:`s^\\star = \\arg\\min_s \\lVert \\exp(s)\\cdot\\theta\\rVert^2`,
    solved to ``tol`` by coordinate sweeps + damped Newton. With
    ``permutations=True`` the units of every group are then sorted by
    incoming energy (:func:`sort_permutation`), so that two points of one
    orbit of the full group canonicalize to the same parameters. With
    ``factors=True`` every factor of :attr:`~quotient_opt.Symmetry.factors` is
    quotiented too (:func:`canonical_elements`): each scale-invariant block of a
    :class:`~quotient_opt.symmetry.NormScale` at its radius, balanced jointly with the
    unit groups, and each odd unit of a :class:`~quotient_opt.symmetry.SignFlip` with
    a non-negative bias (after the sort: the sort keys are sign-invariant).

    Args:
      sym: the symmetry.
      params: parameters.
      tol: balance tolerance (default ``10 · eps`` of the dtype).
      max_iter: iteration cap.
      permutations: also sort units.
      max_log_scale: bound on the log-scales (unit groups only; not with ``factors``).
      factors: also quotient every factor.

    Returns:
      ``(canonical_params, g)`` with ``canonical_params == sym.act(params, g)``
      (up to rounding); the function computed is unchanged (up to the
      normalization's epsilon, with ``factors``). ``g`` is an
      :class:`~quotient_opt.symmetry.OrbitElement` with ``factors=True``.

    References:
      Stock et al. 2019, https://arxiv.org/abs/1902.10416
    """
    if factors:
        s, _, out = canonical_elements(sym, params, tol=tol, max_iter=max_iter)
        g = sym.scales_only(s)
        if permutations:
            g = sym.compose(g, sort_permutation(sym, out))
        # the factors' elements in the permuted units' order: the sections of the point
        # the groups reach (the blocks' radii and the units' signs are what ``out`` has)
        f, out = _kinds.sections(sym, sym.act(params, g))
        return out, OrbitElement(g, f)
    s, _ = canonical_log_scales(
        sym, params, tol=tol, max_iter=max_iter, max_log_scale=max_log_scale
    )
    g = sym.scales_only(s)
    out = rescale(sym, params, s)
    if permutations:
        p = sort_permutation(sym, out)
        out = sym.act(out, p, power=0)
        g = sym.compose(g, p)
    return out, g
