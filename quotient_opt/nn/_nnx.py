"""Max over pieces: max-pool over features, maxout (a flax.nnx layer)."""

from __future__ import annotations

import jax
import jax.numpy as jnp
from flax import nnx

Array = jax.Array

__all__ = ["MaxOverPieces"]


class MaxOverPieces(nnx.Module):
    """Max over consecutive groups of ``pieces`` features (max-pool / maxout).

    Feature ``w * pieces + j`` is piece ``j`` of window ``w``; the output has
    ``features / pieces`` entries.
    """

    def __init__(self, pieces: int):
        if pieces < 1:
            raise ValueError(f"pieces must be >= 1, got {pieces}")
        self.pieces = pieces

    def __call__(self, x: Array) -> Array:
        return jnp.max(x.reshape(*x.shape[:-1], -1, self.pieces), axis=-1)
