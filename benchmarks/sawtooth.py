"""The sawtooth network: the paper's baselines, Adam and the library's methods at equal
gradient evaluations.

Task: ``qo.models.SawtoothNet`` (1 → 5×5 ReLU → 1, 136 parameters) on
``qo.models.sawtooth_task()`` (137 points: every knot of the target plus 3 points
per segment, full batch, float32). The net can fit the target exactly (the
hand-built weights give MSE 3e-16 in float32); an **exact fit** here is a final
MSE ≤ 1e-10. Reference: *The energy landscape of a simple neural network*
(``shared/references/energy-landscape-sawtooth-paper.txt``): §4.2 training,
§4.3–4.4 fits and losses (Figs. 3–5), §4.8 the basin of the global minimum
(Fig. 12), §4.10 larger networks (Fig. 15).

Every method of a row gets the same budget of **gradient evaluations per
network** (``--steps``), counted as:

* one optimizer step (a loss value and gradient at one point): 1;
* one Levenberg-Marquardt iteration: 3 (the population trainer's value and
  gradient, which LM does not use; the residuals and their Jacobian, computed as
  per-example gradients, about one gradient pass; the residuals at the trial
  point). Its linear solve (136×136) costs no evaluation but shows in wall time;
* one teleport: 2 per ascent step (the gradient norm and its derivative);
* canonicalization, projections, path norms (group arithmetic): 0 — they show
  in wall time, reported too.

Methods (``--methods``, comma-separated, each optionally ``name:nets``):

* paper baselines: ``sgd_momentum`` (gradient descent with momentum: lr 1e-2,
  momentum 0.9) and ``adadelta`` (lr 1.0, rho 0.95, eps 1e-8: Keras's defaults
  of the paper's time; with optax's defaults, rho 0.9 and eps 1e-6, the median
  *rises* with more steps: 1.17e-3 at 3k steps, 1.55e-3 at 12k), He-normal init;
* ``adam`` (1e-3) and ``adam_cosine`` (3e-3 with cosine decay), He-normal init;
* the quotient methods, He-normal init: ``quotient_adam`` (1e-3), ``path_sgd``
  (1e-2), ``rebalance_adam`` (Adam 1e-3 rebalanced every 10 steps),
  ``teleport_adam`` (Adam 1e-3, teleport every 100 steps, 10 ascent steps);
* the library's mechanisms for this problem: ``kink_adam`` (``qo.contrib.kink_init``:
  every hidden unit's kink placed inside the data, then Adam 3e-3 cosine),
  ``adam_lm`` (He init, Adam 1e-3, then 60 ``qo.contrib.levenberg_marquardt`` steps)
  and ``kink_adam_lm`` (kink init, Adam 3e-3 cosine, 60 LM steps), and
  ``breathing`` (``qo.contrib.breathe``: the 5×5 net trained inside an 8×5 one
  with 3 absent slots per layer; cycles of growing the slots back with kinks in
  the data, 1000 Adam steps, and compressing back to 5 per layer by the best
  affine merges, elitist per network; then the 5×5 net is extracted, Adam spends
  the budget left over by the worst-case plan, and 60 LM steps polish it).
  Breathing counts 1 per optimizer step, 1 per merge candidate scored and 1 per
  acceptance test; a step of the 8-wide net costs about twice a 5×5 step.

Each population is trained by ``qo.train_population`` (chunked, resumable with
``--cache``, a tqdm bar per phase, the dense-MLP fast path where the optimizer
allows). Parts (``--parts``): ``main`` (the table, Figs. 3–5 and loss curves),
``basin`` (§4.8: the exact weights, balanced with ``qo.canonicalize``, plus
Gaussian noise of norm ``r`` log-uniform in [0.003, 3], retrained; final loss
against ``r`` per method) and ``wide`` (§4.10: 5 hidden layers of width 6, 8,
12 on the same target).

Usage::

    python -m benchmarks.sawtooth [--quick] [--nets N] [--steps B] [--methods a,b:N]
        [--parts main,basin,wide] [--json PATH] [--out DIR] [--cache DIR]
"""

from __future__ import annotations

import argparse
import dataclasses
import functools
import json
import math
import os
import sys
import time
from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
import optax
from flax import nnx

import quotient_opt as qo
from benchmarks import throughput as tp
from quotient_opt.models import SawtoothNet, functional, mse, sawtooth_task

EXACT = 1e-10
LM_STEPS = 60
GRID = 1001
BASELINES = ("sgd_momentum", "adadelta", "adam")
FAST_PATH: bool | None = None  # train_population's default; --quick: off (fewer compilations)
PAPER_BASELINES = ("sgd_momentum", "adadelta")


# --------------------------------------------------------------------------- problem


@dataclasses.dataclass
class Problem:
    """One architecture (``depth`` hidden layers of ``width``) on the sawtooth target."""

    width: int
    depth: int
    task: Any
    apply: Callable
    model: Any

    @property
    def sizes(self) -> list[int]:
        return [1] + [self.width] * self.depth + [1]

    def he_init(self, key: jax.Array) -> Any:
        return nnx.state(SawtoothNet(self.width, self.depth, rngs=nnx.Rngs(key)), nnx.Param)

    def kink_init(self) -> Callable[[jax.Array], Any]:
        return qo.contrib.kink_init(self.he_init, self.apply, self.task.x)

    def loss_fn(self, p: Any) -> jax.Array:
        return mse(self.apply(p, self.task.x), self.task.y)

    def residual_one(self, p: Any, example: Any) -> jax.Array:
        x, y = example
        return self.apply(p, x[None])[0] - y

    @property
    def data(self) -> tuple[jax.Array, jax.Array]:
        return (self.task.x, self.task.y)

    @functools.cached_property
    def sym(self) -> qo.Symmetry:
        return qo.infer_symmetry(self.model, self.task.x)


_PROBLEMS: dict[tuple[int, int], Problem] = {}


def problem(width: int = 5, depth: int = 5) -> Problem:
    if (width, depth) not in _PROBLEMS:
        task = sawtooth_task()
        model = SawtoothNet(width, depth, rngs=nnx.Rngs(0))
        apply, _ = functional(model)
        _PROBLEMS[(width, depth)] = Problem(width, depth, task, apply, model)
    return _PROBLEMS[(width, depth)]


# --------------------------------------------------------------------------- methods


@dataclasses.dataclass(frozen=True)
class Phase:
    """``steps`` steps of ``make(problem, steps)``; ``steps=None`` takes the rest of the budget."""

    label: str
    make: Callable[[Problem, int], optax.GradientTransformation]
    evals_per_step: float = 1.0
    steps: int | None = None


@dataclasses.dataclass(frozen=True)
class Method:
    name: str
    label: str
    group: str  # "paper baseline", "baseline", "quotient", "new"
    init: str  # "he" or "kink"
    phases: tuple[Phase, ...]
    slow: bool = False  # no fast path / costly per step: run on --slow-nets networks
    custom: Callable[..., dict[str, Any]] | None = None  # a procedure instead of phases


def _lm(prob: Problem, steps: int) -> optax.GradientTransformation:
    return qo.contrib.levenberg_marquardt(prob.residual_one, data=prob.data)


def _cosine(peak: float) -> Callable[[Problem, int], optax.GradientTransformation]:
    return lambda prob, steps: optax.adam(optax.cosine_decay_schedule(peak, max(steps, 1), 1e-3))


LM = Phase("Levenberg-Marquardt", _lm, 3.0, LM_STEPS)
TELEPORT_EVERY, TELEPORT_STEPS = 100, 10

METHODS: dict[str, Method] = {
    m.name: m
    for m in [
        Method("sgd_momentum", "GD + momentum (paper)", "paper baseline", "he",
               (Phase("sgd", lambda p, s: optax.sgd(1e-2, momentum=0.9)),)),
        Method("adadelta", "Adadelta (paper)", "paper baseline", "he",
               (Phase("adadelta", lambda p, s: optax.adadelta(1.0, rho=0.95, eps=1e-8)),)),
        Method("adam", "Adam 1e-3", "baseline", "he",
               (Phase("adam", lambda p, s: optax.adam(1e-3)),)),
        Method("adam_cosine", "Adam 3e-3 cosine", "baseline", "he",
               (Phase("adam", _cosine(3e-3)),)),
        Method("quotient_adam", "qo.quotient_adam 1e-3", "quotient", "he",
               (Phase("quotient_adam", lambda p, s: qo.quotient_adam(1e-3, p.sym)),), slow=True),
        Method("path_sgd", "qo.path_sgd 1e-2", "quotient", "he",
               (Phase("path_sgd", lambda p, s: qo.path_sgd(1e-2, p.sym)),), slow=True),
        Method("rebalance_adam", "qo.rebalance(Adam 1e-3, every=10)", "quotient", "he",
               (Phase("rebalance", lambda p, s: qo.rebalance(optax.adam(1e-3), p.sym, every=10)),),
               slow=True),
        Method("teleport_adam", "qo.teleport(Adam 1e-3)", "quotient", "he",
               (Phase("teleport", lambda p, s: qo.teleport(
                   optax.adam(1e-3), p.sym, every=TELEPORT_EVERY, steps=TELEPORT_STEPS),
                   1.0 + 2.0 * TELEPORT_STEPS / TELEPORT_EVERY),), slow=True),
        Method("kink_adam", "kink init + Adam 3e-3 cosine", "new", "kink",
               (Phase("adam", _cosine(3e-3)),)),
        Method("adam_lm", "Adam 1e-3 + LM", "new", "he",
               (Phase("adam", lambda p, s: optax.adam(1e-3)), LM)),
        Method("kink_adam_lm", "kink init + Adam 3e-3 cosine + LM", "new", "kink",
               (Phase("adam", _cosine(3e-3)), LM)),
    ]
}
BREATHE = dict(slots=8, start_steps=6000, cycle_steps=1000, refit_steps=100, polish_steps=500)


def max_candidates(slots: list[int], width: int) -> int:
    """The most candidates a compress from ``slots`` to ``width`` per layer can score
    (2 per present unit of each over-cap layer, per removal; maximized over removal orders)."""

    @functools.lru_cache(maxsize=None)
    def best(state: tuple[int, ...]) -> int:
        over = [i for i, n in enumerate(state) if n > width]
        if not over:
            return 0
        here = 2 * sum(state[i] for i in over)
        return here + max(best(tuple(n - (j == i) for j, n in enumerate(state))) for i in over)

    return best(tuple(slots))


def breathing_plan(budget: int, depth: int, width: int = 5, **kw: int) -> dict[str, int]:
    """Cycles of ``qo.contrib.breathe`` that fit in ``budget`` minus the LM polish, at
    worst-case candidate counts; the rest of the budget goes to Adam steps before the LM."""
    cfg = {**BREATHE, **kw}
    slots = [cfg["slots"]] * depth
    removals = sum(n - width for n in slots)
    comp = removals * cfg["refit_steps"] + cfg["polish_steps"] + max_candidates(slots, width)
    first = cfg["start_steps"] + comp + 1
    room = budget - LM.steps * LM.evals_per_step - first
    if room < 0:
        raise ValueError(f"breathing needs more than {budget} evaluations (start {first})")
    cycles = int(room // (cfg["cycle_steps"] + comp + 1))
    return {**cfg, "cycles": cycles, "worst_case_evals": first + cycles * (
        cfg["cycle_steps"] + comp + 1)}


def run_breathing(prob: Problem, method: Method, init: Any, *, nets: int, budget: int,
                  key: jax.Array, cache: str | None, tag: str, progress: bool) -> dict[str, Any]:
    """``qo.contrib.breathe`` in the wide net (8 slots per layer, kink init), the 5-wide
    result extracted, Adam on the leftover budget, then the LM polish."""
    plan = breathing_plan(budget, prob.depth, prob.width)
    wide = problem(plan["slots"], prob.depth)
    res = qo.contrib.breathe(
        wide.kink_init(), wide.apply, wide.loss_fn, prob.task.x, nets=nets, key=key,
        width=prob.width, cycles=plan["cycles"], start_steps=plan["start_steps"],
        cycle_steps=plan["cycle_steps"], refit_steps=plan["refit_steps"],
        polish_steps=plan["polish_steps"], progress=progress)
    like = prob.he_init(jax.random.key(0))
    narrow = jax.jit(jax.vmap(lambda p: qo.contrib.extract_units(
        wide.apply, p, prob.task.x, like)))(res.params)
    evals = float(np.max(res.evals[:, -1]))
    q = np.quantile(res.history, [0.1, 0.5, 0.9], axis=0)
    rest = Method(method.name, method.label, method.group, "given", (
        Phase("adam", _cosine(1.5e-3)), LM))
    tail = train_phases(prob, rest, narrow, nets=nets, budget=int(budget - evals), key=key,
                        cache=cache, tag=tag, progress=progress)
    return {
        **tail,
        "grad_evals": evals + tail["grad_evals"],
        "wall_s": res.wall_time + tail["wall_s"],
        "phases": [{"label": "breathe", "plan": plan, "evals_max": evals,
                    "evals_mean": float(np.mean(res.evals[:, -1])),
                    "acceptance_per_cycle": res.accepted.mean(0).tolist(),
                    "median_per_cycle": np.median(res.history, 0).tolist(),
                    "wall_s": res.wall_time}] + tail["phases"],
        "curve_evals": np.concatenate([res.evals.mean(0), evals + tail["curve_evals"]]),
        "curve_q": np.concatenate([q, tail["curve_q"]], axis=1),
    }


METHODS["breathing"] = Method(
    "breathing", "breathing 5↔8 + Adam + LM", "new", "kink", (), custom=run_breathing)
DEFAULT_METHODS = list(METHODS)
QUICK_METHODS = ["sgd_momentum", "adadelta", "adam", "kink_adam_lm"]


def allocate(method: Method, budget: int) -> list[tuple[Phase, int]]:
    """Steps per phase so that the evaluations add up to at most ``budget``."""
    fixed = sum(ph.steps * ph.evals_per_step for ph in method.phases if ph.steps is not None)
    free = [ph for ph in method.phases if ph.steps is None]
    if fixed > budget:
        raise ValueError(f"{method.name}: its fixed phases need {fixed:.0f} > {budget} evaluations")
    out = []
    for ph in method.phases:
        if ph.steps is None:
            steps = int((budget - fixed) // (ph.evals_per_step * len(free)))
        else:
            steps = ph.steps
        out.append((ph, steps))
    return out


# --------------------------------------------------------------------------- running


def summarize(losses: np.ndarray) -> dict[str, Any]:
    f = np.where(np.isfinite(losses), losses, np.inf)
    return {
        "median_final_mse": float(np.median(f)),
        "best_final_mse": float(np.min(f)),
        "q10_final_mse": float(np.quantile(f, 0.1)),
        "q90_final_mse": float(np.quantile(f, 0.9)),
        "exact_fit_rate": float(np.mean(f <= EXACT)),
        "exact_fits": int(np.sum(f <= EXACT)),
        "below_1e-5_rate": float(np.mean(f <= 1e-5)),
        "nonfinite": int(np.sum(~np.isfinite(losses))),
    }


def _slug(*parts: Any) -> str:
    s = "_".join(str(p) for p in parts)
    return "".join(c if c.isalnum() or c in "-." else "_" for c in s)


def train_phases(
    prob: Problem,
    method: Method,
    init: Any,
    *,
    nets: int,
    budget: int,
    key: jax.Array,
    cache: str | None,
    tag: str,
    progress: bool,
) -> dict[str, Any]:
    """Runs a method's phases with ``qo.train_population``; returns losses, params, curves."""
    params = init
    evals = 0.0
    curve_x, curve_q = [], []
    wall = 0.0
    phases = []
    res = None
    for i, (ph, steps) in enumerate(allocate(method, budget)):
        tx = ph.make(prob, steps)
        ckpt = os.path.join(cache, "ckpt", f"{tag}_phase{i}") if cache else None
        res = qo.train_population(
            tx, params, prob.loss_fn, nets=nets, steps=steps, key=key, checkpoint=ckpt,
            progress=progress, history_every=max(1, steps // 50), fast_path=FAST_PATH,
        )
        hist = res.history
        if hist.shape[1]:
            curve_x.append(evals + res.history_steps * ph.evals_per_step)
            curve_q.append(np.quantile(hist, [0.1, 0.5, 0.9], axis=0))
        evals += steps * ph.evals_per_step
        wall += res.wall_time
        phases.append({"label": ph.label, "steps": steps, "evals_per_step": ph.evals_per_step,
                       "wall_s": res.wall_time, "fast_path": res.fast_path})
        params = res.params
    losses = np.asarray(res.losses, np.float64)
    curve_x.append(np.array([evals]))
    curve_q.append(np.quantile(losses, [0.1, 0.5, 0.9])[:, None])
    return {
        "losses": losses,
        "params": params,
        "grad_evals": evals,
        "wall_s": wall,
        "phases": phases,
        "curve_evals": np.concatenate(curve_x),
        "curve_q": np.concatenate(curve_q, axis=1),
    }


def _predict(prob: Problem, params: Any, xs: np.ndarray, batch: int = 1024) -> np.ndarray:
    """``(nets, len(xs))`` outputs of every network on ``xs``."""
    f = jax.jit(jax.vmap(lambda p: prob.apply(p, jnp.asarray(xs[:, None], jnp.float32))[:, 0]))
    n = jax.tree.leaves(params)[0].shape[0]
    out = [np.asarray(f(jax.tree.map(lambda a: a[i : i + batch], params)))
           for i in range(0, n, batch)]
    return np.concatenate(out, 0)


def _cached(path: str | None, compute: Callable[[], dict[str, Any]]) -> dict[str, Any]:
    if path and os.path.exists(path):
        with np.load(path, allow_pickle=False) as d:
            out = {k: d[k] for k in d.files}
        out["meta"] = json.loads(str(out["meta"]))
        return out
    out = compute()
    if path:
        os.makedirs(os.path.dirname(path), exist_ok=True)
        arrays = {k: v for k, v in out.items() if k != "meta"}
        tmp = path + ".tmp.npz"
        np.savez(tmp, meta=json.dumps(out["meta"]), **arrays)
        os.replace(tmp, path)
    return out


def run_method(prob: Problem, method: Method, *, nets: int, budget: int, seed: int,
               cache: str | None, progress: bool) -> dict[str, Any]:
    """One row of the table: summary, curves, mean/std/best fit on a grid (cached)."""
    tag = _slug("main", method.name, f"w{prob.width}", f"n{nets}", f"b{budget}", f"s{seed}")
    path = os.path.join(cache, tag + ".npz") if cache else None

    def compute() -> dict[str, Any]:
        key = jax.random.key(seed)
        init = prob.kink_init() if method.init == "kink" else prob.he_init
        run = method.custom or train_phases
        r = run(prob, method, init, nets=nets, budget=budget, key=key, cache=cache, tag=tag,
                progress=progress)
        xs = np.linspace(0, 1, GRID)
        pred = _predict(prob, r["params"], xs)
        ok = np.all(np.isfinite(pred), axis=1)
        best = int(np.argmin(np.where(np.isfinite(r["losses"]), r["losses"], np.inf)))
        meta = {
            "nets": nets, "steps": budget, "grad_evals": r["grad_evals"],
            "grad_evals_total": r["grad_evals"] * nets, "wall_s": r["wall_s"],
            "net_evals_per_s": nets * r["grad_evals"] / r["wall_s"],
            "phases": r["phases"], "label": method.label, "group": method.group,
            "init": method.init, **summarize(r["losses"]),
        }
        return {
            "meta": meta, "losses": r["losses"], "curve_evals": r["curve_evals"],
            "curve_q": r["curve_q"], "grid_mean": pred[ok].mean(0), "grid_std": pred[ok].std(0),
            "grid_best": pred[best],
        }

    return _cached(path, compute)


# --------------------------------------------------------------------------- basin (§4.8)

BASIN_METHODS = ["sgd_momentum", "adadelta", "adam", "quotient_adam", "path_sgd",
                 "rebalance_adam", "lm", "adam_lm"]
QUICK_BASIN = ["adam", "lm"]
R_MIN, R_MAX = 0.003, 3.0
LM_BASIN_STEPS = 150

#: the basin's LM-only method (no first-order phase)
BASIN_EXTRA = {"lm": Method("lm", "Levenberg-Marquardt only", "new", "exact+noise",
                            (Phase("Levenberg-Marquardt", _lm, 3.0, LM_BASIN_STEPS),))}


def basin_center(prob: Problem) -> Any:
    """The exact weights, balanced to the minimal-energy point of their orbit (as the paper)."""
    exact = qo.models.with_dense_weights(prob.model, prob.task.weights)
    center, _ = qo.canonicalize(prob.sym, exact)
    return center


def basin_init(center: Any) -> Callable[[jax.Array], Any]:
    """``key -> center + r·u``: ``u`` a uniform random unit direction, ``r`` log-uniform."""
    leaves, treedef = jax.tree.flatten(center)

    def init(key: jax.Array) -> Any:
        kr, kd = jax.random.split(key)
        r = jnp.exp(jax.random.uniform(kr, (), jnp.float32, math.log(R_MIN), math.log(R_MAX)))
        ks = jax.random.split(kd, len(leaves))
        eps = [jax.random.normal(k, a.shape, a.dtype) for k, a in zip(ks, leaves)]
        norm = jnp.sqrt(sum(jnp.sum(e * e) for e in eps))
        return treedef.unflatten([a + (r / norm) * e for a, e in zip(leaves, eps)])

    return init


def run_basin_method(prob: Problem, method: Method, *, nets: int, budget: int, seed: int,
                     cache: str | None, progress: bool) -> dict[str, Any]:
    tag = _slug("basin", method.name, f"n{nets}", f"b{budget}", f"s{seed}")
    path = os.path.join(cache, tag + ".npz") if cache else None

    def compute() -> dict[str, Any]:
        center = basin_center(prob)
        init = basin_init(center)
        key = jax.random.key(seed + 1)
        keys = jax.vmap(lambda i: jax.random.fold_in(key, i))(jnp.arange(nets, dtype=jnp.uint32))
        starts = jax.vmap(init)(keys)
        radius = np.sqrt(sum(np.sum((np.asarray(a) - np.asarray(c)[None]) ** 2,
                                    axis=tuple(range(1, np.ndim(a))))
                             for a, c in zip(jax.tree.leaves(starts), jax.tree.leaves(center))))
        b = budget if method.name != "lm" else int(LM_BASIN_STEPS * 3)
        r = train_phases(prob, method, init, nets=nets, budget=b, key=key, cache=cache,
                         tag=tag, progress=progress)
        meta = {"nets": nets, "grad_evals": r["grad_evals"], "wall_s": r["wall_s"],
                "label": method.label, **summarize(r["losses"])}
        return {"meta": meta, "radius": radius, "losses": r["losses"]}

    return _cached(path, compute)


def basin_table(radius: np.ndarray, losses: np.ndarray) -> dict[str, Any]:
    """Per radius bin (log-spaced): share of networks ending ≤ 1e-10 and ≤ 1e-8."""
    edges = np.geomspace(R_MIN, R_MAX, 9)
    rows = []
    for lo, hi in zip(edges[:-1], edges[1:]):
        m = (radius >= lo) & (radius < hi)
        if m.any():
            rows.append({"r_lo": float(lo), "r_hi": float(hi), "n": int(m.sum()),
                         "exact_rate": float(np.mean(losses[m] <= EXACT)),
                         "below_1e-8_rate": float(np.mean(losses[m] <= 1e-8)),
                         "median": float(np.median(losses[m]))})
    return {"bins": rows,
            "radius_50pct_below_1e-8": _radius_at(rows, "below_1e-8_rate"),
            "radius_50pct_exact": _radius_at(rows, "exact_rate")}


def _radius_at(rows: list[dict[str, Any]], key: str) -> float | None:
    """Upper edge of the last bin (from small r) where at least half the networks succeed."""
    r = None
    for row in rows:
        if row[key] >= 0.5:
            r = row["r_hi"]
        else:
            break
    return r


# --------------------------------------------------------------------------- wide (§4.10)

WIDE_WIDTHS = (5, 6, 8, 12)
WIDE_METHODS = ["adadelta", "adam", "kink_adam_lm"]


def run_wide(widths, methods, *, nets, budget, seed, cache, progress) -> dict[str, Any]:
    out: dict[str, Any] = {}
    for w in widths:
        prob = problem(w, 5)
        for name in methods:
            r = run_method(prob, METHODS[name], nets=nets, budget=budget, seed=seed, cache=cache,
                           progress=progress)
            out.setdefault(str(w), {})[name] = r
    return out


# --------------------------------------------------------------------------- figures


def _plt():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def _target(xs: np.ndarray) -> np.ndarray:
    task = problem().task
    return np.interp(xs, np.asarray(task.x[:, 0]), np.asarray(task.y[:, 0]))


def _grid_axes(plt, n: int, w: float = 4.2, h: float = 2.8):
    cols = min(n, 3)
    rows = -(-n // cols)
    fig, axes = plt.subplots(rows, cols, figsize=(w * cols, h * rows), squeeze=False,
                             sharex=True, sharey=True)
    for ax in axes.flat[n:]:
        ax.set_visible(False)
    return fig, list(axes.flat[:n])


def plot_main(results: dict[str, Any], out: str) -> list[str]:
    plt = _plt()
    xs = np.linspace(0, 1, GRID)
    target = _target(xs)
    task = problem().task
    names = list(results)
    files = []

    # Fig. 3: average fit ± 1 std
    fig, axes = _grid_axes(plt, len(names))
    for ax, name in zip(axes, names):
        r = results[name]
        m, s = r["grid_mean"], r["grid_std"]
        ax.plot(xs, target, color="0.6", lw=0.8, label="target")
        ax.plot(xs, m, color="C0", lw=1.2, label="mean fit")
        ax.fill_between(xs, m - s, m + s, color="C0", alpha=0.25, label="± 1 std")
        ax.set_title(f"{r['meta']['label']} ({r['meta']['nets']} nets)", fontsize=9)
    axes[0].legend(fontsize=7, loc="upper left")
    fig.suptitle("Average fit ± 1 std over the networks (paper Fig. 3)")
    fig.tight_layout()
    files.append(_save(fig, out, "sawtooth_average_fit.png"))

    # Fig. 4: best fit
    fig, axes = _grid_axes(plt, len(names))
    for ax, name in zip(axes, names):
        r = results[name]
        ax.plot(xs, target, color="0.6", lw=0.8, label="target")
        ax.plot(xs, r["grid_best"], color="C3", lw=1.0, label="best fit")
        ax.plot(np.asarray(task.x[:, 0]), np.asarray(task.y[:, 0]), ".", ms=2, color="k")
        ax.set_title(f"{r['meta']['label']}: MSE {r['meta']['best_final_mse']:.2e}", fontsize=9)
    axes[0].legend(fontsize=7, loc="upper left")
    fig.suptitle("Best fit per method (paper Fig. 4); dots: the 137 training points")
    fig.tight_layout()
    files.append(_save(fig, out, "sawtooth_best_fit.png"))

    # Fig. 5: histograms of final losses
    fig, axes = _grid_axes(plt, len(names), h=2.4)
    lo = min(np.log10(max(np.min(results[n]["losses"]), 1e-16)) for n in names)
    hi = max(np.log10(np.max(np.where(np.isfinite(results[n]["losses"]),
                                      results[n]["losses"], 1e-16))) for n in names)
    for ax, name in zip(axes, names):
        r = results[name]
        v = np.log10(np.maximum(r["losses"], 1e-16))
        ax.hist(v, bins=60, range=(lo - 0.1, hi + 0.1), color="C2")
        ax.axvline(np.log10(EXACT), color="k", ls="--", lw=0.8)
        ax.axvline(np.log10(r["meta"]["median_final_mse"]), color="C3", lw=0.8)
        ax.set_title(f"{r['meta']['label']}: median {r['meta']['median_final_mse']:.2e}",
                     fontsize=9)
        ax.set_xlabel("log10 final MSE", fontsize=8)
    fig.suptitle("Final losses (paper Fig. 5); red: median, dashed: exact fit (1e-10)")
    fig.tight_layout()
    files.append(_save(fig, out, "sawtooth_loss_hist.png"))

    # loss against gradient evaluations
    fig, ax = plt.subplots(figsize=(8, 5))
    for i, name in enumerate(names):
        r = results[name]
        x = r["curve_evals"]
        q = r["curve_q"]
        (line,) = ax.loglog(np.maximum(x, 1), q[1], label=r["meta"]["label"], color=f"C{i % 10}",
                            ls="-" if i < 10 else "--")
        ax.fill_between(np.maximum(x, 1), q[0], q[2], color=line.get_color(), alpha=0.08)
    ax.set(xlabel="gradient evaluations per network", ylabel="MSE (median; band 10–90%)",
           title="Training curves at equal gradient evaluations")
    ax.legend(fontsize=7)
    fig.tight_layout()
    files.append(_save(fig, out, "sawtooth_curves.png"))
    return files


def plot_basin(basin: dict[str, Any], out: str) -> str:
    plt = _plt()
    names = list(basin)
    fig, axes = _grid_axes(plt, len(names), w=4.0, h=3.0)
    for ax, name in zip(axes, names):
        r = basin[name]
        ax.loglog(r["radius"], np.maximum(r["losses"], 1e-16), ".", ms=2.5, alpha=0.6)
        ax.axhline(EXACT, color="k", ls="--", lw=0.8)
        ax.set_title(f"{r['meta']['label']} ({r['meta']['grad_evals']:.0f} evals)", fontsize=9)
        ax.set_xlabel("noise norm r", fontsize=8)
        ax.set_ylabel("final MSE", fontsize=8)
    fig.suptitle("Basin of the exact fit (paper Fig. 12): exact weights (balanced) + noise "
                 "of norm r, retrained")
    fig.tight_layout()
    return _save(fig, out, "sawtooth_basin.png")


def plot_wide(wide: dict[str, Any], out: str) -> str:
    plt = _plt()
    xs = np.linspace(0, 1, GRID)
    target = _target(xs)
    widths = list(wide)
    methods = list(next(iter(wide.values())))
    fig, axes = plt.subplots(2, len(widths), figsize=(4.0 * len(widths), 6.0), squeeze=False)
    for j, w in enumerate(widths):
        ax = axes[0, j]
        ax.plot(xs, target, color="0.6", lw=0.8)
        for i, name in enumerate(methods):
            r = wide[w][name]
            ax.plot(xs, r["grid_best"], lw=0.9, color=f"C{i}",
                    label=f"{name}: {r['meta']['best_final_mse']:.1e}")
        ax.set_title(f"width {w}: best fits", fontsize=9)
        ax.legend(fontsize=7, loc="upper left")
        ax = axes[1, j]
        for i, name in enumerate(methods):
            v = np.log10(np.maximum(wide[w][name]["losses"], 1e-16))
            ax.hist(v, bins=50, range=(-12, -1.5), histtype="step", color=f"C{i}", label=name)
        ax.axvline(np.log10(EXACT), color="k", ls="--", lw=0.8)
        ax.set_xlabel("log10 final MSE", fontsize=8)
        ax.set_title(f"width {w}: final losses", fontsize=9)
    axes[1, 0].legend(fontsize=7)
    fig.suptitle("Wider networks, 5 hidden layers (paper §4.10, Fig. 15)", fontsize=10)
    fig.tight_layout()
    return _save(fig, out, "sawtooth_wide.png")


def _save(fig, out: str, name: str) -> str:
    path = os.path.join(out, name)
    fig.savefig(path, dpi=100)
    _plt().close(fig)
    return path


# --------------------------------------------------------------------------- main


def _parse_methods(spec: str | None, default: list[str]) -> list[tuple[str, int | None]]:
    if not spec:
        return [(m, None) for m in default]
    out = []
    for item in spec.split(","):
        name, _, n = item.strip().partition(":")
        if name not in METHODS and name not in BASIN_EXTRA:
            raise SystemExit(f"unknown method {name!r}; known: {', '.join(METHODS)}")
        out.append((name, int(n) if n else None))
    return out


def table(results: dict[str, Any], best_baseline: float | None) -> str:
    lines = ["| method | nets | grad evals/net | exact fits (≤1e-10) | median final MSE | "
             "× best baseline | best final MSE | wall s | net-evals/s |",
             "|---|---|---|---|---|---|---|---|---|"]
    for name, r in results.items():
        m = r["meta"]
        ratio = m["median_final_mse"] / best_baseline if best_baseline else float("nan")
        lines.append(
            f"| {m['label']} | {m['nets']} | {m['grad_evals']:.0f} | "
            f"{m['exact_fits']}/{m['nets']} ({100 * m['exact_fit_rate']:.2f}%) | "
            f"{m['median_final_mse']:.3e} | {ratio:.3f} | {m['best_final_mse']:.2e} | "
            f"{m['wall_s']:.0f} | {m['net_evals_per_s']:.0f} |")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> dict[str, Any]:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--quick", action="store_true", help="CI-sized (< 1 min)")
    ap.add_argument("--nets", type=int, default=None, help="networks per method (1024)")
    ap.add_argument("--slow-nets", type=int, default=None,
                    help="networks for the slow (quotient) methods (256)")
    ap.add_argument("--steps", type=int, default=None,
                    help="gradient evaluations per network (20000)")
    ap.add_argument("--methods", default=None, help="comma-separated, each name[:nets]")
    ap.add_argument("--parts", default="main,basin,wide", help="main, basin, wide")
    ap.add_argument("--basin-nets", type=int, default=None, help="networks per basin method (256)")
    ap.add_argument("--basin-steps", type=int, default=None, help="evaluations per basin net (5000)")
    ap.add_argument("--basin-methods", default=None)
    ap.add_argument("--wide-nets", type=int, default=None, help="networks per width (256)")
    ap.add_argument("--wide-steps", type=int, default=None, help="evaluations (the --steps)")
    ap.add_argument("--wide-widths", default=None, help="comma-separated widths (5,6,8,12)")
    ap.add_argument("--wide-methods", default=None)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--json", default=None, help="write the results (no arrays) here")
    ap.add_argument("--out", default=None, help="write the PNGs here")
    ap.add_argument("--cache", default=None,
                    help="cache each run (and train_population checkpoints) here; resumable")
    ap.add_argument("--no-progress", action="store_true")
    args = ap.parse_args(argv)
    q = args.quick
    nets = args.nets or (16 if q else 1024)
    slow_nets = args.slow_nets or (8 if q else 256)
    budget = args.steps or (400 if q else 20_000)
    parts = [p for p in args.parts.split(",") if p]
    progress = not (args.no_progress or q)
    global FAST_PATH
    FAST_PATH = False if q else None
    if args.out:
        os.makedirs(args.out, exist_ok=True)
    t_start = time.perf_counter()
    summary: dict[str, Any] = {
        "task": {"model": "qo.models.SawtoothNet (1 -> 5x5 ReLU -> 1, 136 params)",
                 "data": "qo.models.sawtooth_task(): 137 points, full batch, float32",
                 "exact_fit": f"final MSE <= {EXACT:g}",
                 "target_variance": float(np.var(np.asarray(problem().task.y)))},
        "config": {"steps": budget, "nets": nets, "slow_nets": slow_nets, "seed": args.seed,
                   "quick": q, "lm_steps": LM_STEPS, "counting": {
                       "optimizer step": 1, "Levenberg-Marquardt iteration": 3,
                       "teleport ascent step": 2, "canonicalization/projection": 0}},
        "cpu": tp.cpu_peak(), "load_before": tp.load(), "jax": jax.__version__,
    }
    files: list[str] = []
    prob = problem()
    if "main" in parts:
        chosen = _parse_methods(args.methods, QUICK_METHODS if q else DEFAULT_METHODS)
        results = {}
        for name, n in chosen:
            m = METHODS[name]
            n = n or (slow_nets if m.slow else nets)
            print(f"[main] {name}: {n} nets x {budget} evals", file=sys.stderr, flush=True)
            results[name] = run_method(prob, m, nets=n, budget=budget, seed=args.seed,
                                       cache=args.cache, progress=progress)
        base = [results[b]["meta"]["median_final_mse"] for b in BASELINES if b in results]
        best_baseline = min(base) if base else None
        summary["methods"] = {}
        for name, r in results.items():
            meta = dict(r["meta"])
            if best_baseline:
                meta["median_over_best_baseline"] = meta["median_final_mse"] / best_baseline
            summary["methods"][name] = meta
        summary["best_baseline_median"] = best_baseline
        print(table(results, best_baseline))
        if args.out:
            files += plot_main(results, args.out)
    if "basin" in parts:
        names = [n for n, _ in _parse_methods(args.basin_methods,
                                               QUICK_BASIN if q else BASIN_METHODS)]
        b_nets = args.basin_nets or (16 if q else 256)
        b_steps = args.basin_steps or (300 if q else 5000)
        basin = {}
        for name in names:
            m = BASIN_EXTRA.get(name) or METHODS[name]
            print(f"[basin] {name}: {b_nets} nets", file=sys.stderr, flush=True)
            basin[name] = run_basin_method(prob, m, nets=b_nets, budget=b_steps, seed=args.seed,
                                           cache=args.cache, progress=progress)
        summary["basin"] = {
            "center": "task.weights balanced by qo.canonicalize (min-energy point of the orbit)",
            "radius": f"log-uniform in [{R_MIN}, {R_MAX}]", "steps": b_steps,
            "methods": {k: {**v["meta"], **basin_table(v["radius"], v["losses"])}
                        for k, v in basin.items()}}
        for k, v in summary["basin"]["methods"].items():
            print(f"basin {k:16s} evals {v['grad_evals']:6.0f}: r with >=50% below 1e-8: "
                  f"{v['radius_50pct_below_1e-8']}, exact: {v['radius_50pct_exact']}")
        if args.out:
            files.append(plot_basin(basin, args.out))
    if "wide" in parts:
        widths = [int(w) for w in (args.wide_widths or ("8" if q else "5,6,8,12")).split(",")]
        wm = [n for n, _ in _parse_methods(args.wide_methods, ["adam"] if q else WIDE_METHODS)]
        w_nets = args.wide_nets or (8 if q else 256)
        w_steps = args.wide_steps or budget
        wide = run_wide(widths, wm, nets=w_nets, budget=w_steps, seed=args.seed,
                        cache=args.cache, progress=progress)
        summary["wide"] = {"nets": w_nets, "steps": w_steps, "widths": {
            w: {k: v["meta"] for k, v in per.items()} for w, per in wide.items()}}
        for w, per in wide.items():
            for k, v in per.items():
                m = v["meta"]
                print(f"wide w={w:>2s} {k:14s} median {m['median_final_mse']:.2e} best "
                      f"{m['best_final_mse']:.2e} exact {m['exact_fits']}/{m['nets']}")
        if args.out:
            files.append(plot_wide(wide, args.out))
    if not q and "main" in parts:
        init_fn, loss_fn = tp.problem()[:2]
        summary["throughput"] = tp.full_api_run(optax.adam(1e-3), init_fn, loss_fn,
                                                nets=1024, steps=3000)
    else:
        summary["throughput"] = {}
    if "methods" in summary:
        summary["throughput"]["per_method_net_evals_per_s"] = {
            k: v["net_evals_per_s"] for k, v in summary["methods"].items()}
    summary["load_after"] = tp.load()
    summary["wall_s"] = time.perf_counter() - t_start
    summary["files"] = [os.path.basename(f) for f in files]
    for f in files:
        print("wrote", f)
    if args.json:
        with open(args.json, "w") as fh:
            json.dump(summary, fh, indent=1, default=float)
    return summary


if __name__ == "__main__":
    main()
