"""Numerical verification that a symmetry preserves the function it was built for.

Each group is tested alone, one kind of move at a time (window permutations,
piece permutations, rescalings), so a failure names the group and the move.
Used by :meth:`~quotient_opt.Symmetry.check` and by
:func:`~quotient_opt.infer_symmetry`, which downgrades whatever fails.

Both test at the given parameters *and* at random ones (:func:`check_points`):
a spec that leaves out a leaf the function reads (a hand spec forgetting a
bias, say) is still a symmetry wherever that leaf is zero, as a freshly
initialized bias is; at random parameters every leaf is nonzero.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import TYPE_CHECKING, Any

import jax
import jax.numpy as jnp
import numpy as np

if TYPE_CHECKING:  # pragma: no cover
    from quotient_opt.symmetry._spec import GroupElement, Symmetry, UnitGroup

PyTree = Any


def tolerance(params: PyTree) -> float:
    """Default tolerance of the check, relative to the output scale."""
    dts = [_dtype(x) for x in jax.tree.leaves(params)]
    dts = [d for d in dts if jnp.issubdtype(d, jnp.floating)]
    dt = jnp.result_type(*dts) if dts else jnp.float32
    return 1e-9 if jnp.finfo(dt).bits >= 64 else 1e-3


def _dtype(x: Any) -> Any:
    return x.dtype if hasattr(x, "dtype") else np.asarray(x).dtype


def output_scale(y: PyTree) -> float:
    leaves = [np.asarray(v, np.float64) for v in jax.tree.leaves(y)]
    s = max((float(np.max(np.abs(v))) for v in leaves if v.size), default=0.0)
    return s if s > 0 else 1.0


def difference(a: PyTree, b: PyTree) -> float:
    la = [np.asarray(v, np.float64) for v in jax.tree.leaves(a)]
    lb = [np.asarray(v, np.float64) for v in jax.tree.leaves(b)]
    d = max((float(np.max(np.abs(u - v))) for u, v in zip(la, lb) if u.size), default=0.0)
    if not all(np.all(np.isfinite(v)) for v in la):
        return float("inf")
    return d


def concrete(tree: PyTree) -> bool:
    """Whether no leaf of ``tree`` is a ``jax.ShapeDtypeStruct``."""
    return all(not isinstance(x, jax.ShapeDtypeStruct) for x in jax.tree.leaves(tree))


def check_points(params: PyTree, seed: int) -> list[PyTree]:
    """Parameters to check at: the given ones (if concrete) and random ones.

    The random ones are generic enough that no unit is dead or saturated by
    accident and no leaf is zero: Gaussian, standard deviation
    :math:`1.5/\\sqrt{\\text{fan-in}}` for matrices and kernels, 0.3 for
    vectors; non-float leaves are kept.
    """
    rng = np.random.default_rng(seed)

    def rand(p: Any) -> Any:
        shape, dt = np.shape(p), p.dtype
        if not jnp.issubdtype(dt, jnp.floating):
            return p
        if len(shape) >= 2:
            fan_in = int(np.prod(shape)) // max(shape)
            std = 1.5 / np.sqrt(max(fan_in, 1))
        else:
            std = 0.3
        return jnp.asarray(rng.normal(0.0, std, shape), dt)

    out = [jax.tree.map(rand, params)]
    if concrete(params):
        out.insert(0, params)
    return out


def _element(grp: UnitGroup, rng: np.random.Generator, kind: str, bound: float,
             dtype: Any) -> GroupElement:
    from quotient_opt.symmetry._spec import GroupElement

    wp = np.arange(grp.windows)
    pp = np.tile(np.arange(grp.pieces), (grp.windows, 1))
    ls = np.zeros(grp.windows)
    if kind == "permutation":
        wp = rng.permutation(grp.windows)
    elif kind == "pieces":
        pp = np.stack([rng.permutation(grp.pieces) for _ in range(grp.windows)])
    else:
        ls = rng.uniform(-bound, bound, grp.windows)
    return GroupElement(jnp.asarray(wp, jnp.int32), jnp.asarray(pp, jnp.int32),
                        jnp.asarray(ls, dtype))


def moves(grp: UnitGroup) -> list[str]:
    """The kinds of move a group claims: ``'permutation'``, ``'pieces'``, ``'rescaling'``."""
    out = []
    if grp.permutable and grp.windows > 1:
        out.append("permutation")
    if grp.pieces > 1 and grp.pieces_permutable:
        out.append("pieces")
    if grp.rescalable:
        out.append("rescaling")
    return out


def group_errors(
    sym: Symmetry,
    apply_fn: Callable[[PyTree, Any], Any],
    params: PyTree,
    x: Any,
    *,
    trials: int = 2,
    log_scale: float = 2.0,
    seed: int = 0,
) -> list[dict[str, float]]:
    """Per group, per kind of move, the largest relative change of ``apply_fn(params, x)``."""
    rng = np.random.default_rng(seed)
    f = jax.jit(apply_fn)
    y0 = f(params, x)
    scale = output_scale(y0)
    dtype = jnp.float64 if tolerance(params) < 1e-6 else jnp.float32
    ident = sym.identity(dtype)
    out = []
    for gi, grp in enumerate(sym.groups):
        errs: dict[str, float] = {}
        for kind in moves(grp):
            worst = 0.0
            for _ in range(trials):
                g = list(ident)
                g[gi] = _element(grp, rng, kind, log_scale, dtype)
                worst = max(worst, difference(f(sym.act(params, tuple(g)), x), y0) / scale)
            errs[kind] = worst
        out.append(errs)
    return out


def check(sym: Symmetry, apply_fn: Callable[[PyTree, Any], Any], params: PyTree, x: Any, *,
          rtol: float | None = None, seed: int = 0, **options: Any) -> None:
    """:meth:`~quotient_opt.Symmetry.check`: raises naming the first group that fails.

    Tested at every point of :func:`check_points` (``options``: those of
    :func:`group_errors`); a group that fails only at the random parameters
    gets a hint that the spec leaves out a leaf the function reads (zero in
    ``params``).
    """
    tol = tolerance(params) if rtol is None else rtol
    given, random = (group_errors(sym, apply_fn, p, x, seed=seed, **options)
                     for p in check_points(params, seed))
    for grp, at_given, at_random in zip(sym.groups, given, random):
        bad = {k: v for k, v in at_given.items() if not v <= tol}
        where = ""
        if not bad:
            bad = {k: v for k, v in at_random.items() if not v <= tol}
            where = (" at random parameters, not at the given ones: does the spec leave out a "
                     "leaf that the function reads and that is zero there, such as a bias?")
        if bad:
            what = ", ".join(f"{k} changes it by {v:.3g}" for k, v in bad.items())
            raise ValueError(
                f"group '{grp.name}' is not a symmetry of this function: {what} "
                f"(relative to the output scale; tolerance {tol:g}){where}"
            )
    _check_factors(sym, apply_fn, params, x, tol, seed, options.get("trials", 2))


def factor_error(sym: Symmetry, f: Callable, params: PyTree, x: Any, y0: Any, rec: Any,
                 rng: np.random.Generator, *, trials: int, bound: float, dtype: Any) -> float:
    """The largest relative change of ``f(params, x)`` (``y0``) under ``trials`` random
    elements of the factor ``rec``."""
    from quotient_opt.symmetry import _kinds

    kind = _kinds.kind_of(rec)
    scale = output_scale(y0)
    worst = 0.0
    for _ in range(trials):
        h = kind.sample(rec, rng, bound, dtype)
        worst = max(worst, difference(f(_kinds.act(sym, params, (h,), factors=(rec,)), x), y0)
                    / scale)
    return worst


def _check_factors(sym: Symmetry, apply_fn: Callable, params: PyTree, x: Any, tol: float,
                   seed: int, trials: int) -> None:
    """Every factor of another kind: random elements keep the function (its kind's
    tolerance), at the given and at random parameters."""
    if not sym.factors:
        return
    from quotient_opt.symmetry import _kinds

    rng = np.random.default_rng(seed + 3)
    f = jax.jit(apply_fn)
    dtype = jnp.float64 if tolerance(params) < 1e-6 else jnp.float32
    for p in check_points(params, seed):
        y0 = f(p, x)
        for rec in sym.factors:
            limit = _kinds.kind_of(rec).check_tolerance(tol)
            err = factor_error(sym, f, p, x, y0, rec, rng, trials=trials, bound=1.0, dtype=dtype)
            if not err <= limit:
                raise ValueError(
                    f"factor '{rec.name}' ({rec.kind}) is not a symmetry of this function: "
                    f"a random element changes it by {err:.3g} (relative to the output "
                    f"scale; tolerance {limit:g})")
