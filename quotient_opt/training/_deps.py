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
"""

from __future__ import annotations

from collections.abc import Sequence

from jax.extend import core as jcore


def _closed(j) -> jcore.Jaxpr:
    return j.jaxpr if isinstance(j, jcore.ClosedJaxpr) else j


def _sub_jaxprs(params: dict) -> list:
    return [v for v in params.values() if isinstance(v, (jcore.ClosedJaxpr, jcore.Jaxpr))]


def depends(jaxpr: jcore.ClosedJaxpr | jcore.Jaxpr, tainted: Sequence[bool]) -> list[bool]:
    """Per output of ``jaxpr``: may it depend on an input marked in ``tainted``?

    Args:
      jaxpr: a (closed) jaxpr; its constants count as untainted.
      tainted: one flag per input variable.

    Returns:
      One flag per output variable.
    """
    jaxpr = _closed(jaxpr)
    if len(tainted) != len(jaxpr.invars):
        raise ValueError(f"tainted: {len(tainted)} flags for {len(jaxpr.invars)} inputs")
    env: dict = {v: bool(t) for v, t in zip(jaxpr.invars, tainted)}

    def read(v) -> bool:
        if isinstance(v, jcore.Literal):
            return False
        return env.get(v, False)  # constvars are untainted

    for eqn in jaxpr.eqns:
        ins = [read(v) for v in eqn.invars]
        outs = _eqn_depends(eqn, ins)
        for v, t in zip(eqn.outvars, outs):
            if not isinstance(v, jcore.DropVar):
                env[v] = t
    return [read(v) for v in jaxpr.outvars]


def _eqn_depends(eqn, ins: list[bool]) -> list[bool]:
    n_out = len(eqn.outvars)
    if not any(ins):
        return [False] * n_out
    name = eqn.primitive.name
    p = eqn.params
    if name == "cond":
        index, ops = ins[0], ins[1:]
        if index:
            return [True] * n_out
        outs = [False] * n_out
        for br in p["branches"]:
            outs = [a or b for a, b in zip(outs, depends(br, ops))]
        return outs
    if name == "while":
        cn, bn = p["cond_nconsts"], p["body_nconsts"]
        cconsts, bconsts, carry = ins[:cn], ins[cn : cn + bn], list(ins[cn + bn :])
        while True:
            if depends(p["cond_jaxpr"], cconsts + carry)[0]:
                return [True] * n_out  # the trip count itself may differ
            new = [a or b for a, b in zip(carry, depends(p["body_jaxpr"], bconsts + carry))]
            if new == carry:
                return carry
            carry = new
    if name == "scan":
        nc, nk = p["num_consts"], p["num_carry"]
        consts, carry, xs = ins[:nc], list(ins[nc : nc + nk]), ins[nc + nk :]
        while True:
            out = depends(p["jaxpr"], consts + carry + xs)
            new = [a or b for a, b in zip(carry, out[:nk])]
            if new == carry:
                return carry + out[nk:]
            carry = new
    subs = _sub_jaxprs(p)
    if len(subs) == 1:
        sub = _closed(subs[0])
        if len(sub.invars) == len(ins) and len(sub.outvars) == n_out:
            return depends(sub, ins)  # call-like: inputs and outputs map one to one
    return [True] * n_out
