"""Tests of qo.revive_dead_units: detection, exact splits, safety, and the stall itself."""

import equinox as eqx
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from flax import nnx

import quotient_opt as qo
from quotient_opt.models import MaxPoolNet, functional, max_of_planes_task, maxpool_task, mse

DTYPES = [jnp.float32, jnp.float64]


def _maxpool(pieces=2, windows=1, d=2, dtype=jnp.float32, seed=0):
    model = MaxPoolNet(pieces, windows, d, rngs=nnx.Rngs(seed), param_dtype=dtype)
    apply, params = functional(model)
    return qo.infer_symmetry(model), apply, params


def _set(params, path, value):
    return qo.symmetry._spec.map_with_path(
        lambda p, x: jnp.asarray(value, x.dtype) if p == path else x, params
    )


def _get(params, path):
    return qo.symmetry._spec.leaves_by_path(params)[path]


def _stalled(dtype=jnp.float32):
    """The question's net at the exact plane (3, 1) with piece 1 far below: dead."""
    task = maxpool_task(dtype=dtype)
    sym, apply, params = _maxpool(dtype=dtype)
    params = _set(params, ("layers", 0, "kernel"), [[3.0, 0.5], [1.0, 0.5]])
    params = _set(params, ("layers", 0, "bias"), [0.0, -100.0])

    def loss(p):
        return mse(apply(p, task.x), task.y)

    return sym, apply, params, loss, task


def _step(tx, params, state, loss):
    g = jax.grad(loss)(params)
    upd, state = tx.update(g, state, params, value_fn=loss)
    return optax.apply_updates(params, upd), state, g


# --------------------------------------------------------------------------- detection


def test_detects_dead_piece_and_revives_it():
    sym, _, params, loss, _ = _stalled()
    tx = qo.revive_dead_units(optax.adam(0.02), sym, patience=5, every=1)
    state = tx.init(params)
    step = jax.jit(lambda p, s: _step(tx, p, s, loss))
    for t in range(4):
        params, state, g = step(params, state)
        assert np.asarray(state.dead_steps[0]).tolist() == [0, t + 1]
        assert int(state.revivals) == 0
    l_before = float(loss(params))
    params, state, _ = step(params, state)  # 5th dead step: revived
    assert int(state.revivals) == 1
    assert np.asarray(state.dead_steps[0]).tolist() == [0, 0]
    assert float(loss(params)) < 0.5 * l_before  # the split took over data and lowered the loss
    g = jax.grad(loss)(params)
    assert np.all(np.abs(np.asarray(_get(g, ("layers", 0, "bias")))) > 0)  # both pieces alive


def test_no_detection_on_healthy_pieces():
    task = maxpool_task()
    sym, apply, params = _maxpool()
    params = _set(params, ("layers", 0, "kernel"), [[1.1, 2.9], [1.9, 1.1]])
    params = _set(params, ("layers", 0, "bias"), [0.05, -0.05])

    def loss(p):
        return mse(apply(p, task.x), task.y)

    tx = qo.revive_dead_units(optax.adam(0.01), sym, patience=2, every=1)
    state = tx.init(params)
    step = jax.jit(lambda p, s: _step(tx, p, s, loss))
    for _ in range(30):
        params, state, _ = step(params, state)
    assert np.asarray(state.dead_steps[0]).tolist() == [0, 0]
    assert int(state.revivals) == 0


def test_no_revival_without_live_donor():
    """At an exact fit every gradient is zero: nothing is dead, nothing moves."""
    task = maxpool_task(dtype=jnp.float64)
    sym, apply, params = _maxpool(dtype=jnp.float64)
    params = _set(params, ("layers", 0, "kernel"), np.asarray(task.kernel))
    params = _set(params, ("layers", 0, "bias"), np.asarray(task.bias))

    def loss(p):
        return mse(apply(p, task.x), task.y)

    tx = qo.revive_dead_units(optax.adam(0.02), sym, patience=1, every=1)
    state = tx.init(params)
    new = params
    step = jax.jit(lambda p, s: _step(tx, p, s, loss))
    for _ in range(3):
        new, state, _ = step(new, state)
    assert int(state.revivals) == 0
    for a, b in zip(jax.tree.leaves(new), jax.tree.leaves(params)):
        np.testing.assert_allclose(a, b, atol=1e-12)


# --------------------------------------------------------------------------- exact splits


def _dead_relu_mlp(dtype):
    model = nnx.Sequential(
        nnx.Linear(3, 6, rngs=nnx.Rngs(1), param_dtype=dtype), nnx.relu,
        nnx.Linear(6, 5, rngs=nnx.Rngs(2), param_dtype=dtype), nnx.relu,
        nnx.Linear(5, 2, rngs=nnx.Rngs(3), param_dtype=dtype),
    )
    apply, params = functional(model)
    k = np.asarray(_get(params, ("layers", 0, "kernel"))).copy()
    b = np.asarray(_get(params, ("layers", 0, "bias"))).copy()
    k[:, 2] = -np.abs(k[:, 2]) - 0.1  # unit 2 is dead on x in [0, 1]^3
    b[2] = -1.0
    params = _set(params, ("layers", 0, "kernel"), k)
    params = _set(params, ("layers", 0, "bias"), b)
    return qo.infer_symmetry(model), apply, params


@pytest.mark.parametrize("dtype", DTYPES)
def test_relu_split_is_exactly_function_preserving_nnx(dtype):
    sym, apply, params = _dead_relu_mlp(dtype)
    x = jax.random.uniform(jax.random.key(0), (64, 3), dtype)
    y = jnp.sin(x.sum(1, keepdims=True)) * jnp.ones((1, 2), dtype)

    def loss(p):
        return mse(apply(p, x), y)

    tx = qo.revive_dead_units(optax.sgd(0.0), sym, patience=1)
    state = tx.init(params)
    g = jax.grad(loss)(params)
    assert np.all(np.asarray(_get(g, ("layers", 0, "kernel")))[:, 2] == 0)
    upd, state = jax.jit(tx.update)(g, state, params)
    new = optax.apply_updates(params, upd)
    assert int(state.revivals) >= 1  # one per layer that has a dead unit
    k_old = np.asarray(_get(params, ("layers", 0, "kernel")))
    k_new = np.asarray(_get(new, ("layers", 0, "kernel")))
    close = dict(rtol=1e-6, atol=1e-6) if dtype == jnp.float32 else dict(rtol=1e-14, atol=0)
    (r,) = [j for j in range(6) if not np.allclose(k_new[:, j], k_old[:, j], **close)]
    dead_before = np.all(np.asarray(_get(g, ("layers", 0, "kernel")))[:, r] == 0)
    assert dead_before  # the revived unit was dead (unit 2, or one dead at init)
    donor = [j for j in range(6) if j != r and np.allclose(k_new[:, j], k_new[:, r], **close)]
    assert donor, "the revived unit should be a copy of a live unit"
    out_old = np.asarray(_get(params, ("layers", 2, "kernel")))
    out = np.asarray(_get(new, ("layers", 2, "kernel")))
    if int(state.revivals) == 1:  # layer 2's columns untouched: rows compare directly
        np.testing.assert_allclose(out[r], out[donor[0]], **close)
        np.testing.assert_allclose(2 * out[r], out_old[donor[0]], **close)
    tol = 1e-5 if dtype == jnp.float32 else 1e-13
    np.testing.assert_allclose(apply(new, x), apply(params, x), rtol=tol, atol=tol)
    g_new = jax.grad(loss)(new)
    assert np.any(np.asarray(_get(g_new, ("layers", 0, "kernel")))[:, r] != 0)


@pytest.mark.parametrize("dtype", [jnp.float32])
def test_relu_split_is_exactly_function_preserving_equinox(dtype):
    model = eqx.nn.MLP(3, 2, 6, 2, activation=jax.nn.relu, key=jax.random.key(0))
    model = jax.tree.map(lambda a: a.astype(dtype) if eqx.is_array(a) else a, model)
    sym = qo.infer_symmetry(model)
    params, static = eqx.partition(model, eqx.is_array)
    w = np.asarray(params.layers[0].weight).copy()
    b = np.asarray(params.layers[0].bias).copy()
    w[4] = -np.abs(w[4]) - 0.1
    b[4] = -1.0
    params = eqx.tree_at(lambda m: (m.layers[0].weight, m.layers[0].bias), params,
                         (jnp.asarray(w, dtype), jnp.asarray(b, dtype)))
    x = jax.random.uniform(jax.random.key(1), (64, 3), dtype)

    def f(p):
        return jax.vmap(eqx.combine(p, static))(x)

    def loss(p):
        return jnp.mean((f(p) - 1.0) ** 2)

    tx = qo.revive_dead_units(optax.sgd(0.0), sym, patience=1)
    state = tx.init(params)
    upd, state = jax.jit(tx.update)(jax.grad(loss)(params), state, params)
    new = optax.apply_updates(params, upd)
    assert int(state.revivals) >= 1
    changed = [j for j in range(6) if not np.allclose(np.asarray(new.layers[0].weight[j]), w[j])]
    assert len(changed) == 1
    tol = 1e-5 if dtype == jnp.float32 else 1e-13
    np.testing.assert_allclose(f(new), f(params), rtol=tol, atol=tol)


@pytest.mark.parametrize("use_value_fn", [True, False])
def test_maxpool_split_changes_function_by_at_most_the_perturbation(use_value_fn):
    sym, apply, params, loss, task = _stalled(jnp.float64)
    pert = 0.01
    tx = qo.revive_dead_units(optax.sgd(0.0), sym, patience=1, perturbation=pert,
                              line_search=False, newton_steps=0)
    state = tx.init(params)
    g = jax.grad(loss)(params)
    vf = loss if use_value_fn else None
    upd, state = jax.jit(lambda g, s, p: tx.update(g, s, p, value_fn=vf))(g, state, params)
    new = optax.apply_updates(params, upd)
    assert int(state.revivals) == 1
    k = np.asarray(_get(params, ("layers", 0, "kernel")))
    a = pert * np.linalg.norm(np.r_[k[:, 0], 0.0])  # eps = perturbation * |donor|
    xs = np.asarray(task.x)
    diff = np.asarray(apply(new, task.x) - apply(params, task.x))
    assert np.all(diff >= -1e-12)  # a max can only grow
    bound = 2 * a * np.linalg.norm(xs, axis=1).max() if use_value_fn else a * np.sqrt(
        (np.linalg.norm(xs, axis=1) ** 2 + 1).max())
    assert diff.max() <= bound + 1e-12
    if use_value_fn:  # the kink passes through the data: new piece wins somewhere, not everywhere
        assert 0 < np.mean(diff > 0) < 1


def test_update_is_move_plus_inner_update_at_moved_point():
    sym, _, params, loss, _ = _stalled(jnp.float64)
    g = jax.grad(loss)(params)
    lr = 0.1
    outs = []
    for inner in (optax.sgd(0.0), optax.sgd(lr)):
        tx = qo.revive_dead_units(inner, sym, patience=1, newton_steps=0, num_candidates=2,
                                  line_search=False)
        upd, st = jax.jit(lambda g, s, p: tx.update(g, s, p, value_fn=loss))(
            g, tx.init(params), params)
        outs.append(upd)
        assert int(st.revivals) == 1
    for u0, u1, gi in zip(jax.tree.leaves(outs[0]), jax.tree.leaves(outs[1]), jax.tree.leaves(g)):
        np.testing.assert_allclose(u1 - u0, -lr * gi, atol=1e-12)


def test_inner_state_of_revived_piece_is_reset():
    sym, _, params, loss, _ = _stalled()
    tx = qo.revive_dead_units(optax.adam(0.02), sym, patience=3, every=1, newton_steps=0)
    state = tx.init(params)
    step = jax.jit(lambda p, s: _step(tx, p, s, loss))
    for _ in range(3):
        params, state, _ = step(params, state)
    assert int(state.revivals) == 1
    adam_state = state.inner_state[0]
    for path in (("layers", 0, "bias"), ("layers", 0, "kernel")):
        mu = np.asarray(_get(adam_state.mu, path))[..., 1]
        nu = np.asarray(_get(adam_state.nu, path))[..., 1]
        np.testing.assert_array_equal(mu, 0)  # momentum reset (its gradient was zero)
        assert np.all(nu > 0)  # second moments inherited from the donor (its own were 0)


# --------------------------------------------------------------------------- generality


@pytest.mark.slow
@pytest.mark.parametrize("pieces,windows,d", [(3, 2, 4), (4, 3, 1)])
def test_k_pieces_several_windows_any_dim(pieces, windows, d):
    sym, apply, params = _maxpool(pieces, windows, d, dtype=jnp.float64, seed=3)
    rng = np.random.default_rng(0)
    x = jnp.asarray(rng.uniform(size=(200, d)))
    y = jnp.asarray(rng.normal(size=(200, windows)) + np.maximum(0, x @ rng.normal(size=(d, 1))))

    def loss(p):
        return mse(apply(p, x), y)

    b = np.asarray(_get(params, ("layers", 0, "bias"))).copy()
    b[[w * pieces + (w % pieces) for w in range(windows)]] = -100.0  # one dead piece per window
    params = _set(params, ("layers", 0, "bias"), b)

    def n_dead(p):
        g = np.asarray(_get(jax.grad(loss)(p), ("layers", 0, "bias")))
        return int(np.sum(g == 0))

    d0 = n_dead(params)
    assert d0 >= windows
    tx = qo.revive_dead_units(optax.adam(1e-3), sym, patience=2, every=1, newton_steps=2)
    state = tx.init(params)
    l0 = float(loss(params))
    step = jax.jit(lambda p, s: _step(tx, p, s, loss))
    for _ in range(2 + d0):
        params, state, _ = step(params, state)
    assert int(state.revivals) >= 2  # one per step at most (the split must lower the loss)
    assert n_dead(params) < d0
    assert float(loss(params)) < l0


def test_jit_scan_vmap_match_unbatched_runs():
    """Two compiled programs of a run through revivals, so float64 and a tolerance from the
    measured spread: over seeds 0-7, at most 2.4e-15 relative (a one-ulp change of the start:
    1.0e-15); in float32 2.9e-7 (4.8e-7)."""
    task = maxpool_task(dtype=jnp.float64)
    sym, apply, _ = _maxpool(dtype=jnp.float64)

    def loss(p):
        return mse(apply(p, task.x), task.y)

    def run(seed):
        params = nnx.state(MaxPoolNet(rngs=nnx.Rngs(params=jax.random.key(seed)),
                                      param_dtype=jnp.float64), nnx.Param)
        tx = qo.revive_dead_units(optax.adam(0.02), sym, patience=5, every=5, seed=seed,
                                  newton_steps=0, num_candidates=2)

        _, s, ls = qo.fit(tx, params, loss, 40)
        return ls, s.revivals

    seeds = jnp.arange(3)
    ls_v, rev_v = jax.jit(jax.vmap(run))(seeds)
    for i in range(3):
        ls_i, rev_i = jax.jit(run)(seeds[i])
        assert int(rev_i) == int(rev_v[i])
        np.testing.assert_allclose(ls_i, ls_v[i], rtol=1e-10, atol=1e-15)
    assert int(jnp.sum(rev_v)) > 0  # the runs did exercise the revival branch


# --------------------------------------------------------------------------- errors


def test_configuration_and_structure_errors():
    sym, _, params = _maxpool()
    with pytest.raises(ValueError, match="num_candidates"):
        qo.revive_dead_units(optax.adam(0.1), sym, num_candidates=0)
    with pytest.raises(ValueError, match="every"):
        qo.revive_dead_units(optax.adam(0.1), sym, every=0)
    with pytest.raises(ValueError, match="patience"):
        qo.revive_dead_units(optax.adam(0.1), sym, patience=-1)
    with pytest.raises(ValueError, match="polish_every"):
        qo.revive_dead_units(optax.adam(0.1), sym, polish_every=0)
    with pytest.raises(ValueError, match="min_support"):
        qo.revive_dead_units(optax.adam(0.1), sym, min_support=1.5)
    with pytest.raises(ValueError, match="max_served needs axis_name"):
        qo.revive_dead_units(optax.adam(0.1), sym, max_served=8)
    with pytest.raises(ValueError, match="max_served"):
        qo.revive_dead_units(optax.adam(0.1), sym, max_served=0, axis_name="i")
    other = nnx.state(MaxPoolNet(3, 1, 2, rngs=nnx.Rngs(0)), nnx.Param)
    with pytest.raises(ValueError, match="layers/0/kernel"):
        qo.revive_dead_units(optax.adam(0.1), sym).init(other)
    tx = qo.revive_dead_units(optax.adam(0.1), sym)
    with pytest.raises(ValueError, match="params"):
        tx.update(params, tx.init(params))


# --------------------------------------------------------------------------- the stall


# The stall itself (revival beats plain Adam over 32 seeds) is a research outcome, checked by
# ``python -m benchmarks.maxpool --check`` (``make check``, run by ``.ci/run``).


def test_three_plane_task_is_well_posed():
    # the benchmark's extra tasks must use every piece (max_of_planes_task checks)
    from benchmarks import maxpool as bench

    for name in bench.TASKS:
        task, pieces, d = bench.make_task(name)
        assert task.kernel.shape == (d, pieces)
    with pytest.raises(ValueError, match="planes"):
        max_of_planes_task([[1.0, 0.0], [0.0, 1.0], [0.1, 0.1]])


# --------------------------------------------------------------------------- starved pieces, polish


def _question_with(kernel, bias, dtype=jnp.float32):
    task = maxpool_task(dtype=dtype)
    sym, apply, params = _maxpool(dtype=dtype)
    params = _set(params, ("layers", 0, "kernel"), kernel)
    params = _set(params, ("layers", 0, "bias"), bias)

    def loss(p):
        return mse(apply(p, task.x), task.y)

    return sym, params, loss


@pytest.mark.slow
@pytest.mark.parametrize("min_support", [0.05, 0.0])
def test_starved_piece_is_revived_only_with_min_support(min_support):
    # piece 0 is the plane (3, 1); piece 1 = (1, 2) - 0.8 wins ~1% of the points:
    # alive (nonzero gradient) but starved, a stall just like a dead piece.
    sym, params, loss = _question_with([[3.0, 1.0], [1.0, 2.0]], [0.0, -0.8])
    g = jax.grad(loss)(params)
    assert np.all(np.asarray(_get(g, ("layers", 0, "bias"))) != 0)  # nothing is dead
    tx = qo.revive_dead_units(optax.sgd(0.0), sym, patience=2, every=1,
                              min_support=min_support)
    state = tx.init(params)
    step = jax.jit(lambda p, s: _step(tx, p, s, loss))
    l0 = float(loss(params))
    for _ in range(3):
        params, state, _ = step(params, state)
    if min_support > 0:
        assert int(state.revivals) >= 1
        assert float(loss(params)) < 1e-3 * l0
    else:
        assert int(state.revivals) == 0
        assert float(loss(params)) == pytest.approx(l0)


@pytest.mark.slow
def test_periodic_polish_finishes_a_nearly_right_fit():
    # Both pieces alive and nearly right (where Adam converges only linearly).
    sym, params, loss = _question_with([[3.0, 0.97], [1.0, 2.009]], [0.0, -0.001])
    assert float(loss(params)) > 1e-6
    for polish_every, expect_fit in ((3, True), (None, False)):
        tx = qo.revive_dead_units(optax.sgd(1e-4), sym, polish_every=polish_every)
        state = tx.init(params)
        step = jax.jit(lambda p, s, tx=tx: _step(tx, p, s, loss))
        p = params
        for _ in range(4):
            p, state, _ = step(p, state)
        assert (float(loss(p)) < 1e-10) == expect_fit, (polish_every, float(loss(p)))


@pytest.mark.slow
def test_window_polish_under_vmap_matches_unbatched():
    # Regression: under vmap, the polish inside a lax loop dropped the step of
    # one batch member (the second set of weights below).
    from quotient_opt.transforms._revive import _polish_window

    task = max_of_planes_task([[1, 1], [3, 1], [1, 3], [3, 3]], [-0.25, -1.25, -1.25, -2.25])
    sym, apply, params = _maxpool(pieces=4)

    def loss(p):
        return mse(apply(p, task.x), task.y)

    sets = [
        ([[3.0006, 3.0, 1.0203, 1.0], [2.9762, 1.0, 3.0112, 1.0]], [-2.2324, -1.25, -1.2637, -0.25]),
        ([[3.0, 1.0004, 1.0, 3.0022], [1.0, 3.0032, 1.0, 2.9763]], [-1.25, -1.2526, -0.25, -2.2338]),
    ]
    ps = [_set(_set(params, ("layers", 0, "kernel"), k), ("layers", 0, "bias"), b) for k, b in sets]
    polish = lambda p: loss(_polish_window(sym.groups[0], p, 0, loss, 5))  # noqa: E731
    single = [float(jax.jit(polish)(p)) for p in ps]
    batched = jax.vmap(polish)(jax.tree.map(lambda *a: jnp.stack(a), *ps))
    assert max(single) < 1e-10, single
    np.testing.assert_allclose(np.asarray(batched), single, rtol=0.5, atol=1e-12)


# --------------------------------------------------------------------------- populations


def _uniform(params, seed, bound, nets=None):
    """Params drawn from ``U[-bound, bound]`` (``nets`` of them stacked, if given)."""
    leaves, treedef = jax.tree.flatten(params)
    keys = jax.random.split(jax.random.key(seed), len(leaves))
    lead = () if nets is None else (nets,)
    return jax.tree.unflatten(treedef, [
        jax.random.uniform(k, (*lead, *a.shape), a.dtype, -bound, bound)
        for k, a in zip(keys, leaves)
    ])


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("pieces,windows", [(3, 1), (2, 3)])
def test_support_share_is_the_share_of_data_each_piece_wins(dtype, pieces, windows):
    from quotient_opt.transforms._revive import _support_share

    sym, apply, params = _maxpool(pieces, windows, dtype=dtype)
    grp = next(g for g in sym.groups if g.pieces > 1)
    task = max_of_planes_task([[1.0, 1.0], [3.0, 1.0], [1.0, 3.0]], [0.0, -1.0, -1.0], dtype=dtype)

    def loss(p):
        return mse(apply(p, task.x), task.y)

    share = jax.jit(lambda p: _support_share(sym, grp, p, loss))
    for seed in range(5):
        p = _uniform(params, seed, 1.0)
        kernel, bias = _get(p, ("layers", 0, "kernel")), _get(p, ("layers", 0, "bias"))
        z = np.asarray(task.x @ kernel + bias).reshape(len(task.x), windows, pieces)
        won = np.stack([(z.argmax(-1) == j).mean(0) for j in range(pieces)], -1).reshape(-1)
        tol = 1e-5 if dtype == jnp.float32 else 1e-12
        np.testing.assert_allclose(share(p), won, atol=tol)


def _chunks(tx, nets, seed=0, dtype=jnp.float32):
    """``(chunk, p, s)``: 10 steps of ``nets`` 3-piece maxout networks trained together
    (``chunk(p, s) -> ((p, s), losses)``), from their initial params and state."""
    from quotient_opt.training import make_population_step

    sym, apply, params = _maxpool(3, dtype=dtype)
    task = max_of_planes_task([[1.0, 1.0], [3.0, 1.0], [1.0, 3.0]], [0.0, -1.0, -1.0], n=200,
                              dtype=dtype)

    def loss(p):
        return mse(apply(p, task.x), task.y)

    p = _uniform(params, seed, 0.7, nets)
    ps = make_population_step(tx(sym), loss, params)

    @jax.jit
    def chunk(p, s):
        def body(c, _):
            p, s, losses = ps.step(*c)
            return (p, s), losses
        return jax.lax.scan(body, (p, s), None, length=10)

    return chunk, p, ps.init(p), loss


def _population(tx, nets, steps, seed=0):
    """The final losses and the ``(state, losses)`` after each chunk of 10 steps."""
    chunk, p, s, loss = _chunks(tx, nets, seed)
    history = []
    for _ in range(steps // 10):
        (p, s), losses = chunk(p, s)
        history.append((s, losses))
    return jax.vmap(loss)(p), history


@pytest.mark.slow
def test_population_revives_only_due_networks_as_if_each_trained_alone():
    """With ``axis_name``, the due networks are gathered and revived once; each network's run
    is the one it has under a plain ``vmap`` (where every network computes every revival).

    The two are differently compiled programs of a chaotic run, so they are compared chunk by
    chunk from the same state (the gathered run's), in float64, without the window Newton
    steps: a Newton step can make two pieces identical, and the partition of the data between
    them is then decided by rounding (measured: 1e-16 at the start of the first revival moved
    one network by 0.1). Measured spread of this comparison over seeds 0-4 and 15 chunks:
    at most 1.8e-11 relative (a one-ulp change of the chunk's start: 1.8e-11 too); float32
    spreads to 6e-3, and to 1.9e-4 on other machines before this check compared chunks.
    """
    def tx(axis_name):
        return lambda sym: qo.revive_dead_units(optax.adam(0.02), sym, every=10, patience=5,
                                                num_candidates=2, newton_steps=0,
                                                axis_name=axis_name)

    nets = 24  # gathered sizes: 8, then the whole population
    gathered, p, s, _ = _chunks(tx(qo.training.POPULATION_AXIS), nets, dtype=jnp.float64)
    plain = _chunks(tx(None), nets, dtype=jnp.float64)[0]
    due_per_check = []
    for _ in range(15):
        (p1, s1), losses = gathered(p, s)
        (p2, s2), losses_v = plain(p, s)
        np.testing.assert_array_equal(s1.attempts, s2.attempts)
        np.testing.assert_array_equal(s1.revivals, s2.revivals)
        np.testing.assert_allclose(losses, losses_v, rtol=1e-8, atol=1e-14)
        for a, b in zip(jax.tree.leaves(p1), jax.tree.leaves(p2)):
            np.testing.assert_allclose(a, b, rtol=1e-8, atol=1e-10)
        due_per_check.append(int(s1.attempts.sum() - s.attempts.sum()))
        p, s = p1, s1
    due = np.asarray(due_per_check)
    assert due.max() > 8 and ((due >= 1) & (due <= 8)).any(), due  # both branches ran
    assert int(s.revivals.sum()) > 0


def test_population_cap_serves_at_most_max_served_per_check_in_rotation():
    """``max_served`` bounds each check to that many due networks; the others stay due
    (their dead counts keep growing) and are served at later checks, in a rotating order."""
    cap = 3
    tx = lambda sym: qo.revive_dead_units(optax.adam(0.02), sym, every=10, patience=5,  # noqa: E731
                                          num_candidates=2, newton_steps=0, max_served=cap,
                                          axis_name=qo.training.POPULATION_AXIS)
    chunk, p, s, _ = _chunks(tx, 24)
    served, waiting = [], []
    for _ in range(6):  # checks at steps 10, 20, 30, 40, 50
        (p, s1), _ = chunk(p, s)
        served.append(np.asarray(s1.attempts - s.attempts))
        waiting.append(np.asarray(sum(jnp.any(d >= 5, axis=-1) for d in s1.dead_steps)) > 0)
        s = s1
    per_check = [int(x.sum()) for x in served]
    assert max(per_check) == cap and all(n <= cap for n in per_check), per_check
    full = per_check.index(cap)
    assert (waiting[full] & (served[full] == 0)).sum() > 0  # more were due than served
    ever = np.stack(served).sum(0) > 0
    assert ever.sum() > cap, ever  # the rotation reached other networks


@pytest.mark.parametrize("due,cap,turn,want", [
    (range(10), 3, 0, [0, 1, 2]),
    (range(10), 3, 1, [3, 4, 5]),
    (range(10), 3, 3, [0, 1, 9]),  # the order wraps around
    ([1, 5, 7, 8], 2, 0, [1, 5]),
    ([1, 5, 7, 8], 2, 1, [5, 7]),  # starts at network 2
    ([1, 5, 7, 8], 2, 4, [1, 8]),  # starts at network 8, then wraps to 1
    ([1, 5, 7, 8], 5, 0, [1, 5, 7, 8]),
    ([1, 5, 7, 8], 20, 4, [1, 5, 7, 8]),
])
def test_serving_takes_the_first_due_networks_in_a_rotating_order(due, cap, turn, want):
    from quotient_opt.transforms._revive import _serving

    flags = jnp.zeros((10,), bool).at[jnp.asarray(list(due))].set(True)
    served = jax.vmap(lambda f: _serving("i", f, cap, jnp.asarray(turn)), axis_name="i")(flags)
    assert np.flatnonzero(np.asarray(served)).tolist() == want


@pytest.mark.slow
def test_converged_population_is_not_flagged_starved():
    """Regression: in the population's compiled scan the support check once found most
    converged networks starved at every check (a wrong curvature), costing a revival each."""
    tx = lambda sym: qo.revive_dead_units(optax.adam(0.02), sym, every=50, patience=10,  # noqa: E731
                                          axis_name=qo.training.POPULATION_AXIS)
    final, hist = _population(tx, 256, 400)
    fitted = np.asarray(final) < 1e-6
    assert fitted.mean() > 0.9
    late = np.asarray(hist[-1][0].attempts - hist[29][0].attempts)  # checks at steps 300 and 350
    assert late[fitted].sum() <= 0.02 * fitted.sum(), late[fitted].sum()
