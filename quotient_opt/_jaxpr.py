"""One jaxpr toolkit: an interpreter with open rule tables, and its small helpers.

Every analysis of a traced computation in the library (symmetry tracing, the
path norm's squared skeleton, the dense-MLP fast path, the shared-state
dataflow analysis, the smooth-ReLU rewrite) is a *rule table* run by
:func:`interpret`: a mapping from primitive name to a rule
``rule(ctx, eqn, ins) -> outs`` that maps the abstract (or concrete) values
of an equation's operands to those of its results, plus a default rule for
every other primitive.

What is shared lives here, once:

* the call-like primitives (``jit``/``pjit``, ``closed_call``, ``core_call``,
  ``custom_jvp_call``, ``custom_vjp_call``, ``checkpoint``/``remat``), whose
  semantics is "run this jaxpr": :func:`call_jaxpr` finds the body and the
  interpreter follows it (an analysis may wrap how, with ``call=``);
* the parts of the loop and branch primitives (:func:`scan_parts`,
  :func:`while_parts`, :func:`cond_parts`) and every sub-jaxpr of an equation
  (:func:`sub_jaxprs`), for the analyses that follow them;
* dead-code removal (:func:`live_eqns`), re-binding an equation
  (:func:`bind`), describing one in messages (:func:`where`);
* :data:`ALIASES`, the spellings JAX has used for one primitive: a JAX
  renaming is one entry here, and every rule table keyed by the old name
  keeps working.

kfac-jax's ``apply_to_higher_order_primitives`` is the precedent for one
treatment of higher-order primitives shared by all analyses.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Iterator, Mapping, Sequence
from typing import Any

from jax.extend import core as jcore

#: ``rule(ctx, eqn, ins) -> outs``: one value per output variable of ``eqn``.
Rule = Callable[[Any, Any, list[Any]], list[Any]]

#: Other names JAX has used (or uses) for a primitive -> the name rule tables are keyed by.
ALIASES: dict[str, str] = {
    "pjit": "jit",
    "remat": "checkpoint",
    "remat2": "checkpoint",
    "copy_p": "copy",
}

#: Call-like primitives (canonical names) -> the parameter holding the jaxpr they run.
#: A custom derivative rule, a rematerialization policy or a jit boundary does not change
#: what the body computes, so forward analyses follow the body.
CALLS: dict[str, str] = {
    "jit": "jaxpr",
    "closed_call": "call_jaxpr",
    "core_call": "call_jaxpr",
    "custom_jvp_call": "call_jaxpr",
    "custom_vjp_call": "call_jaxpr",
    "custom_vjp_call_jaxpr": "fun_jaxpr",
    "checkpoint": "jaxpr",
}

#: Comparison primitives (boolean results).
COMPARISONS = frozenset({"gt", "ge", "lt", "le", "eq", "ne"})


def name_of(eqn: Any) -> str:
    """The canonical name of ``eqn``'s primitive (see :data:`ALIASES`)."""
    name = eqn.primitive.name
    return ALIASES.get(name, name)


def where(eqn: Any) -> str:
    """``eqn`` for a message: its primitive (and call name) and the user's source line."""
    try:
        from jax._src import source_info_util

        src = source_info_util.summarize(eqn.source_info)
    except Exception:  # noqa: BLE001 - best effort
        src = ""
    name = eqn.primitive.name
    if "name" in eqn.params and isinstance(eqn.params["name"], str):
        name = f"{name} '{eqn.params['name']}'"
    return f"{name} at {src}" if src else name


def is_literal(v: Any) -> bool:
    """Whether the jaxpr atom ``v`` is a literal (a constant written in the equation)."""
    return isinstance(v, jcore.Literal)


def open_jaxpr(j: Any) -> tuple[Any, list[Any]]:
    """``(jaxpr, consts)`` of a ``ClosedJaxpr`` or of an open ``Jaxpr`` (no consts)."""
    if isinstance(j, jcore.ClosedJaxpr):
        return j.jaxpr, list(j.consts)
    return j, []


def call_jaxpr(eqn: Any) -> tuple[Any, list[Any]] | None:
    """``(jaxpr, consts)`` of a call-like equation (:data:`CALLS`), else ``None``.

    ``None`` too where the body does not take the equation's operands one to
    one (then it is not a plain call).
    """
    key = CALLS.get(name_of(eqn))
    sub = eqn.params.get(key) if key else None
    if not isinstance(sub, (jcore.ClosedJaxpr, jcore.Jaxpr)):
        return None
    jaxpr, consts = open_jaxpr(sub)
    if len(jaxpr.invars) != len(eqn.invars) or len(jaxpr.outvars) != len(eqn.outvars):
        return None
    return jaxpr, consts


def sub_jaxprs(params: Mapping[str, Any]) -> list[tuple[str, Any]]:
    """``(param name, value)`` for each parameter holding jaxprs (a jaxpr, or a tuple of them
    such as ``cond``'s branches)."""
    out = []
    for key, val in params.items():
        vals = val if isinstance(val, (tuple, list)) else (val,)
        if any(isinstance(v, (jcore.ClosedJaxpr, jcore.Jaxpr)) for v in vals):
            out.append((key, val))
    return out


def iter_sub_jaxprs(params: Mapping[str, Any]) -> Iterator[Any]:
    """Every jaxpr (closed or open) held by the parameters of one equation."""
    for _, val in sub_jaxprs(params):
        for v in val if isinstance(val, (tuple, list)) else (val,):
            if isinstance(v, (jcore.ClosedJaxpr, jcore.Jaxpr)):
                yield v


def scan_parts(eqn: Any, ins: Sequence[Any]) -> tuple[Any, list[Any], list[Any], list[Any]]:
    """A ``scan``: ``(body, consts, carry, xs)``, the last three split from ``ins``."""
    p = eqn.params
    nc, nk = p["num_consts"], p["num_carry"]
    return p["jaxpr"], list(ins[:nc]), list(ins[nc : nc + nk]), list(ins[nc + nk :])


def while_parts(eqn: Any, ins: Sequence[Any]
                ) -> tuple[Any, Any, list[Any], list[Any], list[Any]]:
    """A ``while``: ``(cond_jaxpr, body_jaxpr, cond_consts, body_consts, carry)``."""
    p = eqn.params
    cn, bn = p["cond_nconsts"], p["body_nconsts"]
    return (p["cond_jaxpr"], p["body_jaxpr"], list(ins[:cn]), list(ins[cn : cn + bn]),
            list(ins[cn + bn :]))


def cond_parts(eqn: Any, ins: Sequence[Any]) -> tuple[tuple[Any, ...], Any, list[Any]]:
    """A ``cond``: ``(branches, index, operands)``."""
    return tuple(eqn.params["branches"]), ins[0], list(ins[1:])


def live_eqns(jaxpr: Any) -> list[Any]:
    """Equations whose outputs reach the jaxpr's outputs (effect-free dead code removed)."""
    used = {v for v in jaxpr.outvars if not is_literal(v)}
    live = []
    for eqn in reversed(jaxpr.eqns):
        if any(v in used for v in eqn.outvars) or eqn.effects:
            live.append(eqn)
            used.update(v for v in eqn.invars if not is_literal(v))
    return live[::-1]


def bind(eqn: Any, args: Sequence[Any], params: Mapping[str, Any] | None = None) -> list[Any]:
    """Re-runs ``eqn``'s primitive on ``args`` (with ``params`` in place of its own).

    Returns:
      The list of results (one per output variable).
    """
    params = eqn.params if params is None else params
    with eqn.ctx.manager:
        out = eqn.primitive.bind(*args, **eqn.primitive.get_bind_params(params))
    return list(out) if eqn.primitive.multiple_results else [out]


def inline(interp: Interpreter, eqn: Any, jaxpr: Any, consts: list[Any], ins: list[Any]
           ) -> list[Any]:
    """The default treatment of a call: interpret its body on the operands' values."""
    del eqn
    return interp.run(jaxpr, consts, ins)


@dataclasses.dataclass(frozen=True)
class Interpreter:
    """Runs rule tables over jaxprs.

    Attributes:
      rules: primitive name (canonical, see :data:`ALIASES`) -> rule.
      default: the rule of every other primitive.
      literal: the value of a literal operand (a ``jax.extend.core.Literal``).
      const: the value of a constant of a closed jaxpr (``consts`` entries).
      ctx: the first argument of every rule (the analysis' state); the
        interpreter itself when ``None``.
      call: ``call(interp, eqn, jaxpr, consts, ins) -> outs`` for call-like
        equations (:func:`call_jaxpr`); :func:`inline` by default.
      fold: ``fold(eqn, ins) -> outs | None``, tried first on every equation
        (calls included): a result short-circuits the rules (e.g. evaluate
        equations on constants only).
      prepare: ``prepare(eqn, ins) -> ins``, applied to the operands of every
        equation that is not a call, before its rule.
      prune: skip equations whose results are unused (:func:`live_eqns`).
    """

    rules: Mapping[str, Rule]
    default: Rule
    literal: Callable[[Any], Any]
    const: Callable[[Any], Any] = lambda c: c
    ctx: Any = None
    call: Callable[..., list[Any]] = inline
    fold: Callable[[Any, list[Any]], list[Any] | None] | None = None
    prepare: Callable[[Any, list[Any]], list[Any]] | None = None
    prune: bool = False

    def run(self, jaxpr: Any, consts: Sequence[Any], args: Sequence[Any]) -> list[Any]:
        """The values of ``jaxpr``'s outputs, given its constants' and inputs' values."""
        if len(args) != len(jaxpr.invars):
            raise ValueError(f"interpret: {len(args)} values for {len(jaxpr.invars)} inputs")
        env: dict[Any, Any] = {}
        for v, c in zip(jaxpr.constvars, consts):
            env[v] = self.const(c)
        env.update(zip(jaxpr.invars, args))

        def read(v: Any) -> Any:
            return self.literal(v) if is_literal(v) else env[v]

        for eqn in live_eqns(jaxpr) if self.prune else jaxpr.eqns:
            outs = self.eqn(eqn, [read(v) for v in eqn.invars])
            for v, o in zip(eqn.outvars, outs):
                if not isinstance(v, jcore.DropVar):
                    env[v] = o
        return [read(v) for v in jaxpr.outvars]

    def eqn(self, eqn: Any, ins: list[Any]) -> list[Any]:
        """The values of one equation's outputs."""
        if self.fold is not None:
            outs = self.fold(eqn, ins)
            if outs is not None:
                return outs
        sub = call_jaxpr(eqn)
        if sub is not None:
            return self.call(self, eqn, sub[0], sub[1], ins)
        if self.prepare is not None:
            ins = self.prepare(eqn, ins)
        rule = self.rules.get(name_of(eqn), self.default)
        return rule(self if self.ctx is None else self.ctx, eqn, ins)


def interpret(jaxpr: Any, consts: Sequence[Any], args: Sequence[Any], rules: Mapping[str, Rule],
              default: Rule, **options: Any) -> list[Any]:
    """Runs the rule table ``rules`` over ``jaxpr``.

    Args:
      jaxpr: an open ``jax.extend.core.Jaxpr`` (see :func:`open_jaxpr`).
      consts: the values of its constants (before ``options['const']``).
      args: the values of its inputs.
      rules: primitive name -> ``rule(ctx, eqn, ins) -> outs``.
      default: the rule of every primitive not in ``rules``.
      **options: the other fields of :class:`Interpreter` (``literal`` required).

    Returns:
      The values of ``jaxpr``'s outputs.

    Example:
      Which outputs are constants (a dataflow analysis in four lines)::

        rules = {}
        default = lambda ctx, eqn, ins: [all(ins)] * len(eqn.outvars)
        closed = jax.make_jaxpr(lambda x: (x + 1, jnp.ones(2) * 2))(1.0)
        interpret(closed.jaxpr, closed.consts, [False], rules, default,
                  literal=lambda v: True, const=lambda c: True)  # [False, True]
    """
    return Interpreter(rules, default, **options).run(jaxpr, consts, args)
