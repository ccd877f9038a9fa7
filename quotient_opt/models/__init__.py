"""Example networks (flax.nnx) and their tasks, with exact solutions.

* :class:`MaxPoolNet`: ``Linear(d → W·k)`` then a max over the ``k`` pieces of
  each of the ``W`` windows. On the seed task ``y = max(x + 2y, 3x + y)`` Adam
  stalls on most inits: one piece wins on every point and the other gets no
  gradient.
* :class:`SawtoothNet`: ``1 → 5×5 ReLU → 1`` (136 parameters) with a
  hand-built perfect fit of a 16-tooth sawtooth plus a low-frequency spline,
  which training from random inits does not find.
* :func:`functional`: any nnx model (eval or train mode) as a pure
  ``apply(params, x)``.

The tasks need only JAX; the networks and :func:`functional` are flax.nnx and
import flax on first use (``pip install quotient_opt[flax]``).

References:
  The MaxPool stall: a question on training ``max(x + 2y, 3x + y)`` with a
  Linear + MaxPool network, where Adam ends at the best single plane on most
  initializations.

  *The energy landscape of a simple neural network* (the sawtooth
  construction, §2), building the sawtooth as in Chen, *The upper bound on knots
  in neural networks*, 2016. https://arxiv.org/abs/1611.09448
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from quotient_opt._lazy import lazy_getattr
from quotient_opt.models._tasks import (
    MaxTask,
    SawtoothTask,
    max_of_planes_task,
    maxpool_task,
    mse,
    sawtooth_task,
    torch_uniform_init,
)

if TYPE_CHECKING:  # pragma: no cover
    from quotient_opt.models._nnx import (
        MaxOverPieces,
        MaxPoolNet,
        SawtoothNet,
        functional,
        with_dense_weights,
    )

_NNX = ("MaxOverPieces", "MaxPoolNet", "SawtoothNet", "functional", "with_dense_weights")

__all__ = [
    "MaxOverPieces",
    "MaxPoolNet",
    "MaxTask",
    "SawtoothNet",
    "SawtoothTask",
    "functional",
    "max_of_planes_task",
    "maxpool_task",
    "mse",
    "sawtooth_task",
    "torch_uniform_init",
    "with_dense_weights",
]

__getattr__ = lazy_getattr(__name__, "_nnx", _NNX)


def __dir__() -> list[str]:
    return sorted(__all__)
