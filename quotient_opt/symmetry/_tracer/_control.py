"""Tracer rules of control flow and calls.

Calls (``jit``, ``custom_jvp``/``custom_vjp`` functions, ``checkpoint``) are
followed into their jaxpr (:func:`follow_call`, the interpreter's call hook); a
named call (``relu``) names the activation of the groups entering it. Loops and
branches (``scan``, ``while``, ``cond``) are not followed: the units entering them
lose their symmetries.
"""

from __future__ import annotations

from typing import Any

from quotient_opt import _jaxpr
from quotient_opt.symmetry._tracer._analysis import Analysis
from quotient_opt.symmetry._tracer._registry import HOOKS, builtin
from quotient_opt.symmetry._tracer._values import Data, Info, out_shapes


def follow_call(interp: _jaxpr.Interpreter, eqn: Any, jaxpr: Any, consts: list[Any],
                ins: list[Info]) -> list[Info]:
    """A call is followed into its body; a named call (a custom_jvp activation such as
    ``relu``) names the activation of the groups entering it."""
    an = interp.ctx
    call_name = eqn.params.get("name")
    if isinstance(call_name, str):
        for info in ins:
            if isinstance(info, Data):
                for lab in info.labs:
                    for g in an.gids(lab):
                        an.groups[g].acts.add(call_name)
    return interp.run(jaxpr, consts, ins)


HOOKS["call"] = follow_call


@builtin("scan", "while", "cond")
def control_flow(an: Analysis, eqn: Any, ins: list[Info]) -> list[Info]:
    """Loops and branches are not followed."""
    return an.unknown(ins, out_shapes(eqn), f"{_jaxpr.where(eqn)}: control flow is not followed")
