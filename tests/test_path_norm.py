"""Tests for scale_by_path_norm / path_sgd (Path-SGD)."""

from __future__ import annotations

import itertools

import equinox as eqx
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from flax import nnx
from hypothesis import given
from hypothesis import strategies as st

import quotient_opt as qo
from quotient_opt.symmetry._spec import leaves_by_path, map_with_path
from quotient_opt.models import MaxOverPieces, functional


def maxpool_hidden_net(dtype=jnp.float64, seed=0):
    """3 -> (4 windows x 2 pieces, max) -> 3 ReLU -> 2, with biases."""
    rngs = nnx.Rngs(seed)
    init = nnx.initializers.normal(1.0)
    return nnx.Sequential(
        nnx.Linear(3, 8, kernel_init=init, bias_init=init, param_dtype=dtype, rngs=rngs),
        MaxOverPieces(2),
        nnx.Linear(4, 3, kernel_init=init, bias_init=init, param_dtype=dtype, rngs=rngs),
        nnx.relu,
        nnx.Linear(3, 2, kernel_init=init, bias_init=init, param_dtype=dtype, rngs=rngs),
    )


def eqx_net(dtype=jnp.float64, seed=0):
    m = eqx.nn.MLP(3, 2, 4, 2, key=jax.random.key(seed), dtype=dtype)
    return m, eqx.filter(m, eqx.is_array)


def chain(which: str) -> list[qo.Dense]:
    """The dense chain of each test network, written by hand for the brute force."""
    if which == "nnx_maxpool":
        sizes, pieces, out_axis, names = [(3, 8), (4, 3), (3, 2)], [2, 1, 1], 1, (0, 2, 4)
    elif which == "eqx_mlp":
        sizes, pieces, out_axis, names = [(3, 4), (4, 4), (4, 2)], [1, 1, 1], 0, (0, 1, 2)
    else:
        sizes, pieces, out_axis, names = [(1, 2), (2, 2), (2, 2), (2, 1)], [1] * 4, 1, (0, 2, 4, 6)
    kname = "kernel" if out_axis == 1 else "weight"
    return [qo.Dense(f"layers/{i}", ("layers", i, kname), ("layers", i, "bias"), a, b, out_axis,
                     pieces=k) for i, (a, b), k in zip(names, sizes, pieces)]


def brute_force_gamma(layers: list[qo.Dense], params) -> dict:
    """Per-weight path sums by enumerating every path (numpy, float64)."""
    leaves = {p: np.asarray(x, np.float64) for p, x in leaves_by_path(params).items()}
    ks = [leaves[l.kernel] if l.kernel_out_axis == 1 else leaves[l.kernel].T for l in layers]
    bs = [leaves[l.bias] if l.bias is not None else None for l in layers]
    gk = [np.zeros_like(k) for k in ks]
    gb = [np.zeros_like(b) if b is not None else None for b in bs]

    def paths_from(layer, piece):
        """All edge lists from piece `piece` of `layer` to an output."""
        if layer == len(layers) - 1:
            yield []
            return
        win = piece // layers[layer].pieces
        for j in range(layers[layer + 1].out_features):
            for rest in paths_from(layer + 1, j):
                yield [("k", layer + 1, (win, j))] + rest

    starts = []
    for i, j in itertools.product(range(layers[0].in_features), range(layers[0].out_features)):
        starts.append((("k", 0, (i, j)), 0, j))
    for l, lay in enumerate(layers):
        if bs[l] is not None:
            for j in range(lay.out_features):
                starts.append((("b", l, j), l, j))
    for first, layer, piece in starts:
        for rest in paths_from(layer, piece):
            path = [first] + rest
            vals = [ks[l][idx] if kind == "k" else bs[l][idx] for kind, l, idx in path]
            for e, (kind, l, idx) in enumerate(path):
                others = np.prod([v**2 for f, v in enumerate(vals) if f != e])
                if kind == "k":
                    gk[l][idx] += others
                else:
                    gb[l][idx] += others
    out = {}
    for l, lay in enumerate(layers):
        out[lay.kernel] = gk[l] if lay.kernel_out_axis == 1 else gk[l].T
        if lay.bias is not None:
            out[lay.bias] = gb[l]
    return out


@pytest.mark.slow
@pytest.mark.parametrize("which", ["nnx_maxpool", "eqx_mlp", "sawtooth_small"])
def test_matches_brute_force_path_enumeration(which):
    if which == "nnx_maxpool":
        model = maxpool_hidden_net()
        sym = qo.infer_symmetry(model)
        _, params = functional(model)
    elif which == "eqx_mlp":
        model, params = eqx_net()
        sym = qo.infer_symmetry(model)
    else:
        model = qo.models.SawtoothNet(width=2, depth=3, rngs=nnx.Rngs(1), param_dtype=jnp.float64)
        sym = qo.infer_symmetry(model)
        _, params = functional(model)
        params = map_with_path(lambda p, x: x + 0.3 if p[-1] == "bias" else x, params)
    got = leaves_by_path(jax.jit(lambda p: qo.path_norm_curvature(sym, p))(params))
    want = brute_force_gamma(chain(which), params)
    assert set(got) == set(want)
    for p in want:
        assert got[p].shape == want[p].shape
        np.testing.assert_allclose(np.asarray(got[p]), want[p], rtol=1e-12, atol=0)
        assert np.all(want[p] > 0)


def _sawtooth(dtype):
    model = qo.models.SawtoothNet(rngs=nnx.Rngs(0), param_dtype=dtype)
    apply, params = functional(model)
    params = map_with_path(lambda p, x: x + 0.1 if p[-1] == "bias" else x, params)
    return qo.infer_symmetry(model), apply, params


_MP_MODEL = maxpool_hidden_net()
_MP_SYM = qo.infer_symmetry(_MP_MODEL)
_MP_PARAMS = functional(_MP_MODEL)[1]


@jax.jit
def _gamma_both_ways(key):
    g = _MP_SYM.sample(key, log_scale=3.0, dtype=jnp.float64)
    lhs = qo.path_norm_curvature(_MP_SYM, _MP_SYM.act(_MP_PARAMS, g))
    rhs = _MP_SYM.act(qo.path_norm_curvature(_MP_SYM, _MP_PARAMS), g, power=-2)
    return lhs, rhs


@given(seed=st.integers(0, 2**31 - 1))
def test_curvature_transforms_like_a_second_moment(seed):
    """gamma(g.theta) = g^{-2} gamma(theta): exact rescaling (and permutation) covariance."""
    lhs, rhs = map(leaves_by_path, _gamma_both_ways(jax.random.key(seed)))
    for p in lhs:
        np.testing.assert_allclose(lhs[p], rhs[p], rtol=1e-11)


@pytest.mark.slow
@pytest.mark.parametrize("dtype,tol", [(jnp.float32, 2e-5), (jnp.float64, 1e-11)])
def test_step_is_equivariant(dtype, tol):
    """One Path-SGD step at g.theta with the transformed gradient is g times the step."""
    sym, apply, params = _sawtooth(dtype)
    task = qo.models.sawtooth_task(dtype=dtype)
    tx = qo.scale_by_path_norm(sym)
    loss = lambda p: qo.models.mse(apply(p, task.x), task.y)  # noqa: E731

    def step(p):
        u, _ = tx.update(jax.grad(loss)(p), tx.init(p), p)
        return u

    @jax.jit
    def both(key):
        g = sym.sample(key, log_scale=3.0, dtype=dtype)
        return step(sym.act(params, g)), sym.act(step(params), g)

    for seed in range(3):
        u_g, want = map(leaves_by_path, both(jax.random.key(seed)))
        for p in want:
            assert u_g[p].dtype == dtype
            scale = float(jnp.max(jnp.abs(want[p]))) + 1e-30
            assert float(jnp.max(jnp.abs(u_g[p] - want[p]))) <= tol * scale, p


def test_path_sgd_training_is_equivariant_float64():
    """Training from theta and from g.theta (momentum) stays on one orbit."""
    sym, apply, params = _sawtooth(jnp.float64)
    task = qo.models.sawtooth_task(dtype=jnp.float64)
    tx = qo.path_sgd(0.01, sym, momentum=0.9)
    loss = lambda p: qo.models.mse(apply(p, task.x), task.y)  # noqa: E731

    @jax.jit
    def train(p):
        p, _, losses = qo.fit(tx, p, loss, 200)
        return p, losses

    g = sym.sample(jax.random.key(7), log_scale=3.0, dtype=jnp.float64)
    p1, l1 = train(params)
    p2, l2 = train(sym.act(params, g))
    assert float(l1[-1]) < 0.8 * float(l1[0])  # it trains
    np.testing.assert_allclose(l1, l2, rtol=1e-8)
    a, b = leaves_by_path(sym.act(p1, g)), leaves_by_path(p2)
    for p in a:
        np.testing.assert_allclose(a[p], b[p], rtol=1e-7, atol=1e-9)
    grid = jnp.linspace(-0.2, 1.2, 101, dtype=jnp.float64)[:, None]
    out = apply(p1, grid)
    assert float(jnp.std(out)) > 1e-3  # not a constant function
    np.testing.assert_allclose(out, apply(p2, grid), rtol=1e-8, atol=1e-10)


def test_plain_sgd_is_not_equivariant():
    """The same check fails for optax.sgd (sanity of the test above)."""
    sym, apply, params = _sawtooth(jnp.float64)
    task = qo.models.sawtooth_task(dtype=jnp.float64)
    loss = lambda p: qo.models.mse(apply(p, task.x), task.y)  # noqa: E731
    step = jax.jit(
        lambda p: optax.apply_updates(p, jax.tree.map(lambda x: -0.01 * x, jax.grad(loss)(p)))
    )
    g = sym.sample(jax.random.key(7), log_scale=3.0, dtype=jnp.float64)
    p1, p2 = params, sym.act(params, g)
    for _ in range(20):
        p1, p2 = step(p1), step(p2)
    grid = jnp.linspace(0.0, 1.0, 51, dtype=jnp.float64)[:, None]
    assert float(jnp.max(jnp.abs(apply(p1, grid) - apply(p2, grid)))) > 1e-4


def test_dead_unit_gives_no_nan_and_zero_step():
    model = maxpool_hidden_net()
    sym = qo.infer_symmetry(model)
    apply, params = functional(model)
    # ReLU unit 1 of layers/2: zero outgoing weights -> gamma of its incoming weights is 0.
    params = map_with_path(
        lambda p, x: x.at[1, :].set(0.0) if p == ("layers", 4, "kernel") else x, params
    )
    gamma = leaves_by_path(jax.jit(lambda p: qo.path_norm_curvature(sym, p))(params))
    assert float(jnp.max(jnp.abs(gamma[("layers", 2, "kernel")][:, 1]))) == 0.0
    x = jax.random.normal(jax.random.key(0), (16, 3), jnp.float64)
    tx = qo.scale_by_path_norm(sym)

    @jax.jit
    def step(p):
        grads = jax.grad(lambda p: jnp.sum(apply(p, x) ** 2))(p)
        return tx.update(grads, tx.init(p), p)[0]

    u = step(params)
    for leaf in jax.tree.leaves(u):
        assert bool(jnp.all(jnp.isfinite(leaf)))
    assert float(jnp.max(jnp.abs(leaves_by_path(u)[("layers", 2, "kernel")][:, 1]))) == 0.0


def test_extreme_scales_stay_finite_float32():
    sym, apply, params = _sawtooth(jnp.float32)
    tx = qo.scale_by_path_norm(sym)

    @jax.jit
    def extreme(params, key):
        g = sym.sample(key, log_scale=20.0, permute=False)
        p = sym.act(params, sym.scales_only(tuple(jnp.sign(e.log_scale) * 20.0 for e in g)))
        return tx.update(jax.tree.map(jnp.ones_like, p), tx.init(p), p)[0]

    u = extreme(params, jax.random.key(0))
    for leaf in jax.tree.leaves(u):
        assert not bool(jnp.any(jnp.isnan(leaf)))


def test_path_sgd_decreases_loss_on_maxpool_task():
    model = qo.models.MaxPoolNet(rngs=nnx.Rngs(3))
    sym = qo.infer_symmetry(model)
    apply, params = functional(model)
    task = qo.models.maxpool_task(n=200)
    loss = lambda p: qo.models.mse(apply(p, task.x), task.y)  # noqa: E731
    tx = qo.path_sgd(0.05, sym, momentum=0.9)

    @jax.jit
    def train(p):
        return qo.fit(tx, p, loss, 300)[0]

    assert float(loss(train(params))) < 0.1 * float(loss(params))


def test_errors():
    sym, _, params = _sawtooth(jnp.float32)
    with pytest.raises(ValueError, match="sym"):
        qo.scale_by_path_norm("not a symmetry")
    with pytest.raises(ValueError, match="eps"):
        qo.scale_by_path_norm(sym, eps=0.0)
    tx = qo.scale_by_path_norm(sym)
    other = functional(qo.models.MaxPoolNet(rngs=nnx.Rngs(0)))[1]
    with pytest.raises(ValueError, match="layers/0/kernel"):
        tx.init(other)
    with pytest.raises(ValueError, match="params"):
        tx.update(params, tx.init(params))


@pytest.mark.parametrize("make", [
    lambda sym: qo.path_sgd(0.1, sym),
    lambda sym: qo.path_sgd(0.1, sym, momentum=0.9),
    lambda sym: optax.chain(qo.scale_by_path_norm(sym), qo.project_horizontal(sym),
                            optax.scale(-0.1)),
], ids=["path_sgd", "path_sgd momentum", "path norm + projection"])
def test_one_nan_gradient_entry_stays_in_its_entry(make):
    """Issue 17: one NaN gradient entry made every parameter NaN within 3 steps (the
    NaN parameter entered every path sum). A non-finite parameter now counts as a zero
    weight in the path sums, so after 3 steps (gradients finite after the first) only
    the entry that received the NaN is NaN, as with an elementwise optimizer."""
    model = maxpool_hidden_net()
    sym = qo.infer_symmetry(model)
    _, params = functional(model)
    tx = make(sym)
    state = tx.init(params)
    keys = jax.random.split(jax.random.key(0), 3)
    for t, k in enumerate(keys):
        grads = optax.tree.random_like(k, params, jax.random.normal)
        if t == 0:
            grads = map_with_path(
                lambda p, x: x.at[1, 2].set(jnp.nan) if p == ("layers", 0, "kernel") else x,
                grads)
        u, state = jax.jit(tx.update)(grads, state, params)
        params = optax.apply_updates(params, u)
    bad = {p: np.argwhere(~np.isfinite(np.asarray(x))).tolist()
           for p, x in leaves_by_path(params).items()}
    assert {p: b for p, b in bad.items() if b} == {("layers", 0, "kernel"): [[1, 2]]}


def test_an_embedding_counts_every_token_like_a_dense_layer_on_one_hot_inputs():
    """A table lookup is a dense layer from a one-hot input: the path norm's skeleton (all
    ones in) counts every row, so the embedding network's curvature equals that of the same
    weights as a bias-free dense first layer."""

    class Lookup(nnx.Module):
        def __init__(self, rngs, dense):
            self.dense = dense
            self.first = (nnx.Linear(5, 3, use_bias=False, param_dtype=jnp.float64, rngs=rngs)
                          if dense else nnx.Embed(5, 3, param_dtype=jnp.float64, rngs=rngs))
            self.l1 = nnx.Linear(3, 4, param_dtype=jnp.float64, rngs=rngs)
            self.l2 = nnx.Linear(4, 1, param_dtype=jnp.float64, rngs=rngs)

        def __call__(self, x):
            return self.l2(nnx.relu(self.l1(self.first(x))))

    emb, dense = Lookup(nnx.Rngs(0), False), Lookup(nnx.Rngs(0), True)
    ids = jnp.zeros((4, 1), jnp.int32)
    sym_e = qo.infer_symmetry(emb, ids)
    sym_d = qo.infer_symmetry(dense, jnp.zeros((4, 1, 5)))
    _, pe = functional(emb)
    _, pd = functional(dense)
    table = jax.random.normal(jax.random.key(0), (5, 3), jnp.float64)
    pe = map_with_path(lambda p, x: table if p == ("first", "embedding") else x, pe)
    pd = map_with_path(lambda p, x: table if p == ("first", "kernel") else
                       leaves_by_path(pe)[p], pd)
    ge = leaves_by_path(qo.path_norm_curvature(sym_e, pe))
    gd = leaves_by_path(qo.path_norm_curvature(sym_d, pd))
    np.testing.assert_allclose(ge["first", "embedding"], gd["first", "kernel"], rtol=1e-12)
    for p in (("l1", "kernel"), ("l1", "bias"), ("l2", "kernel"), ("l2", "bias")):
        np.testing.assert_allclose(ge[p], gd[p], rtol=1e-12)
