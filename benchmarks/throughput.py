"""Population-training throughput on the sawtooth net: JAX variants against batched PyTorch.

Task: ``qo.models.SawtoothNet`` (1 → 5×5 ReLU → 1, 136 parameters, He-normal
init) on ``qo.models.sawtooth_task()`` (137 points, full batch), Adam(1e-3),
float32. A *network-step* is one forward + backward + Adam update of one
network. Every variant is timed in the same run, round-robin (one call of
about ``--call-seconds`` per variant per round), so load from other processes
hits all of them alike; reported per variant: the median and the best rate
over rounds (wall clock), the rate per second of process CPU time (less
sensitive to other processes' load, but it also counts threads spinning), and
the median over rounds of the paired ratio to the PyTorch baseline.

JAX variants (each a jitted loop over steps of one chunk of networks):

* ``jax naive vmap``: ``vmap(value_and_grad)`` and ``vmap(adam.update)`` with
  every state leaf batched, XLA's default flags (the baseline in FINDINGS).
* ``jax nets-in-lanes einsum``: networks on the minor axis, ``einsum`` layers,
  autodiff.
* ``qo generic``: the library's generic path (``make_population_step``,
  ``fast_path=False``): shared step counter, 512-bit vectors.
* ``qo fast``: the library's dense-MLP fast path (data points on the SIMD lanes,
  hand-written backward), chunks of 64 / 256 (the default) / 1024 networks,
  and with XLA's default 256-bit vectors.
* ``qo fast, 2 host devices (Mesh)``: the fast path sharded over two XLA:CPU
  devices (``--xla_force_host_platform_device_count=2``, a worker process), the
  ``mesh=`` path of ``train_population`` (not with ``--quick``).
* ``qo train_population``: the whole API (segments, history, progress off),
  one call, compilation included (not with ``--quick``).

PyTorch (when installed): the networks batched with ``torch.baddbmm`` over
stacked weights ``(nets, in, out)``, ``torch.optim.Adam(foreach=True)`` over the
12 stacked tensors, ``torch.set_num_threads(2)``; also with
``OMP_WAIT_POLICY=PASSIVE`` (in a worker process: OpenMP reads it at start-up;
on a loaded machine spinning OpenMP threads collapse the default's throughput)
and with 1 thread. The baseline for the ratios is the fastest 2-thread torch
variant of the run (median).

FLOPs per network-step are counted by hand (multiply-adds ×2 of the forward,
the input-gradient and weight-gradient products, bias adds and the Adam update;
see :func:`flops_per_net_step`) and cross-checked with XLA's cost analysis of
one network's step. The peak is 2 cores × 2 FMA pipes × 16 float32 lanes × 2
FLOPs × the clock (AVX-512 on a Zen 5 core with full-width 512-bit pipes; the
clock is the TSC rate from ``/proc/cpuinfo``, the base clock), and a large float32
matmul measured in the same run gives an achieved rate; ``%peak`` is taken against the
larger of the two (on these machines the matmul beats the base-clock peak: the cores
boost above it).

Usage::

    python -m benchmarks.throughput [--quick] [--json PATH] [--rounds N]
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import re
import time
from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
import optax
from flax import nnx

import quotient_opt as qo
from quotient_opt.models import functional
from quotient_opt.training._population import make_population_step

LR = 1e-3
FULL_RUN = (320_000, 50_000)  # the paper's sawtooth study: nets x steps


# --------------------------------------------------------------------------- problem


def problem():
    """``(init_fn, loss_fn, x, y, sizes)`` of the sawtooth population."""
    task = qo.models.sawtooth_task()
    apply, _ = functional(qo.models.SawtoothNet(rngs=nnx.Rngs(0)))

    def init_fn(key):
        return nnx.state(qo.models.SawtoothNet(rngs=nnx.Rngs(key)), nnx.Param)

    def loss_fn(p):
        return qo.models.mse(apply(p, task.x), task.y)

    return init_fn, loss_fn, task.x, task.y, [1, 5, 5, 5, 5, 5, 1]


def flops_per_net_step(points: int, sizes: list[int], n_params: int) -> dict[str, int]:
    """Useful FLOPs of one forward + backward + Adam step of one dense ReLU MLP (MSE loss)."""
    macs = sum(a * b for a, b in zip(sizes, sizes[1:]))
    macs_dh = sum(a * b for a, b in zip(sizes[1:-1], sizes[2:]))  # no input gradient for x
    units = sum(sizes[1:])
    fwd = 2 * points * macs + points * units + 3 * points  # products, bias adds, loss
    bwd = 2 * points * macs + 2 * points * macs_dh + points * units  # dW, dh, db
    adam = 12 * n_params  # two moment updates, bias corrections, sqrt, divide, step
    return {"forward": fwd, "backward": bwd, "adam": adam, "total": fwd + bwd + adam}


def cpu_peak() -> dict[str, Any]:
    """The CPU's float32 FMA peak from /proc/cpuinfo (cores × 2 pipes × 16 lanes × 2 × clock)."""
    info: dict[str, Any] = {"cores": os.cpu_count(), "model": platform.processor()}
    try:
        text = open("/proc/cpuinfo").read()
        info["model"] = re.search(r"model name\s*:\s*(.*)", text).group(1)
        mhz = re.search(r"cpu MHz\s*:\s*([\d.]+)", text)
        bogo = re.search(r"bogomips\s*:\s*([\d.]+)", text)
        info["cpu_family"] = int(re.search(r"cpu family\s*:\s*(\d+)", text).group(1))
        info["avx512f"] = "avx512f" in text
        ghz = float(mhz.group(1)) / 1e3 if mhz else float(bogo.group(1)) / 2e3
        info["ghz"] = ghz
    except (OSError, AttributeError):
        info["ghz"] = None
    lanes = 16 if info.get("avx512f") else 8
    info["flops_per_cycle_per_core"] = 2 * lanes * 2  # 2 FMA pipes x lanes x (mul + add)
    if info.get("ghz"):
        info["peak_gflops"] = info["cores"] * info["flops_per_cycle_per_core"] * info["ghz"]
    return info


def load() -> list[float]:
    try:
        return [round(x, 2) for x in os.getloadavg()]
    except OSError:
        return []


# --------------------------------------------------------------------------- variants


class Variant:
    """``nets`` networks; ``setup()`` builds ``run(steps)``; ``call()`` runs ``self.steps``."""

    def __init__(self, name: str, nets: int, setup: Callable[[], Callable[[int], None]]):
        self.name, self.nets, self.setup_fn = name, nets, setup
        self.run: Callable[[int], None] | None = None
        self.steps = 0

    def prepare(self, call_seconds: float) -> float:
        """Builds, compiles and warms up; sizes a call to about ``call_seconds``."""
        t = time.perf_counter()
        self.run = self.setup_fn()
        probe = max(1, 2000 // self.nets)
        self.run(probe)  # compile + warm up
        setup = time.perf_counter() - t
        t = time.perf_counter()
        self.run(probe)
        rate = self.nets * probe / max(time.perf_counter() - t, 1e-6)
        self.steps = max(1, int(call_seconds * rate / self.nets))
        return setup

    def call(self) -> tuple[float, float] | None:
        """Runs one call; returns ``(wall, cpu)`` seconds when the work ran in another process."""
        return self.run(self.steps)

    @property
    def work(self) -> int:
        return self.nets * self.steps


def _loop(step, opts=None):
    """jit of ``n`` (dynamic) steps of ``step(p, s) -> (p, s, ...)``, buffers donated, as in
    ``train_population``'s segments."""

    def run(p, s, n):
        return jax.lax.fori_loop(0, n, lambda i, c: step(*c)[:2], (p, s))

    return jax.jit(run, donate_argnums=(0, 1), compiler_options=opts)


def _runner(f, p, s):
    box = [p, s]

    def run(steps):
        box[0], box[1] = f(box[0], box[1], jnp.int32(steps))
        jax.block_until_ready(box[0])

    return run


def jax_variant(name, nets, make_step, init_fn, opts=None):
    def setup():
        keys = jax.random.split(jax.random.key(0), nets)
        step, init_state = make_step()
        p = jax.jit(jax.vmap(init_fn))(keys)
        return _runner(_loop(step, opts), p, init_state(p))

    return Variant(name, nets, setup)


def naive_step(tx, loss_fn):
    def step(p, s):
        v, g = jax.vmap(jax.value_and_grad(loss_fn))(p)
        u, s = jax.vmap(tx.update)(g, s, p)
        return optax.apply_updates(p, u), s, v

    return step, jax.vmap(tx.init)


def lanes_einsum_step(tx, x, y, n_layers):
    """Networks on the minor axis: kernels ``(in, out, nets)``, activations
    ``(points, units, nets)``."""

    def loss(ps):
        h = jnp.broadcast_to(x[:, :, None], (*x.shape, ps[0][0].shape[-1]))
        for i, (w, b) in enumerate(ps):
            h = jnp.einsum("pin,ion->pon", h, w) + b[None]
            if i < n_layers - 1:
                h = jax.nn.relu(h)
        return jnp.sum(jnp.mean((h[:, 0, :] - y) ** 2, axis=0))

    def step(p, s):
        g = jax.grad(loss)(p)
        u, s = tx.update(g, s, p)
        return optax.apply_updates(p, u), s, None

    return step, tx.init


def lanes_init(key, sizes):
    ks = jax.random.split(key, len(sizes) - 1)
    return [
        (jax.random.normal(k, (a, b)) * np.sqrt(2.0 / a), jnp.zeros((b,)))
        for k, a, b in zip(ks, sizes, sizes[1:])
    ]


def lanes_variant(name, nets, x, y, sizes, tx):
    def setup():
        ps = jax.vmap(lambda k: lanes_init(k, sizes))(jax.random.split(jax.random.key(0), nets))
        ps = [(jnp.moveaxis(w, 0, -1), jnp.moveaxis(b, 0, -1)) for w, b in ps]
        step, init_state = lanes_einsum_step(tx, x, y, len(sizes) - 1)
        return _runner(_loop(step), ps, init_state(ps))

    return Variant(name, nets, setup)


def _torch_setup(nets, x, y, sizes, threads):
    import torch

    torch.set_num_threads(threads)
    g = torch.Generator().manual_seed(0)
    ws = [torch.randn(nets, a, b, generator=g) * (2.0 / a) ** 0.5 for a, b in zip(sizes, sizes[1:])]
    bs = [torch.zeros(nets, 1, b) for b in sizes[1:]]
    params = [t.requires_grad_() for t in ws + bs]
    xt = torch.tensor(np.asarray(x)).expand(nets, -1, -1).contiguous()
    yt = torch.tensor(np.asarray(y)).expand(nets, -1, -1).contiguous()
    opt = torch.optim.Adam(params, lr=LR, foreach=True)
    n = len(ws)

    def step():
        h = xt
        for i in range(n):
            h = torch.baddbmm(params[n + i], h, params[i])
            if i < n - 1:
                h = torch.relu(h)
        loss = ((h - yt) ** 2).mean(dim=(1, 2)).sum()  # a sum over nets: independent grads
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()

    def run(steps):
        torch.set_num_threads(threads)
        t, c = time.perf_counter(), time.process_time()
        for _ in range(steps):
            step()
        return time.perf_counter() - t, time.process_time() - c

    return run


def _torch_worker(conn, nets, x, y, sizes, threads):
    run = _torch_setup(nets, x, y, sizes, threads)
    conn.send("ready")
    while (steps := conn.recv()) is not None:
        conn.send(run(steps))


def torch_variant(name, nets, x, y, sizes, threads, env=None):
    """PyTorch in this process, or with ``env`` (OpenMP settings) in a worker process."""
    if env is None:
        return Variant(name, nets, lambda: _torch_setup(nets, x, y, sizes, threads))
    args = (nets, np.asarray(x), np.asarray(y), sizes, threads)
    return worker_variant(name, nets, _torch_worker, args, env)


def _sharded_worker(conn, nets_per_device, devices):
    """The library's fast path sharded over ``devices`` host devices (XLA_FLAGS from the parent)."""
    from jax.sharding import Mesh, NamedSharding, PartitionSpec

    init_fn, loss_fn, _, _, _ = problem()
    p1 = init_fn(jax.random.key(0))
    tx = optax.adam(LR)
    pop = make_population_step(
        tx, loss_fn, p1, fast_path=True, require_fast_path=True, pad_points=16
    )
    mesh = Mesh(np.array(jax.devices()[:devices]), ("nets",))
    nets = nets_per_device * devices
    sh = NamedSharding(mesh, PartitionSpec("nets"))
    p = jax.jit(jax.vmap(init_fn), out_shardings=sh)(jax.random.split(jax.random.key(0), nets))
    s = jax.tree.map(
        lambda a: jax.device_put(a, sh if a.ndim else NamedSharding(mesh, PartitionSpec())),
        pop.init(p),
    )
    run = _runner(_loop(pop.step, {"xla_cpu_prefer_vector_width": 512}), p, s)
    conn.send("ready")
    while (steps := conn.recv()) is not None:
        t, c = time.perf_counter(), time.process_time()
        run(steps)
        conn.send((time.perf_counter() - t, time.process_time() - c))


def worker_variant(name, nets, target, args, env):
    """A variant run in a worker process started with ``env`` (read at start-up: OpenMP or XLA
    settings), driven from here so it still takes its turn in the same round-robin."""

    def setup():
        import multiprocessing as mp

        ctx = mp.get_context("spawn")
        parent, child = ctx.Pipe()
        old = {k: os.environ.get(k) for k in env}
        os.environ.update(env)
        try:
            proc = ctx.Process(target=target, args=(child, *args), daemon=True)
            proc.start()
        finally:
            for k, v in old.items():
                if v is None:
                    os.environ.pop(k, None)
                else:
                    os.environ[k] = v
        assert parent.recv() == "ready"
        _WORKERS.append((proc, parent))

        def run(steps):
            parent.send(steps)
            return parent.recv()

        return run

    return Variant(name, nets, setup)


_WORKERS: list = []


def _stop_workers() -> None:
    while _WORKERS:
        proc, conn = _WORKERS.pop()
        conn.send(None)
        proc.join(timeout=10)


def matmul_gflops(seconds: float = 0.5) -> float:
    """Achieved float32 GFLOP/s of a 1024² matmul chain (XLA), the practical peak."""
    n = 1024
    a = jax.random.normal(jax.random.key(0), (n, n), jnp.float32)
    f = jax.jit(lambda a: jax.lax.fori_loop(0, 8, lambda i, b: (b @ a) * (1.0 / 32), a))
    f(a).block_until_ready()
    reps, t = 0, time.perf_counter()
    while time.perf_counter() - t < seconds:
        f(a).block_until_ready()
        reps += 1
    return reps * 8 * 2 * n**3 / (time.perf_counter() - t) / 1e9


# --------------------------------------------------------------------------- measurement


def measure(
    *,
    rounds: int = 8,
    call_seconds: float = 0.4,
    quick: bool = False,
    with_torch: bool = True,
    full_api: bool = True,
) -> dict[str, Any]:
    """Measures every variant round-robin; returns the rows and the set-up (see module doc)."""
    init_fn, loss_fn, x, y, sizes = problem()
    p1 = init_fn(jax.random.key(0))
    n_params = sum(a.size for a in jax.tree.leaves(p1))
    tx = optax.adam(LR)
    wide = {"xla_cpu_prefer_vector_width": 512}

    def lib(fast):
        def make():
            pop = make_population_step(
                tx, loss_fn, p1, fast_path=fast, require_fast_path=fast, pad_points=16
            )
            return pop.step, pop.init

        return make

    variants = [
        jax_variant("jax naive vmap", 256, lambda: naive_step(tx, loss_fn), init_fn),
        lanes_variant("jax nets-in-lanes einsum", 256, x, y, sizes, tx),
        jax_variant("qo generic", 256, lib(False), init_fn, wide),
        jax_variant("qo fast, chunk 256", 256, lib(True), init_fn, wide),
        jax_variant("qo fast, chunk 256, 256-bit vectors", 256, lib(True), init_fn, None),
    ]
    if not quick:
        flags = os.environ.get("XLA_FLAGS", "") + " --xla_force_host_platform_device_count=2"
        variants += [
            jax_variant("qo fast, chunk 64", 64, lib(True), init_fn, wide),
            jax_variant("qo fast, chunk 1024", 1024, lib(True), init_fn, wide),
            worker_variant(
                "qo fast, 2 host devices (Mesh), 256 each",
                512,
                _sharded_worker,
                (256, 2),
                {"XLA_FLAGS": flags.strip()},
            ),
        ]
    torch_version = None
    if with_torch:
        try:
            import torch

            torch_version = torch.__version__
            passive = {"OMP_WAIT_POLICY": "PASSIVE"}
            variants += [
                torch_variant("torch baddbmm+Adam, 2 threads", 256, x, y, sizes, 2),
                torch_variant(
                    "torch baddbmm+Adam, 2 threads, OMP passive", 256, x, y, sizes, 2, env=passive
                ),
                torch_variant("torch baddbmm+Adam, 1 thread", 256, x, y, sizes, 1),
            ]
            if not quick:
                variants.append(
                    torch_variant("torch baddbmm+Adam, 2 threads, 1024 nets", 1024, x, y, sizes, 2)
                )
        except ImportError:
            pass

    try:
        setup_s = {v.name: v.prepare(call_seconds) for v in variants}
        wall, cpu, load_before, load_after = _round_robin(variants, rounds)
    finally:
        _stop_workers()

    torch_names = [v.name for v in variants if v.name.startswith("torch") and "2 threads" in v.name]
    ref = max(torch_names, key=lambda k: np.median(wall[k])) if torch_names else None
    return _summary(
        variants,
        wall,
        cpu,
        setup_s,
        load_before,
        load_after,
        ref,
        rounds,
        torch_version,
        tx,
        init_fn,
        loss_fn,
        p1,
        x,
        sizes,
        n_params,
        full_api,
    )


def _round_robin(variants, rounds):
    load_before = load()
    wall = {v.name: [] for v in variants}
    cpu = {v.name: [] for v in variants}
    order = list(variants)
    rng = np.random.default_rng(0)
    for _ in range(rounds):
        rng.shuffle(order)
        for v in order:
            t, c = time.perf_counter(), time.process_time()
            timed = v.call()
            dt, dc = time.perf_counter() - t, time.process_time() - c
            if timed is not None:  # measured in the worker process
                dt, dc = timed
            wall[v.name].append(v.work / dt)
            cpu[v.name].append(v.work / max(dc, 1e-9))
    return wall, cpu, load_before, load()


def _summary(
    variants,
    wall,
    cpu,
    setup_s,
    load_before,
    load_after,
    ref,
    rounds,
    torch_version,
    tx,
    init_fn,
    loss_fn,
    p1,
    x,
    sizes,
    n_params,
    full_api,
):
    flops = flops_per_net_step(x.shape[0], sizes, n_params)
    peak = cpu_peak()
    mm = matmul_gflops()
    # the TSC clock is the base clock: when a matmul beats that peak, the cores run faster
    peak_used = max(peak.get("peak_gflops") or 0.0, mm)
    rows = []
    for v in variants:
        w = np.array(wall[v.name])
        row = {
            "variant": v.name,
            "nets_per_call": v.nets,
            "steps_per_call": v.steps,
            "net_steps_per_s_median": float(np.median(w)),
            "net_steps_per_s_best": float(np.max(w)),
            "net_steps_per_cpu_s_median": float(np.median(cpu[v.name])),
            "gflops_median": float(np.median(w)) * flops["total"] / 1e9,
            "setup_s": round(setup_s[v.name], 2),
        }
        row["fraction_of_peak"] = row["gflops_median"] / peak_used
        row["fraction_of_matmul"] = row["gflops_median"] / mm
        if ref is not None:
            row["ratio_to_torch_median"] = float(np.median(w / np.array(wall[ref])))
        rows.append(row)

    out: dict[str, Any] = {
        "rows": rows,
        "torch_baseline": ref,
        "torch_version": torch_version,
        "jax_version": jax.__version__,
        "flops_per_net_step": flops,
        "xla_flops_per_net_step": xla_flops(tx, loss_fn, p1),
        "cpu": peak,
        "matmul_gflops": mm,
        "peak_gflops_used": peak_used,
        "load_before": load_before,
        "load_after": load_after,
        "rounds": rounds,
    }
    if full_api:
        out["train_population"] = full_api_run(tx, init_fn, loss_fn)
    best = max(
        rows, key=lambda r: r["net_steps_per_s_median"] if r["variant"].startswith("qo") else 0
    )
    rate = best["net_steps_per_s_median"]
    out["extrapolated_full_run"] = {
        "nets": FULL_RUN[0],
        "steps": FULL_RUN[1],
        "variant": best["variant"],
        "hours": FULL_RUN[0] * FULL_RUN[1] / rate / 3600,
    }
    return out


def xla_flops(tx, loss_fn, p1) -> float | None:
    """XLA's own FLOP count of one network's training step (generic path)."""

    def step(p, s):
        g = jax.grad(loss_fn)(p)
        u, s = tx.update(g, s, p)
        return optax.apply_updates(p, u), s

    try:
        cost = jax.jit(step).lower(p1, tx.init(p1)).compile().cost_analysis()
        cost = cost[0] if isinstance(cost, list) else cost
        return float(cost.get("flops")) if cost else None
    except Exception:  # noqa: BLE001 - cost analysis is optional
        return None


def full_api_run(tx, init_fn, loss_fn, nets: int = 1024, steps: int = 6000) -> dict[str, Any]:
    """``qo.train_population`` end to end with default options (progress bar off): a run of
    ``steps`` steps, and a 1-step run whose wall time (compilations, set-up) is subtracted to
    estimate the training rate alone."""
    walls = {}
    for s in (1, steps):
        res = qo.train_population(
            tx, init_fn, loss_fn, nets=nets, steps=s, key=jax.random.key(1), progress=False
        )
        walls[s] = res.wall_time
    return {
        "nets": nets,
        "steps": steps,
        "wall_s": walls[steps],
        "setup_s": walls[1],
        "net_steps_per_s_with_compile": nets * steps / walls[steps],
        "net_steps_per_s_without": nets * (steps - 1) / max(walls[steps] - walls[1], 1e-9),
        "fast_path": res.fast_path,
        "median_final_loss": float(np.median(res.losses)),
        "load": load(),
    }


def print_table(out: dict[str, Any]) -> None:
    print(
        f"jax {out['jax_version']}, torch {out['torch_version']}; load before/after "
        f"{out['load_before']} / {out['load_after']}; {out['rounds']} rounds"
    )
    cpu = out["cpu"]
    print(
        f"CPU: {cpu.get('model')}, {cpu.get('cores')} cores, {cpu.get('ghz')} GHz, "
        f"peak at that clock {cpu.get('peak_gflops', float('nan')):.0f} GFLOP/s; 1024² matmul "
        f"{out['matmul_gflops']:.0f} GFLOP/s; %peak below is of {out['peak_gflops_used']:.0f}"
    )
    f = out["flops_per_net_step"]
    print(
        f"FLOPs per net-step: {f['total']} (fwd {f['forward']}, bwd {f['backward']}, "
        f"adam {f['adam']}); XLA's count of one net's step: {out['xla_flops_per_net_step']}"
    )
    print(
        f"{'variant':40s} {'nets':>5s} {'median/s':>10s} {'best/s':>10s} {'per cpu-s':>10s} "
        f"{'GFLOP/s':>8s} {'%peak':>6s} {'vs torch':>8s}"
    )
    for r in out["rows"]:
        print(
            f"{r['variant']:40s} {r['nets_per_call']:5d} {r['net_steps_per_s_median']:10.0f} "
            f"{r['net_steps_per_s_best']:10.0f} {r['net_steps_per_cpu_s_median']:10.0f} "
            f"{r['gflops_median']:8.2f} {100 * r.get('fraction_of_peak', float('nan')):6.2f} "
            f"{r.get('ratio_to_torch_median', float('nan')):8.2f}"
        )
    if "train_population" in out:
        t = out["train_population"]
        print(
            f"qo.train_population end to end, {t['nets']} nets x {t['steps']} steps: "
            f"{t['wall_s']:.1f} s = {t['net_steps_per_s_with_compile']:.0f} net-steps/s with "
            f"compilation; {t['net_steps_per_s_without']:.0f} without (a 1-step run took "
            f"{t['setup_s']:.1f} s; fast path {t['fast_path']}, load {t['load']})"
        )
    e = out["extrapolated_full_run"]
    print(
        f"{e['nets']} nets x {e['steps']} steps at the '{e['variant']}' median rate: "
        f"{e['hours']:.1f} h"
    )


def main(argv: list[str] | None = None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--quick", action="store_true", help="fewer variants and rounds (CI-sized)")
    ap.add_argument("--json", help="write results to this JSON file")
    ap.add_argument("--rounds", type=int, help="round-robin rounds (default 8, quick 3)")
    ap.add_argument("--no-torch", action="store_true", help="skip the PyTorch baseline")
    args = ap.parse_args(argv)
    out = measure(
        rounds=args.rounds or (3 if args.quick else 8),
        call_seconds=0.25 if args.quick else 0.4,
        quick=args.quick,
        with_torch=not args.no_torch,
        full_api=not args.quick,
    )
    print_table(out)
    if args.json:
        with open(args.json, "w") as fh:
            json.dump(out, fh, indent=1)
    return out


if __name__ == "__main__":
    main()
