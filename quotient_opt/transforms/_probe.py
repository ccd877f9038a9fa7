"""Running an Optax transformation on synthetic data of the parameters' shapes.

The library learns what an optimizer does by running it, not by reading its
name: how each state field transforms when the parameters are rescaled
(:func:`~quotient_opt.transforms._transport.measure_laws`), whether its update
commutes with the permutations of a symmetry, whether a transformation in a
chain rescales, normalizes or passes its updates through
(:mod:`~quotient_opt.transforms._order`). All of them run the transformation
from ``init`` for a few steps on the same kind of data:

* parameters :math:`\\theta_t = \\theta_0 + 0.1\\,\\delta_t`, with
  :math:`\\theta_0, \\delta_t \\sim \\mathcal N(0, 1)`;
* gradients with entries of random sign and magnitude uniform in
  :math:`[0.5, 1.5]`, bounded away from zero so that constants such as an
  ``eps`` stay negligible next to the statistics they are added to.

The data has the structure, shapes and (at least float32) dtypes of the real
parameters, never their values, so a probe can run at ``init`` and at trace
time alike: it runs eagerly (``jax.ensure_compile_time_eval``), also inside
``jit``, on concrete arrays; a transformation whose results depend on traced
values (a hyperparameter traced by an outer ``jit`` or ``vmap``) gives traced
results there, which the probes treat as unmeasured.
"""

from __future__ import annotations

import collections
from collections.abc import Callable, Hashable
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np

PyTree = Any

#: Steps of each probe run (after ``init``).
STEPS = 2
#: Steps of a rerun when some statistic stayed zero (``MultiSteps`` updates its inner
#: optimizer every k steps only).
MAX_STEPS = 6


class ProbeError(Exception):
    """The transformation could not be run on synthetic data (the reason is the message)."""


class Run(NamedTuple):
    """One probe run: ``states[t]`` after ``t`` updates (``states[0]`` from ``init``) and
    ``outputs[t - 1]`` returned by update ``t``."""

    states: list[PyTree]
    outputs: list[PyTree]


def spec_key(params: PyTree) -> Hashable:
    """A hashable key of the params' structure, shapes and dtypes (works on tracers)."""
    leaves, treedef = jax.tree.flatten(params)
    return treedef, tuple((tuple(np.shape(x)), np.dtype(x.dtype).name) for x in leaves)


def probe_dtype(x: Any) -> np.dtype:
    """The dtype a leaf is probed in: float64 stays, other floats become float32."""
    dt = np.dtype(x.dtype)
    if not jnp.issubdtype(dt, jnp.inexact):
        return dt
    return np.dtype(np.float64) if dt == np.float64 else np.dtype(np.float32)


class Data(NamedTuple):
    """Synthetic inputs: ``thetas[t]`` for ``t = 0..steps`` and ``grads[t]`` for the
    update at ``thetas[t + 1]`` (as leaf lists in ``treedef`` order)."""

    treedef: Any
    thetas: list[list[np.ndarray]]
    grads: list[list[np.ndarray]]


def make_data(params: PyTree, seed: int = 0, steps: int = STEPS) -> Data:
    """Random parameters and gradients of the params' structure, shapes and dtypes."""
    leaves, treedef = jax.tree.flatten(params)
    rng = np.random.default_rng(seed)
    dts = [probe_dtype(x) for x in leaves]
    shapes = [tuple(np.shape(x)) for x in leaves]
    theta0 = [rng.standard_normal(s).astype(d) for s, d in zip(shapes, dts)]
    thetas = [theta0] + [
        [t + (0.1 * rng.standard_normal(s)).astype(d) for t, s, d in zip(theta0, shapes, dts)]
        for _ in range(steps)
    ]
    grads = [[gradient_like(rng, s, d) for s, d in zip(shapes, dts)] for _ in range(steps)]
    return Data(treedef, thetas, grads)


def gradient_like(rng: np.random.Generator, shape: tuple, dtype: np.dtype) -> np.ndarray:
    """Entries of random sign and magnitude uniform in ``[0.5, 1.5]``."""
    sign = np.where(rng.random(shape) < 0.5, -1.0, 1.0)
    return (sign * rng.uniform(0.5, 1.5, shape)).astype(dtype)


def run(tx: Any, data: Data, thetas: list | None = None, grads: list | None = None) -> Run:
    """Runs ``tx`` from ``init(thetas[0])`` for ``len(grads)`` updates, eagerly.

    Parts of the states and outputs may be traced (see :func:`traced`).

    Raises:
      ProbeError: ``tx`` failed on the data (e.g. it needs extra args such as
        ``value``).
    """
    thetas = data.thetas if thetas is None else thetas
    grads = data.grads if grads is None else grads
    tree = lambda leaves: jax.tree.unflatten(data.treedef, [jnp.asarray(x) for x in leaves])
    try:
        with jax.ensure_compile_time_eval():
            state = tx.init(tree(thetas[0]))
            states, outputs = [state], []
            for t in range(len(grads)):
                out, state = tx.update(tree(grads[t]), state, tree(thetas[t + 1]))
                states.append(state)
                outputs.append(out)
    except Exception as err:  # noqa: BLE001 - any failure means "cannot probe"
        raise ProbeError(f"{type(err).__name__}: {str(err).splitlines()[0] if str(err) else ''}")
    return Run(states, outputs)


def traced(tree: PyTree) -> bool:
    """Whether ``tree`` holds traced values (it depends on a value traced by an outer
    ``jit`` or ``vmap``, such as a hyperparameter of ``optax.inject_hyperparams``)."""
    return any(isinstance(x, jax.core.Tracer) for x in jax.tree.leaves(tree))


class Cache:
    """A small bounded cache of probe results (keeps the transformations it is keyed on
    alive, so that their ids are never reused while cached)."""

    def __init__(self, size: int = 128) -> None:
        self.size = size
        self.items: collections.OrderedDict = collections.OrderedDict()

    def get(self, key: Hashable, compute: Callable[[], Any]) -> Any:
        if key in self.items:
            self.items.move_to_end(key)
            return self.items[key]
        value = compute()
        self.items[key] = value
        if len(self.items) > self.size:
            self.items.popitem(last=False)
        return value


def tx_key(tx: Any) -> Hashable:
    """A hashable identity of a transformation (its init and update functions)."""
    return (tx.init, tx.update)
