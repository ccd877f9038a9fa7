"""Which outputs of a jaxpr depend on which inputs (a conservative dataflow analysis).

Used by :func:`~quotient_opt.train_population` to find the optimizer-state
leaves that are identical for every network of a population (step counters,
schedules, shared PRNG keys): they stay *unbatched* under ``vmap``, so a
``lax.cond`` on them stays a real branch instead of a ``select`` that runs
both sides.

The analysis is an over-approximation: an output is reported as depending on
the inputs whenever it might. Call-like primitives (``jit``, ``custom_jvp_call``,
``custom_vjp_call``, ``remat``, ...) are followed into their jaxpr, ``cond`` into
its branches, ``while`` and ``scan`` to a fixed point over their carries; any
other primitive is assumed to mix all of its inputs into all of its outputs.
A rule table of the library's jaxpr interpreter (``quotient_opt._jaxpr``).
"""

from __future__ import annotations

from collections.abc import Sequence

from quotient_opt import _jaxpr


def depends(jaxpr, tainted: Sequence[bool]) -> list[bool]:
    """Per output of ``jaxpr``: may it depend on an input marked in ``tainted``?

    Args:
      jaxpr: a (closed) jaxpr; its constants count as untainted.
      tainted: one flag per input variable.

    Returns:
      One flag per output variable.
    """
    inner, _ = _jaxpr.open_jaxpr(jaxpr)
    if len(tainted) != len(inner.invars):
        raise ValueError(f"tainted: {len(tainted)} flags for {len(inner.invars)} inputs")
    untainted = lambda _: False  # noqa: E731
    return _jaxpr.interpret(inner, [None] * len(inner.constvars), [bool(t) for t in tainted],
                            RULES, _mixes,
                            literal=untainted, const=untainted, fold=_untainted)


def _untainted(eqn, ins: list[bool]) -> list[bool] | None:
    return [False] * len(eqn.outvars) if not any(ins) else None


def _mixes(ctx, eqn, ins: list[bool]) -> list[bool]:
    """Any other primitive: every output may depend on every input."""
    return [True] * len(eqn.outvars)


def _cond(ctx, eqn, ins: list[bool]) -> list[bool]:
    branches, index, ops = _jaxpr.cond_parts(eqn, ins)
    outs = [bool(index)] * len(eqn.outvars)
    for br in branches:
        outs = [a or b for a, b in zip(outs, depends(br, ops))]
    return outs


def _while(ctx, eqn, ins: list[bool]) -> list[bool]:
    cond, body, cconsts, bconsts, carry = _jaxpr.while_parts(eqn, ins)
    while True:
        if depends(cond, cconsts + carry)[0]:
            return [True] * len(eqn.outvars)  # the trip count itself may differ
        new = [a or b for a, b in zip(carry, depends(body, bconsts + carry))]
        if new == carry:
            return carry
        carry = new


def _scan(ctx, eqn, ins: list[bool]) -> list[bool]:
    body, consts, carry, xs = _jaxpr.scan_parts(eqn, ins)
    nk = len(carry)
    while True:
        out = depends(body, consts + carry + xs)
        new = [a or b for a, b in zip(carry, out[:nk])]
        if new == carry:
            return carry + out[nk:]
        carry = new


RULES = {"cond": _cond, "while": _while, "scan": _scan}
