"""Use quotient_opt on your own model: ``python -m examples.own_model``.

Everything the README's "Use it on your own model" section shows, runnable:

1. infer the symmetry of a custom ``flax.nnx`` module (a residual MLP) by
   tracing it, and read what was found (``print(sym)``);
2. the same for an equinox module and a flax.linen module;
3. write the spec by hand (git-re-basin style), and check it numerically;
4. train with a quotient optimizer inside ``nnx.Optimizer``, chained with
   gradient clipping (safe in any order: the wrappers never jump).
"""

from __future__ import annotations

import equinox as eqx
import flax.linen as linen
import jax
import jax.numpy as jnp
import optax
from flax import nnx

import quotient_opt as qo


class ResidualMLP(nnx.Module):
    """``x → embed → (+ block) → (+ block) → relu → head``: one stream, two ReLU blocks."""

    def __init__(self, rngs: nnx.Rngs):
        self.embed = nnx.Linear(2, 16, rngs=rngs)
        self.up1, self.down1 = nnx.Linear(16, 32, rngs=rngs), nnx.Linear(32, 16, rngs=rngs)
        self.up2, self.down2 = nnx.Linear(16, 32, rngs=rngs), nnx.Linear(32, 16, rngs=rngs)
        self.head = nnx.Linear(16, 1, rngs=rngs)

    def __call__(self, x: jax.Array) -> jax.Array:
        h = self.embed(x)
        h = h + self.down1(nnx.relu(self.up1(h)))
        h = h + self.down2(nnx.relu(self.up2(h)))
        return self.head(nnx.relu(h))


class EqxMLP(eqx.Module):
    fc1: eqx.nn.Linear
    fc2: eqx.nn.Linear

    def __init__(self, key: jax.Array):
        k1, k2 = jax.random.split(key)
        self.fc1, self.fc2 = eqx.nn.Linear(2, 8, key=k1), eqx.nn.Linear(8, 1, key=k2)

    def __call__(self, x: jax.Array) -> jax.Array:  # one sample, as equinox does
        return self.fc2(jax.nn.gelu(self.fc1(x)))


class LinenMLP(linen.Module):
    @linen.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        return linen.Dense(1)(linen.relu(linen.Dense(8)(x)))


def main() -> dict[str, float]:
    x = jax.random.uniform(jax.random.key(0), (256, 2), minval=-1, maxval=1)
    y = jnp.sin(3 * x[:, :1]) * x[:, 1:]

    # 1. any nnx Module: trace it with an example batch
    model = ResidualMLP(nnx.Rngs(0))
    sym = qo.infer_symmetry(model, x[:4])
    print(sym)

    # 2. equinox (one sample) and linen (its apply function and params)
    eq_sym = qo.infer_symmetry(EqxMLP(jax.random.key(1)), x[0])
    lin = LinenMLP()
    variables = lin.init(jax.random.key(2), x[:4])
    lin_sym = qo.infer_symmetry(lin.apply, x[:4], params=variables)
    print(f"equinox: {[(g.name, g.rescalable) for g in eq_sym.groups]}  (gelu: permutations only)")
    print(f"linen:   {[(g.name, g.rescalable) for g in lin_sym.groups]}")

    # 3. a spec by hand: one entry per axis of each leaf; "h" produces group h (× c),
    #    "1/h" reads it (× 1/c). Check it against the function.
    apply, params = qo.models.functional(model)
    hand = qo.symmetry_from_axes(params, {
        "up1/kernel": ("1/stream", "h1"), "up1/bias": ("h1",), "down1/kernel": ("1/h1", "stream"),
        "up2/kernel": ("1/stream", "h2"), "up2/bias": ("h2",), "down2/kernel": ("1/h2", "stream"),
        "embed/kernel": (None, "stream"), "embed/bias": ("stream",),
        "down1/bias": ("stream",), "down2/bias": ("stream",), "head/kernel": ("1/stream", None),
    })
    hand.check(apply, params, x)  # raises ValueError naming a group that changes the function
    print(f"hand-written spec: {[g.name for g in hand.groups]} passes sym.check")

    # 4. train in nnx.Optimizer; clipping after the quotient optimizer is safe
    tx = optax.chain(qo.quotient_adam(3e-3, sym), optax.clip_by_global_norm(1.0))
    optimizer = nnx.Optimizer(model, tx, wrt=nnx.Param)

    def loss_fn(m: nnx.Module) -> jax.Array:
        return jnp.mean((m(x) - y) ** 2)

    @nnx.jit
    def step(m: nnx.Module, opt: nnx.Optimizer) -> jax.Array:
        loss, grads = nnx.value_and_grad(loss_fn)(m)
        opt.update(m, grads)
        return loss

    before = float(loss_fn(model))
    for _ in range(500):
        step(model, optimizer)
    after = float(loss_fn(model))
    print(f"ResidualMLP, quotient_adam + clipping: MSE before {before:.3e}  after {after:.3e}")
    return {"before": before, "after": after}


if __name__ == "__main__":
    main()
