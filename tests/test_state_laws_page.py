"""``docs/state_laws.md`` states the registry of ``quotient_opt/transforms/_transport.py``:
every registered (state type, field) appears in the page's tables with the same law and every
type with the same output power, and every row of the page is in the registry. Also the open
registry of wrapper states (``register_wrapper_state``)."""

from __future__ import annotations

import os
import re
from typing import NamedTuple

import jax.numpy as jnp
import optax
import pytest

import quotient_opt as qo
from quotient_opt.transforms import _transport as T

PAGE = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "docs",
                    "state_laws.md")
HEADER = ["state", "field", "law", "out", "note"]
NONE = "—"


def law_text(law: object) -> str:
    """A registry law in the page's notation."""
    if isinstance(law, T._Power):
        if law.stream == 0:
            return f"{law.fixed:+d}" if law.fixed else "0"
        stream = "q" if law.stream == 1 else f"{law.stream}q"
        return stream + (f"{law.fixed:+d}" if law.fixed else "")
    if isinstance(law, T._Keep):
        return "None"
    if isinstance(law, T._Inner):
        return "inner, each" if law.parallel else "inner"
    if isinstance(law, T._Refuse):
        return "refused" + (f" when {law.when.__name__.strip('_')}" if law.when else "")
    raise AssertionError(f"unknown law {law!r}")


OUT = {T._same: "q", T._zero: "0", T._unknown: "unknown", T._inner_out: "inner's",
       T._same_if_inner_same: "q if the inner's is q"}


def out_text(entry: T._Entry) -> str:
    return OUT[entry.out] + (", assumed" if entry.opaque else "")


def registry_rows() -> tuple[set[tuple[str, str, str]], dict[str, str]]:
    table = T._registry()
    names = [t.__name__ for t in table]
    assert len(set(names)) == len(names), "state type names must be unique on the page"
    fields = {(t.__name__, f, law_text(law))
              for t, e in table.items() for f, law in e.fields.items()}
    fields |= {(t.__name__, NONE, NONE) for t, e in table.items() if not e.fields}
    return fields, {t.__name__: out_text(e) for t, e in table.items()}


def page_rows(text: str) -> tuple[set[tuple[str, str, str]], dict[str, str]]:
    """The ``(state, field, law)`` rows and each state's out power, from the page's tables."""
    fields: list[tuple[str, str, str]] = []
    outs: dict[str, str] = {}
    state = None
    for line in text.splitlines():
        if not line.startswith("|"):
            continue
        cells = [c.strip().strip("`").strip() for c in line.strip().strip("|").split("|")]
        if len(cells) != len(HEADER) or cells == HEADER or set(line) <= set("|-\n "):
            continue
        name, field, law, out, _ = cells
        state = name or state
        assert state, line
        if out:
            assert state not in outs, f"{state}: out given twice"
            outs[state] = out
        fields.append((state, field, law))
    assert len(set(fields)) == len(fields), "a (state, field) row is repeated"
    return set(fields), outs


def test_page_and_registry_state_the_same_laws():
    with open(PAGE, encoding="utf-8") as f:
        page_fields, page_outs = page_rows(f.read())
    reg_fields, reg_outs = registry_rows()
    assert sorted(reg_fields - page_fields) == [], "registered, but not so on the page"
    assert sorted(page_fields - reg_fields) == [], "on the page, but not so in the registry"
    assert page_outs == reg_outs


def test_parser_reads_continuation_rows():
    text = ("| state | field | law | out | note |\n|---|---|---|---|---|\n"
            "| `A` | `x` | q | 0 | a |\n| | `count` | None | | |\n")
    assert page_rows(text) == ({("A", "x", "q"), ("A", "count", "None")}, {"A": "0"})


def test_register_wrapper_state_makes_a_new_wrapper_transportable():
    """Unregistered, a wrapper state's params-shaped field other than the inner state is refused;
    registered, it is left alone and the inner state is moved."""

    class MyWrapperState(NamedTuple):
        count: jnp.ndarray
        snapshot: dict  # params-shaped, but the wrapper's own business
        inner_state: optax.OptState

    params = {"w": jnp.ones((2, 3))}
    inner = optax.sgd(0.1, momentum=0.9)
    state = MyWrapperState(jnp.zeros([], jnp.int32), params, inner.init(params))
    with pytest.raises(ValueError, match=r"MyWrapperState\.snapshot.*unregistered state type"):
        qo.check_transportable(state, params)
    try:
        assert qo.register_wrapper_state(MyWrapperState) is MyWrapperState
        qo.check_transportable(state, params)
        seen = []
        qo.map_state(lambda power, tree: (seen.append(power), tree)[1], state, params)
        assert seen == [-1]  # the momentum, inside the registered wrapper
    finally:
        T._WRAPPERS.pop(MyWrapperState, None)


def test_register_wrapper_state_refuses_a_type_without_the_inner_field():
    class NoInner(NamedTuple):
        count: int

    with pytest.raises(ValueError, match="state_type: expected a NamedTuple class with a field"):
        qo.register_wrapper_state(NoInner)
    with pytest.raises(ValueError, match="'inner'"):
        qo.register_wrapper_state(dict, inner="inner")
    assert re.search("register_wrapper_state", T.__doc__)
