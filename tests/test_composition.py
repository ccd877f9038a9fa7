"""The wrappers compose like any Optax transformation (issue: composition).

Every wrapper (``rebalance``, ``teleport``, ``revive_dead_units``) around every
inner optimizer of the transport registry; every wrapper under
``inject_hyperparams``, a schedule, ``MultiSteps`` and ``clip_by_global_norm``
chained after; float32, float64 and bfloat16 params. Each must run without
NaN, the group-moving wrappers must preserve the function at learning rate 0
(no hidden jump, whatever follows them), and the exact-equivariance claim
(``θ'_T = g·θ_T``) is checked in float64.
"""

from __future__ import annotations

import functools
from collections.abc import Callable

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from flax import nnx

import quotient_opt as qo

SF_LAWS = {(optax.contrib.ScheduleFreeState, "z"): 1}

# name -> (factory(lr) -> inner optimizer, transport laws); the wrappers measure every law
# on the inner optimizer, so none is needed where a power describes each field
INNERS: dict[str, tuple[Callable[[float], optax.GradientTransformation], dict | None]] = {
    "sgd": (lambda lr: optax.sgd(lr), None),
    "momentum": (lambda lr: optax.sgd(lr, momentum=0.9), None),
    "nesterov": (lambda lr: optax.sgd(lr, momentum=0.9, nesterov=True), None),
    "adam": (lambda lr: optax.adam(lr), None),
    "adamw": (lambda lr: optax.adamw(lr, weight_decay=1e-2), None),
    "nadam": (lambda lr: optax.nadam(lr), None),
    "radam": (lambda lr: optax.radam(lr), None),
    "amsgrad": (lambda lr: optax.amsgrad(lr), None),
    "adamax": (lambda lr: optax.adamax(lr), None),
    # (the default initial accumulator 0.1 is not moved by any power: refused)
    "adagrad": (lambda lr: optax.adagrad(lr, initial_accumulator_value=0.0), None),
    "rmsprop": (lambda lr: optax.rmsprop(lr), None),
    "rmsprop_centered": (lambda lr: optax.rmsprop(lr, centered=True), None),
    "rmsprop_momentum": (lambda lr: optax.rmsprop(lr, momentum=0.9), None),
    "adadelta": (lambda lr: optax.adadelta(lr), None),
    "adabelief": (lambda lr: optax.adabelief(lr), None),
    # (optax.yogi fixes the accumulators at 1e-6, moved by no power: start them at 0)
    "yogi": (lambda lr: optax.chain(optax.scale_by_yogi(initial_accumulator_value=0.0),
                                    optax.scale_by_learning_rate(lr)), None),
    "lion": (lambda lr: optax.lion(lr), None),
    "lamb": (lambda lr: optax.lamb(lr), None),
    "adan": (lambda lr: optax.adan(lr), None),
    "rprop": (lambda lr: optax.rprop(lr), None),
    "ademamix": (lambda lr: optax.contrib.ademamix(lr), None),
    "adopt": (lambda lr: optax.contrib.adopt(lr), None),
    # its iterate z moves with the params, but adamw's steps are not covariant, so no
    # power is measured: the law is given
    "schedule_free_adamw": (lambda lr: optax.contrib.schedule_free_adamw(lr), SF_LAWS),
}

WRAPPERS: dict[str, Callable[..., optax.GradientTransformation]] = {
    "rebalance": lambda inner, sym, laws: qo.rebalance(inner, sym, every=2, laws=laws),
    "teleport": lambda inner, sym, laws: qo.teleport(inner, sym, every=2, steps=2, laws=laws),
    "revive": lambda inner, sym, laws: qo.revive_dead_units(inner, sym, patience=2, every=1,
                                                            laws=laws),
}
MOVING = ("rebalance", "teleport")  # group moves: held, never a jump


@functools.lru_cache(maxsize=None)
def problem(dtype=jnp.float64):
    r = nnx.Rngs(0)
    model = nnx.Sequential(nnx.Linear(2, 6, param_dtype=dtype, rngs=r), nnx.relu,
                           nnx.Linear(6, 5, param_dtype=dtype, rngs=r), nnx.relu,
                           nnx.Linear(5, 1, param_dtype=dtype, rngs=r))
    apply, params = qo.models.functional(model)
    sym = qo.infer_symmetry(model)
    params = sym.act(params, sym.sample(jax.random.key(3), log_scale=1.5))  # unbalanced start
    x = jax.random.uniform(jax.random.key(1), (48, 2), dtype, -1, 1)
    y = jnp.sin(3 * x[:, :1]).astype(dtype)

    def loss(p):
        return jnp.mean((apply(p, x).astype(jnp.float32) - y.astype(jnp.float32)) ** 2)

    return sym, apply, params, loss, x


def run(tx, params, loss, steps):
    # tiny programs run once: skip LLVM's optimizations (compiling dominates)
    fit = jax.jit(lambda p: qo.fit(tx, p, loss, steps)[::2],
                  compiler_options={"xla_backend_optimization_level": 0})
    return fit(params)


# the group-moving plumbing is the same for every inner optimizer: rebalance
# meets the whole registry, teleport and revive a representative few
FEW = ("adam", "momentum", "adamax", "rmsprop_momentum", "adadelta", "schedule_free_adamw")
PAIRS = [("rebalance", i) for i in sorted(INNERS)] + [
    (w, i) for w in ("teleport", "revive") for i in FEW]


def max_out_diff(apply, a, b, x):
    return float(jnp.max(jnp.abs(apply(a, x).astype(jnp.float64) - apply(b, x).astype(jnp.float64))))


@pytest.mark.slow
@pytest.mark.parametrize("wrapper,inner", PAIRS)
def test_wrappers_around_the_inner_optimizers(wrapper, inner):
    sym, apply, p0, loss, x = problem()
    make, laws = INNERS[inner]
    p, losses = run(WRAPPERS[wrapper](make(1e-2), sym, laws), p0, loss, 6)
    assert bool(jnp.all(jnp.isfinite(losses))), losses
    assert all(bool(jnp.all(jnp.isfinite(v))) for v in jax.tree.leaves(p))
    if wrapper in MOVING:  # at lr 0 the function is kept exactly
        p, _ = run(WRAPPERS[wrapper](make(0.0), sym, laws), p0, loss, 4)
        assert max_out_diff(apply, p, p0, x) <= 1e-9


def _variants(sym):
    sched = optax.linear_schedule(0.0, 0.0, 10)
    return {
        "inject_hyperparams": optax.inject_hyperparams(qo.quotient_adam)(learning_rate=0.0,
                                                                        sym=sym),
        "schedule": qo.rebalance(optax.adam(sched), sym),
        "multisteps": optax.MultiSteps(qo.rebalance(optax.adam(0.0), sym), every_k_schedule=2),
        "clip_after_rebalance": optax.chain(qo.rebalance(optax.adam(0.0), sym),
                                            optax.clip_by_global_norm(1e-3)),
        "clip_after_quotient_sgd": optax.chain(qo.quotient_sgd(0.0, sym, momentum=0.9),
                                               optax.clip_by_global_norm(1e-3)),
        "clip_after_teleport": optax.chain(qo.teleport(optax.adam(0.0), sym, every=1),
                                           optax.clip_by_global_norm(1e-3)),
        "clip_inside_revive": qo.revive_dead_units(
            optax.chain(optax.clip_by_global_norm(1e-3), optax.adam(0.0)), sym),
    }


@pytest.mark.slow
@pytest.mark.parametrize("variant", sorted(_variants(problem()[0])))
def test_chaining_keeps_the_function_at_lr_0(variant):
    sym, apply, p0, loss, x = problem()
    p, losses = run(_variants(sym)[variant], p0, loss, 5)
    assert bool(jnp.all(jnp.isfinite(losses)))
    assert max_out_diff(apply, p, p0, x) <= 1e-9


@pytest.mark.slow
@pytest.mark.parametrize("dtype", [jnp.float32, jnp.float64, jnp.bfloat16])
@pytest.mark.parametrize("wrapper", sorted(WRAPPERS))
def test_dtypes(wrapper, dtype):
    sym, apply, p0, loss, x = problem(jnp.float32)
    p0 = jax.tree.map(lambda a: a.astype(dtype), p0)
    tx = WRAPPERS[wrapper](optax.adam(1e-2), sym, None)
    p, losses = run(tx, p0, loss, 4)
    assert all(v.dtype == dtype for v in jax.tree.leaves(p))
    assert bool(jnp.all(jnp.isfinite(losses)))


@pytest.mark.slow
@pytest.mark.parametrize("make", [
    lambda sym: qo.rebalance(optax.adam(1e-2), sym),
    lambda sym: qo.rebalance(optax.sgd(1e-2, momentum=0.9), sym, every=3),
    lambda sym: qo.quotient_adam(1e-2, sym),
    lambda sym: qo.teleport(optax.adam(1e-2), sym, every=3, steps=3),
], ids=["rebalance(adam)", "rebalance(momentum, every=3)", "quotient_adam", "teleport(adam)"])
def test_exactly_equivariant_in_float64(make):
    """θ'_T = g·θ_T, from θ and g·θ with random permutations and log-scales ±3."""
    sym, apply, p0, loss, x = problem()
    g = sym.sample(jax.random.key(7), log_scale=3.0)
    tx = make(sym)
    a, _ = run(tx, p0, loss, 20)
    b, _ = run(tx, sym.act(p0, g), loss, 20)
    ga = sym.act(a, g)
    rel = max(float(jnp.max(jnp.abs(u - v)) / jnp.max(jnp.abs(u)))
              for u, v in zip(jax.tree.leaves(ga), jax.tree.leaves(b)))
    assert rel <= 1e-9
    assert max_out_diff(apply, a, p0, x) > 1e-3  # it trained


def test_schedule_free_trains_under_rebalance():
    sym, apply, p0, loss, x = problem()
    tx = qo.rebalance(optax.contrib.schedule_free_adamw(1e-2), sym, laws=SF_LAWS)
    _, losses = run(tx, p0, loss, 200)
    assert bool(jnp.all(jnp.isfinite(losses)))
    assert float(losses[-1]) < 0.5 * float(losses[0])


def test_unsafe_inner_states_are_refused_at_init():
    sym, _, p0, _, _ = problem()
    with pytest.raises(ValueError, match="v_row"):  # factored second moments
        qo.rebalance(optax.adafactor(1e-2, min_dim_size_to_factor=2), sym).init(p0)
    with pytest.raises(ValueError, match="TraceState.trace"):  # lars: per-leaf trust ratios
        qo.rebalance(optax.lars(1e-2), sym).init(p0)
    qo.rebalance(optax.lars(1e-2), sym, laws={"trace": 0}).init(p0)  # a user law accepts it
    with pytest.raises(ValueError, match="ScaleByRssState.sum_of_squares.*not homogeneous"):
        qo.rebalance(optax.adagrad(1e-2), sym).init(p0)  # initial_accumulator_value=0.1
    with pytest.raises(ValueError, match="ScheduleFreeState.z"):
        qo.teleport(optax.contrib.schedule_free_adamw(1e-2), sym).init(p0)
    with pytest.raises(ValueError, match="ScaleByAdamState.mu.*no integer power"):  # README
        qo.rebalance(optax.chain(optax.clip_by_global_norm(1.0), optax.adam(1e-2)), sym).init(p0)


def test_shared_state_types_get_their_measured_laws():
    """adamax and adopt keep Adam's state type with other laws: measured, not refused."""
    sym, _, p0, _, _ = problem()
    for inner, want in [(optax.adamax(1e-2), [-1, -1]), (optax.contrib.adopt(1e-2), [0, -2]),
                        (optax.adam(1e-2), [-1, -2])]:
        state = qo.rebalance(inner, sym).init(p0)
        got = qo.check_transportable(state.inner_state, p0, tx=inner)
        assert [p for _, p in got] == want


def test_project_horizontal_before_a_preconditioner_is_a_no_op():
    """Documented: the gradient of an invariant loss is already horizontal."""
    sym, _, p0, loss, _ = problem()
    g = jax.grad(loss)(p0)
    h, _ = qo.project_horizontal(sym).update(g, optax.EmptyState(), p0)
    assert max(float(jnp.max(jnp.abs(a - b))) for a, b in
               zip(jax.tree.leaves(g), jax.tree.leaves(h))) <= 1e-12 * max(
        float(jnp.max(jnp.abs(a))) for a in jax.tree.leaves(g))
    adam_step, _ = optax.adam(1e-2).update(g, optax.adam(1e-2).init(p0), p0)
    hh, _ = qo.project_horizontal(sym).update(adam_step, optax.EmptyState(), p0)
    assert max(float(jnp.max(jnp.abs(a - b))) for a, b in
               zip(jax.tree.leaves(adam_step), jax.tree.leaves(hh))) > 1e-6
    np.testing.assert_allclose(sum(float(jnp.sum(z)) for z in sym.cotangent(p0, hh)), 0.0,
                               atol=1e-12)
