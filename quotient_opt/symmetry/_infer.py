"""``infer_symmetry``: the symmetry of any nnx, equinox, linen or plain-function model.

Framework adapters (a registry, see
:func:`~quotient_opt.symmetry.register_adapter`) turn a model into
``apply_fn(params, x)`` and its parameter pytree; the forward computation is traced and analysed
(a dataflow analysis of its jaxpr, in ``quotient_opt/symmetry/_tracer/``, whose rule table
:func:`~quotient_opt.symmetry.register_rule` extends); the result is checked numerically and
every move that changes the function is removed (and said so in
:meth:`~quotient_opt.Symmetry.describe`).
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from quotient_opt.symmetry._adapters import adapt
from quotient_opt.symmetry import _kinds
from quotient_opt.symmetry._check import (
    check_points,
    concrete,
    factor_error,
    group_errors,
    moves,
    tolerance,
)
from quotient_opt.symmetry._paths import normalize_path
from quotient_opt.symmetry._program import Program
from quotient_opt.symmetry._spec import Symmetry
from quotient_opt.symmetry._tracer import analyze

PyTree = Any


# --------------------------------------------------------------------------- adapters


def _adapt(model: Any, params: PyTree | None) -> tuple[Callable, PyTree, Any]:
    adapted = adapt(model)
    if adapted is not None:
        if params is not None:
            raise ValueError(f"params: not used with a {type(model).__name__} (its adapter "
                             "takes the parameters from the model)")
        return adapted
    if isinstance(model, dict) or hasattr(model, "keys"):
        raise ValueError(
            "model: got a parameter dict; pass the forward function and the params instead: "
            "qo.infer_symmetry(module.apply, example_input, params=params) (flax.linen), or "
            "write the spec by hand with qo.symmetry_from_axes"
        )
    if callable(model):
        if params is None:
            raise ValueError("params: required with a function: "
                             "qo.infer_symmetry(apply_fn, example_input, params=params)")
        return model, params, None
    raise ValueError(f"model: unsupported model type {type(model).__name__} (a function "
                     "apply_fn(params, x) with params=..., an nnx or equinox Module, or a type "
                     "taught with qo.symmetry.register_adapter)")


# --------------------------------------------------------------------------- checking


def _check_inputs(x: Any, seed: int) -> list[Any]:
    """The example input and a random one of the same shape (for float inputs)."""
    rng = np.random.default_rng(seed + 1)

    def rand(v: Any) -> Any:
        if not jnp.issubdtype(v.dtype, jnp.floating):
            return jnp.zeros(v.shape, v.dtype) if isinstance(v, jax.ShapeDtypeStruct) else v
        return jnp.asarray(rng.normal(size=np.shape(v)), v.dtype)

    out = [jax.tree.map(rand, x)]
    if concrete(x) and any(np.any(np.asarray(v) != 0) for v in jax.tree.leaves(x)):
        out.insert(0, x)
    return out


def _downgrade(sym: Symmetry, apply_fn: Callable, params: PyTree, x: Any, seed: int,
               log_scale: float) -> Symmetry:
    """Removes every move that changes the function numerically; says so in the notes."""
    tol = tolerance(params)
    groups = list(sym.groups)
    for p in check_points(params, seed):
        for xx in _check_inputs(x, seed):
            trial = dataclasses.replace(sym, groups=tuple(groups))
            errs = group_errors(trial, apply_fn, p, xx, trials=2, log_scale=log_scale, seed=seed)
            for i, (grp, err) in enumerate(zip(groups, errs)):
                bad = {k: v for k, v in err.items() if not v <= tol}
                if not bad:
                    continue
                notes = tuple(f"numerical check: {k} changes the output by {v:.2g}"
                              for k, v in bad.items())
                groups[i] = dataclasses.replace(
                    grp,
                    permutable=grp.permutable and "permutation" not in bad,
                    pieces_permutable=grp.pieces_permutable and "pieces" not in bad,
                    rescalable=grp.rescalable and "rescaling" not in bad,
                    notes=grp.notes + notes,
                )
    kept = tuple(g for g in groups if g.symmetric)
    dropped = sym.dropped + tuple(g for g in groups if not g.symmetric)
    return dataclasses.replace(sym, groups=kept, dropped=dropped)


class _Probe:
    """The function at the check points and inputs, compiled once, to test candidate factors."""

    def __init__(self, apply_fn: Callable, params: PyTree, x: Any, seed: int):
        self.f = jax.jit(apply_fn)
        self.points = [(p, xx, self.f(p, xx)) for p in check_points(params, seed)
                       for xx in _check_inputs(x, seed)]
        self.tol = tolerance(params)
        self.dtype = jnp.float64 if self.tol < 1e-6 else jnp.float32
        self.rng = np.random.default_rng(seed + 2)

    def holds(self, sym: Symmetry, rec: Any, *, trials: int = 2, bound: float = 0.5) -> bool:
        """Whether random elements of the factor ``rec`` keep the function everywhere."""
        tol = _kinds.kind_of(rec).check_tolerance(self.tol)
        return all(factor_error(sym, self.f, p, xx, y0, rec, self.rng, trials=trials,
                                bound=bound, dtype=self.dtype) <= tol
                   for p, xx, y0 in self.points)

    def rescaling_holds(self, sym: Symmetry, grp: Any, log_scale: float) -> bool:
        trial = dataclasses.replace(sym, groups=(grp,), factors=())
        for p, xx, _ in self.points:
            err = group_errors(trial, self.f, p, xx, trials=2, log_scale=log_scale)[0]
            if not err.get("rescaling", np.inf) <= self.tol:
                return False
        return True


def _find_factors(sym: Symmetry, probe: _Probe, log_scale: float) -> Symmetry:
    """Tests every registered kind's candidates on every traced group, in the kind's
    order; keeps each that holds and shares no entry with one kept before.

    A kind may then replace the group (:meth:`~quotient_opt.symmetry.Kind.regroup`: a
    normalization scale invariance moves a rescaling the normalization removed to its
    gain and shift), where the new group's rescaling holds.
    """
    shapes = dict(sym.shapes)
    factors: list[Any] = []
    groups = list(sym.groups)
    for grp in sym.groups + sym.dropped:
        for kind in _kinds.KINDS.values():
            kept: list[Any] = []
            taken: set[tuple] = set()
            for rec in kind.candidates(grp, shapes):
                keys = {(r.path, r.axis) for r in rec.refs}
                if keys & taken or not probe.holds(sym, rec):
                    continue
                kept.append(next((r for r in kind.refinements(rec) if probe.holds(sym, r)), rec))
                taken |= keys
            factors += kept
            again = kind.regroup(grp, kept) if kept and grp in groups else None
            if again is not None and probe.rescaling_holds(sym, again, log_scale):
                groups[groups.index(grp)] = again
    return dataclasses.replace(sym, groups=tuple(groups), factors=tuple(factors))


# --------------------------------------------------------------------------- entry point


def infer_symmetry(
    model: Any,
    example_input: Any = None,
    *,
    params: PyTree | None = None,
    check: bool = True,
    log_scale: float = 2.0,
    seed: int = 0,
) -> Symmetry:
    """Infers the permutation and rescaling symmetries of a model by tracing it.

    The forward computation is traced to a jaxpr at ``example_input``. Each
    dense or convolution layer's output features form a unit group; the
    analysis follows them through biases, elementwise activations, max over
    pieces (maxout), pooling over space, flatten and other reshapes,
    transposes, concatenations and residual additions (which merge the groups
    of one stream). Units are *permutable* if everything that reads them is a
    parameter axis that can be permuted alike, and *rescalable* if moreover
    every operation between the layers is positively homogeneous (ReLU, leaky
    ReLU, identity, max). What cannot be shown safe (normalization by
    statistics, softmax or attention, unknown primitives unless taught with
    :func:`~quotient_opt.symmetry.register_rule`, control flow, units reaching
    the output) gets fewer symmetries, never a wrong one, and
    :meth:`~quotient_opt.Symmetry.describe` (``print(sym)``) says why. With
    ``check`` (default) random group elements are then applied at the given
    and at random parameters and inputs, and any move that changes the
    output is removed.

    With ``check``, inference then looks for symmetry factors of the other
    registered kinds (``Symmetry.factors``, see :mod:`quotient_opt.symmetry`'s
    :class:`~quotient_opt.symmetry.Kind`): the weights feeding a normalization
    (:class:`~quotient_opt.symmetry.NormScale`; BatchNorm in train mode per
    channel, LayerNorm/RMSNorm per vector, GroupNorm per group) and the sign
    flips of units behind odd activations
    (:class:`~quotient_opt.symmetry.SignFlip`). Each kind proposes candidates
    on the traced groups and only those that keep the function at the given and
    at random parameters and inputs are kept; a group whose rescaling the
    normalization removed gets it back on the normalization's gain and shift
    where a homogeneous activation follows.

    Supported models and their parameters (the pytree the symmetry acts on):

    * any ``flax.nnx.Module``: ``nnx.state(model, nnx.Param)``, in eval or
      train mode: the other state (``BatchStat``, ``RngState``, ...) is held
      fixed at its current value while tracing and checking (Dropout draws one
      mask, the same in every comparison of the check), and is left unchanged;
    * any ``equinox.Module``: ``eqx.filter(model, eqx.is_array)``;
    * ``qo.infer_symmetry(apply_fn, example_input, params=params)`` for
      flax.linen (``apply_fn = module.apply``, ``params`` its variables) and
      any plain function ``apply_fn(params, x)``;
    * any other model type taught with
      :func:`~quotient_opt.symmetry.register_adapter`.

    Args:
      model: an nnx Module, an equinox Module, a function ``apply_fn(params, x)``,
        or a model with a registered adapter.
      example_input: an input the model accepts (a batch for nnx/linen, one
        sample for equinox). May be omitted for an ``nnx.Sequential`` starting
        with ``nnx.Linear`` and for ``eqx.nn.MLP``/``eqx.nn.Linear``.
      params: the parameters, with a plain function only.
      check: verify the result numerically and remove what fails.
      log_scale: bound of the log-scales used by the check.
      seed: seed of the check.

    Returns:
      The model's :class:`~quotient_opt.Symmetry`.

    Raises:
      ValueError: for an unsupported model, or a missing ``example_input``.
    """
    apply_fn, params, default_input = _adapt(model, params)
    x = default_input if example_input is None else example_input
    if x is None:
        raise ValueError(
            f"example_input: required for {type(model).__name__} (an input batch the model "
            "accepts, e.g. jnp.zeros((1, 28, 28, 1)))"
        )
    flat, _ = jax.tree_util.tree_flatten_with_path(params)
    paths = [normalize_path(p) for p, _ in flat]
    shapes = [tuple(np.shape(v)) for _, v in flat]
    closed = jax.make_jaxpr(apply_fn)(params, x)
    with_sym, without, leaf_shapes = analyze(closed, paths, shapes, len(jax.tree.leaves(x)))
    for grp in with_sym:
        if not moves(grp):  # e.g. a single unit that is not rescalable
            without.append(grp)
    with_sym = [g for g in with_sym if moves(g)]
    sym = Symmetry(groups=tuple(with_sym), shapes=tuple(leaf_shapes.items()),
                   dropped=tuple(without), program=Program(apply_fn, params, x))
    if check and sym.groups:
        sym = _downgrade(sym, apply_fn, params, x, seed, log_scale)
    if check:
        sym = _find_factors(sym, _Probe(apply_fn, params, x, seed), log_scale)
    return sym
