"""Canonical representatives of symmetry orbits: the minimal-energy point.

Under the positive rescalings of :class:`~quotient_opt.Symmetry` (per-window
log-scales :math:`s`), every parameter entry :math:`\\theta_e` is multiplied by
:math:`\\exp(n_e^\\top s)`, where :math:`n_e` has a :math:`+1` at the unit whose
incoming parameter :math:`e` is and a :math:`-1` at the unit whose outgoing
weight it is. The squared norm along the orbit,

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

Solver: each iteration takes one exact red-black coordinate sweep (units of
even-indexed groups are independent given the odd ones; the one-unit minimum
is :math:`s_w \\mathrel{+}= \\tfrac14 \\log(\\mathrm{out}_w/\\mathrm{in}_w)`,
which absorbs large imbalances such as log-scales of ±20 in one step), then a
Newton step (Jacobi-preconditioned conjugate gradients on the sparse Hessian,
matrix-free) with a backtracking line search, inside a ``lax.while_loop``
until the relative balance residual
:math:`\\max_w |\\mathrm{in}_w - \\mathrm{out}_w| / (\\mathrm{in}_w + \\mathrm{out}_w)`
is below ``tol`` or has stalled at the rounding floor (quadratic convergence;
a partially converged balancing is not equivariant). Every step decreases
:math:`E`.

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

from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np

from quotient_opt._symmetry import (
    Element,
    GroupElement,
    LogScales,
    Path,
    Symmetry,
    leaves_by_path,
    map_with_path,
)

PyTree = Any


# --------------------------------------------------------------------------- helpers


def solve_dtype(params: PyTree) -> Any:
    """Dtype used for the log-scale solve: the params' float dtype, at least float32."""
    leaves = jax.tree.leaves(params)
    dt = jnp.result_type(*leaves) if leaves else jnp.float32
    if not jnp.issubdtype(dt, jnp.floating):
        dt = jnp.float32
    return jnp.promote_types(dt, jnp.float32)


def _bcast(v: jax.Array, ndim: int, axis: int) -> jax.Array:
    shape = [1] * ndim
    shape[axis] = v.shape[0]
    return v.reshape(shape)


def _ops(sym: Symmetry) -> dict[Path, list[tuple[int, int, int, int]]]:
    """``{leaf path: [(axis, group index, sign, pieces)]}`` over rescalable groups."""
    ops: dict[Path, list[tuple[int, int, int, int]]] = {}
    for gi, grp in enumerate(sym.groups):
        if not grp.rescalable:
            continue
        for path, axis in grp.incoming:
            ops.setdefault(path, []).append((axis, gi, 1, grp.pieces))
        for path, axis in grp.outgoing:
            ops.setdefault(path, []).append((axis, gi, -1, 1))
    return ops


def rescale(sym: Symmetry, tree: PyTree, log_scales: LogScales, *, power: int = 1) -> PyTree:
    """Pure rescaling ``θ_e · exp(power · n_eᵀ s)`` without the permutation gathers.

    Equal to ``sym.act(tree, sym.scales_only(log_scales), power=power)`` but
    only multiplies (no gathers). ``power`` is ``1`` for parameters, ``-1``
    for gradients and first moments, ``-2`` for second moments.
    """
    ops = _ops(sym)

    def apply(path: Path, x: jax.Array) -> jax.Array:
        if path not in ops or x is None:
            return x
        for axis, gi, sign, pieces in ops[path]:
            s = jnp.asarray(log_scales[gi])
            if pieces > 1:
                s = jnp.repeat(s, pieces)
            m = jnp.exp((power * sign) * s)
            x = x * _bcast(m, x.ndim, axis).astype(x.dtype)
        return x

    return map_with_path(apply, tree)


def _field(sym: Symmetry, shapes: dict[Path, tuple[int, ...]], v: LogScales, dtype: Any):
    """``{path: n_eᵀ v}`` as arrays broadcastable to each leaf."""
    out: dict[Path, jax.Array] = {}
    for path, lst in _ops(sym).items():
        nd = len(shapes[path])
        f = jnp.zeros((1,) * nd, dtype)
        for axis, gi, sign, pieces in lst:
            s = v[gi]
            if pieces > 1:
                s = jnp.repeat(s, pieces)
            f = f + sign * _bcast(s, nd, axis)
        out[path] = f
    return out


def _unit_sums(sym: Symmetry, q: dict[Path, jax.Array]) -> tuple[list, list]:
    """Per-window sums of ``q`` over each unit's incoming and outgoing entries."""
    ins, outs = [], []
    for grp in sym.groups:
        i = None
        for path, axis in grp.incoming:
            x = q[path]
            r = jnp.sum(x, axis=tuple(a for a in range(x.ndim) if a != axis))
            i = r if i is None else i + r
        o = None
        for path, axis in grp.outgoing:
            x = q[path]
            r = jnp.sum(x, axis=tuple(a for a in range(x.ndim) if a != axis))
            o = r if o is None else o + r
        dt = next(iter(q.values())).dtype if q else jnp.float32
        i = jnp.zeros((grp.units,), dt) if i is None else i
        i = i.reshape(grp.windows, grp.pieces).sum(axis=1)
        o = jnp.zeros((grp.windows,), dt) if o is None else o
        ins.append(i)
        outs.append(o)
    return ins, outs


def _squares(sym: Symmetry, params: PyTree, dtype: Any) -> dict[Path, jax.Array]:
    leaves = leaves_by_path(params)
    touched = {p for grp in sym.groups for p, _ in grp.incoming + grp.outgoing}
    return {p: jnp.square(jnp.asarray(leaves[p], dtype)) for p in touched}


def unit_energies(sym: Symmetry, params: PyTree) -> tuple[LogScales, LogScales]:
    """Per-window energies ``(in, out)`` of every unit group.

    ``in_w`` is the sum of squares of unit ``w``'s incoming weights and bias
    (over all pieces of a max-pool window), ``out_w`` of its outgoing weights.
    """
    sym.validate(params)
    dt = solve_dtype(params)
    ins, outs = _unit_sums(sym, _squares(sym, params, dt))
    return tuple(ins), tuple(outs)


def unit_balance(sym: Symmetry, params: PyTree) -> LogScales:
    """Per-window balance :math:`\\lVert w_{in}\\rVert^2 + b^2 - \\lVert w_{out}\\rVert^2`.

    It is :math:`\\tfrac12 \\nabla_s E`, zero at the canonical point, and
    conserved by gradient flow on a rescaling-invariant loss (the gradient is
    horizontal: :math:`J^\\top \\nabla L = 0`).
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


def canonical_log_scales(
    sym: Symmetry,
    params: PyTree,
    *,
    tol: jax.typing.ArrayLike | None = None,
    max_iter: int = 50,
    max_log_scale: float | None = None,
    cg_iter: int = 50,
) -> tuple[LogScales, CanonicalInfo]:
    """Log-scales :math:`s^\\star = \\arg\\min_s \\lVert \\exp(s)\\cdot\\theta \\rVert^2`.

    See the module docstring for the method. jit-, vmap- and scan-safe.

    Args:
      sym: the symmetry.
      params: parameters.
      tol: stop when the relative balance residual is below this, or stalls
        below ``1000 · tol`` (default :func:`default_tol` of the solve dtype).
      max_iter: iteration cap (sweep + Newton step per iteration).
      max_log_scale: bound on ``|s|`` (default ``0.4 · log(finfo.max)``).
      cg_iter: conjugate-gradient iterations cap per Newton step.

    Returns:
      ``(log_scales, info)``: one ``(windows,)`` array per group (zeros on
      groups without a rescaling symmetry) and :class:`CanonicalInfo`.
    """
    sym.validate(params)
    dt = solve_dtype(params)
    tol = default_tol(dt) if tol is None else tol
    bound = 0.4 * float(np.log(jnp.finfo(dt).max)) if max_log_scale is None else max_log_scale
    q0 = _squares(sym, params, dt)
    shapes = {p: x.shape for p, x in q0.items()}
    resc = [grp.rescalable for grp in sym.groups]
    tiny = jnp.finfo(dt).tiny
    zero = tuple(jnp.zeros((grp.windows,), dt) for grp in sym.groups)
    if not any(resc):
        info = CanonicalInfo(jnp.zeros((), dt), jnp.zeros((), jnp.int32), jnp.zeros((), dt))
        return zero, info

    ins0, outs0 = _unit_sums(sym, q0)
    # live units: non-zero energy on both sides (dead units stay at scale 0)
    live = tuple(
        (i > tiny) & (o > tiny) & r for i, o, r in zip(ins0, outs0, resc)
    )

    def fld(v):
        return _field(sym, shapes, v, dt)

    def scaled_q(s):
        f = fld(s)
        return {p: jnp.where(x > 0, x * jnp.exp(2 * f[p]) if p in f else x, 0) for p, x in q0.items()}

    def energy(q):
        return sum(jnp.sum(x) for x in q.values())

    def residual(ins, outs):
        r = jnp.zeros((), dt)
        for i, o, lv in zip(ins, outs, live):
            rr = jnp.where(lv, jnp.abs(i - o) / jnp.where(lv, i + o, 1), 0)
            r = jnp.maximum(r, jnp.max(rr, initial=0))
        return r

    def clip(s):
        return tuple(jnp.clip(x, -bound, bound) for x in s)

    def sweep(s, parity):
        q = scaled_q(s)
        ins, outs = _unit_sums(sym, q)
        new = []
        for k, (x, i, o, lv) in enumerate(zip(s, ins, outs, live)):
            if k % 2 == parity:
                step = 0.25 * (jnp.log(jnp.where(lv, o, 1)) - jnp.log(jnp.where(lv, i, 1)))
                x = x + jnp.where(lv, step, 0)
            new.append(x)
        return clip(tuple(new))

    def newton(s):
        q = scaled_q(s)
        ins, outs = _unit_sums(sym, q)
        e0 = energy(q)
        g = tuple(jnp.where(lv, 2 * (i - o), 0) for i, o, lv in zip(ins, outs, live))
        diag = tuple(jnp.where(lv, 4 * (i + o), 1) for i, o, lv in zip(ins, outs, live))

        def hvp(v):
            v = tuple(jnp.where(lv, x, 0) for x, lv in zip(v, live))
            f = fld(v)
            hi, ho = _unit_sums(sym, {p: x * f[p] if p in f else 0 * x for p, x in q.items()})
            return tuple(jnp.where(lv, 4 * (a - b), 0) for a, b, lv in zip(hi, ho, live))

        def dot(a, b):
            return sum(jnp.vdot(x, y) for x, y in zip(a, b))

        b = tuple(-x for x in g)
        bnorm = jnp.sqrt(dot(b, b))
        cg_tol = jnp.minimum(0.1, jnp.sqrt(residual(ins, outs))) * bnorm
        x0 = zero
        r0 = b
        z0 = tuple(r / d for r, d in zip(r0, diag))
        p0 = z0
        rz0 = dot(r0, z0)

        def cg_cond(c):
            x, r, p, rz, k = c
            return (k < cg_iter) & (jnp.sqrt(dot(r, r)) > cg_tol)

        def cg_body(c):
            x, r, p, rz, k = c
            hp = hvp(p)
            php = dot(p, hp)
            alpha = jnp.where(php > 0, rz / jnp.where(php > 0, php, 1), 0)
            x = tuple(a + alpha * b_ for a, b_ in zip(x, p))
            r = tuple(a - alpha * b_ for a, b_ in zip(r, hp))
            z = tuple(a / d for a, d in zip(r, diag))
            rz_new = dot(r, z)
            beta = jnp.where(rz > 0, rz_new / jnp.where(rz > 0, rz, 1), 0)
            p = tuple(a + beta * b_ for a, b_ in zip(z, p))
            return x, r, p, rz_new, k + 1

        d, *_ = jax.lax.while_loop(cg_cond, cg_body, (x0, r0, p0, rz0, 0))
        # a safe step: at most 4 in any log-scale, then backtracking (Armijo)
        dmax = jnp.max(jnp.stack([jnp.max(jnp.abs(x), initial=0) for x in d]))
        d = tuple(x * jnp.minimum(1, 4 / jnp.maximum(dmax, tiny)) for x in d)
        slope = dot(g, d)
        ok_dir = (slope < 0) & jnp.isfinite(slope)
        d = tuple(jnp.where(ok_dir, x, 0) for x in d)

        def ls_cond(c):
            t, k = c
            trial = clip(tuple(a + t * b_ for a, b_ in zip(s, d)))
            e = energy(scaled_q(trial))
            return (k < 30) & ~(e <= e0 + 1e-4 * t * slope)

        t, k = jax.lax.while_loop(ls_cond, lambda c: (c[0] * 0.5, c[1] + 1), (jnp.ones((), dt), 0))
        t = jnp.where(k < 30, t, 0)
        return clip(tuple(a + t * b_ for a, b_ in zip(s, d)))

    def measure(s):
        ins, outs = _unit_sums(sym, scaled_q(s))
        return residual(ins, outs)

    def cond(c):
        s, res, prev, it = c
        stalled = (res <= 1e3 * tol) & (res > 0.5 * prev)
        return (it < max_iter) & (res > tol) & ~stalled

    def body(c):
        s, res, _, it = c
        s = sweep(s, 0)
        s = sweep(s, 1)
        s = newton(s)
        return s, measure(s), res, it + 1

    res0 = measure(zero)
    inf = jnp.asarray(jnp.inf, dt)
    s, res, _, it = jax.lax.while_loop(cond, body, (zero, res0, inf, jnp.zeros((), jnp.int32)))
    s = tuple(jnp.where(jnp.isfinite(x) & lv, x, 0) for x, lv in zip(s, live))
    return s, CanonicalInfo(res, it, energy(scaled_q(s)))


def sort_permutation(sym: Symmetry, params: PyTree) -> Element:
    """The permutation that sorts each group's units by a deterministic key.

    Windows are sorted by their incoming energy (sum of squares of incoming
    weights and bias over their pieces), pieces inside a window by their own
    incoming energy. Both keys are unchanged by permutations of the other
    groups, so each group is sorted independently. Apply it after rescaling
    canonicalization so that the key is scale-free. Ties (e.g. several dead
    units) are broken by index, so only the tied units' order is arbitrary.
    """
    dt = solve_dtype(params)
    q = _squares(sym, params, dt)
    out = []
    for grp in sym.groups:
        per_unit = None
        for path, axis in grp.incoming:
            x = q[path]
            r = jnp.sum(x, axis=tuple(a for a in range(x.ndim) if a != axis))
            per_unit = r if per_unit is None else per_unit + r
        per_unit = per_unit.reshape(grp.windows, grp.pieces)
        pp = jnp.argsort(per_unit, axis=1, stable=True).astype(jnp.int32)
        wp = jnp.arange(grp.windows, dtype=jnp.int32)
        if grp.windows_permutable:
            wp = jnp.argsort(per_unit.sum(axis=1), stable=True).astype(jnp.int32)
        out.append(GroupElement(wp, pp[wp], jnp.zeros((grp.windows,), dt)))
    return tuple(out)


def canonicalize(
    sym: Symmetry,
    params: PyTree,
    *,
    tol: jax.typing.ArrayLike | None = None,
    max_iter: int = 50,
    permutations: bool = False,
    max_log_scale: float | None = None,
) -> tuple[PyTree, Element]:
    """The canonical representative of ``params``' orbit and the element reaching it.

    Rescaling: the minimal-energy (balanced, "equinormalized") point
    :math:`\\theta^\\star = \\exp(s^\\star)\\cdot\\theta`,
    :math:`s^\\star = \\arg\\min_s \\lVert \\exp(s)\\cdot\\theta\\rVert^2`,
    solved to ``tol`` by sweeps + damped Newton (module docstring). With
    ``permutations=True`` the units of every group are then sorted by
    incoming energy (:func:`sort_permutation`), so that two points of one
    orbit of the full group canonicalize to the same parameters.

    Args:
      sym: the symmetry.
      params: parameters.
      tol: balance tolerance (default ``10 · eps`` of the dtype).
      max_iter: iteration cap.
      permutations: also sort units.
      max_log_scale: bound on the log-scales.

    Returns:
      ``(canonical_params, g)`` with ``canonical_params == sym.act(params, g)``
      (up to rounding); the function computed is unchanged.

    References:
      Stock et al. 2019, https://arxiv.org/abs/1902.10416
    """
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
