"""Tests of the jaxpr toolkit (``quotient_opt/_jaxpr.py``) and of the tracer's open rules.

The interpreter: calls of every kind are followed by one shared handling, dead
code is pruned, the loop and branch helpers split operands as the primitives
do. The open rules: a custom primitive (``jax.extend.core.Primitive``) inside a
model drops the symmetry through it until ``register_rule`` teaches the
tracer, after which the rescaling is found and passes ``Symmetry.check``;
bad registrations are refused with a message naming what is expected.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.extend.core import Primitive
from jax.interpreters import mlir

import quotient_opt as qo
from quotient_opt import _jaxpr

# --------------------------------------------------------------------------- the interpreter


def _constness(fn, *args):
    """Per output of ``fn``: is it a constant? (the docstring example of ``interpret``)."""
    closed = jax.make_jaxpr(fn)(*args)
    default = lambda ctx, eqn, ins: [all(ins)] * len(eqn.outvars)  # noqa: E731
    return _jaxpr.interpret(closed.jaxpr, closed.consts, [False] * len(args), {}, default,
                            literal=lambda v: True, const=lambda c: True)


def test_interpret_docstring_example():
    assert _constness(lambda x: (x + 1, jnp.ones(2) * 2), 1.0) == [False, True]


def _with_jvp(f):
    g = jax.custom_jvp(f)
    g.defjvp(lambda p, t: (g(*p), 3.0 * t[0]))
    return g


def _with_vjp(f):
    g = jax.custom_vjp(f)
    g.defvjp(lambda x: (g(x), None), lambda _, ct: (3.0 * ct,))
    return g


@pytest.mark.parametrize("wrap", [jax.jit, jax.checkpoint, _with_jvp, _with_vjp,
                                  lambda f: jax.jit(jax.checkpoint(f))],
                         ids=["jit", "checkpoint", "custom_jvp", "custom_vjp", "nested"])
def test_calls_are_followed_by_the_shared_handling(wrap):
    """No rule for any call primitive: the bodies are interpreted (the default rule sees the
    ``mul`` inside, never the call), and the values come out right."""
    seen = []

    def record(ctx, eqn, ins):
        seen.append(_jaxpr.name_of(eqn))
        return _jaxpr.bind(eqn, ins)

    f = wrap(lambda x: x * 3.0)
    closed = jax.make_jaxpr(f)(2.0)
    assert not any(e.primitive.name == "mul" for e in closed.jaxpr.eqns)  # hidden in a call
    (out,) = _jaxpr.interpret(closed.jaxpr, closed.consts, [2.0], {}, record,
                              literal=lambda v: v.val)
    assert "mul" in seen and not set(seen) & set(_jaxpr.CALLS)
    np.testing.assert_allclose(out, f(2.0))


def test_aliases_and_call_table_agree():
    for old, new in _jaxpr.ALIASES.items():
        assert old not in _jaxpr.CALLS  # tables are keyed by canonical names only
    assert _jaxpr.name_of(jax.make_jaxpr(jax.jit(jnp.sin))(1.0).eqns[0]) == "jit"
    assert _jaxpr.name_of(jax.make_jaxpr(jax.checkpoint(jnp.sin))(1.0).eqns[0]) == "checkpoint"


def test_live_eqns_and_prune():
    def f(x):
        unused = jnp.exp(x)  # noqa: F841 - dead code
        return x + 1.0

    closed = jax.make_jaxpr(f)(1.0)
    assert [e.primitive.name for e in closed.jaxpr.eqns] == ["exp", "add"]
    assert [e.primitive.name for e in _jaxpr.live_eqns(closed.jaxpr)] == ["add"]
    seen = []

    def record(ctx, eqn, ins):
        seen.append(eqn.primitive.name)
        return [None] * len(eqn.outvars)

    _jaxpr.interpret(closed.jaxpr, closed.consts, [None], {}, record, literal=lambda v: v,
                     prune=True)
    assert seen == ["add"]


def test_loop_and_branch_parts():
    def f(a, b):
        s = jax.lax.scan(lambda c, x: (c + x * b, c), a, jnp.arange(3.0))[0]
        w = jax.lax.while_loop(lambda v: v[0] < 5, lambda v: (v[0] + 1, v[1] * b), (0, a))[1]
        k = jax.lax.cond(b > 0, lambda: a, lambda: 2.0)
        return s, w, k

    eqns = {e.primitive.name: e for e in jax.make_jaxpr(f)(1.0, 2.0).jaxpr.eqns}
    scan, loop, cond = eqns["scan"], eqns["while"], eqns["cond"]
    body, consts, carry, xs = _jaxpr.scan_parts(scan, list(range(len(scan.invars))))
    assert len(consts) + len(carry) + len(xs) == len(scan.invars)
    assert len(carry) == scan.params["num_carry"] and len(body.jaxpr.invars) == len(scan.invars)
    cj, bj, cc, bc, carry = _jaxpr.while_parts(loop, list(range(len(loop.invars))))
    assert len(cj.jaxpr.invars) == len(cc) + len(carry)
    assert len(bj.jaxpr.invars) == len(bc) + len(carry)
    branches, index, ops = _jaxpr.cond_parts(cond, list(range(len(cond.invars))))
    assert index == 0 and len(branches) == 2 and len(ops) == len(cond.invars) - 1
    assert len(list(_jaxpr.iter_sub_jaxprs(cond.params))) == 2
    assert [k for k, _ in _jaxpr.sub_jaxprs(loop.params)] == ["cond_jaxpr", "body_jaxpr"]
    assert _jaxpr.call_jaxpr(scan) is None  # a loop is not a call


def test_arity_is_checked():
    closed = jax.make_jaxpr(jnp.sin)(1.0)
    with pytest.raises(ValueError, match="2 values for 1 inputs"):
        _jaxpr.interpret(closed.jaxpr, [], [1.0, 2.0], {}, lambda c, e, i: i,
                         literal=lambda v: v.val)


# --------------------------------------------------------------------------- open rules


def _leaky(x):
    return jnp.where(x > 0, x, 0.1 * x)


leaky_p = Primitive("qo_test_leaky_relu")
leaky_p.def_impl(_leaky)
leaky_p.def_abstract_eval(lambda x: x)
mlir.register_lowering(leaky_p, mlir.lower_fun(_leaky, multiple_results=False))


def _apply(params, x):
    return leaky_p.bind(x @ params["w1"] + params["b1"]) @ params["w2"]


def _problem():
    rng = np.random.default_rng(0)
    params = {"w1": rng.normal(size=(2, 3)), "b1": rng.normal(size=3),
              "w2": rng.normal(size=(3, 1))}
    params = jax.tree.map(lambda a: jnp.asarray(a, jnp.float32), params)
    return params, jnp.asarray(rng.normal(size=(6, 2)), jnp.float32)


@pytest.fixture
def registered():
    """Registers rules for the test primitive, and always removes them afterwards."""
    yield qo.symmetry.register_rule
    qo.symmetry.unregister_rule(leaky_p)
    assert "qo_test_leaky_relu" not in qo.symmetry._tracer._registry.USER


def test_without_a_rule_the_symmetry_is_dropped_and_explained():
    params, x = _problem()
    sym = qo.infer_symmetry(_apply, x, params=params)
    assert sym.groups == ()
    assert "unsupported operation qo_test_leaky_relu" in str(sym)


def test_homogeneous_rule_finds_the_rescaling(registered):
    params, x = _problem()
    registered(leaky_p, "homogeneous")
    sym = qo.infer_symmetry(_apply, x, params=params)
    (grp,) = sym.groups
    assert (grp.windows, grp.permutable, grp.rescalable) == (3, True, True)
    assert grp.activation == "qo_test_leaky_relu"
    sym.check(_apply, params, x)
    # the numerical check of infer_symmetry kept everything: it is a true symmetry
    g = (qo.GroupElement(jnp.asarray([2, 0, 1]), jnp.zeros((3, 1), jnp.int32),
                         jnp.asarray([0.5, -1.0, 2.0], jnp.float32)),)
    np.testing.assert_allclose(_apply(sym.act(params, g), x), _apply(params, x), rtol=1e-5,
                               atol=1e-6)
    # the top-level name is the same function
    assert qo.register_rule is qo.symmetry.register_rule


@pytest.mark.parametrize("rule, perm, scale", [
    ("elementwise", True, False),
    ("unknown", False, False),
    ("abs", True, True),  # the built-in rule of another primitive
    (lambda ctx, eqn, ins: ctx.rule("homogeneous")(ctx, eqn, ins), True, True),
], ids=["elementwise", "unknown", "like-abs", "function"])
def test_other_rules(registered, rule, perm, scale):
    params, x = _problem()
    registered("qo_test_leaky_relu", rule)  # by name
    sym = qo.infer_symmetry(_apply, x, params=params)
    found = [(g.permutable, g.rescalable) for g in sym.groups]
    assert found == ([(perm, scale)] if perm or scale else [])
    if rule == "elementwise":
        assert "qo_test_leaky_relu at" in str(sym) and "not positively homogeneous" in str(sym)
    sym.check(_apply, params, x)


def test_bad_registrations_are_refused(registered):
    with pytest.raises(ValueError, match="unknown rule 'homogenous'.*'homogeneous'"):
        registered(leaky_p, "homogenous")
    with pytest.raises(ValueError, match="rule must be a string .* or a function"):
        registered(leaky_p, 3)
    with pytest.raises(ValueError, match="primitive must be a jax.extend.core.Primitive"):
        registered(None, "homogeneous")
    with pytest.raises(ValueError, match="call primitive"):
        registered("pjit", "homogeneous")
    assert "qo_test_leaky_relu" not in qo.symmetry._tracer._registry.USER
    # a rule function returning the wrong thing is named when it runs
    registered(leaky_p, lambda ctx, eqn, ins: None)
    params, x = _problem()
    with pytest.raises(TypeError, match="qo_test_leaky_relu.*list of 1 abstract value"):
        qo.infer_symmetry(_apply, x, params=params)


def test_unregister_restores_the_builtin_rule(registered):
    model = lambda p, x: jnp.tanh(x @ p["w1"] + p["b1"]) @ p["w2"]  # noqa: E731
    params, x = _problem()
    registered("tanh", "homogeneous")  # wrong on purpose: the numerical check catches it
    sym = qo.infer_symmetry(model, x, params=params)
    assert not any(g.rescalable for g in sym.groups)
    assert "numerical check" in str(sym)
    qo.symmetry.unregister_rule("tanh")
    sym = qo.infer_symmetry(model, x, params=params)
    assert "not positively homogeneous" in str(sym)
