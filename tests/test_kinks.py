"""``qo.place_kinks`` / ``qo.kink_init``: every hidden unit's kink inside the data, kernels and
the output layer untouched, ``where`` respected, a reference loop matched, populations fine,
and models that are not dense ReLU chains refused with a reason."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from flax import linen, nnx

import quotient_opt as qo


def relu_layers(params):
    """(kernel, bias) of a SawtoothNet's layers in order."""
    idx = sorted(params["layers"].keys())
    return [(params["layers"][i]["kernel"][...], params["layers"][i]["bias"][...]) for i in idx]


def pre_activations(layers, x):
    h, out = x, []
    for k, b in layers[:-1]:
        z = h @ k + b
        out.append(z)
        h = jax.nn.relu(z)
    return out


TASK = qo.models.sawtooth_task()


def sawtooth(seed=0):
    model = qo.models.SawtoothNet(rngs=nnx.Rngs(seed))
    return qo.models.functional(model)


def test_no_dead_units_and_kinks_inside_the_data():
    apply, params = sawtooth()
    he = pre_activations(relu_layers(params), TASK.x)
    assert sum(int(jnp.sum(jnp.all(z <= 0, 0))) for z in he) >= 5  # He init: many dead units
    placed = qo.place_kinks(apply, params, TASK.x, jax.random.key(0))
    for z in pre_activations(relu_layers(placed), TASK.x):
        assert bool(jnp.all(jnp.min(z, 0) <= 0)) and bool(jnp.all(jnp.max(z, 0) > 0))
    for (k0, b0), (k1, b1) in zip(relu_layers(params), relu_layers(placed)):
        np.testing.assert_array_equal(k0, k1)  # kernels untouched
    np.testing.assert_array_equal(relu_layers(params)[-1][1], relu_layers(placed)[-1][1])


def test_matches_a_reference_loop_and_the_range_fractions():
    apply, params = sawtooth(1)
    placed = qo.place_kinks(apply, params, TASK.x, jax.random.key(5), low=0.25, high=0.75)
    h = TASK.x
    for (k, b) in relu_layers(placed)[:-1]:
        u = h @ k
        lo, hi = u.min(0), u.max(0)
        t = (-b - lo) / (hi - lo)  # where the kink sits in the range
        assert bool(jnp.all((t >= 0.25 - 1e-5) & (t <= 0.75 + 1e-5))), t
        h = jax.nn.relu(u + b)


def test_where_places_only_the_marked_units():
    apply, params = sawtooth(2)
    where = [jnp.arange(5) % 2 == 0 for _ in range(5)]
    placed = qo.place_kinks(apply, params, TASK.x, jax.random.key(1), where=where)
    for (_, b0), (_, b1), w in zip(relu_layers(params), relu_layers(placed), where):
        np.testing.assert_array_equal(np.asarray(b1)[~np.asarray(w)], np.asarray(b0)[~np.asarray(w)])
    with pytest.raises(ValueError, match="one boolean vector per ReLU layer"):
        qo.place_kinks(apply, params, TASK.x, jax.random.key(1), where=where[:3])


def test_plain_functions_and_linen_work_and_others_are_refused():
    x = jnp.linspace(0, 1, 9)[:, None]

    def mlp(p, x):
        return jax.nn.relu(x @ p["w1"] + p["b1"]) @ p["w2"] + p["b2"]

    p = {"w1": jnp.ones((1, 3)), "b1": jnp.zeros(3), "w2": jnp.ones((3, 1)), "b2": jnp.zeros(1)}
    q = qo.place_kinks(mlp, p, x, jax.random.key(0))
    assert bool(jnp.all(q["b1"] < 0)) and bool(jnp.all(q["b1"] >= -1))

    class Lin(linen.Module):
        @linen.compact
        def __call__(self, x):
            return linen.Dense(1)(linen.relu(linen.Dense(4)(x)))

    lp = Lin().init(jax.random.key(0), x)
    qo.place_kinks(Lin().apply, lp, x, jax.random.key(0))

    def tanh_mlp(p, x):
        return jnp.tanh(x @ p["w1"] + p["b1"]) @ p["w2"] + p["b2"]

    with pytest.raises(ValueError, match="not recognized as a dense ReLU MLP"):
        qo.place_kinks(tanh_mlp, p, x, jax.random.key(0))

    def no_bias(p, x):
        return jax.nn.relu(x @ p["w1"]) @ p["w2"]

    with pytest.raises(ValueError, match="no bias"):
        qo.place_kinks(no_bias, {"w1": p["w1"], "w2": p["w2"]}, x, jax.random.key(0))
    with pytest.raises(ValueError, match="low <= high"):
        qo.place_kinks(mlp, p, x, jax.random.key(0), low=0.8, high=0.2)


@pytest.mark.slow
def test_kink_init_in_a_population_keeps_the_fast_path():
    apply, _ = sawtooth()

    def he(key):
        return nnx.state(qo.models.SawtoothNet(rngs=nnx.Rngs(key)), nnx.Param)

    def loss_fn(p):
        return qo.models.mse(apply(p, TASK.x), TASK.y)

    init = qo.kink_init(he, apply, TASK.x)
    res = qo.train_population(
        optax.adam(3e-3), init, loss_fn, nets=8, steps=0, key=jax.random.key(0), progress=False
    )
    dead = []
    for i in range(8):
        p = jax.tree.map(lambda a: a[i], res.params)
        dead.append(sum(int(jnp.sum(jnp.all(z <= 0, 0))) for z in pre_activations(relu_layers(p), TASK.x)))
    assert dead == [0] * 8
    res = qo.train_population(
        optax.adam(3e-3), init, loss_fn, nets=8, steps=20, key=jax.random.key(0), progress=False
    )
    assert res.fast_path
