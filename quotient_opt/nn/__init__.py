"""Layers that the symmetry machinery understands beyond the usual ones (flax.nnx).

* :class:`MaxOverPieces`: the max over consecutive groups of features
  (max-pool over features, maxout). Its pieces may be permuted within a window
  and share one positive scale.

The layers are flax.nnx Modules: reading one imports flax (``pip install
quotient_opt[flax]``); importing this package does not.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from quotient_opt._lazy import lazy_getattr

if TYPE_CHECKING:  # pragma: no cover
    from quotient_opt.nn._nnx import MaxOverPieces

__all__ = ["MaxOverPieces"]

__getattr__ = lazy_getattr(__name__, "_nnx", __all__)


def __dir__() -> list[str]:
    return sorted(__all__)
