"""A small CNN on scikit-learn's digits, trained on the quotient: ``python -m examples.digits_cnn``.

The model is an ordinary ``flax.nnx`` CNN (conv-ReLU-max-pool twice, flatten,
linear); ``qo.infer_symmetry`` finds its channel permutations and rescalings
by tracing it. Each optimizer trains from the init ``θ`` and from a random
rescaling ``g·θ`` of it (log-scales uniform in ``±2`` and random channel
permutations: the same function) and the script prints what each reached:
test accuracy, and how far apart the two runs' predictions end.

``qo.quotient_adam`` works on the canonical section of the rescaling orbits:
from ``θ`` and ``g·θ`` it takes the same steps, up to the permutation, so the
two runs end at the same function. Plain Adam and SGD see two different
parameter points and end at different functions.
"""

from __future__ import annotations

import argparse

import jax
import jax.numpy as jnp
import numpy as np
import optax
from flax import nnx

import quotient_opt as qo


class DigitsCNN(nnx.Module):
    """``8×8×1 → conv 3×3 (8) → ReLU → max-pool 2 → conv 3×3 (16) → ReLU → max-pool 2 → 10``."""

    def __init__(self, rngs: nnx.Rngs):
        self.conv1 = nnx.Conv(1, 8, (3, 3), rngs=rngs)
        self.conv2 = nnx.Conv(8, 16, (3, 3), rngs=rngs)
        self.head = nnx.Linear(2 * 2 * 16, 10, rngs=rngs)

    def __call__(self, x: jax.Array) -> jax.Array:
        h = nnx.max_pool(nnx.relu(self.conv1(x)), (2, 2), (2, 2))
        h = nnx.max_pool(nnx.relu(self.conv2(h)), (2, 2), (2, 2))
        return self.head(h.reshape(h.shape[0], -1))


def load_digits(seed: int = 0) -> tuple[jax.Array, ...]:
    """scikit-learn's 8×8 digits, scaled to [0, 1], split 75/25 (stratified, seeded)."""
    from sklearn.datasets import load_digits as load
    from sklearn.model_selection import train_test_split

    x, y = load(return_X_y=True)
    x = (x / 16.0).reshape(-1, 8, 8, 1).astype(np.float32)
    xtr, xte, ytr, yte = train_test_split(x, y, test_size=0.25, random_state=seed, stratify=y)
    return tuple(jnp.asarray(a) for a in (xtr, ytr, xte, yte))


def main(argv: list[str] | None = None) -> dict[str, dict[str, float]]:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--steps", type=int, default=400, help="full-batch steps")
    ap.add_argument("--seed", type=int, default=0)
    args = ap.parse_args(argv)

    xtr, ytr, xte, yte = load_digits(args.seed)
    model = DigitsCNN(nnx.Rngs(args.seed))
    sym = qo.infer_symmetry(model, xtr[:2])
    apply, theta = qo.models.functional(model)
    g = sym.sample(jax.random.key(args.seed + 1), log_scale=2.0)
    starts = {"θ": theta, "g·θ": sym.act(theta, g)}

    def loss(p):
        logits = apply(p, xtr)
        return optax.softmax_cross_entropy_with_integer_labels(logits, ytr).mean()

    def accuracy(p) -> float:
        return float(jnp.mean(jnp.argmax(apply(p, xte), -1) == yte))

    optimizers = {
        "quotient_adam(3e-3)": qo.quotient_adam(3e-3, sym),
        "adam(3e-3)": optax.adam(3e-3),
        "sgd(0.1, momentum 0.9)": optax.sgd(0.1, momentum=0.9),
    }
    print(f"digits: {len(ytr)} train / {len(yte)} test; {args.steps} full-batch steps")
    print(f"symmetry: {', '.join(f'{g_.name} ({g_.windows})' for g_ in sym.groups)}; start "
          f"g·θ = random rescaling (log-scales ±2) and channel permutation of θ")
    start_gap = float(jnp.max(jnp.abs(apply(starts['g·θ'], xte) - apply(theta, xte))))
    print(f"the two starts compute the same function: max |logit difference| {start_gap:.1e}")
    results = {}
    for name, tx in optimizers.items():
        fit = jax.jit(lambda p, tx=tx: qo.fit(tx, p, loss, args.steps)[0])
        ends = {k: fit(p) for k, p in starts.items()}
        acc = {k: accuracy(p) for k, p in ends.items()}
        gap = float(jnp.max(jnp.abs(apply(ends["θ"], xte) - apply(ends["g·θ"], xte))))
        finite = all(np.isfinite(float(loss(p))) for p in ends.values())
        results[name] = {"acc_theta": acc["θ"], "acc_g_theta": acc["g·θ"], "logit_gap": gap,
                         "finite": finite}
        print(f"{name:24s} test accuracy from θ {100 * acc['θ']:5.1f}%, from g·θ "
              f"{100 * acc['g·θ']:5.1f}%; final max |logit difference| {gap:.2e}"
              + ("" if finite else " (diverged)"))
    return results


if __name__ == "__main__":
    main()
