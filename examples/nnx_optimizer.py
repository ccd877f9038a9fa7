"""Training a flax.nnx model with ``nnx.Optimizer`` and quotient_opt transformations.

Trains the MaxPool network (``Linear(2 -> 2)`` then a max over the two
pieces) on ``y = max(x + 2y, 3x + y)`` and the 136-parameter sawtooth network
on its sawtooth-plus-spline target, each with ``nnx.Optimizer``:

* MaxPoolNet with Path-SGD (``qo.path_sgd``, momentum 0.9);
* SawtoothNet with Adam followed by the horizontal projection
  (``optax.chain(optax.adam(...), qo.project_horizontal(sym))``).

``nnx.Optimizer`` hands ``tx.update`` the model's parameters, which is what
these transformations need. Run::

    python -m examples.nnx_optimizer
"""

from __future__ import annotations

import optax
from flax import nnx

import quotient_opt as qo


def train(
    model: nnx.Module, tx: optax.GradientTransformation, x, y, steps: int
) -> tuple[float, float]:
    """Full-batch training; returns the MSE before and after."""
    optimizer = nnx.Optimizer(model, tx, wrt=nnx.Param)

    def loss_fn(m):
        return qo.models.mse(m(x), y)

    @nnx.jit
    def step(m, opt):
        loss, grads = nnx.value_and_grad(loss_fn)(m)
        opt.update(m, grads)
        return loss

    before = float(loss_fn(model))
    for _ in range(steps):
        step(model, optimizer)
    return before, float(loss_fn(model))


def main() -> dict[str, tuple[float, float]]:
    results = {}

    model = qo.models.MaxPoolNet(rngs=nnx.Rngs(0))
    sym = qo.infer_symmetry(model)
    task = qo.models.maxpool_task(n=500)
    results["MaxPoolNet, path_sgd"] = train(
        model, qo.path_sgd(0.05, sym, momentum=0.9), task.x, task.y, steps=500
    )

    model = qo.models.SawtoothNet(rngs=nnx.Rngs(0))
    sym = qo.infer_symmetry(model)
    task = qo.models.sawtooth_task()
    tx = optax.chain(optax.adam(3e-3), qo.project_horizontal(sym))
    results["SawtoothNet, adam + project_horizontal"] = train(
        model, tx, 2 * task.x - 1, task.y, steps=1000
    )

    for name, (before, after) in results.items():
        print(f"{name:42s} MSE before {before:.3e}  after {after:.3e}")
    return results


if __name__ == "__main__":
    main()
