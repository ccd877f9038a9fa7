"""Tests of the framework adapters: train-mode nnx models, the adapter registry, and
flax / equinox as optional dependencies (each blocked in a subprocess)."""

from __future__ import annotations

import dataclasses
import os
import subprocess
import sys
import textwrap

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import zoo
from flax import nnx

import quotient_opt as qo
from quotient_opt.symmetry import _adapters

F32, F64 = jnp.float32, jnp.float64
# flax keeps BatchNorm's running statistics in float32, and warns when float64 meets them
pytestmark = pytest.mark.filterwarnings("ignore:scatter inputs have incompatible types")
ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _leaves(tree):
    """The leaves as numpy arrays (the bits of PRNG keys)."""
    key = lambda v: jax.dtypes.issubdtype(v.dtype, jax.dtypes.prng_key)
    return [np.asarray(jax.random.key_data(v) if key(v) else v) for v in jax.tree.leaves(tree)]


# --------------------------------------------------------------------------- train mode


@pytest.mark.parametrize("name", zoo.TRAIN_NAMES)
def test_train_mode_inference_is_exact(name):
    """Inference on a train-mode model (Dropout, BatchNorm, nnx.RNN) does not crash, finds
    what it should, and every group passes the check at random params and inputs."""
    m = zoo.build(name, F64)
    got = [(g.windows, g.pieces, g.permutable, g.rescalable) for g in m.sym.groups]
    assert got == zoo.TRAIN_EXPECT[name], str(m.sym)
    for seed in range(2):
        m.sym.check(m.apply, m.params(seed), m.inputs(seed), log_scale=3.0, seed=seed)


@pytest.mark.parametrize("dtype", [F64])  # float32 adds a build of 15 s for no new path
def test_dropout_rescalings_are_exact_for_every_mask(dtype):
    """The rescalings kept under Dropout hold whatever the mask: checked at six RNG
    states (six pairs of masks), with the symmetry inferred at the first; the
    permutations, which a mask breaks, are refused by the same check."""
    sym = zoo.build("nnx_dropout_train", dtype).sym
    model = zoo.DropoutMLP(dtype, zoo.rbg_rngs(0))
    apply, params, _ = qo.models.functional(model, state=True)
    x = jnp.asarray(np.random.default_rng(0).uniform(-1.5, 1.5, (8, 3)), dtype)
    fn = lambda p, rest_x: apply(p, *rest_x)[0]  # one program for every mask
    outputs = []
    for seed in range(6):
        rest = nnx.split(zoo.DropoutMLP(dtype, zoo.rbg_rngs(seed)), nnx.Param, ...)[2]
        outputs.append(np.asarray(fn(params, (rest, x))))
        sym.check(fn, params, (rest, x), log_scale=3.0, seed=seed)
    assert len({o.tobytes() for o in outputs}) == 6  # the masks differ
    wrong = qo.Symmetry(groups=tuple(dataclasses.replace(g, permutable=True)
                                     for g in sym.groups), shapes=sym.shapes)
    with pytest.raises(ValueError, match="permutation"):
        wrong.check(fn, params, (rest, x))


def _check_pure(model: nnx.Module, x: jax.Array) -> None:
    before = _leaves(nnx.state(model))
    apply, params = qo.models.functional(model)
    y = np.asarray(apply(params, x))
    y_jit, grads = jax.jit(lambda p: (
        apply(p, x), jax.grad(lambda q: jnp.sum(apply(q, x) ** 2))(p)))(params)
    np.testing.assert_allclose(np.asarray(y_jit), y, rtol=1e-5, atol=1e-6)
    np.testing.assert_array_equal(np.asarray(apply(params, x)), y)
    assert all(np.all(np.isfinite(v)) for v in _leaves(grads))
    assert any(np.any(v != 0) for v in _leaves(grads))
    for a, b in zip(_leaves(nnx.state(model)), before):
        np.testing.assert_array_equal(a, b)
    # the model's own (stateful) first call computes the same thing
    np.testing.assert_allclose(np.asarray(model(x)), y, rtol=1e-6)


def test_functional_in_train_mode_is_pure_and_jits():
    """``functional(model)``: the same output eagerly and under jit, at every call (the
    non-Param state is held fixed), the model's own first call, and the model untouched;
    a gradient flows (what ``qo.fit`` takes)."""
    rng = np.random.default_rng(0)
    for model, shape in [(zoo.DropoutMLP(F32, zoo.rbg_rngs(3)), (4, 3)),
                         (zoo.BatchNormCNN(F32, zoo.rbg_rngs(3)), (4, 8, 8, 1)),
                         (zoo.RNNNet(F32, zoo.rbg_rngs(3)), (2, 5, 3))]:
        _check_pure(model, jnp.asarray(rng.normal(size=shape), F32))


def test_functional_with_state_follows_the_model():
    """``functional(model, state=True)`` threads the non-Param state as nnx.split/merge
    does: three jitted steps give the outputs, batch statistics and RNG counts of three
    eager calls of the model itself (a fresh dropout mask each step)."""

    class Net(nnx.Module):
        def __init__(self, rngs):
            self.fc = nnx.Linear(3, 6, rngs=rngs)
            self.bn = nnx.BatchNorm(6, rngs=rngs)
            self.drop = nnx.Dropout(0.5, rngs=rngs)
            self.head = nnx.Linear(6, 2, rngs=rngs)

        def __call__(self, x):
            return self.head(self.drop(nnx.relu(self.bn(self.fc(x)))))

    model = Net(nnx.Rngs(0))
    reference = nnx.clone(model)
    apply, params, state = qo.models.functional(model, state=True)
    step = jax.jit(apply)
    xs = jnp.asarray(np.random.default_rng(0).normal(size=(3, 16, 3)), F32)
    outs = []
    for x in xs:
        y, state = step(params, state, x)
        want = reference(x)
        np.testing.assert_allclose(np.asarray(y), np.asarray(want), rtol=1e-5, atol=1e-6)
        outs.append(np.asarray(y))
    assert not np.allclose(outs[0], outs[1])  # new masks and statistics
    for a, b in zip(_leaves(state), _leaves(nnx.state(reference, nnx.Not(nnx.Param)))):
        np.testing.assert_allclose(a, b, rtol=1e-6)
    assert int(state["drop"]["rngs"]["count"][...]) == 3
    # the model itself was not touched; nnx.update writes the state back
    assert int(model.drop.rngs.count[...]) == 0
    nnx.update(model, params, state)
    np.testing.assert_allclose(np.asarray(model.bn.mean[...]), np.asarray(reference.bn.mean[...]),
                               rtol=1e-5)


# --------------------------------------------------------------------------- the registry


class Toy:
    """A model of no framework: two ReLU layers kept as a dict of numpy arrays."""

    def __init__(self, seed: int):
        rng = np.random.default_rng(seed)
        self.weights = {"w1": rng.normal(size=(3, 4)), "w2": rng.normal(size=(4, 2))}

    @staticmethod
    def forward(w, x):
        return jax.nn.relu(x @ w["w1"]) @ w["w2"]


@pytest.fixture
def registry(monkeypatch):
    monkeypatch.setattr(_adapters, "_ADAPTERS", list(_adapters._ADAPTERS))


def test_register_adapter_teaches_a_new_model_type(registry):
    toy = Toy(0)
    with pytest.raises(ValueError, match="unsupported model type Toy.*register_adapter"):
        qo.infer_symmetry(toy, jnp.ones((2, 3)))
    qo.symmetry.register_adapter(lambda m: isinstance(m, Toy),
                                 lambda m: (Toy.forward, m.weights, jnp.ones((2, 3))))
    sym = qo.infer_symmetry(toy)  # the adapter's example input
    assert [(g.windows, g.permutable, g.rescalable) for g in sym.groups] == [(4, True, True)]
    w = {k: jnp.asarray(v) for k, v in toy.weights.items()}
    g = sym.sample(jax.random.key(0), log_scale=1.0, dtype=F64)
    x = jnp.asarray(np.random.default_rng(1).normal(size=(5, 3)))
    np.testing.assert_allclose(Toy.forward(sym.act(w, g), x), Toy.forward(w, x), rtol=1e-12)
    assert not np.allclose(sym.act(w, g)["w1"], w["w1"])
    with pytest.raises(ValueError, match="params: not used with a Toy"):
        qo.infer_symmetry(toy, params=toy.weights)


def test_later_adapters_take_precedence(registry):
    """A user adapter registered later wins, over an earlier one and over the built-ins."""
    is_toy = lambda m: isinstance(m, Toy)
    qo.register_adapter(is_toy, lambda m: (Toy.forward, m.weights))
    # a later one exposes only w1 to the symmetry (w2 becomes a constant): nothing moves
    qo.register_adapter(is_toy, lambda m: (lambda w1, x: Toy.forward({**m.weights, "w1": w1}, x),
                                           m.weights["w1"]))
    sym = qo.infer_symmetry(Toy(0), jnp.ones((2, 3)))
    assert sym.shapes == (((), (3, 4)),) and sym.groups == (), str(sym)
    # a user adapter for one nnx class is tried before the built-in nnx adapter
    calls = []

    def counting(model):
        calls.append(type(model).__name__)
        return _adapters._nnx_adapter(model)

    qo.register_adapter(lambda m: isinstance(m, zoo.MLP), counting)
    mlp = nnx.eval_shape(lambda: zoo.MLP(F32, nnx.Rngs(0)))
    assert len(qo.infer_symmetry(mlp, jnp.ones((2, 3), F32), check=False).groups) == 2
    assert calls == ["MLP"]
    saw = nnx.eval_shape(lambda: qo.models.SawtoothNet(rngs=nnx.Rngs(0)))
    assert len(qo.infer_symmetry(saw, check=False).groups) == 5
    assert calls == ["MLP"]
    qo.register_adapter(is_toy, lambda m: "nonsense")
    with pytest.raises(ValueError, match="must return \\(apply_fn, params"):
        qo.infer_symmetry(Toy(0), jnp.ones((2, 3)))


def test_register_adapter_errors(registry):
    with pytest.raises(ValueError, match="predicate: must be callable"):
        qo.register_adapter("Toy", lambda m: None)
    with pytest.raises(ValueError, match="adapter: must be callable"):
        qo.register_adapter(lambda m: True, None)


# --------------------------------------------------------------------------- optional frameworks

_BLOCKER = """
import importlib.abc, sys

class Blocker(importlib.abc.MetaPathFinder):
    def find_spec(self, name, path=None, target=None):
        if name.split(".")[0] == {blocked!r}:
            raise ModuleNotFoundError(f"No module named {{name!r}}", name=name)
        return None

sys.meta_path.insert(0, Blocker())
"""

_COMMON = """
import jax, jax.numpy as jnp, numpy as np, optax
import quotient_opt as qo
assert {blocked!r} not in sys.modules

def train(tx, params, loss):
    _, _, losses = qo.fit(tx, params, loss, 4)
    assert bool(jnp.all(jnp.isfinite(losses))) and losses[-1] < losses[0], losses
"""

# equinox with flax blocked: quotient_adam (Adam, projection and rebalancing) on an eqx MLP
_EQX = """
import equinox as eqx
model = eqx.nn.MLP(3, 1, 8, 2, key=jax.random.key(0))
sym = qo.infer_symmetry(model)
params, static = eqx.partition(model, eqx.is_array)
x = jax.random.normal(jax.random.key(1), (32, 3))
loss = lambda p: jnp.mean((jax.vmap(eqx.combine(p, static))(x) - jnp.sin(x[:, :1])) ** 2)
train(qo.quotient_adam(1e-2, sym), params, loss)
task = qo.models.maxpool_task()  # the tasks need no flax
try:
    qo.models.MaxPoolNet
except ImportError as e:
    assert "pip install 'quotient_opt[flax]'" in str(e), e
else:
    raise AssertionError("MaxPoolNet without flax")
assert "flax" not in sys.modules
print("groups", len(sym.groups))
"""

# flax.nnx with equinox blocked: rebalance(adam) and qo.fit on an example model
_NNX = """
from flax import nnx
model = qo.models.SawtoothNet(3, 2, rngs=nnx.Rngs(0))
sym = qo.infer_symmetry(model)
apply, params = qo.models.functional(model)
x = jnp.linspace(0, 1, 32)[:, None]
loss = lambda p: jnp.mean((apply(p, x) - jnp.abs(x - 0.5)) ** 2)
train(qo.rebalance(optax.adam(1e-2), sym), params, loss)
assert "equinox" not in sys.modules
print("groups", len(sym.groups))
"""


@pytest.mark.slow
@pytest.mark.parametrize("blocked, script, groups", [("flax", _EQX, 2), ("equinox", _NNX, 2)])
def test_runs_without_the_other_framework(blocked, script, groups):
    """With flax (or equinox) made unimportable, quotient_opt imports and an equinox
    (or nnx) model goes through inference and a few training steps of quotient_adam
    (or rebalance) by ``qo.fit``; XLA's backend optimizations are off (compiling dominates)."""
    code = textwrap.dedent(_BLOCKER + _COMMON + script).format(blocked=blocked)
    env = dict(os.environ, PYTHONPATH=ROOT, JAX_PLATFORMS="cpu",
               XLA_FLAGS="--xla_backend_optimization_level=0")
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                          timeout=300, env=env, cwd=ROOT, check=False)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert proc.stdout.split() == ["groups", str(groups)], proc.stdout
