"""The traced forward computation of a model, and its squared linear skeleton.

:func:`~quotient_opt.infer_symmetry` keeps the model's forward computation
as a :class:`Program`. The path norm needs it: the squared
:math:`\\ell_2` path norm of a positively homogeneous network sums, over
every path from an input (or a bias) to an output, the product of the
squared weights on the path. It is the output of the network's *squared
skeleton* on an all-ones input: the same computation with every parameter
and constant squared, activations replaced by the identity, and every max
(max over pieces, max pooling) replaced by a sum:

.. math::

   \\phi(\\theta) = \\mathbf 1^\\top F_{\\theta^{\\odot 2}}(\\mathbf 1), \\qquad
   \\gamma = \\frac{\\partial \\phi}{\\partial (\\theta^{\\odot 2})},

computed here by re-interpreting the model's jaxpr with those substitutions
(a rule table of the library's jaxpr interpreter, ``quotient_opt._jaxpr``; one
forward and one backward pass, through dense, convolution, pooling,
reshape and residual layers alike). :math:`\\phi` is invariant under the
rescalings, so :math:`\\gamma` transforms like a second moment.

References:
  Neyshabur, Salakhutdinov, Srebro. *Path-SGD: Path-Normalized Optimization in
  Deep Neural Networks*, 2015. https://arxiv.org/abs/1506.02617
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from jax import lax

from quotient_opt import _jaxpr

PyTree = Any

# primitives whose squared version is the same primitive on squared operands
_SAME = {
    "dot_general", "conv_general_dilated", "add", "reshape", "broadcast_in_dim", "transpose",
    "squeeze", "expand_dims", "concatenate", "slice", "rev", "reduce_sum", "reduce_window_sum",
    "convert_element_type", "dynamic_slice", "cumsum", "mul", "div", "copy",
    "reduce_precision", "pad", "select_and_gather_add",
}
# primitives whose squared version is a sum
_TO_SUM = {"reduce_max", "reduce_min", "reduce_window_max", "reduce_window_min"}


class Program:
    """A model's forward computation ``apply_fn(params, x)`` at an example input.

    Compared by identity (it is part of a :class:`~quotient_opt.Symmetry`'s
    identity, so jitted code specialised on a symmetry is specialised on its
    program too).

    Attributes:
      apply_fn: the forward function.
      example: the example input (one sample where the model is batched).
    """

    def __init__(self, apply_fn: Callable[[PyTree, Any], Any], params: PyTree, example: Any):
        self.apply_fn = apply_fn
        self.example = _one_sample(apply_fn, params, example)
        self._abstract = jax.tree.map(lambda p: jax.ShapeDtypeStruct(np.shape(p), _dtype(p)),
                                      params)
        self._skeletons: dict[Any, Any] = {}

    def skeleton(self, dtype: Any) -> Any:
        """The closed jaxpr of ``apply_fn`` at one example, with float leaves in ``dtype``."""
        key = jnp.dtype(dtype)
        if key not in self._skeletons:
            def cast(v: Any) -> Any:
                dt = v.dtype
                return jax.ShapeDtypeStruct(v.shape, key if jnp.issubdtype(dt, jnp.floating) else dt)

            params = jax.tree.map(cast, self._abstract)
            example = jax.tree.map(
                lambda v: cast(jax.ShapeDtypeStruct(np.shape(v), _dtype(v))), self.example)
            self._skeletons[key] = jax.make_jaxpr(self.apply_fn)(params, example)
        return self._skeletons[key]

    def check_path_norm(self) -> None:
        """Raises ``ValueError`` now if the path norm cannot be computed for this model."""
        sq = jax.tree.map(lambda v: jax.ShapeDtypeStruct(v.shape, jnp.float32), self._abstract)
        jax.eval_shape(self.path_norm, sq)

    def path_norm(self, squared_params: PyTree) -> jax.Array:
        """:math:`\\phi`: the squared skeleton's summed output at an all-ones input.

        Args:
          squared_params: the parameters squared elementwise (any float dtype).

        Raises:
          ValueError: for an operation without a squared version (a division
            by a unit's value, an unsupported primitive), naming it.
        """
        leaves = jax.tree.leaves(squared_params)
        dtype = jnp.result_type(*leaves)
        closed = self.skeleton(dtype)
        # float inputs are the skeleton's all-ones input; integer ones (token ids) index
        # tables, and stay plain constants (every token is counted by the lookup's rule)
        example = jax.tree.leaves(self.example)
        floats = [jnp.issubdtype(_dtype(v), jnp.floating) for v in example]
        ones = [jnp.ones(np.shape(v), dtype if f else _dtype(v)) for v, f in zip(example, floats)]
        outs = _squared_eval(closed.jaxpr, list(closed.consts), leaves + ones,
                             [True] * len(leaves) + floats)
        return sum(jnp.sum(o.astype(jnp.result_type(*leaves))) for o in outs)


def _dtype(p: Any) -> Any:
    return p.dtype if hasattr(p, "dtype") else np.asarray(p).dtype


def _float(v: Any) -> Any:
    dt = _dtype(v)
    return dt if jnp.issubdtype(dt, jnp.floating) else jnp.float32


def _one_sample(apply_fn: Callable, params: PyTree, x: Any) -> Any:
    """``x[:1]`` if the model maps a batch of ``N > 1`` to outputs with leading size ``N``."""
    leaves = jax.tree.leaves(x)
    abstract = jax.tree.map(lambda p: jax.ShapeDtypeStruct(np.shape(p), _dtype(p)), params)
    if not leaves or np.ndim(leaves[0]) == 0 or np.shape(leaves[0])[0] <= 1:
        return x
    n = np.shape(leaves[0])[0]
    try:
        out = jax.eval_shape(apply_fn, abstract, x)
        first = jax.tree.leaves(out)[0]
        if np.ndim(first) == 0 or first.shape[0] != n:
            return x
        one = jax.tree.map(lambda v: v[:1], x)
        out1 = jax.eval_shape(apply_fn, abstract, one)
        if jax.tree.leaves(out1)[0].shape[:1] == (1,):
            return one
    except Exception:  # noqa: BLE001 - not batched along axis 0
        pass
    return x


def _squared_eval(jaxpr: Any, consts: list[Any], args: list[Any], skel: list[bool]) -> list[Any]:
    """Evaluates the squared skeleton; ``skel[i]`` says whether input ``i`` is a skeleton value
    (a squared parameter or the all-ones input) rather than a plain constant."""
    outs = _jaxpr.interpret(jaxpr, consts, list(zip(args, skel)), _RULES, _elementwise,
                            literal=_literal, const=_const, fold=_fold, call=_call)
    return [_squared(v, s) for v, s in outs]


# Values are pairs ``(value, skel)``: ``skel`` says ``value`` is a skeleton value, else it is a
# plain constant of the computation (which enters the skeleton squared where it meets it).


def _literal(v: Any) -> tuple[Any, bool]:
    return jnp.asarray(v.val), False


def _const(c: Any) -> tuple[Any, bool]:
    return jnp.asarray(c), False


def _squared(v: Any, s: bool) -> Any:
    return v if s else jnp.square(jnp.asarray(v))


def _fold(eqn: Any, vals: list[tuple[Any, bool]]) -> list[tuple[Any, bool]] | None:
    """Constants only: the ordinary computation."""
    if any(s for _, s in vals):
        return None
    return [(o, False) for o in _jaxpr.bind(eqn, [v for v, _ in vals])]


def _call(interp: Any, eqn: Any, jaxpr: Any, consts: list[Any], vals: list[tuple[Any, bool]]
          ) -> list[tuple[Any, bool]]:
    """A call meeting the skeleton: its body is run on the same pairs (a plain constant
    stays plain until it meets a skeleton value, so integer indices computed inside a call,
    as ``jnp.take`` does, still index)."""
    return interp.run(jaxpr, consts, list(vals))


def _same(ctx: Any, eqn: Any, vals: list[tuple[Any, bool]]) -> list[tuple[Any, bool]]:
    """The same primitive on squared operands (a plain constant meeting the skeleton enters
    squared: a coefficient on every path)."""
    if _jaxpr.name_of(eqn) == "div" and vals[1][1]:
        raise ValueError(f"path norm: {_jaxpr.where(eqn)} divides by a unit's value")
    return [(o, True) for o in _jaxpr.bind(eqn, [_squared(v, s) for v, s in vals])]


def _to_sum(ctx: Any, eqn: Any, vals: list[tuple[Any, bool]]) -> list[tuple[Any, bool]]:
    """A max (or min) over axes or windows: the sum of the squared skeleton's paths."""
    sq = [_squared(v, s) for v, s in vals]
    if _jaxpr.name_of(eqn).startswith("reduce_window"):
        return [(lax.reduce_window_sum_p.bind(*sq, **eqn.params), True)]
    return [(jnp.sum(sq[0], axis=tuple(eqn.params["axes"])), True)]


def _add(ctx: Any, eqn: Any, vals: list[tuple[Any, bool]]) -> list[tuple[Any, bool]]:
    return [(lax.add(*[_squared(v, s) for v, s in vals]), True)]


def _max(ctx: Any, eqn: Any, vals: list[tuple[Any, bool]]) -> list[tuple[Any, bool]]:
    """``max(x, c)`` (a ReLU): ``x``'s paths; ``max(x, y)``: both operands' paths."""
    flags = [s for _, s in vals]
    if flags.count(True) == 1:
        v, s = vals[flags.index(True)]
        return [(v, True)]
    return _add(ctx, eqn, vals)


def _select_n(ctx: Any, eqn: Any, vals: list[tuple[Any, bool]]) -> list[tuple[Any, bool]]:
    cases = [_squared(v, s) for v, s in vals[1:]]
    out = cases[0]
    for c in cases[1:]:
        out = jnp.maximum(out, c)
    return [(jnp.broadcast_to(out, eqn.outvars[0].aval.shape).astype(out.dtype), True)]


def _gather(ctx: Any, eqn: Any, vals: list[tuple[Any, bool]]) -> list[tuple[Any, bool]]:
    """A lookup in a (squared) table by constant indices: every path through every row,
    i.e. the table summed over its looked-up axes, broadcast to the output (the lookup is a
    dense layer from a one-hot input, and the skeleton's input is all ones)."""
    (table, skel), (_, idx_skel) = vals
    if idx_skel:
        raise ValueError(f"path norm: {_jaxpr.where(eqn)} gathers by a unit's value")
    if not skel:
        return [(o, False) for o in _jaxpr.bind(eqn, [v for v, _ in vals])]
    dn, sizes = eqn.params["dimension_numbers"], eqn.params["slice_sizes"]
    if dn.operand_batching_dims:
        raise ValueError(f"path norm: {_jaxpr.where(eqn)} is a batched gather")
    t = jnp.asarray(table)
    looked = tuple(a for a in range(t.ndim) if sizes[a] < t.shape[a])
    if any(sizes[a] != 1 for a in looked):
        raise ValueError(f"path norm: {_jaxpr.where(eqn)} gathers windows, not rows")
    t = jnp.sum(t, axis=looked, keepdims=True)
    t = jnp.squeeze(t, axis=tuple(dn.collapsed_slice_dims))
    shape = tuple(eqn.outvars[0].aval.shape)
    return [(lax.broadcast_in_dim(t, shape, tuple(dn.offset_dims)), True)]


def _comparison(ctx: Any, eqn: Any, vals: list[tuple[Any, bool]]) -> list[tuple[Any, bool]]:
    return [(jnp.zeros(eqn.outvars[0].aval.shape, bool), False)]


def _elementwise(ctx: Any, eqn: Any, vals: list[tuple[Any, bool]]) -> list[tuple[Any, bool]]:
    """An elementwise activation of one skeleton value: a pass-through; anything else has
    no squared version."""
    if len(vals) == 1 or all(not s for _, s in vals[1:]):
        x = _squared(*vals[0])
        if tuple(np.shape(x)) == tuple(eqn.outvars[0].aval.shape):
            return [(x.astype(_float(x)), True)]
    raise ValueError(f"path norm: {_jaxpr.where(eqn)} has no squared version (the path norm is "
                     "defined for networks of affine layers, homogeneous activations and "
                     "max/sum pooling)")


_RULES = {
    **{name: _same for name in _SAME},
    **{name: _to_sum for name in _TO_SUM},
    **{name: _add for name in ("sub", "add_any")},
    **{name: _max for name in ("max", "min")},
    "select_n": _select_n,
    "gather": _gather,
    **{name: _comparison for name in _jaxpr.COMPARISONS},
}
