r"""Moving an inner optimizer's state along with the parameters.

When a wrapper moves the parameters along a symmetry orbit,
:math:`\theta \to g\cdot\theta` (``sym.act(params, g)``), the inner optimizer's
statistics must move too: the transported state should be the state the
optimizer would hold had it seen the whole history in the new coordinates
(the *replay* property). Under a rescaling :math:`\theta_i \to c_i\theta_i` a
gradient transforms as a covector,

.. math::

   \frac{\partial L}{\partial \theta_i} \;\to\; c_i^{-1}\,\frac{\partial L}{\partial \theta_i},

so a statistic homogeneous of degree :math:`k` in the gradient history moves as
:math:`c_i^{-k}`, i.e. by ``sym.act(stat, g, power=-k)``; every statistic is
permuted like the parameters.

Laws
----
A *law* is an integer power ``p`` (the params-shaped field is moved by
``sym.act(field, g, power=p)``) or ``None`` (not params-shaped: counts,
scalars, hyperparameters, PRNG keys; left alone). Laws are looked up in a
registry keyed by the state's **type and field**, never guessed from a field's
name:

* ``+1``: params-like (iterates, anchor points);
* ``-1``: gradient-like (first moments, accumulated gradients, infinity norms
  :math:`\max|g|`);
* ``-2``: squared gradients (second moments, diagonal curvature);
* ``0``: scale-free (statistics of normalized updates, sign-driven step sizes):
  permuted only;
* ``+2``: squared params-like quantities (no optax state as shipped; available
  as a user law).

**The stream.** A transformation in a chain does not see gradients but the
output of the transformations before it: ``optax.sgd(lr, momentum=0.9)`` keeps
a ``TraceState`` of raw gradients (power ``-1``) while
``optax.rmsprop(lr, momentum=0.9)`` keeps the same ``TraceState`` of
RMS-normalized updates (power ``0``). So the registry states the law of a
statistic of the incoming updates relative to their power :math:`q` (``q`` for
a first moment, ``2q`` for a second) and the power of each transformation's
output; the walk starts at :math:`q=-1` (gradients) and carries :math:`q`
through chains (tuples, and the dicts of ``optax.named_chain``). A state that
holds no params-shaped data (``EmptyState``: learning rates, sign flips,
weight decay, clipping, trust ratios) is assumed to pass :math:`q` through
unchanged.

**The catalogue.** The law of every field of every registered state type
(optax, optax.contrib and the library's wrappers), the fields refused, the
state type shared by optimizers with different laws (adam's, adamax's and
adopt's ``ScaleByAdamState``) and the limits of the laws are listed on the
documentation page *Optimizer-state laws* (``docs/state_laws.md``), which
``tests/test_state_laws_page.py`` checks against this module's registry in
both directions. A wrapper of one's own registers its state with
:func:`register_wrapper_state`.

References:
  Kingma, Ba. *Adam: A Method for Stochastic Optimization*, 2014.
  https://arxiv.org/abs/1412.6980

  Neyshabur, Salakhutdinov, Srebro. *Path-SGD*, 2015.
  https://arxiv.org/abs/1506.02617
"""

from __future__ import annotations

import dataclasses
import functools
import types
from collections.abc import Callable, Mapping
from typing import Any, Literal

import jax
import jax.numpy as jnp
import numpy as np
import optax

from quotient_opt.transforms import _probe

MaskedNode = optax.MaskedNode

PyTree = Any
Kind = Literal["first", "second"]
#: A law: an integer power, or ``None`` for "leave alone".
Law = int | None
#: Keys of user laws: a field name (any state type) or ``(StateType, field)``.
LawKey = str | tuple[type, str]
Laws = Mapping[LawKey, Law]

__all__ = [
    "ADAMAX_LAWS",
    "ADOPT_LAWS",
    "check_transportable",
    "map_param_like",
    "map_state",
    "measure_laws",
    "register_wrapper_state",
    "transport_state",
]

#: Laws for ``optax.adamax`` / ``optax.adamaxw``: ``nu`` holds an EMA-max of :math:`|g|`.
#: Superseded: pass ``tx=`` (the wrappers always do) and the laws are measured.
ADAMAX_LAWS: Laws = types.MappingProxyType(
    {(optax.ScaleByAdamState, "mu"): -1, (optax.ScaleByAdamState, "nu"): -1})
#: Laws for ``optax.contrib.adopt``: ``mu`` holds an EMA of normalized updates.
#: Superseded: pass ``tx=`` (the wrappers always do) and the laws are measured.
ADOPT_LAWS: Laws = types.MappingProxyType(
    {(optax.ScaleByAdamState, "mu"): 0, (optax.ScaleByAdamState, "nu"): -2})

#: Factor of the probe's uniform rescaling: parameters × c, gradients ÷ c.
PROBE_SCALE = 1.75
#: Largest deviation of a field from ``c**p`` times itself (max norm, relative, per
#: leaf) that still counts as moving by the power ``p``.
PROBE_RTOL = 1e-3


# --------------------------------------------------------------------------- registry


@dataclasses.dataclass(frozen=True)
class _Power:
    """Power ``stream * q + fixed``, ``q`` the power of the incoming updates."""

    stream: int = 0
    fixed: int = 0
    placeholders: bool = False  # shape-(1,) leaves stand for absent entries (Adafactor)
    shared: str = ""  # the type is shared by optimizers with other laws: why (refused without tx)


@dataclasses.dataclass(frozen=True)
class _Keep:
    """Not params-shaped: left alone."""


@dataclasses.dataclass(frozen=True)
class _Inner:
    """An inner state (or a dict of them, ``parallel``) seeing the same stream."""

    parallel: bool = False


@dataclasses.dataclass(frozen=True)
class _Refuse:
    """Cannot be transported (``when(value, params)`` decides, default always)."""

    reason: str
    when: Callable[[Any, Any], bool] | None = None


_RegLaw = _Power | _Keep | _Inner | _Refuse
Q = int | None  # power of the stream; None: unknown


def _same(q: Q, inner: Q) -> Q:
    return q


def _zero(q: Q, inner: Q) -> Q:
    return 0


def _unknown(q: Q, inner: Q) -> Q:
    return None


def _inner_out(q: Q, inner: Q) -> Q:
    return inner


def _same_if_inner_same(q: Q, inner: Q) -> Q:
    # a masked / conditional inner: the stream stays homogeneous only if the
    # inner transformation keeps its power
    return q if inner == q else None


@dataclasses.dataclass(frozen=True)
class _Entry:
    fields: Mapping[str, _RegLaw]
    out: Callable[[Q, Q], Q] = _same
    opaque: bool = False  # holds nothing that says what it does to the stream


M1, M2 = _Power(1), _Power(2)  # first and second moments of the stream
KEEP, INNER = _Keep(), _Inner()
_ADAM_SHARED = (
    "optax keeps this state type for adam, adamw, nadam, radam, lamb and yogi (mu: -1, "
    "nu: -2), for adamax (nu: an EMA-max of |g|, -1) and for contrib adopt (mu: an EMA of "
    "normalized updates, 0), and nothing in the state tells them apart. Pass tx=the "
    "optimizer so that its laws are measured, or laws=quotient_opt.ADAMAX_LAWS, "
    "quotient_opt.ADOPT_LAWS or, for adam, {(optax.ScaleByAdamState, 'mu'): -1, "
    "(optax.ScaleByAdamState, 'nu'): -2}"
)


def _factored(value: PyTree, params: PyTree) -> bool:
    """Whether some leaf of a FactoredState ``v_row``/``v_col`` holds real statistics."""
    return any(np.shape(x) != (1,) for x in jax.tree.leaves(value))


def _optional(module: Any, name: str) -> type | None:
    return getattr(module, name, None)


def _registry() -> dict[type, _Entry]:
    """The laws of every registered state type: optax's, then the wrappers'."""
    return {**_optax_registry(), **_WRAPPERS}


@functools.cache
def _optax_registry() -> dict[type, _Entry]:
    """The laws of optax's and optax.contrib's state types (built on first use)."""
    from optax._src import transform as tr
    from optax.transforms import _conditionality

    try:
        from optax import contrib
    except ImportError:  # pragma: no cover
        contrib = None

    table: dict[type | None, _Entry] = {
        optax.EmptyState: _Entry({}, opaque=True),
        # ------------------------------------------------------- accumulators
        optax.TraceState: _Entry({"trace": M1}),
        optax.EmaState: _Entry({"count": KEEP, "ema": M1}),
        _optional(tr, "ApplyEvery"): _Entry({"count": KEEP, "grad_acc": M1}),
        optax.ScaleByScheduleState: _Entry({"count": KEEP}),
        # ------------------------------------------------------- adaptive
        optax.ScaleByAdamState: _Entry(
            {
                "count": KEEP,
                "mu": _Power(1, shared=_ADAM_SHARED),
                "nu": _Power(2, shared=_ADAM_SHARED),
            },
            _zero,
        ),
        optax.ScaleByAmsgradState: _Entry({"count": KEEP, "mu": M1, "nu": M2, "nu_max": M2}, _zero),
        optax.ScaleByRssState: _Entry({"sum_of_squares": M2}, _zero),
        optax.ScaleByRmsState: _Entry({"nu": M2}, _zero),
        _optional(tr, "ScaleByRmsWithCountState"): _Entry({"count": KEEP, "nu": M2}, _zero),
        optax.ScaleByRStdDevState: _Entry({"mu": M1, "nu": M2}, _zero),
        _optional(tr, "ScaleByRStdDevWithCountState"): _Entry(
            {"count": KEEP, "mu": M1, "nu": M2}, _zero
        ),
        optax.ScaleByAdaDeltaState: _Entry({"e_g": M2, "e_x": _Power(0)}, _zero),
        optax.ScaleByBeliefState: _Entry({"count": KEEP, "mu": M1, "nu": M2}, _zero),
        optax.ScaleByLionState: _Entry({"count": KEEP, "mu": M1}, _zero),
        optax.ScaleByAdanState: _Entry({"m": M1, "v": M1, "n": M2, "g": M1, "t": KEEP}, _zero),
        optax.ScaleByRpropState: _Entry(
            {"step_sizes": _Power(0), "prev_updates": _Power(0)}, _zero
        ),
        _optional(tr, "ScaleByOptimisticGradientState"): _Entry(
            {"is_initial_step": KEEP, "previous_gradient": M1}
        ),
        optax.FactoredState: _Entry(
            {
                "count": KEEP,
                "v": _Power(2, placeholders=True),
                "v_row": _Refuse(
                    "factored second moments (row means of g^2) mix units a rescaling "
                    "scales differently",
                    _factored,
                ),
                "v_col": _Refuse(
                    "factored second moments (column means of g^2) mix units a rescaling "
                    "scales differently",
                    _factored,
                ),
            },
            _zero,
        ),
        # ------------------------------------------------------- refused (optax)
        optax.ScaleBySM3State: _Entry(
            {
                "mu": _Refuse("SM3's per-axis max accumulators are not elementwise"),
                "nu": _Refuse("SM3's momentum of updates normalized by per-axis accumulators"),
            },
            _unknown,
        ),
        optax.ScaleByNovogradState: _Entry(
            {
                "count": KEEP,
                "mu": _Refuse("novograd's momentum of updates normalized by per-leaf norms"),
                "nu": _Refuse("novograd's per-leaf squared gradient norms are not elementwise"),
            },
            _unknown,
        ),
        _optional(tr, "ScaleByDistanceOverGradientsState"): _Entry(
            {
                "max_dist": _Refuse("per-leaf distances travelled are not elementwise"),
                "grad_sum_of_squares": _Refuse("per-leaf gradient norms are not elementwise"),
                "init_params": _Power(0, 1),
            },
            _unknown,
        ),
        optax.ScaleByLBFGSState: _Entry(
            {
                "count": KEEP,
                **{
                    f: _Refuse("L-BFGS curvature memory (stacked pairs) is not supported")
                    for f in (
                        "params",
                        "updates",
                        "diff_params_memory",
                        "diff_updates_memory",
                        "weights_memory",
                    )
                },
            },
            _unknown,
        ),
        # ------------------------------------------------------- wrappers
        optax.MultiStepsState: _Entry(
            {
                "mini_step": KEEP,
                "gradient_step": KEEP,
                "inner_opt_state": INNER,
                "acc_grads": M1,
                "skip_state": KEEP,
            },
            _inner_out,
        ),
        optax.InjectHyperparamsState: _Entry(
            {"count": KEEP, "hyperparams": KEEP, "inner_state": INNER}, _inner_out
        ),
        optax.InjectStatefulHyperparamsState: _Entry(
            {
                "count": KEEP,
                "hyperparams": KEEP,
                "hyperparams_states": KEEP,
                "inner_state": INNER,
            },
            _inner_out,
        ),
        optax.MaskedState: _Entry({"inner_state": INNER}, _same_if_inner_same),
        optax.PartitionState: _Entry({"inner_states": _Inner(parallel=True)}, _inner_out),
        optax.ApplyIfFiniteState: _Entry(
            {
                "notfinite_count": KEEP,
                "last_finite": KEEP,
                "total_notfinite": KEEP,
                "inner_state": INNER,
            },
            _inner_out,
        ),
        _conditionality.ConditionallyTransformState: _Entry(
            {"inner_state": INNER, "step": KEEP}, _same_if_inner_same
        ),
        _conditionality.ConditionallyMaskState: _Entry(
            {"step": KEEP, "inner_state": INNER}, _inner_out
        ),
    }
    if contrib is not None:
        c = functools.partial(_optional, contrib)
        table.update(
            {
                c("ScaleByAdemamixState"): _Entry(
                    {"count": KEEP, "count_m2": KEEP, "m1": M1, "m2": M1, "nu": M2}, _zero
                ),
                c("ScaleBySimplifiedAdEMAMixState"): _Entry({"t": KEEP, "m": M1, "n": M2}, _zero),
                c("MuonState"): _Entry({"count": KEEP, "mu": M1, "ns_coeffs": KEEP}, _unknown),
                c("SophiaState"): _Entry(
                    {"count": KEEP, "mu": M1, "nu": _Power(0, -2), "hessian_fn_state": INNER},
                    _unknown,
                ),
                c("HutchinsonState"): _Entry({"key": KEEP}),
                c("ScheduleFreeState"): _Entry(
                    {
                        "b1": KEEP,
                        "weight_sum": KEEP,
                        "step_count": KEEP,
                        "max_lr": KEEP,
                        "base_optimizer_state": INNER,
                        "z": _Power(0, 1),
                    },
                    _unknown,
                ),
                c("MadgradState"): _Entry(
                    {"count": KEEP, "grad_sum_sq": M2, "s": M1, "x0": _Power(0, 1)}, _unknown
                ),
                c("COCOBState"): _Entry(
                    {
                        "init_particles": _Power(0, 1),
                        "cumulative_gradients": M1,
                        "scale": M1,
                        "subgradients": M1,
                        "reward": _Power(1, 1),
                    },
                    _unknown,
                ),
                c("MomoState"): _Entry(
                    {"exp_avg": M1, "barf": KEEP, "gamma": KEEP, "lb": KEEP, "count": KEEP},
                    _unknown,
                ),
                c("MomoAdamState"): _Entry(
                    {
                        "exp_avg": M1,
                        "exp_avg_sq": M2,
                        "barf": KEEP,
                        "gamma": KEEP,
                        "lb": KEEP,
                        "count": KEEP,
                    },
                    _unknown,
                ),
                # ------------------------------------------- refused (contrib)
                c("DAdaptAdamWState"): _refused_entry(
                    c("DAdaptAdamWState"),
                    "D-Adaptation weights its moments by a step-size estimate built from the "
                    "L1 norm of a gradient sum",
                ),
                c("ProdigyState"): _refused_entry(
                    c("ProdigyState"),
                    "Prodigy weights its moments by a step-size estimate built from the L1 "
                    "norm of a gradient sum",
                    params0=_Power(0, 1),
                ),
                c("MechanicState"): _refused_entry(
                    c("MechanicState"),
                    "Mechanic's scale is learned from global gradient and parameter norms",
                    base_optimizer_state=INNER,
                ),
                c("DoGState"): _refused_entry(
                    c("DoGState"),
                    "DoG's step size uses global distance and gradient norms",
                    is_init_step=KEEP,
                    init_params=_Power(0, 1),
                ),
                c("DoWGState"): _refused_entry(
                    c("DoWGState"),
                    "DoWG's step size uses global distance and gradient norms",
                    init_params=_Power(0, 1),
                ),
                c("GaLoreState"): _Entry(
                    {
                        "count": KEEP,
                        "projector": _Refuse("GaLore's SVD projectors are not elementwise"),
                        "base_optimizer_state": _Refuse(
                            "GaLore's inner state lives in the projected space"
                        ),
                    },
                    _unknown,
                ),
            }
        )

    table.pop(None, None)
    return table  # type: ignore[return-value]


def _refused_entry(typ: type | None, reason: str, **laws: _RegLaw) -> _Entry:
    """Every field of ``typ`` refused for ``reason`` but ``count`` and those in ``laws``."""
    if typ is None:
        return _Entry({})
    fields: dict[str, _RegLaw] = {f: _Refuse(reason) for f in typ._fields}
    if "count" in fields:
        fields["count"] = KEEP
    fields.update(laws)
    return _Entry(fields, _unknown)


#: state types registered by :func:`register_wrapper_state` (the library's wrappers register
#: theirs when their modules are imported)
_WRAPPERS: dict[type, _Entry] = {}


def register_wrapper_state(state_type: type, *, inner: str = "inner_state") -> type:
    """Registers a wrapper optimizer's state: its ``inner`` field is walked, the rest left alone.

    A wrapper's state holds the wrapped optimizer's state in one field (it sees
    the gradients) and scalars in the others (counts, group elements, keys):
    :func:`map_state` and :func:`transport_state` then move the inner state and
    leave the other fields alone; the power of the wrapper's output is unknown.
    :func:`~quotient_opt.rebalance`, :func:`~quotient_opt.teleport` and
    :func:`~quotient_opt.revive_dead_units` register theirs this way.

    Args:
      state_type: a ``NamedTuple`` class.
      inner: the field holding the inner optimizer's state.

    Returns:
      ``state_type`` (so that this can decorate the class).

    Raises:
      ValueError: if ``state_type`` is not a ``NamedTuple`` class with a field ``inner``.
    """
    fields = getattr(state_type, "_fields", None)
    if not isinstance(state_type, type) or fields is None or inner not in fields:
        raise ValueError(
            f"state_type: expected a NamedTuple class with a field {inner!r}, got {state_type!r}"
        )
    _WRAPPERS[state_type] = _Entry({f: (INNER if f == inner else KEEP) for f in fields}, _unknown)
    return state_type


# --------------------------------------------------------------------------- user laws


def _check_laws(laws: Laws | None) -> dict[LawKey, Law]:
    if laws is None:
        return {}
    if not isinstance(laws, Mapping):
        raise TypeError(f"laws: expected a mapping, got {type(laws).__name__}")
    out: dict[LawKey, Law] = {}
    for key, law in laws.items():
        if isinstance(key, tuple):
            if len(key) != 2 or not isinstance(key[0], type) or not isinstance(key[1], str):
                raise TypeError(
                    f"laws: key {key!r} must be a field name or a (StateType, 'field') pair"
                )
            fields = getattr(key[0], "_fields", None)
            if fields is not None and key[1] not in fields:
                raise ValueError(
                    f"laws: {key[0].__name__} has no field {key[1]!r} (fields: {fields})"
                )
        elif not isinstance(key, str):
            raise TypeError(
                f"laws: key {key!r} must be a field name or a (StateType, 'field') pair"
            )
        if law is not None and (isinstance(law, bool) or not isinstance(law, (int, np.integer))):
            raise TypeError(f"laws[{key!r}]: expected an integer power or None, got {law!r}")
        out[key] = None if law is None else int(law)
    return out


# --------------------------------------------------------------------------- the walk


def _is_mask(x: Any) -> bool:
    return isinstance(x, MaskedNode)


def _is_namedtuple(x: Any) -> bool:
    return isinstance(x, tuple) and hasattr(x, "_fields")


def _is_leaf(x: Any) -> bool:
    return isinstance(x, (jax.Array, np.ndarray, np.generic, int, float, complex, bool, str)) or (
        hasattr(x, "shape") and hasattr(x, "dtype")
    )


_NO_LAW = object()


def _zeros(p: Any) -> jax.Array:
    # works for arrays, tracers and jax.ShapeDtypeStruct (abstract states)
    return jnp.zeros(np.shape(p), p.dtype)


class _Walker:
    """One walk of a state: applies ``fn(power, subtree, where)`` to params-shaped fields."""

    def __init__(
        self,
        fn: Callable[[int, PyTree, str], PyTree],
        params: PyTree,
        laws: Laws | None,
        measured: Measured | None = None,
        *,
        strict: bool = True,
    ) -> None:
        self.fn = fn
        self.params = params
        self.user = _check_laws(laws)
        self.table = _registry()
        self.n_param_leaves = len(jax.tree.leaves(params))
        self.visits: list[tuple[str, int]] = []
        self.paths: list[str] = []
        self.given: list[bool] = []  # per visit: the law came from the user
        # measured laws by path (None: no tx, or a tx that could not be probed)
        self.measured = measured
        self.verdicts = None if measured is None else measured.fields
        self.strict = strict
        self._given_now = False

    # ------------------------------------------------------------ params-shaped trees

    def _pairs(self, x: PyTree) -> list[tuple[Any, Any]] | None:
        """``(leaf of x, matching params subtree)`` pairs if x has params' structure.

        ``MaskedNode`` leaves of ``x`` may stand for whole params subtrees; any
        other leaf of ``x`` must sit where params has a leaf.
        """
        if x is None or _is_mask(x):
            return None
        try:
            x_leaves, x_def = jax.tree.flatten(x, is_leaf=_is_mask)
            subtrees = x_def.flatten_up_to(self.params)
        except (ValueError, TypeError):
            return None
        pairs = []
        for a, p in zip(x_leaves, subtrees):
            if not _is_mask(a) and not jax.tree_util.treedef_is_leaf(jax.tree.structure(p)):
                return None
            pairs.append((a, p))
        return pairs

    def holds_params(self, x: PyTree) -> bool:
        """Whether ``x`` is a params-structured tree with some data (any leaf shapes).

        Per-leaf scalars count (e.g. per-leaf norms) when params have several leaves.
        """
        pairs = self._pairs(x)
        if pairs is None:
            return False
        data = [(a, p) for a, p in pairs if not _is_mask(a)]
        if not data:
            return False
        return self.n_param_leaves > 1 or any(np.shape(a) == np.shape(p) for a, p in data)

    def _full(self, x: PyTree, placeholders: bool) -> tuple[PyTree, Callable] | None:
        """``x`` as a params-shaped tree (placeholders filled with zeros) and its inverse."""
        pairs = self._pairs(x)
        if pairs is None:
            return None
        x_def = jax.tree.structure(x, is_leaf=_is_mask)
        filled, absent = [], []
        for a, p in pairs:
            if _is_mask(a):
                filled.append(jax.tree.map(_zeros, p))
                absent.append(True)
            elif np.shape(a) == np.shape(p):
                filled.append(a)
                absent.append(False)
            elif placeholders and np.shape(a) == (1,):
                filled.append(_zeros(p))
                absent.append(True)
            else:
                return None
        full = jax.tree.unflatten(x_def, filled)
        if jax.tree.structure(full) != jax.tree.structure(self.params):
            return None
        x_leaves = [a for a, _ in pairs]

        def restore(result: PyTree) -> PyTree:
            parts = x_def.flatten_up_to(result)
            return jax.tree.unflatten(
                x_def, [a if gone else r for a, r, gone in zip(x_leaves, parts, absent)]
            )

        return full, restore

    # ------------------------------------------------------------ laws

    def _law(self, typ: type, field: str, entry: _Entry | None) -> Any:
        if (typ, field) in self.user:
            return self.user[(typ, field)]
        if field in self.user:
            return self.user[field]
        if entry is not None and field in entry.fields:
            return entry.fields[field]
        return _NO_LAW

    def _apply(self, power: int, value: PyTree, where: str, placeholders: bool = False,
               path: str = "") -> PyTree:
        if value is None or _is_mask(value):
            return value
        got = self._full(value, placeholders)
        if got is None:
            raise ValueError(
                f"{where}: its law (power {power}) needs a params-shaped tree (the "
                f"structure and leaf shapes of params), got {_describe(value)}"
            )
        full, restore = got
        self.visits.append((where, power))
        self.paths.append(path)
        self.given.append(self._given_now)
        return restore(self.fn(power, full, where))

    def _verdict(self, path: str) -> Verdict | None:
        """The probe's verdict on the field at ``path`` (None: not probed, or it stayed
        zero on the probe's data, e.g. a momentum after a learning rate of 0: the
        registry's law then applies)."""
        if self.verdicts is None:
            return None
        verdict = self.verdicts.get(path)
        return None if verdict is not None and verdict.reason in _UNMEASURED else verdict

    def _not_probed(self) -> str:
        """Why the table is used: no tx, or a tx the probe could not run."""
        if self.measured is None:
            return "pass tx=the optimizer so that its law is measured, or laws="
        return (f"tx could not be probed ({self.measured.error}); pass "
                "laws=")

    def _unverified(self, where: str, verdict: Verdict, name: str, field: str) -> ValueError:
        return ValueError(
            f"cannot transport {where}: measured on the optimizer (parameters x "
            f"{PROBE_SCALE} and gradients / {PROBE_SCALE}, a few steps), this field "
            f"{verdict.reason}. To move it anyway, pass laws={{({name}, {field!r}): power}} "
            "(+1 params-like, -1 gradient-like, -2 squared gradients, 0 scale-free) or None "
            "to leave it unchanged."
        )

    # ------------------------------------------------------------ walk

    def walk(self, node: PyTree, q: Q, path: str) -> tuple[PyTree, Q]:
        """Returns the mapped node and the power of the transformation's output."""
        if node is None or _is_mask(node):
            return node, q
        if self.holds_params(node):
            verdict = self._verdict(path)
            if verdict is not None and verdict.power is not None:
                self._given_now = False
                return self._apply(verdict.power, node, path, path=path), None
            raise ValueError(
                f"{path}: params-shaped data that is not a field of a registered state "
                f"NamedTuple ({type(node).__name__}); wrap it in a NamedTuple and pass "
                "laws={(StateType, 'field'): power}"
                + ("" if verdict is None else f" (measured on tx: it {verdict.reason})")
            )
        if _is_leaf(node):
            return node, q
        if _is_namedtuple(node):
            return self._namedtuple(node, q, path)
        if isinstance(node, (tuple, list)):  # optax.chain: in sequence
            items = []
            for i, v in enumerate(node):
                v, q = self.walk(v, q, f"{path}[{i}]")
                items.append(v)
            return type(node)(items), q
        if isinstance(node, dict):  # optax.named_chain: in sequence
            out = {}
            for k, v in node.items():
                out[k], q = self.walk(v, q, f"{path}[{k!r}]")
            return type(node)(out) if type(node) is not dict else out, q
        # any other pytree node: fine if it holds nothing params-shaped
        inside = jax.tree.leaves(node, is_leaf=self.holds_params)
        if any(self.holds_params(x) for x in inside):
            raise ValueError(
                f"{path}: a {type(node).__name__} holding params-shaped data; only "
                "NamedTuple states can be given laws"
            )
        return node, q

    def _namedtuple(self, node: tuple, q: Q, path: str) -> tuple[PyTree, Q]:
        typ = type(node)
        name = typ.__name__
        entry = self.table.get(typ)
        values = {}
        inner_q: Q = q
        n_visits = len(self.visits)
        for field, value in zip(node._fields, node):
            here = f"{path}.{field}"
            where = f"{name}.{field} (at {here})"
            law = self._law(typ, field, entry)
            user = (typ, field) in self.user or field in self.user
            self._given_now = user
            verdict = None if user or isinstance(law, _Refuse) else self._verdict(here)
            if verdict is not None:  # measured on the optimizer: its law, or a refusal
                if verdict.power is not None:
                    placeholders = isinstance(law, _Power) and law.placeholders
                    values[field] = self._apply(verdict.power, value, where, placeholders, here)
                    continue
                if self.strict or law is _NO_LAW:
                    raise self._unverified(where, verdict, name, field)
            if law is _NO_LAW:
                if self.holds_params(value):
                    what = (
                        "an unregistered state type" if entry is None else "a field without a law"
                    )
                    raise ValueError(
                        f"cannot transport {where}: {what} holding params-structured data. "
                        f"Pass tx=the optimizer (its laws are then measured), or "
                        f"laws={{({name}, {field!r}): power}} (+1 params-like, -1 "
                        "gradient-like, -2 squared gradients, 0 scale-free) or None to "
                        "leave it unchanged."
                    )
                value, _ = self.walk(value, q, here)
            elif law is None or isinstance(law, _Keep):
                pass
            elif isinstance(law, int):
                value = self._apply(law, value, where, path=here)
            elif isinstance(law, _Power):
                if law.shared and self.strict and self.holds_params(value):
                    why = ("" if self.measured is None else
                           f" (tx could not be probed: {self.measured.error})"
                           if self.verdicts is None else
                           f" (tx was probed, but this field "
                           f"{self.verdicts.get(here, Verdict(None, ZERO)).reason})")
                    raise ValueError(f"cannot transport {where}: {law.shared}{why}.")
                if law.stream and q is None:
                    raise ValueError(
                        f"cannot transport {where}: it is a statistic of the updates it "
                        "receives, and a transformation before it (a stateless one such as "
                        "clipping or weight decay, whose state does not say what it did; "
                        "schedule_free, muon, a masked or conditional inner optimizer, or an "
                        "unregistered state) makes their transformation law unknown; "
                        f"{self._not_probed()}{{({name}, {field!r}): power}}."
                    )
                power = law.stream * (q or 0) + law.fixed
                value = self._apply(power, value, where, law.placeholders, here)
            elif isinstance(law, _Inner):
                if law.parallel and isinstance(value, Mapping):
                    outs = {}
                    qs = []
                    for k, v in value.items():
                        outs[k], qk = self.walk(v, q, f"{here}[{k!r}]")
                        qs.append(qk)
                    value = type(value)(outs) if type(value) is not dict else outs
                    inner_q = qs[0] if len(set(qs)) == 1 else (q if not qs else None)
                else:
                    value, inner_q = self.walk(value, q, here)
            elif isinstance(law, _Refuse):
                if law.when is None or law.when(value, self.params):
                    raise ValueError(
                        f"cannot transport {where}: {law.reason}. To leave it unchanged "
                        f"anyway (the transported state is then not the replayed one), pass "
                        f"laws={{({name}, {field!r}): None}}."
                    )
            else:  # pragma: no cover
                raise TypeError(f"bad law {law!r} for {where}")
            values[field] = value
        new = typ(**values)
        # without measured laws, a state that says nothing about what its transformation
        # does (EmptyState, unregistered types) leaves the stream's law unknown when strict
        opaque = self.strict and self.verdicts is None
        if entry is None:
            moved_nothing = len(self.visits) == n_visits
            return new, (q if moved_nothing and not opaque else None)
        if entry.opaque and opaque:
            return new, None
        return new, entry.out(q, inner_q)


def _describe(x: PyTree) -> str:
    leaves = jax.tree.leaves(x, is_leaf=_is_mask)
    shapes = [("masked" if _is_mask(a) else tuple(np.shape(a))) for a in leaves[:4]]
    more = "" if len(leaves) <= 4 else f", ... ({len(leaves)} leaves)"
    return f"a {type(x).__name__} with leaf shapes {shapes}{more}"


# --------------------------------------------------------------------------- measured laws


@dataclasses.dataclass(frozen=True)
class Verdict:
    """The probe's finding on one params-shaped state field.

    Attributes:
      power: the law it moves by (``c**power`` when parameters are scaled by
        ``c``), or ``None`` when no power describes it.
      reason: why not (a sentence fragment: "is not homogeneous: ...").
    """

    power: int | None
    reason: str = ""


@dataclasses.dataclass(frozen=True)
class Measured:
    """What :func:`measure_laws` found: a :class:`Verdict` per field path (``None``
    when the optimizer could not be probed, ``error`` saying why) and the
    structure of the probe's state (to match the state it is applied to)."""

    fields: Mapping[str, Verdict] | None
    error: str = ""
    structure: Any = None


def _fields(node: PyTree, path: str, holds: Callable[[PyTree], bool]) -> list[tuple[str, PyTree]]:
    """``(path, value)`` of every params-structured node, with the walk's paths."""
    if node is None or _is_mask(node) or _is_leaf(node):
        return []
    if holds(node):
        return [(path, node)]
    if _is_namedtuple(node):
        items = [(f"{path}.{f}", v) for f, v in zip(node._fields, node)]
    elif isinstance(node, (tuple, list)):
        items = [(f"{path}[{i}]", v) for i, v in enumerate(node)]
    elif isinstance(node, Mapping):
        items = [(f"{path}[{k!r}]", v) for k, v in node.items()]
    else:
        return []
    return [x for p, v in items for x in _fields(v, p, holds)]


def _leaf_index(value: PyTree, params_def: Any) -> list[tuple[Any, int | None]]:
    """``(leaf of value, index of the params leaf it stands for)``; masked leaves get None."""
    leaves, vdef = jax.tree.flatten(value, is_leaf=_is_mask)
    index = jax.tree.unflatten(params_def, list(range(params_def.num_leaves)))
    subtrees = vdef.flatten_up_to(index)
    return [(a, None if _is_mask(a) else sub) for a, sub in zip(leaves, subtrees)]


def _judge(steps0: list[PyTree], steps1: list[PyTree], params_def: Any,
           shapes: list[tuple], kept: list[np.ndarray]) -> Verdict:
    """The law of one field from its values in the two probe runs (one list per run).

    The deviation from ``c**p`` is measured per leaf relative to the leaf's
    largest entry over the run (as the replay tests do), so a constant start
    such as cocob's ``eps`` does not count where the statistics dwarf it.
    """
    c = PROBE_SCALE
    leaves: dict[int, list[tuple[np.ndarray, np.ndarray]]] = {}  # per leaf, over steps
    for v0, v1 in zip(steps0, steps1):
        for k, ((a, i), (b, _)) in enumerate(
                zip(_leaf_index(v0, params_def), _leaf_index(v1, params_def))):
            if i is None:
                continue
            if _probe.traced((a, b)):
                return Verdict(None, TRACED)
            a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
            if not (np.isfinite(a).all() and np.isfinite(b).all()):
                return Verdict(None, "turns non-finite on the probe's data")
            if a.shape != shapes[i]:
                if not np.array_equal(a, b):
                    return Verdict(None, (
                        f"holds entries of shape {a.shape} for a parameter of shape "
                        f"{shapes[i]} that change when the parameters are rescaled: no "
                        "elementwise law can move them"))
                continue
            leaves.setdefault(k, []).append((a[kept[i]], b[kept[i]]))
    pairs = [ab for steps in leaves.values() for ab in steps]
    if not pairs:
        return Verdict(None, "holds no entries of the parameters' shapes that change")
    big = max(pairs, key=lambda ab: np.abs(ab[0]).max(initial=0.0), default=None)
    if big is None or not np.abs(big[0]).max(initial=0.0) > 0:
        if any(np.abs(b).max(initial=0.0) > 0 for _, b in pairs):
            return Verdict(None, "is zero on the probe's data but not once it is rescaled")
        return Verdict(None, ZERO)
    j = int(np.argmax(np.abs(big[0])))
    ratio = big[1][j] / big[0][j]
    if not ratio > 0:
        return Verdict(None, f"changes by a factor {ratio:.3g}: no power c**p is negative")
    x = float(np.log(ratio) / np.log(c))
    power = round(x)
    if abs(x - power) > 0.1:
        return Verdict(None, f"changes by a factor {ratio:.4g} = c**{x:.2f}: no integer power")
    err = 0.0
    for steps in leaves.values():
        scale = max(np.abs(a).max(initial=0.0) for a, _ in steps)
        dev = max(np.abs(b - c**power * a).max(initial=0.0) for a, b in steps)
        err = max(err, dev / (c**power * scale) if scale > 0 else (np.inf if dev > 0 else 0.0))
    if not err <= PROBE_RTOL:
        return Verdict(None, (
            f"is not homogeneous: it moves by c**{power} only up to a relative {err:.2g} "
            f"(tolerance {PROBE_RTOL:g}), so no law moves it exactly (an eps or an initial "
            "value inside its update, weight decay or another params-like term mixed into "
            "the updates it accumulates, or a norm over many entries, such as clipping, "
            "does that)"))
    return Verdict(power)


def _measure(tx: Any, params: PyTree, steps: int = _probe.STEPS) -> Measured:
    data = _probe.make_data(params, steps=steps)
    shapes = [np.shape(x) for x in data.thetas[0]]
    rng = np.random.default_rng(1)
    # half the entries get other values in the rescaled run: an elementwise field keeps
    # c**p times its values on the other half; one that mixes entries does not
    kept = [rng.random(sh) < 0.5 for sh in shapes]

    def rescaled(leaves: list[np.ndarray], factor: float, fresh: Callable) -> list[np.ndarray]:
        return [np.where(k, (x * factor).astype(x.dtype), fresh(x.shape, x.dtype))
                for x, k in zip(leaves, kept)]

    thetas = [rescaled(t, PROBE_SCALE, lambda sh, dt: rng.standard_normal(sh).astype(dt))
              for t in data.thetas]
    grads = [rescaled(g, 1 / PROBE_SCALE, lambda sh, dt: _probe.gradient_like(rng, sh, dt))
             for g in data.grads]
    try:
        base = _probe.run(tx, data)
        moved = _probe.run(tx, data, thetas, grads)
    except _probe.ProbeError as err:
        return Measured(None, str(err))
    probe_params = jax.tree.unflatten(data.treedef, data.thetas[0])
    holds = _Walker(lambda p, t, w: t, probe_params, None).holds_params
    runs = [[dict(_fields(st, "state", holds)) for st in r.states] for r in (base, moved)]
    verdicts = {
        path: _judge([f[path] for f in runs[0]], [f[path] for f in runs[1]], data.treedef,
                     shapes, kept)
        for path in runs[0][0]
    }
    if steps < _probe.MAX_STEPS and any(v.reason == ZERO for v in verdicts.values()):
        # e.g. the inner optimizer of MultiSteps, updated every k steps only
        return _measure(tx, params, _probe.MAX_STEPS)
    return Measured(verdicts, structure=jax.tree.structure(base.states[0], is_leaf=_is_mask))


_MEASURED = _probe.Cache()
ZERO = "stays zero on the probe's data, so its law cannot be measured"
TRACED = "depends on a value traced by an outer jit or vmap, so its law cannot be measured"
_UNMEASURED = (ZERO, TRACED)  # the registry's law applies to these


def measure_laws(tx: Any, params: PyTree) -> Measured:
    r"""Measures the transport law of every params-shaped state field of ``tx``.

    Runs ``tx`` from ``init`` for a few steps on synthetic data of the
    parameters' structure and shapes (never their values: parameters
    :math:`\theta_t \sim \mathcal N(0, 1)`, gradient entries of random sign and
    magnitude in :math:`[0.5, 1.5]`), twice: as is, and with the parameters
    multiplied by :math:`c` = :data:`PROBE_SCALE` and the gradients divided by
    it (the group action of one rescaling applied to every entry) while half of
    the entries, chosen at random, get unrelated values. A field moves by the
    power :math:`p` when on the other half it is :math:`c^p` times its first
    value at every step (to :data:`PROBE_RTOL`, max norm per leaf): a
    statistic homogeneous of degree :math:`-p` in the gradient history that
    reads no other entries. An elementwise field that moves by :math:`c^p`
    under one rescaling of all entries moves by :math:`c_i^p` under any
    per-entry rescaling :math:`c_i`, and with the parameters
    (``sym.act(field, g, power=p)``).

    Fields that no power describes (an initial accumulator or an ``eps``
    inside the update that is not negligible, a momentum of
    ``gradient + weight_decay * params``, a norm over many entries such as
    clipping or trust ratios) get a :class:`Verdict` with the reason. Results
    are cached per transformation and parameter shapes. The probe runs eagerly,
    also when called under ``jit`` (its data is concrete).

    Args:
      tx: the optimizer.
      params: parameters (or abstract ones): only their structure, shapes and
        dtypes are used.

    Returns:
      A :class:`Measured`: ``fields`` maps each field's path in the state
      (``"state[0].nu"``, as in error messages) to its :class:`Verdict`, or is
      ``None`` when ``tx`` could not be run (``error`` says why: it needs extra
      args such as ``value``, or depends on traced values).
    """
    return _MEASURED.get((_probe.tx_key(tx), _probe.spec_key(params)),
                         lambda: _measure(tx, params))


def _given(state: PyTree, params: PyTree, laws: Laws | None) -> bool:
    """Whether ``laws`` give the law of every params-shaped field (nothing to measure)."""
    if not laws:
        return False
    walker = _Walker(lambda p, t, where: t, params, laws, strict=False)
    try:
        walker.walk(state, -1, "state")
    except ValueError:
        return False
    return all(walker.given)


def _measured_for(tx: Any, state: PyTree, params: PyTree,
                  laws: Laws | None = None) -> Measured | None:
    """The measured laws of ``tx`` for ``state`` (None without tx, or when ``laws`` give
    every field's), checking they match."""
    if tx is None or _given(state, params, laws):
        return None
    if not jax.tree.leaves(params):
        return Measured(None, "params have no leaves")
    measured = measure_laws(tx, params)
    if measured.fields is not None:
        got = jax.tree.structure(state, is_leaf=_is_mask)
        if got != measured.structure:
            raise ValueError(
                "tx: the state does not have the structure of tx.init(params); pass the "
                f"optimizer that made it (state: {got}; tx.init: {measured.structure})"
            )
    return measured


# --------------------------------------------------------------------------- public API


def map_state(
    fn: Callable[[int, PyTree], PyTree],
    state: PyTree,
    params: PyTree,
    *,
    tx: Any = None,
    laws: Laws | None = None,
    strict: bool = True,
) -> PyTree:
    """Applies ``fn(power, subtree)`` to every params-shaped field of an optimizer state.

    ``power`` is the field's transformation law: the
    field moves as ``sym.act(subtree, g, power=power)`` when the parameters
    move as ``sym.act(params, g)``. With ``tx`` (the optimizer that made
    ``state``) every law is measured (:func:`measure_laws`); without it, laws
    come from the registry of state types (module docstring), which refuses
    what it cannot tell from the state alone. Wrappers use this to transport by
    a pure rescaling without gathers, or to reset the statistics of some units.
    Fields with law ``None`` (counts, scalars, hyperparameters) are returned
    unchanged.

    ``subtree`` always has the structure and leaf shapes of ``params``: under
    ``optax.masked`` / ``optax.partition``, the ``MaskedNode`` entries (and
    Adafactor's shape-``(1,)`` placeholders) are given to ``fn`` as zeros and
    put back afterwards, so ``fn``'s values there are discarded.

    Args:
      fn: the map, ``fn(power, subtree) -> subtree`` of the same structure.
      state: an Optax state: any nesting of ``chain`` / ``named_chain``,
        ``inject_hyperparams``, ``MultiSteps``, ``masked``, ``partition``,
        ``apply_if_finite`` and the library's wrappers around registered states.
      params: the parameters (for structure and shapes only).
      tx: the optimizer whose state this is: every law is measured on it, and a
        field no law describes is refused, naming it.
      laws: user laws overriding both: ``{"field": power}`` (any state
        type with that field) or ``{(StateType, "field"): power}``; a power is
        an ``int``, or ``None`` to leave the field alone. ``(type, field)`` keys
        win over field names.
      strict: refuse fields whose law is not verified (measured with ``tx``; or,
        without it, read from the registry for a state type that only one
        optimizer uses, fed by a known stream). ``False`` falls back to the
        registry's law for them (for maps that only need a field's kind, such
        as resetting a unit's statistics, not an exact move).

    Returns:
      The mapped state (same structure).

    Raises:
      ValueError: a params-shaped field that cannot be transported (refused
        types, fields no measured power describes, unregistered NamedTuples
        without ``tx``, types shared by optimizers with other laws without
        ``tx``, a statistic of a stream of unknown law), naming the state type
        and field; a law whose field is not params-shaped; malformed ``laws``;
        a ``tx`` whose state does not have ``state``'s structure.

    References:
      Neyshabur, Salakhutdinov, Srebro. *Path-SGD: Path-Normalized Optimization
      in Deep Neural Networks*, 2015. https://arxiv.org/abs/1506.02617
    """
    walker = _Walker(lambda p, t, where: fn(p, t), params, laws,
                     _measured_for(tx, state, params, laws), strict=strict)
    return walker.walk(state, -1, "state")[0]


def check_transportable(
    state: PyTree, params: PyTree, *, tx: Any = None, laws: Laws | None = None,
    strict: bool = True,
) -> list[tuple[str, int]]:
    """Raises now if :func:`transport_state` would refuse ``state``.

    Wrappers call it at ``init`` (with ``tx=`` their inner optimizer) so that
    an optimizer whose state cannot be moved along the orbit fails at
    construction time, not at the first move. Works on abstract states too
    (``jax.eval_shape(opt.init, params)``).

    Args:
      state: an Optax state (e.g. ``inner.init(params)``).
      params: the parameters (for structure and shapes only).
      tx: the optimizer, as in :func:`map_state`.
      laws: user laws, as in :func:`map_state`.
      strict: as in :func:`map_state`.

    Returns:
      ``(field, power)`` for every params-shaped field that would be moved, in
      walk order, e.g. ``[('ScaleByAdamState.mu (at state[0].mu)', -1), ...]``.

    Raises:
      ValueError: as :func:`map_state`.
    """
    walker = _Walker(lambda p, t, where: t, params, laws,
                     _measured_for(tx, state, params, laws), strict=strict)
    walker.walk(state, -1, "state")
    return list(walker.visits)


def probe_laws(
    inner: Any, state: PyTree, params: PyTree, *, laws: Laws | None = None, rtol: float = 1e-3
) -> None:
    """Checks the registry's (or the given) laws of a state against the measured ones.

    .. deprecated::
       Superseded by ``tx=`` in :func:`map_state`, :func:`check_transportable`
       and :func:`transport_state`, which *use* the measured laws
       (:func:`measure_laws`) instead of checking others against them. Kept so
       that existing calls work.

    Args:
      inner: the optimizer whose ``state`` this is.
      state: its state (e.g. ``inner.init(params)``).
      params: the parameters.
      laws: user laws, as in :func:`map_state`.
      rtol: unused (the probe's tolerance is :data:`PROBE_RTOL`).

    Raises:
      ValueError: naming the field whose measured law contradicts its law, and
        the law to pass instead.
    """
    del rtol
    if not jax.tree.leaves(params):
        return
    measured = measure_laws(inner, params)
    if measured.fields is None:
        return
    walker = _Walker(lambda p, t, where: t, params, laws, strict=False)
    walker.walk(state, -1, "state")
    for (where, power), path in zip(walker.visits, walker.paths):
        verdict = measured.fields.get(path)
        if verdict is not None and verdict.power is not None and verdict.power != power:
            raise ValueError(
                f"{where}: measured on the optimizer, this field moves by the power "
                f"{verdict.power}, but its law is {power}; pass tx=the optimizer (or "
                f"laws={{...: {verdict.power}}}) for it"
            )


def transport_state(
    sym: Any,
    state: PyTree,
    params: PyTree,
    g: Any,
    *,
    tx: Any = None,
    laws: Laws | None = None,
) -> PyTree:
    r"""Moves an optimizer state along with ``params → sym.act(params, g)``.

    Every params-shaped field moves as ``sym.act(field, g, power=p)`` with its
    law ``p``: for a statistic
    :math:`s = \phi(g_1, \dots, g_t)` homogeneous of degree :math:`k` in the
    gradients (:math:`p = -k`), the moved state equals the state accumulated
    from the moved gradients ``sym.act(g_i, g, power=-1)``,

    .. math::

       g\cdot_{-k}\;\phi(g_1,\dots,g_t) \;=\; \phi(g\cdot_{-1} g_1, \dots, g\cdot_{-1} g_t).

    Pass ``tx``, the optimizer that made ``state``: each field's law is then
    measured on it (:func:`measure_laws`), whatever the state type (adamax's
    ``nu`` moves like :math:`|g|`, adopt's ``mu`` is scale-free), and a field
    that no power describes is refused with its name and the reason. Without
    ``tx`` the laws come from the registry, which refuses a state type shared
    by optimizers with different laws (``ScaleByAdamState``: adam, adamax,
    adopt) and statistics after a stateless transformation (its state does not
    say whether it was a learning rate or a clip).

    Args:
      sym: the :class:`~quotient_opt.Symmetry`.
      state: the optimizer's state.
      params: the parameters *before* the move (for structure and shapes only).
      g: the group element applied to the parameters.
      tx: the optimizer whose state this is (its laws are measured).
      laws: user laws overriding the measured and registered ones, as in
        :func:`map_state`.

    Returns:
      The transported state (same structure and dtypes).

    Raises:
      ValueError: as :func:`map_state`, naming the state field.

    References:
      Kingma, Ba. *Adam: A Method for Stochastic Optimization*, 2014.
      https://arxiv.org/abs/1412.6980
    """
    return map_state(lambda p, t: sym.act(t, g, power=p), state, params, tx=tx, laws=laws)


def map_param_like(fn: Callable[[Kind, PyTree], PyTree], state: PyTree, params: PyTree, *,
                   tx: Any = None) -> PyTree:
    """Applies ``fn(kind, subtree)`` to every first- and second-moment field of a state.

    The older interface of :func:`map_state`, derived from the same registry:
    a field of law ``-1`` is passed as ``kind='first'``, one of law ``-2`` as
    ``kind='second'``. Any other law (``+1`` params-like iterates, ``0``
    scale-free statistics such as rmsprop's momentum, ``+2``) has no kind: a
    ``ValueError`` naming the field is raised rather than passing a kind that
    callers would treat as a second moment. Use :func:`map_state` for those.

    Args:
      fn: the map.
      state: an Optax state (see :func:`map_state`).
      params: parameters, used only for their structure and shapes.
      tx: the optimizer, as in :func:`map_state`: with it the kinds are measured;
        without it they are the registry's (``strict=False`` of :func:`map_state`: a
        classification, not a move, so a shared type gets adam's kinds).

    Raises:
      ValueError: as :func:`map_state`, and for a field whose law is neither
        ``-1`` nor ``-2``.
    """

    def by_kind(power: int, tree: PyTree, where: str) -> PyTree:
        if power == -1:
            return fn("first", tree)
        if power == -2:
            return fn("second", tree)
        raise ValueError(
            f"map_param_like: {where} has law power {power}, which is neither a first "
            "(-1) nor a second (-2) moment; use quotient_opt.map_state(fn(power, tree), ...)"
        )

    return _Walker(by_kind, params, None, _measured_for(tx, state, params),
                   strict=False).walk(state, -1, "state")[0]
