"""``quotient_opt._validate``: the one set of argument validators; each message names the
parameter, and traced values pass the numeric bounds."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from quotient_opt import _validate as validate


@pytest.mark.parametrize(
    "call,match",
    [
        (lambda: validate.integer("every", 0), "every must be >= 1, got 0"),
        (lambda: validate.integer("every", 2.0), "every must be an int, got float"),
        (lambda: validate.integer("every", True), "every must be an int, got bool"),
        (lambda: validate.integer("steps", -1, minimum=0), "steps must be >= 0, got -1"),
        (lambda: validate.integer("polish_every", "x", none_ok=True),
         "polish_every must be None or an int"),
        (lambda: validate.number("eps", 0.0, strict=True), "eps must be > 0, got 0.0"),
        (lambda: validate.number("tol", float("nan")), "tol must be >= 0, got nan"),
        (lambda: validate.number("checkpoint_every", -1, unit=" seconds"),
         "checkpoint_every must be >= 0 seconds"),
        (lambda: validate.one_of("jacobian", "both", ("auto", "fwd", "rev")),
         "jacobian must be 'auto', 'fwd' or 'rev', got 'both'"),
        (lambda: validate.function("loss_fn", 3.0, "params -> scalar"),
         r"loss_fn must be callable \(params -> scalar\), got float"),
        (lambda: validate.prng_key(jnp.zeros(3)), "key must be a PRNG key"),
        (lambda: validate.symmetry(None), "sym: expected a quotient_opt.Symmetry"),
        (lambda: validate.params_given(None, "teleport"), "teleport: params are required"),
    ],
)
def test_messages_name_the_parameter(call, match):
    with pytest.raises(ValueError, match=match):
        call()


def test_good_values_pass_and_are_normalized():
    assert validate.integer("n", np.int64(3)) == 3 and type(validate.integer("n", 3)) is int
    assert validate.integer("p", None, none_ok=True) is None
    validate.number("every", 1, minimum=1)
    validate.number("eps", jnp.asarray(-1.0))  # arrays and tracers are not checked
    jax.jit(lambda e: validate.number("eps", e) or e)(-1.0)
    validate.one_of("fast_path", None, (None, True, False))
    typed = validate.prng_key(jax.random.PRNGKey(0))
    assert jnp.issubdtype(typed.dtype, jax.dtypes.prng_key)
    assert validate.prng_key(typed) is typed
