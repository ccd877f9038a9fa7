"""The sawtooth paper's landscape study, redone modulo the network's symmetries.

*The energy landscape of a simple neural network* (``shared/references/
energy-landscape-sawtooth-paper.txt``) fits ``1 → 5×5 ReLU → 1`` networks to a
sawtooth-plus-spline target that a hand-built network fits exactly, and finds
that training never gets there: the fitted minima are all about distance 6–8
from one another, even after symmetrizing (minimal-energy rescaling, then
units sorted), and about 10 from the global minimum. This benchmark redoes
that study and adds the distance on the quotient by the symmetry group
(:func:`quotient_opt.landscape.quotient_distance`: weight matching plus
rescaling), to see how much of those distances is symmetry.

Population: ``--nets`` He-normal inits trained full-batch for ``--steps``
steps by :func:`quotient_opt.train_population`, with SGD + momentum (the
paper's gradient descent) and Adam, in float32. Then, in float64:

* pairwise distances between minima (paper Fig. 6): raw, symmetrized as in the
  paper, permutation-only weight matching of the balanced points, and the
  quotient distance (permutations and rescalings);
* distances from every minimum to the global one, the symmetrized hand-built
  fit (Fig. 7), and the smallest pairwise dot product of the unit directions
  from the global minimum to the minima (§4.5), symmetrized and aligned;
* NEB paths from a few minima to the global one, with and without quotient
  alignment: energy profiles, the network's output along the path, angles
  between successive steps (Figs. 8–10);
* the dense Hessian spectrum at the global minimum and at minima of both
  optimizers, with ReLU (a.e.) and with softplus-smoothed ReLU as in the
  paper, with and without the orbit directions projected out, and the number
  of zero modes (Fig. 11);
* PCA of one training trajectory (raw and balanced) against the random-walk
  baseline.

    python -m benchmarks.landscape [--quick] [--nets N] [--steps T] [--pairs P]
        [--json PATH] [--out DIR]

With ``--out DIR`` the populations are checkpointed under ``DIR/checkpoints``
(an interrupted or repeated run resumes from them) and the figures are
written there as PNGs, each with a Markdown caption beside it (``.md``, used
by the documentation).
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

jax.config.update("jax_enable_x64", True)

import jax.numpy as jnp
import numpy as np
import optax
from flax import nnx
from jax.flatten_util import ravel_pytree

import quotient_opt as qo
from quotient_opt.landscape import (
    canonical_section,
    hessian_spectrum,
    neb,
    orbit_directions,
    quotient_align,
    quotient_distance,
    random_walk_pca,
    symmetrize,
    trajectory_pca,
)
from quotient_opt.models import SawtoothNet, functional, mse, sawtooth_task

#: optimizer name -> (factory, learning rate); SGD + momentum is the paper's.
OPTIMIZERS: dict[str, tuple[Callable[[float], optax.GradientTransformation], float]] = {
    "sgd": (lambda lr: optax.sgd(lr, momentum=0.9), 1e-2),
    "adam": (lambda lr: optax.adam(lr), 1e-3),
}
#: softplus sharpness for the smoothed Hessians (the paper smooths the ReLU too).
BETA = 1000.0
#: NEB set-ups (see :func:`neb_runs`).
NEB_MODES = ("symmetrized", "section", "quotient")
#: a Hessian eigenvalue is a zero mode when |λ| <= ZERO_REL · λ_max.
ZERO_REL = 1e-9

FULL = {"nets": 128, "steps": 10000, "pairs": 400, "neb": 3, "images": 16, "neb_steps": 3000,
        "hessians": 2, "trajectory_steps": 3000, "neb_modes": list(NEB_MODES)}
QUICK = {"nets": 10, "steps": 400, "pairs": 10, "neb": 1, "images": 6, "neb_steps": 150,
         "hessians": 1, "trajectory_steps": 200, "neb_modes": ["symmetrized", "quotient"]}


# --------------------------------------------------------------------------- set-up


class Setup:
    """The task, the model's apply function, its symmetry and the global minimum."""

    def __init__(self) -> None:
        self.task = sawtooth_task(dtype=jnp.float64)
        model = SawtoothNet(rngs=nnx.Rngs(0), param_dtype=jnp.float64)
        self.apply, self.abstract = functional(model)
        self.sym = qo.infer_symmetry(model, self.task.x)
        self.exact = qo.models.with_dense_weights(model, self.task.weights)
        self.x32 = jnp.asarray(self.task.x, jnp.float32)
        self.y32 = jnp.asarray(self.task.y, jnp.float32)
        self.grid = jnp.linspace(0.0, 1.0, 257)[:, None]

    def loss(self, p: Any) -> jax.Array:
        return mse(self.apply(p, self.task.x), self.task.y)

    def loss32(self, p: Any) -> jax.Array:
        return mse(self.apply(p, self.x32), self.y32)

    def init(self, key: jax.Array) -> Any:
        """SawtoothNet's own init in float32: He-normal kernels, zero biases."""
        he = nnx.initializers.he_normal()
        leaves = qo.symmetry.leaves_by_path(self.abstract)
        keys = dict(zip(leaves, jax.random.split(key, len(leaves))))

        def one(path, x):
            if path[-1] == "kernel":
                return he(keys[path], x.shape, jnp.float32)
            return jnp.zeros(x.shape, jnp.float32)

        return qo.symmetry.map_with_path(one, self.abstract)


def to64(tree: Any) -> Any:
    return jax.tree.map(lambda x: jnp.asarray(x, jnp.float64), tree)


def unstack(tree: Any) -> list[Any]:
    n = jax.tree.leaves(tree)[0].shape[0]
    return [jax.tree.map(lambda x, i=i: x[i], tree) for i in range(n)]


def flat(tree: Any) -> np.ndarray:
    return np.asarray(ravel_pytree(tree)[0])


# --------------------------------------------------------------------------- training


def train(
    setup: Setup, name: str, nets: int, steps: int, *, seed: int = 0,
    checkpoint: str | None = None, progress: bool = True,
) -> tuple[Any, np.ndarray]:
    """``nets`` fits in float32 by :func:`quotient_opt.train_population`; ``(params, losses)``.

    With ``checkpoint`` (a directory) an interrupted run resumes, and a
    finished one is read back.
    """
    make, lr = OPTIMIZERS[name]
    res = qo.train_population(make(lr), setup.init, setup.loss32, nets=nets, steps=steps,
                              key=jax.random.key(seed), checkpoint=checkpoint,
                              progress=progress)
    return res.params, np.asarray(res.losses)


# --------------------------------------------------------------------------- distances


class Population:
    """Minima of one optimizer, with what every comparison needs computed once."""

    def __init__(self, setup: Setup, params: Any):
        self.params = unstack(to64(params))
        self.flat = np.stack([flat(p) for p in self.params])
        self.symmetrized = [symmetrize(setup.sym, p) for p in self.params]
        self.sym_flat = np.stack([flat(p) for p in self.symmetrized])
        out = jax.jit(jax.vmap(lambda p: setup.apply(p, setup.grid)[:, 0]))(to64(params))
        self.outputs = np.asarray(out)
        # every unit dead on [0, 1]: the network is a constant (MSE = the target's variance)
        self.constant = self.outputs.std(axis=1) < 1e-9


def _quotient(sym: qo.Symmetry, a: Any, b: Any, **kw: Any) -> Any:
    res = quotient_distance(sym, a, b, **kw)
    return float(res.distance), int(res.iterations), res


def pair_distances(
    setup: Setup, pop: Population, pairs: np.ndarray, progress: bool = True
) -> dict[str, np.ndarray]:
    """Per pair ``(i, j)`` of minima: raw, symmetrized, permutation-only and quotient distances.

    Also the quotient distance the other way round (its asymmetry), the
    iterations, and the RMS difference of the two networks' outputs on
    ``[0, 1]`` (how different the functions are).
    """
    from tqdm.auto import tqdm

    sym = setup.sym
    rows = []
    for i, j in tqdm(pairs, desc="pair distances", disable=not progress, file=sys.stderr):
        a, b = pop.params[i], pop.params[j]
        quot, iters, _ = _quotient(sym, a, b)
        rows.append((
            np.linalg.norm(pop.flat[i] - pop.flat[j]),
            np.linalg.norm(pop.sym_flat[i] - pop.sym_flat[j]),
            _quotient(sym, a, b, rescale=False)[0],
            quot,
            _quotient(sym, b, a)[0],
            iters,
            np.sqrt(np.mean((pop.outputs[i] - pop.outputs[j]) ** 2)),
        ))
    cols = np.asarray(rows, np.float64).T
    names = ("raw", "symmetrized", "permutation", "quotient", "quotient_reversed",
             "iterations", "output_rms")
    return dict(zip(names, cols))


def global_distances(
    setup: Setup, pop: Population, glob: Any, gsym: Any, progress: bool = True
) -> dict[str, Any]:
    """Distances from the global minimum to every minimum, and the §4.5 dot products.

    Directions: from the symmetrized global minimum to each symmetrized
    minimum (the paper's), and from the global minimum's balanced point to
    each minimum aligned with it (the quotient's).
    """
    from tqdm.auto import tqdm

    sym = setup.sym
    g, gs = flat(glob), flat(gsym)
    out: dict[str, Any] = {k: [] for k in ("raw", "symmetrized", "permutation", "quotient")}
    rel = []
    for i in tqdm(range(len(pop.params)), desc="to the global minimum", disable=not progress,
                  file=sys.stderr):
        p = pop.params[i]
        quot, _, res = _quotient(sym, glob, p)
        out["raw"].append(np.linalg.norm(pop.flat[i] - g))
        out["symmetrized"].append(np.linalg.norm(pop.sym_flat[i] - gs))
        out["permutation"].append(_quotient(sym, glob, p, rescale=False)[0])
        out["quotient"].append(quot)
        rel.append(flat(res.aligned) - flat(res.reference))
    out = {k: np.asarray(v) for k, v in out.items()}
    for name, v in (("symmetrized", pop.sym_flat - gs), ("quotient", np.stack(rel))):
        u = v / np.linalg.norm(v, axis=1, keepdims=True)
        out[f"dot_{name}"] = (u @ u.T)[np.triu_indices(len(u), 1)]
    return out


# --------------------------------------------------------------------------- NEB


def neb_runs(
    setup: Setup, minima: list[Any], glob: Any, images: int, steps: int,
    modes: tuple[str, ...] = NEB_MODES, progress: bool = True,
) -> list[dict[str, Any]]:
    """NEB from the symmetrized global minimum to each minimum, in three modes.

    ``symmetrized``: to the symmetrized minimum (the paper's set-up);
    ``section``: the same endpoints, every image kept on the balanced section
    (``project=canonical_section``); ``quotient``: to the minimum aligned
    with the global one (``align=quotient_align``).
    """
    from tqdm.auto import tqdm

    sym = setup.sym
    gsym = symmetrize(sym, glob)
    align = quotient_align(sym)
    section = canonical_section(sym)
    out = []
    out_fn = jax.jit(jax.vmap(lambda p: setup.apply(p, setup.grid)[:, 0]))
    bar = tqdm(total=len(modes) * len(minima), desc="NEB", disable=not progress,
               file=sys.stderr)
    for p in minima:
        row: dict[str, Any] = {}
        b = symmetrize(sym, p)
        for mode in modes:
            res = neb(setup.loss, gsym, b, images=images, steps=steps,
                      align=align if mode == "quotient" else None,
                      project=section if mode == "section" else None)
            pts = np.stack([flat(t) for t in unstack(res.path)])
            steps_v = np.diff(pts, axis=0)
            seg = np.linalg.norm(steps_v, axis=1)
            cos = np.sum(steps_v[1:] * steps_v[:-1], axis=1) / np.maximum(seg[1:] * seg[:-1],
                                                                          1e-300)
            row[mode] = {
                "energies": np.asarray(res.energies).tolist(),
                "barrier_from_local": float(res.energies.max() - res.energies[-1]),
                "barrier": float(res.barrier),
                "max_force": float(res.max_force),
                "length": float(seg.sum()),
                "segments": seg.tolist(),
                "endpoint_distance": float(np.linalg.norm(pts[-1] - pts[0])),
                "angles_deg": np.degrees(np.arccos(np.clip(cos, -1, 1))).tolist(),
                "outputs": np.asarray(out_fn(res.path)).tolist(),
            }
            bar.update()
        out.append(row)
    bar.close()
    return out


# --------------------------------------------------------------------------- Hessians


def spectra(setup: Setup, points: dict[str, Any]) -> dict[str, Any]:
    """Dense Hessian spectra, ReLU and smoothed, with and without the orbit projected out."""
    out = {}
    proj = orbit_directions(setup.sym)
    for name, p in points.items():
        row = {"loss": float(setup.loss(p))}
        for kind, beta in (("relu", None), ("smooth", BETA)):
            full = np.asarray(hessian_spectrum(setup.loss, p, method="dense",
                                               smooth_relu=beta).eigenvalues)
            quot = np.asarray(hessian_spectrum(setup.loss, p, method="dense", smooth_relu=beta,
                                               project_out=proj).eigenvalues)
            top = float(np.max(np.abs(full)))
            row[kind] = {
                "eigenvalues": full.tolist(),
                "eigenvalues_quotient": quot.tolist(),
                "zero_modes": int(np.sum(np.abs(full) <= ZERO_REL * top)),
                "zero_modes_quotient": int(np.sum(np.abs(quot) <= ZERO_REL * top)),
                "negative": int(np.sum(full < -ZERO_REL * top)),
                "orbit_dimension": int(full.size - quot.size),
                "max": top,
                "min_over_max": float(full.min() / top),
            }
        out[name] = row
    return out


# --------------------------------------------------------------------------- trajectory


def trajectory(setup: Setup, steps: int, *, seed: int = 1, snapshots: int = 100) -> dict:
    """PCA of one SGD run (raw and balanced) and the random-walk baseline."""
    make, lr = OPTIMIZERS["sgd"]
    tx = make(lr)
    every = max(steps // snapshots, 1)

    @jax.jit
    def run(key):
        p = setup.init(key)

        def chunk(carry, _):
            p, s = carry
            p, s, _ = qo.fit(tx, p, setup.loss32, every, state=s)
            return (p, s), p

        (_, _), hist = jax.lax.scan(chunk, (p, tx.init(p)), None, length=steps // every)
        return hist

    hist = to64(run(jax.random.key(seed)))
    balanced = jax.vmap(lambda p: qo.canonicalize(setup.sym, p)[0])(hist)
    t = jax.tree.leaves(hist)[0].shape[0]
    n = ravel_pytree(hist)[0].size // t
    k = 10
    raw = trajectory_pca(hist, k=k)
    bal = trajectory_pca(balanced, k=k)
    walk = random_walk_pca(t, n, jax.random.key(0), k=k, dtype=jnp.float64)
    return {
        "snapshots": t, "every": every, "parameters": n,
        "raw": np.asarray(raw.explained_variance_ratio).tolist(),
        "balanced": np.asarray(bal.explained_variance_ratio).tolist(),
        "random_walk": np.asarray(walk.explained_variance_ratio).tolist(),
        "projections": np.asarray(raw.projections[:, :2]).tolist(),
        "projections_walk": np.asarray(walk.projections[:, :2]).tolist(),
    }


# --------------------------------------------------------------------------- diagnostics


def dead_units(setup: Setup, p: Any) -> int:
    """Hidden units of the sawtooth net that are zero on every training input."""
    leaves = qo.symmetry.leaves_by_path(p)
    h, dead = setup.task.x, 0
    for layer in range(0, 10, 2):
        h = jax.nn.relu(h @ leaves[("layers", layer, "kernel")] + leaves[("layers", layer, "bias")])
        dead += int(jnp.sum(jnp.all(h <= 0, axis=0)))
    return dead


def quantile_picks(values: np.ndarray, k: int, lo: float = 0.1, hi: float = 0.6) -> list[int]:
    """Indices of ``k`` entries at evenly spaced quantiles in ``[lo, hi]`` of ``values``.

    The default range skips the worst fits, which include networks whose
    units all died (a constant output, the MSE of the target's variance):
    not representative minima.
    """
    order = np.argsort(values)
    qs = np.linspace(lo, hi, k) if k > 1 else [lo]
    picks = [int(order[round(q * (len(order) - 1))]) for q in qs]
    return list(dict.fromkeys(picks))


def median(v: np.ndarray) -> float:
    """The median, NaN for no entries (without numpy's warning)."""
    return float(np.median(v)) if np.size(v) else float("nan")


def rounded(tree: Any, digits: int = 7) -> Any:
    """``tree`` with every float rounded to ``digits`` significant digits (a smaller JSON)."""
    if isinstance(tree, dict):
        return {k: rounded(v, digits) for k, v in tree.items()}
    if isinstance(tree, (list, tuple)):
        return [rounded(v, digits) for v in tree]
    if isinstance(tree, float) and np.isfinite(tree) and tree != 0:
        return float(f"{tree:.{digits - 1}e}")
    return tree


def stats(v: np.ndarray) -> dict[str, float]:
    v = np.asarray(v, np.float64)
    return {"min": float(v.min()), "median": float(np.median(v)), "mean": float(v.mean()),
            "max": float(v.max())}


# --------------------------------------------------------------------------- figures


def captions(res: dict[str, Any]) -> dict[str, str]:
    """One Markdown caption per figure, with this run's numbers."""
    cfg = res["config"]
    names = list(res["populations"])
    src = (f"`python -m benchmarks.landscape{' --quick' if cfg['quick'] else ''}`: "
           f"{cfg['nets']} nets per optimizer ({', '.join(names)}), {cfg['steps']} full-batch "
           "steps, float64 analysis.")

    def per(fmt: Callable[[str, dict[str, Any]], str]) -> str:
        return "; ".join(fmt(n, p) for n, p in res["populations"].items())

    pair = per(lambda n, p: f"{n}: raw {p['pair_medians']['raw']:.2f}, symmetrized "
               f"{p['pair_medians']['symmetrized']:.2f}, permutation "
               f"{p['pair_medians']['permutation']:.2f}, quotient "
               f"{p['pair_medians']['quotient']:.2f} (closest pair "
               f"{p['pair_minima']['quotient']:.2f})")
    glob = per(lambda n, p: f"{n}: symmetrized {p['global_medians']['symmetrized']:.2f}, "
               f"quotient {p['global_medians']['quotient']:.2f}; smallest dot product "
               f"{p['min_dot']['symmetrized']:.2f} symmetrized, {p['min_dot']['quotient']:.2f} "
               "aligned")
    h = res["hessian"].get("global (hand-built)", {}).get("relu", {})
    tr = res["trajectory"]
    return {
        "fits.png": "Mean fit ± one standard deviation of each population against the target "
                    "(paper Fig. 3), and the final training MSEs (Fig. 5); the spike at the "
                    "right is networks whose units all died (a constant output). " + src,
        "fig6_pairwise_distances.png":
            f"Distances between two minima over {cfg['pairs']} random pairs (paper Fig. 6): "
            "raw, symmetrized as in the paper (minimal-energy rescaling, units sorted), "
            "permutation-only weight matching of the balanced points, and the quotient "
            "distance (weight matching and rescaling, `quotient_distance`). Medians: "
            + pair + ". " + src,
        "fig7_distances_to_global.png":
            "Distance from each minimum to the global one, the hand-built fit (paper Fig. 7), "
            "and the dot products of the unit directions from the global minimum to pairs of "
            "minima (§4.5), symmetrized and aligned by `quotient_distance`. Medians: "
            + glob + ". " + src,
        "fig8_neb_profiles.png":
            "NEB energy profiles from the symmetrized global minimum to "
            f"{len(res['neb']['runs'])} minima (paper Fig. 8), against the distance along "
            "the path: to the symmetrized minimum, the same with every image kept on the "
            "balanced section (`project=canonical_section`), and to the minimum aligned with "
            "the global one (`align=quotient_align`). " + src,
        "fig9_neb_outputs.png": "The network's output along the first NEB path (paper Fig. 9), "
                                "purple at the global minimum to yellow at the local one. "
                                + src,
        "fig10_neb_angles.png": "Angles between successive steps of the NEB paths (paper "
                                "Fig. 10). " + src,
        "fig11_hessian.png":
            "Sorted |eigenvalues| of the dense Hessian at the global minimum and at minima of "
            f"each optimizer, with ReLU and with softplus (β = {BETA:g}) as in the paper "
            "(Fig. 11); dashed: the 25 rescaling-orbit directions projected out "
            "(`orbit_directions`). Dotted line: the zero-mode threshold. At the hand-built fit "
            f"{h.get('zero_modes', '?')} of 136 eigenvalues are zero with ReLU, "
            f"{h.get('zero_modes_quotient', '?')} once the orbit is projected out. " + src,
        "trajectory_pca.png":
            f"PCA of one SGD training run ({tr['snapshots']} snapshots): explained variance "
            f"ratios against a random walk of the same length, PC1 {tr['raw'][0]:.3f} vs "
            f"{tr['random_walk'][0]:.3f}, and the projection on the first two components. "
            + src,
    }


def plot_all(res: dict[str, Any], setup: Setup, pops: dict[str, Any], out: str) -> list[str]:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    files = []

    caps = captions(res)

    def save(fig, name):
        path = os.path.join(out, name)
        fig.tight_layout()
        fig.savefig(path, dpi=110)
        plt.close(fig)
        files.append(path)
        # the docs' figure list captions each PNG with its sibling .md file
        with open(os.path.splitext(path)[0] + ".md", "w", encoding="utf-8") as f:
            f.write(caps[name] + "\n")

    grid = np.asarray(setup.grid[:, 0])
    target = np.asarray(jnp.interp(setup.grid[:, 0], setup.task.x[:, 0], setup.task.y[:, 0]))
    names = list(res["populations"])

    # fits (paper Figs. 3-5)
    fig, axes = plt.subplots(1, 2, figsize=(12, 4.2))
    axes[0].plot(grid, target, "k", lw=0.8, label="target (global minimum)")
    for name in names:
        m = pops[name]
        outs = np.asarray(jax.vmap(lambda p: setup.apply(p, setup.grid)[:, 0])(m))
        mu, sd = outs.mean(0), outs.std(0)
        (line,) = axes[0].plot(grid, mu, label=f"{name}: mean fit ± std")
        axes[0].fill_between(grid, mu - sd, mu + sd, color=line.get_color(), alpha=0.2)
        fl = np.log10(np.asarray(res["populations"][name]["final_loss"]))
        axes[1].hist(fl, bins=30, histtype="step", label=name, color=line.get_color())
    axes[0].set(xlabel="x", ylabel="output", title="fits (paper Fig. 3)")
    axes[0].legend(fontsize=8)
    axes[1].set(xlabel="log10 final training MSE", ylabel="nets",
                title="final losses (paper Fig. 5)")
    axes[1].legend(fontsize=8)
    save(fig, "fits.png")

    # pairwise distances (Fig. 6)
    kinds = ("raw", "symmetrized", "permutation", "quotient")
    fig, axes = plt.subplots(1, len(names), figsize=(6 * len(names), 4.2), squeeze=False)
    for ax, name in zip(axes[0], names):
        d = res["populations"][name]["pairs"]
        hi = max(max(d[k]) for k in kinds)
        for k in kinds:
            ax.hist(d[k], bins=40, range=(0, hi * 1.02), histtype="step", lw=1.4,
                    label=f"{k} (median {np.median(d[k]):.2f})")
        ax.set(xlabel="distance between two minima", ylabel="pairs",
               title=f"{name}: pairwise distances (paper Fig. 6)")
        ax.legend(fontsize=8)
    save(fig, "fig6_pairwise_distances.png")

    # distances to the global minimum and §4.5 dot products (Fig. 7)
    fig, axes = plt.subplots(1, 2, figsize=(12, 4.2))
    for name in names:
        g = res["populations"][name]["global"]
        for k, ls in (("raw", ":"), ("symmetrized", "--"), ("quotient", "-")):
            axes[0].hist(g[k], bins=30, histtype="step", ls=ls, lw=1.4,
                         label=f"{name} {k} (median {np.median(g[k]):.2f})")
        for k, ls in (("dot_symmetrized", "--"), ("dot_quotient", "-")):
            axes[1].hist(g[k], bins=40, range=(-1, 1), histtype="step", ls=ls, lw=1.4,
                         label=f"{name} {k[4:]} (min {min(g[k]):.2f})")
    axes[0].set(xlabel="distance to the global minimum", ylabel="minima",
                title="distance to the global minimum (paper Fig. 7)")
    axes[1].set(xlabel="dot product of unit directions from the global minimum",
                ylabel="pairs of minima", title="directions from the global minimum (§4.5)")
    for ax in axes:
        ax.legend(fontsize=7)
    save(fig, "fig7_distances_to_global.png")

    # NEB profiles (Fig. 8), outputs (Fig. 9), angles (Fig. 10)
    runs, modes = res["neb"]["runs"], res["neb"]["modes"]
    if runs:
        fig, axes = plt.subplots(1, len(modes), figsize=(5 * len(modes), 4.2), sharey=True)
        for ax, mode in zip(axes, modes):
            for i, r in enumerate(runs):
                e = np.asarray(r[mode]["energies"])
                x = np.concatenate([[0], np.cumsum(r[mode]["segments"])])
                ax.plot(x, e, ".-", color=f"C{i}",
                        label=f"minimum {r['index']} (MSE {r['loss']:.1e})")
            ax.set(xlabel="distance along the path from the global minimum",
                   title=f"NEB energy profile: {mode} (paper Fig. 8)")
            ax.legend(fontsize=7)
        axes[0].set_ylabel("training MSE")
        save(fig, "fig8_neb_profiles.png")

        fig, axes = plt.subplots(1, 2, figsize=(12, 4.2), sharey=True)
        for ax, mode in zip(axes, ("symmetrized", "quotient")):
            outs = np.asarray(runs[0][mode]["outputs"])
            cmap = plt.get_cmap("viridis")
            for k, o in enumerate(outs):
                ax.plot(grid, o, color=cmap(k / max(len(outs) - 1, 1)), lw=0.8)
            ax.plot(grid, target, "k--", lw=0.6)
            ax.set(xlabel="x", title=f"output along the NEB path ({mode}; paper Fig. 9)\n"
                   "purple: global minimum → yellow: local minimum")
        axes[0].set_ylabel("network output")
        save(fig, "fig9_neb_outputs.png")

        fig, axes = plt.subplots(1, len(modes), figsize=(5 * len(modes), 4.2), sharey=True)
        for ax, mode in zip(axes, modes):
            for i, r in enumerate(runs):
                a = np.asarray(r[mode]["angles_deg"])
                ax.plot(np.arange(1, a.size + 1), a, ".-", color=f"C{i}",
                        label=f"minimum {r['index']}")
            ax.set(xlabel="image (global minimum → local minimum)",
                   title=f"turning of the NEB path: {mode} (paper Fig. 10)")
            ax.legend(fontsize=7)
        axes[0].set_ylabel("angle between successive steps (degrees)")
        save(fig, "fig10_neb_angles.png")

    # Hessian spectra (Fig. 11)
    fig, axes = plt.subplots(1, 2, figsize=(12, 4.5), sharey=True)
    for ax, kind in zip(axes, ("relu", "smooth")):
        ax.axhline(ZERO_REL * max(row[kind]["max"] for row in res["hessian"].values()),
                   color="k", lw=0.5, ls=":")
        for i, (name, row) in enumerate(res["hessian"].items()):
            ev = np.abs(np.asarray(row[kind]["eigenvalues"]))
            evq = np.abs(np.asarray(row[kind]["eigenvalues_quotient"]))
            ax.semilogy(np.sort(ev)[::-1] + 1e-300, color=f"C{i}", lw=1.2,
                        label=f"{name} ({row[kind]['zero_modes']} zero)")
            ax.semilogy(np.sort(evq)[::-1] + 1e-300, color=f"C{i}", lw=1, ls="--",
                        label=f"  orbit out ({row[kind]['zero_modes_quotient']} zero)")
        title = "ReLU" if kind == "relu" else f"softplus β={BETA:g}"
        top = max(row[kind]["max"] for row in res["hessian"].values())
        ax.set(xlabel="rank", title=f"Hessian |eigenvalues|, {title} (paper Fig. 11)",
               ylim=(1e-20, 10 * top))
        ax.legend(fontsize=6, ncol=2)
    axes[0].set_ylabel("|λ| (sorted)")
    save(fig, "fig11_hessian.png")

    # trajectory PCA
    tr = res["trajectory"]
    fig, axes = plt.subplots(1, 2, figsize=(12, 4.2))
    k = np.arange(1, len(tr["raw"]) + 1)
    for off, (key, lab) in enumerate((("raw", "SGD run"), ("balanced", "SGD run, balanced"),
                                      ("random_walk", "random walk"))):
        axes[0].bar(k + (off - 1) * 0.27, tr[key], width=0.27, label=lab)
    axes[0].set(xlabel="component", ylabel="explained variance ratio", yscale="log",
                title="trajectory PCA vs the random-walk baseline")
    axes[0].legend(fontsize=8)
    pr, pw = np.asarray(tr["projections"]), np.asarray(tr["projections_walk"])
    axes[1].plot(pr[:, 0] / np.abs(pr[:, 0]).max(), pr[:, 1] / np.abs(pr[:, 1]).max(),
                 ".-", ms=3, label="SGD run")
    axes[1].plot(pw[:, 0] / np.abs(pw[:, 0]).max(), pw[:, 1] / np.abs(pw[:, 1]).max(),
                 ".-", ms=3, label="random walk")
    axes[1].set(xlabel="PC1 (scaled)", ylabel="PC2 (scaled)", title="projection on PC1-PC2")
    axes[1].legend(fontsize=8)
    save(fig, "trajectory_pca.png")
    return files


# --------------------------------------------------------------------------- main


def run(cfg: dict[str, Any], *, out: str | None = None, progress: bool = True
        ) -> tuple[dict[str, Any], Setup, dict[str, Any]]:
    """The whole study; returns ``(results, setup, populations)``."""
    setup = Setup()
    sym = setup.sym
    rng = np.random.default_rng(cfg["seed"])
    timings: dict[str, float] = {}
    res: dict[str, Any] = {"config": cfg, "populations": {}, "timings": timings}
    glob = setup.exact
    gsym = symmetrize(sym, glob)
    res["global"] = {
        "loss": float(setup.loss(glob)),
        "norm_handbuilt": float(np.linalg.norm(flat(glob))),
        "norm_symmetrized": float(np.linalg.norm(flat(gsym))),
    }
    pops: dict[str, Any] = {}
    grad_norm = jax.jit(jax.vmap(lambda p: jnp.linalg.norm(ravel_pytree(jax.grad(setup.loss)(p))[0])))
    for name in cfg["optimizers"]:
        t0 = time.perf_counter()
        ckpt = None
        if out:
            ckpt = os.path.join(out, "checkpoints", f"{name}_n{cfg['nets']}_t{cfg['steps']}"
                                f"_s{cfg['seed']}")
        params, final = train(setup, name, cfg["nets"], cfg["steps"], seed=cfg["seed"],
                              checkpoint=ckpt, progress=progress)
        timings[f"train_{name}"] = time.perf_counter() - t0
        minima = to64(params)
        pops[name] = minima
        n = cfg["nets"]
        all_pairs = np.array([(i, j) for i in range(n) for j in range(i + 1, n)])
        pairs = all_pairs[rng.choice(len(all_pairs), min(cfg["pairs"], len(all_pairs)),
                                     replace=False)]
        t0 = time.perf_counter()
        pop_data = Population(setup, params)
        d = pair_distances(setup, pop_data, pairs, progress=progress)
        timings[f"pairs_{name}"] = time.perf_counter() - t0
        t0 = time.perf_counter()
        g = global_distances(setup, pop_data, glob, gsym, progress=progress)
        live = ~(pop_data.constant[pairs[:, 0]] | pop_data.constant[pairs[:, 1]])
        timings[f"global_{name}"] = time.perf_counter() - t0
        dead = [dead_units(setup, p) for p in unstack(minima)]
        pop = {
            "final_loss": np.asarray(final).tolist(),
            "final_loss_stats": stats(final),
            "grad_norm": stats(np.asarray(grad_norm(minima))),
            "dead_units": stats(np.asarray(dead)),
            "pairs": {k: np.asarray(v).tolist() for k, v in d.items()},
            "pair_medians": {k: float(np.median(v)) for k, v in d.items()},
            "constant_fits": int(pop_data.constant.sum()),
            "pair_index": pairs.tolist(),
            "pair_medians_nonconstant": {k: median(v[live]) for k, v in d.items()},
            "pairs_nonconstant": int(live.sum()),
            "pair_minima": {k: float(np.min(v)) for k, v in d.items()},
            "asymmetry": stats(np.abs(d["quotient"] - d["quotient_reversed"])
                               / np.maximum(d["quotient"], 1e-300)),
            "quotient_over_symmetrized": stats(d["quotient"] / d["symmetrized"]),
            "quotient_over_raw": stats(d["quotient"] / d["raw"]),
            "global": {k: np.asarray(v).tolist() for k, v in g.items()},
            "global_medians": {k: float(np.median(v)) for k, v in g.items()
                               if not k.startswith("dot")},
            "global_medians_nonconstant": {k: median(v[~pop_data.constant])
                                           for k, v in g.items() if not k.startswith("dot")},
            "min_dot": {k[4:]: float(np.min(v)) for k, v in g.items() if k.startswith("dot")},
            "median_dot": {k[4:]: float(np.median(v)) for k, v in g.items()
                           if k.startswith("dot")},
        }
        res["populations"][name] = pop

    # NEB from a few SGD minima (spread over the loss quantiles) to the global one
    first = cfg["optimizers"][0]
    picks = quantile_picks(np.asarray(res["populations"][first]["final_loss"]), cfg["neb"])
    t0 = time.perf_counter()
    runs = neb_runs(setup, [jax.tree.map(lambda x, i=i: x[i], pops[first]) for i in picks],
                    glob, cfg["images"], cfg["neb_steps"], tuple(cfg["neb_modes"]),
                    progress=progress)
    for i, r in zip(picks, runs):
        r["index"] = i
        r["loss"] = float(res["populations"][first]["final_loss"][i])
    timings["neb"] = time.perf_counter() - t0
    res["neb"] = {"optimizer": first, "images": cfg["images"], "steps": cfg["neb_steps"],
                  "modes": list(cfg["neb_modes"]), "runs": runs}

    # Hessians at the global minimum and at minima of each optimizer
    t0 = time.perf_counter()
    points = {"global (hand-built)": glob, "global (symmetrized)": gsym}
    for name in cfg["optimizers"]:
        fl = np.asarray(res["populations"][name]["final_loss"])
        for i in quantile_picks(fl, cfg["hessians"]):
            points[f"{name} minimum {i}"] = jax.tree.map(lambda x, i=i: x[i], pops[name])
    res["hessian"] = spectra(setup, points)
    timings["hessian"] = time.perf_counter() - t0

    t0 = time.perf_counter()
    res["trajectory"] = trajectory(setup, cfg["trajectory_steps"])
    timings["trajectory"] = time.perf_counter() - t0
    return res, setup, pops


def summary(res: dict[str, Any]) -> str:
    """The headline numbers as markdown."""
    cfg = res["config"]
    lines = [
        (f"Sawtooth net, {cfg['nets']} nets per optimizer, {cfg['steps']} full-batch steps; "
         f"{cfg['pairs']} random pairs; global minimum = the hand-built fit."),
        "",
        ("| optimizer | median MSE | dead units | pair raw | pair symmetrized | pair permutation "
        "| pair quotient | quotient / symmetrized | to global: symmetrized | to global: quotient "
        "| min dot: symmetrized | min dot: quotient |"),
        "|---|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for name, p in res["populations"].items():
        m, g = p["pair_medians"], p["global_medians"]
        lines.append(
            f"| {name} | {p['final_loss_stats']['median']:.2e} | {p['dead_units']['median']:.0f} "
            f"| {m['raw']:.2f} | {m['symmetrized']:.2f} | {m['permutation']:.2f} "
            f"| {m['quotient']:.2f} (min {p['pair_minima']['quotient']:.2f}) "
            f"| {p['quotient_over_symmetrized']['median']:.2f} | {g['symmetrized']:.2f} "
            f"| {g['quotient']:.2f} | {p['min_dot']['symmetrized']:.2f} "
            f"| {p['min_dot']['quotient']:.2f} |"
        )
    lines += ["", ("Over pairs of non-constant fits only (a fit whose units all died computes a "
              "constant; all such fits compute the same function):"), "",
              ("| optimizer | constant fits | pairs | raw | symmetrized | permutation | quotient "
              "| to global: raw | symmetrized | quotient |"), "|---|---|---|---|---|---|---|---|---|---|"]
    for name, p in res["populations"].items():
        m, g = p["pair_medians_nonconstant"], p["global_medians_nonconstant"]
        lines.append(
            f"| {name} | {p['constant_fits']} of {cfg['nets']} | {p['pairs_nonconstant']} "
            f"| {m['raw']:.2f} | {m['symmetrized']:.2f} | {m['permutation']:.2f} "
            f"| {m['quotient']:.2f} | {g['raw']:.2f} | {g['symmetrized']:.2f} "
            f"| {g['quotient']:.2f} |")
    modes = res["neb"]["modes"]
    lines += ["", "| NEB from minimum | its MSE | barrier seen from it: "
              + " | ".join(modes) + " | path length: " + " | ".join(modes)
              + " | max force: " + " | ".join(modes) + " |",
              "|---|---|" + "---|" * (3 * len(modes))]
    for r in res["neb"]["runs"]:
        cells = [f"{r[m]['barrier_from_local']:.2e}" for m in modes]
        cells += [f"{r[m]['length']:.2f}" for m in modes]
        cells += [f"{r[m]['max_force']:.1e}" for m in modes]
        lines.append(f"| {r['index']} | {r['loss']:.2e} | " + " | ".join(cells) + " |")
    lines += ["", f"Hessian zero modes: |λ| <= {ZERO_REL:g} λmax; negative: λ < -{ZERO_REL:g} λmax.",
              "", ("| Hessian at | MSE | ReLU: zero | negative | zero, orbit out | orbit dim "
                   "| λmin/λmax | smooth: zero | negative | zero, orbit out | λmin/λmax |"),
              "|---|---|---|---|---|---|---|---|---|---|---|"]
    for name, h in res["hessian"].items():
        r, m = h["relu"], h["smooth"]
        lines.append(f"| {name} | {h['loss']:.2e} | {r['zero_modes']} | {r['negative']} "
                     f"| {r['zero_modes_quotient']} | {r['orbit_dimension']} "
                     f"| {r['min_over_max']:.1e} | {m['zero_modes']} | {m['negative']} "
                     f"| {m['zero_modes_quotient']} | {m['min_over_max']:.1e} |")
    tr = res["trajectory"]
    lines += ["", (f"Trajectory PCA ({tr['snapshots']} snapshots, {tr['parameters']} params): "
              f"PC1 explains {tr['raw'][0]:.3f} (balanced {tr['balanced'][0]:.3f}), "
              f"random walk {tr['random_walk'][0]:.3f}; first 3: {sum(tr['raw'][:3]):.3f} "
              f"vs {sum(tr['random_walk'][:3]):.3f}.")]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> dict[str, Any]:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--quick", action="store_true", help="CI-sized run (under a minute)")
    ap.add_argument("--nets", type=int, default=None, help=f"nets per optimizer; {FULL['nets']}")
    ap.add_argument("--steps", type=int, default=None, help=f"training steps; {FULL['steps']}")
    ap.add_argument("--pairs", type=int, default=None, help=f"pairs of minima; {FULL['pairs']}")
    ap.add_argument("--neb", type=int, default=None, help=f"NEB paths; {FULL['neb']}")
    ap.add_argument("--optimizers", nargs="*", default=None, choices=list(OPTIMIZERS),
                    help="populations to train (the first is used for NEB)")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--json", default=None, help="write all numbers here")
    ap.add_argument("--out", default=None, help="PNG and population-cache directory")
    ap.add_argument("--no-progress", action="store_true")
    args = ap.parse_args(argv)
    cfg = dict(QUICK if args.quick else FULL)
    for k in ("nets", "steps", "pairs", "neb"):
        if getattr(args, k) is not None:
            cfg[k] = getattr(args, k)
    if cfg["nets"] < 2:
        ap.error("--nets must be at least 2")
    cfg["optimizers"] = args.optimizers or (["sgd"] if args.quick else list(OPTIMIZERS))
    cfg["seed"] = args.seed
    cfg["quick"] = bool(args.quick)
    if args.out:
        os.makedirs(args.out, exist_ok=True)
    t0 = time.perf_counter()
    res, setup, pops = run(cfg, out=args.out, progress=not args.no_progress)
    res["timings"]["total"] = time.perf_counter() - t0
    print(summary(res))
    if args.out:
        res["figures"] = plot_all(res, setup, pops, args.out)
        for f in res["figures"]:
            print("wrote", f)
    if args.json:
        with open(args.json, "w") as f:
            json.dump(rounded(res), f)
        print("wrote", args.json)
    return res


if __name__ == "__main__":
    main()
