"""Moving an inner optimizer's state along with the parameters.

When a wrapper moves the parameters along a symmetry orbit (``θ → g·θ``), the
inner optimizer's statistics must move with them, or the next step is taken
in the wrong coordinates. Under a rescaling ``θ_i → c_i θ_i`` a gradient
transforms as ``∂L/∂θ_i → ∂L/∂θ_i / c_i`` (a covector), so first-moment
statistics (momentum, Adam's ``mu``) transform with power ``-1`` and
second-moment statistics (Adam's ``nu``, RMSProp, AdaGrad, Adadelta) with
power ``-2``. Permutations move every statistic like the parameter.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any, Literal

import jax
import numpy as np

PyTree = Any
Kind = Literal["first", "second"]

#: Field names of Optax states that hold squared-gradient statistics.
SECOND_MOMENT_FIELDS = frozenset({"nu", "sum_of_squares", "e_g", "e_x", "grad_sq", "v"})


def _param_like(x: PyTree, params: PyTree) -> bool:
    if jax.tree.structure(x) != jax.tree.structure(params):
        return False
    return all(
        np.shape(a) == np.shape(b) for a, b in zip(jax.tree.leaves(x), jax.tree.leaves(params))
    )


def map_param_like(
    fn: Callable[[Kind, PyTree], PyTree], state: PyTree, params: PyTree
) -> PyTree:
    """Applies ``fn(kind, subtree)`` to every params-shaped subtree of an optimizer state.

    Walks NamedTuples, tuples, lists and dicts; a subtree with the same tree
    structure and leaf shapes as ``params`` is replaced by ``fn(kind, subtree)``
    where ``kind`` is ``'second'`` if it sits under a field named in
    :data:`SECOND_MOMENT_FIELDS` and ``'first'`` otherwise. Everything else
    (counts, hyperparameters, empty states) is returned unchanged.

    Args:
      fn: the map.
      state: an Optax state (any nesting of ``chain``, ``inject_hyperparams``,
        wrappers' NamedTuples).
      params: parameters, used only for their structure and shapes.
    """

    def walk(node: PyTree, kind: Kind) -> PyTree:
        if node is None:
            return node
        if _param_like(node, params):
            return fn(kind, node)
        if isinstance(node, tuple) and hasattr(node, "_fields"):
            return type(node)(
                *(
                    walk(v, "second" if f in SECOND_MOMENT_FIELDS else kind)
                    for f, v in zip(node._fields, node)
                )
            )
        if isinstance(node, (tuple, list)):
            return type(node)(walk(v, kind) for v in node)
        if isinstance(node, dict):
            return {
                k: walk(v, "second" if k in SECOND_MOMENT_FIELDS else kind)
                for k, v in node.items()
            }
        return node

    return walk(state, "first")


def transport_state(sym: Any, state: PyTree, params: PyTree, g: Any) -> PyTree:
    """Moves an optimizer state along with ``params → sym.act(params, g)``.

    First moments transform like gradients (power ``-1``), second moments like
    squared gradients (power ``-2``); both are permuted like the parameters.

    Args:
      sym: the :class:`~quotient_opt.Symmetry`.
      state: the inner optimizer's state.
      params: the parameters *before* the move (for structure only).
      g: the group element applied to the parameters.
    """
    return map_param_like(
        lambda kind, t: sym.act(t, g, power=-1 if kind == "first" else -2), state, params
    )
