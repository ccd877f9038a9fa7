"""``qo.train_population``: trains, matches per-network ``qo.fit``, resumes, shards, chunks,
keeps periodic wrappers' branches real under ``vmap``, and rejects bad arguments."""

from __future__ import annotations

import textwrap

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from flax import nnx

import four_devices
import quotient_opt as qo
from quotient_opt.training import _checkpoint, make_population_step
from quotient_opt.training._dense_mlp import match_dense_mse, population_value_and_grad

# A small regression task: 1 -> 6 -> 6 -> 1 ReLU MLP on 24 points (plain functions, float32).
X = jnp.linspace(-1.0, 1.0, 24, dtype=jnp.float32)[:, None]
Y = jnp.sin(3.0 * X)
SIZES = [1, 6, 6, 1]


def init_mlp(key):
    keys = jax.random.split(key, len(SIZES) - 1)
    return [
        {
            "w": jax.random.normal(k, (a, b), jnp.float32) / float(np.sqrt(a)),
            "b": jnp.full((b,), 0.1, jnp.float32),
        }
        for k, a, b in zip(keys, SIZES, SIZES[1:])
    ]


def mlp(params, x, act=jax.nn.relu):
    h = x
    for i, layer in enumerate(params):
        h = h @ layer["w"] + layer["b"]
        if i < len(params) - 1:
            h = act(h)
    return h


def loss_relu(params):
    return jnp.mean((mlp(params, X) - Y) ** 2)


def loss_tanh(params):  # not a ReLU MLP: the generic path
    return jnp.mean((mlp(params, X, jnp.tanh) - Y) ** 2)


KEY = jax.random.key(7)


def run(loss=loss_relu, **kw):
    args = dict(nets=6, steps=60, key=KEY, chunk_size=4, segment_steps=20, progress=False)
    args.update(kw)
    return qo.train_population(optax.adam(1e-2), init_mlp, loss, **args)


def run_revive(revive=True, *, dtype=jnp.float32, newton_steps=2, ulps=0, **kw):
    """3-piece maxout networks trained by ``revive_dead_units(adam, axis_name=POPULATION_AXIS)``
    (or by the plain Adam inside it); ``ulps`` moves every initial parameter by that many units
    in the last place (to measure how far rounding-level differences spread)."""
    model = qo.models.MaxPoolNet(3, 1, 2, rngs=nnx.Rngs(0), param_dtype=dtype)
    apply, params = qo.models.functional(model)
    task = qo.models.max_of_planes_task([[1.0, 1.0], [3.0, 1.0], [1.0, 3.0]], [0.0, -1.0, -1.0],
                                        n=200, dtype=dtype)
    leaves, treedef = jax.tree.flatten(params)

    def init(key):
        keys = jax.random.split(key, len(leaves))
        p = [jax.random.uniform(k, a.shape, a.dtype, -0.7, 0.7) for k, a in zip(keys, leaves)]
        for _ in range(ulps):
            p = [jnp.nextafter(a, jnp.asarray(jnp.inf, a.dtype)) for a in p]
        return jax.tree.unflatten(treedef, p)

    def loss(p):
        return qo.models.mse(apply(p, task.x), task.y)

    tx = qo.revive_dead_units(optax.adam(0.02), qo.infer_symmetry(model), every=10, patience=5,
                              num_candidates=2, newton_steps=newton_steps,
                              axis_name=qo.training.POPULATION_AXIS)
    if not revive:
        tx = optax.adam(0.02)
    args = dict(nets=12, steps=60, key=KEY, chunk_size=8, segment_steps=30, progress=False)
    args.update(kw)
    return qo.train_population(tx, init, loss, **args)


def assert_trees_close(a, b, rtol=1e-5, atol=1e-6):
    for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b)):
        np.testing.assert_allclose(np.asarray(x), np.asarray(y), rtol=rtol, atol=atol)


class _Runs(dict):
    """Populations shared by several tests, each built on first use (compilation dominates)."""

    def __missing__(self, which):
        self[which] = run(fast_path=which == "fast", track_best=True)
        return self[which]


@pytest.fixture(scope="module")
def runs():
    return _Runs()


@pytest.fixture(scope="module")
def fits():
    """qo.fit for networks 0 and 5 (first chunk, padded last chunk), in one compiled program."""
    p0 = jax.vmap(lambda i: init_mlp(jax.random.fold_in(KEY, i)))(jnp.array([0, 5], jnp.uint32))
    return jax.jit(jax.vmap(lambda p: qo.fit(optax.adam(1e-2), p, loss_relu, 60)))(p0)


# --------------------------------------------------------------------------- training


@pytest.mark.slow
@pytest.mark.parametrize("which", ["fast", "generic"])
def test_trains_and_matches_per_net_fit(which, runs, fits):
    """Loss decreases; network i follows qo.fit from init_fn(fold_in(key, i))."""
    res = runs[which]
    assert res.fast_path is (which == "fast")
    assert res.losses.shape == (6,) and res.history.shape == (6, 60)
    np.testing.assert_array_equal(res.history_steps, np.arange(60))  # every = max(1, 60 // 100)
    assert np.all(res.losses < 0.5 * res.history[:, 0]), (res.losses, res.history[:, 0])
    assert res.grad_evals == 6 * 60
    params, _, losses = fits
    for j, i in enumerate((0, 5)):
        net = jax.tree.map(lambda a: a[i], res.params)
        # Two compiled programs of 60 float32 Adam steps: measured 5e-7 apart, but moving
        # the start by one ulp moves the params by up to 2.3e-5 (the losses by 7e-7
        # relative), so the params get that spread's tolerance and the losses a tight one.
        assert_trees_close(net, jax.tree.map(lambda a: a[j], params), rtol=0, atol=1e-4)
        np.testing.assert_allclose(res.history[i], losses[j], rtol=2e-5, atol=1e-7)
    np.testing.assert_allclose(res.losses[[0, 5]], jax.vmap(loss_relu)(params), rtol=2e-5)
    # best = the minimum over every recorded loss and the final one, with its params
    assert np.all(res.best_losses <= res.history.min(axis=1) + 1e-7)
    assert np.all(res.best_losses <= res.losses)
    best = jax.jit(jax.vmap(loss_relu))(jax.tree.map(jnp.asarray, res.best_params))
    np.testing.assert_allclose(best, res.best_losses, rtol=1e-5)


def test_chunking_does_not_change_results(runs):
    one = run(fast_path=False, track_best=True, chunk_size=6)  # one chunk; runs[...] has two
    assert_trees_close(one.params, runs["generic"].params, rtol=1e-6, atol=1e-7)
    np.testing.assert_allclose(one.history, runs["generic"].history, rtol=1e-6, atol=1e-8)
    np.testing.assert_allclose(one.best_losses, runs["generic"].best_losses, rtol=1e-6, atol=1e-8)


def test_perturbed_init():
    center = {"w": jnp.ones((3, 2), jnp.float32), "b": jnp.arange(2, dtype=jnp.float32)}
    init = jax.jit(qo.perturbed_init(center, 0.01))
    a, b = init(jax.random.key(1)), init(jax.random.key(2))
    diff = [np.max(np.abs(x - y)) for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(center))]
    assert 0 < max(diff) < 0.1
    assert any(np.any(x != y) for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b)))
    rel = qo.perturbed_init({"z": jnp.zeros(3)}, 0.5, relative=True)(jax.random.key(0))
    np.testing.assert_array_equal(rel["z"], 0.0)


# --------------------------------------------------------------------------- checkpoints


def _killed_run(kw, monkeypatch):
    """``run(**kw)`` killed after a finished chunk and a save inside the next one."""
    saves = []
    real_save = _checkpoint.atomic_savez

    def crash_on_fourth(path, arrays):
        real_save(path, arrays)
        saves.append(path.name)
        if len(saves) == 4:  # chunk 0: saves at steps 20 and 40, then its result; chunk 1: step 20
            raise KeyboardInterrupt

    monkeypatch.setattr(_checkpoint, "atomic_savez", crash_on_fourth)
    with pytest.raises(KeyboardInterrupt):
        run(**kw)
    monkeypatch.setattr(_checkpoint, "atomic_savez", real_save)
    assert saves == ["current.npz", "current.npz", "chunk_000000.npz", "current.npz"]
    assert not list(kw["checkpoint"].glob("*.tmp"))


def _assert_same_run(ref, res):
    for a, b in zip(
        jax.tree.leaves((ref.params, ref.best_params)),
        jax.tree.leaves((res.params, res.best_params)),
    ):
        np.testing.assert_array_equal(a, b)
    np.testing.assert_array_equal(ref.losses, res.losses)
    np.testing.assert_array_equal(ref.history, res.history)
    np.testing.assert_array_equal(ref.best_losses, res.best_losses)


@pytest.mark.slow
def test_resume_gives_the_uninterrupted_result(tmp_path, monkeypatch, runs):
    """Killed after a finished chunk and a save inside the next one, with that save then cut
    short (a truncated ``current.npz``): the rerun sets it aside with a warning naming it,
    trains that chunk again from its start, keeps the finished chunk, and gives the
    uninterrupted run's result bit for bit. So does a rerun after a finished chunk's file is
    damaged: it is redone from the last save inside it (a plain resume)."""
    ref = runs["generic"]
    ck = tmp_path / "ck"
    kw = dict(fast_path=False, track_best=True, checkpoint=ck, checkpoint_every=0.0)
    _killed_run(kw, monkeypatch)
    cur = ck / "current.npz"
    cur.write_bytes(cur.read_bytes()[: cur.stat().st_size // 2])
    saved = []
    real_save = _checkpoint.atomic_savez
    monkeypatch.setattr(_checkpoint, "atomic_savez",
                        lambda path, a: (saved.append(path.name), real_save(path, a)))
    with pytest.warns(UserWarning, match=r"current\.npz is damaged \(BadZipFile"):
        _assert_same_run(ref, run(**kw))
    assert saved == ["current.npz", "current.npz", "chunk_000001.npz"]  # chunk 0 kept
    assert (ck / "current.npz.damaged").exists()

    done = ck / "chunk_000001.npz"  # a finished chunk whose arrays do not fit this run
    with np.load(done) as d:
        arrays = {k: d[k] for k in d.files}
    np.savez(done, **{**arrays, "p0": arrays["p0"][:1]})
    saved.clear()
    with pytest.warns(UserWarning, match=r"chunk_000001\.npz is damaged \(ValueError.*p\*"):
        _assert_same_run(ref, run(**kw))
    assert saved == ["chunk_000001.npz"]  # resumed from current.npz at step 40
    # a finished run's directory gives the result again without training
    np.testing.assert_array_equal(run(**kw).losses, ref.losses)
    assert saved == ["chunk_000001.npz"]
    # other arguments are refused, naming what differs
    with pytest.raises(ValueError, match="checkpoint.*steps"):
        run(**{**kw, "steps": 80})


# --------------------------------------------------------------------------- sharding

_SHARDED = textwrap.dedent(
    """
    import json, sys
    import jax, numpy as np
    from jax.sharding import Mesh
    sys.path.insert(0, sys.argv[1])
    import test_population as T
    from quotient_opt.training import _checkpoint

    assert len(jax.devices()) == 4, jax.devices()
    mesh = Mesh(np.array(jax.devices()), ("nets",))
    seen = []
    real = _checkpoint.to_host
    def spy(tree):
        seen.append(len(jax.tree.leaves(tree)[0].sharding.device_set))
        return real(tree)
    _checkpoint.to_host = spy
    out = {}
    for name, loss in [("relu", T.loss_relu), ("tanh", T.loss_tanh)]:
        kw = dict(loss=loss, nets=12, steps=20, chunk_size=8, segment_steps=10)
        a = T.run(mesh=mesh, **kw)
        n_sharded = list(seen); seen.clear()
        b = T.run(**kw)
        err = max(float(np.max(np.abs(x - y)))
                  for x, y in zip(jax.tree.leaves(a.params), jax.tree.leaves(b.params)))
        out[name] = {"err": err, "loss_err": float(np.max(np.abs(a.losses - b.losses))),
                     "devices_sharded": n_sharded, "devices_plain": list(seen),
                     "fast_path": [a.fast_path, b.fast_path]}
        seen.clear()
    jax.config.update("jax_enable_x64", True)
    kw = dict(dtype=jax.numpy.float64, newton_steps=0)
    a, b = T.run_revive(mesh=mesh, **kw), T.run_revive(**kw)
    out["revive"] = {
        "err": max(float(np.max(np.abs(x - y)))
                   for x, y in zip(jax.tree.leaves(a.params), jax.tree.leaves(b.params))),
        "loss_err": float(np.max(np.abs(a.losses - b.losses))),
        "revived": float(np.max(np.abs(b.losses - T.run_revive(revive=False, **kw).losses))),
    }
    print("RESULT" + json.dumps(out))
    """
)


@pytest.fixture(scope="module", autouse=True)
def _sharded_proc(request):
    """Starts the 4-device subprocess at the module's first test, so it runs alongside."""
    if not any(
        it.name.startswith("test_sharded") and it.module is request.module
        for it in request.session.items
    ):
        yield None
        return
    started = four_devices.start(_SHARDED)
    yield started
    four_devices.stop(started)


@pytest.fixture(scope="module")
def sharded_results(_sharded_proc):
    return four_devices.result(_sharded_proc)


@pytest.mark.slow  # a 4-device child process: `make check`
@pytest.mark.parametrize("name", ["relu", "tanh"])
def test_sharded_matches_unsharded(name, sharded_results):
    """Over 4 host devices (a Mesh along the network axis) the numbers are those of one device."""
    r = sharded_results[name]
    assert r["fast_path"] == [name == "relu"] * 2
    assert r["devices_sharded"] and set(r["devices_sharded"]) == {4}
    assert set(r["devices_plain"]) == {1}
    assert r["err"] <= 1e-6 and r["loss_err"] <= 1e-7, r


@pytest.mark.slow
def test_sharded_revival_matches_unsharded(sharded_results):
    """``revive_dead_units(axis_name=POPULATION_AXIS)`` gathers the due networks across the
    4 devices and gives each its own result back, as on one device.

    Two compiled programs of a run through revivals: in float64 and without the window
    Newton steps (which can tie two pieces and leave the partition to rounding), where a
    one-ulp change of the start moves the params by 1.1e-11 and the losses by 3.8e-13
    (measured; in float32 with Newton steps 1.7e-6 and 3.5e-9, or 0.1 after a tie)."""
    r = sharded_results["revive"]
    assert r["revived"] > 1e-3, r  # the revivals changed some network's run
    assert r["err"] <= 1e-9 and r["loss_err"] <= 1e-10, r


# --------------------------------------------------------------------------- shared counters


def _periodic(every: int) -> optax.GradientTransformation:
    """SGD whose ``count % every == 0`` steps take an 'expensive' branch counting itself per net."""

    def init(params):
        return {"count": jnp.zeros([], jnp.int32), "hits": jnp.zeros([], jnp.float32)}

    def update(grads, state, params=None):
        def expensive(g, hits):
            # per-net work (depends on the gradients) and a per-net count of executions
            big = sum(jnp.sum(jnp.tanh(x) ** 2) for x in jax.tree.leaves(g))
            return hits + 1.0 + 0.0 * big

        def cheap(g, hits):
            return hits

        hits = jax.lax.cond(state["count"] % every == 0, expensive, cheap, grads, state["hits"])
        updates = jax.tree.map(lambda g: -0.01 * g, grads)
        return updates, {"count": optax.safe_increment(state["count"]), "hits": hits}

    return optax.GradientTransformation(init, update)


def _count_prims(jaxpr, name: str, *, inside_cond: bool | None = None, _in: bool = False) -> int:
    """Occurrences of primitive ``name``; with ``inside_cond``, only those (not) under a cond."""
    n = 0
    for eqn in jaxpr.eqns:
        if eqn.primitive.name == name and (inside_cond is None or inside_cond == _in):
            n += 1
        for sub in jax.extend.core.jaxprs_in_params(eqn.params):
            n += _count_prims(
                sub, name, inside_cond=inside_cond, _in=_in or eqn.primitive.name == "cond"
            )
    return n


def _stacked(n=3):
    return jax.vmap(init_mlp)(jax.random.split(jax.random.key(0), n))


def test_shared_counter_keeps_periodic_branch_a_branch():
    """The expensive branch is a real ``cond`` (not a select running both sides) and runs on
    count % every == 0 only; naive vmap (batched counter) turns it into a select."""
    tx = _periodic(every=4)
    shared = qo.shared_state_leaves(tx, init_mlp(KEY), loss_relu)
    assert shared == (True, False)  # count shared; hits depends on the gradients

    pop = make_population_step(tx, loss_relu, init_mlp(KEY))
    params = _stacked()
    state = pop.init(params)
    assert state["count"].shape == () and state["hits"].shape == (3,)
    jp = jax.make_jaxpr(pop.step)(params, state).jaxpr
    assert _count_prims(jp, "cond") == 1
    assert _count_prims(jp, "tanh", inside_cond=True) >= 1  # the expensive work: in the branch
    assert _count_prims(jp, "tanh", inside_cond=False) == 0

    # what a plain vmap over networks does: the predicate is batched -> select, both branches
    naive_state = jax.vmap(tx.init)(params)
    naive = jax.make_jaxpr(
        lambda p, s: jax.vmap(lambda g, s, p: tx.update(g, s, p))(
            jax.vmap(jax.grad(loss_relu))(p), s, p
        )
    )(params, naive_state).jaxpr
    assert _count_prims(naive, "cond") == 0 and _count_prims(naive, "tanh", inside_cond=False) >= 1

    # executed on steps 0, 4, 8 of 10, for every network
    def ten(p, s):
        return jax.lax.fori_loop(0, 10, lambda i, c: pop.step(*c)[:2], (p, s))

    _, s10 = jax.jit(ten)(params, state)
    np.testing.assert_array_equal(s10["hits"], [3.0, 3.0, 3.0])
    assert int(s10["count"]) == 10


def test_library_wrappers_keep_their_branches():
    """revive_dead_units' ``lax.cond(count % every == 0)`` stays a cond in the population step;
    rebalance/teleport keep their counters shared too."""
    model = qo.models.SawtoothNet(width=3, depth=2, rngs=nnx.Rngs(0))
    sym = qo.infer_symmetry(model)
    apply, p0 = qo.models.functional(model)
    x = jnp.linspace(0.0, 1.0, 8, dtype=jnp.float32)[:, None]
    loss = lambda p: jnp.mean((apply(p, x) - x) ** 2)  # noqa: E731
    tx = qo.revive_dead_units(optax.adam(1e-3), sym, every=10)
    pop = make_population_step(tx, loss, p0)
    params = jax.tree.map(lambda a: jnp.stack([a, a + 0.1]), p0)
    state = pop.init(params)
    assert state.count.shape == () and state.inner_state[0].count.shape == ()
    n_pop = _count_prims(jax.make_jaxpr(pop.step)(params, state).jaxpr, "cond")
    naive_state = jax.vmap(tx.init)(params)
    naive = jax.make_jaxpr(
        lambda p, s: jax.vmap(lambda g, s, p: tx.update(g, s, p, value_fn=loss))(
            jax.vmap(jax.grad(loss))(p), s, p
        )
    )(params, naive_state).jaxpr
    assert n_pop >= 1 and n_pop > _count_prims(naive, "cond")
    for wrapped in (
        qo.rebalance(optax.adam(1e-3), sym, every=5),
        qo.teleport(optax.adam(1e-3), sym, every=5),
    ):
        flags = qo.shared_state_leaves(wrapped, p0, loss)
        st = wrapped.init(p0)
        paths = [jax.tree_util.keystr(k) for k, _ in jax.tree_util.tree_flatten_with_path(st)[0]]
        assert {p for p, f in zip(paths, flags) if f} == {".count", ".inner_state[0].count"}


# --------------------------------------------------------------------------- fast path


def test_fast_path_recognizes_dense_relu_mse_only():
    m = qo.models.SawtoothNet(rngs=nnx.Rngs(0))
    apply, p = qo.models.functional(m)
    task = qo.models.sawtooth_task()
    nnx_loss = lambda q: qo.models.mse(apply(q, task.x), task.y)  # noqa: E731
    spec, why = match_dense_mse(nnx_loss, p)
    assert spec is not None, why
    assert [(lay.relu, lay.bias is not None) for lay in spec.layers] == [(True, True)] * 5 + [
        (False, True)
    ]
    ps = jax.tree.map(lambda a: jnp.stack([a + 0.05 * i for i in range(4)]), p)  # live units
    v0, g0 = jax.jit(jax.vmap(jax.value_and_grad(nnx_loss)))(ps)
    fast = jax.jit(
        lambda ps: population_value_and_grad(spec, jax.tree.structure(p), ps, pad_points=16)
    )
    v1, g1 = fast(ps)
    np.testing.assert_allclose(v1, v0, rtol=1e-5)
    for a, b in zip(jax.tree.leaves(g0), jax.tree.leaves(g1)):
        np.testing.assert_allclose(b, a, rtol=1e-4, atol=1e-5 * float(jnp.max(jnp.abs(a))))

    # several inputs/outputs, a linear hidden layer, a sum instead of a mean
    xs = jax.random.normal(jax.random.key(0), (20, 3))
    ys = jax.random.normal(jax.random.key(1), (20, 2))
    q = [
        (jnp.ones((3, 4)), jnp.zeros(4)),
        (jnp.ones((4, 4)), jnp.zeros(4)),
        (jnp.ones((4, 2)), jnp.zeros(2)),
    ]

    def f(ps):
        h = jax.nn.relu(xs @ ps[0][0] + ps[0][1])
        h = h @ ps[1][0] + ps[1][1]
        return 0.5 * jnp.sum((h @ ps[2][0] + ps[2][1] - ys) ** 2)

    spec, why = match_dense_mse(f, q)
    assert (
        spec is not None
        and spec.scale == 0.5
        and [lay.relu for lay in spec.layers] == [True, False, False]
    )
    qs = jax.vmap(
        lambda k: jax.tree.map(
            lambda a: jax.random.normal(jax.random.fold_in(k, a.size), a.shape), q
        )
    )(jax.random.split(jax.random.key(2), 3))
    v0, g0 = jax.jit(jax.vmap(jax.value_and_grad(f)))(qs)
    v1, g1 = jax.jit(lambda qs: population_value_and_grad(spec, jax.tree.structure(q), qs))(qs)
    np.testing.assert_allclose(v1, v0, rtol=1e-5)
    assert_trees_close(g1, g0, rtol=1e-4, atol=1e-4)

    # not recognized: another activation, a regularizer, another loss, a skip connection
    def skip(ps):
        h1 = jax.nn.relu(xs @ ps[0][0] + ps[0][1])
        h2 = jax.nn.relu(h1 @ ps[1][0] + ps[1][1]) + h1
        return jnp.mean((h2 @ ps[2][0] + ps[2][1] - ys) ** 2)

    assert match_dense_mse(loss_tanh, init_mlp(KEY))[0] is None
    assert (
        match_dense_mse(lambda p: loss_relu(p) + 1e-3 * jnp.sum(p[0]["w"] ** 2), init_mlp(KEY))[0]
        is None
    )
    assert match_dense_mse(lambda p: jnp.mean(jnp.abs(mlp(p, X) - Y)), init_mlp(KEY))[0] is None
    assert match_dense_mse(skip, q)[0] is None


# --------------------------------------------------------------------------- errors


@pytest.mark.parametrize(
    "kw, match",
    [
        (dict(nets=0), "nets"),
        (dict(nets=2.5), "nets"),
        (dict(steps=-1), "steps"),
        (dict(chunk_size=0), "chunk_size"),
        (dict(segment_steps=0), "segment_steps"),
        (dict(history_every=0), "history_every"),
        (dict(key=42), "key"),
        (dict(key=jnp.zeros(3)), "key"),
        (dict(checkpoint_every=-1.0), "checkpoint_every"),
        (dict(fast_path="yes"), "fast_path"),
        (dict(mesh="cpu"), "mesh"),
        (dict(compiler_options=3), "compiler_options"),
        (dict(loss=lambda p: mlp(p, X)), "loss_fn must return a scalar"),
        (dict(loss=3.0), "loss_fn"),
        (dict(loss=loss_tanh, fast_path=True), "fast_path=True"),
    ],
)
def test_bad_arguments_name_the_argument(kw, match):
    with pytest.raises(ValueError, match=match):
        run(**kw)


def test_continue_from_stacked_params():
    """Stacked params as init_fn: 30 + 30 steps of stateless SGD equal 60 steps at once."""
    kw = dict(nets=5, key=KEY, chunk_size=4, progress=False, fast_path=False)
    tx = optax.sgd(1e-2)
    first = qo.train_population(tx, init_mlp, loss_relu, steps=30, **kw)
    second = qo.train_population(tx, first.params, loss_relu, steps=30, **kw)
    whole = qo.train_population(tx, init_mlp, loss_relu, steps=60, **kw)
    assert_trees_close(second.params, whole.params)
    np.testing.assert_allclose(second.history[:, 0], first.losses, rtol=1e-6)
    with pytest.raises(ValueError, match="leading axis of size nets=6"):
        qo.train_population(tx, first.params, loss_relu, steps=1, **{**kw, "nets": 6})


def test_bad_init_and_tx():
    with pytest.raises(ValueError, match="init_fn"):
        qo.train_population(
            optax.sgd(0.1),
            lambda k: {"n": jnp.zeros(3, jnp.int32)},
            lambda p: 0.0,
            nets=2,
            steps=1,
            key=KEY,
        )
    with pytest.raises(ValueError, match="tx"):
        qo.train_population(object(), init_mlp, loss_relu, nets=2, steps=1, key=KEY)
    with pytest.raises(ValueError, match="init_fn"):
        qo.train_population(optax.sgd(0.1), None, loss_relu, nets=2, steps=1, key=KEY)
