"""Tests for quotient_opt.landscape: NEB, Hessian spectra, trajectory PCA, interpolation."""

import math

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from flax import nnx

import quotient_opt as qo
from quotient_opt.landscape import (
    hessian_spectrum,
    interpolate,
    neb,
    random_walk_pca,
    smooth_relu,
    trajectory_pca,
    with_smooth_relu,
)
from quotient_opt.symmetry._spec import map_with_path

# --------------------------------------------------------------------------- potentials

# Curved double well: minima (±1, 0), the valley y = A (1 - x²), saddle (0, A)
# with V = 1 exactly; the straight line between the minima crosses V = 1 + K A².
K, A = 5.0, 0.8


def double_well(p):
    x, y = p[0], p[1]
    return (x**2 - 1) ** 2 + K * (y - A * (1 - x**2)) ** 2


# Müller-Brown potential (Müller & Brown, Theor. Chim. Acta 53, 75 (1979)).
_MB = (
    (-200.0, -1.0, 0.0, -10.0, 1.0, 0.0),
    (-100.0, -1.0, 0.0, -10.0, 0.0, 0.5),
    (-170.0, -6.5, 11.0, -6.5, -0.5, 1.5),
    (15.0, 0.7, 0.6, 0.7, -1.0, 1.0),
)


def muller_brown(p):
    x, y = p["x"], p["y"]
    return sum(
        c * jnp.exp(a * (x - x0) ** 2 + b * (x - x0) * (y - y0) + d * (y - y0) ** 2)
        for c, a, b, d, x0, y0 in _MB
    )


def _newton(f, v, iters=30):
    """Critical point of f near v (minimum or saddle), to rounding."""
    step = lambda v, _: (v - jnp.linalg.solve(jax.hessian(f)(v), jax.grad(f)(v)), None)
    return jax.jit(lambda v: jax.lax.scan(step, v, None, length=iters)[0])(
        jnp.asarray(v, jnp.float64)
    )


def _mb_point(v):
    return {"x": v[0], "y": v[1]}


def _mb_flat(v):
    return muller_brown(_mb_point(v))


# --------------------------------------------------------------------------- NEB


def test_neb_climbing_image_lands_on_analytic_saddle():
    a, b = jnp.array([-1.0, 0.0]), jnp.array([1.0, 0.0])
    res = neb(double_well, a, b, images=9, steps=1500)
    top = int(jnp.argmax(res.energies))
    err = float(jnp.linalg.norm(res.path[top] - jnp.array([0.0, A])))
    assert err < 1e-6, err
    assert abs(float(res.barrier) - 1.0) < 1e-9
    # the band left the straight line, whose top is 1 + K A² = 4.2
    line = interpolate(double_well, a, b, points=11)
    assert float(line.losses.max()) == pytest.approx(1 + K * A**2)
    assert res.path.shape == (11, 2) and res.energies.shape == (11,)
    np.testing.assert_array_equal(res.path[0], a)
    np.testing.assert_array_equal(res.path[-1], b)
    assert float(res.max_force) < 1e-3


def test_neb_muller_brown_saddle_and_barrier():
    saddle = _newton(_mb_flat, [-0.822, 0.624])  # the A-C saddle (Müller & Brown)
    ma, mb = _newton(_mb_flat, [-0.558, 1.442]), _newton(_mb_flat, [0.623, 0.028])
    res = neb(muller_brown, _mb_point(ma), _mb_point(mb), images=12, steps=2000)
    top = int(jnp.argmax(res.energies))
    got = jnp.array([res.path["x"][top], res.path["y"][top]])
    assert float(jnp.linalg.norm(got - saddle)) < 1e-6
    expected = _mb_flat(saddle) - max(_mb_flat(ma), _mb_flat(mb))  # 67.50188 (from B)
    assert float(res.barrier) == pytest.approx(float(expected), rel=1e-9)
    # the band passes the intermediate minimum C: some image is near it
    mc = _newton(_mb_flat, [-0.050, 0.467])
    pts = jnp.stack([res.path["x"], res.path["y"]], axis=1)
    assert float(jnp.min(jnp.linalg.norm(pts - mc, axis=1))) < 0.2


def test_neb_without_climbing_underestimates_the_barrier():
    a, b = jnp.array([-1.0, 0.0]), jnp.array([1.0, 0.0])
    plain = neb(double_well, a, b, images=4, steps=1500, climbing=False)
    climb = neb(double_well, a, b, images=4, steps=1500)
    # with 4 equally spaced images none sits on the saddle
    assert float(plain.barrier) < 0.99
    assert float(climb.barrier) == pytest.approx(1.0, abs=1e-8)


def test_neb_any_optax_optimizer():
    a, b = jnp.array([-1.0, 0.0]), jnp.array([1.0, 0.0])
    opt = optax.chain(optax.clip_by_global_norm(1.0), optax.sgd(0.01, momentum=0.5))
    res = neb(double_well, a, b, images=7, steps=3000, optimizer=opt)
    top = int(jnp.argmax(res.energies))
    assert float(jnp.linalg.norm(res.path[top] - jnp.array([0.0, A]))) < 1e-6


def test_neb_hooks_align_and_project():
    a, b = jnp.array([-1.0, 0.0]), jnp.array([3.0, 7.0])
    calls = []

    def align(x, y):
        calls.append(1)
        return jnp.array([1.0, 0.0])  # "aligned" b

    on_axis = lambda p: p.at[1].set(0.0)  # a constraint manifold: the x-axis
    res = neb(double_well, a, b, images=5, steps=800, align=align, project=on_axis)
    assert calls == [1]
    np.testing.assert_array_equal(res.path[-1], jnp.array([1.0, 0.0]))
    np.testing.assert_array_equal(res.path[:, 1], 0.0)
    # constrained to y = 0 the saddle is (0, 0) with V = 1 + K A²
    assert float(res.barrier) == pytest.approx(1 + K * A**2, rel=1e-9)


def test_neb_on_an_nnx_state_and_in_jit():
    model = qo.models.SawtoothNet(width=3, depth=2, rngs=nnx.Rngs(0), param_dtype=jnp.float64)
    apply, p0 = qo.models.functional(model)
    p1 = jax.tree.map(lambda x: x + 0.3, p0)
    x = jnp.linspace(0, 1, 9)[:, None]
    loss = lambda p: jnp.mean((apply(p, x) - jnp.sin(3 * x)) ** 2)
    res = jax.jit(lambda u, v: neb(loss, u, v, images=3, steps=20))(p0, p1)
    leaf = jax.tree.leaves(res.path)[0]
    assert leaf.shape[0] == 5
    assert float(res.energies[0]) == pytest.approx(float(loss(p0)))
    assert float(res.energies[-1]) == pytest.approx(float(loss(p1)))
    assert float(res.barrier) == pytest.approx(
        float(res.energies.max() - jnp.maximum(res.energies[0], res.energies[-1]))
    )


def test_landscape_errors_name_the_leaf():
    a = {"w": jnp.zeros((2, 3)), "b": jnp.zeros(3)}
    f = lambda p: jnp.sum(p["w"] ** 2) + jnp.sum(p["b"] ** 2)
    with pytest.raises(ValueError, match="'b' has shape \\(4,\\)"):
        neb(f, a, {"w": jnp.zeros((2, 3)), "b": jnp.zeros(4)})
    with pytest.raises(ValueError, match="no leaf at path 'c'"):
        interpolate(f, a, {**a, "c": jnp.zeros(1)})
    with pytest.raises(ValueError, match="no leaf at path 'b'"):
        interpolate(f, a, {"w": a["w"]})
    with pytest.raises(ValueError, match="scalar"):
        neb(lambda p: p["w"], a, a)
    with pytest.raises(ValueError, match="images"):
        neb(f, a, a, images=0)
    with pytest.raises(ValueError, match="'w' has dtype int32"):
        interpolate(f, {"w": jnp.zeros((2, 3), jnp.int32), "b": a["b"]}, a)
    with pytest.raises(ValueError, match="leaf 'b' has 3"):
        trajectory_pca({"w": jnp.zeros((5, 2)), "b": jnp.zeros((3,))})
    with pytest.raises(ValueError, match="method"):
        hessian_spectrum(f, a, method="qr")
    with pytest.raises(ValueError, match="needs k"):
        hessian_spectrum(f, a, method="lanczos")
    with pytest.raises(ValueError, match="'b'"):
        hessian_spectrum(f, a, project_out=lambda p: {"w": jnp.zeros((1, 2, 3))})


# --------------------------------------------------------------------------- Hessian


@pytest.fixture(scope="module")
def sawtooth():
    """Float64 sawtooth net: (loss, params at the exact fit, params at init, model)."""
    task = qo.models.sawtooth_task(dtype=jnp.float64)
    model = qo.models.SawtoothNet(rngs=nnx.Rngs(0), param_dtype=jnp.float64)
    apply, init = qo.models.functional(model)
    exact = qo.models.with_dense_weights(model, task.weights)

    def loss(p):
        return jnp.mean((apply(p, task.x) - task.y) ** 2)

    assert float(loss(exact)) < 1e-30
    return loss, exact, init


def _rescaling_tangents(params, width=5, depth=5):
    """The 25 orbit tangents (one per hidden unit) of the sawtooth net, by hand.

    Unit ``j`` of hidden layer ``l`` (Linear ``2l``): incoming column and bias
    ``× 1``, outgoing row of Linear ``2l + 2`` ``× -1``.
    """
    out = []
    for layer in range(depth):
        for j in range(width):

            def t(path, x, layer=layer, j=j):
                z = jnp.zeros_like(x)
                if path == ("layers", 2 * layer, "kernel"):
                    return z.at[:, j].set(x[:, j])
                if path == ("layers", 2 * layer, "bias"):
                    return z.at[j].set(x[j])
                if path == ("layers", 2 * layer + 2, "kernel"):
                    return z.at[j, :].set(-x[j, :])
                return z

            out.append(map_with_path(t, params))
    return jax.tree.map(lambda *xs: jnp.stack(xs), *out)


def _zero_count(ev, rel=1e-12):
    return int(np.sum(np.abs(np.asarray(ev)) <= rel * float(jnp.max(jnp.abs(ev)))))


def test_dense_and_lanczos_extremes_agree(sawtooth):
    loss, exact, init = sawtooth
    for p in (exact, init):
        dense = hessian_spectrum(loss, p, method="dense").eigenvalues
        assert dense.shape == (136,) and bool(jnp.all(jnp.diff(dense) >= 0))
        top = hessian_spectrum(loss, p, k=5, method="lanczos", num_matvecs=40).eigenvalues
        rel = float(jnp.max(jnp.abs(top - dense[-5:]) / jnp.abs(dense[-5:])))
        assert rel <= 1e-6, rel  # measured ~3e-15
    # jittable: the same numbers from inside jit
    jitted = jax.jit(
        lambda p: hessian_spectrum(loss, p, k=5, method="lanczos", num_matvecs=40).eigenvalues
    )(init)
    np.testing.assert_allclose(jitted, top, rtol=1e-12)
    # both ends at init (distinct eigenvalues; at the fit the zero eigenspace is
    # multiple, which a Krylov method does not resolve)
    dense = hessian_spectrum(loss, init, method="dense").eigenvalues
    both = hessian_spectrum(loss, init, k=3, which="both", method="lanczos", num_matvecs=40)
    both = both.eigenvalues
    ref = jnp.concatenate([dense[:3], dense[-3:]])
    assert float(jnp.max(jnp.abs(both - ref)) / jnp.abs(dense).max()) <= 1e-6


def test_zero_modes_at_the_exact_sawtooth_fit(sawtooth):
    loss, exact, _ = sawtooth
    ev = hessian_spectrum(loss, exact, method="dense").eigenvalues
    zeros = _zero_count(ev)
    assert zeros >= 25, zeros  # measured 93: the 25 rescalings and more
    # a clear gap: |λ| <= 3e-16 λmax, then 5e-11 λmax
    assert _zero_count(ev, 1e-14) == _zero_count(ev, 1e-11) == zeros
    assert float(ev.min()) > -1e-12 * float(ev.max())  # PSD at a zero-loss fit

    # the orbit's tangents are null directions: projecting them out removes 25 zeros
    tangents = _rescaling_tangents(exact)
    rest = hessian_spectrum(loss, exact, method="dense", project_out=lambda p: tangents)
    assert rest.eigenvalues.shape == (136 - 25,)
    assert _zero_count(rest.eigenvalues) == zeros - 25
    np.testing.assert_allclose(rest.eigenvalues[-10:], ev[-10:], rtol=1e-9)

    # softplus is not homogeneous: smoothing removes the orbit's zero modes
    smooth = hessian_spectrum(loss, exact, method="dense", smooth_relu=100.0).eigenvalues
    assert _zero_count(smooth) < 25  # measured 3 at β = 100
    np.testing.assert_allclose(smooth[-1], ev[-1], rtol=0.1)  # 80.05 vs 83.56


def test_project_out_forms_agree(sawtooth):
    loss, _, init = sawtooth
    tangents = _rescaling_tangents(init)
    flat = qo.landscape._common.flatten_stacked(tangents)
    q, _ = jnp.linalg.qr(flat.T)
    unravel = jax.flatten_util.ravel_pytree(init)[1]
    flat_of = lambda v: jax.flatten_util.ravel_pytree(v)[0]

    def projector(p):
        return lambda v: unravel(flat_of(v) - q @ (q.T @ flat_of(v)))

    as_tree = hessian_spectrum(loss, init, project_out=lambda p: tangents).eigenvalues
    as_array = hessian_spectrum(loss, init, project_out=lambda p: flat).eigenvalues
    as_proj = hessian_spectrum(loss, init, project_out=projector).eigenvalues
    # dependent directions are dropped: the tangents twice give the same result
    doubled = jnp.concatenate([flat, 2 * flat])
    as_doubled = hessian_spectrum(loss, init, project_out=lambda p: doubled).eigenvalues
    assert as_tree.shape == (111,)
    for other in (as_array, as_proj, as_doubled):
        np.testing.assert_allclose(other, as_tree, atol=1e-10 * float(as_tree[-1]))
    for form in (lambda p: tangents, projector):
        top = hessian_spectrum(loss, init, k=4, method="lanczos", project_out=form, num_matvecs=40)
        np.testing.assert_allclose(top.eigenvalues, as_tree[-4:], rtol=1e-8)


def test_slq_density(sawtooth):
    loss, _, init = sawtooth
    dense = np.asarray(hessian_spectrum(loss, init, method="dense").eigenvalues)
    probes = 64
    s = hessian_spectrum(loss, init, method="slq", num_probes=probes, num_matvecs=40)
    assert float(jnp.trapezoid(s.density, s.grid)) == pytest.approx(1.0, abs=1e-3)
    assert float(s.weights.sum()) == pytest.approx(1.0, abs=1e-12)
    assert bool(jnp.all(jnp.diff(s.eigenvalues) >= 0))
    # the nodes are Ritz values: inside the spectrum, and its ends are found
    assert float(s.eigenvalues[0]) >= dense[0] - 1e-9 * abs(dense).max()
    assert float(s.eigenvalues[-1]) == pytest.approx(dense[-1], rel=1e-8)
    # mean of the density = average Rayleigh quotient of uniform directions:
    # mean tr(H)/n, variance 2 (tr(H²)/n - (tr(H)/n)²) / (n + 2) per probe
    n = dense.size
    sd = math.sqrt(2 * (np.mean(dense**2) - np.mean(dense) ** 2) / (n + 2) / probes)
    mean = float(jnp.sum(s.weights * s.eigenvalues))
    assert abs(mean - dense.mean()) < 4 * sd, (mean, dense.mean(), sd)
    # the density's own mean (of the grid) agrees with the quadrature's
    grid_mean = float(jnp.trapezoid(s.grid * s.density, s.grid))
    assert grid_mean == pytest.approx(mean, rel=1e-3)


def test_with_smooth_relu_matches_a_softplus_model():
    key = jax.random.key(0)
    ws = [jax.random.normal(k, (4, 4), jnp.float64) for k in jax.random.split(key, 3)]
    x = jax.random.normal(jax.random.key(1), (8, 4), jnp.float64)

    def mlp(act):
        def loss(w):
            h = x
            for wi in w:
                h = act(h @ wi)
            return jnp.sum(h**2)

        return loss

    beta = 7.0
    rewritten = with_smooth_relu(mlp(jax.nn.relu), beta)
    direct = mlp(smooth_relu(beta))
    assert float(rewritten(ws)) == pytest.approx(float(direct(ws)), rel=1e-13)
    assert float(rewritten(ws)) != pytest.approx(float(mlp(jax.nn.relu)(ws)), rel=1e-3)
    h1 = jax.jit(jax.hessian(rewritten))(ws)
    h2 = jax.jit(jax.hessian(direct))(ws)
    for a, b in zip(jax.tree.leaves(h1), jax.tree.leaves(h2)):
        np.testing.assert_allclose(a, b, rtol=1e-10, atol=1e-12)


@pytest.mark.parametrize(
    "wrap",
    [
        lambda f: f,
        lambda f: jax.jit(f),
        lambda f: jax.checkpoint(f),
        lambda f: jax.vmap(f),
        lambda f: lambda x: jax.lax.scan(lambda c, xi: (c, f(xi)), 0.0, x)[1],
        lambda f: lambda x: jax.lax.cond(True, f, lambda y: y, x),
        lambda f: lambda x: jax.lax.fori_loop(0, 1, lambda i, y: f(y), x),
    ],
    ids=["plain", "jit", "checkpoint", "vmap", "scan", "cond", "while"],
)
@pytest.mark.parametrize(
    "relu",
    [
        jax.nn.relu,
        nnx.relu,
        lambda x: jnp.maximum(0.0, x),
        lambda x: jnp.maximum(x, jnp.zeros_like(x)),
    ],
    ids=["jax.nn.relu", "nnx.relu", "max(0,x)", "max(x,zeros)"],
)
def test_with_smooth_relu_reaches_every_relu(wrap, relu):
    x = jnp.linspace(-1.0, 1.0, 6).reshape(2, 3)
    got = with_smooth_relu(lambda v: jnp.sum(wrap(relu)(v)), 5.0)
    assert float(got(x)) == pytest.approx(float(jnp.sum(smooth_relu(5.0)(x))), rel=1e-6)
    g = jax.grad(got)(x)
    np.testing.assert_allclose(g, jax.nn.sigmoid(5.0 * x), rtol=1e-6)


def test_smooth_relu_leaves_other_max_alone():
    f = lambda x: jnp.sum(jnp.maximum(x, 0.5) + jnp.maximum(x[0], x[1]))
    x = jnp.array([[0.2, 0.9], [0.7, -0.3]])
    assert float(with_smooth_relu(f, 3.0)(x)) == pytest.approx(float(f(x)))
    with pytest.raises(ValueError, match="beta"):
        smooth_relu(0.0)


# --------------------------------------------------------------------------- PCA


def test_random_walk_pca_matches_the_known_limit():
    limit = 6 / math.pi**2
    exact = random_walk_pca(200, None, dtype=jnp.float64)
    assert float(exact.explained_variance_ratio[0]) == pytest.approx(limit, abs=1e-3)
    ratios = np.asarray(exact.explained_variance_ratio[:4])
    np.testing.assert_allclose(ratios, limit / np.arange(1, 5) ** 2, rtol=2e-2)
    # a sampled walk, through trajectory_pca on a pytree, and the sampled baseline
    t, d = 100, 2000
    steps = jax.random.normal(jax.random.key(0), (t, d), jnp.float64)
    walk = jnp.cumsum(steps, axis=0)
    history = {"a": walk[:, :1000].reshape(t, 10, 100), "b": walk[:, 1000:]}
    got = trajectory_pca(history, k=3)
    base = random_walk_pca(t, d, jax.random.key(1), k=3, dtype=jnp.float64)
    assert float(got.explained_variance_ratio[0]) == pytest.approx(limit, abs=0.03)
    assert float(base.explained_variance_ratio[0]) == pytest.approx(limit, abs=0.03)
    assert got.projections.shape == (t, 3)
    assert jax.tree.map(jnp.shape, got.components) == {"a": (3, 10, 100), "b": (3, 1000)}
    # the projections of a random walk are near-cosines: corr(|·|) > 0.9
    cos = np.cos(np.pi * (np.arange(t) + 0.5) / t)
    assert abs(np.corrcoef(np.asarray(got.projections[:, 0]), cos)[0, 1]) > 0.9


def test_trajectory_pca_of_a_line_and_of_a_plane_curve():
    t = jnp.linspace(0.0, 1.0, 30)
    d = jnp.array([3.0, -1.0, 2.0, 0.5])
    start = jnp.array([1.0, 2.0, 3.0, 4.0])
    line = {"w": start + t[:, None] * d}
    res = trajectory_pca(line)
    assert float(res.explained_variance_ratio[0]) == pytest.approx(1.0, abs=1e-6)
    np.testing.assert_allclose(
        abs(float(res.components["w"][0] @ d)), float(jnp.linalg.norm(d)), rtol=1e-6
    )
    # sign fixed: the projection moves forward, and linearly
    p = np.asarray(res.projections[:, 0])
    assert p[-1] > p[0]
    np.testing.assert_allclose(np.diff(p), np.diff(p)[0], rtol=1e-4)
    # a circle in a plane: two equal components, nothing else
    ang = jnp.linspace(0, 2 * jnp.pi, 64, endpoint=False)
    circle = {"w": jnp.stack([jnp.cos(ang), jnp.sin(ang), 0 * ang], axis=1)}
    r = trajectory_pca(circle, k=3).explained_variance_ratio
    np.testing.assert_allclose(r, [0.5, 0.5, 0.0], atol=1e-6)
    comps = trajectory_pca(circle, k=2).components["w"]
    np.testing.assert_allclose(comps @ comps.T, jnp.eye(2), atol=1e-6)


# --------------------------------------------------------------------------- interpolate


def test_interpolate_quadratic():
    a = {"w": jnp.array([1.0, 0.0]), "b": jnp.array(2.0)}
    b = {"w": jnp.array([-1.0, 2.0]), "b": jnp.array(0.0)}
    f = lambda p: jnp.sum(p["w"] ** 2) + p["b"] ** 2
    res = interpolate(f, a, b, points=5, span=(-0.5, 1.5))
    np.testing.assert_allclose(res.alphas, [-0.5, 0.0, 0.5, 1.0, 1.5])
    # along the line: w = (1 - 2α, 2α), b = 2 - 2α
    al = np.asarray(res.alphas)
    expected = (1 - 2 * al) ** 2 + (2 * al) ** 2 + (2 - 2 * al) ** 2
    np.testing.assert_allclose(res.losses, expected, rtol=1e-6)
    jitted = jax.jit(lambda u, v: interpolate(f, u, v, points=5).losses)(a, b)
    assert jitted.shape == (5,)
