"""Population training: thousands of independent networks in one compiled XLA program.

:func:`train_population` trains ``nets`` independent copies of a network, each
from its own initialization, with the same Optax transformation and the same
full-batch loss. Inside one chunk of networks every step is a ``vmap`` over the
networks, and ``lax.scan`` runs a segment of steps without returning to Python;
between segments the host updates a progress bar and writes checkpoints.
Chunks keep the memory bounded (the sawtooth study trains 320,000 networks),
and a ``jax.sharding.Mesh`` spreads each chunk over devices along the network
axis.

**Shared optimizer state.** Under ``vmap``, a ``lax.cond`` whose predicate is
batched becomes a ``select`` that evaluates both branches every step. The
periodic wrappers (:func:`~quotient_opt.rebalance`, :func:`~quotient_opt.teleport`,
:func:`~quotient_opt.revive_dead_units`) branch on ``state.count % every == 0``,
which is the same for every network. So the state leaves that are identical
across networks -- found by a dataflow analysis of ``tx.init`` and
``tx.update``'s jaxprs: leaves that depend on neither the params nor the
gradients, such as step counters, schedule values, a fixed PRNG key -- are
kept *unbatched* (``in_axes=None``/``out_axes=None``), once for all networks,
and those branches stay real branches.

**Dense ReLU MLP fast path.** When ``loss_fn`` is recognized as the mean
squared error of a dense ReLU (or linear) MLP on constant data, the losses and
gradients of a whole chunk are computed with the data points on the SIMD lane
axis and a hand-written backward pass (see ``_dense_mlp.py``), after checking
it against ``vmap(value_and_grad(loss_fn))`` on the first networks. Everything
else (the optimizer, the wrappers, the bookkeeping) is the same code path.
"""

from __future__ import annotations

import functools
import hashlib
import json
import math
import os
import time
import warnings
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
import optax
from jax.sharding import Mesh, NamedSharding
from jax.sharding import PartitionSpec as P

from quotient_opt.training._deps import depends
from quotient_opt.training._fit import apply_step, prepare

PyTree = Any

_CHECKPOINT_VERSION = 1


class PopulationResult(NamedTuple):
    """What :func:`train_population` returns (host ``numpy`` arrays, networks on axis 0).

    Attributes:
      params: final parameters, every leaf stacked along axis 0 (``(nets, ...)``).
      losses: ``(nets,)`` loss at the final parameters.
      history: ``(nets, len(history_steps))`` loss *before* step ``history_steps[k]``.
      history_steps: the steps at which ``history`` was recorded (``0, every, 2·every, ...``).
      best_params: with ``track_best``, each network's parameters at the lowest
        loss it reached (over every step and the final point), else ``None``.
      best_losses: with ``track_best``, ``(nets,)`` those lowest losses, else ``None``.
      wall_time: seconds spent in the call (compilation included).
      grad_evals: gradient evaluations of ``loss_fn`` by the training loop,
        ``nets × steps`` (evaluations made inside ``tx`` through ``value_fn``,
        e.g. by line searches, are not counted).
      fast_path: whether the dense-MLP fast path computed the gradients.
      shared_state: per optimizer-state leaf (flattened), whether it was kept
        unbatched (shared by all networks).
    """

    params: PyTree
    losses: np.ndarray
    history: np.ndarray
    history_steps: np.ndarray
    best_params: PyTree | None
    best_losses: np.ndarray | None
    wall_time: float
    grad_evals: int
    fast_path: bool
    shared_state: tuple[bool, ...]


# --------------------------------------------------------------------------- helpers


def perturbed_init(
    center: PyTree, scale: float, *, relative: bool = False
) -> Callable[[jax.Array], PyTree]:
    """An ``init_fn`` for :func:`train_population`: Gaussian perturbations of one point.

    Args:
      center: the parameters to perturb.
      scale: standard deviation of the perturbation.
      relative: if true, each entry's perturbation is scaled by its magnitude
        (``θ + scale·|θ|·ε``), so zeros stay zero.

    Returns:
      ``init_fn(key) -> params`` with ``θ + scale·ε`` (or ``θ + scale·|θ|·ε``),
      ``ε ~ N(0, 1)`` independently per entry.
    """
    if not scale >= 0:
        raise ValueError(f"scale must be >= 0, got {scale}")
    leaves, treedef = jax.tree.flatten(center)

    def init_fn(key: jax.Array) -> PyTree:
        keys = jax.random.split(key, max(len(leaves), 1))
        out = []
        for k, leaf in zip(keys, leaves):
            leaf = jnp.asarray(leaf)
            eps = jax.random.normal(k, leaf.shape, leaf.dtype)
            size = jnp.abs(leaf) if relative else 1.0
            out.append(leaf + (scale * size * eps).astype(leaf.dtype))
        return treedef.unflatten(out)

    return init_fn


def shared_state_leaves(
    tx: optax.GradientTransformation,
    params: PyTree,
    loss_fn: Callable[[PyTree], jax.Array] | None = None,
    *,
    extra_args: Mapping[str, Any] | None = None,
) -> tuple[bool, ...]:
    """Which leaves of ``tx``'s state are the same for every network of a population.

    A leaf is shared when neither ``tx.init`` nor any number of ``tx.update``
    steps makes it depend on the parameters or the gradients (step counters,
    schedule values, a fixed PRNG key). Found by a conservative dataflow
    analysis of the two jaxprs, iterated to a fixed point.

    Args:
      tx: the optimizer.
      params: one network's parameters (arrays or ``jax.ShapeDtypeStruct``).
      loss_fn: the loss (passed to ``tx.update`` as ``value_fn``).
      extra_args: further extra args of ``tx.update`` (shared by all networks).

    Returns:
      One flag per leaf of ``jax.tree.leaves(tx.init(params))``.
    """
    txe, extra = prepare(tx, loss_fn, dict(extra_args or {}))
    n_p = len(jax.tree.leaves(params))
    init_jaxpr = jax.make_jaxpr(txe.init)(params)
    state = jax.eval_shape(txe.init, params)
    tainted = depends(init_jaxpr, [True] * n_p)

    def update_state(grads, state, params):
        return apply_step(txe, grads, state, params, extra)[1]

    upd_jaxpr = jax.make_jaxpr(update_state)(params, state, params)
    while True:
        out = depends(upd_jaxpr, [True] * n_p + tainted + [True] * n_p)
        new = [a or b for a, b in zip(tainted, out)]
        if new == tainted:
            return tuple(not t for t in tainted)
        tainted = new


def _state_axes(state_shape: PyTree, shared: tuple[bool, ...]) -> PyTree:
    leaves, treedef = jax.tree.flatten(state_shape)
    return treedef.unflatten([None if s else 0 for s in shared])


def _default_chunk(platform: str, n_devices: int) -> int:
    # Measured on a 2-core AVX-512 CPU (benchmarks/throughput.py): 128-512 nets per chunk
    # keep a chunk's activations in the L2 caches. Accelerators want far bigger batches.
    return 256 * n_devices if platform == "cpu" else 16384


@functools.cache
def _cpu_has_avx512() -> bool:
    try:
        with open("/proc/cpuinfo") as f:
            return any("avx512f" in line for line in f if line.startswith("flags"))
    except OSError:
        return False


def default_compiler_options(platform: str) -> dict[str, Any]:
    """XLA options :func:`train_population` compiles with by default.

    On a CPU with AVX-512, ``xla_cpu_prefer_vector_width=512`` (XLA's default
    is 256-bit vectors; the population loops vectorize over 16 float32 lanes).
    """
    if platform == "cpu" and _cpu_has_avx512():
        return {"xla_cpu_prefer_vector_width": 512}
    return {}


def _is_key(key: Any) -> bool:
    if isinstance(key, jax.Array) and jnp.issubdtype(key.dtype, jax.dtypes.prng_key):
        return key.shape == ()
    return isinstance(key, (jax.Array, np.ndarray)) and key.dtype == jnp.uint32 and key.shape == (2,)


def _positive_int(name: str, value: Any, *, zero_ok: bool = False) -> int:
    if isinstance(value, bool) or not isinstance(value, (int, np.integer)):
        raise ValueError(f"{name} must be an int, got {type(value).__name__}")
    if value < 0 or (value == 0 and not zero_ok):
        raise ValueError(f"{name} must be {'>= 0' if zero_ok else '>= 1'}, got {value}")
    return int(value)


# --------------------------------------------------------------------------- checkpoints


def _to_host(tree: PyTree) -> list[np.ndarray]:
    out = []
    for leaf in jax.tree.leaves(tree):
        if jnp.issubdtype(leaf.dtype, jax.dtypes.prng_key):
            leaf = jax.random.key_data(leaf)
        out.append(np.asarray(leaf))
    return out


def _from_host(arrays: list[np.ndarray], like: PyTree) -> PyTree:
    leaves, treedef = jax.tree.flatten(like)
    if len(arrays) != len(leaves):
        raise ValueError("checkpoint: wrong number of arrays")
    out = []
    for a, leaf in zip(arrays, leaves):
        if jnp.issubdtype(leaf.dtype, jax.dtypes.prng_key):
            a = jax.random.wrap_key_data(a, impl=jax.random.key_impl(leaf))
        out.append(a)
    return treedef.unflatten(out)


def _atomic_savez(path: Path, arrays: dict[str, np.ndarray]) -> None:
    tmp = path.with_name(path.name + ".tmp")
    with open(tmp, "wb") as f:
        np.savez(f, **arrays)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)


def _pack(prefix: str, arrays: list[np.ndarray]) -> dict[str, np.ndarray]:
    return {f"{prefix}{i}": a for i, a in enumerate(arrays)}


def _unpack(data: Mapping[str, np.ndarray], prefix: str) -> list[np.ndarray]:
    n = sum(1 for k in data if k.startswith(prefix) and k[len(prefix) :].isdigit())
    return [data[f"{prefix}{i}"] for i in range(n)]


# --------------------------------------------------------------------------- main entry


def train_population(
    tx: optax.GradientTransformation,
    init_fn: Callable[[jax.Array], PyTree],
    loss_fn: Callable[[PyTree], jax.Array],
    *,
    nets: int,
    steps: int,
    key: jax.Array,
    chunk_size: int | None = None,
    segment_steps: int = 1000,
    history_every: int | None = None,
    track_best: bool = False,
    checkpoint: str | os.PathLike | None = None,
    checkpoint_every: float = 60.0,
    progress: bool = True,
    mesh: Mesh | None = None,
    fast_path: bool | None = None,
    unroll: int = 1,
    compiler_options: Mapping[str, Any] | None = None,
    extra_args: Mapping[str, Any] | None = None,
) -> PopulationResult:
    """Trains ``nets`` independent networks with ``tx`` on the full-batch ``loss_fn``.

    Network ``i`` starts from ``init_fn(jax.random.fold_in(key, i))`` and takes
    ``steps`` steps of ``tx.update(grads, state, params, value_fn=loss_fn,
    **extra_args)`` -- the step of :func:`~quotient_opt.fit`, so one network of
    the population follows the same trajectory as ``qo.fit`` from the same
    start (up to floating-point rounding). The networks are independent: their
    results do not depend on ``chunk_size``, ``segment_steps``, the mesh or on
    being resumed from a checkpoint.

    Each chunk of ``chunk_size`` networks is one ``jax.jit`` program: ``vmap``
    over the networks, ``lax.scan`` over ``segment_steps`` steps. Optimizer
    state leaves that are the same for every network (step counters; see
    :func:`shared_state_leaves`) stay unbatched, so ``lax.cond(count % every
    == 0, ...)`` in periodic wrappers remains a real branch under ``vmap``.

    Example::

      model = qo.models.SawtoothNet(rngs=nnx.Rngs(0))
      apply, _ = qo.models.functional(model)
      task = qo.models.sawtooth_task()
      init_fn = lambda k: nnx.state(qo.models.SawtoothNet(rngs=nnx.Rngs(k)), nnx.Param)
      loss_fn = lambda p: qo.models.mse(apply(p, task.x), task.y)
      res = qo.train_population(optax.adam(1e-3), init_fn, loss_fn,
                                nets=4096, steps=10_000, key=jax.random.key(0))
      res.losses.min(), (res.losses < 1e-5).mean()

    Args:
      tx: any Optax transformation (shared by all networks).
      init_fn: ``key -> params`` of one network (random inits, or
        :func:`perturbed_init` for perturbations of one point).
      loss_fn: ``params -> scalar`` full-batch loss of one network (data
        closed over).
      nets: number of networks.
      steps: steps per network (0 evaluates the initial points).
      key: a PRNG key (``jax.random.key`` or ``jax.random.PRNGKey``).
      chunk_size: networks per compiled program (default 256 per CPU device,
        16384 on accelerators); the last chunk is padded with extra networks
        whose results are dropped. With ``mesh``, a multiple of ``mesh.size``.
      segment_steps: steps per ``lax.scan`` between host syncs (progress bar,
        checkpoints); rounded up to a multiple of ``history_every``.
      history_every: record the losses every this many steps (default
        ``max(1, steps // 100)``).
      track_best: also return each network's best parameters seen.
      checkpoint: a directory for checkpoints. A run restarted with the same
        arguments resumes from it and returns the same result as an
        uninterrupted run; a directory written by a run with other arguments is
        refused. Files are written atomically (``os.replace``).
      checkpoint_every: seconds between checkpoints of the running chunk
        (a finished chunk is always saved).
      progress: show a ``tqdm`` progress bar (network-steps).
      mesh: shard each chunk over this mesh's devices along the network axis
        (all mesh axes); the same code runs on one device, a host with several
        devices, or an accelerator slice.
      fast_path: ``None`` uses the dense ReLU MLP fast path on CPU when
        ``loss_fn`` is recognized (and agrees numerically with the generic
        path); ``True`` requires it (on any platform); ``False`` never uses it.
      unroll: ``unroll`` of the step ``lax.scan``.
      compiler_options: XLA options for ``jax.jit`` (default
        :func:`default_compiler_options`).
      extra_args: further extra args for ``tx.update`` (the same for every network).

    Returns:
      A :class:`PopulationResult`.

    Raises:
      ValueError: for invalid arguments (the message names the argument).
    """
    t_start = time.perf_counter()
    nets = _positive_int("nets", nets)
    steps = _positive_int("steps", steps, zero_ok=True)
    segment_steps = _positive_int("segment_steps", segment_steps)
    unroll = _positive_int("unroll", unroll)
    if not (hasattr(tx, "init") and hasattr(tx, "update")):
        raise ValueError(f"tx must be an optax GradientTransformation, got {type(tx).__name__}")
    if not callable(init_fn):
        raise ValueError(f"init_fn must be callable (key -> params), got {type(init_fn).__name__}")
    if not callable(loss_fn):
        raise ValueError(f"loss_fn must be callable (params -> scalar), got {type(loss_fn).__name__}")
    if not _is_key(key):
        raise ValueError(
            "key must be a PRNG key (jax.random.key(seed) or jax.random.PRNGKey(seed)), "
            f"got {getattr(key, 'dtype', type(key).__name__)} {getattr(key, 'shape', '')}"
        )
    if not jnp.issubdtype(key.dtype, jax.dtypes.prng_key):
        key = jax.random.wrap_key_data(key)
    if history_every is None:
        history_every = max(1, steps // 100)
    history_every = _positive_int("history_every", history_every)
    segment_steps = -(-segment_steps // history_every) * history_every
    if not checkpoint_every >= 0:
        raise ValueError(f"checkpoint_every must be >= 0 seconds, got {checkpoint_every}")
    if fast_path not in (None, True, False):
        raise ValueError(f"fast_path must be None, True or False, got {fast_path!r}")
    if mesh is not None and not isinstance(mesh, Mesh):
        raise ValueError(f"mesh must be a jax.sharding.Mesh, got {type(mesh).__name__}")

    devices = list(mesh.devices.flat) if mesh is not None else [jax.devices()[0]]
    n_dev = len(devices)
    platform = devices[0].platform
    if chunk_size is None:
        chunk = min(_default_chunk(platform, n_dev), -(-nets // n_dev) * n_dev)
    else:
        chunk = _positive_int("chunk_size", chunk_size)
        if chunk % n_dev:
            raise ValueError(f"chunk_size ({chunk}) must be a multiple of mesh.size ({n_dev})")
    n_chunks = -(-nets // chunk)
    opts = dict(default_compiler_options(platform) if compiler_options is None else compiler_options)

    # ---- one network's shapes, the loss, the shared state
    try:
        p_shape = jax.eval_shape(init_fn, jax.random.fold_in(key, 0))
    except Exception as e:
        raise ValueError(f"init_fn(key) failed: {type(e).__name__}: {e}") from e
    p_leaves, p_tree = jax.tree.flatten(p_shape)
    for path, leaf in jax.tree_util.tree_flatten_with_path(p_shape)[0]:
        if not jnp.issubdtype(leaf.dtype, jnp.inexact):
            raise ValueError(
                f"init_fn: parameter {jax.tree_util.keystr(path)} has dtype {leaf.dtype}, "
                "not a float"
            )
    try:
        l_shape = jax.eval_shape(loss_fn, p_shape)
    except Exception as e:
        raise ValueError(f"loss_fn(params) failed: {type(e).__name__}: {e}") from e
    if getattr(l_shape, "shape", None) != ():
        raise ValueError(f"loss_fn must return a scalar, got shape {getattr(l_shape, 'shape', l_shape)}")

    extra_args = dict(extra_args or {})
    txe, extra = prepare(tx, loss_fn, extra_args)
    s_shape = jax.eval_shape(txe.init, p_shape)
    shared = shared_state_leaves(tx, p_shape, loss_fn, extra_args=extra_args)
    axes = _state_axes(s_shape, shared)

    # ---- shardings
    if mesh is not None:
        net_sharding = NamedSharding(mesh, P(tuple(mesh.axis_names)))
        hist_sharding = NamedSharding(mesh, P(None, tuple(mesh.axis_names)))
        rep_sharding = NamedSharding(mesh, P())
    else:
        net_sharding = rep_sharding = hist_sharding = jax.sharding.SingleDeviceSharding(devices[0])
    p_shardings = jax.tree.map(lambda _: net_sharding, p_shape)
    s_shardings = jax.tree.unflatten(
        jax.tree.structure(s_shape), [rep_sharding if s else net_sharding for s in shared]
    )
    vec_sharding = net_sharding

    # ---- the batched loss/gradient
    spec = None
    if fast_path is True or (fast_path is None and platform == "cpu"):
        from quotient_opt.training._dense_mlp import match_dense_mse

        spec, why = match_dense_mse(loss_fn, p_shape)
        if spec is None and fast_path is True:
            raise ValueError(
                f"fast_path=True: loss_fn is not recognized as a dense ReLU MLP mean squared error ({why})"
            )
    pad_points = 16 if platform == "cpu" else 1

    def generic_vg(params):
        return jax.vmap(jax.value_and_grad(loss_fn))(params)

    def fast_vg(params):
        from quotient_opt.training._dense_mlp import population_value_and_grad

        return population_value_and_grad(spec, p_tree, params, pad_points=pad_points)

    init_jit = jax.jit(
        lambda keys: jax.vmap(init_fn)(keys), out_shardings=p_shardings, compiler_options=opts or None
    )
    state_init_jit = jax.jit(
        jax.vmap(txe.init, out_axes=axes), out_shardings=s_shardings, compiler_options=opts or None
    )

    def chunk_keys(c: int) -> jax.Array:
        idx = jnp.arange(c * chunk, (c + 1) * chunk, dtype=jnp.uint32)
        return jax.vmap(lambda i: jax.random.fold_in(key, i))(idx)

    if spec is not None:
        # check the fast path against the generic one on the first chunk's first networks
        p0 = init_jit(chunk_keys(0))
        few = jax.tree.map(lambda a: a[: min(chunk, 8)], p0)
        v_a, g_a = jax.jit(generic_vg)(few)
        v_b, g_b = jax.jit(fast_vg)(few)
        ok = bool(jnp.all(jnp.abs(v_a - v_b) <= 1e-4 * jnp.abs(v_a) + 1e-6))
        for a, b in zip(jax.tree.leaves(g_a), jax.tree.leaves(g_b)):
            tol = 1e-4 * jnp.max(jnp.abs(a)) + 1e-6
            ok = ok and bool(jnp.all(jnp.abs(a - b) <= tol))
        if not ok:
            if fast_path is True:
                raise ValueError("fast_path=True: the fast path disagrees with vmap(value_and_grad)")
            warnings.warn(
                "train_population: the dense-MLP fast path disagrees with the generic path; "
                "using the generic path",
                stacklevel=2,
            )
            spec = None
    vg = fast_vg if spec is not None else generic_vg

    def update(grads, state, params):
        return apply_step(txe, grads, state, params, extra)

    def batched_update(axes_):
        return jax.vmap(update, in_axes=(0, axes_, 0), out_axes=(0, axes_))

    def stacked(tree):
        return jax.tree.map(lambda x: jax.ShapeDtypeStruct((chunk, *x.shape), x.dtype), tree)

    upd = batched_update(axes)
    try:
        s_chunk = jax.eval_shape(jax.vmap(txe.init, out_axes=axes), stacked(p_shape))
        jax.eval_shape(upd, stacked(p_shape), s_chunk, stacked(p_shape))
    except ValueError as e:  # jax found a batched value where the analysis predicted a shared one
        warnings.warn(
            f"train_population: keeping every optimizer-state leaf batched ({e})", stacklevel=2
        )
        shared = tuple(False for _ in shared)
        axes = _state_axes(s_shape, shared)
        s_shardings = jax.tree.map(lambda _: net_sharding, s_shape)
        upd = batched_update(axes)
        state_init_jit = jax.jit(
            jax.vmap(txe.init, out_axes=axes),
            out_shardings=s_shardings,
            compiler_options=opts or None,
        )

    # ---- one segment: n steps from a step that is a multiple of history_every
    def make_segment(n: int):
        def one(carry, i):
            p, s, bl, bp, rec = carry
            v, g = vg(p)
            rec = jnp.where(i == 0, v, rec)
            if track_best:
                better = v < bl
                bl = jnp.where(better, v, bl)
                bp = jax.tree.map(
                    lambda a, b: jnp.where(better.reshape((-1,) + (1,) * (a.ndim - 1)), a, b), p, bp
                )
            p, s = upd(g, s, p)
            return (p, s, bl, bp, rec), None

        def block(carry, length):
            p, s, bl, bp = carry
            rec = jnp.zeros((chunk,), l_shape.dtype)
            (p, s, bl, bp, rec), _ = jax.lax.scan(
                one, (p, s, bl, bp, rec), jnp.arange(length), unroll=min(unroll, length)
            )
            return (p, s, bl, bp), rec

        full, rem = divmod(n, history_every)

        def segment(p, s, bl, bp):
            carry = (p, s, bl, bp)
            recs = []
            if full:
                carry, r = jax.lax.scan(lambda c, _: block(c, history_every), carry, None, length=full)
                recs.append(r)
            if rem:
                carry, r = block(carry, rem)
                recs.append(r[None])
            hist = jnp.concatenate(recs, 0) if recs else jnp.zeros((0, chunk), l_shape.dtype)
            return (*carry, hist)

        best_sh = (vec_sharding, p_shardings) if track_best else (None, None)
        return jax.jit(
            segment,
            donate_argnums=(0, 1, 2, 3) if track_best else (0, 1),
            out_shardings=(p_shardings, s_shardings, *best_sh, hist_sharding),
            compiler_options=opts or None,
        )

    segments: dict[int, Any] = {}

    def run_segment(n, *args):
        if n not in segments:
            segments[n] = make_segment(n)
        return segments[n](*args)

    final_jit = jax.jit(
        lambda p: jax.vmap(loss_fn)(p) if spec is None else vg(p)[0],
        out_shardings=vec_sharding,
        compiler_options=opts or None,
    )

    # ---- checkpoint directory
    ckpt = Path(checkpoint) if checkpoint is not None else None
    fingerprint = None
    if ckpt is not None:
        loss0 = float(jax.jit(loss_fn)(init_fn(jax.random.fold_in(key, 0))))
        fingerprint = {
            "version": _CHECKPOINT_VERSION,
            "nets": nets,
            "steps": steps,
            "chunk_size": chunk,
            "segment_steps": segment_steps,
            "history_every": history_every,
            "track_best": bool(track_best),
            "key": np.asarray(jax.random.key_data(key)).tolist(),
            "params": [[list(x.shape), str(x.dtype)] for x in p_leaves],
            "state": [[list(x.shape), str(x.dtype)] for x in jax.tree.leaves(s_shape)],
            "state_tree": str(jax.tree.structure(s_shape)),
            "shared_state": list(shared),
            "loss_at_first_init": repr(loss0),
        }
        meta = ckpt / "meta.json"
        if meta.exists():
            old = json.loads(meta.read_text())
            diff = sorted(k for k in set(old) | set(fingerprint) if old.get(k) != fingerprint.get(k))
            if diff:
                raise ValueError(
                    f"checkpoint: {ckpt} was written by a run with other arguments "
                    f"(differs in: {', '.join(diff)}); delete it or pass another directory"
                )
        else:
            ckpt.mkdir(parents=True, exist_ok=True)
            tmp = meta.with_name("meta.json.tmp")
            tmp.write_text(json.dumps(fingerprint))
            os.replace(tmp, meta)

    n_hist = -(-steps // history_every)
    history_steps = np.arange(n_hist) * history_every

    # ---- progress bar
    bar = None
    if progress:
        from tqdm.auto import tqdm

        bar = tqdm(total=nets * steps, unit="net-step", unit_scale=True, desc="population",
                   smoothing=0.1)

    results: list[dict[str, Any]] = []
    try:
        for c in range(n_chunks):
            real = min(chunk, nets - c * chunk)
            done_file = ckpt / f"chunk_{c:06d}.npz" if ckpt is not None else None
            if done_file is not None and done_file.exists():
                with np.load(done_file) as d:
                    results.append({k: d[k] for k in d.files})
                if bar is not None:
                    bar.update(real * steps)
                continue

            # start or resume this chunk
            p = s = bl = bp = None
            t0 = 0
            hist_parts: list[np.ndarray] = []
            cur = ckpt / "current.npz" if ckpt is not None else None
            if cur is not None and cur.exists():
                with np.load(cur) as d:
                    if int(d["chunk"]) == c:
                        t0 = int(d["step"])
                        p = jax.device_put(_from_host(_unpack(d, "p"), p_shape), p_shardings)
                        s = jax.device_put(_from_host(_unpack(d, "s"), s_shape), s_shardings)
                        if track_best:
                            bl = jax.device_put(d["best_losses"], vec_sharding)
                            bp = jax.device_put(_from_host(_unpack(d, "b"), p_shape), p_shardings)
                        hist_parts = [d["history"]]
            if p is None:
                p = init_jit(chunk_keys(c))
                s = state_init_jit(p)
                if track_best:
                    bl = jax.device_put(jnp.full((chunk,), jnp.inf, l_shape.dtype), vec_sharding)
                    bp = jax.tree.map(jnp.copy, p)
            if bar is not None:
                bar.update(real * t0)
            last_save = time.perf_counter()
            t = t0
            while t < steps:
                n = min(segment_steps, steps - t)
                p, s, bl, bp, hist = run_segment(n, p, s, bl, bp)
                hist_parts.append(np.asarray(hist))
                t += n
                if bar is not None:
                    bar.update(real * n)
                    bar.set_postfix(chunk=f"{c + 1}/{n_chunks}",
                                    median_loss=f"{np.median(hist_parts[-1][-1][:real]):.3g}")
                if cur is not None and t < steps and time.perf_counter() - last_save >= checkpoint_every:
                    arrays = {"chunk": np.asarray(c), "step": np.asarray(t),
                              "history": np.concatenate(hist_parts, 0)}
                    arrays.update(_pack("p", _to_host(p)))
                    arrays.update(_pack("s", _to_host(s)))
                    if track_best:
                        arrays["best_losses"] = np.asarray(bl)
                        arrays.update(_pack("b", _to_host(bp)))
                    _atomic_savez(cur, arrays)
                    last_save = time.perf_counter()

            final = final_jit(p)
            out: dict[str, Any] = {
                "losses": np.asarray(final)[:real],
                "history": np.concatenate(hist_parts, 0).T[:real]
                if hist_parts else np.zeros((real, 0), np.asarray(final).dtype),
            }
            out.update(_pack("p", [a[:real] for a in _to_host(p)]))
            if track_best:
                better = final < bl
                bl = jnp.where(better, final, bl)
                bp = jax.tree.map(
                    lambda a, b: jnp.where(better.reshape((-1,) + (1,) * (a.ndim - 1)), a, b), p, bp
                )
                out["best_losses"] = np.asarray(bl)[:real]
                out.update(_pack("b", [a[:real] for a in _to_host(bp)]))
            if done_file is not None:
                _atomic_savez(done_file, out)
            results.append(out)
    finally:
        if bar is not None:
            bar.close()

    def gather(prefix: str) -> PyTree:
        cols = [_unpack(r, prefix) for r in results]
        return p_tree.unflatten([np.concatenate([col[i] for col in cols], 0)
                                 for i in range(len(p_leaves))])

    return PopulationResult(
        params=gather("p"),
        losses=np.concatenate([r["losses"] for r in results]),
        history=np.concatenate([r["history"] for r in results], 0),
        history_steps=history_steps,
        best_params=gather("b") if track_best else None,
        best_losses=np.concatenate([r["best_losses"] for r in results]) if track_best else None,
        wall_time=time.perf_counter() - t_start,
        grad_evals=nets * steps,
        fast_path=spec is not None,
        shared_state=tuple(shared),
    )
