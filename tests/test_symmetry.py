"""Tests of the symmetry spec, its group action and its inference by tracing.

The property battery runs over the whole model zoo (``tests/zoo.py``):
invariance under random group elements (log-scales up to ±4), the group law,
the pairing of parameters and gradients, adjointness of the infinitesimal
action and its transpose, horizontality of invariant gradients, the fast
paths (``rescale``, the explicit Gram matrix) against the generic action, and
the action against an independent numpy implementation of the spec.

Invariance is checked as :math:`\\max_x |f(g\\cdot\\theta)(x) - f(\\theta)(x)| \\le
\\mathrm{rtol}\\cdot s` with the output scale
:math:`s = \\max_x |f(\\theta)(x)| + 16\\,\\varepsilon\\,\\max_x f_{|\\theta|}(|x|)`;
the second term bounds the rounding of a chain of affine maps and only matters
when the output is small by cancellation.

Speed: XLA compiles every new shape, and compiling dominates these tests. So
zoo models are built abstractly and filled with numpy noise, group elements
are drawn with numpy, and all quantities of one hypothesis example are
computed by one jitted probe, cached per model.
"""

from __future__ import annotations

import dataclasses
import functools
import re
from collections.abc import Callable
from typing import Any

import equinox as eqx
import flax.linen as linen
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx
from hypothesis import given, settings
from hypothesis import strategies as st

import quotient_opt as qo
import zoo
from quotient_opt import models
from quotient_opt.nn import MaxOverPieces
from quotient_opt.symmetry import _gram
from quotient_opt.symmetry._paths import leaves_by_path, map_with_path, path_str

F32, F64 = jnp.float32, jnp.float64
EPS = {F32: float(jnp.finfo(F32).eps), F64: float(jnp.finfo(F64).eps)}
RTOL = {F32: 1e-5, F64: 1e-12}
DTYPES = st.sampled_from([F32, F64])
SEEDS = st.integers(0, 2**31 - 1)
LOG_SCALES = st.floats(0.0, 4.0)
FEW = settings(max_examples=max(2, settings().max_examples // 10))
# these tiny programs run once: skip LLVM's optimizations (cuts compile time by about a third)
quick_jit = functools.partial(jax.jit, compiler_options={"xla_backend_optimization_level": 0})


# --------------------------------------------------------------------------- helpers


def tree_dot(a: Any, b: Any) -> jax.Array:
    return sum(jnp.vdot(x, y) for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b)))


def tree_norm(a: Any) -> jax.Array:
    return jnp.sqrt(tree_dot(a, a))


def assert_trees_close(a: Any, b: Any, rtol: float, atol: float = 0.0) -> None:
    la, lb = leaves_by_path(a), leaves_by_path(b)
    assert la.keys() == lb.keys()
    for path in la:
        np.testing.assert_allclose(
            np.asarray(la[path]), np.asarray(lb[path]), rtol=rtol, atol=atol, err_msg=path_str(path)
        )


def output_scale(m: zoo.Model, p: Any, x: jax.Array) -> jax.Array:
    bound = m.apply(jax.tree.map(jnp.abs, p), jnp.abs(x))
    return jnp.max(jnp.abs(m.apply(p, x))) + 16 * EPS[m.dtype] * jnp.max(jnp.abs(bound))


def invariance_error(m: zoo.Model, p: Any, q: Any, x: jax.Array) -> jax.Array:
    """``max |f(q)(x) - f(p)(x)|`` divided by the output scale."""
    return jnp.max(jnp.abs(m.apply(q, x) - m.apply(p, x))) / output_scale(m, p, x)


def reference_act(sym: qo.Symmetry, params: Any, g: Any, power: int = 1) -> dict:
    """The action written directly from the spec with numpy index arrays (no views)."""
    leaves = {k: np.asarray(v, np.float64) for k, v in leaves_by_path(params).items()}
    for grp, e in zip(sym.groups, g):
        wp, pp, ls = (np.asarray(z) for z in e)
        unit_perm = (wp[:, None] * grp.pieces + pp).reshape(-1)
        for r in grp.refs:
            x = np.moveaxis(leaves[r.path], r.axis, 0)
            n = grp.count(r)
            blk = x.shape[0] // r.outer
            pos = np.array([[o * blk + r.offset + u * r.inner + i
                             for o in range(r.outer) for i in range(r.inner)] for u in range(n)])
            perm = unit_perm if r.level == "unit" else wp
            scale = np.ones(n)
            if grp.rescalable:
                s = np.repeat(ls, grp.pieces) if r.level == "unit" else ls
                scale = np.exp(power * r.power * s)
            y = x.copy()
            for u in range(n):
                y[pos[u]] = x[pos[perm[u]]] * scale[u]
            leaves[r.path] = np.moveaxis(y, 0, r.axis)
    return leaves


def gram_from_jacobian(sym: qo.Symmetry, p: Any) -> np.ndarray:
    """``J^T J`` over the windows of the rescalable groups, from the jacobian of ``rescale``."""
    zero = sym.zero_log_scales(jnp.float64)
    jac = jax.jacfwd(lambda s: sym.rescale(p, s))(zero)
    idx = [i for i, g in enumerate(sym.groups) if g.rescalable]
    cols = [np.concatenate([np.asarray(leaf[i], np.float64).reshape(-1, sym.groups[i].windows)
                            for leaf in jax.tree.leaves(jac, is_leaf=lambda z: isinstance(z, tuple))],
                           axis=0) for i in idx]
    j = np.concatenate(cols, axis=1) if cols else np.zeros((0, 0))
    return j.T @ j


def gram_from_structure(sym: qo.Symmetry, p: Any) -> np.ndarray:
    """``J^T J`` assembled from the structure's diagonal and couplings (the solver's view)."""
    st_ = _gram.structure(sym)
    sq = {k: jnp.square(jnp.asarray(v, F64)) for k, v in leaves_by_path(p).items()}
    diag = _gram.window_sums(st_, sq.__getitem__, lambda w: w * w, F64)
    off = np.cumsum([0] + list(st_.windows))
    gram = np.diag(np.concatenate([np.asarray(d) for d in diag])) if diag else np.zeros((0, 0))
    for c in _gram.couplings(st_, sq):
        a, b = c.a, c.b
        blk = np.zeros_like(gram)
        blk[off[a]:off[a + 1], off[b]:off[b + 1]] += np.asarray(c.dense())
        gram = gram + blk + blk.T
    return gram


# --------------------------------------------------------------------------- the battery


@functools.lru_cache(maxsize=None)
def probe(m: zoo.Model) -> Callable:
    """One jitted function computing everything the property tests check."""
    sym = m.sym
    fd_step = 1e-5 if m.dtype == F64 else 1e-2

    def run(p, g, h, a, v, x, y):
        q = sym.act(p, g)
        plus = sym.act(p, sym.scales_only(tuple(fd_step * z for z in a)))
        minus = sym.act(p, sym.scales_only(tuple(-fd_step * z for z in a)))
        grad = jax.grad(lambda p: jnp.mean((m.apply(p, x) - y) ** 2))(p)
        return dict(
            moved=q,
            invariance=invariance_error(m, p, q, x),
            identity=sym.act(p, sym.identity(m.dtype)),
            inverse=sym.act(q, sym.inverse(g)),
            g_then_h=sym.act(q, h),
            composed=sym.act(p, sym.compose(g, h)),
            pairing=(tree_dot(q, sym.act(v, g, power=-1)), tree_dot(p, v)),
            ja=sym.tangent(p, a),
            jtv=sym.cotangent(p, v),
            fd=jax.tree.map(lambda u, w: (u - w) / (2 * fd_step), plus, minus),
            grad=grad,
            jt_grad=sym.cotangent(p, grad),
            rescaled=sym.rescale(p, a),
            acted_scales=sym.act(p, sym.scales_only(a)),
        )

    return quick_jit(run)


def check_properties(m: zoo.Model, seed: int, bound: float) -> None:
    """Invariance, group law, adjointness and horizontality of invariant gradients."""
    dt, sym = m.dtype, m.sym
    rng = np.random.default_rng(seed)
    p = m.params(seed)
    g = zoo.random_element(sym, rng, bound, dt)
    h = zoo.random_element(sym, rng, bound, dt)
    a = tuple(jnp.asarray(rng.normal(size=grp.windows), dt) for grp in sym.groups)
    v = m.params(seed + 1)
    x = m.inputs(seed)
    yt = jnp.asarray(rng.normal(size=jax.eval_shape(m.apply, p, x).shape), dt)
    out = probe(m)(p, g, h, a, v, x, yt)
    close = 1e-6 if dt == F32 else 1e-13

    # f(g.θ) == f(θ), same structure and dtypes
    assert jax.tree.structure(out["moved"]) == jax.tree.structure(p)
    assert all(z.dtype == dt for z in jax.tree.leaves(out["moved"]))
    assert float(out["invariance"]) <= RTOL[dt], float(out["invariance"])
    # the action is the spec: an independent numpy implementation agrees
    ref = reference_act(sym, p, g)
    for path, leaf in leaves_by_path(out["moved"]).items():
        np.testing.assert_allclose(leaf, ref[path], rtol=close, atol=1e-30, err_msg=path_str(path))
    # group law: identity acts exactly, inverse undoes, composition composes
    for path, leaf in leaves_by_path(out["identity"]).items():
        np.testing.assert_array_equal(leaf, leaves_by_path(p)[path], err_msg=path_str(path))
    assert_trees_close(out["inverse"], p, close, atol=1e-30)
    assert_trees_close(out["g_then_h"], out["composed"], close, atol=1e-30)
    # gradients (power -1) pair with parameters: <g.θ, g^{-T}.v> = <θ, v>
    lhs, rhs = out["pairing"]
    np.testing.assert_allclose(lhs, rhs, rtol=1e-4 if dt == F32 else 1e-10)
    # the gather-free rescaling is the action of a pure rescaling
    assert_trees_close(out["rescaled"], out["acted_scales"], close, atol=1e-30)
    # <J a, v> == <a, J^T v>
    assert [z.shape for z in out["jtv"]] == [(grp.windows,) for grp in sym.groups]
    ja_v = float(tree_dot(out["ja"], v))
    a_jtv = float(sum(jnp.vdot(z, w) for z, w in zip(a, out["jtv"])))
    scale = float(tree_norm(out["ja"]) * tree_norm(v)) + 1e-300
    assert abs(ja_v - a_jtv) <= 100 * EPS[dt] * scale, (ja_v, a_jtv)
    # J a is the derivative of t -> exp(t a).θ at 0 (central difference, error O(t^2))
    ja_scale = float(max(jnp.max(jnp.abs(z)) for z in jax.tree.leaves(out["ja"])))
    fd_tol = (1e-7 if dt == F64 else 1e-3) * (1 + ja_scale)
    assert_trees_close(out["ja"], out["fd"], rtol=0, atol=fd_tol)
    for grp, z in zip(sym.groups, out["jtv"]):
        if not grp.rescalable:  # no rescaling symmetry: no vertical direction
            np.testing.assert_array_equal(z, 0.0)
    # the Euclidean gradient of an invariant loss has no vertical component: J^T ∇L = 0
    gscale = float(tree_norm(out["grad"]) * tree_norm(p))
    for z in out["jt_grad"]:
        assert float(jnp.max(jnp.abs(z), initial=0.0)) <= 100 * EPS[dt] * gscale


@pytest.mark.parametrize("name", zoo.NAMES)
@FEW
@given(dtype=DTYPES, seed=SEEDS, bound=LOG_SCALES)
def test_zoo_properties(name, dtype, seed, bound):
    check_properties(zoo.build(name, dtype), seed, bound)


@pytest.mark.parametrize("name", zoo.NAMES)
def test_zoo_inference_finds_the_symmetry(name):
    """Each zoo model gets exactly the groups it has, and they pass the numerical check."""
    m = zoo.build(name, F64)
    got = [(g.windows, g.pieces, g.permutable, g.rescalable) for g in m.sym.groups]
    assert got == zoo.EXPECT[name], str(m.sym)
    p = m.params(0)
    m.sym.check(m.apply, p, m.inputs(0))
    # every leaf the groups touch has its recorded shape
    m.sym.validate(p)
    # the action is not vacuous: a random element moves some parameter of every group
    g = zoo.random_element(m.sym, np.random.default_rng(1), 1.0, F64)
    q = m.sym.act(p, g)
    moved = {path for path, leaf in leaves_by_path(q).items()
             if not np.allclose(leaf, leaves_by_path(p)[path])}
    for grp in m.sym.groups:
        assert moved & {r.path for r in grp.refs}, grp.name


@pytest.mark.slow
@pytest.mark.parametrize("name", ["nnx_cnn", "nnx_residual", "nnx_maxout", "eqx_cnn",
                                  "linen_cnn", "sawtooth_net"])
def test_gram_structure_matches_the_jacobian(name):
    """The solver's explicit ``J^T J`` (diagonal + couplings through views) is the true one."""
    m = zoo.build(name, F64)
    p = m.params(3)
    np.testing.assert_allclose(gram_from_structure(m.sym, p), gram_from_jacobian(m.sym, p),
                               rtol=1e-12, atol=1e-12)


def test_zoo_layouts():
    """Flattened feature maps: channels interleaved (channels last) or in blocks (first)."""
    cnn = zoo.build("nnx_cnn")
    (ref,) = [r for r in cnn.sym.groups[1].refs if r.power < 0]
    assert (ref.path, ref.axis, ref.outer, ref.inner) == (("head", "kernel"), 0, 4, 1)
    eq = zoo.build("eqx_cnn")
    (ref,) = [r for r in eq.sym.groups[0].refs if r.power < 0]
    assert (ref.path, ref.axis, ref.outer, ref.inner) == (("head", "weight"), 1, 1, 9)
    res = zoo.build("nnx_residual")
    stream = res.sym.groups[0]
    assert {r.path[0] for r in stream.refs} == {"embed", "up1", "down1", "up2", "down2", "head"}
    assert stream.name == "embed+down1+down2"


# --------------------------------------------------------------------------- random MLPs


HIDDEN = ["relu", "leaky_relu", "identity", "custom_relu", "max2", "max3"]


def nnx_mlp(in_features: int, hidden: list[tuple[int, str]], out: int, dtype: Any):
    """An ``nnx.Sequential`` with hidden layers ``(width, kind)``."""
    rngs = nnx.Rngs(0)
    fns: list[Any] = []
    d = in_features
    for width, kind in hidden:
        pieces = int(kind[3:]) if kind.startswith("max") else 1
        fns.append(nnx.Linear(d, width * pieces, param_dtype=dtype, rngs=rngs))
        if pieces > 1:
            fns.append(MaxOverPieces(pieces))
        elif kind == "relu":
            fns.append(nnx.relu)
        elif kind == "leaky_relu":
            fns.append(nnx.leaky_relu)
        elif kind == "custom_relu":
            fns.append(lambda x: jnp.maximum(x, 0.0))
        elif kind == "tanh":
            fns.append(nnx.tanh)
        d = width
    fns.append(nnx.Linear(d, out, param_dtype=dtype, rngs=rngs))
    return nnx.Sequential(*fns)


@functools.lru_cache(maxsize=None)
def random_mlp(shape: tuple, dtype: Any) -> zoo.Model:
    d, hidden, out = shape
    return zoo._nnx("random", lambda: nnx_mlp(d, list(hidden), out, dtype), (16, d), dtype)


@FEW
@given(
    hidden=st.lists(st.tuples(st.integers(1, 5), st.sampled_from(HIDDEN)), min_size=1,
                    max_size=3),
    d=st.integers(1, 3), out=st.integers(1, 2), dtype=DTYPES, seed=SEEDS, bound=LOG_SCALES,
)
def test_random_nnx_mlp_properties(hidden, d, out, dtype, seed, bound):
    m = random_mlp((d, tuple(hidden), out), dtype)
    # every hidden layer is one rescalable group (widths 1 included)
    assert [(g.windows, g.pieces) for g in m.sym.groups] == [
        (w, int(k[3:]) if k.startswith("max") else 1) for w, k in hidden]
    assert all(g.rescalable for g in m.sym.groups)
    check_properties(m, seed, bound)


# --------------------------------------------------------------------------- inference rules


def _infer(*layers, x_shape=(4, 2)):
    """Infers the symmetry of ``nnx.Sequential(*layers)``; ``(a, b)`` is ``nnx.Linear(a, b)``."""
    rngs = nnx.Rngs(0)
    model = nnx.Sequential(
        *(nnx.Linear(*la, rngs=rngs) if isinstance(la, tuple) else la for la in layers))
    return qo.infer_symmetry(model, jnp.ones(x_shape))


@pytest.mark.parametrize("act", [nnx.relu, nnx.leaky_relu, lambda x: jnp.maximum(x, 0.0),
                                 lambda x: x, lambda x: jnp.where(x > 0, x, 0.2 * x),
                                 lambda x: 3.0 * jax.nn.relu(-x), jnp.abs],
                         ids=["relu", "leaky", "max0", "identity", "where", "neg_relu", "abs"])
def test_homogeneous_activations_rescale(act):
    (grp,) = _infer((2, 3), act, (3, 1)).groups
    assert grp.rescalable and grp.permutable


@pytest.mark.parametrize("act", [jnp.tanh, jax.nn.sigmoid, jax.nn.softplus, jax.nn.gelu,
                                 jax.nn.silu, jax.nn.elu, jax.nn.relu6, lambda x: x**3,
                                 lambda x: jax.nn.relu(x + 1.0)],
                         ids=["tanh", "sigmoid", "softplus", "gelu", "silu", "elu", "relu6",
                              "cube", "shifted"])
def test_other_activations_permute_only(act):
    sym = _infer((2, 3), act, (3, 1))
    (grp,) = sym.groups
    assert grp.permutable and not grp.rescalable
    assert any("not positively homogeneous" in n or "constant" in n for n in grp.notes), grp.notes


def test_unsafe_operations_remove_the_symmetry():
    """Attention, batch statistics from constants, unknown primitives, loops: nothing claimed."""

    class Attention(nnx.Module):
        def __init__(self, rngs):
            self.q, self.k, self.v = (nnx.Linear(4, 4, rngs=rngs) for _ in range(3))
            self.o = nnx.Linear(4, 2, rngs=rngs)

        def __call__(self, x):
            a = jax.nn.softmax(self.q(x) @ self.k(x).swapaxes(-1, -2), axis=-1)
            return self.o(a @ self.v(x))

    sym = qo.infer_symmetry(Attention(nnx.Rngs(0)), jnp.ones((2, 3, 4)))
    assert {g.name for g in sym.groups} <= {"v"}  # q and k meet in a data contraction
    for g in sym.groups:
        assert not g.rescalable

    class Sorted(nnx.Module):
        def __init__(self, rngs):
            self.a, self.b = nnx.Linear(2, 4, rngs=rngs), nnx.Linear(4, 1, rngs=rngs)

        def __call__(self, x):
            return self.b(jnp.sort(nnx.relu(self.a(x)), axis=-1))

    sym = qo.infer_symmetry(Sorted(nnx.Rngs(0)), jnp.ones((2, 2)))
    assert sym.groups == ()
    assert any("sort" in n for g in sym.dropped for n in g.notes)

    bn = nnx.Sequential(nnx.Linear(2, 4, rngs=nnx.Rngs(0)),
                        nnx.BatchNorm(4, use_running_average=True, rngs=nnx.Rngs(0)),
                        nnx.relu, nnx.Linear(4, 1, rngs=nnx.Rngs(0)))
    assert qo.infer_symmetry(bn, jnp.ones((2, 2))).groups == ()  # running stats are not params

    mlp = eqx.nn.MLP(2, 1, 4, 3, scan=True, key=jax.random.key(0))
    sym = qo.infer_symmetry(mlp)
    assert all(not g.rescalable for g in sym.groups)


class _TinyGPT(nnx.Module):
    """Token and position embeddings, two pre-LayerNorm blocks (causal
    ``nnx.MultiHeadAttention``, GELU MLP), a final LayerNorm and a head (tied to the
    token table with ``tied``)."""

    def __init__(self, rngs, tied=False):
        v, d, t = 13, 8, 6
        self.tied = tied
        self.tok, self.pos = nnx.Embed(v, d, rngs=rngs), nnx.Embed(t, d, rngs=rngs)
        self.ln1 = nnx.List([nnx.LayerNorm(d, rngs=rngs) for _ in range(2)])
        self.ln2 = nnx.List([nnx.LayerNorm(d, rngs=rngs) for _ in range(2)])
        self.attn = nnx.List([nnx.MultiHeadAttention(2, d, decode=False, rngs=rngs)
                              for _ in range(2)])
        self.fc1 = nnx.List([nnx.Linear(d, 16, rngs=rngs) for _ in range(2)])
        self.fc2 = nnx.List([nnx.Linear(16, d, rngs=rngs) for _ in range(2)])
        self.ln = nnx.LayerNorm(d, rngs=rngs)
        self.head = None if tied else nnx.Linear(d, v, rngs=rngs)

    def __call__(self, ids):
        x = self.tok(ids) + self.pos(jnp.arange(ids.shape[-1]))
        mask = nnx.make_causal_mask(ids)
        for i in range(2):
            x = x + self.attn[i](self.ln1[i](x), mask=mask)
            x = x + self.fc2[i](nnx.gelu(self.fc1[i](self.ln2[i](x))))
        x = self.ln(x)
        return self.tok.attend(x) if self.tied else self.head(x)


@pytest.mark.parametrize("tied", [False, True])
def test_embeddings_write_the_residual_stream_of_a_gpt(tied):
    """The token and position tables produce the stream's units (a gather from a table is a
    layer), so every block's writers join them in one group (permutations: the LayerNorms
    read it), with a tied head reading the token table's same axis."""
    ids = jax.random.randint(jax.random.key(0), (3, 6), 0, 13)
    model = _TinyGPT(nnx.Rngs(0), tied)
    sym = qo.infer_symmetry(model, ids)
    stream = next(g for g in sym.groups if g.name.startswith("tok+pos"))
    assert stream.windows == 8 and stream.permutable and not stream.rescalable
    refs = {(r.path, r.axis) for r in stream.refs}
    for path in (("tok", "embedding"), ("pos", "embedding")):
        assert (path, 1) in refs
    for i in range(2):
        assert (("attn", i, "out", "kernel"), 2) in refs and (("fc2", i, "kernel"), 1) in refs
        assert (("attn", i, "query", "kernel"), 0) in refs
    assert sum(g.name in ("fc1/0", "fc1/1") for g in sym.groups) == 2
    # the permutation found is a symmetry: the logits of a permuted GPT are the same
    apply, params = models.functional(model)
    g = sym.sample(jax.random.key(1), log_scale=0.0)
    np.testing.assert_allclose(apply(sym.act(params, g), ids), apply(params, ids),
                               rtol=1e-5, atol=1e-5)
    # the vocabulary axis of a tied table is the output: never permuted
    if tied:
        assert (("tok", "embedding"), 0) not in {(r.path, r.axis) for gr in sym.groups
                                                 for r in gr.refs}


def test_a_gather_of_data_is_not_followed():
    """Picking rows or units of data (a permutation of the batch or of the units by fixed
    indices) is not a table lookup: the units gathered lose their symmetries, and say so."""

    class Picks(nnx.Module):
        def __init__(self, rngs, axis):
            self.axis = axis
            self.l1, self.l2 = nnx.Linear(4, 6, rngs=rngs), nnx.Linear(6, 2, rngs=rngs)

        def __call__(self, x):
            h = nnx.relu(self.l1(x))
            return self.l2(jnp.take(h, jnp.array([1, 0, 3, 2, 5, 4])[:h.shape[self.axis]],
                                    axis=self.axis))

    for axis in (0, 1):
        sym = qo.infer_symmetry(Picks(nnx.Rngs(0), axis), jnp.ones((4, 4)))
        assert sym.groups == ()
        assert any("not a table lookup" in n for g in sym.dropped for n in g.notes)


def test_residual_concat_and_shared_weights():
    class Concat(nnx.Module):
        def __init__(self, rngs):
            self.a, self.b = nnx.Linear(2, 3, rngs=rngs), nnx.Linear(2, 4, rngs=rngs)
            self.c = nnx.Linear(2 + 3 + 4, 1, rngs=rngs)

        def __call__(self, x):
            return self.c(jnp.concatenate([x, nnx.relu(self.a(x)), nnx.relu(self.b(x))], -1))

    model = Concat(nnx.Rngs(0))
    sym = qo.infer_symmetry(model, jnp.ones((3, 2)))
    offsets = sorted((r.offset, g.windows) for g in sym.groups for r in g.refs if r.power < 0)
    assert offsets == [(2, 3), (5, 4)]
    apply, params = models.functional(model)
    sym.check(apply, params, jax.random.normal(jax.random.key(0), (8, 2)))

    class Tied(nnx.Module):  # one square layer applied twice: one group, self-coupled
        def __init__(self, rngs):
            self.inp, self.hid = nnx.Linear(2, 4, rngs=rngs), nnx.Linear(4, 4, rngs=rngs)
            self.out = nnx.Linear(4, 1, rngs=rngs)

        def __call__(self, x):
            h = nnx.relu(self.inp(x))
            return self.out(nnx.relu(self.hid(nnx.relu(self.hid(h)))))

    model = Tied(nnx.Rngs(0))
    sym = qo.infer_symmetry(model, jnp.ones((3, 2)))
    assert [g.windows for g in sym.groups] == [4]
    assert all(g.permutable and g.rescalable for g in sym.groups)
    apply, params = models.functional(model)
    sym.check(apply, params, jax.random.normal(jax.random.key(0), (8, 2)))
    p = m_params = params
    gram = gram_from_structure(sym, m_params)
    np.testing.assert_allclose(gram, gram_from_jacobian(sym, p), rtol=1e-5, atol=1e-5)


def test_one_window_max_and_outputs():
    """A max over all units is one window of pieces; output units have no symmetry."""
    sym = qo.infer_symmetry(models.MaxPoolNet(4, 1, 2, rngs=nnx.Rngs(0)))
    (grp,) = sym.groups
    assert (grp.windows, grp.pieces, grp.pieces_permutable, grp.rescalable) == (1, 4, True, False)
    assert qo.infer_symmetry(models.MaxPoolNet(1, 3, 2, rngs=nnx.Rngs(0))).groups == ()


def test_describe_says_why():
    text = str(zoo.build("nnx_maxout").sym)
    assert "4 windows × 3 pieces, max; permutable, pieces permutable, rescalable" in text
    assert re.search(r"tanh.*not positively homogeneous", text)
    assert "reaches the output" in text
    assert "layers/2/kernel:0 ×1/c (kernel, windows)" in text


# --------------------------------------------------------------------------- hand specs


def test_hand_spec_equals_the_inferred_one():
    m = zoo.build("nnx_module", F64)
    hand = qo.symmetry_from_axes(m.params(0), {
        "fc1/kernel": (None, "fc1"), "fc1/bias": ("fc1",),
        "fc2/kernel": ("1/fc1", "fc2"), "fc2/bias": ("fc2",),
        "fc3/kernel": ("1/fc2", None),
    })
    assert [(g.name, g.windows, set(g.refs)) for g in hand.groups] == [
        (g.name, g.windows, set(g.refs)) for g in m.sym.groups]
    hand.check(m.apply, m.params(0), m.inputs(0))


@pytest.mark.parametrize("dtype", [F32, F64])
def test_check_catches_a_forgotten_leaf_whatever_its_value(dtype):
    """A hand spec that forgets ``fc2/bias`` is a symmetry wherever that bias is zero (the
    flax default): ``check`` also tests at random parameters, and says so."""
    m = zoo.build("nnx_module", dtype)
    p = map_with_path(lambda path, v: jnp.zeros_like(v) if path == ("fc2", "bias") else v,
                      m.params(0))
    spec = {"fc1/kernel": (None, "fc1"), "fc1/bias": ("fc1",),
            "fc2/kernel": ("1/fc1", "fc2"), "fc2/bias": ("fc2",),
            "fc3/kernel": ("1/fc2", None)}
    qo.symmetry_from_axes(p, spec).check(m.apply, p, m.inputs(0))  # the right spec passes
    forgot = qo.symmetry_from_axes(p, {k: v for k, v in spec.items() if k != "fc2/bias"})
    # at the given parameters alone, every move keeps the function (what check did before)
    from quotient_opt.symmetry._check import group_errors, tolerance
    errs = group_errors(forgot, m.apply, p, m.inputs(0))
    assert max(v for e in errs for v in e.values()) <= tolerance(p)
    with pytest.raises(ValueError, match=r"group 'fc2' is not a symmetry.*permutation.*"
                                         r"rescaling.*at random parameters.*bias"):
        forgot.check(m.apply, p, m.inputs(0))
    # with a nonzero bias, the given parameters already show it (no hint)
    with pytest.raises(ValueError, match=r"group 'fc2'.*tolerance [^ ]+\)$"):
        forgot.check(m.apply, m.params(0), m.inputs(0))


def test_hand_spec_conv_with_flatten_blocks():
    m = zoo.build("nnx_cnn", F64)
    hand = qo.symmetry_from_axes(m.params(0), {
        "conv1/kernel": (None, None, None, "c1"), "conv1/bias": ("c1",),
        "conv2/kernel": (None, None, "1/c1", "c2"), "conv2/bias": ("c2",),
        "head/kernel": ({"group": "c2", "power": -1, "outer": 4}, None),
    })
    hand.check(m.apply, m.params(0), m.inputs(0))
    wrong = qo.symmetry_from_axes(m.params(0), {  # channels taken as blocks: wrong layout
        "conv2/kernel": (None, None, None, "c2"), "conv2/bias": ("c2",),
        "head/kernel": ({"group": "c2", "power": -1, "inner": 4}, None),
    })
    with pytest.raises(ValueError, match="group 'c2' is not a symmetry.*permutation"):
        wrong.check(m.apply, m.params(0), m.inputs(0))


def test_wrong_hand_specs_are_caught_by_check():
    m = zoo.build("sawtooth_net", F64)
    p, x = m.params(0), m.inputs(0)
    # a chain that skips a middle layer
    layers = [qo.Dense(f"layers/{i}", ("layers", i, "kernel"), ("layers", i, "bias"), a, b, 1,
                       "relu") for i, (a, b) in zip((0, 2, 6, 8, 10), ((1, 5), (5, 5), (5, 5),
                                                                       (5, 5), (5, 1)))]
    skipped = qo.symmetry_from_layers(layers)
    with pytest.raises(ValueError, match="group 'layers/2' is not a symmetry"):
        skipped.check(m.apply, p, x)
    # a tanh layer claimed rescalable
    t = zoo._nnx("tanh", lambda: nnx.Sequential(nnx.Linear(2, 4, rngs=nnx.Rngs(0)), nnx.tanh,
                                                nnx.Linear(4, 1, rngs=nnx.Rngs(0))), (8, 2), F64)
    forced = dataclasses.replace(t.sym, groups=tuple(
        dataclasses.replace(g, rescalable=True) for g in t.sym.groups))
    with pytest.raises(ValueError, match="group 'layers/0' is not a symmetry.*rescaling"):
        forced.check(t.apply, t.params(0), t.inputs(0))
    t.sym.check(t.apply, t.params(0), t.inputs(0))


def test_hand_spec_errors_name_the_leaf():
    p = zoo.build("nnx_module").params(0)
    with pytest.raises(ValueError, match="no parameter at path 'fc9/kernel'"):
        qo.symmetry_from_axes(p, {"fc9/kernel": (None, "h")})
    with pytest.raises(ValueError, match="'fc1/kernel' has 2 axes, 1 entries"):
        qo.symmetry_from_axes(p, {"fc1/kernel": ("h",)})
    with pytest.raises(ValueError, match="group 'h': cannot tell its number of windows"):
        qo.symmetry_from_axes(p, {"fc1/kernel": (None, "h"), "fc2/bias": ("h",)})
    ref = qo.AxisRef(("fc1", "bias"), 0)
    with pytest.raises(ValueError, match="groups 'a' and 'b' claim the same positions"):
        qo.Symmetry(groups=(qo.UnitGroup("a", 6, refs=(ref,)), qo.UnitGroup("b", 6, refs=(ref,))),
                    shapes=((("fc1", "bias"), (6,)),))
    with pytest.raises(ValueError, match="group 'a', parameter 'fc1/bias': axis 0 .size 6. "
                                         "cannot hold 7"):
        qo.Symmetry(groups=(qo.UnitGroup("a", 7, refs=(ref,)),), shapes=((("fc1", "bias"), (6,)),))
    with pytest.raises(ValueError, match="groups: \\['zz'\\] appear in no axis entry"):
        qo.symmetry_from_axes(p, {"fc1/bias": ("h",)}, groups={"zz": {}})


# --------------------------------------------------------------------------- adapters


def test_adapters_and_their_errors():
    mlp = LinenMLP()
    x = jnp.ones((2, 3))
    params = mlp.init(jax.random.key(0), x)
    sym = qo.infer_symmetry(mlp.apply, x, params=params)
    assert [g.windows for g in sym.groups] == [4, 5]
    with pytest.raises(ValueError, match="pass the forward function"):
        qo.infer_symmetry(params)
    with pytest.raises(ValueError, match="params: required"):
        qo.infer_symmetry(mlp.apply, x)
    with pytest.raises(ValueError, match="example_input: required for CNN"):
        qo.infer_symmetry(zoo.CNN(F32, nnx.Rngs(0)))
    with pytest.raises(ValueError, match="unsupported model type"):
        qo.infer_symmetry(3)
    # the omitted example input of a Sequential starting with Linear, and of eqx.nn.MLP
    assert len(qo.infer_symmetry(models.SawtoothNet(rngs=nnx.Rngs(0))).groups) == 5
    assert len(qo.infer_symmetry(eqx.nn.MLP("scalar", 1, 3, 2, key=jax.random.key(0))).groups) == 2


class LinenMLP(linen.Module):
    @linen.compact
    def __call__(self, x):
        x = linen.relu(linen.Dense(4, name="dense_z")(x))
        x = jnp.tanh(linen.Dense(5, name="dense_a")(x))
        return linen.Dense(1, name="dense_m")(x)


def test_linen_tanh_is_found_without_being_told():
    mlp = LinenMLP()
    x = jnp.ones((2, 3))
    sym = qo.infer_symmetry(mlp.apply, x, params=mlp.init(jax.random.key(0), x))
    assert [(g.name, g.rescalable) for g in sym.groups] == [
        ("params/dense_z", True), ("params/dense_a", False)]


# --------------------------------------------------------------------------- sampling


@functools.lru_cache(maxsize=None)
def _sampler(sym: qo.Symmetry, dtype: Any, permute: bool = True) -> Callable:
    return quick_jit(jax.vmap(
        lambda k, b: sym.sample(k, log_scale=b, dtype=dtype, permute=permute), in_axes=(0, None)))


def _sample_batch(sym: qo.Symmetry, n: int, bound: float, dtype: Any = F32, permute=True):
    keys = jax.random.split(jax.random.key(n), n)
    return _sampler(sym, dtype, permute)(keys, jnp.asarray(bound, dtype))


def _assert_rows_are_permutations(perm: jax.Array) -> None:
    n = perm.shape[-1]
    assert perm.dtype == jnp.int32
    np.testing.assert_array_equal(np.sort(perm, axis=-1), np.broadcast_to(np.arange(n), perm.shape))


def test_sample_structure_maxpoolnet():
    """MaxPoolNet: pieces permuted only inside their window, windows neither permuted nor scaled."""
    m = zoo.build("maxpool_net")
    (grp,) = m.sym.groups
    assert (grp.windows, grp.pieces, grp.outgoing) == (2, 3, ())
    (e,) = _sample_batch(m.sym, 64, 4.0)
    np.testing.assert_array_equal(e.window_perm, np.tile(np.arange(2), (64, 1)))
    np.testing.assert_array_equal(e.log_scale, 0.0)
    _assert_rows_are_permutations(e.piece_perm)
    assert len({tuple(r) for r in np.asarray(e.piece_perm).reshape(-1, 3)}) == 6  # all of S_3
    p = m.params(0)
    e0 = jax.tree.map(lambda z: z[5], e)
    k0 = np.asarray(p["layers"][0]["kernel"][...])
    k1 = np.asarray(m.sym.act(p, (e0,))["layers"][0]["kernel"][...])
    for w in range(2):
        for j in range(3):
            np.testing.assert_array_equal(k1[:, w * 3 + j], k0[:, w * 3 + e0.piece_perm[w, j]])


def test_sample_dtype_and_bounds():
    m = zoo.build("nnx_maxout", F64)
    batch = _sample_batch(m.sym, 64, 2.5, F64)
    for grp, e in zip(m.sym.groups, batch):
        assert e.log_scale.dtype == F64 and e.log_scale.shape == (64, grp.windows)
        if grp.rescalable:
            assert np.all(np.abs(e.log_scale) <= 2.5) and np.max(np.abs(e.log_scale)) > 1.25
        else:
            np.testing.assert_array_equal(e.log_scale, 0.0)
        _assert_rows_are_permutations(e.window_perm)
        _assert_rows_are_permutations(e.piece_perm)
    # the default dtype is float64 where enabled: float64 elements are exact to float64
    assert m.sym.sample(jax.random.key(0))[0].log_scale.dtype == F64
    (e, *_) = _sample_batch(m.sym, 8, 1.0, F32, permute=False)
    np.testing.assert_array_equal(e.window_perm, np.tile(np.arange(4), (8, 1)))


def test_group_law_with_permuted_maxout_windows():
    m = zoo.build("nnx_maxout", F64)
    sym, p = m.sym, m.params(2)
    rng = np.random.default_rng(4)
    for _ in range(4):
        g, h = (zoo.random_element(sym, rng, 3.0, F64) for _ in range(2))
        assert_trees_close(sym.act(sym.act(p, g), sym.inverse(g)), p, 1e-13)
        assert_trees_close(sym.act(sym.act(p, g), h), sym.act(p, sym.compose(g, h)), 1e-13)
        for u, grp in zip(sym.compose(g, sym.inverse(g)), sym.groups):
            np.testing.assert_array_equal(u.window_perm, np.arange(grp.windows))
            np.testing.assert_allclose(u.log_scale, 0.0, atol=1e-15)


# --------------------------------------------------------------------------- infinitesimal action


def test_tangent_closed_form_sawtooth():
    """J a on a chain: kernel_l gets ``a_l`` (out) minus ``a_{l-1}`` (in), bias_l gets ``a_l``."""
    m = zoo.build("sawtooth_net", F64)
    p = m.params(5)
    rng = np.random.default_rng(1)
    a = tuple(jnp.asarray(rng.normal(size=5)) for _ in range(5))
    ja = leaves_by_path(quick_jit(m.sym.tangent)(p, a))
    leaves = leaves_by_path(p)
    zero = jnp.zeros(1)
    for i in range(6):
        a_out = a[i] if i < 5 else zero
        a_in = a[i - 1] if i > 0 else zero
        k = leaves[("layers", 2 * i, "kernel")]
        np.testing.assert_allclose(ja[("layers", 2 * i, "kernel")],
                                   k * (a_out[None, :] - a_in[:, None]))
        b = leaves[("layers", 2 * i, "bias")]
        np.testing.assert_allclose(ja[("layers", 2 * i, "bias")], b * a_out)


def test_example_models_gradients_horizontal_on_their_tasks():
    """``J^T ∇L = 0`` for the sawtooth MSE on its task; MaxPoolNet: pieces swap, no scale."""
    saw = zoo.build("sawtooth_net", F64)
    task = models.sawtooth_task(dtype=F64)

    @quick_jit
    def jt_grad(q, v):
        grad = jax.grad(lambda q: models.mse(saw.apply(q, task.x), task.y))(q)
        return tree_norm(grad), saw.sym.cotangent(q, grad), saw.sym.cotangent(q, v)

    for k in range(3):
        q = saw.params(k)
        gnorm, jtg, jtv = jt_grad(q, saw.params(k + 10))
        assert float(gnorm) > 1e-6
        for z in jtg:
            assert float(jnp.max(jnp.abs(z))) <= 1e-12 * float(gnorm * tree_norm(q))
        assert float(max(jnp.max(jnp.abs(z)) for z in jtv)) > 1e-3


# --------------------------------------------------------------------------- bad input


def test_wrong_shapes_name_the_path():
    m = zoo.build("sawtooth_net")
    sym, p = m.sym, m.params(0)
    bad = map_with_path(lambda path, x: x[:, :4] if path == ("layers", 4, "kernel") else x, p)
    g = sym.identity()
    for call in (
        lambda: sym.validate(bad),
        lambda: sym.act(bad, g),
        lambda: sym.tangent(bad, sym.zero_log_scales()),
        lambda: sym.cotangent(bad, bad),
    ):
        with pytest.raises(ValueError, match=r"'layers/4/kernel' has shape \(5, 4\)"):
            call()


def test_symmetry_of_another_model_names_the_path():
    saw, mp, eq = zoo.build("sawtooth_net"), zoo.build("maxpool_net"), zoo.build("eqx_mlp")
    with pytest.raises(ValueError, match="layers/0/kernel"):
        saw.sym.act(mp.params(0), saw.sym.identity())
    with pytest.raises(ValueError, match="no parameter at path 'layers/0/kernel'"):
        saw.sym.act(eq.params(0), saw.sym.identity())
    with pytest.raises(ValueError, match="no parameter at path 'layers/0/weight'"):
        eq.sym.act(saw.params(0), eq.sym.identity())
