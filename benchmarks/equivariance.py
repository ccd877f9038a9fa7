"""Equivariance of the quotient optimizers, measured: train from θ and from g·θ.

For each problem (the sawtooth net on its task; a random 2-16-16-16-1 ReLU MLP
fitting a random teacher on inputs in [-1, 1]^2), each dtype (float32,
float64), each seed (init, data and g) and each method, runs are trained (one
jitted ``lax.scan``) for ``--steps`` full-batch steps from θ and from g·θ,
with g a random permutation and log-scales uniform in ``±3``. Reported, as
median and max over seeds:

* ``out``: max over a held-out grid of |f_θ'(x) − f_θ(x)|, relative to
  max |f_θ(x)|;
* ``orbit``: max |canon(θ'_T) − π·canon(θ_T)|, relative to max |canon(θ_T)|,
  with ``canon`` the minimal-energy representative and π the permutation
  part of g: zero iff the final parameters lie on one orbit;
* ``g·θ``: max |θ'_T − g·θ_T| relative to max |θ_T| (zero for exactly
  equivariant methods; large for methods on the canonical section, whose
  runs are related by the permutation part of g only);
* ``perm``: ``out`` for a pure permutation g (every method, baselines
  included, is permutation-equivariant in exact arithmetic);
* ``floor``: ``out`` between the run from θ and a run from π·θ moved by as
  much rounding as the start g·θ carries (:func:`floor_start`; π the
  permutation part of g): how far the method's own run moves when its start
  moves by that rounding, with no rescaling involved. Adam on a ReLU
  network amplifies such perturbations by up to 1e4 in 500 steps (float64
  runs from θ and from θ perturbed by 1e-7 do the same), so its float32
  runs cannot be reproduced more closely than this, symmetry or not;
* ``canon_start``: ``out`` for runs started from canon(θ) and canon(g·θ).
  The first rebalance from g·θ moves parameters by factors up to e³, and an
  Optax update (new − old) then rounds at the old scale: after one step the
  runs differ by 10-20x the rounding of g·θ itself. Starting from the
  canonical point avoids that jump;
* ``spread``: std of f_θ on the grid relative to max |f_θ|. A seed whose
  trained function is (nearly) constant, spread < 0.05, agrees trivially and
  is left out of the statistics and the verdict (the ``seeds`` column counts
  the seeds kept).

The verdict (:func:`verdict`) of a claimed method against the bar (1e-4 in
float32, 1e-9 in float64) is ``met``, ``floor`` (missed, but not
significantly more often than the method's own floor run misses it) or
``MISSED``, for the runs from θ and g·θ and for the canonical starts.
Plain ``optax.sgd`` and ``optax.adam`` run in the same table as baselines.

Usage::

    python -m benchmarks.equivariance [--quick] [--steps N] [--seeds N]
        [--problems sawtooth,mlp] [--methods NAME,...] [--json PATH] [--out DIR]
"""

from __future__ import annotations

import argparse
import json
import math
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
    lr = 1e-3 if saw else 3e-3
    out.update(
        {
            "rebalance(sgd)": (lambda s: qo.rebalance(optax.sgd(0.05), s), "equivariant"),
            "rebalance(adam)": (lambda s: qo.rebalance(optax.adam(lr), s), "equivariant"),
            "rebalance(adam, every=10)": (
                lambda s: qo.rebalance(optax.adam(lr), s, every=10), "equivariant"),
            "rebalance(adam, move_params)": (
                lambda s: qo.rebalance(optax.adam(lr), s, move_params=True), "canonical"),
            "quotient_sgd": (lambda s: qo.quotient_sgd(0.005, s, momentum=0.9), "equivariant"),
            "quotient_adam": (lambda s: qo.quotient_adam(lr, s), "equivariant"),
            "teleport(adam)": (
                lambda s: qo.teleport(optax.adam(lr), s, every=50, steps=5), "equivariant"),
        }
    )
    return out


def trainer(apply: Callable, opt: Any, steps: int) -> Callable:
    """A jitted ``run(params, x, y) -> final params``: ``steps`` full-batch steps in one scan.

    One compiled function per (method, problem kind, dtype), reused across
    seeds and the runs from θ, g·θ, a permuted θ and the floor start.
    """

    def run(p0, x, y):
        return qo.fit(opt, p0, lambda p: mse(apply(p, x), y), steps)[0]

    # called once per start point (not vmapped: a vmapped solver loop runs
    # every batch member for the largest iteration count)
    return jax.jit(run)


def train_pair(prob: Problem, opt: Any, g: Any, steps: int):
    """Trains from θ and from g·θ with one compiled function; returns both final params."""
    run = trainer(prob.apply, opt, steps)
    return run(prob.params, prob.x, prob.y), run(prob.sym.act(prob.params, g), prob.x, prob.y)


def floor_start(sym: qo.Symmetry, params: Any, g: Any, key: jax.Array) -> Any:
    """θ moved by as much rounding as the start g·θ carries, and permuted like it.

    With ``c = h·θ = canon(θ)`` and ``c_g = π⁻¹·canon(g·θ)`` (π the
    permutation part of g; ``c_g = c`` in exact arithmetic, so ``c_g − c`` is
    the rounding that the start g·θ carries, as the canonical section sees
    it), returns ``π·h⁻¹·(c + σ·(c_g − c))`` with random signs σ: the same
    rounding-level perturbation, entry by entry, in a random direction, and
    the same permutation as g (so the run sums in the same permuted order as
    the run from g·θ), but no rescaling. In exact arithmetic it is π·θ.
    """
    c, h = qo.canonicalize(sym, params)
    perm = _permutation_part(g)
    cg = sym.act(qo.canonicalize(sym, sym.act(params, g))[0], sym.inverse(perm))
    leaves, treedef = jax.tree.flatten(c)
    keys = jax.random.split(key, len(leaves))
    noisy = treedef.unflatten(
        [
            a + jnp.where(jax.random.bernoulli(k, 0.5, a.shape), 1, -1).astype(a.dtype) * (b - a)
            for a, b, k in zip(leaves, jax.tree.leaves(cg), keys)
        ]
    )
    return sym.act(sym.act(noisy, sym.inverse(h)), perm)


def _rel_max(a: Any, b: Any, ref: Any) -> float:
    num = max(float(jnp.max(jnp.abs(x - y))) for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b)))
    den = max(float(jnp.max(jnp.abs(x))) for x in jax.tree.leaves(ref))
    r = num / max(den, 1e-300)
    return r if np.isfinite(r) else float("inf")


def _permutation_part(g: Any) -> Any:
    return tuple(e._replace(log_scale=jnp.zeros_like(e.log_scale)) for e in g)


def output_deviation(prob: Problem, p1: Any, p2: Any) -> float:
    """max |f_p2 − f_p1| over the grid, relative to max |f_p1|."""
    f1, f2 = prob.apply(p1, prob.grid), prob.apply(p2, prob.grid)
    out = float(jnp.max(jnp.abs(f1 - f2))) / max(float(jnp.max(jnp.abs(f1))), 1e-300)
    return out if np.isfinite(out) else float("inf")


def deviations(prob: Problem, p1: Any, p2: Any, g: Any) -> dict[str, float]:
    """Output, orbit and g·θ deviations between the runs from θ (p1) and g·θ (p2)."""
    sym = prob.sym
    f1 = prob.apply(p1, prob.grid)
    scale = max(float(jnp.max(jnp.abs(f1))), 1e-300)
    c1, c2 = qo.canonicalize(sym, p1)[0], qo.canonicalize(sym, p2)[0]
    return {
        "out": output_deviation(prob, p1, p2),
        "orbit": _rel_max(c2, sym.act(c1, _permutation_part(g)), c1),
        "g_theta": _rel_max(p2, sym.act(p1, g), p1),
        "spread": float(jnp.std(f1)) / scale,
    }


PROBLEMS = {"sawtooth": sawtooth_problem, "mlp": mlp_problem}
COLUMNS = ("out", "orbit", "g_theta", "perm", "floor", "canon_start", "spread", "final_mse")


def measure(problem: str, dtype: Any, steps: int, seeds: Any = (0,), names=None) -> dict:
    """Every method on ``problem`` for each seed (init, data, g); lists per column.

    Per seed and method: runs from θ, from g·θ (log-scales ±3 and a random
    permutation), from g_π·θ (a pure permutation) and from
    :func:`floor_start`. ``floor`` is the output deviation between the runs
    from θ and from the floor start: how far the method's own trajectory
    moves when its start moves by the rounding that g·θ carries.
    ``canon_start`` is ``out`` for runs started from the canonical points
    canon(θ) and canon(g·θ) instead.
    """
    seeds = list(seeds)
    probs = [PROBLEMS[problem](dtype, seed) for seed in seeds]
    starts = [_starts(prob, seed, dtype) for seed, prob in zip(seeds, probs)]
    items = methods(problem)
    if names is not None:
        items = {k: v for k, v in items.items() if k in names}
    res: dict = {}
    try:
        from tqdm import tqdm

        it = tqdm(items.items(), desc=f"{problem} {jnp.dtype(dtype).name}", leave=False)
    except ImportError:  # pragma: no cover
        it = items.items()
    for name, (make, kind) in it:
        run = trainer(probs[0].apply, make(probs[0].sym), steps)
        cols: dict = {c: [] for c in COLUMNS}
        for prob, st in zip(probs, starts):
            end = {k: run(v, prob.x, prob.y) for k, v in st.items() if k != "g"}
            p1 = end["theta"]
            d = deviations(prob, p1, end["g_theta"], st["g"])
            d["perm"] = output_deviation(prob, p1, end["perm"])
            d["floor"] = output_deviation(prob, p1, end["floor"])
            d["canon_start"] = output_deviation(prob, end["canon_theta"], end["canon_g_theta"])
            d["final_mse"] = float(mse(prob.apply(p1, prob.x), prob.y))
            for c in COLUMNS:
                cols[c].append(d[c])
        res[name] = {"kind": kind, **cols}
    return res


def _starts(prob: Problem, seed: int, dtype: Any) -> dict:
    """The start points of one seed, shared by every method (and g itself)."""
    sym, p = prob.sym, prob.params
    g = sym.sample(jax.random.key(seed + 1), log_scale=3.0, dtype=dtype)
    gp = sym.sample(jax.random.key(seed + 2), log_scale=0.0, dtype=dtype)
    return {
        "g": g,
        "theta": p,
        "g_theta": sym.act(p, g),
        "perm": sym.act(p, gp),
        "floor": floor_start(sym, p, g, jax.random.key(seed + 3)),
        "canon_theta": qo.canonicalize(sym, p)[0],
        "canon_g_theta": qo.canonicalize(sym, sym.act(p, g))[0],
    }


BARS = {"float32": 1e-4, "float64": 1e-9}
MIN_SPREAD = 0.05


def kept(row: dict) -> dict:
    """The row restricted to seeds whose trained function is not constant (spread >= 0.05)."""
    idx = [i for i, v in enumerate(row["spread"]) if v >= MIN_SPREAD]
    return {k: [v[i] for i in idx] if isinstance(v, list) else v for k, v in row.items()}


def more_often_p(k1: int, k2: int, n1: int, n2: int) -> float:
    """One-sided Fisher exact p-value that ``k1`` misses of ``n1`` are more frequent than ``k2`` of ``n2``.

    P(X >= k1) for X hypergeometric: ``n1`` draws from ``n1 + n2`` seeds of
    which ``k1 + k2`` missed.
    """
    total, hits = n1 + n2, k1 + k2
    den = math.comb(total, n1)
    return sum(math.comb(hits, x) * math.comb(total - hits, n1 - x) for x in range(k1, min(hits, n1) + 1)) / den


def verdict(row: dict, dtype_name: str, column: str = "out") -> str:
    """``met``, ``floor`` or ``MISSED`` for a claimed method; ``fails`` or ``PASSES`` for a baseline.

    Over the seeds :func:`kept`: ``met`` if ``column`` (and, for ``out``,
    ``perm``) is within the bar on every seed. ``floor`` if not, but the bar
    is not missed significantly more often than the method's own floor run
    misses it (one-sided Fisher exact test, p >= 0.05): the method is then as
    far from the bar as rounding alone puts it, and no float implementation
    of it could do better on this problem. ``MISSED`` otherwise. A baseline
    ``fails`` if it misses on more than half of the seeds. ``trivial`` if no
    seed is kept.
    """
    bar = BARS[dtype_name]
    if row["kind"] == "not claimed":
        return "-"
    row = kept(row)
    n = len(row["out"])
    if not n:
        return "trivial"
    missed, missed_canon, missed_floor = misses(row, bar)
    missed = missed if column == "out" else missed_canon
    if row["kind"] == "baseline":
        if column != "out":
            return "-"  # plain Optax from two canonical starts: π-related starts, not its own test
        return "fails" if missed > n / 2 else "PASSES"
    if not missed:
        return "met"
    return "floor" if more_often_p(missed, missed_floor, n, n) >= 0.05 else "MISSED"


def misses(row: dict, bar: float) -> tuple[int, int, int]:
    """Seeds on which ``out`` or ``perm`` exceeds the bar, on which ``canon_start`` does, and ``floor``."""
    missed = sum(max(o, p) > bar for o, p in zip(row["out"], row["perm"]))
    canon = sum(c > bar for c in row.get("canon_start", []))
    return missed, canon, sum(f > bar for f in row["floor"])


def print_table(results: dict) -> None:
    n = len(results["seeds"])
    print(
        f"\n{results['steps']} steps, log-scales ±3 + random permutations; median / max over kept seeds;"
        "\nmisses: kept seeds where out or perm exceeds the bar / where canon_start does / where floor does"
    )
    hdr = (
        f"{'method':26s} {'kind':11s} {'seeds':>5s} {'out':>17s} {'perm':>17s} {'floor':>17s} "
        f"{'orbit':>17s} {'g.theta':>8s} {'mse':>8s} {'misses':>9s}  verdict"
    )
    for key, rows in results["results"].items():
        print(f"\n== {key} (bar {BARS[key.split('/')[1]]:.0e}) ==")
        print(hdr)
        for name, row in rows.items():
            d = kept(row)

            def mm(c, d=d):
                return f"{np.median(d[c]):8.1e}/{max(d[c]):8.1e}" if d[c] else f"{'-':>17s}"

            med = (lambda c, d=d: f"{np.median(d[c]):8.1e}" if d[c] else f"{'-':>8s}")
            bad, bad_canon, bad_floor = misses(d, BARS[key.split("/")[1]])
            print(
                f"{name:26s} {d['kind']:11s} {len(d['out']):>2d}/{n:<2d} {mm('out')} {mm('perm')} "
                f"{mm('floor')} {mm('orbit')} {med('g_theta')} {med('final_mse')} {bad:>2d}/{bad_canon:>2d}/{bad_floor:<3d}"
                f"  {row['verdict']} / {row.get('verdict_canon_start', '?')}"
            )


def plot(results: dict, path: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    keys = list(results["results"])
    fig, axes = plt.subplots(1, len(keys), figsize=(5 * len(keys), 5), sharey=True)
    for ax, key in zip(np.atleast_1d(axes), keys):
        rows = results["results"][key]
        names = list(rows)
        y = np.arange(len(names))
        clip = lambda v: np.maximum(np.minimum(np.asarray(v, float), 1e3), 1e-17)
        for i, n in enumerate(names):
            row = kept(rows[n])
            col = "tab:red" if row["kind"] == "baseline" else "tab:blue"
            ax.scatter(clip(row["out"]), np.full(len(row["out"]), i), c=col, s=12, alpha=0.7)
            ax.scatter(clip(row["floor"]), np.full(len(row["floor"]), i - 0.25), c="gray",
                       marker="x", s=12)  # fmt: skip
        ax.set_yticks(y, names)
        ax.set_xscale("log")
        ax.axvline(BARS[key.split("/")[1]], color="k", ls="--", lw=0.8)
        ax.set_title(key)
        ax.set_xlabel("output deviation, kept seeds: g·θ run (dots), floor run (x)")
    fig.tight_layout()
    fig.savefig(path, dpi=120)


def main(argv: list[str] | None = None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--quick", action="store_true", help="CI size: 100 steps, one seed")
    ap.add_argument("--steps", type=int, default=None)
    ap.add_argument("--seeds", type=int, default=None, help="number of seeds (default 8; 1 with --quick)")
    ap.add_argument("--problems", default=",".join(PROBLEMS), help="comma-separated subset")
    ap.add_argument("--methods", default=None, help="comma-separated subset (default all)")
    ap.add_argument("--json", default=None)
    ap.add_argument("--out", default=None, help="directory for a PNG plot")
    args = ap.parse_args(argv)
    steps = args.steps or (100 if args.quick else 500)
    seeds = list(range(args.seeds or (1 if args.quick else 8)))
    results: dict = {"steps": steps, "log_scale": 3.0, "seeds": seeds, "bars": BARS, "results": {}}
    problems = args.problems.split(",")
    names = args.methods.split(",") if args.methods else None
    if set(problems) - set(PROBLEMS):
        ap.error(f"--problems: unknown {sorted(set(problems) - set(PROBLEMS))}; known {list(PROBLEMS)}")
    known = set(methods("sawtooth")) | set(methods("mlp"))
    if names and set(names) - known:
        ap.error(f"--methods: unknown {sorted(set(names) - known)}; known {sorted(known)}")
    for problem in problems:
        for dtype in (jnp.float32, jnp.float64):
            name = jnp.dtype(dtype).name
            rows = measure(problem, dtype, steps, seeds, names)
            for row in rows.values():
                row["verdict"] = verdict(row, name)
                row["verdict_canon_start"] = verdict(row, name, "canon_start")
            results["results"][f"{problem}/{name}"] = rows
    print_table(results)
    if args.json:
        with open(args.json, "w") as f:
            json.dump(results, f, indent=1)
    if args.out:
        os.makedirs(args.out, exist_ok=True)
        plot(results, os.path.join(args.out, "equivariance.png"))
    return results


if __name__ == "__main__":
    main()
