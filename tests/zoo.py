"""A zoo of models, one per kind of network the library must understand.

Every property and transformation test runs over the whole zoo, so a new
model kind added here gets every check. Models are built abstractly
(``eval_shape``: no initializer runs) and filled with numpy noise, and each
entry records what inference must find (``expect``), so the inference itself
is tested on every model too.
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
from flax import nnx

import quotient_opt as qo
from quotient_opt import models
from quotient_opt.nn import MaxOverPieces


@dataclasses.dataclass(frozen=True, eq=False)  # hashed by identity (one per name and dtype)
class Model:
    """A zoo model: its inferred symmetry, a batched ``apply(params, x)``, abstract params."""

    name: str
    sym: qo.Symmetry
    apply: Callable[[Any, jax.Array], jax.Array]
    abstract: Any
    x_shape: tuple[int, ...]  # one batch of inputs
    dtype: Any
    vocab: int = 0  # > 0: the inputs are token ids below it

    def params(self, seed: int, scale: float = 0.8) -> Any:
        """Parameters filled with N(0, scale^2 / fan_in)-ish noise (biases too)."""
        rng = np.random.default_rng(seed)

        def fill(s: jax.ShapeDtypeStruct) -> jax.Array:
            fan_in = max(int(np.prod(s.shape)) // max(s.shape), 1) if len(s.shape) > 1 else 1
            std = scale * (np.sqrt(2.0 / fan_in) if len(s.shape) > 1 else 0.5)
            return jnp.asarray(rng.normal(0.0, std, s.shape), s.dtype)

        return jax.tree.map(fill, self.abstract)

    def inputs(self, seed: int) -> jax.Array:
        rng = np.random.default_rng(seed + 7919)
        if self.vocab:
            return jnp.asarray(rng.integers(0, self.vocab, self.x_shape), jnp.int32)
        return jnp.asarray(rng.uniform(-1.5, 1.5, self.x_shape), self.dtype)


# --------------------------------------------------------------------------- model classes


class MLP(nnx.Module):
    """A custom nnx Module (fields fc1/fc2/fc3, not a Sequential)."""

    def __init__(self, dtype: Any, rngs: nnx.Rngs):
        self.fc1 = nnx.Linear(3, 6, param_dtype=dtype, rngs=rngs)
        self.fc2 = nnx.Linear(6, 5, param_dtype=dtype, rngs=rngs)
        self.fc3 = nnx.Linear(5, 2, param_dtype=dtype, rngs=rngs)

    def __call__(self, x):
        return self.fc3(nnx.relu(self.fc2(nnx.relu(self.fc1(x)))))


class CNN(nnx.Module):
    """Conv-ReLU-max_pool twice, flatten, Linear (channels last)."""

    def __init__(self, dtype: Any, rngs: nnx.Rngs):
        self.conv1 = nnx.Conv(1, 4, (3, 3), param_dtype=dtype, rngs=rngs)
        self.conv2 = nnx.Conv(4, 5, (3, 3), param_dtype=dtype, rngs=rngs)
        self.head = nnx.Linear(2 * 2 * 5, 3, param_dtype=dtype, rngs=rngs)

    def __call__(self, x):
        h = nnx.max_pool(nnx.relu(self.conv1(x)), (2, 2), (2, 2))
        h = nnx.max_pool(nnx.relu(self.conv2(h)), (2, 2), (2, 2))
        return self.head(h.reshape(h.shape[0], -1))


class ResMLP(nnx.Module):
    """A residual MLP: two blocks writing into one stream."""

    def __init__(self, dtype: Any, rngs: nnx.Rngs):
        lin = functools.partial(nnx.Linear, param_dtype=dtype, rngs=rngs)
        self.embed = lin(3, 4)
        self.up1, self.down1 = lin(4, 6), lin(6, 4)
        self.up2, self.down2 = lin(4, 5), lin(5, 4)
        self.head = lin(4, 2)

    def __call__(self, x):
        h = self.embed(x)
        h = h + self.down1(nnx.relu(self.up1(h)))
        h = h + self.down2(nnx.relu(self.up2(h)))
        return self.head(nnx.relu(h))


class NormMLP(nnx.Module):
    """LayerNorm between two layers: permutations only."""

    def __init__(self, dtype: Any, rngs: nnx.Rngs):
        self.fc1 = nnx.Linear(3, 6, param_dtype=dtype, rngs=rngs)
        self.norm = nnx.LayerNorm(6, param_dtype=dtype, rngs=rngs)
        self.fc2 = nnx.Linear(6, 2, param_dtype=dtype, rngs=rngs)

    def __call__(self, x):
        return self.fc2(nnx.relu(self.norm(self.fc1(x))))


class DropoutMLP(nnx.Module):
    """A ReLU MLP with Dropout after each hidden layer (train mode: masks drawn)."""

    def __init__(self, dtype: Any, rngs: nnx.Rngs):
        self.fc1 = nnx.Linear(3, 6, param_dtype=dtype, rngs=rngs)
        self.fc2 = nnx.Linear(6, 5, param_dtype=dtype, rngs=rngs)
        self.fc3 = nnx.Linear(5, 2, param_dtype=dtype, rngs=rngs)
        self.drop = nnx.Dropout(0.3, rngs=rngs)

    def __call__(self, x):
        h = self.drop(nnx.relu(self.fc1(x)))
        return self.fc3(self.drop(nnx.relu(self.fc2(h))))


class BatchNormCNN(nnx.Module):
    """Conv-BatchNorm-ReLU-max_pool, flatten, a ReLU layer, Linear (train mode: batch stats)."""

    def __init__(self, dtype: Any, rngs: nnx.Rngs):
        self.conv = nnx.Conv(1, 4, (3, 3), param_dtype=dtype, rngs=rngs)
        self.bn = nnx.BatchNorm(4, param_dtype=dtype, rngs=rngs)
        self.fc = nnx.Linear(4 * 4 * 4, 5, param_dtype=dtype, rngs=rngs)
        self.head = nnx.Linear(5, 2, param_dtype=dtype, rngs=rngs)

    def __call__(self, x):
        h = nnx.max_pool(nnx.relu(self.bn(self.conv(x))), (2, 2), (2, 2))
        return self.head(nnx.relu(self.fc(h.reshape(h.shape[0], -1))))


class BNCNN(nnx.Module):
    """Two Conv-BatchNorm-ReLU stages, max_pool, flatten, Linear (train or eval mode)."""

    def __init__(self, dtype: Any, rngs: nnx.Rngs):
        self.conv1 = nnx.Conv(1, 4, (3, 3), param_dtype=dtype, rngs=rngs)
        self.bn1 = nnx.BatchNorm(4, param_dtype=dtype, rngs=rngs)
        self.conv2 = nnx.Conv(4, 6, (3, 3), param_dtype=dtype, rngs=rngs)
        self.bn2 = nnx.BatchNorm(6, param_dtype=dtype, rngs=rngs)
        self.head = nnx.Linear(4 * 4 * 6, 2, param_dtype=dtype, rngs=rngs)

    def __call__(self, x):
        h = nnx.relu(self.bn1(self.conv1(x)))
        h = nnx.max_pool(nnx.relu(self.bn2(self.conv2(h))), (2, 2), (2, 2))
        return self.head(h.reshape(h.shape[0], -1))


class BNResBlock(nnx.Module):
    """A stem conv, then a ResNet block (conv-BN-ReLU-conv-BN, added to the stream), ReLU."""

    def __init__(self, dtype: Any, rngs: nnx.Rngs):
        conv = functools.partial(nnx.Conv, kernel_size=(3, 3), param_dtype=dtype, rngs=rngs)
        self.stem = conv(1, 4)
        self.conv1, self.bn1 = conv(4, 5), nnx.BatchNorm(5, param_dtype=dtype, rngs=rngs)
        self.conv2, self.bn2 = conv(5, 4), nnx.BatchNorm(4, param_dtype=dtype, rngs=rngs)
        self.head = nnx.Linear(4, 2, param_dtype=dtype, rngs=rngs)

    def __call__(self, x):
        h = self.stem(x)
        r = self.bn2(self.conv2(nnx.relu(self.bn1(self.conv1(h)))))
        h = nnx.relu(h + r)
        return self.head(h.mean(axis=(1, 2)))


class EqxLNMLP(eqx.Module):
    """Linear-ReLU, Linear-LayerNorm-ReLU, Linear (one sample at a time)."""

    l1: eqx.nn.Linear
    l2: eqx.nn.Linear
    norm: eqx.nn.LayerNorm
    l3: eqx.nn.Linear

    def __init__(self, dtype: Any, key: jax.Array):
        k1, k2, k3 = jax.random.split(key, 3)
        self.l1 = eqx.nn.Linear(3, 6, key=k1, dtype=dtype)
        self.l2 = eqx.nn.Linear(6, 5, key=k2, dtype=dtype)
        self.norm = eqx.nn.LayerNorm(5, dtype=dtype)
        self.l3 = eqx.nn.Linear(5, 2, key=k3, dtype=dtype)

    def __call__(self, x):
        return self.l3(jax.nn.relu(self.norm(self.l2(jax.nn.relu(self.l1(x))))))


def rms_mlp_apply(p: dict, x: jax.Array) -> jax.Array:
    """A hand-written RMSNorm MLP: ``x W1 -> RMSNorm(g) -> tanh -> W2 -> RMSNorm -> ReLU -> W3``."""

    def rms(h, g):
        return h * jax.lax.rsqrt(jnp.mean(h * h, axis=-1, keepdims=True) + 1e-6) * g

    h = jnp.tanh(rms(x @ p["w1"], p["g1"]))
    h = jax.nn.relu(rms(h @ p["w2"] + p["b2"], p["g2"]))
    return h @ p["w3"]


class RNNNet(nnx.Module):
    """A ReLU layer, an ``nnx.RNN`` over time (a ``SimpleCell``), a head on the last step."""

    def __init__(self, dtype: Any, rngs: nnx.Rngs):
        self.embed = nnx.Linear(3, 4, param_dtype=dtype, rngs=rngs)
        self.rnn = nnx.RNN(nnx.SimpleCell(4, 5, dtype=dtype, param_dtype=dtype, rngs=rngs))
        self.head = nnx.Linear(5, 2, param_dtype=dtype, rngs=rngs)

    def __call__(self, x):
        return self.head(self.rnn(nnx.relu(self.embed(x)))[:, -1])


class EmbedMLP(nnx.Module):
    """Token and position embeddings (7 tokens, 5 positions, width 4) into a residual
    ReLU block (4 → 6 → 4) and a linear head: the embeddings write the residual stream."""

    def __init__(self, dtype: Any, rngs: nnx.Rngs):
        self.tok = nnx.Embed(7, 4, param_dtype=dtype, rngs=rngs)
        self.pos = nnx.Embed(5, 4, param_dtype=dtype, rngs=rngs)
        self.l1 = nnx.Linear(4, 6, param_dtype=dtype, rngs=rngs)
        self.l2 = nnx.Linear(6, 4, param_dtype=dtype, rngs=rngs)
        self.head = nnx.Linear(4, 2, param_dtype=dtype, rngs=rngs)

    def __call__(self, ids):
        h = self.tok(ids) + self.pos(jnp.arange(ids.shape[-1]))
        h = h + self.l2(nnx.relu(self.l1(h)))
        return self.head(h)


class EqxEmbed(eqx.Module):
    """``eqx.nn.Embedding`` (7 tokens, width 4) per token into a ReLU MLP 4 → 6 → 2."""

    emb: eqx.nn.Embedding
    l1: eqx.nn.Linear
    l2: eqx.nn.Linear

    def __init__(self, dtype: Any, key: jax.Array):
        k1, k2, k3 = jax.random.split(key, 3)
        self.emb = eqx.nn.Embedding(7, 4, dtype=dtype, key=k1)
        self.l1 = eqx.nn.Linear(4, 6, dtype=dtype, key=k2)
        self.l2 = eqx.nn.Linear(6, 2, dtype=dtype, key=k3)

    def __call__(self, ids):
        return jax.vmap(lambda t: self.l2(jax.nn.relu(self.l1(self.emb(t)))))(ids)


class EqxCNN(eqx.Module):
    """A custom equinox CNN (channels first, one sample at a time)."""

    conv: eqx.nn.Conv2d
    pool: eqx.nn.MaxPool2d
    head: eqx.nn.Linear

    def __init__(self, dtype: Any, key: jax.Array):
        k1, k2 = jax.random.split(key)
        self.conv = eqx.nn.Conv2d(1, 4, 3, padding=1, key=k1, dtype=dtype)
        self.pool = eqx.nn.MaxPool2d(2, 2)
        self.head = eqx.nn.Linear(4 * 3 * 3, 2, key=k2, dtype=dtype)

    def __call__(self, x):
        return self.head(self.pool(jax.nn.relu(self.conv(x))).reshape(-1))


class LinenCNN(linen.Module):
    """A flax.linen CNN with average pooling."""

    dtype: Any = jnp.float32

    @linen.compact
    def __call__(self, x):
        x = linen.relu(linen.Conv(3, (3, 3), param_dtype=self.dtype)(x))
        x = linen.avg_pool(x, (2, 2), (2, 2))
        x = x.reshape(x.shape[0], -1)
        x = linen.relu(linen.Dense(5, param_dtype=self.dtype)(x))
        return linen.Dense(2, param_dtype=self.dtype)(x)


# --------------------------------------------------------------------------- builders


def _nnx(name: str, ctor: Callable[[], nnx.Module], x_shape, dtype, vocab: int = 0) -> Model:
    """An nnx model (of token ids below ``vocab`` where that is given)."""
    model = nnx.eval_shape(ctor)
    apply, abstract = models.functional(model)
    sym = qo.infer_symmetry(model, jax.ShapeDtypeStruct(x_shape, jnp.int32 if vocab else dtype))
    return Model(name, sym, apply, abstract, x_shape, dtype, vocab)


def _nnx_train(name: str, ctor: Callable[[], nnx.Module], x_shape, dtype) -> Model:
    """A train-mode model, built concretely: its RNG state and batch statistics are real
    arrays, held fixed by ``functional`` (the same dropout masks at every call)."""
    model = ctor()
    apply, params = models.functional(model)
    abstract = jax.tree.map(lambda v: jax.ShapeDtypeStruct(v.shape, v.dtype), params)
    sym = qo.infer_symmetry(model, jax.ShapeDtypeStruct(x_shape, dtype))
    return Model(name, sym, apply, abstract, x_shape, dtype)


def rbg_rngs(seed: int) -> nnx.Rngs:
    """``nnx.Rngs`` with RBG keys: initializers and dropout masks drawn with the default
    threefry keys take seconds to compile on a loaded CPU, with RBG keys a fraction of
    that; what inference sees is alike (random bits from a fixed key)."""
    return nnx.Rngs(jax.random.key(seed, impl="rbg"))


def _eqx(name: str, ctor: Callable[[], eqx.Module], x_shape, dtype, vocab: int = 0) -> Model:
    model = eqx.filter_eval_shape(ctor)
    is_leaf = lambda v: isinstance(v, (jax.Array, jax.ShapeDtypeStruct))  # noqa: E731
    abstract, static = eqx.partition(model, is_leaf)

    def apply(p, x):
        return jax.vmap(eqx.combine(p, static))(x)

    x = jax.ShapeDtypeStruct(x_shape[1:], jnp.int32 if vocab else dtype)
    sym = qo.infer_symmetry(model, x)
    return Model(name, sym, apply, abstract, x_shape, dtype, vocab)


def _seq(dtype: Any, *items: Any) -> nnx.Sequential:
    """``nnx.Sequential``: ``(a, b)`` items become ``nnx.Linear(a, b)``, others stay."""
    rngs = nnx.Rngs(0)
    return nnx.Sequential(*(
        nnx.Linear(*it, param_dtype=dtype, rngs=rngs) if isinstance(it, tuple) else it
        for it in items
    ))


#: what inference must find: per group in order, (windows, pieces, permutable, rescalable)
EXPECT: dict[str, list[tuple[int, int, bool, bool]]] = {
    "nnx_sequential": [(6, 1, True, True), (5, 1, True, True)],
    "nnx_module": [(6, 1, True, True), (5, 1, True, True)],
    "nnx_cnn": [(4, 1, True, True), (5, 1, True, True)],
    "nnx_residual": [(4, 1, True, True), (6, 1, True, True), (5, 1, True, True)],
    "nnx_maxout": [(4, 3, True, True), (5, 1, True, True), (3, 1, True, False)],
    "nnx_layernorm": [(6, 1, True, True)],  # the rescaling moves LayerNorm's gain and shift
    "eqx_mlp": [(4, 1, True, True), (4, 1, True, True)],
    "eqx_cnn": [(4, 1, True, True)],
    "linen_cnn": [(3, 1, True, True), (5, 1, True, True)],
    "maxpool_net": [(2, 3, False, False)],
    "sawtooth_net": [(5, 1, True, True)] * 5,
    # the embeddings produce units: token + position tables and the block write one stream
    "nnx_embed": [(4, 1, True, True), (6, 1, True, True)],
    "eqx_embed": [(4, 1, True, True), (6, 1, True, True)],
}
NAMES = tuple(EXPECT)

#: normalization models: (windows, pieces, permutable, rescalable) per group, as above
NORM_EXPECT: dict[str, list[tuple[int, int, bool, bool]]] = {
    "nnx_bn_cnn_train": [(4, 1, True, True), (6, 1, True, True)],
    "nnx_bn_cnn_eval": [],
    "nnx_bn_resblock": [(4, 1, True, True), (5, 1, True, True)],
    "eqx_ln_mlp": [(6, 1, True, True), (5, 1, True, True)],
    "rms_mlp": [(6, 1, True, False), (5, 1, True, True)],
}
NORM_NAMES = tuple(NORM_EXPECT)

#: the factors inference must find on them: (kind, name, units, blocks) in order
FACTOR_EXPECT: dict[str, list[tuple[str, str, int, int]]] = {
    "nnx_bn_cnn_train": [("norm_scale", "conv1", 4, 4), ("norm_scale", "conv2", 6, 6)],
    "nnx_bn_cnn_eval": [],
    "nnx_bn_resblock": [("norm_scale", "conv2", 4, 4), ("norm_scale", "conv1", 5, 5)],
    "eqx_ln_mlp": [("norm_scale", "l2", 5, 1)],
    "rms_mlp": [("norm_scale", "w1", 6, 1), ("sign_flip", "w1", 6, 6),
                ("norm_scale", "w2", 5, 1)],
}

#: train-mode nnx models (not in ``NAMES``: the transformation battery needs no more of
#: them; ``tests/test_adapters.py`` checks them). Dropout keeps the rescalings (a mask
#: times ``1/keep`` is positively homogeneous) but not the permutations (the mask stays);
#: the BatchNorm group's rescaling moves BatchNorm's gain and shift (its conv kernel is
#: scale-invariant: a ``NormScale`` factor, see ``tests/test_kinds.py``); nothing is
#: followed into the RNN's scan.
TRAIN_EXPECT: dict[str, list[tuple[int, int, bool, bool]]] = {
    "nnx_dropout_train": [(6, 1, False, True), (5, 1, False, True)],
    "nnx_batchnorm_train": [(4, 1, True, True), (5, 1, True, True)],
    "nnx_rnn": [],
}
TRAIN_NAMES = tuple(TRAIN_EXPECT)


@functools.lru_cache(maxsize=None)
def build(name: str, dtype: Any = jnp.float32) -> Model:
    """The zoo model ``name`` in ``dtype`` (built once)."""
    if name == "nnx_sequential":
        return _nnx(name, lambda: _seq(dtype, (3, 6), nnx.relu, (6, 5), nnx.leaky_relu, (5, 2)),
                    (8, 3), dtype)
    if name == "nnx_module":
        return _nnx(name, lambda: MLP(dtype, nnx.Rngs(0)), (8, 3), dtype)
    if name == "nnx_cnn":
        return _nnx(name, lambda: CNN(dtype, nnx.Rngs(0)), (2, 8, 8, 1), dtype)
    if name == "nnx_residual":
        return _nnx(name, lambda: ResMLP(dtype, nnx.Rngs(0)), (8, 3), dtype)
    if name == "nnx_maxout":
        return _nnx(name, lambda: _seq(dtype, (2, 12), MaxOverPieces(3), (4, 5), nnx.leaky_relu,
                                       (5, 3), nnx.tanh, (3, 1)), (8, 2), dtype)
    if name == "nnx_layernorm":
        return _nnx(name, lambda: NormMLP(dtype, nnx.Rngs(0)), (8, 3), dtype)
    if name == "eqx_mlp":
        return _eqx(name, lambda: eqx.nn.MLP(3, 2, 4, 2, key=jax.random.key(0), dtype=dtype),
                    (8, 3), dtype)
    if name == "eqx_cnn":
        return _eqx(name, lambda: EqxCNN(dtype, jax.random.key(0)), (2, 1, 6, 6), dtype)
    if name == "linen_cnn":
        mod = LinenCNN(dtype)
        x = jax.ShapeDtypeStruct((2, 6, 6, 1), dtype)
        abstract = jax.eval_shape(mod.init, jax.random.key(0), x)
        sym = qo.infer_symmetry(mod.apply, x, params=abstract)
        return Model(name, sym, mod.apply, abstract, x.shape, dtype)
    if name == "maxpool_net":
        return _nnx(name, lambda: models.MaxPoolNet(3, 2, 2, rngs=nnx.Rngs(0), param_dtype=dtype),
                    (8, 2), dtype)
    if name == "sawtooth_net":
        return _nnx(name, lambda: models.SawtoothNet(rngs=nnx.Rngs(0), param_dtype=dtype),
                    (8, 1), dtype)
    if name == "nnx_embed":
        return _nnx(name, lambda: EmbedMLP(dtype, nnx.Rngs(0)), (8, 5), dtype, vocab=7)
    if name == "eqx_embed":
        return _eqx(name, lambda: EqxEmbed(dtype, jax.random.key(0)), (8, 5), dtype, vocab=7)
    if name == "nnx_dropout_train":
        return _nnx_train(name, lambda: DropoutMLP(dtype, rbg_rngs(0)), (8, 3), dtype)
    if name == "nnx_batchnorm_train":
        return _nnx_train(name, lambda: BatchNormCNN(dtype, rbg_rngs(0)), (4, 8, 8, 1), dtype)
    if name in ("nnx_bn_cnn_train", "nnx_bn_cnn_eval"):
        def bn_cnn():
            m = BNCNN(dtype, rbg_rngs(0))
            if name.endswith("eval"):
                m.eval()
            return m
        return _nnx_train(name, bn_cnn, (4, 8, 8, 1), dtype)
    if name == "nnx_bn_resblock":
        return _nnx_train(name, lambda: BNResBlock(dtype, rbg_rngs(0)), (4, 6, 6, 1), dtype)
    if name == "eqx_ln_mlp":
        return _eqx(name, lambda: EqxLNMLP(dtype, jax.random.key(0)), (8, 3), dtype)
    if name == "rms_mlp":
        abstract = {"w1": jax.ShapeDtypeStruct((3, 6), dtype),
                    "g1": jax.ShapeDtypeStruct((6,), dtype),
                    "w2": jax.ShapeDtypeStruct((6, 5), dtype),
                    "b2": jax.ShapeDtypeStruct((5,), dtype),
                    "g2": jax.ShapeDtypeStruct((5,), dtype),
                    "w3": jax.ShapeDtypeStruct((5, 2), dtype)}
        x = jax.ShapeDtypeStruct((8, 3), dtype)
        sym = qo.infer_symmetry(rms_mlp_apply, x, params=abstract)
        return Model(name, sym, rms_mlp_apply, abstract, x.shape, dtype)
    if name == "nnx_rnn":
        return _nnx_train(name, lambda: RNNNet(dtype, rbg_rngs(0)), (2, 5, 3), dtype)
    raise ValueError(name)  # pragma: no cover


def random_element(sym: qo.Symmetry, rng: np.random.Generator, bound: float, dtype: Any):
    """A random group element drawn with numpy (no compilation), respecting each group's
    flags: window permutations, piece permutations, log-scales uniform in ``±bound``."""
    out = []
    for g in sym.groups:
        wp = rng.permutation(g.windows) if g.permutable else np.arange(g.windows)
        pp = np.stack([rng.permutation(g.pieces) if g.pieces_permutable else np.arange(g.pieces)
                       for _ in range(g.windows)])
        ls = rng.uniform(-bound, bound, g.windows) if g.rescalable else np.zeros(g.windows)
        out.append(qo.GroupElement(jnp.asarray(wp, jnp.int32), jnp.asarray(pp, jnp.int32),
                                   jnp.asarray(ls, dtype)))
    return tuple(out)
