"""Population training: thousands of independent networks in one compiled XLA program.

:func:`train_population` trains ``nets`` independent copies of a network, each
from its own initialization, with the same Optax transformation and the same
full-batch loss. Inside one chunk of networks every step is a ``vmap`` over the
networks, and ``lax.scan`` runs a segment of steps without returning to Python;
between segments the host updates a progress bar and writes checkpoints.
Chunks keep the memory bounded (the sawtooth study trains 320,000 networks),
and a ``jax.sharding.Mesh`` spreads each chunk over devices along the network
axis.

**Shared optimizer state.** The state leaves that are identical across
networks (step counters, schedule values) are kept unbatched, so the
periodic wrappers' ``lax.cond`` on ``state.count`` stays a real branch under
``vmap`` (:func:`shared_state_leaves`).

**Dense ReLU MLP fast path.** When ``loss_fn`` is recognized as the mean
squared error of a dense ReLU (or linear) MLP on constant data, the losses and
gradients of a whole chunk are computed with the data points on the SIMD lane
axis and a hand-written backward pass, after checking
it against ``vmap(value_and_grad(loss_fn))`` on the first networks. Everything
else (the optimizer, the wrappers, the bookkeeping) is the same code path.
"""

from __future__ import annotations

import functools
import os
import time
import warnings
from collections.abc import Callable, Mapping
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
import optax
from jax.sharding import Mesh, NamedSharding
from jax.sharding import PartitionSpec as P

from quotient_opt import _validate as validate
from quotient_opt.training import _checkpoint as checkpoints
from quotient_opt.training._fit import apply_step, prepare
from quotient_opt.training._shared_state import POPULATION_AXIS, shared_state_leaves, state_axes

PyTree = Any



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
    validate.number("scale", scale)
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


class PopulationStep(NamedTuple):
    """The per-step functions of a population (see :func:`make_population_step`).

    Attributes:
      init: stacked params ``(nets, ...)`` -> optimizer state (shared leaves unbatched).
      step: ``(params, state) -> (params, state, losses)``: one step of every
        network; ``losses`` ``(nets,)`` are the losses *before* the step.
      loss: stacked params -> ``(nets,)`` losses.
      state_axes: the state's ``vmap`` axes: ``0`` per network, ``None`` shared.
      shared_state: per state leaf (flattened), whether it is shared.
      fast_path: whether the dense-MLP fast path computes losses and gradients.
      fast_path_note: why the fast path is not used (empty when it is).
    """

    init: Callable[[PyTree], optax.OptState]
    step: Callable[[PyTree, optax.OptState], tuple[PyTree, optax.OptState, jax.Array]]
    loss: Callable[[PyTree], jax.Array]
    state_axes: PyTree
    shared_state: tuple[bool, ...]
    fast_path: bool
    fast_path_note: str


def make_population_step(
    tx: optax.GradientTransformation,
    loss_fn: Callable[[PyTree], jax.Array],
    params: PyTree,
    *,
    extra_args: Mapping[str, Any] | None = None,
    fast_path: bool = False,
    require_fast_path: bool = False,
    check_params: PyTree | None = None,
    pad_points: int = 1,
) -> PopulationStep:
    """The step of :func:`train_population`, for writing one's own population loop.

    The optimizer update is ``vmap(update, in_axes=(0, state_axes, 0),
    out_axes=(0, state_axes), axis_name=POPULATION_AXIS)`` with ``state_axes`` from
    :func:`shared_state_leaves`: shared leaves (step counters) stay unbatched,
    so a ``lax.cond`` on them stays a branch. If JAX nevertheless reports a
    batched value in a leaf predicted shared, every leaf is batched instead
    (with a warning).

    Args:
      tx: the optimizer.
      loss_fn: ``params -> scalar`` for one network.
      params: one network's params (arrays or ``jax.ShapeDtypeStruct``).
      extra_args: further extra args of ``tx.update`` (shared by all networks).
      fast_path: use the dense ReLU MLP fast path if ``loss_fn`` is recognized
        (and, given ``check_params``, agrees with the generic path there).
      require_fast_path: raise ``ValueError`` if the fast path cannot be used.
      check_params: a few stacked networks to check the fast path on.
      pad_points: pad the data points to a multiple of this in the fast path.

    Returns:
      A :class:`PopulationStep`.
    """
    extra_args = dict(extra_args or {})
    txe, extra = prepare(tx, loss_fn, extra_args)
    p_shape = jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype), params)
    treedef = jax.tree.structure(p_shape)
    s_shape = jax.eval_shape(txe.init, p_shape)
    shared = shared_state_leaves(tx, p_shape, loss_fn, extra_args=extra_args)

    def generic_vg(p):
        return jax.vmap(jax.value_and_grad(loss_fn))(p)

    vg, loss, note = generic_vg, jax.vmap(loss_fn), "not requested"
    if fast_path:
        from quotient_opt.training._dense_mlp import match_dense_mse, population_value_and_grad

        spec, note = match_dense_mse(loss_fn, p_shape)
        if spec is not None:

            def fast_vg(p):
                return population_value_and_grad(spec, treedef, p, pad_points=pad_points)

            if check_params is not None and not _agree(generic_vg, fast_vg, check_params):
                spec, note = None, "disagrees numerically with vmap(value_and_grad(loss_fn))"
            else:
                vg, loss, note = fast_vg, (lambda p: fast_vg(p)[0]), ""
        if spec is None and require_fast_path:
            raise ValueError(
                "fast_path=True: loss_fn cannot use the dense ReLU MLP mean-squared-error "
                f"fast path ({note})"
            )

    def update(grads, state, p):
        return apply_step(txe, grads, state, p, extra)

    def build(shared_):
        axes = state_axes(s_shape, shared_)
        init = jax.vmap(txe.init, out_axes=axes)
        upd = jax.vmap(update, in_axes=(0, axes, 0), out_axes=(0, axes),
                       axis_name=POPULATION_AXIS)

        def step(p, state):
            values, grads = vg(p)
            p, state = upd(grads, state, p)
            return p, state, values

        return init, step, axes

    init, step, axes = build(shared)
    stacked = jax.tree.map(lambda x: jax.ShapeDtypeStruct((2, *x.shape), x.dtype), p_shape)
    try:
        jax.eval_shape(step, stacked, jax.eval_shape(init, stacked))
    except ValueError as e:  # jax found a batched value where the analysis predicted a shared one
        warnings.warn(f"population: keeping every optimizer-state leaf batched ({e})", stacklevel=2)
        shared = tuple(False for _ in shared)
        init, step, axes = build(shared)
    return PopulationStep(init, step, loss, axes, tuple(shared), vg is not generic_vg, note)


def _agree(vg_a, vg_b, params: PyTree, rtol: float = 1e-4) -> bool:
    # one compilation for both (eager op-by-op dispatch compiles each of hundreds of ops)
    def check_fast_path(p):
        return vg_a(p), vg_b(p)

    (v_a, g_a), (v_b, g_b) = jax.jit(check_fast_path)(params)
    if not bool(jnp.all(jnp.abs(v_a - v_b) <= rtol * jnp.abs(v_a) + 1e-6)):
        return False
    for a, b in zip(jax.tree.leaves(g_a), jax.tree.leaves(g_b)):
        if not bool(jnp.all(jnp.abs(a - b) <= rtol * jnp.max(jnp.abs(a)) + 1e-6)):
            return False
    return True


# --------------------------------------------------------------------------- main entry


def train_population(
    tx: optax.GradientTransformation,
    init_fn: Callable[[jax.Array], PyTree] | PyTree,
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
    compiler_options: Mapping[str, Any] | None = None,
    extra_args: Mapping[str, Any] | None = None,
) -> PopulationResult:
    """Trains ``nets`` independent networks with ``tx`` on the full-batch ``loss_fn``.

    Network ``i`` starts from ``init_fn(jax.random.fold_in(key, i))`` (or from
    row ``i`` of ``init_fn`` when it is stacked params) and takes
    ``steps`` steps of ``tx.update(grads, state, params, value_fn=loss_fn,
    **extra_args)`` -- the step of :func:`~quotient_opt.fit`, so one network of
    the population follows the same trajectory as ``qo.fit`` from the same
    start (up to floating-point rounding). The networks are independent: their
    results do not depend on ``chunk_size``, ``segment_steps``, the mesh or on
    being resumed from a checkpoint.

    Each chunk of ``chunk_size`` networks runs one ``jax.jit`` program: ``vmap``
    over the networks, a loop of ``segment_steps`` steps. Optimizer
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
        :func:`perturbed_init` for perturbations of one point), or the
        stacked parameters of every network (each leaf ``(nets, ...)``, e.g.
        a previous result's ``params``) to continue from, with a fresh
        optimizer state (a second phase with another optimizer).
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
        refused. Files are written atomically (``os.replace``). A checkpoint
        file that cannot be read back (truncated, say, by a full disk or a
        copy cut short) is renamed ``<name>.damaged`` with a warning naming
        it, and its work is redone (the chunk from its start, or from an
        intact save inside it); the other chunks are kept.
      checkpoint_every: seconds between checkpoints of the running chunk
        (a finished chunk is always saved).
      progress: show a ``tqdm`` progress bar (network-steps).
      mesh: shard each chunk over this mesh's devices along the network axis
        (all mesh axes); the same code runs on one device, a host with several
        devices, or an accelerator slice.
      fast_path: ``None`` uses the dense ReLU MLP fast path on CPU when
        ``loss_fn`` is recognized (and agrees numerically with the generic
        path); ``True`` requires it (on any platform); ``False`` never uses it.
      compiler_options: XLA options for ``jax.jit`` (default
        :func:`default_compiler_options`).
      extra_args: further extra args for ``tx.update`` (the same for every network).

    Returns:
      A :class:`PopulationResult`.

    Raises:
      ValueError: for invalid arguments (the message names the argument).
    """
    t_start = time.perf_counter()
    nets = validate.integer("nets", nets)
    steps = validate.integer("steps", steps, minimum=0)
    segment_steps = validate.integer("segment_steps", segment_steps)
    if not (hasattr(tx, "init") and hasattr(tx, "update")):
        raise ValueError(f"tx must be an optax GradientTransformation, got {type(tx).__name__}")
    stacked = None
    if not callable(init_fn):
        stacked = jax.tree.map(np.asarray, init_fn)
        s_leaves = jax.tree.leaves(stacked)
        if not s_leaves or any(a.ndim < 1 or a.shape[0] != nets for a in s_leaves):
            raise ValueError(
                "init_fn must be callable (key -> params) or stacked params whose every leaf "
                f"has a leading axis of size nets={nets}, got {type(init_fn).__name__} with "
                f"leading sizes {sorted({a.shape[0] if a.ndim else None for a in s_leaves}, key=str)}"
            )
        first_net = jax.tree.map(lambda a: a[0], stacked)

        def init_fn(key: jax.Array) -> PyTree:
            del key
            return jax.tree.map(jnp.asarray, first_net)
    validate.function("loss_fn", loss_fn, "params -> scalar")
    key = validate.prng_key(key)
    if history_every is None:
        history_every = max(1, steps // 100)
    history_every = validate.integer("history_every", history_every)
    segment_steps = -(-segment_steps // history_every) * history_every
    validate.number("checkpoint_every", checkpoint_every, unit=" seconds")
    validate.one_of("fast_path", fast_path, (None, True, False))
    if mesh is not None and not isinstance(mesh, Mesh):
        raise ValueError(f"mesh must be a jax.sharding.Mesh, got {type(mesh).__name__}")
    if compiler_options is not None and not isinstance(compiler_options, Mapping):
        raise ValueError(
            f"compiler_options must be a dict of XLA options, got {type(compiler_options).__name__}"
        )

    devices = list(mesh.devices.flat) if mesh is not None else [jax.devices()[0]]
    n_dev = len(devices)
    platform = devices[0].platform
    if chunk_size is None:
        chunk = min(_default_chunk(platform, n_dev), -(-nets // n_dev) * n_dev)
    else:
        chunk = validate.integer("chunk_size", chunk_size)
        if chunk % n_dev:
            raise ValueError(f"chunk_size ({chunk}) must be a multiple of mesh.size ({n_dev})")
    n_chunks = -(-nets // chunk)
    opts = dict(
        default_compiler_options(platform) if compiler_options is None else compiler_options
    )

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
        raise ValueError(
            f"loss_fn must return a scalar, got shape {getattr(l_shape, 'shape', l_shape)}"
        )

    # ---- the step shared by every chunk (fast path checked on the first chunk's networks)
    def chunk_keys(c: int) -> jax.Array:
        idx = jnp.arange(c * chunk, (c + 1) * chunk, dtype=jnp.uint32)
        return jax.vmap(lambda i: jax.random.fold_in(key, i))(idx)

    if mesh is not None:
        net_sharding = NamedSharding(mesh, P(tuple(mesh.axis_names)))
        hist_sharding = NamedSharding(mesh, P(None, tuple(mesh.axis_names)))
        rep_sharding = NamedSharding(mesh, P())
    else:
        net_sharding = rep_sharding = hist_sharding = jax.sharding.SingleDeviceSharding(devices[0])
    p_shardings = jax.tree.map(lambda _: net_sharding, p_shape)
    jit_opts = opts or None

    def population_init(keys):
        return jax.vmap(init_fn)(keys)

    init_keys_jit = jax.jit(population_init, out_shardings=p_shardings, compiler_options=jit_opts)

    def init_chunk(c: int) -> PyTree:
        if stacked is None:
            return init_keys_jit(chunk_keys(c))
        idx = np.minimum(np.arange(c * chunk, (c + 1) * chunk), nets - 1)  # pad with the last
        return jax.device_put(jax.tree.map(lambda a: a[idx], stacked), p_shardings)
    first_chunk = None

    want_fast = fast_path is True or (fast_path is None and platform == "cpu")
    check = None
    if want_fast:
        first_chunk = init_chunk(0)
        check = jax.tree.map(lambda a: a[: min(chunk, 4)], first_chunk)
    pop = make_population_step(
        tx,
        loss_fn,
        p_shape,
        extra_args=extra_args,
        fast_path=want_fast,
        require_fast_path=fast_path is True,
        check_params=check,
        pad_points=16 if platform == "cpu" else 1,
    )
    if (
        fast_path is None
        and want_fast
        and not pop.fast_path
        and pop.fast_path_note.startswith("disagree")
    ):
        warnings.warn(
            f"train_population: {pop.fast_path_note}; using the generic path", stacklevel=2
        )
    shared = pop.shared_state
    s_shape = jax.eval_shape(
        pop.init, jax.tree.map(lambda x: jax.ShapeDtypeStruct((chunk, *x.shape), x.dtype), p_shape)
    )

    s_shardings = jax.tree.unflatten(
        jax.tree.structure(s_shape), [rep_sharding if sh else net_sharding for sh in shared]
    )
    vec_sharding = net_sharding
    state_init_jit = jax.jit(pop.init, out_shardings=s_shardings, compiler_options=jit_opts)
    step = pop.step

    # ---- one segment: n <= segment_steps steps from a multiple of history_every; one
    # compiled program for every n (dynamic loop bounds), records written in place
    rows_max = segment_steps // history_every

    def segment(p, s, bl, bp, n):
        def one(i, carry):
            p, s, bl, bp, rec = carry
            p_new, s, v = step(p, s)
            rec = jnp.where(i == 0, v, rec)
            if track_best:
                better = v < bl
                bl = jnp.where(better, v, bl)
                bp = jax.tree.map(
                    lambda a, b: jnp.where(better.reshape((-1,) + (1,) * (a.ndim - 1)), a, b), p, bp
                )
            return p_new, s, bl, bp, rec

        def block(k, carry):
            p, s, bl, bp, hist = carry
            length = jnp.minimum(history_every, n - k * history_every)
            rec = jnp.zeros((chunk,), l_shape.dtype)
            p, s, bl, bp, rec = jax.lax.fori_loop(0, length, one, (p, s, bl, bp, rec))
            return p, s, bl, bp, jax.lax.dynamic_update_index_in_dim(hist, rec, k, 0)

        hist = jnp.zeros((rows_max, chunk), l_shape.dtype)
        n_blocks = (n + history_every - 1) // history_every
        return jax.lax.fori_loop(0, n_blocks, block, (p, s, bl, bp, hist))

    best_sh = (vec_sharding, p_shardings) if track_best else (None, None)
    segment_jit = jax.jit(
        segment,
        donate_argnums=(0, 1, 2, 3) if track_best else (0, 1),
        out_shardings=(p_shardings, s_shardings, *best_sh, hist_sharding),
        compiler_options=jit_opts,
    )

    def run_segment(n, *args):
        *out, hist = segment_jit(*args, jnp.asarray(n, jnp.int32))
        return (*out, hist[: -(-n // history_every)])

    def population_loss(p):
        return jax.vmap(loss_fn)(p)

    final_jit = jax.jit(population_loss, out_shardings=vec_sharding, compiler_options=jit_opts)

    # ---- checkpoint directory
    ckpt = None
    if checkpoint is not None:
        loss0 = float(jax.jit(loss_fn)(init_fn(jax.random.fold_in(key, 0))))
        ckpt = checkpoints.Checkpoint(
            checkpoint,
            checkpoints.fingerprint(
                nets=nets, steps=steps, chunk=chunk, segment_steps=segment_steps,
                history_every=history_every, track_best=track_best, key=key, params=p_leaves,
                state=s_shape, shared=shared, loss0=loss0, stacked=stacked,
            ),
            steps=steps, history_every=history_every, chunk=chunk, params=p_leaves,
            state=s_shape, track_best=track_best,
        )

    n_hist = -(-steps // history_every)
    history_steps = np.arange(n_hist) * history_every

    # ---- progress bar
    bar = None
    if progress:
        from tqdm.auto import tqdm

        bar = tqdm(
            total=nets * steps, unit="net-step", unit_scale=True, desc="population", smoothing=0.1
        )

    results: list[dict[str, Any]] = []
    try:
        for c in range(n_chunks):
            real = min(chunk, nets - c * chunk)
            done = ckpt.load_done(c, real) if ckpt is not None else None
            if done is not None:
                results.append(done)
                if bar is not None:
                    bar.update(real * steps)
                continue

            # start or resume this chunk
            p = s = bl = bp = None
            t0 = 0
            hist_parts: list[np.ndarray] = []
            d = ckpt.load_current(c) if ckpt is not None else None
            if d is not None:
                t0 = int(d["step"])
                p = jax.device_put(checkpoints.from_host(checkpoints.unpack(d, "p"), p_shape),
                                   p_shardings)
                s = jax.device_put(checkpoints.from_host(checkpoints.unpack(d, "s"), s_shape),
                                   s_shardings)
                if track_best:
                    bl = jax.device_put(d["best_losses"], vec_sharding)
                    bp = jax.device_put(checkpoints.from_host(checkpoints.unpack(d, "b"), p_shape),
                                        p_shardings)
                hist_parts = [d["history"]]
            if p is None:
                p = first_chunk if c == 0 and first_chunk is not None else init_chunk(c)
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
                    bar.set_postfix(
                        chunk=f"{c + 1}/{n_chunks}",
                        median_loss=f"{np.median(hist_parts[-1][-1][:real]):.3g}",
                    )
                if (
                    ckpt is not None
                    and t < steps
                    and time.perf_counter() - last_save >= checkpoint_every
                ):
                    ckpt.save_current(c, t, np.concatenate(hist_parts, 0), p, s,
                                      (bl, bp) if track_best else None)
                    last_save = time.perf_counter()

            final = final_jit(p)
            out: dict[str, Any] = {
                "losses": np.asarray(final)[:real],
                "history": np.concatenate(hist_parts, 0).T[:real]
                if hist_parts
                else np.zeros((real, 0), np.asarray(final).dtype),
            }
            out.update(checkpoints.pack("p", [a[:real] for a in checkpoints.to_host(p)]))
            if track_best:
                better = final < bl
                bl = jnp.where(better, final, bl)
                bp = jax.tree.map(
                    lambda a, b: jnp.where(better.reshape((-1,) + (1,) * (a.ndim - 1)), a, b), p, bp
                )
                out["best_losses"] = np.asarray(bl)[:real]
                out.update(checkpoints.pack("b", [a[:real] for a in checkpoints.to_host(bp)]))
            if ckpt is not None:
                ckpt.save_done(c, out)
            results.append(out)
    finally:
        if bar is not None:
            bar.close()

    def gather(prefix: str) -> PyTree:
        cols = [checkpoints.unpack(r, prefix) for r in results]
        return p_tree.unflatten(
            [np.concatenate([col[i] for col in cols], 0) for i in range(len(p_leaves))]
        )

    return PopulationResult(
        params=gather("p"),
        losses=np.concatenate([r["losses"] for r in results]),
        history=np.concatenate([r["history"] for r in results], 0),
        history_steps=history_steps,
        best_params=gather("b") if track_best else None,
        best_losses=np.concatenate([r["best_losses"] for r in results]) if track_best else None,
        wall_time=time.perf_counter() - t_start,
        grad_evals=nets * steps,
        fast_path=pop.fast_path,
        shared_state=tuple(shared),
    )
