"""Equivariance of the quotient optimizers, measured: train from θ and from g·θ.

For each problem (the sawtooth net on its task; a random 2-16-16-16-1 ReLU MLP
fitting a random teacher on inputs in [-1, 1]^2), each dtype (float32,
float64) and each method, two runs are trained (one jitted ``lax.scan``) for
``--steps`` full-batch steps, one from θ and one from g·θ with g a random
permutation and log-scales uniform in ``±3``. Reported:

* ``out``: max over a held-out grid of |f_θ'(x) − f_θ(x)|, relative to
  max |f_θ(x)|;
* ``orbit``: max |canon(θ'_T) − canon(θ_T)|, relative to max |canon(θ_T)|, with
  ``canon`` the full canonical form (minimal energy + units sorted): zero iff
  the final parameters lie on one orbit;
* ``g·θ``: max |θ'_T − g·θ_T| relative to max |θ_T| (zero for exactly
  equivariant methods; large for methods on the canonical section, whose
  runs are related by the permutation part of g only);
* ``perm``: ``out`` for a pure permutation g (every method, baselines
  included, should be permutation-equivariant);
* ``spread``: std of f_θ on the grid relative to max |f_θ| (the trained
  function must not be constant, or agreement is trivial).

Plain ``optax.sgd`` and ``optax.adam`` run in the same table as baselines.

Usage::

    python -m benchmarks.equivariance [--quick] [--steps N] [--json PATH] [--out DIR]
"""

from __future__ import annotations

import argparse
import json
import os
from collections.abc import Callable
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
import optax
from flax import nnx

import quotient_opt as qo
from quotient_opt.models import SawtoothNet, functional, mse, sawtooth_task

jax.config.update("jax_enable_x64", True)


class Problem(NamedTuple):
    apply: Callable
    params: Any
    sym: qo.Symmetry
    x: jax.Array
    y: jax.Array
    grid: jax.Array


def sawtooth_problem(dtype: Any, seed: int = 0) -> Problem:
    """The sawtooth net (He-normal init) on the sawtooth task; grid between training points."""
    model = SawtoothNet(rngs=nnx.Rngs(seed), param_dtype=dtype)
    apply, params = functional(model)
    task = sawtooth_task(dtype=dtype)
    grid = jnp.linspace(0.0, 1.0, 401, dtype=dtype)[:, None] + 0.5 / 401
    return Problem(apply, params, qo.infer_symmetry(model), task.x, task.y, grid)


def mlp_problem(dtype: Any, seed: int = 0, width: int = 16) -> Problem:
    """A random 2-16-16-16-1 ReLU MLP fitting a random teacher on inputs in [-1, 1]^2."""
    def net(s: int) -> nnx.Sequential:
        r = nnx.Rngs(s)
        return nnx.Sequential(
            nnx.Linear(2, width, param_dtype=dtype, rngs=r), nnx.relu,
            nnx.Linear(width, width, param_dtype=dtype, rngs=r), nnx.relu,
            nnx.Linear(width, width, param_dtype=dtype, rngs=r), nnx.relu,
            nnx.Linear(width, 1, param_dtype=dtype, rngs=r),
        )  # fmt: skip

    model = net(seed)
    apply, params = functional(model)
    teacher = net(seed + 1000)
    key = jax.random.key(seed)
    x = jax.random.uniform(key, (256, 2), dtype, -1.0, 1.0)
    y = teacher(x)
    g1 = jnp.linspace(-1.0, 1.0, 21, dtype=dtype)
    grid = jnp.stack(jnp.meshgrid(g1, g1), -1).reshape(-1, 2)
    return Problem(apply, params, qo.infer_symmetry(model), x, y, grid)


# method name -> (factory(sym, problem name) -> optimizer, kind)
# kind: 'equivariant' (θ'_T = g·θ_T), 'canonical' (equal after canonicalization),
# 'baseline' (plain Optax; expected to fail), 'not claimed' (shown for contrast:
# Adam after the path-norm preconditioner normalizes the scale away again).
def methods(problem: str) -> dict[str, tuple[Callable[[qo.Symmetry], Any], str]]:
    saw = problem == "sawtooth"
    out: dict[str, tuple[Callable[[qo.Symmetry], Any], str]] = {
        "optax.sgd": (lambda s: optax.sgd(0.05), "baseline"),
        "optax.adam": (lambda s: optax.adam(1e-3 if saw else 3e-3), "baseline"),
    }
    if hasattr(qo, "path_sgd"):
        out["path_sgd"] = (lambda s: qo.path_sgd(0.01 if saw else 0.02, s), "equivariant")
    if hasattr(qo, "scale_by_path_norm"):
        out["scale_by_path_norm+adam"] = (
            lambda s: optax.chain(qo.scale_by_path_norm(s), optax.adam(1e-3 if saw else 3e-3)),
            "not claimed",
        )
    out.update(
        {
            "rebalance(sgd)": (lambda s: qo.rebalance(optax.sgd(0.05), s), "canonical"),
            "rebalance(adam)": (
                lambda s: qo.rebalance(optax.adam(1e-3 if saw else 3e-3), s),
                "canonical",
            ),
            "rebalance(adam, every=10)": (
                lambda s: qo.rebalance(optax.adam(1e-3 if saw else 3e-3), s, every=10),
                "canonical",
            ),
            "quotient_sgd": (lambda s: qo.quotient_sgd(0.005, s, momentum=0.9), "canonical"),
            "quotient_adam": (lambda s: qo.quotient_adam(1e-3 if saw else 3e-3, s), "canonical"),
            "teleport(adam)": (
                lambda s: qo.teleport(optax.adam(1e-3 if saw else 3e-3), s, every=50, steps=5),
                "canonical",
            ),
        }
    )
    return out


def train_pair(prob: Problem, opt: Any, g: Any, steps: int) -> tuple[Any, Any]:
    """Trains from θ and from g·θ with one compiled function; returns both final params."""
    sym = prob.sym

    def loss(p):
        return mse(prob.apply(p, prob.x), prob.y)

    def run(p0):
        def step(c, _):
            p, s = c
            gr = jax.grad(loss)(p)
            u, s = opt.update(gr, s, p, value_fn=loss)
            return (optax.apply_updates(p, u), s), None

        (p, _), _ = jax.lax.scan(step, (p0, opt.init(p0)), None, length=steps)
        return p

    # two calls of one compiled function (not vmap: see the report on the
    # vmapped rebalance slowdown)
    f = jax.jit(run)
    return f(prob.params), f(sym.act(prob.params, g))


def _rel_max(a: Any, b: Any, ref: Any) -> float:
    num = max(float(jnp.max(jnp.abs(x - y))) for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b)))
    den = max(float(jnp.max(jnp.abs(x))) for x in jax.tree.leaves(ref))
    r = num / max(den, 1e-300)
    return r if np.isfinite(r) else float("inf")


def deviations(prob: Problem, p1: Any, p2: Any, g: Any) -> dict[str, float]:
    """Output, orbit and g·θ deviations between the runs from θ (p1) and g·θ (p2)."""
    sym = prob.sym
    f1, f2 = prob.apply(p1, prob.grid), prob.apply(p2, prob.grid)
    scale = float(jnp.max(jnp.abs(f1)))
    out = float(jnp.max(jnp.abs(f1 - f2))) / max(scale, 1e-300)
    c1, _ = qo.canonicalize(sym, p1, permutations=True)
    c2, _ = qo.canonicalize(sym, p2, permutations=True)
    return {
        "out": out if np.isfinite(out) else float("inf"),
        "orbit": _rel_max(c1, c2, c1),
        "g_theta": _rel_max(p2, sym.act(p1, g), p1),
        "spread": float(jnp.std(f1)) / max(scale, 1e-300),
    }


def measure(problem: str, dtype: Any, steps: int, seed: int = 0, names=None) -> dict:
    prob = (sawtooth_problem if problem == "sawtooth" else mlp_problem)(dtype, seed)
    g = prob.sym.sample(jax.random.key(seed + 1), log_scale=3.0, dtype=dtype)
    gp = prob.sym.sample(jax.random.key(seed + 2), log_scale=0.0, dtype=dtype)
    res = {}
    items = methods(problem)
    if names is not None:
        items = {k: v for k, v in items.items() if k in names}
    try:
        from tqdm import tqdm

        it = tqdm(items.items(), desc=f"{problem} {jnp.dtype(dtype).name}", leave=False)
    except ImportError:  # pragma: no cover
        it = items.items()
    for name, (make, kind) in it:
        opt = make(prob.sym)
        p1, p2 = train_pair(prob, opt, g, steps)
        d = deviations(prob, p1, p2, g)
        q1, q2 = train_pair(prob, opt, gp, steps)
        d["perm"] = deviations(prob, q1, q2, gp)["out"]
        d["kind"] = kind
        d["final_mse"] = float(mse(prob.apply(p1, prob.x), prob.y))
        res[name] = d
    return res


def main(argv: list[str] | None = None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--quick", action="store_true", help="CI size: 100 steps, float64 + float32")
    ap.add_argument("--steps", type=int, default=None)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--json", default=None)
    ap.add_argument("--out", default=None, help="directory for a PNG bar chart")
    args = ap.parse_args(argv)
    steps = args.steps or (100 if args.quick else 500)
    results: dict = {"steps": steps, "log_scale": 3.0, "results": {}}
    for problem in ("sawtooth", "mlp"):
        for dtype in (jnp.float32, jnp.float64):
            key = f"{problem}/{jnp.dtype(dtype).name}"
            results["results"][key] = measure(problem, dtype, steps, args.seed)
    hdr = f"{'method':28s} {'kind':11s} {'out':>9s} {'orbit':>9s} {'g.theta':>9s} {'perm':>9s} {'spread':>7s} {'mse':>9s}"
    for key, rows in results["results"].items():
        print(f"\n== {key}, {steps} steps, log-scales ±3 + random permutations ==")
        print(hdr)
        for name, d in rows.items():
            print(
                f"{name:28s} {d['kind']:11s} {d['out']:9.2e} {d['orbit']:9.2e} "
                f"{d['g_theta']:9.2e} {d['perm']:9.2e} {d['spread']:7.3f} {d['final_mse']:9.2e}"
            )
    if args.json:
        with open(args.json, "w") as f:
            json.dump(results, f, indent=1)
    if args.out:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt

        os.makedirs(args.out, exist_ok=True)
        fig, axes = plt.subplots(1, len(results["results"]), figsize=(18, 5), sharey=True)
        for ax, (key, rows) in zip(np.atleast_1d(axes), results["results"].items()):
            names = list(rows)
            vals = [max(rows[n]["out"], 1e-17) for n in names]
            ax.barh(names, vals, color=["tab:red" if rows[n]["kind"] == "baseline" else "tab:blue" for n in names])
            ax.set_xscale("log")
            ax.axvline(1e-4, color="k", ls="--", lw=0.8)
            ax.set_title(key)
            ax.set_xlabel("max output deviation (relative)")
        fig.tight_layout()
        fig.savefig(os.path.join(args.out, "equivariance.png"), dpi=120)
    return results


if __name__ == "__main__":
    main()
