"""The example networks (flax.nnx) and the split of an nnx model into a pure function.

Imported on first use of one of its names from :mod:`quotient_opt.models`
(it needs flax: ``pip install quotient_opt[flax]``).
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any

import jax
import jax.numpy as jnp
from flax import nnx

from quotient_opt.models._tasks import torch_uniform_init
from quotient_opt.nn import MaxOverPieces
from quotient_opt.symmetry._adapters import nnx_call, nnx_split
from quotient_opt.symmetry._paths import map_with_path

Array = jax.Array

__all__ = ["MaxOverPieces", "MaxPoolNet", "SawtoothNet", "functional", "with_dense_weights"]


class MaxPoolNet(nnx.Sequential):
    """``Linear(in_features → windows·pieces)`` followed by a max over each window's pieces.

    Initialized like PyTorch's ``nn.Linear`` (weights and bias uniform in
    ``±1/sqrt(in_features)``), the set-up of the MaxPool question.

    Args:
      pieces: pieces per window ``k``.
      windows: number of windows ``W`` (outputs).
      in_features: input dimension.
      rngs: flax ``Rngs``.
      param_dtype: parameter dtype.
    """

    def __init__(
        self,
        pieces: int = 2,
        windows: int = 1,
        in_features: int = 2,
        *,
        rngs: nnx.Rngs,
        param_dtype: Any = jnp.float32,
    ):
        init = torch_uniform_init(in_features)
        super().__init__(
            nnx.Linear(
                in_features,
                windows * pieces,
                kernel_init=init,
                bias_init=init,
                param_dtype=param_dtype,
                rngs=rngs,
            ),
            MaxOverPieces(pieces),
        )


class SawtoothNet(nnx.Sequential):
    """``1 → 5×5 ReLU → 1``: five hidden ReLU layers of five units, 136 parameters.

    Default init is He-normal kernels and zero biases.

    Args:
      width: hidden width (5 in the reference construction).
      depth: number of hidden layers (5).
      rngs: flax ``Rngs``.
      param_dtype: parameter dtype.
      kernel_init: kernel initializer.
    """

    def __init__(
        self,
        width: int = 5,
        depth: int = 5,
        *,
        rngs: nnx.Rngs,
        param_dtype: Any = jnp.float32,
        kernel_init: Callable = nnx.initializers.he_normal(),
    ):
        sizes = [1] + [width] * depth + [1]
        fns: list[Any] = []
        for i, (a, b) in enumerate(zip(sizes, sizes[1:])):
            fns.append(
                nnx.Linear(a, b, kernel_init=kernel_init, param_dtype=param_dtype, rngs=rngs)
            )
            if i < depth:
                fns.append(nnx.relu)
        super().__init__(*fns)


# --------------------------------------------------------------------------- helpers


def functional(model: nnx.Module, *, state: bool = False) -> tuple:
    """Splits an nnx model into a pure function and its parameters.

    ``graphdef, params, rest = nnx.split(model, nnx.Param, ...)``: ``params``
    is ``nnx.state(model, nnx.Param)``, the pytree the library's symmetries
    act on; ``rest`` is every other state of the model (``BatchStat`` running
    statistics, ``RngState`` keys and counters of Dropout, caches). Each call
    merges ``graphdef`` with copies of its arguments, so ``apply`` works under
    ``jax.jit``, ``jax.grad`` and ``jax.vmap`` in eval and in train mode, and
    never mutates ``model``.

    * ``functional(model)`` returns ``(apply, params)`` with
      ``apply(params, x) = model(x)`` computed with ``rest`` as it is now,
      held fixed: train-mode BatchNorm normalizes by the batch's statistics
      and its running-average update is discarded; train-mode Dropout draws
      the mask of the model's current RNG state, the *same mask at every
      call*. This is the deterministic function that
      :func:`~quotient_opt.infer_symmetry` analyses and :func:`~quotient_opt.fit`
      minimizes.
    * ``functional(model, state=True)`` returns ``(apply, params, rest)`` with
      ``apply(params, rest, x) -> (model(x), new_rest)``, the
      ``nnx.split``/``nnx.merge`` step: ``new_rest`` holds the updated running
      statistics and advanced RNG counters (a fresh dropout mask at the next
      call). Carry it through the training loop; the symmetry transformations
      see only ``params``. Write it back into a model with
      ``nnx.update(model, params, new_rest)``.

    Args:
      model: any ``nnx.Module``.
      state: also return the non-Param state and an ``apply`` that threads it.

    Returns:
      ``(apply, params)``, or ``(apply, params, rest)`` with ``state=True``.

    Example::

        apply, params, rest = qo.models.functional(model, state=True)

        @jax.jit
        def step(params, rest, opt_state, x, y):
            def loss(p):
                pred, new_rest = apply(p, rest, x)
                return mse(pred, y), new_rest
            (value, rest), grads = jax.value_and_grad(loss, has_aux=True)(params)
            updates, opt_state = tx.update(grads, opt_state, params)
            return optax.apply_updates(params, updates), rest, opt_state, value
    """
    graphdef, params, rest = nnx_split(model)
    if state:
        def apply_with_state(p: Any, s: Any, x: Array) -> tuple[Array, Any]:
            return nnx_call(graphdef, p, s, x)

        return apply_with_state, params, rest

    def apply(p: Any, x: Array) -> Array:
        return nnx_call(graphdef, p, rest, x)[0]

    return apply, params


def with_dense_weights(model: nnx.Sequential, weights: Sequence[tuple[Any, Any]]) -> Any:
    """``nnx.state(model, nnx.Param)`` with the Linear layers' ``(kernel, bias)`` replaced.

    Args:
      model: an ``nnx.Sequential`` whose Linear layers match ``weights`` in order.
      weights: one ``(kernel (in, out), bias (out,))`` pair per Linear layer.
    """
    idx = [i for i, f in enumerate(model.layers) if isinstance(f, nnx.Linear)]
    if len(idx) != len(weights):
        raise ValueError(f"weights: {len(weights)} layers given, model has {len(idx)}")
    table = {}
    for i, (k, b) in zip(idx, weights):
        table[("layers", i, "kernel")] = k
        table[("layers", i, "bias")] = b
    state = nnx.state(model, nnx.Param)

    def put(path, leaf):
        if path not in table:
            return leaf
        new = jnp.asarray(table[path], leaf.dtype)
        if new.shape != leaf.shape:
            raise ValueError(f"weights: '{'/'.join(map(str, path))}' needs shape {leaf.shape}")
        return new

    return map_with_path(put, state)


