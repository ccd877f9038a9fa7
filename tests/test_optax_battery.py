"""Optax's own per-optimizer battery, adapted to every public transformation of the library.

The checks are this project's adaptation of Optax's
``optax/contrib/_common_test.py`` (extra args, no recompilation, convergence
in ``lax.scan``, ``inject_hyperparams``, dtype stability,
``optax.tree.map_params``, ``MultiSteps``), ``optax/transforms/_masking_test.py``
(``optax.masked``), ``_accumulation_test.py`` (``optax.MultiSteps``),
``_conditionality_test.py`` (``optax.apply_if_finite``) and
``optax/_src/sharding_test.py`` (init on ``jax.ShapeDtypeStruct``, sharding
types kept on an ``Explicit`` mesh), plus ``vmap`` and pickling. They run over
the registry ``benchmarks/cases.py`` (shared with ``tests/test_common.py``
and the benchmarks) and ``optax.adam`` as the control, on a 4-8-8-4 nnx ReLU
MLP (a 2-group symmetry) and, for convergence, the sawtooth task in float64.

Not applicable (each such test asserts the clear error or the documented
behaviour, then skips with the reason):

=============================  ==============================================================
check                          not applicable to, and why
=============================  ==============================================================
masked, multi_transform        ``scale_by_path_norm``, ``path_sgd``: the path norm of a weight
                               multiplies weights of every layer, so it needs the whole tree
                               (it raises, naming the masked leaf; chain it outside the mask).
masked, multi_transform        ``levenberg_marquardt``: ``residual_fn`` takes the whole params
                               (it raises, naming the masked leaf).
no NaN in float16             every case but ``levenberg_marquardt``: ``optax.adam``'s
                               ``eps=1e-8`` underflows to 0 in float16 and plain Adam itself
                               returns ``inf`` here; float16 checks the dtypes (abstractly,
                               as Optax's test does); bfloat16 runs and checks finiteness.
=============================  ==============================================================

The sharding checks run in one child process with 4 host devices
(``tests/four_devices.py``), started at the module's first test.
"""

from __future__ import annotations

import functools
import pickle
import textwrap
import warnings
from typing import Any, NamedTuple

import four_devices
import hypothesis.strategies as hst
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from flax import nnx
from hypothesis import given

import quotient_opt as qo
from benchmarks.cases import CASES, LR, Case
from quotient_opt.models import functional
from quotient_opt.symmetry._paths import leaves_by_path, map_with_path

CONTROL = Case("optax.adam", lambda sym, residual_fn, *, lr=LR: optax.adam(lr), uses_sym=False)
BATTERY = (CONTROL, *CASES)
IDS = [c.name for c in BATTERY]

#: transformations that need the whole params tree (the masked-subtree checks do not apply)
WHOLE_TREE = {
    "scale_by_path_norm": "the path norm of a weight multiplies weights of every layer",
    "path_sgd": "the path norm of a weight multiplies weights of every layer",
    "levenberg_marquardt": "residual_fn takes the whole params",
}

# Compiled at the lowest XLA optimization level: the battery checks results, not speed.
_O0 = {"xla_backend_optimization_level": 0}


def jit(fn, **kw):
    return jax.jit(fn, compiler_options=_O0, **kw)


# --------------------------------------------------------------------------- the problem


class Problem(NamedTuple):
    sym: qo.Symmetry
    apply: Any
    params: Any
    loss: Any
    residual: Any


@functools.cache
def _mlp() -> tuple[qo.Symmetry, Any, Any, jax.Array, jax.Array]:
    """A 4-8-8-4 ReLU MLP, its symmetry and params, 32 inputs and a same-shape teacher's
    outputs (float32)."""
    def mlp(seed):
        rngs = nnx.Rngs(seed)
        return nnx.Sequential(nnx.Linear(4, 8, rngs=rngs), nnx.relu,
                              nnx.Linear(8, 8, rngs=rngs), nnx.relu, nnx.Linear(8, 4, rngs=rngs))

    model = mlp(0)
    apply, params = functional(model)
    t_apply, t_params = functional(mlp(7))
    x = jax.random.normal(jax.random.key(1), (32, 4), jnp.float32)
    return qo.infer_symmetry(model), apply, params, x, t_apply(t_params, x)


@functools.cache
def problem(dtype_name: str = "float32") -> Problem:
    """The MLP's least-squares fit of its teacher, with params and inputs in ``dtype_name``
    (the residuals in float32)."""
    sym, apply, params, x, y = _mlp()
    params = jax.tree.map(lambda v: v.astype(dtype_name), params)
    x = x.astype(dtype_name)

    def residual(p):
        return apply(p, x).astype(jnp.float32) - y

    def loss(p):
        return jnp.mean(residual(p) ** 2)

    return Problem(sym, apply, params, loss, residual)


def build(case: Case, prob: Problem, **options) -> optax.GradientTransformation:
    return case.build(prob.sym, prob.residual, **options)


def extra_for(case: Case, prob: Problem) -> dict:
    return {"value_fn": prob.loss} if case.needs_value_fn else {}


def params_shaped(tx, state) -> list:
    """The leaves of the params-shaped parts of ``state`` (as ``optax.tree.map_params`` sees)."""
    found = []
    optax.tree.map_params(tx, lambda v: found.append(v) or v, state)
    return found


class Reference(NamedTuple):
    tx: optax.GradientTransformation
    state: Any
    grads: Any
    update: Any  # update(g, s, p, junk=0.0) -> (updates, state), one compiled function
    traces: list


@functools.cache
def reference(name: str) -> Reference:
    """The case on the float32 problem, with one jitted update that also passes unknown
    extra args (so every check that reuses it also checks they change nothing)."""
    case = next(c for c in BATTERY if c.name == name)
    prob = problem("float32")
    tx = build(case, prob)
    extra = extra_for(case, prob)
    traces = []

    @jit
    def upd(g, s, p, junk):
        traces.append(1)
        return tx.update(g, s, p, some_unknown_arg=junk, another_one=[junk, junk], **extra)

    def update(g, s, p, junk=0.0):
        return upd(g, s, p, jnp.asarray(junk, jnp.float32))

    return Reference(tx, tx.init(prob.params), jax.grad(prob.loss)(prob.params), update, traces)


def assert_trees_close(a, b, rtol=1e-5, atol=1e-7, what=""):
    assert jax.tree.structure(a) == jax.tree.structure(b), what
    for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b)):
        np.testing.assert_allclose(np.asarray(x, np.float64), np.asarray(y, np.float64),
                                   rtol=rtol, atol=atol, err_msg=what)


def head_bias(path) -> bool:
    return path == ("layers", 4, "bias")


def path_mask(prob: Problem, keep) -> Any:
    """A bool mask over the params: ``keep(path)`` for each leaf."""
    return map_with_path(lambda p, _: bool(keep(p)), prob.params)


# --------------------------------------------------------------------------- extra args


@pytest.mark.slow
@pytest.mark.parametrize("case", BATTERY, ids=IDS)
def test_ignores_unknown_extra_args_without_recompiling(case):
    """Optax: update accepts extra args it does not know, and a second call does not compile."""
    r = reference(case.name)
    p = problem().params
    outs = [r.update(r.grads, r.state, p, junk) for junk in (1.0, -2.0, 3e3)]
    assert len(r.traces) == 1
    for out in outs[1:]:
        for a, b in zip(jax.tree.leaves(out), jax.tree.leaves(outs[0])):
            np.testing.assert_array_equal(a, b)
    for u, q in zip(jax.tree.leaves(outs[0][0]), jax.tree.leaves(p)):
        assert u.dtype == q.dtype == jnp.float32
        assert bool(jnp.all(jnp.isfinite(u)))
    assert all(v.dtype == jnp.float32 for v in params_shaped(r.tx, outs[0][1]))


# --------------------------------------------------------------------------- convergence

@functools.cache
def sawtooth() -> Problem:
    """The sawtooth net and task in float64 (inputs in [-1, 1] keep more ReLUs alive)."""
    model = qo.models.SawtoothNet(rngs=nnx.Rngs(0), param_dtype=jnp.float64)
    apply, params = functional(model)
    task = qo.models.sawtooth_task(dtype=jnp.float64)
    x = 2 * task.x - 1

    def residual(p):
        return apply(p, x) - task.y

    def loss(p):
        return qo.models.mse(apply(p, x), task.y)

    return Problem(qo.infer_symmetry(model), apply, params, loss, residual)


#: steps in ``lax.scan`` (default 300), per case
STEPS = {"levenberg_marquardt": 20}


@pytest.mark.slow
@pytest.mark.parametrize("case", BATTERY, ids=IDS)
def test_converges_on_sawtooth_in_scan_float64(case):
    """Optax: optimization works inside ``lax.scan`` (the loss drops below 30%); float64
    params and params-shaped state stay float64."""
    prob = sawtooth()
    tx = build(case, prob)
    run = jit(lambda p: qo.fit(tx, p, prob.loss, STEPS.get(case.name, 300),
                               **extra_for(case, prob)))
    p_end, s_end, losses = run(prob.params)
    final = float(prob.loss(p_end))
    assert np.all(np.isfinite(np.asarray(losses))) and np.isfinite(final)
    assert final < 0.3 * float(losses[0]), (float(losses[0]), final)
    assert all(v.dtype == jnp.float64 for v in jax.tree.leaves(p_end))
    assert all(v.dtype == jnp.float64 for v in params_shaped(tx, s_end))


# --------------------------------------------------------------------------- inject_hyperparams

# name -> (factory, its arguments, static_args), building exactly what the registry builds
# (the numeric hyperparameters set to the registry's values, so the reference applies)
INJECT = {
    "optax.adam": lambda prob: optax.inject_hyperparams(optax.adam)(learning_rate=LR),
    "project_horizontal": lambda prob: optax.chain(
        optax.adam(LR), optax.inject_hyperparams(qo.project_horizontal)(prob.sym, max_iter=64)),
    "scale_by_path_norm": lambda prob: optax.chain(
        optax.inject_hyperparams(qo.scale_by_path_norm)(prob.sym, eps=1e-12), optax.adam(LR)),
    "path_sgd": lambda prob: optax.inject_hyperparams(qo.path_sgd)(
        learning_rate=0.02, sym=prob.sym, momentum=0.9),
    "rebalance": lambda prob: optax.inject_hyperparams(qo.rebalance)(
        optax.adam(LR), prob.sym, every=3, max_iter=50),
    "teleport": lambda prob: optax.inject_hyperparams(qo.teleport)(
        optax.adam(LR), prob.sym, every=3, steps=2, learning_rate=0.1, max_log_scale=2.0),
    "revive_dead_units": lambda prob: optax.inject_hyperparams(
        qo.revive_dead_units, static_args=("every", "num_candidates", "newton_steps",
                                           "min_support"))(
        optax.adam(LR), prob.sym, patience=20, perturbation=0.05),
    "quotient_sgd": lambda prob: optax.inject_hyperparams(qo.quotient_sgd)(
        learning_rate=0.05, sym=prob.sym, momentum=0.9),
    "quotient_adam": lambda prob: optax.inject_hyperparams(qo.quotient_adam)(
        learning_rate=LR, sym=prob.sym),
    "levenberg_marquardt": lambda prob: optax.inject_hyperparams(
        qo.levenberg_marquardt,
        static_args=("residual_fn", "min_damping", "max_damping", "diag_floor"))(
        prob.residual, damping=1e-3),
}


def test_inject_table_covers_the_registry():
    assert set(INJECT) == set(IDS)


def _injected_state(state):
    """The ``inject_hyperparams`` state inside ``state`` (the first one found)."""
    if isinstance(state, (optax.InjectStatefulHyperparamsState, optax.InjectHyperparamsState)):
        return state
    for sub in state if isinstance(state, tuple) else ():
        found = _injected_state(sub)
        if found is not None:
            return found
    return None


@pytest.mark.slow
@pytest.mark.parametrize("case", BATTERY, ids=IDS)
def test_works_under_inject_hyperparams(case):
    """Optax: same updates and inner states under ``optax.inject_hyperparams``, two steps."""
    prob = problem()
    r = reference(case.name)
    tx = INJECT[case.name](prob)
    extra = extra_for(case, prob)
    step = jit(lambda g, s, p: tx.update(g, s, p, **extra))
    s_inj, s_ref = tx.init(prob.params), r.state
    assert _injected_state(s_inj) is not None
    for _ in range(2):
        u_inj, s_inj = step(r.grads, s_inj, prob.params)
        u_ref, s_ref = r.update(r.grads, s_ref, prob.params)
        assert_trees_close(u_inj, u_ref, what="updates")
    inj = _injected_state(s_inj)
    ref_part = s_ref if inj is s_inj else next(
        b for a, b in zip(s_inj, s_ref) if a is inj)
    assert_trees_close(inj.inner_state, ref_part, rtol=1e-5, atol=1e-6, what="inner state")


# --------------------------------------------------------------------------- dtypes


#: cases run in float16 for real (the others are checked abstractly: see the docstring)
FLOAT16_RUNS = {"levenberg_marquardt"}


@pytest.mark.slow
@pytest.mark.parametrize("dtype", ["bfloat16", "float16"])
@pytest.mark.parametrize("case", BATTERY, ids=IDS)
def test_keeps_half_precision_dtypes(case, dtype):
    """Optax: updates and params-shaped state keep the params' dtype through two steps
    (float32: the extra-args test; float64: the scan test). bfloat16 runs and must stay
    finite; float16 is checked abstractly (``jax.eval_shape``: dtypes are static), as
    Optax's test does, since Adam's ``eps`` underflows in float16 (module docstring), except
    ``levenberg_marquardt``, whose float16 solve runs for real."""
    prob = problem(dtype)
    tx = build(case, prob)
    extra = extra_for(case, prob)

    def step(s, p):
        u, s = tx.update(jax.grad(prob.loss)(p), s, p, **extra)
        return u, s, optax.apply_updates(p, u)

    real = dtype == "bfloat16" or case.name in FLOAT16_RUNS
    run = jit(step) if real else functools.partial(jax.eval_shape, step)
    state, params = tx.init(prob.params), prob.params
    for _ in range(2):
        u, state, new = run(state, params)
        for a, q in zip(jax.tree.leaves(u), jax.tree.leaves(params)):
            assert a.dtype == q.dtype == jnp.dtype(dtype)
            assert not real or bool(jnp.all(jnp.isfinite(a)))
        if real:
            params = new
    assert all(v.dtype == jnp.dtype(dtype) for v in jax.tree.leaves(new))
    assert all(v.dtype == jnp.dtype(dtype) for v in params_shaped(tx, state))


# --------------------------------------------------------------------------- map_params, abstract


@pytest.mark.parametrize("case", BATTERY, ids=IDS)
def test_tree_map_params_and_abstract_init(case):
    """Optax: ``optax.tree.map_params`` maps exactly the params-shaped state; ``init`` works
    on ``jax.ShapeDtypeStruct`` params, directly and under ``jax.eval_shape``."""
    prob = problem()
    r = reference(case.name)
    state = r.update(r.grads, r.state, prob.params)[1]
    same = optax.tree.map_params(r.tx, lambda v: v, state)
    assert_trees_close(same, state, rtol=0, atol=0)
    twos = optax.tree.map_params(r.tx, lambda v: jnp.full_like(v, 2.0), state)
    moved = [(a, b) for a, b in zip(jax.tree.leaves(twos), jax.tree.leaves(state))
             if not (a.shape == b.shape and bool(jnp.all(a == b)))]
    assert len(moved) == len(params_shaped(r.tx, state))
    assert all(bool(jnp.all(a == 2.0)) for a, _ in moved)
    if case.name != "levenberg_marquardt":
        assert moved  # every other case keeps params-shaped statistics

    abstract = jax.tree.map(lambda v: jax.ShapeDtypeStruct(v.shape, v.dtype), prob.params)
    want = jax.tree.map(lambda v: (jnp.shape(v), jnp.result_type(v)), r.state)
    for got in (jax.eval_shape(r.tx.init, abstract), r.tx.init(abstract)):
        assert jax.tree.map(lambda v: (jnp.shape(v), jnp.result_type(v)), got) == want


# --------------------------------------------------------------------------- masked


def _expect_whole_tree_error(case, run):
    with pytest.raises(ValueError, match="masking out 'layers/"):
        run()
    pytest.skip(f"not applicable: {WHOLE_TREE[case.name]} (a clear ValueError names the "
                "masked leaf)")


@pytest.mark.parametrize("case", BATTERY, ids=IDS)
def test_masked(case):
    """Optax masking: ``optax.masked(tx, mask)`` transforms the masked-in leaves exactly as
    ``tx`` on the whole tree (the output bias, in no symmetry group, masked out: every group
    is kept) and passes the masked-out gradient through; masking out the biases instead
    makes every group lose its moves, and ``init`` warns, naming them."""
    prob = problem()
    r = reference(case.name)
    mask = path_mask(prob, lambda p: not head_bias(p))
    tx = optax.masked(build(case, prob), mask)
    if case.name in WHOLE_TREE:
        _expect_whole_tree_error(case, lambda: tx.init(prob.params))
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # nothing is dropped: no warning
        state = tx.init(prob.params)
    u, _ = jit(tx.update)(r.grads, state, prob.params)
    want, _ = r.update(r.grads, r.state, prob.params)
    for path, a in leaves_by_path(u).items():
        b = leaves_by_path(r.grads if head_bias(path) else want)[path]
        np.testing.assert_allclose(a, b, rtol=1e-6, atol=1e-8, err_msg=str(path))

    if case.uses_sym:
        biases_out = optax.masked(build(case, prob), path_mask(prob, lambda p: p[-1] != "bias"))
        with pytest.warns(UserWarning, match=r"2 of 2 symmetry group\(s\) are no symmetry"):
            biases_out.init(prob.params)


# --------------------------------------------------------------------------- multi_transform


@pytest.mark.parametrize("case", BATTERY, ids=IDS)
def test_multi_transform_gives_the_head_its_own_optimizer(case):
    """``optax.multi_transform`` with the output layer on plain SGD: the head gets SGD's step
    exactly; on the body, the group whose units the head reads is no symmetry of the body
    alone and is dropped (``init`` warns, naming it), the other is kept; training lowers
    the loss."""
    prob = problem()
    labels = map_with_path(lambda p, _: "head" if p[:2] == ("layers", 4) else "body", prob.params)
    tx = optax.multi_transform({"body": build(case, prob), "head": optax.sgd(LR)}, labels)
    if case.name in WHOLE_TREE:
        _expect_whole_tree_error(case, lambda: tx.init(prob.params))
    if case.uses_sym:
        with pytest.warns(UserWarning, match=r"1 of 2 symmetry group\(s\).*: layers/2;"):
            state = tx.init(prob.params)
    else:
        state = tx.init(prob.params)
    extra = extra_for(case, prob) if case.name != "revive_dead_units" else {}
    step = jit(lambda g, s, p: tx.update(g, s, p, **extra))
    params, losses = prob.params, []
    for _ in range(3):
        g = jax.grad(prob.loss)(params)
        u, state = step(g, state, params)
        for path, a in leaves_by_path(u).items():
            assert bool(jnp.all(jnp.isfinite(a))), path
            if path[:2] == ("layers", 4):
                np.testing.assert_allclose(a, -LR * leaves_by_path(g)[path], rtol=1e-6)
        losses.append(float(prob.loss(params)))
        params = optax.apply_updates(params, u)
    assert float(prob.loss(params)) < losses[0]


# --------------------------------------------------------------------------- MultiSteps


@pytest.mark.parametrize("case", BATTERY, ids=IDS)
def test_multi_steps(case):
    """Optax accumulation: ``optax.MultiSteps(tx, 2)`` returns exact zeros on the first mini
    step and, on the second, ``tx``'s update of the mean gradient (from the fresh state)."""
    prob = problem()
    r = reference(case.name)
    ms = optax.MultiSteps(r.tx, every_k_schedule=2)
    extra = extra_for(case, prob)
    step = jit(lambda g, s, p: ms.update(g, s, p, **extra))
    state = ms.init(prob.params)
    g1 = r.grads
    g2 = jax.tree.map(lambda g: 3 * g, g1)
    u1, state = step(g1, state, prob.params)
    assert not bool(ms.has_updated(state))
    for a in jax.tree.leaves(u1):
        assert a.dtype == jnp.float32
        np.testing.assert_array_equal(a, 0.0)
    u2, state = step(g2, state, prob.params)
    assert bool(ms.has_updated(state))
    want, _ = r.update(jax.tree.map(lambda g: 2 * g, g1), r.state, prob.params)
    assert_trees_close(u2, want)


# --------------------------------------------------------------------------- apply_if_finite


@pytest.mark.parametrize("case", BATTERY, ids=IDS)
def test_apply_if_finite(case):
    """Optax conditionality: ``optax.apply_if_finite(tx, 2)`` skips a step whose update is not
    finite (zero update, inner state kept, counted) and then goes on exactly as ``tx`` without
    that step."""
    prob = problem()
    r = reference(case.name)
    af = optax.apply_if_finite(r.tx, max_consecutive_errors=2)
    extra = extra_for(case, prob)
    step = jit(lambda g, s, p: af.update(g, s, p, **extra))
    p = prob.params
    nan = jax.tree.map(lambda g: g.at[(0,) * g.ndim].set(jnp.nan), r.grads)
    u1, s1 = step(r.grads, af.init(p), p)
    want1, ref1 = r.update(r.grads, r.state, p)
    assert_trees_close(u1, want1)
    u2, s2 = step(nan, s1, p)
    assert not bool(s2.last_finite) and int(s2.notfinite_count) == 1
    for a in jax.tree.leaves(u2):
        np.testing.assert_array_equal(a, 0.0)
    assert_trees_close(s2.inner_state, s1.inner_state, rtol=0, atol=0)
    u3, s3 = step(r.grads, s2, p)
    assert bool(s3.last_finite) and int(s3.total_notfinite) == 1
    assert_trees_close(u3, r.update(r.grads, ref1, p)[0])


# --------------------------------------------------------------------------- vmap, pickle


@pytest.mark.slow
@pytest.mark.parametrize("case", BATTERY, ids=IDS)
def test_vmap_over_networks(case):
    """``jax.vmap`` of init and update over two networks equals each network's own step."""
    prob = problem()
    r = reference(case.name)
    other = jax.tree.map(lambda v: 0.5 * v[::-1] if v.ndim else v, prob.params)
    both = jax.tree.map(lambda a, b: jnp.stack([a, b]), prob.params, other)
    grads = jax.vmap(jax.grad(prob.loss))(both)
    extra = extra_for(case, prob)
    states = jax.vmap(r.tx.init)(both)
    u, _ = jit(jax.vmap(lambda g, s, p: r.tx.update(g, s, p, **extra)))(grads, states, both)
    for i, p in enumerate((prob.params, other)):
        member = functools.partial(lambda i, a: a[i], i)
        want, _ = r.update(jax.tree.map(member, grads), r.tx.init(p), p)
        assert_trees_close(jax.tree.map(member, u), want, rtol=2e-5, atol=1e-6)


@pytest.mark.parametrize("case", BATTERY, ids=IDS)
def test_pickled_state_resumes_exactly(case):
    """A state pickled and unpickled (a checkpoint) gives bit-identical next updates."""
    prob = problem()
    r = reference(case.name)
    _, state = r.update(r.grads, r.state, prob.params)
    back = pickle.loads(pickle.dumps(state))
    assert jax.tree.structure(back) == jax.tree.structure(state)
    for a, b in zip(jax.tree.leaves(r.update(r.grads, back, prob.params)),
                    jax.tree.leaves(r.update(r.grads, state, prob.params))):
        np.testing.assert_array_equal(a, b)


# --------------------------------------------------------------------------- Symmetry.restrict


def _masked_tree(params, mask):
    return jax.tree.map(lambda m, p: p if m else optax.MaskedNode(), mask, params)


def _with_present(full, moved):
    """``full`` with the leaves of the tree (or ``{path: leaf}``) ``moved`` replacing its own."""
    moved = moved if isinstance(moved, dict) and all(
        isinstance(k, tuple) for k in moved) else leaves_by_path(moved)
    return map_with_path(lambda p, x: moved.get(p, x), full)


@given(hst.lists(hst.booleans(), min_size=6, max_size=6), hst.integers(0, 2**16))
def test_restrict_keeps_exactly_the_groups_that_stay_symmetries(keep, seed):
    """For any mask of the 6 leaves: every group the restriction keeps is an exact symmetry of
    the function of the present leaves (the masked ones fixed), and every group it drops that
    still holds present leaves is not (its moves on those alone change the output);
    ``describe`` says why."""
    prob = problem("float64")
    sym = prob.sym
    leaves, treedef = jax.tree.flatten(prob.params)  # non-zero biases: every leaf matters
    params = jax.tree.unflatten(treedef, [
        v + 0.3 * jax.random.normal(jax.random.key(i), v.shape, v.dtype)
        for i, v in enumerate(leaves)])
    paths = list(leaves_by_path(params))
    mask = map_with_path(lambda p, _: keep[paths.index(p)], params)
    sub = sym.restrict(_masked_tree(params, mask))
    present = {p for p, k in zip(paths, keep) if k}
    x = jax.random.normal(jax.random.key(3), (16, 4), jnp.float64)
    out = prob.apply(params, x)
    scale = float(jnp.max(jnp.abs(out)))
    key = jax.random.key(seed)
    for i, grp in enumerate(sub.groups):
        assert all(r.path in present for r in grp.refs)
        e = sub.sample(jax.random.fold_in(key, i), log_scale=1.0)
        moved = _with_present(params, sub.act(_masked_tree(params, mask), e))
        err = float(jnp.max(jnp.abs(prob.apply(moved, x) - out))) / scale
        assert err < 1e-12, (grp.name, err)
    lost = [g for g in sym.groups if g.name not in {k.name for k in sub.groups}]
    assert len(lost) == sum(any(r.path not in present for r in g.refs) for g in sym.groups)
    for grp in [g for g in lost if any(r.path in present for r in g.refs)]:
        j = sym.groups.index(grp)
        e = sym.sample(jax.random.fold_in(key, 100 + j), log_scale=1.0)
        moved = _with_present(params, {p: v for p, v in leaves_by_path(
            sym.act_group(params, j, e[j])).items() if p in present})
        err = float(jnp.max(jnp.abs(prob.apply(moved, x) - out))) / scale
        assert err > 1e-3, (grp.name, err)
        assert f"{grp.name}: " in str(sub) and "dropped on this subtree" in str(sub)
    if len(present) == len(paths):
        assert sub is sym
    else:
        assert "restricted to a subtree" in str(sub)


def test_restrict_keeps_the_rescaling_when_only_a_gain_is_masked():
    """A per-unit gain (power 0, permuted only) masked out: the rescaling stays exact (it never
    touches the gain), the permutations go (they would have to permute it)."""
    rng = np.random.default_rng(0)
    params = {"w1": jnp.asarray(rng.normal(size=(3, 5))), "b1": jnp.asarray(rng.normal(size=5)),
              "g": jnp.asarray(rng.uniform(0.5, 2.0, size=5)),
              "w2": jnp.asarray(rng.normal(size=(5, 2)))}

    def apply(p, x):
        return (jax.nn.relu(x @ p["w1"] + p["b1"]) * p["g"]) @ p["w2"]

    sym = qo.symmetry_from_axes(params, {"w1": (None, "h"), "b1": ("h",), "g": ("=h",),
                                         "w2": ("1/h", None)})
    x = jnp.asarray(rng.normal(size=(8, 3)))
    sym.check(apply, params, x)
    mask = {"w1": True, "b1": True, "g": False, "w2": True}
    sub = sym.restrict(_masked_tree(params, mask))
    (grp,) = sub.groups
    assert grp.rescalable and not grp.permutable
    assert "rescalable only (g, permuted with the units, is masked out)" in str(sub)
    out = apply(params, x)
    e = sub.sample(jax.random.key(0), log_scale=1.5)
    moved = _with_present(params, sub.act(_masked_tree(params, mask), e))
    np.testing.assert_allclose(apply(moved, x), out, rtol=1e-12, atol=1e-12)
    perm = sym.sample(jax.random.key(1), log_scale=0.0)
    moved = _with_present(params, {k: v for k, v in sym.act(params, perm).items() if mask[k]})
    assert float(jnp.max(jnp.abs(apply(moved, x) - out))) > 1e-3


def test_restrict_tells_another_model_from_a_subtree():
    """Shapes that differ, or leaves missing without being masked out, are another model's;
    a masked subtree holding none of the symmetry's leaves is a subtree (all groups lost)."""
    prob = problem()
    sym, params = prob.sym, prob.params
    with pytest.raises(ValueError, match=r"shape \(8, 4\), the Symmetry expects \(4, 8\) "
                       r"\(it was built for another model\)"):
        sym.restrict(jax.tree.map(lambda v: v.T if v.ndim == 2 else v, params))
    leaves = leaves_by_path(params)
    partial = {"layers": {i: {k: leaves[("layers", i, k)] for k in ("kernel", "bias")}
                          for i in (2, 4)}}
    with pytest.raises(ValueError, match="no parameter at path 'layers/0/.*built for another"):
        sym.restrict(partial)
    only_head = _masked_tree(params, path_mask(prob, head_bias))
    sub = sym.restrict(only_head)
    assert not sub.groups and len(sub.masked) == len(sym.shapes) - 1  # the head bias is there
    assert sym.restrict(params) is sym


# --------------------------------------------------------------------------- sharding

_SHARDING_SCRIPT = textwrap.dedent(
    """
    import json, sys
    import jax, jax.numpy as jnp, optax
    from jax.sharding import AxisType, NamedSharding, PartitionSpec as P
    sys.path.insert(0, sys.argv[1])
    import test_optax_battery as B

    assert len(jax.devices()) == 4, jax.devices()

    def spec(x, mesh):
        axes = [None] * x.ndim
        for i in reversed(range(x.ndim)):
            if x.shape[i] % 4 == 0:
                axes[i] = "x"
                break
        return NamedSharding(mesh, P(*axes))

    def auto(case):
        mesh = jax.make_mesh((4,), ("x",), axis_types=(AxisType.Auto,))
        prob = B.problem()
        params = jax.tree.map(lambda x: jax.device_put(x, spec(x, mesh)), prob.params)
        tx = B.build(case, prob)
        state = tx.init(params)  # eager, like optax (jit(init) drops shardings)
        grads = jax.tree.map(lambda g, p: jax.device_put(g, p.sharding),
                             jax.grad(prob.loss)(params), params)
        extra = B.extra_for(case, prob)
        u, state = B.jit(lambda g, s, p: tx.update(g, s, p, **extra))(grads, state, params)
        bad = [f"update {jax.tree_util.keystr(k)}: {a.sharding}"
               for (k, a), p in zip(jax.tree_util.tree_flatten_with_path(u)[0],
                                    jax.tree.leaves(params))
               if not a.sharding.is_equivalent_to(p.sharding, p.ndim)]
        def check(a, p):
            if not a.sharding.is_equivalent_to(p.sharding, p.ndim):
                bad.append(f"state {a.shape}: {a.sharding}")
            return a
        optax.tree.map_params(tx, check, state, params)
        return bad

    def explicit(case):
        mesh = jax.make_mesh((4,), ("x",), axis_types=(AxisType.Explicit,))
        with jax.set_mesh(mesh):
            prob = B.problem()
            params = jax.tree.map(lambda x: jax.device_put(x, spec(x, mesh)), prob.params)
            tx = B.build(case, prob)
            types = lambda t: jax.tree.map(jax.typeof, t)
            state0 = tx.init(params)
            grads = jax.grad(prob.loss)(params)
            extra = B.extra_for(case, prob)
            u, state1 = B.jit(lambda g, s, p: tx.update(g, s, p, **extra))(grads, state0, params)
            bad = []
            if types(u) != types(params):
                bad.append(f"update types {types(u)} != params types {types(params)}")
            if types(state1) != types(state0):
                bad.append(f"state types after update {types(state1)} != after init "
                           f"{types(state0)}")
            if types(B.jit(tx.init)(params)) != types(state0):
                bad.append("jit(init) gives other state types than init")
            return bad

    results = {}
    for case in [c for c in B.BATTERY if c.name in sys.argv[2:]]:
        for mode, fn in (("auto", auto), ("explicit", explicit)):
            try:
                bad = fn(case)
            except Exception as e:  # reported per case
                bad = [f"{type(e).__name__}: {str(e)[:2000]}"]
            results[f"{mode}:{case.name}"] = bad
    print("RESULT" + json.dumps(results))
    """
)

_SHARDING_TESTS = ("test_keeps_auto_sharding[", "test_keeps_explicit_sharding_types[")


@pytest.fixture(scope="module", autouse=True)
def _sharding_proc(request):
    """Starts the 4-device child at the module's first test, so it runs alongside."""
    names = sorted({
        it.name[it.name.index("[") + 1 : -1]
        for it in request.session.items
        if it.module is request.module and it.name.startswith(_SHARDING_TESTS)
    })
    started = four_devices.start(_SHARDING_SCRIPT, *names) if names else None
    yield started
    four_devices.stop(started)


@pytest.fixture(scope="module")
def sharding_results(_sharding_proc):
    return four_devices.result(_sharding_proc)


@pytest.mark.slow  # a 4-device child process: `make check`
@pytest.mark.parametrize("case", BATTERY, ids=IDS)
def test_keeps_auto_sharding(case, sharding_results):
    """Updates and params-shaped state keep the params' NamedSharding on an Auto mesh."""
    bad = sharding_results[f"auto:{case.name}"]
    assert not bad, bad


@pytest.mark.slow  # a 4-device child process: `make check`
@pytest.mark.parametrize("case", BATTERY, ids=IDS)
def test_keeps_explicit_sharding_types(case, sharding_results):
    """Optax sharding test: on an ``AxisType.Explicit`` mesh the updates have the params'
    sharding types, the state keeps its types through an update, and ``jit(init)`` gives
    the same types as ``init``."""
    bad = sharding_results[f"explicit:{case.name}"]
    assert not bad, bad
