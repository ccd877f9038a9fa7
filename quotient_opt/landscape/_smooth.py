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
from jax import lax
from jax.extend import core as jex

# Higher-order primitives whose body is inlined (their semantics are "call this
# jaxpr"; a custom derivative rule is dropped, which is the point: the rule of
# relu is the non-smooth one).
_INLINE_CLOSED = {
    "pjit": "jaxpr",
    "jit": "jaxpr",
    "closed_call": "call_jaxpr",
    "core_call": "call_jaxpr",
    "custom_jvp_call": "call_jaxpr",
    "custom_vjp_call": "call_jaxpr",
    "custom_vjp_call_jaxpr": "fun_jaxpr",
    "remat": "jaxpr",
    "checkpoint": "jaxpr",
    "remat2": "jaxpr",
}


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


def _relu_operand(eqn: Any, zeros: set) -> int | None:
    """For ``max(x, 0)``/``max(0, x)`` the index of ``x``, else ``None``."""
    if eqn.primitive is not lax.max_p:
        return None
    if not jnp.issubdtype(eqn.outvars[0].aval.dtype, jnp.floating):
        return None
    u, v = eqn.invars
    zu = _is_zero_literal(u) or (isinstance(u, jex.Var) and u in zeros)
    zv = _is_zero_literal(v) or (isinstance(v, jex.Var) and v in zeros)
    if zv and not zu:
        return 0
    if zu and not zv:
        return 1
    return None


def _subjaxprs(params: dict) -> list[tuple[str, Any]]:
    out = []
    for name, val in params.items():
        vals = val if isinstance(val, (tuple, list)) else (val,)
        if any(isinstance(v, (jex.ClosedJaxpr, jex.Jaxpr)) for v in vals):
            out.append((name, val))
    return out


def _contains_relu(jaxpr: Any) -> bool:
    if isinstance(jaxpr, jex.ClosedJaxpr):
        consts = jaxpr.consts
        jaxpr = jaxpr.jaxpr
        zeros = {v for v, c in zip(jaxpr.constvars, consts) if _is_zero_const(c)}
    else:
        zeros = set()
    for eqn in jaxpr.eqns:
        if eqn.primitive in (lax.broadcast_in_dim_p, lax.convert_element_type_p) and (
            _is_zero_literal(eqn.invars[0]) or eqn.invars[0] in zeros
        ):
            zeros.add(eqn.outvars[0])
        if _relu_operand(eqn, zeros) is not None:
            return True
        for _, val in _subjaxprs(eqn.params):
            vals = val if isinstance(val, (tuple, list)) else (val,)
            if any(_contains_relu(v) for v in vals if isinstance(v, (jex.ClosedJaxpr, jex.Jaxpr))):
                return True
    return False


def _eval(jaxpr: Any, consts: Any, args: Any, beta: Any) -> list[Any]:
    env: dict[Any, Any] = {}
    zeros: set = set()

    def read(v: Any) -> Any:
        return v.val if isinstance(v, jex.Literal) else env[v]

    for v, c in zip(jaxpr.constvars, consts):
        env[v] = c
        if _is_zero_const(c):
            zeros.add(v)
    for v, a in zip(jaxpr.invars, args):
        env[v] = a

    for eqn in jaxpr.eqns:
        name = eqn.primitive.name
        invals = [read(v) for v in eqn.invars]
        idx = _relu_operand(eqn, zeros)
        if idx is not None:
            x = invals[idx]
            aval = eqn.outvars[0].aval
            y = jax.nn.softplus(beta * jnp.asarray(x)) / beta
            outs = [jnp.broadcast_to(y, aval.shape).astype(aval.dtype)]
        elif name in _INLINE_CLOSED and _INLINE_CLOSED[name] in eqn.params:
            sub = eqn.params[_INLINE_CLOSED[name]]
            if isinstance(sub, jex.ClosedJaxpr):
                outs = _eval(sub.jaxpr, sub.consts, invals, beta)
            else:
                outs = _eval(sub, [], invals, beta)
        else:
            subs = _subjaxprs(eqn.params)
            params = eqn.params
            if subs:
                if name not in ("scan", "cond", "while"):
                    if any(
                        _contains_relu(v)
                        for _, val in subs
                        for v in (val if isinstance(val, (tuple, list)) else (val,))
                        if isinstance(v, (jex.ClosedJaxpr, jex.Jaxpr))
                    ):
                        raise NotImplementedError(
                            f"with_smooth_relu: a max(x, 0) sits inside a '{name}' primitive, "
                            "which this rewriter does not enter; build the model with "
                            "quotient_opt.landscape.smooth_relu(beta) instead"
                        )
                else:
                    params = dict(params)
                    for key, val in subs:
                        if isinstance(val, (tuple, list)):
                            params[key] = type(val)(_rewrite_closed(v, beta) for v in val)
                        else:
                            params[key] = _rewrite_closed(val, beta)
            bind_params = eqn.primitive.get_bind_params(params)
            with eqn.ctx.manager:
                ans = eqn.primitive.bind(*invals, **bind_params)
            outs = ans if eqn.primitive.multiple_results else [ans]
        for v, o in zip(eqn.outvars, outs):
            env[v] = o
        if (
            eqn.primitive in (lax.broadcast_in_dim_p, lax.convert_element_type_p)
            and eqn.invars
            and (_is_zero_literal(eqn.invars[0]) or eqn.invars[0] in zeros)
        ):
            zeros.add(eqn.outvars[0])
    return [read(v) for v in jaxpr.outvars]


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
