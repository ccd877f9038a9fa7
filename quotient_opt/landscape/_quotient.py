"""Weight space modulo symmetry: symmetrization, orbit distances, quotient hooks.

* :func:`symmetrize`: the sawtooth paper's symmetrization (minimal-energy
  rescaling, then units sorted).
* :func:`quotient_distance`: the distance from one parameter vector to the
  orbit of another, minimized over permutations (weight matching) and
  rescalings (Gauss-Newton on the log-scales).
* hooks for the landscape tools: :func:`quotient_align` (``neb(align=)``),
  :func:`canonical_section` (``neb(project=)``) and :func:`orbit_directions`
  (``hessian_spectrum(project_out=)``).
"""

from __future__ import annotations

import functools
import itertools
from collections.abc import Callable
from typing import Any, Literal, NamedTuple

import jax
import jax.numpy as jnp

from quotient_opt.landscape._assignment import auction_assignment, exact_assignment
from quotient_opt.landscape._common import PyTree, check_floating, check_same_tree, flatten
from quotient_opt.symmetry import _kinds
from quotient_opt.symmetry import _views as views
from quotient_opt.symmetry._canonical import (
    canonical_log_scales,
    canonicalize,
    sort_permutation,
)
from quotient_opt.symmetry._gram import structure
from quotient_opt.symmetry._paths import leaves_by_path, map_with_path
from quotient_opt.symmetry._spec import (
    Element,
    GroupElement,
    OrbitElement,
    Symmetry,
    UnitGroup,
    solve_dtype,
)
from quotient_opt.transforms._projection import _vertical_coefficients

Method = Literal["exact", "auction"]
_METHODS = ("exact", "auction")


# --------------------------------------------------------------------------- symmetrize


def symmetrize(sym: Symmetry, params: PyTree, **canonicalize_kwargs: Any) -> PyTree:
    """The sawtooth paper's symmetrization: minimal-energy rescaling, then units sorted.

    First the rescaling of minimal energy,

    .. math::

       \\theta^\\star = \\exp(s^\\star) \\cdot \\theta, \\qquad
       s^\\star = \\arg\\min_s \\lVert \\exp(s) \\cdot \\theta \\rVert^2,

    (the balanced point, where every unit's incoming and outgoing energies are
    equal; unique, :func:`~quotient_opt.canonicalize`), then in every group
    the units are put in increasing order of their **incoming energy** at
    :math:`\\theta^\\star`, the sum of squares of the parameters producing the
    unit, weights and bias (:func:`~quotient_opt.sort_permutation`; pieces of
    a max-pool window are sorted inside it, windows by their total). The
    paper sorts the columns of the weight matrices by norm, the same key
    without the bias. The key of a group does not depend on the order of
    the other groups' units, so one pass sorts everything.

    The result depends only on the orbit: ``symmetrize(sym, sym.act(θ, g))``
    equals ``symmetrize(sym, θ)`` to rounding for every group element ``g``,
    and ``symmetrize`` is idempotent. Exceptions: units with equal keys
    (ties keep their index order, so their relative order follows ``θ``'s),
    which for a trained network means dead units whose incoming parameters
    are all exactly zero (their key is 0, and their scale is left at 1, so
    their outgoing weights are not canonical either), and keys closer than
    rounding. Sign flips of odd units (:class:`~quotient_opt.symmetry.SignFlip`
    factors) are quotiented out last, by their section (each unit's bias, or
    its summed incoming weights, made non-negative; sorting keys are
    sign-invariant). jit- and vmap-safe.

    Args:
      sym: the symmetry.
      params: parameters.
      **canonicalize_kwargs: ``tol``, ``max_iter``, ``max_log_scale`` (and
        ``cg_iter``) of :func:`~quotient_opt.canonicalize`.

    Returns:
      The symmetrized parameters (same function). The group element reaching
      them is ``qo.canonicalize(sym, params, permutations=True)[1]``.

    References:
      *The energy landscape of a simple neural network*, §3 (symmetrization),
      see ``shared/references/energy-landscape-sawtooth-paper.txt``.
    """
    s, _ = canonical_log_scales(sym, params, **canonicalize_kwargs)
    return _rescale_and_sort(sym, params, s)


@functools.partial(jax.jit, static_argnames=("sym",))
def _rescale_and_sort(sym: Symmetry, params: PyTree, s: tuple[jax.Array, ...]) -> PyTree:
    """``canonicalize(permutations=True)`` after its solve, compiled once (eager calls),
    then the section of every discrete factor (sign flips: each unit's bias made
    non-negative)."""
    out = sym.rescale(params, s)
    out = sym.act(out, sort_permutation(sym, out), power=0)
    return _kinds.canonical(sym, out, factors=_kinds.discrete(sym))


# --------------------------------------------------------------------------- distance


class QuotientDistance(NamedTuple):
    """Result of :func:`quotient_distance`.

    Attributes:
      distance: :math:`\\lVert r - g \\cdot b \\rVert`, the Euclidean distance
        from ``reference`` to ``aligned``.
      aligned: :math:`g \\cdot b`, the point of ``b``'s orbit found closest to
        ``reference`` (same function as ``b``).
      element: the group element :math:`g`, with
        ``sym.act(b, element) ≈ aligned``.
      iterations: weight-matching sweeps taken, both searches together (int32).
      reference: the point of ``a``'s orbit the distance is measured from:
        the balanced representative of ``a`` (``a`` itself with
        ``balance=False``) when the search from ``a``'s side was the closer,
        else the point of ``a``'s orbit found closest to ``b``'s
        representative (which is then ``aligned``).
      reference_element: the element :math:`h` with
        ``sym.act(a, h) ≈ reference`` (a pure rescaling in the first case).
    """

    distance: jax.Array
    aligned: PyTree
    element: Element
    iterations: jax.Array
    reference: PyTree
    reference_element: Element


def quotient_distance(
    sym: Symmetry,
    a: PyTree,
    b: PyTree,
    *,
    rescale: bool = True,
    balance: bool = True,
    method: Method = "exact",
    max_iter: int = 100,
    newton_steps: int = 5,
    tol: jax.typing.ArrayLike | None = None,
) -> QuotientDistance:
    """Distance between the orbits of ``a`` and ``b`` under permutations and rescalings.

    With :math:`a^\\star, b^\\star` the balanced (minimal-energy)
    representatives of ``a`` and ``b``,

    .. math::

       d(a, b) = \\min\\bigl(\\delta(a^\\star, b^\\star),\\ \\delta(b^\\star, a^\\star)\\bigr),
       \\qquad
       \\delta(r, b^\\star) = \\min_{\\pi,\\, s} \\lVert r - e^{s} \\cdot \\pi \\cdot b^\\star \\rVert,

    over unit permutations :math:`\\pi` and per-unit log-scales :math:`s`:
    the search is run from both sides and the closer result kept, so
    ``d(a, b) == d(b, a)`` exactly (rescalings are not isometries, so the
    one-sided :math:`\\delta` is not symmetric: measured up to 2% apart on a
    3-7-4-6-1 MLP). Each one-sided minimization is local, alternated to
    convergence (written for :math:`r = a^\\star`):

    1. **Start** at the better of :math:`b^\\star` and :math:`b^\\star` with
       its units sorted into ``a``'s order (both symmetrized as in
       :func:`symmetrize`, then ``a``'s sort undone): so
       :math:`d \\le \\min(\\lVert r - b^\\star \\rVert,
       \\lVert \\mathrm{sym}(a) - \\mathrm{sym}(b) \\rVert)`.
    2. **Weight matching** (Git Re-Basin), coordinate descent over the
       groups: for group :math:`G`, with every other group held in its current
       arrangement, the similarity of unit :math:`u` of :math:`r` and unit
       :math:`w` of the current :math:`b'` sums the inner products of their
       rows over **all** the group's refs (incoming weights, bias, outgoing
       weights, conv kernels, flattened features; see
       :func:`~quotient_opt.symmetry._views.rows`),

       .. math::

          S_{uw} = \\sum_{\\text{refs } \\rho \\text{ of } G}
                   \\langle \\mathrm{rows}_\\rho(r)_u,\\, \\mathrm{rows}_\\rho(b')_w \\rangle,

       and since permutations preserve norms, the assignment
       :math:`\\max_\\pi \\sum_u S_{u\\pi(u)}` minimizes the distance over
       :math:`G`'s permutations. In a max-pool group two windows are
       compared through the best matching of their pieces (a small
       assignment per pair of windows), so the window assignment and the
       piece assignments inside the chosen pairs solve the group's
       subproblem exactly. A group's permutation is kept only if it
       decreases the distance. Sweeps repeat until no group changes.
    3. **Rescaling** (``rescale=True``): Gauss-Newton steps on the log-scales
       from the current point: with :math:`J` the infinitesimal rescaling at
       :math:`b'` (:meth:`~quotient_opt.Symmetry.tangent`), the step solves
       :math:`J^\\top J\\, \\delta = J^\\top (r - b')` (the Gram system of the
       horizontal projection) and is backtracked until the distance
       decreases. The objective is not convex in :math:`s`; started at the
       balanced point it needs a few steps. Then weight matching again, and
       so on until an iteration improves the squared distance by less than
       ``tol`` (relative).

    4. **Sign flips** (models with odd activations,
       :class:`~quotient_opt.symmetry.SignFlip`): both points start at the flips'
       section (each odd unit's bias non-negative, so units of one orbit meet with
       equal signs), and after the alignment each factor's signs are chosen in closed
       form (a unit flips where its entries correlate negatively with the
       reference's), kept where the distance decreases. The elements are then
       :class:`~quotient_opt.symmetry.OrbitElement` (the unit groups' element, then
       the signs). Normalization scale invariance is not searched: pass points
       quotiented by it (``qo.canonicalize(sym, p, factors=True)[0]``).

    Every step decreases the distance, so the result with ``rescale=True`` is
    never above the permutation-only one (``rescale=False``, which stops
    after step 2), and for ``b`` in the orbit of ``a`` it is zero to
    rounding (units with distinct energies). It is a local minimum: exact
    weight matching is itself a heuristic for the quadratic assignment
    across layers.

    A symmetric formulation without the second search: moving both points,
    :math:`\\lVert e^{-s/2} \\cdot a^\\star - e^{s/2} \\cdot \\pi b^\\star \\rVert^2
    = E_{a^\\star}(-s/2) + E_{\\pi b^\\star}(s/2) - 2 \\langle a^\\star, \\pi b^\\star \\rangle`
    (the cross term is invariant), and both energies :math:`E` are convex
    with their minimum at :math:`s = 0` for balanced points: the symmetric
    version of this distance is exactly the permutation-only distance
    between the balanced representatives, ``rescale=False``. Taking the
    better of the two one-sided searches keeps the rescaling's gain instead.

    Works under ``jit`` and ``vmap``. Called eagerly, the balancing reuses
    the compiled canonicalizer and the alignment is compiled once per
    symmetry, ``method`` and shapes (``rescale``, ``max_iter``,
    ``newton_steps`` and ``tol`` are traced). ``method='exact'`` solves each assignment with
    ``scipy.optimize.linear_sum_assignment`` on the host (through
    ``jax.pure_callback``: it works under ``jit`` and ``vmap``, but each
    call syncs with the host); ``method='auction'`` uses a pure-JAX auction
    (:func:`auction_assignment`, ε-optimal to about :math:`\\sqrt{\\epsilon}`
    of the similarity range), which stays on the device and batches under
    ``vmap``. Sinkhorn's entropic transport (Cuturi 2013) was the other
    candidate; it returns a doubly stochastic matrix that has to be annealed
    and rounded to a permutation, where the auction returns one directly.

    Args:
      sym: the symmetry (from :func:`~quotient_opt.infer_symmetry`).
      a: the reference parameters.
      b: the parameters whose orbit is searched.
      rescale: also optimize the rescaling (step 3); may be a traced boolean.
      balance: replace ``a`` and ``b`` by their balanced representatives
        first (``False``: weight matching on the raw parameters, as Git
        Re-Basin; the sorted start then uses raw energies).
      method: assignment solver, ``'exact'`` (scipy, host) or ``'auction'``
        (pure JAX).
      max_iter: cap on weight-matching sweeps (over both phases).
      newton_steps: Gauss-Newton steps per iteration of step 3.
      tol: relative decrease of the squared distance below which the
        iteration stops (default ``sqrt(eps)`` of the dtype).

    Returns:
      :class:`QuotientDistance` ``(distance, aligned, element, iterations,
      reference, reference_element)``.

    Raises:
      ValueError: if ``a`` or ``b`` is not the pytree ``sym`` describes, or
        ``a`` and ``b`` differ in a leaf (naming the path), for a non-float
        leaf or an unknown ``method``.

    References:
      Ainsworth, Hayase, Srinivasa. *Git Re-Basin: Merging Models modulo
      Permutation Symmetries*, 2022. https://arxiv.org/abs/2209.04836

      Entezari, Sedghi, Saukh, Neyshabur. *The Role of Permutation Invariance
      in Linear Mode Connectivity of Neural Networks*, 2021.
      https://arxiv.org/abs/2110.06296

      Cuturi. *Sinkhorn Distances: Lightspeed Computation of Optimal
      Transport*, 2013. https://arxiv.org/abs/1306.0895
    """
    if method not in _METHODS:
        raise ValueError(f"method must be one of {_METHODS}, got {method!r}")
    if int(max_iter) != max_iter or max_iter < 1:
        raise ValueError(f"max_iter must be an integer >= 1, got {max_iter}")
    if int(newton_steps) != newton_steps or newton_steps < 1:
        raise ValueError(f"newton_steps must be an integer >= 1, got {newton_steps}")
    check_same_tree(a, b)
    check_floating(a, "a")
    check_floating(b, "b")
    sym.validate(a, what="a")
    sym.validate(b, what="b")
    a0, ga, b0, gb = _balanced(sym, a, b, bool(balance))
    dt = solve_dtype(a0)
    tol = jnp.sqrt(jnp.finfo(dt).eps) if tol is None else tol
    opts = (jnp.asarray(tol, dt), jnp.asarray(rescale, bool), jnp.asarray(max_iter, jnp.int32),
            jnp.asarray(newton_steps, jnp.int32))
    if not _kinds.discrete(sym):
        fwd = _align(sym, a0, ga, b0, gb, *opts, method=method)
        bwd = _align(sym, b0, gb, a0, ga, *opts, method=method)
        return _better_side(fwd, bwd)
    (a1, sa), (b1, sb) = _flipped(sym, a0), _flipped(sym, b0)
    fwd = _unflip(sym, _sign_sweep(sym, _align(sym, a1, ga, b1, gb, *opts, method=method)), sa)
    bwd = _unflip(sym, _sign_sweep(sym, _align(sym, b1, gb, a1, ga, *opts, method=method)), sb)
    fwd = fwd._replace(element=_with_signs(sym, b, fwd.element, fwd.aligned),
                       reference_element=_with_signs(sym, a, fwd.reference_element,
                                                     fwd.reference))
    bwd = bwd._replace(element=_with_signs(sym, a, bwd.element, bwd.aligned),
                       reference_element=_with_signs(sym, b, bwd.reference_element,
                                                     bwd.reference))
    return _better_side(fwd, bwd)


def _better_side(fwd: QuotientDistance, bwd: QuotientDistance) -> QuotientDistance:
    """The closer of the two one-sided searches, in ``(a, b)`` terms.

    ``bwd`` searched ``a``'s orbit from ``b``'s representative: its
    ``aligned`` point lies on ``a``'s orbit and its ``reference`` on ``b``'s,
    so the two roles swap. Ties keep ``fwd``; the distance is the minimum of
    the two, whichever argument comes first.
    """
    back = bwd.distance < fwd.distance
    swapped = QuotientDistance(bwd.distance, bwd.reference, bwd.reference_element,
                               bwd.iterations, bwd.aligned, bwd.element)
    out = _where_tree(back, swapped, fwd)
    return out._replace(iterations=fwd.iterations + bwd.iterations)


def _sq_dist(x: PyTree, y: PyTree, dt: Any) -> jax.Array:
    return sum(
        jnp.sum(jnp.square(u.astype(dt) - v.astype(dt)))
        for u, v in zip(jax.tree.leaves(x), jax.tree.leaves(y))
    )


def _where_tree(c: jax.Array, x: PyTree, y: PyTree) -> PyTree:
    return jax.tree.map(lambda u, v: jnp.where(c, u, v), x, y)


def _similarity(grp: UnitGroup, ref: PyTree, cur: PyTree, dt: Any):
    """``(S_unit (U, U), S_window (W, W))``: row inner products over the group's refs."""
    la, lb = leaves_by_path(ref), leaves_by_path(cur)
    su = jnp.zeros((grp.units, grp.units), dt)
    sw = jnp.zeros((grp.windows, grp.windows), dt)
    for r in grp.refs:
        n = grp.count(r)
        ra = views.rows(la[r.path].astype(dt), r, n)
        rb = views.rows(lb[r.path].astype(dt), r, n)
        if r.level == "unit":
            su = su + ra @ rb.T
        else:
            sw = sw + ra @ rb.T
    return su, sw


def _match_group(
    grp: UnitGroup, ref: PyTree, cur: PyTree, assign: Callable, dt: Any
) -> tuple[jax.Array, jax.Array]:
    """One group's best permutation of ``cur`` towards ``ref``, others held: ``(wp, pp)``.

    With pieces, the similarity of two windows is that of their best piece
    matching (a small assignment per pair of windows), so the window
    assignment and the piece assignments inside the chosen pairs together
    solve the group's subproblem exactly, whatever the pieces' order.
    """
    w, k = grp.windows, grp.pieces
    wp = jnp.arange(w, dtype=jnp.int32)
    su, sw = _similarity(grp, ref, cur, dt)
    blocks = su.reshape(w, k, w, k).transpose(0, 2, 1, 3)  # (W, W, k, k)
    if k > 1 and grp.pieces_permutable:
        inner = assign(blocks).astype(jnp.int32)  # (W, W, k)
        value = jnp.take_along_axis(blocks, inner[..., None], axis=-1)[..., 0].sum(-1)
    else:
        inner = jnp.broadcast_to(jnp.arange(k, dtype=jnp.int32), (w, w, k))
        value = jnp.einsum("uwjj->uw", blocks)
    if grp.permutable and w > 1:
        wp = assign(sw + value).astype(jnp.int32)
    return wp, inner[jnp.arange(w), wp]


def _balanced(sym: Symmetry, a: PyTree, b: PyTree, balance: bool):
    """``(a0, g_a0, b0, g_b0)``: the minimal-energy points (``balance``) or the inputs."""
    if not balance:
        return a, sym.identity(solve_dtype(a)), b, sym.identity(solve_dtype(b))
    a0, ga = canonicalize(sym, a)
    b0, gb = canonicalize(sym, b)
    return a0, ga, b0, gb


def _flipped(sym: Symmetry, x: PyTree) -> tuple[PyTree, tuple[jax.Array, ...]]:
    """``x`` with every sign flip at its section (so that the units of one orbit meet
    with equal signs), and the signs used."""
    return _kinds.sections(sym, x, factors=_kinds.discrete(sym))[::-1]


def _unflip(sym: Symmetry, res: QuotientDistance, signs: tuple[jax.Array, ...]
            ) -> QuotientDistance:
    """Undoes the reference's section flips on both points (an isometry: the distance
    stays), so that ``reference`` is the balanced point again (``a`` itself unbalanced)."""
    flips = _kinds.discrete(sym)
    back = lambda x: _kinds.act(sym, x, signs, factors=flips)  # noqa: E731 - signs: own inverse
    return res._replace(reference=back(res.reference), aligned=back(res.aligned))


def _signs_towards(sym: Symmetry, rec: Any, ref: PyTree, cur: PyTree, dt: Any) -> jax.Array:
    """The signs of ``rec``'s units that bring ``cur`` closest to ``ref`` (every other
    factor held): a unit flips where its entries correlate negatively."""
    la, lb = leaves_by_path(ref), leaves_by_path(cur)
    corr = sum(views.sums(la[r.path].astype(dt) * lb[r.path].astype(dt), r, rec.units)
               for r in rec.refs)
    return jnp.where(corr < 0, -1.0, 1.0).astype(dt)


def _sign_sweep(sym: Symmetry, res: QuotientDistance) -> QuotientDistance:
    """Coordinate descent over the sign-flip factors after the alignment: each factor's
    best signs in closed form, kept where the distance decreases (two passes)."""
    dt = solve_dtype(res.reference)
    cur, f = res.aligned, jnp.square(res.distance)
    for _ in range(2):
        for rec in _kinds.discrete(sym):
            h = _signs_towards(sym, rec, res.reference, cur, dt)
            cand = _kinds.act(sym, cur, (h,), factors=(rec,))
            fc = _sq_dist(res.reference, cand, dt)
            ok = fc < f
            cur, f = _where_tree(ok, cand, cur), jnp.where(ok, fc, f)
    return res._replace(distance=jnp.sqrt(jnp.maximum(f, 0)), aligned=cur)


def _with_signs(sym: Symmetry, src: PyTree, g: Element, point: PyTree) -> OrbitElement:
    """The element taking ``src`` to ``point``, which is ``g`` then a sign per odd unit:
    the signs are read off ``point`` against ``sym.act(src, g)`` (``+1`` where a unit's
    entries are all zero)."""
    dt = solve_dtype(point)
    y = sym.act(src, g)
    flips = _kinds.discrete(sym)
    signs = [_signs_towards(sym, rec, point, y, dt) for rec in flips]
    return OrbitElement(g, _kinds.by_factor(sym, point, (flips, signs)))


@functools.partial(jax.jit, static_argnames=("sym", "method"))
def _align(sym, a0, ga, b0, gb, tol, rescale, max_iter, newton_steps, *, method):
    """Weight matching alternated with Gauss-Newton rescaling, ``b0`` towards ``a0``.

    ``rescale``, ``max_iter`` and ``newton_steps`` are traced, so one compiled
    function serves every setting of them.
    """
    dt = solve_dtype(a0)
    fin = jnp.finfo(dt)
    assign = exact_assignment if method == "exact" else auction_assignment
    st = structure(sym)
    rescale = jnp.asarray(rescale, bool) & bool(st.index)
    it0 = jnp.zeros((), jnp.int32)

    # start: b0 as is, or sorted into a0's order; keep the closer
    pa, pb = sort_permutation(sym, a0), sort_permutation(sym, b0)
    to_a = sym.compose(pb, sym.inverse(pa))
    b_sorted = sym.act(b0, to_a, power=0)
    d0, d1 = _sq_dist(a0, b0, dt), _sq_dist(a0, b_sorted, dt)
    use_sorted = d1 < d0
    cur = _where_tree(use_sorted, b_sorted, b0)
    g = _where_tree(use_sorted, sym.compose(gb, to_a), gb)
    f = jnp.minimum(d0, d1)
    margin = 8 * fin.eps

    def sweep(cur, g, f):
        """One weight-matching pass over the groups; returns (cur, g, f, changed)."""
        changed = jnp.zeros((), bool)
        rel = list(sym.identity(dt))
        for gi, grp in enumerate(sym.groups):
            if not (grp.permutable or (grp.pieces > 1 and grp.pieces_permutable)):
                continue
            wp, pp = _match_group(grp, a0, cur, assign, dt)
            cand = sym.act_group(cur, gi, GroupElement(wp, pp, jnp.zeros((grp.windows,), dt)),
                                 power=0)
            fc = _sq_dist(a0, cand, dt)
            ok = fc < f * (1 - margin)
            cur = _where_tree(ok, cand, cur)
            f = jnp.where(ok, fc, f)
            e = rel[gi]
            rel[gi] = GroupElement(
                jnp.where(ok, wp, e.window_perm), jnp.where(ok, pp, e.piece_perm), e.log_scale
            )
            changed = changed | ok
        return cur, sym.compose(g, tuple(rel)), f, changed

    def newton(cur, g, f):
        """Up to ``newton_steps`` Gauss-Newton steps on the log-scales, backtracked."""

        def body(c):
            cur, g, f, _, k = c
            resid = jax.tree.map(lambda x, y: x.astype(dt) - y.astype(dt), a0, cur)
            coef, _ = _vertical_coefficients(st, cur, resid, None, None, 64)
            step = list(sym.zero_log_scales(dt))
            for gi, x in zip(st.index, coef):
                step[gi] = x
            dmax = jnp.max(jnp.stack([jnp.max(jnp.abs(x), initial=0) for x in step]))
            step = [x * jnp.minimum(1, 2 / jnp.maximum(dmax, fin.tiny)) for x in step]

            def trial(t):
                cand = sym.rescale(cur, tuple(t * x for x in step))
                return cand, _sq_dist(a0, cand, dt)

            def ls_body(lc):
                t, _, _, j = lc
                return (0.5 * t, *trial(0.5 * t), j + 1)

            one = jnp.ones((), dt)
            t, cand, fc, _ = jax.lax.while_loop(
                lambda lc: (lc[3] < 30) & ~(lc[2] < f), ls_body, (one, *trial(one), it0)
            )
            ok = fc < f
            g = sym.compose(g, sym.scales_only(tuple(jnp.where(ok, t, 0) * x for x in step)))
            go = ok & (f - fc > tol * f)
            return _where_tree(ok, cand, cur), g, jnp.where(ok, fc, f), go, k + 1

        cur, g, f, _, _ = jax.lax.while_loop(
            lambda c: c[3] & (c[4] < newton_steps), body, (cur, g, f, jnp.ones((), bool), it0)
        )
        return cur, g, f

    # phase 0: weight matching until no group changes; phase 1 (rescale):
    # Gauss-Newton then a sweep, until the squared distance stalls; 2: done.
    def body(c):
        cur, g, f, phase, it = c
        f_start = f
        if st.index:
            cur, g, f = jax.lax.cond(phase == 1, newton, lambda *x: x, cur, g, f)
        cur, g, f, changed = sweep(cur, g, f)
        stalled = (f_start - f) <= tol * f_start
        phase = jnp.where(
            phase == 0,
            jnp.where(changed, 0, jnp.where(rescale, 1, 2)),
            jnp.where(stalled, 2, 1),
        ).astype(jnp.int32)
        return cur, g, f, phase, it + 1

    cur, g, f, _, it = jax.lax.while_loop(
        lambda c: (c[3] < 2) & (c[4] < max_iter), body, (cur, g, f, it0, it0)
    )
    return QuotientDistance(jnp.sqrt(jnp.maximum(f, 0)), cur, g, it, a0, ga)


# --------------------------------------------------------------------------- hooks


def quotient_align(sym: Symmetry, **kwargs: Any) -> Callable[[PyTree, PyTree], PyTree]:
    """An ``align`` hook for :func:`~quotient_opt.landscape.neb`: ``b`` moved along its orbit to ``a``.

    ``align(a, b)`` runs :func:`quotient_distance` (which aligns :math:`g \\cdot b`
    with a point :math:`h \\cdot a` of ``a``'s orbit, its ``reference``) and
    returns :math:`h^{-1} \\cdot (g \\cdot b)`: the aligned point carried back
    into ``a``'s own scaling, so that for ``b`` in the orbit of ``a`` it is
    ``a`` itself (to rounding), whether or not ``a`` is balanced.

    Args:
      sym: the symmetry.
      **kwargs: options of :func:`quotient_distance`.

    Returns:
      ``align(a, b) -> b'``, a point of ``b``'s orbit (same function as ``b``).
    """

    def align(a: PyTree, b: PyTree) -> PyTree:
        res = quotient_distance(sym, a, b, **kwargs)
        return sym.act(res.aligned, sym.inverse(res.reference_element))

    return align


def canonical_section(sym: Symmetry, **canonicalize_kwargs: Any) -> Callable[[PyTree], PyTree]:
    """A ``project`` hook for :func:`~quotient_opt.landscape.neb`: the balanced section.

    ``project(θ)`` is the minimal-energy point of ``θ``'s rescaling orbit
    (:func:`~quotient_opt.canonicalize` without sorting: sorting jumps
    between units and would tear the band). Keeping every image on this
    section removes the flat orbit directions from the band, so images cannot
    drift along them. Use it with balanced endpoints (e.g. both
    symmetrized), else the band jumps at its ends.
    jit- and vmap-safe.

    Args:
      sym: the symmetry.
      **canonicalize_kwargs: options of :func:`~quotient_opt.canonicalize`
        (``permutations`` is not allowed).

    Returns:
      ``project(params) -> params``.
    """
    if "permutations" in canonicalize_kwargs:
        raise ValueError("canonical_section: permutations are not allowed (they jump)")

    def project(params: PyTree) -> PyTree:
        return canonicalize(sym, params, **canonicalize_kwargs)[0]

    return project


def orbit_directions(sym: Symmetry) -> Callable[[PyTree], PyTree]:
    """A ``project_out`` hook for :func:`~quotient_opt.landscape.hessian_spectrum`.

    ``directions(params)`` is an orthonormal basis of the tangent space of the
    continuous orbit at ``params``: the columns of :math:`J` (one per window of
    every rescalable group, :meth:`~quotient_opt.Symmetry.tangent`, and one per
    Lie-algebra coordinate of every continuous factor, e.g. each scale-invariant
    block's radial direction)
    orthonormalized by an SVD in ``ravel_pytree`` order, as a stacked params
    pytree (leading axis ``m``). Outside jit, directions that are linearly
    dependent (a unit whose incoming or outgoing parameters are all exactly
    zero has a zero tangent) are dropped, so ``m`` is the orbit's dimension;
    under jit all are kept and must be independent. Permutations are
    discrete and have no tangent.

    Since a symmetric loss is constant on the orbit, at a critical point
    these directions are null directions of the Hessian; projecting them out
    leaves the spectrum of the loss on the quotient.

    Args:
      sym: the symmetry.

    Returns:
      ``directions(params) -> stacked pytree``.
    """

    def directions(params: PyTree) -> PyTree:
        dt = solve_dtype(params)
        flat, unravel = flatten(params)
        flows = _kinds.continuous(sym)
        sizes = [g.windows for g in sym.groups if g.rescalable]
        sizes += [_kinds.kind_of(f).dim(f) for f in flows]
        if not sizes:
            return jax.tree.map(lambda x: jnp.zeros((0, *jnp.shape(x)), x.dtype), params)
        cuts = list(itertools.accumulate(sizes))[:-1]

        def column(e: jax.Array) -> jax.Array:
            parts = iter(jnp.split(e, cuts))
            a = tuple(next(parts) if g.rescalable else jnp.zeros((g.windows,), dt)
                      for g in sym.groups)
            t = sym.tangent(params, a)
            if flows:
                tf = _kinds.tangent(sym, params, [next(parts) for _ in flows], dtype=dt)
                t = map_with_path(lambda path, x: x + tf[path].astype(x.dtype)
                                  if path in tf else x, t)
            return flatten(t)[0].astype(dt)

        j = jax.vmap(column, out_axes=1)(jnp.eye(sum(sizes), dtype=dt))  # (n, m)
        u, s, _ = jnp.linalg.svd(j, full_matrices=False)
        if not isinstance(s, jax.core.Tracer):
            keep = int(jnp.sum(s > jnp.max(s) * max(j.shape) * jnp.finfo(dt).eps))
            u = u[:, :keep]
        return jax.vmap(unravel)(u.T.astype(flat.dtype))

    return directions
