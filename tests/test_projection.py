"""Tests for project_horizontal / horizontal_component."""

from __future__ import annotations

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
from quotient_opt.symmetry._gram import structure as _structure, tangent as _tangent
from quotient_opt.symmetry._spec import leaves_by_path, map_with_path
from quotient_opt.models import MaxOverPieces, functional


def make_net(which: str, dtype=jnp.float32, seed=0):
    """(sym, apply, params) for a few architectures."""
    rngs = nnx.Rngs(seed)
    init = nnx.initializers.normal(0.7)
    lin = lambda a, b: nnx.Linear(  # noqa: E731
        a, b, kernel_init=init, bias_init=init, param_dtype=dtype, rngs=rngs
    )
    if which == "mlp":
        model = nnx.Sequential(lin(6, 16), nnx.relu, lin(16, 12), nnx.relu, lin(12, 3))
    elif which == "maxpool":
        model = nnx.Sequential(lin(3, 12), MaxOverPieces(3), lin(4, 6), nnx.relu, lin(6, 2))
    elif which == "mixed":  # the tanh layer is not rescalable
        model = nnx.Sequential(
            lin(4, 8), nnx.relu, lin(8, 8), nnx.tanh, lin(8, 8), nnx.relu, lin(8, 2)
        )
    elif which == "sawtooth":
        model = qo.models.SawtoothNet(rngs=rngs, param_dtype=dtype)
    elif which == "eqx":
        m = eqx.nn.MLP(5, 2, 7, 3, key=jax.random.key(seed), dtype=dtype)
        return qo.infer_symmetry(m), None, eqx.filter(m, eqx.is_array)
    else:  # pragma: no cover
        raise ValueError(which)
    apply, params = functional(model)
    return qo.infer_symmetry(model), apply, params


def random_like(params, seed):
    leaves, tree = jax.tree.flatten(params)
    keys = jax.random.split(jax.random.key(seed), len(leaves))
    return tree.unflatten(
        [jax.random.normal(k, x.shape, x.dtype) for k, x in zip(keys, leaves)]
    )


def rel_residual(sym, params, v, vh) -> float:
    """max over windows |J^T v_h| / max over windows |J^T v| (jitted: eager is slow)."""
    r, r0 = jax.jit(lambda p, a, b: (sym.cotangent(p, a), sym.cotangent(p, b)))(params, vh, v)
    num = np.concatenate([np.abs(np.asarray(x, np.float64)) for x in r])
    den = np.concatenate([np.abs(np.asarray(x, np.float64)) for x in r0])
    return float(np.max(num) / (np.max(den) + 1e-300))


def max_abs(tree) -> float:
    return max(float(jnp.max(jnp.abs(x))) for x in jax.tree.leaves(tree))


NETS = ["mlp", "maxpool", "mixed", "sawtooth", "eqx"]


@pytest.mark.parametrize("which", ["maxpool", "mixed", "eqx"])
def test_explicit_tangent_matches_symmetry_tangent(which):
    sym, _, params = make_net(which, jnp.float64)
    st_ = _structure(sym)
    a = [jax.random.normal(jax.random.key(i), (w,), jnp.float64) for i, w in enumerate(st_.windows)]
    full = []
    it = iter(a)
    for g in sym.groups:
        full.append(next(it) if g.rescalable else jnp.zeros((g.windows,), jnp.float64))
    got, want = jax.jit(
        lambda p, a, full: (_tangent(st_, p, a, jnp.float64), sym.tangent(p, tuple(full)))
    )(params, a, full)
    got, want = leaves_by_path(got), leaves_by_path(want)
    for p in want:
        np.testing.assert_allclose(got[p], want[p], rtol=1e-13, atol=1e-14)


F32, F64 = (jnp.float32, 2e-6), (jnp.float64, 1e-12)


@pytest.mark.parametrize(
    "which,dtype,tol",
    [(w, *F32) for w in NETS] + [("maxpool", *F64), ("eqx", *F64), ("sawtooth", *F64)],
)
def test_projection_is_horizontal_idempotent_and_fixes_horizontal(which, dtype, tol):
    sym, _, params = make_net(which, dtype)
    st_ = _structure(sym)
    v = random_like(params, 1)
    a = [jax.random.normal(jax.random.key(5), (w,), dtype) for w in st_.windows]

    @jax.jit
    def everything(p, v, a):
        vh = qo.horizontal_component(sym, p, v)
        vhh = qo.horizontal_component(sym, p, vh)
        ja = _tangent(st_, p, a, dtype)
        rest = qo.horizontal_component(sym, p, ja)
        return vh, vhh, ja, rest, sym.cotangent(p, vh), sym.cotangent(p, v)

    vh, vhh, ja, rest, r, r0 = everything(params, v, a)
    for x, y in zip(jax.tree.leaves(vh), jax.tree.leaves(v)):
        assert x.dtype == y.dtype == dtype
    # J^T v_h ~ 0, relative to J^T v
    assert max_abs(r) <= tol * max_abs(r0)
    # it really removed something (v was not horizontal)
    assert max_abs(jax.tree.map(lambda x, y: x - y, vh, v)) > 1e-2
    # idempotent: a horizontal vector is left unchanged
    assert max_abs(jax.tree.map(lambda x, y: x - y, vhh, vh)) <= 50 * tol * max_abs(vh)
    # a vertical vector is removed entirely
    assert max_abs(rest) <= 50 * tol * max_abs(ja)


def test_gradient_of_invariant_loss_is_left_unchanged():
    sym, apply, params = make_net("maxpool", jnp.float64)
    x = jax.random.normal(jax.random.key(0), (32, 3), jnp.float64)

    @jax.jit
    def both(p):
        grads = jax.grad(lambda p: jnp.sum(jnp.sin(apply(p, x))))(p)
        return grads, qo.horizontal_component(sym, p, grads)

    grads, gh = both(params)
    for a, b in zip(jax.tree.leaves(gh), jax.tree.leaves(grads)):
        np.testing.assert_allclose(a, b, rtol=1e-10, atol=1e-12)


_SYM, _, _PARAMS = make_net("maxpool", jnp.float64)
_V = random_like(_PARAMS, 3)


@jax.jit
def _perm_case(key):
    g = _SYM.sample(key, log_scale=0.0, permute=True, dtype=jnp.float64)
    lhs = qo.horizontal_component(_SYM, _SYM.act(_PARAMS, g), _SYM.act(_V, g, power=0))
    rhs = _SYM.act(qo.horizontal_component(_SYM, _PARAMS, _V), g, power=0)
    return lhs, rhs


@jax.jit
def _scale_case(key):
    g = _SYM.sample(key, log_scale=3.0, permute=True, dtype=jnp.float64)
    vh = qo.horizontal_component(_SYM, _PARAMS, _V)
    pg = _SYM.act(_PARAMS, g)
    vg = _SYM.act(vh, g, power=-1)  # a horizontal covector, moved like a gradient
    return _SYM.cotangent(pg, vg), _SYM.cotangent(_PARAMS, _V), vg, qo.horizontal_component(
        _SYM, pg, vg
    )


@given(seed=st.integers(0, 2**31 - 1))
def test_permutation_equivariance(seed):
    lhs, rhs = _perm_case(jax.random.key(seed))
    for a, b in zip(jax.tree.leaves(lhs), jax.tree.leaves(rhs)):
        np.testing.assert_allclose(a, b, rtol=1e-10, atol=1e-12)


@given(seed=st.integers(0, 2**31 - 1))
def test_horizontal_space_of_covectors_is_rescaling_invariant(seed):
    """J^T v = 0 at theta  =>  J'^T (g.v) = 0 at g.theta, and the projection fixes g.v."""
    res, ref, vg, vgh = _scale_case(jax.random.key(seed))
    ref_max = max(float(jnp.max(jnp.abs(x))) for x in ref)
    for r in res:
        assert float(jnp.max(jnp.abs(r))) <= 1e-10 * ref_max
    for a, b in zip(jax.tree.leaves(vgh), jax.tree.leaves(vg)):
        np.testing.assert_allclose(a, b, rtol=1e-8, atol=1e-9 * float(jnp.max(jnp.abs(b))))


def test_dead_units_are_guarded():
    sym, _, params = make_net("mlp", jnp.float32)
    # unit 3 of layers/0: zero in, bias and out; unit 5 of layers/2: zero in and bias only.
    def kill(path, x):
        if path == ("layers", 0, "kernel"):
            return x.at[:, 3].set(0.0)
        if path == ("layers", 0, "bias"):
            return x.at[3].set(0.0)
        if path == ("layers", 2, "kernel"):
            return x.at[3, :].set(0.0).at[:, 5].set(0.0)
        if path == ("layers", 2, "bias"):
            return x.at[5].set(0.0)
        return x

    params = map_with_path(kill, params)
    v = random_like(params, 2)
    vh = jax.jit(lambda p, v: qo.horizontal_component(sym, p, v))(params, v)
    for x in jax.tree.leaves(vh):
        assert bool(jnp.all(jnp.isfinite(x)))
    assert rel_residual(sym, params, v, vh) <= 2e-6
    # the fully dead unit's parameters have no vertical direction: unchanged
    np.testing.assert_array_equal(
        leaves_by_path(vh)[("layers", 0, "kernel")][:, 3],
        leaves_by_path(v)[("layers", 0, "kernel")][:, 3],
    )


def test_all_zero_params_and_extreme_scales_stay_finite():
    sym, _, params = make_net("sawtooth", jnp.float32)
    proj = jax.jit(lambda p, v: qo.horizontal_component(sym, p, v))
    zeros = jax.tree.map(jnp.zeros_like, params)
    v = random_like(params, 0)
    out = proj(zeros, v)
    for a, b in zip(jax.tree.leaves(out), jax.tree.leaves(v)):
        np.testing.assert_array_equal(a, b)
    ls = tuple(20.0 * jnp.where(jnp.arange(5) % 2 == 0, 1.0, -1.0) for _ in sym.groups)

    @jax.jit
    def extreme(p, v, ls):
        g = sym.scales_only(ls)
        return qo.horizontal_component(sym, sym.act(p, g), sym.act(v, g, power=-1))

    out = extreme(params, v, ls)
    for x in jax.tree.leaves(out):
        assert not bool(jnp.any(jnp.isnan(x)))


def test_nan_update_is_not_spread():
    sym, _, params = make_net("mlp", jnp.float32)
    v = random_like(params, 0)
    v = map_with_path(
        lambda p, x: x.at[0, 0].set(jnp.nan) if p == ("layers", 0, "kernel") else x, v
    )
    out = leaves_by_path(jax.jit(lambda p, v: qo.horizontal_component(sym, p, v))(params, v))
    for p, x in out.items():
        n_nan = int(jnp.sum(jnp.isnan(x)))
        assert n_nan == (1 if p == ("layers", 0, "kernel") else 0), p


def test_vmap_over_networks():
    sym, _, params = make_net("mlp", jnp.float64)
    batch = jax.tree.map(lambda *x: jnp.stack(x), params, random_like(params, 9))
    vs = jax.tree.map(lambda *x: jnp.stack(x), random_like(params, 1), random_like(params, 2))
    out = jax.jit(jax.vmap(lambda p, v: qo.horizontal_component(sym, p, v)))(batch, vs)
    single = jax.jit(lambda p, v: qo.horizontal_component(sym, p, v))
    for i in range(2):
        pi = jax.tree.map(lambda x: x[i], batch)
        vi = jax.tree.map(lambda x: x[i], vs)
        oi = single(pi, vi)
        for a, b in zip(jax.tree.leaves(oi), jax.tree.leaves(out)):
            np.testing.assert_allclose(b[i], a, rtol=1e-10, atol=1e-12)


def _balance(sym, params):
    """Per-window ||w_in||^2 + b^2 - ||w_out||^2 (twice the cotangent of theta itself)."""
    return jnp.concatenate([2 * x for x in sym.cotangent(params, params)])


def test_conservation_of_balance_with_projected_sgd_but_not_adam():
    """Horizontal SGD keeps every unit's balance (to O(lr^2)); Adam moves it."""
    sym, apply, params = make_net("sawtooth", jnp.float64, seed=1)
    task = qo.models.sawtooth_task(dtype=jnp.float64)
    loss = lambda p: qo.models.mse(apply(p, task.x), task.y)  # noqa: E731

    def drift(tx, steps=300):
        p_end = jax.jit(lambda p: qo.fit(tx, p, loss, steps)[0])(params)
        balance = jax.jit(lambda p: _balance(sym, p))
        moved = max(
            float(jnp.max(jnp.abs(a - b)))
            for a, b in zip(jax.tree.leaves(p_end), jax.tree.leaves(params))
        )
        return float(jnp.max(jnp.abs(balance(p_end) - balance(params)))), moved

    d_proj, m_proj = drift(optax.chain(optax.sgd(1e-3, momentum=0.9), qo.project_horizontal(sym)))
    d_adam, m_adam = drift(optax.adam(1e-3))
    d_adam_proj, _ = drift(optax.chain(optax.adam(1e-3), qo.project_horizontal(sym)))
    assert m_proj > 1e-2 and m_adam > 1e-2  # both really trained
    assert d_proj < 1e-3
    assert d_adam > 20 * d_proj
    assert d_adam_proj < 0.2 * d_adam


def test_transformation_errors():
    sym, _, params = make_net("mlp")
    with pytest.raises(ValueError, match="sym"):
        qo.project_horizontal(object())
    with pytest.raises(ValueError, match="max_iter"):
        qo.project_horizontal(sym, max_iter=0)
    with pytest.raises(ValueError, match="tol"):
        qo.project_horizontal(sym, tol=-1.0)
    tx = qo.project_horizontal(sym)
    other = make_net("maxpool")[2]
    with pytest.raises(ValueError, match="layers/0/kernel"):
        tx.init(other)
    with pytest.raises(ValueError, match="params"):
        tx.update(params, tx.init(params))
