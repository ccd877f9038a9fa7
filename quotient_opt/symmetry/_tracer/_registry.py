"""Open tracer rules: teach :func:`~quotient_opt.infer_symmetry` a primitive.

The tracer interprets the model's jaxpr with one rule per primitive: a
function ``rule(ctx, eqn, ins) -> outs`` from the abstract values of an
equation's operands (which axes hold which units, and how they scale) to
those of its results. Built-in rules cover contractions, elementwise
operations, reductions, shape operations and control flow; calls (``jit``,
``custom_jvp``/``custom_vjp`` functions, ``checkpoint``) are followed into
their body. :func:`register_rule` adds a rule for a primitive of your own (or
replaces a built-in one), and takes precedence; :func:`unregister_rule`
removes it. A primitive without a rule keeps the safe default: the units
flowing through it lose their symmetries, and ``print(sym)`` says so.
"""

from __future__ import annotations

import collections
import functools
from collections.abc import Callable, Mapping
from typing import Any

from quotient_opt import _jaxpr
from quotient_opt.symmetry._tracer._values import Data, Opaque, Param

#: ``rule(ctx, eqn, ins) -> outs`` (see :func:`register_rule`).
Rule = Callable[[Any, Any, list[Any]], list[Any]]

#: primitive name -> built-in rule
BUILTIN: dict[str, Rule] = {}
#: primitive name -> rule registered by the user (searched first)
USER: dict[str, Rule] = {}
#: shorthand -> rule (filled by the modules that implement them)
SHORTHANDS: dict[str, Rule] = {}
#: the interpreter's hooks (``"call"``: how the tracer enters a call; set by ``_control``)
HOOKS: dict[str, Callable[..., list[Any]]] = {}


def builtin(*names: str) -> Callable[[Rule], Rule]:
    """Decorator: the rule of the primitives ``names``."""

    def deco(rule: Rule) -> Rule:
        for name in names:
            BUILTIN[name] = rule
        return rule

    return deco


def rules() -> Mapping[str, Rule]:
    """The rule table the tracer runs: the user's rules, then the built-in ones (a live view)."""
    return collections.ChainMap(USER, BUILTIN)


def resolve(rule: str | Rule) -> Rule:
    """The rule function of a shorthand, of a primitive name with a built-in rule, or
    ``rule`` itself if it is a function.

    Raises:
      ValueError: for anything else.
    """
    if isinstance(rule, str):
        if rule in SHORTHANDS:
            return SHORTHANDS[rule]
        if _jaxpr.ALIASES.get(rule, rule) in BUILTIN:
            return BUILTIN[_jaxpr.ALIASES.get(rule, rule)]
        raise ValueError(
            f"register_rule: unknown rule {rule!r}; expected one of "
            f"{', '.join(map(repr, SHORTHANDS))}, the name of a primitive with a built-in "
            "rule (such as 'max' or 'reduce_sum'), or a function rule(ctx, eqn, ins) -> outs")
    if callable(rule):
        return rule
    raise ValueError(
        f"register_rule: rule must be a string ({', '.join(map(repr, SHORTHANDS))}, or the "
        "name of a primitive with a built-in rule) or a function rule(ctx, eqn, ins) -> outs, "
        f"got {type(rule).__name__} {rule!r}")


def _primitive_name(primitive: Any) -> str:
    name = primitive if isinstance(primitive, str) else getattr(primitive, "name", None)
    if not isinstance(name, str) or not name:
        raise ValueError("register_rule: primitive must be a jax.extend.core.Primitive or "
                         f"its name, got {type(primitive).__name__} {primitive!r}")
    name = _jaxpr.ALIASES.get(name, name)
    if name in _jaxpr.CALLS:
        raise ValueError(f"register_rule: {name!r} is a call primitive; the tracer follows "
                         "it into its jaxpr, so a rule would never run")
    return name


def _checked(name: str, rule: Rule) -> Rule:
    """``rule`` with its result checked: one abstract value per output."""

    @functools.wraps(rule)
    def checked(ctx: Any, eqn: Any, ins: list[Any]) -> list[Any]:
        outs = rule(ctx, eqn, ins)
        if not isinstance(outs, (list, tuple)) or len(outs) != len(eqn.outvars) or not all(
                isinstance(o, (Data, Param, Opaque)) for o in outs):
            raise TypeError(f"the rule registered for primitive {name!r} must return a list of "
                            f"{len(eqn.outvars)} abstract value(s) (Data, Param or Opaque), "
                            f"got {outs!r}")
        return list(outs)

    return checked


def register_rule(primitive: Any, rule: str | Rule) -> None:
    """Teaches :func:`~quotient_opt.infer_symmetry` how unit symmetries pass a primitive.

    Without a rule, a primitive the tracer does not know removes every
    symmetry of the units flowing through it, and ``print(sym)`` says so
    ("unsupported operation my_op at ..."). A rule registered here takes
    precedence over the built-in one of the same name, for every later
    inference; :func:`unregister_rule` removes it.

    ``rule`` is one of:

    * ``'elementwise'``: the primitive is elementwise and permutation-equivariant
      (``f(x)[i]`` depends on ``x[i]`` only, the same way for every ``i``), like
      ``tanh``: units keep their permutations, not their rescaling;
    * ``'homogeneous'``: elementwise and positively homogeneous of degree 1
      (``f(c x) = c f(x)`` for ``c > 0``), like ReLU or leaky ReLU: units keep
      their permutations and their rescaling;
    * ``'unknown'``: the safe default, stated (symmetries through it are dropped);
    * the name of a primitive with a built-in rule (``'max'``, ``'reduce_sum'``,
      ...): the primitive behaves like that one (same operands and parameters);
    * a function ``rule(ctx, eqn, ins) -> outs``: ``ctx`` is the running
      analysis, ``eqn`` the ``jax.extend.core.JaxprEqn``, ``ins`` the abstract
      value of each operand (a ``Data`` that depends on the input and carries
      the unit labels of its axes, a ``Param`` view of a parameter leaf, or an
      ``Opaque`` value derived from parameters); it returns one abstract value
      per output of ``eqn``. ``ctx.rule(name)`` gives the function of a
      shorthand or a built-in rule to delegate to, and
      ``ctx.unknown(ins, shapes, reason)`` drops the symmetries with a reason.

    Whatever the rule, :func:`~quotient_opt.infer_symmetry` still checks the
    result numerically, so a wrong rule costs symmetries, not correctness of
    what is kept.

    Args:
      primitive: a ``jax.extend.core.Primitive``, or its name.
      rule: a shorthand, a primitive name or a rule function (see above).

    Raises:
      ValueError: for a primitive that is neither, for a call primitive (the
        tracer follows calls into their jaxpr), or for an unknown rule.

    Example:
      A custom leaky ReLU primitive::

        import jax.numpy as jnp
        from jax.extend.core import Primitive
        import quotient_opt as qo

        leaky_p = Primitive("my_leaky_relu")
        leaky_p.def_impl(lambda x: jnp.where(x > 0, x, 0.1 * x))
        leaky_p.def_abstract_eval(lambda x: x)
        qo.symmetry.register_rule(leaky_p, "homogeneous")

      A full rule for ``my_op(x, n)``, homogeneous in ``x``, ``n`` an integer
      setting::

        def my_op_rule(ctx, eqn, ins):
            return ctx.rule("homogeneous")(ctx, eqn, ins[:1])

        qo.symmetry.register_rule("my_op", my_op_rule)
    """
    name = _primitive_name(primitive)
    USER[name] = _checked(name, resolve(rule))


def unregister_rule(primitive: Any) -> None:
    """Removes the rule :func:`register_rule` gave ``primitive`` (the built-in rule, if any,
    applies again); a primitive without a registered rule is left as is.

    Args:
      primitive: a ``jax.extend.core.Primitive``, or its name.
    """
    USER.pop(_primitive_name(primitive), None)
