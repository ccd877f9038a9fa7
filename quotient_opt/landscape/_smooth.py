"""Smooth stand-ins for ReLU, for Hessians of ReLU networks.

The Hessian of a ReLU network is piecewise: :math:`\\mathrm{relu}'' = 0`
except at the kink, where it does not exist. Automatic differentiation picks
one side at every kink a data point sits on (the sawtooth task puts data
points on every knot), and finite differences across a kink give a Hessian
that is neither symmetric nor stable. *The energy landscape of a simple
neural network* (§4.7) therefore replaced ReLU by

.. math::

   \\mathrm{relu}_\\beta(x) = \\frac{\\log(1 + e^{\\beta x})}{\\beta},
   \\qquad 0 < \\mathrm{relu}_\\beta(x) - \\mathrm{relu}(x) \\le \\frac{\\log 2}{\\beta},

to compute the Hessian. Two ways to get it:

* :func:`smooth_relu` is the activation itself, for building a model or
  loss with it;
* :func:`with_smooth_relu` rewrites any function: it traces it to a jaxpr and
  re-evaluates it with every ``max(x, 0)`` (how ``jax.nn.relu``, ``nnx.relu``
  and ``jnp.maximum(x, 0)`` all lower) replaced by :math:`\\mathrm{relu}_\\beta`.
"""

from __future__ import annotations

import functools
from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from jax.extend import core as jex

from quotient_opt import _jaxpr

def smooth_relu(beta: float) -> Callable[[jax.Array], jax.Array]:
    """The activation :math:`x \\mapsto \\mathrm{softplus}(\\beta x) / \\beta`.

    Use it in place of ``jax.nn.relu`` when building a model whose Hessian
    you want (the Hessian of a ReLU network is not defined at the kinks); it tends to ReLU as
    :math:`\\beta \\to \\infty`, within :math:`\\log 2 / \\beta`.

    Args:
      beta: sharpness :math:`\\beta > 0`.

    Raises:
      ValueError: for a non-positive ``beta``.

    References:
      Dugas, Bengio, Bélisle, Nadeau, Garcia. *Incorporating second-order
      functional knowledge for better option pricing*, NeurIPS 2000 (softplus).
    """
    _check_beta(beta)

    def relu_beta(x: jax.Array) -> jax.Array:
        x = jnp.asarray(x)
        return (jax.nn.softplus(beta * x) / beta).astype(x.dtype)

    return relu_beta


def _check_beta(beta: Any) -> None:
    if isinstance(beta, (int, float, np.integer, np.floating)) and not beta > 0:
        raise ValueError(f"smooth_relu: beta must be > 0, got {beta}")


def _is_zero_literal(x: Any) -> bool:
    if isinstance(x, jex.Literal):
        val = x.val
    else:
        return False
    try:
        arr = np.asarray(val)
    except (TypeError, ValueError):  # pragma: no cover - exotic literal
        return False
    return arr.size > 0 and bool(np.all(arr == 0))


def _is_zero_const(val: Any) -> bool:
    if isinstance(val, jax.core.Tracer):
        return False
    try:
        arr = np.asarray(val)
    except (TypeError, ValueError):
        return False
    return arr.dtype.kind in "fiub" and arr.size > 0 and bool(np.all(arr == 0))


# Values of the rewrite are pairs ``(value, zero)``: ``zero`` says the value is known to be
# all zeros (a literal or constant 0, or one broadcast or converted), so ``max(x, zero)`` is
# a ReLU. Calls (``jit``, ``custom_jvp``/``custom_vjp`` functions, ``checkpoint``) are
# inlined by the interpreter: their custom derivative rule is dropped, which is the point
# (the rule of relu is the non-smooth one).


def _literal(v: Any) -> tuple[Any, bool]:
    return v.val, _is_zero_literal(v)


def _const(c: Any) -> tuple[Any, bool]:
    return c, _is_zero_const(c)


def _relu_operand(eqn: Any, zero: list[bool]) -> int | None:
    """For ``max(x, 0)``/``max(0, x)`` the index of ``x``, else ``None``."""
    if not jnp.issubdtype(eqn.outvars[0].aval.dtype, jnp.floating):
        return None
    zu, zv = zero
    if zv and not zu:
        return 0
    if zu and not zv:
        return 1
    return None


def _max(beta: Any, eqn: Any, ins: list[tuple[Any, bool]]) -> list[tuple[Any, bool]]:
    idx = _relu_operand(eqn, [z for _, z in ins])
    if idx is None:
        return _other(beta, eqn, ins)
    aval = eqn.outvars[0].aval
    y = jax.nn.softplus(beta * jnp.asarray(ins[idx][0])) / beta
    return [(jnp.broadcast_to(y, aval.shape).astype(aval.dtype), False)]


def _keeps_zero(beta: Any, eqn: Any, ins: list[tuple[Any, bool]]) -> list[tuple[Any, bool]]:
    """``broadcast_in_dim``, ``convert_element_type``: a zero stays a zero."""
    (out,) = _other(beta, eqn, ins)
    return [(out[0], ins[0][1])]


def _other(beta: Any, eqn: Any, ins: list[tuple[Any, bool]]) -> list[tuple[Any, bool]]:
    """Any other primitive runs as written; the bodies of loops and branches are rewritten."""
    params = dict(eqn.params)
    for key, val in _jaxpr.sub_jaxprs(eqn.params):
        if _jaxpr.name_of(eqn) not in ("scan", "cond", "while"):
            if any(_contains_relu(v) for v in _jaxpr.iter_sub_jaxprs({key: val})):
                raise NotImplementedError(
                    f"with_smooth_relu: a max(x, 0) sits inside a '{eqn.primitive.name}' "
                    "primitive, which this rewriter does not enter; build the model with "
                    "quotient_opt.landscape.smooth_relu(beta) instead"
                )
        elif isinstance(val, (tuple, list)):
            params[key] = type(val)(_rewrite_closed(v, beta) for v in val)
        else:
            params[key] = _rewrite_closed(val, beta)
    return [(o, False) for o in _jaxpr.bind(eqn, [v for v, _ in ins], params)]


_RULES = {"max": _max, "broadcast_in_dim": _keeps_zero, "convert_element_type": _keeps_zero}


def _eval(jaxpr: Any, consts: Any, args: Any, beta: Any) -> list[Any]:
    outs = _jaxpr.interpret(jaxpr, consts, [(a, False) for a in args], _RULES, _other,
                            ctx=beta, literal=_literal, const=_const)
    return [v for v, _ in outs]


class _Found(Exception):
    pass


def _find_max(ctx: Any, eqn: Any, zero: list[bool]) -> list[bool]:
    if _relu_operand(eqn, zero) is not None:
        raise _Found
    return [False]


def _find_in_subs(ctx: Any, eqn: Any, zero: list[bool]) -> list[bool]:
    if any(_contains_relu(v) for v in _jaxpr.iter_sub_jaxprs(eqn.params)):
        raise _Found
    return [False] * len(eqn.outvars)


_FIND_RULES = {"max": _find_max, "broadcast_in_dim": lambda ctx, eqn, zero: [zero[0]],
               "convert_element_type": lambda ctx, eqn, zero: [zero[0]]}


def _contains_relu(closed: Any) -> bool:
    """Whether ``closed`` (or a jaxpr inside it) has a ``max(x, 0)``: the rewrite's rules
    run on the zero flags alone."""
    jaxpr, consts = _jaxpr.open_jaxpr(closed)
    try:
        _jaxpr.interpret(jaxpr, consts, [False] * len(jaxpr.invars), _FIND_RULES, _find_in_subs,
                         literal=_is_zero_literal, const=_is_zero_const)
    except _Found:
        return True
    return False


def _rewrite_closed(closed: Any, beta: Any) -> Any:
    """A ``ClosedJaxpr`` with the same signature and every ``max(x, 0)`` smoothed."""
    if not isinstance(closed, jex.ClosedJaxpr):
        raise NotImplementedError("with_smooth_relu: open sub-jaxpr in a control-flow primitive")
    if not _contains_relu(closed):
        return closed
    avals = [v.aval for v in closed.jaxpr.invars]
    specs = [jax.ShapeDtypeStruct(a.shape, a.dtype) for a in avals]
    fn = lambda *args: _eval(closed.jaxpr, closed.consts, args, beta)
    new = jax.make_jaxpr(fn)(*specs)
    return new


def with_smooth_relu(fn: Callable[..., Any], beta: float) -> Callable[..., Any]:
    """``fn`` with every ReLU replaced by :math:`\\mathrm{softplus}(\\beta x) / \\beta`.

    Traces ``fn`` to a jaxpr at each call and evaluates it with every
    ``max(x, 0)`` or ``max(0, x)`` (the lowering of ``jax.nn.relu``,
    ``nnx.relu``, ``jnp.maximum(x, 0)``) replaced by the softplus. Calls
    (``jit``), ``custom_jvp``/``custom_vjp`` functions and ``checkpoint`` are
    inlined, so their custom derivative rules are dropped: the result is
    differentiated through the softplus, as intended. ``lax.scan``,
    ``lax.cond`` and ``lax.while_loop`` bodies are rewritten in place.

    Not smoothed: max-pooling over two variables (``max(x, y)``), ``where``-
    based activations (``leaky_relu``, ``relu6``'s clamp), ``jnp.abs``. Every
    ``max(x, 0)`` *is* smoothed, including one in the loss (a hinge).

    Args:
      fn: any JAX-traceable function of arrays/pytrees.
      beta: sharpness :math:`\\beta > 0`.

    Returns:
      A function with ``fn``'s signature, jittable and differentiable.

    Raises:
      NotImplementedError: (at call time) if a ``max(x, 0)`` sits inside a
        higher-order primitive the rewriter does not handle; use
        :func:`smooth_relu` in the model instead.
    """
    _check_beta(beta)

    @functools.wraps(fn)
    def smoothed(*args: Any, **kwargs: Any) -> Any:
        flat, treedef = jax.tree.flatten((args, kwargs))

        def flat_fn(*leaves: Any) -> Any:
            a, k = jax.tree.unflatten(treedef, leaves)
            return fn(*a, **k)

        specs = [jax.ShapeDtypeStruct(np.shape(x), jnp.result_type(x)) for x in flat]
        closed, out_shape = jax.make_jaxpr(flat_fn, return_shape=True)(*specs)
        outs = _eval(closed.jaxpr, closed.consts, flat, beta)
        return jax.tree.unflatten(jax.tree.structure(out_shape), outs)

    return smoothed
