"""Per-step overhead of the quotient transformations, as a ratio to plain Adam.

Models (flax.nnx, ReLU, float32, batch 256 of random data, softmax
cross-entropy; ``--models mlp,cnn``):

* ``mlp``: MLP 784-512-512-10;
* ``cnn``: the classic MNIST CNN, 28×28×1 → conv 3×3 (32) → max-pool 2 →
  conv 3×3 (64) → max-pool 2 → dense 128 → 10. Its symmetry (channels of the
  two convolutions, read by the next conv and through the flatten by the
  dense layer, and the dense layer's units) is inferred by tracing.

One jitted training step = loss gradient + optimizer update +
``optax.apply_updates``. Every method is timed in the same run, round-robin
(one block of 3 steps per method per round, in a shuffled order), so machine
noise hits all of them alike. Reported: the median step time over all timed
steps after warm-up, and the ratio to Adam as the median over rounds of the
method's block time over Adam's block time in the same round (paired).

Methods (all with Adam, lr 1e-3):

* ``adam``: ``optax.adam``.
* ``adam+project_horizontal``: ``optax.chain(optax.adam, qo.project_horizontal)``.
* ``path_norm+adam``: ``optax.chain(qo.scale_by_path_norm, optax.adam)``.
* ``rebalance(adam, every=1)`` and ``teleport(adam, every=10)``.

Each is built by the shared registry of transformations
(:mod:`benchmarks.cases`, which the test suite runs too), with lr 1e-3.

Targets: MLP <= 1.15x for the projection and the path norm, <= 1.3x for
``rebalance(every=1)``; CNN <= 1.2x and <= 1.3x.

``population`` (in ``--models``): the periodic wrappers in a vmapped
population of ``--nets`` networks (default 1024) trained by the library's
population step (:func:`quotient_opt.training.make_population_step`, which
keeps the step counter unbatched so a wrapper's ``lax.cond`` on it stays a
branch): ``rebalance(adam, every=10)`` and ``teleport(adam, every=10)`` on
sawtooth nets, ``revive_dead_units(adam, every=50,
axis_name=qo.training.POPULATION_AXIS)`` (with ``value_fn``) on 3-piece maxout
nets in 2-D (1000 points; :func:`maxout_problem`). Each timed call runs 100 steps in
one ``lax.scan``; after a compiling call, every method trains from the same
initial networks for 8 such calls (3 with ``--quick``), interleaved with the
others in a random order per round. The ratio is the whole run's time over
Adam's (amortized over the periodic events, the burst of revivals in the
first hundred steps included); the median of the per-round ratios is
reported too. Target <= 1.5x.

``revive`` (in ``--models``): ``revive_dead_units(adam(0.02), sym)`` with its
defaults (``every=50, patience=10``) on 200 3-piece maxout networks, whole
runs of 1000 steps (200 with ``--quick``) timed against Adam's under both
drivers: the library's population step with ``axis_name=POPULATION_AXIS``
(target <= 1.5x) and a plain ``jax.jit(jax.vmap(qo.fit))`` (target <= 3x).

``sweep`` (in ``--models``): the size sweep (:func:`run_sweep`): MLP 4-32-32-1, MLP
784-w-w-10 for w in 64, 256, 1024, 2048, 4096, and the CNN and the BatchNorm CNN at two
widths (channels 32-64, dense 128; 64-128, dense 256); batch 256 (the CNNs 32). Methods:
``chain(adam, project_horizontal)``, ``quotient_adam``, ``rebalance(adam, every=10)`` (and
``adamp`` where the model has normalization factors), each against Adam in one jitted step
and in a vmapped population of about 4M parameters in all (2 to 256 networks, the
library's population step). Blocks of 10 steps, so the periodic methods' events are
amortized. Goals: projection <= 1.10x, ``quotient_adam`` <= 1.25x, rebalance <= 1.10x;
on the 4-32-32-1 MLP every method <= 1.5x. With ``--out``: ``overhead_sweep.png`` (ratio
against parameter count); the printed markdown table is README's.

Usage::

    python -m benchmarks.overhead [--quick] [--models mlp,cnn,population,revive,sweep] [--nets N]
        [--json PATH] [--out DIR]
"""

from __future__ import annotations

import argparse
import json
import os
import time
from collections.abc import Callable
from typing import NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
import optax
from flax import nnx

import quotient_opt as qo
from benchmarks.cases import CASES_BY_NAME
from quotient_opt.models import functional

TARGETS = {
    "mlp": {"adam+project_horizontal": 1.15, "path_norm+adam": 1.15,
            "rebalance(adam, every=1)": 1.3},
    "cnn": {"adam+project_horizontal": 1.2, "path_norm+adam": 1.2,
            "rebalance(adam, every=1)": 1.3},
    # normalization models (issue 18): every method within 1.2x Adam
    "bn_cnn": {m: 1.2 for m in ("adam+project_horizontal", "adamp", "path_norm+adam",
                                "rebalance(adam, every=1)", "teleport(adam, every=10)")},
    "ln_mlp": {m: 1.2 for m in ("adam+project_horizontal", "adamp", "path_norm+adam",
                                "rebalance(adam, every=1)", "teleport(adam, every=10)")},
}


class CNN(nnx.Module):
    """28×28×1 → conv 3×3 (c1) → ReLU → max-pool 2 → conv 3×3 (c2) → ReLU → max-pool 2 →
    dense → ReLU → 10 (default ``channels=(32, 64)``, ``dense=128``); with ``batch_norm``,
    a BatchNorm (train mode: batch statistics) after each bias-free conv."""

    def __init__(self, rngs: nnx.Rngs, batch_norm: bool = False,
                 channels: tuple[int, int] = (32, 64), dense: int = 128):
        c1, c2 = channels
        self.conv1 = nnx.Conv(1, c1, (3, 3), use_bias=not batch_norm, rngs=rngs)
        self.conv2 = nnx.Conv(c1, c2, (3, 3), use_bias=not batch_norm, rngs=rngs)
        self.bn1 = nnx.BatchNorm(c1, rngs=rngs) if batch_norm else None
        self.bn2 = nnx.BatchNorm(c2, rngs=rngs) if batch_norm else None
        self.fc1 = nnx.Linear(7 * 7 * c2, dense, rngs=rngs)
        self.fc2 = nnx.Linear(dense, 10, rngs=rngs)

    def __call__(self, x: jax.Array) -> jax.Array:
        h = x
        for conv, bn in ((self.conv1, self.bn1), (self.conv2, self.bn2)):
            h = conv(h)
            h = nnx.max_pool(nnx.relu(h if bn is None else bn(h)), (2, 2), (2, 2))
        return self.fc2(nnx.relu(self.fc1(h.reshape(h.shape[0], -1))))


def ln_mlp(seed: int = 0) -> nnx.Sequential:
    """784-512-LayerNorm-ReLU-512-LayerNorm-ReLU-10."""
    rngs = nnx.Rngs(seed)
    return nnx.Sequential(
        nnx.Linear(784, 512, rngs=rngs), nnx.LayerNorm(512, rngs=rngs), nnx.relu,
        nnx.Linear(512, 512, rngs=rngs), nnx.LayerNorm(512, rngs=rngs), nnx.relu,
        nnx.Linear(512, 10, rngs=rngs),
    )


POPULATION_TARGET = 1.5

MODELS = {
    "mlp": ("MLP 784-512-512-10 (ReLU), batch 256, softmax CE, float32", (256, 784)),
    "cnn": ("CNN 28x28x1-conv32-pool-conv64-pool-128-10 (ReLU), batch 256, softmax CE, "
            "float32", (256, 28, 28, 1)),
    "bn_cnn": ("CNN 28x28x1-conv32-BN-pool-conv64-BN-pool-128-10 (ReLU, BatchNorm in train "
               "mode), batch 256, softmax CE, float32", (256, 28, 28, 1)),
    "ln_mlp": ("MLP 784-512-LN-512-LN-10 (LayerNorm, ReLU), batch 256, softmax CE, float32",
               (256, 784)),
    "population": ("periodic wrappers in a vmapped population (100 steps per call)", None),
    "revive": ("revive_dead_units with its defaults, 3-piece maxout, whole runs of both "
               "population drivers", None),
    "sweep": ("size sweep (run_sweep)", None),
}


def maxout_problem():
    """``(init_fn(key) -> params, loss_fn, sym)``: 3-piece maxout in 2-D, 1000 points, U[-0.7, 0.7]."""
    mp = qo.models.MaxPoolNet(3, 1, 2, rngs=nnx.Rngs(0))
    mp_apply, mp_params = functional(mp)
    planes = qo.models.max_of_planes_task([[1.0, 1.0], [3.0, 1.0], [1.0, 3.0]], [0.0, -1.0, -1.0])

    def mp_init(key):
        return jax.tree.map(lambda p, k: jax.random.uniform(k, p.shape, p.dtype, -0.7, 0.7),
                            mp_params, jax.tree.unflatten(jax.tree.structure(mp_params), list(
                                jax.random.split(key, len(jax.tree.leaves(mp_params))))))

    def mp_loss(p):
        return qo.models.mse(mp_apply(p, planes.x), planes.y)

    return mp_init, mp_loss, qo.infer_symmetry(mp)


def population_problems(nets: int):
    """``name -> (init_fn(key) -> params, loss_fn, {method: optimizer})`` for the population."""
    saw = qo.models.SawtoothNet(rngs=nnx.Rngs(0))
    saw_sym = qo.infer_symmetry(saw)
    saw_apply, saw_params = functional(saw)
    task = qo.models.sawtooth_task()

    def saw_init(key):
        return jax.tree.map(lambda p, k: 0.5 * jax.random.normal(k, p.shape, p.dtype), saw_params,
                            jax.tree.unflatten(jax.tree.structure(saw_params),
                                               list(jax.random.split(key, len(
                                                   jax.tree.leaves(saw_params))))))

    def saw_loss(p):
        return qo.models.mse(saw_apply(p, task.x), task.y)

    mp_init, mp_loss, mp_sym = maxout_problem()
    return {
        "sawtooth": (saw_init, saw_loss, {
            "adam": optax.adam(1e-3),
            "rebalance(adam, every=10)": qo.rebalance(optax.adam(1e-3), saw_sym, every=10),
            "teleport(adam, every=10)": qo.teleport(optax.adam(1e-3), saw_sym, every=10),
        }),
        "maxout 3 pieces, 2-D": (mp_init, mp_loss, {
            "adam": optax.adam(0.02),
            "revive_dead_units(adam, every=50)": qo.revive_dead_units(
                optax.adam(0.02), mp_sym, every=50, patience=10,
                axis_name=qo.training.POPULATION_AXIS),
        }),
    }


def run_population(*, quick: bool, nets: int, seed: int = 0) -> dict:
    """Amortized cost of the periodic wrappers in a vmapped population (see the module doc)."""
    from quotient_opt.training import make_population_step

    steps = 100
    rounds = 3 if quick else 8
    rows = []
    for prob, (init_fn, loss_fn, txs) in population_problems(nets).items():
        p0 = jax.vmap(init_fn)(jax.random.split(jax.random.key(seed), nets))
        one = jax.tree.map(lambda a: a[0], p0)
        runners = {}
        for name, tx in txs.items():
            ps = make_population_step(tx, loss_fn, one)

            def many(p, s, ps=ps):
                def body(c, _):
                    p, s, losses = ps.step(*c)
                    return (p, s), losses[0]
                return jax.lax.scan(body, (p, s), None, length=steps)[0]

            run = jax.jit(many)
            state = ps.init(p0)
            t0 = time.perf_counter()
            jax.block_until_ready(run(p0, state))  # compiles; the timed run starts at step 0
            runners[name] = [run, p0, state, time.perf_counter() - t0]
        times: dict[str, list[float]] = {n: [] for n in runners}
        order = np.random.default_rng(seed)
        for _ in range(rounds):
            names = list(runners)
            order.shuffle(names)
            for name in names:
                r = runners[name]
                t = time.perf_counter()
                r[1], r[2] = jax.block_until_ready(r[0](r[1], r[2]))
                times[name].append(time.perf_counter() - t)
        for name in runners:
            if name == "adam":
                continue
            # Amortized: the whole timed run (steps 0 .. rounds*steps, the first
            # revivals included) against Adam's; the rounds interleave the methods.
            ratio = float(np.sum(times[name]) / np.sum(times["adam"]))
            rows.append({
                "problem": prob, "method": name, "nets": nets, "steps_per_call": steps,
                "steps": rounds * steps,
                "net_steps_per_s": nets * steps * rounds / float(np.sum(times[name])),
                "adam_net_steps_per_s": nets * steps * rounds / float(np.sum(times["adam"])),
                "median_round_ratio": float(np.median(np.asarray(times[name])
                                                      / np.asarray(times["adam"]))),
                "ratio": ratio, "target": POPULATION_TARGET, "met": ratio <= POPULATION_TARGET,
                "compile_s": runners[name][3],
            })
    return {"model": MODELS["population"][0], "device": jax.devices()[0].device_kind,
            "cpu_count": os.cpu_count(), "quick": quick, "rows": rows}


REVIVE_TARGETS = {"train_population": 1.5, "vmap(qo.fit)": 3.0}
#: The ``max_served`` of the capped revival row (population driver only).
REVIVE_CAP = 16


def run_revive(*, quick: bool, nets: int = 200, seed: int = 0) -> dict:
    """``revive_dead_units`` with its defaults against Adam, under both population drivers.

    3-piece maxout (:func:`maxout_problem`), ``nets`` networks, 1000 steps (200 with
    ``--quick``), each run from the same initial networks and timed whole (the burst of
    revivals at the first checks amortized over the run), round-robin with Adam's run of
    the same driver; under the population driver also with ``max_served=REVIVE_CAP`` (the
    burst spread over later checks). Drivers: the library's population step
    (:func:`~quotient_opt.training.make_population_step`, ``axis_name=POPULATION_AXIS``: the
    step counter unbatched, only the due networks revived) and a plain
    ``jax.jit(jax.vmap(qo.fit))`` (where the check's branch on "some unit is due" is batched
    and every network pays for a revival at every check).
    """
    from quotient_opt.training import POPULATION_AXIS, make_population_step

    steps, rounds = (200, 1) if quick else (1000, 3)
    init_fn, loss_fn, sym = maxout_problem()
    p0 = jax.vmap(init_fn)(jax.random.split(jax.random.key(seed), nets))
    one = jax.tree.map(lambda a: a[0], p0)

    def population(tx):
        ps = make_population_step(tx, loss_fn, one)

        def whole(p, s):
            def body(c, _):
                p, s, _ = ps.step(*c)
                return (p, s), None
            return jax.lax.scan(body, (p, s), None, length=steps)[0]

        s0 = ps.init(p0)
        run = jax.jit(whole).lower(p0, s0).compile()
        return lambda: run(p0, s0)

    def plain(tx):
        run = jax.jit(jax.vmap(lambda p: qo.fit(tx, p, loss_fn, steps)[:2])).lower(p0).compile()
        return lambda: run(p0)

    txs = {
        "adam": lambda axis: optax.adam(0.02),
        "revive_dead_units(adam) (defaults)": lambda axis: qo.revive_dead_units(
            optax.adam(0.02), sym, **({} if axis is None else {"axis_name": axis})),
        f"revive_dead_units(adam, max_served={REVIVE_CAP})": lambda axis: qo.revive_dead_units(
            optax.adam(0.02), sym, axis_name=axis, max_served=REVIVE_CAP),
    }
    runners = {}
    for driver, build, axis in (("train_population", population, POPULATION_AXIS),
                                ("vmap(qo.fit)", plain, None)):
        for name, make in txs.items():
            if axis is None and "max_served" in name:
                continue  # the cap needs the population's axis
            t0 = time.perf_counter()
            runners[driver, name] = [build(make(axis)), time.perf_counter() - t0, []]
    order = np.random.default_rng(seed)
    for _ in range(rounds):
        keys = list(runners)
        order.shuffle(keys)
        for k in keys:
            t = time.perf_counter()
            out = jax.block_until_ready(runners[k][0]())
            runners[k][2].append(time.perf_counter() - t)
            runners[k].append(out)
    rows = []
    for (driver, name), (_, compile_s, times, *outs) in runners.items():
        if name == "adam":
            continue
        base = runners[driver, "adam"][2]
        ratio = float(np.sum(times) / np.sum(base))
        params, state = outs[-1]
        final = np.asarray(jax.vmap(loss_fn)(params))
        rows.append({
            "driver": driver, "method": name, "nets": nets, "steps": steps, "rounds": rounds,
            "seconds": float(np.median(times)), "adam_seconds": float(np.median(base)),
            "ratio": ratio, "median_round_ratio": float(np.median(np.asarray(times)
                                                                  / np.asarray(base))),
            "target": REVIVE_TARGETS[driver], "met": ratio <= REVIVE_TARGETS[driver],
            "solved": float(np.mean(final < 1e-6)), "revivals": int(np.sum(state.revivals)),
            "compile_s": compile_s,
        })
    return {"model": MODELS["revive"][0], "device": jax.devices()[0].device_kind,
            "cpu_count": os.cpu_count(), "quick": quick, "rows": rows}


def print_revive(res: dict) -> None:
    print(f"{res['model']} on {res['device']}")
    print(f"{'driver':18s} {'method':40s} {'nets':>5s} {'steps':>6s} {'s':>8s} {'adam s':>8s} "
          f"{'ratio':>6s} {'target':>6s} {'solved':>7s}  met")
    for r in res["rows"]:
        print(f"{r['driver']:18s} {r['method']:40s} {r['nets']:5d} {r['steps']:6d} "
              f"{r['seconds']:8.1f} {r['adam_seconds']:8.1f} {r['ratio']:6.2f} {r['target']:6.1f} "
              f"{100 * r['solved']:6.1f}%  {'yes' if r['met'] else 'NO'}")


def print_population(res: dict) -> None:
    print(f"{res['model']} on {res['device']}")
    print(f"{'problem':22s} {'method':36s} {'nets':>5s} {'net-steps/s':>12s} {'adam':>12s} "
          f"{'ratio':>6s} {'median round':>12s}  met")
    for r in res["rows"]:
        print(f"{r['problem']:22s} {r['method']:36s} {r['nets']:5d} {r['net_steps_per_s']:12.0f} "
              f"{r['adam_net_steps_per_s']:12.0f} {r['ratio']:6.2f} {r['median_round_ratio']:12.2f}"
              f"  {'yes' if r['met'] else 'NO'}")


def mlp(seed: int = 0, sizes: tuple[int, ...] = (784, 512, 512, 10)) -> nnx.Sequential:
    """A ReLU MLP with layer sizes ``sizes`` (default 784-512-512-10)."""
    rngs = nnx.Rngs(seed)
    layers: list = []
    for a, b in zip(sizes[:-1], sizes[1:]):
        layers += [nnx.Linear(a, b, rngs=rngs), nnx.relu]
    return nnx.Sequential(*layers[:-1])


def methods(sym: qo.Symmetry, lr: float = 1e-3) -> dict[str, tuple[Callable[[], object], bool]]:
    """Name -> (factory of the optimizer, whether it reads the loss as ``value_fn``), built
    from the shared registry :mod:`benchmarks.cases` with this benchmark's options."""
    def case(name: str, **options: object) -> tuple[Callable[[], object], bool]:
        c = CASES_BY_NAME[name]
        return (lambda: c.build(sym, lr=lr, **options)), c.needs_value_fn

    out = {
        "adam": ((lambda: optax.adam(lr)), False),
        "adam+project_horizontal": case("project_horizontal"),
        "path_norm+adam": case("scale_by_path_norm"),
        "rebalance(adam, every=1)": case("rebalance", every=1),
        "teleport(adam, every=10)": case("teleport", every=10, steps=10),
    }
    if sym.factors:
        out["adamp"] = ((lambda: qo.adamp(lr, sym)), False)
    return out


BUILDERS = {"mlp": mlp, "cnn": lambda seed: CNN(nnx.Rngs(seed)),
            "bn_cnn": lambda seed: CNN(nnx.Rngs(seed), batch_norm=True), "ln_mlp": ln_mlp}


def make_step(apply, tx, x, y, needs_value_fn: bool):
    def loss_fn(p):
        return optax.softmax_cross_entropy_with_integer_labels(apply(p, x), y).mean()

    @jax.jit
    def step(params, state):
        loss, grads = jax.value_and_grad(loss_fn)(params)
        extra = {"value_fn": loss_fn, "value": loss, "grad": grads} if needs_value_fn else {}
        updates, state = tx.update(grads, state, params, **extra)
        return optax.apply_updates(params, updates), state, loss

    return step


def round_robin(runners: dict[str, list], *, rounds: int, per_round: int, seed: int = 0,
                desc: str = "rounds") -> tuple[dict[str, list[float]], dict[str, list[float]]]:
    """Time ``runners`` (name -> ``[step, params, state]``, ``step(params, state) ->
    (params, state, loss)``) round-robin: per round, a block of ``per_round`` steps of each
    method in a shuffled order. Returns per method the step times and the per-round
    blocks, ``(rounds, per_round)`` (``runners`` keep the advanced params and states)."""
    times: dict[str, list[float]] = {n: [] for n in runners}
    blocks: dict[str, list[list[float]]] = {n: [] for n in runners}
    order = np.random.default_rng(seed)
    try:
        from tqdm import tqdm

        it = tqdm(range(rounds), desc=desc, leave=False)
    except ImportError:  # pragma: no cover
        it = range(rounds)
    for _ in it:
        names = list(runners)
        order.shuffle(names)  # no method always runs first (or right after another)
        for name in names:
            r = runners[name]
            step, params, state = r
            block = []
            for _ in range(per_round):
                t = time.perf_counter()
                params, state, loss = step(params, state)
                jax.block_until_ready(loss)
                block.append(time.perf_counter() - t)
            r[1], r[2] = params, state
            times[name].extend(block)
            blocks[name].append(block)
    return times, blocks


def run(*, quick: bool, seed: int = 0, model_name: str = "mlp") -> dict:
    title, x_shape = MODELS[model_name]
    model = BUILDERS[model_name](seed)
    kx, ky = jax.random.split(jax.random.key(seed))
    x = jax.random.normal(kx, x_shape, jnp.float32)
    y = jax.random.randint(ky, (x_shape[0],), 0, 10)
    sym = qo.infer_symmetry(model, x[:8])
    apply, params0 = functional(model)
    targets = TARGETS[model_name]
    rounds, per_round, warmup = (20, 3, 3) if quick else (60, 3, 5)
    runners = {}
    status = {}
    for name, (factory, needs_value_fn) in methods(sym).items():
        try:
            tx = factory()
        except ValueError as e:  # e.g. the path norm of a normalized network is not defined
            status[name] = f"not applicable: {str(e).splitlines()[0][:160]}"
            continue
        step = make_step(apply, tx, x, y, needs_value_fn=needs_value_fn)
        state = tx.init(params0)
        params = params0
        t0 = time.perf_counter()
        params, state, loss = jax.block_until_ready(step(params, state))
        compile_s = time.perf_counter() - t0
        for _ in range(warmup):
            params, state, loss = step(params, state)
        jax.block_until_ready(loss)
        runners[name] = [step, params, state]
        status[name] = f"ok (compile {compile_s:.1f}s)"

    times, blocks = round_robin(runners, rounds=rounds, per_round=per_round, seed=seed)

    base = float(np.median(times["adam"]))
    rows = []
    for name, st in status.items():
        if name not in times:
            rows.append({"method": name, "status": st})
            continue
        med = float(np.median(times[name]))
        # paired: each round's block against adam's block of the same round
        paired = float(np.median(np.median(blocks[name], axis=1)
                                 / np.median(blocks["adam"], axis=1)))
        row = {
            "method": name,
            "status": st,
            "median_ms": 1e3 * med,
            "ratio": paired,
            "ratio_of_medians": med / base,
            "mean_ms": 1e3 * float(np.mean(times[name])),
            # amortized cost: what a method that acts every k steps really costs
            "ratio_of_means": float(np.mean(times[name]) / np.mean(times["adam"])),
            "steps_timed": len(times[name]),
        }
        if name in targets:
            row["target"] = targets[name]
            row["met"] = paired <= targets[name]
        rows.append(row)
    return {
        "model": title,
        "device": jax.devices()[0].device_kind,
        "cpu_count": os.cpu_count(),
        "quick": quick,
        "rows": rows,
        "raw_ms": {n: [1e3 * t for t in ts] for n, ts in times.items()},
    }


def print_table(res: dict) -> None:
    print(f"{res['model']} on {res['device']}")
    print("ratio: median over rounds of (method block / adam block in the same round);")
    print("amortized: mean step time / adam's mean step time (counts rare expensive steps)")
    print(f"{'method':28s} {'median ms':>10s} {'ratio':>7s} {'amortized':>9s} {'target':>7s}  met")
    for r in res["rows"]:
        if "ratio" not in r:
            print(f"{r['method']:28s} {'-':>10s} {'-':>7s} {'-':>9s} {'-':>7s}  {r['status']}")
            continue
        tgt = f"{r['target']:.2f}" if "target" in r else "-"
        met = ("yes" if r["met"] else "NO") if "met" in r else ""
        print(
            f"{r['method']:28s} {r['median_ms']:10.2f} {r['ratio']:7.3f} "
            f"{r['ratio_of_means']:9.3f} {tgt:>7s}  {met}"
        )


def plot(results: dict[str, dict], out: str) -> None:
    import matplotlib
    import matplotlib.ticker

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    os.makedirs(out, exist_ok=True)
    results = {k: v for k, v in results.items() if "raw_ms" in v}
    if not results:
        return
    fig, axes = plt.subplots(len(results), 1, figsize=(7, 3.2 * len(results)), squeeze=False)
    for ax, (name, res) in zip(axes[:, 0], results.items()):
        names = list(res["raw_ms"])
        ax.boxplot([res["raw_ms"][n] for n in names], orientation="horizontal",
                   tick_labels=names)
        ax.set_xscale("log")
        ticks = matplotlib.ticker.LogLocator(subs=(1.0, 1.5, 2.0, 3.0, 4.0, 5.0, 6.0, 8.0))
        ax.xaxis.set_major_locator(ticks)
        ax.xaxis.set_major_formatter(matplotlib.ticker.FormatStrFormatter("%g"))
        ax.xaxis.set_minor_formatter(matplotlib.ticker.NullFormatter())
        ax.set_xlabel("step time (ms, log scale)")
        ax.set_title(f"per-step time, {name}, batch 256")
    fig.tight_layout()
    fig.savefig(os.path.join(out, "overhead.png"), dpi=120)
    plt.close(fig)


#: The size sweep's methods (the registry's case and options) and their goals (issue 19).
SWEEP_METHODS = {
    "adam+project_horizontal": ("project_horizontal", {}),
    "quotient_adam": ("quotient_adam", {}),
    "rebalance(adam, every=10)": ("rebalance", {"every": 10}),
}
SWEEP_GOALS = {"adam+project_horizontal": 1.10, "quotient_adam": 1.25,
               "rebalance(adam, every=10)": 1.10}
#: On the smallest model (4-32-32-1) every method within this ratio.
SWEEP_SMALL_GOAL = 1.5
#: Steps per timed block: a multiple of the periodic methods' ``every``, so each block
#: holds the same number of their events (the ratio is amortized and paired).
SWEEP_BLOCK = 10
#: The CNNs' batch: at 256 a 2-core step takes 0.3 s and the convolutions hide everything.
SWEEP_CNN_BATCH = 32


class SweepModel(NamedTuple):
    """One model of the size sweep: ``build(seed) -> nnx model``, the input batch's shape,
    and ``classes`` (softmax cross-entropy over that many; 0: mean squared error)."""

    name: str
    family: str
    build: Callable[[int], nnx.Module]
    x_shape: tuple[int, ...]
    classes: int


def sweep_models(quick: bool) -> list[SweepModel]:
    """MLP 4-32-32-1, MLP 784-w-w-10 (w 64 → 4096) at batch 256, and the CNN and the
    BatchNorm CNN at two widths at batch :data:`SWEEP_CNN_BATCH` (``quick``: the widths 64
    and 1024 and the narrow CNNs)."""
    widths = (64, 1024) if quick else (64, 256, 1024, 2048, 4096)
    cnns = (((32, 64), 128),) if quick else (((32, 64), 128), ((64, 128), 256))
    out = [SweepModel("mlp 4-32-32-1", "mlp", lambda s: mlp(s, (4, 32, 32, 1)), (256, 4), 0)]
    out += [SweepModel(f"mlp 784-{w}-{w}-10", "mlp",
                       lambda s, w=w: mlp(s, (784, w, w, 10)), (256, 784), 10) for w in widths]
    for bn in (False, True):
        out += [SweepModel(f"{'bn_' if bn else ''}cnn {c[0]}-{c[1]}-{d}",
                           "bn_cnn" if bn else "cnn",
                           lambda s, c=c, d=d, bn=bn: CNN(nnx.Rngs(s), batch_norm=bn,
                                                          channels=c, dense=d),
                           (SWEEP_CNN_BATCH, 28, 28, 1), 10) for c, d in cnns]
    return out


def population_size(n_params: int) -> int:
    """Networks in the sweep's vmapped population: about 4M parameters in all, 2 to 256."""
    return int(np.clip(2 ** round(np.log2(2 ** 22 / n_params)), 2, 256))


def sweep_methods(sym: qo.Symmetry, lr: float = 1e-3) -> dict[str, Callable[[], object]]:
    out = {"adam": lambda: optax.adam(lr)}
    for name, (case, options) in SWEEP_METHODS.items():
        out[name] = lambda c=CASES_BY_NAME[case], o=options: c.build(sym, lr=lr, **o)
    if sym.factors:
        out["adamp"] = lambda: qo.adamp(lr, sym)
    return out


def run_sweep(*, quick: bool, seed: int = 0) -> dict:
    """Every sweep method's ratio to Adam on every :func:`sweep_models` model, single (one
    jitted step) and in a vmapped population (the library's population step,
    :func:`population_size` networks on the same batch). Timed round-robin in blocks of
    :data:`SWEEP_BLOCK` steps; the ratio is the median over rounds of the block's total
    time over Adam's block of the same round, with the interquartile range."""
    from quotient_opt.training import make_population_step

    budget = 3.0 if quick else 15.0  # seconds of Adam steps timed per model and mode
    rows = []
    for m in sweep_models(quick):
        model = m.build(seed)
        kx, ky = jax.random.split(jax.random.key(seed))
        x = jax.random.normal(kx, m.x_shape, jnp.float32)
        y = (jax.random.randint(ky, (m.x_shape[0],), 0, m.classes) if m.classes
             else jax.random.normal(ky, (m.x_shape[0], 1), jnp.float32))
        sym = qo.infer_symmetry(model, x[:8])
        apply, params0 = functional(model)
        n_params = sum(int(np.prod(a.shape)) for a in jax.tree.leaves(params0))

        def loss_fn(p, apply=apply, x=x, y=y, classes=m.classes):
            out = apply(p, x)
            if classes:
                return optax.softmax_cross_entropy_with_integer_labels(out, y).mean()
            return jnp.mean((out - y) ** 2)

        nets = population_size(n_params)
        pop0 = jax.tree.map(lambda a: jnp.broadcast_to(a, (nets, *a.shape)) + 0.0, params0)
        for mode in ("single", "population"):
            runners, compile_s = {}, {}
            for name, factory in sweep_methods(sym).items():
                tx = factory()
                if mode == "single":
                    def one(p, s, tx=tx):
                        loss, g = jax.value_and_grad(loss_fn)(p)
                        u, s = tx.update(g, s, p)
                        return optax.apply_updates(p, u), s, loss
                    step, p = jax.jit(one), params0
                    state = tx.init(p)
                else:
                    ps = make_population_step(tx, loss_fn, params0)
                    step, p = jax.jit(ps.step), pop0
                    state = ps.init(p)
                t0 = time.perf_counter()
                p1, s1, loss = jax.block_until_ready(step(p, state))
                compile_s[name] = time.perf_counter() - t0
                for _ in range(SWEEP_BLOCK - 1):  # warm-up: one period of the wrappers
                    p1, s1, loss = step(p1, s1)
                jax.block_until_ready(loss)
                runners[name] = [step, p1, s1]
            t = time.perf_counter()
            for _ in range(3):
                jax.block_until_ready(runners["adam"][0](*runners["adam"][1:])[2])
            t_adam = (time.perf_counter() - t) / 3
            rounds = int(np.clip(budget / (t_adam * SWEEP_BLOCK), 5, 60))
            _, blocks = round_robin(runners, rounds=rounds, per_round=SWEEP_BLOCK, seed=seed,
                                    desc=f"{m.name} {mode}")
            base = np.sum(blocks["adam"], axis=1)
            for name in runners:
                if name == "adam":
                    continue
                r = np.sum(blocks[name], axis=1) / base
                goal = SWEEP_SMALL_GOAL if m.x_shape[-1] == 4 else SWEEP_GOALS.get(name)
                rows.append({
                    "model": m.name, "family": m.family, "params": n_params, "mode": mode,
                    "nets": 1 if mode == "single" else nets, "method": name,
                    "adam_ms": 1e3 * float(np.median(base)) / SWEEP_BLOCK,
                    "ms": 1e3 * float(np.median(np.sum(blocks[name], axis=1))) / SWEEP_BLOCK,
                    "ratio": float(np.median(r)),
                    "ratio_q25": float(np.quantile(r, 0.25)),
                    "ratio_q75": float(np.quantile(r, 0.75)),
                    "rounds": rounds, "compile_s": compile_s[name],
                    **({"goal": goal, "met": float(np.median(r)) <= goal} if goal else {}),
                })
            del runners
    return {"model": f"size sweep: MLPs (batch 256), CNNs and BatchNorm CNNs (batch "
                      f"{SWEEP_CNN_BATCH}), float32",
            "device": jax.devices()[0].device_kind, "cpu_count": os.cpu_count(),
            "quick": quick, "block": SWEEP_BLOCK, "rows": rows}


def sweep_markdown(res: dict) -> str:
    """The sweep as a markdown table: one line per model and mode, one column per method."""
    methods = list(dict.fromkeys(r["method"] for r in res["rows"]))
    head = "| model | params | mode | Adam ms | " + " | ".join(methods) + " |"
    lines = [head, "|" + "---|" * (4 + len(methods))]
    groups: dict[tuple[str, str], list[dict]] = {}
    for r in res["rows"]:
        groups.setdefault((r["model"], r["mode"]), []).append(r)
    for (model, mode), rs in groups.items():
        by = {r["method"]: r for r in rs}
        cells = [f"{by[k]['ratio']:.2f}×" + ("" if by[k].get("met", True) else " ✗")
                 if k in by else "–" for k in methods]
        mode_s = "single" if mode == "single" else f"vmap {rs[0]['nets']}"
        lines.append(f"| {model} | {rs[0]['params']:,} | {mode_s} | {rs[0]['adam_ms']:.2f} | "
                     + " | ".join(cells) + " |")
    return "\n".join(lines)


def plot_sweep(res: dict, out: str) -> None:
    """``overhead_sweep.png``: each method's ratio to Adam against the parameter count,
    single and vmapped, with the goals dashed."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    os.makedirs(out, exist_ok=True)
    methods = list(dict.fromkeys(r["method"] for r in res["rows"]))
    colors = {k: f"C{i}" for i, k in enumerate(methods)}
    markers = {"mlp": "o", "cnn": "s", "bn_cnn": "^"}
    fig, axes = plt.subplots(1, 2, figsize=(12, 4.6), sharey=True)
    for ax, mode in zip(axes, ("single", "population")):
        for k in methods:
            for fam, mk in markers.items():
                rs = sorted((r for r in res["rows"] if r["mode"] == mode and r["method"] == k
                             and r["family"] == fam), key=lambda r: r["params"])
                if not rs:
                    continue
                xs = [r["params"] for r in rs]
                ys = [r["ratio"] for r in rs]
                err = [[r["ratio"] - r["ratio_q25"] for r in rs],
                       [r["ratio_q75"] - r["ratio"] for r in rs]]
                ax.errorbar(xs, ys, yerr=err, color=colors[k], marker=mk, capsize=2,
                            ls="-" if fam == "mlp" else ":",
                            label=f"{k} ({fam})" if mode == "single" else None)
            if k in SWEEP_GOALS:
                ax.axhline(SWEEP_GOALS[k], color=colors[k], ls="--", lw=0.8)
        ax.axhline(1.0, color="k", lw=0.6)
        ax.set_xscale("log")
        ax.set_xlabel("parameters per network")
        ax.set_title("one network" if mode == "single" else "vmapped population (~4M params)")
        ax.grid(alpha=0.3)
    axes[0].set_ylabel("step time / Adam's (median over rounds, IQR)")
    fig.legend(loc="lower center", ncol=4, fontsize=7, frameon=False)
    fig.suptitle(f"Per-step overhead against Adam, {res['device']} "
                 f"({res['cpu_count']} cores); dashed: goals")
    fig.tight_layout(rect=(0, 0.12, 1, 1))
    fig.savefig(os.path.join(out, "overhead_sweep.png"), dpi=120)
    plt.close(fig)


def main(argv: list[str] | None = None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--quick", action="store_true", help="fewer rounds (CI-sized)")
    ap.add_argument("--models", default="mlp,cnn,bn_cnn,ln_mlp,population,revive,sweep",
                    help="comma-separated: mlp, cnn, bn_cnn, ln_mlp, population, revive, sweep")
    ap.add_argument("--nets", type=int, default=1024, help="population size")
    ap.add_argument("--json", help="write results to this JSON file")
    ap.add_argument("--out", help="write a PNG figure into this directory")
    args = ap.parse_args(argv)
    names = [m for m in args.models.split(",") if m]
    bad = [m for m in names if m not in MODELS]
    if bad:
        ap.error(f"--models: unknown {bad}; choose from {sorted(MODELS)}")
    results = {}
    for name in names:
        if name == "population":
            results[name] = run_population(quick=args.quick, nets=args.nets)
            print_population(results[name])
            continue
        if name == "revive":
            results[name] = run_revive(quick=args.quick)
            print_revive(results[name])
            continue
        if name == "sweep":
            results[name] = run_sweep(quick=args.quick)
            print(sweep_markdown(results[name]))
            continue
        results[name] = run(quick=args.quick, model_name=name)
        print_table(results[name])
    if args.json:
        with open(args.json, "w") as f:
            json.dump(results, f, indent=2)
    if args.out:
        plot(results, args.out)
        if "sweep" in results:
            plot_sweep(results["sweep"], args.out)
    return results


if __name__ == "__main__":
    main()
