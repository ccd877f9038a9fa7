"""The MaxPool stall over many seeds: plain Adam against the library's mechanisms.

The question's set-up (``shared/references/maxpool-stall-question.txt``):
``Linear(2 → 2)`` then a max over the two outputs, PyTorch-style uniform init,
1000 points ``X ~ U[0, 1]^2``, ``y = max(x + 2y, 3x + y)``, Adam lr 0.02,
4000 full-batch steps. Also the max of 3 planes in 3-D (3 pieces) and of 4
planes in 2-D (4 pieces), every plane the maximum somewhere on the data.

All seeds of one (task, method) pair train in one ``jax.vmap`` over seeds of a
``lax.scan`` over steps. Success = final MSE < 1e-6.

    python -m benchmarks.maxpool [--quick] [--seeds N] [--steps T] [--json PATH] [--out DIR]
    python -m benchmarks.maxpool --check   # CI: revival beats plain Adam (run by .ci/run)

With ``--out DIR`` each (task, method) result is cached in ``DIR`` and skipped
when present (resumable), and PNGs of the loss curves (median, 10–90% band)
and of the final-MSE histograms are written there.
"""

from __future__ import annotations

import argparse
import json
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
from quotient_opt.models import MaxPoolNet, functional, max_of_planes_task, maxpool_task, mse

THRESHOLD = 1e-6
LEARNING_RATE = 0.02

#: name -> (pieces, planes (k, d), offsets (k,)); the first is the question's task.
TASKS: dict[str, tuple[int, list[list[float]], list[float] | None]] = {
    "question (2 pieces, 2-D)": (2, [[1.0, 2.0], [3.0, 1.0]], None),
    "3 planes, 3-D": (3, [[1.0, 2.0, 0.5], [3.0, 1.0, 0.0], [0.5, 0.5, 3.0]], None),
    "4 planes, 2-D": (4, [[1, 1], [3, 1], [1, 3], [3, 3]], [-0.25, -1.25, -1.25, -2.25]),
}

#: Settings of ``qo.revive_dead_units`` used here.
REVIVE = dict(patience=10, every=50)
#: The periodic window polish (``polish_every``) of the "+ polish" rows.
POLISH_EVERY = 50


def make_task(name: str) -> tuple[qo.models.MaxTask, int, int]:
    """``(task, pieces, in_features)`` for one of :data:`TASKS`."""
    pieces, planes, offsets = TASKS[name]
    if name.startswith("question"):
        task = maxpool_task()
    else:
        task = max_of_planes_task(planes, offsets)
    return task, pieces, task.x.shape[1]


def methods(sym: qo.Symmetry) -> dict[str, Callable[[jax.Array], Any]]:
    """``{name: seed -> optimizer}``: plain Adam and AMSGrad, with and without revival.

    AMSGrad (Adam with the running maximum of the second moment) is here
    because plain Adam at a constant learning rate does not stay at an exact
    fit: once the gradient vanishes its second moment decays, the effective
    step grows and the loss spikes (to about 1e-5 here) every few hundred
    steps. AMSGrad's second moment never decreases, so it does not spike.
    """
    adam = lambda: optax.adam(LEARNING_RATE)  # noqa: E731
    ams = lambda: optax.amsgrad(LEARNING_RATE)  # noqa: E731
    revive = qo.revive_dead_units
    return {
        "adam": lambda s: adam(),
        "adam + revive_dead_units": lambda s: revive(adam(), sym, seed=s, **REVIVE),
        "adam + revive + polish": lambda s: revive(
            adam(), sym, seed=s, polish_every=POLISH_EVERY, **REVIVE
        ),
        "amsgrad": lambda s: ams(),
        "amsgrad + revive + polish": lambda s: revive(
            ams(), sym, seed=s, polish_every=POLISH_EVERY, **REVIVE
        ),
    }


def train(
    task: qo.models.MaxTask,
    pieces: int,
    make_tx: Callable[[jax.Array], Any],
    seeds: np.ndarray,
    steps: int,
) -> tuple[np.ndarray, np.ndarray]:
    """Trains one MaxPoolNet per seed (vmap over seeds, scan over steps).

    Returns:
      ``(losses (seeds, steps), final (seeds,))``: the loss before each step
      and the loss after the last one.
    """
    d = task.x.shape[1]
    apply, _ = functional(MaxPoolNet(pieces, 1, d, rngs=nnx.Rngs(0)))

    def loss(p: Any) -> jax.Array:
        return mse(apply(p, task.x), task.y)

    def one(seed: jax.Array) -> tuple[jax.Array, jax.Array]:
        model = MaxPoolNet(pieces, 1, d, rngs=nnx.Rngs(params=jax.random.key(seed)))
        params = nnx.state(model, nnx.Param)
        params, _, losses = qo.fit(make_tx(seed), params, loss, steps)
        return losses, loss(params)

    # Full float32 matmuls: GPUs default to TF32, whose rounding alone puts
    # the MSE floor near 1e-7, too close to the 1e-6 success threshold.
    with jax.default_matmul_precision("highest"):
        losses, final = jax.jit(jax.vmap(one))(jnp.asarray(seeds, jnp.int32))
    return np.asarray(losses), np.asarray(final)


def summarize(losses: np.ndarray, final: np.ndarray) -> dict[str, Any]:
    """Success rate, median final MSE, median steps to MSE < 1e-6, loss-curve quantiles."""
    ok = final < THRESHOLD
    below = losses < THRESHOLD
    hit = below.any(axis=1)
    first = np.where(hit, below.argmax(axis=1), -1)
    q10, q50, q90 = np.quantile(losses, [0.1, 0.5, 0.9], axis=0)
    return {
        "seeds": int(final.size),
        "success_rate": float(ok.mean()),
        "rate_below_1e-4": float((final < 1e-4).mean()),
        "median_final_mse": float(np.median(final)),
        "median_steps_to_1e-6": float(np.median(first[hit])) if hit.any() else None,
        "final_mse": final.tolist(),
        "curve": {"q10": q10.tolist(), "q50": q50.tolist(), "q90": q90.tolist()},
    }


def run(
    *,
    seeds: int,
    steps: int,
    tasks: list[str] | None = None,
    only: list[str] | None = None,
    out: str | None = None,
    progress: bool = True,
) -> dict[str, dict[str, dict[str, Any]]]:
    """Runs every (task, method) pair; cached per pair in ``out`` when given."""
    from tqdm.auto import tqdm

    tasks = list(TASKS) if tasks is None else tasks
    plan = []
    for tname in tasks:
        task, pieces, d = make_task(tname)
        sym = qo.infer_symmetry(MaxPoolNet(pieces, 1, d, rngs=nnx.Rngs(0)))
        for mname, make in methods(sym).items():
            if only is None or mname in only:
                plan.append((tname, task, pieces, mname, make))
    results: dict[str, dict[str, dict[str, Any]]] = {}
    bar = tqdm(plan, desc="maxpool", disable=not progress, file=sys.stderr)
    for tname, task, pieces, mname, make in bar:
        bar.set_postfix_str(f"{tname} | {mname}")
        cache = None
        if out:
            slug = "".join(c if c.isalnum() else "_" for c in f"{tname}__{mname}")
            cache = os.path.join(out, f"{slug}__s{seeds}_t{steps}.json")
        if cache and os.path.exists(cache):
            with open(cache) as f:
                res = json.load(f)
        else:
            t0 = time.perf_counter()
            losses, final = train(task, pieces, make, np.arange(seeds), steps)
            res = summarize(losses, final)
            res["seconds"] = time.perf_counter() - t0
            if cache:
                with open(cache, "w") as f:
                    json.dump(res, f)
        results.setdefault(tname, {})[mname] = res
    return results


def table(results: dict[str, dict[str, dict[str, Any]]]) -> str:
    """The results as a markdown table."""
    lines = [
        "| task | method | success (MSE < 1e-6) | MSE < 1e-4 | median final MSE "
        "| median steps to 1e-6 | seconds |",
        "|---|---|---|---|---|---|---|",
    ]
    for tname, per in results.items():
        for mname, r in per.items():
            steps = r["median_steps_to_1e-6"]
            lines.append(
                f"| {tname} | {mname} | {100 * r['success_rate']:.1f}% of {r['seeds']} "
                f"| {100 * r['rate_below_1e-4']:.1f}% | {r['median_final_mse']:.2e} "
                f"| {'-' if steps is None else int(steps)} | {r.get('seconds', 0):.0f} |"
            )
    return "\n".join(lines)


def plot(results: dict[str, dict[str, dict[str, Any]]], out: str) -> list[str]:
    """Loss curves (median and 10–90% band) and final-MSE histograms, one PNG each per task."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    files = []
    for tname, per in results.items():
        fig, (a1, a2) = plt.subplots(1, 2, figsize=(12, 4.5))
        for mname, r in per.items():
            c = r["curve"]
            x = np.arange(len(c["q50"]))
            (line,) = a1.semilogy(x, c["q50"], label=mname)
            a1.fill_between(x, c["q10"], c["q90"], color=line.get_color(), alpha=0.15)
            fin = np.maximum(np.asarray(r["final_mse"]), 1e-16)
            a2.hist(np.log10(fin), bins=60, range=(-16, 0), histtype="step", label=mname,
                    color=line.get_color())
        a1.axhline(THRESHOLD, color="k", lw=0.5, ls="--")
        a1.set(xlabel="step", ylabel="MSE (median, 10–90% band)", title=tname)
        a2.axvline(np.log10(THRESHOLD), color="k", lw=0.5, ls="--")
        a2.set(xlabel="log10 final MSE", ylabel="seeds", title="final MSE")
        a1.legend(fontsize=8)
        fig.tight_layout()
        slug = "".join(c if c.isalnum() else "_" for c in tname).strip("_")
        path = os.path.join(out, f"maxpool_{slug}.png")
        fig.savefig(path, dpi=110)
        plt.close(fig)
        files.append(path)
    return files


def check(seeds: int = 32, steps: int = 500) -> dict[str, float]:
    """The CI check (``--check``): revival beats plain Adam on the question's task.

    ``seeds`` seeds, ``steps`` steps: plain Adam has not finished a single run
    by then (its healthy runs need a median of about 2400 steps), most
    revived runs have. Raises ``SystemExit`` unless Adam +
    ``revive_dead_units`` solves at least 40% of the seeds and 35 points more
    than plain Adam.
    """
    name = list(TASKS)[0]
    task, pieces, d = make_task(name)
    ms = methods(qo.infer_symmetry(MaxPoolNet(pieces, 1, d, rngs=nnx.Rngs(0))))
    rates = {}
    for m in ("adam", "adam + revive_dead_units"):
        _, final = train(task, pieces, ms[m], np.arange(seeds), steps)
        rates[m] = float(np.mean(final < THRESHOLD))
    revived, plain = rates["adam + revive_dead_units"], rates["adam"]
    ok = revived >= 0.4 and revived >= plain + 0.35
    print(f"maxpool check ({seeds} seeds, {steps} steps): success adam {100 * plain:.1f}%, "
          f"adam + revive_dead_units {100 * revived:.1f}% (needs >= 40% and >= adam + 35): "
          f"{'ok' if ok else 'FAILED'}")
    if not ok:
        raise SystemExit(1)
    return rates


def main(argv: list[str] | None = None) -> dict[str, Any]:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--quick", action="store_true", help="32 seeds, 1500 steps")
    ap.add_argument("--seeds", type=int, default=None, help="seeds per (task, method); 1000")
    ap.add_argument("--steps", type=int, default=None, help="training steps; 4000")
    ap.add_argument("--tasks", type=int, nargs="*", default=None, help="task indices (0, 1, 2)")
    ap.add_argument("--methods", nargs="*", default=None, help="method names to run")
    ap.add_argument("--json", default=None, help="write results here")
    ap.add_argument("--out", default=None, help="cache and PNG directory")
    ap.add_argument("--check", action="store_true",
                    help="CI check only: revival beats plain Adam (32 seeds, 500 steps)")
    args = ap.parse_args(argv)
    if args.check:
        return {"check": check()}
    seeds = args.seeds or (32 if args.quick else 1000)
    steps = args.steps or (1500 if args.quick else 4000)
    names = list(TASKS)
    tasks = None if args.tasks is None else [names[i] for i in args.tasks]
    if args.out:
        os.makedirs(args.out, exist_ok=True)
    results = run(seeds=seeds, steps=steps, tasks=tasks, only=args.methods, out=args.out)
    print(f"MaxPool stall: {seeds} seeds, {steps} full-batch steps, Adam lr {LEARNING_RATE}, "
          f"revive {REVIVE}, polish_every {POLISH_EVERY}")
    print(table(results))
    summary = {
        "seeds": seeds, "steps": steps, "revive": REVIVE, "polish_every": POLISH_EVERY,
        "results": results,
    }
    if args.out:
        for f in plot(results, args.out):
            print("wrote", f)
    if args.json:
        slim = {
            t: {m: {k: v for k, v in r.items() if k not in ("final_mse", "curve")}
                for m, r in per.items()}
            for t, per in results.items()
        }
        with open(args.json, "w") as f:
            json.dump({**summary, "results": slim}, f, indent=1)
    return summary


if __name__ == "__main__":
    main()
