"""Wrong chain orders and non-equivariant inner optimizers are warned about (issue 17).

Each wrong order of the library's transformations gets a ``ChainOrderWarning``
naming both transformations and the fix, wherever a chain is visible: through
``qo.check_chain``, at a wrapper's ``init`` (its inner chain) and in
``qo.fit``; the right orders get none. An inner optimizer that does not commute
with the symmetry's permutations gets a ``NotEquivariantWarning``; the
elementwise ones and LAMB (per-leaf norms commute with permutations) do not.
"""

from __future__ import annotations

import functools
import warnings

import jax
import jax.numpy as jnp
import optax
import pytest
from flax import nnx

import quotient_opt as qo
from quotient_opt.transforms import _order


@functools.cache
def problem():
    r = nnx.Rngs(0)
    model = nnx.Sequential(nnx.Linear(2, 6, rngs=r), nnx.relu, nnx.Linear(6, 5, rngs=r),
                           nnx.relu, nnx.Linear(5, 1, rngs=r))
    apply, params = qo.models.functional(model)
    sym = qo.infer_symmetry(model)
    x = jax.random.uniform(jax.random.key(1), (16, 2), jnp.float32, -1, 1)

    def loss(p):
        return jnp.mean((apply(p, x) - jnp.sin(3 * x[:, :1])) ** 2)

    return sym, params, loss


# name -> (chain, words the message must contain)
WRONG = {
    "revive then clip": (
        lambda s: optax.chain(qo.revive_dead_units(optax.adam(1e-2), s),
                              optax.clip_by_global_norm(1.0)),
        [r"optax.clip_by_global_norm \(#2 of 2", r"follows qo.revive_dead_units \(#1",
         "jump", "Fix: make qo.revive_dead_units the outermost"]),
    "project before adam": (
        lambda s: optax.chain(qo.project_horizontal(s), optax.adam(1e-2)),
        [r"optax.scale_by_adam \(#2 of 3", "follows qo.project_horizontal", "not a scalar "
         "multiple", r"Fix: project last, optax.chain\(optax.scale_by_adam, "
         r"qo.project_horizontal\(sym\)\)"]),
    "path_sgd then adam": (
        lambda s: optax.chain(qo.path_sgd(1e-2, s), optax.adam(1e-2)),
        ["optax.scale_by_adam", "follows qo.scale_by_path_norm", "normalizes",
         "no longer equivariant", "qo.path_sgd"]),
    "teleport not first": (
        lambda s: optax.chain(optax.scale_by_adam(), qo.teleport(optax.sgd(1e-2), s)),
        [r"qo.teleport \(#2 of 2", r"comes after optax.scale_by_adam \(#1",
         "Fix: put qo.teleport first"]),
    "rebalance(move_params) then clip": (
        lambda s: optax.chain(qo.rebalance(optax.adam(1e-2), s, move_params=True),
                              optax.clip_by_global_norm(1.0)),
        ["follows qo.rebalance\\(move_params=True\\)", "jump"]),
    "quotient_adam(move_params) then a learning rate": (
        lambda s: optax.chain(qo.quotient_adam(1.0, s, move_params=True), optax.scale(1e-2)),
        ["optax.scale", "follows qo.quotient_adam\\(move_params=True\\)"]),
}

RIGHT = {
    "adam then project": lambda s: optax.chain(optax.adam(1e-2), qo.project_horizontal(s)),
    "rebalance then clip": lambda s: optax.chain(qo.rebalance(optax.adam(1e-2), s),
                                                 optax.clip_by_global_norm(1.0)),
    "quotient_adam then clip": lambda s: optax.chain(qo.quotient_adam(1e-2, s),
                                                     optax.clip_by_global_norm(1.0)),
    "quotient_sgd": lambda s: qo.quotient_sgd(1e-2, s, momentum=0.9),
    "path_sgd with momentum": lambda s: qo.path_sgd(1e-2, s, momentum=0.9),
    "clip then teleport": lambda s: optax.chain(optax.clip_by_global_norm(1.0),
                                                qo.teleport(optax.adam(1e-2), s)),
    "revive last": lambda s: optax.chain(optax.identity(),
                                         qo.revive_dead_units(optax.adam(1e-2), s)),
}


@pytest.mark.parametrize("case", sorted(WRONG))
def test_wrong_orders_are_warned_with_the_fix(case):
    sym, params, _ = problem()
    make, words = WRONG[case]
    with pytest.warns(qo.ChainOrderWarning) as record:
        found = qo.check_chain(make(sym), params)
    assert len(found) == 1, found
    message = str(record[0].message)
    for w in words:
        assert __import__("re").search(w, message), (w, message)


@pytest.mark.parametrize("case", sorted(RIGHT))
def test_right_orders_are_not_warned(case):
    sym, params, _ = problem()
    with warnings.catch_warnings():
        warnings.simplefilter("error", qo.ChainOrderWarning)
        assert qo.check_chain(RIGHT[case](sym), params) == []


def test_a_wrong_inner_order_is_warned_at_init():
    sym, params, _ = problem()
    tx = qo.revive_dead_units(optax.chain(qo.project_horizontal(sym), optax.adam(1e-2)), sym)
    with pytest.warns(qo.ChainOrderWarning, match="the inner optimizer of qo.revive_dead_units"):
        tx.init(params)


def test_fit_warns_about_the_whole_chain_once():
    sym, params, loss = problem()
    tx = optax.chain(qo.revive_dead_units(optax.adam(1e-2), sym), optax.clip_by_global_norm(1.0))
    with pytest.warns(qo.ChainOrderWarning, match="the transformation given to qo.fit"):
        jax.jit(lambda p: qo.fit(tx, p, loss, 2)[2])(params)
    with warnings.catch_warnings():  # the second time: already said
        warnings.simplefilter("error", qo.ChainOrderWarning)
        qo.check_chain(tx, params, where="the transformation given to qo.fit")


def test_chains_are_taken_apart():
    sym, _, _ = problem()
    nested = optax.chain(optax.adam(1e-2), optax.named_chain(
        ("clip", optax.clip_by_global_norm(1.0)), ("proj", qo.project_horizontal(sym))))
    assert [_order.name(p) for p in _order.parts(nested)] == [
        "optax.scale_by_adam", "optax.scale", "optax.clip_by_global_norm",
        "qo.project_horizontal"]
    # a GradientTransformation not built by optax.chain is one part
    single = optax.GradientTransformation(lambda p: (), lambda u, s, p=None: (u, s))
    assert _order.parts(single) == [single]


@pytest.mark.parametrize("inner", ["sgd", "momentum", "adam", "adamw", "rmsprop", "lamb"])
def test_no_equivariance_warning_for_optimizers_that_commute(inner):
    sym, params, _ = problem()
    make = {"sgd": lambda: optax.sgd(1e-2), "momentum": lambda: optax.sgd(1e-2, 0.9),
            "adam": lambda: optax.adam(1e-2), "adamw": lambda: optax.adamw(1e-2),
            "rmsprop": lambda: optax.rmsprop(1e-2), "lamb": lambda: optax.lamb(1e-2)}[inner]
    with warnings.catch_warnings():
        warnings.simplefilter("error", qo.NotEquivariantWarning)
        warnings.simplefilter("error", qo.ChainOrderWarning)
        qo.rebalance(make(), sym).init(params)
        qo.teleport(make(), sym).init(params)


def test_an_inner_optimizer_that_does_not_commute_is_warned():
    """noisy_sgd draws its noise by position: runs from θ and g·θ differ (measured 7%)."""
    sym, params, _ = problem()
    with pytest.warns(qo.NotEquivariantWarning, match=r"qo.rebalance: its inner optimizer"):
        qo.rebalance(optax.noisy_sgd(1e-2), sym).init(params)
    gap = _order._GAPS.items[next(reversed(_order._GAPS.items))]
    assert gap > 1e-2
