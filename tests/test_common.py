"""Every symmetry transformation of the registry on the research tasks and on every kind of network.

The Optax-style battery (extra args, recompilation, ``inject_hyperparams``,
dtypes, masking, accumulation, sharding, ...) is ``tests/test_optax_battery.py``;
both run over the one registry ``benchmarks/cases.py``. Here every case that
works on the symmetry must

* converge inside ``lax.scan`` on the MaxPool task (the sawtooth task, in
  float64: the battery);
* run (init, jit, a few steps in ``lax.scan``, no NaN) on every model of the
  zoo (``tests/zoo.py``).

``levenberg_marquardt`` has no symmetry and its own tests
(``tests/test_levenberg_marquardt.py``).
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import zoo
from flax import nnx

import quotient_opt as qo
from benchmarks.cases import CASES
from quotient_opt.models import functional

SYM_CASES = [c for c in CASES if c.uses_sym]
CASE_IDS = [c.name for c in SYM_CASES]


def extra_for(case, loss) -> dict:
    return {"value_fn": loss} if case.needs_value_fn else {}


def scan_train(tx, params, loss, extra, steps):
    """Trains inside one jitted ``lax.scan``; returns (losses, final loss, params, state)."""

    @jax.jit
    def run(p):
        p, s, losses = qo.fit(tx, p, loss, steps, **extra)
        return losses, loss(p), p, s

    losses, final, p, s = run(params)
    return np.asarray(losses), float(final), p, s


# --------------------------------------------------------------------------- convergence


@pytest.mark.slow
@pytest.mark.parametrize("case", SYM_CASES, ids=CASE_IDS)
def test_converges_on_maxpool_in_scan(case):
    model = qo.models.MaxPoolNet(rngs=nnx.Rngs(1))
    apply, params = functional(model)
    sym = qo.infer_symmetry(model)
    task = qo.models.maxpool_task(n=200, dtype=jnp.float32)

    def loss(p):
        return qo.models.mse(apply(p, task.x), task.y)

    tx = case.build(sym)
    losses, final, _, _ = scan_train(tx, params, loss, extra_for(case, loss), 300)
    assert np.all(np.isfinite(losses)) and np.isfinite(final)
    assert final < 0.1 * losses[0], (case.name, losses[0], final)


# --------------------------------------------------------------------------- the zoo


@pytest.mark.slow
@pytest.mark.parametrize("model", zoo.NAMES)
def test_every_transformation_runs_on_every_zoo_model(model):
    """init, jit, a few steps in ``lax.scan``, no NaN: every case on every kind of network."""
    m = zoo.build(model, jnp.float32)
    params = m.params(0)
    x = m.inputs(0)
    y = jax.random.normal(jax.random.key(0), jax.eval_shape(m.apply, params, x).shape)

    def loss(p):
        return jnp.mean((m.apply(p, x) - y) ** 2)

    # path_sgd and quotient_sgd are chains of the cases kept here
    for case in [c for c in SYM_CASES if c.name not in ("path_sgd", "quotient_sgd")]:
        tx = case.build(m.sym)
        run = jax.jit(lambda p, tx=tx: qo.fit(tx, p, loss, 3)[::2],
                      compiler_options={"xla_backend_optimization_level": 0})
        p, losses = run(params)
        assert bool(jnp.all(jnp.isfinite(losses))), (case.name, losses)
        assert all(bool(jnp.all(jnp.isfinite(v))) for v in jax.tree.leaves(p)), case.name
        assert jax.tree.structure(p) == jax.tree.structure(params)
