"""teleport: normalized ascent of the gradient norm over log-scales, function unchanged."""

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

import quotient_opt as qo
from test_rebalance import _maxdiff, _setup


def _gnorm(loss, p):
    return float(sum(jnp.sum(g**2) for g in jax.tree.leaves(jax.grad(loss)(p))))


@pytest.mark.slow
def test_increases_gradient_norm_function_unchanged_and_bounded():
    apply, p, sym, loss, x = _setup()
    opt = qo.teleport(optax.sgd(0.0), sym, every=1, steps=20, learning_rate=0.2, max_log_scale=1.0,
                      move_params=True)
    u, s = opt.update(jax.grad(loss)(p), opt.init(p), p, value_fn=loss)
    new = optax.apply_updates(p, u)
    np.testing.assert_allclose(apply(new, x), apply(p, x), rtol=1e-10, atol=1e-12)
    c, _ = qo.canonicalize(sym, p)
    assert _gnorm(loss, new) > 1.5 * _gnorm(loss, c)
    s0, _ = qo.canonical_log_scales(sym, p)
    st = qo.teleport_log_scales(sym, p, loss, steps=20, learning_rate=0.2, max_log_scale=1.0)
    assert max(float(jnp.max(jnp.abs(a - b))) for a, b in zip(st, s0)) <= 1.0 + 1e-12
    assert int(s.count) == 1


def test_off_steps_and_no_value_fn_needed():
    _, p, sym, loss, _ = _setup()
    inner = optax.adam(1e-2)
    opt = qo.teleport(inner, sym, every=3, steps=2)
    s = opt.init(p)
    u, s = opt.update(jax.grad(loss)(p), s, p)  # the gradient is all it needs
    p = optax.apply_updates(p, u)
    gr = jax.grad(loss)(p)
    here = sym.rescale(p, s.log_scales)
    u_in, _ = inner.update(sym.rescale(gr, s.log_scales, power=-1), s.inner_state, here)
    u, s2 = jax.jit(lambda g, s, q: opt.update(g, s, q, value_fn=loss, extra=1))(gr, s, p)
    assert _maxdiff(u, sym.rescale(u_in, s.log_scales, power=-1)) < 1e-14
    assert _maxdiff(s2.log_scales, s.log_scales) == 0.0
    with pytest.raises(ValueError, match="every"):
        qo.teleport(inner, sym, every=0)


def test_closed_form_objective_matches_autodiff():
    """F(s) from the one gradient equals |grad L(e^s θ)|^2 by autodiff (invariance)."""
    _, p, sym, loss, _ = _setup()
    a = qo.teleport_log_scales(sym, p, loss, steps=7, learning_rate=0.3, max_log_scale=1.5)
    b = qo.teleport_log_scales(sym, p, grads=jax.grad(loss)(p), steps=7, learning_rate=0.3,
                               max_log_scale=1.5)
    assert _maxdiff(a, b) == 0.0
    s = tuple(0.3 * jnp.sin(jnp.arange(z.shape[0]) + 1.0) for z in a)
    direct = sum(float(jnp.sum(z**2)) for z in jax.tree.leaves(
        jax.grad(loss)(qo.symmetry._canonical.rescale(sym, p, s))))
    closed = sum(float(jnp.sum(z**2)) for z in jax.tree.leaves(
        sym.rescale(jax.grad(loss)(p), s, power=-1)))
    np.testing.assert_allclose(closed, direct, rtol=1e-10)
    with pytest.raises(ValueError, match="grads= or value_fn="):
        qo.teleport_log_scales(sym, p)


def test_nan_loss_gradient_skips_ascent():
    _, p, sym, loss, _ = _setup()
    st = qo.teleport_log_scales(sym, p, lambda q: loss(q) * jnp.nan, steps=3)
    s0, _ = qo.canonical_log_scales(sym, p)
    assert all(bool(jnp.all(jnp.isfinite(a))) for a in st)
    assert _maxdiff(st, s0) == 0.0


def test_from_current_point():
    _, p, sym, loss, _ = _setup()
    st = qo.teleport_log_scales(sym, p, loss, steps=0, from_canonical=False)
    assert all(bool(jnp.all(a == 0)) for a in st)
