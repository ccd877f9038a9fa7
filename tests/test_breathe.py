"""Breathing (``qo.training.breathe``) and its pieces: growth preserves the function, a merge of
a duplicated unit is lossless, removals respect the cap, extraction keeps the function, and the
population procedure is elitist, counts its evaluations and does not depend on the chunking."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

import quotient_opt as qo
from quotient_opt.training import extract_units, grow_units, merge_or_prune, present_units

TASK = qo.models.sawtooth_task()


def net(width, seed=0):
    return qo.models.functional(qo.models.SawtoothNet(width, 3, rngs=nnx.Rngs(seed)))


def loss_for(apply):
    return lambda p: qo.models.mse(apply(p, TASK.x), TASK.y)


def counts(apply, p):
    return [int(a.sum()) for a in present_units(apply, p, TASK.x)]


def kernels(p):
    return [p["layers"][i] for i in sorted(p["layers"].keys())]


@pytest.mark.slow
def test_grow_fills_absent_slots_without_changing_the_function():
    apply, p = net(6)
    p = qo.place_kinks(apply, p, TASK.x, jax.random.key(0))
    loss = loss_for(apply)
    for _ in range(4):  # make some slots absent
        p, _, _ = merge_or_prune(apply, p, TASK.x, loss, 4)
    assert sum(counts(apply, p)) == 18 - 4
    absent = [~a for a in present_units(apply, p, TASK.x)]
    g = grow_units(apply, p, TASK.x, jax.random.key(1))
    assert counts(apply, g) == [6, 6, 6]
    np.testing.assert_array_equal(apply(g, TASK.x), apply(p, TASK.x))
    # the new units have their kinks inside the data
    h = TASK.x
    for layer, new in zip(kernels(g)[:-1], absent):
        z = h @ layer["kernel"][...] + layer["bias"][...]
        inside = (jnp.max(z, 0) > 0) & (jnp.min(z, 0) <= 0)
        assert bool(jnp.all(inside | ~new))
        h = jax.nn.relu(z)


@pytest.mark.slow
def test_merging_a_duplicated_unit_is_lossless_and_respects_the_cap():
    apply, p = net(4)
    p = qo.place_kinks(apply, p, TASK.x, jax.random.key(2))
    loss = loss_for(apply)
    # make unit 3 of the second hidden layer 2.5 x unit 1 (same kink): a_3 = 2.5 a_1
    layer = qo.training.dense_relu_chain(apply, p, TASK.x)[1]
    leaves, treedef = jax.tree.flatten(p)
    k, b = leaves[layer.kernel], leaves[layer.bias]
    leaves[layer.kernel] = k.at[:, 3].set(2.5 * k[:, 1])
    leaves[layer.bias] = b.at[3].set(2.5 * b[1])
    p = treedef.unflatten(leaves)
    before = float(loss(p))
    q, l, n_c = merge_or_prune(apply, p, TASK.x, loss, 3)
    assert counts(apply, q) == [3, 4, 4] or counts(apply, q) == [4, 3, 4] or counts(apply, q) == [
        4, 4, 3]
    assert float(l) == pytest.approx(float(loss(q)), rel=1e-6)
    assert float(l) <= before * (1 + 1e-5)  # the duplicate folds into its sibling exactly
    assert int(n_c) == 2 * 12  # every unit of the three over-cap layers, merge and constant
    # at the cap: nothing to remove
    r, l2, n2 = merge_or_prune(apply, p, TASK.x, loss, 4)
    assert int(n2) == 0 and not np.isfinite(float(l2))
    for a, c in zip(jax.tree.leaves(r), jax.tree.leaves(p)):
        np.testing.assert_array_equal(a, c)


def test_extract_keeps_the_function():
    apply6, p = net(6)
    apply4, like = net(4)
    p = qo.place_kinks(apply6, p, TASK.x, jax.random.key(3))
    loss = loss_for(apply6)
    for _ in range(6):
        p, _, _ = merge_or_prune(apply6, p, TASK.x, loss, 4)
    assert counts(apply6, p) == [4, 4, 4]
    small = extract_units(apply6, p, TASK.x, like)
    np.testing.assert_allclose(apply4(small, TASK.x), apply6(p, TASK.x), rtol=1e-5, atol=1e-6)
    apply8, like8 = net(8)
    with pytest.raises(ValueError, match="extracted"):
        extract_units(apply6, p, TASK.x, like8)


@pytest.mark.slow
def test_breathe_is_elitist_counts_evaluations_and_ignores_chunking():
    apply6, _ = net(6)
    loss = loss_for(apply6)

    def he(key):
        return nnx.state(qo.models.SawtoothNet(6, 3, rngs=nnx.Rngs(key)), nnx.Param)

    init = qo.kink_init(he, apply6, TASK.x)
    kw = dict(nets=3, key=jax.random.key(0), width=4, cycles=2, start_steps=40, cycle_steps=20,
              refit_steps=5, polish_steps=10, progress=False)
    res = qo.training.breathe(init, apply6, loss, TASK.x, chunk_size=4, **kw)
    assert res.history.shape == (3, 3) and res.evals.shape == (3, 3) and res.accepted.shape == (3, 2)
    assert np.all(np.diff(res.history, axis=1) <= 0)  # elitist
    np.testing.assert_allclose(res.history[:, -1], res.losses)
    for i in range(3):
        p = jax.tree.map(lambda a: a[i], res.params)
        assert counts(apply6, p) == [4, 4, 4]
        np.testing.assert_allclose(float(loss(p)), res.losses[i], rtol=1e-5)
    # start 40 + 6 removals x (5 refit + candidates) + 10 polish + 1 test; a cycle adds 20 + ...
    removals = 6
    lo = 40 + removals * 5 + 10 + 1
    assert np.all(res.evals[:, 0] > lo) and np.all(res.evals[:, 0] <= lo + removals * 2 * 18)
    assert np.all(np.diff(res.evals, axis=1) > 20 + removals * 5 + 10)
    other = qo.training.breathe(init, apply6, loss, TASK.x, chunk_size=2, **kw)
    np.testing.assert_allclose(other.losses, res.losses, rtol=1e-5)


def test_bad_arguments():
    apply6, p = net(6)
    loss = loss_for(apply6)

    def he(key):
        return nnx.state(qo.models.SawtoothNet(6, 3, rngs=nnx.Rngs(key)), nnx.Param)

    with pytest.raises(ValueError, match="exceeds a hidden layer"):
        qo.training.breathe(he, apply6, loss, TASK.x, nets=2, key=jax.random.key(0), width=7,
                            cycles=1)
    with pytest.raises(ValueError, match="cycles"):
        qo.training.breathe(he, apply6, loss, TASK.x, nets=2, key=jax.random.key(0), width=4,
                            cycles=-1)

    def tanh_net(p, x):
        return jnp.tanh(x @ p["w"] + p["b"]) @ p["v"] + p["c"]

    q = {"w": jnp.ones((1, 3)), "b": jnp.zeros(3), "v": jnp.ones((3, 1)), "c": jnp.zeros(1)}
    with pytest.raises(ValueError, match="not recognized"):
        grow_units(tanh_net, q, TASK.x, jax.random.key(0))
