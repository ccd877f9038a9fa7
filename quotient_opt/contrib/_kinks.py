"""Data-driven kink placement for dense ReLU networks.

A ReLU unit :math:`\\mathrm{relu}(w^\\top h(x) + b)` is a hinge in its input
:math:`w^\\top h(x)`; its *kink* is where :math:`w^\\top h(x) = -b`. With the
usual initializations (He-normal kernels, zero biases) on inputs of one sign,
every kink sits at the edge of the data: on ``x`` in ``[0, 1]`` each unit of
the first layer computes :math:`\\mathrm{relu}(w x)`, a multiple of ``x`` or
zero, every live unit of every later layer is again a multiple of ``x``, and
about half the units are dead on all the data. The network starts at a
maximally degenerate point (it is linear, and its live units of a layer are
positive rescalings of one another), from which gradient descent has to
create every kink of the fit by itself.

:func:`place_kinks` keeps the kernels and sets each hidden unit's bias, layer
by layer from the input, so that its kink falls at a uniformly random point
of the range of its pre-activation on the data:

.. math::

   b_u = -\\big(m_u + t_u\\,(M_u - m_u)\\big), \\qquad
   m_u = \\min_i w_u^\\top h(x_i),\\; M_u = \\max_i w_u^\\top h(x_i),\\;
   t_u \\sim U(\\text{low}, \\text{high}),

where :math:`h` are the activations of the previous layer *after* its own
biases were placed. Every unit is then live on part of the data and each
layer's units are distinct hinges: no unit is dead at initialization, and the
network is piecewise linear with kinks inside the data from the start. It
reads only the data and the network's forward pass (no targets).

Only dense chains ``h @ kernel + bias`` with ReLU (or identity) activations
are handled: ``flax.nnx.Linear``/``linen.Dense`` stacks and plain functions;
the structure is recognized from the jaxpr of ``apply_fn`` (the matcher of
:func:`~quotient_opt.train_population`'s dense-MLP fast path) and anything
else is refused with a ``ValueError`` that says why.

References:
  Lu, Shin, Su, Karniadakis. *Dying ReLU and Initialization: Theory and
  Numerical Examples*, 2019. https://arxiv.org/abs/1903.06733

  Steinwart. *A Sober Look at Neural Network Initializations*, 2019 (what the
  usual initializations do to ReLU networks, and an alternative).
  https://arxiv.org/abs/1903.11482
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from quotient_opt.training._dense_mlp import Layer, match_dense_mse

PyTree = Any


def _check_positions(low: float, high: float) -> None:
    if not 0.0 <= low <= high <= 1.0:
        raise ValueError(f"need 0 <= low <= high <= 1, got low={low}, high={high}")


def dense_relu_chain(
    apply_fn: Callable[[PyTree, jax.Array], jax.Array], params: PyTree, x: Any
) -> list[Layer]:
    """The layers of ``apply_fn`` as a dense chain (kernel, bias leaf indices, ReLU flags).

    Args:
      apply_fn: ``(params, x) -> outputs`` of one network.
      params: its parameters (arrays, tracers or ``jax.ShapeDtypeStruct``).
      x: inputs ``(points, in_features)`` (only the shape and dtype are used).

    Returns:
      The layers in order; ``Layer.kernel``/``Layer.bias`` index
      ``jax.tree.leaves(params)``.

    Raises:
      ValueError: if ``apply_fn`` is not a chain of ``h @ kernel + bias`` with
        ReLU or identity activations on a 2-D input (the message says where
        the match failed).
    """
    x_shape = tuple(np.shape(x))
    if len(x_shape) != 2:
        raise ValueError(f"x must be (points, in_features), got shape {x_shape}")
    p_shape = jax.tree.map(lambda a: jax.ShapeDtypeStruct(jnp.shape(a), a.dtype), params)
    leaves = jax.tree.leaves(p_shape)
    if not leaves:
        raise ValueError("params has no leaves")
    dtype = leaves[0].dtype
    x0 = np.zeros(x_shape, dtype)
    try:
        out = jax.eval_shape(lambda p: apply_fn(p, x0), p_shape)
    except Exception as e:  # report why
        raise ValueError(f"apply_fn(params, x) failed: {type(e).__name__}: {e}") from e
    y0 = np.zeros(out.shape, out.dtype)

    def probe(p: PyTree) -> jax.Array:
        return jnp.sum((apply_fn(p, x0) - y0) ** 2)

    spec, why = match_dense_mse(probe, p_shape)
    if spec is None:
        raise ValueError(
            "apply_fn is not recognized as a dense ReLU MLP (a chain of h @ kernel + bias with "
            f"ReLU or identity activations): {why}"
        )
    return spec.layers


def place_kinks(
    apply_fn: Callable[[PyTree, jax.Array], jax.Array],
    params: PyTree,
    x: Any,
    key: jax.Array,
    *,
    low: float = 0.0,
    high: float = 1.0,
    where: Sequence[Any] | None = None,
) -> PyTree:
    """Sets every hidden ReLU unit's bias so its kink lies inside the data (module docstring).

    Kernels are unchanged; the output layer is unchanged. A unit whose
    pre-activation is constant on the data (a zero kernel column, or every
    input unit dead) keeps its bias. Jittable and vmappable over ``params``
    and ``key`` (e.g. inside an ``init_fn`` of :func:`~quotient_opt.train_population`;
    see :func:`kink_init`).

    Example::

      apply, params = qo.models.functional(qo.models.SawtoothNet(rngs=nnx.Rngs(0)))
      params = qo.contrib.place_kinks(apply, params, task.x, jax.random.key(1))

    Args:
      apply_fn: ``(params, x) -> outputs``, a dense ReLU MLP (see
        :func:`dense_relu_chain`).
      params: its parameters.
      x: the data inputs ``(points, in_features)``.
      key: PRNG key for the positions ``t_u``.
      low: lower end of ``t_u`` (0 = the smallest pre-activation on the data).
      high: upper end of ``t_u`` (1 = the largest).
      where: optional, one boolean vector per ReLU layer (in the chain's
        order, the layer's width each): only the units marked ``True`` are
        placed, the others keep their biases (used to place new units only).

    Returns:
      ``params`` with new biases.

    Raises:
      ValueError: if ``apply_fn`` is not a dense ReLU MLP, a ReLU layer has no
        bias, ``where`` does not match the ReLU layers, or ``low``/``high`` are
        not ``0 <= low <= high <= 1``.
    """
    _check_positions(low, high)
    layers = dense_relu_chain(apply_fn, params, x)
    leaves, treedef = jax.tree.flatten(params)
    leaves = list(leaves)
    relu = [layer for layer in layers if layer.relu]
    for i, layer in enumerate(relu):
        if layer.bias is None:
            raise ValueError(f"ReLU layer {i} of the chain has no bias to place its kinks with")
    if where is not None:
        where = list(where)
        widths = [jnp.shape(leaves[layer.kernel])[-1] for layer in relu]
        if len(where) != len(relu) or any(
            jnp.shape(w) != (n,) for w, n in zip(where, widths)
        ):
            raise ValueError(
                f"where: expected one boolean vector per ReLU layer with shapes "
                f"{[(n,) for n in widths]}, got {[tuple(jnp.shape(w)) for w in where]}"
            )
    dtype = jnp.result_type(leaves[layers[0].kernel])
    keys = jax.random.split(key, max(len(relu), 1))
    h = jnp.asarray(x, dtype)
    j = 0
    for layer in layers:
        u = h @ leaves[layer.kernel]
        b = leaves[layer.bias] if layer.bias is not None else None
        if layer.relu:
            lo, hi = jnp.min(u, axis=0), jnp.max(u, axis=0)
            t = jax.random.uniform(keys[j], jnp.shape(b), dtype, low, high)
            placed = -(lo + t * (hi - lo))
            scale = jnp.maximum(jnp.maximum(jnp.abs(lo), jnp.abs(hi)), jnp.finfo(dtype).tiny)
            ok = hi - lo > 16 * jnp.finfo(dtype).eps * scale
            if where is not None:
                ok = ok & jnp.asarray(where[j], bool)
            b = jnp.where(ok, placed, b).astype(leaves[layer.bias].dtype)
            leaves[layer.bias] = b
            j += 1
        z = u + b if b is not None else u
        h = jnp.maximum(z, 0) if layer.relu else z
    return treedef.unflatten(leaves)


def kink_init(
    init_fn: Callable[[jax.Array], PyTree],
    apply_fn: Callable[[PyTree, jax.Array], jax.Array],
    x: Any,
    *,
    low: float = 0.0,
    high: float = 1.0,
) -> Callable[[jax.Array], PyTree]:
    """An ``init_fn`` for :func:`~quotient_opt.train_population`: ``init_fn`` then :func:`place_kinks`.

    Args:
      init_fn: ``key -> params`` (e.g. He-normal kernels, zero biases).
      apply_fn: ``(params, x) -> outputs``, a dense ReLU MLP.
      x: the data inputs ``(points, in_features)``.
      low: see :func:`place_kinks`.
      high: see :func:`place_kinks`.

    Returns:
      ``key -> params``: the kernels of ``init_fn(k1)``, the biases placed with
      ``k2`` (``k1, k2 = jax.random.split(key)``).

    Raises:
      ValueError: as :func:`place_kinks` (checked once here, on ``init_fn``'s shapes).
    """
    _check_positions(low, high)
    shape = jax.eval_shape(init_fn, jax.random.key(0))
    dense_relu_chain(apply_fn, shape, x)
    x = np.asarray(x)

    def new_init(key: jax.Array) -> PyTree:
        k1, k2 = jax.random.split(key)
        return place_kinks(apply_fn, init_fn(k1), x, k2, low=low, high=high)

    return new_init
