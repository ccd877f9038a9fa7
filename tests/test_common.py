"""The common battery over every transformation and alias of the library.

Modelled on Optax's ``optax/contrib/_common_test.py``: each case is
``(name, factory(sym) -> optimizer, needs_value_fn)``; every case must

* accept and ignore unknown extra keyword arguments, without recompiling;
* work with ``optax.tree.map_params`` on its state;
* keep float32, float64 and bfloat16 params' dtype through init/update (the
  state's params-shaped statistics too);
* keep the params' sharding in its updates and state (4 host devices, in a
  subprocess with ``XLA_FLAGS=--xla_force_host_platform_device_count=4``);
* converge inside ``lax.scan`` on the sawtooth task and on the MaxPool task;

and the aliases (and numeric-hyperparameter transforms) must work under
``optax.inject_hyperparams`` with the same results as without.
"""

from __future__ import annotations

import textwrap
from collections.abc import Callable
from typing import NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from flax import nnx

import quotient_opt as qo
import four_devices
import zoo
from quotient_opt.transforms._transport import map_param_like
from quotient_opt.models import functional


class Case(NamedTuple):
    name: str
    factory: Callable[[qo.Symmetry], optax.GradientTransformation]
    needs_value_fn: bool


LR = 0.01

CASES = [
    Case(
        "project_horizontal",
        lambda sym: optax.chain(optax.adam(LR), qo.project_horizontal(sym)),
        False,
    ),
    Case(
        "scale_by_path_norm",
        lambda sym: optax.chain(qo.scale_by_path_norm(sym), optax.adam(LR)),
        False,
    ),
    Case("path_sgd", lambda sym: qo.path_sgd(0.02, sym, momentum=0.9), False),
    Case("rebalance", lambda sym: qo.rebalance(optax.adam(LR), sym, every=3), False),
    Case("teleport", lambda sym: qo.teleport(optax.adam(LR), sym, every=3, steps=2), True),
    Case("revive_dead_units", lambda sym: qo.revive_dead_units(optax.adam(LR), sym), True),
    Case("quotient_sgd", lambda sym: qo.quotient_sgd(0.05, sym, momentum=0.9), False),
    Case("quotient_adam", lambda sym: qo.quotient_adam(LR, sym), False),
]
CASE_IDS = [c.name for c in CASES]

# (name, factory, kwargs) for inject_hyperparams: the aliases and the
# transformations with numeric hyperparameters.
INJECTABLE = [
    ("path_sgd", lambda: qo.path_sgd, dict(learning_rate=0.02, momentum=0.9)),
    ("quotient_sgd", lambda: qo.quotient_sgd, dict(learning_rate=0.05, momentum=0.9)),
    ("quotient_adam", lambda: qo.quotient_adam, dict(learning_rate=LR)),
    ("scale_by_path_norm", lambda: qo.scale_by_path_norm, dict(eps=1e-12)),
    ("project_horizontal", lambda: qo.project_horizontal, dict(tol=1e-6, max_iter=40)),
]


def small_mlp(dtype=jnp.float32, seed=0):
    rngs = nnx.Rngs(seed)
    model = nnx.Sequential(
        nnx.Linear(4, 8, param_dtype=dtype, rngs=rngs),
        nnx.relu,
        nnx.Linear(8, 8, param_dtype=dtype, rngs=rngs),
        nnx.relu,
        nnx.Linear(8, 4, param_dtype=dtype, rngs=rngs),
    )
    apply, params = functional(model)
    return qo.infer_symmetry(model), apply, params


def mlp_problem(dtype=jnp.float32):
    sym, apply, params = small_mlp(dtype)
    x = jax.random.normal(jax.random.key(1), (32, 4), dtype)
    y = jax.random.normal(jax.random.key(2), (32, 4), dtype)

    def loss(p):
        return jnp.mean((apply(p, x).astype(jnp.float32) - y.astype(jnp.float32)) ** 2)

    return sym, params, loss


def extra_for(case: Case, loss) -> dict:
    return {"value_fn": loss} if case.needs_value_fn else {}


def scan_train(tx, params, loss, extra, steps):
    """Trains inside one jitted ``lax.scan``; returns (losses, final loss, params, state)."""

    @jax.jit
    def run(p):
        p, s, losses = qo.fit(tx, p, loss, steps, **extra)
        return losses, loss(p), p, s

    losses, final, p, s = run(params)
    return np.asarray(losses), float(final), p, s


# --------------------------------------------------------------------------- extra args


@pytest.mark.parametrize("case", CASES, ids=CASE_IDS)
def test_ignores_unknown_extra_args_without_recompiling(case):
    """Unknown extra args are accepted, ignored (same result), and cause no retrace."""
    sym, params, loss = mlp_problem(jnp.float32)
    tx = case.factory(sym)
    extra = extra_for(case, loss)
    traces = []

    @jax.jit
    def update(g, s, p, junk):
        traces.append(1)
        return tx.update(g, s, p, some_unknown_arg=junk, another_one=[junk, junk], **extra)

    state = tx.init(params)
    grads = jax.grad(loss)(params)
    outs = [update(grads, state, params, jnp.asarray(v, jnp.float32)) for v in (1.0, -2.0, 3e3)]
    assert len(traces) == 1
    for out in outs[1:]:
        for a, b in zip(jax.tree.leaves(out), jax.tree.leaves(outs[0])):
            np.testing.assert_array_equal(a, b)
    # float32 params keep their dtype (float64 and bfloat16: test_keeps_param_dtypes)
    for a in jax.tree.leaves(outs[0][0]):
        assert a.dtype == jnp.float32


# --------------------------------------------------------------------------- inject


@pytest.mark.parametrize("name,get,kwargs", INJECTABLE, ids=[i[0] for i in INJECTABLE])
def test_works_under_inject_hyperparams(name, get, kwargs):
    sym, params, loss = mlp_problem(jnp.float32)
    fn = get()
    tx = fn(sym=sym, **kwargs)
    tx_inj = optax.inject_hyperparams(fn)(sym=sym, **kwargs)
    grads = jax.grad(loss)(params)
    s, s_inj = tx.init(params), tx_inj.init(params)
    for k in kwargs:
        assert k in s_inj.hyperparams
    step = jax.jit(lambda t, g, st, p: t.update(g, st, p), static_argnums=0)
    for _ in range(3):
        u, s = step(tx, grads, s, params)
        u_inj, s_inj = step(tx_inj, grads, s_inj, params)
        for a, b in zip(jax.tree.leaves(u_inj), jax.tree.leaves(u)):
            np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-7)
        for a, b in zip(jax.tree.leaves(s_inj.inner_state), jax.tree.leaves(s)):
            np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-7)
        params = optax.apply_updates(params, u)
        grads = jax.grad(loss)(params)


# --------------------------------------------------------------------------- map_params


@pytest.mark.parametrize("case", CASES, ids=CASE_IDS)
def test_tree_map_params_on_state(case):
    sym, params, loss = mlp_problem()
    tx = case.factory(sym)
    state = tx.init(params)
    same = optax.tree.map_params(tx, lambda v: v, state)
    assert jax.tree.structure(same) == jax.tree.structure(state)
    for a, b in zip(jax.tree.leaves(same), jax.tree.leaves(state)):
        np.testing.assert_array_equal(a, b)
    # a real map: every params-shaped leaf becomes 2.0, other leaves are kept
    twos = optax.tree.map_params(tx, lambda v: jnp.full_like(v, 2.0), state)
    assert jax.tree.structure(twos) == jax.tree.structure(state)
    seen = []

    def check(kind, sub):
        seen.append(kind)
        for leaf in jax.tree.leaves(sub):
            np.testing.assert_array_equal(leaf, 2.0)
        return sub

    map_param_like(check, twos, params)
    assert seen  # every case's state holds some params-shaped statistics


# --------------------------------------------------------------------------- dtypes


@pytest.mark.parametrize("case", CASES, ids=CASE_IDS)
def test_keeps_bfloat16_params_dtype(case):
    """bfloat16 (float32 and float64 are checked by the extra-args and sawtooth tests)."""
    for dtype in (jnp.bfloat16,):
        sym, params, loss = mlp_problem(dtype)
        tx = case.factory(sym)
        state = tx.init(params)
        step = jax.jit(lambda s, p: tx.update(jax.grad(loss)(p), s, p, **extra_for(case, loss)))
        for _ in range(2):
            u, state = step(state, params)
            for a, p in zip(jax.tree.leaves(u), jax.tree.leaves(params)):
                assert a.dtype == p.dtype == dtype, (case.name, dtype)
                assert bool(jnp.all(jnp.isfinite(a)))
            params = optax.apply_updates(params, u)

        seen = []

        def check(kind, sub, dtype=dtype):
            seen.append(kind)
            for leaf in jax.tree.leaves(sub):
                assert leaf.dtype == dtype, (case.name, kind, dtype)
            return sub

        map_param_like(check, state, params)
        assert seen
        for leaf in jax.tree.leaves(params):
            assert leaf.dtype == dtype


# --------------------------------------------------------------------------- convergence


@pytest.mark.parametrize("case", CASES, ids=CASE_IDS)
def test_converges_on_sawtooth_in_scan_float64(case):
    """Trains in float64 (params and state stay float64) and lowers the loss a lot."""
    model = qo.models.SawtoothNet(rngs=nnx.Rngs(0), param_dtype=jnp.float64)
    apply, params = functional(model)
    sym = qo.infer_symmetry(model)
    task = qo.models.sawtooth_task(dtype=jnp.float64)
    x = 2 * task.x - 1  # inputs in [-1, 1] keep more ReLUs alive at init

    def loss(p):
        return qo.models.mse(apply(p, x), task.y)

    tx = case.factory(sym)
    losses, final, p_end, s_end = scan_train(tx, params, loss, extra_for(case, loss), 300)
    assert np.all(np.isfinite(losses)) and np.isfinite(final)
    assert final < 0.3 * losses[0], (case.name, losses[0], final)
    for leaf in jax.tree.leaves(p_end):
        assert leaf.dtype == jnp.float64
    seen = []

    def check(kind, sub):
        seen.append(kind)
        for leaf in jax.tree.leaves(sub):
            assert leaf.dtype == jnp.float64, (case.name, kind)
        return sub

    map_param_like(check, s_end, params)
    assert seen


@pytest.mark.parametrize("case", CASES, ids=CASE_IDS)
def test_converges_on_maxpool_in_scan(case):
    model = qo.models.MaxPoolNet(rngs=nnx.Rngs(1))
    apply, params = functional(model)
    sym = qo.infer_symmetry(model)
    task = qo.models.maxpool_task(n=200, dtype=jnp.float32)

    def loss(p):
        return qo.models.mse(apply(p, task.x), task.y)

    tx = case.factory(sym)
    losses, final, _, _ = scan_train(tx, params, loss, extra_for(case, loss), 300)
    assert np.all(np.isfinite(losses)) and np.isfinite(final)
    assert final < 0.1 * losses[0], (case.name, losses[0], final)


# --------------------------------------------------------------------------- sharding

_SHARDING_SCRIPT = textwrap.dedent(
    """
    import json, sys
    import jax, jax.numpy as jnp, optax
    from jax.sharding import Mesh, NamedSharding, PartitionSpec as P
    sys.path.insert(0, sys.argv[1])
    import test_common as T
    from quotient_opt.transforms._transport import map_param_like

    assert len(jax.devices()) == 4, jax.devices()
    mesh = Mesh(jax.devices(), ("x",))

    def spec(x):
        axes = [None] * x.ndim
        for i in reversed(range(x.ndim)):
            if x.shape[i] % 4 == 0:
                axes[i] = "x"
                break
        return NamedSharding(mesh, P(*axes))

    results = {}
    for case in [c for c in T.CASES if c.name in sys.argv[2:]]:
        try:
            sym, params, loss = T.mlp_problem(jnp.float32)
            params = jax.tree.map(lambda x: jax.device_put(x, spec(x)), params)
            tx = case.factory(sym)
            extra = T.extra_for(case, loss)
            state = tx.init(params)  # eager, like optax (jit(init) drops shardings)
            grads = jax.grad(loss)(params)
            grads = jax.tree.map(lambda g, p: jax.device_put(g, p.sharding), grads, params)
            upd = jax.jit(lambda g, s, p: tx.update(g, s, p, **extra))
            u, state = upd(grads, state, params)
            bad = []
            for path_leaf, p in zip(jax.tree_util.tree_flatten_with_path(u)[0],
                                    jax.tree.leaves(params)):
                path, a = path_leaf
                if not a.sharding.is_equivalent_to(p.sharding, p.ndim):
                    bad.append(f"update {jax.tree_util.keystr(path)}: {a.sharding}")
            def check(kind, sub):
                for a, p in zip(jax.tree.leaves(sub), jax.tree.leaves(params)):
                    if not a.sharding.is_equivalent_to(p.sharding, p.ndim):
                        bad.append(f"state ({kind}) {a.shape}: {a.sharding}")
                return sub
            map_param_like(check, state, params)
            results[case.name] = {"ok": not bad, "bad": bad}
        except Exception as e:  # report per case
            results[case.name] = {"ok": False, "bad": [f"{type(e).__name__}: {e}"]}
    print("RESULT" + json.dumps(results))
    """
)


@pytest.fixture(scope="module", autouse=True)
def _sharding_proc(request):
    """Starts the 4-device subprocess at the module's first test, so it runs alongside."""
    prefix = "test_keeps_param_sharding["
    names = [
        it.name[len(prefix) : -1]
        for it in request.session.items
        if it.name.startswith(prefix) and it.module is request.module
    ]
    started = four_devices.start(_SHARDING_SCRIPT, *names) if names else None
    yield started
    four_devices.stop(started)


@pytest.fixture(scope="module")
def sharding_results(_sharding_proc):
    return four_devices.result(_sharding_proc)


@pytest.mark.parametrize("case", CASES, ids=CASE_IDS)
def test_keeps_param_sharding(case, sharding_results):
    """Updates and params-shaped state keep the params' NamedSharding over 4 devices."""
    res = sharding_results[case.name]
    assert res["ok"], res["bad"]


# --------------------------------------------------------------------------- the zoo


@pytest.mark.parametrize("model", zoo.NAMES)
def test_every_transformation_runs_on_every_zoo_model(model):
    """init, jit, a few steps in ``lax.scan``, no NaN: every case on every kind of network."""
    m = zoo.build(model, jnp.float32)
    params = m.params(0)
    x = m.inputs(0)
    y = jax.random.normal(jax.random.key(0), jax.eval_shape(m.apply, params, x).shape)

    def loss(p):
        return jnp.mean((m.apply(p, x) - y) ** 2)

    # path_sgd and quotient_sgd are chains of the cases kept here
    for case in [c for c in CASES if c.name not in ("path_sgd", "quotient_sgd")]:
        tx = case.factory(m.sym)
        run = jax.jit(lambda p, tx=tx: qo.fit(tx, p, loss, 3)[::2],
                      compiler_options={"xla_backend_optimization_level": 0})
        p, losses = run(params)
        assert bool(jnp.all(jnp.isfinite(losses))), (case.name, losses)
        assert all(bool(jnp.all(jnp.isfinite(v))) for v in jax.tree.leaves(p)), case.name
        assert jax.tree.structure(p) == jax.tree.structure(params)
