"""A plain equinox training loop with a quotient_opt transformation.

An ``eqx.nn.MLP`` (1 -> 32 -> 32 -> 1, ReLU) fits ``sin(3x)`` on ``[-1, 1]``
with ``qo.path_sgd`` (Path-SGD, momentum 0.9) and, for comparison, with
``optax.chain(optax.adam(...), qo.project_horizontal(sym))``. The symmetry of
an equinox MLP is inferred from the module; its parameters are
``eqx.filter(model, eqx.is_array)`` (weights in equinox's ``(out, in)``
layout, which the transformations handle). Run::

    python -m examples.equinox_loop
"""

from __future__ import annotations

import equinox as eqx
import jax
import jax.numpy as jnp
import optax

import quotient_opt as qo


def train(model: eqx.nn.MLP, tx: optax.GradientTransformation, x, y, steps: int):
    """Returns ``(model, loss before, loss after)``."""
    params, static = eqx.partition(model, eqx.is_array)
    opt_state = tx.init(params)

    def loss_fn(p):
        m = eqx.combine(p, static)
        return jnp.mean((jax.vmap(m)(x) - y) ** 2)

    @jax.jit
    def step(p, s):
        loss, grads = jax.value_and_grad(loss_fn)(p)
        updates, s = tx.update(grads, s, p)
        return optax.apply_updates(p, updates), s, loss

    before = float(loss_fn(params))
    for _ in range(steps):
        params, opt_state, _ = step(params, opt_state)
    return eqx.combine(params, static), before, float(loss_fn(params))


def main() -> dict[str, tuple[float, float]]:
    x = jnp.linspace(-1.0, 1.0, 128)[:, None]
    y = jnp.sin(3 * x)
    results = {}
    for name, make in [
        ("path_sgd", lambda sym: qo.path_sgd(0.02, sym, momentum=0.9)),
        (
            "adam + project_horizontal",
            lambda sym: optax.chain(optax.adam(3e-3), qo.project_horizontal(sym)),
        ),
    ]:
        model = eqx.nn.MLP(1, 1, 32, 2, activation=jax.nn.relu, key=jax.random.key(0))
        sym = qo.infer_symmetry(model)
        _, before, after = train(model, make(sym), x, y, steps=1000)
        results[name] = (before, after)
        print(f"eqx.nn.MLP, {name:28s} MSE before {before:.3e}  after {after:.3e}")
    return results


if __name__ == "__main__":
    main()
