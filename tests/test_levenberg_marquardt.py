"""``qo.levenberg_marquardt``: exact on linear least squares, the damping rule, the data-space
and per-example forms agree with the plain one, it runs in populations and turns the
sawtooth net's basin into exact fits."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from flax import nnx

import quotient_opt as qo


def _run(tx, params, loss, steps):
    p, s, losses = jax.jit(lambda p: qo.fit(tx, p, loss, steps))(params)
    return p, s, np.asarray(losses)


def test_one_step_solves_linear_least_squares():
    rng = np.random.default_rng(0)
    A = jnp.asarray(rng.normal(size=(30, 6)), jnp.float32)
    y = jnp.asarray(rng.normal(size=30), jnp.float32)
    params = {"w": jnp.zeros(4, jnp.float32), "b": jnp.zeros(2, jnp.float32)}

    def residual(p):
        return A @ jnp.concatenate([p["b"], p["w"]]) - y  # ravel order: b then w

    tx = qo.levenberg_marquardt(residual, damping=1e-9)
    state = tx.init(params)
    u, state = tx.update(None, state, params)
    got = np.concatenate([np.asarray(u["b"]), np.asarray(u["w"])])
    want = np.linalg.lstsq(np.asarray(A, np.float64), np.asarray(y, np.float64), rcond=None)[0]
    np.testing.assert_allclose(got, want, rtol=1e-3, atol=1e-4)
    assert bool(state.accepted)
    assert float(state.damping) < 1e-9  # a good step shrinks the damping
    r = np.asarray(A, np.float64) @ want - np.asarray(y, np.float64)
    np.testing.assert_allclose(float(state.value), np.mean(r**2), rtol=1e-4)


def rosenbrock(p):
    return jnp.stack([10.0 * (p["y"] - p["x"] ** 2), 1.0 - p["x"]])


def test_damping_rule_and_monotone_descent():
    tx = qo.levenberg_marquardt(rosenbrock, damping=1e-4, scaling="identity")
    p = {"x": jnp.asarray(-1.2, jnp.float64), "y": jnp.asarray(1.0, jnp.float64)}
    with jax.enable_x64(True):
        p = jax.tree.map(lambda a: jnp.asarray(a, jnp.float64), p)
        state = tx.init(p)
        f = float(jnp.sum(rosenbrock(p) ** 2))
        rejected = 0
        for _ in range(60):
            lam, nu = float(state.damping), float(state.nu)
            u, state = tx.update(None, state, p)
            p = optax.apply_updates(p, u)
            f_new = float(jnp.sum(rosenbrock(p) ** 2))
            assert f_new <= f  # never goes up
            if not bool(state.accepted):
                rejected += 1
                assert all(float(v) == 0.0 for v in jax.tree.leaves(u))
                np.testing.assert_allclose(float(state.damping), min(lam * nu, 1e15), rtol=1e-12)
                assert float(state.nu) == 2 * nu
            else:
                # Nielsen: lam * max(1/3, 1 - (2 rho - 1)^3), a factor in [1/3, 2)
                assert lam / 3 * (1 - 1e-12) <= float(state.damping) <= 2 * lam
                assert float(state.nu) == 2.0
            f = f_new
        assert f < 1e-20
        assert 0 < rejected < 60
        np.testing.assert_allclose([float(p["x"]), float(p["y"])], [1.0, 1.0], atol=1e-9)


def _mlp_problem(n_points, width=4, seed=0):
    rng = np.random.default_rng(seed)
    x = jnp.asarray(rng.uniform(-1, 1, size=(n_points, 1)))
    y = jnp.sin(3 * x)
    sizes = [1, width, width, 1]
    params = [
        {"w": jnp.asarray(rng.normal(size=(a, b)) / np.sqrt(a)), "b": jnp.asarray(rng.normal(size=b) * 0.1)}
        for a, b in zip(sizes, sizes[1:])
    ]

    def apply(p, x):
        h = x
        for i, layer in enumerate(p):
            h = h @ layer["w"] + layer["b"]
            if i < len(p) - 1:
                h = jax.nn.relu(h)
        return h

    return x, y, params, apply


@pytest.mark.slow
@pytest.mark.parametrize("n_points", [40, 7])  # P = 33: the parameter- and the data-space solve
def test_per_example_and_data_space_forms_agree(n_points):
    with jax.enable_x64(True):
        x, y, params, apply = _mlp_problem(n_points)
        params = jax.tree.map(lambda a: jnp.asarray(a, jnp.float64), params)
        lam = 0.3

        def residual(p):
            return (apply(p, x) - y).ravel()

        def residual_one(p, ex):
            return apply(p, ex[0][None])[0] - ex[1]

        a = qo.levenberg_marquardt(residual, damping=lam)
        b = qo.levenberg_marquardt(residual_one, damping=lam, data=(x, y))
        c = qo.levenberg_marquardt(residual, damping=lam, jacobian="rev")
        ua, sa = a.update(None, a.init(params), params)
        ub, sb = b.update(None, b.init(params), params)
        uc, _ = c.update(None, c.init(params), params)
        # reference: the parameter-space Marquardt step, solved directly
        flat, unravel = jax.flatten_util.ravel_pytree(params)
        J = np.asarray(jax.jacfwd(lambda v: residual(unravel(v)))(flat))
        r = np.asarray(residual(params))
        d = np.sum(J * J, 0)
        d = np.maximum(d, 1e-9 * d.max())
        want = -np.linalg.solve(J.T @ J + lam * np.diag(d), J.T @ r)
        for u in (ua, ub, uc):
            got = np.asarray(jax.flatten_util.ravel_pytree(u)[0])
            if bool(sa.accepted):
                np.testing.assert_allclose(got, want, rtol=1e-6, atol=1e-9)
        assert bool(sa.accepted) == bool(sb.accepted)
        np.testing.assert_allclose(float(sa.value), float(sb.value), rtol=1e-10)


def test_ignores_extra_args_and_requires_params():
    tx = qo.levenberg_marquardt(rosenbrock)
    p = {"x": jnp.asarray(-1.2), "y": jnp.asarray(1.0)}
    s = tx.init(p)
    u1, _ = tx.update(None, s, p, value_fn=lambda q: 0.0, some_other=3)
    u2, _ = tx.update(None, s, p)
    assert all(bool(jnp.all(a == b)) for a, b in zip(jax.tree.leaves(u1), jax.tree.leaves(u2)))
    with pytest.raises(ValueError, match="params are required"):
        tx.update(None, s)


@pytest.mark.parametrize(
    "kw, match",
    [
        (dict(residual_fn=3), "residual_fn must be callable"),
        (dict(scaling="diag"), "scaling"),
        (dict(jacobian="both"), "jacobian"),
        (dict(damping=0.0), "damping must be > 0"),
        (dict(min_damping=1.0, max_damping=0.5), "min_damping"),
        (dict(data=(jnp.zeros(3), jnp.zeros(4))), "leading example axis"),
    ],
)
def test_bad_arguments(kw, match):
    args = dict(residual_fn=rosenbrock)
    args.update(kw)
    fn = args.pop("residual_fn")
    with pytest.raises(ValueError, match=match):
        qo.levenberg_marquardt(fn, **args)


def test_population_polishes_the_sawtooth_basin_to_exact_fits():
    """Exact sawtooth weights plus noise of norm 0.01: 30 LM steps fit exactly (float32) in a
    population, where 300 Adam steps stay far above (the basin needs a second-order finish)."""
    task = qo.models.sawtooth_task()
    model = qo.models.SawtoothNet(rngs=nnx.Rngs(0))
    apply, _ = qo.models.functional(model)
    center = qo.models.with_dense_weights(model, task.weights)

    def init_fn(key):
        leaves, treedef = jax.tree.flatten(center)
        keys = jax.random.split(key, len(leaves))
        eps = [jax.random.normal(k, a.shape, a.dtype) for k, a in zip(keys, leaves)]
        norm = jnp.sqrt(sum(jnp.sum(e**2) for e in eps))
        return treedef.unflatten([a + 0.01 * e / norm for a, e in zip(leaves, eps)])

    def loss_fn(p):
        return qo.models.mse(apply(p, task.x), task.y)

    tx = qo.levenberg_marquardt(
        lambda p, ex: apply(p, ex[0][None])[0] - ex[1], data=(task.x, task.y)
    )
    key = jax.random.key(3)
    lm = qo.train_population(
        tx, init_fn, loss_fn, nets=6, steps=30, key=key, progress=False, fast_path=False
    )
    assert np.all(lm.losses <= 1e-10), lm.losses
    start = init_fn(jax.random.fold_in(key, 0))
    assert float(loss_fn(start)) > 1e-6
    _, _, adam = jax.jit(lambda p: qo.fit(optax.adam(1e-3), p, loss_fn, 300))(start)
    assert float(loss_fn(start)) > float(adam[-1]) > 1e-9
