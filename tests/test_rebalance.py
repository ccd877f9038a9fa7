"""rebalance: inner optimizer stepping from the canonical point, state transported."""

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from flax import nnx

import quotient_opt as qo
from quotient_opt.transforms._transport import transport_state
from quotient_opt.models import functional, mse


def _maxdiff(a, b):
    return max(float(jnp.max(jnp.abs(x - y))) for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b)))


def _setup(dtype=jnp.float64, seed=0):
    r = nnx.Rngs(seed)
    m = nnx.Sequential(
        nnx.Linear(2, 6, param_dtype=dtype, rngs=r), nnx.relu,
        nnx.Linear(6, 5, param_dtype=dtype, rngs=r), nnx.relu,
        nnx.Linear(5, 1, param_dtype=dtype, rngs=r),
    )  # fmt: skip
    apply, p = functional(m)
    sym = qo.infer_symmetry(m)
    x = jax.random.uniform(jax.random.key(1), (64, 2), dtype, -1, 1)
    y = jnp.sin(3 * x[:, :1]) * x[:, 1:]

    def loss(q):
        return mse(apply(q, x), y)

    p = sym.act(p, sym.sample(jax.random.key(seed + 7), log_scale=2.0, dtype=dtype))
    return apply, p, sym, loss, x


@pytest.mark.slow
def test_first_step_holds_the_canonical_element_and_never_jumps():
    """At lr 0 the params do not move; the element held reaches the canonical point."""
    apply, p, sym, loss, x = _setup()
    opt = qo.rebalance(optax.sgd(0.0), sym)
    u, st = opt.update(jax.grad(loss)(p), opt.init(p), p)
    assert _maxdiff(optax.apply_updates(p, u), p) == 0.0
    c, _ = qo.canonicalize(sym, p)
    assert _maxdiff(sym.rescale(p, st.log_scales), c) < 1e-12
    assert _maxdiff(c, p) > 1e-2  # the canonical point is elsewhere on the orbit
    # the moving variant jumps there (function unchanged)
    opt = qo.rebalance(optax.sgd(0.0), sym, move_params=True)
    u, st = opt.update(jax.grad(loss)(p), opt.init(p), p)
    new = optax.apply_updates(p, u)
    assert _maxdiff(new, c) < 1e-12
    assert all(not np.any(np.asarray(z)) for z in st.log_scales)
    np.testing.assert_allclose(apply(new, x), apply(p, x), rtol=1e-12, atol=1e-12)


@pytest.mark.slow
@pytest.mark.parametrize("move_params", [False, True])
def test_matches_manual_adam_with_gather_based_transport(move_params):
    """Inner coordinates = canonical point; adam's state transported; the user's step is the
    inner step pulled back (held element) or the inner step from the moved params."""
    _, p, sym, loss, _ = _setup()
    inner = optax.adam(1e-2)
    opt = qo.rebalance(inner, sym, every=2, move_params=move_params)
    s_opt = opt.init(p)
    q, s_ref = p, inner.init(p)  # the reference runs in the inner coordinates
    pr = p
    g_total = sym.identity(jnp.float64)
    for t in range(5):
        u, s_opt = jax.jit(opt.update)(jax.grad(loss)(pr), s_opt, pr)
        pr = optax.apply_updates(pr, u)
        gr = jax.grad(loss)(q)
        if t % 2 == 0:
            c, g = qo.canonicalize(sym, q)
            s_ref = transport_state(sym, s_ref, q, g, tx=inner)
            gr = sym.act(gr, g, power=-1)
            q = c
            g_total = sym.compose(g_total, g)
        du, s_ref = inner.update(gr, s_ref, q)
        q = optax.apply_updates(q, du)
        want = q if move_params else sym.act(q, sym.inverse(g_total))
        assert _maxdiff(pr, want) < 1e-10
    assert int(s_opt.count) == 5
    assert s_opt.count.dtype == jnp.int32
    assert _maxdiff(s_opt.inner_state[0].mu, s_ref[0].mu) < 1e-10
    assert _maxdiff(s_opt.inner_state[0].nu, s_ref[0].nu) < 1e-10


def test_off_steps_are_the_inner_step_in_held_coordinates():
    _, p, sym, loss, _ = _setup()
    inner = optax.sgd(0.1, momentum=0.9)
    opt = qo.rebalance(inner, sym, every=3)
    s = opt.init(p)
    u, s = opt.update(jax.grad(loss)(p), s, p)
    p = optax.apply_updates(p, u)
    gr = jax.grad(loss)(p)
    here = sym.rescale(p, s.log_scales)
    u_in, _ = inner.update(sym.rescale(gr, s.log_scales, power=-1), s.inner_state, here)
    u, s2 = opt.update(gr, s, p)
    assert _maxdiff(u, sym.rescale(u_in, s.log_scales, power=-1)) < 1e-14
    assert _maxdiff(s2.log_scales, s.log_scales) == 0.0  # off-step: the element stays


@pytest.mark.slow
def test_chained_after_clipping_preserves_the_function_at_lr_0():
    """No hidden jump: ``chain(wrapper(lr=0), clip_by_global_norm)`` keeps the function."""
    apply, p, sym, loss, x = _setup()
    for wrapper in (qo.quotient_adam(0.0, sym), qo.quotient_sgd(0.0, sym, momentum=0.9),
                    qo.rebalance(optax.adam(0.0), sym), qo.teleport(optax.adam(0.0), sym, every=1)):
        tx = optax.chain(wrapper, optax.clip_by_global_norm(1.0))
        st, q = tx.init(p), p
        for _ in range(3):
            u, st = tx.update(jax.grad(loss)(q), st, q, value_fn=loss)
            q = optax.apply_updates(q, u)
        np.testing.assert_allclose(apply(q, x), apply(p, x), rtol=1e-9, atol=1e-12)
    # the moving variant does not survive the clipping (documented)
    tx = optax.chain(qo.quotient_adam(0.0, sym, move_params=True), optax.clip_by_global_norm(1.0))
    u, _ = tx.update(jax.grad(loss)(p), tx.init(p), p)
    assert float(jnp.max(jnp.abs(apply(optax.apply_updates(p, u), x) - apply(p, x)))) > 1e-3


def test_scan_converges_and_vmap():
    _, p, sym, loss, _ = _setup()
    opt = qo.rebalance(optax.adam(1e-2), sym, every=5)

    losses = jax.jit(lambda p0: qo.fit(opt, p0, loss, 300)[2])(p)
    assert bool(jnp.all(jnp.isfinite(losses)))
    assert bool(losses[-1] < 0.3 * losses[0])
    # vmap over a batch of params (short: see the report on long vmapped runs)
    ps = jax.tree.map(lambda a, b: jnp.stack([a, b]), p, jax.tree.map(lambda a: 1.1 * a, p))
    s_b = jax.vmap(opt.init)(ps)
    u, _ = jax.jit(jax.vmap(lambda q, s: opt.update(jax.grad(loss)(q), s, q)))(ps, s_b)
    u0, _ = opt.update(jax.grad(loss)(p), opt.init(p), p)
    assert _maxdiff(jax.tree.map(lambda a: a[0], u), u0) < 1e-10


@pytest.mark.slow
@pytest.mark.parametrize("dtype", [jnp.float32, jnp.float64, jnp.bfloat16])
def test_dtype_preserved(dtype):
    _, p, sym, loss, _ = _setup(jnp.float32)
    p = jax.tree.map(lambda a: a.astype(dtype), p)
    opt = qo.quotient_adam(1e-3, sym)
    gr = jax.tree.map(lambda a: jnp.ones_like(a), p)
    u, s = opt.update(gr, opt.init(p), p)
    assert all(a.dtype == dtype for a in jax.tree.leaves(u))
    assert all(bool(jnp.all(jnp.isfinite(a))) for a in jax.tree.leaves(u))


def test_inject_hyperparams_and_extra_args():
    _, p, sym, loss, _ = _setup()
    opt = optax.inject_hyperparams(qo.quotient_adam, static_args=("every",))(
        learning_rate=1e-2, sym=sym
    )
    s = opt.init(p)
    u, s = opt.update(jax.grad(loss)(p), s, p, unknown_extra=3)
    assert float(s.hyperparams["learning_rate"]) == pytest.approx(1e-2)
    opt2 = optax.inject_hyperparams(qo.quotient_sgd)(learning_rate=0.1, sym=sym, every=2)
    s2 = opt2.init(p)
    for _ in range(3):
        u, s2 = jax.jit(opt2.update)(jax.grad(loss)(p), s2, p)
        p = optax.apply_updates(p, u)
    assert bool(jnp.isfinite(loss(p)))


def test_nan_gradient_does_not_spread():
    """A NaN gradient entry propagates where SGD would put it, nowhere else."""
    _, p, sym, loss, _ = _setup()
    gr = jax.grad(loss)(p)
    gr = qo.symmetry._spec.map_with_path(
        lambda path, a: a.at[0, 0].set(jnp.nan) if path == ("layers", 2, "kernel") else a, gr
    )
    opt = qo.rebalance(optax.sgd(0.1), sym)
    u, _ = opt.update(gr, opt.init(p), p)
    n_nan = sum(int(jnp.sum(jnp.isnan(a))) for a in jax.tree.leaves(u))
    assert n_nan == 1
    # a state field that cannot follow the rescaling is refused at init, naming it
    with pytest.raises(ValueError, match="v_row"):
        qo.rebalance(optax.adafactor(1e-2, min_dim_size_to_factor=2), sym).init(p)


def test_bad_config_and_structure():
    _, p, sym, _, _ = _setup()
    with pytest.raises(ValueError, match="every"):
        qo.rebalance(optax.sgd(0.1), sym, every=0)
    other = nnx.Sequential(nnx.Linear(3, 4, rngs=nnx.Rngs(0)), nnx.relu, nnx.Linear(4, 1, rngs=nnx.Rngs(0)))
    _, q = functional(other)
    with pytest.raises(ValueError, match="layers/0/kernel"):
        qo.rebalance(optax.sgd(0.1), sym).init(q)
    opt = qo.rebalance(optax.sgd(0.1), sym)
    with pytest.raises(ValueError, match="params"):
        opt.update(p, opt.init(p))
