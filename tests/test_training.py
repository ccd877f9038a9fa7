"""``qo.fit``: the full-batch ``lax.scan`` loop matches a Python loop, resumes, passes value_fn."""

import jax
import jax.numpy as jnp
import numpy as np
import optax

import quotient_opt as qo

TARGET = {"a": jnp.array([1.0, -2.0, 3.0]), "b": jnp.array(0.5)}


def loss(p):
    return sum(jnp.sum((p[k] - TARGET[k]) ** 2) for k in p)


P0 = {"a": jnp.zeros(3), "b": jnp.array(0.0)}


def test_matches_python_loop_and_resumes():
    tx = optax.adam(0.1)
    p, s, losses = jax.jit(lambda p: qo.fit(tx, p, loss, 20))(P0)
    q, st, ref = P0, tx.init(P0), []
    for _ in range(20):
        ref.append(float(loss(q)))
        u, st = tx.update(jax.grad(loss)(q), st, q)
        q = optax.apply_updates(q, u)
    assert losses.shape == (20,)
    np.testing.assert_allclose(losses, ref, rtol=1e-6)
    for k in p:
        np.testing.assert_allclose(p[k], q[k], rtol=1e-6)
    # resuming from the returned state continues the same run
    p10, s10, _ = qo.fit(tx, P0, loss, 10)
    p20, _, _ = qo.fit(tx, p10, loss, 10, state=s10)
    for k in p:
        np.testing.assert_allclose(p20[k], p[k], rtol=1e-6)
    assert int(s[0].count) == 20


def _scaled_by_value():
    """SGD whose step is multiplied by ``value_fn(params)`` (needs the extra arg)."""

    def update(g, state, params=None, *, value_fn, **_):
        return jax.tree.map(lambda x: -0.1 * value_fn(params) * x, g), state

    return optax.GradientTransformationExtraArgs(lambda p: optax.EmptyState(), update)


def test_value_fn_is_the_loss_unless_overridden():
    tx = _scaled_by_value()
    p, _, _ = qo.fit(tx, P0, loss, 1)
    g = jax.grad(loss)(P0)
    np.testing.assert_allclose(p["a"], -0.1 * loss(P0) * g["a"], rtol=1e-6)
    p2, _, _ = qo.fit(tx, P0, loss, 1, value_fn=lambda _: 2.0)
    np.testing.assert_allclose(p2["a"], -0.2 * g["a"], rtol=1e-6)
    # plain transformations ignore value_fn
    p3, _, _ = qo.fit(optax.sgd(0.1), P0, loss, 1)
    np.testing.assert_allclose(p3["a"], -0.1 * g["a"], rtol=1e-6)
