"""Argument validators shared by the transformations, the training loops and contrib.

Each raises ``ValueError`` with a message that starts with the parameter's
name (``"every must be >= 1, got 0"``), at construction time, so a bad
configuration fails before anything is traced. Numeric bounds are checked on
concrete Python and NumPy scalars only: a traced or array value (under
``optax.inject_hyperparams``, ``jax.jit``) passes unchecked.
"""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from quotient_opt.symmetry._spec import Symmetry

#: the types whose values the numeric bounds are checked on
SCALARS = (int, float, np.integer, np.floating)


def symmetry(sym: Any) -> None:
    """Raises ValueError unless ``sym`` is a :class:`~quotient_opt.Symmetry`."""
    if not isinstance(sym, Symmetry):
        raise ValueError(f"sym: expected a quotient_opt.Symmetry, got {type(sym).__name__}")


def params_given(params: Any, who: str) -> None:
    """Raises ValueError if ``who``'s ``update`` was called without ``params``."""
    if params is None:
        raise ValueError(f"{who}: params are required (pass params= to update)")


def number(name: str, value: Any, *, minimum: float = 0, strict: bool = False,
           unit: str = "") -> None:
    """Raises ValueError for a concrete ``value`` below ``minimum`` (or NaN).

    Args:
      name: the parameter's name, for the message.
      value: the value; traced and array values pass.
      minimum: the bound.
      strict: require ``value > minimum`` instead of ``>=``.
      unit: appended to the bound in the message (``" seconds"``).
    """
    if isinstance(value, SCALARS) and not (value > minimum if strict else value >= minimum):
        raise ValueError(f"{name} must be {'>' if strict else '>='} {minimum}{unit}, got {value}")


def integer(name: str, value: Any, *, minimum: int = 1, none_ok: bool = False) -> int | None:
    """``value`` as a Python int, or ValueError unless it is an int ``>= minimum``.

    Args:
      name: the parameter's name, for the message.
      value: a Python or NumPy integer (not a bool), or ``None`` where ``none_ok``.
      minimum: the smallest value allowed.
      none_ok: let ``None`` through (returned as is).
    """
    if value is None and none_ok:
        return None
    if isinstance(value, bool) or not isinstance(value, (int, np.integer)):
        kind = "None or an int" if none_ok else "an int"
        raise ValueError(f"{name} must be {kind}, got {type(value).__name__}")
    if value < minimum:
        raise ValueError(f"{name} must be >= {minimum}, got {value}")
    return int(value)


def one_of(name: str, value: Any, options: Iterable[Any]) -> None:
    """Raises ValueError unless ``value`` is one of ``options`` (compared with ``in``)."""
    options = tuple(options)
    if value not in options:
        listed = [repr(o) for o in options]
        text = listed[0] if len(listed) == 1 else ", ".join(listed[:-1]) + " or " + listed[-1]
        raise ValueError(f"{name} must be {text}, got {value!r}")


def function(name: str, value: Any, signature: str) -> None:
    """Raises ValueError unless ``value`` is callable; ``signature`` (``"params -> scalar"``)
    says what it should compute."""
    if not callable(value):
        raise ValueError(f"{name} must be callable ({signature}), got {type(value).__name__}")


def is_prng_key(key: Any) -> bool:
    """Whether ``key`` is one PRNG key: a typed scalar key, or raw ``uint32[2]`` key data."""
    if isinstance(key, jax.Array) and jnp.issubdtype(key.dtype, jax.dtypes.prng_key):
        return key.shape == ()
    return (
        isinstance(key, (jax.Array, np.ndarray)) and key.dtype == jnp.uint32 and key.shape == (2,)
    )


def prng_key(key: Any, name: str = "key") -> jax.Array:
    """``key`` as a typed PRNG key; ValueError unless it is one PRNG key (:func:`is_prng_key`)."""
    if not is_prng_key(key):
        raise ValueError(
            f"{name} must be a PRNG key (jax.random.key(seed) or jax.random.PRNGKey(seed)), "
            f"got {getattr(key, 'dtype', type(key).__name__)} {getattr(key, 'shape', '')}"
        )
    if not jnp.issubdtype(key.dtype, jax.dtypes.prng_key):
        key = jax.random.wrap_key_data(key)
    return key
