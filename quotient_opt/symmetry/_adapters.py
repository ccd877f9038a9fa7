"""Framework adapters: a model as a pure ``apply_fn(params, x)`` and its parameters.

:func:`~quotient_opt.infer_symmetry` (and everything built on it) sees a model
only through an *adapter*: a function ``adapter(model) -> (apply_fn, params,
example_input)`` with ``apply_fn(params, x)`` pure (traceable by
``jax.make_jaxpr``), ``params`` the pytree the symmetry acts on, and
``example_input`` an input to trace at when the caller gives none (or
``None``). Adapters live in a registry searched newest first, each behind a
predicate; :func:`register_adapter` adds one, so a user adapter registered
later takes precedence over the built-in ones.

The built-in adapters never import their framework: a predicate looks the
framework up in ``sys.modules``, where it already is whenever the model is one
of its objects. flax and equinox are therefore optional dependencies
(``pip install quotient_opt[flax]``, ``[equinox]``).

* **flax.nnx**: ``graphdef, params, rest = nnx.split(model, nnx.Param, ...)``;
  ``apply_fn(p, x)`` merges ``p`` and a *copy* of the non-Param state ``rest``
  (``BatchStat``, ``RngState``, caches, any other ``Variable`` type) with
  ``p`` and calls the model, so a model in train mode traces and jits: its
  running statistics and RNG counters are read as they were when the adapter
  ran (Dropout draws one fixed mask, the same at every call), their updates are
  discarded, and the model itself is never mutated. Running statistics are not
  parameters and are not moved by the group action.
  :func:`quotient_opt.models.functional` with ``state=True`` returns the
  updated state instead, like ``nnx.split``/``nnx.merge``.
* **equinox**: ``params, static = eqx.partition(model, eqx.is_array)``;
  ``apply_fn(p, x) = eqx.combine(p, static)(x)`` (one sample, not a batch).
"""

from __future__ import annotations

import sys
from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp

PyTree = Any
#: ``adapter(model) -> (apply_fn, params, example_input or None)``.
Adapter = Callable[[Any], tuple]
Predicate = Callable[[Any], bool]

_ADAPTERS: list[tuple[Predicate, Adapter]] = []


def register_adapter(predicate: Predicate, adapter: Adapter) -> None:
    """Teaches :func:`~quotient_opt.infer_symmetry` a new kind of model.

    For a model on which ``predicate(model)`` is true, ``adapter(model)``
    returns ``(apply_fn, params, example_input)`` (or ``(apply_fn, params)``):
    ``apply_fn(params, x)`` a pure function computing the model's output,
    ``params`` the pytree of parameters the symmetry acts on (the one the
    user's optimizer updates), ``example_input`` an input to trace at when
    none is given (``None`` if there is no sensible default). Adapters
    registered later are tried first, so a user adapter takes precedence over
    the built-in flax.nnx and equinox ones. A predicate should not import a
    framework the user has not imported (look it up in ``sys.modules``).

    Example::

        qo.symmetry.register_adapter(
            lambda m: isinstance(m, MyNet),
            lambda m: (MyNet.forward, m.weights, None))
        sym = qo.infer_symmetry(MyNet(...), x)

    Args:
      predicate: ``predicate(model) -> bool``, whether ``adapter`` handles ``model``.
      adapter: ``adapter(model) -> (apply_fn, params[, example_input])``.

    Raises:
      ValueError: if ``predicate`` or ``adapter`` is not callable.
    """
    for name, fn in (("predicate", predicate), ("adapter", adapter)):
        if not callable(fn):
            raise ValueError(f"{name}: must be callable, got {type(fn).__name__}")
    _ADAPTERS.append((predicate, adapter))


def adapt(model: Any) -> tuple[Callable, PyTree, Any] | None:
    """``(apply_fn, params, example_input)`` from the newest adapter whose predicate
    accepts ``model``, or ``None`` if none does."""
    for predicate, adapter in reversed(_ADAPTERS):
        if predicate(model):
            out = adapter(model)
            if not isinstance(out, tuple) or len(out) not in (2, 3) or not callable(out[0]):
                raise ValueError(
                    f"adapter {getattr(adapter, '__name__', adapter)!r} for "
                    f"{type(model).__name__}: must return (apply_fn, params[, example_input]), "
                    f"got {type(out).__name__}")
            return out if len(out) == 3 else (*out, None)
    return None


# --------------------------------------------------------------------------- flax.nnx


def _nnx() -> Any:
    return sys.modules.get("flax.nnx")


def nnx_split(model: Any) -> tuple[Any, PyTree, PyTree]:
    """``nnx.split(model, nnx.Param, ...)``: ``(graphdef, params, rest)``."""
    nnx = _nnx()
    return nnx.split(model, nnx.Param, ...)


def nnx_call(graphdef: Any, params: PyTree, rest: PyTree, x: Any) -> tuple[Any, PyTree]:
    """Calls the model ``nnx.merge(graphdef, params, rest)`` on ``x`` without touching
    ``params`` or ``rest`` (the merge copies them); returns ``(output, updated rest)``."""
    nnx = _nnx()
    # fresh Variables (a pytree copy): the call may update them, here and under any trace
    params, rest = jax.tree.map(lambda v: v, (params, rest))
    model = nnx.merge(graphdef, params, rest)
    y = model(x)
    return y, nnx.split(model, nnx.Param, ...)[2]


def _is_nnx(model: Any) -> bool:
    nnx = _nnx()
    return nnx is not None and isinstance(model, nnx.Module)


def _nnx_adapter(model: Any) -> tuple[Callable, PyTree, Any]:
    nnx = _nnx()
    graphdef, params, rest = nnx_split(model)

    def apply_fn(p: PyTree, x: Any) -> Any:
        return nnx_call(graphdef, p, rest, x)[0]

    example = None
    first = model.layers[0] if isinstance(model, nnx.Sequential) and len(model.layers) else None
    if isinstance(first, nnx.Linear):
        example = jnp.zeros((1, first.in_features), first.param_dtype)
    return apply_fn, params, example


# --------------------------------------------------------------------------- equinox


def _is_eqx(model: Any) -> bool:
    eqx = sys.modules.get("equinox")
    return (eqx is not None and isinstance(model, eqx.Module)
            and not callable(getattr(model, "apply", None)))


def _eqx_adapter(model: Any) -> tuple[Callable, PyTree, Any]:
    eqx = sys.modules["equinox"]
    params, static = eqx.partition(
        model, lambda v: eqx.is_array(v) or isinstance(v, jax.ShapeDtypeStruct))

    def apply_fn(p: PyTree, x: Any) -> Any:
        return eqx.combine(p, static)(x)

    example = None
    if isinstance(model, eqx.nn.MLP):
        dt = model.layers[0].weight.dtype
        example = jnp.zeros(() if model.in_size == "scalar" else (model.in_size,), dt)
    elif isinstance(model, eqx.nn.Linear):
        dt = model.weight.dtype
        example = jnp.zeros(() if model.in_features == "scalar" else (model.in_features,), dt)
    return apply_fn, params, example


register_adapter(_is_eqx, _eqx_adapter)
register_adapter(_is_nnx, _nnx_adapter)
