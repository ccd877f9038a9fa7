"""Tests of ``quotient_opt._symmetry``: the group action, its group law, the
infinitesimal action and its transpose, inference from nnx / equinox / linen
models, and the errors on bad input.

Invariance is checked as :math:`\\max_x |f(g\\cdot\\theta)(x) - f(\\theta)(x)| \\le
\\mathrm{rtol}\\cdot s` with the output scale
:math:`s = \\max_x |f(\\theta)(x)| + 16\\,\\varepsilon\\,\\max_x f_{|\\theta|}(|x|)`;
the second term is the textbook bound on the rounding of a chain of affine maps
(the network with every weight and input replaced by its absolute value, itself
invariant under the group). It only matters when the output is small by
cancellation.

Speed: XLA compiles every new shape, and compiling dominates these tests. So
models are built abstractly (``eval_shape``) and filled with numpy noise, group
elements are drawn with numpy, and all quantities of one hypothesis example are
computed by one jitted probe, cached per model structure.
"""

from __future__ import annotations

import dataclasses
import functools
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
from quotient_opt import models
from quotient_opt.symmetry._spec import Dense, leaves_by_path, map_with_path, path_str

F32, F64 = jnp.float32, jnp.float64
EPS = {F32: float(jnp.finfo(F32).eps), F64: float(jnp.finfo(F64).eps)}
RTOL = {F32: 1e-5, F64: 1e-12}
DTYPES = st.sampled_from([F32, F64])
SEEDS = st.integers(0, 2**31 - 1)
LOG_SCALES = st.floats(0.0, 4.0)
# each random-shape example compiles a new program (~1-2 s): a tenth of the profile's count
FEW = settings(max_examples=max(2, settings().max_examples // 10))
# these tiny programs run once: skip LLVM's optimizations (cuts compile time by about a third)
quick_jit = functools.partial(jax.jit, compiler_options={"xla_backend_optimization_level": 0})


# --------------------------------------------------------------------------- model builders


@dataclasses.dataclass(frozen=True, eq=False)  # hashed by identity (one per shape)
class Structure:
    """A model built abstractly: its symmetry, ``apply(params, x)`` and parameter shapes."""

    sym: qo.Symmetry
    apply: Callable[[Any, jax.Array], jax.Array]
    abstract: Any  # pytree of ShapeDtypeStruct
    in_features: int
    dtype: Any

    def params(self, seed: int, scale: float = 0.8) -> Any:
        """Parameters filled with N(0, scale^2) noise (biases too)."""
        rng = np.random.default_rng(seed)
        return jax.tree.map(
            lambda s: jnp.asarray(scale * rng.normal(size=s.shape), s.dtype), self.abstract
        )


def seq(*layers: Callable[[nnx.Rngs], Any]) -> nnx.Sequential:
    """``nnx.Sequential`` of ``layer(rngs)`` built abstractly (no initializer runs)."""
    return nnx.eval_shape(lambda: nnx.Sequential(*(f(nnx.Rngs(0)) for f in layers)))


def lin(a: int, b: int) -> Callable[[nnx.Rngs], nnx.Linear]:
    return lambda r: nnx.Linear(a, b, rngs=r)


def fixed(f: Any) -> Callable[[nnx.Rngs], Any]:
    return lambda r: f


def _is_leaf(x: Any) -> bool:
    return isinstance(x, (jax.Array, jax.ShapeDtypeStruct))


HIDDEN = ["relu", "leaky_relu", "identity", "custom_relu", "max2", "max3"]


def nnx_mlp(in_features: int, hidden: list[tuple[int, str]], out: int, dtype: Any, seed: int = 0):
    """An ``nnx.Sequential`` with hidden layers ``(width, kind)``."""
    rngs = nnx.Rngs(seed)
    fns: list[Any] = []
    d = in_features
    for width, kind in hidden:
        pieces = int(kind[3:]) if kind.startswith("max") else 1
        fns.append(nnx.Linear(d, width * pieces, param_dtype=dtype, rngs=rngs))
        if pieces > 1:
            fns.append(models.MaxOverPieces(pieces))
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


class LinenMLP(linen.Module):
    """A linen Dense MLP with named layers."""

    features: tuple[int, ...]
    names: tuple[str, ...]
    act: Callable = jax.nn.relu
    param_dtype: Any = jnp.float32

    @linen.compact
    def __call__(self, x):
        for i, (f, name) in enumerate(zip(self.features, self.names)):
            x = linen.Dense(f, name=name, param_dtype=self.param_dtype)(x)
            if i < len(self.features) - 1:
                x = self.act(x)
        return x


def linen_names(n: int) -> tuple[str, ...]:
    """``'dense_z', 'dense_y', ...``: dict (sorted) order is the reverse of execution order."""
    return tuple(f"dense_{chr(ord('z') - i)}" for i in range(n))


ACTS = {"relu": jax.nn.relu, "leaky_relu": jax.nn.leaky_relu, "tanh": jnp.tanh}


def _nnx_structure(ctor: Callable[[], nnx.Module], in_features: int, dtype: Any) -> Structure:
    model = nnx.eval_shape(ctor)
    apply, abstract = models.functional(model)
    return Structure(qo.infer_symmetry(model), apply, abstract, in_features, dtype)


@functools.lru_cache(maxsize=None)
def structure(shape: tuple, dtype: Any) -> Structure:
    """Builds (once per shape) the model described by ``shape``, see :func:`model_shapes`."""
    kind = shape[0]
    if kind == "sawtooth":
        return _nnx_structure(
            lambda: models.SawtoothNet(rngs=nnx.Rngs(0), param_dtype=dtype), 1, dtype
        )
    if kind == "maxpool":
        _, pieces, windows, d = shape
        return _nnx_structure(
            lambda: models.MaxPoolNet(pieces, windows, d, rngs=nnx.Rngs(0), param_dtype=dtype),
            d,
            dtype,
        )
    if kind == "nnx":
        _, d, hidden, out = shape
        return _nnx_structure(lambda: nnx_mlp(d, list(hidden), out, dtype), d, dtype)
    if kind == "eqx":
        _, d, width, depth, act = shape
        mlp = eqx.filter_eval_shape(
            eqx.nn.MLP, d, 2, width, depth, activation=ACTS[act], dtype=dtype, key=jax.random.key(0)
        )
        abstract, static = eqx.partition(mlp, _is_leaf)

        def apply(p, x):
            return jax.vmap(eqx.combine(p, static))(x)

        return Structure(qo.infer_symmetry(mlp), apply, abstract, d, dtype)
    _, d, widths, act = shape  # linen
    feats = (*widths, 2)
    names = linen_names(len(feats))
    mod = LinenMLP(feats, names, ACTS[act], dtype)
    abstract = jax.eval_shape(mod.init, jax.random.key(0), jnp.zeros((1, d), dtype))
    sym = qo.infer_symmetry(abstract, layer_order=names, activation=ACTS[act])
    return Structure(sym, mod.apply, abstract, d, dtype)


@st.composite
def model_shapes(draw, kinds=("sawtooth", "maxpool", "nnx", "eqx", "linen")) -> tuple:
    """A hashable description of a random model architecture."""
    kind = draw(st.sampled_from(kinds))
    if kind == "sawtooth":
        return (kind,)
    if kind == "maxpool":
        return (kind, draw(st.integers(1, 4)), draw(st.integers(1, 3)), draw(st.integers(1, 3)))
    if kind == "nnx":
        hidden = draw(
            st.lists(st.tuples(st.integers(1, 5), st.sampled_from(HIDDEN)), min_size=1, max_size=3)
        )
        return (kind, draw(st.integers(1, 3)), tuple(hidden), draw(st.integers(1, 2)))
    act = draw(st.sampled_from(["relu", "leaky_relu"]))
    if kind == "eqx":
        d, width, depth = draw(st.integers(1, 3)), draw(st.integers(1, 5)), draw(st.integers(1, 3))
        return (kind, d, width, depth, act)
    widths = draw(st.lists(st.integers(1, 5), min_size=1, max_size=3))
    return (kind, draw(st.integers(1, 3)), tuple(widths), act)


def random_element(sym: qo.Symmetry, rng: np.random.Generator, bound: float, dtype: Any):
    """A random group element drawn with numpy (no compilation): random permutations of
    the windows where a later layer absorbs them and of the pieces in every window,
    log-scales uniform in ``[-bound, bound]`` on rescalable groups."""
    out = []
    for g in sym.groups:
        wp = rng.permutation(g.windows) if g.windows_permutable else np.arange(g.windows)
        pp = np.stack([rng.permutation(g.pieces) for _ in range(g.windows)])
        ls = rng.uniform(-bound, bound, g.windows) if g.rescalable else np.zeros(g.windows)
        out.append(
            qo.GroupElement(
                jnp.asarray(wp, jnp.int32), jnp.asarray(pp, jnp.int32), jnp.asarray(ls, dtype)
            )
        )
    return tuple(out)


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


def output_scale(s: Structure, p: Any, x: jax.Array) -> jax.Array:
    bound = s.apply(jax.tree.map(jnp.abs, p), jnp.abs(x))
    return jnp.max(jnp.abs(s.apply(p, x))) + 16 * EPS[s.dtype] * jnp.max(jnp.abs(bound))


def invariance_error(s: Structure, p: Any, q: Any, x: jax.Array) -> jax.Array:
    """``max |f(q)(x) - f(p)(x)|`` divided by the output scale."""
    return jnp.max(jnp.abs(s.apply(q, x) - s.apply(p, x))) / output_scale(s, p, x)


@functools.lru_cache(maxsize=None)
def probe(s: Structure) -> Callable:
    """One jitted function computing everything the property tests check."""
    sym = s.sym
    fd_step = 1e-5 if s.dtype == F64 else 1e-2

    def run(p, g, h, a, v, x, y):
        q = sym.act(p, g)
        plus = sym.act(p, sym.scales_only(tuple(fd_step * z for z in a)))
        minus = sym.act(p, sym.scales_only(tuple(-fd_step * z for z in a)))
        grad = jax.grad(lambda p: jnp.mean((s.apply(p, x) - y) ** 2))(p)
        return dict(
            moved=q,
            invariance=invariance_error(s, p, q, x),
            identity=sym.act(p, sym.identity(s.dtype)),
            inverse=sym.act(q, sym.inverse(g)),
            g_then_h=sym.act(q, h),
            composed=sym.act(p, sym.compose(g, h)),
            pairing=(tree_dot(q, sym.act(v, g, power=-1)), tree_dot(p, v)),
            ja=sym.tangent(p, a),
            jtv=sym.cotangent(p, v),
            fd=jax.tree.map(lambda u, w: (u - w) / (2 * fd_step), plus, minus),
            grad=grad,
            jt_grad=sym.cotangent(p, grad),
        )

    return quick_jit(run)


def check_properties(s: Structure, seed: int, bound: float) -> None:
    """Invariance, group law, adjointness and horizontality of invariant gradients."""
    dt, sym = s.dtype, s.sym
    rng = np.random.default_rng(seed)
    p = s.params(seed)
    g = random_element(sym, rng, bound, dt)
    h = random_element(sym, rng, bound, dt)
    a = tuple(jnp.asarray(rng.normal(size=grp.windows), dt) for grp in sym.groups)
    v = s.params(seed + 1)
    x = jnp.asarray(rng.uniform(-1.5, 1.5, (32, s.in_features)), dt)
    y_shape = jax.eval_shape(s.apply, p, x).shape
    yt = jnp.asarray(rng.normal(size=y_shape), dt)
    out = probe(s)(p, g, h, a, v, x, yt)
    close = 1e-6 if dt == F32 else 1e-13

    # f(g.θ) == f(θ), same structure and dtypes
    assert jax.tree.structure(out["moved"]) == jax.tree.structure(p)
    assert all(z.dtype == dt for z in jax.tree.leaves(out["moved"]))
    assert float(out["invariance"]) <= RTOL[dt], float(out["invariance"])
    # group law: identity acts exactly, inverse undoes, composition composes
    for path, leaf in leaves_by_path(out["identity"]).items():
        np.testing.assert_array_equal(leaf, leaves_by_path(p)[path], err_msg=path_str(path))
    assert_trees_close(out["inverse"], p, close, atol=1e-30)
    assert_trees_close(out["g_then_h"], out["composed"], close, atol=1e-30)
    # gradients (power -1) pair with parameters: <g.θ, g^{-T}.v> = <θ, v>
    lhs, rhs = out["pairing"]
    np.testing.assert_allclose(lhs, rhs, rtol=1e-4 if dt == F32 else 1e-10)
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


# --------------------------------------------------------------------------- properties


@pytest.mark.parametrize("kind", ["sawtooth", "maxpool"])
@FEW
@given(data=st.data(), dtype=DTYPES, seed=SEEDS, bound=LOG_SCALES)
def test_example_models_properties(kind, data, dtype, seed, bound):
    check_properties(structure(data.draw(model_shapes((kind,))), dtype), seed, bound)


@FEW
@given(shape=model_shapes(("nnx",)), dtype=DTYPES, seed=SEEDS, bound=LOG_SCALES)
def test_nnx_mlp_properties(shape, dtype, seed, bound):
    check_properties(structure(shape, dtype), seed, bound)


@FEW
@given(shape=model_shapes(("eqx",)), dtype=DTYPES, seed=SEEDS, bound=LOG_SCALES)
def test_equinox_mlp_properties(shape, dtype, seed, bound):
    s = structure(shape, dtype)
    assert s.sym.groups and all(grp.rescalable for grp in s.sym.groups)
    check_properties(s, seed, bound)


@FEW
@given(shape=model_shapes(("linen",)), dtype=DTYPES, seed=SEEDS, bound=LOG_SCALES)
def test_linen_mlp_properties(shape, dtype, seed, bound):
    s = structure(shape, dtype)
    n = len(shape[2]) + 1
    assert [lay.name for lay in s.sym.layers] == [f"params/{m}" for m in linen_names(n)]
    check_properties(s, seed, bound)


def stack(*trees: Any) -> Any:
    return jax.tree.map(lambda *z: jnp.stack(z), *trees)


@functools.lru_cache(maxsize=None)
def _batched_invariance(s: Structure, sym: qo.Symmetry) -> Callable:
    """Jitted ``(p, stacked elements, x) -> invariance error of each element``."""
    return quick_jit(
        lambda p, gs, x: jax.vmap(lambda g: invariance_error(s, p, sym.act(p, g), x))(gs)
    )


@pytest.mark.parametrize(
    "shape",
    [
        ("nnx", 2, ((4, "tanh"), (3, "tanh")), 2),
        ("eqx", 2, 4, 2, "tanh"),
        ("linen", 2, (4, 3), "tanh"),
    ],
    ids=["nnx", "eqx", "linen"],
)
def test_tanh_mlp_permutations_only(shape):
    s = structure(shape, F32)
    assert len(s.sym.groups) == 2
    assert all(not grp.rescalable and grp.activation == "tanh" for grp in s.sym.groups)
    assert all(grp.windows_permutable for grp in s.sym.groups)
    ones = tuple(jnp.ones((grp.windows,), F32) for grp in s.sym.groups)
    assert all(not np.any(e.log_scale) for e in s.sym.scales_only(ones))
    rng = np.random.default_rng(0)
    gs = stack(*(random_element(s.sym, rng, 4.0, F32) for _ in range(16)))
    assert not np.any(gs[0].log_scale)
    x = jnp.asarray(rng.uniform(-1.5, 1.5, (32, 2)), F32)
    errors = _batched_invariance(s, s.sym)(s.params(0), gs, x)
    assert float(jnp.max(errors)) <= RTOL[F32]
    # negative control: forcing a rescaling on the tanh layers changes the function
    forced = dataclasses.replace(
        s.sym, groups=tuple(dataclasses.replace(grp, rescalable=True) for grp in s.sym.groups)
    )
    gs = stack(*(random_element(forced, rng, 1.5, F32) for _ in range(16)))
    errors = _batched_invariance(s, forced)(s.params(0), gs, x)
    assert float(jnp.min(errors)) > 1e-3


def test_non_invariant_perturbation_is_detected():
    """Negative control: a 0.1% change of one bias fails the invariance tolerance."""
    s = structure(("sawtooth",), F32)
    p = s.params(1)
    q = map_with_path(lambda path, z: z * 1.001 if path == ("layers", 4, "bias") else z, p)
    x = jnp.linspace(-1.5, 1.5, 32, dtype=F32)[:, None]
    assert float(quick_jit(functools.partial(invariance_error, s))(p, q, x)) > RTOL[F32]


def test_random_element_moves_every_hidden_parameter():
    """Invariance is not vacuous: the action moves every leaf but the output bias."""
    s = structure(("nnx", 2, ((4, "relu"), (3, "max2")), 2), F64)
    p = s.params(3)
    q = quick_jit(s.sym.act)(p, random_element(s.sym, np.random.default_rng(0), 2.0, F64))
    for path, leaf in leaves_by_path(p).items():
        same = np.allclose(leaf, leaves_by_path(q)[path])
        assert same == (path == ("layers", 4, "bias")), path_str(path)


def test_rescalability_by_activation():
    for kind in ("relu", "leaky_relu", "custom_relu", "identity", "max2"):
        (grp,) = qo.infer_symmetry(nnx.eval_shape(lambda: nnx_mlp(2, [(3, kind)], 1, F32))).groups
        assert grp.rescalable and grp.windows_permutable, kind
    for fn in (jnp.tanh, jax.nn.sigmoid, jax.nn.softplus, jax.nn.gelu, lambda x: x**3):
        model = seq(lin(2, 3), fixed(fn), lin(3, 1))
        (grp,) = qo.infer_symmetry(model).groups
        assert not grp.rescalable and grp.windows_permutable


# --------------------------------------------------------------------------- sampling


def test_maxpool_one_piece_is_a_linear_model():
    sym = qo.infer_symmetry(nnx.eval_shape(lambda: models.MaxPoolNet(1, 3, 2, rngs=nnx.Rngs(0))))
    assert sym.groups == ()  # outputs of the last layer: nothing to permute or rescale


@functools.lru_cache(maxsize=None)
def _sampler(sym: qo.Symmetry, dtype: Any, permute: bool = True) -> Callable:
    """``(keys, bound) -> batch of sym.sample``, jitted once per symmetry."""
    return quick_jit(
        jax.vmap(
            lambda k, b: sym.sample(k, log_scale=b, dtype=dtype, permute=permute), in_axes=(0, None)
        )
    )


def _sample_batch(sym: qo.Symmetry, n: int, bound: float, dtype: Any = F32, permute: bool = True):
    keys = jax.random.split(jax.random.key(n), n)
    return _sampler(sym, dtype, permute)(keys, jnp.asarray(bound, dtype))


def _assert_rows_are_permutations(perm: jax.Array) -> None:
    n = perm.shape[-1]
    assert perm.dtype == jnp.int32
    np.testing.assert_array_equal(np.sort(perm, axis=-1), np.broadcast_to(np.arange(n), perm.shape))


def test_sample_structure_maxpoolnet():
    """MaxPoolNet: pieces permuted only inside their window, windows neither permuted nor scaled."""
    pieces, windows = 3, 4
    s = structure(("maxpool", pieces, windows, 2), F32)
    (grp,) = s.sym.groups
    assert (grp.windows, grp.pieces, grp.outgoing) == (windows, pieces, ())
    assert not grp.rescalable and not grp.windows_permutable  # the windows are the outputs
    (e,) = _sample_batch(s.sym, 64, 4.0)
    np.testing.assert_array_equal(e.window_perm, np.tile(np.arange(windows), (64, 1)))
    np.testing.assert_array_equal(e.log_scale, 0.0)
    assert e.piece_perm.shape == (64, windows, pieces)
    _assert_rows_are_permutations(e.piece_perm)
    assert len({tuple(r) for r in np.asarray(e.piece_perm).reshape(-1, pieces)}) == 6  # all of S_3
    # on the kernel: columns move only inside their window
    p = s.params(0)
    e0 = jax.tree.map(lambda z: z[5], e)
    k0 = np.asarray(p["layers"][0]["kernel"][...])
    k1 = np.asarray(s.sym.act(p, (e0,))["layers"][0]["kernel"][...])
    for w in range(windows):
        for j in range(pieces):
            src = w * pieces + e0.piece_perm[w, j]
            np.testing.assert_array_equal(k1[:, w * pieces + j], k0[:, src])


# max-pool windows feeding a Linear, a leaky-ReLU layer, a tanh layer
MIXED = ("nnx", 2, ((4, "max3"), (5, "leaky_relu"), (3, "tanh")), 1)


def test_sample_structure_mixed_network():
    """Windows feeding a later layer permute and share one scale each; tanh units only permute."""
    pieces, windows, bound = 3, 4, 2.5
    s = structure(MIXED, F64)
    sym = s.sym
    assert [(g.windows, g.pieces, g.rescalable) for g in sym.groups] == [
        (4, 3, True), (5, 1, True), (3, 1, False)
    ]
    batch = _sample_batch(sym, 64, bound, F64)
    for grp, e in zip(sym.groups, batch):
        assert e.log_scale.dtype == F64 and e.log_scale.shape == (64, grp.windows)
        if grp.rescalable:
            assert np.all(np.abs(e.log_scale) <= bound) and np.max(np.abs(e.log_scale)) > bound / 2
        else:
            np.testing.assert_array_equal(e.log_scale, 0.0)
        _assert_rows_are_permutations(e.window_perm)
        assert len({tuple(r) for r in np.asarray(e.window_perm)}) >= 6  # of |S_n| >= 6
        _assert_rows_are_permutations(e.piece_perm)
    g = jax.tree.map(lambda z: z[3], batch)
    p = s.params(0)
    q = sym.act(p, g)
    e, f = g[:2]
    k0, k1 = np.asarray(p["layers"][0]["kernel"][...]), np.asarray(q["layers"][0]["kernel"][...])
    b0, b1 = np.asarray(p["layers"][0]["bias"][...]), np.asarray(q["layers"][0]["bias"][...])
    for w in range(windows):
        c = np.exp(e.log_scale[w])
        for j in range(pieces):
            src = e.window_perm[w] * pieces + e.piece_perm[w, j]
            np.testing.assert_allclose(k1[:, w * pieces + j], c * k0[:, src], rtol=1e-13)
            np.testing.assert_allclose(b1[w * pieces + j], c * b0[src], rtol=1e-13)
    # next kernel: input rows permuted by windows and scaled by 1/c, output columns by f
    n0, n1 = np.asarray(p["layers"][2]["kernel"][...]), np.asarray(q["layers"][2]["kernel"][...])
    expect = n0[e.window_perm] / np.exp(e.log_scale)[:, None]
    expect = expect[:, f.window_perm] * np.exp(f.log_scale)
    np.testing.assert_allclose(n1, expect, rtol=1e-12)
    # bound 0 gives pure permutations
    for e in _sample_batch(sym, 64, 0.0, F64):
        np.testing.assert_array_equal(e.log_scale, 0.0)


def test_sample_without_permutations():
    sym = structure(("nnx", 1, ((3, "max2"),), 1), F32).sym
    (e,) = _sample_batch(sym, 64, 1.0, F32, permute=False)
    np.testing.assert_array_equal(e.window_perm, np.tile(np.arange(3), (64, 1)))
    np.testing.assert_array_equal(e.piece_perm, np.tile(np.arange(2), (64, 3, 1)))
    assert np.all(e.log_scale != 0) and np.all(np.abs(e.log_scale) <= 1.0)


# --------------------------------------------------------------------------- infinitesimal action


def test_tangent_closed_form_sawtooth():
    """J a on a chain: kernel_l gets ``a_l`` (out) minus ``a_{l-1}`` (in), bias_l gets ``a_l``."""
    s = structure(("sawtooth",), F64)
    p = s.params(5)
    rng = np.random.default_rng(1)
    a = tuple(jnp.asarray(rng.normal(size=5)) for _ in range(5))
    ja = leaves_by_path(quick_jit(s.sym.tangent)(p, a))
    leaves = leaves_by_path(p)
    zero = jnp.zeros(1)
    for i in range(6):
        a_out = a[i] if i < 5 else zero
        a_in = a[i - 1] if i > 0 else zero
        k = leaves[("layers", 2 * i, "kernel")]
        expect = k * (a_out[None, :] - a_in[:, None])
        np.testing.assert_allclose(ja[("layers", 2 * i, "kernel")], expect)
        b = leaves[("layers", 2 * i, "bias")]
        np.testing.assert_allclose(ja[("layers", 2 * i, "bias")], b * a_out)


def test_example_models_gradients_horizontal_on_their_tasks():
    """``J^T ∇L = 0`` for the MSE of both example models on their own tasks at random points."""
    saw = structure(("sawtooth",), F64)
    task = models.sawtooth_task(dtype=F64)

    @quick_jit
    def jt_grad(q, v):
        grad = jax.grad(lambda q: models.mse(saw.apply(q, task.x), task.y))(q)
        return tree_norm(grad), saw.sym.cotangent(q, grad), saw.sym.cotangent(q, v)

    for k in range(3):
        q = saw.params(k)
        gnorm, jtg, jtv = jt_grad(q, saw.params(k + 10))
        assert float(gnorm) > 1e-6  # a genuine, nonzero gradient
        for z in jtg:
            assert float(jnp.max(jnp.abs(z))) <= 1e-12 * float(gnorm * tree_norm(q))
        assert float(max(jnp.max(jnp.abs(z)) for z in jtv)) > 1e-3  # not a vacuous check
    # MaxPoolNet has no layer after the pooling, hence no rescaling symmetry: J^T = 0, and
    # scaling the kernel really changes the loss; swapping the pieces does not.
    mp = structure(("maxpool", 2, 1, 2), F64)
    mtask = models.maxpool_task(dtype=F64)
    swap = (
        qo.GroupElement(
            jnp.array([0], jnp.int32), jnp.array([[1, 0]], jnp.int32), jnp.zeros(1, F64)
        ),
    )

    @quick_jit
    def probe_maxpool(q):
        def loss(q):
            return models.mse(mp.apply(q, mtask.x), mtask.y)

        doubled = jax.tree.map(lambda z: 2.0 * z, q)
        jt_grad = mp.sym.cotangent(q, jax.grad(loss)(q))
        return jt_grad, loss(q), loss(doubled), loss(mp.sym.act(q, swap))

    jtg, base, doubled, swapped = probe_maxpool(mp.params(0))
    assert all(not np.any(z) for z in jtg)
    assert abs(float(doubled - base)) > 1e-3
    np.testing.assert_allclose(swapped, base, rtol=1e-14)


def test_group_law_with_permuted_maxout_windows():
    """Inverse and composition where windows *and* the pieces inside them are permuted."""
    s = structure(MIXED, F64)
    sym, p = s.sym, s.params(2)
    rng = np.random.default_rng(4)
    gs = stack(*(random_element(sym, rng, 3.0, F64) for _ in range(16)))
    hs = stack(*(random_element(sym, rng, 3.0, F64) for _ in range(16)))

    @quick_jit
    def law(g, h):
        q = sym.act(p, g)
        cycle = sym.compose(g, sym.inverse(g))
        return sym.act(q, sym.inverse(g)), sym.act(q, h), sym.act(p, sym.compose(g, h)), cycle

    back, g_then_h, composed, cycle = jax.vmap(law)(gs, hs)
    for i in range(16):
        take = functools.partial(jax.tree.map, lambda z: z[i])
        assert_trees_close(take(back), p, 1e-13)
        assert_trees_close(take(g_then_h), take(composed), 1e-13)
    for u, grp in zip(cycle, sym.groups):  # g . g^-1 = e
        np.testing.assert_array_equal(u.window_perm, np.tile(np.arange(grp.windows), (16, 1)))
        identity = np.tile(np.arange(grp.pieces), (16, grp.windows, 1))
        np.testing.assert_array_equal(u.piece_perm, identity)
        np.testing.assert_allclose(u.log_scale, 0.0, atol=1e-15)


# --------------------------------------------------------------------------- jit / vmap


def test_act_jit_and_vmap_over_group_elements():
    s = structure(MIXED, F64)
    sym, p = s.sym, s.params(11)
    gs = _sample_batch(sym, 64, 3.0, F64)  # sample under jit and vmap
    assert gs[0].window_perm.shape == (64, 4)
    gs = jax.tree.map(lambda z: z[:6], gs)
    x = jnp.asarray(np.random.default_rng(0).uniform(-1.5, 1.5, (32, 2)), F64)

    @quick_jit
    def batched(p, gs):
        qs = jax.vmap(sym.act, in_axes=(None, 0))(p, gs)
        return qs, jax.vmap(s.apply, in_axes=(0, None))(qs, x), s.apply(p, x), output_scale(s, p, x)

    qs, ys, y0, scale = batched(p, gs)
    act = quick_jit(sym.act)
    for i in range(6):
        g = jax.tree.map(lambda z: z[i], gs)
        assert_trees_close(jax.tree.map(lambda z: z[i], qs), act(p, g), rtol=1e-14)
        assert float(jnp.max(jnp.abs(ys[i] - y0))) <= RTOL[F64] * float(scale)
    assert not np.allclose(qs["layers"][0]["kernel"][...][0], qs["layers"][0]["kernel"][...][1])


# --------------------------------------------------------------------------- bad input


def test_wrong_shapes_name_the_path():
    s = structure(("sawtooth",), F32)
    sym, p = s.sym, s.params(0)
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
    saw = structure(("sawtooth",), F32)
    mp = structure(("maxpool", 2, 1, 2), F32)
    with pytest.raises(ValueError, match="layers/0/kernel"):
        saw.sym.act(mp.params(0), saw.sym.identity())
    deep = structure(("nnx", 1, ((5, "relu"), (5, "relu")), 1), F32)
    with pytest.raises(ValueError, match=r"'layers/4/kernel' has shape \(5, 1\).*\(5, 5\)"):
        saw.sym.validate(deep.params(0))
    eq = structure(("eqx", 1, 5, 5, "relu"), F32)
    with pytest.raises(ValueError, match="no parameter at path 'layers/0/kernel'"):
        saw.sym.act(eq.params(0), saw.sym.identity())
    with pytest.raises(ValueError, match="no parameter at path 'layers/0/weight'"):
        eq.sym.act(saw.params(0), eq.sym.identity())


@pytest.mark.parametrize(
    "layer, match",
    [
        (lambda r: nnx.Dropout(0.1, rngs=r), "unsupported layer Dropout"),
        (lambda r: nnx.Conv(5, 5, (3,), rngs=r), "unsupported layer Conv"),
        (lambda r: nnx.BatchNorm(5, rngs=r), "unsupported layer BatchNorm"),
        (fixed(lambda x: x[..., ::-1]), "not an elementwise"),
        (fixed(lambda x: x / jnp.sum(x)), "not an elementwise"),
        (fixed("relu"), "not a supported layer"),
    ],
)
def test_unsupported_layer_names_the_layer(layer, match):
    model = seq(lin(1, 5), layer, lin(5, 1))
    with pytest.raises(ValueError, match=f"layers/1.*{match}"):
        qo.infer_symmetry(model)


def test_malformed_chains_raise():
    relu = fixed(nnx.relu)
    with pytest.raises(ValueError, match="layers/2.*takes 4 inputs.*layers/0.*gives 5"):
        qo.infer_symmetry(seq(lin(1, 5), relu, lin(4, 1)))
    with pytest.raises(ValueError, match="layers/2.*must directly follow an nnx.Linear"):
        qo.infer_symmetry(seq(lin(1, 5), relu, relu, lin(5, 1)))
    with pytest.raises(ValueError, match="layers/0.*must directly follow an nnx.Linear"):
        qo.infer_symmetry(seq(relu, lin(1, 1)))
    with pytest.raises(ValueError, match="layers/1.*5 features.*windows of 2"):
        qo.infer_symmetry(seq(lin(1, 5), fixed(models.MaxOverPieces(2))))
    with pytest.raises(ValueError, match="layer 'b' takes 3 inputs"):
        qo.symmetry_from_layers(
            [Dense("a", ("a", "kernel"), None, 2, 4, 1), Dense("b", ("b", "kernel"), None, 3, 1, 1)]
        )
    with pytest.raises(ValueError, match="no nnx.Linear"):
        qo.infer_symmetry(seq())
    with pytest.raises(ValueError, match="not an nnx.Sequential"):
        qo.infer_symmetry(nnx.eval_shape(lambda: nnx.Linear(1, 1, rngs=nnx.Rngs(0))))
    with pytest.raises(ValueError, match="unsupported model type"):
        qo.infer_symmetry(3)


def test_linen_errors():
    names = linen_names(3)
    params = jax.eval_shape(LinenMLP((4, 3, 1), names).init, jax.random.key(0), jnp.zeros((1, 2)))
    with pytest.raises(ValueError, match="layer_order"):
        qo.infer_symmetry(params)
    with pytest.raises(ValueError, match="params/dense_q/kernel"):
        qo.infer_symmetry(params, layer_order=[names[0], "dense_q"])
    # dict (alphabetical) order is not execution order: the widths do not chain
    with pytest.raises(ValueError, match="takes"):
        qo.infer_symmetry(params, layer_order=sorted(names))
    # the inner dict works as well as the one under 'params', each with its own paths
    inner = qo.infer_symmetry(params["params"], layer_order=names)
    outer = qo.infer_symmetry(params, layer_order=names)
    assert [g.windows for g in inner.groups] == [g.windows for g in outer.groups] == [4, 3]
    with pytest.raises(ValueError, match="no parameter at path 'dense_z/kernel'"):
        inner.validate(params)


def test_equinox_scanned_mlp_is_rejected():
    mlp = eqx.filter_eval_shape(eqx.nn.MLP, 2, 1, 4, 3, scan=True, key=jax.random.key(0))
    with pytest.raises(ValueError, match=r"layers/1.*\(2, 4, 4\).*scan=False"):
        qo.infer_symmetry(mlp)
