"""Tests of ``quotient_opt.models``: the two example networks, their tasks and
exact solutions, and training them with ``nnx.Optimizer`` and with a functional
``nnx.split`` / ``nnx.merge`` loop."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from flax import nnx

import quotient_opt as qo
from quotient_opt import models

F32, F64 = jnp.float32, jnp.float64


def n_params(tree) -> int:
    return sum(int(np.size(x)) for x in jax.tree.leaves(tree))


def tent_power(x: np.ndarray, n: int) -> np.ndarray:
    for _ in range(n):
        x = np.where(x <= 0.5, 2 * x, 2 - 2 * x)
    return x


def local_extrema(y: np.ndarray) -> tuple[int, int]:
    """Number of strict local maxima and minima of a sampled curve (interior points)."""
    d = np.sign(np.diff(y))
    d = d[d != 0]
    turns = np.diff(d)
    return int(np.sum(turns < 0)), int(np.sum(turns > 0))


# --------------------------------------------------------------------------- networks


@pytest.mark.parametrize("dtype", [F32, F64])
def test_sawtooth_net_structure(dtype):
    net = models.SawtoothNet(rngs=nnx.Rngs(0), param_dtype=dtype)
    apply, params = models.functional(net)
    assert n_params(params) == 136
    assert all(x.dtype == dtype for x in jax.tree.leaves(params))
    linears = [f for f in net.layers if isinstance(f, nnx.Linear)]
    assert [(f.in_features, f.out_features) for f in linears] == [(1, 5)] + [(5, 5)] * 4 + [(5, 1)]
    assert sum(f is nnx.relu for f in net.layers) == 5
    # default init: He-normal kernels, zero biases
    for f in linears:
        np.testing.assert_array_equal(f.bias[...], 0.0)
    assert np.any(linears[1].kernel[...] != 0)
    sym = qo.infer_symmetry(net)
    assert [(g.windows, g.pieces, g.rescalable) for g in sym.groups] == [(5, 1, True)] * 5
    x = jnp.linspace(0, 1, 7, dtype=dtype)[:, None]
    y = net(x)
    assert y.shape == (7, 1) and y.dtype == dtype
    np.testing.assert_array_equal(apply(params, x), y)


def test_maxpool_net_structure_and_init():
    net = models.MaxPoolNet(3, 2, 4, rngs=nnx.Rngs(1))
    lin, pool = net.layers
    assert isinstance(pool, models.MaxOverPieces) and pool.pieces == 3
    k, b = np.asarray(lin.kernel[...]), np.asarray(lin.bias[...])
    assert k.shape == (4, 6) and b.shape == (6,) and k.dtype == np.float32
    # PyTorch's nn.Linear init: uniform in ±1/sqrt(in_features), biases too
    assert np.all(np.abs(k) <= 0.5) and np.all(np.abs(b) <= 0.5) and np.any(b != 0)
    x = jax.random.normal(jax.random.key(0), (5, 4), F32)
    z = np.asarray(x @ k + b).reshape(5, 2, 3)  # feature w * pieces + j = piece j of window w
    np.testing.assert_allclose(net(x), z.max(axis=-1), rtol=1e-6)
    sym = qo.infer_symmetry(net)
    assert [(g.windows, g.pieces, g.rescalable, g.windows_permutable) for g in sym.groups] == [
        (2, 3, False, False)
    ]
    with pytest.raises(ValueError, match="pieces must be >= 1"):
        models.MaxOverPieces(0)


def test_with_dense_weights_checks_its_input():
    net = models.SawtoothNet(rngs=nnx.Rngs(0))
    task = models.sawtooth_task()
    p = models.with_dense_weights(net, task.weights)
    assert jax.tree.structure(p) == jax.tree.structure(nnx.state(net, nnx.Param))
    assert all(x.dtype == F32 for x in jax.tree.leaves(p))
    last = np.asarray(task.weights[5][0], np.float32)
    np.testing.assert_array_equal(p["layers"][10]["kernel"][...], last)
    with pytest.raises(ValueError, match="5 layers given, model has 6"):
        models.with_dense_weights(net, task.weights[:5])
    bad = list(task.weights)
    bad[2] = (np.zeros((5, 4)), np.zeros(5))
    with pytest.raises(ValueError, match="layers/4/kernel"):
        models.with_dense_weights(net, bad)


# --------------------------------------------------------------------------- sawtooth task


def test_sawtooth_task_data():
    task = models.sawtooth_task(dtype=F64)
    # 31 sawtooth knots + 2 interior spline knots + the endpoints 0 and 1
    assert len(task.knots) == 35
    saw_knots = np.arange(1, 32) / 32
    assert np.all(np.isin(saw_knots, task.knots)) and task.knots[0] == 0 and task.knots[-1] == 1
    assert np.all(np.diff(task.knots) > 0)
    # every knot plus 3 evenly spaced points per segment
    n = len(task.knots) + 3 * (len(task.knots) - 1)
    assert task.x.shape == task.y.shape == (n, 1) == (137, 1)
    x, y = np.asarray(task.x[:, 0]), np.asarray(task.y[:, 0])
    assert np.all(np.diff(x) > 0) and np.all(np.isin(task.knots, x))
    # piecewise linear between knots: interior points lie on the chord of their segment
    yk = np.interp(x, task.knots, y[np.isin(x, task.knots)])
    np.testing.assert_allclose(y, yk, atol=1e-12)
    # ... and every interior knot is a real kink
    slopes = np.diff(y[np.isin(x, task.knots)]) / np.diff(task.knots)
    assert np.all(np.abs(np.diff(slopes)) > 1e-3)
    # float32 version: same data, rounded
    t32 = models.sawtooth_task()
    assert t32.x.dtype == t32.y.dtype == F32
    np.testing.assert_allclose(t32.y, task.y, atol=1e-6)


@pytest.mark.parametrize("dtype, tol", [(F64, 1e-10), (F32, 1e-10)])
def test_sawtooth_exact_fit(dtype, tol):
    task = models.sawtooth_task(dtype=dtype)
    net = models.SawtoothNet(rngs=nnx.Rngs(0), param_dtype=dtype)
    apply, _ = models.functional(net)
    p = models.with_dense_weights(net, task.weights)
    assert n_params(p) == 136
    loss = float(models.mse(apply(p, task.x), task.y))
    assert loss < tol, loss
    # the fit holds off the training set too: the network is the piecewise-linear
    # interpolation of the targets at the knots, on a fine grid
    xs = np.linspace(0, 1, 4097)
    t64 = models.sawtooth_task(dtype=F64)
    x, y = np.asarray(t64.x[:, 0]), np.asarray(t64.y[:, 0])
    at_knots = np.isin(x, t64.knots)
    interp = np.interp(xs, x[at_knots], y[at_knots])
    out = np.asarray(apply(p, jnp.asarray(xs[:, None], dtype)))[:, 0]
    np.testing.assert_allclose(out, interp, atol=1e-12 if dtype == F64 else 1e-5)


def test_sawtooth_has_sixteen_teeth():
    """The hidden 2-unit tent block of layer 5 gives T^5: a 16-tooth sawtooth."""
    task = models.sawtooth_task(dtype=F64)
    net = models.SawtoothNet(rngs=nnx.Rngs(0), param_dtype=F64)
    nnx.update(net, models.with_dense_weights(net, task.weights))
    xs = np.linspace(0, 1, 2**12 + 1)
    h = jnp.asarray(xs[:, None])
    for f in net.layers[:10]:  # five Linear + ReLU
        h = f(h)
    h = np.asarray(h)
    tent = 2 * h[:, 0] - 4 * h[:, 1]  # what the output layer reads from the block
    np.testing.assert_allclose(tent, tent_power(xs, 5), atol=1e-12)
    maxima, minima = local_extrema(tent)
    assert (maxima, minima) == (16, 15)
    np.testing.assert_allclose(tent[np.isin(xs, np.arange(1, 32, 2) / 32)], 1.0, atol=1e-12)
    # the spline block passes relu(x - t_j) through unchanged, t_j = -(first-layer bias)
    t = -np.asarray(task.weights[0][1][2:5])
    np.testing.assert_allclose(h[:, 2:5], np.maximum(xs[:, None] - t, 0), atol=1e-12)
    # the amplitude scales the sawtooth part only
    t2 = models.sawtooth_task(amplitude=0.3, dtype=F64)
    diff = np.asarray(t2.y - task.y)[:, 0]
    saw = tent_power(np.asarray(task.x[:, 0]), 5) - 0.5
    np.testing.assert_allclose(diff, 0.2 * saw, atol=1e-12)


def test_sawtooth_task_seed_and_errors():
    a, b = models.sawtooth_task(seed=0), models.sawtooth_task(seed=0)
    c = models.sawtooth_task(seed=3)
    np.testing.assert_array_equal(a.y, b.y)
    assert not np.allclose(a.weights[0][1], c.weights[0][1])  # a different spline
    with pytest.raises(ValueError, match="width 4 is too small"):
        models.sawtooth_task(width=4)


# --------------------------------------------------------------------------- maxpool task


@pytest.mark.parametrize("dtype, tol", [(F64, 1e-28), (F32, 1e-12)])
def test_maxpool_task_exact(dtype, tol):
    task = models.maxpool_task(dtype=dtype)
    assert task.x.shape == (1000, 2) and task.y.shape == (1000, 1) and task.x.dtype == dtype
    assert float(task.x.min()) >= 0 and float(task.x.max()) <= 1
    np.testing.assert_array_equal(task.kernel, [[1, 3], [2, 1]])  # planes as columns
    np.testing.assert_array_equal(task.bias, 0)
    x = np.asarray(task.x, np.float64)
    expect = np.maximum(x[:, 0] + 2 * x[:, 1], 3 * x[:, 0] + x[:, 1])
    np.testing.assert_allclose(task.y[:, 0], expect, rtol=1e-6)
    net = models.MaxPoolNet(rngs=nnx.Rngs(0), param_dtype=dtype)
    apply, p = models.functional(net)
    assert float(models.mse(apply(p, task.x), task.y)) > 1e-3  # a random init does not fit
    exact = models.with_dense_weights(net, task.weights)
    assert float(models.mse(apply(exact, task.x), task.y)) < tol
    # every plane is the maximum somewhere (each piece is needed)
    assert set(np.argmax(np.asarray(task.x @ task.kernel + task.bias), axis=1)) == {0, 1}


def test_max_of_planes_task():
    planes = [[1.0, 0.0], [0.0, 1.0], [-1.0, -1.0]]
    task = models.max_of_planes_task(planes, [0.0, 0.0, 0.8], n=500, seed=1, dtype=F64)
    assert task.kernel.shape == (2, 3) and task.bias.shape == (3,)
    assert set(np.argmax(np.asarray(task.x @ task.kernel + task.bias), axis=1)) == {0, 1, 2}
    net = models.MaxPoolNet(3, 1, 2, rngs=nnx.Rngs(0), param_dtype=F64)
    apply, _ = models.functional(net)
    exact = models.with_dense_weights(net, task.weights)
    assert float(models.mse(apply(exact, task.x), task.y)) < 1e-28
    # a plane that is never the maximum makes the task ill-posed
    with pytest.raises(ValueError, match=r"only planes \[0\] of 2"):
        models.max_of_planes_task([[1.0, 1.0], [0.0, 0.0]])
    with pytest.raises(ValueError, match="maximum somewhere"):
        models.max_of_planes_task(planes, [0.0, 0.0, -5.0])


# --------------------------------------------------------------------------- training


def _train_both_ways(make, x, y, steps=25, lr=1e-2):
    """Adam with nnx.Optimizer and with a functional split/merge loop from the same init."""
    tx = optax.adam(lr)

    model = make()
    optimizer = nnx.Optimizer(model, tx, wrt=nnx.Param)

    @nnx.jit
    def nnx_step(model, optimizer):
        loss, grads = nnx.value_and_grad(lambda m: models.mse(m(x), y))(model)
        optimizer.update(model, grads)
        return loss

    nnx_losses = [float(nnx_step(model, optimizer)) for _ in range(steps)]

    apply, params = models.functional(make())
    state = tx.init(params)

    @jax.jit
    def step(params, state):
        loss, grads = jax.value_and_grad(lambda p: models.mse(apply(p, x), y))(params)
        updates, state = tx.update(grads, state, params)
        return optax.apply_updates(params, updates), state, loss

    fn_losses = []
    for _ in range(steps):
        params, state, loss = step(params, state)
        fn_losses.append(float(loss))
    final = float(models.mse(apply(params, x), y))
    return model, nnx_losses, params, fn_losses, final


@pytest.mark.parametrize("task_name", ["maxpool", "sawtooth"])
def test_training_with_nnx_optimizer_and_functional_loop(task_name):
    if task_name == "maxpool":
        task = models.maxpool_task()

        def make():
            return models.MaxPoolNet(rngs=nnx.Rngs(3))
    else:
        task = models.sawtooth_task()

        def make():  # a seed with live units at init, so the loss moves in a few steps
            return models.SawtoothNet(rngs=nnx.Rngs(1))

    model, nnx_losses, params, fn_losses, final = _train_both_ways(make, task.x, task.y)
    assert nnx_losses[-1] < 0.9 * nnx_losses[0], nnx_losses
    assert final < 0.9 * fn_losses[0]
    np.testing.assert_allclose(nnx_losses, fn_losses, rtol=1e-5)
    trained = nnx.state(model, nnx.Param)
    assert jax.tree.structure(trained) == jax.tree.structure(params)
    for a, b in zip(jax.tree.leaves(trained), jax.tree.leaves(params)):
        assert a.dtype == b.dtype == F32
        np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-6)
    # and the trained parameters moved away from the init
    init = nnx.state(make(), nnx.Param)
    pairs = zip(jax.tree.leaves(init), jax.tree.leaves(params))
    assert any(not np.allclose(a, b) for a, b in pairs)
    assert np.isfinite(final)
