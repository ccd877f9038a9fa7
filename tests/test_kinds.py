"""Group families beyond the unit groups: normalization scale invariance and sign flips.

The property battery of the kind protocol (``quotient_opt/symmetry/_kinds.py``),
parametric over the kinds found on the normalization zoo (BatchNorm CNN in train
and eval mode, a BatchNorm ResNet block, an equinox LayerNorm MLP, a hand-written
RMSNorm MLP) and a tanh layer's sign flips, in float32 and float64: invariance
of the function, inverse and composition, adjointness of tangent and cotangent,
horizontal gradients, the section; then what the methods do with the new kinds
(projection, AdamP as a chain and against a direct reimplementation, decay).
"""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

import quotient_opt as qo
from quotient_opt.symmetry import _kinds

import zoo

# flax keeps BatchNorm's running statistics in float32, and warns when float64 meets them
pytestmark = pytest.mark.filterwarnings("ignore:scatter inputs have incompatible types")

NAMES = zoo.NORM_NAMES + ("nnx_maxout",)
DTYPES = (jnp.float32, jnp.float64)
CASES = [(n, d) for n in NAMES for d in DTYPES]


def _model(name, dtype):
    return zoo.build(name, dtype)


def _tol(dtype):
    return 1e-4 if dtype == jnp.float32 else 1e-9


def _rel(a, b):
    a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
    return float(np.max(np.abs(a - b)) / max(np.max(np.abs(b)), 1e-30))


def _tree_rel(a, b):
    return max(_rel(x, y) for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b)))


def _leaf_dict(tree):
    return qo.symmetry.leaves_by_path(tree)


# ------------------------------------------------------------------- inference


@pytest.mark.parametrize("name", zoo.NORM_NAMES)
def test_inference_finds_every_kind(name):
    sym = _model(name, jnp.float32).sym
    got = [(g.windows, g.pieces, g.permutable, g.rescalable) for g in sym.groups]
    assert got == zoo.NORM_EXPECT[name], sym.describe()
    facs = [(f.kind, f.name, f.units, getattr(f, "blocks", f.units)) for f in sym.factors]
    assert facs == zoo.FACTOR_EXPECT[name], sym.describe()
    text = sym.describe()
    for f in sym.factors:
        assert f.describe().splitlines()[0] in text


def test_eval_mode_batchnorm_claims_nothing():
    # running statistics are constants: no scale invariance, and no permutation either
    # (permuting channels would need the statistics permuted, and they are not params)
    sym = _model("nnx_bn_cnn_eval", jnp.float32).sym
    assert not sym.groups and not sym.factors


def test_sign_flips_of_tanh_found_relu_not():
    sym = _model("nnx_maxout", jnp.float32).sym
    flips = [f for f in sym.factors if f.kind == "sign_flip"]
    assert [f.name for f in flips] == ["layers/4"]  # the tanh layer; not the max or leaky ReLU


# ------------------------------------------------------------------- the group


def _output_change(m, p, q, x):
    return _rel(m.apply(q, x), m.apply(p, x))


@pytest.mark.parametrize("name,dtype", CASES)
@settings(max_examples=4, deadline=None)
@given(seed=st.integers(0, 2**16))
def test_every_factor_is_a_symmetry(name, dtype, seed):
    m = _model(name, dtype)
    rng = np.random.default_rng(seed)
    p, x = m.params(seed % 7), m.inputs(seed % 5)
    for f in m.sym.factors:
        kind = _kinds.kind_of(f)
        h = kind.sample(f, rng, 1.0, dtype)
        q = _kinds.act(m.sym, p, (h,), factors=(f,))
        assert _output_change(m, p, q, x) <= kind.check_tolerance(_tol(dtype)), f.name
    # every factor and every unit group at once
    g = zoo.random_element(m.sym, rng, 1.0, dtype)
    q = _kinds.act(m.sym, m.sym.act(p, g), _kinds.sample(m.sym, rng, 1.0, dtype))
    bound = max([_kinds.kind_of(f).check_tolerance(_tol(dtype)) for f in m.sym.factors]
                + [_tol(dtype)])
    assert _output_change(m, p, q, x) <= 10 * bound


@pytest.mark.parametrize("name,dtype", CASES)
def test_inverse_and_compose(name, dtype):
    m = _model(name, dtype)
    rng = np.random.default_rng(1)
    p = m.params(0)
    a = _kinds.sample(m.sym, rng, 1.0, dtype)
    b = _kinds.sample(m.sym, rng, 1.0, dtype)
    pa = _kinds.act(m.sym, p, a)
    assert _tree_rel(_kinds.act(m.sym, pa, _kinds.inverse(m.sym, a)), p) <= 10 * _tol(dtype)
    assert _tree_rel(_kinds.act(m.sym, pa, b),
                     _kinds.act(m.sym, p, _kinds.compose(m.sym, a, b))) <= 10 * _tol(dtype)
    ident = _kinds.act(m.sym, p, _kinds.identity(m.sym, dtype))
    assert _tree_rel(ident, p) == 0.0


@pytest.mark.parametrize("name", NAMES)
def test_tangent_and_cotangent_are_adjoint(name):
    m = _model(name, jnp.float64)
    rng = np.random.default_rng(2)
    p = m.params(1)
    facs = _kinds.continuous(m.sym)
    a = [jnp.asarray(rng.normal(size=_kinds.kind_of(f).dim(f))) for f in facs]
    v = {k: jnp.asarray(rng.normal(size=np.shape(x))) for k, x in _leaf_dict(p).items()}
    ja = _kinds.tangent(m.sym, p, a)
    lhs = sum(float(jnp.vdot(ja[k], v[k])) for k in ja)
    rhs = sum(float(jnp.vdot(ai, bi)) for ai, bi in zip(a, _kinds.cotangent(m.sym, p, v)))
    assert lhs == pytest.approx(rhs, rel=1e-10, abs=1e-12)
    # and the tangent is the derivative of the action
    if facs:
        t = 1e-6
        moved = _kinds.act(m.sym, p, tuple(t * ai for ai in a), factors=facs)
        fd = {k: (_leaf_dict(moved)[k] - _leaf_dict(p)[k]) / t for k in ja}
        assert max(_rel(fd[k], ja[k]) for k in ja) < 1e-5


@pytest.mark.parametrize("name", zoo.NORM_NAMES[:1] + zoo.NORM_NAMES[2:])
def test_gradient_is_horizontal_for_norm_scale(name):
    # L(c W_b) = L(W_b) to O(eps / var): the gradient has no radial component
    m = _model(name, jnp.float64)
    p, x = m.params(3), m.inputs(3)
    grad = jax.grad(lambda q: jnp.sum(m.apply(q, x) ** 2))(p)
    gl = _leaf_dict(grad)
    facs = [f for f in m.sym.factors if f.kind == "norm_scale"]
    assert facs
    for f, ct in zip(facs, _kinds.cotangent(m.sym, p, gl, factors=facs)):
        w = np.sqrt(sum(float(jnp.sum(_leaf_dict(p)[r.path] ** 2)) for r in f.refs))
        g = np.sqrt(sum(float(jnp.sum(gl[r.path] ** 2)) for r in f.refs))
        assert float(jnp.max(jnp.abs(ct))) <= 1e-4 * w * g, f.name


@pytest.mark.parametrize("name,dtype", CASES)
def test_section_is_idempotent_and_orbit_invariant(name, dtype):
    m = _model(name, dtype)
    rng = np.random.default_rng(4)
    p = m.params(2)
    for f in m.sym.factors:
        c = _kinds.canonical(m.sym, p, factors=(f,))
        assert _tree_rel(_kinds.canonical(m.sym, c, factors=(f,)), c) <= 10 * _tol(dtype)
        h = _kinds.kind_of(f).sample(f, rng, 1.0, dtype)
        moved = _kinds.act(m.sym, p, (h,), factors=(f,))
        assert _tree_rel(_kinds.canonical(m.sym, moved, factors=(f,)), c) <= 10 * _tol(dtype)
        if f.kind == "norm_scale":
            leaves = {r.path: _leaf_dict(c)[r.path] for r in f.refs}
            norms = _kinds.kind_of(f).gram_diagonal(f, leaves)
            np.testing.assert_allclose(norms, 1.0, rtol=10 * _tol(dtype))


def test_unknown_kind_is_refused_with_its_name():
    sym = _model("eqx_ln_mlp", jnp.float32).sym
    bad = dataclasses.replace(sym.factors[0], kind="nope")
    with pytest.raises(ValueError, match="factor 'l2': no kind 'nope'"):
        _kinds.kind_of(bad)
    with pytest.raises(TypeError, match="Kind"):
        qo.symmetry.register_kind("x", object())


# ------------------------------------------------------------------- the methods


def _adam_update(m, p, x, steps=3, tx=None):
    tx = tx or optax.chain(optax.adam(1e-2), qo.project_horizontal(m.sym))
    state = tx.init(p)
    loss = lambda q: jnp.sum(m.apply(q, x) ** 2)  # noqa: E731
    for _ in range(steps):
        u, state = tx.update(jax.grad(loss)(p), state, p)
        p_next = optax.apply_updates(p, u)
        last, p = (u, p), p_next
    return last


@pytest.mark.parametrize("name", ["nnx_bn_cnn_train", "nnx_bn_resblock", "eqx_ln_mlp",
                                  "rms_mlp"])
def test_projection_removes_every_kinds_component(name):
    # nnx_bn_resblock and eqx_ln_mlp move leaves with both a unit group and a factor:
    # the joint CG path; the others the per-block division
    m = _model(name, jnp.float64)
    u, p = _adam_update(m, m.params(5), m.inputs(5))
    ul = _leaf_dict(u)
    unorm = np.sqrt(sum(float(jnp.sum(v ** 2)) for v in ul.values()))
    pnorm = np.sqrt(sum(float(jnp.sum(v ** 2)) for v in _leaf_dict(p).values()))
    for ct in _kinds.cotangent(m.sym, p, ul):
        assert float(jnp.max(jnp.abs(ct))) <= 1e-10 * unorm * pnorm
    for ct, g in zip(m.sym.cotangent(p, u), m.sym.groups):
        if g.rescalable:
            assert float(jnp.max(jnp.abs(ct))) <= 1e-10 * unorm * pnorm
    # and it changes the update: Adam's own is not horizontal
    raw, _ = _adam_update(m, m.params(5), m.inputs(5), tx=optax.adam(1e-2))
    assert _tree_rel(raw, u) > 1e-3


def _bn_mlp(p, x):
    """A bias-free layer, batch normalization (train mode, no affine), ReLU, readout."""
    h = x @ p["w1"]
    h = (h - h.mean(0)) * jax.lax.rsqrt(h.var(0) + 1e-5)
    return jax.nn.relu(h) @ p["w2"]


def _adamp_reference(params, grads_fn, lr, steps, *, b1=0.9, b2=0.999, eps=1e-8, wd=0.0,
                     wd_ratio=0.1):
    """AdamP (Heo et al. 2021, Algorithm 2) with its cosine test forced on for ``w1``
    (channel-wise view: the columns, flax's output axis) and off for ``w2``."""
    p = {k: np.asarray(v, np.float64) for k, v in params.items()}
    m = {k: np.zeros_like(v) for k, v in p.items()}
    v = {k: np.zeros_like(x) for k, x in p.items()}
    for t in range(1, steps + 1):
        g = {k: np.asarray(x, np.float64) for k, x in grads_fn(p).items()}
        for k in p:
            m[k] = b1 * m[k] + (1 - b1) * g[k]
            v[k] = b2 * v[k] + (1 - b2) * g[k] ** 2
            denom = np.sqrt(v[k]) / np.sqrt(1 - b2**t) + eps
            perturb = m[k] / (1 - b1**t) / denom
            ratio = 1.0
            if k == "w1":
                unit = p[k] / np.linalg.norm(p[k], axis=0, keepdims=True)
                perturb = perturb - unit * np.sum(unit * perturb, axis=0, keepdims=True)
                ratio = wd_ratio
            p[k] = p[k] * (1 - lr * wd * ratio) - lr * perturb
    return p


@pytest.mark.parametrize("wd", [0.0, 0.5])
def test_adamp_as_a_chain_matches_a_direct_reimplementation(wd):
    rng = np.random.default_rng(0)
    params = {"w1": jnp.asarray(rng.normal(size=(4, 6))), "w2": jnp.asarray(rng.normal(size=(6, 2)))}
    x = jnp.asarray(rng.normal(size=(16, 4)))
    sym = qo.infer_symmetry(_bn_mlp, x, params=params)
    (f,) = [f for f in sym.factors if f.kind == "norm_scale"]
    assert (f.name, f.blocks) == ("w1", 6)
    loss = lambda q: jnp.sum(jnp.sin(_bn_mlp(q, x)))  # noqa: E731
    grad = jax.jit(jax.grad(loss))
    tx = qo.adamp(0.05, sym, weight_decay=wd, wd_ratio=0.1)
    p, state = params, tx.init(params)
    for _ in range(6):
        u, state = tx.update(grad(p), state, p)
        # every step is orthogonal to each column of w1 (to rounding)
        cols = np.sum(np.asarray(u["w1"]) * np.asarray(p["w1"]), axis=0)
        radial = wd * 0.1 * 0.05 * np.sum(np.asarray(p["w1"]) ** 2, axis=0)
        np.testing.assert_allclose(cols, -radial, atol=1e-12)
        p = optax.apply_updates(p, u)
    ref = _adamp_reference(params, lambda q: grad({k: jnp.asarray(v) for k, v in q.items()}),
                           0.05, 6, wd=wd)
    for k in p:
        np.testing.assert_allclose(np.asarray(p[k]), ref[k], rtol=1e-9, atol=1e-12)


def test_adamp_chain_spelling_is_the_same_as_the_alias():
    rng = np.random.default_rng(1)
    params = {"w1": jnp.asarray(rng.normal(size=(4, 6))), "w2": jnp.asarray(rng.normal(size=(6, 2)))}
    x = jnp.asarray(rng.normal(size=(16, 4)))
    sym = qo.infer_symmetry(_bn_mlp, x, params=params)
    g = jax.grad(lambda q: jnp.sum(_bn_mlp(q, x) ** 3))(params)
    a = optax.chain(optax.adam(1e-2), qo.project_horizontal(sym, kinds=("norm_scale",)))
    b = qo.adamp(1e-2, sym)
    ua, _ = a.update(g, a.init(params), params)
    ub, _ = b.update(g, b.init(params), params)
    assert _tree_rel(ua, ub) < 1e-12


def test_sgdp_steps_are_tangent():
    m = _model("nnx_bn_cnn_train", jnp.float64)
    u, p = _adam_update(m, m.params(6), m.inputs(6), tx=qo.sgdp(1e-3, m.sym, momentum=0.9))
    ul = _leaf_dict(u)
    unorm = np.sqrt(sum(float(jnp.sum(v ** 2)) for v in ul.values()))
    pnorm = np.sqrt(sum(float(jnp.sum(v ** 2)) for v in _leaf_dict(p).values()))
    for ct in _kinds.cotangent(m.sym, p, ul):
        assert float(jnp.max(jnp.abs(ct))) <= 1e-12 * unorm * pnorm


def test_decay_ratio_on_invariant_entries_and_mask():
    m = _model("nnx_bn_cnn_train", jnp.float32)
    p = m.params(0)
    zeros = jax.tree.map(jnp.zeros_like, p)
    tx = qo.add_decayed_weights(0.5, m.sym, normalized_ratio=0.1)
    u, _ = tx.update(zeros, tx.init(p), p)
    ul, pl = _leaf_dict(u), _leaf_dict(p)
    mask = _leaf_dict(qo.normalized_mask(m.sym, p))
    for k in pl:
        want = 0.05 if mask[k] else 0.5
        np.testing.assert_allclose(ul[k], want * pl[k], rtol=1e-6)
    assert sum(mask.values()) == 4  # conv1 and conv2, kernel and bias


def test_restrict_drops_a_factor_whose_leaf_is_masked():
    m = _model("eqx_ln_mlp", jnp.float32)
    p = m.params(0)
    leaves = _leaf_dict(p)
    masked = qo.symmetry.map_with_path(lambda path, x: optax.MaskedNode() if path == ("l2", "weight")
                              else x, p)
    sub = m.sym.restrict(masked)
    assert not sub.factors and len(sub.dropped_factors) == 1
    assert "factors dropped on this subtree" in sub.describe()
    assert leaves  # the tree had the leaf


def test_check_verifies_factors_and_names_a_wrong_one():
    m = _model("eqx_ln_mlp", jnp.float64)
    p, x = m.params(0), m.inputs(0)
    m.sym.check(m.apply, p, x)
    # l1 feeds a ReLU, not a normalization: claiming it scale-invariant is caught
    (f,) = m.sym.factors
    l1 = [r for g in m.sym.groups if g.name == "l1" for r in g.incoming]
    wrong = dataclasses.replace(m.sym, factors=(dataclasses.replace(f, name="l1", units=6,
                                                                    refs=tuple(l1)),))
    with pytest.raises(ValueError, match="factor 'l1' \\(norm_scale\\) is not a symmetry"):
        wrong.check(m.apply, p, x)


@pytest.mark.parametrize("dtype", DTYPES)
def test_symmetrize_quotients_sign_flips(dtype):
    m = _model("rms_mlp", dtype)
    rng = np.random.default_rng(7)
    p, x = m.params(1), m.inputs(1)
    g = zoo.random_element(m.sym, rng, 1.0, dtype)
    flips = _kinds.discrete(m.sym)
    h = tuple(_kinds.kind_of(f).sample(f, rng, 1.0, dtype) for f in flips)
    moved = _kinds.act(m.sym, m.sym.act(p, g), h, factors=flips)
    a, b = qo.landscape.symmetrize(m.sym, p), qo.landscape.symmetrize(m.sym, moved)
    assert _tree_rel(a, b) <= 1e3 * _tol(dtype)
    assert _rel(m.apply(a, x), m.apply(p, x)) <= 10 * _tol(dtype)
    assert len(flips) == 1
    assert np.all(np.sum(np.asarray(a["w1"]), axis=0) >= 0)  # the section: no bias, summed weights


@pytest.mark.slow  # ~35 worker-seconds (compiling the BatchNorm ResNet block's runs)
def test_keep_norms_holds_every_invariant_block_on_its_sphere():
    m = _model("nnx_bn_resblock", jnp.float64)
    p, x = m.params(2), m.inputs(2)
    facs = [f for f in m.sym.factors if f.kind == "norm_scale"]

    def norms(q):
        leaves = _leaf_dict(q)
        return [np.sqrt(np.asarray(_kinds.kind_of(f).gram_diagonal(
            f, {r.path: leaves[r.path] for r in f.refs}))) for f in facs]

    start = norms(p)
    tx = optax.chain(optax.adam(3e-2), qo.project_horizontal(m.sym), qo.keep_norms(m.sym))
    free = optax.chain(optax.adam(3e-2), qo.project_horizontal(m.sym))
    loss = jax.jit(lambda q: jnp.sum(m.apply(q, x) ** 2))
    grad = jax.jit(jax.grad(lambda q: jnp.sum(m.apply(q, x) ** 2)))
    def run(opt, q):
        def body(c, _):
            q, s = c
            u, s = opt.update(grad(q), s, q)
            return (optax.apply_updates(q, u), s), None

        return jax.jit(lambda q: jax.lax.scan(body, (q, opt.init(q)), length=20)[0][0])(q)

    q, r = run(tx, p), run(free, p)
    for a, b in zip(norms(q), start):
        np.testing.assert_allclose(a, b, rtol=1e-12)
    grown = max(float(np.max(a / b)) for a, b in zip(norms(r), start))
    assert grown > 1 + 1e-4  # without it the blocks grow (second order in the step)
    assert float(loss(q)) < float(loss(p))
    assert "jump" in repr(qo.transforms._order.mark_of(qo.keep_norms(m.sym)).roles)


@dataclasses.dataclass(frozen=True)
class _Shift:
    """A user's record: adding one constant to every logit bias (softmax is invariant)."""

    name: str
    refs: tuple
    kind: str = "test_logit_shift"

    def describe(self):
        return f"{self.name}: logit shift"


class _ShiftKind(qo.symmetry.Kind):
    linear = False  # a translation: displacements do not move

    def dim(self, rec):
        return 1

    def identity(self, rec, dtype):
        return jnp.zeros((1,), dtype)

    def sample(self, rec, rng, bound, dtype):
        return jnp.asarray(rng.uniform(-bound, bound, 1), dtype)

    def compose(self, rec, first, second):
        return first + second

    def inverse(self, rec, h):
        return -h

    def act(self, rec, leaves, h, power):
        (r,) = rec.refs  # a translation moves parameters; covectors do not change
        return {r.path: leaves[r.path] + h[0]} if power == 1 else {}

    def tangent(self, rec, leaves, a):
        (r,) = rec.refs
        return {r.path: jnp.full_like(leaves[r.path], a[0])}

    def cotangent(self, rec, leaves, v):
        (r,) = rec.refs
        return jnp.sum(v[r.path]).reshape(1)

    def gram_diagonal(self, rec, leaves):
        (r,) = rec.refs
        return jnp.full((1,), leaves[r.path].size, leaves[r.path].dtype)

    def section(self, rec, leaves):
        (r,) = rec.refs
        return -jnp.mean(leaves[r.path]).reshape(1)

    def describe(self, rec):
        return rec.describe()


def test_a_user_registered_kind_is_checked_projected_and_sectioned():
    qo.symmetry.register_kind("test_logit_shift", _ShiftKind())
    try:
        rng = np.random.default_rng(0)
        params = {"w": jnp.asarray(rng.normal(size=(3, 4))), "b": jnp.asarray(rng.normal(size=4))}
        x = jnp.asarray(rng.normal(size=(5, 3)))
        apply = lambda p, x: jax.nn.softmax(x @ p["w"] + p["b"])  # noqa: E731
        ref = qo.AxisRef(("b",), 0, role="bias")
        sym = qo.Symmetry(groups=(), shapes=((("b",), (4,)), (("w",), (3, 4))),
                          factors=(_Shift("b", (ref,)),))
        sym.check(apply, params, x)
        assert "b: logit shift" in sym.describe()
        g = jax.grad(lambda p: jnp.sum(jnp.log(apply(p, x)[:, 0])))(params)
        assert abs(float(jnp.sum(g["b"]))) < 1e-12  # the gradient is horizontal already
        tx = optax.chain(optax.adam(1e-2), qo.project_horizontal(sym))
        u, _ = tx.update(g, tx.init(params), params)
        assert abs(float(jnp.sum(u["b"]))) < 1e-12
        assert abs(float(jnp.sum(optax.adam(1e-2).update(g, optax.adam(1e-2).init(params))[0]["b"]))) > 1e-6
        c = _kinds.canonical(sym, params)
        assert abs(float(jnp.mean(c["b"]))) < 1e-12
        np.testing.assert_allclose(apply(c, x), apply(params, x), rtol=1e-12)
        # rebalance takes its section: the inner optimizer steps at zero-mean biases, and
        # the user's update is the inner one (a translation leaves displacements alone)
        tx = qo.rebalance(optax.sgd(1e-1), sym)
        st = tx.init(params)
        u, st = tx.update(g, st, params)
        np.testing.assert_allclose(st.factors[0], -jnp.mean(params["b"]).reshape(1), rtol=1e-12)
        np.testing.assert_allclose(u["b"], -0.1 * g["b"], rtol=1e-12)
        logits = lambda p, x: x @ p["w"] + p["b"]  # noqa: E731 - no softmax: no symmetry
        with pytest.raises(ValueError, match="factor 'b' \\(test_logit_shift\\) is not a symm"):
            sym.check(logits, params, x)
    finally:
        _kinds.KINDS.pop("test_logit_shift", None)


# ------------------------------------------------------------------- every method on every kind


def _step(m, tx, p, x, steps):
    y = jnp.cos(jnp.arange(np.prod(m.apply(p, x).shape))).reshape(m.apply(p, x).shape)
    grad = jax.jit(jax.grad(lambda q: jnp.mean((m.apply(q, x) - y) ** 2)))
    upd = jax.jit(tx.update)
    st = tx.init(p)
    for _ in range(steps):
        p_old = p
        u, st = upd(grad(p), st, p)
        p = optax.apply_updates(p, u)
    return p, st, p_old


def _norms(sym, q):
    facs = [f for f in sym.factors if f.kind == "norm_scale"]
    return [np.sqrt(np.asarray(s)) for s in _kinds.gram_diagonal(sym, q, factors=facs)]


@pytest.mark.parametrize("name", [pytest.param("nnx_bn_resblock", marks=pytest.mark.slow),
                                  pytest.param("eqx_ln_mlp", marks=pytest.mark.slow), "rms_mlp"])
def test_rebalance_steps_with_every_invariant_block_on_its_sphere(name):
    from quotient_opt.transforms._orbit import Move, act

    m = _model(name, jnp.float64)
    p, x = m.params(1), m.inputs(1)
    p, st, p_old = _step(m, qo.rebalance(optax.adam(1e-2), m.sym), p, x, 3)
    here = act(m.sym, p_old, Move(st.log_scales, st.factors))  # where the last step was taken
    for n in _norms(m.sym, here):
        np.testing.assert_allclose(n, 1.0, rtol=1e-12)
    assert any(float(jnp.max(jnp.abs(f))) > 1e-3 for f in st.factors)
    np.testing.assert_allclose(m.apply(here, x), m.apply(p_old, x), rtol=1e-2, atol=1e-4)


def test_rebalance_is_exactly_equivariant_under_the_unit_groups_with_factors():
    m = _model("nnx_bn_resblock", jnp.float64)
    p, x = m.params(3), m.inputs(3)
    g = zoo.random_element(m.sym, np.random.default_rng(5), 1.0, jnp.float64)
    tx = qo.rebalance(optax.adam(1e-2), m.sym)
    y = jnp.cos(jnp.arange(np.prod(m.apply(p, x).shape))).reshape(m.apply(p, x).shape)
    grad = jax.jit(jax.grad(lambda q: jnp.mean((m.apply(q, x) - y) ** 2)))
    upd = jax.jit(tx.update)
    a, b = p, m.sym.act(p, g)
    sa, sb = tx.init(a), tx.init(b)
    for _ in range(4):
        ua, sa = upd(grad(a), sa, a)
        ub, sb = upd(grad(b), sb, b)
        a, b = optax.apply_updates(a, ua), optax.apply_updates(b, ub)
    assert _tree_rel(b, m.sym.act(a, g)) < 1e-9


def test_teleport_moves_the_invariant_blocks_and_keeps_the_function():
    from quotient_opt.transforms._orbit import Move, act

    m = _model("nnx_bn_resblock", jnp.float64)
    p, x = m.params(4), m.inputs(4)
    tx = qo.teleport(optax.adam(1e-2), m.sym, every=1, steps=3)
    p2, st, p_old = _step(m, tx, p, x, 2)
    here = act(m.sym, p_old, Move(st.log_scales, st.factors))
    facs = [f for f, e in zip(m.sym.factors, st.factors) if f.kind == "norm_scale"]
    assert facs and all(float(jnp.max(jnp.abs(e))) > 1e-3 for e in st.factors)
    # the ascent shrank every block below its section's radius (larger gradients there)
    assert max(float(np.max(n)) for n in _norms(m.sym, here)) < 1.0
    np.testing.assert_allclose(m.apply(here, x), m.apply(p_old, x), rtol=1e-2, atol=1e-4)


def test_a_field_no_law_moves_is_refused_naming_it():
    m = _model("rms_mlp", jnp.float32)
    p = m.params(0)
    with pytest.raises(ValueError, match=r"TraceState.trace.*power 0.*sign_flip factor 'w1'"):
        qo.rebalance(optax.rmsprop(1e-2, momentum=0.9), m.sym).init(p)
    qo.rebalance(optax.rmsprop(1e-2, momentum=0.9),
                 qo.symmetry.only(m.sym, ["units", "norm_scale"])).init(p)
    with pytest.raises(ValueError, match="unknown"):
        qo.symmetry.only(m.sym, ["nope"])


def _every_kind(m, rng, dtype):
    """A point moved by a random element of every unit group and every factor."""
    def moved(p):
        q = m.sym.act(p, zoo.random_element(m.sym, rng, 1.0, dtype))
        return _kinds.act(m.sym, q, _kinds.sample(m.sym, rng, 1.0, dtype))
    return moved


@pytest.mark.parametrize("name", [n if n in ("nnx_bn_cnn_train", "rms_mlp") else
                                  pytest.param(n, marks=pytest.mark.slow) for n in NAMES])
def test_canonicalize_with_factors_is_a_section_of_every_kind(name):
    m = _model(name, jnp.float64)
    p = m.params(0)
    c, g = qo.canonicalize(m.sym, p, permutations=True, factors=True)
    assert isinstance(g, qo.OrbitElement)
    assert _tree_rel(m.sym.act(p, g), c) < 1e-12
    c2, _ = qo.canonicalize(m.sym, _every_kind(m, np.random.default_rng(7), jnp.float64)(p),
                            permutations=True, factors=True)
    assert _tree_rel(c2, c) < 1e-10
    assert _tree_rel(qo.canonicalize(m.sym, c, permutations=True, factors=True)[0], c) < 1e-12
    for n in _norms(m.sym, c):
        np.testing.assert_allclose(n, 1.0, rtol=1e-12)


@pytest.mark.parametrize("name", [pytest.param("nnx_maxout", marks=pytest.mark.slow), "rms_mlp"])
def test_quotient_distance_searches_sign_flips(name):
    m = _model(name, jnp.float64)
    a = m.params(0)
    rng = np.random.default_rng(3)
    flips = _kinds.discrete(m.sym)
    signs = [_kinds.kind_of(f).sample(f, rng, 1.0, jnp.float64) for f in flips]
    b = _kinds.act(m.sym, m.sym.act(a, zoo.random_element(m.sym, rng, 1.0, jnp.float64)),
                   signs, factors=flips)
    r = qo.landscape.quotient_distance(m.sym, a, b)
    assert float(r.distance) < 1e-10
    assert isinstance(r.element, qo.OrbitElement)
    assert _tree_rel(m.sym.act(b, r.element), r.aligned) < 1e-12
    assert _tree_rel(m.sym.act(a, r.reference_element), r.reference) < 1e-12
    c = m.params(1)
    r1, r2 = qo.landscape.quotient_distance(m.sym, a, c), qo.landscape.quotient_distance(m.sym, c, a)
    assert float(r1.distance) == float(r2.distance)
    assert _tree_rel(m.sym.act(c, r1.element), r1.aligned) < 1e-12
    # without the flips' search the same pair is farther apart
    units = qo.symmetry.only(m.sym, ["units"])
    assert float(qo.landscape.quotient_distance(units, a, b).distance) > 1e-2


@pytest.mark.slow
def test_orbit_directions_include_every_continuous_kind():
    m = _model("nnx_bn_cnn_train", jnp.float64)
    p, x = m.params(0), m.inputs(0)
    d = qo.landscape.orbit_directions(m.sym)(p)
    n = jax.tree.leaves(d)[0].shape[0]
    assert n == (sum(g.windows for g in m.sym.groups if g.rescalable)
                 + sum(f.blocks for f in m.sym.factors))
    g = jax.grad(lambda q: jnp.sum(m.apply(q, x) ** 2))(p)
    gn = float(jnp.sqrt(sum(jnp.sum(v * v) for v in jax.tree.leaves(g))))
    for i in range(n):
        dot = sum(jnp.sum(a[i] * b) for a, b in zip(jax.tree.leaves(d), jax.tree.leaves(g)))
        assert abs(float(dot)) < 1e-3 * gn  # the normalization's epsilon


# ------------------------------------------------------------------- the unit groups' own kind


@pytest.mark.parametrize("name", ["nnx_maxout", pytest.param("nnx_bn_resblock", marks=pytest.mark.slow),
                                  pytest.param("nnx_residual", marks=pytest.mark.slow)])
def test_unit_groups_are_a_registered_kind_with_the_same_action(name):
    m = zoo.build(name, jnp.float64)
    p, x = m.params(0), m.inputs(0)
    rng = np.random.default_rng(2)
    kind = _kinds.kind_of(m.sym.groups[0])
    assert kind is _kinds.KINDS["units"]
    leaves = _leaf_dict(p)
    g = tuple(kind.sample(grp, rng, 1.0, jnp.float64) for grp in m.sym.groups)
    moved = dict(leaves)
    for grp, e in zip(m.sym.groups, g):
        moved.update(kind.act(grp, {r.path: moved[r.path] for r in grp.refs}, e, 1))
    want = _leaf_dict(m.sym.act(p, g))
    assert max(_rel(moved[k], want[k]) for k in want) < 1e-14
    np.testing.assert_allclose(m.apply(m.sym.act(p, g), x), m.apply(p, x), rtol=1e-9, atol=1e-12)
    for grp, e in zip(m.sym.groups, g):
        lv = {r.path: leaves[r.path] for r in grp.refs}
        back = kind.act(grp, kind.act(grp, lv, e, 1), kind.inverse(grp, e), 1)
        assert max(_rel(back[k], lv[k]) for k in back) < 1e-12
        e2 = kind.sample(grp, rng, 1.0, jnp.float64)
        two = kind.act(grp, kind.act(grp, lv, e, 1), e2, 1)
        one = kind.act(grp, lv, kind.compose(grp, e, e2), 1)
        assert max(_rel(two[k], one[k]) for k in two) < 1e-12
        if not kind.dim(grp):
            continue
        a = jnp.asarray(rng.normal(size=grp.windows))
        v = {k: jnp.asarray(rng.normal(size=np.shape(x))) for k, x in lv.items()}
        ja = kind.tangent(grp, lv, a)
        lhs = sum(float(jnp.sum(ja[k] * v[k])) for k in ja)
        rhs = float(jnp.sum(a * kind.cotangent(grp, lv, v)))
        assert abs(lhs - rhs) < 1e-10 * max(abs(lhs), 1.0)
        diag = np.asarray(kind.gram_diagonal(grp, lv))
        for w in range(min(grp.windows, 3)):
            t = kind.tangent(grp, lv, jnp.eye(grp.windows)[w])
            np.testing.assert_allclose(sum(float(jnp.sum(y ** 2)) for y in t.values()), diag[w],
                                       rtol=1e-12)
        # the section: idempotent, and the same from any rescaling of the group
        s = kind.section(grp, lv)
        at = {**lv, **kind.act(grp, lv, s, 1)}
        assert float(jnp.max(jnp.abs(kind.section(grp, at).log_scale))) < 1e-12
        r = kind.exp(grp, jnp.asarray(rng.uniform(-1, 1, grp.windows)))
        lv2 = {**lv, **kind.act(grp, lv, r, 1)}
        at2 = {**lv2, **kind.act(grp, lv2, kind.section(grp, lv2), 1)}
        assert max(_rel(at2[k], at[k]) for k in at) < 1e-12
