"""Breathing: widen a dense ReLU network, train, compress it back through merges, repeat.

A ``width``-wide target architecture is trained inside a wider one (``W``
slots per hidden layer). A slot whose incoming weights, bias and outgoing
weights are all zero is *absent*: it computes zero, receives zero gradient
(its pre-activation is 0 and :math:`\\mathrm{relu}'(0) = 0`), and any
gradient optimizer whose step vanishes with the gradient (SGD, Adam, ...)
keeps it exactly zero. So a network with absent slots is a narrower network,
trained by the ordinary dense code (the population trainer's fast path
included), with no masks.

One **cycle** (Liu et al.'s splitting and Net2Net's function-preserving growth,
run in both directions):

1. **grow** (:func:`grow_units`): every absent slot gets He-normal incoming
   weights, a bias that puts its kink inside the data (as
   :func:`place_kinks`) and zero outgoing weights: the function
   is unchanged, but the new units receive gradient;
2. **train** the wide network for ``cycle_steps`` steps;
3. **compress** back to ``width`` units per layer, one unit at a time
   (:func:`merge_or_prune`): for every present unit :math:`j` of a layer above
   the cap, the best replacement of its activation :math:`a_j` on the data
   by an affine function of one present sibling, :math:`a_j \\approx c\\,a_i +
   d` (least squares; :math:`c = 0` is the constant), folded into the next
   layer (:math:`W^{out}_i \\mathrel{+}= c\\,W^{out}_j`, :math:`b^{next}
   \\mathrel{+}= d\\,W^{out}_j`), is scored by the loss, and the best of all is
   applied; ``refit_steps`` steps after each removal, ``polish_steps`` after the
   last;
4. **accept** the compressed network if its loss is below the best so far
   (elitist, per network); the next cycle grows from the best.

The first cycle starts from a wide network trained for ``start_steps`` steps
and compressed. Everything of one chunk of networks runs in one compiled
program (``vmap`` over the networks, loops over steps, removals and cycles).
:func:`extract_units` then copies the present units into the narrow
architecture's parameters.

On the sawtooth network (5×5 inside 8×5) breathing lowers the median final
loss well below plain training from the same budget, cycle after cycle
(``python -m benchmarks.sawtooth``), but it does not find exact fits.

References:
  Chen, Goodfellow, Shlens. *Net2Net: Accelerating Learning via Knowledge
  Transfer*, 2015. https://arxiv.org/abs/1511.05641

  Liu, Wang, Wu, Liu. *Splitting Steepest Descent for Growing Neural
  Architectures*, 2019. https://arxiv.org/abs/1910.02366

  Han, Pool, Tran, Dally. *Learning both Weights and Connections for Efficient
  Neural Networks*, 2015 (prune and retrain). https://arxiv.org/abs/1506.02626
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
import optax

from quotient_opt.training._dense_mlp import Layer
from quotient_opt.contrib._kinks import dense_relu_chain
from quotient_opt import _validate as validate
from quotient_opt.training._population import make_population_step

PyTree = Any


# --------------------------------------------------------------------------- one network


def _hidden_chain(apply_fn: Callable, params: PyTree, x: Any) -> list[Layer]:
    layers = dense_relu_chain(apply_fn, params, x)
    if len(layers) < 2:
        raise ValueError("the network needs at least one hidden layer")
    for i, layer in enumerate(layers[:-1]):
        if not layer.relu or layer.bias is None:
            raise ValueError(f"hidden layer {i} must be a ReLU layer with a bias")
    if layers[-1].relu:
        raise ValueError("the output layer must be linear")
    return layers


def present_units(apply_fn: Callable, params: PyTree, x: Any) -> list[jax.Array]:
    """Per hidden layer, which slots are present (incoming, bias or outgoing weight non-zero).

    Args:
      apply_fn: ``(params, x) -> outputs``, a dense ReLU MLP.
      params: one network's parameters.
      x: data inputs ``(points, in_features)`` (shape only).

    Returns:
      One boolean vector per hidden layer.
    """
    layers = _hidden_chain(apply_fn, params, x)
    leaves = jax.tree.leaves(params)
    return _present(leaves, layers)


def _present(leaves: list, layers: list[Layer]) -> list[jax.Array]:
    out = []
    for layer, nxt in zip(layers[:-1], layers[1:]):
        k, b, k2 = leaves[layer.kernel], leaves[layer.bias], leaves[nxt.kernel]
        out.append(jnp.any(k != 0, axis=0) | (b != 0) | jnp.any(k2 != 0, axis=1))
    return out


def grow_units(apply_fn: Callable, params: PyTree, x: Any, key: jax.Array) -> PyTree:
    """Fills every absent slot with a new unit, without changing the function.

    Layer by layer from the input: He-normal incoming weights
    (:math:`\\mathcal N(0, 2/\\text{fan-in})`), a bias that puts the new unit's
    kink at a uniform point of its pre-activation's range on the data, zero
    outgoing weights.

    Args:
      apply_fn: ``(params, x) -> outputs``, a dense ReLU MLP.
      params: one network's parameters (vmappable).
      x: the data inputs ``(points, in_features)``.
      key: PRNG key.

    Returns:
      The parameters with every slot present.
    """
    layers = _hidden_chain(apply_fn, params, x)
    leaves, treedef = jax.tree.flatten(params)
    leaves = list(leaves)
    absent = [~p for p in _present(leaves, layers)]
    dtype = jnp.result_type(leaves[layers[0].kernel])
    h = jnp.asarray(x, dtype)
    keys = jax.random.split(key, 2 * len(layers))
    for li, (layer, nxt) in enumerate(zip(layers[:-1], layers[1:])):
        k, b = leaves[layer.kernel], leaves[layer.bias]
        new_k = jax.random.normal(keys[2 * li], k.shape, dtype) * math.sqrt(2.0 / k.shape[0])
        u = h @ new_k
        lo, hi = jnp.min(u, 0), jnp.max(u, 0)
        t = jax.random.uniform(keys[2 * li + 1], b.shape, dtype)
        new_b = -(lo + t * (hi - lo))
        a = absent[li]
        k = jnp.where(a[None, :], new_k, k)
        b = jnp.where(a, new_b, b)
        leaves[layer.kernel], leaves[layer.bias] = k, b
        leaves[nxt.kernel] = jnp.where(a[:, None], 0.0, leaves[nxt.kernel])
        h = jax.nn.relu(h @ k + b)
    return treedef.unflatten(leaves)


def _candidates(leaves: list, layers: list[Layer], x: jax.Array, width: int):
    """Every single-unit merge/removal of the layers above ``width`` present units.

    Returns stacked candidate leaves (leading axis C) and a validity mask (C,).
    """
    present = _present(leaves, layers)
    dtype = jnp.result_type(leaves[layers[0].kernel])
    h = jnp.asarray(x, dtype)
    acts = []
    for layer in layers[:-1]:
        h = jax.nn.relu(h @ leaves[layer.kernel] + leaves[layer.bias])
        acts.append(h)
    cand_leaves: list[list] = [[] for _ in leaves]
    valid = []
    n = x.shape[0]
    for li, (layer, nxt) in enumerate(zip(layers[:-1], layers[1:])):
        a = acts[li]  # (n, W)
        pres = present[li]
        w = a.shape[1]
        over = jnp.sum(pres) > width
        mean = jnp.mean(a, 0)
        ac = a - mean
        cov = ac.T @ ac / n  # cov[i, j]
        var = jnp.diag(cov)
        safe = jnp.where(var > 0, var, 1.0)
        c = jnp.where(var[:, None] > 0, cov / safe[:, None], 0.0)  # fit a_j ~ c[i, j] a_i + d
        resid = var[None, :] - jnp.where(var[:, None] > 0, cov**2 / safe[:, None], 0.0)
        ok_pair = pres[:, None] & pres[None, :] & ~jnp.eye(w, dtype=bool)
        resid = jnp.where(ok_pair, resid, jnp.inf)
        partner = jnp.argmin(resid, axis=0)  # (W,) best i for each j
        has_partner = jnp.isfinite(jnp.min(resid, axis=0))
        c_best = jnp.where(has_partner, c[partner, jnp.arange(w)], 0.0)
        d_best = mean - c_best * mean[partner]
        k, b = leaves[layer.kernel], leaves[layer.bias]
        k2, b2 = leaves[nxt.kernel], leaves[nxt.bias]

        def remove(j, i, cj, dj, k=k, b=b, k2=k2, b2=b2):
            row = k2[j]
            k2n = k2.at[i].add(cj * row)
            b2n = b2 + dj * row
            k2n = k2n.at[j].set(0.0)
            return k.at[:, j].set(0.0), b.at[j].set(0.0), k2n, b2n

        js = jnp.arange(w)
        # merges into the best partner, and replacements by the constant mean
        merged = jax.vmap(remove)(js, partner, c_best, d_best)
        const = jax.vmap(lambda j: remove(j, j, 0.0, mean[j]))(js)
        for kind, (kn, bn, k2n, b2n), ok in (
            ("merge", merged, pres & over & has_partner),
            ("const", const, pres & over),
        ):
            for idx, leaf in enumerate(leaves):
                if idx == layer.kernel:
                    cand_leaves[idx].append(kn)
                elif idx == layer.bias:
                    cand_leaves[idx].append(bn)
                elif idx == nxt.kernel:
                    cand_leaves[idx].append(k2n)
                elif idx == nxt.bias:
                    cand_leaves[idx].append(b2n)
                else:
                    cand_leaves[idx].append(jnp.broadcast_to(leaf, (w, *leaf.shape)))
            valid.append(ok)
    stacked = [jnp.concatenate(c, 0) for c in cand_leaves]
    return stacked, jnp.concatenate(valid, 0)


def merge_or_prune(
    apply_fn: Callable,
    params: PyTree,
    x: Any,
    loss_fn: Callable[[PyTree], jax.Array],
    width: int,
) -> tuple[PyTree, jax.Array, jax.Array]:
    """Removes the one unit whose best affine replacement costs the least loss.

    Candidates: every present unit of every hidden layer with more than
    ``width`` present units, replaced by the least-squares affine function of
    one present sibling's activation (the best sibling) or by its mean
    (module docstring); each is scored by ``loss_fn``.

    Args:
      apply_fn: ``(params, x) -> outputs``, a dense ReLU MLP.
      params: one network's parameters (vmappable).
      x: the data inputs ``(points, in_features)``.
      loss_fn: ``params -> scalar``.
      width: the cap of present units per hidden layer.

    Returns:
      ``(params, loss, candidates)``: the parameters after the best removal
      (unchanged if every layer is at or below the cap), their loss (``inf``
      if there was nothing to remove) and the number of candidates scored
      (loss evaluations spent).
    """
    layers = _hidden_chain(apply_fn, params, x)
    leaves, treedef = jax.tree.flatten(params)
    stacked, valid = _candidates(list(leaves), layers, jnp.asarray(x), width)
    losses = jax.vmap(lambda *ls: loss_fn(treedef.unflatten(ls)))(*stacked)
    losses = jnp.where(valid & jnp.isfinite(losses), losses, jnp.inf)
    best = jnp.argmin(losses)
    any_valid = jnp.any(valid)
    new = [jnp.where(any_valid, s[best], leaf) for s, leaf in zip(stacked, leaves)]
    return treedef.unflatten(new), losses[best], jnp.sum(valid).astype(jnp.float32)


def extract_units(apply_fn: Callable, params: PyTree, x: Any, like: PyTree) -> PyTree:
    """The present units of a wide network, copied into a narrower network's parameters.

    Args:
      apply_fn: the wide network's ``(params, x) -> outputs``.
      params: one wide network's parameters (vmappable), with at most as many
        present units per hidden layer as ``like`` has (extra present units
        are dropped, which changes the function).
      x: data inputs (shape only).
      like: parameters of the narrow network (same tree structure, narrower
        hidden layers); only the shapes are used.

    Returns:
      Parameters shaped like ``like`` computing the same function as
      ``params`` (when the widths allow).
    """
    layers = _hidden_chain(apply_fn, params, x)
    leaves = jax.tree.leaves(params)
    like_leaves, like_def = jax.tree.flatten(like)
    if len(like_leaves) != len(leaves):
        raise ValueError("like must have the same tree structure as params")
    present = _present(leaves, layers)
    widths = [jnp.shape(like_leaves[layer.kernel])[-1] for layer in layers[:-1]]
    idx = [jnp.argsort(~p, stable=True)[:w] for p, w in zip(present, widths)]
    out = list(leaves)
    prev = None
    for li, layer in enumerate(layers):
        k = leaves[layer.kernel]
        if prev is not None:
            k = k[prev]
        cur = idx[li] if li < len(idx) else None
        if cur is not None:
            k = k[:, cur]
        out[layer.kernel] = k
        if layer.bias is not None:
            out[layer.bias] = leaves[layer.bias][cur] if cur is not None else leaves[layer.bias]
        prev = cur
    for o, want in zip(out, like_leaves):
        if jnp.shape(o) != jnp.shape(want):
            raise ValueError(f"like: a leaf of shape {jnp.shape(want)} but {jnp.shape(o)} extracted")
    return like_def.unflatten(out)


# --------------------------------------------------------------------------- populations


class BreatheResult(NamedTuple):
    """What :func:`breathe` returns (host arrays, networks on axis 0).

    Attributes:
      params: each network's best wide parameters (at most ``width`` present
        units per hidden layer; :func:`extract_units` gives the narrow ones).
      losses: ``(nets,)`` their losses.
      history: ``(nets, cycles + 1)`` best loss after the start and after each cycle.
      evals: ``(nets, cycles + 1)`` loss/gradient evaluations spent by then
        (optimizer steps 1 each, candidate scores 1 each, acceptance tests 1).
      accepted: ``(nets, cycles)`` whether each cycle's result was accepted.
      wall_time: seconds (compilation included).
    """

    params: PyTree
    losses: np.ndarray
    history: np.ndarray
    evals: np.ndarray
    accepted: np.ndarray
    wall_time: float


def breathe(
    init_fn: Callable[[jax.Array], PyTree],
    apply_fn: Callable[[PyTree, jax.Array], jax.Array],
    loss_fn: Callable[[PyTree], jax.Array],
    x: Any,
    *,
    nets: int,
    key: jax.Array,
    width: int,
    cycles: int,
    start_steps: int = 6000,
    cycle_steps: int = 1000,
    refit_steps: int = 100,
    polish_steps: int = 500,
    learning_rate: float = 3e-3,
    refit_learning_rate: float | None = None,
    chunk_size: int = 256,
    progress: bool = True,
) -> BreatheResult:
    """Breathing cycles for a population of wide dense ReLU networks (module docstring).

    Each training segment is Adam with a cosine decay from its learning rate
    to 1% of it over the segment, from a fresh state. Network ``i`` draws its
    start and growth from ``jax.random.fold_in(key, i)`` only, so results do not
    depend on ``chunk_size``. ``init_fn`` is e.g. :func:`kink_init`
    of the wide model.

    Args:
      init_fn: ``key -> params`` of one wide network.
      apply_fn: the wide network's ``(params, x) -> outputs`` (a dense ReLU MLP).
      loss_fn: ``params -> scalar`` full-batch loss.
      x: the data inputs ``(points, in_features)`` (for kink placement and merges).
      nets: number of networks.
      key: PRNG key.
      width: target width of every hidden layer.
      cycles: grow-train-compress cycles after the start.
      start_steps: training steps of the wide network before the first compress.
      cycle_steps: training steps of the wide network per cycle.
      refit_steps: steps after each removal.
      polish_steps: steps after the last removal of a compress.
      learning_rate: peak learning rate of the start and cycle segments.
      refit_learning_rate: of the refit and polish segments (default half).
      chunk_size: networks per compiled program.
      progress: a tqdm bar over the networks.

    Returns:
      A :class:`BreatheResult`.

    Raises:
      ValueError: bad arguments, or a network that is not a dense ReLU MLP
        whose hidden layers are all at least ``width`` wide.
    """
    t0 = time.perf_counter()
    nets = validate.integer("nets", nets)
    width = validate.integer("width", width)
    cycles = validate.integer("cycles", cycles, minimum=0)
    for name, v in (("start_steps", start_steps), ("cycle_steps", cycle_steps),
                    ("refit_steps", refit_steps), ("polish_steps", polish_steps)):
        validate.integer(name, v, minimum=0)
    chunk = min(validate.integer("chunk_size", chunk_size), nets)
    key = validate.prng_key(key)
    refit_lr = learning_rate / 2 if refit_learning_rate is None else refit_learning_rate
    p_shape = jax.eval_shape(init_fn, jax.random.fold_in(key, 0))
    layers = _hidden_chain(apply_fn, p_shape, x)
    p_leaves = jax.tree.leaves(p_shape)
    slots = [p_leaves[layer.kernel].shape[-1] for layer in layers[:-1]]
    if min(slots) < width:
        raise ValueError(f"width {width} exceeds a hidden layer of the network ({slots})")
    removals = sum(s - width for s in slots)
    x = jnp.asarray(x)
    check = jax.vmap(init_fn)(jax.vmap(lambda i: jax.random.fold_in(key, i))(jnp.arange(2)))

    def segment(steps: int, lr: float):
        if steps == 0:
            return lambda p: p
        tx = optax.adam(optax.cosine_decay_schedule(lr, steps, 1e-2))
        pop = make_population_step(tx, loss_fn, p_shape, fast_path=True, check_params=check)

        def run(p):
            s = pop.init(p)
            p, s = jax.lax.fori_loop(0, steps, lambda i, c: pop.step(*c)[:2], (p, s))
            return p

        return run

    start, cycle, refit, polish = (segment(start_steps, learning_rate),
                                   segment(cycle_steps, learning_rate),
                                   segment(refit_steps, refit_lr),
                                   segment(polish_steps, refit_lr))
    prune = jax.vmap(lambda p: merge_or_prune(apply_fn, p, x, loss_fn, width))
    grow = jax.vmap(lambda p, k: grow_units(apply_fn, p, x, k))
    losses_of = jax.vmap(loss_fn)

    def compress(p, ev):
        def body(_, c):
            p, ev = c
            p, _, n_c = prune(p)
            p = refit(p)
            return p, ev + n_c + refit_steps

        p, ev = jax.lax.fori_loop(0, removals, body, (p, ev))
        return polish(p), ev + polish_steps

    def run_chunk(keys):
        p = jax.vmap(lambda k: init_fn(jax.random.fold_in(k, 0)))(keys)
        ev = jnp.zeros(keys.shape[0], jnp.float32)
        p = start(p)
        p, ev = compress(p, ev + start_steps)
        best_l = losses_of(p)
        ev = ev + 1

        def one_cycle(carry, c):
            best_p, best_l, ev = carry
            grow_keys = jax.vmap(lambda k: jax.random.fold_in(jax.random.fold_in(k, 1), c))(keys)
            p = grow(best_p, grow_keys)
            p = cycle(p)
            p, ev = compress(p, ev + cycle_steps)
            l = losses_of(p)
            ev = ev + 1
            acc = jnp.isfinite(l) & (l < best_l)
            best_p = jax.tree.map(
                lambda a, b: jnp.where(acc.reshape((-1,) + (1,) * (a.ndim - 1)), a, b), p, best_p
            )
            best_l = jnp.where(acc, l, best_l)
            return (best_p, best_l, ev), (best_l, ev, acc)

        ev0, l0 = ev, best_l
        (p, best_l, ev), (hist, evs, acc) = jax.lax.scan(
            one_cycle, (p, best_l, ev), jnp.arange(cycles, dtype=jnp.uint32)
        )
        history = jnp.concatenate([l0[None], hist], 0).T
        evals = jnp.concatenate([ev0[None], evs], 0).T
        return p, best_l, history, evals, acc.T

    run_jit = jax.jit(run_chunk)
    bar = None
    if progress:
        from tqdm.auto import tqdm

        bar = tqdm(total=nets, unit="net", desc="breathe")
    outs = []
    try:
        for c0 in range(0, nets, chunk):
            idx = np.minimum(np.arange(c0, c0 + chunk), nets - 1)
            keys = jax.vmap(lambda i: jax.random.fold_in(key, i))(jnp.asarray(idx, jnp.uint32))
            res = run_jit(keys)
            real = min(chunk, nets - c0)
            outs.append(jax.tree.map(lambda a: np.asarray(a)[:real], res))
            if bar is not None:
                bar.update(real)
                bar.set_postfix(median_loss=f"{np.median(np.concatenate([o[1] for o in outs])):.3g}")
    finally:
        if bar is not None:
            bar.close()
    def cat(i: int) -> Any:
        return jax.tree.map(lambda *a: np.concatenate(a, 0), *[o[i] for o in outs])

    return BreatheResult(
        params=cat(0), losses=cat(1), history=cat(2), evals=cat(3), accepted=cat(4),
        wall_time=time.perf_counter() - t0,
    )
