"""The example tasks, with exact solutions (numpy and JAX only, no framework).

* :func:`maxpool_task` / :func:`max_of_planes_task`: data ``y = max_j (x · w_j + b_j)``
  and the exact weights of a Linear + max-over-pieces network.
* :func:`sawtooth_task`: a 16-tooth sawtooth plus a low-frequency spline and the
  hand-built perfect fit of the ``1 → 5×5 ReLU → 1`` network.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np

Array = jax.Array


def torch_uniform_init(fan_in: int) -> Callable:
    """PyTorch's default ``nn.Linear`` init, ``U(-1/sqrt(fan_in), 1/sqrt(fan_in))``."""
    bound = 1.0 / math.sqrt(fan_in)

    def init(key: Array, shape: Sequence[int], dtype: Any = jnp.float32) -> Array:
        return jax.random.uniform(key, shape, dtype, -bound, bound)

    return init


def mse(pred: Array, y: Array) -> Array:
    """The mean squared error ``mean((pred - y)^2)``."""
    return jnp.mean((pred - y) ** 2)


# --------------------------------------------------------------------------- MaxPool tasks


class MaxTask(NamedTuple):
    """Data ``y = max_j (x · w_j + b_j)`` and the exact MaxPoolNet weights.

    Attributes:
      x: inputs ``(n, d)``.
      y: targets ``(n, 1)``.
      kernel: exact kernel ``(d, k)`` (column ``j`` is plane ``j``).
      bias: exact bias ``(k,)``.
    """

    x: Array
    y: Array
    kernel: Array
    bias: Array

    @property
    def weights(self) -> list[tuple[Array, Array]]:
        return [(self.kernel, self.bias)]


def max_of_planes_task(
    planes: Any,
    offsets: Any | None = None,
    *,
    n: int = 1000,
    seed: int = 0,
    dtype: Any = jnp.float32,
) -> MaxTask:
    """Data from a max of planes on ``X ~ U[0, 1]^d``.

    Args:
      planes: ``(k, d)`` slopes, one row per plane.
      offsets: ``(k,)`` intercepts (default zero).
      n: number of points.
      seed: data seed.
      dtype: dtype of the arrays.

    Raises:
      ValueError: if some plane is never the maximum on the data (the task
        would then not need all pieces).
    """
    w = np.asarray(planes, np.float64)
    b = np.zeros(w.shape[0]) if offsets is None else np.asarray(offsets, np.float64)
    x = np.random.default_rng(seed).uniform(size=(n, w.shape[1]))
    z = x @ w.T + b
    winners = np.unique(np.argmax(z, axis=1))
    if len(winners) != w.shape[0]:
        raise ValueError(
            f"planes: only planes {winners.tolist()} of {w.shape[0]} are the maximum somewhere "
            "on the data"
        )
    y = z.max(axis=1, keepdims=True)
    return MaxTask(
        jnp.asarray(x, dtype), jnp.asarray(y, dtype), jnp.asarray(w.T, dtype), jnp.asarray(b, dtype)
    )


def maxpool_task(*, n: int = 1000, seed: int = 0, dtype: Any = jnp.float32) -> MaxTask:
    """The question's task: ``y = max(x + 2y, 3x + y)`` on 1000 points of ``U[0, 1]^2``.

    Exact solution: kernel rows ``(1, 2)`` and ``(3, 1)`` (as columns of the
    ``(in, out)`` kernel), zero bias.
    """
    return max_of_planes_task([[1.0, 2.0], [3.0, 1.0]], n=n, seed=seed, dtype=dtype)


# --------------------------------------------------------------------------- sawtooth


class SawtoothTask(NamedTuple):
    """The sawtooth-plus-spline target and its hand-built perfect fit.

    Attributes:
      x: training inputs ``(n, 1)``: every knot plus evenly spaced points on
        each segment between knots.
      y: targets ``(n, 1)``.
      knots: sorted knots of the target on ``[0, 1]``, endpoints included.
      weights: exact ``(kernel (in, out), bias)`` per layer (float64 numpy).
    """

    x: Array
    y: Array
    knots: np.ndarray
    weights: list[tuple[np.ndarray, np.ndarray]]


def _tent_power(x: np.ndarray, n: int) -> np.ndarray:
    for _ in range(n):
        x = np.where(x <= 0.5, 2 * x, 2 - 2 * x)
    return x


def sawtooth_task(
    *,
    seed: int = 0,
    amplitude: float = 0.1,
    width: int = 5,
    depth: int = 5,
    spline_units: int = 3,
    points_per_segment: int = 3,
    dtype: Any = jnp.float32,
) -> SawtoothTask:
    """Builds the sawtooth network's perfect fit and its training data.

    Each hidden layer holds a 2-unit block computing the tent map
    :math:`T(x) = 2\\,\\mathrm{relu}(x) - 4\\,\\mathrm{relu}(x - 1/2)` on
    :math:`[0, 1]`, so ``depth`` layers give :math:`T^{\\text{depth}}`, a
    sawtooth with :math:`2^{\\text{depth}-1}` teeth (16 for depth 5), and a
    ``spline_units`` block whose first layer makes a random linear spline
    :math:`s(x) = c_0 + \\sum_j c_j\\,\\mathrm{relu}(x - t_j)` (``t_1 = 0``,
    the others uniform in ``(0.1, 0.9)``, seeded) and whose later layers pass
    it through unchanged. The output is
    :math:`a\\,(T^{\\text{depth}}(x) - 1/2) + s(x)`.

    The training set is every knot of this piecewise-linear function on
    ``[0, 1]`` plus ``points_per_segment`` evenly spaced points inside each
    segment between knots.

    Args:
      seed: seed of the spline.
      amplitude: sawtooth amplitude ``a``.
      width: hidden width (``2 + spline_units`` must fit).
      depth: number of hidden layers.
      spline_units: units of the spline block.
      points_per_segment: interior points per segment.
      dtype: dtype of ``x`` and ``y``.
    """
    if 2 + spline_units > width:
        raise ValueError(f"width {width} is too small for 2 + {spline_units} units")
    rng = np.random.default_rng(seed)
    saw_knots = np.arange(1, 2**depth) / 2**depth
    t = [0.0]
    while len(t) < spline_units:
        c = rng.uniform(0.1, 0.9)
        if np.min(np.abs(saw_knots - c)) > 0.005 and all(abs(c - u) > 0.05 for u in t):
            t.append(float(c))
    t = np.array(t)
    c = rng.normal(0.0, 0.5, spline_units)
    c0 = rng.normal(0.0, 0.1)

    weights: list[tuple[np.ndarray, np.ndarray]] = []
    k = np.zeros((1, width))
    b = np.zeros(width)
    k[0, : 2 + spline_units] = 1.0
    b[1] = -0.5
    b[2 : 2 + spline_units] = -t
    weights.append((k, b))
    for _ in range(depth - 1):
        k = np.zeros((width, width))
        b = np.zeros(width)
        k[0, :2] = 2.0
        k[1, :2] = -4.0
        b[1] = -0.5
        for j in range(spline_units):
            k[2 + j, 2 + j] = 1.0
        weights.append((k, b))
    k = np.zeros((width, 1))
    k[0, 0], k[1, 0] = 2 * amplitude, -4 * amplitude
    k[2 : 2 + spline_units, 0] = c
    weights.append((k, np.array([c0 - amplitude / 2])))

    def target(x: np.ndarray) -> np.ndarray:
        return amplitude * (_tent_power(x, depth) - 0.5) + c0 + np.maximum(x[:, None] - t, 0) @ c

    knots = np.unique(np.concatenate([[0.0, 1.0], saw_knots, t]))
    fr = np.arange(1, points_per_segment + 1) / (points_per_segment + 1)
    inner = (knots[:-1, None] + fr * np.diff(knots)[:, None]).ravel()
    x = np.sort(np.concatenate([knots, inner]))
    y = target(x)
    return SawtoothTask(
        jnp.asarray(x[:, None], dtype), jnp.asarray(y[:, None], dtype), knots, weights
    )
