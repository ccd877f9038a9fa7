"""Chain orders and inner optimizers the library's claims do not cover: detected and warned.

Some of the library's transformations only do what they claim in some places
of an ``optax.chain``:

* :func:`~quotient_opt.revive_dead_units`, and :func:`~quotient_opt.rebalance`
  / :func:`~quotient_opt.teleport` / the ``quotient_*`` aliases with
  ``move_params=True``, return a **jump** of the parameters (a split, or the
  move to another point of the orbit) that must reach them unchanged: nothing
  may follow them that changes updates (clipping, a learning rate,
  ``MultiSteps`` around them).
* :func:`~quotient_opt.project_horizontal` must come **after** the
  preconditioner: a transformation after it that is not a scalar multiple of
  its input (Adam, weight decay) puts a vertical part back.
* :func:`~quotient_opt.scale_by_path_norm` (:func:`~quotient_opt.path_sgd`)
  is equivariant because the path-normalized step transforms like the
  parameters; a **normalizing** transformation after it (Adam, RMSProp, a
  sign) divides that scale away.
* :func:`~quotient_opt.teleport` reads the **gradient** of the invariant loss:
  a transformation before it that is not a positive multiple of its input
  (Adam, weight decay, momentum) feeds it something else.

A transformation cannot see what is chained around it, so the check runs
where a chain is visible: :func:`check_chain` (public), on the inner optimizer
of every wrapper at its ``init``, and in :func:`~quotient_opt.fit` on the
whole transformation. The library marks its own transformations (a ``Mark`` on
their update functions); an ``optax.chain`` / ``named_chain`` is taken apart
through its closures (recognised by the identity of optax's code objects, so
a future optax that builds chains otherwise just disables the check, never
raising a false warning); and what every other part does to its updates is
**measured** on synthetic data (one update of unit-size gradients and of
twice them: the identity, a scalar multiple of its input, or a normalization
whose output does not grow with its input), never guessed from its name. Each
finding is a :class:`ChainOrderWarning` naming the order and the fix.

Not detected: an ``optax.chain`` built and used by your own loop without
:func:`check_chain` (nothing of the library sees it), transformations that
need extra args (``value``) to run, and a part whose effect depends on the
scale of the gradients beyond the probe's (a clip that acts only on larger
gradients than unit-size ones).

The exact-equivariance claim of :func:`~quotient_opt.rebalance` and
:func:`~quotient_opt.teleport` holds for any inner optimizer that commutes with
the permutations of the symmetry: the inner optimizer runs at the canonical
point, which for :math:`g\\cdot\\theta` is :math:`\\pi\\cdot\\mathrm{canon}(\\theta)`.
Every elementwise optimizer does; so do LAMB, LARS and Muon (per-leaf norms and
the orthogonalization :math:`P G Q \\mapsto P\\,\\mathrm{orth}(G)\\,Q` commute with
permutation matrices; measured: runs from :math:`\\theta` and
:math:`g\\cdot\\theta` agree to 6e-16 in float64). At ``init`` the wrappers
run their inner optimizer on synthetic data and on the same data permuted by
a random element; an update that does not follow the permutation (noise drawn
by position, as in ``optax.noisy_sgd`` or a Hutchinson estimate, per-index
settings, blocks that cut across units) gets a :class:`NotEquivariantWarning`.
"""

from __future__ import annotations

import dataclasses
import warnings
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
import optax

from quotient_opt.transforms import _probe

PyTree = Any

__all__ = ["ChainOrderWarning", "NotEquivariantWarning", "check_chain"]


class ChainOrderWarning(UserWarning):
    """A transformation of the library is chained where it cannot do what it claims."""


class NotEquivariantWarning(UserWarning):
    """An inner optimizer whose update does not commute with the symmetry's permutations."""


# --------------------------------------------------------------------------- marks

#: The update is a jump of the parameters that must reach them unchanged.
JUMP = "jump"
#: Projects updates onto the horizontal space.
PROJECTION = "projection"
#: Path-norm preconditioning: what follows must not normalize.
PATH_NORM = "path_norm"
#: Reads the gradient of the invariant loss: what precedes must be a positive multiple.
READS_GRADIENT = "reads_gradient"
#: Built by the library in a known-good order (an alias's inner chain): not checked.
KNOWN = "known"


@dataclasses.dataclass(frozen=True)
class Mark:
    """What the library knows of one of its transformations."""

    label: str
    roles: frozenset[str]


def mark(tx: Any, label: str, *roles: str) -> Any:
    """Marks ``tx`` (its update function) with a label and roles; returns ``tx``."""
    tx.update._qo_mark = Mark(label, frozenset(roles))
    return tx


def mark_of(tx: Any) -> Mark | None:
    return getattr(tx.update, "_qo_mark", None)


# --------------------------------------------------------------------------- chains


def _code(tx: Any) -> Any:
    return getattr(tx.update, "__code__", None)


_CHAIN = _code(optax.chain(optax.identity()))
_NAMED = _code(optax.named_chain(("a", optax.identity())))
_EXTRA = _code(optax.with_extra_args_support(
    optax.GradientTransformation(lambda p: optax.EmptyState(), lambda u, s, p=None: (u, s))))


def _cell(fn: Any, name: str) -> Any:
    return fn.__closure__[fn.__code__.co_freevars.index(name)].cell_contents


def parts(tx: Any) -> list[Any]:
    """The transformations an ``optax.chain`` / ``named_chain`` applies, in order
    (nested chains flattened); ``[tx]`` for anything else."""
    try:
        code = _code(tx)
        if code is _EXTRA:
            return parts(_cell(tx.update, "tx"))
        if code is _CHAIN:
            updates = _cell(tx.update, "update_fns")
            inits = _cell(tx.init, "init_fns")
            return [p for i, u in zip(inits, updates)
                    for p in parts(optax.GradientTransformationExtraArgs(i, u))]
        if code is _NAMED:
            return [p for _, t in _cell(tx.update, "transforms") for p in parts(t)]
    except (AttributeError, ValueError, IndexError, TypeError):  # not the optax we know
        pass
    return [tx]


def name(tx: Any) -> str:
    """A readable name: the library's label, else the factory of optax's closures."""
    m = mark_of(tx)
    if m is not None:
        return m.label
    fn = tx.update
    base = getattr(fn, "__qualname__", "").split(".<locals>")[0]
    if not base or base.startswith("<"):
        return "a transformation"
    return ("optax." if (getattr(fn, "__module__", "") or "").startswith("optax") else "") + base


# --------------------------------------------------------------------------- what a part does


@dataclasses.dataclass(frozen=True)
class Effect:
    """What one update of a transformation does to unit-size updates ``u`` (fields are
    ``None`` when it could not be run): ``identity``: returns ``u``; ``multiple``: the
    scalar ``a`` when it returns ``a u`` (else None); ``normalizing``: not a multiple,
    and its output for ``2u`` is its output for ``u``."""

    identity: bool | None = None
    multiple: float | None = None
    normalizing: bool | None = None
    known: bool = False


def _flat(tree: PyTree) -> np.ndarray:
    leaves = [np.asarray(x, np.float64).ravel() for x in jax.tree.leaves(tree)]
    return np.concatenate(leaves) if leaves else np.zeros(0)


def _effect(tx: Any, params: PyTree) -> Effect:
    data = _probe.make_data(params, seed=3, steps=1)
    double = [[2 * g for g in data.grads[0]]]
    try:
        one, two = _probe.run(tx, data), _probe.run(tx, data, grads=double)
    except _probe.ProbeError:
        return Effect()
    if _probe.traced((one.outputs, two.outputs)):
        return Effect()
    u = np.concatenate([np.asarray(g, np.float64).ravel() for g in data.grads[0]])
    a, b = _flat(one.outputs[0]), _flat(two.outputs[0])
    if a.shape != u.shape or not (np.isfinite(a).all() and np.isfinite(b).all()):
        return Effect()
    scale = max(np.abs(a).max(initial=0.0), 1e-30)
    k = float(a @ u / (u @ u))
    multiple = k if np.abs(a - k * u).max(initial=0.0) <= 1e-5 * scale else None
    identity = bool(np.abs(a - u).max(initial=0.0) <= 1e-6 * np.abs(u).max())
    normalizing = multiple is None and np.abs(b - a).max(initial=0.0) <= 1e-3 * scale
    return Effect(identity, multiple, bool(normalizing), True)


_EFFECTS = _probe.Cache()


def effect(tx: Any, params: PyTree) -> Effect:
    """What ``tx`` does to its updates, measured (cached per transformation and shapes)."""
    return _EFFECTS.get((_probe.tx_key(tx), _probe.spec_key(params)), lambda: _effect(tx, params))


# --------------------------------------------------------------------------- the rules


def _findings(seq: list[Any], params: PyTree, where: str) -> list[str]:
    out = []
    at = lambda i: f"{name(seq[i])} (#{i + 1} of {len(seq)} in {where})"  # noqa: E731
    for i, p in enumerate(seq):
        m = mark_of(p)
        roles = m.roles if m is not None else frozenset()
        if KNOWN in roles:
            continue
        later, earlier = range(i + 1, len(seq)), range(i)
        if JUMP in roles:
            for j in later:
                e = effect(seq[j], params)
                if e.known and not e.identity:
                    out.append(
                        f"{at(j)} follows {at(i)}, whose update is a jump of the parameters "
                        "(a split, or the move along the orbit) that must reach them "
                        f"unchanged; {name(seq[j])} changes it, and with it the function. Fix: "
                        f"make {name(p)} the outermost transformation and put {name(seq[j])} "
                        f"inside it, in its inner optimizer (e.g. {name(p)}(optax.chain(inner, "
                        f"{name(seq[j])}), sym)).")
        if PROJECTION in roles:
            for j in later:
                e = effect(seq[j], params)
                if e.known and e.multiple is None:
                    out.append(
                        f"{at(j)} follows {at(i)} and is not a scalar multiple of its input "
                        "(a preconditioner such as Adam, or weight decay): it puts a vertical "
                        "part back into the projected update. Fix: project last, "
                        f"optax.chain({name(seq[j])}, qo.project_horizontal(sym)).")
        if PATH_NORM in roles:
            for j in later:
                e = effect(seq[j], params)
                if e.known and e.normalizing:
                    out.append(
                        f"{at(j)} follows {at(i)} and normalizes its input (its output does "
                        "not grow with it, as Adam's, RMSProp's or a sign's): it divides the "
                        "path-norm scaling away and the step is no longer equivariant. Fix: "
                        "follow the path norm with linear steps only (qo.path_sgd(lr, sym, "
                        "momentum=...)); for an adaptive step on the quotient use "
                        "qo.quotient_adam.")
        if READS_GRADIENT in roles:
            for j in earlier:
                e = effect(seq[j], params)
                if e.known and not (e.multiple is not None and e.multiple > 0):
                    out.append(
                        f"{at(i)} comes after {at(j)}, which is not a positive multiple of "
                        f"the gradient: {name(p)} reads the gradient of the invariant loss "
                        "(its ascent objective and the gradient it transports assume it). "
                        f"Fix: put {name(p)} first and {name(seq[j])} in its inner optimizer "
                        f"({name(p)}(optax.chain({name(seq[j])}, inner), sym)).")
    return out


_CHECKED = _probe.Cache()


def check_chain(tx: Any, params: PyTree, *, where: str = "the chain") -> list[str]:
    """Warns (:class:`ChainOrderWarning`) about the library's transformations in the wrong
    place of ``tx``: a jump followed by anything that changes updates, a projection followed
    by a preconditioner, a path norm followed by a normalization, teleport after something
    that changes the gradient (see the module docstring).

    Runs once per transformation and parameter shapes (later calls return the same
    findings without warning again); the parts whose effect matters are run eagerly on
    synthetic data of the parameters' shapes, so it also works on traced ``params``.

    Args:
      tx: an Optax transformation (typically an ``optax.chain``).
      params: parameters (only their structure, shapes and dtypes are used).
      where: how to refer to ``tx`` in the messages.

    Returns:
      The messages warned.
    """
    if not jax.tree.leaves(params):
        return []
    key = (_probe.tx_key(tx), _probe.spec_key(params), where)
    fresh: list[bool] = []

    def compute() -> list[str]:
        fresh.append(True)
        return _findings(parts(tx), params, where)

    found = _CHECKED.get(key, compute)
    if fresh:
        for message in found:
            warnings.warn(message, ChainOrderWarning, stacklevel=3)
    return found


# --------------------------------------------------------------------------- equivariance


def _permutation_gap(inner: Any, sym: Any, params: PyTree) -> float | None:
    """Relative gap between ``inner``'s update on permuted data and its permuted update."""
    data = _probe.make_data(params, seed=4)
    tree = lambda leaves: jax.tree.unflatten(data.treedef, [jnp.asarray(x) for x in leaves])
    leaves = lambda t: [np.asarray(x) for x in jax.tree.leaves(t)]
    with jax.ensure_compile_time_eval():
        pi = sym.sample(jax.random.key(0), log_scale=0.0, dtype=jnp.float32)
        ident = sym.identity(jnp.float32)
        if all(bool(jnp.all(a == b)) for a, b in zip(jax.tree.leaves(pi), jax.tree.leaves(ident))):
            return None  # nothing permutable
        act = lambda t: sym.act(tree(t), pi)  # noqa: E731
        thetas = [leaves(act(t)) for t in data.thetas]
        grads = [leaves(act(g)) for g in data.grads]
        try:
            base, moved = _probe.run(inner, data), _probe.run(inner, data, thetas, grads)
        except _probe.ProbeError:
            return None
        if _probe.traced((base.outputs, moved.outputs)):
            return None
        gap = 0.0
        for a, b in zip(base.outputs, moved.outputs):
            want = sym.act(jax.tree.map(jnp.asarray, a), pi)
            for x, y in zip(jax.tree.leaves(want), jax.tree.leaves(b)):
                x, y = np.asarray(x, np.float64), np.asarray(y, np.float64)
                scale = np.abs(x).max(initial=0.0)
                if scale > 0:
                    gap = max(gap, float(np.abs(x - y).max() / scale))
    return gap


_GAPS = _probe.Cache()

#: Largest relative gap (max norm per leaf) that counts as rounding of reordered sums.
EQUIVARIANCE_RTOL = 1e-4


def check_equivariant_inner(inner: Any, sym: Any, params: PyTree, who: str) -> float | None:
    """Warns (:class:`NotEquivariantWarning`) if ``inner``'s update does not commute with
    the permutations of ``sym`` (measured once per optimizer and shapes); returns the gap."""
    m = mark_of(inner)
    if (m is not None and KNOWN in m.roles) or not jax.tree.leaves(params):
        return None
    fresh: list[bool] = []

    def compute() -> float | None:
        fresh.append(True)
        return _permutation_gap(inner, sym, params)

    gap = _GAPS.get((_probe.tx_key(inner), _probe.spec_key(params)), compute)
    if fresh and gap is not None and gap > EQUIVARIANCE_RTOL:
        warnings.warn(
            f"{who}: its inner optimizer ({name(inner)}) does not commute with the "
            f"symmetry's permutations: on synthetic data permuted by a symmetry element, its "
            f"update differs from the permuted update by {gap:.2g} (relative), beyond "
            f"rounding ({EQUIVARIANCE_RTOL:g}). The exact-equivariance claim covers inner "
            "optimizers that commute with them (every elementwise optax optimizer, and LAMB, "
            "LARS and Muon); noise drawn by position (optax.noisy_sgd, a Hutchinson "
            "estimate), per-index settings or blocks that cut across units do not.",
            NotEquivariantWarning, stacklevel=4)
    return gap
